"""
The PostgreSQL routing table: the C{backends} and C{pops} tables of a
PostgreSQL database, for operators who already run one (SPEC section 10).

C{--db postgresql://user:password@host:5432/dbname} (or C{postgres://},
any libpq URL: C{postgresql:///edgeproxy?host=/run/postgresql} for a Unix
socket) chooses it.  The tables are those of C{schema.sql}, read by the
same rules (L{edgeproxy.stores.sqlite.validate_row}, the last good table
kept on failure: L{edgeproxy.stores.reloading}).  C{psycopg} (version 3)
does the talking: the first load before the reactor runs (blocking), every
later query in the reactor's thread pool.

Change notification: the schema file (C{edgeproxy/data/schema-postgresql.sql},
run by edgeproxy itself when the database has no C{backends} table) has a
trigger that sends C{NOTIFY edgeproxy_routing} after every change of either
table; L{ChangeListener} holds one more connection, in its own thread,
C{LISTEN}ing, and reloads at once on each notification.  A dropped
listening connection is reconnected with exponential backoff, then the
table is reloaded (notifications sent meanwhile are lost); the periodic
reload (C{--db-reload}) stays the safety net, for read replicas too (NOTIFY
is not delivered there).
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading
import weakref
from importlib import resources
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, TypeVar
from urllib.parse import parse_qsl, urlencode

import attrs
import psycopg
from psycopg import errors as pgerrors
from psycopg import sql
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from zope.interface import implementer

from edgeproxy.interfaces import (
    BackendWriteError,
    DuplicateBackendError,
    IBackendRepository,
    IBackendWriter,
    IMetricsStore,
)
from edgeproxy.model import RoutingSnapshot
from edgeproxy.stores.open import OPENERS, Store, StoreError
from edgeproxy.stores.pops import (
    POP_COLUMNS,
    Pop,
    PopsDatabaseError,
    SqlitePopRepository,
    validate_pops,
)
from edgeproxy.stores.reloading import LoadResult, ReloadingRepository
from edgeproxy.stores.sqlite import (
    _ADDABLE_COLUMNS,
    _COLUMN_DEFAULTS,
    _REGISTER_COLUMNS,
    MANDATORY_COLUMNS,
    OPTIONAL_COLUMNS,
    RoutingDatabaseError,
    validate_rows,
)
from edgeproxy.stores.writing import QueuedBackendWriter

__all__ = [
    "CHANNEL",
    "ChangeListener",
    "Database",
    "PostgresBackendRepository",
    "PostgresBackendWriter",
    "PostgresPopRepository",
    "open_postgres",
    "redact_url",
    "schema_sql",
]

_log = Logger()

_T = TypeVar("_T")


def _let_ctypes_hold_weak_references() -> bool:
    """
    Make C{ctypes.py_object(weakref.ref(x))} work where it does not: on
    PyPy 7.3.11 (Debian bookworm's pypy3), whose ctypes keeps each
    C{py_object}'s value through a weak reference, and a weak reference
    cannot itself be weakly referenced (TypeError).  The pure-Python
    psycopg, the only one on PyPy, makes such an object for every
    connection (its notice receiver's argument), so no connection could
    open.  Such values are kept by a strong reference instead: one small
    weak reference object per connection opened, never freed, where PyPy's
    container already keeps one dead entry per value for ever.  Elsewhere
    (CPython, a PyPy without the limit) nothing is changed.

    @return: Whether ctypes was patched.
    """
    if platform.python_implementation() != "PyPy":
        return False
    try:
        ctypes.py_object(weakref.ref(_let_ctypes_hold_weak_references))
        return False
    except TypeError:
        pass
    try:
        from _ctypes import primitive  # type: ignore[attr-defined]  # PyPy's pure-Python ctypes

        container_type = type(primitive.pyobj_container)
        add = container_type.add
    except (ImportError, AttributeError):
        return False

    def add_or_keep(self: Any, obj: object) -> int:
        try:
            return int(add(self, obj))
        except TypeError:  # not weakly referenceable: keep it
            self.objs.append(lambda: obj)
            return len(self.objs) - 1

    container_type.add = add_or_keep
    return True


_let_ctypes_hold_weak_references()

#: The channel the schema's trigger notifies (payload: the table's name).
CHANNEL = "edgeproxy_routing"

#: The trigger whose absence makes edgeproxy warn that only the periodic
#: reload will see changes.
TRIGGER = "edgeproxy_backends_notify"

#: Seconds to wait for a connection when the URL does not say
#: (C{connect_timeout}).
CONNECT_TIMEOUT = 5

#: Milliseconds a query may run (a table locked by C{ALTER TABLE}, a
#: server overloaded) before it fails, so that a load never hangs a thread.
STATEMENT_TIMEOUT_MS = 10_000

#: Column types for the optional columns a registration may add.
_PG_TYPES: Mapping[str, str] = {"REAL": "DOUBLE PRECISION"}

_BACKENDS = "backends"
_POPS = "pops"


def schema_sql() -> str:
    """
    The SQL that creates the tables and the notification trigger
    (C{edgeproxy/data/schema-postgresql.sql}).
    """
    return (
        resources.files("edgeproxy")
        .joinpath("data/schema-postgresql.sql")
        .read_text(encoding="utf-8")
    )


def redact_url(value: str) -> str:
    """
    A PostgreSQL URL as it may be logged: the password (in the user part
    or as a C{password=} parameter) replaced by C{***}.
    """
    scheme, sep, rest = value.partition("://")
    if not sep:
        return value
    rest, question, query = rest.partition("?")
    authority, slash, path = rest.partition("/")
    userinfo, at, hostport = authority.rpartition("@")
    if at and ":" in userinfo:
        authority = f"{userinfo.split(':', 1)[0]}:***@{hostport}"
    if question:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k == "password" for k, _ in pairs):
            query = urlencode([(k, "***" if k == "password" else v) for k, v in pairs], safe="/*")
    return f"{scheme}://{authority}{slash}{path}{question}{query}"


def _oneLine(text: str) -> str:
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


# --- connections ------------------------------------------------------------


@attrs.define(eq=False)
class Database:
    """
    How to reach the database, and one connection kept for one kind of
    work (the loads, or the writes), used by one thread at a time.

    @ivar conninfo: The libpq URL or connection string (with its password).
    @ivar description: The database as it may be logged.
    """

    conninfo: str = attrs.field(repr=False)
    description: str
    _secrets: Tuple[str, ...] = attrs.field(default=(), repr=False)
    _params: Mapping[str, Any] = attrs.field(factory=dict, repr=False)
    _conn: Optional[psycopg.Connection[Any]] = attrs.field(init=False, default=None, repr=False)
    _lock: threading.Lock = attrs.field(init=False, factory=threading.Lock, repr=False)

    @classmethod
    def fromURL(cls, value: str) -> "Database":
        """
        The database a C{--db} value names.

        @raise StoreError: The value is not a libpq URL.
        """
        description = redact_url(value)
        try:
            params = psycopg.conninfo.conninfo_to_dict(value)
        except psycopg.Error as e:
            problem = _oneLine(str(e))
            raise StoreError(
                f"{description} is not a valid PostgreSQL URL: {problem}"
                if "@" not in problem
                else f"{description} is not a valid PostgreSQL URL"
            ) from None
        password = params.get("password")
        secrets = (str(password),) if password else ()
        extra: Dict[str, Any] = {"application_name": "edgeproxy"}
        if "connect_timeout" not in params:
            extra["connect_timeout"] = CONNECT_TIMEOUT
        return cls(value, description, secrets, extra)

    def copy(self) -> "Database":
        """
        The same database, for another connection.
        """
        return Database(self.conninfo, self.description, self._secrets, self._params)

    def explain(self, error: BaseException) -> str:
        """
        C{error} as one line without the password.
        """
        text = _oneLine(str(error)) or type(error).__name__
        for secret in self._secrets:
            text = text.replace(secret, "***")
        if text.startswith("connection failed: "):
            text = text[len("connection failed: ") :]
        return text

    def connect(self, autocommit: bool = False, **extra: Any) -> psycopg.Connection[Any]:
        """
        A new connection (blocking).

        @raise psycopg.Error: It cannot be made.
        """
        params = dict(self._params)
        params.update(extra)
        conn = psycopg.connect(self.conninfo, autocommit=autocommit, **params)
        try:
            conn.execute(
                "SELECT set_config('statement_timeout', %s, false)", (str(STATEMENT_TIMEOUT_MS),)
            )
            if not autocommit:
                conn.commit()
        except BaseException:
            conn.close()
            raise
        return conn

    def run(
        self,
        work: Callable[[psycopg.Connection[Any]], _T],
        error: Callable[[str], Exception],
        doing: str,
        retry: bool = False,
    ) -> _T:
        """
        C{work(conn)} in one transaction on the kept connection (made, or
        made again after a failure, first).  Blocking.

        @param error: Makes the exception raised for a database error.
        @param doing: What for the message (C{"read"}, C{"write"}).
        @param retry: Whether to run C{work} once more on a new connection
            when the kept one turns out to be dead (a restarted server, a
            terminated backend); for reads only.  A write instead checks a
            kept connection first (one C{SELECT 1}), so that it is never
            sent twice and never fails for a connection that died idle.
        """
        with self._lock:
            while True:
                fresh = False
                try:
                    conn = self._conn
                    if conn is not None and not retry and not (conn.closed or conn.broken):
                        try:
                            conn.execute("SELECT 1")
                            conn.rollback()
                        except psycopg.OperationalError:
                            conn.close()
                    if conn is None or conn.closed or conn.broken:
                        self._conn = None
                        conn = self._conn = self.connect()
                        fresh = True
                    with conn.transaction():
                        return work(conn)
                except psycopg.Error as e:
                    dead = self._conn is not None and (self._conn.broken or self._conn.closed)
                    if dead and self._conn is not None:
                        self._conn.close()
                        self._conn = None
                    if retry and dead and not fresh:
                        retry = False
                        continue
                    what = "reach" if isinstance(e, psycopg.OperationalError) else doing
                    raise error(f"cannot {what} {self.description}: {self.explain(e)}") from None

    def close(self) -> None:
        """
        Close the kept connection, if any.
        """
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def _columns(conn: psycopg.Connection[Any], table: str) -> Dict[str, str]:
    """
    The columns of C{table} as the search path finds it (lower-case name ->
    name as declared); empty when there is no such table.
    """
    rows = conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s)"
        " AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
        (table,),
    ).fetchall()
    present: Dict[str, str] = {}
    for (name,) in rows:
        present.setdefault(str(name).lower(), str(name))
    return present


def _hasTable(conn: psycopg.Connection[Any], table: str) -> bool:
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()
    return bool(row and row[0])


def _hasTrigger(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = to_regclass(%s) AND tgname = %s)",
        (_BACKENDS, TRIGGER),
    ).fetchone()
    return bool(row and row[0])


# --- reading ----------------------------------------------------------------


def load_backends(
    database: Database,
) -> Tuple[RoutingSnapshot, Tuple[Tuple[str, str], ...]]:
    """
    Read the whole C{backends} table and validate it (the SQLite rules).
    Blocking: call it in a thread or before the reactor runs.

    @raise RoutingDatabaseError: The database or the table cannot be read,
        or a mandatory column is missing.
    """

    def work(conn: psycopg.Connection[Any]) -> Tuple[List[str], List[Tuple[Any, ...]]]:
        present = _columns(conn, _BACKENDS)
        if not present:
            raise RoutingDatabaseError(
                f"{database.description} has no {_BACKENDS!r} table;"
                " create it with schema-postgresql.sql"
            )
        missing = [c for c in MANDATORY_COLUMNS if c not in present]
        if missing:
            raise RoutingDatabaseError(
                f"table {_BACKENDS!r} in {database.description} lacks column(s)"
                f" {', '.join(missing)} (see schema-postgresql.sql)"
            )
        columns = [c for c in MANDATORY_COLUMNS + OPTIONAL_COLUMNS if c in present]
        query = sql.SQL("SELECT {} FROM {}").format(
            sql.SQL(", ").join(sql.Identifier(present[c]) for c in columns),
            sql.Identifier(_BACKENDS),
        )
        return columns, conn.execute(query).fetchall()

    columns, rows = database.run(work, RoutingDatabaseError, "read", retry=True)
    backends, skipped = validate_rows(columns, rows)
    return RoutingSnapshot.build(backends), tuple(skipped)


def load_pops(database: Database) -> Tuple[Tuple[Pop, ...], Tuple[Tuple[str, str], ...]]:
    """
    Read the C{pops} table (none: no POPs).  Blocking.

    @raise PopsDatabaseError: It cannot be read.
    """

    def work(conn: psycopg.Connection[Any]) -> List[Tuple[Any, ...]]:
        present = _columns(conn, _POPS)
        if not present:
            return []
        missing = [c for c in POP_COLUMNS if c not in present]
        if missing:
            raise PopsDatabaseError(
                f"table {_POPS!r} in {database.description} lacks column(s) {', '.join(missing)}"
            )
        query = sql.SQL("SELECT {} FROM {}").format(
            sql.SQL(", ").join(sql.Identifier(present[c]) for c in POP_COLUMNS),
            sql.Identifier(_POPS),
        )
        return conn.execute(query).fetchall()

    pops, skipped = validate_pops(database.run(work, PopsDatabaseError, "read", retry=True))
    return tuple(pops), tuple(skipped)


def install_schema(database: Database) -> bool:
    """
    Create the tables and the trigger when there is no C{backends} table
    (several POPs starting at once: one does it, under an advisory lock).
    Blocking.

    @return: Whether the schema was installed.
    @raise RoutingDatabaseError: It could not be (the role may not create
        tables: run the schema file as the owner).
    """

    def work(conn: psycopg.Connection[Any]) -> bool:
        if _hasTable(conn, _BACKENDS):
            return False
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('edgeproxy schema'))")
        if _hasTable(conn, _BACKENDS):
            return False
        conn.execute(schema_sql())
        return True

    return database.run(work, RoutingDatabaseError, "create the tables in")


@implementer(IBackendRepository)
@attrs.define(eq=False)
class PostgresBackendRepository(ReloadingRepository):
    """
    The routing table from the C{backends} table of a PostgreSQL database;
    the reload rules are L{ReloadingRepository}'s.

    @ivar database: The database (the connection used for loads).
    @ivar reactor: Provides C{getThreadPool}, C{callFromThread} and
        C{seconds}; the global reactor when C{None}.
    @ivar metrics: Where to count reloads (C{routing_reload}) and skipped
        rows (C{routing_rows_skipped}); optional.
    """

    database: Database
    reactor: Any = None
    metrics: IMetricsStore | None = None

    _tableError = RoutingDatabaseError

    def loadInitial(self) -> RoutingSnapshot:
        """
        The first load, synchronous, before the reactor runs.

        @raise RoutingDatabaseError: The database cannot be reached or
            read, or has no usable C{backends} table.
        """
        try:
            result = load_backends(self.database)
        except RoutingDatabaseError as e:
            self.lastError = str(e)
            self._count("routing_reload", "error")
            raise
        return self._succeeded(result)

    # ReloadingRepository

    def _blockingLoad(self) -> Callable[[], LoadResult]:
        return lambda: load_backends(self.database)

    def _source(self) -> str:
        return self.database.description

    def _reactorOrNone(self) -> Any:
        return self.reactor

    def _metricsOrNone(self) -> IMetricsStore | None:
        return self.metrics

    def _logger(self) -> Logger:
        return _log


@attrs.define(eq=False)
class PostgresPopRepository(SqlitePopRepository):
    """
    The C{pops} table of a PostgreSQL database (C{path} is its logged
    description), reloaded like the SQLite one.
    """

    database: Any = attrs.field(default=None, kw_only=True)

    def _blockingLoad(self) -> Callable[[], Tuple[Tuple[Pop, ...], Tuple[Tuple[str, str], ...]]]:
        return lambda: load_pops(self.database)


# --- writing ----------------------------------------------------------------


def _writeColumns(conn: psycopg.Connection[Any], database: Database) -> Dict[str, str]:
    present = _columns(conn, _BACKENDS)
    if not present:
        raise BackendWriteError(f"{database.description} has no {_BACKENDS!r} table")
    missing = [c for c in MANDATORY_COLUMNS if c not in present]
    if missing:
        raise BackendWriteError(
            f"table {_BACKENDS!r} in {database.description} lacks column(s)"
            f" {', '.join(missing)} (see schema-postgresql.sql)"
        )
    return present


@implementer(IBackendWriter)
@attrs.define(eq=False)
class PostgresBackendWriter(QueuedBackendWriter):
    """
    The registration API's write port on the C{backends} table of a
    PostgreSQL database, with the SQLite writer's semantics
    (L{QueuedBackendWriter}): one transaction per write, on a connection of
    its own; heartbeats batched into one C{UPDATE} of the rows in place; a
    registration or deregistration reloads the repository before it fires
    (the trigger's NOTIFY tells the other POPs).

    @ivar repository: The repository reading the same table.
    @ivar database: The database (the connection used for writes).
    """

    repository: PostgresBackendRepository
    database: Database

    def _run(self, work: Callable[[psycopg.Connection[Any]], _T]) -> _T:
        return self.database.run(work, BackendWriteError, "write")

    def _insert(self, row: Mapping[str, object], now: float) -> Tuple[str, ...]:
        backend_id = row["id"]

        def work(conn: psycopg.Connection[Any]) -> Tuple[str, ...]:
            present = _writeColumns(conn, self.database)
            added: List[str] = []
            for column, kind in _ADDABLE_COLUMNS.items():
                if column in present:
                    continue
                if column == "heartbeat_at" or row.get(column, None) != _COLUMN_DEFAULTS[column]:
                    conn.execute(
                        sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}").format(
                            sql.Identifier(_BACKENDS),
                            sql.Identifier(column),
                            sql.SQL(_PG_TYPES.get(kind, kind)),
                        )
                    )
                    present[column] = column
                    added.append(column)
            exists = conn.execute(
                sql.SQL("SELECT 1 FROM {} WHERE {} = %s").format(
                    sql.Identifier(_BACKENDS), sql.Identifier(present["id"])
                ),
                (backend_id,),
            ).fetchone()
            if exists:
                raise DuplicateBackendError(str(backend_id))
            columns = [c for c in _REGISTER_COLUMNS if c in present and c in row]
            values = [row[c] for c in columns]
            columns.append("heartbeat_at")
            values.append(now)
            insert = sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
                sql.Identifier(_BACKENDS),
                sql.SQL(", ").join(sql.Identifier(present[c]) for c in columns),
                sql.SQL(", ").join(sql.Placeholder() for _ in columns),
            )
            try:
                conn.execute(insert, values)
            except pgerrors.UniqueViolation:
                raise DuplicateBackendError(str(backend_id)) from None
            return tuple(added)

        return self._run(work)

    def _updateHeartbeats(self, backend_ids: Sequence[str], now: float) -> Dict[str, bool]:
        def work(conn: psycopg.Connection[Any]) -> Dict[str, bool]:
            present = _writeColumns(conn, self.database)
            if "heartbeat_at" not in present:
                return {backend_id: False for backend_id in backend_ids}
            beat = sql.Identifier(present["heartbeat_at"])
            where = sql.Identifier(present["id"])
            rows = conn.execute(
                sql.SQL(
                    "UPDATE {table} SET {beat} = %s WHERE {id} = ANY(%s) AND {beat} IS NOT NULL"
                    " RETURNING {id}"
                ).format(table=sql.Identifier(_BACKENDS), beat=beat, id=where),
                (now, list(backend_ids)),
            ).fetchall()
            updated = {str(r[0]) for r in rows}
            return {backend_id: backend_id in updated for backend_id in backend_ids}

        return self._run(work)

    def _delete(self, backend_id: str) -> bool:
        def work(conn: psycopg.Connection[Any]) -> bool:
            present = _writeColumns(conn, self.database)
            if "heartbeat_at" not in present:
                return False
            cursor = conn.execute(
                sql.SQL("DELETE FROM {table} WHERE {id} = %s AND {beat} IS NOT NULL").format(
                    table=sql.Identifier(_BACKENDS),
                    id=sql.Identifier(present["id"]),
                    beat=sql.Identifier(present["heartbeat_at"]),
                ),
                (backend_id,),
            )
            return cursor.rowcount > 0

        return self._run(work)

    def _where(self) -> str:
        return self.database.description

    def _logger(self) -> Logger:
        return _log


# --- change notification ----------------------------------------------------


class ChangeListener(Service):
    """
    C{LISTEN edgeproxy_routing} on a connection of its own, in a thread of
    its own, reloading the routing table (and the POPs table) at once on
    each notification.

    Notifications that arrive while the reactor has not yet handled the
    previous one are coalesced into one reload (and the repository itself
    runs at most one load at a time).  When the connection is lost
    (C{pg_terminate_backend}, a restarted server, a network fault), the
    listener reconnects with exponential backoff (C{backoff} seconds,
    doubling up to C{maxBackoff}), logging the episode once when it starts
    and once when it ends, then reloads: notifications sent meanwhile were
    lost.  The periodic reload covers that gap.

    @ivar connected: Whether the listening connection is up.
    @ivar backendPid: The server process of the listening connection (for
        C{pg_terminate_backend} in tests), or C{None}.
    @ivar notifications: How many notifications were received.
    @ivar reconnects: How many times the connection was made again.
    """

    name = "postgresql-listen"

    def __init__(
        self,
        database: Database,
        repository: Any,
        reactor: Any,
        pops: Any = None,
        metrics: IMetricsStore | None = None,
        poll: float = 0.5,
        backoff: float = 0.5,
        maxBackoff: float = 30.0,
    ) -> None:
        self.database = database
        self.repository = repository
        self.reactor = reactor
        self.pops = pops
        self.metrics = metrics
        self.poll = poll
        self.backoff = backoff
        self.maxBackoff = maxBackoff
        self.connected = False
        self.backendPid: Optional[int] = None
        self.notifications = 0
        self.reconnects = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._stopped: Optional[Deferred[None]] = None
        self._lock = threading.Lock()
        self._payloads: set[str] = set()
        self._delivering = False

    def startService(self) -> None:
        super().startService()
        self._stop.clear()
        self._stopped = Deferred()
        self._thread = threading.Thread(
            target=self._run, name="edgeproxy-postgresql-listen", daemon=True
        )
        self._thread.start()

    def stopService(self) -> "Deferred[None]":
        """
        Stop the thread; fires once it has closed its connection.
        """
        super().stopService()
        self._stop.set()
        if self._stopped is None:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._stopped.addCallback(lambda _: waiter.callback(None))
        return waiter

    def delay(self, failures: int) -> float:
        """
        Seconds to wait before connecting again after C{failures}
        consecutive failures: C{backoff}, doubling, at most C{maxBackoff}.
        """
        return float(min(self.maxBackoff, self.backoff * 2 ** min(failures - 1, 32)))

    # the thread

    def _run(self) -> None:
        failures = 0
        try:
            while not self._stop.is_set():
                conn: Optional[psycopg.Connection[Any]] = None
                try:
                    conn = self.database.connect(
                        autocommit=True, keepalives=1, keepalives_idle=10, keepalives_count=3
                    )
                    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(CHANNEL)))
                    self.reactor.callFromThread(self._connectedNow, failures, conn.info.backend_pid)
                    failures = 0
                    while not self._stop.is_set():
                        for notify in conn.notifies(timeout=self.poll):
                            self._received(notify.payload)
                except Exception as e:
                    # A database error, or a bug: either way the thread
                    # lives on, and backs off before trying again.
                    failures += 1
                    self.reactor.callFromThread(self._lost, failures, self.database.explain(e))
                    self._stop.wait(self.delay(failures))
                finally:
                    if conn is not None:
                        conn.close()
        finally:
            self.reactor.callFromThread(self._exited)

    def _received(self, payload: str) -> None:
        with self._lock:
            self._payloads.add(payload)
            if self._delivering:
                return
            self._delivering = True
        self.reactor.callFromThread(self._deliver)

    # the reactor thread

    def _deliver(self) -> None:
        with self._lock:
            payloads, self._payloads = self._payloads, set()
            self._delivering = False
        self.notifications += 1
        self._count("routing_notify", "received")
        if payloads - {_POPS}:
            self.repository.reload()
        if _POPS in payloads and self.pops is not None:
            self.pops.reload()

    def _connectedNow(self, failures: int, pid: int) -> None:
        self.connected = True
        self.backendPid = pid
        if failures:
            self.reconnects += 1
            self._count("routing_notify", "reconnected")
            _log.info(
                "PostgreSQL change listener connected again to {database} after {attempts}"
                " attempt(s); reloading the routing table",
                database=self.database.description,
                attempts=failures,
            )
        # Changes made before LISTEN took effect sent no notification to us.
        self.repository.reload()
        if self.pops is not None:
            self.pops.reload()

    def _lost(self, failures: int, error: str) -> None:
        self.connected = False
        self.backendPid = None
        if failures == 1:
            self._count("routing_notify", "lost")
            _log.warn(
                "PostgreSQL change listener lost its connection to {database}: {error};"
                " reconnecting with backoff (changes are seen at the periodic reload"
                " meanwhile)",
                database=self.database.description,
                error=error,
            )

    def _exited(self) -> None:
        self.connected = False
        stopped, self._stopped = self._stopped, None
        if stopped is not None:
            stopped.callback(None)

    def _count(self, name: str, label: str) -> None:
        if self.metrics is not None:
            self.metrics.increment(name, label)


# --- the opener ---------------------------------------------------------------


def open_postgres(
    value: str, reactor: Any, metrics: IMetricsStore, options: Mapping[str, Any]
) -> Store:
    """
    Open the PostgreSQL store a C{--db} URL names (blocking: before the
    reactor runs).  A database without a C{backends} table gets the schema
    (and a warning); a table without the notification trigger is used as
    it is, with a warning that only the periodic reload sees changes.

    @raise StoreError: The server cannot be reached, the login is refused,
        the database does not exist, or the table cannot be read (the
        reason without the password).
    """
    database = Database.fromURL(value)
    try:
        if install_schema(database):
            _log.warn(
                "Routing database {database} had no backends table: created the tables"
                " and the notification trigger (schema-postgresql.sql)",
                database=database.description,
            )
        trigger = database.run(_hasTrigger, RoutingDatabaseError, "read")
        repository = PostgresBackendRepository(database, reactor=reactor, metrics=metrics)
        repository.loadInitial()
    except RoutingDatabaseError as e:
        database.close()
        raise StoreError(str(e)) from None
    if not trigger:
        _log.warn(
            "The backends table in {database} has no {trigger} trigger: changes are seen at"
            " the periodic reload (--db-reload) only; run schema-postgresql.sql to add it",
            database=database.description,
            trigger=TRIGGER,
        )
    pops = PostgresPopRepository(
        database.description, reactor=reactor, metrics=metrics, database=database
    )
    pops.loadInitial()
    _log.info(
        "Routing table on PostgreSQL {database}: {count} backends, {pops} POPs;"
        " changes notified on channel {channel}",
        database=database.description,
        count=len(repository.current()),
        pops=len(pops.current()),
        channel=CHANNEL,
    )
    writer = PostgresBackendWriter(repository, database.copy())
    listener = ChangeListener(database.copy(), repository, reactor, pops=pops, metrics=metrics)
    return Store(
        kind="postgresql",
        repository=repository,
        writer=writer,
        pops=pops,
        description=database.description,
        services=[listener],
        localDirectory=os.getcwd(),
    )


OPENERS["postgresql"] = open_postgres
