"""
Tests for L{edgeproxy.routing.router.Router}, and the verifyObject compliance of the
public in-memory adapters in L{edgeproxy.testing}.
"""

from __future__ import annotations

import random
from typing import Iterable, cast

import pytest
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, globalLogPublisher
from zope.interface.verify import verifyObject

from edgeproxy.interfaces import (
    IBackendRepository,
    IBindingRepository,
    IGeoResolver,
    IMetricsStore,
    IRouter,
)
from edgeproxy.model import Backend, GeoInfo, RoutingSnapshot
from edgeproxy.routing.router import NO_BACKEND, Router
from edgeproxy.testing import (
    BindingTable,
    InMemoryBackendRepository,
    MetricsStore,
    StaticGeoResolver,
    backend,
)

CLIENT_BR = "203.0.113.10"
CLIENT_FR = "198.51.100.20"
CLIENT_NOGEO = "192.0.2.99"

GEO = StaticGeoResolver({CLIENT_BR: GeoInfo("BR", "sa"), CLIENT_FR: GeoInfo("FR", "eu")})


class _World:
    """
    A router over in-memory ports, with handles on each of them.
    """

    def __init__(self, backends: Iterable[Backend], local_region: str = "sa", ttl: float = 600.0):
        self.clock = Clock()
        self.repository = InMemoryBackendRepository(backends)
        self.bindings = BindingTable(ttl=ttl)
        self.metrics = MetricsStore()
        self.router = Router(
            self.repository,
            self.bindings,
            GEO,
            self.metrics,
            local_region,
            self.clock,
            random.Random(3),
        )

    def busy(self, backend_id: str) -> None:
        """
        Count one more connection to C{backend_id}, hard limit or not, and
        note the change as L{LoadTable.acquire} does (the router's selection
        index follows the counts through that note).
        """
        counts = self.router.load.connections
        counts[backend_id] = counts.get(backend_id, 0) + 1  # type: ignore[index]
        self.router.load.changed.add(backend_id)  # type: ignore[attr-defined]

    def choose(self, ip: str = CLIENT_BR, app: str | None = "app", exclude=frozenset()):
        return self.router.choose(ip, app, frozenset(exclude))

    def bound(self, ip: str = CLIENT_BR, app: str | None = "app") -> str | None:
        b = self.bindings.peek((ip, app), self.clock.seconds())
        return None if b is None else b.backend_id


def _id(b: Backend | None) -> str | None:
    return None if b is None else b.id


# --------------------------------------------------------------------------
# Interface compliance of every adapter written here.


def test_adapters_provide_their_interfaces():
    """
    Router, BindingTable, MetricsStore and the public in-memory
    InMemoryBackendRepository and StaticGeoResolver all pass verifyObject.
    """
    w = _World([backend("a")])
    assert verifyObject(IRouter, w.router)
    assert verifyObject(IBindingRepository, w.bindings)
    assert verifyObject(IMetricsStore, w.metrics)
    assert verifyObject(IBackendRepository, w.repository)
    assert verifyObject(IGeoResolver, GEO)


# --------------------------------------------------------------------------
# The testing helpers themselves.


def test_backend_factory_defaults_and_overrides():
    """
    C{backend()} gives a routable row with the documented defaults; any
    field can be overridden and the country is upper-cased like the loaders
    do.
    """
    b = backend("x")
    assert (b.id, b.app, b.region, b.country, b.host, b.port) == (
        "x",
        "app",
        "sa",
        "BR",
        "127.0.0.1",
        9000,
    )
    assert b.routable and b.weight == 1 and b.soft_limit == 1 and b.hard_limit == 0
    c = backend("y", country="fr", region="eu", port=1234, app=None)
    assert (c.country, c.region, c.port, c.app) == ("FR", "eu", 1234, None)
    assert backend("z", country=None).country is None


def test_in_memory_repository_set_and_listeners():
    """
    C{set()} replaces the snapshot and tells listeners (old, new) only when
    the content changed; a failing listener does not stop the others;
    C{reload()} fires at once with the current snapshot.
    """
    repo = InMemoryBackendRepository([backend("a")])
    seen: list[tuple[RoutingSnapshot, RoutingSnapshot]] = []

    def broken(old: RoutingSnapshot, new: RoutingSnapshot) -> None:
        raise RuntimeError("listener bug")

    repo.addListener(broken)
    repo.addListener(lambda old, new: seen.append((old, new)))
    first = repo.set([backend("a")])
    assert first.same_content(repo.current()) and first is repo.current()
    assert seen == []
    logged: list[dict] = []
    observer = cast(ILogObserver, logged.append)
    globalLogPublisher.addObserver(observer)
    try:
        second = repo.set([backend("a"), backend("b")])
    finally:
        globalLogPublisher.removeObserver(observer)
    assert [e["log_failure"].value.args for e in logged if "log_failure" in e] == [
        ("listener bug",)
    ]
    assert repo.current() is second
    assert seen == [(first, second)]
    results: list[RoutingSnapshot] = []
    repo.reload().addCallback(results.append)
    assert results == [second]


def test_static_geo_resolver():
    """
    C{StaticGeoResolver} answers from its table and gives no geo for any
    other address, without raising on garbage.
    """
    assert GEO.resolve(CLIENT_BR) == GeoInfo("BR", "sa")
    assert GEO.resolve(CLIENT_NOGEO) is None
    assert GEO.resolve("not an ip") is None


# --------------------------------------------------------------------------
# Routing.


def test_choose_uses_geo_and_binds_and_counts():
    """
    A first connection goes to the best geo tier, binds the client to it
    and counts one connection against it from the moment of choice.
    """
    w = _World([backend("gru", country="BR"), backend("cdg", country="FR", region="eu")])
    assert _id(w.choose(CLIENT_FR)) == "cdg"
    assert w.bound(CLIENT_FR) == "cdg"
    assert w.router.load.connections == {"cdg": 1}
    assert _id(w.choose(CLIENT_BR)) == "gru"
    assert w.router.load.connections == {"cdg": 1, "gru": 1}


def test_client_without_geo_goes_local():
    """
    A client with no geo goes to the local region first, whatever the
    other countries are.
    """
    w = _World([backend("cdg", country="FR", region="eu"), backend("gru")], local_region="sa")
    assert _id(w.choose(CLIENT_NOGEO)) == "gru"


def test_binding_first_and_refreshed():
    """
    A live binding wins over a better-scored backend, and using it slides
    its TTL.
    """
    w = _World([backend("a"), backend("b")], ttl=10.0)
    first = w.choose()
    assert first is not None
    other = "b" if first.id == "a" else "a"
    # The bound backend is now busier than the other, yet the binding holds.
    for step in range(1, 4):
        w.clock.advance(8)
        assert _id(w.choose()) == first.id
        assert w.router.load.connections[first.id] == step + 1
        assert other not in w.router.load.connections
    binding = w.bindings.peek((CLIENT_BR, "app"), w.clock.seconds())
    assert binding is not None and binding.last_seen == w.clock.seconds() == 24


def test_in_flight_counting_without_release():
    """
    Two choices without a release see load 1 then 2 on the bound backend;
    releasing brings the count back down.
    """
    w = _World([backend("a")])
    w.choose()
    assert w.router.load.connections == {"a": 1}
    w.choose()
    assert w.router.load.connections == {"a": 2}
    w.router.release("a")
    w.router.release("a")
    assert w.router.load.connections == {}


def test_simultaneous_first_connections_share_backend():
    """
    F16: 100 first connections from one client, all before any of them
    completes, are all bound to and sent to the same backend.
    """
    w = _World([backend(f"b{i}") for i in range(5)])
    chosen = {_id(w.choose()) for _ in range(100)}
    assert len(chosen) == 1
    (only,) = chosen
    assert w.router.load.connections == {only: 100}
    assert len(w.bindings) == 1


def _drop_a(w: _World) -> None:
    w.bindings.bind((CLIENT_BR, "app"), "a", w.clock.seconds())


@pytest.mark.parametrize(
    "rows,exclude,why",
    [
        ([backend("a", healthy=False), backend("b")], (), "unhealthy"),
        ([backend("a", deleted=True), backend("b")], (), "deleted"),
        ([backend("a", draining=True), backend("b")], (), "draining"),
        ([backend("b")], (), "removed"),
        ([backend("a", hard_limit=1), backend("b")], (), "at-hard-limit"),
        ([backend("a", app="other"), backend("b")], (), "other-app"),
        ([backend("a"), backend("b")], ("a",), "excluded"),
    ],
)
def test_binding_dropped_when_unusable(rows, exclude, why):
    """
    A binding to a backend that is unhealthy, deleted, draining, gone, at
    its hard limit, of another app or excluded is not used: the client goes
    to another backend and is re-bound to it.
    """
    w = _World(rows)
    if why == "at-hard-limit":
        w.busy("a")
    _drop_a(w)
    assert _id(w.choose(exclude=exclude)) == "b", why
    assert w.bound() == "b"


def test_expired_binding_not_used():
    """
    A binding past its TTL is not used; the client is routed afresh and
    re-bound to the better backend.
    """
    w = _World([backend("a", region="us", country="US"), backend("b")], ttl=10.0)
    _drop_a(w)
    w.clock.advance(10)
    assert _id(w.choose()) == "b"
    assert w.bound() == "b"


def test_connect_failed_clears_binding():
    """
    A failed connect clears the client's binding to that backend only: a
    binding to another backend, or of another app, stays.
    """
    w = _World([backend("a"), backend("b")])
    first = w.choose()
    assert first is not None
    w.router.connectFailed(CLIENT_BR, "app", "not-" + first.id)
    assert w.bound() == first.id
    w.bindings.bind((CLIENT_BR, None), first.id, w.clock.seconds())
    w.router.connectFailed(CLIENT_BR, "app", first.id)
    assert w.bound() is None
    assert w.bound(app=None) == first.id


def test_failover_choice_avoids_excluded():
    """
    After a failed attempt (connectFailed, then choose with the failed id
    excluded) the client gets another backend and is bound to it.
    """
    w = _World([backend("a"), backend("b", weight=5)])
    first = w.choose()
    assert first is not None
    w.router.connectFailed(CLIENT_BR, "app", first.id)
    w.router.release(first.id)
    second = w.choose(exclude={first.id})
    assert second is not None and second.id != first.id
    assert w.bound() == second.id


@pytest.mark.parametrize(
    "rows,load",
    [
        ([], {}),
        ([backend("a", healthy=False), backend("b", deleted=True)], {}),
        ([backend("a", hard_limit=1), backend("b", hard_limit=2)], {"a": 1, "b": 2}),
    ],
    ids=["empty", "all-unhealthy", "all-at-hard-limit"],
)
def test_no_backend_counted(rows, load):
    """
    F20: with no candidate (empty table, all unhealthy, all at hard limit)
    C{choose} returns None, counts C{routing_no_backend}, binds nothing and
    counts no connection.
    """
    w = _World(rows)
    for bid, n in load.items():
        for _ in range(n):
            w.busy(bid)
    assert w.choose() is None
    assert w.choose() is None
    assert w.metrics.counter(NO_BACKEND) == 2
    assert len(w.bindings) == 0
    assert w.router.load.connections == load


@pytest.mark.parametrize("change", ["removed", "unhealthy"])
def test_reload_removing_backend(change):
    """
    F14: after a reload removes a backend or marks it unhealthy, new
    choices avoid it and bindings to it are not used, while the open
    connections to it still count until released.
    """
    w = _World([backend("a"), backend("b", region="us", country="US")])
    assert _id(w.choose()) == "a"
    w.repository.set(
        [backend("b", region="us", country="US")]
        if change == "removed"
        else [backend("a", healthy=False), backend("b", region="us", country="US")]
    )
    assert _id(w.choose()) == "b"
    assert _id(w.choose(CLIENT_FR)) == "b"
    assert w.bound() == "b"
    assert w.router.load.connections == {"a": 1, "b": 2}
    w.router.release("a")
    assert "a" not in w.router.load.connections


def test_reload_seen_without_restart():
    """
    The router caches nothing from the table: a backend added by a reload
    is used by the next connection it is best for.
    """
    w = _World([backend("gru")])
    assert _id(w.choose(CLIENT_FR)) == "gru"
    w.router.connectFailed(CLIENT_FR, "app", "gru")
    w.repository.set([backend("gru"), backend("cdg", country="FR", region="eu")])
    assert _id(w.choose(CLIENT_FR)) == "cdg"


def test_explain_has_no_side_effects():
    """
    C{explain} reports geo, binding and candidates by score without binding,
    refreshing or counting anything.
    """
    w = _World([backend("gru"), backend("cdg", country="FR", region="eu")], ttl=10.0)
    w.choose(CLIENT_FR)
    w.clock.advance(5)
    before = (dict(w.router.load.connections), len(w.bindings), w.metrics.counters())
    report = w.router.explain(CLIENT_FR, "app")
    assert report["geo"] == {"country": "FR", "region": "eu"}
    assert report["binding"] == "cdg"
    assert [(c["id"], c["tier"], c["load"]) for c in report["candidates"]] == [
        ("cdg", 0, 1),
        ("gru", 2, 0),
    ]
    assert report["candidates"][0]["score"] == 1.0
    assert (dict(w.router.load.connections), len(w.bindings), w.metrics.counters()) == before
    binding = w.bindings.peek((CLIENT_FR, "app"), w.clock.seconds())
    assert binding is not None and binding.last_seen == 0
    assert w.router.explain(CLIENT_NOGEO, None)["geo"] is None


def test_ipv6_clients_share_a_binding_per_64():
    """
    Defect 6 of issue 7: IPv6 clients are bound by their /64, so a host
    whose privacy address rotates keeps its backend, and a /64 holds one
    binding per app however many addresses it uses; with a prefix of 128
    each address has its own.
    """
    w = _World([backend("a"), backend("b")])
    first = w.router.choose("2001:db8:1:2::10", "app")
    assert first is not None
    for host in range(11, 200):
        again = w.router.choose(f"2001:db8:1:2::{host:x}", "app")
        assert again is not None and again.id == first.id
    assert len(w.bindings) == 1
    other = Router(w.repository, BindingTable(), GEO, w.metrics, "sa", w.clock, ipv6_prefix=128)
    for host in range(10, 20):
        other.choose(f"2001:db8:1:2::{host:x}", "app")
    assert len(other._bindings) == 10  # type: ignore[attr-defined]
    with pytest.raises(ValueError):
        Router(w.repository, BindingTable(), GEO, w.metrics, "sa", w.clock, ipv6_prefix=129)


def test_failover_that_runs_out_is_not_no_backend():
    """
    Defect 9 of issue 7: when failover has excluded every candidate, the
    router returns None without counting C{routing_no_backend} (the
    connection's one cause is C{connect-failed}); a first attempt with no
    candidate still counts it.
    """
    w = _World([backend("a")])
    assert w.choose(exclude={"a"}) is None
    assert w.metrics.counter(NO_BACKEND) == 0
    w.repository.set([])
    assert w.choose() is None
    assert w.metrics.counter(NO_BACKEND) == 1


def test_explain_lists_excluded_backends_with_their_reason():
    """
    C{explain} lists every backend that is not a candidate after the
    candidates, in table order, each with why: deleted, unhealthy,
    draining, another app's, or at its hard limit; the candidates are
    unchanged (backward compatible shape, one key more).
    """
    w = _World(
        [
            backend("cdg", country="FR", region="eu", hard_limit=1),
            backend("gone", deleted=True, healthy=False),
            backend("sick", healthy=False),
            backend("drain", draining=True),
            backend("other", app="other-app"),
            backend("gru"),
        ]
    )
    assert _id(w.choose(CLIENT_FR)) == "cdg"  # cdg is now at its hard limit of 1
    report = w.router.explain(CLIENT_FR, "app")
    assert [c["id"] for c in report["candidates"]] == ["gru"]
    assert report["excluded"] == [
        {"id": "cdg", "reason": "at hard limit"},
        {"id": "gone", "reason": "deleted"},
        {"id": "sick", "reason": "unhealthy"},
        {"id": "drain", "reason": "draining"},
        {"id": "other", "reason": "other app"},
    ]
    everywhere = w.router.explain(CLIENT_FR, None)
    assert [c["id"] for c in everywhere["candidates"]] == ["gru", "other"]
    assert {e["id"] for e in everywhere["excluded"]} == {"cdg", "gone", "sick", "drain"}


def test_explain_excluded_respects_the_limit():
    """
    Like the candidates, at most C{limit} excluded backends are listed (the
    first ones in table order).
    """
    w = _World([backend(f"sick-{i}", healthy=False) for i in range(8)] + [backend("gru")])
    report = w.router.explain(CLIENT_BR, "app", limit=3)
    assert [e["id"] for e in report["excluded"]] == ["sick-0", "sick-1", "sick-2"]
    assert [c["id"] for c in report["candidates"]] == ["gru"]


def test_selection_index_rebuilt_only_when_the_table_changes():
    """
    The router's selection index is kept across a reload that changed
    nothing (a new snapshot of the same rows) and rebuilt when the rows
    change, after which a new backend is chosen at once and a removed one
    never again.
    """
    w = _World([backend("a", country="US", region="us"), backend("b", country="US", region="us")])
    assert w.choose() is not None
    first = w.router._index
    assert first is not None
    w.repository.set(
        [backend("a", country="US", region="us"), backend("b", country="US", region="us")]
    )
    assert w.choose("198.51.100.77") is not None
    assert w.router._index is first
    w.repository.set([backend("b", country="US", region="us"), backend("c")])
    assert _id(w.choose("198.51.100.78")) == "c"
    assert w.router._index is not first
    w.repository.set([backend("b", country="US", region="us")])
    assert _id(w.choose("198.51.100.79")) == "b"
