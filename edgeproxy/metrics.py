"""
The proxy's counters, in memory (per-backend load counts are
L{edgeproxy.routing.load.LoadTable}).
"""

from __future__ import annotations

from typing import Dict, Mapping, Tuple

from zope.interface import implementer

from edgeproxy.interfaces import IMetricsStore

__all__ = ["MetricsStore"]


@implementer(IMetricsStore)
class MetricsStore:
    """
    An in-memory L{IMetricsStore}.
    """

    def __init__(self) -> None:
        self._counters: Dict[Tuple[str, str], int] = {}

    def __repr__(self) -> str:
        return f"<MetricsStore counters={len(self._counters)}>"

    def increment(self, name: str, label: str = "", amount: int = 1) -> None:
        """
        See L{IMetricsStore.increment}.
        """
        key = (name, label)
        counters = self._counters
        counters[key] = counters.get(key, 0) + amount

    def counter(self, name: str, label: str = "") -> int:
        """
        See L{IMetricsStore.counter}.
        """
        return self._counters.get((name, label), 0)

    def counters(self) -> Mapping[Tuple[str, str], int]:
        """
        See L{IMetricsStore.counters}.
        """
        return dict(self._counters)
