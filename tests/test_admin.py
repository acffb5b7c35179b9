"""
Tests for the admin HTTP listener (L{edgeproxy.control.admin}) on real
loopback sockets: the pages and their JSON errors, the request deadline
that cuts a slowloris, the connection cap, and a burst of requests (FAULTS
F24).
"""

from __future__ import annotations

import json
from typing import Any, cast

import pytest
import pytest_twisted
from faultkit import Client, connect, wait_until
from prometheus_client.parser import text_string_to_metric_families
from treq.client import HTTPClient
from twisted.internet import reactor, task
from twisted.internet.defer import DeferredSemaphore, gatherResults, inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Protocol
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from edgeproxy.control.admin import (
    ADMIN_REJECTED,
    DEFAULT_ADMIN,
    AdminRoot,
    AdminSite,
    HealthResource,
    JSONResource,
    admin_endpoint,
    admin_site,
    json_body,
)
from edgeproxy.control.metrics import EdgeproxyCollector, Exposition
from edgeproxy.metrics import MetricsStore
from edgeproxy.testing import InMemoryBackendRepository, LoadTable, backend


class Running:
    """
    An admin site listening on 127.0.0.1, with an HTTP client of its own.
    """

    def __init__(self, site: AdminSite) -> None:
        self.site = site
        self.listening: Any = cast(Any, reactor).listenTCP(0, site, interface="127.0.0.1")
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 16
        self.pool.retryAutomatically = False
        self.http = HTTPClient(Agent(reactor, pool=self.pool))

    @property
    def port(self) -> int:
        return int(self.listening.getHost().port)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @inlineCallbacks
    def stop(self) -> Any:
        yield self.pool.closeCachedConnections()
        yield self.listening.stopListening()


def _site(**kw: Any) -> tuple[AdminSite, MetricsStore, Exposition]:
    metrics = MetricsStore()
    repository = InMemoryBackendRepository([backend("gru-1"), backend("cdg-1")])
    load = LoadTable(metrics)
    load.acquire(backend("gru-1"))
    exposition = Exposition(
        EdgeproxyCollector(metrics, repository=repository, load=load),
        reactor=reactor,
        maxAge=kw.pop("maxAge", 0.0),
    )
    site = admin_site(
        exposition,
        reactor=reactor,
        metrics=metrics,
        health=kw.pop("health", lambda: {"backends": len(repository.current())}),
        **kw,
    )
    return site, metrics, exposition


@pytest_twisted.inlineCallbacks
def test_pages_and_json_errors():
    """
    C{/metrics} is 200 in the Prometheus text format (C{version=0.0.4}) and
    parses with C{prometheus_client}'s parser; C{HEAD /metrics} has the
    headers and no body; C{/health} is 200 JSON with C{status: ok} and the
    details; C{/} lists the paths; an unknown path (also below a page) is a
    JSON 404 and a method a page does not serve a JSON 405 with C{Allow}.
    """
    site, metrics, _ = _site()
    metrics.increment("connections_accepted", amount=5)
    running = Running(site)
    try:
        r = yield running.http.get(running.url("/metrics"))
        body = yield r.content()
        assert r.code == 200
        assert r.headers.getRawHeaders("content-type") == [
            "text/plain; version=0.0.4; charset=utf-8"
        ]
        families = {f.name: f for f in text_string_to_metric_families(body.decode())}
        assert families["edgeproxy_connections_accepted"].samples[0].value == 5
        gauge = families["edgeproxy_backend_connections"]
        assert {s.labels["backend"]: s.value for s in gauge.samples} == {"gru-1": 1, "cdg-1": 0}

        r = yield running.http.head(running.url("/metrics"))
        assert r.code == 200
        assert (yield r.content()) == b""
        assert r.headers.getRawHeaders("content-type")[0].startswith("text/plain")

        r = yield running.http.get(running.url("/health"))
        assert r.code == 200
        assert r.headers.getRawHeaders("content-type") == ["application/json"]
        health = json.loads((yield r.content()))
        assert health["status"] == "ok" and health["backends"] == 2 and "version" in health

        r = yield running.http.get(running.url("/"))
        assert r.code == 200
        assert json.loads((yield r.content()))["paths"] == ["/health", "/metrics"]

        for path in ("/nope", "/metrics/extra", "/health/x/y"):
            r = yield running.http.get(running.url(path))
            assert r.code == 404, path
            assert r.headers.getRawHeaders("content-type") == ["application/json"]
            assert json.loads((yield r.content())) == {"error": "not found", "status": 404}

        r = yield running.http.post(running.url("/metrics"), data=b"x")
        assert r.code == 405
        assert r.headers.getRawHeaders("allow") == ["GET, HEAD"]
        assert json.loads((yield r.content()))["status"] == 405
        r = yield running.http.request("DELETE", running.url("/health"))
        assert r.code == 405
        assert json.loads((yield r.content()))["error"] == "method not allowed"
    finally:
        yield running.stop()


@pytest_twisted.inlineCallbacks
def test_openmetrics_on_request():
    """
    A scraper that asks for OpenMetrics in C{Accept} gets it (with its
    C{# EOF} terminator).
    """
    site, _, _ = _site()
    running = Running(site)
    try:
        r = yield running.http.get(
            running.url("/metrics"),
            headers=Headers({b"Accept": [b"application/openmetrics-text; version=1.0.0"]}),
        )
        body = yield r.content()
        assert r.code == 200
        # (version=1.0.0 with a recent prometheus_client, 0.0.1 with older ones)
        assert r.headers.getRawHeaders("content-type")[0].startswith(
            "application/openmetrics-text; version="
        )
        assert body.endswith(b"# EOF\n")
    finally:
        yield running.stop()


@pytest_twisted.inlineCallbacks
def test_health_details_failure_is_json_500():
    """
    If the health details raise, C{/health} answers a JSON 500 with
    C{status: error} (and the failure is logged), and the site keeps
    serving.
    """

    def broken() -> dict[str, Any]:
        raise RuntimeError("no details")

    site, _, _ = _site(health=broken)
    running = Running(site)
    try:
        r = yield running.http.get(running.url("/health"))
        assert r.code == 500
        assert json.loads((yield r.content()))["status"] == "error"
        r = yield running.http.get(running.url("/metrics"))
        assert r.code == 200
        yield r.content()
    finally:
        yield running.stop()


@pytest_twisted.inlineCallbacks
def test_children_can_be_added():
    """
    The integrator adds pages with C{putChild} on the root; a
    L{JSONResource} child gets the same JSON 404 and 405, and the root's
    listing shows it.
    """

    class Api(JSONResource):
        def render_GET(self, request: Any) -> bytes:
            return json_body(request, 200, {"backends": []})

    site, _, _ = _site()
    root = site.resource
    assert isinstance(root, AdminRoot)
    root.putChild(b"api", Api())
    running = Running(site)
    try:
        r = yield running.http.get(running.url("/api"))
        assert r.code == 200 and json.loads((yield r.content())) == {"backends": []}
        r = yield running.http.put(running.url("/api"), data=b"{}")
        assert r.code == 405
        yield r.content()
        r = yield running.http.get(running.url("/api/nope"))
        assert r.code == 404
        yield r.content()
        r = yield running.http.get(running.url("/"))
        assert json.loads((yield r.content()))["paths"] == ["/api", "/health", "/metrics"]
    finally:
        yield running.stop()


class _Trickle(Protocol):
    """
    A slowloris: sends its request one byte per C{interval} seconds.
    """

    def __init__(self, request: bytes, interval: float) -> None:
        self.request = request
        self.interval = interval
        self.sent = 0
        self.received = b""
        self.lost = False
        self._loop = task.LoopingCall(self._tick)

    def connectionMade(self) -> None:
        self._loop.start(self.interval)

    def _tick(self) -> None:
        if self.sent < len(self.request):
            assert self.transport is not None
            self.transport.write(self.request[self.sent : self.sent + 1])
            self.sent += 1

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True
        if self._loop.running:
            self._loop.stop()


@pytest_twisted.inlineCallbacks
def test_slowloris_is_cut_by_the_request_deadline():
    """
    A client that sends its request headers one byte at a time, steadily
    (so Twisted's idle timeout never fires), is disconnected once the
    request deadline passes, long before its request is complete; the site
    keeps serving others meanwhile and gives the slot back.
    """
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    site, _, _ = _site(requestTimeout=1.0, idleTimeout=60.0)
    running = Running(site)
    request = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 400 + b"\r\n\r\n"
    slow = _Trickle(request, 0.05)
    try:
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", running.port), slow)
        r = yield running.http.get(running.url("/health"))
        assert r.code == 200
        yield r.content()
        yield wait_until(reactor, lambda: slow.lost, timeout=15.0)
        assert slow.sent < len(request)
        assert b"200 OK" not in slow.received
        yield running.pool.closeCachedConnections()
        yield wait_until(reactor, lambda: site.openConnections == 0, timeout=5.0)
    finally:
        if slow.transport is not None and not slow.lost:
            cast(Any, slow.transport).abortConnection()
        yield running.stop()


@pytest_twisted.inlineCallbacks
def test_idle_keepalive_closed_and_pipelining_served():
    """
    Two pipelined requests on one connection are both answered, and the
    connection, idle afterwards, is closed by the server once the request
    deadline passes.
    """
    site, _, _ = _site(requestTimeout=1.0, idleTimeout=60.0)
    running = Running(site)
    client = Client(reactor)
    try:
        yield connect(reactor, running.port, client)
        client.send(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
        yield wait_until(reactor, lambda: bytes(client.received).count(b"HTTP/1.1 ") == 2)
        assert b"HTTP/1.1 200 OK" in client.received
        assert b"HTTP/1.1 404 Not Found" in client.received
        yield wait_until(reactor, lambda: client.lost is not None, timeout=15.0)
    finally:
        client.close()
        yield running.stop()


@pytest_twisted.inlineCallbacks
def test_connection_cap():
    """
    With C{maxConnections} connections open, one more is closed at once
    and counted as C{admin_connections_rejected}; once one of them closes,
    a new connection is served again.
    """
    site, metrics, _ = _site(maxConnections=3, requestTimeout=60.0)
    running = Running(site)
    holders = [Client(reactor) for _ in range(3)]
    extra = Client(reactor)
    try:
        for holder in holders:
            yield connect(reactor, running.port, holder)
        yield wait_until(reactor, lambda: site.openConnections == 3)
        yield connect(reactor, running.port, extra)
        yield wait_until(reactor, lambda: extra.lost is not None, timeout=10.0)
        assert extra.received == b""
        assert metrics.counter(ADMIN_REJECTED) == 1
        assert site.openConnections == 3
        holders[0].close()
        yield wait_until(reactor, lambda: site.openConnections == 2)
        r = yield running.http.get(running.url("/health"))
        assert r.code == 200
        yield r.content()
    finally:
        for c in [*holders, extra]:
            c.close()
        yield running.stop()


@pytest_twisted.inlineCallbacks
def test_burst_of_requests():
    """
    A burst of 1,000 requests (16 in flight at a time, over kept-alive
    connections) to C{/metrics} and C{/health} is served without an error;
    the scrape cache means far fewer generations than scrapes.
    """
    site, metrics, exposition = _site(maxAge=1.0)
    metrics.increment("connections_accepted", amount=3)
    running = Running(site)
    semaphore = DeferredSemaphore(16)
    codes: list[int] = []

    @inlineCallbacks
    def one(i: int) -> Any:
        path = "/metrics" if i % 2 else "/health"
        r = yield running.http.get(running.url(path))
        body = yield r.content()
        codes.append(r.code)
        if path == "/metrics":
            assert b"edgeproxy_connections_accepted_total 3.0" in body
        else:
            assert json.loads(body)["status"] == "ok"

    try:
        yield gatherResults([semaphore.run(one, i) for i in range(1000)], consumeErrors=True)
        assert len(codes) == 1000 and set(codes) == {200}
        assert exposition.generations < 500
        assert metrics.counter(ADMIN_REJECTED) == 0
    finally:
        yield running.stop()


def test_admin_endpoint():
    """
    C{none} (any case) means no admin listener; the default description is
    a TCP endpoint on loopback port 8090; a malformed description raises.
    """
    assert admin_endpoint(reactor, "none") is None
    assert admin_endpoint(reactor, " NONE ") is None
    endpoint = admin_endpoint(reactor, DEFAULT_ADMIN)
    assert isinstance(endpoint, TCP4ServerEndpoint)
    assert endpoint._interface == "127.0.0.1" and endpoint._port == 8090
    with pytest.raises(ValueError):
        admin_endpoint(reactor, "bogus:thing")


def test_site_settings():
    """
    L{AdminSite} refuses a negative cap, passes its deadline to its
    channels, and keeps no access log by default.
    """
    with pytest.raises(ValueError):
        AdminSite(Resource(), maxConnections=-1)
    site = AdminSite(HealthResource(), reactor=reactor, requestTimeout=3.0)
    channel = site.buildProtocol(None)
    assert channel.requestTimeout == 3.0
    assert site.openConnections == 1
    assert site.accessLog is False


def test_one_source_cannot_take_every_admin_slot():
    """
    F24: one (non-loopback) source holds at most maxPerSource admin
    connections; the next ones from it are closed at once and counted,
    while other sources still get a slot (so a flood cannot starve the
    backends' heartbeats); loopback is not limited.
    """
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport
    from twisted.web.resource import Resource

    from edgeproxy.control.admin import AdminChannel, AdminSite
    from edgeproxy.metrics import MetricsStore

    metrics = MetricsStore()
    site = AdminSite(Resource(), maxConnections=64, maxPerSource=2, metrics=metrics)
    flood = IPv4Address("TCP", "203.0.113.9", 1)
    built = [site.buildProtocol(flood) for _ in range(3)]
    assert [isinstance(p, AdminChannel) for p in built] == [True, True, False]
    assert metrics.counter("admin_connections_rejected", "per-source") == 1
    assert isinstance(site.buildProtocol(IPv4Address("TCP", "198.51.100.1", 2)), AdminChannel)
    local = [site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 3)) for _ in range(5)]
    assert all(isinstance(p, AdminChannel) for p in local)
    # A slot of the flooding source frees when one of its connections ends.
    built[0].makeConnection(StringTransport())
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    built[0].connectionLost(Failure(ConnectionDone()))
    assert isinstance(site.buildProtocol(flood), AdminChannel)
