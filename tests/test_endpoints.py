"""
Tests for L{edgeproxy.net.endpoints}: the strict PROXY header wrapper (unit
tests on fakes, then real loopback sockets) and the description parser.
"""

from __future__ import annotations

import ipaddress
import shutil
import tempfile
from typing import Any, Callable, Iterator, List, Optional, cast

import pytest
import pytest_twisted
from twisted.internet import reactor as global_reactor
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
    UNIXClientEndpoint,
    connectProtocol,
)
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IConsumer,
    IHalfCloseableProtocol,
    IProtocol,
    IPushProducer,
    IStreamServerEndpoint,
    ITCPTransport,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactor, MemoryReactorClock, StringTransport
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer
from zope.interface.verify import verifyObject

from edgeproxy.metrics import MetricsStore
from edgeproxy.net import endpoints
from edgeproxy.net.endpoints import (
    LOOPBACK_NETWORKS,
    REJECTED_COUNTER,
    ProxyHeaderProtocol,
    ProxyHeaderServerEndpoint,
    ProxyHeaderWrappingFactory,
    parse_cidrs,
    server_endpoint,
)
from edgeproxy.net.proxyprotocol import V2_SIGNATURE, header_for

V1 = b"PROXY TCP4 203.0.113.7 198.51.100.9 4242 443\r\n"
V2 = header_for(2, ("203.0.113.7", 4242), ("198.51.100.9", 443))
V2_LOCAL = V2_SIGNATURE + b"\x20\x00\x00\x00"
REAL_PEER = IPv4Address("TCP", "127.0.0.1", 50000)
REAL_HOST = IPv4Address("TCP", "127.0.0.1", 8080)


# -- helpers ------------------------------------------------------------------


@implementer(IHalfCloseableProtocol)
class Recorder(Protocol):
    """
    An application protocol that records what the wrapper shows it.
    """

    def __init__(self, pauseOnConnect: bool = False) -> None:
        self.pauseOnConnect = pauseOnConnect
        self.made = False
        self.peer: Any = None
        self.host: Any = None
        self.data: List[bytes] = []
        self.events: List[str] = []
        self.lostReason: Optional[Failure] = None

    def connectionMade(self) -> None:
        self.made = True
        self.peer = self.transport.getPeer()  # type: ignore[union-attr]
        self.host = self.transport.getHost()  # type: ignore[union-attr]
        if self.pauseOnConnect:
            self.transport.pauseProducing()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.data.append(data)

    def readConnectionLost(self) -> None:
        self.events.append("read-lost")

    def writeConnectionLost(self) -> None:
        self.events.append("write-lost")

    def connectionLost(self, reason: Failure = ConnectionDone) -> None:  # type: ignore[assignment]
        self.events.append("lost")
        self.lostReason = reason


class PlainRecorder(Protocol):
    """
    An application protocol that cannot half-close.
    """

    def __init__(self) -> None:
        self.data: List[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.data.append(data)


class RecordingFactory(Factory):
    """
    Builds one protocol per connection and remembers the addresses asked
    for and the protocols built.
    """

    def __init__(self, make: Callable[[], Optional[Protocol]] = Recorder) -> None:
        self.make = make
        self.addresses: List[Any] = []
        self.built: List[Any] = []
        self.starts = 0
        self.stops = 0

    def startFactory(self) -> None:
        self.starts += 1

    def stopFactory(self) -> None:
        self.stops += 1

    def buildProtocol(self, addr: Any) -> Optional[Protocol]:  # type: ignore[override]
        self.addresses.append(addr)
        protocol = self.make()
        if protocol is not None:
            protocol.factory = self
            self.built.append(protocol)
        return protocol


class HalfCloseTransport(StringTransport):
    """
    A StringTransport that records loseWriteConnection.
    """

    writeClosed = False

    def loseWriteConnection(self) -> None:
        self.writeClosed = True


@pytest.fixture
def logs() -> Iterator[List[dict]]:
    """
    Every log event emitted during the test.
    """
    events: List[dict] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(observer)


def our_events(events: List[dict]) -> List[dict]:
    return [e for e in events if e.get("log_namespace") == "edgeproxy.net.endpoints"]


def failures(events: List[dict]) -> List[dict]:
    return [e for e in events if "log_failure" in e]


class Harness:
    """
    One wrapper protocol on a StringTransport with a fake clock.
    """

    def __init__(
        self,
        peer: Any = REAL_PEER,
        trusted: Any = LOOPBACK_NETWORKS,
        timeout: Optional[float] = 5.0,
        make: Callable[[], Optional[Protocol]] = Recorder,
    ) -> None:
        self.reactor = MemoryReactorClock()
        self.metrics = MetricsStore()
        self.app = RecordingFactory(make)
        self.factory = ProxyHeaderWrappingFactory(
            self.app, self.reactor, trusted, timeout, self.metrics
        )
        self.protocol = self.factory.buildProtocol(peer)
        self.transport = HalfCloseTransport(hostAddress=REAL_HOST, peerAddress=peer)
        self.protocol.makeConnection(self.transport)

    def feed(self, data: bytes, step: int = 0) -> None:
        if not step:
            self.protocol.dataReceived(data)
            return
        for index in range(0, len(data), step):
            self.protocol.dataReceived(data[index : index + step])

    @property
    def wrapped(self) -> Any:
        [protocol] = self.app.built
        return protocol

    def rejected(self) -> dict:
        return {
            label: value
            for (name, label), value in self.metrics.counters().items()
            if name == REJECTED_COUNTER
        }


# -- interfaces ---------------------------------------------------------------


def test_endpoint_provides_interface() -> None:
    """
    ProxyHeaderServerEndpoint is a verified IStreamServerEndpoint.
    """
    endpoint = ProxyHeaderServerEndpoint(
        TCP4ServerEndpoint(MemoryReactor(), 0), MemoryReactorClock(), (), 1.0, MetricsStore()
    )
    assert verifyObject(IStreamServerEndpoint, endpoint)


def test_protocol_provides_interfaces() -> None:
    """
    The wrapper is a verified protocol (half-closeable) and, towards the
    application, a transport, producer and consumer; once connected it also
    provides what the real transport provides (ITCPTransport here).
    """
    h = Harness(peer=REAL_PEER)
    for interface in (IProtocol, IHalfCloseableProtocol, ITransport, IPushProducer, IConsumer):
        assert verifyObject(interface, h.protocol)
    assert not ITCPTransport.providedBy(h.protocol)

    tcp = HalfCloseTransport(hostAddress=REAL_HOST, peerAddress=REAL_PEER)
    directlyProvides(tcp, ITCPTransport)
    h2 = Harness()
    h2.protocol.transport = tcp
    h2.feed(V1)
    assert ITCPTransport.providedBy(h2.protocol)
    assert IHalfCloseableProtocol.providedBy(h2.protocol)


# -- the header ---------------------------------------------------------------


@pytest.mark.parametrize(("header", "step"), [(V1, 0), (V1, 1), (V2, 0), (V2, 1), (V2, 5)])
def test_header_then_data(header: bytes, step: int) -> None:
    """
    A valid v1/v2 header, whole or cut into any segments, connects the
    application protocol once it is complete, built for and showing the
    header's source and destination; the bytes after it are delivered.
    """
    h = Harness()
    h.feed(header[:-1], step)
    assert h.app.built == []
    h.feed(header[-1:] + b"hello")
    assert h.app.addresses == [IPv4Address("TCP", "203.0.113.7", 4242)]
    assert h.wrapped.peer == IPv4Address("TCP", "203.0.113.7", 4242)
    assert h.wrapped.host == IPv4Address("TCP", "198.51.100.9", 443)
    assert h.wrapped.transport is h.protocol
    assert h.wrapped.data == [b"hello"]
    h.protocol.dataReceived(b" world")
    assert h.wrapped.data == [b"hello", b" world"]
    assert h.rejected() == {}
    assert not h.transport.disconnecting


def test_ipv6_header() -> None:
    """
    A TCP6 header gives IPv6Address peer and host.
    """
    h = Harness()
    h.feed(header_for(1, ("2001:db8::7", 1), ("2001:db8::9", 2)))
    assert h.wrapped.peer == IPv6Address("TCP", "2001:db8::7", 1)
    assert h.wrapped.host == IPv6Address("TCP", "2001:db8::9", 2)


@pytest.mark.parametrize("header", [V2_LOCAL, b"PROXY UNKNOWN\r\n"], ids=["LOCAL", "UNKNOWN"])
def test_local_and_unknown_use_real_addresses(header: bytes) -> None:
    """
    v2 LOCAL and v1 UNKNOWN are accepted and the application sees the real
    peer and host.
    """
    h = Harness()
    h.feed(header + b"x")
    assert h.app.addresses == [REAL_PEER]
    assert (h.wrapped.peer, h.wrapped.host) == (REAL_PEER, REAL_HOST)
    assert h.wrapped.data == [b"x"]


MALFORMED = [
    (b"GET / HTTP/1.1\r\n\r\n", "not-proxy"),
    (b"PROXY UNKNOWN " + b"x" * 120, "v1-too-long"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "v1-bare-lf"),
    (b"PROXY TCP4 ::1 ::1 1 2\r\n", "v1-family-mismatch"),
    (b"PROXY TCP4 999.1.1.1 5.6.7.8 1 2\r\n", "v1-bad-address"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 70000 2\r\n", "v1-bad-port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 x 2\r\n", "v1-bad-port"),
    (b"PROXY \xff\xfe\r\n", "v1-not-ascii"),
    (V2_SIGNATURE + b"\x31\x11\x00\x0c", "v2-bad-version"),
    (V2_SIGNATURE + b"\x25\x11\x00\x0c", "v2-bad-command"),
    (V2_SIGNATURE + b"\x21\x51\x00\x0c", "v2-bad-family"),
    (V2_SIGNATURE + b"\x21\x11\xff\xff", "v2-too-long"),
    (V2[:15] + b"\x13" + V2[16:] + b"\x03\x00\x04\x00\x00\x00\x00", "v2-bad-crc32c"),
]


@pytest.mark.parametrize("step", [0, 1])
@pytest.mark.parametrize(("data", "reason"), MALFORMED, ids=[r for _, r in MALFORMED])
def test_malformed_closes(data: bytes, reason: str, step: int, logs: List[dict]) -> None:
    """
    A malformed header (whole or one byte at a time) closes the connection
    without building the application protocol, counts the reason, logs one
    line naming the reason and the peer, and no traceback.
    """
    h = Harness()
    h.feed(data + b"more", step)
    assert h.transport.disconnecting
    assert h.app.built == [] and h.app.addresses == []
    assert h.rejected() == {reason: 1}
    [event] = our_events(logs)
    assert event["reason"] == reason
    assert (event["peerHost"], event["peerPort"]) == ("127.0.0.1", "50000")
    assert failures(logs) == []
    assert h.reactor.getDelayedCalls() == []
    # More bytes and the close change nothing.
    h.protocol.dataReceived(V1)
    h.protocol.connectionLost(Failure(ConnectionDone()))
    assert h.app.built == []
    assert h.rejected() == {reason: 1}
    assert len(our_events(logs)) == 1


def test_v2_length_65535_refused_when_seen() -> None:
    """
    A v2 header announcing 65535 bytes is refused as soon as its length
    field arrives, even sent one byte at a time.
    """
    h = Harness()
    header = V2_SIGNATURE + b"\x21\x11\xff\xff"
    h.feed(header[:-1], 1)
    assert not h.transport.disconnecting
    h.feed(header[-1:])
    assert h.transport.disconnecting
    assert h.rejected() == {"v2-too-long": 1}


# -- senders and time ---------------------------------------------------------


@pytest.mark.parametrize(
    "peer",
    [
        IPv4Address("TCP", "10.0.0.1", 1),
        IPv6Address("TCP", "2001:db8::1", 1),
        IPv6Address("TCP", "::ffff:10.0.0.1", 1),
    ],
)
def test_untrusted_sender_refused(peer: Any, logs: List[dict]) -> None:
    """
    A sender outside the trusted networks is closed at once, before reading
    anything: counted as "untrusted", one log line, no timer left.
    """
    h = Harness(peer=peer)
    assert h.transport.disconnecting
    assert h.rejected() == {"untrusted": 1}
    assert h.reactor.getDelayedCalls() == []
    h.feed(V1)
    assert h.app.built == []
    [event] = our_events(logs)
    assert event["reason"] == "untrusted" and event["peerHost"] == peer.host
    assert failures(logs) == []


@pytest.mark.parametrize(
    "peer",
    [
        IPv4Address("TCP", "127.0.0.2", 1),
        IPv6Address("TCP", "::1", 1),
        IPv6Address("TCP", "::ffff:127.0.0.1", 1),
    ],
)
def test_trusted_by_default(peer: Any) -> None:
    """
    Loopback (IPv4, IPv6, IPv4-mapped) senders are trusted by default.
    """
    h = Harness(peer=peer)
    assert not h.transport.disconnecting
    h.feed(V1)
    assert h.wrapped.peer == IPv4Address("TCP", "203.0.113.7", 4242)


UNIX_PEERS_SEEN = [
    UNIXAddress(b"/run/edgeproxy.sock"),
    UNIXAddress(None),
    UNIXAddress(b""),
]


@pytest.mark.parametrize("peer", UNIX_PEERS_SEEN)
def test_unix_peer_untrusted_by_default(peer: Any, logs: List[dict]) -> None:
    """
    A UNIX-socket peer is not trusted by default (any local user may be
    able to connect to the socket): closed at once, counted "untrusted".
    """
    h = Harness(peer=peer)
    assert h.transport.disconnecting
    assert h.rejected() == {"untrusted": 1}
    h.feed(V1)
    assert h.app.built == []
    [event] = our_events(logs)
    assert event["reason"] == "untrusted"


@pytest.mark.parametrize("peer", UNIX_PEERS_SEEN)
def test_unix_peer_trusted_when_listed(peer: Any) -> None:
    """
    With "unix" in the trusted list, UNIX-socket peers may send a header;
    it does not make loopback TCP trusted, and networks listed with it
    still are.
    """
    only_unix = parse_cidrs(["unix"])
    h = Harness(peer=peer, trusted=only_unix)
    assert not h.transport.disconnecting
    h.feed(V1)
    assert h.wrapped.peer == IPv4Address("TCP", "203.0.113.7", 4242)
    assert Harness(peer=REAL_PEER, trusted=only_unix).rejected() == {"untrusted": 1}
    both = parse_cidrs(["127.0.0.0/8", "unix"])
    assert not Harness(peer=peer, trusted=both).rejected()
    assert not Harness(peer=REAL_PEER, trusted=both).rejected()
    assert Harness(peer=IPv4Address("TCP", "10.0.0.1", 1), trusted=both).rejected() == {
        "untrusted": 1
    }


def test_custom_trusted_networks() -> None:
    """
    With a custom list, its members are trusted and loopback no longer is.
    """
    trusted = parse_cidrs(["10.0.0.0/8", "fd00::/8"])
    assert not Harness(peer=IPv4Address("TCP", "10.9.8.7", 1), trusted=trusted).rejected()
    assert not Harness(peer=IPv6Address("TCP", "fd00::5", 1), trusted=trusted).rejected()
    assert Harness(peer=REAL_PEER, trusted=trusted).rejected() == {"untrusted": 1}


@pytest.mark.parametrize("sent", [b"", b"PROXY TCP4 1.2."])
def test_header_timeout(sent: bytes, logs: List[dict]) -> None:
    """
    A client silent (or stalled mid-header) for the header timeout is
    closed, counted as "timeout", logged once; not a moment before.
    """
    h = Harness(timeout=2.0)
    h.feed(sent, 1)
    h.reactor.advance(1.99)
    assert not h.transport.disconnecting
    h.reactor.advance(0.01)
    assert h.transport.disconnecting
    assert h.rejected() == {"timeout": 1}
    assert h.app.built == []
    assert [e["reason"] for e in our_events(logs)] == ["timeout"]
    assert failures(logs) == []
    h.protocol.connectionLost(Failure(ConnectionDone()))
    assert h.rejected() == {"timeout": 1}


def test_timeout_cancelled_by_header() -> None:
    """
    A complete header cancels the header timeout.
    """
    h = Harness(timeout=2.0)
    assert len(h.reactor.getDelayedCalls()) == 1
    h.feed(V1)
    assert h.reactor.getDelayedCalls() == []
    h.reactor.advance(10)
    assert not h.transport.disconnecting


def test_no_timeout() -> None:
    """
    header_timeout=None sets no timer.
    """
    h = Harness(timeout=None)
    assert h.reactor.getDelayedCalls() == []


def test_closed_before_header_complete(logs: List[dict]) -> None:
    """
    A client that closes mid-header is counted as "incomplete" and its timer
    cancelled; one that closes without sending anything is not counted.
    """
    h = Harness()
    h.feed(V1[:10])
    h.protocol.readConnectionLost()
    assert h.transport.disconnecting
    h.protocol.connectionLost(Failure(ConnectionDone()))
    assert h.rejected() == {"incomplete": 1}
    assert h.reactor.getDelayedCalls() == []
    assert len(our_events(logs)) == 1

    quiet = Harness()
    quiet.protocol.connectionLost(Failure(ConnectionDone()))
    assert quiet.rejected() == {}
    assert quiet.reactor.getDelayedCalls() == []
    assert failures(logs) == []


def test_application_refuses() -> None:
    """
    If the application factory returns None the connection is closed.
    """
    h = Harness(make=lambda: None)
    h.feed(V1)
    assert h.transport.disconnecting
    assert h.app.addresses == [IPv4Address("TCP", "203.0.113.7", 4242)]
    h.protocol.connectionLost(Failure(ConnectionDone()))


# -- after the header: the transport as the application sees it --------------


def test_writes_and_close_pass_through() -> None:
    """
    The application's writes and closes go to the real transport.
    """
    h = Harness()
    h.feed(V1)
    h.wrapped.transport.write(b"a")
    h.wrapped.transport.writeSequence([b"b", b"c"])
    assert h.transport.value() == b"abc"
    h.wrapped.transport.loseConnection()
    assert h.transport.disconnecting


def test_flow_control_passes_through() -> None:
    """
    pauseProducing/resumeProducing/stopProducing and registerProducer act on
    the real transport.
    """
    h = Harness()
    h.feed(V1)
    transport = h.wrapped.transport
    transport.pauseProducing()
    assert h.transport.producerState == "paused"
    transport.resumeProducing()
    assert h.transport.producerState == "producing"
    producer = Recorder()
    transport.registerProducer(producer, True)
    assert (h.transport.producer, h.transport.streaming) == (producer, True)
    transport.unregisterProducer()
    assert h.transport.producer is None
    transport.stopProducing()
    assert h.transport.producerState == "stopped"


def test_bytes_after_header_wait_for_resume() -> None:
    """
    Bytes that came with the header are not pushed into an application that
    paused its transport on connect: they come first on resume.
    """
    h = Harness(make=lambda: Recorder(pauseOnConnect=True))
    h.feed(V1 + b"early")
    assert h.wrapped.data == []
    assert h.transport.producerState == "paused"
    h.wrapped.transport.resumeProducing()
    assert h.wrapped.data == [b"early"]
    assert h.transport.producerState == "producing"
    h.protocol.dataReceived(b"later")
    assert h.wrapped.data == [b"early", b"later"]


def test_bytes_after_header_delivered_once() -> None:
    """
    An application that pauses and resumes inside connectionMade gets the
    bytes that came with the header exactly once, in order.
    """

    class PauseResume(Recorder):
        def connectionMade(self) -> None:
            super().connectionMade()
            self.transport.pauseProducing()  # type: ignore[union-attr]
            self.transport.resumeProducing()  # type: ignore[union-attr]

    h = Harness(make=PauseResume)
    h.feed(V1 + b"early")
    h.protocol.dataReceived(b"later")
    assert h.wrapped.data == [b"early", b"later"]


def test_application_closing_on_connect_gets_no_data() -> None:
    """
    An application that closes in connectionMade is not handed the bytes
    that came with the header (as a closing transport reads no more).
    """

    class Closer(Recorder):
        def connectionMade(self) -> None:
            super().connectionMade()
            self.transport.loseConnection()  # type: ignore[union-attr]

    h = Harness(make=Closer)
    h.feed(V1 + b"early")
    assert h.wrapped.data == []
    assert h.transport.disconnecting


def test_half_close_passes_through() -> None:
    """
    The client's FIN reaches a half-closeable application as
    readConnectionLost, write-side close goes down to the real transport and
    writeConnectionLost comes back up; then connectionLost, once.
    """
    h = Harness()
    h.feed(V1)
    h.protocol.readConnectionLost()
    assert h.wrapped.events == ["read-lost"]
    assert not h.transport.disconnecting
    h.wrapped.transport.write(b"still talking")
    h.wrapped.transport.loseWriteConnection()
    assert h.transport.writeClosed
    h.protocol.writeConnectionLost()
    reason = Failure(ConnectionDone())
    h.protocol.connectionLost(reason)
    assert h.wrapped.events == ["read-lost", "write-lost", "lost"]
    assert h.wrapped.lostReason is reason
    assert h.protocol.wrappedProtocol is None


def test_fin_closes_application_without_half_close() -> None:
    """
    An application protocol without IHalfCloseableProtocol is closed on the
    client's FIN, as Twisted would.
    """
    h = Harness(make=PlainRecorder)
    h.feed(V1 + b"x")
    assert h.wrapped.data == [b"x"]
    h.protocol.readConnectionLost()
    assert h.transport.disconnecting


def test_factory_start_stop_forwarded() -> None:
    """
    Starting and stopping the wrapping factory starts and stops the
    application's.
    """
    app = RecordingFactory()
    factory = ProxyHeaderWrappingFactory(app, MemoryReactorClock(), (), 1.0, MetricsStore())
    factory.doStart()
    factory.doStop()
    assert (app.starts, app.stops) == (1, 1)


# -- configuration ------------------------------------------------------------


def test_parse_cidrs() -> None:
    """
    CIDRs and bare addresses parse to networks (host bits ignored).
    """
    assert parse_cidrs([" 10.1.2.3/8", "::1", "fd00::/8"]) == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
        ipaddress.ip_network("fd00::/8"),
    )
    assert parse_cidrs([]) == ()


@pytest.mark.parametrize("bad", ["", "10.0.0.0/33", "not-a-network", "1.2.3.4/8/8"])
def test_parse_cidrs_names_bad_value(bad: str) -> None:
    """
    A bad value raises ValueError naming it.
    """
    with pytest.raises(ValueError, match="invalid network") as info:
        parse_cidrs(["127.0.0.0/8", bad])
    assert repr(bad) in str(info.value)


def test_parse_cidrs_unix() -> None:
    """
    "unix" (any case, surrounding spaces ignored) parses to UNIX_PEERS,
    whose text is "unix"; look-alikes are refused.
    """
    unix = endpoints.UNIX_PEERS
    assert parse_cidrs(["unix", " UNIX ", "10.0.0.0/8"]) == (
        unix,
        unix,
        ipaddress.ip_network("10.0.0.0/8"),
    )
    assert str(unix) == "unix"
    for bad in ("unix:/run/x.sock", "unixx", "un ix"):
        with pytest.raises(ValueError, match="invalid network"):
            parse_cidrs([bad])


def test_loopback_networks() -> None:
    """
    The default trusted networks are 127.0.0.0/8 and ::1/128.
    """
    assert LOOPBACK_NETWORKS == (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )


def test_server_endpoint_plain() -> None:
    """
    A plain description goes to serverFromString (tcp, tcp6).
    """
    metrics = MetricsStore()
    assert isinstance(
        server_endpoint(MemoryReactor(), "tcp:0", metrics=metrics), TCP4ServerEndpoint
    )
    assert isinstance(
        server_endpoint(MemoryReactor(), r"tcp6:0:interface=\:\:1", metrics=metrics),
        TCP6ServerEndpoint,
    )
    with pytest.raises(ValueError):
        server_endpoint(MemoryReactor(), "nonsense:0", metrics=metrics)


def test_server_endpoint_haproxy_listens_wrapped() -> None:
    """
    haproxy:REST wraps server_endpoint(REST); listening puts a
    ProxyHeaderWrappingFactory around the application's factory with the
    given trust list and timeout.
    """
    reactor = MemoryReactor()
    metrics = MetricsStore()
    trusted = parse_cidrs(["10.0.0.0/8"])
    endpoint = server_endpoint(
        reactor,
        "haproxy:tcp6:8080:interface=\\:\\:1",
        metrics=metrics,
        trusted=trusted,
        header_timeout=1.5,
    )
    assert isinstance(endpoint, ProxyHeaderServerEndpoint)
    assert isinstance(endpoint.inner, TCP6ServerEndpoint)
    app = RecordingFactory()
    endpoint.listen(app)
    [(port, factory, _, interface)] = reactor.tcpServers
    assert (port, interface) == (8080, "::1")
    assert isinstance(factory, ProxyHeaderWrappingFactory)
    assert factory.wrappedFactory is app
    assert factory.headerTimeout == 1.5
    assert factory.metrics is metrics
    assert IPv4Address("TCP", "10.2.3.4", 1) in factory.trusted
    assert REAL_PEER not in factory.trusted


def test_server_endpoint_txsni(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    txsni:CERTDIR:REST hands CERTDIR (colons unescaped), server_endpoint(REST),
    the handshake timeout and the metrics to edgeproxy.net.tls.sni_server_endpoint.
    """
    import edgeproxy.net.tls

    calls = []

    def fake(reactor: Any, certdir: str, inner: Any, **kwargs: Any) -> str:
        calls.append((reactor, certdir, inner, kwargs))
        return "tls-endpoint"

    monkeypatch.setattr(edgeproxy.net.tls, "sni_server_endpoint", fake)
    reactor = MemoryReactor()
    metrics = MetricsStore()
    result = server_endpoint(
        reactor,
        r"txsni:C\:/certs:haproxy:tcp:443",
        metrics=metrics,
        tls_handshake_timeout=3.0,
    )
    assert result == "tls-endpoint"
    [(got_reactor, certdir, inner, kwargs)] = calls
    assert got_reactor is reactor and certdir == "C:/certs"
    assert isinstance(inner, ProxyHeaderServerEndpoint)
    assert isinstance(inner.inner, TCP4ServerEndpoint)
    assert kwargs == {"handshake_timeout": 3.0, "metrics": metrics}
    with pytest.raises(ValueError):
        server_endpoint(reactor, "txsni:onlydir", metrics=metrics)


# -- real loopback sockets ----------------------------------------------------


@implementer(IHalfCloseableProtocol)
class PeerReporter(Protocol):
    """
    Server application: says who it thinks the peer and host are, echoes,
    and on the client's FIN answers "eof" and half-closes in turn.
    """

    def connectionMade(self) -> None:
        self.factory.connected.append(self)  # type: ignore[attr-defined]
        peer: Any = self.transport.getPeer()  # type: ignore[union-attr]
        host: Any = self.transport.getHost()  # type: ignore[union-attr]
        self.transport.write(  # type: ignore[union-attr]
            f"peer {peer.host} {peer.port} host {host.host} {host.port}\n".encode()
        )

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]

    def readConnectionLost(self) -> None:
        self.transport.write(b"eof\n")  # type: ignore[union-attr]
        self.transport.loseWriteConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = ConnectionDone) -> None:  # type: ignore[assignment]
        self.factory.lost.append(self)  # type: ignore[attr-defined]


class ReporterFactory(Factory):
    protocol = PeerReporter

    def __init__(self) -> None:
        self.connected: List[PeerReporter] = []
        self.lost: List[PeerReporter] = []


@implementer(IHalfCloseableProtocol)
class Client(Protocol):
    """
    Test client: no Nagle, records what it receives and whether it saw FIN.
    """

    transport: Any

    def __init__(self) -> None:
        self.received = b""
        self.sawFin = False
        self.closed: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def readConnectionLost(self) -> None:
        self.sawFin = True
        self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = ConnectionDone) -> None:  # type: ignore[assignment]
        self.closed.callback(None)


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> Deferred[None]:
    """
    Fire once predicate() is true; fail after timeout seconds.
    """

    @inlineCallbacks
    def poll():
        waited = 0.0
        while not predicate():
            if waited > timeout:
                raise AssertionError(f"timed out waiting for {predicate}")
            yield deferLater(global_reactor, 0.01, lambda: None)
            waited += 0.01

    return poll()


class Server:
    """
    A haproxy: listener on 127.0.0.1 around a ReporterFactory.
    """

    def __init__(self, header_timeout: float = 5.0) -> None:
        self.metrics = MetricsStore()
        self.app = ReporterFactory()
        self.endpoint = server_endpoint(
            global_reactor,
            "haproxy:tcp:0:interface=127.0.0.1",
            metrics=self.metrics,
            header_timeout=header_timeout,
        )
        self.port: Any = None

    @inlineCallbacks
    def start(self):
        self.port = yield self.endpoint.listen(self.app)

    @inlineCallbacks
    def connect(self):
        client = Client()
        yield connectProtocol(
            TCP4ClientEndpoint(global_reactor, "127.0.0.1", self.port.getHost().port), client
        )
        return client

    @inlineCallbacks
    def stop(self):
        yield self.port.stopListening()
        yield wait_until(lambda: len(self.app.lost) == len(self.app.connected))
        yield wait_until(lambda: not _our_delayed_calls())


def _our_delayed_calls() -> list:
    return [
        c for c in global_reactor.getDelayedCalls() if "edgeproxy" in repr(getattr(c, "func", None))
    ]


@inlineCallbacks
def send_slowly(client: Client, data: bytes, step: int = 1, delay: float = 0.003):
    for index in range(0, len(data), step):
        client.transport.write(data[index : index + step])  # type: ignore[union-attr]
        yield deferLater(global_reactor, delay, lambda: None)


@pytest.mark.slow
@pytest.mark.parametrize("header", [V1, V2], ids=["v1", "v2"])
@pytest.mark.parametrize("slowly", [False, True], ids=["whole", "byte-per-segment"])
@pytest_twisted.inlineCallbacks
def test_loopback_header(header: bytes, slowly: bool, logs, monkeypatch):
    """
    Over a real socket, a v1/v2 header (whole, or one byte per segment with
    TCP_NODELAY and pauses) makes the application see the header's source
    as its peer; data then echoes; the client's FIN reaches the application,
    which answers after it and half-closes, and the client sees that FIN.
    """
    segments = []
    original = ProxyHeaderProtocol.dataReceived

    def counting(self: ProxyHeaderProtocol, data: bytes) -> None:
        segments.append(data)
        original(self, data)

    monkeypatch.setattr(ProxyHeaderProtocol, "dataReceived", counting)
    server = Server()
    yield server.start()
    try:
        client = yield server.connect()
        if slowly:
            yield send_slowly(client, header)
            assert len(segments) > 1
            assert b"".join(segments) == header
        else:
            client.transport.write(header)
        client.transport.write(b"ping\n")
        expected = b"peer 203.0.113.7 4242 host 198.51.100.9 443\nping\n"
        yield wait_until(lambda: client.received == expected)
        assert len(server.app.connected) == 1
        client.transport.loseWriteConnection()
        yield client.closed
        assert client.received == expected + b"eof\n"
        assert client.sawFin
        assert server.metrics.counters() == {}
    finally:
        yield server.stop()
    assert failures(logs) == []


@pytest.mark.slow
@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"PROXY TCP4 999.1.1.1 5.6.7.8 1 2\r\nhello", "v1-bad-address"),
        (b"GET / HTTP/1.0\r\n\r\n", "not-proxy"),
        (V2_SIGNATURE + b"\x21\x11\xff\xff", "v2-too-long"),
    ],
)
@pytest_twisted.inlineCallbacks
def test_loopback_malformed(data: bytes, reason: str, logs):
    """
    Over a real socket, a malformed header (sent slowly) closes the
    connection; the application never sees a connection; the reason is
    counted and logged once, without a traceback.
    """
    server = Server()
    yield server.start()
    try:
        client = yield server.connect()
        yield send_slowly(client, data, step=3)
        yield client.closed
        assert server.app.connected == []
        assert client.received == b""
        assert server.metrics.counter(REJECTED_COUNTER, reason) == 1
        [event] = our_events(logs)
        assert event["reason"] == reason and event["peerHost"] == "127.0.0.1"
    finally:
        yield server.stop()
    assert failures(logs) == []


@pytest.mark.slow
@pytest_twisted.inlineCallbacks
def test_loopback_timeout(logs):
    """
    Over a real socket, a client that stalls mid-header is closed after the
    header timeout and counted.
    """
    server = Server(header_timeout=0.2)
    yield server.start()
    try:
        client = yield server.connect()
        client.transport.write(V1[:20])
        yield client.closed
        assert server.app.connected == []
        assert server.metrics.counter(REJECTED_COUNTER, "timeout") == 1
    finally:
        yield server.stop()
    assert failures(logs) == []


@pytest.fixture
def socket_dir() -> Iterator[str]:
    """
    A fresh directory with a short path (AF_UNIX paths are limited to
    about 100 bytes).
    """
    path = tempfile.mkdtemp(prefix="ep-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class UnixClient(Client):
    """
    A Client for a UNIX socket (no TCP_NODELAY to set).
    """

    def connectionMade(self) -> None:
        pass


@inlineCallbacks
def unix_exchange(socket_dir: str, trusted: Any):
    """
    Listen on haproxy:unix:PATH (built by server_endpoint, with C{trusted}
    unless it is None), connect, send a v1 header and a line, and wait
    until the server closes or echoes.  Returns (client, app, metrics).
    """
    metrics = MetricsStore()
    app = ReporterFactory()
    path = f"{socket_dir}/edge.sock"
    kwargs = {} if trusted is None else {"trusted": trusted}
    endpoint = server_endpoint(global_reactor, f"haproxy:unix:{path}", metrics=metrics, **kwargs)
    port = yield endpoint.listen(app)
    try:
        client = UnixClient()
        yield connectProtocol(UNIXClientEndpoint(global_reactor, path), client)
        client.transport.write(V1 + b"ping\n")
        yield wait_until(lambda: client.closed.called or client.received.endswith(b"ping\n"))
        client.transport.loseConnection()
        yield client.closed
    finally:
        yield port.stopListening()
        yield wait_until(lambda: len(app.lost) == len(app.connected))
        yield wait_until(lambda: not _our_delayed_calls())
    return client, app, metrics


@pytest.mark.slow
@pytest_twisted.inlineCallbacks
def test_unix_socket_untrusted_by_default(socket_dir: str, logs):
    """
    On a real haproxy:unix: listener with the default trusted list, a
    local client's header is refused: closed before anything is read,
    counted "untrusted", the application never sees a connection.
    """
    client, app, metrics = yield unix_exchange(socket_dir, None)
    assert app.connected == []
    assert client.received == b""
    assert metrics.counter(REJECTED_COUNTER, "untrusted") == 1
    [event] = our_events(logs)
    assert event["reason"] == "untrusted"
    assert failures(logs) == []


@pytest.mark.slow
@pytest_twisted.inlineCallbacks
def test_unix_socket_trusted_when_listed(socket_dir: str, logs):
    """
    On a real haproxy:unix: listener trusting "unix", a local client's
    header is accepted: the application sees the header's source as its
    peer and the data that followed.
    """
    client, app, metrics = yield unix_exchange(socket_dir, parse_cidrs(["unix"]))
    assert len(app.connected) == 1
    assert client.received == b"peer 203.0.113.7 4242 host 198.51.100.9 443\nping\n"
    assert [k for k in metrics.counters() if k[0] == REJECTED_COUNTER] == []
    assert failures(logs) == []


def test_module_exports() -> None:
    """
    The names the rest of edgeproxy imports exist.
    """
    for name in endpoints.__all__:
        assert hasattr(endpoints, name)


@pytest.mark.slow
@pytest_twisted.inlineCallbacks
def test_loopback_through_proxy(logs):
    """
    End to end with edgeproxy's ProxyFactory behind haproxy:: a v2 header
    sent one byte per segment, then data and FIN; the backend (asking for
    PROXY v1) is told the header's client, gets the data that followed the
    header although the proxy pauses the client on connect, and the FIN.
    """
    import random

    from edgeproxy.config import ProxySettings
    from edgeproxy.net.proxy import ProxyFactory
    from edgeproxy.routing.bindings import BindingTable
    from edgeproxy.routing.router import Router
    from edgeproxy.testing import InMemoryBackendRepository, backend

    echo_factory = ReporterFactory()
    echo = yield TCP4ServerEndpoint(global_reactor, 0, interface="127.0.0.1").listen(echo_factory)
    metrics = MetricsStore()
    repository = InMemoryBackendRepository(
        [backend("b1", host="127.0.0.1", port=echo.getHost().port, proxy_protocol=1)]
    )
    router = Router(
        repository, BindingTable(), None, metrics, "sa", global_reactor, random.Random(1)
    )
    settings = ProxySettings(connect_timeout=2.0, idle_timeout=10.0, half_closed_timeout=5.0)
    proxy = ProxyFactory(router, global_reactor, settings, metrics)
    endpoint = server_endpoint(global_reactor, "haproxy:tcp:0:interface=127.0.0.1", metrics=metrics)
    port = yield endpoint.listen(proxy)
    try:
        client = Client()
        yield connectProtocol(
            TCP4ClientEndpoint(global_reactor, "127.0.0.1", port.getHost().port), client
        )
        yield send_slowly(client, header_for(2, ("203.0.113.5", 1111), ("198.51.100.1", 443)))
        client.transport.write(b"hello")
        client.transport.loseWriteConnection()
        yield client.closed
        # The backend reports the proxy's own address, then echoes the PROXY
        # v1 header the proxy sent and the data, then answers the FIN.
        lines = client.received.split(b"\n", 1)
        assert lines[0].startswith(b"peer 127.0.0.1 ")
        assert lines[1] == b"PROXY TCP4 203.0.113.5 198.51.100.1 1111 443\r\nhelloeof\n"
        assert client.sawFin
        assert [k for k in metrics.counters() if k[0] == REJECTED_COUNTER] == []
    finally:
        yield port.stopListening()
        yield echo.stopListening()
        yield wait_until(lambda: len(echo_factory.lost) == len(echo_factory.connected))
        yield wait_until(lambda: not _our_delayed_calls())
    assert failures(logs) == []
