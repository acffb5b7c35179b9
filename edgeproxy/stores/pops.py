"""
The POPs of the deployment: the C{pops} table of the routing database.

The internal DNS (L{edgeproxy.control.dns}) answers C{<region>.pops.<domain>}
from it.  The table (schema in C{conf/schema.sql}) has three columns::

    id       TEXT  unique POP id, e.g. gru
    region   TEXT  the POP's region, e.g. sa
    address  TEXT  an IPv4 or IPv6 address (no host name: DNS answers
                   carry addresses)

It is read whole, read-only, like the C{backends} table
(L{edgeproxy.stores.sqlite}): the first load before the reactor runs
(L{SqlitePopRepository.loadInitial}), later ones in the reactor's thread
pool (L{SqlitePopRepository.reload}, called with each routing table
reload).  A database without a C{pops} table simply has no POPs; a row with
an invalid value is skipped and logged with its id; a file or table that
cannot be read keeps the last good list (never fatal: POPs only feed DNS).
"""

from __future__ import annotations

import ipaddress
import os
import sqlite3
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple
from urllib.parse import quote

import attrs
from twisted.internet.defer import Deferred, fail
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from edgeproxy.interfaces import IMetricsStore
from edgeproxy.stores.sqlite import InvalidRowError

__all__ = [
    "POP_COLUMNS",
    "IPopRepository",
    "Pop",
    "PopsDatabaseError",
    "SqlitePopRepository",
    "load_pops",
    "validate_pop",
    "validate_pops",
]

_log = Logger()

_TABLE = "pops"

#: The columns of the C{pops} table, all mandatory.
POP_COLUMNS: Tuple[str, ...] = ("id", "region", "address")


@attrs.frozen(slots=True)
class Pop:
    """
    One POP (point of presence) of the deployment.

    @ivar id: Unique POP id, e.g. C{gru}.
    @ivar region: Its region code (C{sa}, C{eu}...), as in the C{backends}
        table.
    @ivar address: Its IPv4 or IPv6 address, in compressed text form.
    """

    id: str
    region: str
    address: str

    @property
    def ipv6(self) -> bool:
        """
        Whether L{address} is an IPv6 address (an AAAA record, not an A).
        """
        return ":" in self.address


class IPopRepository(Interface):
    """
    The POPs of the deployment, reloadable.
    """

    def current() -> Tuple[Pop, ...]:
        """
        The POPs in force, in table order.  Never blocks.
        """

    def reload() -> "Deferred[Tuple[Pop, ...]]":
        """
        Read the source again (off the reactor thread).  The result never
        fails: it is the list in force afterwards (the last good one if the
        load failed).
        """


class PopsDatabaseError(Exception):
    """
    The C{pops} table cannot be read (the file is missing, unreadable,
    corrupt or locked, or the table lacks a column).
    """


def validate_pop(row: Mapping[str, object]) -> Pop:
    """
    Turn one row (column name -> SQLite value) into a L{Pop}.

    C{id} and C{region} must be non-empty text (surrounding blanks are
    removed from C{region}); C{address} an IPv4 literal or an IPv6 literal
    without brackets and without a zone index, normalised to its compressed
    form.  A host name is invalid: DNS answers carry addresses.

    @raise InvalidRowError: A column is missing or a value is invalid.
    """
    for column in POP_COLUMNS:
        if column not in row:
            raise InvalidRowError(column, "is missing")
    pop_id = _text(row, "id")
    region = _text(row, "region").strip()
    address = _text(row, "address").strip()
    if "%" in address:
        raise InvalidRowError("address", f"{address[:40]!r} has a zone index")
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        raise InvalidRowError(
            "address", f"{address[:40]!r} is not an IPv4 or IPv6 address"
        ) from None
    return Pop(id=pop_id, region=region, address=parsed.compressed)


def _text(row: Mapping[str, object], column: str) -> str:
    value = row.get(column)
    if value is None:
        raise InvalidRowError(column, "is NULL")
    if type(value) is not str:
        raise InvalidRowError(column, f"{type(value).__name__} is not text")
    if not value.strip():
        raise InvalidRowError(column, "is empty")
    return value


def _decodeText(raw: bytes) -> object:
    """
    C{text_factory}: undecodable text fails its row, not the query.
    """
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw


def load_pops(path: str, busy_timeout: float = 1.0) -> Tuple[List[Pop], List[Tuple[str, str]]]:
    """
    Read the C{pops} table of the SQLite file at C{path}, read-only.

    Blocking: call it in a thread or before the reactor runs.

    @param busy_timeout: Seconds to wait for a lock held by a writer.
    @return: (valid POPs in table order, [(row id, reason)] of the rows
        skipped as invalid or as a repeated id).  A database without a
        C{pops} table gives C{([], [])}.
    @raise PopsDatabaseError: The file or the table cannot be read.
    """
    uri = f"file:{quote(os.fspath(path), safe='/')}?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=busy_timeout, isolation_level=None)
    except sqlite3.Error as e:
        raise PopsDatabaseError(f"cannot open {path}: {e}") from e
    try:
        conn.text_factory = _decodeText
        conn.execute("BEGIN")
        present: Dict[str, str] = {}
        for info in conn.execute(f"PRAGMA table_info({_TABLE})"):
            name = info[1]
            if type(name) is str:
                present.setdefault(name.lower(), name)
        if not present:
            conn.execute("COMMIT")
            return [], []
        missing = [c for c in POP_COLUMNS if c not in present]
        if missing:
            raise PopsDatabaseError(
                f"table {_TABLE!r} in {path} lacks column(s) {', '.join(missing)}"
                " (see conf/schema.sql)"
            )
        select = ", ".join('"' + present[c].replace('"', '""') + '"' for c in POP_COLUMNS)
        rows = conn.execute(f"SELECT {select} FROM {_TABLE}").fetchall()
        conn.execute("COMMIT")
    except sqlite3.Error as e:
        raise PopsDatabaseError(f"cannot read {path}: {e}") from e
    finally:
        conn.close()

    return validate_pops(rows)


def validate_pops(
    rows: Iterable[Sequence[object]],
) -> Tuple[List[Pop], List[Tuple[str, str]]]:
    """
    Validate the rows of a C{pops} table read by any store, each the values
    of L{POP_COLUMNS} in that order.

    @return: (valid POPs in table order, [(row id, reason)] of the rows
        skipped as invalid or as a repeated id).
    """
    pops: List[Pop] = []
    skipped: List[Tuple[str, str]] = []
    seen: set[str] = set()
    for position, values in enumerate(rows, 1):
        row = dict(zip(POP_COLUMNS, values))
        raw_id = row.get("id")
        label = raw_id if type(raw_id) is str and raw_id.strip() else f"<row {position}>"
        try:
            pop = validate_pop(row)
        except InvalidRowError as e:
            skipped.append((label, e.reason))
            continue
        if pop.id in seen:
            skipped.append((pop.id, "id: repeats an earlier row"))
            continue
        seen.add(pop.id)
        pops.append(pop)
    return pops, skipped


_Result = Tuple[Tuple[Pop, ...], Tuple[Tuple[str, str], ...]]


def _load(path: str, busy_timeout: float) -> _Result:
    pops, skipped = load_pops(path, busy_timeout)
    return tuple(pops), tuple(skipped)


@implementer(IPopRepository)
@attrs.define(eq=False)
class SqlitePopRepository:
    """
    The C{pops} table of a SQLite file, as an L{IPopRepository}.

    Reloads follow the routing table's: call L{reload} wherever
    C{repository.reload()} is called.  At most one load runs at a time; a
    reload asked for meanwhile is served by one more load when it ends.

    @ivar path: The database file (the routing database).
    @ivar reactor: Provides C{getThreadPool} and C{callFromThread}; the
        global reactor when C{None} (looked up at the first reload).
    @ivar busy_timeout: Seconds a load waits for a writer's lock.
    @ivar metrics: Where to count loads (C{pops_reload} labelled C{ok} or
        C{error}) and skipped rows (C{pops_rows_skipped} labelled with the
        offending column); optional.
    @ivar lastError: Why the last load failed, or C{None}.
    @ivar skipped: The (row id, reason) pairs the last good load skipped.
    """

    path: str
    reactor: Any = None
    busy_timeout: float = 1.0
    metrics: Optional[IMetricsStore] = None
    lastError: Optional[str] = attrs.field(init=False, default=None)
    skipped: Tuple[Tuple[str, str], ...] = attrs.field(init=False, default=(), repr=False)
    _pops: Tuple[Pop, ...] = attrs.field(init=False, default=(), repr=False)
    _inFlight: bool = attrs.field(init=False, default=False)
    _pending: List["Deferred[Tuple[Pop, ...]]"] = attrs.field(init=False, factory=list, repr=False)

    def current(self) -> Tuple[Pop, ...]:
        """
        The POPs in force.
        """
        return self._pops

    def loadInitial(self) -> Tuple[Pop, ...]:
        """
        The first load, synchronous, before the reactor runs.  A failure is
        logged (the list stays empty), never raised.
        """
        try:
            result = self._blockingLoad()()
        except PopsDatabaseError as e:
            return self._failed(Failure(e))
        return self._succeeded(result)

    def _blockingLoad(self) -> Callable[[], _Result]:
        """
        The blocking function that reads the whole table (a store other
        than SQLite overrides it; it raises L{PopsDatabaseError}).
        """
        return lambda: _load(self.path, self.busy_timeout)

    def reload(self) -> "Deferred[Tuple[Pop, ...]]":
        """
        Read the table again in the reactor's thread pool; see
        L{IPopRepository.reload}.
        """
        result: Deferred[Tuple[Pop, ...]] = Deferred()
        if self._inFlight:
            self._pending.append(result)
        else:
            self._start([result])
        return result

    def _start(self, waiters: List["Deferred[Tuple[Pop, ...]]"]) -> None:
        self._inFlight = True
        try:
            reactor = self.reactor
            if reactor is None:
                from twisted.internet import reactor
            d: Deferred[Any] = deferToThreadPool(
                reactor, reactor.getThreadPool(), self._blockingLoad()
            )
        except Exception:
            d = fail()
        d.addCallbacks(self._succeeded, self._failed)
        d.addErrback(self._bug)
        d.addCallback(self._finished, waiters)

    def _finished(self, pops: Tuple[Pop, ...], waiters: List["Deferred[Tuple[Pop, ...]]"]) -> None:
        self._inFlight = False
        pending, self._pending = self._pending, []
        if pending:
            self._start(pending)
        for waiter in waiters:
            waiter.callback(pops)

    def _succeeded(self, result: _Result) -> Tuple[Pop, ...]:
        pops, skipped = result
        if self.lastError is not None:
            _log.info(
                "POPs table read again after failure: {count} POPs from {path}",
                count=len(pops),
                path=self.path,
            )
            self.lastError = None
        if skipped != self.skipped:
            before = set(self.skipped)
            for row_id, reason in skipped:
                if (row_id, reason) not in before:
                    _log.warn(
                        "Skipping pops table row {pop_id}: {reason}", pop_id=row_id, reason=reason
                    )
                    self._count("pops_rows_skipped", reason.split(":", 1)[0])
            self.skipped = skipped
        self._count("pops_reload", "ok")
        self._pops = pops
        return pops

    def _failed(self, failure: Failure) -> Tuple[Pop, ...]:
        error = failure.value
        message = (
            str(error)
            if isinstance(error, PopsDatabaseError)
            else f"{type(error).__name__}: {error}"
        )
        if message != self.lastError:
            _log.error(
                "POPs table load failed, keeping the last good list ({count} POPs): {error}",
                count=len(self._pops),
                error=message,
            )
        self.lastError = message
        self._count("pops_reload", "error")
        return self._pops

    def _bug(self, failure: Failure) -> Tuple[Pop, ...]:
        _log.failure("Unexpected error after a POPs table load", failure)
        return self._pops

    def _count(self, name: str, label: str) -> None:
        if self.metrics is not None:
            self.metrics.increment(name, label)
