"""
The routing decision: which backend gets a new connection.

A pure function of (routing snapshot, client geo, load counts, random
source, and the RTT table): no I/O, no clock, no reactor.  See SPEC
section 3, with the RTT term of issue 13::

    score    = geo_tier * 100 + in_tier
    in_tier  = load + min(rtt_weight * rtt_ms, max(0, 99 - load))
    load     = (current / soft_limit) / weight
    geo_tier = 0  backend.country == client.country
               1  backend.region  == client.region
               2  backend.region  == local POP region
               3  anything else

The lowest score wins; exact ties are broken uniformly at random.

The RTT term.  C{rtt_ms} is the backend's connect RTT as the health checks
measure it from this POP (L{edgeproxy.net.health.HealthChecker.rtts}),
rounded to whole milliseconds (L{rtt_ms}): the client's own path to the POP
is the same whatever backend is chosen, so the POP-to-backend RTT is the
part of the proxied path that the choice changes.  The rounding keeps
differences below half a millisecond (noise on one LAN or on loopback) from
deciding, so that backends that are equally near still share their clients
at random.  A candidate without a measurement scores as the median RTT of
the measured candidates of its tier (none measured: 0 for all).  With
C{rtt_weight} 0 (or an empty table) the score is exactly the one above
without the term, computed by the same code as before the term existed.

The tier still dominates, whatever the RTTs: the RTT term never lifts a
backend's C{in_tier} to L{RTT_CEILING} (99) or beyond, and leaves it alone
when the load alone is there.  So a backend whose load is below 99 scores
below C{tier * 100 + 100}, less than any backend of a worse tier, exactly as
without RTT; and a backend whose load is 99 or more (far past its soft
limit, the only case where today's formula already lets a worse tier win)
scores exactly as without RTT.  Precisely: if a candidate C{b} of a better
tier scores strictly below a candidate C{w} of a worse tier without the
RTT term, it does with it (C{tests/test_selection.py} checks this for any
RTT values).  Within a tier the term is plain addition while
C{load + rtt term < 99}, so of two equally loaded backends the nearer wins
(by at least one rounded millisecond).

L{select_plain} (also known as L{select}) does not scan the whole table
when the snapshot's indexes allow otherwise: it walks the tiers best first
(the client's country, the client's region, the local region, then the rest
of the app) and stops as soon as the best score found so far is below the
smallest score the next tier could possibly have (C{tier * 100}).  The
result is exactly the one a scan of every candidate would give (see
C{tests/test_selection.py}).  It still scores every candidate of each tier
it walks, which is the whole app when nothing is near the client: the
router decides with L{edgeproxy.routing.index.SelectionIndex} instead, with
the RTT term on or off, and this function stays as the reference the index
is checked against (and the path for load or RTT tables that do not note
their changes).
"""

from __future__ import annotations

import random
from typing import Container, Iterable, List, Mapping, Sequence, Tuple

from edgeproxy.model import Backend, GeoInfo, RoutingSnapshot

__all__ = [
    "RTT_CEILING",
    "geo_tier",
    "in_tier",
    "load_term",
    "median",
    "rtt_ms",
    "score",
    "select",
    "select_plain",
]

_TIER_STEP = 100.0
_INF = float("inf")
_EMPTY: Tuple[Backend, ...] = ()
_NO_EXCLUDE: frozenset[str] = frozenset()
_NO_RTT: Mapping[str, float] = {}

#: The RTT term never lifts a backend's in-tier term (load plus RTT) to
#: this or beyond: one below the tier step, so that no RTT moves a backend
#: into the range of a worse tier.
RTT_CEILING = _TIER_STEP - 1.0


def _client_keys(client_geo: GeoInfo | None) -> Tuple[str | None, str | None]:
    """
    The client's (country, region), normalised: country upper case, empty
    values treated as unknown.
    """
    if client_geo is None:
        return None, None
    country = client_geo.country
    region = client_geo.region
    return (country.upper() if country else None), (region if region else None)


def geo_tier(backend: Backend, client_geo: GeoInfo | None, local_region: str) -> int:
    """
    The geo tier (0 best, 3 worst) of C{backend} for a client at
    C{client_geo} (C{None}: no geo, so only tiers 2 and 3) on a POP in
    C{local_region}.

    Country comparison is case-insensitive: the client's country is upper
    cased here and L{Backend.country} is upper case by construction.
    """
    country, region = _client_keys(client_geo)
    if country is not None and backend.country == country:
        return 0
    if region is not None and backend.region == region:
        return 1
    if backend.region == local_region:
        return 2
    return 3


def rtt_ms(seconds: float) -> float | None:
    """
    An RTT in seconds as the selection counts it: whole milliseconds
    (rounded half to even), or C{None} for a value that is no measurement
    (negative, infinite or NaN).
    """
    if not 0.0 <= seconds < _INF:
        return None
    return float(round(seconds * 1000.0))


def median(values: Iterable[float]) -> float:
    """
    The median of C{values} (the mean of the two middle ones for an even
    count), or 0.0 for none.
    """
    ordered = sorted(values)
    n = len(ordered)
    if not n:
        return 0.0
    half = n // 2
    if n % 2:
        return ordered[half]
    return (ordered[half - 1] + ordered[half]) / 2.0


def in_tier(load: float, ms: float, rtt_weight: float) -> float:
    """
    A backend's in-tier term: its load term C{load} plus the RTT term of an
    RTT of C{ms} milliseconds, the latter capped so that the sum stays below
    L{RTT_CEILING} (and 0 when the load alone reaches it).
    """
    extra = rtt_weight * ms
    room = RTT_CEILING - load
    if extra > room:
        extra = room if room > 0.0 else 0.0
    return load + extra


def load_term(backend: Backend, current: int) -> float:
    """
    The load term of C{backend} with C{current} connections:
    C{current / soft_limit / weight}, both at least 1.  (The scans below
    inline it; the index uses this, so that both compute the same float.)
    """
    soft = backend.soft_limit
    if soft < 1:
        soft = 1
    weight = backend.weight
    if weight < 1:
        weight = 1
    return current / soft / weight


def score(
    backend: Backend,
    client_geo: GeoInfo | None,
    local_region: str,
    current: int,
    ms: float | None = None,
    rtt_weight: float = 0.0,
) -> float:
    """
    The score of C{backend} (lower is better) with C{current} connections.

    @param ms: The RTT in milliseconds the backend is scored with (L{rtt_ms}
        of its measurement, or its tier's median when it has none); C{None}
        or C{rtt_weight} 0: no RTT term.
    """
    load = load_term(backend, current)
    if ms is not None and rtt_weight > 0.0:
        load = in_tier(load, ms, rtt_weight)
    return geo_tier(backend, client_geo, local_region) * _TIER_STEP + load


def select_plain(
    snapshot: RoutingSnapshot,
    app: str | None,
    client_geo: GeoInfo | None,
    local_region: str,
    load: Mapping[str, int],
    rng: random.Random,
    exclude: Container[str] = _NO_EXCLUDE,
    blocked: Container[str] = _NO_EXCLUDE,
    *,
    rtt: Mapping[str, float] = _NO_RTT,
    rtt_weight: float = 0.0,
) -> Backend | None:
    """
    Choose the backend for a new connection, or C{None} if there is none.

    @param snapshot: The routing table; only its routable rows are
        considered (healthy, not deleted, not draining).
    @param app: Only this app's backends; C{None} for every app.
    @param client_geo: Where the client is, or C{None} if unknown.
    @param local_region: The region of this POP.
    @param load: Backend id -> current connections (open and in flight);
        missing ids count as 0.  Backends with C{hard_limit > 0} and
        C{current >= hard_limit} are not candidates.
    @param rng: Breaks exact ties uniformly; only used when there is a tie.
    @param exclude: Backend ids that must not be chosen (attempts that
        already failed for this client).
    @param blocked: More ids that must not be chosen: the state overlay's
        backends closed to new clients (down, breaker open, drain, maint).
    @param rtt: Backend id -> connect RTT in seconds (see the module
        docstring); missing ids are unmeasured.  An input like C{load}:
        read, never changed.
    @param rtt_weight: Score points per millisecond of RTT; 0 (or an empty
        C{rtt}) scores exactly as without RTT.
    """
    country, region = _client_keys(client_geo)
    use_rtt = rtt_weight > 0.0 and len(rtt) > 0
    by_region = snapshot.by_app_region
    load_get = load.get

    best_score = _INF
    best: Backend | None = None
    ties = 0

    # The four tiers, best first.  In phase k only backends whose true tier
    # is k are scored: a backend with a better tier sits in the list of
    # that better tier's phase, which has already run.
    for phase in range(4):
        if phase == 0:
            candidates: Sequence[Backend] = (
                snapshot.by_app_country.get((app, country), _EMPTY)
                if country is not None
                else _EMPTY
            )
        elif phase == 1:
            candidates = by_region.get((app, region), _EMPTY) if region is not None else _EMPTY
        elif phase == 2:
            # When the client is in the local region, every backend of that
            # region has tier 1 or 0: nothing is left for tier 2.
            candidates = (
                by_region.get((app, local_region), _EMPTY) if local_region != region else _EMPTY
            )
        else:
            candidates = snapshot.by_app.get(app, _EMPTY)
        base = phase * _TIER_STEP
        if use_rtt:
            best, best_score, ties = _rtt_phase(
                candidates,
                phase,
                country,
                region,
                local_region,
                exclude,
                blocked,
                load,
                base,
                rtt,
                rtt_weight,
                rng,
                best,
                best_score,
                ties,
            )
            if best_score < base + _TIER_STEP:
                break
            continue
        for b in candidates:
            if phase:
                # True tier of b; skip it if an earlier phase scored it.
                if country is not None and b.country == country:
                    continue
                if phase == 3:
                    b_region = b.region
                    if b_region == local_region or (region is not None and b_region == region):
                        continue
            bid = b.id
            if bid in exclude or bid in blocked:
                continue
            current = load_get(bid, 0)
            if current:
                hard = b.hard_limit
                if hard > 0 and current >= hard:
                    continue
                soft = b.soft_limit
                if soft < 1:
                    soft = 1
                weight = b.weight
                if weight < 1:
                    weight = 1
                s = base + current / soft / weight
            else:
                # Idle (the usual case): the load term is exactly 0.0 and
                # no hard limit is reached.
                s = base
            if s < best_score:
                best_score = s
                best = b
                ties = 1
            elif s == best_score:
                # Reservoir sampling: the k-th tied backend replaces the
                # pick with probability 1/k, so every tied one is equally
                # likely.
                ties += 1
                if rng.random() * ties < 1.0:
                    best = b
        if best_score < base + _TIER_STEP:
            # Nothing in a later tier can score below (phase + 1) * 100.
            break
    return best


#: The plain tier walk under its historical name.
select = select_plain


def _rtt_phase(
    candidates: Sequence[Backend],
    phase: int,
    country: str | None,
    region: str | None,
    local_region: str,
    exclude: Container[str],
    blocked: Container[str],
    load: Mapping[str, int],
    base: float,
    rtt: Mapping[str, float],
    rtt_weight: float,
    rng: random.Random,
    best: Backend | None,
    best_score: float,
    ties: int,
) -> Tuple[Backend | None, float, int]:
    """
    One phase of L{select} with the RTT term: score the candidates whose
    true tier is C{phase} and fold them into the running minimum (C{best},
    C{best_score}, C{ties}; the same reservoir sampling as the plain path).

    One pass scores the measured candidates and keeps the unmeasured aside
    with the measured RTTs; the unmeasured are scored afterwards with the
    median (only worked out when some candidate needs it).  Reservoir
    sampling does not depend on the order in which tied candidates come,
    so exact ties are still broken uniformly.
    """
    load_get = load.get
    rtt_get = rtt.get
    ceiling = RTT_CEILING
    pending: List[Tuple[Backend, float]] = []
    measured: List[float] = []
    for b in candidates:
        if phase:
            if country is not None and b.country == country:
                continue
            if phase == 3:
                b_region = b.region
                if b_region == local_region or (region is not None and b_region == region):
                    continue
        bid = b.id
        if bid in exclude or bid in blocked:
            continue
        current = load_get(bid, 0)
        lt = 0.0
        if current:
            hard = b.hard_limit
            if hard > 0 and current >= hard:
                continue
            soft = b.soft_limit
            if soft < 1:
                soft = 1
            weight = b.weight
            if weight < 1:
                weight = 1
            lt = current / soft / weight
        seconds = rtt_get(bid)
        if seconds is None or not 0.0 <= seconds < _INF:
            pending.append((b, lt))
            continue
        ms = float(round(seconds * 1000.0))
        measured.append(ms)
        extra = rtt_weight * ms
        room = ceiling - lt
        if extra > room:
            extra = room if room > 0.0 else 0.0
        s = base + (lt + extra)
        if s < best_score:
            best_score = s
            best = b
            ties = 1
        elif s == best_score:
            ties += 1
            if rng.random() * ties < 1.0:
                best = b
    if pending:
        fallback = rtt_weight * median(measured)
        for b, lt in pending:
            extra = fallback
            room = ceiling - lt
            if extra > room:
                extra = room if room > 0.0 else 0.0
            s = base + (lt + extra)
            if s < best_score:
                best_score = s
                best = b
                ties = 1
            elif s == best_score:
                ties += 1
                if rng.random() * ties < 1.0:
                    best = b
    return best, best_score, ties
