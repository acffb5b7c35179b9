"""
An incremental index of the routing snapshot by load, so that a routing
decision costs a handful of dictionary and list operations instead of a
scan of every candidate of a tier (issue 10).

L{SelectionIndex.select} makes exactly the choice of
L{edgeproxy.routing.selection.select_plain} for the score without the RTT
term (SPEC section 3): the same minimum score, the same set of tied best
candidates, each of them equally likely.  C{tests/test_selection.py} checks
this against the plain scan and a brute-force reference over random tables,
loads, exclusions and clients.

The structure.  For each list of the snapshot's geo indexes (the routable
backends of one (app, country) and one (app, region), C{None} standing for
every app) a L{_Bucket} groups the backends by their load term C{current /
soft_limit / weight} (a float; the score within a tier is C{tier * 100 +
load term}): one list per distinct value, and the distinct values in a
sorted list.  The idle backends are the group of 0.0.  A decision walks
the tiers best first as the plain scan does; within a tier it walks the
groups by increasing load term and stops at the first group whose score is
above the best found so far, so it looks at the groups that can hold the
minimum and at nothing else.  Tier 3 ("anything else") is the union of the
app's region lists other than the client's and the local region, each
walked the same way; no list of the whole app is ever scanned.

A group counts as soon as it holds one candidate (a backend that is not
excluded, not blocked by the state overlay, below its hard limit and of the
tier being walked: a list of a region also holds the backends of the
client's country, which are tier 0).  The pick among the tied groups is
uniform over their candidates: a few draws of a uniform member of the tied
groups' union, taking the first that is a candidate (rejection sampling,
exactly uniform over the candidates), and if those all miss, a count of the
candidates and one uniform draw among them.

Load changes.  L{edgeproxy.routing.load.LoadTable} notes the id of every
backend whose count changes in its C{changed} set (one set insertion per
acquire and per release); L{SelectionIndex.sync}, run at the start of
every decision, moves each noted backend to the group of its current load
term (nothing to do when a connection came and went between two
decisions).  A new snapshot (a reload) gets a new index, built from the
snapshot's lists and the load table's current counts (about 40 ms for
10,000 backends, on the first decision after the reload); a reload that
changed nothing (L{RoutingSnapshot.same_content}) keeps the index.

Memory: the index holds each routable backend in at most four lists (its
(app, country), (app, region), (every app, country) and (every app, region)
buckets) plus one position per list; the groups only partition those
lists.  Nothing in it grows with the number of clients or connections.
"""

from __future__ import annotations

import random
from bisect import bisect_left, insort
from typing import AbstractSet, Container, Dict, List, Mapping, MutableSet, Sequence, Tuple

from edgeproxy.model import Backend, GeoInfo, RoutingSnapshot
from edgeproxy.routing.selection import _client_keys

__all__ = ["SelectionIndex"]

_TIER_STEP = 100.0
_INF = float("inf")
_NO_EXCLUDE: frozenset[str] = frozenset()

#: Uniform draws over the tied groups before counting their candidates.
_DRAWS = 8


def _load_term(b: Backend, current: int) -> float:
    """
    The load term of C{b} with C{current} connections, computed exactly as
    the plain scan computes it (the same float).
    """
    if not current:
        return 0.0
    soft = b.soft_limit
    if soft < 1:
        soft = 1
    weight = b.weight
    if weight < 1:
        weight = 1
    return current / soft / weight


class _Bucket:
    """
    One geo list of the snapshot, grouped by load term.

    @ivar keys: The distinct load terms of the members, ascending.
    @ivar groups: Load term -> the members with that term (any order).
    @ivar pos: Backend id -> its position in its group's list.
    """

    __slots__ = ("groups", "keys", "pos")

    def __init__(self, members: Sequence[Backend]) -> None:
        self.keys: List[float] = [0.0] if members else []
        self.groups: Dict[float, List[Backend]] = {0.0: list(members)} if members else {}
        self.pos: Dict[str, int] = {b.id: i for i, b in enumerate(members)}

    def move(self, b: Backend, old: float, new: float) -> None:
        """
        Move C{b} from the group of C{old} to the group of C{new}.
        """
        groups = self.groups
        pos = self.pos
        group = groups[old]
        i = pos[b.id]
        last = group.pop()
        if last is not b:
            group[i] = last
            pos[last.id] = i
        if not group:
            del groups[old]
            keys = self.keys
            del keys[bisect_left(keys, old)]
        target = groups.get(new)
        if target is None:
            groups[new] = [b]
            insort(self.keys, new)
            pos[b.id] = 0
        else:
            pos[b.id] = len(target)
            target.append(b)


_Tied = List[Tuple[List[Backend], "str | None"]]


class SelectionIndex:
    """
    The load-ordered index of one routing snapshot (see the module
    docstring).

    @ivar snapshot: The snapshot indexed; a reload needs a new index.
    @ivar load: The live load counts (backend id -> current connections)
        the index follows.
    @ivar changed: The ids whose count may have changed since the last
        L{sync} (the load table's set, drained here).
    """

    __slots__ = (
        "_buckets_of",
        "_by_country",
        "_by_region",
        "_keys",
        "_regions",
        "_routable",
        "changed",
        "load",
        "snapshot",
    )

    def __init__(
        self,
        snapshot: RoutingSnapshot,
        load: Mapping[str, int],
        changed: MutableSet[str],
    ) -> None:
        self.snapshot = snapshot
        self.load = load
        self.changed = changed
        # The rows the groups hold, by id: a snapshot of the same content
        # (a reload that changed nothing) may take this index over, and its
        # rows are other (equal) objects.
        self._routable = snapshot.routable
        self._by_country: Dict[Tuple[str | None, str | None], _Bucket] = {
            key: _Bucket(rows) for key, rows in snapshot.by_app_country.items()
        }
        self._by_region: Dict[Tuple[str | None, str | None], _Bucket] = {
            key: _Bucket(rows) for key, rows in snapshot.by_app_region.items()
        }
        regions: Dict[str | None, List[Tuple[str | None, _Bucket]]] = {}
        for (app, region), bucket in self._by_region.items():
            regions.setdefault(app, []).append((region, bucket))
        self._regions = regions
        buckets_of: Dict[str, List[_Bucket]] = {}
        for index in (self._by_country, self._by_region):
            for bucket in index.values():
                for bid in bucket.pos:
                    buckets_of.setdefault(bid, []).append(bucket)
        self._buckets_of: Dict[str, Tuple[_Bucket, ...]] = {
            k: tuple(v) for k, v in buckets_of.items()
        }
        #: Backend id -> the load term its groups are filed under (absent: 0.0).
        self._keys: Dict[str, float] = {}
        changed.clear()
        routable = snapshot.routable
        for bid, current in list(load.items()):
            b = routable.get(bid)
            if b is not None and current:
                self._file(b, _load_term(b, current))

    def __repr__(self) -> str:
        return f"<SelectionIndex backends={len(self._buckets_of)} loaded={len(self._keys)}>"

    def _file(self, b: Backend, key: float) -> None:
        """
        File C{b} under load term C{key} in every bucket it is in.
        """
        keys = self._keys
        old = keys.get(b.id, 0.0)
        if old == key:
            return
        for bucket in self._buckets_of[b.id]:
            bucket.move(b, old, key)
        if key:
            keys[b.id] = key
        else:
            del keys[b.id]

    def sync(self) -> None:
        """
        Bring the groups of the backends noted in L{changed} in line with
        their current counts.
        """
        changed = self.changed
        if not changed:
            return
        routable = self._routable
        load_get = self.load.get
        keys_get = self._keys.get
        while changed:
            bid = changed.pop()
            b = routable.get(bid)
            if b is None:
                continue
            key = _load_term(b, load_get(bid, 0))
            if keys_get(bid, 0.0) != key:
                self._file(b, key)

    def _tied(
        self,
        app: str | None,
        client_geo: GeoInfo | None,
        local_region: str,
        exclude: Container[str],
        blocked: Container[str],
    ) -> Tuple[float, _Tied]:
        """
        The best score and the groups holding the candidates that reach it,
        each with the country whose backends it must skip (they are tier 0,
        found in the tier-0 list), or C{None}.
        """
        self.sync()
        country, region = _client_keys(client_geo)
        load_get = self.load.get
        best = _INF
        tied: _Tied = []
        for phase in range(4):
            base = phase * _TIER_STEP
            if best < base:
                # Nothing in this tier or a later one can score below base.
                break
            buckets: Sequence[_Bucket]
            if phase == 0:
                found = self._by_country.get((app, country)) if country is not None else None
                buckets = (found,) if found is not None else ()
                skip = None
            else:
                skip = country
                if phase == 1:
                    found = self._by_region.get((app, region)) if region is not None else None
                    buckets = (found,) if found is not None else ()
                elif phase == 2:
                    found = (
                        self._by_region.get((app, local_region)) if local_region != region else None
                    )
                    buckets = (found,) if found is not None else ()
                else:
                    buckets = [
                        bucket
                        for r, bucket in self._regions.get(app, ())
                        if r != local_region and r != region
                    ]
            for bucket in buckets:
                groups = bucket.groups
                for key in bucket.keys:
                    s = base + key
                    if s > best:
                        break
                    group = groups[key]
                    for b in group:
                        # A backend of the client's country is tier 0 and
                        # scores 100 or more below this in the tier-0 list,
                        # so it could never be tied here; skipped all the
                        # same, so that only true members of the tier count.
                        if skip is not None and b.country == skip:
                            continue
                        bid = b.id
                        if bid in exclude or bid in blocked:
                            continue
                        hard = b.hard_limit
                        if hard > 0 and load_get(bid, 0) >= hard:
                            continue
                        # One candidate: the group counts.
                        if s < best:
                            best = s
                            tied = [(group, skip)]
                        else:
                            tied.append((group, skip))
                        break
        return best, tied

    def candidates(
        self,
        app: str | None,
        client_geo: GeoInfo | None,
        local_region: str,
        exclude: Container[str] = _NO_EXCLUDE,
        blocked: Container[str] = _NO_EXCLUDE,
    ) -> Tuple[float | None, AbstractSet[str]]:
        """
        The best score and the ids of every candidate reaching it (the set
        L{select} draws from), or C{(None, set())} when there is none.  For
        tests and diagnostics: it enumerates the tied groups.
        """
        best, tied = self._tied(app, client_geo, local_region, exclude, blocked)
        if not tied:
            return None, frozenset()
        ids = {b.id for b in self._eligible(tied, exclude, blocked)}
        return best, frozenset(ids)

    def _eligible(
        self, tied: _Tied, exclude: Container[str], blocked: Container[str]
    ) -> List[Backend]:
        """
        Every candidate in the tied groups.
        """
        load_get = self.load.get
        out = []
        for group, skip in tied:
            for b in group:
                if skip is not None and b.country == skip:
                    continue
                bid = b.id
                if bid in exclude or bid in blocked:
                    continue
                hard = b.hard_limit
                if hard > 0 and load_get(bid, 0) >= hard:
                    continue
                out.append(b)
        return out

    def select(
        self,
        app: str | None,
        client_geo: GeoInfo | None,
        local_region: str,
        rng: random.Random,
        exclude: Container[str] = _NO_EXCLUDE,
        blocked: Container[str] = _NO_EXCLUDE,
    ) -> Backend | None:
        """
        Choose the backend for a new connection, or C{None}: the choice of
        L{edgeproxy.routing.selection.select_plain} with the same arguments
        and no RTT term (C{load} being L{load}).  The random source is only
        used when more than one candidate is tied.
        """
        _, tied = self._tied(app, client_geo, local_region, exclude, blocked)
        if not tied:
            return None
        if len(tied) == 1:
            group, skip = tied[0]
            if len(group) == 1:
                return group[0]
        total = 0
        for group, _ in tied:
            total += len(group)
        load_get = self.load.get
        for _ in range(_DRAWS):
            k = int(rng.random() * total)
            if k >= total:
                k = total - 1
            for group, group_skip in tied:
                n = len(group)
                if k < n:
                    b = group[k]
                    skip = group_skip
                    break
                k -= n
            else:  # pragma: no cover - k < total
                continue
            if skip is not None and b.country == skip:
                continue
            bid = b.id
            if bid in exclude or bid in blocked:
                continue
            hard = b.hard_limit
            if hard > 0 and load_get(bid, 0) >= hard:
                continue
            return b
        eligible = self._eligible(tied, exclude, blocked)
        k = int(rng.random() * len(eligible))
        return eligible[k if k < len(eligible) else len(eligible) - 1]
