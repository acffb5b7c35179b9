"""
Tests for the Prometheus exposition (L{edgeproxy.control.metrics}) and the
histograms of L{edgeproxy.metrics.MetricsStore}: values read from the
in-memory parts, per-backend series that leave with their backend, bounded
labels, C{promtool check metrics}, the single-flight exposition, and the
counters of real traffic through a real proxy.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from pathlib import Path
from typing import Any, Dict, Iterable, Tuple

import pytest
import pytest_twisted
from faultkit import Echo, RefusingPort, listen, wait_until
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import DeferredList
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from edgeproxy.config import ProxySettings
from edgeproxy.control.metrics import (
    CONNECT_SECONDS,
    COUNTERS,
    PER_BACKEND_COUNTERS,
    EdgeproxyCollector,
    Exposition,
    ExtraGauge,
    backend_counter_pruner,
    metrics_registry,
    prune_backend_counters,
)
from edgeproxy.interfaces import AVAILABLE, NO_NEW_CLIENTS, UNAVAILABLE, IMetricsStore
from edgeproxy.metrics import CONNECT_SECONDS_BUCKETS, MetricsStore
from edgeproxy.model import GeoInfo
from edgeproxy.net.admission import Admission
from edgeproxy.net.proxy import CAUSES
from edgeproxy.routing.router import Router
from edgeproxy.testing import (
    BindingTable,
    InMemoryBackendRepository,
    LoadTable,
    StateOverlay,
    StaticGeoResolver,
    StaticHostResolver,
    backend,
)

Samples = Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float]


def scrape(collector: Any) -> bytes:
    """
    The text exposition of C{collector} (no process metrics).
    """
    return generate_latest(metrics_registry(collector, process=False))


def samples(text: bytes) -> Samples:
    """
    Every sample of an exposition, parsed by C{prometheus_client}'s parser:
    (sample name, sorted labels) -> value.
    """
    out: Samples = {}
    for family in text_string_to_metric_families(text.decode("utf-8")):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(parsed: Samples, name: str, **labels: str) -> float:
    return parsed[(name, tuple(sorted(labels.items())))]


def names(parsed: Samples) -> set[str]:
    return {name for name, _ in parsed}


def series_with(parsed: Samples, label: str, value: str) -> list[str]:
    return [name for name, labels in parsed if (label, value) in labels]


class _Repository(InMemoryBackendRepository):
    """
    An in-memory repository with the reload bookkeeping of the SQLite one.
    """

    lastReloadOk: float | None = None
    lastError: str | None = None


# -- MetricsStore histograms ---------------------------------------------------


def test_store_still_provides_the_interface():
    """
    L{MetricsStore} provides L{IMetricsStore}, C{observe} included.
    """
    assert verifyObject(IMetricsStore, MetricsStore())


def test_histogram_buckets_sum_and_count():
    """
    C{observe} counts a value in the first bucket whose bound is >= it (a
    value equal to a bound falls in that bound's bucket, as C{le} means),
    values above the last bound in the +Inf bucket, and keeps the sum and
    the count; C{histograms()} is a copy.
    """
    store = MetricsStore()
    for v in (0.0001, 0.0005, 0.0006, 0.3, 10.0, 11.0, 500.0):
        store.observe(CONNECT_SECONDS, v)
    h = store.histograms()[CONNECT_SECONDS]
    assert h.bounds == CONNECT_SECONDS_BUCKETS
    assert len(h.counts) == len(CONNECT_SECONDS_BUCKETS) + 1
    expected = [0] * (len(CONNECT_SECONDS_BUCKETS) + 1)
    expected[0] = 2  # 0.0001 and 0.0005 (== the first bound)
    expected[1] = 1  # 0.0006 <= 0.001
    expected[CONNECT_SECONDS_BUCKETS.index(0.5)] = 1
    expected[CONNECT_SECONDS_BUCKETS.index(10.0)] = 1
    expected[-1] = 2  # 11 and 500
    assert list(h.counts) == expected
    assert h.count == 7
    assert h.sum == pytest.approx(0.0001 + 0.0005 + 0.0006 + 0.3 + 10 + 11 + 500)
    store.observe(CONNECT_SECONDS, 1.0)
    assert h.count == 7
    assert store.histograms()[CONNECT_SECONDS].count == 8


def test_histogram_custom_buckets():
    """
    Buckets can be given per histogram name; they must be strictly
    increasing.
    """
    store = MetricsStore(buckets={"sizes": [1, 10, 100]})
    store.observe("sizes", 5)
    store.observe("sizes", 1000)
    h = store.histograms()["sizes"]
    assert h.bounds == (1.0, 10.0, 100.0)
    assert h.counts == (0, 1, 0, 1)
    with pytest.raises(ValueError):
        MetricsStore(buckets={"bad": [1, 1, 2]})
    with pytest.raises(ValueError):
        MetricsStore(buckets={"bad": [2, 1]})


def test_retain_drops_other_labels_of_one_counter():
    """
    C{retain(name, labels)} drops the counters called C{name} whose label is
    not in C{labels}, leaves other names alone, and says how many went.
    """
    store = MetricsStore()
    store.increment("backend_connect_failures", "a")
    store.increment("backend_connect_failures", "b", 3)
    store.increment("connections_closed", "b")
    assert store.retain("backend_connect_failures", {"a"}) == 1
    assert store.counters() == {
        ("backend_connect_failures", "a"): 1,
        ("connections_closed", "b"): 1,
    }


# -- the collector on in-memory parts ------------------------------------------


def _parts() -> Dict[str, Any]:
    metrics = MetricsStore()
    repository = _Repository(
        [
            backend("gru-1", region="sa", country="BR"),
            backend("cdg-1", region="eu", country="FR", app="web"),
            backend("old-1", deleted=True),
        ]
    )
    load = LoadTable(metrics)
    for _ in range(3):
        assert load.acquire(backend("gru-1"))
    assert load.acquire(backend("cdg-1"))
    overlay = StateOverlay()
    bindings = BindingTable(ttl=60.0)
    admission = Admission(100, metrics)
    return {
        "metrics": metrics,
        "repository": repository,
        "load": load,
        "overlay": overlay,
        "bindings": bindings,
        "admission": admission,
    }


def test_counters_values():
    """
    Each store counter is exported under its Prometheus name with its label
    (see the table): values are the store's, known label values are 0
    before they are counted, both byte directions feed one family, and a
    label-less family sums stray labels.
    """
    parts = _parts()
    m = parts["metrics"]
    m.increment("connections_accepted", amount=7)
    m.increment("connections_closed", "client-closed", 5)
    m.increment("connections_closed", "idle-timeout")
    m.increment("connections_rejected", "limit", 2)
    m.increment("routing_decisions", "0", 4)
    m.increment("routing_decisions", "3")
    m.increment("routing_no_backend")
    m.increment("proxy_header_rejected", "untrusted")
    m.increment("tls_handshake_failed", "timeout", 2)
    m.increment("routing_reload", "ok", 9)
    m.increment("routing_rows_skipped", "port")
    m.increment("bytes_to_backend", amount=1000)
    m.increment("bytes_to_client", amount=250)
    m.increment("connect_local_errors", "stray")
    m.increment("connect_local_errors")
    parsed = samples(scrape(EdgeproxyCollector(m)))
    assert value(parsed, "edgeproxy_connections_accepted_total") == 7
    assert value(parsed, "edgeproxy_connections_closed_total", cause="client-closed") == 5
    assert value(parsed, "edgeproxy_connections_closed_total", cause="idle-timeout") == 1
    for cause in set(CAUSES) - {"client-closed", "idle-timeout"}:
        assert value(parsed, "edgeproxy_connections_closed_total", cause=cause) == 0
    assert value(parsed, "edgeproxy_connections_rejected_total", reason="limit") == 2
    assert value(parsed, "edgeproxy_routing_decisions_total", tier="0") == 4
    assert value(parsed, "edgeproxy_routing_decisions_total", tier="1") == 0
    assert value(parsed, "edgeproxy_routing_decisions_total", tier="2") == 0
    assert value(parsed, "edgeproxy_routing_decisions_total", tier="3") == 1
    assert value(parsed, "edgeproxy_routing_no_backend_total") == 1
    assert value(parsed, "edgeproxy_proxy_header_rejections_total", reason="untrusted") == 1
    assert value(parsed, "edgeproxy_tls_handshake_failures_total", reason="timeout") == 2
    assert value(parsed, "edgeproxy_routing_reloads_total", result="ok") == 9
    assert value(parsed, "edgeproxy_routing_reloads_total", result="error") == 0
    assert value(parsed, "edgeproxy_routing_rows_skipped_total", column="port") == 1
    assert value(parsed, "edgeproxy_proxied_bytes_total", direction="to_backend") == 1000
    assert value(parsed, "edgeproxy_proxied_bytes_total", direction="to_client") == 250
    assert value(parsed, "edgeproxy_connect_local_errors_total") == 2
    assert value(parsed, "edgeproxy_admin_connections_rejected_total") == 0


def test_unknown_counter_exported_generically():
    """
    A store counter with no row in the table is still exported, as
    C{edgeproxy_<name>_total} with its label as C{label} (no label when it
    never had one); a name that would clash with a known family is moved
    aside rather than merged.
    """
    m = MetricsStore()
    m.increment("widgets_made", "blue", 2)
    m.increment("widgets_made", "red")
    m.increment("plain thing")
    m.increment("proxied_bytes", "x")
    parsed = samples(scrape(EdgeproxyCollector(m)))
    assert value(parsed, "edgeproxy_widgets_made_total", label="blue") == 2
    assert value(parsed, "edgeproxy_widgets_made_total", label="red") == 1
    assert value(parsed, "edgeproxy_plain_thing_total") == 1
    assert value(parsed, "edgeproxy_proxied_bytes_unmapped_total", label="x") == 1
    assert value(parsed, "edgeproxy_proxied_bytes_total", direction="to_client") == 0


def test_histogram_exported():
    """
    The connect latency histogram is exported as
    C{edgeproxy_backend_connect_seconds}: cumulative buckets with C{le}
    bounds, +Inf equal to the count, and the sum.
    """
    m = MetricsStore()
    for v in (0.0002, 0.004, 0.004, 0.2, 30.0):
        m.observe(CONNECT_SECONDS, v)
    parsed = samples(scrape(EdgeproxyCollector(m)))
    name = "edgeproxy_backend_connect_seconds"
    assert value(parsed, name + "_bucket", le="0.0005") == 1
    assert value(parsed, name + "_bucket", le="0.0025") == 1
    assert value(parsed, name + "_bucket", le="0.005") == 3
    assert value(parsed, name + "_bucket", le="0.25") == 4
    assert value(parsed, name + "_bucket", le="10.0") == 4
    assert value(parsed, name + "_bucket", le="+Inf") == 5
    assert value(parsed, name + "_count") == 5
    assert value(parsed, name + "_sum") == pytest.approx(30.2082)


def test_gauges_from_the_parts():
    """
    Open connections and the cap come from the admission, table size and
    routable rows from the snapshot, the table age from the clock and the
    repository's last good load, the reload state from its last error,
    the binding count from the table, the resolver's counts from its
    stats, and extra gauges from their callables.
    """
    parts = _parts()
    clock = Clock()
    clock.advance(1000)
    repository = parts["repository"]
    repository.lastReloadOk = 940.0
    repository.lastError = "database is locked"
    parts["admission"].acceptPeer(None)
    parts["admission"].acceptPeer(None)
    parts["bindings"].bind(("192.0.2.1", "app"), "gru-1", 0.0)
    resolver = StaticHostResolver({"db.example": ["192.0.2.9"]})
    collector = EdgeproxyCollector(
        **parts,
        resolver=resolver,
        clock=clock.seconds,
        extra=[ExtraGauge("edgeproxy_test_answer", "An answer.", lambda: 42)],
    )
    parsed = samples(scrape(collector))
    assert value(parsed, "edgeproxy_open_connections") == 2
    assert value(parsed, "edgeproxy_max_connections") == 100
    assert value(parsed, "edgeproxy_routing_table_backends") == 3
    assert value(parsed, "edgeproxy_routing_table_routable_backends") == 2
    assert value(parsed, "edgeproxy_routing_table_age_seconds") == 60
    assert value(parsed, "edgeproxy_routing_last_reload_failed") == 1
    assert value(parsed, "edgeproxy_bindings") == 1
    assert value(parsed, "edgeproxy_resolver_hosts") == len(resolver)
    assert "edgeproxy_resolver_lookups_total" in names(parsed)
    assert value(parsed, "edgeproxy_test_answer") == 42
    repository.lastError = None
    clock.advance(5)
    parsed = samples(scrape(collector))
    assert value(parsed, "edgeproxy_routing_last_reload_failed") == 0
    assert value(parsed, "edgeproxy_routing_table_age_seconds") == 65


def test_no_table_age_before_the_first_load():
    """
    Without a successful load (or without a clock, or with a repository
    that keeps no reload bookkeeping) there is no table age series.
    """
    parts = _parts()
    parsed = samples(scrape(EdgeproxyCollector(**parts, clock=Clock().seconds)))
    assert "edgeproxy_routing_table_age_seconds" not in names(parsed)
    assert value(parsed, "edgeproxy_routing_last_reload_failed") == 0
    parts["repository"] = InMemoryBackendRepository([backend("a")])
    parsed = samples(scrape(EdgeproxyCollector(**parts, clock=Clock().seconds)))
    assert "edgeproxy_routing_table_age_seconds" not in names(parsed)
    assert "edgeproxy_routing_last_reload_failed" not in names(parsed)


def test_per_backend_series():
    """
    Every backend of the snapshot (deleted rows included) has its info,
    routable, connections, up, breaker and one-hot admin state series,
    read from the table, the load table and the overlay's sources.
    """
    parts = _parts()
    overlay = parts["overlay"]
    overlay.setVerdict("gru-1", "health", UNAVAILABLE)
    overlay.setVerdict("cdg-1", "breaker", UNAVAILABLE)
    overlay.setVerdict("cdg-1", "admin", NO_NEW_CLIENTS)
    overlay.setVerdict("old-1", "admin", UNAVAILABLE)
    parsed = samples(scrape(EdgeproxyCollector(**parts)))
    assert (
        value(
            parsed, "edgeproxy_backend_info", backend="cdg-1", app="web", region="eu", country="FR"
        )
        == 1
    )
    assert value(parsed, "edgeproxy_backend_routable", backend="gru-1") == 1
    assert value(parsed, "edgeproxy_backend_routable", backend="old-1") == 0
    assert value(parsed, "edgeproxy_backend_connections", backend="gru-1") == 3
    assert value(parsed, "edgeproxy_backend_connections", backend="cdg-1") == 1
    assert value(parsed, "edgeproxy_backend_connections", backend="old-1") == 0
    assert value(parsed, "edgeproxy_backend_up", backend="gru-1") == 0
    assert value(parsed, "edgeproxy_backend_up", backend="cdg-1") == 1
    assert value(parsed, "edgeproxy_backend_breaker_open", backend="gru-1") == 0
    assert value(parsed, "edgeproxy_backend_breaker_open", backend="cdg-1") == 1
    expected = {"gru-1": "ready", "cdg-1": "drain", "old-1": "maint"}
    for bid, in_force in expected.items():
        for state in ("ready", "drain", "maint"):
            got = value(parsed, "edgeproxy_backend_admin_state", backend=bid, state=state)
            assert got == (1 if state == in_force else 0), (bid, state)
    overlay.setVerdict("gru-1", "health", AVAILABLE)
    parsed = samples(scrape(EdgeproxyCollector(**parts)))
    assert value(parsed, "edgeproxy_backend_up", backend="gru-1") == 1


def test_series_of_a_removed_backend_disappear():
    """
    When a backend leaves the routing table, every series labelled with its
    id is gone from the next scrape (its connect failures too, even before
    the store is pruned); pruning then frees its store counters while
    keeping those of backends still in the table.
    """
    parts = _parts()
    m = parts["metrics"]
    repository = parts["repository"]
    m.increment("backend_connect_failures", "cdg-1", 4)
    m.increment("backend_connect_failures", "gru-1")
    m.increment("load_underflow", "cdg-1")
    parts["overlay"].setVerdict("cdg-1", "admin", UNAVAILABLE)
    collector = EdgeproxyCollector(**parts)
    before = samples(scrape(collector))
    assert value(before, "edgeproxy_backend_connect_failures_total", backend="cdg-1") == 4
    assert value(before, "edgeproxy_load_underflow_total", backend="cdg-1") == 1
    assert len(series_with(before, "backend", "cdg-1")) == 10
    repository.set([backend("gru-1"), backend("old-1", deleted=True)])
    assert series_with(samples(scrape(collector)), "backend", "cdg-1") == []
    assert m.counter("backend_connect_failures", "cdg-1") == 4
    assert prune_backend_counters(m, repository.current().by_id) == 2
    assert m.counter("backend_connect_failures", "cdg-1") == 0
    assert m.counter("backend_connect_failures", "gru-1") == 1
    after = samples(scrape(collector))
    assert series_with(after, "backend", "cdg-1") == []
    assert value(after, "edgeproxy_backend_connect_failures_total", backend="gru-1") == 1


def test_pruner_listener_prunes_on_reload():
    """
    L{backend_counter_pruner} registered on a repository drops the store's
    per-backend counters of a backend as soon as a reload removes it.
    """
    m = MetricsStore()
    repository = InMemoryBackendRepository([backend("a"), backend("b")])
    repository.addListener(backend_counter_pruner(m))
    for name in PER_BACKEND_COUNTERS:
        m.increment(name, "a")
        m.increment(name, "b")
    repository.set([backend("a")])
    assert {label for (_, label) in m.counters()} == {"a"}


def test_no_client_address_in_any_label():
    """
    After routing decisions for many clients (with geo, bindings and
    failures), no label value of the exposition is an IP address or holds
    one of the clients' addresses: label values are backend ids and fixed
    vocabularies only.
    """
    clients = [f"198.51.100.{i}" for i in range(1, 60)] + ["2001:db8::1", "2001:db8:1::2"]
    geo = StaticGeoResolver({ip: GeoInfo(country="BR", region="sa") for ip in clients})
    parts = _parts()
    m = parts["metrics"]
    router = Router(
        parts["repository"],
        parts["bindings"],
        geo,
        m,
        "sa",
        Clock(),
        load=parts["load"],
        overlay=parts["overlay"],
    )
    for ip in clients:
        chosen = router.choose(ip, None)
        assert chosen is not None
        router.connectFailed(ip, None, chosen.id)
        m.increment("backend_connect_failures", chosen.id)
        router.release(chosen.id)
        parts["admission"].acceptPeer(None)
    text = scrape(EdgeproxyCollector(**parts, clock=Clock().seconds)).decode()
    for ip in clients:
        assert ip not in text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for label_value in sample.labels.values():
                with pytest.raises(ValueError):
                    ipaddress.ip_address(label_value)


def test_freeze_copies_the_mutable_parts():
    """
    L{EdgeproxyCollector.freeze} copies what it reads: changing the
    counters, the load table or the overlay afterwards does not change the
    frozen state (which is what lets it be encoded in another thread).
    """
    parts = _parts()
    m = parts["metrics"]
    m.increment("connections_accepted")
    m.observe(CONNECT_SECONDS, 0.1)
    collector = EdgeproxyCollector(**parts)
    frozen = collector.freeze()
    before = generate_latest(frozen)
    m.increment("connections_accepted", amount=10)
    m.observe(CONNECT_SECONDS, 0.1)
    parts["load"].acquire(backend("gru-1"))
    parts["overlay"].setVerdict("gru-1", "admin", UNAVAILABLE)
    assert generate_latest(frozen) == before
    assert generate_latest(collector.freeze()) != before


def test_spec_table_is_consistent():
    """
    Every family of the table has one help text and one label set, and its
    name is a valid, prefixed Prometheus name.
    """
    seen: Dict[str, Tuple[str, Tuple[str, ...]]] = {}
    for spec in COUNTERS.values():
        assert spec.family.startswith("edgeproxy_") and not spec.family.endswith("_total")
        entry = (spec.doc, tuple(spec.labelnames()))
        assert seen.setdefault(spec.family, entry) == entry


# -- promtool -------------------------------------------------------------------


def _rich_exposition() -> bytes:
    parts = _parts()
    m = parts["metrics"]
    for name, spec in COUNTERS.items():
        m.increment(name, "gru-1" if spec.perBackend else ("x" if spec.label else ""))
    m.increment("widgets_made", "blue")
    m.observe(CONNECT_SECONDS, 0.01)
    parts["repository"].lastReloadOk = 0.0
    parts["overlay"].setVerdict("gru-1", "admin", NO_NEW_CLIENTS)
    collector = EdgeproxyCollector(
        **parts,
        clock=Clock().seconds,
        resolver=StaticHostResolver({"db.example": ["192.0.2.9"]}),
    )
    return generate_latest(metrics_registry(collector, process=True))


def test_promtool_check_metrics():
    """
    C{promtool check metrics} finds nothing to say about an exposition with
    every family populated (names, units, help, types, process metrics).
    """
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not found: apt-get install prometheus")
    text = _rich_exposition()
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == b"", result.stdout


# -- the exposition (single flight, cache, thread) -------------------------------


class _CountingCollector(EdgeproxyCollector):
    freezes = 0

    def freeze(self) -> Any:
        self.freezes += 1
        return super().freeze()


@pytest_twisted.inlineCallbacks
def test_exposition_single_flight_in_a_thread():
    """
    Scrapes that arrive while one is being generated (in the thread pool)
    share its result: one freeze, one generation, identical bodies; the
    text and OpenMetrics encodings are generated separately.
    """
    m = MetricsStore()
    m.increment("connections_accepted", amount=3)
    collector = _CountingCollector(m)
    exposition = Exposition(collector, reactor=reactor, process=False, maxAge=0.0)
    results = yield DeferredList(
        [exposition.render("") for _ in range(20)], fireOnOneErrback=True, consumeErrors=True
    )
    bodies = {body for _, (body, _) in results}
    types = {ctype for _, (_, ctype) in results}
    assert len(bodies) == 1 and types == {"text/plain; version=0.0.4; charset=utf-8"}
    assert collector.freezes == 1 and exposition.generations == 1
    assert value(samples(bodies.pop()), "edgeproxy_connections_accepted_total") == 3
    body, ctype = yield exposition.render("application/openmetrics-text; version=1.0.0")
    assert ctype.startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
    assert exposition.generations == 2
    m.increment("connections_accepted")
    body, _ = yield exposition.render("")
    assert value(samples(body), "edgeproxy_connections_accepted_total") == 4


def test_exposition_cache_and_reactor_thread_mode():
    """
    Without a thread the exposition is generated synchronously; a result
    younger than C{maxAge} is served again without a new generation, and
    an older one is generated anew.
    """
    clock = Clock()
    m = MetricsStore()
    exposition = Exposition(
        EdgeproxyCollector(m), reactor=clock, process=False, threaded=False, maxAge=1.0
    )
    results: list[Any] = []
    exposition.render("").addCallback(results.append)
    m.increment("connections_accepted")
    exposition.render("").addCallback(results.append)
    assert len(results) == 2 and results[0] == results[1]
    assert exposition.generations == 1
    clock.advance(1.0)
    exposition.render("").addCallback(results.append)
    assert exposition.generations == 2
    assert value(samples(results[2][0]), "edgeproxy_connections_accepted_total") == 1


def test_exposition_failure_does_not_wedge():
    """
    A collector that raises makes that scrape fail (logged), and the next
    scrape is tried afresh rather than waiting for the failed one forever.
    """

    class Broken(EdgeproxyCollector):
        broken = True

        def freeze(self) -> Any:
            if self.broken:
                raise RuntimeError("boom")
            return super().freeze()

    collector = Broken(MetricsStore())
    exposition = Exposition(collector, reactor=Clock(), process=False, threaded=False)
    failures: list[Any] = []
    exposition.render("").addErrback(failures.append)
    assert len(failures) == 1 and failures[0].check(RuntimeError)
    collector.broken = False
    results: list[Any] = []
    exposition.render("").addCallback(results.append)
    assert len(results) == 1


# -- real traffic through a real proxy ---------------------------------------------


def _label_values(parsed: Samples) -> Iterable[str]:
    for _, labels in parsed:
        for _, v in labels:
            yield v


@pytest_twisted.inlineCallbacks
def test_counters_of_real_traffic():
    """
    Through a real proxy on loopback whose table lists a refusing backend
    in the local region (tier 2, tried first) and an echoing one elsewhere
    (tier 3, the failover): after N client connections that each echo once
    and close, the exposition says N accepted, N closed by the client, one
    connect failure to the refusing backend (the first connection fails
    over and binds the client to the echoing one, which the next ones
    follow), no open connection and no backend load left, and holds no
    client address.
    """
    from faultkit import ProxyHarness

    n = 12
    echo = listen(reactor, Echo)
    refusing = RefusingPort()
    harness = ProxyHarness(
        reactor,
        [
            backend("refusing", region="sa", port=refusing.port),
            backend("echo", region="eu", country="FR", port=echo.port),
        ],
        ProxySettings(connect_budget=5.0, max_attempts=2),
    )
    collector = EdgeproxyCollector(
        harness.metrics,
        repository=harness.repository,
        load=harness.router.load,
        overlay=harness.router.overlay,
        bindings=harness.bindings,
        admission=harness.factory.admission,
    )
    try:
        for _ in range(n):
            yield harness.assert_fresh_connection_works()
        yield wait_until(reactor, harness.idle, timeout=10.0)
        parsed = samples(scrape(collector))
        assert value(parsed, "edgeproxy_connections_accepted_total") == n
        assert value(parsed, "edgeproxy_connections_closed_total", cause="client-closed") == n
        assert value(parsed, "edgeproxy_backend_connect_failures_total", backend="refusing") == 1
        assert value(parsed, "edgeproxy_bindings") == 1
        assert value(parsed, "edgeproxy_open_connections") == 0
        assert value(parsed, "edgeproxy_backend_connections", backend="echo") == 0
        assert value(parsed, "edgeproxy_routing_table_backends") == 2
        for v in _label_values(parsed):
            assert "127.0.0.1" not in v
    finally:
        yield harness.stop([echo, refusing])


def test_example_scrape_config_is_valid():
    """
    C{conf/prometheus-scrape.yml} is a valid Prometheus configuration
    (C{promtool check config}).
    """
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not found: apt-get install prometheus")
    path = Path(__file__).resolve().parent.parent / "conf" / "prometheus-scrape.yml"
    result = subprocess.run(
        [promtool, "check", "config", "--syntax-only", str(path)],
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
