"""
Tests for L{edgeproxy.routing.overlay.StateOverlay} and the router's use of
it: the proxy's own verdicts (health, breaker, admin) on top of the routing
table, without rebuilding the snapshot.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from edgeproxy.interfaces import (
    AVAILABLE,
    NO_NEW_CLIENTS,
    UNAVAILABLE,
    ILoadCounter,
    IStateOverlay,
)
from edgeproxy.routing.router import Router
from edgeproxy.testing import (
    BindingTable,
    InMemoryBackendRepository,
    LoadTable,
    MetricsStore,
    StateOverlay,
    StaticGeoResolver,
    backend,
)

CLIENT = "203.0.113.10"


def test_interfaces():
    """
    L{StateOverlay} provides L{IStateOverlay}, L{LoadTable} L{ILoadCounter}.
    """
    assert verifyObject(IStateOverlay, StateOverlay())
    assert verifyObject(ILoadCounter, LoadTable())


def test_worst_verdict_wins_and_listeners_see_changes():
    """
    Each source's verdict is kept; the worst is in force; the two sets
    follow it; listeners hear each change of the effective verdict once
    (not a source change that leaves it as it was).
    """
    overlay = StateOverlay()
    seen: list[tuple[str, int, int]] = []
    overlay.addListener(lambda b, old, new: seen.append((b, old, new)))
    overlay.setVerdict("a", "admin", NO_NEW_CLIENTS)
    assert overlay.closedToNew == {"a"} and overlay.unavailable == frozenset()
    overlay.setVerdict("a", "health", UNAVAILABLE)
    assert overlay.unavailable == {"a"}
    overlay.setVerdict("a", "health", UNAVAILABLE)  # no change
    overlay.setVerdict("a", "breaker", UNAVAILABLE)  # effective unchanged
    overlay.setVerdict("a", "health", AVAILABLE)
    assert overlay.verdict("a") == UNAVAILABLE  # the breaker still says so
    overlay.setVerdict("a", "breaker", AVAILABLE)
    assert overlay.verdict("a") == NO_NEW_CLIENTS
    assert overlay.sources("a") == {"admin": NO_NEW_CLIENTS}
    overlay.setVerdict("a", "admin", AVAILABLE)
    assert overlay.verdict("a") == AVAILABLE
    assert overlay.closedToNew == frozenset() and overlay.unavailable == frozenset()
    assert seen == [
        ("a", AVAILABLE, NO_NEW_CLIENTS),
        ("a", NO_NEW_CLIENTS, UNAVAILABLE),
        ("a", UNAVAILABLE, NO_NEW_CLIENTS),
        ("a", NO_NEW_CLIENTS, AVAILABLE),
    ]
    with pytest.raises(ValueError):
        overlay.setVerdict("a", "health", 7)


def test_sets_are_replaced_not_mutated():
    """
    Readers may hold C{closedToNew} across a change: it is a new set each
    time, never the old one mutated.
    """
    overlay = StateOverlay()
    before = overlay.closedToNew
    overlay.setVerdict("a", "health", UNAVAILABLE)
    assert before == frozenset() and overlay.closedToNew == {"a"}


def test_forget_drops_the_given_sources():
    """
    C{forget} drops the verdicts of the given sources on the given
    backends (a backend left the table) and tells listeners.
    """
    overlay = StateOverlay()
    overlay.setVerdict("a", "health", UNAVAILABLE)
    overlay.setVerdict("a", "admin", NO_NEW_CLIENTS)
    overlay.setVerdict("b", "health", UNAVAILABLE)
    seen: list[tuple[str, int, int]] = []
    overlay.addListener(lambda b, old, new: seen.append((b, old, new)))
    overlay.forget({"a", "b", "c"}, {"health"})
    assert overlay.verdict("a") == NO_NEW_CLIENTS and overlay.verdict("b") == AVAILABLE
    assert sorted(seen) == [("a", UNAVAILABLE, NO_NEW_CLIENTS), ("b", UNAVAILABLE, AVAILABLE)]


def test_a_failing_listener_does_not_stop_the_others():
    """
    A listener that raises is logged; the next one still hears the change.
    """
    overlay = StateOverlay()
    seen: list[str] = []

    def broken(*_: object) -> None:
        raise RuntimeError("listener bug")

    overlay.addListener(broken)
    overlay.addListener(lambda b, old, new: seen.append(b))
    overlay.setVerdict("a", "health", UNAVAILABLE)
    assert seen == ["a"]


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c"]),
            st.sampled_from(["health", "breaker", "admin"]),
            st.sampled_from([AVAILABLE, NO_NEW_CLIENTS, UNAVAILABLE]),
        ),
        max_size=40,
    )
)
def test_sets_always_match_the_verdicts(changes):
    """
    Whatever the sequence of verdicts, the two sets are exactly the ids
    whose worst verdict is NO_NEW_CLIENTS-or-worse and UNAVAILABLE, and
    closedToNewIgnoring (cached between changes) is what the other sources
    alone say.
    """
    overlay = StateOverlay()
    model: dict[tuple[str, str], int] = {}
    for backend_id, source, verdict in changes:
        overlay.setVerdict(backend_id, source, verdict)
        model[(backend_id, source)] = verdict
        worst = {b: max([v for (bb, _), v in model.items() if bb == b], default=0) for b in "abc"}
        assert overlay.closedToNew == {b for b, v in worst.items() if v >= NO_NEW_CLIENTS}
        assert overlay.unavailable == {b for b, v in worst.items() if v == UNAVAILABLE}
        for ignored in ({"health"}, {"health", "breaker"}):
            rest = {
                b: max([v for (bb, src), v in model.items() if bb == b and src not in ignored],
                       default=0)
                for b in "abc"
            }  # fmt: skip
            assert overlay.closedToNewIgnoring(ignored) == {
                b for b, v in rest.items() if v >= NO_NEW_CLIENTS
            }


# -- the router with an overlay ---------------------------------------------------


def _router(rows, **kwargs):
    repository = InMemoryBackendRepository(rows)
    bindings = BindingTable()
    overlay = StateOverlay()
    router = Router(
        repository,
        bindings,
        StaticGeoResolver({}),
        MetricsStore(),
        "sa",
        Clock(),
        random.Random(1),
        overlay=overlay,
        **kwargs,
    )
    return router, overlay, bindings


def test_unavailable_backends_take_nobody():
    """
    A backend the overlay makes unavailable (health down, breaker open,
    maint) gets neither new clients nor the clients bound to it, without
    any change to the routing table; it is back once the verdict clears.
    """
    router, overlay, _ = _router([backend("a"), backend("b", region="eu", country="FR")])
    first = router.choose(CLIENT, "app")
    assert first is not None and first.id == "a"
    router.release("a")
    overlay.setVerdict("a", "health", UNAVAILABLE)
    moved = router.choose(CLIENT, "app")
    assert moved is not None and moved.id == "b"
    router.release("b")
    assert router.choose("198.51.100.1", "app").id == "b"  # type: ignore[union-attr]
    router.release("b")
    overlay.setVerdict("a", "health", AVAILABLE)
    assert router.choose("198.51.100.2", "app").id == "a"  # type: ignore[union-attr]


def test_draining_backend_keeps_its_bound_clients_only():
    """
    A backend closed to new clients (drain) still takes the clients bound
    to it, while new clients go elsewhere.
    """
    router, overlay, _ = _router([backend("a"), backend("b", region="eu", country="FR")])
    assert router.choose(CLIENT, "app").id == "a"  # type: ignore[union-attr]
    overlay.setVerdict("a", "admin", NO_NEW_CLIENTS)
    assert router.choose(CLIENT, "app").id == "a"  # type: ignore[union-attr]
    assert router.choose("198.51.100.1", "app").id == "b"  # type: ignore[union-attr]


class _RacingLoad(LoadTable):
    """
    A shared load table where another worker takes the last slot of a
    backend between the score and the acquire.
    """

    def __init__(self, full: set[str]) -> None:
        super().__init__()
        self.full = full

    def acquire(self, backend):  # type: ignore[no-untyped-def]
        if backend.id in self.full:
            return False
        return super().acquire(backend)


def test_acquire_failure_moves_on_to_the_next_best():
    """
    If the best backend turns out full at acquire time (another worker
    filled it), the router picks the next best instead of failing, and
    binds the client to the backend it really got.
    """
    load = _RacingLoad({"a"})
    router, _, bindings = _router(
        [backend("a"), backend("b", region="eu", country="FR")], load=load
    )
    chosen = router.choose(CLIENT, "app")
    assert chosen is not None and chosen.id == "b"
    assert load.connections == {"b": 1}
    assert bindings.peek((CLIENT, "app"), 0.0).backend_id == "b"  # type: ignore[union-attr]


class _ForeignBindings(BindingTable):
    """
    A shared binding store where another worker bound the client first.
    """

    def __init__(self, other: str) -> None:
        super().__init__()
        self.other = other

    def bind(self, key, backend_id, now):  # type: ignore[no-untyped-def]
        return super().bind(key, self.other, now)


def test_get_or_create_result_is_followed():
    """
    Defect 9 of issue 7: when bind() returns another backend (get-or-create
    found a binding another worker made meanwhile), the router uses that
    backend, so a client has one backend however many workers see it.
    """
    repository = InMemoryBackendRepository([backend("a"), backend("b", region="eu", country="FR")])
    router = Router(
        repository, _ForeignBindings("b"), None, MetricsStore(), "sa", Clock(), random.Random(1)
    )
    chosen = router.choose(CLIENT, "app")
    assert chosen is not None and chosen.id == "b"
    assert router.load.connections == {"b": 1}


def test_explain_names_the_overlay_verdicts():
    """
    C{explain} lists backends the overlay closes with the reason: health
    check down, circuit breaker open, admin drain or maint.
    """
    rows = [backend(i) for i in ("h", "b", "d", "m", "ok")]
    router, overlay, _ = _router(rows)
    overlay.setVerdict("h", "health", UNAVAILABLE)
    overlay.setVerdict("b", "breaker", UNAVAILABLE)
    overlay.setVerdict("d", "admin", NO_NEW_CLIENTS)
    overlay.setVerdict("m", "admin", UNAVAILABLE)
    report = router.explain(CLIENT, "app")
    assert [c["id"] for c in report["candidates"]] == ["ok"]
    assert {e["id"]: e["reason"] for e in report["excluded"]} == {
        "h": "health check down",
        "b": "circuit breaker open",
        "d": "admin drain",
        "m": "admin maint",
    }
