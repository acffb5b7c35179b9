"""
Heartbeat expiry for registered backends (issue 9): a backend registered
through the API whose last heartbeat is older than the TTL (C{--heartbeat-ttl},
30 s by default) stops receiving connections, through the state overlay
(source C{"heartbeat"}, verdict L{UNAVAILABLE}), without a write to the
routing table; a heartbeat puts it back at once.

Rows written by hand have no heartbeat (L{Backend.heartbeat_at} is C{None})
and are never touched; nor are rows the store expires itself (a repository
providing L{ILeasedRepository}: etcd's leased keys disappear when their
lease runs out, at every POP, whichever POP heard the heartbeats).  The last
heartbeat is the later of the table's C{heartbeat_at} (written by the
registration API, seen at the next reload) and the heartbeats this process
heard of (L{HeartbeatExpiry.beat}, called by the API as soon as a heartbeat
is written), so the reload interval never delays a recovery.  Nothing here does I/O.

    expiry = HeartbeatExpiry(repository, router.overlay, reactor, ttl=30.0)
    repository.addListener(expiry.routingTableChanged)
    TimerService(1.0, expiry.check).setServiceParent(top)
"""

from __future__ import annotations

from typing import Dict, FrozenSet, Optional, Tuple

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from edgeproxy.interfaces import (
    AVAILABLE,
    UNAVAILABLE,
    IBackendRepository,
    ILeasedRepository,
    IStateOverlay,
)
from edgeproxy.model import Backend, RoutingSnapshot

__all__ = ["DEFAULT_HEARTBEAT_TTL", "SOURCE", "HeartbeatExpiry"]

_log = Logger()

#: The overlay source heartbeat expiry speaks as.
SOURCE = "heartbeat"

#: Seconds without a heartbeat after which a registered backend takes no
#: more connections, by default.
DEFAULT_HEARTBEAT_TTL = 30.0


class HeartbeatExpiry:
    """
    Sets (and clears) the C{"heartbeat"} verdict of registered backends.

    @ivar ttl: Seconds a heartbeat is good for.
    @ivar overlay: Where the verdicts go.
    """

    def __init__(
        self,
        repository: IBackendRepository,
        overlay: IStateOverlay,
        clock: IReactorTime,
        ttl: float = DEFAULT_HEARTBEAT_TTL,
    ) -> None:
        if not ttl > 0:
            raise ValueError(f"the heartbeat TTL must be > 0 seconds, got {ttl!r}")
        self.ttl = ttl
        self.overlay = overlay
        self._repository = repository
        self._clock = clock
        #: Heartbeats heard of here, by backend id (clock seconds).
        self._beats: Dict[str, float] = {}
        #: Ids whose verdict is set now.
        self._expired: set[str] = set()
        #: The registered backends of the last snapshot looked at, by version.
        self._registered: Tuple[Optional[RoutingSnapshot], Tuple[Backend, ...]] = (None, ())

    def __repr__(self) -> str:
        return f"<HeartbeatExpiry ttl={self.ttl:g}s expired={len(self._expired)}>"

    @property
    def expired(self) -> FrozenSet[str]:
        """
        The ids of the registered backends whose heartbeat expired.
        """
        return frozenset(self._expired)

    def lastBeat(self, backend: Backend) -> Optional[float]:
        """
        When C{backend} last sent a heartbeat (clock seconds), or C{None}
        for a row written by hand.
        """
        if backend.heartbeat_at is None:
            return None
        heard = self._beats.get(backend.id)
        return backend.heartbeat_at if heard is None else max(heard, backend.heartbeat_at)

    def beat(self, backend_id: str, when: Optional[float] = None) -> None:
        """
        A heartbeat from C{backend_id} was written (at C{when}, now by
        default): clear its expiry at once.
        """
        self._beats[backend_id] = self._clock.seconds() if when is None else when
        if backend_id in self._expired:
            self._expired.discard(backend_id)
            self.overlay.setVerdict(backend_id, SOURCE, AVAILABLE)
            _log.info("backend {backend} heartbeat again: routable", backend=backend_id)

    def routingTableChanged(self, old: RoutingSnapshot, new: RoutingSnapshot) -> None:
        """
        A repository listener: L{check} at once against the new table
        (backends that left it are forgotten).  Never raises.
        """
        self.check()

    def check(self) -> None:
        """
        The periodic job (every second): set the verdict of every registered
        backend whose heartbeat is older than the TTL, clear it for those
        with a fresh one, forget backends that left the table (or are no
        longer registered rows).  Never raises.
        """
        try:
            self._check()
        except Exception:
            _log.failure("heartbeat expiry check failed; will try again")

    def _registeredBackends(self, snapshot: RoutingSnapshot) -> Tuple[Backend, ...]:
        seen, registered = self._registered
        if seen is not snapshot:
            leased = ILeasedRepository(self._repository, None)
            registered = tuple(
                b
                for b in snapshot.backends
                if b.heartbeat_at is not None and (leased is None or not leased.leased(b.id))
            )
            self._registered = (snapshot, registered)
        return registered

    def _check(self) -> None:
        now = self._clock.seconds()
        registered = self._registeredBackends(self._repository.current())
        ids = {b.id for b in registered}
        gone = (self._expired | set(self._beats)) - ids
        if gone:
            for backend_id in gone:
                self._beats.pop(backend_id, None)
            left = self._expired & gone
            if left:
                self._expired -= left
                self.overlay.forget(frozenset(left), frozenset({SOURCE}))
        ttl = self.ttl
        for b in registered:
            last = self.lastBeat(b)
            assert last is not None
            late = now - last > ttl
            if late and b.id not in self._expired:
                self._expired.add(b.id)
                self.overlay.setVerdict(b.id, SOURCE, UNAVAILABLE)
                _log.warn(
                    "backend {backend} sent no heartbeat for {age:.0f} s (TTL {ttl:g} s):"
                    " no more connections until it does",
                    backend=b.id,
                    age=now - last,
                    ttl=ttl,
                )
            elif not late and b.id in self._expired:
                self._expired.discard(b.id)
                self.overlay.setVerdict(b.id, SOURCE, AVAILABLE)
                _log.info("backend {backend} heartbeat again: routable", backend=b.id)
