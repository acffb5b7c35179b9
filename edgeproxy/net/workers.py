"""
Several worker processes on one port (SPEC section 11).

With C{--workers N} the process twistd starts is a supervisor: it owns the
listening sockets, the shared connection counters and the per-machine work
(admin listener, health checks, heartbeat expiry, DNS), and starts N worker
processes that accept and proxy.  A worker is an ordinary edgeproxy process
built from the same options (L{WorkerFds} in its environment tells it which
descriptors it inherited), so everything the single process does a worker
does the same way.

What is shared, and how:

  - B{The listening sockets}: for each listener the supervisor creates N
    C{SO_REUSEPORT} sockets on one address (L{edgeproxy.net.steering}), one
    per worker, and keeps them all open, so that a worker that dies leaves
    its place in the kernel's group for its replacement.  On a plain (or
    TLS) listener a classic BPF program steers each connection to the
    worker that owns its client address (IPv6 by the binding prefix), so
    one client always lands on one worker: its bindings, its per-client
    limits and F16's simultaneous first connections stay in one process and
    are exactly as correct as with one worker.
  - B{PROXY listeners}: the socket peer is the load balancer, so the kernel
    spreads their connections by its 4-tuple hash; once the header names
    the client, a worker that does not own it passes the socket and the
    bytes read so far to the owner over a datagram socket (C{SCM_RIGHTS}:
    L{Handoff}), which adopts it and reads the same header again.
  - B{Connection counts}: L{edgeproxy.net.sharedload}: one counter cell per
    backend per worker in shared memory, a POSIX record lock per backend
    only where a hard limit applies (the kernel drops the lock of a process
    that dies), and the global connection cap in slot 0.  Other workers'
    counts reach a worker's soft-limit scoring within
    L{REFRESH_INTERVAL}; hard limits are checked on the shared cells.
  - B{Per-machine state}: the supervisor runs the health checks and
    heartbeat expiry and sends their verdicts (and the checks' RTTs) to
    every worker over its control connection (L{SupervisorLink} /
    L{WorkerLink}, netstrings of JSON); admin states travel through the state
    file, which every process polls and which the supervisor tells the
    workers to read again when it changes; every process reloads the
    routing table from the store itself.
  - B{Metrics}: each worker reports its counters and histograms every
    L{REPORT_INTERVAL} seconds; the supervisor's admin listener serves the
    sum (L{WorkerMetrics}), keeping a dead worker's last report so counters
    never go backwards.
"""

from __future__ import annotations

import array
import errno
import json
import os
import re
import signal
import socket
import struct
import sys
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import attrs
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.basic import NetstringReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from edgeproxy.metrics import HistogramSnapshot, MetricsStore

__all__ = [
    "FORWARDED_SOURCES",
    "REFRESH_INTERVAL",
    "REPORT_INTERVAL",
    "WORKER_ENV",
    "AdoptedPortEndpoint",
    "Handoff",
    "ListenerSteering",
    "WorkerFds",
    "WorkerMetrics",
    "WorkerSupervisor",
    "worker_command",
]

_log = Logger()

#: The environment variable that makes an edgeproxy process a worker.
WORKER_ENV = "EDGEPROXY_WORKER"

#: Set to C{off} in the supervisor's environment, it makes the listening
#: groups without client steering (bench/run.py's C{--workers}: a load
#: generator on one address would otherwise reach one worker only).  Not an
#: option: a benchmark knob.
STEER_ENV = "EDGEPROXY_WORKERS_STEER"

#: Seconds between a worker's metrics reports to the supervisor.
REPORT_INTERVAL = 1.0

#: Seconds between a worker's reads of the other workers' connection counts
#: (how stale, at most, soft-limit scoring is about them).
REFRESH_INTERVAL = 0.1

#: The overlay sources the supervisor owns and sends to the workers (the
#: breaker stays per worker: it is fed by that worker's own connects; admin
#: states travel through the state file).
FORWARDED_SOURCES = ("health", "heartbeat")

#: Counter of PROXY-listener connections passed to the worker that owns the
#: client (label: C{sent}, C{received}, C{failed}, C{dropped}).
HANDOFFS = "worker_handoffs"

#: Largest datagram of a handoff: the PROXY header and what followed it in
#: the same reads (a v2 header is at most 64 KiB + 16; reads are 64 KiB).
_HANDOFF_MAX = 256 * 1024
_HANDOFF_HEAD = struct.Struct("!BH")
_HANDOFF_VERSION = 1

# A twistd log line: "2026-12-02T18:00:00+0000 [system] text".
_TIMESTAMP = re.compile(rb"^\d{4}-\d\d-\d\dT[\d:.]+[+-]\d{4} ")


@attrs.frozen
class WorkerFds:
    """
    What a worker inherited, by descriptor number in the worker (passed as
    JSON in L{WORKER_ENV}).

    @ivar index: This worker's index, 0 .. C{count - 1}.
    @ivar count: How many workers there are.
    @ivar listeners: Per listener (in C{--listen} order), this worker's
        socket of its C{SO_REUSEPORT} group.
    @ivar families: Per listener, the socket's address family.
    @ivar counters: The shared counters' memory file.
    @ivar slots: Their number of slots.
    @ivar control: The control connection to the supervisor.
    @ivar inbox: Where handed-off connections arrive.
    @ivar outboxes: Per worker, where to send it a connection (-1 for this
        worker).
    @ivar ipv6_prefix: The binding prefix the steering hashes IPv6 on.
    """

    index: int
    count: int
    listeners: Tuple[int, ...]
    families: Tuple[int, ...]
    counters: int
    slots: int
    control: int
    inbox: int
    outboxes: Tuple[int, ...]
    ipv6_prefix: int = 64

    def encode(self) -> str:
        """
        This as the value of L{WORKER_ENV}.
        """
        return json.dumps(attrs.asdict(self), separators=(",", ":"))

    @classmethod
    def decode(cls, text: str) -> "WorkerFds":
        """
        Read L{WORKER_ENV}.

        @raise ValueError: It is not what a supervisor writes.
        """
        try:
            raw = json.loads(text)
            fds = cls(
                index=int(raw["index"]),
                count=int(raw["count"]),
                listeners=tuple(int(fd) for fd in raw["listeners"]),
                families=tuple(int(f) for f in raw["families"]),
                counters=int(raw["counters"]),
                slots=int(raw["slots"]),
                control=int(raw["control"]),
                inbox=int(raw["inbox"]),
                outboxes=tuple(int(fd) for fd in raw["outboxes"]),
                ipv6_prefix=int(raw.get("ipv6_prefix", 64)),
            )
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"{WORKER_ENV} is not a worker description: {e}") from None
        if not (0 <= fds.index < fds.count) or len(fds.outboxes) != fds.count:
            raise ValueError(f"{WORKER_ENV}: index {fds.index} of {fds.count} workers")
        if len(fds.families) != len(fds.listeners):
            raise ValueError(f"{WORKER_ENV}: one family per listener")
        return fds


def worker_command(arguments: Sequence[str], reactor: Any = None) -> List[str]:
    """
    The command line of a worker: this interpreter running twistd in the
    foreground, without a pid file, logging to its standard output (which
    the supervisor reads), on the supervisor's reactor (C{edgeepoll} when
    C{reactor} is one), with the edgeproxy C{arguments} the supervisor was
    given.
    """
    from edgeproxy.net.reactor import EdgeEPollReactor

    chosen = ["--reactor=edgeepoll"] if isinstance(reactor, EdgeEPollReactor) else []
    return [
        sys.executable,
        "-c",
        "from twisted.scripts.twistd import run; run()",
        "--nodaemon",
        "--pidfile=",
        *chosen,
        "edgeproxy",
        *arguments,
    ]


# -- metrics -----------------------------------------------------------------


def _encode_report(metrics: MetricsStore) -> Dict[str, Any]:
    return {
        "counters": [[name, label, value] for (name, label), value in metrics.counters().items()],
        "histograms": {
            name: [list(h.bounds), list(h.counts), h.sum, h.count]
            for name, h in metrics.histograms().items()
        },
    }


def _decode_report(
    raw: Any,
) -> Tuple[Dict[Tuple[str, str], int], Dict[str, HistogramSnapshot]]:
    counters: Dict[Tuple[str, str], int] = {}
    for name, label, value in raw.get("counters", ()):
        counters[(str(name), str(label))] = int(value)
    histograms: Dict[str, HistogramSnapshot] = {}
    for name, (bounds, counts, total, count) in raw.get("histograms", {}).items():
        histograms[str(name)] = HistogramSnapshot(
            tuple(float(b) for b in bounds), tuple(int(c) for c in counts), float(total), int(count)
        )
    return counters, histograms


def _add_histogram(into: Dict[str, HistogramSnapshot], name: str, h: HistogramSnapshot) -> None:
    mine = into.get(name)
    if mine is None:
        into[name] = h
    elif mine.bounds == h.bounds:
        into[name] = HistogramSnapshot(
            h.bounds,
            tuple(a + b for a, b in zip(mine.counts, h.counts)),
            mine.sum + h.sum,
            mine.count + h.count,
        )


class WorkerMetrics(MetricsStore):
    """
    The supervisor's metrics: its own (health checks, API, DNS...) plus the
    last report of every worker, plus what workers that have exited last
    reported (so a counter never goes backwards when a worker is replaced).
    """

    def __init__(self, buckets: Mapping[str, Sequence[float]] | None = None) -> None:
        super().__init__(buckets)
        self._reports: Dict[
            int, Tuple[Dict[Tuple[str, str], int], Dict[str, HistogramSnapshot]]
        ] = {}
        self._retiredCounters: Dict[Tuple[str, str], int] = {}
        self._retiredHistograms: Dict[str, HistogramSnapshot] = {}
        #: Per worker index, extra figures of its last report (bindings...).
        self.gauges: Dict[int, Dict[str, Any]] = {}

    def report(self, worker: int, raw: Any) -> None:
        """
        Worker C{worker} sent its figures (see L{_encode_report}).

        @raise ValueError: A malformed report (the previous one is kept).
        """
        try:
            self._reports[worker] = _decode_report(raw)
        except (ValueError, TypeError, AttributeError) as e:
            raise ValueError(f"malformed metrics report: {e}") from None
        gauges = raw.get("gauges")
        if isinstance(gauges, dict):
            self.gauges[worker] = gauges

    def retire(self, worker: int) -> None:
        """
        Worker C{worker} exited: its last counters stay in the sums.
        """
        report = self._reports.pop(worker, None)
        self.gauges.pop(worker, None)
        if report is None:
            return
        counters, histograms = report
        retired = self._retiredCounters
        for key, value in counters.items():
            retired[key] = retired.get(key, 0) + value
        for name, h in histograms.items():
            _add_histogram(self._retiredHistograms, name, h)

    def gauge(self, name: str) -> int:
        """
        The sum over live workers of gauge C{name} of their last reports.
        """
        return sum(int(g.get(name, 0)) for g in self.gauges.values())

    def counter(self, name: str, label: str = "") -> int:
        key = (name, label)
        total = super().counter(name, label) + self._retiredCounters.get(key, 0)
        for counters, _ in self._reports.values():
            total += counters.get(key, 0)
        return total

    def counters(self) -> Mapping[Tuple[str, str], int]:
        merged = dict(super().counters())
        for source in (self._retiredCounters, *(c for c, _ in self._reports.values())):
            for key, value in source.items():
                merged[key] = merged.get(key, 0) + value
        return merged

    def histograms(self) -> Mapping[str, HistogramSnapshot]:
        merged = dict(super().histograms())
        for source in (self._retiredHistograms, *(h for _, h in self._reports.values())):
            for name, h in source.items():
                _add_histogram(merged, name, h)
        return merged

    def retain(self, name: str, labels: Any) -> int:
        dropped = super().retain(name, labels)
        retired = self._retiredCounters
        for key in [k for k in retired if k[0] == name and k[1] not in labels]:
            del retired[key]
            dropped += 1
        return dropped


# -- the control connection -------------------------------------------------


class _Link(NetstringReceiver):
    """
    One end of a control connection: JSON objects in netstrings.
    """

    MAX_LENGTH = 16 * 1024 * 1024

    def send(self, message: Mapping[str, Any]) -> None:
        if self.transport is not None and self.connected:
            self.sendString(json.dumps(message, separators=(",", ":")).encode())

    def stringReceived(self, string: bytes) -> None:
        try:
            message = json.loads(string)
            if not isinstance(message, dict):
                raise ValueError("not an object")
        except (ValueError, RecursionError) as e:
            _log.warn("control message refused: {error}", error=str(e))
            return
        try:
            self.messageReceived(message)
        except Exception:
            _log.failure("control message {keys} failed", keys=sorted(message))

    def messageReceived(self, message: Dict[str, Any]) -> None:
        raise NotImplementedError()


class SupervisorLink(_Link):
    """
    The supervisor's end of worker C{index}'s control connection.
    """

    def __init__(self, supervisor: "WorkerSupervisor", index: int) -> None:
        self.supervisor = supervisor
        self.index = index

    def connectionMade(self) -> None:
        self.supervisor.linkMade(self)

    #: Set when the worker's process has ended: a report still unread on the
    #: connection then is ignored (its counts are already retired).
    retired = False

    def messageReceived(self, message: Dict[str, Any]) -> None:
        report = message.get("metrics")
        if report is not None and not self.retired:
            self.supervisor.metrics.report(self.index, report)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.supervisor.linkLost(self)


class WorkerLink(_Link):
    """
    A worker's end of its control connection: applies the supervisor's
    verdicts, RTTs and state-file nudges; reports metrics; and stops the
    worker gracefully when the supervisor is gone.
    """

    def __init__(self, worker: "WorkerRuntime") -> None:
        self.worker = worker
        self._report: Optional[LoopingCall] = None

    def connectionMade(self) -> None:
        self._report = LoopingCall(self.report)
        self._report.clock = self.worker.reactor
        self._report.start(REPORT_INTERVAL, now=True)

    def report(self) -> None:
        worker = self.worker
        message = _encode_report(worker.metrics)
        message["gauges"] = worker.gauges()
        self.send({"metrics": message})

    def messageReceived(self, message: Dict[str, Any]) -> None:
        worker = self.worker
        verdicts = message.get("verdicts")
        if isinstance(verdicts, dict):
            worker.applyVerdicts(verdicts)
        rtt = message.get("rtt")
        if isinstance(rtt, dict):
            worker.applyRtts(rtt)
        if message.get("state"):
            worker.pollState()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._report is not None and self._report.running:
            self._report.stop()
        self.worker.supervisorGone()


# -- handing PROXY connections to their owner --------------------------------


class _Inbox(FileDescriptor):
    """
    The reading end of this worker's handoff socket.
    """

    def __init__(self, reactor: Any, sock: socket.socket, handoff: "Handoff") -> None:
        super().__init__(reactor)
        self.socket = sock
        self.handoff = handoff

    def fileno(self) -> int:
        return self.socket.fileno()

    def doRead(self) -> None:
        for _ in range(64):
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.socket, _HANDOFF_MAX, 4)
            except BlockingIOError:
                return None
            except OSError as e:
                _log.warn("handoff inbox: {error}", error=e)
                return None
            if _flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                # Cut short: the bytes or descriptors are incomplete.
                self.handoff.received(b"", fds)
                continue
            self.handoff.received(data, fds)
        return None

    def connectionLost(self, reason: Failure) -> None:
        FileDescriptor.connectionLost(self, reason)

    def logPrefix(self) -> str:
        return "handoff inbox"


class Handoff:
    """
    This worker's side of the PROXY-listener handoff: who owns a client,
    sending a connection to its owner, and adopting the connections others
    send here.

    @ivar index: This worker.
    @ivar count: How many workers.
    @ivar factories: Per listener index, the socket-level factory its port
        uses (filled in by L{AdoptedPortEndpoint}); an adopted connection
        goes through it as if accepted here.
    """

    def __init__(
        self,
        reactor: Any,
        index: int,
        count: int,
        ipv6_prefix: int,
        outboxes: Sequence[Optional[socket.socket]],
        metrics: Any,
    ) -> None:
        from edgeproxy.net.steering import owner_of

        self.reactor = reactor
        self.index = index
        self.count = count
        self.ipv6Prefix = ipv6_prefix
        self.outboxes = list(outboxes)
        for outbox in self.outboxes:
            if outbox is not None:
                outbox.setblocking(False)
        self.metrics = metrics
        self.factories: Dict[int, IProtocolFactory] = {}
        self._ownerOf = owner_of
        self._inbox: Optional[_Inbox] = None
        self._failLogged = False

    def listen(self, inbox: socket.socket) -> None:
        """
        Start adopting what arrives on C{inbox}.
        """
        inbox.setblocking(False)
        self._inbox = _Inbox(self.reactor, inbox, self)
        self._inbox.startReading()

    def stop(self) -> None:
        if self._inbox is not None:
            self._inbox.stopReading()
            self._inbox = None

    def owner(self, host: str) -> int:
        """
        The worker that owns client C{host}.
        """
        return self._ownerOf(host, self.count, self.ipv6Prefix)

    def send(self, listener: int, protocol: Any, data: bytes, owner: int) -> bool:
        """
        Pass C{protocol}'s connection, of which C{data} has been read, to
        worker C{owner}; C{False} (and the caller serves it here) when it
        cannot be sent: not a TCP socket of this process, or the owner's
        inbox is full.
        """
        transport = protocol.transport
        sock = getattr(transport, "socket", None)
        outbox = self.outboxes[owner] if 0 <= owner < len(self.outboxes) else None
        if sock is None or outbox is None or not hasattr(transport, "_shouldShutdown"):
            return False
        payload = _HANDOFF_HEAD.pack(_HANDOFF_VERSION, listener) + data
        # The connection's slot of the global cap goes back before it is
        # sent, so that the owner (woken by the send, maybe before this
        # process runs again) finds it free: never two slots for one
        # connection, never more than the cap.
        admission = getattr(protocol, "admission", None)
        if admission is not None and getattr(protocol, "admissionAware", False):
            protocol.admission = None
            admission.leave()
        else:
            admission = None
        try:
            # (Not socket.send_fds: it drops its flags argument, and a full
            # inbox would then block this worker.)
            outbox.sendmsg(
                [payload],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [sock.fileno()]))],
                socket.MSG_DONTWAIT,
            )
        except OSError as e:
            if admission is not None:
                # Served here after all: it holds its slot again.
                admission.rejoin()
                protocol.admission = admission
            self.metrics.increment(HANDOFFS, "failed")
            if not self._failLogged:
                self._failLogged = True
                _log.warn(
                    "cannot pass a PROXY connection to worker {owner} ({error}): served here,"
                    " so its binding may differ (counted as {counter}{{failed}}; logged once)",
                    owner=owner,
                    error=e,
                    counter=HANDOFFS,
                )
            return False
        self.metrics.increment(HANDOFFS, "sent")
        # The socket lives on in the owner: close this process's descriptor
        # without shutdown() (which would end the connection for both).
        transport._shouldShutdown = False
        transport.stopReading()
        transport.loseConnection()
        return True

    def received(self, data: bytes, fds: Sequence[int]) -> None:
        """
        A connection arrived from another worker: adopt it through its
        listener's factory and deliver the bytes that were read.
        """
        if len(fds) != 1 or len(data) < _HANDOFF_HEAD.size:
            for fd in fds:
                os.close(fd)
            self.metrics.increment(HANDOFFS, "dropped")
            _log.warn("malformed handoff message ({n} descriptors) dropped", n=len(fds))
            return
        version, listener = _HANDOFF_HEAD.unpack_from(data)
        fd = fds[0]
        factory = self.factories.get(listener)
        if version != _HANDOFF_VERSION or factory is None:
            os.close(fd)
            self.metrics.increment(HANDOFFS, "dropped")
            return
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            os.close(fd)
            self.metrics.increment(HANDOFFS, "dropped")
            return
        transport = None
        try:
            transport = self.reactor.adoptStreamConnection(sock.fileno(), sock.family, factory)
            protocol = getattr(transport, "protocol", None)
            if transport is None or protocol is None or not getattr(transport, "connected", True):
                # Refused by the admission (the cap, just reached).
                self.metrics.increment(HANDOFFS, "dropped")
                return
            self.metrics.increment(HANDOFFS, "received")
            rest = data[_HANDOFF_HEAD.size :]
            if rest:
                protocol.dataReceived(rest)
        except Exception:
            # One connection's failure must not take the inbox down with it.
            self.metrics.increment(HANDOFFS, "dropped")
            _log.failure("a handed-off connection failed; closed")
            abort = getattr(transport, "abortConnection", None)
            if callable(abort):
                abort()
        finally:
            sock.close()


@attrs.define
class ListenerSteering:
    """
    What a PROXY listener's header protocol asks: does this worker own the
    header's client, and if not, pass the connection on.
    """

    handoff: Handoff
    listener: int

    def divert(self, protocol: Any, host: str, data: bytes) -> bool:
        """
        C{True} if the connection (C{data} read so far) was passed to the
        worker that owns C{host}; C{False}: serve it here.
        """
        handoff = self.handoff
        owner = handoff.owner(host)
        if owner == handoff.index:
            return False
        return handoff.send(self.listener, protocol, data, owner)


@implementer(IStreamServerEndpoint)
@attrs.define
class AdoptedPortEndpoint:
    """
    Listens by adopting a listening socket this process inherited
    (C{adoptStreamPort}), noting the factory for handed-off connections.
    """

    reactor: Any
    fd: int
    family: int
    listener: int
    handoff: Optional[Handoff] = None

    def listen(self, protocolFactory: IProtocolFactory) -> "defer.Deferred[IListeningPort]":
        try:
            port = self.reactor.adoptStreamPort(self.fd, self.family, protocolFactory)
        except Exception:
            return defer.fail()
        # The port listens on its own duplicate: with the inherited
        # descriptor closed, stopping the port closes this process's last
        # hold on the socket (so a stopped group refuses connections).
        os.close(self.fd)
        if self.handoff is not None:
            self.handoff.factories[self.listener] = protocolFactory
        return defer.succeed(port)


# -- the worker's runtime ----------------------------------------------------


class WorkerRuntime(Service):
    """
    A worker's own service: its control connection, its handoff inbox, the
    refresh of other workers' counts.
    """

    name = "edgeproxy-worker"

    def __init__(
        self,
        reactor: Any,
        fds: WorkerFds,
        *,
        metrics: MetricsStore,
        load: Any,
        overlay: Any,
        rtts: Any,
        handoff: Optional[Handoff],
        bindings: Any = None,
        admission: Any = None,
        state_file: Any = None,
    ) -> None:
        self.reactor = reactor
        self.fds = fds
        self.metrics = metrics
        self.load = load
        self.overlay = overlay
        self.rtts = rtts
        self.handoff = handoff
        self.bindings = bindings
        self.admission = admission
        self.stateFile = state_file
        self.link: Optional[WorkerLink] = None
        self._refresh: Optional[LoopingCall] = None
        self._stopping = False

    def startService(self) -> None:
        super().startService()
        factory = Factory.forProtocol(lambda: WorkerLink(self))
        transport = self.reactor.adoptStreamConnection(self.fds.control, socket.AF_UNIX, factory)
        self.link = getattr(transport, "protocol", None)
        os.close(self.fds.control)
        refresh = getattr(self.load, "refresh", None)
        if callable(refresh):
            self._refresh = LoopingCall(refresh)
            self._refresh.clock = self.reactor
            self._refresh.start(REFRESH_INTERVAL, now=True)
        if self.handoff is not None:
            self.handoff.listen(socket.socket(fileno=self.fds.inbox))
        _log.info(
            "worker {index} of {count} running (pid {pid})",
            index=self.fds.index,
            count=self.fds.count,
            pid=os.getpid(),
        )

    def stopService(self) -> None:
        self._stopping = True
        if self._refresh is not None and self._refresh.running:
            self._refresh.stop()
        if self.handoff is not None:
            self.handoff.stop()
        return super().stopService()

    def gauges(self) -> Dict[str, Any]:
        admission = self.admission
        return {
            "bindings": len(self.bindings) if self.bindings is not None else 0,
            "open": admission.open if admission is not None else 0,
            "pid": os.getpid(),
        }

    def applyVerdicts(self, verdicts: Mapping[str, Any]) -> None:
        overlay = self.overlay
        if overlay is None:
            return
        for backend_id, sources in verdicts.items():
            if not isinstance(sources, dict):
                continue
            for source in FORWARDED_SOURCES:
                value = sources.get(source, 0)
                if isinstance(value, int) and value in (0, 1, 2):
                    try:
                        overlay.setVerdict(str(backend_id), source, value)
                    except Exception:
                        _log.failure(
                            "verdict {source} of {backend} failed",
                            source=source,
                            backend=backend_id,
                        )

    def applyRtts(self, rtts: Mapping[str, Any]) -> None:
        table = self.rtts
        if table is None:
            return
        for backend_id in [b for b in table if b not in rtts]:
            del table[backend_id]
        for backend_id, value in rtts.items():
            if isinstance(value, (int, float)) and table.get(backend_id) != value:
                table[str(backend_id)] = float(value)

    def pollState(self) -> None:
        if self.stateFile is not None:
            self.stateFile.poll()

    def supervisorGone(self) -> None:
        if self._stopping:
            return
        _log.warn("worker {index}: the supervisor is gone; shutting down", index=self.fds.index)
        if self.reactor.running:
            self.reactor.stop()


# -- the supervisor ----------------------------------------------------------


class WorkerProcess(ProcessProtocol):
    """
    One worker process: its log lines are the supervisor's, prefixed; its
    end is the supervisor's to handle.
    """

    def __init__(self, supervisor: "WorkerSupervisor", index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.started = time.monotonic()
        self._partial: Dict[int, bytes] = {}
        self.pid: Optional[int] = None

    def connectionMade(self) -> None:
        self.pid = getattr(self.transport, "pid", None)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        buffered = self._partial.get(childFD, b"") + data
        *lines, rest = buffered.split(b"\n")
        self._partial[childFD] = rest[-65536:]
        for line in lines:
            line = _TIMESTAMP.sub(b"", line).rstrip()
            if line:
                _log.info(
                    "worker {index}: {line}",
                    index=self.index,
                    line=line.decode("utf-8", "replace"),
                )

    def processEnded(self, reason: Failure) -> None:
        self.supervisor.workerEnded(self, reason)


def _probe(host: str, port: int) -> None:
    """
    Fail as a single process would when C{(host, port)} is taken: the
    C{SO_REUSEPORT} group would otherwise join another process's group on
    it (another edgeproxy of the same user) instead of failing.

    @raise SystemExit: The address is in use (or not local).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        probe.bind((host, port))
    except OSError as e:
        raise SystemExit(f"edgeproxy: cannot listen on {host}:{port}: {e}") from None
    finally:
        probe.close()


class WorkerSupervisor(Service):
    """
    Owns the listening sockets and the shared counters, starts C{count}
    workers, replaces one that dies (after a backoff that doubles while
    they keep dying young), and on stop sends every worker SIGTERM and
    waits for their graceful shutdowns.

    @ivar pids: Worker index -> pid of the live workers.
    """

    name = "edgeproxy-supervisor"

    #: Seconds before the first restart of a worker that died; doubled up to
    #: L{BACKOFF_MAX} while replacements die within L{STABLE} seconds.
    BACKOFF = 0.5
    BACKOFF_MAX = 30.0
    STABLE = 10.0

    def __init__(
        self,
        reactor: Any,
        count: int,
        addresses: Sequence[Tuple[str, int, bool]],
        command: Sequence[str],
        *,
        counters: Any,
        metrics: WorkerMetrics,
        ipv6_prefix: int = 64,
        shutdown_timeout: float = 30.0,
        environ: Optional[Mapping[str, str]] = None,
        overlay: Any = None,
        rtts: Any = None,
        state: Any = None,
        backlog: int = 1024,
        spawn: Optional[Callable[..., Any]] = None,
    ) -> None:
        self.reactor = reactor
        self.count = count
        self.addresses = list(addresses)
        self.command = list(command)
        self.counters = counters
        self.metrics = metrics
        self.ipv6Prefix = ipv6_prefix
        self.shutdownTimeout = shutdown_timeout
        self.environ = dict(os.environ if environ is None else environ)
        self.overlay = overlay
        self.rtts = rtts
        self.state = state
        self.backlog = backlog
        self._spawn = spawn if spawn is not None else reactor.spawnProcess
        self.groups: List[List[socket.socket]] = []
        self.inboxes: List[Tuple[socket.socket, socket.socket]] = []
        self.processes: Dict[int, WorkerProcess] = {}
        self.links: Dict[int, SupervisorLink] = {}
        self.restarts: Dict[int, Any] = {}
        self.backoff: Dict[int, float] = {}
        self.pids: Dict[int, int] = {}
        self.restartCount: Dict[int, int] = {}
        self._stopping = False
        self._stopped: Optional[defer.Deferred[None]] = None
        self._rttsSent: Dict[str, float] = {}
        self._verdictsSent: Dict[str, Dict[str, int]] = {}
        self._rttCall: Optional[LoopingCall] = None

    # -- start ---------------------------------------------------------------

    def privilegedStartService(self) -> None:
        from edgeproxy.net.steering import reuseport_group

        seen = set()
        for host, port, _ in self.addresses:
            if port and (host, port) in seen:
                raise SystemExit(f"edgeproxy: two listeners on {host}:{port}")
            seen.add((host, port))
            if port:
                _probe(host, port)
        # Benchmarks only (bench/run.py --workers): without steering the
        # kernel spreads one client's connections over the workers by its
        # 4-tuple hash; bindings and per-client limits are then per worker.
        unsteered = os.environ.get(STEER_ENV) == "off"
        if unsteered:
            _log.warn(
                "{var}=off: connections are not steered by client address"
                " (for benchmarks only: bindings and per-client limits are per worker)",
                var=STEER_ENV,
            )
        for host, port, steer in self.addresses:
            try:
                group = reuseport_group(
                    host,
                    port,
                    self.count,
                    backlog=self.backlog,
                    steer=steer and not unsteered,
                    ipv6_prefix=self.ipv6Prefix,
                )
            except OSError as e:
                self._closeSockets()
                raise SystemExit(f"edgeproxy: cannot listen on {host}:{port}: {e}") from None
            self.groups.append(group)
        for _ in range(self.count):
            receiving, sending = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
            for s in (receiving, sending):
                try:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * _HANDOFF_MAX)
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * _HANDOFF_MAX)
                except OSError:
                    pass
            self.inboxes.append((receiving, sending))
        super().privilegedStartService()

    def ports(self) -> List[int]:
        """
        The port each listener is bound to (after privilegedStartService).
        """
        return [group[0].getsockname()[1] for group in self.groups]

    def startService(self) -> None:
        super().startService()
        if not self.groups and self.addresses:
            self.privilegedStartService()
        if self.overlay is not None:
            self.overlay.addListener(self._verdictChanged)
        if self.state is not None:
            self.state.addListener(self._stateChanged)
        self._rttCall = LoopingCall(self._sendRtts)
        self._rttCall.clock = self.reactor
        self._rttCall.start(1.0, now=False)
        for index in range(self.count):
            self.spawn(index)
        _log.info(
            "supervisor (pid {pid}): {count} workers on {ports}",
            pid=os.getpid(),
            count=self.count,
            ports=", ".join(
                f"{h or '*'}:{p}" for (h, _, _), p in zip(self.addresses, self.ports())
            ),
        )

    def spawn(self, index: int) -> None:
        """
        Start worker C{index}.
        """
        self.restarts.pop(index, None)
        if self._stopping:
            return
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        child_fds: Dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        numbers = iter(range(3, 1 << 16))

        def give(fd: int) -> int:
            number = next(numbers)
            child_fds[number] = fd
            return number

        listeners = tuple(give(group[index].fileno()) for group in self.groups)
        families = tuple(int(group[index].family) for group in self.groups)
        fds = WorkerFds(
            index=index,
            count=self.count,
            listeners=listeners,
            families=families,
            counters=give(self.counters.fd),
            slots=self.counters.slots,
            control=give(child.fileno()),
            inbox=give(self.inboxes[index][0].fileno()),
            outboxes=tuple(
                -1 if other == index else give(self.inboxes[other][1].fileno())
                for other in range(self.count)
            ),
            ipv6_prefix=self.ipv6Prefix,
        )
        environ = dict(self.environ)
        environ[WORKER_ENV] = fds.encode()
        process = WorkerProcess(self, index)
        try:
            transport = self._spawn(
                process, self.command[0], self.command, env=environ, childFDs=child_fds
            )
        except OSError as e:
            parent.close()
            child.close()
            _log.error("cannot start worker {index}: {error}", index=index, error=e)
            self._scheduleRestart(index)
            return
        finally:
            child.close()
        self.processes[index] = process
        pid = getattr(transport, "pid", None)
        if pid is not None:
            self.pids[index] = pid
        self.reactor.adoptStreamConnection(
            parent.fileno(),
            socket.AF_UNIX,
            Factory.forProtocol(lambda: SupervisorLink(self, index)),
        )
        parent.close()
        _log.info("worker {index} started (pid {pid})", index=index, pid=pid)

    # -- the links -----------------------------------------------------------

    def linkMade(self, link: SupervisorLink) -> None:
        self.links[link.index] = link
        verdicts = self._verdictsSent if self._verdictsSent else self._allVerdicts()
        if verdicts:
            link.send({"verdicts": verdicts})
        if self.rtts is not None and self.rtts:
            link.send({"rtt": dict(self.rtts)})

    def linkLost(self, link: SupervisorLink) -> None:
        if self.links.get(link.index) is link:
            del self.links[link.index]

    def broadcast(self, message: Mapping[str, Any]) -> None:
        for link in list(self.links.values()):
            link.send(message)

    def _sourcesOf(self, backend_id: str) -> Dict[str, int]:
        sources = self.overlay.sources(backend_id)
        return {s: v for s, v in sources.items() if s in FORWARDED_SOURCES}

    def _allVerdicts(self) -> Dict[str, Dict[str, int]]:
        overlay = self.overlay
        if overlay is None:
            return {}
        ids = getattr(overlay, "_verdicts", None)
        out: Dict[str, Dict[str, int]] = {}
        for backend_id in list(ids or ()):
            sources = self._sourcesOf(backend_id)
            if sources:
                out[backend_id] = sources
        return out

    def _verdictChanged(self, backend_id: str, old: int, new: int) -> None:
        self._syncVerdicts()

    def _syncVerdicts(self) -> None:
        """
        Send the workers every forwarded verdict that changed since the last
        time (the overlay's listeners hear only changes of the combined
        verdict, so this also runs every second: a health verdict that
        changed under an admin C{maint} still reaches the workers).
        """
        current = self._allVerdicts()
        sent = self._verdictsSent
        changed: Dict[str, Dict[str, int]] = {}
        for backend_id, sources in current.items():
            if sent.get(backend_id) != sources:
                changed[backend_id] = sources
        for backend_id in sent:
            if backend_id not in current:
                changed[backend_id] = {}
        self._verdictsSent = current
        if changed:
            self.broadcast({"verdicts": changed})

    def _stateChanged(self, *args: Any) -> None:
        self.broadcast({"state": True})

    def _sendRtts(self) -> None:
        if self.overlay is not None:
            self._syncVerdicts()
        if self.rtts is None:
            return
        current = dict(self.rtts)
        if current != self._rttsSent:
            self._rttsSent = current
            self.broadcast({"rtt": current})

    # -- a worker's end --------------------------------------------------------

    def workerEnded(self, process: WorkerProcess, reason: Failure) -> None:
        index = process.index
        if self.processes.get(index) is process:
            del self.processes[index]
        self.pids.pop(index, None)
        link = self.links.get(index)
        if link is not None:
            link.retired = True
        # Its connections died with it: nothing it counted is open now.
        self.counters.clearWorker(index)
        self.metrics.retire(index)
        status = getattr(reason.value, "exitCode", None)
        signalled = getattr(reason.value, "signal", None)
        lived = time.monotonic() - process.started
        if self._stopping:
            _log.info(
                "worker {index} (pid {pid}) stopped (status {status})",
                index=index,
                pid=process.pid,
                status=status,
            )
            if not self.processes and self._stopped is not None:
                stopped, self._stopped = self._stopped, None
                stopped.callback(None)
            return
        delay = self.backoff.get(index, self.BACKOFF)
        if lived >= self.STABLE:
            delay = self.BACKOFF
        self.backoff[index] = min(delay * 2, self.BACKOFF_MAX)
        _log.warn(
            "worker {index} (pid {pid}) ended after {lived:.1f} s (status {status},"
            " signal {signal}); starting a replacement in {delay} s",
            index=index,
            pid=process.pid,
            lived=lived,
            status=status,
            signal=signalled,
            delay=delay,
        )
        self.restartCount[index] = self.restartCount.get(index, 0) + 1
        self._scheduleRestart(index, delay)

    def _scheduleRestart(self, index: int, delay: Optional[float] = None) -> None:
        if self._stopping:
            return
        if delay is None:
            delay = self.backoff.get(index, self.BACKOFF)
            self.backoff[index] = min(delay * 2, self.BACKOFF_MAX)
        self.restarts[index] = self.reactor.callLater(delay, self.spawn, index)

    # -- stop ----------------------------------------------------------------

    def stopService(self) -> "defer.Deferred[None]":
        super().stopService()
        self._stopping = True
        for call in self.restarts.values():
            if call.active():
                call.cancel()
        self.restarts.clear()
        if self._rttCall is not None and self._rttCall.running:
            self._rttCall.stop()
        if self.overlay is not None:
            try:
                self.overlay._listeners.remove(self._verdictChanged)
            except (AttributeError, ValueError):
                pass
        if not self.processes:
            self._closeSockets()
            return defer.succeed(None)
        stopped: defer.Deferred[None] = defer.Deferred()
        self._stopped = stopped
        _log.info(
            "stopping {n} workers (each drains for up to {timeout} s)",
            n=len(self.processes),
            timeout=self.shutdownTimeout,
        )
        for process in list(self.processes.values()):
            self._signal(process, "TERM")
        # The workers stop listening at once; with the supervisor's copies
        # closed too the port refuses new connections (F15) instead of
        # queueing them where nobody accepts any more.
        for group in self.groups:
            for s in group:
                s.close()
        deadline = self.reactor.callLater(self.shutdownTimeout + 10.0, self._killAll)

        def done(result: None) -> None:
            if deadline.active():
                deadline.cancel()
            self._closeSockets()

        stopped.addCallback(done)
        return stopped

    def describe(self) -> List[Dict[str, Any]]:
        """
        Per worker index: its pid (C{None} while it is being replaced), its
        open connections and bindings (from its last report), and its
        restarts so far; for the supervisor's C{/health}.
        """
        out = []
        for index in range(self.count):
            gauges = self.metrics.gauges.get(index, {})
            out.append(
                {
                    "index": index,
                    "pid": self.pids.get(index),
                    "open_connections": gauges.get("open"),
                    "bindings": gauges.get("bindings"),
                    "restarts": self.restartCount.get(index, 0),
                }
            )
        return out

    def _signal(self, process: WorkerProcess, name: str) -> None:
        try:
            process.transport.signalProcess(name)  # type: ignore[union-attr]
        except Exception:
            pass

    def _killAll(self) -> None:
        for process in list(self.processes.values()):
            _log.warn("worker {index} still running at the deadline: killed", index=process.index)
            self._signal(process, "KILL")

    def _closeSockets(self) -> None:
        for group in self.groups:
            for s in group:
                s.close()
        self.groups = []
        for pair in self.inboxes:
            for s in pair:
                s.close()
        self.inboxes = []

    def signalAll(self, signum: int) -> None:
        """
        Pass C{signum} on to every worker (SIGHUP, SIGUSR1).
        """
        for pid in list(self.pids.values()):
            try:
                os.kill(pid, signum)
            except OSError as e:
                if e.errno != errno.ESRCH:
                    raise


def forward_signals(supervisor: WorkerSupervisor, signums: Sequence[int]) -> None:
    """
    Make the supervisor pass C{signums} to its workers (from the reactor
    thread), on top of whatever it does with them itself.
    """
    reactor = supervisor.reactor
    for signum in signums:
        previous = signal.getsignal(signum)

        def handler(number: int, frame: Any, previous: Any = previous) -> None:
            reactor.callFromThread(supervisor.signalAll, number)
            if callable(previous):
                previous(number, frame)

        try:
            signal.signal(signum, handler)
        except ValueError:  # not the main thread
            return


class GroupAdmission:
    """
    The supervisor's view of the whole group's admission, for its admin
    listener: connections open across every worker (the shared global
    count) and the cap they share.
    """

    limiter = None

    def __init__(self, counters: Any, max_connections: int) -> None:
        self.counters = counters
        self.maxConnections = max_connections

    @property
    def open(self) -> int:
        return int(self.counters.total(0))


class GroupBindings:
    """
    The supervisor's view of the bindings every worker holds (from their
    last reports), for its admin listener: C{len()} only.
    """

    def __init__(self, metrics: WorkerMetrics) -> None:
        self.metrics = metrics

    def __len__(self) -> int:
        return self.metrics.gauge("bindings")
