"""
The PostgreSQL routing table (issue 12, L{edgeproxy.stores.postgres})
against a real PostgreSQL server started by the tests (L{pgkit}): the
SQLite store's row and table rules on real rows, the last good table on
failure, the writer, NOTIFY routing an C{UPDATE} within a second through a
real proxied connection, a killed listening connection, startup errors
without the password, and a C{twistd -n edgeproxy} subprocess registering
a backend through the API.
"""

from __future__ import annotations

import platform
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pgkit
import pytest
import pytest_twisted
from faultkit import edgeproxy_argv, edgeproxy_env, free_port, wait_until
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from edgeproxy.interfaces import (
    BackendWriteError,
    DuplicateBackendError,
    IBackendRepository,
    IBackendWriter,
)
from edgeproxy.metrics import MetricsStore
from edgeproxy.stores.open import StoreError, open_store
from edgeproxy.stores.pops import IPopRepository
from edgeproxy.stores.sqlite import InvalidRowError
from edgeproxy.tap import Options, makeService

try:
    import psycopg  # noqa: F401  (the store and pgkit import it)
except ImportError as e:  # not installed, or (pure-Python psycopg) no libpq
    pytest.skip(
        f"psycopg: {e}: "
        + (
            "pip install 'psycopg[binary]'"
            if platform.python_implementation() == "CPython"
            # psycopg's binary wheels are CPython's: the pure-Python one loads libpq
            else "pip install psycopg, with the system's libpq (apt-get install libpq5)"
        ),
        allow_module_level=True,
    )

from edgeproxy.stores.postgres import (
    CHANNEL,
    ChangeListener,
    PostgresBackendRepository,
    redact_url,
)

pytestmark = [pytest.mark.timeout(120)]


@pytest.fixture(scope="session")
def pg() -> Iterator[pgkit.PostgresServer]:
    server = pgkit.PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def db(pg: pgkit.PostgresServer) -> str:
    """
    A new database with the project's schema; its name.
    """
    return pg.createDatabase()


def _count(metrics: MetricsStore, name: str, label: str) -> int:
    return metrics.counter(name, label)


@implementer(ILogObserver)
class EventCollector:
    """
    The log events of one namespace while in a C{with} block.
    """

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.events: List[Dict[str, Any]] = []

    def __call__(self, event: Dict[str, Any]) -> None:
        if event.get("log_namespace") == self.namespace:
            self.events.append(event)

    def __enter__(self) -> "EventCollector":
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc: object) -> None:
        globalLogPublisher.removeObserver(self)


# --- the read port ------------------------------------------------------------


def test_adapters_provide_their_ports(pg: pgkit.PostgresServer, db: str) -> None:
    """
    The repository, the writer and the POPs table of a PostgreSQL store
    provide L{IBackendRepository}, L{IBackendWriter} and L{IPopRepository};
    the store is described without its password, and brings its NOTIFY
    listener as a service.
    """
    store = open_store(pg.url(db), None, MetricsStore())
    assert store.kind == "postgresql"
    assert verifyObject(IBackendRepository, store.repository)
    assert verifyObject(IBackendWriter, store.writer)
    assert verifyObject(IPopRepository, store.pops)
    assert pgkit.PASSWORD not in store.description
    assert pgkit.PASSWORD not in repr(store)
    assert [type(s) for s in store.services] == [ChangeListener]


def test_rows_are_validated_like_sqlite(pg: pgkit.PostgresServer, db: str) -> None:
    """
    Real rows with invalid values (port 0, an empty region, healthy 2, a
    wg_ip with a port, a negative weight, an unknown health check) are
    skipped with their id and the reason, each counted once by column in
    C{routing_rows_skipped}; the valid rows load, with the SQLite defaults
    (weight 0 counts as 1, NULL deleted is active).
    """
    with pg.connect(db) as conn:
        pgkit.insert(conn, pgkit.backend_row("good-1", 8001, weight=0, deleted=None))
        pgkit.insert(conn, pgkit.backend_row("good-2", 8002, country="br"))
        pgkit.insert(conn, pgkit.backend_row("bad-port", 0))
        pgkit.insert(conn, pgkit.backend_row("bad-region", 8003, region=" "))
        pgkit.insert(conn, pgkit.backend_row("bad-healthy", 8004, healthy=2))
        pgkit.insert(conn, pgkit.backend_row("bad-ip", 8005, wg_ip="10.0.0.1:80"))
        pgkit.insert(conn, pgkit.backend_row("bad-weight", 8006, weight=-1))
        pgkit.insert(conn, pgkit.backend_row("bad-check", 8007, health_check="ping"))
    metrics = MetricsStore()
    store = open_store(pg.url(db), None, metrics)
    repository: Any = store.repository
    snapshot = repository.current()
    assert sorted(snapshot.by_id) == ["good-1", "good-2"]
    assert snapshot.by_id["good-1"].weight == 1
    assert snapshot.by_id["good-1"].deleted is False
    assert snapshot.by_id["good-2"].country == "BR"
    skipped = dict(repository.skipped)
    assert skipped == {
        "bad-port": "port: 0 is outside 1-65535",
        "bad-region": "region: is empty",
        "bad-healthy": "healthy: 2 is not 0 or 1",
        "bad-ip": "wg_ip: str '10.0.0.1:80' is not an address or host name",
        "bad-weight": "weight: -1 is negative",
        "bad-check": skipped["bad-check"],
    }
    assert skipped["bad-check"].startswith("health_check: str 'ping' is not a health check")
    for column in ("port", "region", "healthy", "wg_ip", "weight", "health_check"):
        assert _count(metrics, "routing_rows_skipped", column) == 1
    assert _count(metrics, "routing_reload", "ok") == 1


def test_wrongly_typed_column_skips_its_rows(pg: pgkit.PostgresServer) -> None:
    """
    A table whose C{port} column is TEXT (created by hand, not from the
    schema): rows are skipped as "not an integer", never converted.
    """
    db = pg.createDatabase(schema=False)
    with pg.connect(db) as conn:
        conn.execute(
            "CREATE TABLE backends (id TEXT, app TEXT, region TEXT, wg_ip TEXT, port TEXT,"
            " healthy INTEGER, weight INTEGER, soft_limit INTEGER, hard_limit INTEGER,"
            " deleted INTEGER)"
        )
        conn.execute(
            "INSERT INTO backends VALUES ('typed', NULL, 'sa', '127.0.0.1', '8080', 1, 1, 1, 0, 0)"
        )
    repository: Any = open_store(pg.url(db), None, MetricsStore()).repository
    assert repository.current().backends == ()
    assert repository.skipped == (("typed", "port: str '8080' is not an integer"),)


def test_optional_columns_may_be_missing(pg: pgkit.PostgresServer, db: str) -> None:
    """
    Without the optional columns (country, proxy_protocol, health_check,
    heartbeat_at, sni) the table still loads with their defaults.
    """
    with pg.connect(db) as conn:
        for column in ("country", "proxy_protocol", "health_check", "heartbeat_at", "sni"):
            conn.execute(f"ALTER TABLE backends DROP COLUMN {column}")
        pgkit.insert(
            conn, {k: v for k, v in pgkit.backend_row("a", 9000).items() if k != "country"}
        )
    store = open_store(pg.url(db), None, MetricsStore())
    backend = store.repository.current().by_id["a"]
    assert (backend.country, backend.proxy_protocol, backend.heartbeat_at) == (None, 0, None)


@pytest_twisted.ensureDeferred
async def test_reload_failure_keeps_the_last_good_table(pg: pgkit.PostgresServer, db: str) -> None:
    """
    A mandatory column dropped: the reload fails, the last good table stays
    in force, C{lastError} names the column, the failure is logged once
    (two failing reloads, one error line) and counted each time; once the
    column is back, the next reload is good again and says so.
    """
    with pg.connect(db) as conn:
        pgkit.insert(conn, pgkit.backend_row("a", 9000))
    metrics = MetricsStore()
    repository: Any = open_store(pg.url(db), reactor, metrics).repository
    before = repository.current()
    with pg.connect(db) as conn:
        conn.execute("ALTER TABLE backends RENAME COLUMN healthy TO healthy_old")
    events = EventCollector("edgeproxy.stores.postgres")
    with events:
        assert await repository.reload() is before
        assert await repository.reload() is before
    assert "lacks column(s) healthy" in str(repository.lastError)
    assert _count(metrics, "routing_reload", "error") == 2
    failures = [e for e in events.events if "reload failed" in e.get("log_format", "")]
    assert len(failures) == 1
    with pg.connect(db) as conn:
        conn.execute("ALTER TABLE backends RENAME COLUMN healthy_old TO healthy")
    with events:
        after = await repository.reload()
    assert repository.lastError is None
    assert after.by_id.keys() == {"a"}
    assert any("again after failure" in e.get("log_format", "") for e in events.events)


@pytest_twisted.ensureDeferred
async def test_reload_reconnects_a_killed_connection(pg: pgkit.PostgresServer, db: str) -> None:
    """
    The connection the loads use is killed (C{pg_terminate_backend}): the
    next reload connects again and succeeds (no spurious failure).
    """
    repository: Any = open_store(pg.url(db), reactor, MetricsStore()).repository
    with pg.connect(db) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'edgeproxy' AND datname = %s",
            (db,),
        )
        pgkit.insert(conn, pgkit.backend_row("late", 9001))
    snapshot = await repository.reload()
    assert repository.lastError is None
    assert "late" in snapshot.by_id


# --- startup ------------------------------------------------------------------


def test_startup_errors_are_clear_and_hide_the_password(
    pg: pgkit.PostgresServer, db: str, tmp_path: Path
) -> None:
    """
    A wrong password, a database that does not exist and a server that is
    not running are each a L{StoreError} saying so, without the password.
    """
    with pytest.raises(StoreError) as wrong:
        open_store(pg.url(db, password="not-the-password-123"), None, MetricsStore())
    assert "password authentication failed" in str(wrong.value)
    assert "not-the-password-123" not in str(wrong.value)

    with pytest.raises(StoreError) as missing:
        open_store(pg.url("no_such_db"), None, MetricsStore())
    assert 'database "no_such_db" does not exist' in str(missing.value)
    assert pgkit.PASSWORD not in str(missing.value)

    down = pg.url(db).replace(pg.socketDir.replace("/", "%2F"), str(tmp_path).replace("/", "%2F"))
    with pytest.raises(StoreError) as absent:
        open_store(down, None, MetricsStore())
    assert "No such file or directory" in str(absent.value)
    assert "cannot reach" in str(absent.value)
    assert pgkit.PASSWORD not in str(absent.value)


def test_makeService_startup_error_is_one_line(pg: pgkit.PostgresServer) -> None:
    """
    Through C{makeService}, a database that does not exist stops the
    startup with one line naming --db, without the password.
    """
    options = Options()
    options.parseOptions(["--db", pg.url("nothing_here"), "--geoip-db", "none"])
    with pytest.raises(SystemExit) as stopped:
        makeService(options, reactor=reactor, environ={})
    text = str(stopped.value.code)
    assert "--db" in text and "does not exist" in text
    assert pgkit.PASSWORD not in text


def test_schema_is_installed_when_there_is_no_table(pg: pgkit.PostgresServer) -> None:
    """
    A database without a C{backends} table gets the tables and the
    notification trigger at startup (with a warning); a table created by
    hand without the trigger is used as it is, with a warning that only
    the periodic reload sees changes.
    """
    empty = pg.createDatabase(schema=False)
    events = EventCollector("edgeproxy.stores.postgres")
    with events:
        store = open_store(pg.url(empty), None, MetricsStore())
    assert store.repository.current().backends == ()
    assert any("created the tables" in e.get("log_format", "") for e in events.events)
    with pg.connect(empty) as conn:
        triggers = {
            r[0] for r in conn.execute("SELECT tgname FROM pg_trigger WHERE NOT tgisinternal")
        }
    assert "edgeproxy_backends_notify" in triggers and "edgeproxy_pops_notify" in triggers

    bare = pg.createDatabase(schema=False)
    with pg.connect(bare) as conn:
        conn.execute(
            "CREATE TABLE backends (id TEXT, app TEXT, region TEXT, wg_ip TEXT, port INTEGER,"
            " healthy INTEGER, weight INTEGER, soft_limit INTEGER, hard_limit INTEGER,"
            " deleted INTEGER)"
        )
    events = EventCollector("edgeproxy.stores.postgres")
    with events:
        open_store(pg.url(bare), None, MetricsStore())
    assert any("no {trigger} trigger" in e.get("log_format", "") for e in events.events)
    with pg.connect(bare) as conn:
        assert conn.execute("SELECT to_regclass('pops')").fetchone()[0] is None


def test_redacted_url_hides_passwords() -> None:
    """
    A password in the user part or in a C{password=} parameter is replaced
    by C{***}; the rest of the URL stays readable.
    """
    assert redact_url("postgresql://edge:s3cret@db:5432/edgeproxy") == (
        "postgresql://edge:***@db:5432/edgeproxy"
    )
    assert redact_url("postgresql://edge@db/edgeproxy?password=s3cret&sslmode=require") == (
        "postgresql://edge@db/edgeproxy?password=***&sslmode=require"
    )
    assert redact_url("postgres:///edgeproxy?host=/run/postgresql") == (
        "postgres:///edgeproxy?host=/run/postgresql"
    )


# --- notification -------------------------------------------------------------


def test_trigger_notifies_changes_but_not_heartbeats(pg: pgkit.PostgresServer, db: str) -> None:
    """
    The schema's trigger notifies C{edgeproxy_routing} with the table's
    name on an INSERT, an UPDATE and a DELETE of C{backends} and on a
    change of C{pops}; an UPDATE of C{heartbeat_at} alone notifies nobody.
    """
    with pg.connect(db) as listener, pg.connect(db) as conn:
        listener.execute(f"LISTEN {CHANNEL}")

        def received() -> List[str]:
            return [n.payload for n in listener.notifies(timeout=0.3)]

        pgkit.insert(conn, pgkit.backend_row("a", 9000, heartbeat_at=1.0))
        assert received() == ["backends"]
        conn.execute("UPDATE backends SET heartbeat_at = 2.0 WHERE id = 'a'")
        assert received() == []
        conn.execute("UPDATE backends SET weight = 5 WHERE id = 'a'")
        assert received() == ["backends"]
        conn.execute("INSERT INTO pops VALUES ('gru', 'sa', '192.0.2.1')")
        assert received() == ["pops"]
        conn.execute("DELETE FROM backends")
        assert received() == ["backends"]


class _Name(Protocol):
    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.factory.name)  # type: ignore[attr-defined]
        self.transport.loseConnection()


class _Reader(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.done.callback(self.data)


async def _listen(name: bytes) -> Any:
    factory = Factory.forProtocol(_Name)
    factory.name = name  # type: ignore[attr-defined]
    return await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)


async def _ask(port: int) -> bytes:
    reader = _Reader()
    factory = Factory.forProtocol(lambda: reader)
    await TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5).connect(factory)
    return await reader.done


def _proxy(pg: pgkit.PostgresServer, db: str, tmp_path: Path, reload: float) -> Any:
    listen = free_port()
    options = Options()
    options.parseOptions(
        [
            "--db", pg.url(db), "--listen", f"tcp:{listen}:interface=127.0.0.1",
            "--db-reload", str(reload), "--geoip-db", "none", "--health-check", "off",
            "--region", "sa", "--state-file", str(tmp_path / "state.json"),
        ]
    )  # fmt: skip
    service = makeService(options, reactor=reactor, environ={})
    return service, listen


def _listener(service: Any) -> ChangeListener:
    return next(s for s in service if isinstance(s, ChangeListener))


@pytest_twisted.ensureDeferred
async def test_update_is_routed_within_a_second_through_notify(
    pg: pgkit.PostgresServer, db: str, tmp_path: Path
) -> None:
    """
    A real proxy (C{makeService}) on a PostgreSQL table with the periodic
    reload at 60 s: an C{UPDATE} moving the backend to another port is
    routed (a real proxied TCP connection reaches the other backend)
    within a second, so only the NOTIFY can have told it.
    """
    old, new = await _listen(b"old"), await _listen(b"new")
    with pg.connect(db) as conn:
        pgkit.insert(conn, pgkit.backend_row("web", old.getHost().port))
    service, port = _proxy(pg, db, tmp_path, reload=60)
    service.startService()
    try:
        listener = _listener(service)
        await wait_until(reactor, lambda: listener.connected, timeout=10)
        assert await _ask(port) == b"old"
        with pg.connect(db) as conn:
            conn.execute("UPDATE backends SET port = %s WHERE id = 'web'", (new.getHost().port,))
        changed = reactor.seconds()
        answers: List[bytes] = []

        async def routed() -> bool:
            answers.append(await _ask(port))
            return answers[-1] == b"new"

        while not await routed():
            assert reactor.seconds() - changed < 1.0, answers
        assert reactor.seconds() - changed < 1.0
        assert listener.notifications >= 1
    finally:
        await service.stopService()
        await old.stopListening()
        await new.stopListening()


@pytest_twisted.ensureDeferred
async def test_killed_listener_reconnects_and_changes_still_arrive(
    pg: pgkit.PostgresServer, db: str, tmp_path: Path
) -> None:
    """
    Every connection of the proxy is killed with C{pg_terminate_backend}
    and the table is updated at once: the change is routed within one
    reload interval (2 s here), the listener says once that it lost its
    connection, reconnects (counted) and routes the next C{UPDATE} through
    NOTIFY again.
    """
    one, two, three = await _listen(b"one"), await _listen(b"two"), await _listen(b"three")
    with pg.connect(db) as conn:
        pgkit.insert(conn, pgkit.backend_row("web", one.getHost().port))
    service, port = _proxy(pg, db, tmp_path, reload=2)
    events = EventCollector("edgeproxy.stores.postgres")
    service.startService()
    try:
        listener = _listener(service)
        await wait_until(reactor, lambda: listener.connected, timeout=10)
        assert await _ask(port) == b"one"
        with events:
            with pg.connect(db) as conn:
                killed = conn.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE application_name = 'edgeproxy' AND datname = %s",
                    (db,),
                ).fetchone()[0]
                assert killed >= 1
                conn.execute(
                    "UPDATE backends SET port = %s WHERE id = 'web'", (two.getHost().port,)
                )
            changed = reactor.seconds()
            while await _ask(port) != b"two":
                assert reactor.seconds() - changed < 2.0 + 1.0
            await wait_until(reactor, lambda: listener.reconnects >= 1, timeout=10)
            await wait_until(reactor, lambda: listener.connected, timeout=10)
        lost = [e for e in events.events if "lost its connection" in e.get("log_format", "")]
        assert len(lost) == 1
        assert pgkit.PASSWORD not in str(lost[0])
        # NOTIFY works again on the new connection.
        before = listener.notifications
        with pg.connect(db) as conn:
            conn.execute("UPDATE backends SET port = %s WHERE id = 'web'", (three.getHost().port,))
        await wait_until(reactor, lambda: listener.notifications > before, timeout=2)
        await wait_until(reactor, lambda: service.repository.current().by_id["web"].port
                         == three.getHost().port, timeout=2)  # fmt: skip
    finally:
        await service.stopService()
        for p in (one, two, three):
            await p.stopListening()


@pytest_twisted.ensureDeferred
async def test_pops_table_follows_notifications(pg: pgkit.PostgresServer, db: str) -> None:
    """
    The C{pops} table loads by the SQLite rules (a host name is skipped
    with its id) and a change to it reaches the POPs list through NOTIFY.
    """
    with pg.connect(db) as conn:
        conn.execute("INSERT INTO pops VALUES ('gru', 'sa', '192.0.2.1'), ('bad', 'eu', 'x.y')")
    store = open_store(pg.url(db), reactor, MetricsStore())
    assert [p.id for p in store.pops.current()] == ["gru"]
    assert store.pops.skipped == (("bad", "address: 'x.y' is not an IPv4 or IPv6 address"),)
    listener: Any = store.services[0]
    listener.startService()
    try:
        await wait_until(reactor, lambda: listener.connected, timeout=10)
        with pg.connect(db) as conn:
            conn.execute("INSERT INTO pops VALUES ('fra', 'eu', '2001:db8::1')")
        await wait_until(reactor, lambda: len(store.pops.current()) == 2, timeout=2)
    finally:
        await listener.stopService()


# --- the write port -----------------------------------------------------------


def _rows(pg: pgkit.PostgresServer, db: str) -> Dict[str, Any]:
    with pg.connect(db) as conn:
        return {
            r[0]: r[1] for r in conn.execute("SELECT id, heartbeat_at FROM backends").fetchall()
        }


@pytest_twisted.ensureDeferred
async def test_writer_registers_heartbeats_and_deregisters(
    pg: pgkit.PostgresServer, db: str
) -> None:
    """
    A registration inserts a row with its heartbeat time and is in the
    table in force when it fires; a duplicate id and an invalid row are
    refused (nothing written); heartbeats sent together update the rows in
    place (a row written by hand answers C{False} and keeps its NULL);
    deregistration deletes a registered row but never a hand-written one.
    """
    with pg.connect(db) as conn:
        pgkit.insert(conn, pgkit.backend_row("by-hand", 9100))
    store = open_store(pg.url(db), reactor, MetricsStore())
    writer = store.writer
    fields = pgkit.backend_row("reg-1", 9101, app="demo", country="BR")
    backend = await writer.register(fields)
    assert backend.id == "reg-1" and backend.heartbeat_at is not None
    assert "reg-1" in store.repository.current().by_id
    first = _rows(pg, db)["reg-1"]
    assert first == pytest.approx(reactor.seconds(), abs=5)

    with pytest.raises(DuplicateBackendError):
        await writer.register(fields)
    with pytest.raises(InvalidRowError):
        await writer.register(pgkit.backend_row("reg-bad", 70000))
    assert set(_rows(pg, db)) == {"by-hand", "reg-1"}

    await writer.register(pgkit.backend_row("reg-2", 9102))
    beats = [writer.heartbeat("reg-1"), writer.heartbeat("reg-2"), writer.heartbeat("by-hand")]
    beats.append(writer.heartbeat("nobody"))
    results = [await d for d in beats]
    assert results == [True, True, False, False]
    rows = _rows(pg, db)
    assert rows["by-hand"] is None and rows["reg-1"] >= first

    assert await writer.deregister("by-hand") is False
    assert await writer.deregister("reg-1") is True
    assert "reg-1" not in store.repository.current().by_id
    assert set(_rows(pg, db)) == {"by-hand", "reg-2"}


@pytest_twisted.ensureDeferred
async def test_writer_survives_a_killed_connection(pg: pgkit.PostgresServer, db: str) -> None:
    """
    Every connection of the store killed (C{pg_terminate_backend}) between
    two writes: the next registration connects again and succeeds, once.
    """
    store = open_store(pg.url(db), reactor, MetricsStore())
    await store.writer.register(pgkit.backend_row("first", 9300))
    with pg.connect(db) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'edgeproxy' AND datname = %s",
            (db,),
        )
    backend = await store.writer.register(pgkit.backend_row("second", 9301))
    assert backend.id == "second"
    assert set(_rows(pg, db)) == {"first", "second"}
    assert "second" in store.repository.current().by_id


@pytest_twisted.ensureDeferred
async def test_writer_failure_is_a_write_error(pg: pgkit.PostgresServer, db: str) -> None:
    """
    A table the loader would refuse (a mandatory column gone) is not
    written to: the registration fails with L{BackendWriteError} naming
    the column.
    """
    store = open_store(pg.url(db), reactor, MetricsStore())
    with pg.connect(db) as conn:
        conn.execute("ALTER TABLE backends DROP COLUMN soft_limit")
    with pytest.raises(BackendWriteError, match="soft_limit"):
        await store.writer.register(pgkit.backend_row("x", 9200))


def test_repository_needs_no_reactor_for_its_first_load(pg: pgkit.PostgresServer, db: str) -> None:
    """
    L{PostgresBackendRepository.loadInitial} is synchronous (before the
    reactor runs) and records when it succeeded.
    """
    from edgeproxy.stores.postgres import Database

    repository = PostgresBackendRepository(Database.fromURL(pg.url(db)))
    assert repository.loadInitial().backends == ()
    assert repository.lastReloadOk is not None


# --- a real twistd ------------------------------------------------------------

ADMIN_TOKEN = "admin-token-0123456789abcdef"


@pytest.mark.slow
def test_twistd_on_postgresql_registers_through_the_api(
    pg: pgkit.PostgresServer, db: str, tmp_path: Path
) -> None:
    """
    C{twistd -n edgeproxy --db postgresql://...}: starts on the table (the
    startup line names the database without its password), and
    C{edgeproxy-ctl register}/C{heartbeat}/C{deregister} through its API
    write the row in PostgreSQL, which the proxy then routes to; SIGTERM
    stops it without a traceback.
    """
    from edgeproxy import ctl

    tokens = tmp_path / "tokens"
    tokens.write_text(ADMIN_TOKEN + "\n")
    tokens.chmod(0o600)
    token = tmp_path / "admin.token"
    token.write_text(ADMIN_TOKEN + "\n")
    listen = free_port()
    log = tmp_path / "edgeproxy.log"
    argv = edgeproxy_argv(
        "--db", pg.url(db), "--region", "sa", "--geoip-db", "none",
        "--listen", f"tcp:{listen}:interface=127.0.0.1",
        "--admin", "tcp:0:interface=127.0.0.1", "--api-token-file", str(tokens),
        "--health-check", "off", "--db-reload", "60",
    )  # fmt: skip
    backend = socket.socket()
    backend.bind(("127.0.0.1", 0))
    backend.listen(8)
    backend.settimeout(10)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=edgeproxy_env(), cwd=str(tmp_path)
        )
    try:
        import re

        deadline = time.monotonic() + 60
        while True:
            found = re.search(r"admin listener on 127\.0\.0\.1:(\d+)", log.read_text())
            if found:
                break
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        url = f"http://127.0.0.1:{found.group(1)}"
        prefix = ["--admin", url, "--token-file", str(token)]
        import io

        out_text = io.StringIO()
        code = ctl.main(
            [*prefix, "register", "pg-1", "--app", "demo", "--region", "sa", "--ip", "127.0.0.1",
             "--port", str(backend.getsockname()[1])],
            out_text,
        )  # fmt: skip
        assert code == 0, log.read_text()
        assert "pg-1" in _rows(pg, db)
        with socket.create_connection(("127.0.0.1", listen), timeout=5):
            conn, _ = backend.accept()  # the proxy connected to the backend
            conn.close()
        first = _rows(pg, db)["pg-1"]
        time.sleep(0.05)
        assert ctl.main([*prefix, "heartbeat", "pg-1"], io.StringIO()) == 0
        assert _rows(pg, db)["pg-1"] > first
        assert ctl.main([*prefix, "deregister", "pg-1"], io.StringIO()) == 0
        assert _rows(pg, db) == {}
        text = log.read_text()
        assert pgkit.PASSWORD not in text
        assert "postgresql://edgeproxy:***@" in text
    finally:
        backend.close()
        proc.terminate()
        proc.wait(30)
    assert "Traceback" not in log.read_text(), log.read_text()


# --- the listener's logic, on fakes -------------------------------------------


class _FakeRepository:
    def __init__(self) -> None:
        self.reloads = 0

    def reload(self) -> None:
        self.reloads += 1


class _ThreadReactor:
    """
    Records C{callFromThread} calls instead of running them.
    """

    def __init__(self) -> None:
        self.calls: List[Any] = []

    def callFromThread(self, f: Any, *args: Any) -> None:
        self.calls.append((f, args))

    def run(self) -> None:
        calls, self.calls = self.calls, []
        for f, args in calls:
            f(*args)


def _fakeListener() -> tuple[ChangeListener, _ThreadReactor, _FakeRepository, _FakeRepository]:
    from edgeproxy.stores.postgres import Database

    reactor_ = _ThreadReactor()
    backends, pops = _FakeRepository(), _FakeRepository()
    database = Database.fromURL("postgresql://edge:pw@db/edgeproxy")
    metrics = MetricsStore()
    listener = ChangeListener(database, backends, reactor_, pops=pops, metrics=metrics)
    return listener, reactor_, backends, pops


def test_a_burst_of_notifications_is_one_reload() -> None:
    """
    Notifications arriving before the reactor handled the first are
    delivered together: one call into the reactor, one routing table
    reload, and a POPs reload only when the C{pops} table changed.
    """
    listener, reactor_, backends, pops = _fakeListener()
    for _ in range(20):
        listener._received("backends")
    assert len(reactor_.calls) == 1
    reactor_.run()
    assert (backends.reloads, pops.reloads) == (1, 0)
    listener._received("pops")
    listener._received("backends")
    reactor_.run()
    assert (backends.reloads, pops.reloads) == (2, 1)
    assert listener.metrics is not None
    assert listener.metrics.counter("routing_notify", "received") == 2


def test_lost_connection_is_logged_once_per_episode() -> None:
    """
    A connection lost and failing to come back five times logs one warning
    (without the password) and counts one loss; connecting again logs once,
    counts a reconnection and reloads both tables (notifications sent while
    it was down are lost).
    """
    listener, _, backends, pops = _fakeListener()
    events = EventCollector("edgeproxy.stores.postgres")
    with events:
        for failures in range(1, 6):
            listener._lost(failures, "server closed the connection unexpectedly")
        listener._connectedNow(5, 1234)
    formats = [e["log_format"] for e in events.events]
    assert sum("lost its connection" in f for f in formats) == 1
    assert sum("connected again" in f for f in formats) == 1
    assert "pw" not in str([e.get("database") for e in events.events])
    assert listener.connected and listener.backendPid == 1234 and listener.reconnects == 1
    assert (backends.reloads, pops.reloads) == (1, 1)
    assert listener.metrics is not None
    assert listener.metrics.counter("routing_notify", "lost") == 1
    assert listener.metrics.counter("routing_notify", "reconnected") == 1


def test_backoff_doubles_up_to_its_cap() -> None:
    """
    The reconnection delay starts at C{backoff}, doubles with each
    consecutive failure, and never exceeds C{maxBackoff}.
    """
    listener, _, _, _ = _fakeListener()
    assert [listener.delay(n) for n in range(1, 9)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert listener.delay(10_000) == 30


def test_ctypes_holds_a_weak_reference_for_psycopg() -> None:
    """
    Once the store is imported, C{ctypes.py_object} holds a weak reference
    and gives it back, as the pure-Python psycopg needs for every
    connection: on PyPy 7.3.11 only because the store patched ctypes
    (nothing is patched elsewhere).
    """
    import ctypes
    import weakref

    from edgeproxy.stores import postgres

    class Target:
        pass

    target = Target()
    ref = weakref.ref(target)
    held = ctypes.py_object(ref)
    assert held.value is ref
    assert held.value() is target
    if platform.python_implementation() == "CPython":
        assert postgres._let_ctypes_hold_weak_references() is False
