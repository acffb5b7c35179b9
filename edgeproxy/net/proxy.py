# -*- test-case-name: tests.test_proxy_unit,tests.test_proxy_sockets,tests.test_faults -*-
"""
The per-connection TCP proxy.

A L{ProxyFactory} listens for clients.  Each accepted client gets a
L{ProxyClientProtocol}, which holds the whole state of the proxied
connection (the "session"): it pauses the client, asks the L{IRouter} for a
backend, connects to it through a fresh L{BackendConnectFactory} per attempt
(failing over to the next candidate while no byte was sent), then relays
bytes both ways with each transport the streaming producer of the other,
carries half-closes, enforces the idle and half-closed timeouts,
and writes exactly one log line when both legs are gone.

The relay path (C{dataReceived}) does nothing but the write and a byte
counter add; the byte counters double as the activity mark that the idle
sweep samples a few times per idle period.  There is one idle sweep per
L{ConnectionTable} (the live sessions of one or more factories), not one
timer per connection, and the per-connection classes use C{__slots__}: an
idle proxied connection costs as little memory as possible.

Only L{ITransport}/L{ITCPTransport} methods are used on the client
transport, looked up at connect time where optional, so that the client leg
may be a TLS or PROXY-header wrapper.

When both legs are plain Twisted TCP transports (L{tcp.Server} /
L{tcp.Client}, checked once when the legs are joined), the relay writes
"eagerly": if the target transport has nothing queued it hands the bytes
straight to C{socket.send} and gives only an unsent remainder to
C{transport.write}, which saves the epoll round trip Twisted otherwise takes
for every write.  Anything queued, a partial send, C{EAGAIN} or an error all
go through C{transport.write}, so ordering, backpressure (the producer is
paused when the transport's buffer exceeds its C{bufferSize}) and error
reporting stay Twisted's.  On such a leg the other transport is registered
as its producer only before the first write that has to queue (nothing can
need pausing before that): an idle connection never registers one, which
keeps Twisted's two transports from growing an attribute dict each (about
700 bytes per idle connection).  Both plain legs also read up to
L{READ_SIZE} bytes at a time.

When both legs are lean transports (L{edgeproxy.net.lean}) and
C{settings.splice} is on, the legs may also relay with C{splice(2)}
(L{edgeproxy.net.splice}): once one read of a direction brought 64 KiB,
its bytes go through a pipe in the kernel instead of through
C{dataReceived} (the C{dataReceived} methods here make that switch, so
copying costs no extra call per read); the transports
report those bytes with C{splicedReceived(n)}, so the counters, the idle
timeout and the log line see them as any others.
"""

from __future__ import annotations

import fcntl
import socket
import struct
import sys
import termios
from typing import Any

from twisted.internet import tcp
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import (
    ConnectBindError,
    ConnectionDone,
    DNSLookupError,
    NotConnectingError,
)
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHalfCloseableProtocol,
    IReactorTCP,
    IReactorTime,
)
from twisted.internet.protocol import ClientFactory, Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from edgeproxy.config import ProxySettings
from edgeproxy.interfaces import IHostResolver, IMetricsStore, IRouter
from edgeproxy.model import Backend
from edgeproxy.net import lean, splice
from edgeproxy.net.admission import Admission, release_admission
from edgeproxy.net.proxyprotocol import header_for

__all__ = [
    "CAUSES",
    "READ_SIZE",
    "BackendConnectFactory",
    "ConnectionTable",
    "ProxyBackendProtocol",
    "ProxyClientProtocol",
    "ProxyFactory",
]

_log = Logger()

#: Every value the C{cause} field of the end-of-connection log line (and the
#: label of the C{connections_closed} counter) can take.
CAUSES = (
    "client-closed",
    "backend-closed",
    "idle-timeout",
    "half-closed-timeout",
    "connect-failed",
    "no-backend",
    "limit",
    "client-error",
    "backend-error",
    "shutdown",
    "maint",
    "drain-deadline",
    "hello-refused",
    "hello-timeout",
)

#: The idle sweep looks at the byte counters this many times per idle
#: period, and closes after this many looks in a row saw no change: the
#: connection closes between 1 and 1.25 idle periods after its last byte
#: (1.5 when the queues changed while bytes came in).
_IDLE_TICKS = 4

#: Read size (and, as Twisted uses the same attribute, the write-buffer
#: size above which the other leg is paused) of the plain TCP legs.  What
#: one direction of a connection can hold queued in the proxy is about
#: twice this (the threshold plus the read that crossed it), on top of the
#: kernel's socket buffers (Linux's default send buffer is 208 KiB).  In
#: bench/run.py, 64 KiB gave 1.1x HAProxy's one-stream bulk, 128 KiB 1.3x and
#: 256 KiB (the old value) 1.5x; 128 KiB halves the old worst case per
#: connection and keeps bulk clearly above HAProxy's.
READ_SIZE = 128 * 1024

#: The transport classes eager writes are made for, and the Twisted
#: attributes they rely on (private ones, hence checked on each transport
#: when the legs are joined; a Twisted without them gets plain writes).
_PLAIN_TCP = (tcp.Server, tcp.Client, lean.LeanServer, lean.LeanClient)

#: Transports whose sockets already carry TCP_NODELAY and SO_KEEPALIVE
#: (see L{edgeproxy.net.lean}); also the ones that can splice.
_PRETUNED = (lean.LeanServer, lean.LeanClient)

#: Bytes a client may send while its backend is still connecting before
#: it is paused (a client on the lean path is not paused up front: that
#: would cost two epoll calls per connection; what it sends meanwhile waits
#: in the session's pending buffer, bounded by this).
PENDING_LIMIT = 64 * 1024
_EAGER_ATTRS = (
    "socket",
    "dataBuffer",
    "offset",
    "_tempDataBuffer",
    "_tempDataLen",
    "connected",
    "disconnecting",
    "_writeDisconnecting",
    "_writeDisconnected",
)

#: The initial exclusion set (one shared object: an empty frozenset is not
#: a singleton, and would cost ~200 bytes per connection).
_NO_EXCLUDE: frozenset[str] = frozenset()

#: The half-closed mark before the first look (never equal to a real one).
_NO_MARK = (-1, -1)

# Transports are duck-typed: a TCP transport, or a TLS / PROXY-header
# wrapper around one.  They are Any so that optional methods can be probed.
_Transport = Any


def _abort(transport: _Transport) -> None:
    """
    Close C{transport} at once, dropping whatever it still buffers.
    """
    abort = getattr(transport, "abortConnection", None)
    if abort is not None:
        abort()
    else:
        transport.loseConnection()


def _halfClose(transport: _Transport) -> None:
    """
    Send FIN on C{transport} once its buffer is written, keep reading.

    Falls back to a full (graceful) close on transports without half-close.
    """
    lose_write = getattr(transport, "loseWriteConnection", None)
    if lose_write is not None:
        lose_write()
    else:
        transport.loseConnection()


def _tuneSocket(transport: _Transport, keepalive: bool) -> None:
    """
    TCP_NODELAY (always) and SO_KEEPALIVE (if asked) on the socket under
    C{transport}, when the transport exposes them and its socket does not
    have them already.
    """
    if type(transport) in _PRETUNED:
        return
    no_delay = getattr(transport, "setTcpNoDelay", None)
    if no_delay is not None:
        no_delay(True)
    if keepalive:
        keep_alive = getattr(transport, "setTcpKeepAlive", None)
        if keep_alive is not None:
            keep_alive(True)


def _eagerSocket(transport: _Transport) -> socket.socket | None:
    """
    The socket to write to directly, if C{transport} is a plain TCP
    transport whose buffering this module knows; else C{None}.
    """
    if type(transport) not in _PLAIN_TCP or getattr(transport, "TLS", False):
        return None
    for name in _EAGER_ATTRS:
        if not hasattr(transport, name):
            return None
    sock = transport.socket
    return sock if isinstance(sock, socket.socket) else None


def _sendNow(out: _Transport, sock: socket.socket, data: bytes) -> bytes | None:
    """
    Send C{data} straight to C{sock} when C{out} (the transport owning it)
    has nothing queued (see the module docstring).

    @return: C{None} if it was all sent, else what is left to give to
        C{out.write} (the caller registers its producer first).
    """
    if (
        not out._tempDataLen
        and out.offset == len(out.dataBuffer)
        and out.connected
        and not out.disconnecting
        and not out._writeDisconnecting
        and not out._writeDisconnected
    ):
        try:
            sent = sock.send(data)
        except OSError:
            # EAGAIN: queue it all; anything else: Twisted's write queues
            # it and its doWrite meets and reports the error.
            sent = 0
        if sent:
            if sent == len(data):
                return None
            data = data[sent:]
    return data


def _lazyProducer(out: _Transport, producer: _Transport) -> bool:
    """
    Register C{producer} on C{out} before the first write that queues on
    it, if C{out} is still open for writing; C{True} if registered.
    """
    if out.connected and not out.disconnecting and not out._writeDisconnecting:
        out.registerProducer(producer, True)
        return True
    return False


def _isPosixReactor(reactor: Any) -> bool:
    """
    Whether C{reactor} is one of Twisted's POSIX reactors (file descriptors
    in a poller), which the lean path needs.
    """
    try:
        from twisted.internet.posixbase import PosixReactorBase
    except ImportError:  # pragma: no cover (not on POSIX)
        return False
    return isinstance(reactor, PosixReactorBase)


def _address(addr: IAddress) -> tuple[str, int]:
    """
    (host, port) of an IPv4/IPv6 address; ("", 0) for anything else.
    """
    return (getattr(addr, "host", ""), getattr(addr, "port", 0))


#: ioctl giving the bytes of a socket's send queue not yet acknowledged by
#: the peer (SIOCOUTQ, Linux); None where there is none.
_SIOCOUTQ: int | None = getattr(termios, "TIOCOUTQ", None) if sys.platform == "linux" else None
_INT = struct.Struct("i")


def _queued(transport: _Transport) -> int:
    """
    Bytes on their way to C{transport}'s peer and not yet taken by it: what
    Twisted still buffers (through a TLS or PROXY-header wrapper, in the TCP
    transport under it) plus, on Linux, the socket's unacknowledged send
    queue.  A reader draining either is active even while the proxy reads
    nothing for it.  0 when it cannot tell.  Read by the timeout sweeps
    only (one ioctl per session per sweep), never per byte.
    """
    queued = 0
    try:
        buffer = getattr(transport, "dataBuffer", None)
        if buffer is not None:
            queued = len(buffer) - transport.offset + transport._tempDataLen
            # Spliced bytes still in the lean transport's pipe.
            queued += getattr(transport, "_pipeLen", 0)
        sock = getattr(transport, "socket", None)
        if _SIOCOUTQ is not None and isinstance(sock, socket.socket):
            queued += _INT.unpack(fcntl.ioctl(sock.fileno(), _SIOCOUTQ, b"\0\0\0\0"))[0]
    except Exception:
        pass
    return queued


class ConnectionTable(set["ProxyClientProtocol"]):
    """
    The live sessions admitted under one connection cap, and their idle
    sweep.

    A set of L{ProxyClientProtocol}s (so C{len}, iteration and membership
    work as on any set) that also runs the single coarse timer enforcing
    C{settings.idle_timeout} on all of them: every C{idle_timeout / 4}
    seconds it samples each relaying session's activity (bytes received
    either way, and bytes still queued towards either side, so that a slow
    reader draining the proxy's buffer counts as activity) and aborts those
    that saw no change four sweeps in a row.  The sweep starts with
    the first relaying session and stops as soon as the table is empty, so
    an idle proxy has no pending call.

    Factories sharing a table share the cap and the sweep; they must share
    C{idle_timeout} too (the sweep period is taken from the factory whose
    session started it).
    """

    __slots__ = ("_deadlines", "_emptyWaiters", "_sweepCall")

    def __init__(self) -> None:
        super().__init__()
        self._sweepCall: IDelayedCall | None = None
        self._emptyWaiters: list[Deferred[None]] = []
        self._deadlines: lean.ConnectDeadlines | None = None

    def connectDeadlines(self, clock: IReactorTime) -> lean.ConnectDeadlines:
        """
        The connect timeouts of the lean attempts of these sessions (one
        timer, stopped when the table empties).
        """
        if self._deadlines is None:
            self._deadlines = lean.ConnectDeadlines(clock)
        return self._deadlines

    def whenEmpty(self) -> Deferred[None]:
        """
        A L{Deferred} that fires once no session is left (at once if none
        is); for a graceful shutdown.
        """
        if not self:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._emptyWaiters.append(d)
        return d

    def abortAll(self, cause: str) -> int:
        """
        Drop every session at once with C{cause} (the end of a graceful
        shutdown, or of a drain deadline); return how many there were.
        """
        sessions = list(self)
        for session in sessions:
            try:
                session._abortBoth(cause)
            except Exception:
                _log.failure("closing a connection failed")
        return len(sessions)

    @property
    def sweeping(self) -> bool:
        """
        Whether the idle sweep is scheduled.
        """
        return self._sweepCall is not None

    def _watch(self, clock: IReactorTime, interval: float) -> None:
        """
        Make sure the sweep runs (every C{interval} seconds on C{clock}).
        """
        if self._sweepCall is None:
            self._sweepCall = clock.callLater(interval, self._sweep, clock, interval)

    def _forget(self, session: "ProxyClientProtocol") -> None:
        """
        Remove C{session}; stop the sweep once nothing is left.
        """
        self.discard(session)
        if not self:
            if self._deadlines is not None:
                self._deadlines.stop()
            call = self._sweepCall
            if call is not None:
                self._sweepCall = None
                call.cancel()
            waiters, self._emptyWaiters = self._emptyWaiters, []
            for d in waiters:
                d.callback(None)

    def _sweep(self, clock: IReactorTime, interval: float) -> None:
        self._sweepCall = None
        try:
            idle = [session for session in self if session._idleTick()]
            for session in idle:
                try:
                    session._abortBoth("idle-timeout")
                except Exception:
                    # One broken session must not stop idle enforcement
                    # for every other connection.
                    _log.failure("closing an idle connection failed")
        finally:
            if self and self._sweepCall is None:
                self._sweepCall = clock.callLater(interval, self._sweep, clock, interval)


class ProxyFactory(Factory):
    """
    Accepts clients and proxies each to a backend chosen by C{router}.

    @ivar router: Picks (and accounts for) backends.
    @ivar reactor: Used to connect to backends and for every timer.
    @ivar settings: Timeouts, attempts, connection cap, keepalive.
    @ivar metrics: Counters C{connections_accepted},
        C{connections_rejected} (label C{limit}), C{connections_closed}
        (label: the cause, one of L{CAUSES}) and
        C{backend_connect_failures} (label: the backend id).
    @ivar app: The app this listener is bound to, or C{None} for every app.
    @ivar connections: The live sessions (for the idle sweep and a later
        graceful drain), a L{ConnectionTable}.  Factories given the same
        table share one idle sweep.
    @ivar admission: The L{Admission} that bounds how many connections
        exist and, per client, who may go on.  Factories given the same one
        share one cap, which is how L{edgeproxy.service} makes the cap
        global across listeners (it also puts every listener's socket-level
        factory behind it, so the cap holds before TLS and PROXY work).
    @ivar admitsPeers: Whether a session that no L{AdmissionFactory}
        admitted takes its own slot when it connects: C{True} (the default)
        for a factory given straight to a port; C{False} when the factory
        sits behind L{edgeproxy.net.endpoints.server_endpoint}, whose
        socket-level admission already counted the connection.
    @ivar resolver: Where backend host names get their addresses (a
        dictionary lookup, never DNS on the connect path); a backend whose
        name has no address yet is a failed attempt (failover).  C{None}:
        host names go to C{connectTCP} as they are (Twisted resolves them,
        IPv4 only, per connection).
    """

    noisy = False

    def __init__(
        self,
        router: IRouter,
        reactor: Any,
        settings: ProxySettings,
        metrics: IMetricsStore,
        app: str | None = None,
        connections: ConnectionTable | None = None,
        admission: Admission | None = None,
        admitsPeers: bool = True,
        resolver: IHostResolver | None = None,
    ) -> None:
        if connections is not None and not isinstance(connections, ConnectionTable):
            raise TypeError(
                "connections must be a ConnectionTable (its idle sweep is shared"
                f" by the factories sharing it), not {type(connections).__name__}"
            )
        self.router = router
        self.reactor = reactor
        self.tcp: IReactorTCP = reactor
        self.clock: IReactorTime = reactor
        self.settings = settings
        self.metrics = metrics
        self.app = app
        self.connections: ConnectionTable = (
            connections if connections is not None else ConnectionTable()
        )
        self.admission: Admission = (
            admission if admission is not None else Admission(settings.max_connections, metrics)
        )
        self.admitsPeers = admitsPeers
        self.resolver = resolver
        #: Whether this factory's listener applies the per-client limits at
        #: accept (no PROXY header: the socket peer is the client), so that
        #: sessions do not count their client twice.
        self.clientsAdmittedAtAccept = False
        #: Backend ids whose sessions the C{watcher} hears about (usually
        #: empty: a draining backend's); shared by a service's factories.
        self.watched: set[str] = set()
        #: Told C{started(session)} when a session joins a watched backend
        #: and C{ended(session)} when it ends.
        self.watcher: Any = None
        #: An L{edgeproxy.net.accesslog.AccessLog} given one record per
        #: finished session, or C{None}.
        self.accessLog: Any = None
        #: Whether backends at IP literals are connected on the lean path
        #: (L{edgeproxy.net.lean.connect}): a POSIX reactor and
        #: C{settings.lean}.  Otherwise C{connectTCP}.
        self.leanConnect = bool(settings.lean) and _isPosixReactor(reactor)
        #: The connect timeouts of its lean attempts (one timer).
        self.connectDeadlines = self.connections.connectDeadlines(reactor)
        #: The pipe limit of two lean legs relaying with splice(2)
        #: (L{edgeproxy.net.splice}); 0: never spliced (C{settings.splice}
        #: off, or no splice here).
        self.splicePipes = settings.splice_pipes if settings.splice and splice.AVAILABLE else 0

    @property
    def openConnections(self) -> int:
        """
        Proxied sessions currently live (admitted and not yet lost).
        """
        return len(self.connections)

    def buildProtocol(self, addr: IAddress | None) -> "ProxyClientProtocol":
        return ProxyClientProtocol(self)


class BackendConnectFactory(ClientFactory):
    """
    One connect attempt to one backend, and the release of its load count.

    The router counts the backend from the moment it was chosen; L{release}
    gives that count back exactly once, whichever way the attempt ends
    (failed, cancelled, or connected and later closed).
    """

    noisy = False
    __slots__ = ("backend", "cancelled", "connector", "numPorts", "released", "session", "started")

    def __init__(self, session: "ProxyClientProtocol", backend: Backend) -> None:
        self.numPorts = 0
        self.session = session
        self.backend = backend
        self.connector: Any = None
        self.cancelled = False
        self.released = False
        #: When this attempt started (the clock's seconds).
        self.started = 0.0

    def release(self) -> bool:
        """
        Give the backend's load count back; C{False} if it already was.
        """
        if self.released:
            return False
        self.released = True
        self.session.factory.router.release(self.backend.id)
        return True

    def cancel(self) -> None:
        """
        The client went away while connecting: release and stop connecting.
        """
        self.cancelled = True
        self.release()
        connector = self.connector
        if connector is not None:
            try:
                connector.stopConnecting()
            except NotConnectingError:
                pass

    def buildProtocol(self, addr: IAddress | None) -> "ProxyBackendProtocol":
        return ProxyBackendProtocol(self.session, self)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.connector = None
        self.session._connectFailed(self, reason)

    def clientConnectionLost(self, connector: Any, reason: Failure) -> None:
        """
        Handled by L{ProxyBackendProtocol.connectionLost}.
        """


@implementer(IHalfCloseableProtocol)
class ProxyBackendProtocol(Protocol):
    """
    The backend leg: relays to the client, reports its events to the session.

    @ivar bytesToClient: Bytes received from the backend (and written to
        the client).
    @ivar factory: The L{BackendConnectFactory} of the attempt that made
        this leg.
    """

    __slots__ = (
        "bytesToClient",
        "connected",
        "factory",
        "out",
        "outSocket",
        "session",
        "transport",
    )

    def __init__(self, session: "ProxyClientProtocol", attempt: BackendConnectFactory) -> None:
        self.transport = None
        self.connected = 0
        self.session = session
        self.factory = attempt
        self.bytesToClient = 0
        self.out: _Transport = None
        self.outSocket: socket.socket | None = None

    def connectionMade(self) -> None:
        self.session._backendConnected(self)

    def dataReceived(self, data: bytes) -> None:
        n = len(data)
        self.bytesToClient += n
        if n >= splice.BULK_READ:
            splice.engage(self.transport, self.out, self.session.factory.splicePipes)
        sock = self.outSocket
        if sock is None:
            self.out.write(data)
            return
        rest = _sendNow(self.out, sock, data)
        if rest is not None:
            session = self.session
            if not session._clientHasProducer:
                session._clientHasProducer = _lazyProducer(self.out, self.transport)
            self.out.write(rest)

    def splicedReceived(self, n: int) -> None:
        """
        C{n} bytes from the backend went to the client through a pipe
        (L{edgeproxy.net.splice}).
        """
        self.bytesToClient += n

    def readConnectionLost(self) -> None:
        self.session._backendReadLost()

    def writeConnectionLost(self) -> None:
        """
        Our FIN to the backend went out; nothing to do.
        """

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.session._backendLost(self, reason)


@implementer(IHalfCloseableProtocol)
class ProxyClientProtocol(Protocol):
    """
    The client leg and the state of the whole proxied connection.

    @ivar bytesToBackend: Bytes received from the client (buffered or
        written to the backend).
    @ivar backend: The backend of the current (or last) attempt, or C{None}.
    @ivar attempts: Connect attempts made so far.
    @ivar clientHost: The client's address (from C{transport.getPeer()},
        which a PROXY-header wrapper overrides).
    @ivar clientPort: The client's port.
    @ivar app: The app this connection is routed in (C{None}: every app):
        the factory's, unless a subclass chooses one per connection.
    """

    __slots__ = (
        "_admitted",
        "_backendHasProducer",
        "_backendOpen",
        "_backendReadDone",
        "_backendSide",
        "_cause",
        "_clientAdmitted",
        "_clientHasProducer",
        "_clientOpen",
        "_clientReadDone",
        "_connectedAt",
        "_connecting",
        "_done",
        "_exclude",
        "_finCause",
        "_halfCall",
        "_halfMark",
        "_halfTicks",
        "_idleTicks",
        "_lastPending",
        "_lastTotal",
        "_out",
        "_outSocket",
        "_pending",
        "_started",
        "_tier",
        "_watched",
        "admission",
        "admittedClient",
        "app",
        "attempts",
        "backend",
        "bytesToBackend",
        "clientHost",
        "clientPort",
        "connected",
        "factory",
        "transport",
    )

    #: Holds its own admission slot when it is the socket-level protocol
    #: (see L{edgeproxy.net.admission}).
    admissionAware = True

    def __init__(self, factory: ProxyFactory) -> None:
        self.factory = factory  # type: ignore[assignment]
        self.transport: _Transport = None
        self.connected = 0
        self.app: str | None = factory.app
        self.bytesToBackend = 0
        self.backend: Backend | None = None
        self.attempts = 0
        self.clientHost = ""
        self.clientPort = 0
        self._out: _Transport = None
        self._outSocket: socket.socket | None = None
        self._pending: list[bytes] | None = None
        self._exclude = _NO_EXCLUDE
        self._connecting: BackendConnectFactory | None = None
        self._backendSide: ProxyBackendProtocol | None = None
        self._started = 0.0
        self._admitted = False
        self._clientAdmitted = False
        #: The admission slot this session holds itself (as the socket-level
        #: protocol), or None.
        self.admission: Admission | None = None
        #: The client admitted with the slot at accept (see
        #: L{edgeproxy.net.admission}), or None.
        self.admittedClient: str | None = None
        self._clientOpen = False
        self._backendOpen = False
        self._clientReadDone = False
        self._backendReadDone = False
        self._clientHasProducer = False
        self._backendHasProducer = False
        self._cause: str | None = None
        self._finCause: str | None = None
        self._done = False
        self._watched = False
        self._tier: int | None = None
        self._connectedAt = 0.0
        # Idle sweeps in a row that saw no byte; -1 until the legs are
        # joined (and the first sweep after that counts as activity).
        self._idleTicks = -1
        self._lastTotal = 0
        self._lastPending = 0
        self._halfCall: IDelayedCall | None = None
        self._halfTicks = 0
        self._halfMark: tuple[int, int] = (0, 0)

    # -- the client leg ---------------------------------------------------

    def connectionMade(self) -> None:
        factory = self.factory
        self._clientOpen = True
        self._started = factory.clock.seconds()
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        self.clientHost, self.clientPort = _address(peer)
        admission = factory.admission
        if self.admission is None and factory.admitsPeers:
            # Given straight to a port: this is the accept-time admission.
            if not admission.acceptPeer(peer):
                self._refuse()
                return
            self.admission = admission
        if self.admittedClient is not None or factory.clientsAdmittedAtAccept:
            pass  # the socket-level admission already applied the client's limits
        elif admission.admitClient(self.clientHost):
            self._clientAdmitted = True
        else:
            self._refuse()
            return
        self._admitted = True
        factory.connections.add(self)
        factory.metrics.increment("connections_accepted")
        self._route()

    def _route(self) -> None:
        """
        The client is admitted: hold its bytes and find it a backend.  (A
        subclass may first read something of the client, as
        L{edgeproxy.net.sni} reads the TLS ClientHello to choose the app.)
        """
        if type(self.transport) is not lean.LeanServer:
            self.transport.pauseProducing()  # type: ignore[union-attr]
        self._attempt()

    def _refuse(self) -> None:
        """
        Admission said no: close at once.  Counted by the admission (as
        C{connections_rejected}); there is no session, so no log line.
        """
        self._done = True
        self._cause = "limit"
        self._clientOpen = False
        _abort(self.transport)

    def dataReceived(self, data: bytes) -> None:
        n = len(data)
        self.bytesToBackend += n
        if n >= splice.BULK_READ:
            splice.engage(self.transport, self._out, self.factory.splicePipes)
        out = self._out
        if out is None:
            if self._pending is None:
                self._pending = [data]
            else:
                self._pending.append(data)
            if self.bytesToBackend > PENDING_LIMIT and self._clientOpen:
                # Still connecting (a lean client is read meanwhile): hold
                # no more than this; _backendConnected resumes it.
                self.transport.pauseProducing()
            return
        sock = self._outSocket
        if sock is None:
            out.write(data)
            return
        rest = _sendNow(out, sock, data)
        if rest is not None:
            if not self._backendHasProducer:
                self._backendHasProducer = _lazyProducer(out, self.transport)
            out.write(rest)

    def splicedReceived(self, n: int) -> None:
        """
        C{n} bytes from the client went to the backend through a pipe
        (L{edgeproxy.net.splice}).
        """
        self.bytesToBackend += n

    def readConnectionLost(self) -> None:
        """
        The client sent FIN: carry it to the backend, keep relaying back.
        """
        self._clientReadDone = True
        if self._finCause is None:
            self._finCause = "client-closed"
        if self._out is None:
            # Still connecting (only a wrapper can tell us this early):
            # _backendConnected carries the FIN after the buffered bytes.
            return
        self._carryClientFin()

    def writeConnectionLost(self) -> None:
        """
        Our FIN to the client went out; nothing to do.
        """

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._clientOpen = False
        release_admission(self)
        if self._clientAdmitted:
            self._clientAdmitted = False
            self.factory.admission.clientLeft(self.clientHost)
        clean = isinstance(reason.value, ConnectionDone)
        if self._cause is None and not (clean and self._finCause is not None):
            self._cause = "client-closed" if clean else "client-error"
        connecting = self._connecting
        if connecting is not None:
            self._connecting = None
            self._backendOpen = False
            connecting.cancel()
        elif self._backendOpen and self._backendSide is not None:
            backend_transport = self._backendSide.transport
            self._unregisterBackendProducer()
            if clean:
                backend_transport.loseConnection()  # type: ignore[union-attr]
            else:
                _abort(backend_transport)
            self._startHalfClosedTimer()
        self._maybeFinish()

    # -- connecting ---------------------------------------------------------

    def _attempt(self) -> None:
        """
        Choose a backend (skipping failed ones) and connect to it, or give up.
        """
        factory = self.factory
        settings = factory.settings
        remaining = settings.connect_budget - (factory.clock.seconds() - self._started)
        if self.attempts >= settings.max_attempts or remaining <= 0:
            self._giveUp("connect-failed")
            return
        backend = factory.router.choose(self.clientHost, self.app, self._exclude)
        if backend is None:
            self._giveUp("no-backend" if self.attempts == 0 else "connect-failed")
            return
        self.attempts += 1
        self.backend = backend
        self._tier = factory.router.lastTier
        attempt = BackendConnectFactory(self, backend)
        attempt.started = factory.clock.seconds()
        self._connecting = attempt
        self._backendOpen = True
        timeout = min(settings.connect_timeout, remaining)
        host = backend.host
        resolver = factory.resolver
        if resolver is not None:
            addresses = resolver.addresses(host)
            if not addresses:
                # Never resolved (a lookup is now on its way): this backend
                # cannot be reached yet; fail over without waiting on DNS.
                self._connectFailed(attempt, Failure(DNSLookupError(host)))
                return
            host = addresses[0]
        try:
            family = lean.ip_family(host) if factory.leanConnect else 0
            if family:
                attempt.connector = lean.connect(
                    factory.reactor,
                    family,
                    host,
                    backend.port,
                    attempt,
                    timeout,
                    settings.keepalive,
                    factory.connectDeadlines,
                )
            else:
                attempt.connector = factory.tcp.connectTCP(
                    host, backend.port, attempt, timeout=timeout
                )
        except Exception:
            self._connectFailed(attempt, Failure())

    def _connectFailed(self, attempt: BackendConnectFactory, reason: Failure) -> None:
        """
        A connect attempt failed or timed out before any byte was sent.
        """
        if attempt.cancelled or not attempt.release():
            return
        if self._connecting is attempt:
            self._connecting = None
        self._backendOpen = False
        factory = self.factory
        backend_id = attempt.backend.id
        if isinstance(reason.value, DNSLookupError):
            # Its host name has no address yet (a lookup is on its way): not
            # the backend's fault.  Keep the binding, do not feed the
            # breaker, try the next backend.
            factory.metrics.increment("connect_unresolved", backend_id)
            self._exclude = self._exclude | {backend_id}
            if self._clientOpen:
                self._attempt()
            else:
                self._maybeFinish()
            return
        if isinstance(reason.value, ConnectBindError):
            # No local socket (out of file descriptors, ...): not the
            # backend's fault, and every other backend would fail alike.
            # Keep the binding, blame nobody, give up on this client.
            factory.metrics.increment("connect_local_errors")
            _log.warn(
                "cannot open a socket to reach {backend} for {client}: {error}",
                backend=backend_id,
                client=self.clientHost,
                error=reason.value,
            )
            if self._clientOpen:
                self._giveUp("connect-failed")
            else:
                self._maybeFinish()
            return
        factory.router.connectFailed(self.clientHost, self.app, backend_id)
        factory.metrics.increment("backend_connect_failures", backend_id)
        _log.debug(
            "connect to backend {backend} failed for {client}: {error}",
            backend=backend_id,
            client=self.clientHost,
            error=reason.value,
        )
        self._exclude = self._exclude | {backend_id}
        if self._clientOpen:
            self._attempt()
        else:
            self._maybeFinish()

    def _giveUp(self, cause: str) -> None:
        """
        No backend will serve this client: close it.
        """
        if self._cause is None:
            self._cause = cause
        self._backendOpen = False
        if self._clientOpen:
            self.transport.loseConnection()  # type: ignore[union-attr]
        self._maybeFinish()

    # -- the backend leg ----------------------------------------------------

    def _backendConnected(self, side: ProxyBackendProtocol) -> None:
        """
        Wire the two legs together and let the client's bytes flow.
        """
        attempt = side.factory
        backend_transport: _Transport = side.transport
        # The backend accepted: that is a success whatever the client does.
        self.factory.router.connectSucceeded(attempt.backend.id)
        if attempt.cancelled or not self._clientOpen:
            _abort(backend_transport)
            return
        self._connecting = None
        attempt.connector = None
        self._backendSide = side
        self._connectedAt = now = self.factory.clock.seconds()
        self.factory.metrics.observe("backend_connect_seconds", now - attempt.started)
        client_transport: _Transport = self.transport
        backend = attempt.backend
        if backend.proxy_protocol:
            try:
                # A client without an IP address (a UNIX socket) gets
                # PROXY v1 UNKNOWN / v2 LOCAL.
                destination = _address(client_transport.getHost())
                header = header_for(
                    backend.proxy_protocol,
                    (self.clientHost, self.clientPort) if self.clientHost else None,
                    destination if destination[0] else None,
                )
            except ValueError as e:
                _log.warn(
                    "cannot send a PROXY header to {backend} for {client}: {error}",
                    backend=backend.id,
                    client=self.clientHost,
                    error=e,
                )
                self._cause = "backend-error"
                _abort(backend_transport)
                _abort(client_transport)
                return
        else:
            header = b""
        side.out = client_transport
        self._out = backend_transport
        if backend.id in self.factory.watched:
            self._watched = True
            self.factory.watcher.started(self)
        pending = self._pending
        if pending is not None:
            self._pending = None
            first = header + (pending[0] if len(pending) == 1 else b"".join(pending))
        else:
            first = header
        client_socket = _eagerSocket(client_transport)
        backend_socket = _eagerSocket(backend_transport)
        if first:
            # The PROXY header and what the client sent while connecting,
            # in one write: straight to a plain socket that has nothing
            # queued yet (no poller round trip), else through the transport.
            rest = (
                first
                if backend_socket is None
                else _sendNow(backend_transport, backend_socket, first)
            )
            if rest is not None:
                backend_transport.write(rest)
        if client_socket is not None:
            client_transport.bufferSize = READ_SIZE
            side.outSocket = client_socket
        if backend_socket is not None:
            backend_transport.bufferSize = READ_SIZE
            self._outSocket = backend_socket
        keepalive = self.factory.settings.keepalive
        _tuneSocket(client_transport, keepalive)
        _tuneSocket(backend_transport, keepalive)
        # Each transport becomes the streaming producer of the other; on an
        # eager leg only at the first write that queues (see the module
        # docstring and dataReceived).
        if backend_socket is None:
            backend_transport.registerProducer(client_transport, True)
            self._backendHasProducer = True
        if client_socket is None:
            client_transport.registerProducer(backend_transport, True)
            self._clientHasProducer = True
        client_transport.resumeProducing()
        self._startIdleTimer()
        if self._clientReadDone:
            self._carryClientFin()

    def _backendReadLost(self) -> None:
        """
        The backend sent FIN: carry it to the client, keep relaying up.
        """
        self._backendReadDone = True
        if self._finCause is None:
            self._finCause = "backend-closed"
        if self._clientReadDone:
            self._closeBoth()
            return
        if self._clientOpen:
            self._unregisterClientProducer()
            _halfClose(self.transport)
        self._startHalfClosedTimer()

    def _backendLost(self, side: ProxyBackendProtocol, reason: Failure) -> None:
        side.factory.release()
        if side is not self._backendSide:
            # Connected after the client had gone; already accounted for.
            return
        self._backendOpen = False
        clean = isinstance(reason.value, ConnectionDone)
        if self._cause is None and not (clean and self._finCause is not None):
            self._cause = "backend-closed" if clean else "backend-error"
        if self._clientOpen:
            # Whatever the backend sent is already queued on the client
            # transport: a graceful close delivers it, then closes (F2).
            self._unregisterClientProducer()
            self.transport.loseConnection()  # type: ignore[union-attr]
            self._startHalfClosedTimer()
        self._maybeFinish()

    # -- both legs ----------------------------------------------------------

    def _carryClientFin(self) -> None:
        if self._backendReadDone:
            self._closeBoth()
            return
        if self._backendOpen and self._out is not None:
            self._unregisterBackendProducer()
            _halfClose(self._out)
        self._startHalfClosedTimer()

    def _unregisterClientProducer(self) -> None:
        # A paused producer left registered would make a later
        # loseConnection() resume it instead of closing (and a read-closed
        # transport must not be resumed): unregister before closing.
        # (Also no more eager writes, hence no late lazy registration.)
        side = self._backendSide
        if side is not None:
            side.outSocket = None
        if self._clientHasProducer:
            self._clientHasProducer = False
            self.transport.unregisterProducer()

    def _unregisterBackendProducer(self) -> None:
        self._outSocket = None
        if self._backendHasProducer:
            self._backendHasProducer = False
            self._out.unregisterProducer()

    def _closeBoth(self) -> None:
        """
        Both directions are done: close both legs gracefully.
        """
        self._unregisterClientProducer()
        self._unregisterBackendProducer()
        if self._clientOpen:
            self.transport.loseConnection()  # type: ignore[union-attr]
        if self._backendOpen and self._out is not None:
            self._out.loseConnection()

    def _abortBoth(self, cause: str) -> None:
        """
        A timeout: drop both legs at once, queued data included (F4).
        """
        if self._cause is None:
            self._cause = cause
        if self._clientOpen:
            _abort(self.transport)
        if self._connecting is not None:
            connecting, self._connecting = self._connecting, None
            self._backendOpen = False
            connecting.cancel()
        elif self._backendOpen and self._out is not None:
            _abort(self._out)
        self._maybeFinish()

    # -- timers -------------------------------------------------------------

    def _startIdleTimer(self) -> None:
        """
        Put this session under its table's idle sweep (legs just joined).
        """
        factory = self.factory
        idle = factory.settings.idle_timeout
        if idle > 0 and self._admitted and self._clientOpen:
            self._idleTicks = 0
            # Never equal to a byte total: the first sweep counts as
            # activity, so the close comes 1 to 1.25 idle periods after
            # the legs were joined too.
            self._lastTotal = -1
            factory.connections._watch(factory.clock, idle / _IDLE_TICKS)

    def _activity(self) -> tuple[int, int]:
        """
        (bytes received either way, bytes still queued towards either
        side): a change in either is activity, so that a slow reader
        draining what the proxy holds for it is never idle.
        """
        side = self._backendSide
        total = self.bytesToBackend
        pending = _queued(self.transport)
        if side is not None:
            total += side.bytesToClient
            pending += _queued(side.transport)
        return total, pending

    def _idleTick(self) -> bool:
        """
        One look of the idle sweep: C{True} if this session has now been
        quiet for L{_IDLE_TICKS} looks in a row (and must be aborted).
        """
        if self._idleTicks < 0 or self._done:
            return False
        side = self._backendSide
        total = self.bytesToBackend + (side.bytesToClient if side is not None else 0)
        if total != self._lastTotal:
            # Bytes came in: active, no need to look at the queues (and no
            # system call).  The next quiet look compares the queues with
            # their last measure: a change since then is movement too.
            self._lastTotal = total
            self._idleTicks = 0
            return False
        _, pending = self._activity()
        if pending != self._lastPending:
            self._lastPending = pending
            self._idleTicks = 0
            return False
        self._idleTicks += 1
        return self._idleTicks >= _IDLE_TICKS

    def _startHalfClosedTimer(self) -> None:
        """
        One direction is done (or one leg is closing with data still to
        deliver): from now on the connection must show activity at least
        every C{half_closed_timeout} seconds (HAProxy's C{client-fin} /
        C{server-fin}), never a deadline on a transfer that still flows.
        Looked at four times per period; the close comes 1 to 1.25 periods
        after the last byte moved (the first look only takes the mark: most
        connections close long before it, and starting the timer must cost
        no system call).
        """
        timeout = self.factory.settings.half_closed_timeout
        if self._halfCall is None and not self._done and timeout > 0:
            self._halfTicks = 0
            self._halfMark = _NO_MARK
            self._halfCall = self.factory.clock.callLater(
                timeout / _IDLE_TICKS, self._halfClosedTick
            )

    def _halfClosedTick(self) -> None:
        self._halfCall = None
        if self._done:
            return
        mark = self._activity()
        if mark != self._halfMark:
            self._halfMark = mark
            self._halfTicks = 0
        else:
            self._halfTicks += 1
            if self._halfTicks >= _IDLE_TICKS:
                self._abortBoth("half-closed-timeout")
                return
        timeout = self.factory.settings.half_closed_timeout
        self._halfCall = self.factory.clock.callLater(timeout / _IDLE_TICKS, self._halfClosedTick)

    # -- the end ------------------------------------------------------------

    def _maybeFinish(self) -> None:
        """
        Once both legs are gone: stop the timers, count, log one line.
        """
        if self._done or self._clientOpen or self._backendOpen:
            return
        self._done = True
        try:
            call = self._halfCall
            if call is not None:
                self._halfCall = None
                if call.active():
                    call.cancel()
            cause = self._cause or self._finCause or "client-closed"
            factory = self.factory
            if self._watched:
                self._watched = False
                try:
                    factory.watcher.ended(self)
                except Exception:
                    _log.failure("session watcher failed")
            metrics = factory.metrics
            metrics.increment("connections_closed", cause)
            side = self._backendSide
            backend = self.backend
            up = self.bytesToBackend
            down = side.bytesToClient if side is not None else 0
            if up:
                metrics.increment("bytes_to_backend", "", up)
            if down:
                metrics.increment("bytes_to_client", "", down)
            now = factory.clock.seconds()
            access_log = factory.accessLog
            if access_log is not None:
                access_log.record(
                    self._started,
                    now,
                    self.clientHost,
                    self.clientPort,
                    backend.id if backend is not None else None,
                    self._tier,
                    cause,
                    up,
                    down,
                    self.attempts,
                    self._connectedAt - self._started if side is not None else None,
                    self.app,
                )
            else:
                # No access log: the end-of-connection line goes to the
                # process log (formatted by its observers, on this thread).
                # With one, that line is the access log's record, written
                # in batches off the reactor thread, and not repeated here.
                self._logLine(cause, now, up, down)
        finally:
            # Last, whatever happened above: a graceful shutdown waiting for
            # the table to empty goes on (and closes the access log) as soon
            # as the session leaves it.
            if self._admitted:
                self.factory.connections._forget(self)

    def _logLine(self, cause: str, now: float, up: int, down: int) -> None:
        """
        The end-of-connection line of the process log.
        """
        backend = self.backend
        _log.info(
            "{client}:{client_port} via {backend}: {cause} after {duration}s,"
            " {bytes_to_backend} bytes up, {bytes_to_client} bytes down,"
            " {attempts} attempts",
            client=self.clientHost,
            client_port=self.clientPort,
            backend=backend.id if backend is not None else None,
            bytes_to_backend=up,
            bytes_to_client=down,
            duration=round(now - self._started, 3),
            attempts=self.attempts,
            cause=cause,
        )
