"""
Per-backend load accounting in one process: an L{ILoadCounter}.

Taking a slot (L{LoadTable.acquire}) checks the hard limit and counts in one
step, so that the router never reads a count and then increments it as two
separate operations; a table shared between worker processes implements the
same port.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Mapping, Set, Tuple

from twisted.logger import Logger
from zope.interface import implementer

from edgeproxy.interfaces import ILoadCounter, IMetricsStore
from edgeproxy.model import Backend

__all__ = ["UNDERFLOW", "LoadTable", "RttTable"]

_log = Logger()

#: Counter bumped (labelled with the backend id) when a slot is released
#: that was never taken: a bookkeeping bug, never a negative count.
UNDERFLOW = "load_underflow"


@implementer(ILoadCounter)
class LoadTable:
    """
    An in-memory L{ILoadCounter}.

    @ivar connections: Backend id -> current connections (open plus
        connecting).  A plain C{dict}, read on every routing decision; ids
        drop out when they reach 0 and counts never go negative.
    @ivar metrics: Where an underflow is counted, if given.
    @ivar changed: The ids whose count changed since the router's selection
        index last looked (L{edgeproxy.routing.index.SelectionIndex.sync}
        drains it): one set insertion per acquire and per release.  Only ids
        of backends that were acquired go in, at most once each, so it never
        holds more ids than the routing tables have had backends.
    """

    __slots__ = ("_underflowLogged", "changed", "connections", "metrics")

    def __init__(self, metrics: IMetricsStore | None = None) -> None:
        self.connections: Dict[str, int] = {}
        self.changed: Set[str] = set()
        self.metrics = metrics
        self._underflowLogged = False

    def __repr__(self) -> str:
        return (
            f"<LoadTable backends={len(self.connections)} total={sum(self.connections.values())}>"
        )

    def acquire(self, backend: Backend) -> bool:
        """
        See L{ILoadCounter.acquire}.
        """
        connections = self.connections
        bid = backend.id
        current = connections.get(bid, 0)
        hard = backend.hard_limit
        if hard > 0 and current >= hard:
            return False
        connections[bid] = current + 1
        self.changed.add(bid)
        return True

    def release(self, backend_id: str) -> None:
        """
        See L{ILoadCounter.release}.  Releasing more than was taken leaves
        the count at 0, counts L{UNDERFLOW} and logs once.
        """
        connections = self.connections
        n = connections.get(backend_id, 0)
        if n > 1:
            connections[backend_id] = n - 1
            self.changed.add(backend_id)
        elif n == 1:
            del connections[backend_id]
            self.changed.add(backend_id)
        else:
            self._underflow(backend_id)

    def _underflow(self, backend_id: str) -> None:
        """
        Count and log (once) a release of a connection never taken.
        """
        if self.metrics is not None:
            self.metrics.increment(UNDERFLOW, backend_id)
        if not self._underflowLogged:
            self._underflowLogged = True
            _log.warn(
                "connection to {backend_id} released more often than taken "
                "(ignored; counted as {counter}, logged once)",
                backend_id=backend_id,
                counter=UNDERFLOW,
            )


class RttTable(Dict[str, float]):
    """
    Backend id -> connect RTT in seconds (the health checker's
    L{edgeproxy.net.health.HealthChecker.rtts}): a plain C{dict} for its
    readers, which notes the id of every entry set or removed in
    L{changed}.

    @ivar changed: The ids whose RTT was set or removed since the router's
        selection index last looked (L{edgeproxy.routing.index.SelectionIndex.sync}
        drains it, one reader only): at most one entry per backend checked.
    """

    __slots__ = ("changed",)

    def __init__(self, items: Mapping[str, float] | Iterable[Tuple[str, float]] = ()) -> None:
        super().__init__()
        self.changed: Set[str] = set()
        self.update(items)

    def __setitem__(self, key: str, value: float) -> None:
        dict.__setitem__(self, key, value)
        self.changed.add(key)

    def __delitem__(self, key: str) -> None:
        dict.__delitem__(self, key)
        self.changed.add(key)

    def pop(self, key: str, *default: Any) -> Any:  # type: ignore[override]
        """
        C{dict.pop}, noting C{key}.
        """
        self.changed.add(key)
        return dict.pop(self, key, *default)

    def popitem(self) -> Tuple[str, float]:
        """
        C{dict.popitem}, noting the key.
        """
        item = dict.popitem(self)
        self.changed.add(item[0])
        return item

    def setdefault(self, key: str, default: float) -> float:  # type: ignore[override]
        """
        C{dict.setdefault}, noting C{key}.
        """
        self.changed.add(key)
        return dict.setdefault(self, key, default)

    def update(self, *args: Any, **kwargs: float) -> None:  # type: ignore[override]
        """
        C{dict.update}, noting every key.
        """
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def clear(self) -> None:
        """
        C{dict.clear}, noting every key.
        """
        self.changed.update(self)
        dict.clear(self)
