"""
The routing decision as the proxy sees it (SPEC section 3): binding first,
then geo lookup and selection, then binding and load accounting, in one
synchronous call per connect attempt.
"""

from __future__ import annotations

import random
from typing import Any, Dict, FrozenSet, List

from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from edgeproxy.interfaces import (
    IBackendRepository,
    IBindingRepository,
    IGeoResolver,
    IMetricsStore,
    IRouter,
)
from edgeproxy.model import Backend, BindingKey
from edgeproxy.routing.selection import geo_tier, score, select

__all__ = ["NO_BACKEND", "Router"]

#: Counter bumped when a connect attempt finds no candidate at all.
NO_BACKEND = "routing_no_backend"

_NO_EXCLUDE: FrozenSet[str] = frozenset()


@implementer(IRouter)
class Router:
    """
    An L{IRouter} over the ports of the hexagon.

    Nothing derived from the routing table is cached here: every call reads
    C{repository.current()}, so a reload is seen by the next connection.  A
    binding whose backend went away, stopped being routable, changed app or
    reached its hard limit is dropped when next read.

    @ivar local_region: The region of this POP.
    """

    def __init__(
        self,
        repository: IBackendRepository,
        bindings: IBindingRepository,
        geo: IGeoResolver | None,
        metrics: IMetricsStore,
        local_region: str,
        clock: IReactorTime,
        rng: random.Random | None = None,
    ) -> None:
        self._repository = repository
        self._bindings = bindings
        self._geo = geo
        self._metrics = metrics
        self.local_region = local_region
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()

    def __repr__(self) -> str:
        return f"<Router local_region={self.local_region!r}>"

    def choose(
        self, client_ip: str, app: str | None, exclude: FrozenSet[str] = _NO_EXCLUDE
    ) -> Backend | None:
        """
        See L{IRouter.choose}.
        """
        now = self._clock.seconds()
        snapshot = self._repository.current()
        metrics = self._metrics
        load = metrics.connections
        bindings = self._bindings
        key: BindingKey = (client_ip, app)

        binding = bindings.lookup(key, now)
        if binding is not None:
            backend = snapshot.routable.get(binding.backend_id)
            if (
                backend is not None
                and (app is None or backend.app == app)
                and backend.id not in exclude
                and (backend.hard_limit <= 0 or load.get(backend.id, 0) < backend.hard_limit)
            ):
                metrics.connectionOpened(backend.id)
                return backend
            bindings.remove(key)

        geo = self._geo.resolve(client_ip) if self._geo is not None else None
        chosen = select(snapshot, app, geo, self.local_region, load, self._rng, exclude)
        if chosen is None:
            metrics.increment(NO_BACKEND)
            return None
        bindings.bind(key, chosen.id, now)
        metrics.connectionOpened(chosen.id)
        return chosen

    def release(self, backend_id: str) -> None:
        """
        See L{IRouter.release}.
        """
        self._metrics.connectionClosed(backend_id)

    def connectFailed(self, client_ip: str, app: str | None, backend_id: str) -> None:
        """
        See L{IRouter.connectFailed}.  A binding to another backend is left
        alone.
        """
        key: BindingKey = (client_ip, app)
        binding = self._bindings.lookup(key, self._clock.seconds())
        if binding is not None and binding.backend_id == backend_id:
            self._bindings.remove(key)

    def explain(self, client_ip: str, app: str | None, limit: int = 5) -> Dict[str, Any]:
        """
        Why a new connection from C{client_ip} would go where it goes, for
        humans (demo, debugging).  No side effect: nothing is bound,
        refreshed or counted.

        @return: A JSON-friendly dict: C{client_ip}, C{app}, C{geo}
            (C{{"country", "region"}} or C{None}), C{local_region},
            C{binding} (the bound backend id, when the binding repository
            can be read without refreshing it, else C{None}),
            C{candidates}: the best C{limit} candidates by score, each
            C{{"id", "tier", "score", "load", "weight", "soft_limit",
            "hard_limit"}}, and C{excluded}: the first C{limit} other
            backends of the table in table order, each C{{"id", "reason"}}
            with the reason it is no candidate: C{"deleted"},
            C{"unhealthy"}, C{"draining"}, C{"other app"} (the listener is
            bound to another app) or C{"at hard limit"} (the first that
            applies, in that order).
        """
        snapshot = self._repository.current()
        load = self._metrics.connections
        geo = self._geo.resolve(client_ip) if self._geo is not None else None
        peek = getattr(self._bindings, "peek", None)
        binding = peek((client_ip, app), self._clock.seconds()) if peek is not None else None
        rows: List[Dict[str, Any]] = []
        reasons: Dict[str, str] = {}
        for b in snapshot.by_app.get(app, ()):
            current = load.get(b.id, 0)
            if b.hard_limit > 0 and current >= b.hard_limit:
                reasons[b.id] = "at hard limit"
                continue
            rows.append(
                {
                    "id": b.id,
                    "tier": geo_tier(b, geo, self.local_region),
                    "score": score(b, geo, self.local_region, current),
                    "load": current,
                    "weight": b.weight,
                    "soft_limit": b.soft_limit,
                    "hard_limit": b.hard_limit,
                }
            )
        rows.sort(key=lambda r: (r["score"], r["id"]))
        candidates = {r["id"] for r in rows}
        excluded: List[Dict[str, Any]] = []
        for b in snapshot.backends:
            if b.id in candidates or len(excluded) >= limit:
                continue
            if b.deleted:
                reason = "deleted"
            elif not b.healthy:
                reason = "unhealthy"
            elif b.draining:
                reason = "draining"
            elif app is not None and b.app != app:
                reason = "other app"
            else:
                reason = reasons.get(b.id, "not routable")
            excluded.append({"id": b.id, "reason": reason})
        return {
            "client_ip": client_ip,
            "app": app,
            "geo": None if geo is None else {"country": geo.country, "region": geo.region},
            "local_region": self.local_region,
            "binding": None if binding is None else binding.backend_id,
            "candidates": rows[:limit],
            "excluded": excluded,
        }
