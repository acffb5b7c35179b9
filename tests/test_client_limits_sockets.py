"""
Per-client limits at the admission point, on real sockets (issue 8 item 3,
FAULTS F19): on a C{haproxy:} listener the limits apply to the real client
from the PROXY header, one client over its limit is refused before any
backend connect while another is served.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest
import pytest_twisted
from faultkit import Echo, listen, wait_until
from twisted.internet import reactor, threads

from edgeproxy.config import ProxySettings
from edgeproxy.metrics import MetricsStore
from edgeproxy.net.admission import Admission
from edgeproxy.net.endpoints import server_endpoint
from edgeproxy.net.limits import ClientLimiter
from edgeproxy.net.proxy import ProxyFactory
from edgeproxy.routing.router import Router
from edgeproxy.testing import BindingTable, InMemoryBackendRepository, backend

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]


def _setup(limiter: ClientLimiter, metrics: MetricsStore) -> tuple[Any, ProxyFactory, Any]:
    echo = listen(reactor, Echo)
    admission = Admission(1000, metrics, limiter)
    router = Router(
        InMemoryBackendRepository([backend("echo", port=echo.port)]),
        BindingTable(),
        None,
        metrics,
        "sa",
        reactor,
    )
    factory = ProxyFactory(
        router,
        reactor,
        ProxySettings(connect_timeout=1.0),
        metrics,
        app="app",
        admission=admission,
        admitsPeers=False,
    )
    endpoint = server_endpoint(
        reactor, "haproxy:tcp:0:interface=127.0.0.1", metrics=metrics, admission=admission
    )
    return echo, factory, endpoint


def _client(port: int, source: str, keep: list[socket.socket]) -> bool:
    """
    In a thread: connect as C{source} (a PROXY v1 header), send a byte and
    report whether it came back echoed (admitted) or the connection was
    closed (refused).  Admitted sockets are kept open in C{keep}.
    """
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"PROXY TCP4 %s 127.0.0.1 40000 %d\r\nx" % (source.encode(), port))
    try:
        data = s.recv(1)
    except OSError:
        data = b""
    if data == b"x":
        keep.append(s)
        return True
    s.close()
    return False


@pytest_twisted.inlineCallbacks
def test_concurrent_limit_for_one_client_while_another_is_served():
    """
    With --client-max-connections 2, a third connection from one client
    (as the PROXY header says) is refused before any backend connect,
    counted; another client is served meanwhile; once the first client
    closes one, it may open one again.
    """
    metrics = MetricsStore()
    limiter = ClientLimiter(2, clock=reactor, metrics=metrics)
    echo, factory, endpoint = _setup(limiter, metrics)
    port = yield endpoint.listen(factory)
    number = port.getHost().port
    keep: list[socket.socket] = []
    try:
        results = []
        for _ in range(3):
            ok = yield threads.deferToThread(_client, number, "198.51.100.1", keep)
            results.append(ok)
        assert results == [True, True, False]
        assert len(echo.protocols) == 2
        other = yield threads.deferToThread(_client, number, "198.51.100.2", keep)
        assert other
        assert metrics.counter("client_limit_rejected", "concurrency") == 1
        keep.pop(0).close()
        yield wait_until(reactor, lambda: limiter.connections("198.51.100.1") == 1)
        again = yield threads.deferToThread(_client, number, "198.51.100.1", keep)
        assert again
    finally:
        for s in keep:
            s.close()
        yield wait_until(reactor, lambda: not factory.connections)
        yield port.stopListening()
        yield echo.stop()


@pytest_twisted.inlineCallbacks
def test_rate_limited_flood_does_not_stop_another_client():
    """
    F19: one client opening connections as fast as it can with
    --client-rate 5 --client-burst 5 gets about its burst admitted and the
    rest refused, while another client interleaved with it is admitted
    every time.
    """
    metrics = MetricsStore()
    limiter = ClientLimiter(0, 5.0, 5.0, clock=reactor, metrics=metrics)
    echo, factory, endpoint = _setup(limiter, metrics)
    port = yield endpoint.listen(factory)
    number = port.getHost().port
    keep: list[socket.socket] = []
    try:
        flood, other = [], []
        for _ in range(40):
            flood.append((yield threads.deferToThread(_client, number, "203.0.113.9", keep)))
            if len(flood) % 8 == 0:
                other.append((yield threads.deferToThread(_client, number, "192.0.2.44", keep)))
        admitted = sum(flood)
        # The burst, plus what refilled while the test ran (5 per second).
        assert 5 <= admitted <= 5 + 5 * 10
        assert admitted < len(flood)
        assert all(other)
        assert metrics.counter("client_limit_rejected", "rate") == len(flood) - admitted
    finally:
        for s in keep:
            s.close()
        yield wait_until(reactor, lambda: not factory.connections)
        yield port.stopListening()
        yield echo.stop()


@pytest_twisted.inlineCallbacks
def test_limits_hold_before_the_handshake_without_a_proxy_header(tmp_path):
    """
    On a TLS listener without a PROXY header the socket peer is the client:
    its concurrent limit holds at accept, so a third silent connection from
    it is closed before any handshake work (F19/F21), and it is admitted
    again once one of the first two goes.
    """
    from test_admission import _certdir, _closed_by_peer

    metrics = MetricsStore()
    limiter = ClientLimiter(2, clock=reactor, metrics=metrics)
    admission = Admission(1000, metrics, limiter)
    router = Router(InMemoryBackendRepository([]), BindingTable(), None, metrics, "sa", reactor)
    factory = ProxyFactory(
        router,
        reactor,
        ProxySettings(),
        metrics,
        admission=admission,
        admitsPeers=False,
    )
    factory.clientsAdmittedAtAccept = True
    endpoint = server_endpoint(
        reactor,
        f"txsni:{_certdir(tmp_path)}:tcp:0:interface=127.0.0.1",
        metrics=metrics,
        admission=admission,
        tls_handshake_timeout=60.0,
    )
    port = yield endpoint.listen(factory)
    address = port.getHost()
    sockets = []
    try:
        for _ in range(3):
            s = socket.create_connection((address.host, address.port))
            sockets.append(s)
        yield wait_until(
            reactor, lambda: metrics.counter("client_limit_rejected", "concurrency") == 1
        )
        yield wait_until(reactor, lambda: _closed_by_peer(sockets[2]))
        assert not _closed_by_peer(sockets[0]) and not _closed_by_peer(sockets[1])
        assert admission.open == 2 and limiter.connections("127.0.0.1") == 2
        sockets.pop(0).close()
        yield wait_until(reactor, lambda: limiter.connections("127.0.0.1") == 1)
        sockets.append(socket.create_connection((address.host, address.port)))
        yield wait_until(reactor, lambda: limiter.connections("127.0.0.1") == 2)
        assert metrics.counter("client_limit_rejected", "concurrency") == 1
    finally:
        for s in sockets:
            s.close()
        yield wait_until(reactor, lambda: admission.open == 0)
        yield port.stopListening()
