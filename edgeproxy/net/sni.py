# -*- test-case-name: tests.test_sni -*-
"""
SNI passthrough: route TLS by the server name of its ClientHello without
terminating it.

A listener written C{sni:REST} (C{sni:tcp:443}, C{sni:haproxy:tcp:443} with
a PROXY header first) gets an L{SniProxyFactory}.  Each of its sessions is
admitted as on any listener, then reads the ClientHello (within the
handshake timeout, at most L{edgeproxy.net.clienthello.DEFAULT_MAX_SIZE}
bytes, in any number of records and segments), takes the server name, and
routes to the app the routing table gives that name (the C{sni} column;
L{edgeproxy.model.RoutingSnapshot.app_for_name}); a hello without a usable
name, or with a name no app claims, goes to the listener's default app
(C{APP=sni:...}) or is closed.  From there on it is an ordinary session:
the buffered hello and everything after it are relayed untouched, with the
same geo routing, bindings, limits, failover (the hello is sent again to
the next backend after a failed connect: nothing of it was sent before) and
PROXY-out.

Refusals (not TLS, a malformed hello, no name and no default app, an
unknown name, the timeout) close the client without any backend connect,
are counted in C{sni_rejected} by reason and logged once a minute per
reason (with how many were not logged).  Routed hellos are counted in
C{sni_routed} (C{name}, C{wildcard} or C{default}).

Only these sessions parse anything: a plain listener's session is not
touched.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from edgeproxy.interfaces import IBackendRepository
from edgeproxy.model import RoutingSnapshot
from edgeproxy.net.clienthello import (
    DEFAULT_MAX_SIZE,
    ClientHelloReader,
    NoServerName,
    Refused,
    ServerName,
)
from edgeproxy.net.proxy import ProxyClientProtocol, ProxyFactory

__all__ = [
    "LOG_INTERVAL",
    "REJECTED_COUNTER",
    "ROUTED_COUNTER",
    "SniClientProtocol",
    "SniProxyFactory",
    "log_sni_conflicts",
]

_log = Logger()

#: Counter of hellos refused, by reason: a L{edgeproxy.net.clienthello}
#: reason, C{timeout}, C{incomplete} (the client left mid-hello),
#: C{unknown-name}, or C{no-sni} / C{ip-literal} on a listener without a
#: default app.
REJECTED_COUNTER = "sni_rejected"

#: Counter of hellos routed, by how: C{name}, C{wildcard} or C{default}.
ROUTED_COUNTER = "sni_routed"

#: Seconds between two log lines about refusals of one reason.
LOG_INTERVAL = 60.0


def log_sni_conflicts(old: RoutingSnapshot, new: RoutingSnapshot) -> None:
    """
    A routing table listener: log each server name that several apps claim
    in C{new} and did not (the same way) in C{old}, with the app it goes
    to.
    """
    before = set(old.sni_conflicts)
    for conflict in new.sni_conflicts:
        if conflict in before:
            continue
        _log.warn(
            "Server name {name} is claimed by apps {apps}: it routes to {app}"
            " (the first by name); fix the sni column",
            name=conflict.name,
            apps=", ".join((conflict.app, *conflict.others)),
            app=conflict.app,
        )


#: Seconds a ClientHello may take when the factory is given no positive
#: timeout (the command line's --tls-handshake-timeout default).
DEFAULT_HELLO_TIMEOUT = 10.0


class SniProxyFactory(ProxyFactory):
    """
    A L{ProxyFactory} whose sessions choose their app by the TLS server
    name.

    @ivar repository: Where the current routing table (and its name index)
        is read, once per hello.
    @ivar helloTimeout: Seconds for the whole ClientHello (the listener's
        TLS handshake timeout); 0 or less means L{DEFAULT_HELLO_TIMEOUT}
        (never no limit: a silent client would hold its admission slot).
    @ivar maxHelloSize: The most bytes a ClientHello may take.
    @ivar app: The default app: for hellos without a usable name or with a
        name no app claims; C{None}: those are closed.
    """

    def __init__(
        self,
        *args: Any,
        repository: IBackendRepository,
        helloTimeout: float = 10.0,
        maxHelloSize: int = DEFAULT_MAX_SIZE,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.repository = repository
        self.helloTimeout = helloTimeout if helloTimeout > 0 else DEFAULT_HELLO_TIMEOUT
        self.maxHelloSize = maxHelloSize
        # reason -> (when last logged, refusals not logged since)
        self._logged: Dict[str, Tuple[float, int]] = {}

    def buildProtocol(self, addr: Any) -> "SniClientProtocol":
        return SniClientProtocol(self)

    def refused(self, reason: str, client: str, name: Optional[str]) -> None:
        """
        Count a refused hello; log it unless one of the same reason was
        logged less than L{LOG_INTERVAL} seconds ago.
        """
        self.metrics.increment(REJECTED_COUNTER, reason)
        now = self.clock.seconds()
        last = self._logged.get(reason)
        if last is not None and now - last[0] < LOG_INTERVAL:
            self._logged[reason] = (last[0], last[1] + 1)
            return
        self._logged[reason] = (now, 0)
        _log.warn(
            "SNI passthrough refused {client}: {reason}{name}"
            " ({quiet} more of this reason not logged in the last minute)",
            client=client,
            reason=reason,
            name=f" (server name {name})" if name is not None else "",
            quiet=last[1] if last is not None else 0,
        )


class SniClientProtocol(ProxyClientProtocol):
    """
    A session that reads the ClientHello before it routes.
    """

    __slots__ = ("_hello", "_helloBuffer", "_helloCall")

    def __init__(self, factory: SniProxyFactory) -> None:
        super().__init__(factory)
        self._hello: Optional[ClientHelloReader] = None
        self._helloBuffer: Optional[bytearray] = None
        self._helloCall: Optional[IDelayedCall] = None

    def _route(self) -> None:
        factory: SniProxyFactory = self.factory  # type: ignore[assignment]
        self._hello = ClientHelloReader(factory.maxHelloSize)
        self._helloBuffer = bytearray()
        self._helloCall = factory.clock.callLater(factory.helloTimeout, self._helloTimedOut)

    def dataReceived(self, data: bytes) -> None:
        reader = self._hello
        if reader is None:
            ProxyClientProtocol.dataReceived(self, data)
            return
        self.bytesToBackend += len(data)
        buffer = self._helloBuffer
        assert buffer is not None  # set with the reader
        buffer += data
        outcome = reader.feed(data)
        if outcome is None:
            return
        self._hello = None
        self._helloBuffer = None
        self._stopHelloTimer()
        factory: SniProxyFactory = self.factory  # type: ignore[assignment]
        name: Optional[str] = None
        if isinstance(outcome, Refused):
            self._refuseHello(outcome.reason, None)
            return
        if isinstance(outcome, ServerName):
            name = outcome.name
            found = factory.repository.current().app_for_name(name)
            if found is not None:
                self.app = found[0]
                factory.metrics.increment(ROUTED_COUNTER, "wildcard" if found[1] else "name")
                self._relay(bytes(buffer))
                return
            reason = "unknown-name"
        else:
            assert isinstance(outcome, NoServerName)
            reason = outcome.reason
        if factory.app is None:
            self._refuseHello(reason, name)
            return
        self.app = factory.app
        factory.metrics.increment(ROUTED_COUNTER, "default")
        self._relay(bytes(buffer))

    def _relay(self, hello: bytes) -> None:
        """
        The app is chosen: hold the hello (and what came with it) for the
        backend and connect, as any session does.
        """
        self._pending = [hello]
        self.transport.pauseProducing()
        self._attempt()

    def _refuseHello(self, reason: str, name: Optional[str]) -> None:
        factory: SniProxyFactory = self.factory  # type: ignore[assignment]
        factory.refused(reason, self.clientHost, name)
        self._cause = "hello-timeout" if reason == "timeout" else "hello-refused"
        _abortClient(self)

    def _helloTimedOut(self) -> None:
        self._helloCall = None
        if self._hello is None:
            return
        self._hello = None
        self._helloBuffer = None
        self._refuseHello("timeout", None)

    def _stopHelloTimer(self) -> None:
        call = self._helloCall
        if call is not None:
            self._helloCall = None
            if call.active():
                call.cancel()

    def readConnectionLost(self) -> None:
        if self._hello is not None:
            # The client's FIN before its hello was whole: it never will be.
            buffered = bool(self._helloBuffer)
            self._hello = None
            self._helloBuffer = None
            self._stopHelloTimer()
            if buffered:
                factory: SniProxyFactory = self.factory  # type: ignore[assignment]
                factory.refused("incomplete", self.clientHost, None)
            self._clientReadDone = True
            self._finCause = "client-closed"
            _abortClient(self)
            return
        ProxyClientProtocol.readConnectionLost(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stopHelloTimer()
        if self._hello is not None:
            buffered = bool(self._helloBuffer)
            self._hello = None
            self._helloBuffer = None
            if buffered:
                factory: SniProxyFactory = self.factory  # type: ignore[assignment]
                factory.refused("incomplete", self.clientHost, None)
        ProxyClientProtocol.connectionLost(self, reason)


def _abortClient(session: SniClientProtocol) -> None:
    """
    Close a client refused before any backend: at once (nothing is owed to
    it), and let the session end through C{connectionLost}.
    """
    session._backendOpen = False
    transport = session.transport
    abort = getattr(transport, "abortConnection", None)
    if abort is not None:
        abort()
    else:
        transport.loseConnection()
