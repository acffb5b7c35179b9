"""
The routing decision: which backend gets a new connection.

A pure function of (routing snapshot, client geo, load counts, random
source): no I/O, no clock, no reactor.  See SPEC section 3::

    score    = geo_tier * 100 + (current / soft_limit) / weight
    geo_tier = 0  backend.country == client.country
               1  backend.region  == client.region
               2  backend.region  == local POP region
               3  anything else

The lowest score wins; exact ties are broken uniformly at random.

L{select} does not scan the whole table when the snapshot's indexes allow
otherwise: it walks the tiers best first (the client's country, the
client's region, the local region, then the rest of the app) and stops as
soon as the best score found so far is below the smallest score the next
tier could possibly have (C{tier * 100}).  The result is exactly the one a
scan of every candidate would give (see C{tests/test_selection.py}).
"""

from __future__ import annotations

import random
from typing import Container, Mapping, Sequence, Tuple

from edgeproxy.model import Backend, GeoInfo, RoutingSnapshot

__all__ = ["geo_tier", "score", "select"]

_TIER_STEP = 100.0
_INF = float("inf")
_EMPTY: Tuple[Backend, ...] = ()
_NO_EXCLUDE: frozenset[str] = frozenset()


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


def score(backend: Backend, client_geo: GeoInfo | None, local_region: str, current: int) -> float:
    """
    The score of C{backend} (lower is better) with C{current} connections.
    """
    soft = backend.soft_limit
    if soft < 1:
        soft = 1
    weight = backend.weight
    if weight < 1:
        weight = 1
    return geo_tier(backend, client_geo, local_region) * _TIER_STEP + current / soft / weight


def select(
    snapshot: RoutingSnapshot,
    app: str | None,
    client_geo: GeoInfo | None,
    local_region: str,
    load: Mapping[str, int],
    rng: random.Random,
    exclude: Container[str] = _NO_EXCLUDE,
    blocked: Container[str] = _NO_EXCLUDE,
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
    """
    country, region = _client_keys(client_geo)
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
