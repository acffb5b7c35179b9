"""
Tests for L{edgeproxy.service.build_service} and L{edgeproxy.tap.makeService}:
the service tree, its periodic jobs, and startup with a missing or corrupt
routing database.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import AbstractSet, Any, Iterator, List, cast

import pytest
from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import IService
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, LogLevel, globalLogPublisher
from zope.interface.verify import verifyObject

from edgeproxy.config import ListenerSpec, ProxySettings
from edgeproxy.model import RoutingSnapshot
from edgeproxy.net.proxy import ProxyFactory
from edgeproxy.routing.router import Router
from edgeproxy.service import (
    GC_SERVICE,
    RELOAD_SERVICE,
    RESOLVE_SERVICE,
    EdgeProxyService,
    build_service,
    listener_service_name,
)
from edgeproxy.tap import Options, makeService
from edgeproxy.testing import BindingTable, InMemoryBackendRepository, MetricsStore, backend

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def events() -> Iterator[List[dict[str, Any]]]:
    """
    Every log event emitted during the test.
    """
    captured: List[dict[str, Any]] = []
    observer = cast(ILogObserver, captured.append)
    globalLogPublisher.addObserver(observer)
    try:
        yield captured
    finally:
        globalLogPublisher.removeObserver(observer)


def failures(events: List[dict[str, Any]]) -> List[dict[str, Any]]:
    return [e for e in events if "log_failure" in e]


def make(
    reactor: Any,
    repository: Any = None,
    bindings: Any = None,
    listeners: tuple[ListenerSpec, ...] = (ListenerSpec("tcp:0"), ListenerSpec("tcp:0", "api")),
) -> EdgeProxyService:
    if repository is None:
        repository = InMemoryBackendRepository(
            [backend("gru-1"), backend("cdg-1", region="eu", country="FR")]
        )
    if bindings is None:
        bindings = BindingTable(ttl=10.0)
    metrics = MetricsStore()
    router = Router(repository, bindings, None, metrics, "sa", reactor)
    return build_service(
        reactor=reactor,
        repository=repository,
        bindings=bindings,
        geo=None,
        metrics=metrics,
        router=router,
        listeners=listeners,
        settings=ProxySettings(),
        trusted=(),
        header_timeout=1.0,
        tls_handshake_timeout=1.0,
        db_reload=5.0,
        binding_gc=60.0,
        region="sa",
        geo_description="no geo (test)",
    )


def start(service: EdgeProxyService) -> None:
    service.privilegedStartService()
    service.startService()


def test_children() -> None:
    """
    The tree holds one endpoint service per listener, each with its own
    ProxyFactory bound to the listener's app, plus the reload and GC timers
    on the injected clock.
    """
    reactor = MemoryReactorClock()
    service = make(reactor)
    verifyObject(IService, service)
    names = [child.name for child in service]
    assert names == [
        listener_service_name(0),
        listener_service_name(1),
        RELOAD_SERVICE,
        GC_SERVICE,
        RESOLVE_SERVICE,
    ]
    assert all(f.admission is service.admission for f in service.factories)
    assert all(f.resolver is service.resolver for f in service.factories)
    listeners = [service.getServiceNamed(listener_service_name(i)) for i in (0, 1)]
    assert all(isinstance(s, StreamServerEndpointService) for s in listeners)
    assert [s.factory for s in listeners] == service.factories
    assert all(isinstance(f, ProxyFactory) for f in service.factories)
    assert [f.app for f in service.factories] == [None, "api"]
    assert all(f.metrics is service.metrics for f in service.factories)
    reload = service.getServiceNamed(RELOAD_SERVICE)
    gc = service.getServiceNamed(GC_SERVICE)
    assert isinstance(reload, TimerService) and isinstance(gc, TimerService)
    assert (reload.step, gc.step) == (5.0, 60.0)
    assert reload.clock is reactor and gc.clock is reactor


def test_start_listens_and_runs_timers() -> None:
    """
    Starting the service listens once per listener with its factory and
    reloads the routing table at once and then every C{db_reload} seconds;
    stopping it stops listening and the timers.
    """
    reactor = MemoryReactorClock()
    repository = InMemoryBackendRepository([backend("gru-1")])
    service = make(reactor, repository)
    start(service)
    # Each listener's socket-level factory is its admission wrapper.
    assert [entry[1].wrappedFactory for entry in reactor.tcpServers] == service.factories  # type: ignore[attr-defined]
    assert repository.reloads == 1
    reactor.advance(5.0)
    reactor.advance(5.0)
    assert repository.reloads == 3
    stopped = service.stopService()
    assert stopped is not None
    reactor.advance(50.0)
    assert repository.reloads == 3
    assert reactor.getDelayedCalls() == []


def test_startup_summary(events: List[dict[str, Any]]) -> None:
    """
    Startup logs one summary with the region, the backend count, the geo
    database and the listeners.
    """
    service = make(MemoryReactorClock())
    start(service)
    summaries = [
        e for e in events if e.get("log_namespace") == "edgeproxy.service" and "routable" in e
    ]
    assert len(summaries) == 1
    summary = summaries[0]
    assert summary["region"] == "sa"
    assert summary["backends"] == 2
    assert summary["geo"] == "no geo (test)"
    assert summary["listeners"] == "tcp:0, api=tcp:0"
    service.stopService()


class FlakyRepository(InMemoryBackendRepository):
    """
    A repository whose reload raises, then fails, then works.
    """

    def reload(self) -> Deferred[RoutingSnapshot]:
        self.reloads += 1
        if self.reloads == 1:
            raise RuntimeError("reload raised")
        if self.reloads == 2:
            return fail(RuntimeError("reload failed"))
        return succeed(self.current())


def test_reload_job_survives_failures(events: List[dict[str, Any]]) -> None:
    """
    A reload that raises, or whose Deferred fails, is logged as a failure
    and the periodic job keeps running.
    """
    reactor = MemoryReactorClock()
    repository = FlakyRepository([backend("gru-1")])
    service = make(reactor, repository)
    start(service)
    for _ in range(4):
        reactor.advance(5.0)
    assert repository.reloads == 5
    logged = [str(e["log_failure"].value) for e in failures(events)]
    assert logged == ["reload raised", "reload failed"]
    service.stopService()


class BrokenBindings(BindingTable):
    """
    Bindings whose collect always raises.
    """

    calls = 0

    def collect(self, now: float) -> int:
        self.calls += 1
        raise RuntimeError("collect broke")


def test_gc_job_survives_failures(events: List[dict[str, Any]]) -> None:
    """
    A binding GC that raises is logged and runs again at the next interval.
    """
    reactor = MemoryReactorClock()
    bindings = BrokenBindings()
    service = make(reactor, bindings=bindings)
    start(service)
    reactor.advance(60.0)
    reactor.advance(60.0)
    assert bindings.calls == 3
    assert len(failures(events)) == 3
    service.stopService()


def test_gc_job_frees_expired_bindings() -> None:
    """
    The GC job frees the bindings whose TTL ran out, on the injected clock.
    """
    reactor = MemoryReactorClock()
    bindings = BindingTable(ttl=10.0)
    service = make(reactor, bindings=bindings)
    bindings.bind(("192.0.2.1", None), "gru-1", reactor.seconds())
    start(service)
    assert len(bindings) == 1
    reactor.advance(60.0)
    assert len(bindings) == 0
    service.stopService()


def test_reload_clears_bindings_of_backends_gone() -> None:
    """
    When a reload removes a backend or makes it unroutable, its bindings
    are freed; bindings to backends still routable stay.
    """
    reactor = MemoryReactorClock()
    repository = InMemoryBackendRepository(
        [backend("gru-1"), backend("gru-2"), backend("cdg-1", country="FR", region="eu")]
    )
    bindings = BindingTable(ttl=100.0)
    make(reactor, repository, bindings)
    for ip, backend_id in [("192.0.2.1", "gru-1"), ("192.0.2.2", "gru-2"), ("192.0.2.3", "cdg-1")]:
        bindings.bind((ip, None), backend_id, 0.0)
    repository.set([backend("gru-2", healthy=False), backend("cdg-1", country="FR", region="eu")])
    assert bindings.lookup(("192.0.2.1", None), 1.0) is None
    assert bindings.lookup(("192.0.2.2", None), 1.0) is None
    kept = bindings.lookup(("192.0.2.3", None), 1.0)
    assert kept is not None and kept.backend_id == "cdg-1"
    assert len(bindings) == 1


def test_binding_cleanup_never_raises(events: List[dict[str, Any]]) -> None:
    """
    A bindings table that raises while being cleaned up after a reload is
    logged; the listener itself does not raise.
    """

    class Raising(BindingTable):
        def removeBackends(self, backend_ids: AbstractSet[str]) -> dict[str, int]:
            raise RuntimeError("removeBackend broke")

    repository = InMemoryBackendRepository([backend("gru-1")])
    service = make(MemoryReactorClock(), repository, Raising())
    service.routingTableChanged(repository.current(), RoutingSnapshot.empty())
    assert [str(e["log_failure"].value) for e in failures(events)] == ["removeBackend broke"]


class BusyReactor(MemoryReactorClock):
    """
    A reactor on which every port is taken.
    """

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        raise CannotListenError(interface, port, OSError(98, "Address already in use"))


def test_port_taken_is_a_clear_exit() -> None:
    """
    A listener that cannot bind stops startup with a one-line reason rather
    than leaving a proxy that listens on nothing.
    """
    service = make(BusyReactor(), listeners=(ListenerSpec("tcp:8080"),))
    with pytest.raises(SystemExit) as caught:
        service.privilegedStartService()
    assert "8080" in str(caught.value.code)
    assert "Address already in use" in str(caught.value.code)


def options(*argv: str) -> Options:
    o = Options()
    o.parseOptions(list(argv))
    return o


def test_make_service_creates_missing_database(
    tmp_path: Path, events: List[dict[str, Any]]
) -> None:
    """
    makeService with a missing routing database creates it with the schema
    (and warns), and builds the tree from the options and the environment.
    """
    db = tmp_path / "routing.db"
    service = makeService(
        options(f"--db={db}", "--listen=tcp:0", "--listen=api=tcp:0", "--geoip-db=none"),
        reactor=MemoryReactorClock(),
        environ={"EDGEPROXY_REGION": "eu", "EDGEPROXY_DB_RELOAD_SECS": "0.5"},
    )
    assert db.exists()
    with sqlite3.connect(db) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    assert "backends" in tables
    assert isinstance(service, EdgeProxyService)
    assert service.region == "eu"
    assert [f.app for f in service.factories] == [None, "api"]
    assert service.getServiceNamed(RELOAD_SERVICE).step == 0.5
    assert any(e.get("log_level") == LogLevel.warn and e.get("path") == str(db) for e in events)


def test_make_service_loads_before_returning(tmp_path: Path) -> None:
    """
    The routing table is loaded synchronously by makeService, so it is in
    force before any listener accepts.
    """
    db = tmp_path / "routing.db"
    with sqlite3.connect(db) as conn:
        conn.executescript((ROOT / "conf" / "schema.sql").read_text())
        conn.execute(
            "INSERT INTO backends (id, app, region, country, wg_ip, port) "
            "VALUES ('gru-1', 'demo', 'sa', 'BR', '127.0.0.1', 9101)"
        )
    service = makeService(
        options(f"--db={db}", "--geoip-db=none"), reactor=MemoryReactorClock(), environ={}
    )
    assert isinstance(service, EdgeProxyService)
    assert list(service.repository.current().by_id) == ["gru-1"]


def test_make_service_corrupt_database_is_fatal(tmp_path: Path) -> None:
    """
    A corrupt routing database at startup is a clear fatal error: SystemExit
    with a one-line reason naming the file, no listener built.
    """
    db = tmp_path / "routing.db"
    db.write_bytes(b"this is not a database" * 100)
    with pytest.raises(SystemExit) as caught:
        makeService(options(f"--db={db}"), reactor=MemoryReactorClock(), environ={})
    message = str(caught.value.code)
    assert str(db) in message
    assert "--db" in message
    assert "\n" not in message


def test_make_service_invalid_environment_is_fatal(tmp_path: Path) -> None:
    """
    An invalid environment value stops makeService before the database is
    touched, naming the option and the variable.
    """
    db = tmp_path / "routing.db"
    with pytest.raises(SystemExit) as caught:
        makeService(
            options(f"--db={db}"),
            reactor=MemoryReactorClock(),
            environ={"EDGEPROXY_BINDING_TTL_SECS": "-3"},
        )
    assert "--binding-ttl (from EDGEPROXY_BINDING_TTL_SECS)" in str(caught.value.code)
    assert not db.exists()


def test_make_service_shipped_geoip(tmp_path: Path) -> None:
    """
    By default the geo-whois-asn-country database shipped with the install
    is used, and its file is watched for new versions.
    """
    service = makeService(
        options(f"--db={tmp_path / 'r.db'}"), reactor=MemoryReactorClock(), environ={}
    )
    assert isinstance(service, EdgeProxyService)
    assert service.geo is not None
    assert "geo-whois-asn-country" in str(service.geo_description)
    assert service.getServiceNamed("geoip-reload") is not None
    assert service.geo.resolve("90.85.1.1") is not None
    close = getattr(service.geo, "close", None)
    if close is not None:
        close()


def run_help(code: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.run(
        [sys.executable, "-c", code, "--help"],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(ROOT),
        timeout=120,
    )


@pytest.mark.slow
def test_twistd_help_lists_edgeproxy() -> None:
    """
    C{twistd --help} lists the edgeproxy plugin.
    """
    result = run_help("from twisted.scripts.twistd import run; run()")
    assert result.returncode == 0, result.stderr
    assert "edgeproxy" in result.stdout
    assert "geo-aware" in result.stdout


@pytest.mark.slow
def test_twist_help_lists_edgeproxy() -> None:
    """
    C{python -m twisted --help} (the C{twist} runner) lists the edgeproxy
    plugin too.
    """
    result = run_help(
        "import sys; from twisted.application.twist._twist import Twist; sys.exit(Twist.main())"
    )
    assert result.returncode == 0, result.stderr
    assert "edgeproxy" in result.stdout


def test_bindings_dropped_when_the_overlay_makes_a_backend_unavailable() -> None:
    """
    A backend the state overlay makes unavailable loses its bindings (its
    clients are re-routed on their next connection); one that only drains
    keeps them.
    """
    from edgeproxy.interfaces import NO_NEW_CLIENTS, UNAVAILABLE

    reactor = MemoryReactorClock()
    service = make(reactor, InMemoryBackendRepository([backend("gru-1"), backend("gru-2")]))
    bindings = service.bindings
    for i in range(10):
        bindings.bind((f"192.0.2.{i}", "app"), "gru-1" if i < 6 else "gru-2", 0.0)
    overlay = service.router.overlay  # type: ignore[attr-defined]
    overlay.setVerdict("gru-2", "admin", NO_NEW_CLIENTS)
    assert len(bindings) == 10
    overlay.setVerdict("gru-1", "health", UNAVAILABLE)
    assert len(bindings) == 4


def _session(service: EdgeProxyService, peer_port: int) -> Any:
    """
    A live proxied session on the first listener's factory (a memory
    transport, its backend connect pending), admitted as the socket-level
    admission would.
    """
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    factory = service.factories[0]
    peer = IPv4Address("TCP", "192.0.2.1", peer_port)
    proto = factory.buildProtocol(peer)
    assert service.admission.acceptPeer(peer)
    proto.admission = service.admission
    transport = StringTransport(peerAddress=peer, hostAddress=IPv4Address("TCP", "10.0.0.1", 80))
    proto.makeConnection(transport)
    return proto, transport


def _lose(proto: Any) -> None:
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    proto.connectionLost(Failure(ConnectionDone()))


def test_graceful_shutdown_waits_then_cuts(events: List[dict[str, Any]]) -> None:
    """
    F15 on a memory reactor: stopping the service stops every listener at
    once, lets open connections finish until the shutdown timeout, then
    closes the rest (cause shutdown, the count logged); only then do the
    periodic jobs stop and the stop Deferred fire.
    """
    reactor = MemoryReactorClock()
    service = make(reactor)
    service.shutdownTimeout = 30.0
    start(service)
    (p1, _), (p2, t2) = _session(service, 1), _session(service, 2)
    fired: list[object] = []
    service.stopService().addCallback(fired.append)
    listeners = [service.getServiceNamed(listener_service_name(i)) for i in (0, 1)]
    assert not any(s.running for s in listeners)
    assert not fired
    _lose(p1)
    reactor.advance(29.0)
    assert not fired and not t2.disconnecting
    reactor.advance(1.0)
    assert t2.disconnecting
    _lose(p2)
    assert fired
    cut = [e for e in events if e.get("cut") is not None]
    assert [e["cut"] for e in cut] == [1]
    causes = [e["cause"] for e in events if e.get("log_namespace") == "edgeproxy.net.proxy"]
    assert sorted(causes) == ["client-closed", "shutdown"]
    assert not service.getServiceNamed(RELOAD_SERVICE).running


def test_graceful_shutdown_ends_when_the_last_connection_does() -> None:
    """
    When every open connection finishes before the deadline, the shutdown
    completes at once, with nothing cut and no timer left behind.
    """
    reactor = MemoryReactorClock()
    service = make(reactor)
    start(service)
    p1, _ = _session(service, 1)
    fired: list[object] = []
    service.stopService().addCallback(fired.append)
    assert not fired
    reactor.advance(3.0)
    _lose(p1)
    assert fired
    assert [c for c in reactor.getDelayedCalls() if c.active()] == []


def test_shutdown_with_nothing_open_is_immediate() -> None:
    """
    With no open connection the shutdown completes at once.
    """
    reactor = MemoryReactorClock()
    service = make(reactor)
    start(service)
    fired: list[object] = []
    service.stopService().addCallback(fired.append)
    assert fired
