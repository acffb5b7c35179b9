"""
Tests for L{edgeproxy.routing.bindings.BindingTable}: client affinity with a
sliding TTL and a bounded size (SPEC section 4).
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from edgeproxy.interfaces import IBindingRepository
from edgeproxy.model import Binding, BindingKey
from edgeproxy.routing.bindings import BindingTable, client_key

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


def _no_scan(table: BindingTable) -> list[BindingKey]:
    """
    Replace C{table._bindings} by a copy that fails on any iteration over
    the table and records the keys deleted from it.
    """
    deleted: list[BindingKey] = []
    inner = table._bindings

    class NoScan(type(inner)):  # type: ignore[misc]
        def _scan(self, *args, **kwargs):
            raise AssertionError("the whole binding table was scanned")

        __iter__ = items = keys = values = _scan  # type: ignore[assignment]

        def __delitem__(self, key):
            deleted.append(key)
            super().__delitem__(key)

        def pop(self, key, *default):
            if key in self:
                deleted.append(key)
            return super().pop(key, *default)

    table._bindings = NoScan(inner)
    return deleted


def test_remove_backends_costs_what_it_removes():
    """
    C{removeBackends} and C{removeBackend} touch only the bindings they
    remove: no scan of the table, whether the backend holds some bindings
    or none, and the other backends' bindings stay.
    """
    clock = Clock()
    table = BindingTable()
    for i in range(1000):
        table.bind((f"10.0.{i // 256}.{i % 256}", "app"), "a" if i % 200 == 0 else "b", 0.0)
    deleted = _no_scan(table)
    assert table.removeBackends(frozenset({"a", "nobody"})) == {"a": 5}
    assert sorted(deleted) == sorted(
        (f"10.0.{i // 256}.{i % 256}", "app") for i in (0, 200, 400, 600, 800)
    )
    assert table.removeBackend("nobody") == 0
    assert table.removeBackends(frozenset({"a"})) == {}
    assert len(deleted) == 5
    assert len(table) == 995
    assert table.lookup(("10.0.0.1", "app"), clock.seconds()) is not None
    assert table.lookup(("10.0.0.0", "app"), clock.seconds()) is None


def test_index_follows_every_removal():
    """
    A binding that leaves the table by LRU eviction, expiry on read,
    collection or C{remove} leaves the backend index too: a later
    C{removeBackend} counts only bindings still held, and the index keeps
    no entry for a backend without bindings.
    """
    table = BindingTable(ttl=10.0, max_size=3)
    table.bind(K1, "a", 0.0)
    table.bind(K2, "a", 1.0)
    table.bind(K3, "a", 2.0)
    table.bind(("10.0.0.4", "app"), "b", 3.0)  # evicts K1
    table._check_invariants()
    assert table.lookup(K2, 11.0) is None  # expired on read
    table._check_invariants()
    table.remove(K3)
    table._check_invariants()
    assert table.removeBackend("a") == 0
    assert table._by_backend.keys() == {"b"}
    assert table.collect(100.0) == 1
    table._check_invariants()
    assert table._by_backend == {}
    assert table.removeBackend("b") == 0


def test_check_invariants_detects_drift():
    """
    C{_check_invariants} (the helper of the stateful test) notices an index
    that has drifted from the table, so the stateful test can fail.
    """
    table = BindingTable()
    table.bind(K1, "a", 0.0)
    table._check_invariants()
    del table._by_backend["a"]
    with pytest.raises(AssertionError):
        table._check_invariants()
    table = BindingTable()
    table.bind(K1, "a", 0.0)
    table._by_backend["a"][K2] = None
    with pytest.raises(AssertionError):
        table._check_invariants()


# --------------------------------------------------------------------------
# A stateful comparison against a simple model: a plain dict of key ->
# [backend id, created, last seen, use tick], the least recently used being
# the smallest tick, and everything expired being collected at once (the
# clock never goes backwards).

TTL = 10.0
IPS = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "2001:db8::/64", "2001:db8:0:1::/64", "192.0.2.9"]
APPS = ["app", None]
BACKENDS = ["a", "b", "c"]
keys = st.tuples(st.sampled_from(IPS), st.sampled_from(APPS))
backend_ids = st.sampled_from(BACKENDS)


class BindingTableMachine(RuleBasedStateMachine):
    """
    L{BindingTable} against the model through bind, lookup, peek, remove,
    removeBackend(s), collect, time passing and eviction at a small size.
    """

    created = Bundle("created")

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.tick = 0
        self.model: dict[BindingKey, list] = {}
        self.table = BindingTable(ttl=TTL, max_size=3)

    @initialize(max_size=st.integers(1, 5))
    def sized(self, max_size):
        self.table = BindingTable(ttl=TTL, max_size=max_size)

    def _use(self, key) -> None:
        self.tick += 1
        self.model[key][2] = self.now
        self.model[key][3] = self.tick

    def _model_lookup(self, key) -> list | None:
        entry = self.model.get(key)
        if entry is None:
            return None
        if self.now - entry[2] >= TTL:
            del self.model[key]
            return None
        self._use(key)
        return entry

    def _agrees(self, binding: Binding | None, entry: list | None) -> None:
        if entry is None:
            assert binding is None
        else:
            assert binding is not None
            assert (binding.backend_id, binding.created, binding.last_seen) == tuple(entry[:3])

    @rule(dt=st.sampled_from([0.0, 1.0, 2.5, 9.0, TTL, 15.0]))
    def advance(self, dt):
        self.now += dt

    @rule(target=created, key=keys, backend_id=backend_ids)
    def bind(self, key, backend_id):
        entry = self._model_lookup(key)
        if entry is None:
            if len(self.model) >= self.table.max_size:
                del self.model[min(self.model, key=lambda k: self.model[k][3])]
            self.model[key] = [backend_id, self.now, self.now, 0]
            self._use(key)
            entry = self.model[key]
        self._agrees(self.table.bind(key, backend_id, self.now), entry)
        return key

    @rule(key=st.one_of(created, keys))
    def lookup(self, key):
        self._agrees(self.table.lookup(key, self.now), self._model_lookup(key))

    @rule(key=st.one_of(created, keys))
    def peek(self, key):
        entry = self.model.get(key)
        if entry is not None and self.now - entry[2] >= TTL:
            entry = None
        self._agrees(self.table.peek(key, self.now), entry)

    @rule(key=st.one_of(created, keys))
    def remove(self, key):
        self.model.pop(key, None)
        self.table.remove(key)

    @rule(ids=st.frozensets(st.sampled_from([*BACKENDS, "zzz"])))
    def remove_backends(self, ids):
        expected: dict[str, int] = {}
        for key, entry in list(self.model.items()):
            if entry[0] in ids:
                del self.model[key]
                expected[entry[0]] = expected.get(entry[0], 0) + 1
        assert self.table.removeBackends(ids) == expected

    @rule(backend_id=backend_ids)
    def remove_backend(self, backend_id):
        doomed = [k for k, e in self.model.items() if e[0] == backend_id]
        for key in doomed:
            del self.model[key]
        assert self.table.removeBackend(backend_id) == len(doomed)

    @rule()
    def collect(self):
        doomed = [k for k, e in self.model.items() if self.now - e[2] >= TTL]
        for key in doomed:
            del self.model[key]
        assert self.table.collect(self.now) == len(doomed)

    @precondition(lambda self: self.model)
    @rule()
    def lru_order(self):
        order = sorted(self.model, key=lambda k: self.model[k][3])
        assert list(OrderedDict(self.table._bindings)) == order

    @invariant()
    def consistent(self):
        self.table._check_invariants()
        assert len(self.table) == len(self.model) <= self.table.max_size


TestBindingTableMachine = BindingTableMachine.TestCase
TestBindingTableMachine.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)


# --------------------------------------------------------------------------
# client_key: what the binding table is keyed by.

v4 = st.ip_addresses(v=4)
v6: st.SearchStrategy[ipaddress.IPv6Address] = (
    st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address).filter(lambda a: a.ipv4_mapped is None)
)
prefixes = st.integers(0, 128)


@given(v4, prefixes)
def test_client_key_ipv4_identity(address, prefix):
    """
    An IPv4 address is its own key, whatever the IPv6 prefix.
    """
    assert client_key(str(address), prefix) == str(address)
    assert client_key(str(address)) == str(address)


@given(v4, prefixes)
@example(ipaddress.IPv4Address("1.2.3.4"), 64)
def test_client_key_unwraps_mapped(address, prefix):
    """
    An IPv4-mapped IPv6 address, in dotted or hex form and any case, is
    keyed as the IPv4 address it carries, whatever the prefix.
    """
    mapped = ipaddress.IPv6Address(f"::ffff:{address}")
    assert client_key(f"::ffff:{address}", prefix) == str(address)
    assert client_key(mapped.exploded.upper(), prefix) == str(address)


def test_client_key_examples():
    """
    IPv6 clients are keyed by their /64 written as a network, 128 keeps the
    whole (normalised) address, and 0 puts every IPv6 client in one key.
    """
    assert client_key("2001:db8:1:2:aaaa:bbbb:cccc:dddd") == "2001:db8:1:2::/64"
    assert client_key("2001:DB8:1:2::1") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:2:aaaa::1", 48) == "2001:db8:1::/48"
    assert client_key("2001:0db8:0000::0001", 128) == "2001:db8::1"
    assert client_key("2001:db8::1", 0) == "::/0"
    assert client_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert client_key("::1") == "::/64"
    assert client_key("fe80::1%eth0") == "fe80::/64"
    assert client_key("10.0.0.1") == "10.0.0.1"


@given(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))
def test_client_key_same_slash64(high, low1, low2):
    """
    Two IPv6 addresses in the same /64 have the same key, written in any
    form, and the key is a network holding both.
    """
    a = ipaddress.IPv6Address(high << 64 | low1)
    b = ipaddress.IPv6Address(high << 64 | low2)
    assume(a.ipv4_mapped is None and b.ipv4_mapped is None)
    key = client_key(str(a))
    assert key == client_key(b.exploded) == client_key(str(b).upper())
    assert key.endswith("/64")
    assert a in ipaddress.IPv6Network(key) and b in ipaddress.IPv6Network(key)


@given(v6, prefixes, st.integers(0, 127), st.integers(0, 2**128 - 1))
def test_client_key_prefix_separates(a, prefix, bit, noise):
    """
    For any prefix, flipping one bit of an IPv6 address changes its key
    exactly when the bit is among the prefix's leading bits; changing any
    bits after the prefix never does.
    """
    b = ipaddress.IPv6Address(int(a) ^ (1 << (127 - bit)))
    assume(b.ipv4_mapped is None)
    key = client_key(str(a), prefix)
    assert (client_key(str(b), prefix) == key) == (bit >= prefix)
    low = (1 << (128 - prefix)) - 1
    c = ipaddress.IPv6Address(int(a) & ~low | noise & low)
    assume(c.ipv4_mapped is None)
    assert client_key(str(c), prefix) == key


def _reference_key(text: str, prefix: int) -> str:
    """
    The key of SPEC section 4 written the slow, obvious way.
    """
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return text
    if isinstance(address, ipaddress.IPv4Address):
        return str(address)
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    whole = ipaddress.IPv6Address(int(address))  # without any scope id
    if prefix == 128:
        return str(whole)
    return str(ipaddress.IPv6Network(f"{whole}/{prefix}", strict=False))


@given(
    st.one_of(
        st.text(alphabet="0123456789abcdefABCDEFg:.%/ ", max_size=45),
        st.ip_addresses().map(str),
        st.ip_addresses(v=6).map(lambda a: a.exploded + "%eth0"),
    ),
    prefixes,
)
@example("::ffff:1.2.3", 64)
@example("2001:db8::1::2", 64)
@example("", 64)
@example("1.2.3.4:5", 64)
@example("::102:304", 128)
@example("::ffff:0:102:304", 128)
@example("::1.2.3.4", 112)
@example("fe80::1%", 64)
@example("fe80::1%a%b", 64)
@example("fe80::1%a/b", 64)
@example("::ffff:1.2.3.4%eth0", 64)
@example("::\x00", 64)
@example("::\uff11", 64)
def test_client_key_matches_reference(text, prefix):
    """
    Any text gets the key the reference gives: unparsable text comes back
    unchanged (never an error), addresses as in SPEC section 4.
    """
    assert client_key(text, prefix) == _reference_key(text, prefix)


@pytest.mark.parametrize("prefix", [-1, 129, 1000])
@pytest.mark.parametrize("ip", ["10.0.0.1", "2001:db8::1", "junk"])
def test_client_key_rejects_bad_prefix(ip, prefix):
    """
    A prefix outside 0..128 is refused, for any address.
    """
    with pytest.raises(ValueError, match="prefix"):
        client_key(ip, prefix)
