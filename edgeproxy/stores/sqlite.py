"""
The SQLite routing table: an L{IBackendRepository} adapter.

The table (SPEC section 1, schema in C{conf/schema.sql}) is read whole into
an immutable L{RoutingSnapshot}.  The first load happens synchronously before
the reactor runs (L{SqliteBackendRepository.loadInitial}); later reloads run
in the reactor's thread pool, open the file read-only with a busy timeout,
and on any failure keep the last good snapshot (FAULTS F12).

Rows are validated strictly: a row with an invalid value is skipped with its
id and a reason, never wrapped, truncated or guessed at, and never fails the
rest of the table.  A problem with the file or the table itself (unreadable,
corrupt, locked, no C{backends} table, a mandatory column missing) fails the
whole load: only the columns in L{OPTIONAL_COLUMNS} may be missing, because
reading a table without, say, C{healthy} or C{deleted} with defaults would
silently make unhealthy or deleted backends routable.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import sqlite3
import stat
from importlib import resources
from typing import Any, Callable, Dict, Iterable, List, Mapping, Sequence, Tuple, TypeVar
from urllib.parse import quote

import attrs
from twisted.logger import Logger
from zope.interface import implementer

from edgeproxy.interfaces import (
    BackendWriteError,
    DuplicateBackendError,
    IBackendRepository,
    IBackendWriter,
    IMetricsStore,
)
from edgeproxy.model import PROXY_OFF, Backend, RoutingSnapshot, parse_check, parse_sni_names
from edgeproxy.stores.reloading import LoadResult, ReloadingRepository, note_skipped
from edgeproxy.stores.writing import QueuedBackendWriter

__all__ = [
    "MANDATORY_COLUMNS",
    "OPTIONAL_COLUMNS",
    "BackendWriteError",
    "DuplicateBackendError",
    "InvalidRowError",
    "RoutingDatabaseError",
    "SqliteBackendRepository",
    "SqliteBackendWriter",
    "create_database",
    "delete_backend",
    "insert_backend",
    "load_backends",
    "note_skipped",
    "schema_sql",
    "update_heartbeats",
    "validate_row",
    "validate_rows",
]

_log = Logger()

_T = TypeVar("_T")

#: Columns the table must have (SPEC section 1): a table without any of them
#: fails the whole load (the last good table stays; fatal at startup) instead
#: of routing by defaults.  A NULL I{value} in some of them still has its
#: documented meaning (see L{validate_row}).
MANDATORY_COLUMNS: Tuple[str, ...] = (
    "id",
    "app",
    "region",
    "wg_ip",
    "port",
    "healthy",
    "weight",
    "soft_limit",
    "hard_limit",
    "deleted",
)

#: The only columns that may be missing; a missing one takes its default.
#: C{country} (NULL) and C{proxy_protocol} (0, off) are not in the original
#: edgeProxy schema; C{draining} (0) is not in the SPEC schema and is honoured
#: if an operator adds it; C{health_check} (NULL, the proxy's default check)
#: came later, and so did C{heartbeat_at} (NULL: a row written by hand, which
#: never expires; the registration API adds the column when it first
#: writes).  Optional columns added later belong here.
OPTIONAL_COLUMNS: Tuple[str, ...] = (
    "country",
    "proxy_protocol",
    "draining",
    "health_check",
    "heartbeat_at",
    "sni",
)

_TABLE = "backends"


class RoutingDatabaseError(Exception):
    """
    The routing database as a whole cannot be read: missing, unreadable,
    corrupt, locked, or without a usable C{backends} table.
    """


class InvalidRowError(ValueError):
    """
    One row of the routing table has an invalid value.

    @ivar column: The offending column.
    @ivar reason: C{"column: what is wrong"}, for the log.
    """

    def __init__(self, column: str, problem: str) -> None:
        self.column = column
        self.reason = f"{column}: {problem}"
        super().__init__(self.reason)


def schema_sql() -> str:
    """
    The SQL that creates an empty routing table (C{conf/schema.sql}, shipped
    as package data in C{edgeproxy/data/schema.sql}).
    """
    return resources.files("edgeproxy").joinpath("data/schema.sql").read_text(encoding="utf-8")


# --- row validation ---------------------------------------------------------


class _UndecodableText:
    """
    A TEXT value that is not valid UTF-8 (kept apart from BLOBs).
    """

    __slots__ = ("raw",)

    def __init__(self, raw: bytes) -> None:
        self.raw = raw


def _decodeText(raw: bytes) -> object:
    """
    C{text_factory} for the connection: undecodable text becomes a marker
    that fails its row instead of the whole query.
    """
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return _UndecodableText(raw)


_ABSENT = object()


def _show(value: object) -> str:
    """
    A short description of a bad value for a log line.
    """
    if isinstance(value, _UndecodableText):
        return "text that is not valid UTF-8"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "a blob"
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{type(value).__name__} {text}"


def _requiredText(row: Mapping[str, object], column: str, strip: bool = True) -> str:
    value = row.get(column)
    if value is None:
        raise InvalidRowError(column, "is NULL")
    if type(value) is not str:
        raise InvalidRowError(column, f"{_show(value)} is not text")
    if not value.strip():
        raise InvalidRowError(column, "is empty")
    return value.strip() if strip else value


def _optionalText(row: Mapping[str, object], column: str) -> str | None:
    value = row.get(column)
    if value is None:
        return None
    if type(value) is not str:
        raise InvalidRowError(column, f"{_show(value)} is not text")
    value = value.strip()
    return value or None


def _integer(row: Mapping[str, object], column: str, default: int | None) -> int:
    """
    An INTEGER column: absent or NULL gives C{default} (or is invalid when
    C{default} is C{None}); anything but a true integer is invalid.
    """
    value = row.get(column, _ABSENT)
    if value is None or value is _ABSENT:
        if default is None:
            raise InvalidRowError(column, "is NULL")
        return default
    if type(value) is not int:
        raise InvalidRowError(column, f"{_show(value)} is not an integer")
    return value


def _nonNegative(row: Mapping[str, object], column: str, default: int) -> int:
    value = _integer(row, column, default)
    if value < 0:
        raise InvalidRowError(column, f"{value} is negative")
    return value


def _flag(row: Mapping[str, object], column: str, default: int | None) -> bool:
    value = _integer(row, column, default)
    if value != 0 and value != 1:
        raise InvalidRowError(column, f"{value} is not 0 or 1")
    return value == 1


def _optionalTime(row: Mapping[str, object], column: str) -> float | None:
    """
    A REAL column holding epoch seconds: NULL (or absent) is C{None}; an
    integer or real is a time if it is finite and not negative.
    """
    value = row.get(column)
    if value is None:
        return None
    if type(value) is not int and type(value) is not float:
        raise InvalidRowError(column, f"{_show(value)} is not a number")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number) or number < 0:
        raise InvalidRowError(column, f"{_show(value)} is not a time")
    return number


#: One label of an RFC 1123 host name: 1-63 ASCII letters, digits and
#: hyphens, no hyphen at either end.
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")

#: A last label that makes a name read as a (malformed or non-canonical)
#: IPv4 address to C{inet_aton}: C{10.1}, C{010.0.0.1}, C{0x7f000001}.
#: RFC 1123 section 2.1: the highest-level label of a host name is never
#: numeric.
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*", re.IGNORECASE)

#: An IPv6 zone index: an interface name or number.
_ZONE = re.compile(r"[A-Za-z0-9_.-]+")


def _host(value: str) -> str | None:
    """
    C{value} as a host to connect to, or C{None} if it is not one.

    Accepted: an IPv4 literal; an IPv6 literal without brackets, optionally
    with a C{%zone} index, returned in compressed form; an RFC 1123 host
    name (at most 253 characters, an optional trailing dot), returned as
    given.  Refused: anything else, such as a port suffix, brackets, a
    scheme, a path or prefix length, or a zone on anything but IPv6.
    """
    if ":" in value:
        address, percent, zone = value.partition("%")
        if percent and _ZONE.fullmatch(zone) is None:
            return None
        try:
            return ipaddress.IPv6Address(address).compressed + percent + zone
        except ValueError:
            return None
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        pass
    name = value[:-1] if value.endswith(".") else value
    if not name or len(name) > 253:
        return None
    labels = name.split(".")
    if any(_LABEL.fullmatch(label) is None for label in labels):
        return None
    if _NUMERIC_LABEL.fullmatch(labels[-1]) is not None:
        return None
    return value


def validate_row(row: Mapping[str, object]) -> Backend:
    """
    Turn one row (a mapping of column name -> SQLite value) into a
    L{Backend}.

    Every column of L{MANDATORY_COLUMNS} must be in the mapping.  Only the
    L{OPTIONAL_COLUMNS} may be missing, taking their defaults: C{country}
    NULL, C{proxy_protocol} 0 (off), C{draining} 0, C{health_check} NULL,
    C{heartbeat_at} NULL, C{sni} NULL.
    NULL in C{app} or C{country} means none; NULL (or empty text) in
    C{health_check} means the proxy's default check; NULL in C{weight},
    C{soft_limit}, C{hard_limit}, C{deleted}, C{proxy_protocol} and
    C{draining} means the same as 0; NULL in C{id}, C{region}, C{wg_ip},
    C{port} or C{healthy} is invalid.

    C{wg_ip} must be an IPv4 literal, an IPv6 literal without brackets
    (optionally with a C{%zone} index; normalised to its compressed form) or
    an RFC 1123 host name; a port, brackets, a scheme or a path is invalid.

    C{health_check} must be C{tcp}, C{off} or C{http:/path} as
    L{edgeproxy.model.parse_check} reads them (normalised to its canonical
    form).

    C{heartbeat_at} (a registered row's last heartbeat, epoch seconds) must
    be NULL or a finite number >= 0.

    C{sni} (the TLS server names the row's app answers on C{sni:}
    listeners) must be NULL, empty, or a comma-separated list of host names
    and C{*.domain} wildcards as L{edgeproxy.model.parse_sni_names} reads
    them (normalised by it); a row with names needs an C{app}.

    @raise InvalidRowError: For a missing mandatory column or any invalid
        value; nothing else is raised whatever the values are.
    """
    for column in MANDATORY_COLUMNS:
        if column not in row:
            raise InvalidRowError(column, "is missing")
    backend_id = _requiredText(row, "id", strip=False)
    app = _optionalText(row, "app")
    region = _requiredText(row, "region")
    country = _optionalText(row, "country")
    if country is not None:
        if len(country) != 2 or not (country.isascii() and country.isalpha()):
            raise InvalidRowError("country", f"{_show(country)} is not a two-letter code")
        country = country.upper()
    wg_ip = _requiredText(row, "wg_ip")
    host = _host(wg_ip)
    if host is None:
        raise InvalidRowError("wg_ip", f"{_show(wg_ip)} is not an address or host name")
    port = _integer(row, "port", None)
    if not 1 <= port <= 65535:
        raise InvalidRowError("port", f"{port} is outside 1-65535")
    healthy = _flag(row, "healthy", None)
    weight = _nonNegative(row, "weight", 0)
    soft_limit = _nonNegative(row, "soft_limit", 0)
    hard_limit = _nonNegative(row, "hard_limit", 0)
    deleted = _flag(row, "deleted", 0)
    proxy_protocol = _integer(row, "proxy_protocol", PROXY_OFF)
    if proxy_protocol not in (0, 1, 2):
        raise InvalidRowError("proxy_protocol", f"{proxy_protocol} is not 0, 1 or 2")
    draining = _flag(row, "draining", 0)
    health_check = _optionalText(row, "health_check")
    if health_check is not None:
        try:
            health_check = str(parse_check(health_check))
        except ValueError as e:
            raise InvalidRowError(
                "health_check", f"{_show(health_check)} is not a health check: {e}"
            ) from None
    heartbeat_at = _optionalTime(row, "heartbeat_at")
    sni_text = _optionalText(row, "sni")
    sni: Tuple[str, ...] = ()
    if sni_text is not None:
        try:
            sni = parse_sni_names(sni_text)
        except ValueError as e:
            raise InvalidRowError("sni", str(e)) from None
        if app is None:
            raise InvalidRowError("sni", "server names need an app to route to")
    return Backend(
        id=backend_id,
        app=app,
        region=region,
        country=country,
        host=host,
        port=port,
        healthy=healthy,
        weight=weight or 1,
        soft_limit=soft_limit or 1,
        hard_limit=hard_limit,
        deleted=deleted,
        proxy_protocol=proxy_protocol,
        draining=draining,
        health_check=health_check,
        sni=sni,
        heartbeat_at=heartbeat_at,
    )


# --- reading the file -------------------------------------------------------


def _quoteIdent(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _rowLabel(value: object, position: int) -> str:
    """
    How a skipped row is named in the log: its id, or its position when the
    id itself is unusable.
    """
    if type(value) is str and value.strip():
        return value
    return f"<row {position}>"


def load_backends(path: str, busy_timeout: float) -> Tuple[List[Backend], List[Tuple[str, str]]]:
    """
    Read the C{backends} table of the SQLite file at C{path}, read-only.

    Blocking: call it in a thread or before the reactor runs.

    @param busy_timeout: Seconds to wait for a lock held by a writer.
    @return: (valid backends in table order, [(row id, reason)] of the rows
        skipped as invalid or as a repeated id).
    @raise RoutingDatabaseError: The file or the table cannot be read.
    """
    uri = f"file:{quote(os.fspath(path), safe='/')}?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=busy_timeout, isolation_level=None)
    except sqlite3.Error as e:
        raise RoutingDatabaseError(f"cannot open {path}: {e}") from e
    try:
        conn.text_factory = _decodeText
        conn.execute("BEGIN")
        present: Dict[str, str] = {}
        for info in conn.execute(f"PRAGMA table_info({_TABLE})"):
            name = info[1]
            if type(name) is str:
                present.setdefault(name.lower(), name)
        if not present:
            if _isEmptyFile(path):
                raise RoutingDatabaseError(f"{path} is empty (no {_TABLE!r} table)")
            raise RoutingDatabaseError(
                f"{path} has no {_TABLE!r} table; create it with conf/schema.sql"
            )
        missing = [c for c in MANDATORY_COLUMNS if c not in present]
        if missing:
            raise RoutingDatabaseError(
                f"table {_TABLE!r} in {path} lacks column(s) {', '.join(missing)}"
                " (see conf/schema.sql)"
            )
        columns = [c for c in MANDATORY_COLUMNS + OPTIONAL_COLUMNS if c in present]
        select = ", ".join(_quoteIdent(present[c]) for c in columns)
        rows = conn.execute(f"SELECT {select} FROM {_TABLE}").fetchall()
        conn.execute("COMMIT")
    except sqlite3.Error as e:
        raise RoutingDatabaseError(f"cannot read {path}: {e}") from e
    finally:
        conn.close()

    return validate_rows(columns, rows)


def validate_rows(
    columns: Sequence[str], rows: Iterable[Sequence[object]]
) -> Tuple[List[Backend], List[Tuple[str, str]]]:
    """
    Validate the rows of a C{backends} table read by any store.

    @param columns: The column names (lower case) of each row's values.
    @param rows: The rows, in table order.
    @return: (valid backends in table order, [(row id, reason)] of the rows
        skipped as invalid (L{validate_row}) or as a repeated id).
    """
    backends: List[Backend] = []
    skipped: List[Tuple[str, str]] = []
    seen: set[str] = set()
    for position, values in enumerate(rows, 1):
        row = dict(zip(columns, values))
        try:
            backend = validate_row(row)
        except InvalidRowError as e:
            skipped.append((_rowLabel(row.get("id"), position), e.reason))
            continue
        if backend.id in seen:
            skipped.append((backend.id, "id: repeats an earlier row"))
            continue
        seen.add(backend.id)
        backends.append(backend)
    return backends, skipped


def _isEmptyFile(path: str) -> bool:
    """
    Whether C{path} is a regular file of zero bytes (say, from C{touch}).
    """
    try:
        info = os.stat(path)
    except OSError:
        return False
    return stat.S_ISREG(info.st_mode) and info.st_size == 0


def create_database(path: str) -> None:
    """
    Create the SQLite file at C{path} with the schema and an empty table.

    @raise RoutingDatabaseError: It cannot be created.
    """
    try:
        conn = sqlite3.connect(path)
        try:
            conn.executescript(schema_sql())
            conn.commit()
        finally:
            conn.close()
    except sqlite3.Error as e:
        raise RoutingDatabaseError(f"cannot create {path}: {e}") from e


def _loadSnapshot(
    path: str, busy_timeout: float
) -> Tuple[RoutingSnapshot, Tuple[Tuple[str, str], ...]]:
    """
    L{load_backends} and the indexing, both off the reactor thread.
    """
    backends, skipped = load_backends(path, busy_timeout)
    return RoutingSnapshot.build(backends), tuple(skipped)


# --- the repository ---------------------------------------------------------


@implementer(IBackendRepository)
@attrs.define(eq=False)
class SqliteBackendRepository(ReloadingRepository):
    """
    The routing table from a SQLite file.

    @ivar path: The database file.
    @ivar reactor: Provides C{getThreadPool}, C{callFromThread} and
        C{seconds}; the global reactor when C{None} (looked up at the first
        reload, never at import).
    @ivar busy_timeout: Seconds a load waits for a writer's lock.
    @ivar metrics: Where to count reloads (C{routing_reload} labelled C{ok} or
        C{error}) and skipped rows (C{routing_rows_skipped} labelled with the
        offending column); optional.
    @ivar lastError: Why the last load failed, or C{None} if it succeeded.
    @ivar lastReloadOk: When the last load succeeded (reactor seconds, or
        wall-clock time without a reactor), or C{None}.
    @ivar skipped: The (row id, reason) pairs the last good load skipped.
    """

    path: str
    reactor: Any = None
    busy_timeout: float = 1.0
    metrics: IMetricsStore | None = None

    _tableError = RoutingDatabaseError

    def loadInitial(self) -> RoutingSnapshot:
        """
        The first load, synchronous, before the reactor runs.

        A missing file, or an empty one (zero bytes, as from C{touch}), is
        created with the schema and an empty table (and a warning).  Later
        reloads never create anything: for them an empty file is a failure.

        @raise RoutingDatabaseError: The file is corrupt or unreadable, or has
            no usable C{backends} table.
        """
        if not os.path.lexists(self.path):
            state = "did not exist"
        elif _isEmptyFile(self.path):
            state = "was empty"
        else:
            state = None
        if state is not None:
            create_database(self.path)
            _log.warn(
                "Routing database {path} {state}: created it with an empty backends table",
                path=self.path,
                state=state,
            )
        try:
            snapshot, skipped = _loadSnapshot(self.path, self.busy_timeout)
        except RoutingDatabaseError as e:
            self.lastError = str(e)
            self._count("routing_reload", "error")
            raise
        return self._succeeded((snapshot, skipped))

    # ReloadingRepository

    def _blockingLoad(self) -> Callable[[], LoadResult]:
        return lambda: _loadSnapshot(self.path, self.busy_timeout)

    def _source(self) -> str:
        return self.path

    def _reactorOrNone(self) -> Any:
        return self.reactor

    def _metricsOrNone(self) -> IMetricsStore | None:
        return self.metrics

    def _logger(self) -> Logger:
        return _log


# --- the write port ---------------------------------------------------------

#: The columns a registration writes besides C{heartbeat_at} (C{draining} is
#: the operator's: never written here).
_REGISTER_COLUMNS: Tuple[str, ...] = (
    *MANDATORY_COLUMNS,
    "country",
    "proxy_protocol",
    "health_check",
)

#: The type of each optional column a registration may add to a table that
#: lacks it; a column added without a default reads NULL in every existing
#: row, which L{validate_row} takes as that column's default, so adding one
#: never changes what an existing row means.
_ADDABLE_COLUMNS: Mapping[str, str] = {
    "country": "TEXT",
    "proxy_protocol": "INTEGER",
    "health_check": "TEXT",
    "heartbeat_at": "REAL",
}

#: The value of an optional column that needs no column to be stored.
_COLUMN_DEFAULTS: Mapping[str, object] = {
    "country": None,
    "proxy_protocol": 0,
    "health_check": None,
}


def _openForWriting(path: str, busy_timeout: float) -> sqlite3.Connection:
    """
    A read-write connection to an existing database (never creates one).
    """
    uri = f"file:{quote(os.fspath(path), safe='/')}?mode=rw"
    try:
        return sqlite3.connect(uri, uri=True, timeout=busy_timeout, isolation_level=None)
    except sqlite3.Error as e:
        raise BackendWriteError(f"cannot open {path} for writing: {e}") from e


def _writeError(path: str, error: sqlite3.Error, busy_timeout: float) -> BackendWriteError:
    text = str(error)
    if "locked" in text or "busy" in text:
        return BackendWriteError(
            f"the routing database {path} stayed locked for {busy_timeout:g} s: {text}"
        )
    return BackendWriteError(f"cannot write {path}: {text}")


def _writeColumns(conn: sqlite3.Connection, path: str) -> Dict[str, str]:
    """
    The columns of the table (lower-case name -> name as declared), for a
    writer inside its transaction.

    @raise BackendWriteError: No table, or a mandatory column missing (the
        loader would refuse the table: writing to it helps nobody).
    """
    present: Dict[str, str] = {}
    for info in conn.execute(f"PRAGMA table_info({_TABLE})"):
        name = info[1]
        if type(name) is str:
            present.setdefault(name.lower(), name)
    if not present:
        raise BackendWriteError(f"{path} has no {_TABLE!r} table")
    missing = [c for c in MANDATORY_COLUMNS if c not in present]
    if missing:
        raise BackendWriteError(
            f"table {_TABLE!r} in {path} lacks column(s) {', '.join(missing)} (see conf/schema.sql)"
        )
    return present


def _inTransaction(path: str, busy_timeout: float, work: Callable[[sqlite3.Connection], _T]) -> _T:
    """
    Run C{work(conn)} in one write transaction (C{BEGIN IMMEDIATE}: the
    write lock is taken first, waiting up to C{busy_timeout} for it);
    commit if it returns, roll back if it raises.  Blocking.

    @raise BackendWriteError: For any SQLite error (nothing written).
    """
    conn = _openForWriting(path, busy_timeout)
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = work(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return result
    except sqlite3.Error as e:
        raise _writeError(path, e, busy_timeout) from e
    finally:
        conn.close()


def insert_backend(
    path: str, busy_timeout: float, row: Mapping[str, object], now: float
) -> Tuple[str, ...]:
    """
    Insert C{row} (validated by the caller) as a registered row with
    C{heartbeat_at = now}, in one transaction.  Blocking.

    A table without C{heartbeat_at} (the original schema) gets it (C{ALTER
    TABLE ... ADD COLUMN}, NULL in every existing row: they stay rows
    written by hand); so does a table without C{country},
    C{proxy_protocol} or C{health_check} when C{row} has a value for it
    that is not the column's default.

    @return: The columns added to the table.
    @raise DuplicateBackendError: A row with this id exists.
    @raise BackendWriteError: Anything else (nothing written).
    """
    backend_id = row["id"]

    def work(conn: sqlite3.Connection) -> Tuple[str, ...]:
        present = _writeColumns(conn, path)
        added: List[str] = []
        for column, kind in _ADDABLE_COLUMNS.items():
            if column in present:
                continue
            if column == "heartbeat_at" or row.get(column, None) != _COLUMN_DEFAULTS[column]:
                conn.execute(f"ALTER TABLE {_TABLE} ADD COLUMN {_quoteIdent(column)} {kind}")
                present[column] = column
                added.append(column)
        id_column = _quoteIdent(present["id"])
        if conn.execute(f"SELECT 1 FROM {_TABLE} WHERE {id_column} = ?", (backend_id,)).fetchone():
            raise DuplicateBackendError(str(backend_id))
        columns = [c for c in _REGISTER_COLUMNS if c in present and c in row]
        values = [row[c] for c in columns]
        columns.append("heartbeat_at")
        values.append(now)
        names = ", ".join(_quoteIdent(present[c]) for c in columns)
        marks = ", ".join("?" for _ in columns)
        try:
            conn.execute(f"INSERT INTO {_TABLE} ({names}) VALUES ({marks})", values)
        except sqlite3.IntegrityError as e:
            if "UNIQUE" in str(e):
                raise DuplicateBackendError(str(backend_id)) from None
            raise
        return tuple(added)

    return _inTransaction(path, busy_timeout, work)


def update_heartbeats(
    path: str, busy_timeout: float, backend_ids: Sequence[str], now: float
) -> Dict[str, bool]:
    """
    Set C{heartbeat_at = now} on the registered rows among C{backend_ids},
    in one transaction.  Blocking.

    @return: Backend id -> whether it is a registered row (and was updated);
        a row written by hand (C{heartbeat_at} NULL) is left alone.
    @raise BackendWriteError: The write failed (nothing written).
    """

    def work(conn: sqlite3.Connection) -> Dict[str, bool]:
        present = _writeColumns(conn, path)
        if "heartbeat_at" not in present:
            return {backend_id: False for backend_id in backend_ids}
        beat = _quoteIdent(present["heartbeat_at"])
        where = _quoteIdent(present["id"])
        return {
            backend_id: conn.execute(
                f"UPDATE {_TABLE} SET {beat} = ? WHERE {where} = ? AND {beat} IS NOT NULL",
                (now, backend_id),
            ).rowcount
            > 0
            for backend_id in backend_ids
        }

    return _inTransaction(path, busy_timeout, work)


def delete_backend(path: str, busy_timeout: float, backend_id: str) -> bool:
    """
    Delete the registered row C{backend_id}, in one transaction.  Blocking.

    @return: Whether a registered row went (C{False}: no such row, or one
        written by hand, which is never deleted here).
    @raise BackendWriteError: The write failed (nothing written).
    """

    def work(conn: sqlite3.Connection) -> bool:
        present = _writeColumns(conn, path)
        if "heartbeat_at" not in present:
            return False
        beat = _quoteIdent(present["heartbeat_at"])
        where = _quoteIdent(present["id"])
        deleted = conn.execute(
            f"DELETE FROM {_TABLE} WHERE {where} = ? AND {beat} IS NOT NULL", (backend_id,)
        ).rowcount
        return bool(deleted > 0)

    return _inTransaction(path, busy_timeout, work)


@implementer(IBackendWriter)
@attrs.define(eq=False)
class SqliteBackendWriter(QueuedBackendWriter):
    """
    The registration API's write port on the SQLite routing table of
    C{repository}.

    Each write opens its own read-write connection in the reactor's thread
    pool and runs in one transaction (C{BEGIN IMMEDIATE}, waiting up to
    C{busy_timeout} seconds for another writer's lock).  Writes run one at
    a time, in order, so that a burst of requests holds one pool thread,
    not all of them; heartbeats that arrive while a write runs are written
    together by the next one (one transaction for all of them).  A
    registration or deregistration then reloads C{repository} and fires
    once the new table is in force, so the change is routed on this POP at
    once (L{QueuedBackendWriter}).

    @ivar repository: The repository reading the same file (its C{path},
        its reactor's thread pool and clock).
    @ivar busy_timeout: Seconds a write waits for a lock.
    """

    repository: SqliteBackendRepository
    busy_timeout: float = 5.0

    def _insert(self, row: Mapping[str, object], now: float) -> Tuple[str, ...]:
        return insert_backend(self.repository.path, self.busy_timeout, row, now)

    def _updateHeartbeats(self, backend_ids: Sequence[str], now: float) -> Dict[str, bool]:
        return update_heartbeats(self.repository.path, self.busy_timeout, backend_ids, now)

    def _delete(self, backend_id: str) -> bool:
        return delete_backend(self.repository.path, self.busy_timeout, backend_id)

    def _where(self) -> str:
        return self.repository.path

    def _logger(self) -> Logger:
        return _log
