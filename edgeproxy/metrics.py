"""
Per-backend connection counts and the proxy's counters, in memory.
"""

from __future__ import annotations

from typing import Dict, Mapping, Tuple

from twisted.logger import Logger
from zope.interface import implementer

from edgeproxy.interfaces import IMetricsStore

__all__ = ["UNDERFLOW", "MetricsStore"]

_log = Logger()

#: Counter bumped (labelled with the backend id) when a connection is
#: closed that was never opened: a bookkeeping bug, never a negative count.
UNDERFLOW = "metrics_underflow"


@implementer(IMetricsStore)
class MetricsStore:
    """
    An in-memory L{IMetricsStore}.

    @ivar connections: Backend id -> current connections (open plus
        connecting).  A plain C{dict}, read on every routing decision; ids
        drop out when they reach 0 and counts never go negative.
    """

    def __init__(self) -> None:
        self.connections: Dict[str, int] = {}
        self._counters: Dict[Tuple[str, str], int] = {}
        self._underflowLogged = False

    def __repr__(self) -> str:
        return f"<MetricsStore backends={len(self.connections)} counters={len(self._counters)}>"

    def connectionOpened(self, backend_id: str) -> None:
        """
        See L{IMetricsStore.connectionOpened}.
        """
        connections = self.connections
        connections[backend_id] = connections.get(backend_id, 0) + 1

    def connectionClosed(self, backend_id: str) -> None:
        """
        See L{IMetricsStore.connectionClosed}.  Closing more than was opened
        leaves the count at 0 and bumps the C{metrics_underflow} counter.
        """
        connections = self.connections
        n = connections.get(backend_id, 0)
        if n > 1:
            connections[backend_id] = n - 1
        elif n == 1:
            del connections[backend_id]
        else:
            self.increment(UNDERFLOW, backend_id)
            if not self._underflowLogged:
                self._underflowLogged = True
                _log.warn(
                    "connection to {backend_id} closed more often than opened "
                    "(ignored; counted as {counter}, logged once)",
                    backend_id=backend_id,
                    counter=UNDERFLOW,
                )

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
