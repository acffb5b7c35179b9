"""
Admission: the one place that decides whether a new connection may exist.

Every listener built by L{edgeproxy.net.endpoints.server_endpoint} hands its
socket-level factory to an L{AdmissionFactory}, so the decision is taken at
accept time, on the socket peer, before any TLS handshake or PROXY header
work (SPEC section 5, decided): a connection over the global cap is closed
at once (its socket is closed before a transport exists), counted, and a
flood of silent connections to a C{txsni:} or C{haproxy:} listener cannot
hold more file descriptors than the cap (FAULTS F21).

The proxied session then asks again for the real client
(L{Admission.admitClient}), once a PROXY header has told who it is: that is
where per-client limits plug in.

A connection admitted at accept holds its slot until its outermost protocol
loses the connection.  The protocols of this package that can be outermost
(the proxied session, the PROXY header reader, the TLS layer) give the slot
back themselves (they set C{admissionAware}); any other protocol is wrapped
in a thin L{ProtocolWrapper} that does it.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IAddress,
    IListeningPort,
    IProtocol,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from edgeproxy.interfaces import IMetricsStore
from edgeproxy.net.limits import ClientLimiter
from edgeproxy.routing.bindings import client_key

__all__ = [
    "REJECTED",
    "Admission",
    "AdmissionEndpoint",
    "AdmissionFactory",
    "release_admission",
]

_log = Logger()

#: Counter of connections refused by admission; the label is the reason
#: (C{limit}: the global cap).
REJECTED = "connections_rejected"


class Admission:
    """
    The global connection cap (and, later, per-client limits and drain).

    @ivar maxConnections: Concurrent connections allowed, counted from
        accept to close whatever stage they are in (TLS handshake, PROXY
        header, proxied); 0 means unlimited.
    @ivar open: Connections holding a slot now (in this process).
    @ivar refused: Connections refused since the cap was last logged.
    @ivar shared: With several workers, the shared counters the cap is
        checked on (L{edgeproxy.net.sharedload.SharedLoadTable}'s
        C{acquireGlobal}/C{releaseGlobal}), so that it holds for all of them
        together; C{None}: this process alone.
    """

    __slots__ = (
        "_refusing",
        "ipv6Prefix",
        "limiter",
        "maxConnections",
        "metrics",
        "open",
        "refused",
        "shared",
    )

    def __init__(
        self,
        max_connections: int,
        metrics: IMetricsStore,
        limiter: ClientLimiter | None = None,
        ipv6_prefix: int = 64,
    ) -> None:
        if max_connections < 0:
            raise ValueError(f"max_connections must be >= 0, got {max_connections!r}")
        self.maxConnections = max_connections
        self.metrics = metrics
        self.limiter = limiter if limiter is not None and limiter.enabled else None
        self.ipv6Prefix = ipv6_prefix
        self.open = 0
        self.refused = 0
        self._refusing = False
        self.shared: Any = None

    def __repr__(self) -> str:
        return f"<Admission open={self.open}/{self.maxConnections or 'unlimited'}>"

    def acceptPeer(self, addr: IAddress | None) -> bool:
        """
        A socket was accepted from C{addr}: take a slot, or refuse.

        Refusals are counted (C{connections_rejected}, label C{limit}) and
        logged once per episode: when the cap starts refusing, and when it
        admits again (with how many were refused meanwhile).

        @return: C{True} if admitted (the caller must call L{leave} exactly
            once when the connection is gone).
        """
        cap = self.maxConnections
        shared = self.shared
        if (
            (shared.acquireGlobal(cap) is False)
            if shared is not None
            else (cap and self.open >= cap)
        ):
            self.metrics.increment(REJECTED, "limit")
            self.refused += 1
            if not self._refusing:
                self._refusing = True
                _log.warn(
                    "connection cap reached ({cap} open): refusing new connections "
                    "until one closes (--max-connections)",
                    cap=cap,
                )
            return False
        self.open += 1
        if self._refusing:
            self._refusing = False
            _log.info(
                "accepting connections again: {refused} refused at the cap of {cap}",
                refused=self.refused,
                cap=cap,
            )
            self.refused = 0
        return True

    def leave(self) -> None:
        """
        A connection admitted by L{acceptPeer} is gone.  Leaving more often
        than admitted (a bookkeeping bug) never makes the count negative: it
        is counted as C{admission_underflow}.
        """
        if self.open > 0:
            self.open -= 1
            if self.shared is not None:
                self.shared.releaseGlobal()
        else:
            self.metrics.increment("admission_underflow")

    def rejoin(self) -> None:
        """
        Take back a slot given back by L{leave} for a connection that stays
        after all (a handoff to another worker that could not be sent): it
        was admitted already, so it counts whatever the cap says now.
        """
        self.open += 1
        if self.shared is not None:
            self.shared.acquireGlobal(0)

    def admitClient(self, host: str) -> bool:
        """
        The proxied session knows its real client C{host} (the socket peer
        on a plain listener, a PROXY header's source, or the peer after a
        TLS handshake): may it go on?  The per-client limits
        (L{edgeproxy.net.limits.ClientLimiter}: concurrent connections and
        new connections per second, IPv6 clients by their /64) decide;
        a refusal is counted and logged by the limiter, and the caller
        closes the connection before any backend connect.

        @return: C{True} if admitted (the caller must call L{clientLeft}
            exactly once later).
        """
        limiter = self.limiter
        if limiter is None:
            return True
        return limiter.admit(client_key(host, self.ipv6Prefix)) is None

    def clientLeft(self, host: str) -> None:
        """
        A session admitted by L{admitClient} for C{host} is over.
        """
        limiter = self.limiter
        if limiter is not None:
            limiter.release(client_key(host, self.ipv6Prefix))


def release_admission(protocol: Any) -> None:
    """
    Give back the slot C{protocol} holds, if any, and its client's
    admission when it was admitted at accept (for the C{connectionLost} of
    admission-aware protocols).
    """
    admission = protocol.admission
    if admission is not None:
        protocol.admission = None
        admission.leave()
        client = protocol.admittedClient
        if client is not None:
            protocol.admittedClient = None
            admission.clientLeft(client)


class _AdmittedWrapper(ProtocolWrapper):
    """
    Holds the slot of a protocol that cannot hold it itself.
    """

    admission: Admission | None = None
    admittedClient: str | None = None

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        release_admission(self)
        ProtocolWrapper.connectionLost(self, reason)


class AdmissionFactory(WrappingFactory):  # type: ignore[type-arg]
    """
    The socket-level factory of a listener: admits at accept time.

    Returning C{None} from C{buildProtocol} makes Twisted's port close the
    accepted socket at once, before any transport or protocol exists.
    """

    protocol = _AdmittedWrapper
    noisy = False

    def __init__(
        self, wrappedFactory: IProtocolFactory, admission: Admission, clientKnown: bool = False
    ) -> None:
        WrappingFactory.__init__(self, wrappedFactory)  # type: ignore[arg-type]
        self.admission = admission
        self.clientKnown = clientKnown

    def registerProtocol(self, p: ProtocolWrapper) -> None:
        """
        Wrappers are not tracked (WrappingFactory would keep a dict of them).
        """

    def unregisterProtocol(self, p: ProtocolWrapper) -> None:
        """
        See L{registerProtocol}.
        """

    def logPrefix(self) -> str:
        wrapped = self.wrappedFactory
        prefix = getattr(wrapped, "logPrefix", None)
        return prefix() if callable(prefix) else type(wrapped).__name__

    def buildProtocol(self, addr: IAddress) -> IProtocol | None:  # type: ignore[override]
        admission = self.admission
        if not admission.acceptPeer(addr):
            return None
        client = None
        if self.clientKnown and admission.limiter is not None:
            # No PROXY header on this listener: the socket peer is the
            # client, so its per-client limits hold before any handshake.
            client = getattr(addr, "host", None) or None
            if client is not None and not admission.admitClient(client):
                admission.leave()
                return None
        try:
            protocol = self.wrappedFactory.buildProtocol(addr)
        except BaseException:
            self._giveBack(client)
            raise
        if protocol is None:
            self._giveBack(client)
            return None
        if getattr(type(protocol), "admissionAware", False):
            protocol.admission = admission  # type: ignore[attr-defined]
            protocol.admittedClient = client  # type: ignore[attr-defined]
            return protocol
        wrapper = _AdmittedWrapper(self, protocol)  # type: ignore[arg-type]
        wrapper.admission = admission
        wrapper.admittedClient = client
        return wrapper

    def _giveBack(self, client: str | None) -> None:
        self.admission.leave()
        if client is not None:
            self.admission.clientLeft(client)


@implementer(IStreamServerEndpoint)
class AdmissionEndpoint:
    """
    A stream server endpoint whose accepted connections go through
    L{Admission} first.

    @ivar clientKnown: The socket peer is the client (no PROXY header on
        this listener): per-client limits are applied at accept too.
    """

    def __init__(
        self, inner: IStreamServerEndpoint, admission: Admission, clientKnown: bool = False
    ) -> None:
        self.inner = inner
        self.admission = admission
        self.clientKnown = clientKnown

    def __repr__(self) -> str:
        return f"<AdmissionEndpoint {self.inner!r}>"

    def listen(self, protocolFactory: IProtocolFactory) -> "Deferred[IListeningPort]":
        return self.inner.listen(
            AdmissionFactory(protocolFactory, self.admission, self.clientKnown)
        )
