"""
Tests for the status page's data and resources (L{edgeproxy.control.status}):
the JSON from the in-memory parts, the geo mix over a bounded ring of
counter samples, and the page and JSON resources on a real loopback site
(headers, caching, mounting).  The page in a real browser is
C{tests/test_status_browser.py}.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple, cast

import attrs
import pytest
import pytest_twisted
from faultkit import LogCapture
from hypothesis import given
from hypothesis import strategies as st
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks, succeed
from twisted.internet.task import Clock
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Site

from edgeproxy.control.admin import AdminRoot, JSONResource, json_body
from edgeproxy.control.status import (
    MAX_BACKENDS,
    STATUSES,
    RecentCounters,
    StatusData,
    StatusResource,
    geo_mix,
    mount_status,
    status_page,
)
from edgeproxy.interfaces import AVAILABLE, NO_NEW_CLIENTS, UNAVAILABLE
from edgeproxy.net.health import HealthChecker, ProbeResult
from edgeproxy.routing.admin import AdminState, AdminStates
from edgeproxy.routing.breaker import CircuitBreaker
from edgeproxy.testing import (
    BindingTable,
    InMemoryBackendRepository,
    LoadTable,
    MetricsStore,
    StateOverlay,
    backend,
)

# --- the JSON ------------------------------------------------------------------


def _by_id(body: Mapping[str, Any]) -> Dict[str, Dict[str, Any]]:
    return {b["id"]: b for b in body["backends"]}


def _parts(*backends: Any) -> Tuple[InMemoryBackendRepository, LoadTable, StateOverlay, Clock]:
    return InMemoryBackendRepository(backends), LoadTable(), StateOverlay(), Clock()


def test_backend_fields_from_the_in_memory_parts() -> None:
    """
    A backend's entry carries what the table says (id, app, region,
    country, address, weight, limits), its open connections from the load
    table, status C{up} and C{routable} while nothing closes it; the
    summary counts it.
    """
    b = backend("gru-1", port=9001, weight=3, soft_limit=10, hard_limit=20)
    repository, load, overlay, clock = _parts(b, backend("v6", host="fd00::1", country=None))
    for _ in range(7):
        load.acquire(b)
    body = StatusData(
        repository=repository, load=load, overlay=overlay, clock=clock.seconds
    ).render()
    entry = _by_id(body)["gru-1"]
    assert {k: entry[k] for k in entry if k not in ("health", "breaker", "admin")} == {
        "id": "gru-1",
        "app": "app",
        "region": "sa",
        "country": "BR",
        "address": "127.0.0.1:9001",
        "weight": 3,
        "table": {"healthy": True, "deleted": False, "draining": False},
        "status": "up",
        "routable": True,
        "verdicts": {},
        "connections": 7,
        "soft_limit": 10,
        "hard_limit": 20,
        "rtt_ms": None,
        "rtt_term": None,
    }
    v6 = _by_id(body)["v6"]
    assert (v6["address"], v6["country"], v6["connections"]) == ("[fd00::1]:9000", None, 0)
    assert body["summary"]["backends"] == 2
    assert body["summary"]["listed"] == 2
    assert body["summary"]["routable"] == 2
    assert body["summary"]["statuses"]["up"] == 2
    assert set(body["summary"]["statuses"]) == set(STATUSES)


def test_overlay_health_unavailable_shows_as_down() -> None:
    """
    A backend whose health verdict in the overlay is UNAVAILABLE shows as
    C{down}, not routable, its health state C{down} even without a
    checker to ask, its verdict named; clearing the verdict brings it back
    up.
    """
    repository, load, overlay, clock = _parts(backend("gru-1"), backend("gru-2"))
    data = StatusData(repository=repository, load=load, overlay=overlay, clock=clock.seconds)
    overlay.setVerdict("gru-1", "health", UNAVAILABLE)
    body = data.render()
    entry = _by_id(body)["gru-1"]
    assert (entry["status"], entry["routable"]) == ("down", False)
    assert entry["health"]["state"] == "down"
    assert entry["verdicts"] == {"health": "unavailable"}
    assert _by_id(body)["gru-2"]["status"] == "up"
    assert body["summary"]["statuses"]["down"] == 1
    assert body["summary"]["routable"] == 1
    overlay.setVerdict("gru-1", "health", AVAILABLE)
    assert _by_id(data.render())["gru-1"]["status"] == "up"


def test_health_checker_status_is_shown() -> None:
    """
    With a real L{HealthChecker} whose checks fail (a probe answering
    "connection refused"), the backend goes from C{up} (state unknown) to
    C{down} after C{fall} checks, with the reason, the time since it went
    down and when the last check ended.
    """
    repository, load, overlay, clock = _parts(backend("gru-1"))
    results = [ProbeResult(False, "connection refused")]
    checker = HealthChecker(
        clock,
        overlay,
        interval=2.0,
        fall=2,
        rise=1,
        probe=lambda b, spec: succeed(results[0]),
    )
    checker.update(repository.current())
    data = StatusData(
        repository=repository, load=load, overlay=overlay, checker=checker, clock=clock.seconds
    )
    entry = _by_id(data.render())["gru-1"]
    assert (entry["status"], entry["health"]["state"], entry["health"]["check"]) == (
        "up",
        "unknown",
        "tcp",
    )
    checker.start()
    for _ in range(10):
        clock.advance(2.5)
    checker.stop()
    entry = _by_id(data.render())["gru-1"]
    assert entry["status"] == "down"
    health = entry["health"]
    assert (health["state"], health["reason"]) == ("down", "connection refused")
    assert health["since_age"] is not None and 0 < health["since_age"] < 25
    assert health["last_check_age"] is not None and health["last_check_age"] <= 3
    assert health["rtt_ms"] is None


@attrs.frozen
class _Status:
    state: str
    check: str
    reason: Optional[str]
    since: float
    last_check: Optional[float]
    health: int
    rtt: Optional[float]


class _Checker:
    def __init__(self, statuses: Mapping[str, _Status]) -> None:
        self.statuses = statuses

    def status(self, backend_id: str) -> Optional[_Status]:
        return self.statuses.get(backend_id)


def test_health_ages_and_rtt_from_a_duck_typed_checker() -> None:
    """
    Any object with C{status(id)} serves as the checker: ages are taken on
    the given clock, the RTT is in milliseconds, and a backend the checker
    does not follow (and that has no health verdict) has no health entry.
    """
    repository, _, overlay, clock = _parts(backend("a"), backend("b"))
    clock.advance(100.0)
    checker = _Checker({"a": _Status("up", "http:/healthz", "HTTP 200", 40.0, 99.5, 4, 0.0012)})
    data = StatusData(repository=repository, overlay=overlay, checker=checker, clock=clock.seconds)
    by_id = _by_id(data.render())
    assert by_id["a"]["health"] == {
        "state": "up",
        "check": "http:/healthz",
        "reason": "HTTP 200",
        "since_age": 60.0,
        "last_check_age": 0.5,
        "rtt_ms": 1.2,
    }
    assert by_id["b"]["health"] is None


def test_status_order_worst_first() -> None:
    """
    Each status applies where the table, the overlay's sources and the load
    say so, the worst winning: deleted over maint over down over ejected
    over drain over full over up; only C{up} is routable.
    """
    clock = Clock()
    overlay = StateOverlay()
    admin = AdminStates(overlay)
    breaker = CircuitBreaker(overlay, clock, failures=1)
    rows = [
        backend("deleted", deleted=True),
        backend("maint-and-down", healthy=False),
        backend("down-table", healthy=False),
        backend("down-other-source"),
        backend("ejected"),
        backend("drain-table", draining=True),
        backend("drain-admin"),
        backend("full", hard_limit=1),
        backend("up", hard_limit=2),
    ]
    repository = InMemoryBackendRepository(rows)
    load = LoadTable()
    load.acquire(rows[7])
    load.acquire(rows[8])
    admin.set("deleted", AdminState("maint"))
    admin.set("maint-and-down", AdminState("maint", reason="disk swap"))
    overlay.setVerdict("down-other-source", "peer", UNAVAILABLE)
    breaker.connectFailed("ejected")
    admin.set("drain-admin", AdminState("drain", deadline=1000.0 + 90.0, since=1000.0 - 30.0))
    data = StatusData(
        repository=repository,
        load=load,
        overlay=overlay,
        admin=admin,
        breaker=breaker,
        clock=clock.seconds,
        wallClock=lambda: 1000.0,
    )
    by_id = _by_id(data.render())
    got = {bid: entry["status"] for bid, entry in by_id.items()}
    assert got == {
        "deleted": "deleted",
        "maint-and-down": "maint",
        "down-table": "down",
        "down-other-source": "down",
        "ejected": "ejected",
        "drain-table": "drain",
        "drain-admin": "drain",
        "full": "full",
        "up": "up",
    }
    assert [bid for bid, entry in by_id.items() if entry["routable"]] == ["up"]
    assert by_id["ejected"]["breaker"] == "open"
    assert by_id["up"]["breaker"] == "closed"
    assert by_id["maint-and-down"]["admin"]["reason"] == "disk swap"
    assert by_id["drain-admin"]["admin"] == {
        "state": "drain",
        "reason": "",
        "since_age": 30.0,
        "deadline_in": 90.0,
    }
    assert by_id["up"]["admin"]["state"] == "ready"
    assert by_id["drain-admin"]["verdicts"] == {"admin": "no-new-clients"}
    breaker.stop()


def test_admin_and_breaker_from_the_overlay_alone() -> None:
    """
    Without the admin states or the breaker, their overlay verdicts still
    decide the status, and the admin state is read from the verdict.
    """
    repository, _, overlay, clock = _parts(backend("m"), backend("d"), backend("e"))
    overlay.setVerdict("m", "admin", UNAVAILABLE)
    overlay.setVerdict("d", "admin", NO_NEW_CLIENTS)
    overlay.setVerdict("e", "breaker", UNAVAILABLE)
    by_id = _by_id(StatusData(repository=repository, overlay=overlay, clock=clock.seconds).render())
    assert {k: v["status"] for k, v in by_id.items()} == {
        "m": "maint",
        "d": "drain",
        "e": "ejected",
    }
    assert (by_id["m"]["admin"]["state"], by_id["d"]["admin"]["state"]) == ("maint", "drain")
    assert by_id["e"]["admin"] is None and by_id["e"]["breaker"] is None


class _Admission:
    open = 57
    maxConnections = 1000


class _Repository:
    """
    A repository like the SQLite one: the reload bookkeeping attributes.
    """

    def __init__(self, inner: InMemoryBackendRepository) -> None:
        self.inner = inner
        self.lastReloadOk: Optional[float] = None
        self.lastError: Optional[str] = None
        self.skipped: Tuple[Tuple[str, str], ...] = ()

    def current(self) -> Any:
        return self.inner.current()


def test_connections_bindings_reload_and_table_age() -> None:
    """
    The open connections and the cap come from the admission, the binding
    count from the binding table, the reload status and the table's age
    from the repository's last good load (on the given clock), with the
    last error and the skipped rows (at most 20 listed, all counted).
    """
    clock = Clock()
    clock.advance(50.0)
    repository = _Repository(InMemoryBackendRepository([backend("a")]))
    bindings = BindingTable()
    bindings.bind(("192.0.2.1", "app"), "a", 0.0)
    bindings.bind(("192.0.2.2", "app"), "a", 0.0)
    data = StatusData(
        repository=repository, bindings=bindings, admission=_Admission(), clock=clock.seconds
    )
    repository.lastReloadOk = 45.0
    body = data.render()
    assert body["connections"] == {"open": 57, "max": 1000}
    assert body["bindings"] == 2
    assert body["reload"] == {
        "ok": True,
        "last_ok_age": 5.0,
        "last_error": None,
        "skipped": 0,
        "skipped_rows": [],
    }
    assert (body["table"]["age"], body["table"]["backends"], body["table"]["routable"]) == (
        5.0,
        1,
        1,
    )
    repository.lastError = "database is locked"
    repository.skipped = tuple((f"row-{i}", "port: 0 is not a port") for i in range(25))
    clock.advance(30.0)
    reload = data.render()["reload"]
    assert (reload["ok"], reload["last_error"], reload["last_ok_age"]) == (
        False,
        "database is locked",
        35.0,
    )
    assert reload["skipped"] == 25
    assert reload["skipped_rows"][0] == {"id": "row-0", "reason": "port: 0 is not a port"}
    assert len(reload["skipped_rows"]) == 20


def test_parts_not_given_are_null() -> None:
    """
    Without parts the JSON still renders, with C{null} where a part is
    missing, and it is JSON-serialisable.
    """
    body = StatusData(region="sa", version="9.9").render()
    assert body["backends"] == []
    assert (body["bindings"], body["connections"], body["geo"]) == (None, None, None)
    assert (body["reload"], body["table"]) == (None, None)
    assert (body["region"], body["version"], body["service"]) == ("sa", "9.9", "edgeproxy")
    json.dumps(body)
    assert json.loads(json.dumps(StatusData(repository=InMemoryBackendRepository()).render()))[
        "reload"
    ] == {"ok": None, "last_ok_age": None, "last_error": None, "skipped": 0, "skipped_rows": []}


def test_table_change_age() -> None:
    """
    The time since the table's content last changed: from the listener
    when it is wired, else from the next render, which notices it.
    """
    clock = Clock()
    repository = InMemoryBackendRepository([backend("a")])
    data = StatusData(repository=repository, clock=clock.seconds)
    repository.addListener(data.routingTableChanged)
    clock.advance(100.0)
    assert data.render()["table"]["changed_age"] == 100.0
    # The table's version token is a string: a JavaScript number would
    # round an integer past 2**53.
    assert data.render()["table"]["version"] == str(repository.current().version)
    repository.set([backend("a"), backend("b")])
    clock.advance(4.0)
    assert data.render()["table"]["changed_age"] == 4.0
    unwired = StatusData(repository=repository, clock=clock.seconds)
    clock.advance(10.0)
    repository.set([backend("c")])
    clock.advance(1.0)
    # Noticed (late) at this render, and counted from then.
    assert unwired.render()["table"]["changed_age"] == 0.0
    clock.advance(2.0)
    assert unwired.render()["table"]["changed_age"] == 2.0


def test_listing_is_bounded_worst_first() -> None:
    """
    Past C{maxBackends}, only that many are listed in full: the worst first
    (every down one here), shown in table order; the summary counts all.
    """
    rows = [backend(f"b{i:02}") for i in range(30)]
    repository, _, overlay, clock = _parts(*rows)
    for i in (3, 17, 29):
        overlay.setVerdict(f"b{i:02}", "health", UNAVAILABLE)
    data = StatusData(repository=repository, overlay=overlay, clock=clock.seconds, maxBackends=5)
    body = data.render()
    assert [b["id"] for b in body["backends"]] == ["b00", "b01", "b03", "b17", "b29"]
    assert body["summary"]["backends"] == 30
    assert body["summary"]["listed"] == 5
    assert body["summary"]["statuses"]["down"] == 3
    assert MAX_BACKENDS >= 100
    with pytest.raises(ValueError):
        StatusData(maxBackends=0)


# --- the geo mix ---------------------------------------------------------------


def _decide(metrics: MetricsStore, tier: str, country: str, n: int = 1) -> None:
    metrics.increment("routing_decisions", tier, n)
    metrics.increment("routing_client_countries", country, n)


def test_geo_mix_counts_only_the_window() -> None:
    """
    The geo mix is the growth of the counters over the last 5 minutes:
    decisions older than the window drop out, tiers come as shares, and
    the seconds covered are said.
    """
    clock = Clock()
    metrics = MetricsStore()
    data = StatusData(metrics=metrics, clock=clock.seconds)
    _decide(metrics, "3", "US", 40)  # before the window, once it has moved on
    for _ in range(31):
        clock.advance(10.0)
        data.sample()
    _decide(metrics, "0", "BR", 3)
    _decide(metrics, "1", "AR", 1)
    metrics.increment("connections_closed", "client-closed", 4)
    geo = data.render()["geo"]
    assert geo["window"] == 300.0
    assert geo["decisions"] == 4
    assert [(t["tier"], t["count"], t["share"]) for t in geo["tiers"]] == [
        (0, 3, 0.75),
        (1, 1, 0.25),
        (2, 0, 0.0),
        (3, 0, 0.0),
    ]
    assert geo["tiers"][0]["name"] == "same country"
    assert [(c["country"], c["count"]) for c in geo["countries"]] == [("BR", 3), ("AR", 1)]
    assert geo["closed"] == {"client-closed": 4}


def test_geo_mix_before_the_window_is_full() -> None:
    """
    Until 5 minutes have passed, the mix covers the time since the data
    was made (its first sample), and says so.
    """
    clock = Clock()
    metrics = MetricsStore()
    data = StatusData(metrics=metrics, clock=clock.seconds)
    clock.advance(42.0)
    _decide(metrics, "0", "BR", 2)
    geo = data.render()["geo"]
    assert (geo["window"], geo["decisions"]) == (42.0, 2)


def test_geo_mix_top_countries() -> None:
    """
    Five countries are named, by count then code; the rest are summed, and
    clients without geo are counted apart; shares are of all clients.
    """
    grown = {("routing_client_countries", c): n for c, n in zip("ABCDEFG", (5, 9, 9, 1, 2, 3, 4))}
    grown[("routing_client_countries", "")] = 7
    geo = geo_mix(12.0, grown)
    assert [(c["country"], c["count"]) for c in geo["countries"]] == [
        ("B", 9),
        ("C", 9),
        ("A", 5),
        ("G", 4),
        ("F", 3),
    ]
    assert (geo["other_countries"], geo["no_geo"], geo["clients"]) == (3, 7, 40)
    assert geo["countries"][0]["share"] == 0.225
    assert geo["decisions"] == 0
    assert all(t["share"] is None for t in geo["tiers"])


def test_ring_is_bounded() -> None:
    """
    However long it runs and however often it is asked (a timer and every
    poll), the ring holds at most C{window / interval} samples plus two,
    spaced by about the interval, and none older than the window but the
    baseline.
    """
    clock = Clock()
    metrics = MetricsStore()
    ring = RecentCounters(metrics, clock.seconds, interval=10.0, window=300.0)
    bound = ring.samples.maxlen
    assert bound is not None and bound <= 300 / 10 + 5
    for step in range(5000):
        clock.advance(0.7)
        metrics.increment("routing_decisions", str(step % 4))
        ring.sample()
        if step % 3 == 0:
            ring.deltas()
        assert len(ring.samples) <= bound
    times = [at for at, _ in ring.samples]
    assert times[-1] - times[0] <= 300.0
    assert all(later - earlier >= 9.0 for earlier, later in zip(times, times[1:]))
    assert len(ring.samples) >= 30


def test_ring_keeps_only_its_counters() -> None:
    """
    A sample keeps only the counters named (not, say, the per-backend
    connect failures), so its size does not grow with the table.
    """
    clock = Clock()
    metrics = MetricsStore()
    for i in range(1000):
        metrics.increment("backend_connect_failures", f"b{i}")
    _decide(metrics, "0", "BR")
    ring = RecentCounters(metrics, clock.seconds)
    assert set(ring.samples[-1][1]) == {
        ("routing_decisions", "0"),
        ("routing_client_countries", "BR"),
    }


def test_deltas_after_a_counter_reset() -> None:
    """
    A counter lower than in the baseline (a reset) counts what it has now,
    never a negative number.
    """
    clock = Clock()
    values = {("routing_decisions", "0"): 10}

    class Store:
        def counters(self) -> Mapping[Tuple[str, str], int]:
            return dict(values)

    ring = RecentCounters(Store(), clock.seconds)
    values[("routing_decisions", "0")] = 3
    clock.advance(1.0)
    assert ring.deltas() == (1.0, {("routing_decisions", "0"): 3})


def test_sample_never_raises() -> None:
    """
    A failing counter store (sample runs from a timer) is logged, not
    raised, and the ring keeps what it had.
    """
    clock = Clock()
    fail = [False]

    class Store:
        def counters(self) -> Mapping[Tuple[str, str], int]:
            if fail[0]:
                raise RuntimeError("boom")
            return {}

    data = StatusData(metrics=Store(), clock=clock.seconds)
    fail[0] = True
    clock.advance(60.0)
    log = LogCapture().start()
    try:
        data.sample()
    finally:
        log.stop()
    assert data.recent is not None and len(data.recent.samples) == 1
    assert len(log.failures()) == 1


@given(
    st.lists(
        st.tuples(
            st.floats(min_value=0.0, max_value=40.0),
            st.sampled_from(["0", "1", "2", "3"]),
            st.integers(min_value=0, max_value=5),
        ),
        max_size=80,
    )
)
def test_geo_mix_matches_a_recount(steps: List[Tuple[float, str, int]]) -> None:
    """
    Whatever the timing of samples and decisions, the decisions of the mix
    are exactly those made since its baseline sample, which is the oldest
    sample within the window, and the window it reports is its age.
    """
    clock = Clock()
    metrics = MetricsStore()
    ring = RecentCounters(metrics, clock.seconds, interval=10.0, window=60.0)
    made: List[Tuple[float, int]] = []
    for wait, tier, n in steps:
        clock.advance(wait)
        ring.sample()
        metrics.increment("routing_decisions", tier, n)
        made.append((clock.seconds(), n))
    seconds, grown = ring.deltas()
    now = clock.seconds()
    assert 0.0 <= seconds <= 60.0
    baseline = min((at for at, _ in ring.samples), key=lambda at: abs(now - seconds - at))
    assert abs(now - seconds - baseline) < 1e-6
    assert baseline == min(at for at, _ in ring.samples if at >= now - 60.0)
    # A decision at the very instant of the baseline sample came after it
    # (each step samples, then decides).
    expected = sum(n for at, n in made if at >= baseline)
    assert sum(v for (name, _), v in grown.items() if name == "routing_decisions") == expected


# --- the resources on a real site ----------------------------------------------


class _Served:
    def __init__(self, root: Resource) -> None:
        self.listening: Any = cast(Any, reactor).listenTCP(0, Site(root), interface="127.0.0.1")
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.http = HTTPClient(Agent(reactor, pool=self.pool))

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.listening.getHost().port}{path}"

    @inlineCallbacks
    def get(self, path: str, method: str = "GET") -> Any:
        response = yield self.http.request(method, self.url(path))
        body = yield response.content()
        return response, body

    @inlineCallbacks
    def stop(self) -> Any:
        yield self.pool.closeCachedConnections()
        yield self.listening.stopListening()


def _header(response: Any, name: str) -> Optional[str]:
    values = response.headers.getRawHeaders(name)
    return values[0] if values else None


def _hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


@pytest_twisted.inlineCallbacks
def test_page_headers_and_policy() -> Any:
    """
    C{GET /} is the HTML page with a Content-Security-Policy that allows
    only its own inline script and style (by their SHA-256, which match
    the page's) and polls to the same origin, plus nosniff, no framing
    and no referrer; C{HEAD} has the same headers; a path below it is a
    JSON 404.
    """
    root = AdminRoot()
    root.putChild(b"", StatusResource())
    served = _Served(root)
    try:
        response, body = yield served.get("/")
        assert response.code == 200
        assert _header(response, "Content-Type") == "text/html; charset=utf-8"
        assert _header(response, "X-Content-Type-Options") == "nosniff"
        assert _header(response, "X-Frame-Options") == "DENY"
        assert _header(response, "Referrer-Policy") == "no-referrer"
        policy = _header(response, "Content-Security-Policy")
        assert policy is not None
        directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
        page = body.decode("utf-8")
        scripts = re.findall(r"<script>(.*?)</script>", page, re.S)
        styles = re.findall(r"<style>(.*?)</style>", page, re.S)
        assert len(scripts) == 1 and len(styles) == 1
        assert directives["default-src"] == "'none'"
        assert directives["script-src"] == _hash(scripts[0])
        assert directives["style-src"] == _hash(styles[0])
        assert directives["connect-src"] == "'self'"
        assert directives["frame-ancestors"] == "'none'"
        assert "unsafe" not in policy and "http" not in policy
        assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
        assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in page
        assert 'data-source="/api/v1/status"' in page
        head, head_body = yield served.get("/", "HEAD")
        assert (head.code, head_body) == (200, b"")
        assert _header(head, "Content-Security-Policy") == policy
        missing, missing_body = yield served.get("/nope")
        assert missing.code == 404 and json.loads(missing_body)["status"] == 404
    finally:
        yield served.stop()


def test_script_inserts_no_html() -> None:
    """
    The page's script never parses data as HTML: no C{innerHTML},
    C{outerHTML}, C{insertAdjacentHTML}, C{document.write} or C{eval};
    values go in with C{textContent}.
    """
    page = status_page()[0].decode()
    script = re.findall(r"<script>(.*?)</script>", page, re.S)[0]
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script
    assert "textContent" in script


def test_page_source_is_escaped() -> None:
    """
    The JSON path given to the page is HTML-escaped in its attribute, and
    the interval must be positive.
    """
    page = status_page('/x"><script>alert(1)</script>', 0.5)[0].decode()
    assert "<script>alert(1)" not in page
    assert 'data-source="/x&quot;&gt;&lt;script&gt;' in page
    assert 'data-interval="500"' in page
    with pytest.raises(ValueError):
        status_page(interval=0)


@pytest_twisted.inlineCallbacks
def test_json_resource_headers_and_cache() -> Any:
    """
    C{GET /api/v1/status} is the JSON of L{StatusData.render}, C{no-store}
    and nosniff; within C{maxAge} seconds it is served again without being
    assembled again, and after that it is assembled afresh.
    """
    clock = Clock()
    repository, _, overlay, _ = _parts(backend("gru-1"))
    data = StatusData(repository=repository, overlay=overlay, clock=clock.seconds)
    root = AdminRoot()
    _, resource = mount_status(root, data, maxAge=1.0)
    served = _Served(root)
    try:
        response, body = yield served.get("/api/v1/status")
        assert response.code == 200
        assert _header(response, "Content-Type") == "application/json"
        assert _header(response, "Cache-Control") == "no-store"
        assert _header(response, "X-Content-Type-Options") == "nosniff"
        assert _by_id(json.loads(body))["gru-1"]["status"] == "up"
        overlay.setVerdict("gru-1", "health", UNAVAILABLE)
        clock.advance(0.5)
        again, cached = yield served.get("/api/v1/status")
        assert (again.code, cached, resource.renders) == (200, body, 1)
        assert _header(again, "Cache-Control") == "no-store"
        clock.advance(0.6)
        _, fresh = yield served.get("/api/v1/status")
        assert _by_id(json.loads(fresh))["gru-1"]["status"] == "down"
        assert resource.renders == 2
        below, _ = yield served.get("/api/v1/status/more")
        assert below.code == 404
        post, post_body = yield served.get("/api/v1/status", "POST")
        assert post.code == 405 and json.loads(post_body)["status"] == 405
        _, listed = yield served.get("/")
        assert b"<!DOCTYPE html>" in listed
    finally:
        yield served.stop()


@pytest_twisted.inlineCallbacks
def test_json_resource_failure_is_a_json_500() -> Any:
    """
    If assembling the status raises, the answer is a JSON 500 (logged),
    and the next request tries again.
    """
    data = StatusData()
    calls: List[int] = []

    def broken() -> Dict[str, Any]:
        calls.append(1)
        raise RuntimeError("boom")

    data.render = broken  # type: ignore[method-assign]
    root = AdminRoot()
    mount_status(root, data, maxAge=60.0)
    served = _Served(root)
    log = LogCapture().start()
    try:
        response, body = yield served.get("/api/v1/status")
        assert response.code == 500 and json.loads(body)["status"] == 500
        yield served.get("/api/v1/status")
        assert len(calls) == 2
    finally:
        log.stop()
        yield served.stop()
    assert len(log.failures()) == 2


class _Backends(JSONResource):
    def render_GET(self, request: Any) -> bytes:
        return json_body(request, 200, {"backends": []})


@pytest_twisted.inlineCallbacks
def test_mount_reuses_the_api_tree() -> Any:
    """
    L{mount_status} puts the page at C{/} and the JSON at
    C{/api/v1/status} next to what the API already has under
    C{/api/v1}; other paths are still JSON 404s.
    """
    root = AdminRoot()
    api = JSONResource()
    v1 = JSONResource()
    root.putChild(b"api", api)
    api.putChild(b"v1", v1)
    v1.putChild(b"backends", _Backends())
    mount_status(root, StatusData())
    assert root.children[b"api"] is api and api.children[b"v1"] is v1
    served = _Served(root)
    try:
        status, _ = yield served.get("/api/v1/status")
        backends, body = yield served.get("/api/v1/backends")
        page, _ = yield served.get("/")
        missing, _ = yield served.get("/api/v2/status")
        assert (status.code, backends.code, page.code, missing.code) == (200, 200, 200, 404)
        assert json.loads(body) == {"backends": []}
    finally:
        yield served.stop()


def test_page_arguments() -> None:
    """
    The page's constructor arguments reach the HTML (a custom JSON path
    and interval).
    """
    resource = StatusResource("/status.json", 5.0)
    assert b'data-source="/status.json"' in resource.page
    assert b'data-interval="5000"' in resource.page
    assert "connect-src 'self'" in resource.policy
