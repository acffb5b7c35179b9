"""
What every routing-table store does the same way around its loads.

A store module supplies one blocking function that reads its whole table
and returns a L{RoutingSnapshot} and the rows it skipped
(L{edgeproxy.stores.sqlite.validate_rows} does the row rules); the
L{ReloadingRepository} base class runs it in the reactor's thread pool and
applies the reload rules of SPEC section 6 and FAULTS F12/F18: at most one
load in flight (a reload asked for meanwhile is served by one more load),
the last good snapshot kept on failure, a change of state logged once,
skipped rows logged and counted once, listeners told only when the routing
content changes.
"""

from __future__ import annotations

import time
from typing import Any, Callable, ClassVar, List, Optional, Sequence, Tuple

import attrs
from twisted.internet.defer import Deferred, fail
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from edgeproxy.interfaces import IMetricsStore, SnapshotListener
from edgeproxy.model import RoutingSnapshot

__all__ = ["LoadResult", "ReloadingRepository", "note_skipped"]

_log = Logger()

#: What a store's blocking load returns: the snapshot and the (row id,
#: reason) pairs of the rows it skipped.
LoadResult = Tuple[RoutingSnapshot, Tuple[Tuple[str, str], ...]]


@attrs.define(eq=False)
class ReloadingRepository:
    """
    The reload rules shared by every L{IBackendRepository} adapter.

    A subclass provides L{_blockingLoad} (the whole table, blocking, raising
    L{_tableError} for a table that cannot be read), L{_source} (the store
    as it may be logged), L{_reactorOrNone} and L{_metricsOrNone}.

    @ivar lastError: Why the last load failed, or C{None} if it succeeded.
    @ivar lastReloadOk: When the last load succeeded (reactor seconds, or
        wall-clock time without a reactor), or C{None}.
    @ivar skipped: The (row id, reason) pairs the last good load skipped.
    """

    lastError: str | None = attrs.field(init=False, default=None)
    lastReloadOk: float | None = attrs.field(init=False, default=None)
    skipped: Tuple[Tuple[str, str], ...] = attrs.field(init=False, default=(), repr=False)
    _snapshot: RoutingSnapshot = attrs.field(init=False, factory=RoutingSnapshot.empty, repr=False)
    _listeners: List[SnapshotListener] = attrs.field(init=False, factory=list, repr=False)
    _inFlight: bool = attrs.field(init=False, default=False)
    _pending: List["Deferred[RoutingSnapshot]"] = attrs.field(init=False, factory=list, repr=False)

    # what a store provides

    #: The exception a load raises when the table as a whole cannot be read
    #: (its message is logged as it is; anything else is logged with its
    #: traceback).
    _tableError: ClassVar[type] = Exception

    def _blockingLoad(self) -> Callable[[], LoadResult]:
        """
        The blocking function that reads the whole table (called in a
        thread, or before the reactor runs).
        """
        raise NotImplementedError()

    def _source(self) -> str:
        """
        The store as it may be logged (a path, a URL without password).
        """
        raise NotImplementedError()

    def _reactorOrNone(self) -> Any:
        raise NotImplementedError()

    def _logger(self) -> Logger:
        """
        Where the store logs (its module's logger).
        """
        return _log

    def _metricsOrNone(self) -> IMetricsStore | None:
        raise NotImplementedError()

    # IBackendRepository

    def current(self) -> RoutingSnapshot:
        """
        The snapshot in force.
        """
        return self._snapshot

    def addListener(self, listener: SnapshotListener) -> None:
        """
        Call C{listener(old, new)} after every load that changes content.
        """
        self._listeners.append(listener)

    def reload(self) -> "Deferred[RoutingSnapshot]":
        """
        Read the table again in the reactor's thread pool.

        At most one load runs at a time: a reload asked for while one runs
        is served by one more load started when it ends.  The result never
        fails; it is the snapshot in force afterwards.
        """
        result: Deferred[RoutingSnapshot] = Deferred()
        if self._inFlight:
            self._pending.append(result)
        else:
            self._start([result])
        return result

    # loading

    def _getReactor(self) -> Any:
        reactor = self._reactorOrNone()
        if reactor is None:
            from twisted.internet import reactor as _reactor

            return _reactor
        return reactor

    def _now(self) -> float:
        reactor = self._reactorOrNone()
        if reactor is None:
            return time.time()
        return float(reactor.seconds())

    def _start(self, waiters: List["Deferred[RoutingSnapshot]"]) -> None:
        self._inFlight = True
        try:
            reactor = self._getReactor()
            d: Deferred[Any] = deferToThreadPool(
                reactor, reactor.getThreadPool(), self._blockingLoad()
            )
        except Exception:
            d = fail()
        d.addCallbacks(self._succeeded, self._failed)
        d.addErrback(self._bug)
        d.addCallback(self._finished, waiters)

    def _finished(
        self, snapshot: RoutingSnapshot, waiters: List["Deferred[RoutingSnapshot]"]
    ) -> None:
        self._inFlight = False
        pending, self._pending = self._pending, []
        if pending:
            self._start(pending)
        for waiter in waiters:
            waiter.callback(snapshot)

    def _succeeded(self, result: LoadResult) -> RoutingSnapshot:
        new, skipped = result
        self.lastReloadOk = self._now()
        if self.lastError is not None:
            self._logger().info(
                "Routing table reloaded again after failure: {count} backends from {path}",
                count=len(new),
                path=self._source(),
            )
            self.lastError = None
        self._noteSkipped(skipped)
        self._count("routing_reload", "ok")
        old = self._snapshot
        self._snapshot = new
        if not old.same_content(new):
            for listener in list(self._listeners):
                try:
                    listener(old, new)
                except Exception:
                    self._logger().failure(
                        "Routing table listener {listener!r} failed", listener=listener
                    )
        # Else the same routing content (only heartbeat times may differ):
        # the fresh rows are in force, nobody is told.
        return self._snapshot

    def _failed(self, failure: Failure) -> RoutingSnapshot:
        error = failure.value
        if isinstance(error, self._tableError):
            message = str(error)
        else:
            message = f"{type(error).__name__}: {error}"
        if message != self.lastError:
            if isinstance(error, self._tableError):
                self._logger().error(
                    "Routing table reload failed, keeping the last good table "
                    "({count} backends): {error}",
                    count=len(self._snapshot),
                    error=message,
                )
            else:
                self._logger().failure(
                    "Routing table reload failed, keeping the last good table "
                    "({count} backends): {error}",
                    failure,
                    count=len(self._snapshot),
                    error=message,
                )
        self.lastError = message
        self._count("routing_reload", "error")
        return self._snapshot

    def _bug(self, failure: Failure) -> RoutingSnapshot:
        self._logger().failure("Unexpected error after a routing table load", failure)
        return self._snapshot

    def _noteSkipped(self, skipped: Tuple[Tuple[str, str], ...]) -> None:
        """
        Log and count each skipped row once: only rows (with their reason)
        not skipped by the previous good load.
        """
        note_skipped(self.skipped, skipped, self._metricsOrNone(), self._logger())
        self.skipped = skipped

    def _count(self, name: str, label: str) -> None:
        metrics = self._metricsOrNone()
        if metrics is not None:
            metrics.increment(name, label)


def note_skipped(
    before: Sequence[Tuple[str, str]],
    skipped: Sequence[Tuple[str, str]],
    metrics: Optional[IMetricsStore],
    log: Optional[Logger] = None,
) -> None:
    """
    Log and count (C{routing_rows_skipped}, labelled with the offending
    column) each row of C{skipped} that the previous good load (C{before})
    did not skip for the same reason: a bad row is reported once, not at
    every reload.  Shared by every store.
    """
    if tuple(skipped) == tuple(before):
        return
    if log is None:
        log = _log
    seen = set(before)
    for row_id, reason in skipped:
        if (row_id, reason) in seen:
            continue
        log.warn(
            "Skipping routing table row {backend_id}: {reason}",
            backend_id=row_id,
            reason=reason,
        )
        if metrics is not None:
            metrics.increment("routing_rows_skipped", reason.split(":", 1)[0])
