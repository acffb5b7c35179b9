"""
An incremental index of the routing snapshot by load and RTT, so that a
routing decision costs a handful of dictionary and list operations instead
of a scan of every candidate of a tier (issue 10).

L{SelectionIndex.select} makes exactly the choice of
L{edgeproxy.routing.selection.select_plain} with the same arguments, with
the RTT term or without it: the same minimum score, the same set of tied
best candidates, each of them equally likely.  C{tests/test_selection.py}
checks this against the plain scan and a brute-force reference over random
tables, loads, RTT tables (unmeasured backends included), exclusions and
clients, and through sequences of acquires, releases, RTT updates and
reloads.

The structure.  For each list of the snapshot's geo indexes (the routable
backends of one (app, country) and one (app, region), C{None} standing for
every app) a L{_Bucket} groups the backends by their load term C{current /
soft_limit / weight} (a float; the score within a tier is C{tier * 100 +
in_tier}, see L{edgeproxy.routing.selection}): one L{_Group} per distinct
value, and the distinct values in a sorted list.  Inside a group the
backends are split again by their RTT as the score counts it (whole
milliseconds, L{edgeproxy.routing.selection.rtt_ms}; C{None} for the
unmeasured), with the distinct measured values in a sorted list.  The idle
backends are the group of 0.0.

A decision walks the tiers best first as the plain scan does, with its
early stop.  Within a tier it walks the groups by increasing load term and
stops at the first group whose load term alone scores above the best found
so far: the RTT term is never negative (C{rtt_weight > 0}, whole
milliseconds >= 0) and the in-tier term C{load + min(rtt_weight * ms,
max(0, 99 - load))} never decreases as the load or the RTT grows, so no
later group can do better.  Inside a group it walks the RTT values upwards
and stops at the first one scoring above the best, for the same reason.
Tier 3 ("anything else") is the union of the app's region lists other than
the client's and the local region, each walked the same way; no list of
the whole app is ever scanned.

A sub-group (one load term, one RTT value) counts as soon as it holds one
candidate (a backend that is not excluded, not blocked by the state
overlay, below its hard limit and of the tier being walked: a list of a
region also holds the backends of the client's country, which are tier 0).
Every candidate of a sub-group has the same score.  The pick among the tied
sub-groups is uniform over their candidates: a few draws of a uniform
member of their union, taking the first that is a candidate (rejection
sampling, exactly uniform over the candidates), and if those all miss, a
count of the candidates and one uniform draw among them.

The unmeasured.  The plain scan scores an unmeasured candidate with the
median RTT of the I{measured candidates of its tier}: a statistic of the
candidate set, which exclusions, the overlay and hard limits change from
one decision to the next.  The index keeps sorted lists of the measured
RTTs per (app, country), (app, region), app and (app, country, region);
each tier's measured members are a signed sum of at most six of them
(tier 3: the app, minus the client's region, minus the local region, minus
the client's country, plus the client's country within each of those two
regions), and the measured members that are no candidate right now (in
C{exclude}, C{blocked}, or at their hard limit, which the index tracks) are
subtracted too.  The median is then an order statistic found by bisection
over the values (a few dozen C{bisect} calls), worked out only when an
unmeasured candidate could reach the best score, and cached per tier while
no RTT changes and no measured member of the tier is ineligible.

Load changes.  L{edgeproxy.routing.load.LoadTable} notes the id of every
backend whose count changes in its C{changed} set (one set insertion per
acquire and per release); L{SelectionIndex.sync}, run at the start of
every decision, moves each noted backend to the group of its current load
term (nothing to do when a connection came and went between two
decisions).  RTT changes.  L{edgeproxy.routing.load.RttTable} (the health
checker's L{edgeproxy.net.health.HealthChecker.rtts}) notes every id whose
RTT is set or removed in its own C{changed} set; the same sync moves each
to the sub-group of its new whole-millisecond RTT (an estimate that moved
less than the rounding moves nothing) and updates the sorted lists.  A new
snapshot (a reload) gets a new index, built from the snapshot's lists and
the tables' current values (about 50 ms for 10,000 backends, 80 ms with
their RTTs, on the first decision after the reload); a reload that changed nothing
(L{RoutingSnapshot.same_content}) keeps the index.

Memory: the index holds each routable backend in at most four bucket lists
and its RTT in at most eight sorted lists of floats; the groups only
partition those lists.  Nothing in it grows with the number of clients or
connections.
"""

from __future__ import annotations

import random
from bisect import bisect_left, bisect_right, insort
from itertools import islice
from typing import (
    AbstractSet,
    Collection,
    Dict,
    Iterable,
    List,
    Mapping,
    MutableSet,
    Sequence,
    Tuple,
)

from edgeproxy.model import Backend, GeoInfo, RoutingSnapshot
from edgeproxy.routing.selection import (
    _INF,
    _NO_EXCLUDE,
    _TIER_STEP,
    RTT_CEILING,
    _client_keys,
    load_term,
    rtt_ms,
)

__all__ = ["SelectionIndex"]

_EMPTY_MS: List[float] = []

#: Uniform draws over the tied groups before counting their candidates.
_DRAWS = 8

#: At most this many tier medians are cached between RTT changes.
_MEDIAN_CACHE = 1024


class _Group:
    """
    The members of one bucket with one load term.

    @ivar subs: RTT in whole milliseconds (C{None}: unmeasured) -> the
        members with it (any order).
    @ivar ms: The measured RTT values of C{subs}, ascending.
    """

    __slots__ = ("ms", "subs")

    def __init__(self) -> None:
        self.subs: Dict[float | None, List[Backend]] = {}
        self.ms: List[float] = []


class _Bucket:
    """
    One geo list of the snapshot, grouped by load term, then by RTT.

    @ivar keys: The distinct load terms of the members, ascending.
    @ivar groups: Load term -> its group.
    @ivar pos: Backend id -> its position in its sub-group's list.
    @ivar measured: The measured RTTs of the members, ascending (for the
        tier medians).
    """

    __slots__ = ("groups", "keys", "measured", "pos")

    def __init__(
        self,
        members: Sequence[Backend],
        lt_of: Mapping[str, float],
        ms_of: Mapping[str, float],
    ) -> None:
        self.keys: List[float] = []
        self.groups: Dict[float, _Group] = {}
        self.pos: Dict[str, int] = {}
        groups = self.groups
        lt_get = lt_of.get
        ms_get = ms_of.get
        for b in members:
            bid = b.id
            lt = lt_get(bid, 0.0)
            group = groups.get(lt)
            if group is None:
                group = groups[lt] = _Group()
            ms = ms_get(bid)
            sub = group.subs.get(ms)
            if sub is None:
                group.subs[ms] = [b]
            else:
                sub.append(b)
        pos = self.pos
        for group in groups.values():
            for sub in group.subs.values():
                for i, b in enumerate(sub):
                    pos[b.id] = i
            group.ms = sorted(ms for ms in group.subs if ms is not None)
        self.keys = sorted(groups)
        self.measured: List[float] = (
            sorted(ms for ms in map(ms_get, pos) if ms is not None) if ms_of else []
        )

    def remove(self, b: Backend, lt: float, ms: float | None) -> None:
        """
        Take C{b} out of the sub-group (C{lt}, C{ms}).
        """
        group = self.groups[lt]
        subs = group.subs
        sub = subs[ms]
        pos = self.pos
        i = pos[b.id]
        last = sub.pop()
        if last is not b:
            sub[i] = last
            pos[last.id] = i
        if not sub:
            del subs[ms]
            if ms is not None:
                values = group.ms
                del values[bisect_left(values, ms)]
            if not subs:
                del self.groups[lt]
                keys = self.keys
                del keys[bisect_left(keys, lt)]

    def add(self, b: Backend, lt: float, ms: float | None) -> None:
        """
        Put C{b} in the sub-group (C{lt}, C{ms}).
        """
        group = self.groups.get(lt)
        if group is None:
            group = self.groups[lt] = _Group()
            insort(self.keys, lt)
        subs = group.subs
        sub = subs.get(ms)
        if sub is None:
            subs[ms] = [b]
            if ms is not None:
                insort(group.ms, ms)
            self.pos[b.id] = 0
        else:
            self.pos[b.id] = len(sub)
            sub.append(b)


_Tied = List[Tuple[List[Backend], "str | None"]]
#: A signed sum of sorted lists: the multiset sum(sign * list).
_Terms = List[Tuple[int, List[float]]]


def _kth(terms: _Terms, k: int) -> float:
    """
    The C{k}-th smallest (from 0) value of the multiset C{terms} (its
    first term is positive and holds every value of the multiset).
    """
    values = terms[0][1]
    lo = 0
    hi = len(values) - 1
    want = k + 1
    while lo < hi:
        mid = (lo + hi) // 2
        v = values[mid]
        count = 0
        for sign, lst in terms:
            if sign > 0:
                count += bisect_right(lst, v)
            else:
                count -= bisect_right(lst, v)
        if count >= want:
            hi = mid
        else:
            lo = mid + 1
    return values[lo]


def _median(terms: _Terms) -> float:
    """
    L{edgeproxy.routing.selection.median} of the multiset C{terms} (the
    same float).
    """
    n = 0
    for sign, lst in terms:
        n += sign * len(lst)
    if n <= 0:
        return 0.0
    half = n // 2
    if n % 2:
        return _kth(terms, half)
    return (_kth(terms, half - 1) + _kth(terms, half)) / 2.0


class SelectionIndex:
    """
    The load- and RTT-ordered index of one routing snapshot (see the module
    docstring).

    @ivar snapshot: The snapshot indexed; a reload needs a new index.
    @ivar load: The live load counts (backend id -> current connections)
        the index follows.
    @ivar changed: The ids whose count may have changed since the last
        L{sync} (the load table's set, drained here).
    @ivar rtt: The live RTT table (backend id -> seconds) the index
        follows, or C{None}: every backend unmeasured (L{select} with an
        C{rtt_weight} then scores as without the term, as the plain scan
        does with an empty table).
    @ivar rtt_changed: The ids whose RTT may have changed since the last
        L{sync} (the RTT table's set, drained here).
    """

    __slots__ = (
        "_by_country",
        "_by_region",
        "_full",
        "_keys",
        "_medians",
        "_ms",
        "_ms_app",
        "_ms_cell",
        "_regions",
        "_routable",
        "changed",
        "load",
        "rtt",
        "rtt_changed",
        "snapshot",
    )

    def __init__(
        self,
        snapshot: RoutingSnapshot,
        load: Mapping[str, int],
        changed: MutableSet[str],
        rtt: Mapping[str, float] | None = None,
        rtt_changed: MutableSet[str] | None = None,
    ) -> None:
        self.snapshot = snapshot
        self.load = load
        self.changed = changed
        self.rtt = rtt
        self.rtt_changed: MutableSet[str] = rtt_changed if rtt_changed is not None else set()
        # The rows the groups hold, by id: a snapshot of the same content
        # (a reload that changed nothing) may take this index over, and its
        # rows are other (equal) objects.
        routable = self._routable = snapshot.routable
        #: Backend id -> its RTT in whole milliseconds (absent: unmeasured).
        ms_of: Dict[str, float] = {}
        self.rtt_changed.clear()
        if rtt is not None:
            for bid, seconds in list(rtt.items()):
                if bid in routable:
                    ms = rtt_ms(seconds)
                    if ms is not None:
                        ms_of[bid] = ms
        self._ms = ms_of
        #: Backend id -> the load term its groups are filed under (absent: 0.0).
        keys: Dict[str, float] = {}
        #: The routable backends at their hard limit.
        full: set[str] = set()
        changed.clear()
        for bid, current in list(load.items()):
            row = routable.get(bid)
            if row is not None and current:
                keys[bid] = load_term(row, current)
                hard = row.hard_limit
                if hard > 0 and current >= hard:
                    full.add(bid)
        self._keys = keys
        self._full = full
        self._by_country: Dict[Tuple[str | None, str | None], _Bucket] = {
            key: _Bucket(rows, keys, ms_of) for key, rows in snapshot.by_app_country.items()
        }
        self._by_region: Dict[Tuple[str | None, str | None], _Bucket] = {
            key: _Bucket(rows, keys, ms_of) for key, rows in snapshot.by_app_region.items()
        }
        regions: Dict[str | None, List[Tuple[str | None, _Bucket]]] = {}
        for (app, region), bucket in self._by_region.items():
            regions.setdefault(app, []).append((region, bucket))
        self._regions = regions
        # The sorted measured RTTs per app and per (app, country, region),
        # next to the buckets' own.
        ms_app: Dict[str | None, List[float]] = {}
        ms_cell: Dict[Tuple[str | None, str | None, str | None], List[float]] = {}
        for bid, ms in ms_of.items():
            b = routable[bid]
            for app in (None, b.app) if b.app is not None else (None,):
                ms_app.setdefault(app, []).append(ms)
                ms_cell.setdefault((app, b.country, b.region), []).append(ms)
        for lst in ms_app.values():
            lst.sort()
        for lst in ms_cell.values():
            lst.sort()
        self._ms_app = ms_app
        self._ms_cell = ms_cell
        self._medians: Dict[Tuple[int, str | None, str | None, str | None, str], float] = {}

    def _buckets(self, b: Backend) -> List[_Bucket]:
        """
        The buckets C{b} is in (two or four).
        """
        out = []
        for app in (None, b.app) if b.app is not None else (None,):
            if b.country is not None:
                out.append(self._by_country[(app, b.country)])
            out.append(self._by_region[(app, b.region)])
        return out

    def _lists(self, b: Backend) -> List[List[float]]:
        """
        The sorted lists of measured RTTs C{b}'s RTT is in.
        """
        out = [bucket.measured for bucket in self._buckets(b)]
        for app in (None, b.app) if b.app is not None else (None,):
            out.append(self._ms_app.setdefault(app, []))
            out.append(self._ms_cell.setdefault((app, b.country, b.region), []))
        return out

    def __repr__(self) -> str:
        return (
            f"<SelectionIndex backends={len(self._routable)} loaded={len(self._keys)}"
            f" measured={len(self._ms)}>"
        )

    def _file(self, b: Backend, key: float) -> None:
        """
        File C{b} under load term C{key} in every bucket it is in.
        """
        keys = self._keys
        bid = b.id
        old = keys.get(bid, 0.0)
        if old == key:
            return
        ms = self._ms.get(bid)
        for bucket in self._buckets(b):
            bucket.remove(b, old, ms)
            bucket.add(b, key, ms)
        if key:
            keys[bid] = key
        else:
            del keys[bid]

    def _file_rtt(self, b: Backend, ms: float | None) -> None:
        """
        File C{b} under the RTT C{ms} (C{None}: unmeasured).
        """
        bid = b.id
        old = self._ms.get(bid)
        lt = self._keys.get(bid, 0.0)
        for bucket in self._buckets(b):
            bucket.remove(b, lt, old)
            bucket.add(b, lt, ms)
        for lst in self._lists(b):
            if old is not None:
                del lst[bisect_left(lst, old)]
            if ms is not None:
                insort(lst, ms)
        if ms is None:
            del self._ms[bid]
        else:
            self._ms[bid] = ms

    def sync(self) -> None:
        """
        Bring the groups of the backends noted in L{changed} and
        L{rtt_changed} in line with their current counts and RTTs.
        """
        changed = self.changed
        if changed:
            routable = self._routable
            load_get = self.load.get
            keys_get = self._keys.get
            full = self._full
            while changed:
                bid = changed.pop()
                b = routable.get(bid)
                if b is None:
                    continue
                current = load_get(bid, 0)
                key = load_term(b, current)
                if keys_get(bid, 0.0) != key:
                    self._file(b, key)
                hard = b.hard_limit
                if hard > 0 and current >= hard:
                    full.add(bid)
                else:
                    full.discard(bid)
        rtt_changed = self.rtt_changed
        if rtt_changed:
            rtt = self.rtt
            routable = self._routable
            ms_get = self._ms.get
            moved = False
            while rtt_changed:
                bid = rtt_changed.pop()
                b = routable.get(bid)
                if b is None or rtt is None:
                    continue
                seconds = rtt.get(bid)
                ms = rtt_ms(seconds) if seconds is not None else None
                if ms_get(bid) != ms:
                    self._file_rtt(b, ms)
                    moved = True
            if moved:
                self._medians.clear()

    def _tier_terms(
        self,
        phase: int,
        app: str | None,
        country: str | None,
        region: str | None,
        local_region: str,
    ) -> _Terms:
        """
        The measured RTTs of the members of tier C{phase} (all of them,
        candidates or not) as a signed sum of sorted lists, the first one
        positive and holding them all.
        """
        cell = self._ms_cell
        if phase == 0:
            found = self._by_country.get((app, country))
            return [(1, found.measured if found is not None else _EMPTY_MS)]
        if phase == 1 or phase == 2:
            r = region if phase == 1 else local_region
            found = self._by_region.get((app, r))
            terms: _Terms = [(1, found.measured if found is not None else _EMPTY_MS)]
            if country is not None:
                terms.append((-1, cell.get((app, country, r), _EMPTY_MS)))
            return terms
        terms = [(1, self._ms_app.get(app, _EMPTY_MS))]
        others = (
            [local_region] if region is None or region == local_region else [local_region, region]
        )
        for r in others:
            found = self._by_region.get((app, r))
            if found is not None:
                terms.append((-1, found.measured))
        if country is not None:
            found = self._by_country.get((app, country))
            if found is not None:
                terms.append((-1, found.measured))
                for r in others:
                    terms.append((1, cell.get((app, country, r), _EMPTY_MS)))
        return terms

    def _tier_median(
        self,
        phase: int,
        app: str | None,
        country: str | None,
        region: str | None,
        local_region: str,
        exclude: Iterable[str],
        blocked: Iterable[str],
    ) -> float:
        """
        The median RTT of the measured candidates of tier C{phase}: what
        the plain scan scores that tier's unmeasured candidates with.
        """
        # The measured members of the tier that are no candidate now.
        ms_of = self._ms
        routable = self._routable
        out: List[float] = []
        seen: set[str] = set()
        sources = (exclude, blocked, self._full) if exclude or blocked or self._full else ()
        for source in sources:
            for bid in source:
                ms = ms_of.get(bid)
                if ms is None or bid in seen:
                    continue
                b = routable.get(bid)
                if b is None or (app is not None and b.app != app):
                    continue
                seen.add(bid)
                if country is not None and b.country == country:
                    tier = 0
                elif region is not None and b.region == region:
                    tier = 1
                elif b.region == local_region:
                    tier = 2
                else:
                    tier = 3
                if tier == phase:
                    out.append(ms)
        if not out:
            key = (phase, app, country, region, local_region)
            cached = self._medians.get(key)
            if cached is None:
                cached = _median(self._tier_terms(phase, app, country, region, local_region))
                if len(self._medians) >= _MEDIAN_CACHE:
                    self._medians.clear()
                self._medians[key] = cached
            return cached
        out.sort()
        terms = self._tier_terms(phase, app, country, region, local_region)
        terms.append((-1, out))
        return _median(terms)

    def tier_median(
        self,
        phase: int,
        app: str | None,
        client_geo: GeoInfo | None,
        local_region: str,
        exclude: Collection[str] = _NO_EXCLUDE,
        blocked: Collection[str] = _NO_EXCLUDE,
    ) -> float:
        """
        The median RTT in whole milliseconds of the measured candidates of
        geo tier C{phase} (0-3) for this client (0.0 when none is measured):
        what an unmeasured candidate of that tier is scored with.  For tests
        and diagnostics.
        """
        self.sync()
        country, region = _client_keys(client_geo)
        if (
            (phase == 0 and country is None)
            or (phase == 1 and region is None)
            or (phase == 2 and local_region == region)
        ):
            return 0.0  # an empty tier
        return self._tier_median(phase, app, country, region, local_region, exclude, blocked)

    def _tied(
        self,
        app: str | None,
        client_geo: GeoInfo | None,
        local_region: str,
        exclude: Collection[str],
        blocked: Collection[str],
        rtt_weight: float,
    ) -> Tuple[float, _Tied]:
        """
        The best score and the sub-groups holding the candidates that reach
        it, each with the country whose backends it must skip (they are
        tier 0, found in the tier-0 list), or C{None}.
        """
        self.sync()
        country, region = _client_keys(client_geo)
        load_get = self.load.get
        use_rtt = rtt_weight > 0.0 and bool(self._ms)
        ceiling = RTT_CEILING
        best = _INF
        tied: _Tied = []
        for phase in range(4):
            base = phase * _TIER_STEP
            if best < base:
                # Nothing in this tier or a later one can score below base.
                break
            plan: Sequence[Tuple[_Bucket, Iterable[float]]]
            if phase == 0:
                found = self._by_country.get((app, country)) if country is not None else None
                plan = ((found, found.keys),) if found is not None else ()
                skip = None
            else:
                skip = country
                if phase == 1:
                    found = self._by_region.get((app, region)) if region is not None else None
                    plan = ((found, found.keys),) if found is not None else ()
                elif phase == 2:
                    found = (
                        self._by_region.get((app, local_region)) if local_region != region else None
                    )
                    plan = ((found, found.keys),) if found is not None else ()
                else:
                    lists = [
                        (bucket, bucket.keys)
                        for r, bucket in self._regions.get(app, ())
                        if r != local_region and r != region
                    ]
                    plan = lists
                    if use_rtt and len(lists) > 1:
                        # Several lists: the lowest group of each first, so
                        # that the best score found bounds the walk of every
                        # list (a first list whose lowest group is all
                        # unmeasured would otherwise be walked to a bound
                        # the next list beats at once).
                        plan = [(bucket, keys[:1]) for bucket, keys in lists] + [
                            (bucket, islice(keys, 1, None)) for bucket, keys in lists
                        ]
            fallback = -1.0  # the tier's median term, once worked out
            for bucket, keys in plan:
                groups = bucket.groups
                for key in keys:
                    if base + key > best:
                        break
                    group = groups[key]
                    subs = group.subs
                    if not use_rtt:
                        for sub in subs.values():
                            for b in sub:
                                # A backend of the client's country is tier 0
                                # and scores 100 or more below this in the
                                # tier-0 list, so it could never be tied here;
                                # skipped all the same, so that only true
                                # members of the tier count.
                                if skip is not None and b.country == skip:
                                    continue
                                bid = b.id
                                if bid in exclude or bid in blocked:
                                    continue
                                hard = b.hard_limit
                                if hard > 0 and load_get(bid, 0) >= hard:
                                    continue
                                break
                            else:
                                continue
                            break
                        else:
                            # No candidate in the group.
                            continue
                        s = base + key
                        if s < best:
                            best = s
                            tied = []
                        if len(subs) == 1:
                            tied.append((sub, skip))
                        else:
                            for sub in subs.values():
                                tied.append((sub, skip))
                        continue
                    room = ceiling - key
                    for ms in group.ms:
                        extra = rtt_weight * ms
                        if extra > room:
                            extra = room if room > 0.0 else 0.0
                        s = base + (key + extra)
                        if s > best:
                            break
                        sub = subs[ms]
                        for b in sub:
                            if skip is not None and b.country == skip:
                                continue
                            bid = b.id
                            if bid in exclude or bid in blocked:
                                continue
                            hard = b.hard_limit
                            if hard > 0 and load_get(bid, 0) >= hard:
                                continue
                            if s < best:
                                best = s
                                tied = [(sub, skip)]
                            else:
                                tied.append((sub, skip))
                            break
                    unmeasured = subs.get(None)
                    if unmeasured is None:
                        continue
                    if fallback >= 0.0:
                        # The score of this sub-group is known: look for a
                        # candidate in it only if it can reach the best.
                        extra = fallback
                        if extra > room:
                            extra = room if room > 0.0 else 0.0
                        if base + (key + extra) > best:
                            continue
                    for b in unmeasured:
                        if skip is not None and b.country == skip:
                            continue
                        bid = b.id
                        if bid in exclude or bid in blocked:
                            continue
                        hard = b.hard_limit
                        if hard > 0 and load_get(bid, 0) >= hard:
                            continue
                        if fallback < 0.0:
                            fallback = rtt_weight * self._tier_median(
                                phase, app, country, region, local_region, exclude, blocked
                            )
                        extra = fallback
                        if extra > room:
                            extra = room if room > 0.0 else 0.0
                        s = base + (key + extra)
                        if s < best:
                            best = s
                            tied = [(unmeasured, skip)]
                        elif s == best:
                            tied.append((unmeasured, skip))
                        break
        return best, tied

    def candidates(
        self,
        app: str | None,
        client_geo: GeoInfo | None,
        local_region: str,
        exclude: Collection[str] = _NO_EXCLUDE,
        blocked: Collection[str] = _NO_EXCLUDE,
        rtt_weight: float = 0.0,
    ) -> Tuple[float | None, AbstractSet[str]]:
        """
        The best score and the ids of every candidate reaching it (the set
        L{select} draws from), or C{(None, set())} when there is none.  For
        tests and diagnostics: it enumerates the tied groups.
        """
        best, tied = self._tied(app, client_geo, local_region, exclude, blocked, rtt_weight)
        if not tied:
            return None, frozenset()
        ids = {b.id for b in self._eligible(tied, exclude, blocked)}
        return best, frozenset(ids)

    def _eligible(
        self, tied: _Tied, exclude: Collection[str], blocked: Collection[str]
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
        exclude: Collection[str] = _NO_EXCLUDE,
        blocked: Collection[str] = _NO_EXCLUDE,
        rtt_weight: float = 0.0,
    ) -> Backend | None:
        """
        Choose the backend for a new connection, or C{None}: the choice of
        L{edgeproxy.routing.selection.select_plain} with the same arguments,
        C{load} being L{load} and C{rtt} being L{rtt} (C{None}: an empty
        table).  The random source is only used when more than one
        candidate is tied.
        """
        _, tied = self._tied(app, client_geo, local_region, exclude, blocked, rtt_weight)
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
