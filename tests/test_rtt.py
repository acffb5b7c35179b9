"""
Tests for RTT-aware closeness inside a geo tier (issue 13, part 2): the
health checks' connect RTT estimate (L{edgeproxy.net.health.RttEstimate}),
the RTT term the router weighs (C{--rtt-weight}), and where it is shown
(explain, the status page, C{/metrics}).

The checker and the real L{edgeproxy.net.health.Prober} run on a
L{MemoryReactorClock} whose connects complete after a delay chosen per
backend; one test runs on real loopback sockets, where one backend's
connects are delayed by a full accept queue (its SYNs are dropped until the
test makes room, so the client's SYN retransmission, one second later by
TCP's initial retransmission timeout, gets in).  The selection properties
(tier dominance, weight 0 equals the scoring without RTT) are in
C{tests/test_selection.py}.
"""

from __future__ import annotations

import random
import socket
import sys
from collections import Counter
from typing import Any, Dict, Iterator, List, Mapping, Sequence, Union

import pytest
import pytest_twisted
from faultkit import LOCALHOST, Echo, ProxyHarness, listen, wait_until
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport

from edgeproxy.config import ProxySettings
from edgeproxy.control.metrics import EdgeproxyCollector, metrics_registry
from edgeproxy.control.status import StatusData, status_page
from edgeproxy.model import Backend, RoutingSnapshot
from edgeproxy.net.health import RTT_ALPHA, RTT_WINDOW, HealthChecker, Prober, RttEstimate
from edgeproxy.routing.router import Router
from edgeproxy.testing import (
    BindingTable,
    InMemoryBackendRepository,
    LoadTable,
    MetricsStore,
    StateOverlay,
    backend,
)

REACTOR: Any = reactor

# --- the estimate -------------------------------------------------------------

_samples = st.floats(0.0, 5.0, allow_nan=False)


@given(st.lists(_samples, min_size=1, max_size=40))
def test_estimate_stays_within_the_samples(samples: List[float]) -> None:
    """
    The estimate is never below the smallest sample taken or above the
    largest (a median and a weighted mean of medians).
    """
    estimate = RttEstimate()
    for s in samples:
        estimate.add(s)
    assert estimate.value is not None
    assert min(samples) - 1e-12 <= estimate.value <= max(samples) + 1e-12


@given(
    st.floats(0.0001, 0.5),
    st.integers(0, 30),
    st.integers(0, 30),
    st.floats(0.0, 100.0),
)
def test_one_slow_probe_does_not_move_a_steady_estimate(
    rtt: float, before: int, after: int, extra: float
) -> None:
    """
    In a steady stream of connect times, one slower sample of any size,
    anywhere (first, last, in the middle), leaves the estimate exactly
    where the steady stream puts it (from the second sample on).  Connect
    times only err upwards: a connect cannot beat the path's RTT.
    """
    spike = rtt + extra
    estimate = RttEstimate()
    for s in [rtt] * before + [spike] + [rtt] * after:
        value = estimate.add(s)
        if estimate.count > 1:
            assert value == pytest.approx(rtt)
    if before + after:
        assert estimate.value == pytest.approx(rtt)


@given(
    st.lists(st.floats(0.010, 0.020), min_size=RTT_WINDOW, max_size=30),
    st.integers(0, 29),
    st.floats(0.010, 100.0),
)
def test_one_outlier_in_a_noisy_stream_stays_in_its_range(
    noisy: List[float], at: int, outlier: float
) -> None:
    """
    In a stream of connect times between 10 and 20 ms, one slow outlier of
    any size keeps the estimate between 10 and 20 ms from the first normal
    sample on: with two samples the estimate is the smaller, and the median
    of three always lies between two normal ones.
    """
    at = min(at, len(noisy))
    samples = [*noisy[:at], outlier, *noisy[at:]]
    estimate = RttEstimate()
    for i, s in enumerate(samples):
        value = estimate.add(s)
        if i or at:
            assert 0.010 - 1e-12 <= value <= 0.020 + 1e-12, (samples, i)


def test_estimate_follows_a_real_change() -> None:
    """
    A lasting change (the backend moved) shows after two checks, and the
    average then closes in on it by 1 - alpha per check.
    """
    estimate = RttEstimate()
    for _ in range(5):
        estimate.add(0.010)
    estimate.add(0.050)
    assert estimate.value == pytest.approx(0.010)
    estimate.add(0.050)
    assert estimate.value == pytest.approx(RTT_ALPHA * 0.050 + (1 - RTT_ALPHA) * 0.010)
    for _ in range(20):
        estimate.add(0.050)
    assert estimate.value == pytest.approx(0.050, abs=1e-4)


def test_one_slow_first_probe_is_not_carried() -> None:
    """
    A slow first check is the estimate only until the second: with two
    samples the estimate is the smaller.
    """
    estimate = RttEstimate()
    assert estimate.add(1.0) == 1.0
    assert estimate.add(0.010) == 0.010
    # The window is full: the average starts from 10 ms with the median 12 ms.
    assert estimate.add(0.012) == pytest.approx(RTT_ALPHA * 0.012 + (1 - RTT_ALPHA) * 0.010)


# --- the checker and the prober on a fake clock ----------------------------------

Delay = Union[float, Sequence[float]]


class DelayingReactor(MemoryReactorClock):
    """
    A memory reactor whose TCP connects complete after a delay on its own
    clock: C{delays[port]} seconds (a number, or a list taken one per
    connect, the last repeated).  A connect stopped meanwhile (a check
    cancelled on its timeout) never completes.
    """

    def __init__(self, delays: Dict[int, Delay]) -> None:
        super().__init__()
        self.delays = delays
        self.counts: Counter[int] = Counter()

    def connectTCP(  # type: ignore[override]
        self, host: str, port: int, factory: Any, timeout: float = 30, bindAddress: Any = None
    ) -> Any:
        connector = super().connectTCP(host, port, factory, timeout, bindAddress)
        delay = self.delays[port]
        if not isinstance(delay, (int, float)):
            delay = delay[min(self.counts[port], len(delay) - 1)]
        self.counts[port] += 1
        self.callLater(delay, self._complete, connector, host, port, factory)
        return connector

    def _complete(self, connector: Any, host: str, port: int, factory: Any) -> None:
        if connector.stoppedConnecting:
            return
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        protocol.makeConnection(StringTransport())


def run_until(clock: MemoryReactorClock, when: float) -> None:
    """
    Run every call of C{clock} due up to C{when}, in order, then stop there.
    """
    while True:
        due = [c.getTime() for c in clock.getDelayedCalls() if c.getTime() <= when]
        if not due:
            break
        clock.advance(max(0.0, min(due) - clock.seconds()))
    clock.advance(max(0.0, when - clock.seconds()))


def _table(*rows: Backend) -> InMemoryBackendRepository:
    return InMemoryBackendRepository(rows)


def _checked(
    delays: Dict[int, Delay], rows: Sequence[Backend], **options: Any
) -> tuple[HealthChecker, DelayingReactor]:
    clock = DelayingReactor(delays)
    options.setdefault("rng", random.Random(3))
    checker = HealthChecker(clock, StateOverlay(), interval=2.0, timeout=1.0, **options)
    checker.update(RoutingSnapshot.build(rows))
    checker.start()
    return checker, clock


def _router(
    repository: InMemoryBackendRepository, rtt: Mapping[str, float], weight: float, seed: int = 1
) -> Router:
    return Router(
        repository,
        BindingTable(),
        None,
        MetricsStore(),
        "sa",
        Clock(),
        random.Random(seed),
        rtt=rtt,
        rtt_weight=weight,
    )


def _shares(router: Router, n: int = 200, net: int = 10) -> Counter[str]:
    """
    Where C{n} new clients (from C{net}.0.0.0/8, without bindings) go, one
    after the other (each released before the next, so the load stays 0
    and only the score decides).
    """
    seen: Counter[str] = Counter()
    for i in range(n):
        chosen = router.choose(f"{net}.0.{i // 250}.{i % 250}", None)
        assert chosen is not None
        seen[chosen.id] += 1
        router.release(chosen.id)
    return seen


NEAR = backend("near", port=9001, soft_limit=100)
FAR = backend("far", port=9002, soft_limit=100)


def test_connect_rtt_on_a_fake_clock_sends_clients_to_the_nearer() -> None:
    """
    The real prober's TCP connects, timed on the checker's clock, give the
    RTT of each backend (5 ms and 40 ms here); with the RTT term the nearer
    of two equally loaded backends of a tier takes every new client, and
    with weight 0 they share them at random as before.
    """
    checker, clock = _checked({9001: 0.005, 9002: 0.040}, [NEAR, FAR])
    run_until(clock, 10.0)
    assert checker.rtt("near") == pytest.approx(0.005)
    assert checker.rtt("far") == pytest.approx(0.040)
    assert dict(checker.rtts) == {"near": checker.rtt("near"), "far": checker.rtt("far")}
    repository = _table(NEAR, FAR)
    assert _shares(_router(repository, checker.rtts, 0.01)) == {"near": 200}
    plain = _shares(_router(repository, checker.rtts, 0.0))
    assert set(plain) == {"near", "far"} and min(plain.values()) > 50


def test_rtt_term_gives_way_to_load() -> None:
    """
    The RTT term weighs against load: at 0.01 per ms, 35 ms of difference
    weigh as much as 35% of a soft limit of 100, so the far backend gets
    new clients once the near one has about 35 more open connections.
    """
    checker, clock = _checked({9001: 0.005, 9002: 0.040}, [NEAR, FAR])
    run_until(clock, 10.0)
    router = _router(_table(NEAR, FAR), checker.rtts, 0.01)
    held = [router.choose(f"10.1.0.{i}", None) for i in range(40)]
    ids = [b.id for b in held if b is not None]
    assert ids[:35] == ["near"] * 35
    assert "far" in ids[35:]


def test_one_slow_probe_does_not_flip_routing() -> None:
    """
    One slow connect (900 ms, within the 1 s check timeout) of the nearer
    backend leaves its RTT, and so the routing, where they were; a plain
    moving average would have made it the farther one for many checks.
    """
    near = [0.010] * 4 + [0.900] + [0.010] * 10
    checker, clock = _checked({9001: near, 9002: 0.020}, [NEAR, FAR])
    router = _router(_table(NEAR, FAR), checker.rtts, 0.01)
    for t in range(2, 30, 2):
        run_until(clock, float(t))
        if "near" in checker.rtts and "far" in checker.rtts:
            assert checker.rtt("near") == pytest.approx(0.010), t
            assert _shares(router, 20) == {"near": 20}, t
    assert clock.counts[9001] >= 6  # the slow probe was among them


def test_timed_out_check_is_no_sample() -> None:
    """
    A check whose connect outlasts the timeout fails and is no sample: the
    RTT keeps the value of the checks that passed.
    """
    checker, clock = _checked({9001: [0.010, 0.010, 1.5, 0.010]}, [NEAR], fall=10)
    run_until(clock, 4.5)
    assert checker.rtt("near") == pytest.approx(0.010)
    run_until(clock, 7.5)
    status = checker.status("near")
    assert status is not None and status.reason == "timeout after 1s"
    assert checker.rtt("near") == pytest.approx(0.010)


def test_unmeasured_backend_is_scored_as_the_tier_median_in_explain() -> None:
    """
    C{explain} shows each candidate's RTT in whole milliseconds, the term
    it adds, and whether it stood in as its tier's median; the scores are
    those the selection uses, best first.
    """
    new = backend("new", port=9003, soft_limit=100, health_check="off")
    other = backend("us-1", port=9004, soft_limit=100, country="US", region="us")
    checker, clock = _checked({9001: 0.005, 9002: 0.0404, 9004: 0.001}, [NEAR, FAR, new, other])
    run_until(clock, 10.0)
    assert "new" not in checker.rtts
    router = _router(_table(NEAR, FAR, new, other), checker.rtts, 0.01)
    why = router.explain("10.0.0.1", None)
    assert why["rtt_weight"] == 0.01
    rows = {c["id"]: c for c in why["candidates"]}
    assert [c["id"] for c in why["candidates"]] == ["near", "new", "far", "us-1"]
    assert (rows["near"]["rtt_ms"], rows["near"]["rtt_median"]) == (5.0, False)
    assert rows["near"]["rtt_term"] == pytest.approx(0.05)
    assert rows["far"]["rtt_ms"] == 40.0 and rows["far"]["rtt_term"] == pytest.approx(0.40)
    # The median of 5 and 40 ms in tier 2 (the local region "sa").
    assert (rows["new"]["rtt_ms"], rows["new"]["rtt_median"]) == (None, True)
    assert rows["new"]["score"] == pytest.approx(200.225)
    assert rows["us-1"]["score"] == pytest.approx(300.01)
    off = _router(_table(NEAR, FAR, new, other), checker.rtts, 0.0).explain("10.0.0.1", None)
    assert {c["rtt_term"] for c in off["candidates"]} == {0.0}


def test_status_page_shows_rtt_and_term() -> None:
    """
    The status JSON gives each backend its RTT in whole milliseconds and
    the term it adds to its score at its load now (capped below the next
    tier); C{null} for an unmeasured one; the page has an RTT column.
    """
    new = backend("new", port=9003, soft_limit=100, health_check="off")
    checker, clock = _checked({9001: 0.005, 9002: 0.040}, [NEAR, FAR, new])
    run_until(clock, 10.0)
    load = LoadTable()
    for _ in range(9_880):
        load.acquire(FAR)  # load term 98.8: only 0.2 of room below 99
    body = StatusData(
        repository=_table(NEAR, FAR, new),
        load=load,
        checker=checker,
        clock=clock.seconds,
        rttWeight=0.01,
    ).render()
    rows = {b["id"]: b for b in body["backends"]}
    assert body["rtt_weight"] == 0.01
    assert (rows["near"]["rtt_ms"], rows["near"]["rtt_term"]) == (5.0, 0.05)
    assert rows["far"]["rtt_ms"] == 40.0 and rows["far"]["rtt_term"] == pytest.approx(0.2)
    assert (rows["new"]["rtt_ms"], rows["new"]["rtt_term"]) == (None, None)
    assert rows["near"]["health"]["rtt_ms"] == pytest.approx(5.0)
    page, _ = status_page()
    assert b"RTT (score term)" in page and b'["rtt", "RTT"]' in page


def test_rtt_gauge_per_measured_backend() -> None:
    """
    C{edgeproxy_backend_rtt_seconds} has one series per measured backend of
    the table, in seconds; an unmeasured backend has none.
    """
    new = backend("new", port=9003, soft_limit=100, health_check="off")
    checker, clock = _checked({9001: 0.005, 9002: 0.040}, [NEAR, FAR, new])
    run_until(clock, 10.0)
    collector = EdgeproxyCollector(
        MetricsStore(), repository=_table(NEAR, FAR, new), rtt=checker.rtts
    )
    text = generate_latest(metrics_registry(collector, process=False)).decode()
    found = {
        s.labels["backend"]: s.value
        for family in text_string_to_metric_families(text)
        if family.name == "edgeproxy_backend_rtt_seconds"
        for s in family.samples
    }
    assert found == {"near": pytest.approx(0.005), "far": pytest.approx(0.040)}


def test_router_refuses_a_bad_weight() -> None:
    """
    A negative, infinite or NaN RTT weight is refused with a reason.
    """
    for bad in (-0.1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="rtt_weight"):
            _router(_table(NEAR), {}, bad)


# --- real sockets: a backend whose connects are delayed ----------------------------


class FullBacklog:
    """
    A TCP port on 127.0.0.1 whose connects take a second: it listens with
    an accept queue of one, kept full by a connection of its own, so the
    kernel drops every SYN; L{makeRoom} takes the queued connection out, so
    that the client's next SYN, sent again after TCP's initial
    retransmission timeout (1 s, RFC 6298), is let in (and fills the queue
    again).  No root, no traffic shaping.
    """

    def __init__(self) -> None:
        self.server = socket.socket()
        self.server.bind((LOCALHOST, 0))
        self.server.listen(0)
        self.server.setblocking(False)
        self.port = self.server.getsockname()[1]
        self.plug = socket.create_connection((LOCALHOST, self.port), timeout=5)

    def makeRoom(self) -> None:
        try:
            conn, _ = self.server.accept()
        except BlockingIOError:
            return
        conn.close()

    def close(self) -> None:
        self.plug.close()
        self.server.close()


def _drops_syns(port: FullBacklog) -> bool:
    """
    Whether a connect to C{port} hangs (this kernel drops SYNs on a full
    accept queue, as Linux does).
    """
    probe = socket.socket()
    probe.settimeout(0.2)
    try:
        probe.connect((LOCALHOST, port.port))
    except OSError:
        return True
    finally:
        probe.close()
    return False


@pytest.fixture
def slow_port() -> Iterator[FullBacklog]:
    if not sys.platform.startswith("linux"):
        pytest.skip("the full accept queue trick needs Linux")
    port = FullBacklog()
    try:
        if not _drops_syns(port):
            pytest.skip("this kernel accepts SYNs on a full accept queue")
        yield port
    finally:
        port.close()


@pytest_twisted.inlineCallbacks
def test_delayed_backend_wins_less_on_real_sockets(slow_port: FullBacklog) -> Any:
    """
    On real loopback sockets, a backend whose TCP connects take an extra
    second (its SYNs are dropped until the retransmission) is measured far
    slower than a plain one by the real prober, and the real proxy then
    sends every new client to the near one; with weight 0 the two share
    the clients.  Only the ordering of the RTTs is asserted, with the
    margin of a whole SYN retransmission.
    """
    near_server = listen(REACTOR, Echo)
    near = backend("near", port=near_server.port, soft_limit=100)
    far = backend("far", port=slow_port.port, soft_limit=100)
    harness = ProxyHarness(REACTOR, [near, far], ProxySettings(connect_timeout=5.0), app=None)
    # The checks' schedule on a fake clock (the test starts them); the
    # connects, and their timing, on the real reactor.
    schedule = Clock()
    checker = HealthChecker(
        schedule,
        harness.router.overlay,
        interval=2.0,
        timeout=30.0,
        fall=10,
        rng=random.Random(5),
        probe=Prober(REACTOR, timeout=10.0),
    )
    try:
        checker.update(harness.repository.current())
        checker.start()
        schedule.advance(2.0)  # both first checks start: SYNs sent
        REACTOR.callLater(0.3, slow_port.makeRoom)  # the retransmitted SYN gets in
        yield wait_until(REACTOR, lambda: len(checker.rtts) == 2, timeout=15.0)
        assert checker.rtt("far") > checker.rtt("near") + 0.5  # type: ignore[operator]

        harness.router.rtt = checker.rtts
        harness.router.rtt_weight = 0.01
        for _ in range(10):
            client = yield harness.connect()
            client.send(b"ping")
            yield wait_until(REACTOR, lambda c=client: bytes(c.received) == b"ping", timeout=10.0)
            client.transport.loseConnection()
            yield client.closed
            yield wait_until(REACTOR, harness.idle, timeout=10.0)
        # Every client reached the near backend (beside its health check).
        pinged = [p for p in near_server.protocols if bytes(p.received) == b"ping"]
        assert len(pinged) == 10
        # The same decision with the term off: the delayed backend gets its share.
        harness.router.rtt_weight = 0.0
        plain = _shares(harness.router, 100, net=11)
        assert set(plain) == {"near", "far"}
        harness.router.rtt_weight = 0.01
        assert _shares(harness.router, 100, net=12) == {"near": 100}
    finally:
        checker.stop()
        yield harness.stop([near_server])


def test_make_service_wires_the_checker_rtts_into_routing(tmp_path: Any) -> None:
    """
    C{twistd edgeproxy --rtt-weight W} gives the router that weight and the
    health checker's live RTT table, and the status page the weight.
    """
    from twisted.internet.testing import MemoryReactorClock

    from edgeproxy.tap import Options, makeService

    options = Options()
    options.parseOptions(
        [f"--db={tmp_path / 'r.db'}", "--geoip-db=none", "--rtt-weight=0.5", "--listen=tcp:0"]
    )
    service: Any = makeService(options, reactor=MemoryReactorClock(), environ={})
    router = service.router
    assert router.rtt_weight == 0.5
    assert router.rtt is service.health.rtts
    assert service.status.rttWeight == 0.5
