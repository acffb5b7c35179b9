"""
A toolkit for fault tests on loopback: fake backends that can be told to
misbehave, clients that can be told to be slow, a proxy harness wired with
the real router, and checks for what a fault must not leave behind.

Everything listens on 127.0.0.1 only and runs on the test's reactor
(pytest-twisted), except the two raw-socket fakes (L{RefusingPort},
L{BlackHole}) that only hold sockets.  Everything started here has a
C{stop()}/C{close()} that the test calls in its C{finally}.

Backends (server protocols, see L{listen}):
    L{Echo}, L{Identify} (sends its id then echoes), L{Stall} (never reads
    or writes), L{ResetAfter} (sends N bytes then RST), L{ReplyAfterEOF}
    (half-close: reads to EOF, replies, closes), L{SendThenShutdown}
    (half-close: sends, shuts down its write side, keeps reading),
    L{StreamSource} (sends M bytes as fast as allowed), L{Sink} (counts
    what it reads; can start paused).
Raw sockets: L{RefusingPort} (a bound port nobody listens on), L{BlackHole}
    (a listener whose accept queue is full: SYNs are dropped).
Clients (see L{connect}): L{Client} (collects bytes; can start paused,
    i.e. a non-reading client), L{Uploader} (sends M bytes as fast as
    allowed).
Checks: L{open_fds}, L{tcp_sockets}, L{half_closed_sockets},
    L{LogCapture}, L{ProxyHarness.assert_fresh_connection_works}.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import sys
import threading
import zlib
from typing import Any, Callable, Iterable

import attrs
from twisted.internet import defer, task
from twisted.internet.interfaces import IHalfCloseableProtocol, IPullProducer
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from edgeproxy.config import ProxySettings
from edgeproxy.model import Backend
from edgeproxy.net.lean import adapt_port
from edgeproxy.net.proxy import ProxyFactory
from edgeproxy.routing.router import Router
from edgeproxy.testing import BindingTable, InMemoryBackendRepository, MetricsStore

LOCALHOST = "127.0.0.1"
CHUNK = 65536
#: A 64 KiB pattern; streams are made of it so the receiver can check them.
PATTERN = bytes(range(256)) * (CHUNK // 256)


def pattern_crc(total: int) -> int:
    """
    CRC32 of the first C{total} bytes of the repeated L{PATTERN}.
    """
    crc = 0
    full, rest = divmod(total, CHUNK)
    for _ in range(full):
        crc = zlib.crc32(PATTERN, crc)
    return zlib.crc32(PATTERN[:rest], crc)


def sleep(reactor: Any, seconds: float) -> defer.Deferred[None]:
    """
    A Deferred that fires after C{seconds}.
    """
    return task.deferLater(reactor, seconds, lambda: None)


@defer.inlineCallbacks
def wait_until(
    reactor: Any, predicate: Callable[[], object], timeout: float = 5.0, step: float = 0.01
) -> Any:
    """
    Poll C{predicate} until true; fail with C{AssertionError} after
    C{timeout} seconds.  Returns the time it took.
    """
    start = reactor.seconds()
    while not predicate():
        if reactor.seconds() - start > timeout:
            raise AssertionError(f"condition not met within {timeout}s: {predicate!r}")
        yield sleep(reactor, step)
    return reactor.seconds() - start


# -- server side: fake backends ---------------------------------------------


class Recorder(Protocol):
    """
    Base of the fake backends: records what came in and how it ended.

    @ivar received: Bytes received so far (or only counted when
        C{keep=False}).
    @ivar closed: Fires with C{self} on C{connectionLost}; the reason is
        in C{lost}.
    """

    keep = True

    def __init__(self) -> None:
        self.received = bytearray()
        self.count = 0
        self.crc = 0
        self.eof = False
        self.lost: Failure | None = None
        #: Fires with C{self} once the connection is lost (see C{lost}).
        self.closed: defer.Deferred[Any] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.count += len(data)
        if self.keep:
            self.received += data
        else:
            self.crc = zlib.crc32(data, self.crc)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = reason
        self.closed.callback(self)


class Echo(Recorder):
    """
    Writes back whatever it reads.
    """

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        self.transport.write(data)  # type: ignore[union-attr]


class Identify(Echo):
    """
    Sends C{self.ident + b"\\n"} on connect, then echoes.
    """

    ident = b"?"

    def connectionMade(self) -> None:
        self.transport.write(self.ident + b"\n")  # type: ignore[union-attr]


class Stall(Recorder):
    """
    Accepts, then never reads nor writes.
    """

    def connectionMade(self) -> None:
        self.transport.pauseProducing()  # type: ignore[union-attr]


class ResetAfter(Recorder):
    """
    Sends C{size} bytes of L{PATTERN}, waits until the kernel says they were
    acknowledged, then closes with SO_LINGER 0 (an RST, no FIN).
    """

    size = 100_000

    def connectionMade(self) -> None:
        data = (PATTERN * (self.size // CHUNK + 1))[: self.size]
        self.transport.write(data)  # type: ignore[union-attr]
        self._poll = task.LoopingCall(self._check)
        self._poll.clock = self.factory.reactor  # type: ignore[union-attr]
        self._poll.start(0.005, now=False)

    def _check(self) -> None:
        t: Any = self.transport
        if t.dataBuffer[t.offset :] or t._tempDataLen:
            return
        sock = t.getHandle()
        unacked = struct.unpack("i", _ioctl(sock, 0x5411))[0]  # TIOCOUTQ / SIOCOUTQ
        if unacked:
            return
        self._poll.stop()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        t.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._poll.running:
            self._poll.stop()
        super().connectionLost(reason)


def _ioctl(sock: socket.socket, request: int) -> bytes:
    import fcntl

    return fcntl.ioctl(sock.fileno(), request, b"\0\0\0\0")


@implementer(IHalfCloseableProtocol)
class ReplyAfterEOF(Recorder):
    """
    Half-close, client first: reads until EOF, then sends
    C{b"got %d" % count}, then closes.
    """

    def readConnectionLost(self) -> None:
        self.eof = True
        self.transport.write(b"got %d" % self.count)  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        pass


@implementer(IHalfCloseableProtocol)
class SendThenShutdown(Recorder):
    """
    Half-close, backend first: sends C{payload}, shuts down its write side
    (FIN) and keeps reading; closes when the peer's EOF arrives.
    """

    payload = b"hello from the backend"

    def connectionMade(self) -> None:
        self.transport.write(self.payload)  # type: ignore[union-attr]
        self.transport.loseWriteConnection()  # type: ignore[union-attr]

    def readConnectionLost(self) -> None:
        self.eof = True
        self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        pass


@implementer(IPullProducer)
class _PullSource:
    """
    Writes C{total} bytes of L{PATTERN} to C{transport} as fast as it takes
    them (a pull producer), then calls C{done}.
    """

    def __init__(self, transport: Any, total: int, done: Callable[[], None]) -> None:
        self.transport = transport
        self.remaining = total
        self.done = done
        self.sent = 0

    def resumeProducing(self) -> None:
        if self.remaining <= 0:
            return
        n = min(CHUNK, self.remaining)
        self.remaining -= n
        self.sent += n
        self.transport.write(PATTERN if n == CHUNK else PATTERN[:n])
        if self.remaining <= 0:
            self.transport.unregisterProducer()
            self.done()

    def stopProducing(self) -> None:
        self.remaining = 0


class StreamSource(Recorder):
    """
    Sends C{total} bytes of L{PATTERN} as fast as the connection takes them,
    then closes (FIN).  Counts what it reads without keeping it.
    """

    total = 1_000_000
    keep = False

    def connectionMade(self) -> None:
        self.source = _PullSource(self.transport, self.total, self._finished)
        self.transport.registerProducer(self.source, False)  # type: ignore[union-attr]

    def _finished(self) -> None:
        self.transport.loseConnection()  # type: ignore[union-attr]


@implementer(IHalfCloseableProtocol)
class Sink(Recorder):
    """
    Counts (CRC, no copy) what it reads; with C{start_paused} it does not
    read at all until L{resume}.  Closes when the peer's EOF arrives.
    """

    keep = False
    start_paused = False

    def connectionMade(self) -> None:
        if self.start_paused:
            self.transport.pauseProducing()  # type: ignore[union-attr]

    def resume(self) -> None:
        self.transport.resumeProducing()  # type: ignore[union-attr]

    def readConnectionLost(self) -> None:
        self.eof = True
        self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        pass


class BackendFactory(Factory):
    """
    Builds C{protocol_class} instances with the given attributes and keeps
    them in C{protocols} (newest last).
    """

    noisy = False

    def __init__(self, reactor: Any, protocol_class: type, **attributes: Any) -> None:
        self.reactor = reactor
        self.protocol_class = protocol_class
        self.attributes = attributes
        self.protocols: list[Any] = []

    def buildProtocol(self, addr: Any) -> Protocol:
        p = self.protocol_class()
        for name, value in self.attributes.items():
            setattr(p, name, value)
        p.factory = self
        self.protocols.append(p)
        return p


@attrs.define
class FakeBackend:
    """
    A listening fake backend.  C{port} is its TCP port on 127.0.0.1.
    """

    listening: Any
    factory: BackendFactory

    @property
    def port(self) -> int:
        return int(self.listening.getHost().port)

    @property
    def protocols(self) -> list[Any]:
        return self.factory.protocols

    def stop(self) -> defer.Deferred[None]:
        """
        Stop listening and drop every connection it accepted.
        """
        for p in self.factory.protocols:
            if p.transport is not None and p.lost is None:
                p.transport.abortConnection()
        return defer.maybeDeferred(self.listening.stopListening)


def listen(reactor: Any, protocol_class: type, **attributes: Any) -> FakeBackend:
    """
    Start a fake backend of C{protocol_class} on 127.0.0.1 (a free port).
    """
    factory = BackendFactory(reactor, protocol_class, **attributes)
    return FakeBackend(reactor.listenTCP(0, factory, interface=LOCALHOST), factory)


class RefusingPort:
    """
    A port on 127.0.0.1 that refuses connections: bound (so nobody else
    takes it) but not listening, so a SYN gets an RST.
    """

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((LOCALHOST, 0))
        self.port: int = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()


class BlackHole:
    """
    A port on 127.0.0.1 that never answers a SYN.

    A listener with backlog 0 that never accepts: one connection fills its
    accept queue, after which Linux drops further SYNs (with
    tcp_abort_on_overflow=0, the default), so a connect hangs until its
    timeout.  L{is_black} checks that this really is the case here.
    """

    def __init__(self) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind((LOCALHOST, 0))
        self.listener.listen(0)
        self.port: int = self.listener.getsockname()[1]
        self.fillers: list[socket.socket] = []
        filler = self._connect()
        select.select([], [filler], [], 1.0)  # the handshake of the first one completes
        self.fillers.append(filler)
        self.fillers.append(self._connect())  # this one stays in SYN_SENT

    def _connect(self) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect((LOCALHOST, self.port))
        except BlockingIOError:
            pass
        return s

    def is_black(self, wait: float = 0.2) -> bool:
        """
        Whether a fresh connect gets no answer within C{wait} seconds.
        (Blocks for C{wait}: call it from test set-up only.)
        """
        probe = self._connect()
        try:
            _, writable, _ = select.select([], [probe], [], wait)
            return not writable
        finally:
            probe.close()

    def close(self) -> None:
        for s in self.fillers:
            s.close()
        self.listener.close()


# -- client side ------------------------------------------------------------


@implementer(IHalfCloseableProtocol)
class Client(Protocol):
    """
    A test client: keeps (or only counts) what it reads, records EOF and
    loss.  With C{start_paused} it does not read until L{resume}.  By
    default it closes when the peer's FIN comes (as most clients do); with
    C{close_on_eof=False} it keeps its write side open.

    @ivar connected_at: reactor time of C{connectionMade}.
    @ivar lost_at: reactor time of C{connectionLost}.
    """

    def __init__(
        self,
        reactor: Any,
        keep: bool = True,
        start_paused: bool = False,
        close_on_eof: bool = True,
    ) -> None:
        self.reactor = reactor
        self.keep = keep
        self.start_paused = start_paused
        self.close_on_eof = close_on_eof
        self.received = bytearray()
        self.count = 0
        self.crc = 0
        self.eof = False
        self.write_shut = False
        self.eof_at: float | None = None
        self.lost: Failure | None = None
        self.lost_at: float | None = None
        #: Fires with C{self} once the connection is lost (see C{lost}).
        self.closed: defer.Deferred[Any] = defer.Deferred()
        self._waiters: list[tuple[int, defer.Deferred[bytes]]] = []

    def connectionMade(self) -> None:
        self.connected_at = self.reactor.seconds()
        if self.start_paused:
            self.transport.pauseProducing()  # type: ignore[union-attr]

    def resume(self) -> None:
        self.transport.resumeProducing()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.count += len(data)
        if self.keep:
            self.received += data
        else:
            self.crc = zlib.crc32(data, self.crc)
        still = []
        for n, d in self._waiters:
            if self.count >= n:
                d.callback(bytes(self.received))
            else:
                still.append((n, d))
        self._waiters = still

    def wait_for(self, n: int, timeout: float = 5.0) -> defer.Deferred[bytes]:
        """
        Fires with everything received once at least C{n} bytes came in.
        """
        d: defer.Deferred[bytes] = defer.Deferred()
        if self.count >= n:
            d.callback(bytes(self.received))
            return d
        self._waiters.append((n, d))
        d.addTimeout(timeout, self.reactor)
        return d

    def send(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]

    def shutdown_write(self) -> None:
        """
        Send FIN (after what is buffered), keep reading; if the peer's FIN
        already came, close instead (nothing is left to read).
        """
        self.write_shut = True
        if self.eof:
            self.transport.loseConnection()  # type: ignore[union-attr]
        else:
            self.transport.loseWriteConnection()  # type: ignore[union-attr]

    def readConnectionLost(self) -> None:
        """
        The peer's FIN: close once our own FIN went too (as real clients
        do; Twisted does not close a socket shut down both ways by itself).
        """
        self.eof = True
        self.eof_at = self.reactor.seconds()
        if self.write_shut or self.close_on_eof:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def wait_closed(self, timeout: float = 5.0) -> defer.Deferred[Any]:
        """
        Fires once the connection is lost; fails after C{timeout} seconds.
        """
        return wait_until(self.reactor, lambda: self.lost is not None, timeout=timeout)

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = reason
        self.lost_at = self.reactor.seconds()
        for _, d in self._waiters:
            if not d.called:
                d.errback(reason)
        self._waiters = []
        self.closed.callback(self)

    def close(self) -> None:
        """
        Drop the connection if still open (test clean-up).
        """
        if self.lost is None and self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]


class Uploader(Client):
    """
    A client that sends C{total} bytes of L{PATTERN} as fast as allowed,
    then half-closes.
    """

    def __init__(self, reactor: Any, total: int) -> None:
        super().__init__(reactor, keep=False)
        self.total = total

    def connectionMade(self) -> None:
        super().connectionMade()
        self.source = _PullSource(self.transport, self.total, self.shutdown_write)
        self.transport.registerProducer(self.source, False)  # type: ignore[union-attr]


def connect(reactor: Any, port: int, client: Client, timeout: float = 5.0) -> defer.Deferred[Any]:
    """
    Connect C{client} to 127.0.0.1:C{port}; fires with C{client} once
    connected.
    """
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    endpoint = TCP4ClientEndpoint(reactor, LOCALHOST, port, timeout=timeout)
    return connectProtocol(endpoint, client)


# -- what a fault must not leave behind --------------------------------------


def open_fds() -> int:
    """
    Number of file descriptors this process has open.
    """
    return len(os.listdir("/proc/self/fd"))


def open_sockets() -> int:
    """
    Number of sockets this process has open (fds that are sockets: the
    ones a connection can leak; pipes the reactor opens lazily are not
    counted).
    """
    return sum(1 for target in fd_targets().values() if target.startswith("socket:"))


def fd_targets() -> dict[str, str]:
    """
    fd -> what it points to (for a readable assertion message).
    """
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return out


def rss_bytes() -> int:
    """
    Resident set size of this process, in bytes.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


TCP_STATES = {
    "01": "ESTABLISHED",
    "02": "SYN_SENT",
    "03": "SYN_RECV",
    "04": "FIN_WAIT1",
    "05": "FIN_WAIT2",
    "06": "TIME_WAIT",
    "07": "CLOSE",
    "08": "CLOSE_WAIT",
    "09": "LAST_ACK",
    "0A": "LISTEN",
    "0B": "CLOSING",
}


def tcp_sockets(ports: Iterable[int]) -> list[tuple[int, int, str]]:
    """
    (local port, remote port, state) of every IPv4/IPv6 TCP socket of the
    machine whose local or remote port is in C{ports}.
    """
    wanted = set(ports)
    found = []
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local = int(fields[1].rsplit(":", 1)[1], 16)
            remote = int(fields[2].rsplit(":", 1)[1], 16)
            if local in wanted or remote in wanted:
                found.append((local, remote, TCP_STATES.get(fields[3], fields[3])))
    return found


def half_closed_sockets(ports: Iterable[int]) -> list[tuple[int, int, str]]:
    """
    The sockets of L{tcp_sockets} stuck in CLOSE_WAIT or FIN_WAIT2.
    """
    return [s for s in tcp_sockets(ports) if s[2] in ("CLOSE_WAIT", "FIN_WAIT2")]


def proxy_delayed_calls(reactor: Any) -> list[Any]:
    """
    Pending delayed calls of the proxy (its idle and half-closed timers).
    """
    return [c for c in reactor.getDelayedCalls() if "edgeproxy" in repr(getattr(c, "func", None))]


def transport_buffered(transport: Any) -> int:
    """
    Bytes a Twisted TCP transport holds in user space, not yet written
    (with, for a lean transport, what waits in its splice pipe).
    """
    return (
        len(transport.dataBuffer)
        - transport.offset
        + transport._tempDataLen
        + getattr(transport, "_pipeLen", 0)
    )


@implementer(ILogObserver)
class EventCollector:
    """
    Keeps the log events of one namespace.
    """

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("log_namespace") == self.namespace:
            self.events.append(event)


@implementer(ILogObserver)
class LogCapture:
    """
    Collects every twisted.logger event while started.
    """

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def start(self) -> "LogCapture":
        globalLogPublisher.addObserver(self)
        return self

    def stop(self) -> None:
        globalLogPublisher.removeObserver(self)

    def failures(self) -> list[dict[str, Any]]:
        """
        Events that carry a traceback (C{log_failure}) or are errors.
        """
        return [
            e
            for e in self.events
            if "log_failure" in e or e.get("isError") or str(e.get("log_level")) == "LogLevel.error"
        ]

    def connection_lines(self) -> list[dict[str, Any]]:
        """
        The proxy's end-of-connection lines.
        """
        return [
            e
            for e in self.events
            if e.get("log_namespace") == "edgeproxy.net.proxy" and "cause" in e
        ]

    def causes(self) -> list[str]:
        return [e["cause"] for e in self.connection_lines()]


# -- the proxy under test ----------------------------------------------------


class ProxyHarness:
    """
    A real L{ProxyFactory} on 127.0.0.1 with the real L{Router},
    L{InMemoryBackendRepository}, L{BindingTable} and L{MetricsStore};
    no geo, local region C{sa}.  Log events are captured from creation.
    """

    def __init__(
        self,
        reactor: Any,
        backends: Iterable[Backend],
        settings: ProxySettings,
        app: str | None = "app",
        local_region: str = "sa",
    ) -> None:
        self.reactor = reactor
        self.logs = LogCapture().start()
        self.repository = InMemoryBackendRepository(backends)
        self.bindings = BindingTable(ttl=600.0)
        self.metrics = MetricsStore()
        self.router = Router(
            self.repository, self.bindings, None, self.metrics, local_region, reactor
        )
        self.factory = ProxyFactory(self.router, reactor, settings, self.metrics, app=app)
        self.listening = reactor.listenTCP(0, self.factory, interface=LOCALHOST)
        if settings.lean:
            # As the service does for a plain tcp: listener: the fault suite
            # runs on the lean path (both legs) unless told otherwise.
            adapt_port(self.listening, settings.keepalive)
        self.clients: list[Client] = []

    @property
    def port(self) -> int:
        return int(self.listening.getHost().port)

    def connect(self, client: Client | None = None) -> defer.Deferred[Any]:
        """
        Connect a L{Client} (a new keeping one by default) to the proxy.
        """
        if client is None:
            client = Client(self.reactor)
        self.clients.append(client)
        return connect(self.reactor, self.port, client)

    def sessions(self) -> list[Any]:
        return list(self.factory.connections)

    def idle(self) -> bool:
        """
        No client connection open and no backend counted any more.
        """
        return self.factory.openConnections == 0 and not self.router.load.connections

    @defer.inlineCallbacks
    def assert_fresh_connection_works(self, payload: bytes = b"ping", timeout: float = 5.0) -> Any:
        """
        A new client gets C{payload} echoed back (some backend in the table
        must echo) and closes cleanly; returns the seconds it took.
        """
        start = self.reactor.seconds()
        client = yield self.connect()
        client.send(payload)
        yield wait_until(
            self.reactor, lambda: bytes(client.received).endswith(payload), timeout=timeout
        )
        client.transport.loseConnection()
        yield client.closed
        return self.reactor.seconds() - start

    @defer.inlineCallbacks
    def stop(self, extra: Iterable[Any] = ()) -> Any:
        """
        Close every client, wait until the proxy is idle, stop listening
        and stop C{extra} (fake backends, raw sockets).
        """
        try:
            for c in self.clients:
                c.close()
            yield wait_until(self.reactor, self.idle, timeout=5.0)
        finally:
            self.logs.stop()
            yield self.listening.stopListening()
            for thing in extra:
                r = thing.stop() if hasattr(thing, "stop") else thing.close()
                if isinstance(r, defer.Deferred):
                    yield r


# -- edgeproxy as a child process ----------------------------------------------

#: The checkout's root (the directory holding C{edgeproxy/}).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    """
    A loopback TCP port free now (for a child process to listen on).
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Greeter:
    """
    A backend on a thread, for tests that drive child processes: says its
    name (and a newline) to every connection, then closes.
    """

    def __init__(self, name: str) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = int(self.sock.getsockname()[1])
        self.name = name.encode()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.sendall(self.name + b"\n")
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


def edgeproxy_argv(*options: str) -> list[str]:
    """
    The command line of C{twistd -n edgeproxy OPTIONS} with this interpreter,
    logging to stdout and writing no pid file (and no admin listener unless
    OPTIONS give C{--admin}).
    """
    if not any(o == "--admin" or o.startswith("--admin=") for o in options):
        # Tests run many proxies at once: no admin listener on the fixed
        # default port unless the test asks for one.
        options = ("--admin", "none", *options)
    return [
        sys.executable,
        "-c",
        "from twisted.scripts.twistd import run; run()",
        "-n",
        "--pidfile=",
        "--logfile=-",
        "edgeproxy",
        *options,
    ]


def edgeproxy_env() -> dict[str, str]:
    """
    The environment for a child edgeproxy: ours without any C{EDGEPROXY_*}
    variable, with this checkout first on C{PYTHONPATH}.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPROXY_")}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, *filter(None, [env.get("PYTHONPATH")])])
    return env
