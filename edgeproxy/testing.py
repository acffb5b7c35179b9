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

The repository is also an L{IBackendWriter} (the registration API's port):
C{repo.register(row)}, C{repo.heartbeat(id)}, C{repo.deregister(id)}.
"""

from __future__ import annotations

import time
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from edgeproxy.interfaces import (
    DuplicateBackendError,
    IBackendRepository,
    IBackendWriter,
    IGeoResolver,
    IHostResolver,
    SnapshotListener,
)
from edgeproxy.metrics import MetricsStore
from edgeproxy.model import Backend, GeoInfo, RoutingSnapshot
from edgeproxy.net.resolve import backend_hosts, is_ip_literal
from edgeproxy.routing.bindings import BindingTable
from edgeproxy.routing.load import LoadTable
from edgeproxy.routing.overlay import StateOverlay
from edgeproxy.stores.sqlite import InvalidRowError, validate_row

__all__ = [
    "BindingTable",
    "InMemoryBackendRepository",
    "LoadTable",
    "MetricsStore",
    "StateOverlay",
    "StaticGeoResolver",
    "StaticHostResolver",
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


@implementer(IBackendRepository, IBackendWriter)
class InMemoryBackendRepository:
    """
    An L{IBackendRepository} held in memory; L{set} plays the part of a
    reload that found new content.  Also an L{IBackendWriter}: its writes
    change the table at once (and tell the listeners), and fire at once.

    @param clock: Where registrations and heartbeats take their time
        (L{Backend.heartbeat_at}); the wall clock when C{None}.

    @ivar reloads: How many times L{reload} was called.
    @ivar writes: C{(operation, backend id)} of every write that changed
        the table (C{"register"}, C{"heartbeat"}, C{"deregister"}).
    @ivar writeError: When set, every write fails with it (a store that
        cannot be written, e.g. a L{edgeproxy.interfaces.BackendWriteError})
        and changes nothing.
    """

    def __init__(self, backends: Iterable[Backend] = (), clock: IReactorTime | None = None) -> None:
        self._snapshot = RoutingSnapshot.build(backends)
        self._listeners: List[SnapshotListener] = []
        self.clock = clock
        self.reloads = 0
        self.writes: List[Tuple[str, str]] = []
        self.writeError: Exception | None = None

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
        self._snapshot = new
        if new.same_content(old):
            # The same routing content (heartbeat times aside): in force,
            # nobody told.
            return new
        for listener in list(self._listeners):
            try:
                listener(old, new)
            except Exception:
                _log.failure("routing snapshot listener {listener!r} failed", listener=listener)
        return new

    # IBackendWriter

    def _now(self) -> float:
        return float(self.clock.seconds()) if self.clock is not None else time.time()

    def register(self, fields: Mapping[str, object]) -> Deferred[Backend]:
        """
        See L{IBackendWriter.register}: validated with
        L{edgeproxy.stores.sqlite.validate_row}, added at the end of the
        table with C{heartbeat_at} now.
        """
        if self.writeError is not None:
            return fail(self.writeError)
        try:
            backend = validate_row(dict(fields))
        except InvalidRowError:
            return fail()
        if backend.id in self._snapshot.by_id:
            return fail(DuplicateBackendError(backend.id))
        backend = attrs.evolve(backend, heartbeat_at=self._now())
        self.set([*self._snapshot.backends, backend])
        self.writes.append(("register", backend.id))
        return succeed(backend)

    def heartbeat(self, backend_id: str) -> Deferred[bool]:
        """
        See L{IBackendWriter.heartbeat}.
        """
        if self.writeError is not None:
            return fail(self.writeError)
        found = self._snapshot.by_id.get(backend_id)
        if found is None or found.heartbeat_at is None:
            return succeed(False)
        now = self._now()
        self.set(
            attrs.evolve(b, heartbeat_at=now) if b.id == backend_id else b
            for b in self._snapshot.backends
        )
        self.writes.append(("heartbeat", backend_id))
        return succeed(True)

    def deregister(self, backend_id: str) -> Deferred[bool]:
        """
        See L{IBackendWriter.deregister}: a row without a heartbeat (added
        by hand, or by L{set}) is never deleted.
        """
        if self.writeError is not None:
            return fail(self.writeError)
        found = self._snapshot.by_id.get(backend_id)
        if found is None or found.heartbeat_at is None:
            return succeed(False)
        self.set(b for b in self._snapshot.backends if b.id != backend_id)
        self.writes.append(("deregister", backend_id))
        return succeed(True)


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


@implementer(IHostResolver)
class StaticHostResolver:
    """
    An L{IHostResolver} from a fixed table of host name -> addresses; an IP
    literal stands for itself, every other name has no addresses.  Nothing
    is ever looked up; L{set} plays the part of DNS changing.

    @ivar resolved: Every host passed to L{resolve}, in order (for tests
        that check what would have been resolved).
    @ivar watched: The hosts of the last L{watch} (or
        L{routingTableChanged}).
    """

    def __init__(self, table: Mapping[str, Sequence[str]]) -> None:
        self._table: Dict[str, Tuple[str, ...]] = {k: tuple(v) for k, v in table.items()}
        self.resolved: List[str] = []
        self.watched: frozenset[str] = frozenset()

    def __repr__(self) -> str:
        return f"<StaticHostResolver entries={len(self._table)}>"

    def set(self, host: str, addresses: Optional[Sequence[str]]) -> None:
        """
        Give C{host} these C{addresses} from now on (C{None}: none).
        """
        if addresses is None:
            self._table.pop(host, None)
        else:
            self._table[host] = tuple(addresses)

    def addresses(self, host: str) -> Optional[Tuple[str, ...]]:
        """
        See L{IHostResolver.addresses}.
        """
        found = self._table.get(host)
        if found is not None:
            return found
        return (host,) if is_ip_literal(host) else None

    def resolve(self, hosts: Iterable[str]) -> Deferred[None]:
        """
        See L{IHostResolver.resolve}: records the hosts, fires at once.
        """
        self.resolved.extend(hosts)
        return succeed(None)

    def refresh(self) -> None:
        """
        See L{IHostResolver.refresh}: nothing to do.
        """

    def watch(self, hosts: Iterable[str]) -> None:
        """
        See L{IHostResolver.watch}: records the hosts.
        """
        self.watched = frozenset(hosts)

    def routingTableChanged(self, old: RoutingSnapshot, new: RoutingSnapshot) -> None:
        """
        See L{IHostResolver.routingTableChanged}.
        """
        self.watch(backend_hosts(new))

    def stats(self) -> Mapping[str, int]:
        """
        See L{IHostResolver.stats}.
        """
        return {
            "hosts": len(self._table),
            "literals": 0,
            "names": len(self._table),
            "resolved": len(self._table),
            "unresolved": 0,
            "failing": 0,
            "in_flight": 0,
            "lookups": 0,
            "lookup_failures": 0,
        }

    def __len__(self) -> int:
        """
        See L{IHostResolver.__len__}.
        """
        return len(self._table)
