"""
The routing decision as the proxy sees it (SPEC section 3): binding first,
then geo lookup and selection, then binding and load accounting, in one
synchronous call per connect attempt.
"""

from __future__ import annotations

import math
import random
from typing import AbstractSet, Any, Dict, FrozenSet, List, Mapping

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from edgeproxy.interfaces import (
    UNAVAILABLE,
    IBackendRepository,
    IBindingRepository,
    IGeoResolver,
    ILoadCounter,
    IMetricsStore,
    IRouter,
    IStateOverlay,
)
from edgeproxy.model import Backend, BindingKey, GeoInfo, RoutingSnapshot
from edgeproxy.routing.bindings import client_key
from edgeproxy.routing.breaker import CircuitBreaker
from edgeproxy.routing.index import SelectionIndex
from edgeproxy.routing.load import LoadTable
from edgeproxy.routing.overlay import StateOverlay
from edgeproxy.routing.selection import geo_tier, median, rtt_ms, score, select

__all__ = ["NO_BACKEND", "PANIC", "Router"]

_log = Logger()

#: Counter bumped when a connect attempt finds no candidate at all.
NO_BACKEND = "routing_no_backend"

#: Counter of routing decisions, labelled with the geo tier ("0"-"3"): the
#: POP's geo mix.
DECISIONS = "routing_decisions"

_TIER_LABELS = ("0", "1", "2", "3")

#: Counter of routing decisions by the client's country (ISO code; "" for
#: no geo): the status page's geo mix.
COUNTRIES = "routing_client_countries"

#: Counter bumped when a client is routed in panic (see L{Router.panic}).
PANIC = "routing_panic"

#: The overlay sources that panic routing may override (the proxy's own
#: verdicts; never the operator's admin state).
_PROXY_SOURCES = frozenset({"health", "breaker"})

_NO_EXCLUDE: FrozenSet[str] = frozenset()
_NO_RTT: Mapping[str, float] = {}

#: Selections per attempt when acquire() finds the chosen backend full
#: (possible only when the load table is shared with other workers).
_ACQUIRE_TRIES = 3


@implementer(IRouter)
class Router:
    """
    An L{IRouter} over the ports of the hexagon.

    Nothing derived from the routing table is cached here: every call reads
    C{repository.current()}, so a reload is seen by the next connection.  A
    binding whose backend went away, stopped being routable, changed app,
    became unavailable in the state overlay or reached its hard limit is
    dropped when next read.  A backend the overlay closes to new clients
    (drain) still takes the clients bound to it.

    Load is taken with one atomic L{ILoadCounter.acquire} per connection: if
    a backend chosen by the score turns out full (another worker took its
    last slot), the next best is chosen.

    The one thing kept across calls is the L{SelectionIndex} of the current
    snapshot, which makes the decision without scanning a tier: it is
    rebuilt when C{repository.current()} returns a snapshot of other content
    (a reload that changed something) or C{load} is replaced, and follows
    the load counts through the load table's C{changed} set and the RTTs
    through the RTT table's (L{edgeproxy.routing.load.RttTable}, the health
    checker's).  It decides with the RTT term on or off; with a load counter
    that has no C{changed} set, or the term on and an RTT table that has
    none (a plain C{dict}), the plain tier walk
    (L{edgeproxy.routing.selection.select_plain}) decides.

    @ivar local_region: The region of this POP.
    @ivar load: The per-backend load counts.
    @ivar overlay: The health / breaker / admin verdicts consulted on top of
        the routing table.
    @ivar ipv6_prefix: Bindings key an IPv6 client by this prefix (64: its
        /64, inside which privacy addresses rotate, so that one host keeps
        its backend and cannot fill the binding table); IPv4 clients by
        their address.
    @ivar breaker: The passive circuit breaker fed by L{connectFailed} and
        L{connectSucceeded}, or C{None}.
    @ivar panic: What happens when every backend that could take a client
        is ejected by the proxy's own verdicts (health checks, breaker):
        with C{True} (the default, Envoy's panic mode) the client goes to
        the best of the ejected ones anyway, counted as C{routing_panic}
        and logged once per episode, because all of a pool failing its
        checks at once is more often the checks or the network than every
        backend dead, and a connect that fails still fails over; with
        C{False} the client is refused (no-backend).  The operator's own
        word (the table's C{healthy} column, drain and maint) is never
        overridden.
    @ivar rtt: Backend id -> connect RTT in seconds, read live at every
        decision (the health checker's
        L{edgeproxy.net.health.HealthChecker.rtts}), or C{None}: no RTT.
    @ivar rtt_weight: Score points per millisecond of RTT inside a geo tier
        (C{--rtt-weight}; see L{edgeproxy.routing.selection}); 0 scores
        exactly as without RTT.
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
        *,
        load: ILoadCounter | None = None,
        overlay: IStateOverlay | None = None,
        ipv6_prefix: int = 64,
        breaker: CircuitBreaker | None = None,
        panic: bool = True,
        rtt: Mapping[str, float] | None = None,
        rtt_weight: float = 0.0,
    ) -> None:
        """
        @raise ValueError: A negative or non-finite C{rtt_weight}.
        """
        if not (isinstance(rtt_weight, (int, float)) and math.isfinite(rtt_weight)):
            raise ValueError(f"rtt_weight must be a finite number, not {rtt_weight!r}")
        if rtt_weight < 0:
            raise ValueError(f"rtt_weight must not be negative, not {rtt_weight!r}")
        self._repository = repository
        self._bindings = bindings
        self._geo = geo
        self._metrics = metrics
        self.local_region = local_region
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self.load: ILoadCounter = load if load is not None else LoadTable(metrics)
        self.overlay: IStateOverlay = overlay if overlay is not None else StateOverlay()
        client_key("127.0.0.1", ipv6_prefix)  # validates the prefix
        self.ipv6_prefix = ipv6_prefix
        self.breaker = breaker
        self.panic = panic
        self.rtt: Mapping[str, float] | None = rtt
        self.rtt_weight = float(rtt_weight)
        self._halfOpen: AbstractSet[str] = breaker.halfOpen if breaker is not None else frozenset()
        self._panicking: set[str | None] = set()
        self._index: SelectionIndex | None = None
        #: The geo tier of the backend the last L{choose} returned (0-3),
        #: for the session's access-log record; C{None} after no choice.
        self.lastTier: int | None = None

    def __repr__(self) -> str:
        return f"<Router local_region={self.local_region!r}>"

    def _usable(self, backend: Backend | None, app: str | None, exclude: FrozenSet[str]) -> bool:
        """
        Whether a bound backend may take this client now (load aside).
        """
        return (
            backend is not None
            and (app is None or backend.app == app)
            and backend.id not in exclude
            and backend.id not in self.overlay.unavailable
        )

    def choose(
        self, client_ip: str, app: str | None, exclude: FrozenSet[str] = _NO_EXCLUDE
    ) -> Backend | None:
        """
        See L{IRouter.choose}.

        C{routing_no_backend} is counted only when a first attempt finds no
        candidate: a failover that runs out of candidates is the
        connection's C{connect-failed}, not a second cause.
        """
        now = self._clock.seconds()
        snapshot = self._repository.current()
        load = self.load
        bindings = self._bindings
        key: BindingKey = (client_key(client_ip, self.ipv6_prefix), app)

        binding = bindings.lookup(key, now)
        if binding is not None:
            backend = snapshot.routable.get(binding.backend_id)
            if self._usable(backend, app, exclude) and load.acquire(backend):  # type: ignore[arg-type]
                geo = self._geo.resolve(client_ip) if self._geo is not None else None
                return self._started(backend, geo)  # type: ignore[arg-type]
            bindings.remove(key)

        geo = self._geo.resolve(client_ip) if self._geo is not None else None
        closed = self.overlay.closedToNew
        chosen = self._select(snapshot, app, geo, key, now, exclude, closed)
        if chosen is None and self.panic and closed and self._allEjected(snapshot, app, exclude):
            # Panic: every candidate is one the proxy itself ejected.
            chosen = self._select(
                snapshot,
                app,
                geo,
                key,
                now,
                exclude,
                self.overlay.closedToNewIgnoring(_PROXY_SOURCES),
            )
            if chosen is not None:
                self._metrics.increment(PANIC)
                if app not in self._panicking:
                    self._panicking.add(app)
                    _log.warn(
                        "panic routing: every candidate for app {app} is ejected by health"
                        " checks or the circuit breaker; routing to {backend} anyway",
                        app=app,
                        backend=chosen.id,
                    )
                return chosen
        elif chosen is not None and app in self._panicking:
            self._panicking.discard(app)
            _log.info("panic routing over: app {app} has available backends again", app=app)
        if chosen is None:
            self.lastTier = None
        if chosen is None and not exclude:
            self._metrics.increment(NO_BACKEND)
        return chosen

    def _allEjected(
        self, snapshot: RoutingSnapshot, app: str | None, exclude: FrozenSet[str]
    ) -> bool:
        """
        Whether every backend of C{app} that the table makes routable and
        this client has not already failed on is closed by the overlay
        (none is merely full).  Only asked when nothing could be chosen.
        """
        closed = self.overlay.closedToNew
        return all(b.id in closed or b.id in exclude for b in snapshot.by_app.get(app, ()))

    def _select(
        self,
        snapshot: RoutingSnapshot,
        app: str | None,
        geo: GeoInfo | None,
        key: BindingKey,
        now: float,
        exclude: FrozenSet[str],
        blocked: AbstractSet[str],
    ) -> Backend | None:
        """
        Score, bind and acquire, moving on to the next best when the chosen
        one turns out full at acquire time.
        """
        load = self.load
        bindings = self._bindings
        skip = exclude
        rtt = self.rtt if self.rtt is not None else _NO_RTT
        weight = self.rtt_weight
        index: SelectionIndex | None
        if weight <= 0.0:
            weight = 0.0
            index = self._indexFor(snapshot, None)
        elif getattr(rtt, "changed", None) is not None:
            # An RTT table that notes its changes (the health checker's):
            # the index follows it.
            index = self._indexFor(snapshot, rtt)
        elif not rtt:
            weight = 0.0
            index = self._indexFor(snapshot, None)
        else:
            index = None
        for _ in range(_ACQUIRE_TRIES):
            if index is not None:
                chosen = index.select(app, geo, self.local_region, self._rng, skip, blocked, weight)
            else:
                chosen = select(
                    snapshot,
                    app,
                    geo,
                    self.local_region,
                    load.connections,
                    self._rng,
                    skip,
                    blocked,
                    rtt=rtt,
                    rtt_weight=self.rtt_weight,
                )
            if chosen is None:
                break
            binding = bindings.bind(key, chosen.id, now)
            if binding.backend_id != chosen.id:
                # Get-or-create found another choice (a shared binding store:
                # another worker bound this client meanwhile).  Follow it if
                # it can take the client, so the client has one backend.
                other = snapshot.routable.get(binding.backend_id)
                if self._usable(other, app, exclude) and load.acquire(other):  # type: ignore[arg-type]
                    return self._started(other, geo)  # type: ignore[arg-type]
                bindings.remove(key)
                bindings.bind(key, chosen.id, now)
            if load.acquire(chosen):
                return self._started(chosen, geo)
            # Full since the scores were read: try the next best.
            bindings.remove(key)
            skip = skip | {chosen.id}
        return None

    def _indexFor(
        self, snapshot: RoutingSnapshot, rtt: Mapping[str, float] | None
    ) -> SelectionIndex | None:
        """
        The selection index of C{snapshot} over the current load counts and
        C{rtt} (an RTT table with a C{changed} set, or C{None}: no RTT),
        built on first use after a reload; C{None} when the load counter
        reports no changes (no C{changed} set) to follow.
        """
        index = self._index
        connections = self.load.connections
        if index is not None and index.load is connections and index.rtt is rtt:
            if index.snapshot is snapshot:
                return index
            if index.snapshot.same_content(snapshot):
                # A periodic reload that changed nothing: same rows, same
                # groups; no rebuild.
                index.snapshot = snapshot
                return index
        changed = getattr(self.load, "changed", None)
        if changed is None:
            self._index = None
            return None
        rtt_changed = getattr(rtt, "changed", None) if rtt is not None else None
        index = self._index = SelectionIndex(snapshot, connections, changed, rtt, rtt_changed)
        return index

    def _started(self, backend: Backend, geo: GeoInfo | None) -> Backend:
        """
        A backend was taken: the breaker's trial, the tier, the geo mix.
        """
        if backend.id in self._halfOpen:
            self.breaker.trialStarted(backend.id)  # type: ignore[union-attr]
        tier = geo_tier(backend, geo, self.local_region)
        self.lastTier = tier
        metrics = self._metrics
        metrics.increment(DECISIONS, _TIER_LABELS[tier])
        # The POP's client mix by country (a bounded label: ISO codes).
        metrics.increment(COUNTRIES, (geo.country or "") if geo is not None else "")
        return backend

    def release(self, backend_id: str) -> None:
        """
        See L{IRouter.release}.
        """
        self.load.release(backend_id)

    def connectSucceeded(self, backend_id: str) -> None:
        """
        See L{IRouter.connectSucceeded}.
        """
        if self.breaker is not None:
            self.breaker.connectSucceeded(backend_id)

    def connectFailed(self, client_ip: str, app: str | None, backend_id: str) -> None:
        """
        See L{IRouter.connectFailed}.  A binding to another backend is left
        alone; the breaker hears of it.
        """
        if self.breaker is not None:
            self.breaker.connectFailed(backend_id)
        key: BindingKey = (client_key(client_ip, self.ipv6_prefix), app)
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
            C{rtt_weight}, C{candidates}: the best C{limit} candidates by
            score, each C{{"id", "tier", "score", "load", "weight",
            "soft_limit", "hard_limit", "rtt_ms", "rtt_median", "rtt_term"}}
            (C{rtt_ms}: its RTT in whole milliseconds as the score counts
            it, C{None} when unmeasured; C{rtt_median}: whether it is scored
            with its tier's median for want of its own; C{rtt_term}: what the
            RTT adds to its score), and C{excluded}: the first C{limit} other
            backends of the table in table order, each C{{"id", "reason"}}
            with the reason it is no candidate: C{"deleted"},
            C{"unhealthy"}, C{"draining"}, C{"other app"} (the listener is
            bound to another app) or C{"at hard limit"} (the first that
            applies, in that order), or what the state overlay says
            (C{"health check down"}, C{"circuit breaker open"},
            C{"admin drain"}, C{"admin maint"}).
        """
        snapshot = self._repository.current()
        load = self.load.connections
        geo = self._geo.resolve(client_ip) if self._geo is not None else None
        peek = getattr(self._bindings, "peek", None)
        binding = (
            peek((client_key(client_ip, self.ipv6_prefix), app), self._clock.seconds())
            if peek is not None
            else None
        )
        rows: List[Dict[str, Any]] = []
        reasons: Dict[str, str] = {}
        closed = self.overlay.closedToNew
        rtt = self.rtt if self.rtt is not None else _NO_RTT
        weight = self.rtt_weight if rtt else 0.0
        measured: Dict[int, List[float]] = {}
        for b in snapshot.by_app.get(app, ()):
            current = load.get(b.id, 0)
            if b.id in closed:
                reasons[b.id] = _overlay_reason(self.overlay.sources(b.id))
                continue
            if b.hard_limit > 0 and current >= b.hard_limit:
                reasons[b.id] = "at hard limit"
                continue
            tier = geo_tier(b, geo, self.local_region)
            seconds = rtt.get(b.id)
            ms = rtt_ms(seconds) if seconds is not None else None
            if ms is not None:
                measured.setdefault(tier, []).append(ms)
            rows.append(
                {
                    "id": b.id,
                    "tier": tier,
                    "score": score(b, geo, self.local_region, current),
                    "load": current,
                    "weight": b.weight,
                    "soft_limit": b.soft_limit,
                    "hard_limit": b.hard_limit,
                    "rtt_ms": ms,
                    "rtt_median": False,
                    "rtt_term": 0.0,
                }
            )
        if weight > 0.0:
            # As select() scores: the unmeasured get their tier's median.
            medians = {tier: median(values) for tier, values in measured.items()}
            for row in rows:
                ms = row["rtt_ms"]
                if ms is None:
                    ms = medians.get(row["tier"], 0.0)
                    row["rtt_median"] = True
                plain = row["score"]
                row["score"] = score(
                    snapshot.by_id[row["id"]], geo, self.local_region, row["load"], ms, weight
                )
                row["rtt_term"] = row["score"] - plain
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
            "rtt_weight": self.rtt_weight,
            "binding": None if binding is None else binding.backend_id,
            "candidates": rows[:limit],
            "excluded": excluded,
        }


def _overlay_reason(sources: Mapping[str, int]) -> str:
    """
    Why the state overlay closes a backend, for humans.
    """
    parts = []
    for source, verdict in sorted(sources.items()):
        if source == "health":
            parts.append("health check down")
        elif source == "breaker":
            parts.append("circuit breaker open")
        elif source == "admin":
            parts.append("admin maint" if verdict == UNAVAILABLE else "admin drain")
        else:
            parts.append(f"{source} says no")
    return ", ".join(parts) or "closed"
