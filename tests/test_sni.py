"""
Unit tests of SNI passthrough: the C{sni} column (L{edgeproxy.model.parse_sni_names},
L{edgeproxy.stores.sqlite.validate_row}), the routing snapshot's name index,
the C{sni:} listener description, and L{edgeproxy.net.sni} sessions on a
memory reactor with the real router.
"""

from __future__ import annotations

import random
import sqlite3
import ssl
import struct
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import pytest
from faultkit import LogCapture
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.testing import MemoryReactor, MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from edgeproxy.config import ListenerSpec, ProxySettings
from edgeproxy.metrics import MetricsStore
from edgeproxy.model import Backend, RoutingSnapshot, SniConflict, parse_sni_names
from edgeproxy.net.endpoints import server_endpoint
from edgeproxy.net.proxy import BackendConnectFactory
from edgeproxy.net.sni import (
    LOG_INTERVAL,
    REJECTED_COUNTER,
    ROUTED_COUNTER,
    SniClientProtocol,
    SniProxyFactory,
    log_sni_conflicts,
)
from edgeproxy.routing.bindings import BindingTable
from edgeproxy.routing.router import Router
from edgeproxy.stores.sqlite import InvalidRowError, load_backends, schema_sql, validate_row
from edgeproxy.tap import parse_listener
from edgeproxy.testing import InMemoryBackendRepository, backend

CLIENT = IPv4Address("TCP", "203.0.113.5", 40000)
LOCAL = IPv4Address("TCP", "198.51.100.1", 443)


def tls_hello(name: Optional[str]) -> bytes:
    """
    The first flight of a real Python C{ssl} client naming C{name}.
    """
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


# -- the sni column ------------------------------------------------------------


def test_parse_sni_names() -> None:
    """
    Names and wildcards are lower-cased, lose a trailing dot, and repeats
    go; blanks between commas are ignored.
    """
    assert parse_sni_names(" API.example.com., *.Example.Org ,api.example.com,,") == (
        "api.example.com",
        "*.example.org",
    )


@pytest.mark.parametrize(
    "text",
    [
        "",
        " , ",
        "*.com",
        "*",
        "a.*.example.com",
        "**.example.com",
        "bad name.com",
        "192.0.2.1",
        "2001:db8::1",
        "caf\u00e9.fr",
        "a..b",
        "-x.example",
        ",".join(f"n{i}.example" for i in range(101)),
    ],
)
def test_parse_sni_names_refuses(text: str) -> None:
    """
    Empty lists, a wildcard not as a whole first label or over a single
    label, IP addresses, non-ASCII, invalid labels and over 100 names are
    refused with a reason.
    """
    with pytest.raises(ValueError):
        parse_sni_names(text)


def row(**overrides: Any) -> Dict[str, Any]:
    """
    A valid routing table row.
    """
    fields: Dict[str, Any] = {
        "id": "b1",
        "app": "web",
        "region": "eu",
        "country": "FR",
        "wg_ip": "10.0.0.1",
        "port": 443,
        "healthy": 1,
        "weight": 1,
        "soft_limit": 10,
        "hard_limit": 0,
        "deleted": 0,
    }
    fields.update(overrides)
    return fields


def test_validate_row_sni() -> None:
    """
    The C{sni} column is optional (missing or NULL: no names), normalised
    when present, and refused when invalid, not text, or without an app.
    """
    assert validate_row(row()).sni == ()
    assert validate_row(row(sni=None)).sni == ()
    assert validate_row(row(sni="  ")).sni == ()
    assert validate_row(row(sni="WWW.Example.com,*.example.com")).sni == (
        "www.example.com",
        "*.example.com",
    )
    for bad in ("*.com", 12, "1.2.3.4"):
        with pytest.raises(InvalidRowError) as caught:
            validate_row(row(sni=bad))
        assert caught.value.column == "sni"
    with pytest.raises(InvalidRowError) as caught:
        validate_row(row(app=None, sni="a.example"))
    assert caught.value.reason == "sni: server names need an app to route to"


def test_load_skips_bad_sni_rows(tmp_path: Path) -> None:
    """
    In a real SQLite file, a row with a bad C{sni} is skipped with its id
    and the rest loads; a table made before the column existed still
    loads.
    """
    db = tmp_path / "routing.db"
    conn = sqlite3.connect(db)
    conn.executescript(schema_sql())
    conn.executemany(
        "INSERT INTO backends (id, app, region, wg_ip, port, sni) VALUES (?, ?, ?, ?, ?, ?)",
        [
            ("good", "web", "eu", "10.0.0.1", 443, "a.example,*.b.example"),
            ("bad", "web", "eu", "10.0.0.2", 443, "*.com"),
        ],
    )
    conn.commit()
    conn.close()
    backends, skipped = load_backends(str(db), 0.1)
    assert [b.id for b in backends] == ["good"]
    assert backends[0].sni == ("a.example", "*.b.example")
    assert [s[0] for s in skipped] == ["bad"]
    assert skipped[0][1] == ("sni: '*.com': a wildcard needs a domain of two labels or more")

    old = tmp_path / "old.db"
    conn = sqlite3.connect(old)
    conn.executescript(
        "CREATE TABLE backends (id TEXT, app TEXT, region TEXT, wg_ip TEXT, port INTEGER,"
        " healthy INTEGER, weight INTEGER, soft_limit INTEGER, hard_limit INTEGER,"
        " deleted INTEGER);"
        "INSERT INTO backends VALUES ('o', 'web', 'eu', '10.0.0.3', 443, 1, 1, 1, 0, 0);"
    )
    conn.close()
    backends, skipped = load_backends(str(old), 0.1)
    assert [(b.id, b.sni) for b in backends] == [("o", ())] and skipped == []


# -- the name index ------------------------------------------------------------


def test_index_exact_then_wildcard() -> None:
    """
    An exact name wins over the wildcard of its parent; a wildcard matches
    exactly one label more; unhealthy and draining rows keep their names,
    deleted ones do not.
    """
    snapshot = RoutingSnapshot.build(
        [
            backend("w", app="wild", sni=("*.example.com",)),
            backend("e", app="exact", sni=("api.example.com",), healthy=False),
            backend("d", app="drained", sni=("d.example.com",), draining=True),
            backend("x", app="gone", sni=("x.example.com",), deleted=True),
        ]
    )
    assert snapshot.app_for_name("api.example.com") == ("exact", False)
    assert snapshot.app_for_name("www.example.com") == ("wild", True)
    assert snapshot.app_for_name("d.example.com") == ("drained", False)
    assert snapshot.app_for_name("x.example.com") == ("wild", True)
    assert snapshot.app_for_name("example.com") is None
    assert snapshot.app_for_name("a.b.example.com") is None
    assert snapshot.app_for_name("com") is None


_APPS = st.sampled_from(["alpha", "beta", "gamma"])
_CLAIMS = st.lists(
    st.tuples(_APPS, st.sampled_from(["a.test", "b.test", "*.test", "*.x.test"])),
    max_size=12,
)


@given(_CLAIMS, st.randoms(use_true_random=False))
def test_conflicts_are_deterministic(claims: List[Any], rng: random.Random) -> None:
    """
    Whatever the order of the rows, a name claimed by several apps goes to
    the first app by name, and the conflict lists the others.
    """
    rows = [backend(f"r{i}", app=app, sni=(name,)) for i, (app, name) in enumerate(claims)]
    shuffled = list(rows)
    rng.shuffle(shuffled)
    one, two = RoutingSnapshot.build(rows), RoutingSnapshot.build(shuffled)
    assert one.sni_names == two.sni_names and one.sni_wildcards == two.sni_wildcards
    assert one.sni_conflicts == two.sni_conflicts
    for name in {n for _, n in claims}:
        apps = sorted({a for a, n in claims if n == name})
        key = name[2:] if name.startswith("*.") else name
        table = one.sni_wildcards if name.startswith("*.") else one.sni_names
        assert table[key] == apps[0]
        if len(apps) > 1:
            assert SniConflict(name, apps[0], tuple(apps[1:])) in one.sni_conflicts


@given(st.lists(st.from_regex(r"[a-z]{1,5}", fullmatch=True), min_size=1, max_size=4))
def test_wildcard_matches_one_label(labels: List[str]) -> None:
    """
    C{*.example.com} matches a name iff it is exactly one label under
    C{example.com}.
    """
    snapshot = RoutingSnapshot.build([backend("w", app="wild", sni=("*.example.com",))])
    name = ".".join([*labels, "example", "com"])
    expected = ("wild", True) if len(labels) == 1 else None
    assert snapshot.app_for_name(name) == expected


def test_conflicts_logged_once() -> None:
    """
    The conflict listener logs a conflict when it appears, not again on a
    reload that keeps it.
    """
    logs = LogCapture().start()
    try:
        rows = [
            backend("a", app="b-app", sni=("x.test",)),
            backend("b", app="a-app", sni=("x.test",)),
        ]
        first = RoutingSnapshot.build(rows)
        log_sni_conflicts(RoutingSnapshot.empty(), first)
        log_sni_conflicts(first, RoutingSnapshot.build(rows))
        lines = [e for e in logs.events if "claimed by apps" in (e.get("log_format") or "")]
        assert len(lines) == 1
        assert (lines[0]["name"], lines[0]["app"], lines[0]["apps"]) == (
            "x.test",
            "a-app",
            "a-app, b-app",
        )
    finally:
        logs.stop()


# -- the listener description --------------------------------------------------


def test_sni_descriptions() -> None:
    """
    C{sni:} comes first, over a plain or C{haproxy:} endpoint, never over
    C{txsni:} or behind another prefix; C{APP=sni:...} names the default
    app.
    """
    metrics = MetricsStore()
    server_endpoint(MemoryReactor(), "sni:tcp:443", metrics=metrics)
    server_endpoint(MemoryReactor(), "sni:haproxy:tcp:443", metrics=metrics)
    for bad in ("haproxy:sni:tcp:443", "sni:txsni:certs:tcp:443", "sni:sni:tcp:443"):
        with pytest.raises(ValueError):
            server_endpoint(MemoryReactor(), bad, metrics=metrics)
    spec = parse_listener("web=sni:tcp:443")
    assert spec == ListenerSpec("sni:tcp:443", "web") and spec.passthrough
    assert not parse_listener("tcp:443").passthrough


# -- sessions on a memory reactor -----------------------------------------------


class FakeTCP(StringTransport):
    """
    A string transport with the TCP methods the proxy calls, and abort.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.aborted = False

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass

    def setTcpKeepAlive(self, enabled: bool) -> None:
        pass

    def abortConnection(self) -> None:
        self.aborted = True
        self.loseConnection()


class World:
    """
    An L{SniProxyFactory} on a memory reactor with the real router.
    """

    def __init__(
        self, backends: Iterable[Backend], default: Optional[str] = None, timeout: float = 5.0
    ) -> None:
        self.reactor = MemoryReactorClock()
        self.repository = InMemoryBackendRepository(backends)
        self.metrics = MetricsStore()
        self.router = Router(
            self.repository,
            BindingTable(),
            None,
            self.metrics,
            "sa",
            self.reactor,
            random.Random(1),
        )
        self.factory = SniProxyFactory(
            self.router,
            self.reactor,
            ProxySettings(),
            self.metrics,
            app=default,
            repository=self.repository,
            helloTimeout=timeout,
        )

    def accept(self) -> tuple[SniClientProtocol, FakeTCP]:
        proto = self.factory.buildProtocol(CLIENT)
        transport = FakeTCP(hostAddress=LOCAL, peerAddress=CLIENT)
        proto.makeConnection(transport)
        return proto, transport

    def lose(self, proto: SniClientProtocol) -> None:
        """
        The transport reports the close the session asked for.
        """
        proto.connectionLost(Failure(ConnectionDone()))

    def connect(self, index: int = -1) -> tuple[BackendConnectFactory, FakeTCP]:
        attempt = self.reactor.tcpClients[index][2]
        assert isinstance(attempt, BackendConnectFactory)
        side = attempt.buildProtocol(None)
        transport = FakeTCP()
        side.makeConnection(transport)
        return attempt, transport


ROWS = [
    backend("api-1", app="api", sni=("api.example.com",), host="10.0.0.1", port=8443),
    backend("web-1", app="web", sni=("*.example.com", "example.com"), host="10.0.0.2", port=9443),
    backend("web-2", app="web", host="10.0.0.3", port=9444),
]


def test_routes_by_name_and_relays_the_hello_untouched() -> None:
    """
    Bytes fed one at a time: nothing connects until the hello is whole;
    then the app of its name is chosen, the client paused, and the backend
    gets the hello (and what followed it) byte for byte.
    """
    w = World(ROWS)
    proto, transport = w.accept()
    hello = tls_hello("API.example.com")
    data = hello + b"\x17\x03\x03\x00\x01X"
    for i in range(len(hello) - 1):
        proto.dataReceived(data[i : i + 1])
        assert w.reactor.tcpClients == []
    proto.dataReceived(data[len(hello) - 1 :])
    assert transport.producerState == "paused"
    host, port = w.reactor.tcpClients[0][:2]
    assert (host, port, proto.app) == ("10.0.0.1", 8443, "api")
    _, backend_transport = w.connect()
    assert backend_transport.value() == data
    assert w.metrics.counter(ROUTED_COUNTER, "name") == 1
    # The hello timer is gone once the hello is whole.
    assert proto._helloCall is None


def test_wildcard_and_failover_resend_the_hello() -> None:
    """
    A name matched by a wildcard goes to that app; when the first backend
    refuses, the next one of the same app gets the whole hello.
    """
    w = World(ROWS)
    proto, _ = w.accept()
    hello = tls_hello("shop.example.com")
    proto.dataReceived(hello)
    assert proto.app == "web"
    first = w.reactor.tcpClients[0]
    first[2].clientConnectionFailed(w.reactor.connectors[0], Failure(ConnectionRefusedError()))
    assert len(w.reactor.tcpClients) == 2
    assert {first[:2], w.reactor.tcpClients[1][:2]} == {("10.0.0.2", 9443), ("10.0.0.3", 9444)}
    _, backend_transport = w.connect()
    assert backend_transport.value() == hello
    assert w.metrics.counter(ROUTED_COUNTER, "wildcard") == 1


@pytest.mark.parametrize("name", [None, "unknown.test", "192.0.2.7"])
def test_default_app(name: Optional[str]) -> None:
    """
    No SNI, an unknown name, or an IP literal go to the listener's default
    app.
    """
    w = World(ROWS, default="api")
    proto, _ = w.accept()
    proto.dataReceived(tls_hello(name))
    assert proto.app == "api"
    assert w.reactor.tcpClients[0][:2] == ("10.0.0.1", 8443)
    assert w.metrics.counter(ROUTED_COUNTER, "default") == 1


@pytest.mark.parametrize(
    "data, reason",
    [
        (None, "no-sni"),
        (b"unknown.test", "unknown-name"),
        (b"GET / HTTP/1.1\r\n\r\n", "plain-http"),
        (b"\x80\x2e\x01\x03\x01", "sslv2"),
        (b"\x16\x03\x01\x40\x00\x01\x00\x80\x00", "oversize"),
    ],
)
def test_refused_without_backend_connect(data: Optional[bytes], reason: str) -> None:
    """
    Without a default app, a hello without a name or with an unknown one is
    refused; garbage, SSLv2 and an oversize hello always are: no backend
    connect, counted by reason, the client aborted, one log line with the
    cause.
    """
    w = World(ROWS)
    logs = LogCapture().start()
    try:
        proto, transport = w.accept()
        if data is None:
            data = tls_hello(None)
        elif data == b"unknown.test":
            data = tls_hello("unknown.test")
        proto.dataReceived(data)
        w.lose(proto)
        assert w.reactor.tcpClients == []
        assert transport.aborted
        assert w.metrics.counter(REJECTED_COUNTER, reason) == 1
        assert logs.causes() == ["hello-refused"]
        assert w.reactor.getDelayedCalls() == []
        assert w.factory.connections == set()
    finally:
        logs.stop()


@pytest.mark.parametrize("timeout", [0.0, -1.0])
def test_no_timeout_is_the_default_timeout(timeout: float) -> None:
    """
    A factory given no positive hello timeout still bounds the wait: a
    client that never sends its hello is refused after the default 10 s
    (it would otherwise hold its admission slot for ever).
    """
    from edgeproxy.net.sni import DEFAULT_HELLO_TIMEOUT

    w = World(ROWS, timeout=timeout)
    proto, transport = w.accept()
    w.reactor.advance(DEFAULT_HELLO_TIMEOUT - 0.01)
    assert not transport.aborted
    w.reactor.advance(0.02)
    assert transport.aborted
    w.lose(proto)
    assert w.metrics.counter(REJECTED_COUNTER, "timeout") == 1


def test_timeout_and_incomplete() -> None:
    """
    A hello not complete within the timeout is refused (C{timeout}), even
    while bytes trickle in; a client leaving mid-hello counts as
    C{incomplete}, one leaving before any byte is no refusal.
    """
    w = World(ROWS)
    logs = LogCapture().start()
    try:
        proto, transport = w.accept()
        hello = tls_hello("api.example.com")
        for i in range(40):
            proto.dataReceived(hello[i : i + 1])
            w.reactor.advance(0.1)
        w.reactor.advance(0.99)
        proto.dataReceived(hello[40:41])
        assert not transport.aborted
        w.reactor.advance(0.02)
        assert w.reactor.getDelayedCalls() == []
        assert transport.aborted
        w.lose(proto)
        assert w.metrics.counter(REJECTED_COUNTER, "timeout") == 1
        assert logs.causes() == ["hello-timeout"]

        proto, _ = w.accept()
        proto.dataReceived(hello[:10])
        w.lose(proto)
        assert w.metrics.counter(REJECTED_COUNTER, "incomplete") == 1

        proto, _ = w.accept()
        w.lose(proto)
        assert w.reactor.getDelayedCalls() == []
        assert w.reactor.tcpClients == []
        assert sum(v for (k, _), v in w.metrics.counters().items() if k == REJECTED_COUNTER) == 2
    finally:
        logs.stop()


def test_fin_mid_hello_closes() -> None:
    """
    A client that half-closes before its hello is whole is closed at once
    (C{incomplete}), without waiting for the timeout or connecting; a FIN
    right after a whole hello is carried to the backend after the hello.
    """
    w = World(ROWS)
    proto, transport = w.accept()
    hello = tls_hello("api.example.com")
    proto.dataReceived(hello[:50])
    proto.readConnectionLost()
    assert transport.aborted
    w.lose(proto)
    assert w.metrics.counter(REJECTED_COUNTER, "incomplete") == 1
    assert w.reactor.tcpClients == [] and w.reactor.getDelayedCalls() == []

    proto, transport = w.accept()
    proto.dataReceived(hello)
    proto.readConnectionLost()
    assert not transport.aborted
    _, backend_transport = w.connect()
    assert backend_transport.value() == hello
    assert backend_transport.disconnecting


def test_refusals_logged_once_a_minute_per_reason() -> None:
    """
    A flood of one refusal reason logs one line per minute (the next says
    how many were not logged); another reason gets its own line; every
    refusal is counted.
    """
    w = World(ROWS)
    logs = LogCapture().start()
    try:
        for _ in range(50):
            proto, _ = w.accept()
            proto.dataReceived(b"GET /")
            w.lose(proto)
        proto, _ = w.accept()
        proto.dataReceived(b"\x00")
        w.lose(proto)
        w.reactor.advance(LOG_INTERVAL)
        proto, _ = w.accept()
        proto.dataReceived(b"POST")
        w.lose(proto)
        lines = [e for e in logs.events if "SNI passthrough refused" in (e.get("log_format") or "")]
        assert [(e["reason"], e["quiet"]) for e in lines] == [
            ("plain-http", 0),
            ("not-tls", 0),
            ("plain-http", 49),
        ]
        assert w.metrics.counter(REJECTED_COUNTER, "plain-http") == 51
        assert logs.failures() == []
    finally:
        logs.stop()


def test_plain_listener_unchanged() -> None:
    """
    build_service gives an SNI factory only to C{sni:} listeners.
    """
    from twisted.internet import reactor

    from edgeproxy.net.proxy import ProxyClientProtocol, ProxyFactory
    from edgeproxy.service import build_service

    repository = InMemoryBackendRepository(ROWS)
    metrics = MetricsStore()
    router = Router(repository, BindingTable(), None, metrics, "sa", reactor)
    service = build_service(
        reactor=reactor,
        repository=repository,
        bindings=BindingTable(),
        geo=None,
        metrics=metrics,
        router=router,
        listeners=[ListenerSpec("tcp:0"), ListenerSpec("sni:tcp:0", "web")],
        settings=ProxySettings(),
        trusted=(),
        header_timeout=1.0,
        tls_handshake_timeout=3.0,
        db_reload=5.0,
        binding_gc=60.0,
    )
    plain, sni = service.factories
    assert type(plain) is ProxyFactory
    assert isinstance(sni, SniProxyFactory)
    assert (sni.app, sni.helloTimeout, sni.repository) == ("web", 3.0, repository)
    assert type(plain.buildProtocol(None)) is ProxyClientProtocol


def test_hello_struct_sanity() -> None:
    """
    The hellos these tests use are real TLS handshake records.
    """
    hello = tls_hello("a.test")
    assert hello[0] == 22 and struct.unpack("!H", hello[3:5])[0] == len(hello) - 5


def test_make_service_builds_sni_listeners(tmp_path: Path) -> None:
    """
    Through twistd's makeService: C{web=sni:haproxy:tcp:0} gets an SNI
    factory with the default app C{web}, the handshake timeout and the
    store's repository, behind a PROXY-header endpoint.
    """
    from twisted.internet.testing import MemoryReactorClock

    from edgeproxy.net.endpoints import ProxyHeaderServerEndpoint
    from edgeproxy.service import listener_service_name
    from edgeproxy.tap import Options, makeService

    options = Options()
    options.parseOptions(
        [
            f"--db={tmp_path / 'r.db'}",
            "--geoip-db=none",
            "--admin=none",
            "--tls-handshake-timeout=4",
            "--listen=web=sni:haproxy:tcp:0:interface=127.0.0.1",
        ]
    )
    options.applyEnvironment({})
    service = makeService(options, reactor=MemoryReactorClock(), environ={})
    listener = service.getServiceNamed(listener_service_name(0))  # type: ignore[attr-defined]
    assert isinstance(listener.endpoint, ProxyHeaderServerEndpoint)  # type: ignore[attr-defined]
    factory = listener.factory  # type: ignore[attr-defined]
    assert isinstance(factory, SniProxyFactory)
    assert (factory.app, factory.helloTimeout) == ("web", 4.0)
    assert not factory.clientsAdmittedAtAccept
