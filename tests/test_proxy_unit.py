"""
Unit tests for L{edgeproxy.net.proxy}, synchronous on L{MemoryReactorClock} and
L{StringTransport}, with the real router, binding table and metrics store.
"""

from __future__ import annotations

import random
import struct
from typing import Any, Iterable

import pytest
from faultkit import LogCapture
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.error import (
    ConnectBindError,
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
    TimeoutError,
    UserError,
)
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from edgeproxy.config import ProxySettings
from edgeproxy.interfaces import IRouter
from edgeproxy.model import Backend, GeoInfo
from edgeproxy.net.proxy import (
    CAUSES,
    BackendConnectFactory,
    ConnectionTable,
    ProxyBackendProtocol,
    ProxyClientProtocol,
    ProxyFactory,
)
from edgeproxy.routing.load import UNDERFLOW
from edgeproxy.routing.router import Router
from edgeproxy.testing import (
    BindingTable,
    InMemoryBackendRepository,
    MetricsStore,
    StaticGeoResolver,
    backend,
)

CLIENT = IPv4Address("TCP", "203.0.113.5", 40000)
LOCAL = IPv4Address("TCP", "198.51.100.1", 443)
GEO = StaticGeoResolver({"203.0.113.5": GeoInfo("BR", "sa")})

# With the client in BR/sa and the POP in "us", these four are tried in
# this order (geo tiers 0, 1, 2, 3).
A = backend("a", country="BR", region="sa", host="10.0.0.1", port=7001)
B = backend("b", country="AR", region="sa", host="10.0.0.2", port=7002)
C = backend("c", country="US", region="us", host="10.0.0.3", port=7003)
D = backend("d", country="FR", region="eu", host="10.0.0.4", port=7004)


class FakeTCPTransport(StringTransport):
    """
    A StringTransport with the ITCPTransport methods the proxy uses.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.keepalive: bool | None = None
        self.nodelay: bool | None = None
        self.write_closed = False

    def setTcpKeepAlive(self, enabled: bool) -> None:
        self.keepalive = enabled

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.nodelay = enabled

    def loseWriteConnection(self) -> None:
        self.write_closed = True


@implementer(IRouter)
class SpyRouter:
    """
    Delegates to a real L{Router} and records every call in order.
    """

    def __init__(self, router: Router) -> None:
        self.router = router
        self.calls: list[tuple[Any, ...]] = []

    def choose(self, client_ip: str, app: str | None, exclude: frozenset[str]) -> Backend | None:
        chosen = self.router.choose(client_ip, app, exclude)
        self.calls.append(("choose", client_ip, app, exclude, chosen.id if chosen else None))
        return chosen

    def release(self, backend_id: str) -> None:
        self.calls.append(("release", backend_id))
        self.router.release(backend_id)

    def connectFailed(self, client_ip: str, app: str | None, backend_id: str) -> None:
        self.calls.append(("connectFailed", client_ip, app, backend_id))
        self.router.connectFailed(client_ip, app, backend_id)

    def connectSucceeded(self, backend_id: str) -> None:
        self.router.connectSucceeded(backend_id)

    @property
    def lastTier(self) -> int | None:
        return self.router.lastTier

    def count(self, name: str, backend_id: str) -> int:
        if name == "choose":
            return sum(1 for c in self.calls if c[0] == "choose" and c[4] == backend_id)
        return sum(1 for c in self.calls if c[0] == name and c[-1] == backend_id)


class World:
    """
    A L{ProxyFactory} on a memory reactor, and handles on its parts.
    """

    def __init__(self, backends: Iterable[Backend] = (A, B, C, D), **settings: Any) -> None:
        self.reactor = MemoryReactorClock()
        self.repository = InMemoryBackendRepository(backends)
        self.bindings = BindingTable()
        self.metrics = MetricsStore()
        self.router = SpyRouter(
            Router(
                self.repository,
                self.bindings,
                GEO,
                self.metrics,
                "us",
                self.reactor,
                random.Random(1),
            )
        )
        self.settings = ProxySettings(**settings)
        self.factory = ProxyFactory(
            self.router, self.reactor, self.settings, self.metrics, app="app"
        )
        self.logs = LogCapture().start()

    def accept(
        self, peer: Any = CLIENT, transport_class: type = FakeTCPTransport
    ) -> tuple[ProxyClientProtocol, Any]:
        proto = self.factory.buildProtocol(peer)
        transport = transport_class(hostAddress=LOCAL, peerAddress=peer)
        proto.makeConnection(transport)
        return proto, transport

    def attempt(self, index: int = -1) -> BackendConnectFactory:
        attempt = self.reactor.tcpClients[index][2]
        assert isinstance(attempt, BackendConnectFactory)
        return attempt

    def connected(self, attempt: BackendConnectFactory | None = None) -> tuple[Any, Any]:
        attempt = attempt or self.attempt()
        side = attempt.buildProtocol(IPv4Address("TCP", attempt.backend.host, attempt.backend.port))
        transport = FakeTCPTransport()
        side.makeConnection(transport)
        return side, transport

    def fail(self, exc: Exception | None = None, attempt: Any = None) -> None:
        exc = exc if exc is not None else ConnectionRefusedError()
        attempt = attempt or self.attempt()
        attempt.clientConnectionFailed(self.reactor.connectors[-1], Failure(exc))

    def lines(self) -> list[dict[str, Any]]:
        return self.logs.connection_lines()

    def assert_accounted(self) -> None:
        """
        Every chosen backend was released exactly once; no count left.
        """
        chosen = [c[4] for c in self.router.calls if c[0] == "choose" and c[4]]
        for backend_id in set(chosen):
            assert self.router.count("release", backend_id) == chosen.count(backend_id)
        released = [c[1] for c in self.router.calls if c[0] == "release"]
        assert sorted(released) == sorted(chosen)
        assert self.router.router.load.connections == {}
        assert self.metrics.counter(UNDERFLOW, "a") == 0
        assert all(name != UNDERFLOW for name, _ in self.metrics.counters())

    def close(self) -> None:
        self.logs.stop()


@pytest.fixture
def world_factory():
    worlds: list[World] = []

    def make(*args: Any, **kwargs: Any) -> World:
        w = World(*args, **kwargs)
        worlds.append(w)
        return w

    yield make
    for w in worlds:
        w.close()
        assert w.logs.failures() == []


def lost(proto: Any, exc: Exception | None = None) -> None:
    proto.connectionLost(Failure(exc if exc is not None else ConnectionDone()))


def step(w: World, seconds: float, tick: float = 0.125) -> None:
    """
    Advance the clock in small exact steps, as time passes for real.
    """
    for _ in range(round(seconds / tick)):
        w.reactor.advance(tick)


def test_protocols_provide_half_close_interface(world_factory):
    """
    Both legs provide IHalfCloseableProtocol (so TCP reports FIN instead of
    closing), and the factory is a plain Twisted Factory.
    """
    w = world_factory()
    proto, _ = w.accept()
    side, _ = w.connected()
    assert isinstance(w.factory, Factory)
    assert verifyObject(IHalfCloseableProtocol, proto)
    assert verifyObject(IHalfCloseableProtocol, side)
    assert isinstance(side, ProxyBackendProtocol)


def test_client_paused_until_backend_connected(world_factory):
    """
    The client transport is paused on accept, the best backend is dialled
    with the connect timeout, and only once it is connected is the client
    resumed, with each transport the streaming producer of the other.
    """
    w = world_factory(connect_timeout=2.0, connect_budget=10.0)
    proto, client = w.accept()
    assert client.producerState == "paused"
    host, port, _, timeout, _ = w.reactor.tcpClients[0]
    assert (host, port, timeout) == ("10.0.0.1", 7001, 2.0)
    assert w.factory.openConnections == 1
    _, server = w.connected()
    assert client.producerState == "producing"
    assert client.producer is server and client.streaming is True
    assert server.producer is client and server.streaming is True
    assert proto.backend == A


def test_buffered_data_flushed_then_relayed(world_factory):
    """
    Bytes that arrive while connecting (a PROXY wrapper may pass some on)
    are buffered and written first; then bytes are relayed both ways and
    counted.
    """
    w = world_factory()
    proto, client = w.accept()
    proto.dataReceived(b"early ")
    proto.dataReceived(b"bird ")
    side, server = w.connected()
    assert server.value() == b"early bird "
    proto.dataReceived(b"more")
    side.dataReceived(b"reply")
    assert server.value() == b"early bird more"
    assert client.value() == b"reply"
    assert proto.bytesToBackend == 15
    assert side.bytesToClient == 5


def test_proxy_v1_header_exact(world_factory):
    """
    A backend with proxy_protocol=1 first gets the v1 line with the client
    as source and the address the client connected to as destination.
    """
    w = world_factory([backend("pp1", proxy_protocol=1, host="10.0.0.9", port=80)])
    proto, _ = w.accept()
    proto.dataReceived(b"GET /")
    _, server = w.connected()
    assert server.value() == b"PROXY TCP4 203.0.113.5 198.51.100.1 40000 443\r\nGET /"


def test_proxy_v2_header_exact(world_factory):
    """
    A backend with proxy_protocol=2 first gets the binary v2 header: the
    12-byte signature, PROXY/TCP4, length 12, addresses, ports.
    """
    w = world_factory([backend("pp2", proxy_protocol=2, host="10.0.0.9", port=80)])
    proto, _ = w.accept()
    proto.dataReceived(b"x")
    _, server = w.connected()
    expected = (
        b"\r\n\r\n\x00\r\nQUIT\n"
        + b"\x21\x11"
        + struct.pack("!H", 12)
        + bytes([203, 0, 113, 5])
        + bytes([198, 51, 100, 1])
        + struct.pack("!HH", 40000, 443)
    )
    assert server.value() == expected + b"x"


def test_proxy_v1_header_ipv6(world_factory):
    """
    An IPv6 client gets a TCP6 v1 line.
    """
    w = world_factory([backend("pp1", proxy_protocol=1, host="10.0.0.9", port=80)])
    peer = IPv6Address("TCP", "2001:db8::5", 40000)
    proto = w.factory.buildProtocol(peer)
    transport = FakeTCPTransport(
        hostAddress=IPv6Address("TCP", "2001:db8::1", 443), peerAddress=peer
    )
    proto.makeConnection(transport)
    _, server = w.connected()
    assert server.value() == b"PROXY TCP6 2001:db8::5 2001:db8::1 40000 443\r\n"


@pytest.mark.parametrize(
    "version, header", [(1, b"PROXY UNKNOWN\r\n"), (2, b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00")]
)
def test_proxy_header_for_a_client_without_ip(world_factory, version, header):
    """
    Defect 7 of issue 7: a client with no IP address (a UNIX socket) going
    to a backend that wants a PROXY header gets v1 UNKNOWN / v2 LOCAL and
    is relayed, instead of a failed connection after a backend was chosen.
    """
    w = world_factory([backend("pp", proxy_protocol=version, host="10.0.0.9", port=80)])
    proto, client = w.accept(peer=UNIXAddress(None))
    side, server = w.connected()
    assert not client.disconnected and not server.disconnected
    proto.dataReceived(b"hi")
    assert server.value() == header + b"hi"
    lost(side)
    lost(proto)
    assert w.logs.causes() == ["backend-closed"]
    w.assert_accounted()


def test_failover_sequence_and_exclude(world_factory):
    """
    A refused connect and a timed-out connect each release the backend,
    clear the binding to it, count a failure, and the next attempt
    excludes every failed backend; the third backend then serves, and the
    client ends up bound to it.
    """
    w = world_factory(connect_timeout=1.0, connect_budget=10.0, max_attempts=3)
    proto, client = w.accept()
    w.fail(ConnectionRefusedError())
    w.reactor.advance(1.0)
    w.fail(TimeoutError())
    side, _ = w.connected()
    ip = "203.0.113.5"
    assert w.router.calls == [
        ("choose", ip, "app", frozenset(), "a"),
        ("release", "a"),
        ("connectFailed", ip, "app", "a"),
        ("choose", ip, "app", frozenset({"a"}), "b"),
        ("release", "b"),
        ("connectFailed", ip, "app", "b"),
        ("choose", ip, "app", frozenset({"a", "b"}), "c"),
    ]
    assert [(h, p) for h, p, *_ in w.reactor.tcpClients] == [
        ("10.0.0.1", 7001),
        ("10.0.0.2", 7002),
        ("10.0.0.3", 7003),
    ]
    assert w.metrics.counter("backend_connect_failures", "a") == 1
    assert w.metrics.counter("backend_connect_failures", "b") == 1
    binding = w.bindings.lookup((ip, "app"), w.reactor.seconds())
    assert binding is not None and binding.backend_id == "c"
    assert proto.attempts == 3
    assert client.producerState == "producing"
    proto.readConnectionLost()
    side.readConnectionLost()
    lost(side)
    lost(proto)
    [line] = w.lines()
    assert (line["cause"], line["attempts"], line["backend"]) == ("client-closed", 3, "c")
    w.assert_accounted()


def test_local_socket_failure_blames_no_backend(world_factory):
    """
    When the proxy cannot even open a socket (ConnectBindError, e.g. out of
    file descriptors) the client is closed without failing over, the
    backend is not counted as failed and the client's binding is kept.
    """
    w = world_factory(max_attempts=3)
    proto, client = w.accept()
    ip = "203.0.113.5"
    w.fail(ConnectBindError(24, "Too many open files"))
    assert client.disconnecting or client.disconnected
    assert len(w.reactor.tcpClients) == 1
    assert not [c for c in w.router.calls if c[0] == "connectFailed"]
    assert w.metrics.counter("backend_connect_failures", "a") == 0
    assert w.metrics.counter("connect_local_errors") == 1
    binding = w.bindings.lookup((ip, "app"), w.reactor.seconds())
    assert binding is not None and binding.backend_id == "a"
    lost(proto)
    [line] = w.lines()
    assert line["cause"] == "connect-failed"
    w.assert_accounted()


def test_connect_budget_bounds_attempt_timeouts(world_factory):
    """
    Each attempt's timeout is the smaller of the connect timeout and what
    is left of the budget; when the budget is spent the client is closed
    as connect-failed even though attempts remain.
    """
    w = world_factory(connect_timeout=4.0, connect_budget=6.0, max_attempts=5)
    proto, client = w.accept()
    assert w.reactor.tcpClients[0][3] == 4.0
    w.reactor.advance(4.0)
    w.fail(TimeoutError())
    assert w.reactor.tcpClients[1][3] == pytest.approx(2.0)
    w.reactor.advance(2.0)
    w.fail(TimeoutError())
    assert len(w.reactor.tcpClients) == 2
    assert client.disconnecting
    lost(proto)
    [line] = w.lines()
    assert (line["cause"], line["attempts"]) == ("connect-failed", 2)
    assert line["duration"] == pytest.approx(6.0)
    w.assert_accounted()


def test_max_attempts(world_factory):
    """
    No more than max_attempts backends are tried.
    """
    w = world_factory(max_attempts=2)
    proto, client = w.accept()
    w.fail()
    w.fail()
    assert len(w.reactor.tcpClients) == 2
    assert client.disconnecting
    lost(proto)
    assert w.logs.causes() == ["connect-failed"]
    assert w.metrics.counter("connections_closed", "connect-failed") == 1
    w.assert_accounted()


def test_candidates_exhausted_is_connect_failed(world_factory):
    """
    When every candidate failed, the cause is connect-failed, not
    no-backend.
    """
    w = world_factory([A, B], max_attempts=5)
    proto, client = w.accept()
    w.fail()
    w.fail()
    assert client.disconnecting
    lost(proto)
    assert w.logs.causes() == ["connect-failed"]
    w.assert_accounted()


def test_no_backend(world_factory):
    """
    F20: with no candidate the client is closed at once without any
    connect, counted and logged as no-backend.
    """
    w = world_factory([backend("sick", healthy=False)])
    proto, client = w.accept()
    assert client.disconnecting
    assert w.reactor.tcpClients == []
    lost(proto)
    [line] = w.lines()
    assert (line["cause"], line["backend"], line["attempts"]) == ("no-backend", None, 0)
    assert w.metrics.counter("connections_closed", "no-backend") == 1
    assert w.factory.openConnections == 0
    w.assert_accounted()


def test_connection_cap(world_factory):
    """
    A factory given straight to a port admits its own clients: beyond
    max_connections a client is aborted at once, with no routing and no
    connect, counted as rejected (no connection line: it never became a
    session); the admitted ones are unaffected and a slot frees when one
    leaves.
    """
    w = world_factory(max_connections=2)
    p1, _ = w.accept()
    p2, _ = w.accept()
    p3, t3 = w.accept()
    assert t3.disconnected
    assert len(w.reactor.tcpClients) == 2
    assert w.factory.openConnections == 2
    assert w.factory.admission.open == 2
    assert w.metrics.counter("connections_rejected", "limit") == 1
    assert w.metrics.counter("connections_accepted") == 2
    lost(p3, ConnectionLost())
    assert w.logs.causes() == []
    assert w.factory.admission.open == 2
    lost(p1, ConnectionLost())
    assert w.factory.openConnections == 1
    assert w.factory.admission.open == 1
    p4, t4 = w.accept()
    assert not t4.disconnected
    assert w.factory.openConnections == 2
    lost(p2, ConnectionLost())
    lost(p4, ConnectionLost())
    assert w.factory.admission.open == 0
    w.assert_accounted()


def test_connection_cap_shared_across_factories(world_factory):
    """
    Factories given one admission share one cap: with max_connections=2,
    a third client on a second listener (another factory) is refused at
    once, and admitted once a slot frees up.
    """
    w = world_factory(max_connections=2)
    other = ProxyFactory(
        w.router,
        w.reactor,
        w.settings,
        w.metrics,
        app="app",
        connections=w.factory.connections,
        admission=w.factory.admission,
    )
    p1, _ = w.accept()
    p2, _ = w.accept()
    proto = other.buildProtocol(CLIENT)
    t3 = FakeTCPTransport(hostAddress=LOCAL, peerAddress=CLIENT)
    proto.makeConnection(t3)
    assert t3.disconnected
    assert w.metrics.counter("connections_rejected", "limit") == 1
    lost(proto, ConnectionLost())
    lost(p1, ConnectionLost())
    proto = other.buildProtocol(CLIENT)
    t4 = FakeTCPTransport(hostAddress=LOCAL, peerAddress=CLIENT)
    proto.makeConnection(t4)
    assert not t4.disconnected
    assert other.openConnections == w.factory.openConnections == 2
    lost(p2, ConnectionLost())
    lost(proto, ConnectionLost())
    w.assert_accounted()


def test_admitted_upstream_takes_no_second_slot(world_factory):
    """
    A session built behind socket-level admission (C{admitsPeers=False},
    as L{edgeproxy.service} builds its factories) takes no slot of its
    own: the cap is counted once, by whoever accepted the socket.
    """
    w = world_factory(max_connections=1)
    inner = ProxyFactory(w.router, w.reactor, w.settings, w.metrics, app="app", admitsPeers=False)
    protocols = []
    for _ in range(3):
        proto = inner.buildProtocol(CLIENT)
        transport = FakeTCPTransport(hostAddress=LOCAL, peerAddress=CLIENT)
        proto.makeConnection(transport)
        assert not transport.disconnected
        protocols.append(proto)
    assert inner.admission.open == 0
    assert inner.openConnections == 3
    for proto in protocols:
        lost(proto, ConnectionLost())
    w.assert_accounted()


def test_one_idle_sweep_for_factories_sharing_a_table(world_factory):
    """
    Two factories sharing a ConnectionTable run a single idle sweep (one
    pending call for both connections), close each idle connection 1 to
    1.25 idle periods after its last byte, and leave no call behind.
    """
    w = world_factory(idle_timeout=4.0)
    other = ProxyFactory(
        w.router, w.reactor, w.settings, w.metrics, app="app", connections=w.factory.connections
    )
    p1, c1 = w.accept()
    s1, _ = w.connected()
    step(w, 0.5)
    p2 = other.buildProtocol(CLIENT)
    c2 = FakeTCPTransport(hostAddress=LOCAL, peerAddress=CLIENT)
    p2.makeConnection(c2)
    s2, _ = w.connected()
    assert len(w.reactor.getDelayedCalls()) == 1
    step(w, 4.0)  # t = 4.5: sweeps at 1 (busy: just joined), 2, 3, 4
    assert not c1.disconnected and not c2.disconnected
    step(w, 0.5)  # t = 5: fourth quiet sweep for both
    assert c1.disconnected and c2.disconnected
    lost(p1, ConnectionLost())
    lost(p2, ConnectionLost())
    lost(s1, ConnectionLost())
    lost(s2, ConnectionLost())
    assert w.logs.causes() == ["idle-timeout", "idle-timeout"]
    assert not w.factory.connections.sweeping
    assert w.reactor.getDelayedCalls() == []


def test_connections_must_be_a_table(world_factory):
    """
    A plain set is refused as C{connections} with a reason: the idle sweep
    lives on the shared L{ConnectionTable}.
    """
    w = world_factory()
    with pytest.raises(TypeError, match="ConnectionTable"):
        ProxyFactory(w.router, w.reactor, w.settings, w.metrics, connections=set())  # type: ignore[arg-type]
    assert isinstance(w.factory.connections, ConnectionTable)


def test_client_gone_while_connecting(world_factory):
    """
    A client that leaves while the backend connect is in flight stops the
    connect and releases the backend once, even when the stopped connector
    then reports a failure; a late connection is aborted.
    """
    w = world_factory()
    proto, _ = w.accept()
    attempt = w.attempt()
    lost(proto, ConnectionLost())
    assert w.reactor.connectors[-1].stoppedConnecting
    assert w.router.count("release", "a") == 1
    w.fail(UserError(), attempt)  # what stopConnecting reports
    side, server = w.connected(attempt)  # a connect that raced the cancel
    assert server.disconnected
    lost(side, ConnectionLost())
    assert len(w.reactor.tcpClients) == 1
    assert [c for c in w.router.calls if c[0] == "connectFailed"] == []
    [line] = w.lines()
    assert (line["cause"], line["attempts"]) == ("client-error", 1)
    w.assert_accounted()


def test_connectTCP_raising_is_a_failed_attempt(world_factory):
    """
    A connectTCP that raises counts as a failed attempt and fails over.
    """
    w = world_factory([A, B])
    real = w.reactor.connectTCP
    calls = []

    def flaky(host, port, factory, timeout=30, bindAddress=None):
        calls.append(host)
        if len(calls) == 1:
            raise OSError("no route")
        return real(host, port, factory, timeout, bindAddress)

    w.reactor.connectTCP = flaky
    proto, _ = w.accept()
    side, _ = w.connected()
    assert calls == ["10.0.0.1", "10.0.0.2"]
    assert proto.backend == B
    lost(proto, ConnectionLost())
    lost(side, ConnectionLost())
    w.assert_accounted()


def test_backend_closes_first(world_factory):
    """
    A backend that drops the connection (here: a reset) makes the proxy
    close the client gracefully, so what was already relayed still
    arrives; there is no new connect attempt once bytes flowed.
    """
    w = world_factory()
    proto, client = w.accept()
    side, _ = w.connected()
    proto.dataReceived(b"req")
    side.dataReceived(b"partial")
    lost(side, ConnectionLost())
    assert client.value() == b"partial"
    assert client.disconnecting and not client.disconnected
    assert client.producer is None
    assert len(w.reactor.tcpClients) == 1
    lost(proto)
    [line] = w.lines()
    assert line["cause"] == "backend-error"
    assert (line["bytes_to_backend"], line["bytes_to_client"]) == (3, 7)
    w.assert_accounted()
    assert w.reactor.getDelayedCalls() == []


def test_client_closes_first(world_factory):
    """
    A client that goes away makes the proxy close the backend and log
    client-closed (clean) once both legs are gone.
    """
    w = world_factory()
    proto, _ = w.accept()
    side, server = w.connected()
    lost(proto)
    assert server.disconnecting
    assert w.lines() == []
    lost(side)
    [line] = w.lines()
    assert line["cause"] == "client-closed"
    assert line["client"] == "203.0.113.5" and line["client_port"] == 40000
    w.assert_accounted()
    assert w.reactor.getDelayedCalls() == []


def test_keepalive_and_nodelay(world_factory):
    """
    Keepalive is turned on on both legs when configured, TCP_NODELAY
    always.
    """
    w = world_factory(keepalive=True)
    _, client = w.accept()
    _, server = w.connected()
    assert (client.keepalive, client.nodelay, server.keepalive, server.nodelay) == (
        True,
        True,
        True,
        True,
    )
    w2 = world_factory(keepalive=False)
    _, client2 = w2.accept()
    _, server2 = w2.connected()
    assert (client2.keepalive, server2.keepalive) == (None, None)
    assert (client2.nodelay, server2.nodelay) == (True, True)


def test_plain_transport_without_tcp_methods(world_factory):
    """
    A client transport without the TCP extras (a wrapper) still works: no
    keepalive call, and a half-close falls back to a graceful close.
    """
    w = world_factory()
    _, client = w.accept(transport_class=StringTransport)
    side, _ = w.connected()
    side.dataReceived(b"data")
    side.readConnectionLost()
    assert client.value() == b"data"
    assert client.disconnecting


def test_idle_timer_samples_counters(world_factory):
    """
    The idle timer samples the byte counters every idle/4 seconds and
    closes after four samples in a row without a byte: between 1 and 1.25
    idle periods after the last byte.  No timer is rescheduled per chunk.
    """
    w = world_factory(idle_timeout=8.0)
    proto, client = w.accept()
    side, server = w.connected()
    assert len(w.reactor.getDelayedCalls()) == 1
    step(w, 5.0)
    for _ in range(100):
        proto.dataReceived(b"x")
        side.dataReceived(b"y")
    assert len(w.reactor.getDelayedCalls()) == 1
    step(w, 8.875)  # t = 13.875: last byte at 5, ticks at 6 (busy), 8, 10, 12
    assert not client.disconnected
    step(w, 0.125)  # t = 14: fourth quiet tick
    assert client.disconnected and server.disconnected
    lost(proto, ConnectionLost())
    lost(side, ConnectionLost())
    [line] = w.lines()
    assert line["cause"] == "idle-timeout"
    assert line["duration"] == pytest.approx(14.0)
    w.assert_accounted()
    assert w.reactor.getDelayedCalls() == []


def test_idle_sweep_survives_a_failing_close(world_factory):
    """
    If closing one idle session raises, the failure is logged and the sweep
    still closes the other idle sessions and keeps running, so the broken
    one is closed on a later sweep: one broken connection never stops idle
    enforcement for the rest.
    """
    w = world_factory(idle_timeout=4.0)
    broken, broken_client = w.accept()
    broken_side, broken_server = w.connected()
    healthy, healthy_client = w.accept()
    healthy_side, healthy_server = w.connected()

    def explode(cause: str) -> None:
        raise RuntimeError("close failed")

    broken._abortBoth = explode  # type: ignore[method-assign]
    step(w, 5.0)
    assert healthy_client.disconnected and healthy_server.disconnected
    assert not broken_client.disconnected
    assert [str(e["log_failure"].value) for e in w.logs.failures()] == ["close failed"]
    assert w.factory.connections.sweeping
    w.logs.events.clear()
    del broken._abortBoth
    step(w, 1.0)
    assert broken_client.disconnected and broken_server.disconnected
    for proto in (healthy, healthy_side, broken, broken_side):
        lost(proto, ConnectionLost())
    assert w.reactor.getDelayedCalls() == []
    w.assert_accounted()


def test_idle_timeout_with_data_queued(world_factory):
    """
    F4: the idle timeout aborts both legs (dropping queued data), not a
    graceful close that would wait for a peer that never reads.
    """
    w = world_factory(idle_timeout=4.0)
    proto, client = w.accept()
    side, server = w.connected()
    proto.dataReceived(b"q" * 100_000)
    step(w, 5.0)
    assert client.disconnected and server.disconnected
    lost(proto, ConnectionLost())
    lost(side, ConnectionLost())
    assert w.logs.causes() == ["idle-timeout"]
    assert w.metrics.counter("connections_closed", "idle-timeout") == 1


def test_half_close_client_first(world_factory):
    """
    A FIN from the client is carried to the backend (after its pending
    bytes), the other direction keeps flowing, and when the backend's FIN
    comes both legs are closed; the cause is client-closed.
    """
    w = world_factory()
    proto, client = w.accept()
    side, server = w.connected()
    proto.dataReceived(b"request")
    proto.readConnectionLost()
    assert server.write_closed and not server.disconnecting
    assert server.producer is None
    side.dataReceived(b"response")
    assert client.value() == b"response"
    assert not client.disconnecting
    side.readConnectionLost()
    assert client.disconnecting and server.disconnecting
    lost(proto)
    lost(side)
    [line] = w.lines()
    assert line["cause"] == "client-closed"
    w.assert_accounted()
    assert w.reactor.getDelayedCalls() == []


def test_half_close_backend_first(world_factory):
    """
    A FIN from the backend is carried to the client, the client can still
    send, and the client's FIN then closes both; the cause is
    backend-closed.
    """
    w = world_factory()
    proto, client = w.accept()
    side, server = w.connected()
    side.dataReceived(b"banner")
    side.readConnectionLost()
    assert client.write_closed and not client.disconnecting
    assert client.producer is None
    proto.dataReceived(b"late")
    assert server.value() == b"late"
    proto.readConnectionLost()
    assert client.disconnecting and server.disconnecting
    lost(side)
    lost(proto)
    assert w.logs.causes() == ["backend-closed"]
    w.assert_accounted()


def test_half_closed_timeout(world_factory):
    """
    A half-closed connection on which nothing moves any more is aborted
    between 1.25 and 1.5 half_closed_timeout after the last byte (the
    first look only takes the mark): the timeout is inactivity while
    half-closed, not a deadline from the FIN.
    """
    w = world_factory(half_closed_timeout=4.0, idle_timeout=100.0)
    proto, client = w.accept()
    side, server = w.connected()
    w.reactor.advance(1.0)
    proto.readConnectionLost()
    step(w, 3.0)
    side.dataReceived(b"last words")
    step(w, 4.875)
    assert not client.disconnected
    step(w, 1.25)
    assert client.disconnected and server.disconnected
    lost(proto, ConnectionLost())
    lost(side, ConnectionLost())
    [line] = w.lines()
    assert line["cause"] == "half-closed-timeout"
    w.assert_accounted()
    assert w.reactor.getDelayedCalls() == []


def test_half_closed_transfer_that_flows_is_never_cut(world_factory):
    """
    Defect 1 of issue 7: a client that sends its request and half-closes
    while the backend streams the answer for far longer than
    half_closed_timeout is never cut while bytes flow (FAULTS F22), and is
    cut promptly once they stop.
    """
    w = world_factory(half_closed_timeout=2.0, idle_timeout=100.0)
    proto, client = w.accept()
    side, server = w.connected()
    proto.dataReceived(b"GET /big\r\n")
    proto.readConnectionLost()
    assert server.write_closed
    for _ in range(60):  # a chunk every second for a minute
        step(w, 1.0)
        side.dataReceived(b"x" * 1000)
        assert not client.disconnected
    step(w, 2.5)
    assert client.disconnected
    lost(proto, ConnectionLost())
    lost(side, ConnectionLost())
    [line] = w.lines()
    assert line["cause"] == "half-closed-timeout"
    assert line["bytes_to_client"] == 60_000
    w.assert_accounted()


def test_client_fin_while_connecting(world_factory):
    """
    A FIN reported while connecting (only a wrapper can) is carried to the
    backend after the buffered bytes.
    """
    w = world_factory()
    proto, _ = w.accept()
    proto.dataReceived(b"all of it")
    proto.readConnectionLost()
    _, server = w.connected()
    assert server.value() == b"all of it"
    assert server.write_closed


def test_one_log_line_fields(world_factory):
    """
    The end-of-connection line is a lazy format string with named fields
    (client, backend, bytes each way, duration, attempts, cause), emitted
    exactly once even if legs report twice.
    """
    w = world_factory()
    proto, _ = w.accept()
    w.reactor.advance(0.5)
    side, _ = w.connected()
    proto.dataReceived(b"abc")
    side.dataReceived(b"defgh")
    w.reactor.advance(1.5)
    lost(proto)
    lost(side)
    proto._maybeFinish()
    [line] = w.lines()
    assert "{" in line["log_format"]
    assert {
        "client": "203.0.113.5",
        "client_port": 40000,
        "backend": "a",
        "bytes_to_backend": 3,
        "bytes_to_client": 5,
        "attempts": 1,
        "cause": "client-closed",
    }.items() <= line.items()
    assert line["duration"] == pytest.approx(2.0)
    assert line["cause"] in CAUSES
    assert w.metrics.counter("connections_closed", "client-closed") == 1


@pytest.mark.parametrize(
    "path",
    ["refused", "cancelled", "backend-closed", "client-closed", "idle", "half-timeout"],
)
def test_release_exactly_once(world_factory, path):
    """
    Whatever way a connection ends, every backend the router chose is
    released exactly once and no load count is left behind.
    """
    w = world_factory([A, B], idle_timeout=4.0, half_closed_timeout=2.0, max_attempts=2)
    proto, _ = w.accept()
    if path == "refused":
        w.fail()
        w.fail()
        lost(proto)
    elif path == "cancelled":
        attempt = w.attempt()
        lost(proto, ConnectionLost())
        w.fail(UserError(), attempt)
    else:
        side, _ = w.connected()
        if path == "backend-closed":
            lost(side)
            lost(proto)
        elif path == "client-closed":
            lost(proto)
            lost(side)
        elif path == "idle":
            step(w, 10.0)
            lost(side, ConnectionLost())
            lost(proto, ConnectionLost())
        else:
            side.readConnectionLost()
            w.reactor.advance(2.0)
            lost(side, ConnectionLost())
            lost(proto, ConnectionLost())
    assert len(w.lines()) == 1
    w.assert_accounted()
    assert w.factory.openConnections == 0
    assert w.reactor.getDelayedCalls() == []


# -- eager writes -------------------------------------------------------------


class _FakeSocket:
    """
    Records C{send} calls; accepts up to C{accept} bytes each, or raises.
    """

    def __init__(self, accept: int | None = None, error: OSError | None = None) -> None:
        self.accept = accept
        self.error = error
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> int:
        if self.error is not None:
            raise self.error
        n = len(data) if self.accept is None else min(self.accept, len(data))
        self.sent.append(data[:n])
        return n


class _FakeTCPBuffers:
    """
    The buffering attributes of a Twisted TCP transport, and a C{write}
    that records what it is given.
    """

    def __init__(self) -> None:
        self.dataBuffer = b""
        self.offset = 0
        self._tempDataBuffer: list[bytes] = []
        self._tempDataLen = 0
        self.connected = True
        self.disconnecting = False
        self._writeDisconnecting = False
        self._writeDisconnected = False
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)


def test_relay_sends_at_once_when_nothing_is_queued():
    """
    With nothing queued on the target transport, the relay hands the
    bytes straight to the socket and the transport's write is not used.
    """
    from edgeproxy.net.proxy import _sendNow

    out, sock = _FakeTCPBuffers(), _FakeSocket()
    rest = _sendNow(out, sock, b"hello")  # type: ignore[arg-type]
    assert sock.sent == [b"hello"]
    assert rest is None


def test_relay_queues_the_remainder_of_a_partial_send():
    """
    A partial send leaves exactly the unsent tail for transport.write, so
    the bytes stay in order and Twisted's buffer (and backpressure) sees it.
    """
    from edgeproxy.net.proxy import _sendNow

    out, sock = _FakeTCPBuffers(), _FakeSocket(accept=3)
    rest = _sendNow(out, sock, b"abcdefgh")  # type: ignore[arg-type]
    assert sock.sent == [b"abc"]
    assert rest == b"defgh"


@pytest.mark.parametrize(
    "error",
    [
        BlockingIOError(11, "EAGAIN"),
        ConnectionResetError(104, "reset"),
        BrokenPipeError(32, "pipe"),
    ],
)
def test_relay_write_all_on_socket_error(error):
    """
    EAGAIN or any other socket error on the eager send leaves all of the
    bytes for transport.write, which queues them (EAGAIN) or lets Twisted's
    doWrite meet and report the error.
    """
    from edgeproxy.net.proxy import _sendNow

    out, sock = _FakeTCPBuffers(), _FakeSocket(error=error)
    assert _sendNow(out, sock, b"abc") == b"abc"  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "state",
    [
        {"_tempDataLen": 1, "_tempDataBuffer": [b"x"]},
        {"dataBuffer": b"xyz", "offset": 1},
        {"connected": False},
        {"disconnecting": True},
        {"_writeDisconnecting": True},
        {"_writeDisconnected": True},
    ],
)
def test_relay_queues_behind_buffered_bytes_and_when_closing(state):
    """
    Bytes already queued on the transport (or a transport that is closing)
    leave the bytes for transport.write, never the socket: nothing overtakes
    queued bytes and a closing transport keeps Twisted's semantics.
    """
    from edgeproxy.net.proxy import _sendNow

    out, sock = _FakeTCPBuffers(), _FakeSocket()
    for k, v in state.items():
        setattr(out, k, v)
    rest = _sendNow(out, sock, b"abc")  # type: ignore[arg-type]
    assert sock.sent == []
    assert rest == b"abc"


def test_no_eager_writes_on_non_tcp_transports(world_factory):
    """
    Legs that are not plain Twisted TCP transports (fakes here; TLS or
    PROXY-header wrappers in production) keep transport.write and their
    read size.
    """
    from edgeproxy.net.proxy import _eagerSocket

    w = world_factory()
    proto, client = w.accept()
    side, server = w.connected()
    assert _eagerSocket(client) is None and _eagerSocket(server) is None
    assert proto._outSocket is None and side.outSocket is None
    proto.dataReceived(b"up")
    side.dataReceived(b"down")
    assert server.value().endswith(b"up") and client.value() == b"down"


def _resolving_world(world_factory, table):
    from edgeproxy.testing import StaticHostResolver

    w = world_factory(
        [
            backend("named", host="backend.example", port=7100, country="BR", region="sa"),
            backend("other", host="10.0.0.2", port=7200, country="AR", region="sa"),
        ]
    )
    w.factory.resolver = StaticHostResolver(table)
    return w


def test_hostname_backend_connects_to_its_cached_address(world_factory):
    """
    Defect 10 of issue 7: a backend named by host name is connected to at
    the address the resolver holds for it (an IPv6 one here, which
    Twisted's own per-connection lookup could never give), with no DNS on
    the connect path.
    """
    w = _resolving_world(world_factory, {"backend.example": ["2001:db8::7", "192.0.2.7"]})
    proto, _ = w.accept()
    host, port = w.reactor.tcpClients[-1][:2]
    assert (host, port) == ("2001:db8::7", 7100)
    lost(proto, ConnectionLost())
    w.assert_accounted()


def test_unresolved_hostname_fails_over_at_once(world_factory):
    """
    A backend whose name has no address yet is skipped at once: the client
    goes to the next best backend without waiting on a lookup; it is
    counted as unresolved, not as a failure of the backend (no breaker
    count, no binding cleared: the name is just not resolved yet).
    """
    w = _resolving_world(world_factory, {})
    proto, _ = w.accept()
    assert [c[0] for c in w.reactor.tcpClients] == ["10.0.0.2"]
    assert w.metrics.counter("connect_unresolved", "named") == 1
    assert w.metrics.counter("backend_connect_failures", "named") == 0
    assert not any(c[0] == "connectFailed" for c in w.router.calls)
    assert w.router.count("release", "named") == 1
    side, server = w.connected()
    proto.dataReceived(b"x")
    assert server.value() == b"x"
    lost(proto, ConnectionLost())
    lost(side, ConnectionLost())
    w.assert_accounted()
