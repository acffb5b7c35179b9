"""
In-memory implementations of every port, for tests (ours and other
projects').

    from edgeproxy.testing import (
        BindingTable, InMemoryBackendRepository, MetricsStore,
        StaticGeoResolver, backend,
    )

    repo = InMemoryBackendRepository([backend("gru-1"), backend("cdg-1", region="eu",
                                                                  country="FR")])
    repo.set([backend("gru-1", healthy=False)])    # a "reload"; listeners are told
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from zope.interface import implementer

from edgeproxy.interfaces import IBackendRepository, IGeoResolver, SnapshotListener
from edgeproxy.metrics import MetricsStore
from edgeproxy.model import Backend, GeoInfo, RoutingSnapshot
from edgeproxy.routing.bindings import BindingTable
from edgeproxy.routing.load import LoadTable
from edgeproxy.routing.overlay import StateOverlay

__all__ = [
    "BindingTable",
    "InMemoryBackendRepository",
    "LoadTable",
    "MetricsStore",
    "StateOverlay",
    "StaticGeoResolver",
    "backend",
]

_log = Logger()


def backend(id: str, **overrides: Any) -> Backend:
    """
    A L{Backend} with sensible defaults, for tests: app C{"app"}, region
    C{"sa"}, country C{"BR"}, host C{127.0.0.1}, port 9000, healthy, weight
    1, soft limit 1, no hard limit, no PROXY header.  Any field can be
    overridden by keyword; a country is upper-cased as the loaders do.
    """
    fields: Dict[str, Any] = {
        "app": "app",
        "region": "sa",
        "country": "BR",
        "host": "127.0.0.1",
        "port": 9000,
    }
    fields.update(overrides)
    if isinstance(fields["country"], str):
        fields["country"] = fields["country"].upper()
    return Backend(id=id, **fields)


@implementer(IBackendRepository)
class InMemoryBackendRepository:
    """
    An L{IBackendRepository} held in memory; L{set} plays the part of a
    reload that found new content.
    """

    def __init__(self, backends: Iterable[Backend] = ()) -> None:
        self._snapshot = RoutingSnapshot.build(backends)
        self._listeners: List[SnapshotListener] = []
        self.reloads = 0

    def __repr__(self) -> str:
        return f"<InMemoryBackendRepository backends={len(self._snapshot)}>"

    def current(self) -> RoutingSnapshot:
        """
        See L{IBackendRepository.current}.
        """
        return self._snapshot

    def reload(self) -> Deferred[RoutingSnapshot]:
        """
        See L{IBackendRepository.reload}: nothing to read, so this fires at
        once with the current snapshot.
        """
        self.reloads += 1
        return succeed(self._snapshot)

    def addListener(self, listener: SnapshotListener) -> None:
        """
        See L{IBackendRepository.addListener}.
        """
        self._listeners.append(listener)

    def set(self, backends: Iterable[Backend]) -> RoutingSnapshot:
        """
        Replace the routing table with C{backends}.  If the content changed,
        every listener is called with C{(old, new)}; a listener that raises
        is logged and does not stop the others.

        @return: The snapshot now in force.
        """
        new = RoutingSnapshot.build(backends)
        old = self._snapshot
        if new.same_content(old):
            return old
        self._snapshot = new
        for listener in list(self._listeners):
            try:
                listener(old, new)
            except Exception:
                _log.failure("routing snapshot listener {listener!r} failed", listener=listener)
        return new


@implementer(IGeoResolver)
class StaticGeoResolver:
    """
    An L{IGeoResolver} from a fixed table of IP (text form) -> L{GeoInfo};
    every other address has no geo.
    """

    def __init__(self, table: Mapping[str, GeoInfo]) -> None:
        self._table = dict(table)

    def __repr__(self) -> str:
        return f"<StaticGeoResolver entries={len(self._table)}>"

    def resolve(self, ip: str) -> GeoInfo | None:
        """
        See L{IGeoResolver.resolve}.
        """
        return self._table.get(ip)
