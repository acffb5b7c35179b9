"""
What every routing-table writer does the same way around its writes.

A store module supplies three blocking writes (insert one registered row,
set the heartbeat time of several, delete one); L{QueuedBackendWriter}
runs them in the reactor's thread pool one at a time, in order, batches
the heartbeats that arrive while a write runs into the next one, and
reloads the repository after a registration or a deregistration so that
the change is routed on this POP at once (the L{IBackendWriter} port).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple, TypeVar

import attrs
from twisted.internet.defer import Deferred, DeferredLock, fail
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from edgeproxy.model import Backend, RoutingSnapshot

__all__ = ["QueuedBackendWriter"]

_log = Logger()

_T = TypeVar("_T")


@attrs.define(eq=False)
class QueuedBackendWriter:
    """
    The registration API's write port on the routing table of
    C{repository}, around a store's blocking writes.

    Writes run one at a time, in order, so that a burst of requests holds
    one pool thread, not all of them; heartbeats that arrive while a write
    runs are written together by the next one (one transaction for all of
    them).  A registration or deregistration then reloads C{repository}
    and fires once the new table is in force.

    A subclass provides L{_insert}, L{_updateHeartbeats}, L{_delete} (all
    blocking, called in a thread) and L{_where} (the store as it may be
    logged).

    @ivar repository: The repository reading the same table (its
        reactor's thread pool and clock, its C{reload}).
    """

    repository: Any
    _lock: DeferredLock = attrs.field(init=False, factory=DeferredLock, repr=False)
    _beats: Dict[str, List["Deferred[bool]"]] = attrs.field(init=False, factory=dict, repr=False)
    _beatsQueued: bool = attrs.field(init=False, default=False, repr=False)

    # what a store provides

    def _insert(self, row: Mapping[str, object], now: float) -> Tuple[str, ...]:
        """
        Insert C{row} as a registered row (heartbeat C{now}); blocking.

        @return: The columns added to the table for it.
        @raise edgeproxy.interfaces.DuplicateBackendError: The id exists.
        @raise edgeproxy.interfaces.BackendWriteError: Anything else.
        """
        raise NotImplementedError()

    def _updateHeartbeats(self, backend_ids: Sequence[str], now: float) -> Dict[str, bool]:
        """
        Set the heartbeat time of the registered rows among C{backend_ids};
        blocking.

        @return: Backend id -> whether it is a registered row (updated).
        @raise edgeproxy.interfaces.BackendWriteError: Nothing written.
        """
        raise NotImplementedError()

    def _delete(self, backend_id: str) -> bool:
        """
        Delete the registered row C{backend_id}; blocking.

        @return: Whether a registered row went.
        @raise edgeproxy.interfaces.BackendWriteError: Nothing written.
        """
        raise NotImplementedError()

    def _where(self) -> str:
        """
        The table as it may be logged.
        """
        raise NotImplementedError()

    def _validate(self, row: Mapping[str, object]) -> Backend:
        """
        The row as the routing table reads it (raises
        L{edgeproxy.stores.sqlite.InvalidRowError}).
        """
        from edgeproxy.stores.sqlite import validate_row

        return validate_row(row)

    def _logger(self) -> Logger:
        return _log

    # the port

    def _now(self) -> float:
        return float(self.repository._getReactor().seconds())

    def _inThread(self, f: Callable[..., _T], *args: object) -> "Deferred[_T]":
        """
        C{f(*args)} in the thread pool, after every write queued before.
        """

        def start() -> "Deferred[_T]":
            reactor = self.repository._getReactor()
            return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

        return self._lock.run(start)

    def register(self, fields: Mapping[str, object]) -> "Deferred[Backend]":
        """
        See L{IBackendWriter.register}.  The row is validated here too
        (L{validate_row}), so an invalid one never reaches the table.
        """
        from edgeproxy.stores.sqlite import InvalidRowError

        row = dict(fields)
        try:
            validated = self._validate(row)
        except InvalidRowError:
            return fail()
        now = self._now()
        path = self._where()
        log = self._logger()
        d: Deferred[Any] = self._inThread(self._insert, row, now)

        def written(added: Tuple[str, ...]) -> Any:
            if added:
                log.warn(
                    "Added column(s) {columns} to the backends table in {path} for"
                    " registrations (existing rows read them as NULL)",
                    columns=", ".join(added),
                    path=path,
                )
            log.info(
                "Backend {backend_id} registered: {host}:{port}, app {app}, region {region}",
                backend_id=validated.id,
                host=validated.host,
                port=validated.port,
                app=validated.app,
                region=validated.region,
            )
            return self.repository.reload()

        def loaded(snapshot: RoutingSnapshot) -> Backend:
            found = snapshot.by_id.get(validated.id)
            if found is not None:
                return found
            log.warn(
                "Backend {backend_id} was written to {path} but the reload did not take it"
                " in: {error}",
                backend_id=validated.id,
                path=path,
                error=self.repository.lastError,
            )
            return attrs.evolve(validated, heartbeat_at=now)

        d.addCallback(written)
        d.addCallback(loaded)
        return d

    def heartbeat(self, backend_id: str) -> "Deferred[bool]":
        """
        See L{IBackendWriter.heartbeat}.
        """
        d: Deferred[bool] = Deferred()
        self._beats.setdefault(backend_id, []).append(d)
        if not self._beatsQueued:
            self._beatsQueued = True
            self._lock.run(self._writeBeats)
        return d

    def _writeBeats(self) -> "Deferred[None]":
        beats, self._beats = self._beats, {}
        self._beatsQueued = False
        reactor = self.repository._getReactor()
        d: Deferred[Dict[str, bool]] = deferToThreadPool(
            reactor,
            reactor.getThreadPool(),
            self._updateHeartbeats,
            list(beats),
            self._now(),
        )

        def written(results: Dict[str, bool]) -> None:
            for backend_id, waiters in beats.items():
                for waiter in waiters:
                    waiter.callback(results.get(backend_id, False))

        def failed(failure: Failure) -> None:
            for waiters in beats.values():
                for waiter in waiters:
                    waiter.errback(failure)

        return d.addCallbacks(written, failed)

    def deregister(self, backend_id: str) -> "Deferred[bool]":
        """
        See L{IBackendWriter.deregister}.
        """
        d: Deferred[Any] = self._inThread(self._delete, backend_id)
        log = self._logger()

        def deleted(gone: bool) -> Any:
            if not gone:
                return False
            log.info("Backend {backend_id} deregistered", backend_id=backend_id)
            return self.repository.reload().addCallback(lambda _: True)

        return d.addCallback(deleted)
