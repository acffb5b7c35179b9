# -*- test-case-name: tests.test_lean,tests.test_proxy_sockets,tests.test_faults -*-
"""
The lean path for plain TCP legs: fewer objects, calls and system calls per
proxied connection, on Twisted's own reactor.

Profiles of C{bench/run.py}'s new-connections test put most of a
connection's cost in framework machinery around the system calls, not in
edgeproxy's routing: Twisted's C{connectTCP} builds a C{Connector}, a
C{Client} that resolves even an IP literal through a L{Deferred} and a
C{callLater(0)}, probes the socket twice with C{getsockopt}/C{connect_ex}
and registers it with epoll four times; every accepted C{Server} formats two
log strings; a graceful close stops reading, starts writing, waits one more
poll for C{doWrite} and only then closes, with a C{shutdown(2)} before the
C{close}.  Two classes replace those steps and keep everything else of
Twisted's L{tcp.Connection} (buffering, producers, half-close, abort,
errors), so that the session in L{edgeproxy.net.proxy} is unchanged:

  - L{LeanServer}, the transport of a client accepted on a plain C{tcp:}
    listener adapted by L{LeanEndpoint} (Twisted's C{tcp.Port} with this
    class as its C{transport}): its log strings are made only when asked
    for, and its socket options (C{TCP_NODELAY}, C{SO_KEEPALIVE}) are
    inherited from the listening socket (Linux copies them to every
    accepted socket), so the session sets none.
  - L{LeanClient}, a backend connection made by L{connect} with a
    non-blocking socket of its own, for an IP literal: C{socket()} with
    C{SOCK_NONBLOCK}, the options, C{connect()}, one epoll registration for
    writability, one C{getsockopt(SO_ERROR)} when it fires, and one
    registration change to reading; the connect timeout is the only timer.

Both close "at once" when asked to close gracefully with nothing left to
write and no producer registered: the socket is closed in the call, as
Twisted itself does for a transport whose write side is already shut
down, without the extra poll round trip, and without the C{shutdown(2)}
(the sockets are never shared with another process: close-on-exec, and
never duplicated).  Anything buffered, a producer, or an abort takes
Twisted's own path.

Two lean transports joined by a session may relay through a pipe with
C{splice(2)} instead of copying (L{edgeproxy.net.splice}): a large read
makes C{doRead} splice, their C{doWrite} drains the pipe
before their write buffer, their close paths count the pipe as buffered
data, and their C{connectionLost} closes it.

TLS legs, PROXY-header listeners, UNIX sockets and host names keep the
general path (L{edgeproxy.net.proxy}); so does every reactor that is not a
POSIX one (the memory reactors of the unit tests).
"""

from __future__ import annotations

import errno
import os
import socket
from collections import deque
from typing import Any

from twisted.internet import address, error, main, tcp
from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.python.failure import Failure
from zope.interface import implementer

from edgeproxy.net import splice

__all__ = [
    "ConnectDeadlines",
    "LeanClient",
    "LeanEndpoint",
    "LeanServer",
    "adapt_port",
    "connect",
    "ip_family",
]

_CONNECTION_DONE = Failure(main.CONNECTION_DONE)

#: Socket type flags for a backend socket created non-blocking (Linux);
#: elsewhere the socket is made non-blocking after it is created.
_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0)

#: Host strings known to be IP literals (value: the address family) or not
#: (value: 0).  Only backend hosts from the routing table (after the
#: resolver) are looked up, so it is bounded by the table; it is cleared if
#: it ever grows past L{_FAMILY_CACHE_MAX} all the same.
_families: dict[str, int] = {}
_FAMILY_CACHE_MAX = 65536


def ip_family(host: str) -> int:
    """
    C{AF_INET} or C{AF_INET6} if C{host} is an IP literal this path can
    connect to as it is; 0 if it is anything else (a name, an IPv6 address
    with a scope, garbage).
    """
    family = _families.get(host)
    if family is None:
        family = 0
        for candidate in (socket.AF_INET, socket.AF_INET6):
            try:
                socket.inet_pton(candidate, host)
            except (OSError, ValueError):
                continue
            family = candidate
            break
        if len(_families) >= _FAMILY_CACHE_MAX:
            _families.clear()
        _families[host] = family
    return family


try:
    from twisted.internet.epollreactor import EPollReactor as _EPollReactor
except ImportError:  # pragma: no cover (not Linux)
    _EPollReactor = None  # type: ignore[assignment,misc]

#: Reactor classes whose registrations L{_forget} may drop without a
#: system call (Twisted's epoll reactor and its subclasses).
_epoll_like: dict[type, bool] = {}


def _forget(transport: Any) -> None:
    """
    Drop C{transport}'s registrations from an epoll reactor's books without
    C{epoll_ctl(DEL)}: its socket is closed right after, which takes it out
    of the epoll set (the descriptor is never duplicated).  Elsewhere,
    nothing (Twisted's C{stopReading}/C{stopWriting} do it).
    """
    reactor = transport.reactor
    kind = type(reactor)
    known = _epoll_like.get(kind)
    if known is None:
        known = _EPollReactor is not None and isinstance(reactor, _EPollReactor)
        _epoll_like[kind] = known
    if known:
        fd = transport.socket.fileno()
        if reactor._selectables.get(fd) is transport:
            del reactor._selectables[fd]
            reactor._reads.discard(fd)
            reactor._writes.discard(fd)


class _CloseAtOnce:
    """
    The graceful close of both lean transports (see the module docstring),
    and their splice state (L{edgeproxy.net.splice}).
    """

    # Never shared with another process (close-on-exec, never dup'ed):
    # close() alone sends the FIN.
    _shouldShutdown = False

    # Splicing (class defaults; a direction gets its own once it engages):
    #: The transport this one's bytes are spliced to (None: plain reads;
    #: reads splice only while C{splice.engage} made C{doRead} splice.read).
    _spliceOut: Any = None
    #: Lean transports can splice to each other (L{splice.engage}).
    _splices = True
    #: Pipes open in the process at most for this one to get one (-1: the
    #: kernel refused to splice this connection: never again).
    _pipeLimit = 0
    #: This transport's pipe (bytes on their way to its socket): read end,
    #: write end (-1: none), bytes in it, and the reader waiting for it to
    #: drain.
    _pipeR = -1
    _pipeW = -1
    _pipeLen = 0
    _pipeWaiter: Any = None
    #: Bytes this transport read by splicing.
    splicedBytes = 0

    def loseWriteConnection(self) -> None:
        this: Any = self
        if (
            this.connected
            and not this.disconnecting
            and not this._writeDisconnecting
            and this.producer is None
            and not this._tempDataLen
            and this.offset == len(this.dataBuffer)
            and not this._pipeLen
        ):
            # Nothing to write first: the FIN goes now, not after a round
            # trip through the poller (what Twisted's doWrite would do).
            this._writeDisconnecting = True
            this._writeDisconnected = True
            this.stopWriting()
            this._closeWriteConnection()
            return
        FileDescriptor.loseWriteConnection(this)

    def connectionLost(self, reason: Failure) -> None:
        this: Any = self
        if hasattr(this, "socket"):
            _forget(this)
        if this._pipeW >= 0:
            splice.close_pipe(this)
        if this._spliceOut is not None:
            this._spliceOut = None
            splice._copy(this)
        if this._pipeWaiter is not None:
            this._pipeWaiter = None
        super().connectionLost(reason)  # type: ignore[misc]

    def _writeBuffered(self) -> Any:
        """
        C{doWrite} once connected: the pipe first, then Twisted's buffer.
        """
        this: Any = self
        if this._pipeLen:
            drained = splice.drain(this)
            if drained is not True:
                return drained
            if (
                not this._tempDataLen
                and this.offset == len(this.dataBuffer)
                and not this.disconnecting
                and not this._writeDisconnecting
                and not this.producerPaused
            ):
                this.stopWriting()
                return None
        return FileDescriptor.doWrite(this)

    def loseConnection(self) -> None:
        this: Any = self
        if (
            this.connected
            and not this.disconnecting
            and this.producer is None
            and not this._tempDataLen
            and this.offset == len(this.dataBuffer)
            and not this._writeDisconnecting
            and not this._pipeLen
        ):
            this.stopReading()
            this.stopWriting()
            this.disconnecting = 1
            this.connectionLost(_CONNECTION_DONE)
            return
        FileDescriptor.loseConnection(this)


class LeanServer(_CloseAtOnce, tcp.Server):
    """
    An accepted client connection on a port adapted by L{adapt_port}.
    """

    #: Its socket inherited C{TCP_NODELAY} and C{SO_KEEPALIVE} from the
    #: listening socket (L{adapt_port} set them there).
    pretuned = True

    def __init__(
        self,
        sock: socket.socket,
        protocol: Any,
        client: tuple[Any, ...],
        server: Any,
        sessionno: int,
        reactor: Any,
    ) -> None:
        FileDescriptor.__init__(self, reactor=reactor)
        sock.setblocking(False)
        self.socket = sock
        self.fileno = sock.fileno
        self.protocol = protocol
        if len(client) != 2:
            self._addressType = address.IPv6Address
        self.server = server
        self.client = client
        self.sessionno = sessionno
        self.hostname = client[0]
        self.startReading()
        self.connected = 1

    def doWrite(self) -> Any:
        return self._writeBuffered()

    def logPrefix(self) -> str:
        return f"{self._getLogPrefix(self.protocol)},{self.sessionno},{self.hostname}"

    def __repr__(self) -> str:
        port = getattr(self.server, "_realPortNumber", None)
        return f"<{type(getattr(self, 'protocol', None)).__name__} #{self.sessionno} on {port}>"


class LeanClient(_CloseAtOnce, tcp.Connection):
    """
    A backend connection to an IP literal, made by L{connect}.

    While connecting it is its own connector: C{stopConnecting()} abandons
    the attempt (the factory is told, as by Twisted's connector, with a
    L{error.UserError}), and every way the attempt can fail ends in one
    C{factory.clientConnectionFailed(self, reason)}.  Once connected it is
    an ordinary Twisted TCP connection whose protocol the factory built.
    """

    pretuned = True
    logstr = "edgeproxy-backend"

    def __init__(
        self,
        sock: socket.socket,
        factory: Any,
        reactor: Any,
        family: int,
        host: str,
        port: int,
    ) -> None:
        FileDescriptor.__init__(self, reactor=reactor)
        self.socket = sock
        self.fileno = sock.fileno
        self.protocol: Any = None
        self.factory = factory
        self._family = family
        self._host = host
        self._port = port
        self._timeoutCall: Any = None

    # -- connecting --------------------------------------------------------

    def doWrite(self) -> Any:
        if self.connected:
            return self._writeBuffered()
        err = self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._failed(error.getConnectError((err, os.strerror(err))))
            return None
        self._stopTimeout()
        self.connected = 1
        reactor = self.reactor
        fd = self.fileno()
        # From "writable" to "readable" in one epoll_ctl where the reactor
        # is an epoll one (else Twisted's two calls).
        poller = getattr(reactor, "_poller", None)
        writes = getattr(reactor, "_writes", None)
        reads = getattr(reactor, "_reads", None)
        if (
            poller is not None
            and type(writes) is set
            and type(reads) is set
            and fd in writes
            and fd not in reads
            and hasattr(reactor, "_POLL_IN")
        ):
            poller.modify(fd, reactor._POLL_IN)
            writes.discard(fd)
            reads.add(fd)
        else:
            self.stopWriting()
            self.startReading()
        protocol = self.factory.buildProtocol(None)
        if protocol is None:
            self.protocol = tcp.Protocol()
            self.loseConnection()
            return None
        self.protocol = protocol
        protocol.makeConnection(self)
        return None

    def doRead(self) -> Any:
        if self.connected:
            return tcp.Connection.doRead(self)
        return None

    def stopConnecting(self) -> None:
        """
        Abandon the attempt (the client went away).
        """
        if self.connected or self.disconnected:
            raise error.NotConnectingError()
        self._failed(error.UserError())

    def _timedOut(self) -> None:
        self._timeoutCall = None
        if not self.connected and not self.disconnected:
            self._failed(error.TimeoutError())

    def _stopTimeout(self) -> None:
        call = self._timeoutCall
        if call is not None:
            self._timeoutCall = None
            if type(call) is list:
                call[1] = None  # an entry of ConnectDeadlines
            else:
                call.cancel()

    def _failed(self, reason: Exception) -> None:
        """
        The attempt is over without a connection: let go of the socket, tell
        the factory once.
        """
        if self.disconnected:
            return
        self.disconnected = 1
        self._stopTimeout()
        self.stopReading()
        self.stopWriting()
        sock = self.socket
        del self.socket, self.fileno
        sock.close()
        factory, self.factory = self.factory, None
        factory.clientConnectionFailed(self, Failure(reason))

    def connectionLost(self, reason: Failure) -> None:
        if not self.connected:
            # The reactor saw the socket fail while connecting (a refused
            # or unreachable connect arrives as an error event).
            sock = getattr(self, "socket", None)
            err = 0
            if sock is not None:
                try:
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                except OSError:
                    err = 0
            failure: Exception = (
                error.getConnectError((err, os.strerror(err)))
                if err
                else error.ConnectError(string=str(reason.value))
            )
            self._failed(failure)
            return
        super().connectionLost(reason)

    # -- addresses ---------------------------------------------------------

    def getPeer(self) -> address.IPv4Address | address.IPv6Address:
        if self._family == socket.AF_INET6:
            return address.IPv6Address("TCP", self._host, self._port)
        return address.IPv4Address("TCP", self._host, self._port)

    def getHost(self) -> address.IPv4Address | address.IPv6Address:
        host = self.socket.getsockname()
        if self._family == socket.AF_INET6:
            return address.IPv6Address("TCP", host[0], host[1])
        return address.IPv4Address("TCP", host[0], host[1])

    def __repr__(self) -> str:
        return f"<LeanClient to {self._host}:{self._port}>"


class ConnectDeadlines:
    """
    The connect timeouts of lean attempts, on one timer.

    A proxy gives every attempt the same connect timeout (failover aside),
    so deadlines arrive in order: they wait in a queue, with one
    C{callLater} armed for the oldest one still connecting.  A connect that
    completes only clears its entry (no timer to cancel); cleared entries
    at the head are dropped as new ones arrive, so the queue holds no more
    than the entries since the oldest attempt still connecting.  A deadline
    earlier than the newest queued one (a failover attempt with less of its
    budget left) gets a timer of its own.  Timeouts fire exactly when due,
    as with one timer per attempt.
    """

    __slots__ = ("_call", "_clock", "_queue")

    def __init__(self, clock: Any) -> None:
        self._clock = clock
        self._queue: deque[list[Any]] = deque()
        self._call: Any = None

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def connecting(self) -> int:
        """
        Attempts in the queue still connecting.
        """
        return sum(1 for entry in self._queue if entry[1] is not None)

    def add(self, transport: "LeanClient", timeout: float) -> Any:
        """
        Time C{transport} out after C{timeout} seconds unless it connected
        or failed first; returns its entry (for L{LeanClient} to clear) or
        a delayed call.
        """
        clock = self._clock
        deadline = clock.seconds() + timeout
        queue = self._queue
        while queue and queue[0][1] is None:
            queue.popleft()
        if queue and deadline < queue[-1][0]:
            return clock.callLater(timeout, transport._timedOut)
        entry = [deadline, transport]
        queue.append(entry)
        call = self._call
        if call is None:
            self._call = clock.callLater(timeout, self._fire)
        elif call.getTime() > deadline:
            # The timer was armed for entries that have connected since
            # (and were just dropped): this one is due sooner.
            call.reset(timeout)
        return entry

    def stop(self) -> None:
        """
        Nothing is connecting any more (the sessions are all gone): drop
        the queue and its timer, so that an idle proxy has no pending call.
        """
        self._queue.clear()
        call = self._call
        if call is not None:
            self._call = None
            if call.active():
                call.cancel()

    def _fire(self) -> None:
        self._call = None
        clock = self._clock
        now = clock.seconds()
        queue = self._queue
        while queue:
            deadline, transport = queue[0]
            if transport is None:
                queue.popleft()
                continue
            if deadline > now:
                if self._call is None:  # (a timeout below may have armed it)
                    self._call = clock.callLater(deadline - now, self._fire)
                return
            queue.popleft()
            transport._timeoutCall = None
            transport._timedOut()


def connect(
    reactor: Any,
    family: int,
    host: str,
    port: int,
    factory: Any,
    timeout: float,
    keepalive: bool,
    deadlines: ConnectDeadlines | None = None,
) -> LeanClient:
    """
    Start connecting to C{(host, port)}, an IP literal of C{family}, for
    C{factory} (a L{twisted.internet.protocol.ClientFactory}): it gets
    C{buildProtocol} once connected or C{clientConnectionFailed} once, as
    from C{connectTCP}.

    @raise error.ConnectBindError: No socket could be made (out of file
        descriptors): nothing was started.
    @param deadlines: Where the connect timeout waits (one timer for
        many attempts); C{None}: a C{callLater} of its own.
    @return: The transport, also the attempt's connector
        (C{stopConnecting}).
    """
    try:
        sock = socket.socket(family, socket.SOCK_STREAM | _NONBLOCK)
    except OSError as e:
        raise error.ConnectBindError(e.errno, e.strerror) from None
    try:
        if not _NONBLOCK:
            sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if keepalive:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    except OSError:
        pass
    transport = LeanClient(sock, factory, reactor, family, host, port)
    try:
        result = sock.connect_ex((host, port))
    except OSError as e:  # e.g. an address this family cannot take
        result = e.errno or errno.EINVAL
    if result and result not in (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY):
        # Refused at once (rare: the kernel reports most failures later):
        # reported as Twisted's connector does, from the reactor, not from
        # inside the caller.
        reactor.callLater(
            0, transport._failed, error.getConnectError((result, os.strerror(result)))
        )
        return transport
    transport.startWriting()
    if timeout > 0:
        transport._timeoutCall = (
            deadlines.add(transport, timeout)
            if deadlines is not None
            else reactor.callLater(timeout, transport._timedOut)
        )
    return transport


def adapt_port(port: Any, keepalive: bool) -> bool:
    """
    Make a listening C{tcp.Port} accept L{LeanServer}s: set C{TCP_NODELAY}
    (and C{SO_KEEPALIVE} if asked) on its socket, for the accepted sockets
    to inherit.  C{False} (and nothing changed) for any other port, or where
    the options cannot be set.
    """
    if type(port) is not tcp.Port or not hasattr(port, "socket"):
        return False
    if port.transport is not tcp.Server:
        return False
    sock = port.socket
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1 if keepalive else 0)
    except OSError:
        return False
    port.transport = LeanServer
    return True


@implementer(IStreamServerEndpoint)
class LeanEndpoint:
    """
    An endpoint whose C{tcp.Port}s accept L{LeanServer}s (L{adapt_port});
    any other listening port is left as it is.
    """

    def __init__(self, inner: IStreamServerEndpoint, keepalive: bool) -> None:
        self.inner = inner
        self.keepalive = keepalive

    def __repr__(self) -> str:
        return f"<LeanEndpoint {self.inner!r}>"

    def listen(self, protocolFactory: IProtocolFactory) -> "Deferred[IListeningPort]":
        def adapted(port: Any) -> Any:
            adapt_port(port, self.keepalive)
            return port

        return self.inner.listen(protocolFactory).addCallback(adapted)
