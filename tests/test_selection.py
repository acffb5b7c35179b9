"""
Tests for L{edgeproxy.routing.selection}: the routing decision of SPEC section 3.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Mapping

import attrs
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from edgeproxy.model import Backend, GeoInfo, RoutingSnapshot
from edgeproxy.routing.index import SelectionIndex
from edgeproxy.routing.load import LoadTable, RttTable
from edgeproxy.routing.selection import geo_tier, score, select, select_plain
from edgeproxy.testing import backend

# --------------------------------------------------------------------------
# An independent brute-force reference: scan every row, score it with the
# SPEC formula written out again here, keep the minimum.


def _ref_tier(b: Backend, geo: GeoInfo | None, local_region: str) -> int:
    country = geo.country if geo is not None else None
    region = geo.region if geo is not None else None
    if country and b.country is not None and b.country.upper() == country.upper():
        return 0
    if region and b.region == region:
        return 1
    if b.region == local_region:
        return 2
    return 3


def _ref_score(b: Backend, geo: GeoInfo | None, local_region: str, current: int) -> float:
    return _ref_tier(b, geo, local_region) * 100.0 + (
        current / max(1, b.soft_limit) / max(1, b.weight)
    )


def _ref_candidates(snapshot, app, load, exclude=frozenset()):
    for b in snapshot.backends:
        if not b.healthy or b.deleted or b.draining:
            continue
        if app is not None and b.app != app:
            continue
        if b.id in exclude:
            continue
        current = load.get(b.id, 0)
        if b.hard_limit > 0 and current >= b.hard_limit:
            continue
        yield b, current


def select_reference(snapshot, app, geo, local_region, load, exclude=frozenset()):
    """
    Brute force: (minimum score, ids that reach it), or (None, set()).
    """
    scored = [
        (_ref_score(b, geo, local_region, cur), b.id)
        for b, cur in _ref_candidates(snapshot, app, load, exclude)
    ]
    if not scored:
        return None, set()
    best = min(s for s, _ in scored)
    return best, {i for s, i in scored if s == best}


class _ConstantRandom(random.Random):
    """
    A random source whose C{random()} always returns the same value: with
    0.0 every tie replaces the pick (the last tied candidate wins), with a
    value just below 1.0 no tie does (the first wins).
    """

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


# --------------------------------------------------------------------------
# Table-driven cases.

BR = GeoInfo("BR", "sa")
CL = GeoInfo("CL", "sa")
JP = GeoInfo("JP", "ap")

_BR = backend("br", country="BR", region="sa")
_AR = backend("ar", country="AR", region="sa")
_US = backend("us", country="US", region="us")
_FR = backend("fr", country="FR", region="eu")

CASES = [
    pytest.param([_BR, _AR, _US], "app", BR, "us", {}, (), "br", id="tier0-same-country"),
    pytest.param([_BR, _US], "app", CL, "us", {"br": 3}, (), "br", id="tier1-same-region"),
    pytest.param([_AR, _US, _FR], "app", JP, "us", {"us": 9}, (), "us", id="tier2-local-region"),
    pytest.param([_AR, _US], "app", JP, "eu", {"ar": 2, "us": 1}, (), "us", id="tier3-least-load"),
    pytest.param(
        [backend("x", weight=1), backend("y", weight=2)],
        "app",
        BR,
        "sa",
        {"x": 2, "y": 2},
        (),
        "y",
        id="higher-weight-wins-at-equal-load",
    ),
    pytest.param(
        [backend("x", soft_limit=8), backend("y", soft_limit=2)],
        "app",
        BR,
        "sa",
        {"x": 4, "y": 2},
        (),
        "x",
        id="soft-limit-scales-load",
    ),
    pytest.param(
        [backend("br", hard_limit=3), _AR],
        "app",
        BR,
        "sa",
        {"br": 3},
        (),
        "ar",
        id="hard-limit-reached-excluded",
    ),
    pytest.param(
        [backend("br", hard_limit=4), _AR],
        "app",
        BR,
        "sa",
        {"br": 3},
        (),
        "br",
        id="below-hard-limit-still-candidate",
    ),
    pytest.param(
        [_BR, _AR], "app", BR, "sa", {"br": 150}, (), "ar", id="load-term-over-100-crosses-tier"
    ),
    pytest.param(
        [backend("x", weight=0, soft_limit=0), backend("y")],
        "app",
        BR,
        "sa",
        {"x": 1, "y": 2},
        (),
        "x",
        id="zero-weight-and-soft-limit-mean-1",
    ),
    pytest.param(
        [backend("web1", app="web"), backend("api1", app="api", country="BR")],
        "web",
        BR,
        "sa",
        {"web1": 50},
        (),
        "web1",
        id="app-filter",
    ),
    pytest.param(
        [backend("web1", app="web", region="us", country="US"), backend("api1", app="api")],
        None,
        BR,
        "us",
        {},
        (),
        "api1",
        id="no-app-means-every-app",
    ),
    pytest.param([_BR, _US], "app", None, "us", {"us": 5}, (), "us", id="no-geo-local-first"),
    pytest.param(
        [_BR, _US],
        "app",
        GeoInfo(None, None),
        "eu",
        {"br": 1},
        (),
        "us",
        id="no-geo-then-tier3-by-load",
    ),
    pytest.param([_BR, _AR], "app", BR, "sa", {}, ("br",), "ar", id="exclude-list"),
    pytest.param(
        [_BR, _AR], "app", GeoInfo("br", "sa"), "us", {"br": 1}, (), "br", id="country-ci"
    ),
    pytest.param(
        [
            backend("sick", healthy=False),
            backend("gone", deleted=True),
            backend("drain", draining=True),
            _US,
        ],
        "app",
        BR,
        "sa",
        {"us": 40},
        (),
        "us",
        id="unroutable-never-picked",
    ),
    pytest.param([], "app", BR, "sa", {}, (), None, id="empty-table"),
    pytest.param(
        [backend("a", healthy=False), backend("b", deleted=True)],
        "app",
        BR,
        "sa",
        {},
        (),
        None,
        id="all-unroutable",
    ),
    pytest.param(
        [backend("a", hard_limit=1), backend("b", hard_limit=2)],
        "app",
        BR,
        "sa",
        {"a": 1, "b": 2},
        (),
        None,
        id="all-at-hard-limit",
    ),
    pytest.param([_BR], "other", BR, "sa", {}, (), None, id="unknown-app"),
]


@pytest.mark.parametrize("backends,app,geo,local,load,exclude,expected", CASES)
def test_select_cases(backends, app, geo, local, load, exclude, expected):
    """
    Each tier, weights, soft limits, hard limits, zero guards, the app
    filter, clients without geo, the exclude list and empty candidate sets
    give the backend the SPEC formula says, and agree with brute force.
    """
    snapshot = RoutingSnapshot.build(backends)
    chosen = select(snapshot, app, geo, local, load, random.Random(1), frozenset(exclude))
    assert (chosen.id if chosen is not None else None) == expected
    _, argmin = select_reference(snapshot, app, geo, local, load, frozenset(exclude))
    assert argmin == ({expected} if expected is not None else set())


def test_geo_tier_and_score():
    """
    L{geo_tier} gives 0/1/2/3 for same country / same region / local region
    / elsewhere (case-insensitive country; no geo gives only 2 or 3), and
    L{score} is C{tier * 100 + current / soft_limit / weight}.
    """
    assert geo_tier(_BR, BR, "us") == 0
    assert geo_tier(_BR, GeoInfo("br", "sa"), "us") == 0
    assert geo_tier(_AR, BR, "us") == 1
    assert geo_tier(_US, BR, "us") == 2
    assert geo_tier(_FR, BR, "us") == 3
    assert geo_tier(_BR, None, "sa") == 2
    assert geo_tier(_BR, None, "us") == 3
    assert geo_tier(_BR, GeoInfo("", ""), "us") == 3
    b = backend("w", country="US", region="us", weight=2, soft_limit=4)
    assert score(b, BR, "us", 6) == 200 + 6 / 4 / 2
    assert score(backend("z", weight=0, soft_limit=0), BR, "us", 3) == 3.0


def test_random_tie_break_reaches_every_tied_backend():
    """
    Exactly tied candidates are chosen uniformly at random: over 4000
    seeded draws among four identical backends each gets roughly a quarter,
    and a worse-scored fifth backend is never chosen.
    """
    snapshot = RoutingSnapshot.build([backend(f"t{i}") for i in range(4)] + [backend("loaded")])
    rng = random.Random(12345)
    counts = Counter(
        select(snapshot, "app", BR, "sa", {"loaded": 1}, rng).id  # type: ignore[union-attr]
        for _ in range(4000)
    )
    assert set(counts) == {"t0", "t1", "t2", "t3"}
    for i in range(4):
        assert 800 < counts[f"t{i}"] < 1200


def test_ties_across_tiers_are_shared():
    """
    A tier-0 backend whose load term is exactly 100 ties with an idle
    tier-1 backend (both score 100), so both get chosen sometimes.
    """
    snapshot = RoutingSnapshot.build([_BR, _AR])
    rng = random.Random(7)
    seen = {
        select(snapshot, "app", BR, "sa", {"br": 100}, rng).id  # type: ignore[union-attr]
        for _ in range(200)
    }
    assert seen == {"br", "ar"}


def test_rng_untouched_without_ties():
    """
    The random source is only consulted on an exact tie, so routing
    without ties costs no random draw.
    """

    class Exploding(random.Random):
        def random(self) -> float:
            raise AssertionError("rng used without a tie")

    snapshot = RoutingSnapshot.build([_BR, _AR, _US])
    chosen = select(snapshot, "app", BR, "sa", {"br": 1, "ar": 2}, Exploding())
    assert chosen is not None and chosen.id == "br"


def test_indexed_walk_stops_early():
    """
    When the client's country has a backend with spare capacity, the walk
    stops after that tier: the other rows are never even scored (their
    load is never read).
    """
    rows = [backend("br", country="BR")] + [
        backend(f"fr{i}", country="FR", region="eu") for i in range(50)
    ]
    snapshot = RoutingSnapshot.build(rows)

    class CountingLoad(dict):
        reads = 0

        def get(self, key, default=None):
            CountingLoad.reads += 1
            return super().get(key, default)

    load = CountingLoad()
    chosen = select(snapshot, "app", BR, "eu", load, random.Random(0))
    assert chosen is not None and chosen.id == "br"
    assert CountingLoad.reads == 1


# --------------------------------------------------------------------------
# Properties.

# Few values, so that every tier is usually populated and tiers overlap.
_COUNTRIES = ["BR", "AR", "FR"]
_REGIONS = ["sa", "us", "eu"]
_APPS = ["a", "b"]


@st.composite
def _backends(draw, max_size=16):
    n = draw(st.integers(0, max_size))
    rows = []
    for i in range(n):
        rows.append(
            backend(
                f"b{i}",
                app=draw(st.sampled_from(["a", "a", "b", None])),
                region=draw(st.sampled_from(_REGIONS)),
                country=draw(st.sampled_from([*_COUNTRIES, None])),
                healthy=draw(st.integers(0, 4)) != 0,
                deleted=draw(st.integers(0, 7)) == 0,
                draining=draw(st.integers(0, 7)) == 0,
                weight=draw(st.integers(0, 5)),
                soft_limit=draw(st.integers(0, 5)),
                hard_limit=draw(st.sampled_from([0, 0, 0, 0, 1, 2, 5, 1000])),
            )
        )
    return rows


_geos = st.one_of(
    st.none(),
    st.builds(
        GeoInfo,
        st.sampled_from([*_COUNTRIES, "br", "fr", None, "DE"]),
        st.sampled_from([*_REGIONS, "sa", None, "xx"]),
    ),
)


@st.composite
def _situations(draw):
    rows = draw(_backends())
    ids = [b.id for b in rows]
    # Loads either small or a multiple of soft_limit * weight chosen so that
    # load terms land on, just under and just over whole hundreds: that is
    # where tiers overlap and exact cross-tier ties happen.
    load = {}
    for b in rows:
        kind = draw(st.integers(0, 3))
        if kind == 1:
            load[b.id] = draw(st.integers(0, 6))
        elif kind >= 2:
            scale = max(1, b.soft_limit) * max(1, b.weight)
            term = draw(st.sampled_from([100, 100, 200, 200, 1, 50, 99, 101, 150, 250, 300]))
            load[b.id] = term * scale + draw(st.sampled_from([0, 0, 0, -1, 1]))
    exclude = frozenset(i for i in ids if draw(st.integers(0, 9)) == 0)
    return (
        RoutingSnapshot.build(rows),
        draw(st.sampled_from(["a", None, "a", "b"])),
        draw(_geos),
        draw(st.sampled_from(_REGIONS)),
        load,
        exclude,
        draw(st.integers(0, 2**32)),
    )


@settings(max_examples=300)
@given(_situations())
def test_indexed_select_matches_brute_force(situation):
    """
    The indexed tier walk finds exactly what a scan of every candidate
    finds: C{None} iff there is no candidate, otherwise a backend in the
    argmin set whose score is the minimum score.
    """
    snapshot, app, geo, local, load, exclude, seed = situation
    chosen = select(snapshot, app, geo, local, load, random.Random(seed), exclude)
    best, argmin = select_reference(snapshot, app, geo, local, load, exclude)
    if best is None:
        assert chosen is None
    else:
        assert chosen is not None
        assert chosen.id in argmin
        assert score(chosen, geo, local, load.get(chosen.id, 0)) == best


@given(_situations())
def test_never_picks_a_forbidden_backend(situation):
    """
    The pick is never unhealthy, deleted, draining, at its hard limit,
    excluded or of another app.
    """
    snapshot, app, geo, local, load, exclude, seed = situation
    chosen = select(snapshot, app, geo, local, load, random.Random(seed), exclude)
    assume(chosen is not None)
    assert chosen is not None
    assert chosen.healthy and not chosen.deleted and not chosen.draining
    assert chosen.hard_limit == 0 or load.get(chosen.id, 0) < chosen.hard_limit
    assert chosen.id not in exclude
    assert app is None or chosen.app == app


@given(_situations())
def test_better_tier_wins_while_it_has_capacity(situation):
    """
    If some candidate of geo tier t is below its hard limit and its load
    term is under 100, the pick has a tier no worse than t.
    """
    snapshot, app, geo, local, load, exclude, seed = situation
    roomy = [
        _ref_tier(b, geo, local)
        for b, cur in _ref_candidates(snapshot, app, load, exclude)
        if cur / max(1, b.soft_limit) / max(1, b.weight) < 100
    ]
    assume(roomy)
    chosen = select(snapshot, app, geo, local, load, random.Random(seed), exclude)
    assert chosen is not None
    assert geo_tier(chosen, geo, local) <= min(roomy)


def _share(
    snapshot: RoutingSnapshot,
    geo: GeoInfo | None,
    local: str,
    target: str,
    steps: int,
    tie: float,
    start: Mapping[str, int],
) -> int:
    load = dict(start)
    picks = 0
    rng = _ConstantRandom(tie)
    for _ in range(steps):
        chosen = select(snapshot, "a", geo, local, load, rng)
        if chosen is None:
            break
        load[chosen.id] = load.get(chosen.id, 0) + 1
        picks += chosen.id == target
    return picks


@given(
    rows=_backends(max_size=6).map(
        lambda rows: [
            attrs.evolve(b, app="a", healthy=True, deleted=False, draining=False) for b in rows
        ]
    ),
    geo=_geos,
    local=st.sampled_from(_REGIONS),
    data=st.data(),
    extra=st.integers(1, 6),
    steps=st.integers(1, 60),
    tie=st.sampled_from([0.0, 0.999999]),
)
def test_higher_weight_never_lowers_share(rows, geo, local, data, extra, steps, tie):
    """
    Raising one backend's weight never lowers how many of N sequential
    connections (load accumulating, nothing released) it receives.

    Why this is a sound property: each backend's successive scores
    C{tier*100 + c/soft/weight} (c = 0, 1, 2...) increase with c, so N
    greedy choices take the N smallest (score, tie-rank) "slots" overall.
    Raising the target's weight lowers its slot scores and leaves the
    others' alone, so it can only gain slots.  That needs a tie-break that
    does not depend on the weights: the random source is replaced by a
    constant (0.0: the last tied candidate in walk order wins; ~1.0: the
    first), which makes the tie-rank a fixed order.  A real seeded RNG
    would not do: draws happen only on ties, so the two runs would consume
    different random numbers.
    """
    assume(rows)
    target = data.draw(st.sampled_from(rows)).id
    start = {b.id: data.draw(st.integers(0, 3)) for b in rows}
    low = RoutingSnapshot.build(rows)
    high = RoutingSnapshot.build(
        [attrs.evolve(b, weight=max(1, b.weight) + extra) if b.id == target else b for b in rows]
    )
    assert _share(high, geo, local, target, steps, tie, start) >= _share(
        low, geo, local, target, steps, tie, start
    )


@given(_situations(), st.data())
def test_blocked_is_like_excluded(situation, data):
    """
    The state overlay's C{blocked} set works exactly like C{exclude}: the
    pick is never blocked, and selecting with (exclude, blocked) finds what
    a scan with their union finds.
    """
    snapshot, app, geo, local, load, exclude, seed = situation
    ids = [b.id for b in snapshot.backends]
    blocked = frozenset(i for i in ids if data.draw(st.integers(0, 3)) == 0)
    chosen = select(snapshot, app, geo, local, load, random.Random(seed), exclude, blocked)
    best, argmin = select_reference(snapshot, app, geo, local, load, exclude | blocked)
    if best is None:
        assert chosen is None
    else:
        assert chosen is not None and chosen.id not in blocked
        assert chosen.id in argmin


# --- the RTT term (issue 13) ----------------------------------------------------
#
# A second brute-force reference, written out again from the formula of the
# module docstring: per tier, the median of the measured candidates' whole
# milliseconds stands in for the unmeasured; in_tier = load + min(w * ms,
# max(0, 99 - load)).


def _ref_ms(seconds: float) -> float:
    return float(round(seconds * 1000.0))


def _ref_median(values: list[float]) -> float:
    values = sorted(values)
    if not values:
        return 0.0
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def _ref_load(b: Backend, current: int) -> float:
    return current / max(1, b.soft_limit) / max(1, b.weight)


def _ref_rtt_scores(snapshot, app, geo, local_region, load, rtt, weight, exclude=frozenset()):
    """
    Brute force with the RTT term: backend id -> score, for every candidate.
    """
    candidates = list(_ref_candidates(snapshot, app, load, exclude))
    measured: dict[int, list[float]] = {}
    for b, _ in candidates:
        if b.id in rtt:
            measured.setdefault(_ref_tier(b, geo, local_region), []).append(_ref_ms(rtt[b.id]))
    scores = {}
    for b, cur in candidates:
        tier = _ref_tier(b, geo, local_region)
        ms = _ref_ms(rtt[b.id]) if b.id in rtt else _ref_median(measured.get(tier, []))
        lt = _ref_load(b, cur)
        scores[b.id] = tier * 100.0 + (lt + min(weight * ms, max(0.0, 99.0 - lt)))
    return scores


def _id(b: Backend | None) -> str:
    assert b is not None
    return b.id


_rtt_values = st.one_of(
    st.sampled_from([0.0, 0.0002, 0.0004, 0.0005, 0.001, 0.0104, 0.02, 0.05, 0.3, 1.0, 100.0]),
    st.floats(0.0, 10.0),
    st.just(1e6),
)
_rtt_weights = st.one_of(st.sampled_from([0.001, 0.01, 0.1, 1.0, 10.0, 1e6]), st.floats(1e-6, 1e6))


@st.composite
def _rtt_tables(draw, snapshot):
    table = {}
    for b in snapshot.backends:
        if draw(st.integers(0, 3)):
            table[b.id] = draw(_rtt_values)
    return table


@settings(max_examples=300)
@given(_situations(), st.data())
def test_rtt_select_matches_brute_force(situation, data):
    """
    With the RTT term, the indexed walk still finds exactly what a scan of
    every candidate scored by the written-out formula finds (the median of
    the tier's measured candidates standing in for the unmeasured).
    """
    snapshot, app, geo, local, load, exclude, seed = situation
    rtt = data.draw(_rtt_tables(snapshot))
    weight = data.draw(_rtt_weights)
    chosen = select(
        snapshot, app, geo, local, load, random.Random(seed), exclude, rtt=rtt, rtt_weight=weight
    )
    scores = _ref_rtt_scores(snapshot, app, geo, local, load, rtt, weight, exclude)
    if not scores:
        assert chosen is None
        return
    assert chosen is not None
    best = min(scores.values())
    assert scores[chosen.id] == best


@settings(max_examples=300)
@given(_situations(), st.data())
def test_rtt_weight_zero_is_todays_choice(situation, data):
    """
    With C{rtt_weight} 0, whatever the RTT table, the choice is today's for
    every input: the same backend as C{select} without RTT given the same
    random source (so also the same random draws), and one the plain scan
    of every candidate finds at the minimum score.  An empty RTT table with
    any weight is the same.
    """
    snapshot, app, geo, local, load, exclude, seed = situation
    rtt = data.draw(_rtt_tables(snapshot))
    weight = data.draw(_rtt_weights)
    plain = select(snapshot, app, geo, local, load, random.Random(seed), exclude)
    off = select(
        snapshot, app, geo, local, load, random.Random(seed), exclude, rtt=rtt, rtt_weight=0.0
    )
    empty = select(
        snapshot, app, geo, local, load, random.Random(seed), exclude, rtt={}, rtt_weight=weight
    )
    assert off is plain and empty is plain
    best, argmin = select_reference(snapshot, app, geo, local, load, exclude)
    assert (plain is None) == (best is None)
    if plain is not None:
        assert plain.id in argmin


@settings(max_examples=500)
@given(_situations(), st.data())
def test_no_rtt_lets_a_worse_tier_win(situation, data):
    """
    The tier dominates whatever the RTTs and the weight: the pick with the
    RTT term is never of a worse tier than a candidate that scores strictly
    lower than the pick without the RTT term (so a worse tier never wins
    over a better-tier backend that would win without RTT); and, as without
    RTT, while some candidate of tier t has a load term under 100 the pick's
    tier is no worse than t.
    """
    snapshot, app, geo, local, load, exclude, seed = situation
    rtt = data.draw(_rtt_tables(snapshot))
    weight = data.draw(_rtt_weights)
    chosen = select(
        snapshot, app, geo, local, load, random.Random(seed), exclude, rtt=rtt, rtt_weight=weight
    )
    candidates = list(_ref_candidates(snapshot, app, load, exclude))
    assume(chosen is not None)
    assert chosen is not None
    tier = _ref_tier(chosen, geo, local)
    plain = _ref_score(chosen, geo, local, load.get(chosen.id, 0))
    for b, cur in candidates:
        if _ref_tier(b, geo, local) < tier:
            assert _ref_score(b, geo, local, cur) >= plain, (b.id, chosen.id)
    roomy = [_ref_tier(b, geo, local) for b, cur in candidates if _ref_load(b, cur) < 100]
    if roomy:
        assert tier <= min(roomy)


@given(
    st.integers(0, 3),
    st.integers(1, 5),
    st.integers(1, 5),
    st.integers(0, 20),
    st.floats(0.0, 2.0),
    st.floats(0.0, 2.0),
    st.sampled_from([0.001, 0.01, 0.1, 0.5]),
    st.integers(0, 2**32),
)
def test_nearer_of_two_equally_loaded_wins(tier, soft, weight, current, rtt_a, rtt_b, w, seed):
    """
    Of two backends of the same tier with the same load, limits and
    weight, the one whose RTT is at least one whole millisecond lower
    always wins, as long as the RTT term fits under the tier's ceiling;
    equal whole milliseconds tie (either may win).
    """
    geo = GeoInfo("BR", "sa")
    places = [("BR", "sa"), ("AR", "sa"), ("US", "us"), ("JP", "ap")]
    country, region = places[tier]
    rows = [
        backend(i, country=country, region=region, soft_limit=soft, weight=weight)
        for i in ("a", "b")
    ]
    snapshot = RoutingSnapshot.build(rows)
    load = {"a": current, "b": current}
    ms_a, ms_b = _ref_ms(rtt_a), _ref_ms(rtt_b)
    assume(_ref_load(rows[0], current) + w * max(ms_a, ms_b) < 99)
    chosen = select(
        snapshot,
        None,
        geo,
        "us",
        load,
        random.Random(seed),
        rtt={"a": rtt_a, "b": rtt_b},
        rtt_weight=w,
    )
    assert chosen is not None
    if ms_a < ms_b:
        assert chosen.id == "a"
    elif ms_b < ms_a:
        assert chosen.id == "b"


def test_unmeasured_backend_scores_as_its_tiers_median():
    """
    A backend without a measurement scores as the median RTT of the
    measured candidates of its tier (not of other tiers, not of backends
    that are no candidate): between 10, 20 and 30 ms it ties the 20 ms one;
    between 10 and 30 ms it scores 20 ms; and a tier with nothing measured
    scores 0 for all.
    """
    rows = [
        backend("near", country="BR", region="sa", soft_limit=100),
        backend("mid", country="BR", region="sa", soft_limit=100),
        backend("far", country="BR", region="sa", soft_limit=100),
        backend("new", country="BR", region="sa", soft_limit=100),
        backend("other-tier", country="US", region="us"),
    ]
    snapshot = RoutingSnapshot.build(rows)
    geo = GeoInfo("BR", "sa")
    rtt = {"near": 0.010, "mid": 0.020, "far": 0.030, "other-tier": 0.0}
    # "near" carries load: 0.5 + 0.10 > 0.20, out of the way.
    load = {"near": 50}

    def picks(exclude: frozenset = frozenset()) -> set:
        return {
            _id(
                select(
                    snapshot,
                    None,
                    geo,
                    "us",
                    load,
                    random.Random(seed),
                    exclude,
                    rtt=rtt,
                    rtt_weight=0.01,
                )
            )
            for seed in range(60)
        }

    assert picks() == {"new", "mid"}
    del rtt["mid"]  # measured: 10 and 30 ms, median 20
    assert picks() == {"new", "mid"}
    assert picks(frozenset({"mid", "new"})) == {"far"}  # 0.30 against 0.60
    # Without "near", the median is that of {30}: a three-way tie with "far".
    assert picks(frozenset({"near"})) == {"new", "mid", "far"}
    rtt.clear()
    rtt["other-tier"] = 0.5
    assert picks() == {"new", "mid", "far"}


def test_rtt_below_half_a_millisecond_keeps_random_ties():
    """
    RTTs that round to the same whole millisecond tie, so equally near
    backends (one LAN, loopback) still share their clients at random.
    """
    rows = [backend(i, country="BR", region="sa") for i in ("a", "b", "c")]
    snapshot = RoutingSnapshot.build(rows)
    rtt = {"a": 0.0001, "b": 0.0004, "c": 0.00049}
    seen = Counter(
        _id(
            select(
                snapshot,
                None,
                GeoInfo("BR", "sa"),
                "us",
                {},
                random.Random(seed),
                rtt=rtt,
                rtt_weight=1.0,
            )
        )
        for seed in range(300)
    )
    assert set(seen) == {"a", "b", "c"} and min(seen.values()) > 50


def test_rtt_term_never_crosses_into_the_next_tier():
    """
    However large the RTT and the weight, a backend's RTT term stops below
    the next tier (99 in load plus RTT), and a backend whose load alone is
    99 or more scores exactly as without RTT.
    """
    b = backend("a", country="BR", region="sa", soft_limit=1)
    geo = GeoInfo("BR", "sa")
    assert score(b, geo, "us", 0, 1e9, 1e6) == 99.0
    assert score(b, geo, "us", 50, 1e9, 1e6) == 99.0
    assert score(b, geo, "us", 99, 1e9, 1e6) == 99.0
    assert score(b, geo, "us", 150, 1e9, 1e6) == 150.0
    assert score(b, geo, "us", 10, 20.0, 0.5) == 20.0
    assert score(b, geo, "us", 10, None, 0.5) == 10.0 == score(b, geo, "us", 10)


# --- the selection index (issue 10) -----------------------------------------------
#
# SelectionIndex decides with load-ordered groups instead of scoring every
# candidate of a tier.  Its set of tied best candidates must be exactly the
# brute-force argmin (and so contain what select_plain picks), whatever the
# table, the loads (set up front or reached through acquire/release, with
# reloads in between), the exclusions, the overlay's blocked set and the
# client; and its draw must be uniform over that set.


def _blocked(data, snapshot: RoutingSnapshot) -> frozenset:
    return frozenset(
        b.id for b in snapshot.backends if data.draw(st.integers(0, 4), label="blocked") == 0
    )


def _check_index(index: SelectionIndex, snapshot, app, geo, local, load, exclude, blocked, seed):
    """
    The index agrees with the brute-force reference and with select_plain.
    """
    best, argmin = select_reference(snapshot, app, geo, local, load, exclude | blocked)
    got_best, got = index.candidates(app, geo, local, exclude, blocked)
    assert got_best == best
    assert got == argmin
    rng = random.Random(seed)
    plain = select_plain(snapshot, app, geo, local, load, random.Random(seed), exclude, blocked)
    # Several draws, so that the tie-break's own checks are exercised too.
    for _ in range(12):
        chosen = index.select(app, geo, local, rng, exclude, blocked)
        if best is None:
            assert chosen is None and plain is None
        else:
            assert chosen is not None and chosen.id in argmin
            assert plain is not None and plain.id in got
            assert score(chosen, geo, local, load.get(chosen.id, 0)) == best


def test_select_is_select_plain():
    """
    The plain tier walk is still importable under its historical name.
    """
    assert select is select_plain


@settings(max_examples=400)
@given(_situations(), st.data())
def test_index_matches_plain_scan(situation, data):
    """
    Built over a table and its load counts, the index's best score and set
    of tied best candidates are exactly the brute-force scan's (hard limits,
    exclusions, the overlay's blocked set, other apps and every geo tier,
    cross-tier ties included); its pick is in that set and select_plain's
    pick is in the index's set.
    """
    snapshot, app, geo, local, load, exclude, seed = situation
    blocked = _blocked(data, snapshot)
    index = SelectionIndex(snapshot, load, set())
    _check_index(index, snapshot, app, geo, local, load, exclude, blocked, seed)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(_backends(max_size=12), min_size=1, max_size=3),
    st.lists(
        st.tuples(
            st.sampled_from(["acquire", "acquire", "release", "check", "reload"]),
            st.integers(0, 11),
        ),
        max_size=40,
    ),
    st.data(),
)
def test_index_follows_acquire_release_and_reloads(tables, ops, data):
    """
    An index fed by a L{LoadTable}'s C{changed} set stays exact through any
    sequence of acquires (hard limits respected), releases (underflows
    included) and reloads (a new index over the next table, as the router
    builds one, with the counts carried over): at every check it finds what
    the brute-force scan finds for the table's current counts.
    """
    table = LoadTable()
    which = 0
    snapshot = RoutingSnapshot.build(tables[0])
    index = SelectionIndex(snapshot, table.connections, table.changed)
    for op, n in ops:
        rows = snapshot.backends
        if op == "acquire" and rows:
            table.acquire(rows[n % len(rows)])
        elif op == "release":
            table.release(rows[n % len(rows)].id if rows else f"b{n}")
        elif op == "reload":
            which = (which + 1) % len(tables)
            snapshot = RoutingSnapshot.build(tables[which])
            index = SelectionIndex(snapshot, table.connections, table.changed)
        else:
            _check_index(
                index,
                snapshot,
                data.draw(st.sampled_from(["a", None, "b"]), label="app"),
                data.draw(_geos, label="geo"),
                data.draw(st.sampled_from(_REGIONS), label="local"),
                dict(table.connections),
                frozenset(b.id for b in rows if data.draw(st.integers(0, 9)) == 0),
                _blocked(data, snapshot),
                n,
            )
    _check_index(
        index, snapshot, "a", BR, "us", dict(table.connections), frozenset(), frozenset(), 0
    )
    assert not table.changed


def test_index_draw_is_uniform_over_the_tied_candidates():
    """
    Ties are broken uniformly over the candidates only, whether a few draws
    find one (most of the tied group is a candidate) or the index has to
    count them (nearly all of it is excluded): 4000 seeded draws give each
    candidate close to its share and never anyone else.
    """
    rows = [backend(f"t{i}") for i in range(100)]
    snapshot = RoutingSnapshot.build(rows)
    index = SelectionIndex(snapshot, {}, set())
    for blocked in (frozenset({"t0", "t1"}), frozenset(f"t{i}" for i in range(2, 100))):
        allowed = {b.id for b in rows} - blocked
        rng = random.Random(10)
        counts = Counter(
            index.select("app", BR, "sa", rng, blocked=blocked).id  # type: ignore[union-attr]
            for _ in range(4000)
        )
        assert set(counts) <= allowed
        expected = 4000 / len(allowed)
        for i in allowed:
            assert 0.5 * expected < counts[i] < 1.6 * expected + 5


def test_index_rng_untouched_without_ties():
    """
    As the plain walk, the index only draws a random number when more than
    one candidate ties.
    """

    class Exploding(random.Random):
        def random(self) -> float:
            raise AssertionError("rng used without a tie")

    snapshot = RoutingSnapshot.build([_BR, _AR, _US])
    index = SelectionIndex(snapshot, {"br": 1, "ar": 2}, set())
    chosen = index.select("app", BR, "sa", Exploding())
    assert chosen is not None and chosen.id == "br"


def test_index_nothing_near_looks_at_one_backend():
    """
    A client near none of an app's backends (every one tier 3) costs the
    index a look at the first group of each region list, not a scan of the
    app: with 1,000 idle backends the load of one of them is read (its hard
    limit) and nothing else.
    """
    rows = [
        backend(f"b{i}", country=f"C{i % 40:02d}", region=("sa", "us", "eu")[i % 3], hard_limit=5)
        for i in range(1000)
    ]
    snapshot = RoutingSnapshot.build(rows)

    class CountingLoad(dict):
        reads = 0

        def get(self, key, default=None):
            CountingLoad.reads += 1
            return super().get(key, default)

    index = SelectionIndex(snapshot, CountingLoad(), set())
    CountingLoad.reads = 0
    chosen = index.select("app", GeoInfo("JP", "ap"), "xx", random.Random(0))
    assert chosen is not None
    # One hard-limit read per region list (three) plus the tie-break draw's.
    assert CountingLoad.reads <= 4


def test_changed_set_only_holds_acquired_backends():
    """
    The load table notes the backends whose count changed, each once, and a
    release of a backend never acquired (an underflow) notes nothing: an
    outsider cannot grow the set past the table's backends.
    """
    table = LoadTable()
    for _ in range(3):
        assert table.acquire(_BR)
    table.release("br")
    for i in range(100):
        table.release(f"nobody-{i}")
    assert table.changed == {"br"}


@settings(max_examples=150, deadline=None)
@given(
    st.lists(_backends(max_size=10), min_size=1, max_size=3),
    st.lists(
        st.tuples(
            st.sampled_from(["choose", "choose", "choose", "release", "reload", "drain"]),
            st.integers(0, 9),
        ),
        max_size=40,
    ),
    st.lists(_geos, min_size=1, max_size=4),
    st.sampled_from(["a", None, "b"]),
    st.sampled_from(_REGIONS),
)
def test_router_choice_is_the_plain_scans(tables, ops, geos, app, local):
    """
    Through the router (whose selection index is built on first use, rebuilt
    when a reload swaps the snapshot, and fed by its load table), every
    fresh choice is one the brute-force scan allows for the counts and
    admin states of that moment: connections chosen, released, reloads and
    backends drained by the operator in any order.
    """
    from twisted.internet.task import Clock

    from edgeproxy.interfaces import NO_NEW_CLIENTS
    from edgeproxy.routing.router import Router
    from edgeproxy.testing import (
        BindingTable,
        InMemoryBackendRepository,
        MetricsStore,
        StaticGeoResolver,
    )

    ips = [f"192.0.2.{i}" for i in range(len(geos))]
    resolver = StaticGeoResolver({ip: g for ip, g in zip(ips, geos) if g is not None})
    repository = InMemoryBackendRepository(tables[0])
    router = Router(
        repository, BindingTable(), resolver, MetricsStore(), local, Clock(), random.Random(0)
    )
    which = 0
    held = []
    for step, (op, n) in enumerate(ops):
        snapshot = repository.current()
        if op == "choose":
            ip = ips[n % len(ips)]
            # A fresh client each time (no binding): bindings key by address.
            client = f"198.51.100.{step}" if n % 2 else ip
            geo = resolver.resolve(client)
            blocked = router.overlay.closedToNew
            best, argmin = select_reference(
                snapshot, app, geo, local, dict(router.load.connections), blocked
            )
            router._bindings.remove((client, app))  # type: ignore[attr-defined]
            chosen = router.choose(client, app)
            if best is None:
                assert chosen is None
            else:
                assert chosen is not None and chosen.id in argmin
                held.append(chosen.id)
        elif op == "release" and held:
            router.release(held.pop(n % len(held)))
        elif op == "reload":
            which = (which + 1) % len(tables)
            repository.set(tables[which])
        elif op == "drain" and snapshot.backends:
            bid = snapshot.backends[n % len(snapshot.backends)].id
            router.overlay.setVerdict(bid, "admin", NO_NEW_CLIENTS)


# --------------------------------------------------------------------------
# The selection index with the RTT term (the default --rtt-weight 0.01).


def _ref_valid_ms(seconds: float | None) -> float | None:
    if seconds is None or not 0.0 <= seconds < float("inf"):
        return None
    return _ref_ms(seconds)


def select_rtt_reference(snapshot, app, geo, local_region, load, rtt, weight, exclude):
    """
    Brute force with the RTT term, values that are no measurement (negative,
    infinite, NaN) counting as unmeasured: (minimum score, ids that reach
    it), or (None, set()).
    """
    candidates = list(_ref_candidates(snapshot, app, load, exclude))
    measured: dict[int, list[float]] = {}
    for b, _ in candidates:
        ms = _ref_valid_ms(rtt.get(b.id))
        if ms is not None:
            measured.setdefault(_ref_tier(b, geo, local_region), []).append(ms)
    scored = []
    for b, cur in candidates:
        tier = _ref_tier(b, geo, local_region)
        ms = _ref_valid_ms(rtt.get(b.id))
        if ms is None:
            ms = _ref_median(measured.get(tier, []))
        lt = _ref_load(b, cur)
        scored.append((tier * 100.0 + (lt + min(weight * ms, max(0.0, 99.0 - lt))), b.id))
    if not scored:
        return None, set()
    best = min(s for s, _ in scored)
    return best, {i for s, i in scored if s == best}


_any_rtt_values = st.one_of(
    _rtt_values,
    st.sampled_from([0.0014, 0.0015, 0.0016, 0.003, 0.003]),
    st.sampled_from([-1.0, float("inf"), float("nan")]),
)
_index_rtt_weights = st.one_of(
    st.sampled_from([0.01, 0.01, 0.001, 0.5, 1.0, 10.0, 1e6]), st.floats(1e-6, 1e6)
)


@st.composite
def _any_rtt_tables(draw, snapshot):
    table = {}
    for b in snapshot.backends:
        if draw(st.integers(0, 3), label="measured"):
            table[b.id] = draw(_any_rtt_values, label="rtt")
    return table


def _check_rtt_index(
    index: SelectionIndex, snapshot, app, geo, local, load, rtt, weight, exclude, blocked, seed
):
    """
    With the RTT term, the index agrees with the brute-force reference (the
    same best score, the same set of tied candidates) and with select_plain.
    """
    best, argmin = select_rtt_reference(
        snapshot, app, geo, local, load, rtt, weight, exclude | blocked
    )
    got_best, got = index.candidates(app, geo, local, exclude, blocked, weight)
    assert got_best == best
    assert got == argmin
    # Each tier's median, whether or not it decided anything here.
    measured: dict[int, list[float]] = {}
    for b, _ in _ref_candidates(snapshot, app, load, exclude | blocked):
        ms = _ref_valid_ms(rtt.get(b.id))
        if ms is not None:
            measured.setdefault(_ref_tier(b, geo, local), []).append(ms)
    for tier in range(4):
        assert index.tier_median(tier, app, geo, local, exclude, blocked) == _ref_median(
            measured.get(tier, [])
        ), tier
    rng = random.Random(seed)
    plain = select_plain(
        snapshot,
        app,
        geo,
        local,
        load,
        random.Random(seed),
        exclude,
        blocked,
        rtt=dict(rtt),
        rtt_weight=weight,
    )
    for _ in range(6):
        chosen = index.select(app, geo, local, rng, exclude, blocked, weight)
        if best is None:
            assert chosen is None and plain is None
        else:
            assert chosen is not None and chosen.id in argmin
            assert plain is not None and plain.id in got


@settings(max_examples=400, deadline=None)
@given(_situations(), st.data())
def test_rtt_index_matches_plain_scan(situation, data):
    """
    With an RTT table (unmeasured backends, values that are no measurement,
    equal whole milliseconds, RTTs large enough for the term's cap) and any
    positive weight, the index's best score and set of tied best candidates
    are exactly the brute-force scan's, the unmeasured scored with the median
    of their tier's measured candidates (exclusions, blocked backends and
    hard limits changing that median); its pick is in that set and
    select_plain's pick is in the index's set.
    """
    snapshot, app, geo, local, load, exclude, seed = situation
    blocked = _blocked(data, snapshot)
    rtt = RttTable(data.draw(_any_rtt_tables(snapshot), label="rtt table"))
    weight = data.draw(_index_rtt_weights, label="weight")
    index = SelectionIndex(snapshot, load, set(), rtt, rtt.changed)
    _check_rtt_index(index, snapshot, app, geo, local, load, rtt, weight, exclude, blocked, seed)
    # Without the term the same index scores as without RTT.
    _check_index(index, snapshot, app, geo, local, load, exclude, blocked, seed)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(_backends(max_size=12), min_size=1, max_size=3),
    st.lists(
        st.tuples(
            st.sampled_from(
                ["acquire", "acquire", "release", "rtt", "rtt", "forget", "check", "reload"]
            ),
            st.integers(0, 11),
        ),
        max_size=40,
    ),
    _index_rtt_weights,
    st.data(),
)
def test_rtt_index_follows_rtt_updates_acquire_release_and_reloads(tables, ops, weight, data):
    """
    An index fed by a L{LoadTable}'s and an L{RttTable}'s C{changed} sets
    stays exact through any sequence of acquires, releases, RTT updates
    (new values, values that round to the same milliseconds, values that
    are no measurement), RTTs forgotten (the backend unmeasured again) and
    reloads (a new index over the next table, with counts and RTTs carried
    over): at every check it finds what the brute-force scan with the RTT
    term finds for the tables' current contents.
    """
    table = LoadTable()
    rtt = RttTable()
    which = 0
    snapshot = RoutingSnapshot.build(tables[0])
    index = SelectionIndex(snapshot, table.connections, table.changed, rtt, rtt.changed)
    for op, n in ops:
        rows = snapshot.backends
        if op == "acquire" and rows:
            table.acquire(rows[n % len(rows)])
        elif op == "release":
            table.release(rows[n % len(rows)].id if rows else f"b{n}")
        elif op == "rtt":
            rtt[rows[n % len(rows)].id if rows else f"b{n}"] = data.draw(_any_rtt_values)
        elif op == "forget":
            rtt.pop(rows[n % len(rows)].id if rows else f"b{n}", None)
        elif op == "reload":
            which = (which + 1) % len(tables)
            snapshot = RoutingSnapshot.build(tables[which])
            index = SelectionIndex(snapshot, table.connections, table.changed, rtt, rtt.changed)
        else:
            _check_rtt_index(
                index,
                snapshot,
                data.draw(st.sampled_from(["a", None, "b"]), label="app"),
                data.draw(_geos, label="geo"),
                data.draw(st.sampled_from(_REGIONS), label="local"),
                dict(table.connections),
                dict(rtt),
                weight,
                frozenset(b.id for b in rows if data.draw(st.integers(0, 9)) == 0),
                _blocked(data, snapshot),
                n,
            )
    _check_rtt_index(
        index,
        snapshot,
        "a",
        BR,
        "us",
        dict(table.connections),
        dict(rtt),
        weight,
        frozenset(),
        frozenset(),
        0,
    )
    assert not table.changed and not rtt.changed


def test_rtt_index_median_of_many():
    """
    The tier median the index works out from its sorted lists (a signed sum
    of them, ineligible members subtracted) is the plain scan's for larger
    tiers too: 300 backends over three countries and regions, a third
    unmeasured, every client position, some excluded, some at their hard
    limit.
    """
    rng = random.Random(3)
    rows = [
        backend(
            f"m{i}",
            country=("BR", "AR", "FR")[i % 3],
            region=("sa", "us", "eu")[(i // 3) % 3],
            hard_limit=2 if i % 11 == 0 else 0,
        )
        for i in range(300)
    ]
    snapshot = RoutingSnapshot.build(rows)
    rtt = RttTable({b.id: rng.randrange(0, 40) / 1000.0 for b in rows if rng.random() < 0.66})
    load = {b.id: 2 for b in rows if b.hard_limit and rng.random() < 0.5}
    index = SelectionIndex(snapshot, load, set(), rtt, rtt.changed)
    for geo in (BR, GeoInfo("FR", "sa"), GeoInfo("ZZ", "us"), GeoInfo("ZZ", "zz"), None):
        for local in _REGIONS:
            exclude = frozenset(b.id for b in rows if rng.random() < 0.05)
            for weight in (0.01, 1.0):
                _check_rtt_index(
                    index, snapshot, "app", geo, local, load, rtt, weight, exclude, frozenset(), 1
                )


def test_rtt_table_notes_every_change():
    """
    The RTT table notes each id set or removed, whichever way (item
    assignment, update, setdefault, pop, del, popitem, clear), and reads as
    the plain dict it is.
    """
    rtt = RttTable({"a": 0.001})
    assert rtt.changed == {"a"} and dict(rtt) == {"a": 0.001} and rtt.get("a") == 0.001
    rtt.changed.clear()
    rtt["b"] = 0.002
    rtt.update({"c": 0.003})
    rtt.setdefault("d", 0.004)
    assert rtt.changed == {"b", "c", "d"}
    rtt.changed.clear()
    rtt.pop("a")
    rtt.pop("nobody", None)
    del rtt["b"]
    assert rtt.changed == {"a", "b", "nobody"}
    rtt.changed.clear()
    key, _ = rtt.popitem()
    assert rtt.changed == {key}
    rtt.clear()
    assert rtt.changed == {"c", "d"} and not rtt


@settings(max_examples=150, deadline=None)
@given(
    st.lists(_backends(max_size=10), min_size=1, max_size=3),
    st.lists(
        st.tuples(
            st.sampled_from(["choose", "choose", "choose", "release", "reload", "drain", "rtt"]),
            st.integers(0, 9),
        ),
        max_size=40,
    ),
    st.lists(_geos, min_size=1, max_size=4),
    st.sampled_from(["a", None, "b"]),
    st.sampled_from(_REGIONS),
    st.sampled_from([0.01, 1.0]),
    st.data(),
)
def test_router_choice_with_rtt_is_the_plain_scans(tables, ops, geos, app, local, weight, data):
    """
    Through the router with the RTT term on and an L{RttTable} (as the
    health checker gives it), every fresh choice is one the brute-force
    scan with the RTT term allows for the counts, RTTs and admin states of
    that moment: connections chosen, released, RTTs measured, reloads and
    drains in any order.
    """
    from twisted.internet.task import Clock

    from edgeproxy.interfaces import NO_NEW_CLIENTS
    from edgeproxy.routing.router import Router
    from edgeproxy.testing import (
        BindingTable,
        InMemoryBackendRepository,
        MetricsStore,
        StaticGeoResolver,
    )

    ips = [f"192.0.2.{i}" for i in range(len(geos))]
    resolver = StaticGeoResolver({ip: g for ip, g in zip(ips, geos) if g is not None})
    repository = InMemoryBackendRepository(tables[0])
    rtt = RttTable()
    router = Router(
        repository,
        BindingTable(),
        resolver,
        MetricsStore(),
        local,
        Clock(),
        random.Random(0),
        rtt=rtt,
        rtt_weight=weight,
    )
    which = 0
    held = []
    for step, (op, n) in enumerate(ops):
        snapshot = repository.current()
        if op == "choose":
            ip = ips[n % len(ips)]
            client = f"198.51.100.{step}" if n % 2 else ip
            geo = resolver.resolve(client)
            blocked = router.overlay.closedToNew
            best, argmin = select_rtt_reference(
                snapshot, app, geo, local, dict(router.load.connections), rtt, weight, blocked
            )
            router._bindings.remove((client, app))  # type: ignore[attr-defined]
            chosen = router.choose(client, app)
            if best is None:
                assert chosen is None
            else:
                assert chosen is not None and chosen.id in argmin
                held.append(chosen.id)
        elif op == "release" and held:
            router.release(held.pop(n % len(held)))
        elif op == "reload":
            which = (which + 1) % len(tables)
            repository.set(tables[which])
        elif op == "drain" and snapshot.backends:
            bid = snapshot.backends[n % len(snapshot.backends)].id
            router.overlay.setVerdict(bid, "admin", NO_NEW_CLIENTS)
        elif op == "rtt" and snapshot.backends:
            bid = snapshot.backends[n % len(snapshot.backends)].id
            rtt[bid] = data.draw(_any_rtt_values, label="rtt")
    assert router._index is None or router._index.rtt is rtt  # type: ignore[attr-defined]


def test_rtt_index_sees_rtt_updates():
    """
    An RTT update between two decisions moves the backend and the tier's
    median at once: the unmeasured backend is scored with the new median
    and the nearer backend wins.
    """
    rows = [backend("a", country="BR"), backend("b", country="BR"), backend("c", country="BR")]
    snapshot = RoutingSnapshot.build(rows)
    rtt = RttTable({"a": 0.010, "b": 0.030})
    load = {"a": 50}  # a: load term 0.5
    index = SelectionIndex(snapshot, load, set(), rtt, rtt.changed)
    assert index.tier_median(0, "app", BR, "sa") == 20.0
    # b 0.3, c (median 20 ms) 0.2, a 0.6.
    assert index.candidates("app", BR, "sa", rtt_weight=0.01) == (pytest.approx(0.2), {"c"})
    rtt["a"] = 0.0104  # still 10 ms: nothing moves
    assert index.tier_median(0, "app", BR, "sa") == 20.0
    rtt["b"] = 0.0
    assert index.tier_median(0, "app", BR, "sa") == 5.0
    assert index.candidates("app", BR, "sa", rtt_weight=0.01) == (0.0, {"b"})
    rtt.pop("a")
    assert index.tier_median(0, "app", BR, "sa") == 0.0
    assert index.candidates("app", BR, "sa", rtt_weight=0.01) == (0.0, {"b", "c"})
