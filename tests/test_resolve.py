"""
Tests for L{edgeproxy.net.resolve}: backend host names resolved in the
background and cached, so that the connect path never does DNS (issue 7,
defect 10).

Most tests run on a L{Clock} with a thread pool that runs its work only when
the test says so; the rest use the real reactor and its thread pool.
"""

from __future__ import annotations

import socket
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import pytest
import pytest_twisted
from faultkit import EventCollector
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.task import Clock, deferLater
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from edgeproxy.interfaces import IHostResolver
from edgeproxy.model import RoutingSnapshot
from edgeproxy.net.resolve import HostResolver, backend_hosts, is_ip_literal
from edgeproxy.testing import InMemoryBackendRepository, StaticHostResolver, backend

successResultOf = SynchronousTestCase().successResultOf  # noqa: N816

V4 = "192.0.2.10"
V6 = "2001:db8::10"

Answer = Union[List[Tuple[Any, ...]], BaseException, Callable[[], List[Tuple[Any, ...]]]]


def v4(address: str, socktype: int = socket.SOCK_STREAM) -> Tuple[Any, ...]:
    """
    A C{getaddrinfo} row for an IPv4 address.
    """
    return (socket.AF_INET, socktype, 6, "", (address, 0))


def v6(address: str, socktype: int = socket.SOCK_STREAM) -> Tuple[Any, ...]:
    """
    A C{getaddrinfo} row for an IPv6 address.
    """
    return (socket.AF_INET6, socktype, 6, "", (address, 0, 0, 0))


NXDOMAIN = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
SERVFAIL = socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")


class FakeDNS:
    """
    A fake C{getaddrinfo}: answers from a table (rows, an exception to
    raise, or a callable giving the rows), counts and records calls.  A name
    not in the table is NXDOMAIN.
    """

    def __init__(self, answers: Optional[Dict[str, Answer]] = None) -> None:
        self.answers: Dict[str, Answer] = dict(answers or {})
        self.calls: List[Tuple[Any, ...]] = []

    def __call__(self, host: str, port: Any, family: int, socktype: int) -> List[Tuple[Any, ...]]:
        self.calls.append((host, port, family, socktype))
        answer = self.answers.get(host, NXDOMAIN)
        if isinstance(answer, BaseException):
            raise answer
        if callable(answer):
            return answer()
        return list(answer)

    def hosts(self) -> List[str]:
        return [call[0] for call in self.calls]


class ManualThreadPool:
    """
    Stands for the reactor's thread pool: work waits in C{queue} until the
    test runs it.
    """

    def __init__(self) -> None:
        self.queue: List[Tuple[Callable[..., None], Callable[..., Any], Tuple[Any, ...]]] = []

    def callInThreadWithCallback(
        self, onResult: Callable[..., None], func: Callable[..., Any], *args: Any
    ) -> None:
        self.queue.append((onResult, func, args))

    def runOne(self) -> None:
        on_result, func, args = self.queue.pop(0)
        try:
            result = func(*args)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)

    def runAll(self) -> None:
        while self.queue:
            self.runOne()


class ThreadedClock(Clock):
    """
    A L{Clock} that also provides what L{deferToThreadPool} needs, with a
    L{ManualThreadPool}.
    """

    def __init__(self) -> None:
        super().__init__()
        self.pool = ManualThreadPool()

    def getThreadPool(self) -> ManualThreadPool:
        return self.pool

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)


def make(answers: Optional[Dict[str, Answer]] = None, **kwargs: Any):
    """
    A L{HostResolver} on a L{ThreadedClock} and a L{FakeDNS}.
    """
    clock = ThreadedClock()
    dns = FakeDNS(answers)
    return HostResolver(clock, getaddrinfo=dns, **kwargs), clock, dns


@pytest.fixture
def events():
    """
    Log events of L{edgeproxy.net.resolve} emitted during the test.
    """
    collector = EventCollector("edgeproxy.net.resolve")
    globalLogPublisher.addObserver(collector)
    yield collector.events
    globalLogPublisher.removeObserver(collector)


def texts(events: List[Dict[str, Any]], level: LogLevel | None = None) -> List[str]:
    return [formatEvent(e) for e in events if level is None or e["log_level"] is level]


def snapshot(*hosts: str, deleted: Sequence[str] = ()) -> RoutingSnapshot:
    """
    A routing snapshot with one backend per host (and deleted ones).
    """
    rows = [backend(f"b{i}", host=h) for i, h in enumerate(hosts)]
    rows += [backend(f"d{i}", host=h, deleted=True) for i, h in enumerate(deleted)]
    return RoutingSnapshot.build(rows)


# --- the port -------------------------------------------------------------------


def test_verifyObject() -> None:
    """
    L{HostResolver} and L{StaticHostResolver} provide L{IHostResolver}.
    """
    resolver, _, _ = make()
    assert verifyObject(IHostResolver, resolver)
    assert verifyObject(IHostResolver, StaticHostResolver({"a.example": [V4]}))


def test_static_resolver() -> None:
    """
    L{StaticHostResolver} answers names from its table (in order), IP
    literals as themselves, other names with C{None}; C{set} changes the
    table.
    """
    static = StaticHostResolver({"a.example": [V6, V4]})
    assert static.addresses("a.example") == (V6, V4)
    assert static.addresses("198.51.100.1") == ("198.51.100.1",)
    assert static.addresses("::1") == ("::1",)
    assert static.addresses("b.example") is None
    static.set("b.example", [V4])
    static.set("a.example", None)
    assert static.addresses("b.example") == (V4,)
    assert static.addresses("a.example") is None
    assert successResultOf(static.resolve(["b.example"])) is None
    assert static.resolved == ["b.example"]
    static.routingTableChanged(RoutingSnapshot.empty(), snapshot("b.example", deleted=["x"]))
    assert static.watched == {"b.example"}
    static.refresh()
    assert len(static) == 1
    assert static.stats()["hosts"] == 1


@given(address=st.ip_addresses())
def test_ip_literals_stand_for_themselves(address: Any) -> None:
    """
    Any IPv4 or IPv6 address in text form is its own only address, in both
    implementations, without a lookup.
    """
    text = str(address)
    resolver, clock, dns = make()
    assert is_ip_literal(text)
    assert resolver.addresses(text) == (text,)
    assert StaticHostResolver({}).addresses(text) == (text,)
    assert dns.calls == [] and clock.pool.queue == []


@given(
    name=st.from_regex(r"\A[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,20}){0,3}\Z"),
)
def test_names_are_not_literals(name: str) -> None:
    """
    Host names (and bracketed IPv6) are not IP literals.
    """
    assert not is_ip_literal(name)
    assert not is_ip_literal(f"[{V6}]")


def test_ip_literals_never_call_getaddrinfo() -> None:
    """
    IP literals, IPv4 and IPv6, are answered at once by every entry point
    and never reach C{getaddrinfo} or the thread pool.
    """
    resolver, clock, dns = make()
    literals = [V4, V6, "::1", "fe80::1%1"]
    resolver.watch(literals)
    assert successResultOf(resolver.resolve(literals)) is None
    assert resolver.resolveBlocking(literals) == 0
    resolver.routingTableChanged(RoutingSnapshot.empty(), snapshot(*literals))
    clock.advance(3600)
    resolver.refresh()
    for literal in literals:
        assert resolver.addresses(literal) == (literal,)
    assert resolver.addresses("203.0.113.7") == ("203.0.113.7",)
    assert dns.calls == []
    assert clock.pool.queue == []
    assert resolver.stats()["literals"] == 5


# --- resolving --------------------------------------------------------------------


def test_name_resolves_to_both_families() -> None:
    """
    A name gets every IPv6 and IPv4 address of C{getaddrinfo(host, None,
    AF_UNSPEC, SOCK_STREAM)}, in its order, without duplicates.
    """
    resolver, clock, dns = make({"a.example": [v6(V6), v4(V4), v6(V6), v4("192.0.2.11"), v4(V4)]})
    d = resolver.resolve(["a.example"])
    assert dns.calls == []  # nothing on the caller's thread
    clock.pool.runAll()
    assert successResultOf(d) is None
    assert dns.calls == [("a.example", None, socket.AF_UNSPEC, socket.SOCK_STREAM)]
    assert resolver.addresses("a.example") == (V6, V4, "192.0.2.11")
    assert resolver.stats()["resolved"] == 1


def test_other_families_are_ignored() -> None:
    """
    Rows that are neither IPv4 nor IPv6 are skipped; an answer with none
    left is a failure ("no address"), so the name has no addresses.
    """
    resolver, clock, _ = make(
        {
            "mixed.example": [(socket.AF_UNIX, socket.SOCK_STREAM, 0, "", "/x"), v4(V4)],
            "none.example": [(socket.AF_UNIX, socket.SOCK_STREAM, 0, "", "/x")],
        }
    )
    resolver.resolve(["mixed.example", "none.example"])
    clock.pool.runAll()
    assert resolver.addresses("mixed.example") == (V4,)
    assert resolver.addresses("none.example") is None
    assert resolver.stats()["failing"] == 1


def test_unresolved_name_starts_one_lookup() -> None:
    """
    Asking for an unresolved name answers C{None} at once and starts one
    background lookup, however many times it is asked while that lookup is
    in flight; afterwards the name is answered from the cache.
    """
    resolver, clock, dns = make({"a.example": [v4(V4)]})
    for _ in range(100):
        assert resolver.addresses("a.example") is None
    assert len(clock.pool.queue) == 1
    clock.pool.runAll()
    for _ in range(100):
        assert resolver.addresses("a.example") == (V4,)
    assert dns.hosts() == ["a.example"]


def test_failing_name_is_not_looked_up_per_connection() -> None:
    """
    A name whose lookup failed is not looked up again by every
    C{addresses} call: only once C{retry} seconds have gone.
    """
    resolver, clock, dns = make({}, retry=5.0)
    assert resolver.addresses("gone.example") is None
    clock.pool.runAll()
    for _ in range(100):
        assert resolver.addresses("gone.example") is None
    assert clock.pool.queue == []
    clock.advance(5)
    assert resolver.addresses("gone.example") is None
    clock.pool.runAll()
    assert dns.hosts() == ["gone.example"] * 2


def test_resolve_coalesces_and_never_fails() -> None:
    """
    C{resolve} of a name already in flight does not look it up again; every
    caller's L{Deferred} fires with C{None} when the lookup ends, whether it
    succeeded or failed.
    """
    resolver, clock, dns = make({"a.example": [v4(V4)], "bad.example": SERVFAIL})
    first = resolver.resolve(["a.example", "bad.example", "a.example"])
    second = resolver.resolve(["bad.example", "a.example"])
    assert resolver.addresses("a.example") is None
    assert len(clock.pool.queue) == 2
    clock.pool.runAll()
    assert successResultOf(first) is None
    assert successResultOf(second) is None
    assert sorted(dns.hosts()) == ["a.example", "bad.example"]


def test_concurrency_is_bounded() -> None:
    """
    No more than C{concurrency} lookups are in the thread pool at once; the
    others start as earlier ones end.
    """
    resolver, clock, dns = make({f"n{i}.example": [v4(V4)] for i in range(10)}, concurrency=4)
    d = resolver.resolve(f"n{i}.example" for i in range(10))
    assert len(clock.pool.queue) == 4
    assert resolver.stats()["in_flight"] == 10
    clock.pool.runOne()
    assert len(clock.pool.queue) == 4
    clock.pool.runAll()
    assert successResultOf(d) is None
    assert len(dns.calls) == 10
    assert resolver.stats()["in_flight"] == 0


def test_unexpected_exception_is_a_failure(events) -> None:
    """
    Whatever C{getaddrinfo} raises (here C{UnicodeError}, as for a name IDNA
    refuses) fails that name only, with its reason in the log.
    """
    resolver, clock, _ = make({"a..b": UnicodeError("label empty or too long")})
    d = resolver.resolve(["a..b"])
    clock.pool.runAll()
    assert successResultOf(d) is None
    assert resolver.addresses("a..b") is None
    [warning] = texts(events, LogLevel.warn)
    assert "a..b" in warning and "UnicodeError: label empty or too long" in warning


def test_thread_pool_trouble_never_raises(events) -> None:
    """
    A reactor that cannot give a thread pool fails the lookups, which are
    logged; C{refresh}, C{watch}, C{resolve} and C{addresses} still return
    normally.
    """

    class Broken(ThreadedClock):
        def getThreadPool(self) -> ManualThreadPool:
            raise RuntimeError("no threads")

    dns = FakeDNS({"a.example": [v4(V4)]})
    resolver = HostResolver(Broken(), getaddrinfo=dns)
    resolver.watch(["a.example"])
    resolver.refresh()
    assert successResultOf(resolver.resolve(["a.example"])) is None
    assert resolver.addresses("a.example") is None
    assert dns.calls == []
    assert resolver.stats()["failing"] == 1
    assert any("RuntimeError: no threads" in t for t in texts(events, LogLevel.warn))


# --- failures and the TTL -------------------------------------------------------------


def test_failure_keeps_last_good_addresses_and_logs_once(events) -> None:
    """
    A failed refresh keeps the last good addresses; the failure is logged
    once (with the reason and the addresses kept), not again while it keeps
    failing the same way, again when the reason changes, and the recovery
    is logged once.
    """
    resolver, clock, dns = make({"a.example": [v4(V4)]}, ttl=30.0, retry=5.0)
    resolver.resolve(["a.example"])
    clock.pool.runAll()
    assert texts(events, LogLevel.info) == [f"host a.example resolves to {V4}"]

    dns.answers["a.example"] = SERVFAIL
    for _ in range(5):
        clock.advance(30)
        resolver.refresh()
        clock.pool.runAll()
        assert resolver.addresses("a.example") == (V4,)
    assert len(dns.calls) == 6
    [warning] = texts(events, LogLevel.warn)
    assert "Temporary failure in name resolution" in warning
    assert f"keeping its last good addresses {V4}" in warning

    dns.answers["a.example"] = NXDOMAIN
    clock.advance(30)
    resolver.refresh()
    clock.pool.runAll()
    assert resolver.addresses("a.example") == (V4,)
    assert len(texts(events, LogLevel.warn)) == 2
    assert "Name or service not known" in texts(events, LogLevel.warn)[1]

    dns.answers["a.example"] = [v6(V6)]
    clock.advance(30)
    resolver.refresh()
    clock.pool.runAll()
    assert resolver.addresses("a.example") == (V6,)
    assert texts(events, LogLevel.info)[1:] == [f"host a.example resolves again, to {V6}"]
    assert len(texts(events, LogLevel.warn)) == 2


def test_never_resolved_name_stays_none(events) -> None:
    """
    A name that never resolved has no addresses; it is retried by
    C{refresh} every C{retry} seconds and its failure logged once.
    """
    resolver, clock, dns = make({}, retry=5.0)
    resolver.watch(["gone.example"])
    for _ in range(4):
        clock.pool.runAll()
        assert resolver.addresses("gone.example") is None
        clock.advance(5)
        resolver.refresh()
    assert dns.hosts() == ["gone.example"] * 4
    [warning] = texts(events, LogLevel.warn)
    assert "gone.example" in warning and "has no addresses" in warning
    assert resolver.stats()["unresolved"] == 1


def test_stale_limit_drops_old_addresses(events) -> None:
    """
    With a stale limit, the last good addresses of a name that keeps
    failing are dropped once older than the limit (and that is logged).
    """
    resolver, clock, dns = make({"a.example": [v4(V4)]}, ttl=30.0, stale=100.0)
    resolver.resolve(["a.example"])
    clock.pool.runAll()
    dns.answers["a.example"] = SERVFAIL
    for _ in range(3):
        clock.advance(30)
        resolver.refresh()
        clock.pool.runAll()
        assert resolver.addresses("a.example") == (V4,)
    clock.advance(30)
    resolver.refresh()
    clock.pool.runAll()
    assert resolver.addresses("a.example") is None
    warnings = texts(events, LogLevel.warn)
    assert len(warnings) == 2
    assert "older than 100.0 s and are dropped" in warnings[1]


def test_ttl_refresh() -> None:
    """
    C{refresh} looks a name up again only once its addresses are older than
    the TTL; the old addresses serve while the new lookup is in flight, then
    the new ones replace them.  Refreshing twice meanwhile does not start a
    second lookup.
    """
    resolver, clock, dns = make({"a.example": [v4(V4)]}, ttl=30.0)
    resolver.resolve(["a.example"])
    clock.pool.runAll()
    clock.advance(29)
    resolver.refresh()
    assert clock.pool.queue == []
    clock.advance(1)
    dns.answers["a.example"] = [v4("192.0.2.99")]
    resolver.refresh()
    resolver.refresh()
    assert len(clock.pool.queue) == 1
    assert resolver.addresses("a.example") == (V4,)
    clock.pool.runAll()
    assert resolver.addresses("a.example") == ("192.0.2.99",)
    assert len(dns.calls) == 2


# --- following the routing table ---------------------------------------------------------


def test_routing_table_changed_resolves_new_names_and_forgets_old() -> None:
    """
    A routing table change resolves the host names of backends that appear
    (not deleted ones, not IP literals), only starting background work, and
    forgets hosts no backend uses any more.
    """
    resolver, clock, dns = make({"a.example": [v4(V4)], "b.example": [v6(V6)]})
    repo = InMemoryBackendRepository()
    repo.addListener(resolver.routingTableChanged)
    repo.set(snapshot("a.example", "b.example", V4, deleted=["c.example"]).backends)
    assert dns.calls == []
    assert len(clock.pool.queue) == 2
    clock.pool.runAll()
    assert resolver.addresses("a.example") == (V4,)
    assert resolver.addresses("b.example") == (V6,)
    assert len(resolver) == 3

    repo.set(snapshot("a.example").backends)
    assert clock.pool.queue == []  # a.example is kept, not looked up again
    assert len(resolver) == 1
    assert resolver.stats()["names"] == 1


def test_forgotten_name_lookup_result_is_dropped() -> None:
    """
    A name forgotten while its lookup is in flight is not brought back when
    the lookup ends: memory stays bounded by the routing table.
    """
    resolver, clock, _ = make({"a.example": [v4(V4)]})
    resolver.watch(["a.example"])
    resolver.watch([])
    clock.pool.runAll()
    assert len(resolver) == 0
    assert resolver.stats()["resolved"] == 0


def test_backend_hosts() -> None:
    """
    C{backend_hosts} is the set of hosts of the backends that are not
    deleted, unhealthy and draining ones included.
    """
    rows = [
        backend("a", host="a.example"),
        backend("b", host="b.example", healthy=False),
        backend("c", host="c.example", draining=True),
        backend("d", host="d.example", deleted=True),
        backend("e", host="a.example"),
    ]
    assert backend_hosts(RoutingSnapshot.build(rows)) == {"a.example", "b.example", "c.example"}


# --- startup --------------------------------------------------------------------------------


def test_resolve_blocking() -> None:
    """
    C{resolveBlocking} resolves names on the calling thread and says how
    many have addresses; once its budget has gone, the names left go to the
    background instead.
    """
    clock = ThreadedClock()

    def slow(address: str) -> Callable[[], List[Tuple[Any, ...]]]:
        def answer() -> List[Tuple[Any, ...]]:
            clock.advance(4)
            return [v4(address)]

        return answer

    dns = FakeDNS({f"n{i}.example": slow(f"192.0.2.{i}") for i in range(5)})
    resolver = HostResolver(clock, getaddrinfo=dns)
    names = [f"n{i}.example" for i in range(5)] + ["gone.example"]
    assert resolver.resolveBlocking(names, budget=10.0) == 3
    assert dns.hosts() == ["n0.example", "n1.example", "n2.example"]
    assert resolver.addresses("n2.example") == ("192.0.2.2",)
    assert resolver.addresses("n3.example") is None
    assert len(clock.pool.queue) == 3
    clock.pool.runAll()
    assert resolver.addresses("n4.example") == ("192.0.2.4",)
    assert resolver.addresses("gone.example") is None


def test_invalid_settings() -> None:
    """
    A TTL, retry or stale limit that is not positive, or a concurrency
    below 1, is refused.
    """
    settings: List[Dict[str, Any]] = [{"ttl": 0}, {"retry": -1}, {"stale": 0}, {"concurrency": 0}]
    for kwargs in settings:
        with pytest.raises(ValueError):
            HostResolver(ThreadedClock(), **kwargs)


# --- the real reactor ------------------------------------------------------------------------


class BlockingDNS:
    """
    A C{getaddrinfo} that blocks on an event (30 s at most), then answers.
    """

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Event()
        self.finished = threading.Event()
        self.threads: List[int] = []

    def __call__(self, host: str, port: Any, family: int, socktype: int) -> List[Tuple[Any, ...]]:
        self.threads.append(threading.get_ident())
        self.started.set()
        self.release.wait(30)
        self.finished.set()
        return [v6(V6), v4(V4)]


@pytest_twisted.inlineCallbacks
def test_slow_lookup_does_not_block_the_reactor():
    """
    A lookup that blocks does not delay C{routingTableChanged} (it returns
    while the lookup has not finished), runs off the reactor thread, and
    leaves the reactor running timers and answering C{addresses} meanwhile.
    """
    dns = BlockingDNS()
    resolver = HostResolver(reactor, getaddrinfo=dns)
    try:
        resolver.routingTableChanged(RoutingSnapshot.empty(), snapshot("slow.example"))
        assert not dns.finished.is_set()
        yield deferLater(reactor, 0.05, lambda: None)
        assert dns.started.wait(10)
        assert not dns.finished.is_set()
        assert resolver.addresses("slow.example") is None
        assert dns.threads and dns.threads[0] != threading.get_ident()
        done = resolver.resolve(["slow.example"])
        dns.release.set()
        yield done
        assert resolver.addresses("slow.example") == (V6, V4)
        assert len(dns.threads) == 1
    finally:
        dns.release.set()


@pytest_twisted.inlineCallbacks
def test_real_localhost():
    """
    The real C{getaddrinfo} resolves C{localhost} to 127.0.0.1 and/or ::1.
    """
    resolver = HostResolver(reactor)
    yield resolver.resolve(["localhost"])
    found = resolver.addresses("localhost")
    assert found
    assert set(found) <= {"127.0.0.1", "::1"}


@pytest_twisted.inlineCallbacks
def test_proxy_reaches_an_ipv6_only_name_on_real_sockets():
    """
    Defect 10 of issue 7, end to end on loopback: a backend whose host name
    has only an IPv6 address (here ::1) is reached through the proxy, the
    name is looked up once for many connections, and never on the connect
    path (Twisted's own lookup, IPv4 only, would fail it).
    """
    from faultkit import BackendFactory, Client, Echo, ProxyHarness, connect, wait_until

    from edgeproxy.config import ProxySettings
    from edgeproxy.testing import backend as make_backend

    calls: list[str] = []

    def getaddrinfo(host: str, port: Any, family: int = 0, type: int = 0, *a: Any) -> Any:
        calls.append(host)
        assert host == "v6only.test"
        return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", 0, 0, 0))]

    echo_factory = BackendFactory(reactor, Echo)
    port = reactor.listenTCP(0, echo_factory, interface="::1")
    h = ProxyHarness(
        reactor,
        [make_backend("v6", host="v6only.test", port=port.getHost().port)],  # type: ignore[attr-defined]
        ProxySettings(connect_timeout=2.0),
    )
    resolver = HostResolver(reactor, getaddrinfo=getaddrinfo)
    assert resolver.resolveBlocking(["v6only.test"]) == 1
    h.factory.resolver = resolver
    try:
        for i in range(5):
            client = yield connect(reactor, h.port, Client(reactor))
            client.send(b"ping%d" % i)
            data = yield client.wait_for(5)
            assert data == b"ping%d" % i
            client.transport.loseConnection()
            yield client.wait_closed()
        assert calls == ["v6only.test"]
        yield wait_until(reactor, h.idle)
        assert h.logs.failures() == []
    finally:
        yield h.stop([])
        yield port.stopListening()


def test_names_never_resolve_to_metadata_or_link_local_addresses():
    """
    Issue 9 (F11's metadata rule, by name): a host name whose addresses
    include a cloud metadata or link-local address keeps only the others;
    one that resolves only to such addresses has no address (its backend is
    never connected to), whoever registered it.
    """
    from edgeproxy.net.resolve import NoAddressError, _lookup

    def fake(addresses):
        def getaddrinfo(host, port, family=0, type=0, *a):
            return [
                (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, 0))
                for a in addresses
            ]

        return getaddrinfo

    assert _lookup(fake(["169.254.169.254", "10.0.0.7"]), "mixed.test") == ("10.0.0.7",)
    for only in (["169.254.169.254"], ["fe80::1"], ["100.100.100.200"], ["::ffff:169.254.169.254"]):
        with pytest.raises(NoAddressError, match="metadata"):
            _lookup(fake(only), "evil.test")
