"""
Tests for L{edgeproxy.metrics.MetricsStore} and L{edgeproxy.routing.load.LoadTable}.
"""

from __future__ import annotations

from typing import cast

from twisted.logger import ILogObserver, globalLogPublisher
from zope.interface.verify import verifyObject

from edgeproxy.interfaces import ILoadCounter, IMetricsStore
from edgeproxy.metrics import MetricsStore
from edgeproxy.routing.load import UNDERFLOW, LoadTable
from edgeproxy.testing import backend


def test_provides_interface():
    """
    L{MetricsStore} provides L{IMetricsStore}; L{LoadTable} provides
    L{ILoadCounter} and its C{connections} is a plain dict.
    """
    assert verifyObject(IMetricsStore, MetricsStore())
    load = LoadTable()
    assert verifyObject(ILoadCounter, load)
    assert type(load.connections) is dict


def test_connection_counts():
    """
    Acquires and releases are counted per backend, and an id drops out of
    C{connections} when it reaches zero.
    """
    load = LoadTable()
    a, b = backend("a"), backend("b")
    assert load.acquire(a) and load.acquire(a) and load.acquire(b)
    assert load.connections == {"a": 2, "b": 1}
    load.release("a")
    load.release("b")
    assert load.connections == {"a": 1}
    load.release("a")
    assert load.connections == {}


def test_acquire_respects_the_hard_limit():
    """
    C{acquire} takes a slot only below the hard limit, in one step: a full
    backend is refused and its count unchanged; a released slot can be
    taken again; C{hard_limit} 0 means unlimited.
    """
    load = LoadTable()
    limited = backend("l", hard_limit=2)
    assert load.acquire(limited) and load.acquire(limited)
    assert not load.acquire(limited)
    assert load.connections == {"l": 2}
    load.release("l")
    assert load.acquire(limited)
    unlimited = backend("u", hard_limit=0)
    assert all(load.acquire(unlimited) for _ in range(1000))
    assert load.connections["u"] == 1000


def test_underflow_ignored_and_counted():
    """
    Releasing more than was taken never makes a count negative: it is
    ignored, counted as C{load_underflow} per backend, and logged once.
    """
    events: list[dict] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    metrics = MetricsStore()
    try:
        load = LoadTable(metrics)
        load.release("a")
        load.acquire(backend("a"))
        load.release("a")
        load.release("a")
    finally:
        globalLogPublisher.removeObserver(observer)
    assert load.connections == {}
    assert metrics.counter(UNDERFLOW, "a") == 2
    assert len([e for e in events if e.get("counter") == UNDERFLOW]) == 1


def test_counters():
    """
    Counters are keyed by (name, label), start at 0, add C{amount}, and
    C{counters()} is a copy.
    """
    store = MetricsStore()
    assert store.counter("closed") == 0
    store.increment("closed", "timeout")
    store.increment("closed", "timeout", 2)
    store.increment("closed")
    assert store.counter("closed", "timeout") == 3
    assert store.counter("closed") == 1
    snapshot = store.counters()
    assert snapshot == {("closed", "timeout"): 3, ("closed", ""): 1}
    snapshot[("closed", "")] = 99  # type: ignore[index]
    assert store.counter("closed") == 1
