"""
Tests for L{edgeproxy.metrics.MetricsStore}.
"""

from __future__ import annotations

from typing import cast

from twisted.logger import ILogObserver, globalLogPublisher
from zope.interface.verify import verifyObject

from edgeproxy.interfaces import IMetricsStore
from edgeproxy.metrics import UNDERFLOW, MetricsStore


def test_provides_interface():
    """
    L{MetricsStore} provides L{IMetricsStore}; C{connections} is a plain
    dict.
    """
    store = MetricsStore()
    assert verifyObject(IMetricsStore, store)
    assert type(store.connections) is dict


def test_connection_counts():
    """
    Opens and closes are counted per backend, and an id drops out of
    C{connections} when it reaches zero.
    """
    store = MetricsStore()
    store.connectionOpened("a")
    store.connectionOpened("a")
    store.connectionOpened("b")
    assert store.connections == {"a": 2, "b": 1}
    store.connectionClosed("a")
    store.connectionClosed("b")
    assert store.connections == {"a": 1}
    store.connectionClosed("a")
    assert store.connections == {}


def test_underflow_ignored_and_counted():
    """
    Closing more than was opened never makes a count negative: it is
    ignored, counted as C{metrics_underflow} per backend, and logged once.
    """
    events: list[dict] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        store = MetricsStore()
        store.connectionClosed("a")
        store.connectionOpened("a")
        store.connectionClosed("a")
        store.connectionClosed("a")
    finally:
        globalLogPublisher.removeObserver(observer)
    assert store.connections == {}
    assert store.counter(UNDERFLOW, "a") == 2
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
