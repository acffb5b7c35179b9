"""
Tests for the registration and admin API (L{edgeproxy.control.api}) on real
loopback sockets, over a real SQLite routing table made with
C{conf/schema.sql}: every endpoint, a registration routed on the very next
connection, heartbeat expiry, the token rules, FAULTS F11 item by item
(each a JSON error with the right status and the table unchanged) and F24
(no token, a wrong token, a burst, a body refused while it arrives, a slow
body).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, cast

import pytest
import pytest_twisted
from faultkit import Client, Identify, LogCapture, connect, listen, sleep, wait_until
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import DeferredSemaphore, gatherResults, inlineCallbacks
from twisted.internet.task import Clock
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from zope.interface.verify import verifyObject

from edgeproxy.config import ProxySettings
from edgeproxy.control.admin import admin_site
from edgeproxy.control.api import (
    MAX_DEPTH,
    REGISTER_SCHEMA,
    STATE_SCHEMA,
    Api,
    install_api,
    known_regions,
    parse_json,
)
from edgeproxy.control.auth import ApiAuth, parse_tokens
from edgeproxy.control.metrics import EdgeproxyCollector, Exposition
from edgeproxy.geo import DEFAULT_REGIONS
from edgeproxy.interfaces import (
    UNAVAILABLE,
    BackendWriteError,
    IBackendRepository,
    IBackendWriter,
)
from edgeproxy.metrics import MetricsStore
from edgeproxy.net.health import HealthChecker
from edgeproxy.net.proxy import ProxyFactory
from edgeproxy.routing.admin import AdminState, AdminStates
from edgeproxy.routing.breaker import CircuitBreaker
from edgeproxy.routing.heartbeats import SOURCE, HeartbeatExpiry
from edgeproxy.routing.router import Router
from edgeproxy.stores.sqlite import SqliteBackendRepository, SqliteBackendWriter, schema_sql
from edgeproxy.stores.statefile import StateFile, load_states
from edgeproxy.testing import (
    BindingTable,
    InMemoryBackendRepository,
    LoadTable,
    StateOverlay,
    backend,
)

FULL = "admin-token-0123456789abcdef"
ONLY_REGISTER = "register-token-0123456789ab"
TOKENS = parse_tokens(f"{FULL}\n{ONLY_REGISTER} register\n")


def hand_row(backend_id: str, **overrides: object) -> Dict[str, object]:
    """
    A row the operator wrote by hand (no heartbeat_at).
    """
    row: Dict[str, object] = {
        "id": backend_id,
        "app": "web",
        "region": "sa",
        "country": "BR",
        "wg_ip": "10.50.1.1",
        "port": 8080,
        "healthy": 1,
        "weight": 1,
        "soft_limit": 10,
        "hard_limit": 0,
        "deleted": 0,
    }
    row.update(overrides)
    return row


def body(backend_id: object = "reg-1", **overrides: object) -> Dict[str, object]:
    """
    The original edgeProxy's registration body.
    """
    fields: Dict[str, object] = {
        "id": backend_id,
        "app": "web",
        "region": "eu",
        "country": "FR",
        "ip": "10.60.0.1",
        "port": 9000,
        "weight": 2,
        "soft_limit": 100,
        "hard_limit": 150,
    }
    fields.update(overrides)
    return {k: v for k, v in fields.items() if v is not _DROP}


_DROP = object()


class _ClockedReactor:
    """
    The real reactor (threads, sockets, timers) with a test clock's
    C{seconds()}: heartbeat times and their expiry follow C{clock}.
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def seconds(self) -> float:
        return self.clock.seconds()

    def __getattr__(self, name: str) -> Any:
        return getattr(reactor, name)


class Harness:
    """
    The admin site with the API on 127.0.0.1 over a SQLite routing table
    in C{tmp_path}, the real router, overlay, admin states (in a state
    file), breaker, health checker (never started) and heartbeat expiry;
    a treq client.
    """

    def __init__(
        self,
        tmp_path: Path,
        rows: Sequence[Mapping[str, object]] = (),
        *,
        tokens: Any = TOKENS,
        openReads: bool = True,
        clock: Optional[Clock] = None,
        requestTimeout: float = 10.0,
        maxConnections: int = 64,
        **apiOverrides: Any,
    ) -> None:
        self.db = tmp_path / "routing.db"
        conn = sqlite3.connect(self.db)
        conn.executescript(schema_sql())
        for row in rows:
            names = ", ".join(row)
            conn.execute(
                f"INSERT INTO backends ({names}) VALUES ({', '.join('?' for _ in row)})",
                tuple(row.values()),
            )
        conn.commit()
        conn.close()
        self.clock = clock
        self.time: Any = cast(Any, _ClockedReactor(clock) if clock is not None else reactor)
        self.metrics = MetricsStore()
        self.repository = SqliteBackendRepository(
            str(self.db), reactor=self.time, busy_timeout=0.5, metrics=self.metrics
        )
        self.repository.loadInitial()
        self.writer = SqliteBackendWriter(self.repository, busy_timeout=0.5)
        self.overlay = StateOverlay()
        self.load = LoadTable(self.metrics)
        self.breaker = CircuitBreaker(self.overlay, Clock(), failures=1)
        self.health = HealthChecker(
            Clock(), self.overlay, probe=lambda b, s: cast(Any, None), metrics=self.metrics
        )
        self.health.update(self.repository.current())
        self.repository.addListener(self.health.routingTableChanged)
        self.bindings = BindingTable(ttl=600.0)
        self.router = Router(
            self.repository,
            self.bindings,
            None,
            self.metrics,
            "sa",
            self.time,
            overlay=self.overlay,
            load=self.load,
            breaker=self.breaker,
        )
        self.states = AdminStates(self.overlay)
        self.stateFile = StateFile(str(tmp_path / "state.json"), self.states, reactor)
        self.stateFile.loadInitial()
        self.expiry = HeartbeatExpiry(self.repository, self.overlay, self.time, ttl=30.0)
        self.repository.addListener(self.expiry.routingTableChanged)
        self.auth = ApiAuth(tokens, openReads=openReads, metrics=self.metrics)
        collaborators: Dict[str, Any] = {
            "writer": self.writer,
            "router": self.router,
            "admin": self.stateFile,
            "overlay": self.overlay,
            "health": self.health,
            "breaker": self.breaker,
            "load": self.load,
            "expiry": self.expiry,
            "regions": known_regions(DEFAULT_REGIONS),
            "local_region": "sa",
            "metrics": self.metrics,
        }
        collaborators.update(apiOverrides)
        self.api = Api(auth=self.auth, repository=self.repository, clock=self.time, **collaborators)
        exposition = Exposition(
            EdgeproxyCollector(self.metrics, repository=self.repository, load=self.load),
            reactor=reactor,
            maxAge=0.0,
        )
        self.site = admin_site(
            exposition,
            reactor=reactor,
            metrics=self.metrics,
            requestTimeout=requestTimeout,
            maxConnections=maxConnections,
            health=lambda: {"backends": len(self.repository.current())},
        )
        install_api(self.site.resource, self.api)
        self.listening: Any = cast(Any, reactor).listenTCP(0, self.site, interface="127.0.0.1")
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 16
        self.pool.retryAutomatically = False
        self.http = HTTPClient(Agent(reactor, pool=self.pool))
        self.extra: List[Any] = []

    @property
    def port(self) -> int:
        return int(self.listening.getHost().port)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @inlineCallbacks
    def call(
        self,
        method: str,
        path: str,
        payload: Any = None,
        *,
        token: Optional[str] = FULL,
        raw: Optional[bytes] = None,
        headers: Optional[Dict[bytes, List[bytes]]] = None,
    ) -> Any:
        """
        One request; fires with (status, JSON body or None, response headers).
        """
        sent = Headers(headers or {})
        if token is not None:
            sent.setRawHeaders(b"authorization", [b"Bearer " + token.encode()])
        data = raw
        if payload is not None:
            data = json.dumps(payload).encode()
            if not sent.hasHeader(b"content-type"):
                sent.setRawHeaders(b"content-type", [b"application/json"])
        response = yield self.http.request(method, self.url(path), headers=sent, data=data)
        content = yield response.content()
        parsed = json.loads(content) if content else None
        return response.code, parsed, response.headers

    def table(self) -> Tuple[List[str], List[Tuple[Any, ...]]]:
        """
        The columns and every row of the file's backends table, read directly.
        """
        conn = sqlite3.connect(self.db)
        try:
            columns = [r[1] for r in conn.execute("PRAGMA table_info(backends)")]
            rows = conn.execute("SELECT * FROM backends ORDER BY id").fetchall()
        finally:
            conn.close()
        return columns, rows

    def row(self, backend_id: str) -> Optional[Dict[str, Any]]:
        columns, rows = self.table()
        for values in rows:
            if values[0] == backend_id:
                return dict(zip(columns, values))
        return None

    @inlineCallbacks
    def stop(self) -> Any:
        yield self.pool.closeCachedConnections()
        yield self.listening.stopListening()
        for thing in self.extra:
            result = thing.stop() if hasattr(thing, "stop") else thing.stopListening()
            if result is not None:
                yield result


def assert_error(code: int, payload: Any, expected: int) -> None:
    """
    A JSON error of the expected status, in the documented shape.
    """
    assert code == expected, payload
    assert isinstance(payload, dict) and set(payload) == {"error", "detail", "status"}, payload
    assert payload["status"] == expected and isinstance(payload["error"], str)


# --- registration -----------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_registration_is_routed_on_the_very_next_connection(tmp_path: Path):
    """
    Before the registration a client of the proxy finds no backend; the
    201 comes once the table in force has the backend, so the very next
    connection through a real proxy (the real router over the SQLite
    repository) reaches it -- no wait for a periodic reload.
    """
    h = Harness(tmp_path)
    target = listen(reactor, Identify, ident=b"reg-1")
    proxy = ProxyFactory(
        h.router, reactor, ProxySettings(connect_timeout=2.0), h.metrics, app="web"
    )
    proxied = cast(Any, reactor).listenTCP(0, proxy, interface="127.0.0.1")
    h.extra += [target, proxied]
    logs = LogCapture().start()
    try:
        early = Client(reactor)
        yield connect(reactor, int(proxied.getHost().port), early)
        yield early.wait_closed()
        assert early.received == b""

        code, answer, _ = yield h.call(
            "POST",
            "/api/v1/register",
            body(ip="127.0.0.1", port=target.port, region="sa", country="BR"),
        )
        assert code == 201, answer
        assert answer["id"] == "reg-1" and answer["registered"] is True
        assert answer["available"] is True

        client = Client(reactor)
        yield connect(reactor, int(proxied.getHost().port), client)
        yield client.wait_for(len(b"reg-1\n"))
        assert bytes(client.received) == b"reg-1\n"
        client.close()
        yield client.wait_closed()
        assert logs.failures() == []
    finally:
        logs.stop()
        yield h.stop()


@pytest_twisted.inlineCallbacks
def test_register_answer_row_and_defaults(tmp_path: Path):
    """
    The original body is accepted (201, the backend as JSON, C{ip} as the
    address); the row is in the file with heartbeat_at; optional fields
    take the schema's defaults (weight 1, soft limit 100, no hard limit,
    no country); GET /api/v1/backends/{id} shows the same backend.
    """
    h = Harness(tmp_path)
    try:
        code, answer, headers = yield h.call("POST", "/api/v1/register", body())
        assert code == 201
        assert headers.getRawHeaders("content-type") == ["application/json"]
        assert {k: answer[k] for k in ("id", "app", "region", "country", "ip", "port")} == {
            "id": "reg-1",
            "app": "web",
            "region": "eu",
            "country": "FR",
            "ip": "10.60.0.1",
            "port": 9000,
        }
        assert (answer["weight"], answer["soft_limit"], answer["hard_limit"]) == (2, 100, 150)
        assert answer["message"] == "backend registered"
        row = h.row("reg-1")
        assert row is not None and row["wg_ip"] == "10.60.0.1" and row["heartbeat_at"] > 0
        assert row["healthy"] == 1 and row["deleted"] == 0

        minimal = {"id": "reg-2", "app": "web", "region": "sa", "ip": "10.60.0.2", "port": 80}
        code, answer, _ = yield h.call("POST", "/api/v1/register", minimal)
        assert code == 201
        assert (answer["weight"], answer["soft_limit"], answer["hard_limit"]) == (1, 100, 0)
        assert answer["country"] is None and answer["proxy_protocol"] == 0

        code, one, _ = yield h.call("GET", "/api/v1/backends/reg-2", token=None)
        assert code == 200 and one["id"] == "reg-2" and one["registered"] is True

        extended = dict(minimal, id="reg-3", proxy_protocol=2, health_check="http:/healthz")
        code, answer, _ = yield h.call("POST", "/api/v1/register", extended)
        assert code == 201
        assert answer["proxy_protocol"] == 2 and answer["health_check"] == "http:/healthz"
        assert h.metrics.counter("api_writes", "register") == 3
    finally:
        yield h.stop()


@pytest_twisted.inlineCallbacks
def test_heartbeat_endpoint(tmp_path: Path):
    """
    POST /api/v1/heartbeat/{id}: 200 and heartbeat_at moves on for a
    registered backend; 404 for an unknown id; 409 for a row written by
    hand (no heartbeat, never expires), whose row is untouched.
    """
    h = Harness(tmp_path, [hand_row("hand")])
    try:
        code, _, _ = yield h.call("POST", "/api/v1/register", body())
        assert code == 201
        first = h.row("reg-1")["heartbeat_at"]  # type: ignore[index]
        yield sleep(reactor, 0.02)
        code, answer, _ = yield h.call("POST", "/api/v1/heartbeat/reg-1", token=ONLY_REGISTER)
        assert code == 200, answer
        assert answer["id"] == "reg-1" and answer["status"] == "ok"
        assert answer["persisted"] is True
        assert h.row("reg-1")["heartbeat_at"] > first  # type: ignore[index]

        code, answer, _ = yield h.call("POST", "/api/v1/heartbeat/nope")
        assert_error(code, answer, 404)
        before = h.table()
        code, answer, _ = yield h.call("POST", "/api/v1/heartbeat/hand")
        assert_error(code, answer, 409)
        assert "written by hand" in answer["detail"]
        assert h.table() == before
        code, answer, _ = yield h.call("GET", "/api/v1/heartbeat/reg-1")
        assert_error(code, answer, 405)
    finally:
        yield h.stop()


@pytest_twisted.inlineCallbacks
def test_deregister_endpoint(tmp_path: Path):
    """
    DELETE /api/v1/backends/{id}: 200, the row is gone and the router no
    longer chooses it (at once); 404 for an unknown id; 409 for a row
    written by hand, which stays.
    """
    h = Harness(tmp_path, [hand_row("hand", app="other")])
    try:
        yield h.call("POST", "/api/v1/register", body(region="sa"))
        chosen = h.router.choose("203.0.113.9", "web")
        assert chosen is not None and chosen.id == "reg-1"
        h.router.release("reg-1")
        code, answer, _ = yield h.call("DELETE", "/api/v1/backends/reg-1", token=ONLY_REGISTER)
        assert code == 200 and answer == {"id": "reg-1", "deregistered": True}
        assert h.row("reg-1") is None
        assert h.router.choose("203.0.113.10", "web") is None

        code, answer, _ = yield h.call("DELETE", "/api/v1/backends/reg-1")
        assert_error(code, answer, 404)
        before = h.table()
        code, answer, _ = yield h.call("DELETE", "/api/v1/backends/hand")
        assert_error(code, answer, 409)
        assert "written by hand" in answer["detail"]
        assert h.table() == before
    finally:
        yield h.stop()


@pytest_twisted.inlineCallbacks
def test_locked_table(tmp_path: Path):
    """
    While another process holds the routing database's write lock past
    the busy timeout: a registration is a JSON 503 saying why and writes
    nothing; a heartbeat of a registered backend still counts on this POP
    (200, "persisted": false, its expiry cleared; one warning for the
    whole spell), one for an unknown backend is a 503; once the lock goes,
    heartbeats are written again.
    """
    clock = Clock()
    clock.advance(1_764_640_000)
    h = Harness(tmp_path, clock=clock)
    logs = LogCapture().start()
    try:
        yield h.call("POST", "/api/v1/register", body(region="sa"))
        clock.advance(31)
        h.expiry.check()
        assert "reg-1" in h.expiry.expired
        holder = sqlite3.connect(h.db, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            before = h.table()
            code, answer, _ = yield h.call("POST", "/api/v1/register", body("reg-2"))
            assert_error(code, answer, 503)
            assert "locked" in answer["detail"]
            for _ in range(2):
                code, answer, _ = yield h.call("POST", "/api/v1/heartbeat/reg-1")
                assert code == 200 and answer["persisted"] is False
            assert "reg-1" not in h.expiry.expired
            code, answer, _ = yield h.call("POST", "/api/v1/heartbeat/ghost")
            assert_error(code, answer, 503)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert h.table() == before
        warnings = [e for e in logs.events if "cannot be written" in str(e.get("log_format"))]
        assert len(warnings) == 1
        code, answer, _ = yield h.call("POST", "/api/v1/heartbeat/reg-1")
        assert code == 200 and answer["persisted"] is True
    finally:
        logs.stop()
        yield h.stop()


# --- reads --------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_list_backends_with_their_state(tmp_path: Path):
    """
    GET /api/v1/backends lists every row (hand-written and registered) with
    the table's health, the health check, the breaker, the admin state, the
    heartbeat and its age, the overlay's verdicts and the load; an unknown
    id is a JSON 404.
    """
    h = Harness(tmp_path, [hand_row("hand"), hand_row("sick", healthy=0, wg_ip="10.50.1.2")])
    try:
        yield h.call("POST", "/api/v1/register", body())
        h.load.acquire(h.repository.current().by_id["hand"])
        h.breaker.connectFailed("hand")
        h.states.set("sick", AdminState(state="maint", reason="disk"))
        code, answer, _ = yield h.call("GET", "/api/v1/backends", token=None)
        assert code == 200
        assert answer["total"] == 3 and answer["heartbeat_ttl"] == 30.0
        rows = {b["id"]: b for b in answer["backends"]}
        assert set(rows) == {"hand", "sick", "reg-1"}
        hand, sick, reg = rows["hand"], rows["sick"], rows["reg-1"]
        assert hand["registered"] is False and hand["heartbeat_at"] is None
        assert hand["last_heartbeat_secs"] is None and hand["heartbeat_expired"] is None
        assert hand["load"] == 1 and hand["breaker"] == "open"
        assert hand["verdict"] == "unavailable" and hand["verdicts"] == {"breaker": "unavailable"}
        assert hand["health"]["state"] == "unknown" and hand["health"]["check"] == "tcp"
        assert hand["available"] is False
        assert sick["healthy"] is False and sick["health"] is None
        assert sick["admin"]["state"] == "maint" and sick["admin"]["reason"] == "disk"
        assert reg["registered"] is True and reg["heartbeat_expired"] is False
        assert 0 <= reg["last_heartbeat_secs"] < 30 and reg["available"] is True
        assert reg["load"] == 0 and reg["breaker"] == "closed"

        code, one, _ = yield h.call("GET", "/api/v1/backends/hand")
        assert code == 200 and one == hand
        code, answer, _ = yield h.call("GET", "/api/v1/backends/ghost")
        assert_error(code, answer, 404)
        code, answer, _ = yield h.call("GET", "/api/v1/backends/hand/nothing")
        assert code == 404
    finally:
        yield h.stop()


@pytest_twisted.inlineCallbacks
def test_explain_endpoint(tmp_path: Path):
    """
    GET /api/v1/explain?ip=&app= answers the router's reasoning as JSON
    (geo, tier and score of each candidate); a missing or malformed address
    or limit is a 400.
    """
    h = Harness(tmp_path, [hand_row("a"), hand_row("b", wg_ip="10.50.1.2", region="eu")])
    try:
        code, answer, _ = yield h.call("GET", "/api/v1/explain?ip=203.0.113.5&app=web", token=None)
        assert code == 200
        assert answer["client_ip"] == "203.0.113.5" and answer["app"] == "web"
        assert [c["id"] for c in answer["candidates"]] == ["a", "b"]
        assert {"tier", "score", "load"} <= set(answer["candidates"][0])
        code, answer, _ = yield h.call("GET", "/api/v1/explain?ip=::1&limit=1")
        assert code == 200 and answer["app"] is None and len(answer["candidates"]) == 1
        for query in ("", "?ip=nope", "?ip=1.2.3.4&limit=0", "?ip=1.2.3.4&limit=x"):
            code, answer, _ = yield h.call("GET", "/api/v1/explain" + query)
            assert_error(code, answer, 400)
    finally:
        yield h.stop()


# --- admin ---------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_set_admin_state(tmp_path: Path):
    """
    PUT /api/v1/backends/{id}/state sets drain (with a deadline in seconds
    from now and a reason), maint and ready through the state file: applied
    at once (the router stops choosing a drained backend), written to the
    file, shown by GET; a deadline on anything but a drain, an unknown state
    or an unknown field is a 400; a register-only token gets a 403.
    """
    h = Harness(tmp_path, [hand_row("a")])
    try:
        code, answer, _ = yield h.call(
            "PUT", "/api/v1/backends/a/state", {"state": "drain", "deadline": 600, "reason": "k"}
        )
        assert code == 200, answer
        assert answer["admin"]["state"] == "drain" and answer["persisted"] is True
        assert answer["in_table"] is True
        assert answer["admin"]["deadline"] == pytest.approx(reactor.seconds() + 600, abs=5)
        assert h.router.choose("203.0.113.5", "web") is None
        saved = load_states(str(tmp_path / "state.json"))
        assert saved["a"].state == "drain" and saved["a"].reason == "k"
        code, one, _ = yield h.call("GET", "/api/v1/backends/a")
        assert one["admin"]["state"] == "drain" and one["verdict"] == "no-new-clients"

        for bad in (
            {"state": "maint", "deadline": 5},
            {"state": "sleep"},
            {"state": "ready", "extra": 1},
            {"state": "drain", "deadline": 0},
            {"state": "drain", "reason": "x" * 201},
            {},
        ):
            code, answer, _ = yield h.call("PUT", "/api/v1/backends/a/state", bad)
            assert_error(code, answer, 400)
        code, answer, headers = yield h.call(
            "PUT", "/api/v1/backends/a/state", {"state": "ready"}, token=ONLY_REGISTER
        )
        assert_error(code, answer, 403)
        assert 'error="insufficient_scope"' in headers.getRawHeaders("www-authenticate")[0]
        code, answer, _ = yield h.call("PUT", "/api/v1/backends/a/state", {"state": "ready"})
        assert code == 200
        assert h.router.choose("203.0.113.5", "web") is not None
        assert load_states(str(tmp_path / "state.json")) == {}
    finally:
        yield h.stop()


@pytest_twisted.inlineCallbacks
def test_set_admin_state_in_memory(tmp_path: Path):
    """
    With an L{AdminStates} (no state file) the state is set in memory and
    the answer says it was not persisted.
    """
    h = Harness(tmp_path, [hand_row("a")])
    h.api.admin = h.states
    try:
        code, answer, _ = yield h.call("PUT", "/api/v1/backends/a/state", {"state": "maint"})
        assert code == 200 and answer["persisted"] is None
        assert h.states.get("a").state == "maint"
    finally:
        yield h.stop()


@pytest_twisted.inlineCallbacks
def test_reload_endpoint(tmp_path: Path):
    """
    POST /api/v1/reload reloads now and answers the table's size; a table
    that cannot be read is a 503 saying so, the last good table staying.
    """
    h = Harness(tmp_path, [hand_row("a")])
    try:
        conn = sqlite3.connect(h.db)
        conn.execute(
            "INSERT INTO backends (id, app, region, wg_ip, port) VALUES ('b', 'web', 'sa', "
            "'10.0.0.2', 80)"
        )
        conn.commit()
        conn.close()
        code, answer, _ = yield h.call("POST", "/api/v1/reload")
        assert code == 200
        assert answer == {"ok": True, "backends": 2, "routable": 2, "skipped": 0}
        conn = sqlite3.connect(h.db)
        conn.execute("ALTER TABLE backends DROP COLUMN healthy")
        conn.commit()
        conn.close()
        code, answer, _ = yield h.call("POST", "/api/v1/reload")
        assert_error(code, answer, 503)
        assert answer["detail"]["ok"] is False and answer["detail"]["backends"] == 2
        assert "healthy" in answer["detail"]["reason"]
        assert len(h.repository.current()) == 2
        code, answer, _ = yield h.call("POST", "/api/v1/reload", token=ONLY_REGISTER)
        assert_error(code, answer, 403)
    finally:
        yield h.stop()


@pytest_twisted.inlineCallbacks
def test_missing_collaborators_are_501(tmp_path: Path):
    """
    A collaborator given as None makes its endpoints a JSON 501 (after the
    token check); the others keep working.
    """
    h = Harness(tmp_path, [hand_row("a")], writer=None, router=None, admin=None)
    try:
        for method, path, payload in (
            ("POST", "/api/v1/register", body()),
            ("POST", "/api/v1/heartbeat/a", None),
            ("DELETE", "/api/v1/backends/a", None),
            ("PUT", "/api/v1/backends/a/state", {"state": "drain"}),
            ("GET", "/api/v1/explain?ip=1.2.3.4", None),
        ):
            code, answer, _ = yield h.call(method, path, payload)
            assert_error(code, answer, 501)
        code, answer, _ = yield h.call("POST", "/api/v1/register", body(), token=None)
        assert_error(code, answer, 401)
        code, answer, _ = yield h.call("GET", "/api/v1/backends")
        assert code == 200 and answer["total"] == 1
    finally:
        yield h.stop()


@pytest_twisted.inlineCallbacks
def test_unknown_paths_and_methods_are_json(tmp_path: Path):
    """
    Unknown paths under /api are JSON 404s, methods an endpoint does not
    serve JSON 405s with Allow; /api/v1 lists the endpoints.
    """
    h = Harness(tmp_path)
    try:
        for path in ("/api", "/api/v2", "/api/v1/nope", "/api/v1/heartbeat", "/api/v1/reload/x"):
            code, answer, _ = yield h.call("GET", path)
            assert_error(code, answer, 404)
        code, answer, headers = yield h.call("GET", "/api/v1/register")
        assert_error(code, answer, 405)
        assert headers.getRawHeaders("allow") == ["POST"]
        code, answer, headers = yield h.call("POST", "/api/v1/backends")
        assert_error(code, answer, 405)
        assert headers.getRawHeaders("allow") == ["GET, HEAD"]
        response = yield h.http.head(h.url("/api/v1/backends"))
        assert response.code == 200 and (yield response.content()) == b""
        code, answer, _ = yield h.call("GET", "/api/v1")
        assert code == 200 and "POST /api/v1/register" in answer["endpoints"]
    finally:
        yield h.stop()


# --- heartbeat expiry ---------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_heartbeat_expiry_stops_routing_and_a_heartbeat_restores_it(tmp_path: Path):
    """
    A registered backend whose last heartbeat is older than the TTL stops
    receiving connections (the overlay's "heartbeat" verdict, nothing
    written to the table); a row written by hand never expires; a heartbeat
    through the API makes it routable again at once.
    """
    clock = Clock()
    clock.advance(1_764_640_000)
    h = Harness(tmp_path, [hand_row("hand", app="old")], clock=clock)
    try:
        code, _, _ = yield h.call("POST", "/api/v1/register", body(region="sa"))
        assert code == 201
        before = h.table()
        clock.advance(29)
        h.expiry.check()
        assert h.router.choose("203.0.113.1", "web").id == "reg-1"  # type: ignore[union-attr]
        h.router.release("reg-1")
        clock.advance(2)
        h.expiry.check()
        assert h.overlay.sources("reg-1") == {SOURCE: UNAVAILABLE}
        assert h.router.choose("203.0.113.2", "web") is None
        code, one, _ = yield h.call("GET", "/api/v1/backends/reg-1")
        assert one["heartbeat_expired"] is True and one["available"] is False
        assert one["last_heartbeat_secs"] == pytest.approx(31)
        assert h.table() == before

        clock.advance(10_000)
        h.expiry.check()
        assert h.router.choose("203.0.113.3", "old").id == "hand"  # type: ignore[union-attr]
        h.router.release("hand")
        assert "hand" not in h.expiry.expired

        code, _, _ = yield h.call("POST", "/api/v1/heartbeat/reg-1")
        assert code == 200
        assert h.overlay.sources("reg-1") == {}
        assert h.router.choose("203.0.113.4", "web").id == "reg-1"  # type: ignore[union-attr]
        h.router.release("reg-1")
    finally:
        yield h.stop()


def test_heartbeat_expiry_unit():
    """
    On an in-memory table: expiry after the TTL, recovery when the table's
    heartbeat_at moves on (a heartbeat written by another process) or a
    heartbeat is heard here, forgetting a backend that leaves the table or
    stops being a registered row, and a check that never raises.
    """
    clock = Clock()
    clock.advance(1000)
    repo = InMemoryBackendRepository(
        [backend("reg", heartbeat_at=1000.0), backend("hand")], clock=clock
    )
    overlay = StateOverlay()
    expiry = HeartbeatExpiry(repo, overlay, clock, ttl=5.0)
    repo.addListener(expiry.routingTableChanged)
    expiry.check()
    assert overlay.unavailable == frozenset()
    clock.advance(6)
    expiry.check()
    assert overlay.unavailable == {"reg"} and expiry.expired == {"reg"}
    repo.set([backend("reg", heartbeat_at=1005.5), backend("hand")])
    expiry.check()  # a heartbeat-only change notifies nobody: the next check sees it
    assert overlay.unavailable == frozenset()
    clock.advance(10)
    expiry.check()
    assert overlay.unavailable == {"reg"}
    expiry.beat("reg")
    assert overlay.unavailable == frozenset()
    assert expiry.lastBeat(repo.current().by_id["reg"]) == clock.seconds()
    clock.advance(6)
    expiry.check()
    assert overlay.unavailable == {"reg"}
    repo.set([backend("reg"), backend("hand")])
    expiry.check()  # a heartbeat-only change notifies nobody: the next check sees it
    assert overlay.unavailable == frozenset() and expiry.expired == frozenset()
    repo.set([backend("reg", heartbeat_at=0.0)])
    expiry.check()  # a heartbeat-only change notifies nobody: the next check sees it
    assert overlay.unavailable == {"reg"}
    repo.set([backend("hand")])
    expiry.check()  # a heartbeat-only change notifies nobody: the next check sees it
    assert overlay.unavailable == frozenset() and expiry.expired == frozenset()
    with pytest.raises(ValueError):
        HeartbeatExpiry(repo, overlay, clock, ttl=0)

    class Broken:
        def current(self) -> Any:
            raise RuntimeError("bug")

    logs = LogCapture().start()
    try:
        HeartbeatExpiry(cast(Any, Broken()), overlay, clock).check()
    finally:
        logs.stop()
    assert len(logs.failures()) == 1


def test_in_memory_repository_is_a_writer():
    """
    The in-memory repository implements the write port the same way:
    registered rows carry heartbeat_at, duplicates and invalid rows fail,
    rows added by hand are never heartbeated nor deleted, a write error
    fails every write.
    """
    clock = Clock()
    clock.advance(50)
    repo = InMemoryBackendRepository([backend("hand")], clock=clock)
    assert verifyObject(IBackendWriter, repo) and verifyObject(IBackendRepository, repo)
    row = {
        "id": "r",
        "app": "web",
        "region": "sa",
        "wg_ip": "10.0.0.1",
        "port": 80,
        "healthy": 1,
        "weight": 1,
        "soft_limit": 1,
        "hard_limit": 0,
        "deleted": 0,
    }
    d: Any = repo.register(row)
    assert d.result.heartbeat_at == 50.0
    failures: List[Any] = []
    repo.register(row).addErrback(failures.append)
    repo.register(dict(row, id="x", port=0)).addErrback(failures.append)
    assert [type(f.value).__name__ for f in failures] == [
        "DuplicateBackendError",
        "InvalidRowError",
    ]
    clock.advance(5)
    assert repo.heartbeat("r").result is True
    assert repo.current().by_id["r"].heartbeat_at == 55.0
    assert repo.heartbeat("hand").result is False and repo.deregister("hand").result is False
    assert repo.deregister("r").result is True and "r" not in repo.current().by_id
    assert repo.writes == [("register", "r"), ("heartbeat", "r"), ("deregister", "r")]
    repo.writeError = BackendWriteError("read-only")
    failed: List[Any] = []
    repo.register(dict(row, id="y")).addErrback(failed.append)
    assert failed and "y" not in repo.current().by_id


# --- tokens (F24) -------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_token_rules_over_the_wire(tmp_path: Path):
    """
    Writes without a token, or with a wrong one, are JSON 401s with
    WWW-Authenticate (and write nothing); a register-only token registers,
    heartbeats and deregisters but gets a 403 on admin endpoints; reads are
    open on a loopback listener.
    """
    h = Harness(tmp_path)
    try:
        before = h.table()
        for token in (None, "wrong-token-0123456789abcdef"):
            code, answer, headers = yield h.call("POST", "/api/v1/register", body(), token=token)
            assert_error(code, answer, 401)
            assert headers.getRawHeaders("www-authenticate")[0].startswith("Bearer")
        code, answer, _ = yield h.call(
            "POST",
            "/api/v1/register",
            body(),
            token=None,
            headers={b"authorization": [b"Basic " + FULL.encode()]},
        )
        assert_error(code, answer, 401)
        assert h.table() == before
        code, _, _ = yield h.call("POST", "/api/v1/register", body(), token=ONLY_REGISTER)
        assert code == 201
        code, _, _ = yield h.call("POST", "/api/v1/heartbeat/reg-1", token=ONLY_REGISTER)
        assert code == 200
        code, answer, _ = yield h.call("POST", "/api/v1/reload", token=ONLY_REGISTER)
        assert_error(code, answer, 403)
        code, _, _ = yield h.call("DELETE", "/api/v1/backends/reg-1", token=ONLY_REGISTER)
        assert code == 200
        for path in ("/api/v1/backends", "/health", "/metrics", "/"):
            response = yield h.http.get(h.url(path))
            yield response.content()
            assert response.code == 200, path
    finally:
        yield h.stop()


@pytest_twisted.inlineCallbacks
def test_reads_need_a_token_off_loopback(tmp_path: Path):
    """
    On a listener that is not on loopback (reads closed), /metrics,
    /health, / and the API's reads are JSON 401s without a valid token and
    answer with one (either scope).
    """
    h = Harness(tmp_path, openReads=False)
    try:
        for path in ("/api/v1/backends", "/health", "/metrics", "/", "/nope"):
            code, answer, _ = yield h.call("GET", path, token=None)
            assert_error(code, answer, 401)
            code, answer, _ = yield h.call("GET", path, token="wrong-token-0123456789ab")
            assert_error(code, answer, 401)
        for path in ("/api/v1/backends", "/health", "/metrics"):
            response = yield h.http.get(
                h.url(path),
                headers=Headers({b"authorization": [b"Bearer " + ONLY_REGISTER.encode()]}),
            )
            yield response.content()
            assert response.code == 200, path
    finally:
        yield h.stop()


@pytest_twisted.inlineCallbacks
def test_no_token_file_refuses_every_write(tmp_path: Path):
    """
    Without --api-token-file every write is a 401 saying to configure it;
    reads on loopback still work.
    """
    h = Harness(tmp_path, [hand_row("a")], tokens=None)
    try:
        before = h.table()
        for method, path, payload in (
            ("POST", "/api/v1/register", body()),
            ("POST", "/api/v1/heartbeat/a", None),
            ("DELETE", "/api/v1/backends/a", None),
            ("PUT", "/api/v1/backends/a/state", {"state": "maint"}),
            ("POST", "/api/v1/reload", None),
        ):
            code, answer, _ = yield h.call(method, path, payload, token=FULL)
            assert_error(code, answer, 401)
            assert "--api-token-file" in answer["detail"]
        assert h.table() == before and h.states.all() == {}
        code, _, _ = yield h.call("GET", "/api/v1/backends", token=None)
        assert code == 200
    finally:
        yield h.stop()


@pytest_twisted.inlineCallbacks
def test_burst_of_refused_and_served_requests(tmp_path: Path):
    """
    F24: a burst of 1,000 requests (16 in flight, kept-alive connections):
    writes with no token or a wrong one, reads, and registrations with a
    good token, mixed; every refusal is a JSON 401, every read a 200, and
    the data plane (a proxied connection opened during the burst) is
    served meanwhile.
    """
    h = Harness(tmp_path)
    target = listen(reactor, Identify, ident=b"gru")
    conn = sqlite3.connect(h.db)
    conn.execute(
        "INSERT INTO backends (id, app, region, wg_ip, port) VALUES ('gru', 'web', 'sa', "
        f"'127.0.0.1', {target.port})"
    )
    conn.commit()
    conn.close()
    yield h.repository.reload()
    proxy = ProxyFactory(
        h.router, reactor, ProxySettings(connect_timeout=2.0), h.metrics, app="web"
    )
    proxied = cast(Any, reactor).listenTCP(0, proxy, interface="127.0.0.1")
    h.extra += [target, proxied]
    semaphore = DeferredSemaphore(16)
    codes: Dict[str, List[int]] = {"refused": [], "read": [], "write": []}
    served: List[bytes] = []

    @inlineCallbacks
    def one(i: int) -> Any:
        kind = ("refused", "refused", "read", "write")[i % 4]
        if kind == "refused":
            token = None if i % 8 else "wrong-token-0123456789abcdef"
            code, answer, _ = yield h.call("POST", f"/api/v1/heartbeat/x{i}", token=token)
            assert answer["status"] == 401
        elif kind == "read":
            code, answer, _ = yield h.call("GET", "/api/v1/backends", token=None)
        else:
            code, answer, _ = yield h.call("POST", "/api/v1/register", body(f"b{i}"))
        codes[kind].append(code)

    @inlineCallbacks
    def dataPlane() -> Any:
        yield sleep(reactor, 0.05)
        client = Client(reactor)
        yield connect(reactor, int(proxied.getHost().port), client)
        yield client.wait_for(4, timeout=30.0)
        served.append(bytes(client.received))
        client.close()

    try:
        yield gatherResults(
            [semaphore.run(one, i) for i in range(1000)] + [dataPlane()], consumeErrors=True
        )
        assert set(codes["refused"]) == {401} and len(codes["refused"]) == 500
        assert set(codes["read"]) == {200} and set(codes["write"]) == {201}
        assert served == [b"gru\n"]
        assert len(h.table()[1]) == 251
    finally:
        yield h.stop()


# --- F11, item by item ----------------------------------------------------------------

_BAD_REGISTRATIONS: List[Tuple[str, Dict[str, Any], int, Optional[str]]] = [
    ("invalid JSON", {"raw": b'{"id": "x",'}, 400, None),
    ("not an object", {"payload": [body()]}, 400, None),
    ("empty body", {"raw": b""}, 400, None),
    ("not UTF-8", {"raw": b'{"id": "\xff"}'}, 400, None),
    ("NaN", {"raw": json.dumps(body()).replace("9000", "NaN").encode()}, 400, None),
    ("key given twice", {"raw": b'{"id": "a", "id": "b"}'}, 400, None),
    ("deep nesting", {"raw": b"[" * 5000 + b"]" * 5000}, 400, None),
    ("nesting past the limit", {"raw": b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1)}, 400, None),
    ("nested value", {"payload": body(app={"name": "web"})}, 400, "app"),
    ("wrong type: port text", {"payload": body(port="9000")}, 400, "port"),
    ("wrong type: port float", {"payload": body(port=9000.0)}, 400, "port"),
    ("wrong type: weight bool", {"payload": body(weight=True)}, 400, "weight"),
    ("wrong type: id number", {"payload": body(5)}, 400, "id"),
    ("unknown field", {"payload": body(healthy=1)}, 400, "healthy"),
    ("missing field", {"payload": body(ip=_DROP)}, 400, "ip"),
    ("weight 0", {"payload": body(weight=0)}, 400, "weight"),
    ("weight negative", {"payload": body(weight=-1)}, 400, "weight"),
    ("huge integer", {"payload": body(soft_limit=2**70)}, 400, "soft_limit"),
    ("negative limit", {"payload": body(hard_limit=-1)}, 400, "hard_limit"),
    ("soft above hard", {"payload": body(soft_limit=200, hard_limit=150)}, 400, "soft_limit"),
    ("port 0", {"payload": body(port=0)}, 400, "port"),
    ("port 65536", {"payload": body(port=65536)}, 400, "port"),
    ("host with a port", {"payload": body(ip="10.0.0.1:80")}, 400, "ip"),
    ("host with a scheme", {"payload": body(ip="http://10.0.0.1")}, 400, "ip"),
    ("link-local IPv4", {"payload": body(ip="169.254.10.20")}, 400, "ip"),
    ("link-local IPv6", {"payload": body(ip="fe80::1%eth0")}, 400, "ip"),
    ("metadata address", {"payload": body(ip="169.254.169.254")}, 400, "ip"),
    ("metadata IPv6", {"payload": body(ip="fd00:ec2::254")}, 400, "ip"),
    ("metadata Alibaba", {"payload": body(ip="100.100.100.200")}, 400, "ip"),
    ("metadata mapped", {"payload": body(ip="::ffff:169.254.169.254")}, 400, "ip"),
    ("metadata name", {"payload": body(ip="metadata.google.internal.")}, 400, "ip"),
    ("unspecified", {"payload": body(ip="0.0.0.0")}, 400, "ip"),
    ("unknown region", {"payload": body(region="mars")}, 400, "region"),
    ("bad country", {"payload": body(country="BRA")}, 400, "country"),
    ("id with a newline", {"payload": body("reg-1\n")}, 400, "id"),
    ("id with a slash", {"payload": body("a/b")}, 400, "id"),
    ("long id", {"payload": body("a" * 129)}, 400, "id"),
    ("bad health check", {"payload": body(health_check="udp")}, 400, "health_check"),
    ("duplicate of a hand-written row", {"payload": body("hand")}, 409, None),
    ("duplicate of a registered row", {"payload": body("taken")}, 409, None),
    (
        "not JSON content",
        {"payload": body(), "headers": {b"content-type": [b"text/plain"]}},
        415,
        None,
    ),
    ("missing token", {"payload": body(), "token": None}, 401, None),
    ("wrong token", {"payload": body(), "token": "x" * 24}, 401, None),
]


@pytest.mark.parametrize(
    ("case", "request_", "status", "field"),
    _BAD_REGISTRATIONS,
    ids=[c[0] for c in _BAD_REGISTRATIONS],
)
@pytest_twisted.inlineCallbacks
def test_f11_bad_registration(
    tmp_path: Path, case: str, request_: Dict[str, Any], status: int, field: Optional[str]
):
    """
    F11: every bad registration is a JSON error with the right status
    (naming the field for validation errors), and writes nothing: the
    table, its columns included, is unchanged and nothing new is routable.
    """
    h = Harness(tmp_path, [hand_row("hand")])
    try:
        code, _, _ = yield h.call("POST", "/api/v1/register", body("taken", ip="10.60.0.9"))
        assert code == 201
        before = h.table()
        snapshot = h.repository.current()
        code, answer, _ = yield h.call(
            "POST",
            "/api/v1/register",
            request_.get("payload"),
            raw=request_.get("raw"),
            token=request_.get("token", FULL),
            headers=request_.get("headers"),
        )
        assert_error(code, answer, status)
        if field is not None:
            assert answer["detail"]["field"] == field, answer
            assert field in answer["error"]
        assert h.table() == before
        assert h.repository.current() is snapshot
    finally:
        yield h.stop()


def test_schemas_are_valid_draft_2020_12():
    """
    The request schemas are valid JSON Schema (draft 2020-12) and refuse
    unknown fields.
    """
    from jsonschema import Draft202012Validator

    for schema in (REGISTER_SCHEMA, STATE_SCHEMA):
        Draft202012Validator.check_schema(schema)
        assert schema["additionalProperties"] is False


def test_parse_json_limits():
    """
    L{parse_json} takes a body at the size limit and refuses one over it
    (413), and takes nesting up to the depth limit.
    """
    from edgeproxy.control.api import ApiError

    ok = b'{"a": "' + b"x" * (65536 - 10) + b'"}'
    assert len(ok) <= 65536 and parse_json(ok)["a"].startswith("x")
    with pytest.raises(ApiError) as caught:
        parse_json(ok + b" " * 10)
    assert caught.value.code == 413
    assert parse_json(b"[" * MAX_DEPTH + b"]" * MAX_DEPTH) is not None


# --- bodies refused while they arrive, slow bodies (F11, F24) -------------------------


def _head(length: Optional[int], token: str = FULL, chunked: bool = False) -> bytes:
    lines = [
        b"POST /api/v1/register HTTP/1.1",
        b"Host: x",
        b"Content-Type: application/json",
        b"Authorization: Bearer " + token.encode(),
    ]
    if chunked:
        lines.append(b"Transfer-Encoding: chunked")
    elif length is not None:
        lines.append(b"Content-Length: %d" % length)
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _response(data: bytes) -> Tuple[int, Dict[str, Any]]:
    head, _, rest = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(rest)


@pytest_twisted.inlineCallbacks
def test_huge_content_length_refused_before_the_body(tmp_path: Path):
    """
    Headers announcing a 10 MB body get a JSON 413 as soon as they are
    complete, while the client is still dribbling the body (a few hundred
    bytes sent); the connection is then closed (a FIN after the answer, the
    rest thrown away), nothing is written and the site serves others.
    """
    h = Harness(tmp_path)
    client = Client(reactor)
    try:
        before = h.table()
        yield connect(reactor, h.port, client)
        client.send(_head(10 * 1024 * 1024))
        sent = 0
        while b"\r\n\r\n{" not in client.received and sent < 100_000:
            client.send(b" " * 64)
            sent += 64
            yield sleep(reactor, 0.01)
        yield wait_until(reactor, lambda: client.received.endswith(b"}\n"), timeout=5.0)
        status, answer = _response(bytes(client.received))
        assert status == 413 and answer["error"] == "request body too large"
        assert sent < 100_000
        assert b"Connection: close" in client.received
        yield client.wait_closed(timeout=10.0)
        assert h.table() == before
        code, _, _ = yield h.call("GET", "/health")
        assert code == 200
    finally:
        client.close()
        yield h.stop()


@pytest_twisted.inlineCallbacks
def test_chunked_body_refused_once_past_the_limit(tmp_path: Path):
    """
    A chunked body is counted as its chunks come: past 64 KiB it gets a
    JSON 413 while the client still has chunks to send, and nothing is
    written.
    """
    h = Harness(tmp_path)
    client = Client(reactor)
    try:
        before = h.table()
        yield connect(reactor, h.port, client)
        client.send(_head(None, chunked=True))
        chunk = b"%x\r\n%s\r\n" % (16384, b" " * 16384)
        sent = 0
        while b"\r\n\r\n{" not in client.received and sent < 64:
            client.send(chunk)
            sent += 1
            yield sleep(reactor, 0.02)
        yield wait_until(reactor, lambda: client.received.endswith(b"}\n"), timeout=5.0)
        status, answer = _response(bytes(client.received))
        assert status == 413 and "chunked" in answer["detail"]
        assert sent < 64
        yield client.wait_closed(timeout=10.0)
        assert h.table() == before
    finally:
        client.close()
        yield h.stop()


@pytest_twisted.inlineCallbacks
def test_slow_body_cut_with_408(tmp_path: Path):
    """
    A registration whose body does not arrive within the request deadline
    gets a JSON 408 and the connection is closed; nothing is written.  An
    idle kept-alive connection is closed without an answer.
    """
    h = Harness(tmp_path, requestTimeout=1.0)
    slow = Client(reactor)
    idle = Client(reactor)
    try:
        before = h.table()
        payload = json.dumps(body()).encode()
        yield connect(reactor, h.port, slow)
        yield connect(reactor, h.port, idle)
        slow.send(_head(len(payload)) + payload[:10])
        yield slow.wait_closed(timeout=10.0)
        status, answer = _response(bytes(slow.received))
        assert status == 408 and answer["error"] == "request timeout"
        assert answer["status"] == 408
        yield idle.wait_closed(timeout=10.0)
        assert idle.received == b""
        assert h.table() == before
    finally:
        slow.close()
        idle.close()
        yield h.stop()


@pytest_twisted.inlineCallbacks
def test_expect_continue_with_huge_length_gets_413_not_100(tmp_path: Path):
    """
    "Expect: 100-continue" with a body over the limit is answered 413 at
    once, without a 100 Continue inviting the body.
    """
    h = Harness(tmp_path)
    client = Client(reactor)
    try:
        yield connect(reactor, h.port, client)
        head = _head(1 << 20)
        client.send(head[:-2] + b"Expect: 100-continue\r\n\r\n")
        yield wait_until(reactor, lambda: client.received.endswith(b"}\n"), timeout=5.0)
        assert client.received.startswith(b"HTTP/1.1 413 ")
        assert b"100 Continue" not in client.received
    finally:
        client.close()
        yield h.stop()


@pytest_twisted.inlineCallbacks
def test_body_refused_over_tls(tmp_path: Path):
    """
    On a TLS admin listener (C{ssl:}) a Content-Length over the limit is a
    JSON 413 as well, and the connection is closed cleanly, with a TLS
    close_notify (TLS cannot half-close: a plain close after the answer,
    not a TCP half-close under the TLS layer).
    """
    import socket
    import ssl

    from test_tls import pem
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.threads import deferToThread

    h = Harness(tmp_path)
    key = tmp_path / "admin.pem"
    key.write_bytes(pem("admin.test"))
    endpoint = serverFromString(reactor, f"ssl:0:interface=127.0.0.1:privateKey={key}")
    tls = yield endpoint.listen(h.site)
    h.extra.append(tls)

    def exchange(port: int) -> Tuple[bytes, str]:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with context.wrap_socket(
                raw, server_hostname="admin.test", suppress_ragged_eofs=False
            ) as s:
                s.sendall(_head(10 * 1024 * 1024) + b" " * 100)
                received = b""
                while True:
                    try:
                        data = s.recv(65536)
                    except (ssl.SSLError, ConnectionError) as e:
                        return received, type(e).__name__
                    if not data:
                        return received, "close_notify"
                    received += data

    try:
        received, ending = yield deferToThread(exchange, tls.getHost().port)
        status, answer = _response(received)
        assert status == 413 and answer["error"] == "request body too large"
        assert ending == "close_notify"
    finally:
        yield h.stop()


@pytest_twisted.inlineCallbacks
def test_status_page_opens_off_loopback_its_data_needs_a_token(tmp_path: Path):
    """
    On a listener whose reads need a token, the status page itself (static
    HTML, no data) opens without one, as a browser must load it, while its
    JSON answers a 401 without a token and the data with one.
    """
    from edgeproxy.control.status import StatusData, mount_guarded

    h = Harness(tmp_path, [hand_row("a")], openReads=False)
    try:
        api_root = h.site.resource.children[b"api"]
        mount_guarded(h.site.resource, api_root, StatusData(repository=h.repository), h.auth)
        page = yield h.http.get(h.url("/"))
        html = yield page.content()
        assert page.code == 200 and b"<html" in html.lower()
        code, answer, _ = yield h.call("GET", "/api/v1/status", token=None)
        assert_error(code, answer, 401)
        code, answer, _ = yield h.call("GET", "/api/v1/status", token=FULL)
        assert code == 200 and [b["id"] for b in answer["backends"]] == ["a"]
    finally:
        yield h.stop()
