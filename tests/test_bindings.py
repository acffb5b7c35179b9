"""
Tests for L{edgeproxy.routing.bindings.BindingTable}: client affinity with a
sliding TTL and a bounded size (SPEC section 4).
"""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from edgeproxy.interfaces import IBindingRepository
from edgeproxy.routing.bindings import BindingTable

K1 = ("10.0.0.1", "app")
K2 = ("10.0.0.2", "app")
K3 = ("10.0.0.3", "app")


def test_provides_interface():
    """
    L{BindingTable} provides L{IBindingRepository}, C{ttl} included.
    """
    table = BindingTable(ttl=30.0)
    assert verifyObject(IBindingRepository, table)
    assert table.ttl == 30.0


def test_bind_then_lookup():
    """
    A binding is found by its key (client IP and app) and only by it.
    """
    clock = Clock()
    table = BindingTable()
    created = table.bind(K1, "gru-1", clock.seconds())
    assert created.backend_id == "gru-1"
    assert table.lookup(K1, clock.seconds()) is created
    assert table.lookup(("10.0.0.1", "other"), clock.seconds()) is None
    assert table.lookup(("10.0.0.1", None), clock.seconds()) is None
    assert len(table) == 1


def test_sliding_ttl():
    """
    Every lookup slides the TTL: a binding used every 8 s with a 10 s TTL
    lives on well past 10 s, keeps its creation time, and expires 10 s after
    its last use.
    """
    clock = Clock()
    table = BindingTable(ttl=10.0)
    table.bind(K1, "gru-1", clock.seconds())
    for _ in range(5):
        clock.advance(8)
        found = table.lookup(K1, clock.seconds())
        assert found is not None
        assert found.last_seen == clock.seconds()
        assert found.created == 0
    clock.advance(9.5)
    assert table.lookup(K1, clock.seconds()) is not None
    clock.advance(10)
    assert table.lookup(K1, clock.seconds()) is None


def test_expiry_on_read_removes():
    """
    An expired binding is never returned, and reading it frees it even
    before any collection runs.
    """
    clock = Clock()
    table = BindingTable(ttl=10.0)
    table.bind(K1, "gru-1", clock.seconds())
    clock.advance(10)
    assert len(table) == 1
    assert table.lookup(K1, clock.seconds()) is None
    assert len(table) == 0


def test_bind_is_get_or_create():
    """
    A second bind for a live key returns the first binding (refreshed), not
    a new one to another backend; after expiry a bind creates a new one.
    """
    clock = Clock()
    table = BindingTable(ttl=10.0)
    first = table.bind(K1, "gru-1", clock.seconds())
    clock.advance(5)
    second = table.bind(K1, "cdg-1", clock.seconds())
    assert second is first
    assert second.backend_id == "gru-1"
    assert second.last_seen == 5
    assert len(table) == 1
    clock.advance(10)
    third = table.bind(K1, "cdg-1", clock.seconds())
    assert third.backend_id == "cdg-1"
    assert third.created == 15


def test_collect_frees_only_expired():
    """
    C{collect} frees exactly the expired bindings, returns how many, and
    leaves refreshed ones alone.
    """
    clock = Clock()
    table = BindingTable(ttl=10.0)
    table.bind(K1, "a", clock.seconds())
    table.bind(K2, "b", clock.seconds())
    clock.advance(4)
    table.bind(K3, "c", clock.seconds())
    clock.advance(4)
    table.lookup(K1, clock.seconds())  # K1 refreshed at 8
    clock.advance(3)  # now 11: K2 (seen at 0) expired; K3 (4) and K1 (8) live
    assert table.collect(clock.seconds()) == 1
    assert len(table) == 2
    assert table.lookup(K2, clock.seconds()) is None
    assert table.collect(clock.seconds()) == 0
    clock.advance(100)
    assert table.collect(clock.seconds()) == 2
    assert len(table) == 0


def test_collect_cost_proportional_to_freed():
    """
    C{collect} stops at the first live binding from the least recently
    used end, so it does not touch the live part of the table.
    """
    clock = Clock()
    table = BindingTable(ttl=10.0)
    for i in range(5):
        table.bind((f"10.0.0.{i}", "app"), "a", clock.seconds())
    clock.advance(6)
    for i in range(5, 1005):
        table.bind((f"10.0.1.{i}", "app"), "a", clock.seconds())
    clock.advance(5)

    touched = []
    inner = table._bindings

    class Spy(type(inner)):  # type: ignore[misc]
        def __getitem__(self, key):
            touched.append(key)
            return super().__getitem__(key)

    table._bindings = Spy(inner)
    assert table.collect(clock.seconds()) == 5
    assert len(touched) == 6  # five expired plus the first live one
    assert len(table) == 1000


def test_lru_eviction_at_max_size():
    """
    When the table is full, binding a new key evicts the least recently
    used one (a recent lookup protects a binding), and the size never
    exceeds the maximum.
    """
    clock = Clock()
    table = BindingTable(max_size=2)
    table.bind(K1, "a", clock.seconds())
    clock.advance(1)
    table.bind(K2, "b", clock.seconds())
    clock.advance(1)
    table.lookup(K1, clock.seconds())  # K2 is now least recently used
    table.bind(K3, "c", clock.seconds())
    assert len(table) == 2
    assert table.lookup(K2, clock.seconds()) is None
    assert table.lookup(K1, clock.seconds()) is not None
    assert table.lookup(K3, clock.seconds()) is not None


def test_remove_and_remove_backend():
    """
    C{remove} forgets one key (missing keys are fine); C{removeBackend}
    forgets every binding to a backend and says how many.
    """
    clock = Clock()
    table = BindingTable()
    table.bind(K1, "a", clock.seconds())
    table.bind(K2, "a", clock.seconds())
    table.bind(K3, "b", clock.seconds())
    table.remove(("nobody", None))
    assert table.removeBackend("a") == 2
    assert table.removeBackend("a") == 0
    assert table.lookup(K1, clock.seconds()) is None
    assert table.lookup(K3, clock.seconds()) is not None
    table.remove(K3)
    assert len(table) == 0


def test_remove_backends_in_one_pass():
    """
    C{removeBackends} forgets every binding to any of the given backends
    and counts them per backend; other backends' bindings stay, and ids
    without bindings are left out of the counts.
    """
    clock = Clock()
    table = BindingTable()
    table.bind(K1, "a", clock.seconds())
    table.bind(K2, "b", clock.seconds())
    table.bind(K3, "c", clock.seconds())
    assert table.removeBackends(frozenset({"a", "b", "zzz"})) == {"a": 1, "b": 1}
    assert table.lookup(K1, clock.seconds()) is None
    assert table.lookup(K2, clock.seconds()) is None
    assert table.lookup(K3, clock.seconds()) is not None
    assert table.removeBackends(frozenset({"a"})) == {}


def test_peek_does_not_refresh():
    """
    C{peek} (diagnostics) returns a live binding without sliding its TTL
    and never returns an expired one.
    """
    clock = Clock()
    table = BindingTable(ttl=10.0)
    table.bind(K1, "a", clock.seconds())
    clock.advance(6)
    peeked = table.peek(K1, clock.seconds())
    assert peeked is not None and peeked.last_seen == 0
    clock.advance(6)
    assert table.peek(K1, clock.seconds()) is None


@pytest.mark.parametrize("kwargs", [{"ttl": 0}, {"ttl": -1.0}, {"max_size": 0}])
def test_rejects_bad_settings(kwargs):
    """
    A non-positive TTL or maximum size is refused with a clear error.
    """
    with pytest.raises(ValueError, match="binding"):
        BindingTable(**kwargs)
