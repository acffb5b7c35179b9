"""
Listening endpoints from description strings, with a strict PROXY protocol
wrapper.

L{server_endpoint} understands two prefixes on top of Twisted's own
descriptions (C{tcp:8080}, C{tcp6:8080:interface=\\:\\:1}, C{unix:...}):

  - C{haproxy:REST}: connections must start with a PROXY v1 or v2 header
    (see L{ProxyHeaderServerEndpoint}).
  - C{txsni:CERTDIR:REST}: TLS with certificates chosen by SNI from CERTDIR
    (L{edgeproxy.net.tls.sni_server_endpoint}).

A third, C{sni:REST}, listens like C{REST}; what makes it SNI passthrough
is the factory (L{edgeproxy.net.sni.SniProxyFactory}, chosen by
L{edgeproxy.service} from the description), so it must come first:
C{sni:tcp:443}, C{sni:haproxy:tcp:443}.

They nest: C{txsni:certs:haproxy:tcp:443} reads the PROXY header off the
socket and then does the TLS handshake (what a load balancer in front
sends); C{haproxy:txsni:certs:tcp:443} expects the header inside TLS.

Unlike Twisted's own C{haproxy:} wrapper, this one accepts a header split
across any number of segments, bounds the wait with a timeout, accepts
headers only from trusted senders, never raises out of C{dataReceived} on
malformed input, and creates the application's protocol only once the
header is complete.
"""

from __future__ import annotations

import enum
import ipaddress
from typing import Any, Iterable, Sequence, Tuple, Union

import attrs
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IDelayedCall,
    IHalfCloseableProtocol,
    IListeningPort,
    IProtocol,
    IProtocolFactory,
    IPushProducer,
    IReactorTime,
    IStreamServerEndpoint,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

from edgeproxy.interfaces import IMetricsStore
from edgeproxy.model import Network
from edgeproxy.net.admission import Admission, AdmissionEndpoint, release_admission
from edgeproxy.net.proxyprotocol import (
    DEFAULT_V2_MAX_LENGTH,
    ProxyHeader,
    ProxyHeaderError,
    parse,
)

__all__ = [
    "LOOPBACK_NETWORKS",
    "REJECTED_COUNTER",
    "UNIX_PEERS",
    "Network",
    "ProxyHeaderProtocol",
    "ProxyHeaderServerEndpoint",
    "ProxyHeaderWrappingFactory",
    "TrustedSender",
    "UnixPeers",
    "parse_cidrs",
    "server_endpoint",
]

_log = Logger()


#: The senders trusted by default: the loopback networks.
LOOPBACK_NETWORKS: Tuple[Network, ...] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)

#: Counter of connections refused before or while reading the PROXY header;
#: the label is the reason (a L{ProxyHeaderError} reason, C{"untrusted"},
#: C{"timeout"} or C{"incomplete"}).
REJECTED_COUNTER = "proxy_header_rejected"


class UnixPeers(enum.Enum):
    """
    The type of L{UNIX_PEERS}, its only value.
    """

    UNIX_PEERS = "unix"

    def __str__(self) -> str:
        return self.value


#: In a trusted list: every peer of a UNIX-socket listener may send PROXY
#: headers.  Not in the default list: whoever can connect to the socket file
#: (mode 0666 unless the C{unix:} description says otherwise) could claim
#: any client address.  Written C{unix} for L{parse_cidrs}.
UNIX_PEERS = UnixPeers.UNIX_PEERS

#: One entry of a trusted list: a network, or L{UNIX_PEERS}.
TrustedSender = Union[Network, UnixPeers]


def parse_cidrs(values: Iterable[str]) -> Tuple[TrustedSender, ...]:
    """
    Parse trusted senders: networks in CIDR notation (C{10.0.0.0/8},
    C{fd00::/8}), where a bare address is a single-host network and host
    bits are ignored (C{10.1.2.3/8} is C{10.0.0.0/8}); or C{unix}, for
    L{UNIX_PEERS}.

    @raise ValueError: A value is neither; the message names it.
    """
    senders: list[TrustedSender] = []
    for value in values:
        try:
            text = value.strip()
            if text.lower() == "unix":
                senders.append(UNIX_PEERS)
            else:
                senders.append(ipaddress.ip_network(text, strict=False))
        except (ValueError, TypeError, AttributeError) as e:
            raise ValueError(f"invalid network {value!r}: {e}") from None
    return tuple(senders)


class _TrustedSenders:
    """
    Membership test of a sender address in a trusted list: an IPv4 or IPv6
    peer by network, a UNIX-socket peer only if the list has L{UNIX_PEERS}.
    """

    def __init__(self, trusted: Iterable[TrustedSender]) -> None:
        entries = tuple(trusted)
        self.unix = UNIX_PEERS in entries
        networks = [n for n in entries if not isinstance(n, UnixPeers)]
        self.v4 = tuple(n for n in networks if n.version == 4)
        self.v6 = tuple(n for n in networks if n.version == 6)

    def __contains__(self, address: object) -> bool:
        if isinstance(address, (IPv4Address, IPv6Address)):
            try:
                ip = ipaddress.ip_address(address.host)
            except ValueError:
                return False
            if ip.version == 6:
                mapped = ip.ipv4_mapped  # type: ignore[union-attr]
                if mapped is None:
                    return any(ip in network for network in self.v6)
                ip = mapped
            return any(ip in network for network in self.v4)
        return self.unix and isinstance(address, UNIXAddress)


def _describe(address: IAddress | None) -> Tuple[str, str]:
    """
    (host, port) text of an address for log fields.
    """
    if isinstance(address, (IPv4Address, IPv6Address)):
        return address.host, str(address.port)
    if isinstance(address, UNIXAddress):
        name = address.name
        return (name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)), ""
    return repr(address), ""


@implementer(IProtocol, IHalfCloseableProtocol, ITransport, IPushProducer, IConsumer)
class ProxyHeaderProtocol(Protocol):
    """
    Reads a PROXY header, then hands the connection to the application's
    protocol, presenting itself as that protocol's transport.

    Until the header is complete nothing of the application exists: its
    protocol is built (with the header's source as address) and connected
    only afterwards, so a refused connection never reaches a backend.  Then
    C{getPeer}/C{getHost} answer the header's source and destination (the
    real ones for LOCAL and UNKNOWN), bytes that followed the header are
    delivered first, and the data path costs nothing more: the transport
    calls the application's C{dataReceived} directly and the application's
    C{write} goes straight to the transport.

    Flow control passes through (C{pauseProducing}, C{resumeProducing},
    C{registerProducer}...), and so does half-close: C{loseWriteConnection}
    down, C{readConnectionLost}/C{writeConnectionLost} up to an application
    protocol that provides L{IHalfCloseableProtocol}.  One that does not is
    closed on the client's FIN, as Twisted would.
    """

    # The real transport: ITCPTransport, or a TLS or UNIX one.
    transport: Any = None
    wrappedProtocol: IProtocol | None = None
    header: ProxyHeader | None = None
    #: Holds the admission slot when it is the socket-level protocol (see
    #: L{edgeproxy.net.admission}).
    admissionAware = True
    admission: Admission | None = None
    admittedClient: str | None = None

    def __init__(self, factory: "ProxyHeaderWrappingFactory") -> None:
        self.factory = factory
        self._buffer = b""
        self._timeoutCall: IDelayedCall | None = None
        self._done = False  # refused, or handed over
        self._peer: IAddress | None = None
        self._host: IAddress | None = None
        self._pending = b""
        self._paused = False
        self._halfCloseable: IHalfCloseableProtocol | None = None
        self._closing = False

    def logPrefix(self) -> str:
        return "ProxyHeader"

    # -- before the header -------------------------------------------------

    def connectionMade(self) -> None:
        factory = self.factory
        if self.transport.getPeer() not in factory.trusted:
            self._refuse("untrusted")
            return
        if factory.headerTimeout is not None:
            self._timeoutCall = factory.reactor.callLater(
                factory.headerTimeout, self._refuse, "timeout"
            )

    def dataReceived(self, data: bytes) -> None:
        # Only called while the header is incomplete (or after a refusal):
        # once it is complete the transport calls the application directly.
        if self._done:
            return
        buffer = self._buffer + data if self._buffer else data
        try:
            result = parse(buffer, max_v2_length=self.factory.maxV2Length)
        except ProxyHeaderError as e:
            self._refuse(e.reason)
            return
        if result is None:
            self._buffer = buffer
            return
        self._buffer = b""
        header, length = result
        steering = self.factory.steering
        if (
            steering is not None
            and header.source is not None
            and steering.divert(self, header.source[0], buffer)
        ):
            # Another worker owns this client: the connection is its now.
            self._done = True
            self._stopTimeout()
            return
        self._headerReceived(header, buffer[length:])

    def _stopTimeout(self) -> None:
        """
        Cancel the header timeout, if it is still pending.
        """
        call = self._timeoutCall
        if call is not None:
            self._timeoutCall = None
            if call.active():
                call.cancel()

    def _refuse(self, reason: str) -> None:
        self._done = True
        self._buffer = b""
        self._stopTimeout()
        self.factory.metrics.increment(REJECTED_COUNTER, reason)
        host, port = _describe(self.transport.getPeer())
        _log.warn(
            "Refused connection from {peerHost} port {peerPort}: PROXY header {reason}",
            peerHost=host,
            peerPort=port,
            reason=reason,
        )
        self.transport.loseConnection()

    def _headerReceived(self, header: ProxyHeader, rest: bytes) -> None:
        self._done = True
        self._stopTimeout()
        transport = self.transport
        self.header = header
        source = header.source
        destination = header.destination
        if source is not None and destination is not None:
            if header.family == "TCP4":
                self._peer = IPv4Address("TCP", *source)
                self._host = IPv4Address("TCP", *destination)
            else:
                self._peer = IPv6Address("TCP", *source)
                self._host = IPv6Address("TCP", *destination)
        else:
            self._peer = transport.getPeer()
            self._host = transport.getHost()
        protocol = self.factory.wrappedFactory.buildProtocol(self._peer)
        if protocol is None:
            # The application refused the connection; say nothing more.
            transport.loseConnection()
            return
        self.wrappedProtocol = protocol
        self._halfCloseable = IHalfCloseableProtocol(protocol, None)
        self._pending = rest
        # Look like the real transport (ITCPTransport...) to the application,
        # as ProtocolWrapper does, and take ourselves off the data path.
        directlyProvides(self, providedBy(transport))
        self.dataReceived = protocol.dataReceived  # type: ignore[method-assign]
        self.write = transport.write  # type: ignore[method-assign]
        self.writeSequence = transport.writeSequence  # type: ignore[method-assign]
        protocol.makeConnection(self)
        pending = self._pending
        if pending and not (self._paused or self._closing) and self.connected:
            self._pending = b""
            protocol.dataReceived(pending)

    # -- protocol side -----------------------------------------------------

    def readConnectionLost(self) -> None:
        if self._halfCloseable is not None:
            self._halfCloseable.readConnectionLost()
        else:
            # The client's FIN before a complete header, or an application
            # protocol that cannot half-close: close, like Twisted.
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        if self._halfCloseable is not None:
            self._halfCloseable.writeConnectionLost()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected = 0
        self._stopTimeout()
        release_admission(self)
        protocol = self.wrappedProtocol
        if protocol is not None:
            # Break the cycles through the bound methods.
            self.wrappedProtocol = None
            self._halfCloseable = None
            self._pending = b""
            del self.dataReceived, self.write, self.writeSequence
            protocol.connectionLost(reason)
        elif not self._done:
            self._done = True
            if self._buffer:
                # Gone in the middle of a header.
                self._buffer = b""
                self.factory.metrics.increment(REJECTED_COUNTER, "incomplete")
                host, port = _describe(self.transport.getPeer())
                _log.info(
                    "Connection from {peerHost} port {peerPort} closed before its PROXY "
                    "header was complete",
                    peerHost=host,
                    peerPort=port,
                )

    # -- transport side (as seen by the application's protocol) ------------

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.transport.writeSequence(data)

    def loseConnection(self) -> None:
        self._closing = True
        self.transport.loseConnection()

    def abortConnection(self) -> None:
        self._closing = True
        self.transport.abortConnection()

    def loseWriteConnection(self) -> None:
        self.transport.loseWriteConnection()

    def getPeer(self) -> IAddress:
        peer = self._peer
        return peer if peer is not None else self.transport.getPeer()

    def getHost(self) -> IAddress:
        host = self._host
        return host if host is not None else self.transport.getHost()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.transport.unregisterProducer()

    def pauseProducing(self) -> None:
        self._paused = True
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        pending = self._pending
        if pending and not self._closing:
            # Bytes that came with the header, held while the application
            # had the connection paused: they go first.
            self._pending = b""
            self.wrappedProtocol.dataReceived(pending)  # type: ignore[union-attr]
            if self._paused or self._closing or not self.connected:
                return
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        self.transport.stopProducing()

    def __getattr__(self, name: str) -> Any:
        # Anything else of the real transport (setTcpNoDelay, getHandle,
        # disconnecting...).
        return getattr(self.transport, name)


class ProxyHeaderWrappingFactory(Factory):  # type: ignore[type-arg]
    """
    Wraps an application factory so that its connections start with a
    PROXY header; see L{ProxyHeaderProtocol}.

    @ivar wrappedFactory: The application's factory.
    @ivar trusted: Senders allowed to send a header (anything that supports
        C{address in trusted}); others are closed at once.
    @ivar headerTimeout: Seconds to wait for the whole header, or C{None}.
    @ivar maxV2Length: Ceiling of the v2 length field.
    @ivar steering: With several workers, what passes a connection whose
        client another worker owns to that worker
        (L{edgeproxy.net.workers.ListenerSteering}), or C{None}.
    """

    protocol = ProxyHeaderProtocol  # type: ignore[assignment]
    noisy = False
    steering: Any = None

    def __init__(
        self,
        wrappedFactory: IProtocolFactory,
        reactor: IReactorTime,
        trusted: Sequence[TrustedSender],
        headerTimeout: float | None,
        metrics: IMetricsStore,
        maxV2Length: int = DEFAULT_V2_MAX_LENGTH,
    ) -> None:
        self.wrappedFactory = wrappedFactory
        self.reactor = reactor
        self.trusted = _TrustedSenders(trusted)
        self.headerTimeout = headerTimeout
        self.metrics = metrics
        self.maxV2Length = maxV2Length

    def logPrefix(self) -> str:
        wrapped = self.wrappedFactory
        prefix = wrapped.logPrefix() if hasattr(wrapped, "logPrefix") else type(wrapped).__name__
        return f"{prefix} (PROXY header)"

    def doStart(self) -> None:
        self.wrappedFactory.doStart()
        super().doStart()

    def doStop(self) -> None:
        self.wrappedFactory.doStop()
        super().doStop()

    def buildProtocol(self, addr: IAddress | None) -> ProxyHeaderProtocol:
        return ProxyHeaderProtocol(self)


@implementer(IStreamServerEndpoint)
@attrs.define
class ProxyHeaderServerEndpoint:
    """
    An endpoint whose connections must start with a PROXY v1 or v2 header
    from a trusted sender.

    @ivar inner: The endpoint that really listens.
    @ivar reactor: Clock for the header timeout.
    @ivar trusted: Networks (and L{UNIX_PEERS}) allowed to send headers.
    @ivar header_timeout: Seconds for the whole header; C{None}: no limit.
    @ivar metrics: Where refusals are counted (L{REJECTED_COUNTER}).
    @ivar max_v2_length: Ceiling of the v2 length field.
    """

    inner: IStreamServerEndpoint
    reactor: IReactorTime
    trusted: Sequence[TrustedSender]
    header_timeout: float | None
    metrics: IMetricsStore
    max_v2_length: int = DEFAULT_V2_MAX_LENGTH
    steering: Any = None

    def listen(self, protocolFactory: IProtocolFactory) -> "Deferred[IListeningPort]":
        factory = ProxyHeaderWrappingFactory(
            protocolFactory,
            self.reactor,
            self.trusted,
            self.header_timeout,
            self.metrics,
            self.max_v2_length,
        )
        factory.steering = self.steering
        return self.inner.listen(factory)


def socket_layer(description: str) -> Tuple[str, bool]:
    """
    The innermost part of a listener description (what
    L{twisted.internet.endpoints.serverFromString} is given: C{tcp:443},
    C{tcp6:8080:interface=\\:\\:}) and whether a C{haproxy:} layer reads
    PROXY headers on it.

    @raise ValueError: A malformed description.
    """
    behind = False
    rest = description
    while True:
        if rest.startswith("sni:"):
            rest = rest[4:]
        elif rest.startswith("haproxy:"):
            rest = rest[8:]
            behind = True
        elif rest.startswith("txsni:"):
            _, rest = _split_argument(rest[6:])
        else:
            return rest, behind


def _split_argument(text: str) -> Tuple[str, str]:
    """
    Split C{text} at its first unescaped colon; unescape the first part.
    """
    chars = []
    index = 0
    while index < len(text):
        char = text[index]
        if char == "\\" and index + 1 < len(text):
            chars.append(text[index + 1])
            index += 2
            continue
        if char == ":":
            return "".join(chars), text[index + 1 :]
        chars.append(char)
        index += 1
    raise ValueError("expected txsni:CERTDIR:ENDPOINT")


def server_endpoint(
    reactor: Any,
    description: str,
    *,
    metrics: IMetricsStore,
    trusted: Sequence[TrustedSender] = LOOPBACK_NETWORKS,
    header_timeout: float | None = 5.0,
    tls_handshake_timeout: float = 10.0,
    admission: Admission | None = None,
    socket_endpoint: IStreamServerEndpoint | None = None,
    steering: Any = None,
    _behindHeader: bool = False,
    _nested: bool = False,
) -> IStreamServerEndpoint:
    """
    The listening endpoint for C{description}.

      - C{sni:REST}: C{server_endpoint(REST)} (SNI passthrough is the
        factory's work, see L{edgeproxy.net.sni}); only first, and never
        over C{txsni:} (which terminates the TLS it would pass through).

      - C{haproxy:REST}: a L{ProxyHeaderServerEndpoint} around
        C{server_endpoint(REST)}.
      - C{txsni:CERTDIR:REST}: L{edgeproxy.net.tls.sni_server_endpoint} around
        C{server_endpoint(REST)} (a colon in CERTDIR is escaped as C{\\:}).
      - anything else: L{twisted.internet.endpoints.serverFromString}.

    @param trusted: Networks (and L{UNIX_PEERS}) allowed to send PROXY
        headers (see L{parse_cidrs}); loopback by default.
    @param header_timeout: Seconds for a whole PROXY header.
    @param tls_handshake_timeout: Seconds for a whole TLS handshake.
    @param admission: If given, every connection accepted by the
        socket-level endpoint (the innermost description) is admitted by
        it at accept time, before any TLS or PROXY header work (see
        L{edgeproxy.net.admission}); on a listener without a C{haproxy:}
        layer the socket peer is the client, and its per-client limits are
        applied then too.
    @param socket_endpoint: The endpoint that listens instead of the one
        the innermost description names (a worker's adopted socket, see
        L{edgeproxy.net.workers.AdoptedPortEndpoint}); the description is
        still parsed and checked.
    @param steering: For a C{haproxy:} layer directly on the socket, what
        passes a connection to the worker that owns its client
        (L{edgeproxy.net.workers.ListenerSteering}).
    @raise ValueError: A malformed description.
    """

    def inner(rest: str, behindHeader: bool = _behindHeader) -> IStreamServerEndpoint:
        return server_endpoint(
            reactor,
            rest,
            metrics=metrics,
            trusted=trusted,
            header_timeout=header_timeout,
            tls_handshake_timeout=tls_handshake_timeout,
            admission=admission,
            socket_endpoint=socket_endpoint,
            steering=steering,
            _behindHeader=behindHeader,
            _nested=True,
        )

    if description.startswith("sni:"):
        if _nested:
            raise ValueError("sni: must come first (sni:tcp:443, sni:haproxy:tcp:443)")
        rest = description[4:]
        if "txsni:" in rest:
            raise ValueError("sni: passes TLS through; it cannot be a txsni: listener")
        return inner(rest)
    if description.startswith("haproxy:"):
        rest = description[8:]
        # Handing a connection to another worker passes its socket: only
        # where the header is the first thing on it (not inside TLS).
        on_socket = not rest.startswith(("txsni:", "haproxy:"))
        return ProxyHeaderServerEndpoint(
            inner(rest, True),
            reactor,
            tuple(trusted),
            header_timeout,
            metrics,
            steering=steering if on_socket else None,
        )
    if description.startswith("txsni:"):
        from edgeproxy.net.tls import sni_server_endpoint

        certdir, rest = _split_argument(description[6:])
        return sni_server_endpoint(
            reactor,
            certdir,
            inner(rest),
            handshake_timeout=tls_handshake_timeout,
            metrics=metrics,
        )
    endpoint = serverFromString(reactor, description)
    if socket_endpoint is not None:
        endpoint = socket_endpoint
    if admission is not None:
        return AdmissionEndpoint(endpoint, admission, clientKnown=not _behindHeader)
    return endpoint
