"""
Tests for L{edgeproxy.net.health}: active health checks feeding the state
overlay (SPEC section 9, issue 8, FAULTS F17).

The state machine, the schedule and the table handling run synchronously on
a L{Clock} with a fake probe; the probes themselves (TCP, HTTP, timeouts)
and a backend killed and restarted under a live proxy run on real loopback
sockets.
"""

from __future__ import annotations

import gc
import random
from typing import Any, Dict, List, Optional, Tuple

import attrs
import pytest
import pytest_twisted
from faultkit import (
    LOCALHOST,
    BlackHole,
    Client,
    Echo,
    EventCollector,
    ProxyHarness,
    RefusingPort,
    listen,
    sleep,
    tcp_sockets,
    wait_until,
)
from hypothesis import given
from hypothesis import strategies as st
from twisted.application.service import IService
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface.verify import verifyObject

from edgeproxy.config import ProxySettings
from edgeproxy.interfaces import AVAILABLE, UNAVAILABLE
from edgeproxy.model import MAX_CHECK_PATH, Backend, HealthCheckSpec, RoutingSnapshot
from edgeproxy.net.health import (
    DOWN,
    OFF,
    SOURCE,
    TCP_CHECK,
    UNKNOWN,
    UP,
    HealthChecker,
    Prober,
    ProbeResult,
    parse_check,
)
from edgeproxy.routing.router import Router
from edgeproxy.testing import (
    BindingTable,
    InMemoryBackendRepository,
    MetricsStore,
    StateOverlay,
    StaticHostResolver,
    backend,
)

#: The reactor, untyped (twisted.web's Site does not type-check as a factory).
REACTOR: Any = reactor

PASS = ProbeResult(True, "connected", 0.01)
FAIL = ProbeResult(False, "connection refused")

#: A fake probe's answer: a result, or None to hang (never answer).
Answer = Optional[ProbeResult]


class FakeProbe:
    """
    A L{edgeproxy.net.health.Probe} answering from a script per backend
    (a list consumed in order, then C{default}); records every call and
    every hanging Deferred.
    """

    def __init__(self, default: Answer = PASS) -> None:
        self.default = default
        self.script: Dict[str, List[Answer]] = {}
        self.calls: List[Tuple[str, HealthCheckSpec]] = []
        self.hanging: List[Tuple[str, Deferred[ProbeResult]]] = []
        self.cancelled: List[str] = []

    def answer(self, backend_id: str, *answers: Answer) -> None:
        self.script.setdefault(backend_id, []).extend(answers)

    def count(self, backend_id: str) -> int:
        return sum(1 for b, _ in self.calls if b == backend_id)

    def __call__(self, backend: Backend, spec: HealthCheckSpec) -> Deferred[ProbeResult]:
        self.calls.append((backend.id, spec))
        queue = self.script.get(backend.id)
        answer = queue.pop(0) if queue else self.default
        if answer is None:

            def cancel(d: Deferred[ProbeResult]) -> None:
                self.cancelled.append(backend.id)

            d: Deferred[ProbeResult] = Deferred(cancel)
            self.hanging.append((backend.id, d))
            return d
        return succeed(answer)


def snapshot(*backends: Backend) -> RoutingSnapshot:
    return RoutingSnapshot.build(backends)


def make(
    *backends: Backend,
    probe: Optional[FakeProbe] = None,
    start: bool = True,
    **options: Any,
) -> Tuple[HealthChecker, Clock, StateOverlay, FakeProbe]:
    """
    A checker on a L{Clock} with a fake probe, following C{backends}.
    """
    clock = Clock()
    overlay = StateOverlay()
    probe = probe if probe is not None else FakeProbe()
    options.setdefault("rng", random.Random(8))
    checker = HealthChecker(clock, overlay, probe=probe, **options)
    checker.update(snapshot(*backends))
    if start:
        checker.start()
    return checker, clock, overlay, probe


def step(clock: Clock) -> None:
    """
    Advance C{clock} to its next pending call and run it.
    """
    due = min(c.getTime() for c in clock.getDelayedCalls())
    clock.advance(max(0.0, due - clock.seconds()))


def checks(clock: Clock, probe: FakeProbe, backend_id: str, n: int) -> None:
    """
    Step C{clock} until C{backend_id} has been probed C{n} more times.
    """
    target = probe.count(backend_id) + n
    for _ in range(1000):
        if probe.count(backend_id) >= target:
            return
        step(clock)
    raise AssertionError("the backend was not probed")


@pytest.fixture
def events():
    """
    Log events of L{edgeproxy.net.health} emitted during the test.
    """
    collector = EventCollector("edgeproxy.net.health")
    globalLogPublisher.addObserver(collector)
    yield collector.events
    globalLogPublisher.removeObserver(collector)


def texts(events: List[Dict[str, Any]], level: Optional[LogLevel] = None) -> List[str]:
    return [formatEvent(e) for e in events if level is None or e["log_level"] is level]


def transitions(events: List[Dict[str, Any]]) -> List[str]:
    """
    The logged state changes that change routing (down, up again).
    """
    return [t for t in texts(events) if " is down: " in t or " is up again: " in t]


# --- parse_check ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "path", "canonical"),
    [
        ("tcp", "tcp", None, "tcp"),
        ("TCP", "tcp", None, "tcp"),
        ("off", "off", None, "off"),
        ("Off", "off", None, "off"),
        ("http:/", "http", "/", "http:/"),
        ("http:/healthz", "http", "/healthz", "http:/healthz"),
        ("HTTP:/Health?full=1&x=%20", "http", "/Health?full=1&x=%20", "http:/Health?full=1&x=%20"),
        ("http:/" + "a" * (MAX_CHECK_PATH - 1), "http", "/" + "a" * 1023, None),
    ],
)
def test_parse_check_accepts(text: str, kind: str, path: Optional[str], canonical: Optional[str]):
    """
    tcp, off and http:/path are checks; the keyword is case-insensitive and
    the path kept as given; the text form is canonical.
    """
    spec = parse_check(text)
    assert (spec.kind, spec.path) == (kind, path)
    if canonical is not None:
        assert str(spec) == canonical


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "expected tcp, off or http:/PATH"),
        ("udp", "expected tcp, off or http:/PATH"),
        ("tcp:80", "expected tcp, off or http:/PATH"),
        ("https:/healthz", "expected tcp, off or http:/PATH"),
        (" tcp", "expected tcp, off or http:/PATH"),
        ("http", "expected tcp, off or http:/PATH"),
        ("http:", "must start with /"),
        ("http:healthz", "must start with /"),
        ("http://backend/healthz", "a path, not a URL"),
        ("http:/health z", "printable ASCII without spaces"),
        ("http:/h\u00e9", "printable ASCII without spaces"),
        ("http:/h\tz", "printable ASCII without spaces"),
        ("http:/h#top", "#fragment"),
        ("http:/" + "a" * MAX_CHECK_PATH, "longer than 1024"),
    ],
)
def test_parse_check_refuses(text: str, why: str):
    """
    Anything else is refused with a ValueError saying why.
    """
    with pytest.raises(ValueError, match=why):
        parse_check(text)


@given(st.text(max_size=40) | st.from_regex(r"(?i:http):/[ -~]{0,20}", fullmatch=True))
def test_parse_check_round_trips(text: str):
    """
    Whatever the text, parse_check either raises ValueError or gives a
    check whose text form reads back as the same check.
    """
    try:
        spec = parse_check(text)
    except ValueError:
        return
    assert parse_check(str(spec)) == spec
    assert spec.kind in ("tcp", "off", "http")
    assert (spec.path is None) == (spec.kind != "http")


# --- construction ----------------------------------------------------------------


def test_is_a_service_with_defaults():
    """
    The checker is a twisted service; its defaults are the issue's: tcp,
    every 2 s, timeout 1 s, rise 2, fall 3; a default given as text is
    parsed.
    """
    checker = HealthChecker(Clock(), StateOverlay())
    assert verifyObject(IService, checker)
    assert (checker.default, checker.interval, checker.timeout) == (TCP_CHECK, 2.0, 1.0)
    assert (checker.rise, checker.fall) == (2, 3)
    assert isinstance(checker.probe, Prober)
    assert HealthChecker(Clock(), StateOverlay(), default="http:/hz").default == parse_check(
        "http:/hz"
    )


@pytest.mark.parametrize(
    "options",
    [
        {"interval": 0},
        {"interval": -1.0},
        {"timeout": 0},
        {"rise": 0},
        {"fall": 0},
        {"rise": 1.5},
        {"default": "ping"},
        {"default": HealthCheckSpec("ping")},
        {"default": HealthCheckSpec("http", "no-slash")},
    ],
)
def test_bad_options_refused(options: Dict[str, Any]):
    """
    A non-positive interval or timeout, rise or fall below 1, or an
    invalid default check is refused at construction.
    """
    with pytest.raises(ValueError):
        HealthChecker(Clock(), StateOverlay(), **options)


# --- the state machine ----------------------------------------------------------


def test_new_backend_is_unknown_and_routable():
    """
    A backend new to the checker is unknown, with no verdict (it takes
    traffic at once); its first passed check makes it up, still without a
    verdict.
    """
    checker, clock, overlay, probe = make(backend("a"))
    assert checker.state("a") == UNKNOWN
    assert overlay.verdict("a") == AVAILABLE
    checks(clock, probe, "a", 1)
    assert checker.state("a") == UP
    assert overlay.verdict("a") == AVAILABLE


def test_fall_failures_mark_down_and_rise_passes_bring_back():
    """
    An up backend goes down on its fall-th failed check (not before), with
    the UNAVAILABLE verdict from the health source; it comes back on its
    rise-th passed check in a row, and the verdict is cleared.
    """
    checker, clock, overlay, probe = make(backend("a"), rise=2, fall=3)
    checks(clock, probe, "a", 1)
    probe.answer("a", FAIL, FAIL, FAIL, PASS, PASS)
    checks(clock, probe, "a", 2)
    assert checker.state("a") == UP and overlay.verdict("a") == AVAILABLE
    checks(clock, probe, "a", 1)
    assert checker.state("a") == DOWN
    assert overlay.sources("a") == {SOURCE: UNAVAILABLE}
    assert "a" in overlay.unavailable
    checks(clock, probe, "a", 1)
    assert checker.state("a") == DOWN
    checks(clock, probe, "a", 1)
    assert checker.state("a") == UP
    assert overlay.verdict("a") == AVAILABLE and overlay.sources("a") == {}


def test_unknown_backend_goes_down_after_fall_failures():
    """
    Up until proven down: a new backend that never passes goes down after
    fall failed checks, not at the first.
    """
    probe = FakeProbe(default=FAIL)
    checker, clock, overlay, _ = make(backend("a"), probe=probe, fall=3)
    checks(clock, probe, "a", 2)
    assert checker.state("a") == UNKNOWN and overlay.verdict("a") == AVAILABLE
    checks(clock, probe, "a", 1)
    assert checker.state("a") == DOWN and overlay.verdict("a") == UNAVAILABLE


def test_down_needs_rise_passes_in_a_row():
    """
    While down, a failed check starts the count of passes again (HAProxy):
    with rise 3, pass, pass, fail, pass, pass does not bring it back; a
    third pass in a row does.
    """
    probe = FakeProbe(default=FAIL)
    checker, clock, _, _ = make(backend("a"), probe=probe, rise=3, fall=1)
    checks(clock, probe, "a", 1)
    assert checker.state("a") == DOWN
    probe.answer("a", PASS, PASS, FAIL, PASS, PASS, PASS)
    checks(clock, probe, "a", 5)
    assert checker.state("a") == DOWN
    checks(clock, probe, "a", 1)
    assert checker.state("a") == UP


def test_up_falls_on_net_failures():
    """
    While up, failures count net of passes (HAProxy): with fall 3, fail,
    fail, pass, fail keeps it up; one more failure takes it down.
    """
    checker, clock, _, probe = make(backend("a"), rise=2, fall=3)
    checks(clock, probe, "a", 1)
    probe.answer("a", FAIL, FAIL, PASS, FAIL, FAIL)
    checks(clock, probe, "a", 4)
    assert checker.state("a") == UP
    checks(clock, probe, "a", 1)
    assert checker.state("a") == DOWN


@pytest.mark.parametrize("start_down", [False, True])
def test_flapping_backend_never_changes_state(start_down: bool):
    """
    F17: a backend whose checks alternate pass and fail never changes state
    with rise 2 and fall 3, whether it was up or down: the overlay hears
    nothing, so its clients' bindings are never dropped.
    """
    probe = FakeProbe()
    checker, clock, overlay, _ = make(backend("a"), probe=probe, rise=2, fall=3)
    if start_down:
        probe.answer("a", FAIL, FAIL, FAIL)
        checks(clock, probe, "a", 3)
    else:
        checks(clock, probe, "a", 1)
    before = checker.state("a")
    assert before == (DOWN if start_down else UP)
    heard: List[Tuple[str, int, int]] = []
    overlay.addListener(lambda b, old, new: heard.append((b, old, new)))
    for _ in range(50):
        probe.answer("a", FAIL, PASS) if not start_down else probe.answer("a", PASS, FAIL)
    checks(clock, probe, "a", 100)
    assert checker.state("a") == before
    assert heard == []


@given(
    st.integers(1, 4),
    st.integers(1, 4),
    st.lists(st.booleans(), max_size=60),
)
def test_state_changes_only_as_rise_and_fall_allow(rise: int, fall: int, results: List[bool]):
    """
    For any sequence of check results: a backend goes down only on a failed
    check, after at least fall failed checks since its last change of state
    (or since it was new); it comes back only after rise passed checks in a
    row; and fall failures in a row always take an up backend down, rise
    passes in a row always bring a down one back.
    """
    probe = FakeProbe()
    checker, clock, _, _ = make(backend("a"), probe=probe, rise=rise, fall=fall)
    history: List[bool] = []
    since_change: List[bool] = []
    for result in results:
        before = checker.state("a")
        probe.answer("a", PASS if result else FAIL)
        checks(clock, probe, "a", 1)
        after = checker.state("a")
        history.append(result)
        since_change.append(result)
        if after == DOWN and before != DOWN:
            assert not result
            assert since_change.count(False) >= fall
            since_change = []
        elif after == UP and before == DOWN:
            assert history[-rise:] == [True] * rise
            since_change = []
        if len(history) >= fall and history[-fall:] == [False] * fall:
            assert after == DOWN
        if before == DOWN and len(history) >= rise and history[-rise:] == [True] * rise:
            assert after == UP


def test_rtt_is_a_median_filtered_ewma_of_passed_checks():
    """
    rtt() is None until a check passes, then the L{RttEstimate} of the
    connect times of the checks that passed: checks that failed, even after
    connecting (an HTTP 503), and checks that did not connect are no samples.
    """
    probe = FakeProbe()
    checker, clock, _, _ = make(backend("a"), probe=probe)
    assert checker.rtt("a") is None and "a" not in checker.rtts
    probe.answer(
        "a",
        ProbeResult(False, "HTTP 503", 0.2),
        ProbeResult(True, "connected", 0.1),
        ProbeResult(False, "HTTP 503", 0.9),
        ProbeResult(False, "connection refused"),
        ProbeResult(True, "connected", 0.2),
        ProbeResult(True, "connected", 0.3),
    )
    checks(clock, probe, "a", 1)
    assert checker.rtt("a") is None
    checks(clock, probe, "a", 1)
    assert checker.rtt("a") == pytest.approx(0.1) and checker.rtts["a"] == checker.rtt("a")
    checks(clock, probe, "a", 2)
    assert checker.rtt("a") == pytest.approx(0.1)
    checks(clock, probe, "a", 1)  # window [0.1, 0.2]: the lower median
    assert checker.rtt("a") == pytest.approx(0.1)
    checks(clock, probe, "a", 1)  # window full: EWMA of the median 0.2
    assert checker.rtt("a") == pytest.approx(0.3 * 0.2 + 0.7 * 0.1)
    assert checker.rtts["a"] == checker.rtt("a")
    assert checker.rtt("nope") is None


def test_metrics_count_probes_and_transitions():
    """
    Each check counts in health_probes (up or down); each change of routing
    in health_transitions (down, up), not the first pass of a new backend.
    """
    metrics = MetricsStore()
    probe = FakeProbe()
    probe.answer("a", PASS, FAIL, FAIL, FAIL, PASS, PASS)
    checker, clock, _, _ = make(backend("a"), probe=probe, metrics=metrics)
    checks(clock, probe, "a", 6)
    assert metrics.counter("health_probes", "up") == 3
    assert metrics.counter("health_probes", "down") == 3
    assert metrics.counter("health_transitions", "down") == 1
    assert metrics.counter("health_transitions", "up") == 1
    assert checker.state("a") == UP


def test_state_changes_logged_once_with_their_reason(events: List[Dict[str, Any]]):
    """
    Going down is one warning with the reason of the deciding check; coming
    back is one info line with its reason; the failed checks in between and
    the checks while down log nothing above debug.
    """
    probe = FakeProbe()
    probe.answer("a", PASS, *[ProbeResult(False, "HTTP 503")] * 10, PASS, PASS, PASS)
    checker, clock, _, _ = make(backend("a"), probe=probe, default="http:/healthz")
    checks(clock, probe, "a", 14)
    assert checker.state("a") == UP
    loud = [e for e in events if e["log_level"] in (LogLevel.info, LogLevel.warn)]
    assert [e["log_level"] for e in loud] == [LogLevel.warn, LogLevel.info]
    down, up = (formatEvent(e) for e in loud)
    assert down.startswith("backend a is down: HTTP 503 (health check http:/healthz")
    assert up.startswith("backend a is up again: connected (health check http:/healthz)")
    assert loud[0]["reason"] == "HTTP 503" and loud[1]["reason"] == "connected"


def test_status_says_what_is_known():
    """
    status() gives the state, the check, the last reason, the counter and
    the RTT; states() every followed backend's state.
    """
    probe = FakeProbe()
    checker, clock, _, _ = make(backend("a"), backend("b", health_check="off"), probe=probe)
    checks(clock, probe, "a", 1)
    status = checker.status("a")
    assert status is not None
    assert (status.state, status.check, status.reason, status.health) == (
        UP,
        "tcp",
        "connected",
        4,
    )
    assert status.rtt == pytest.approx(0.01) and status.last_check == clock.seconds()
    assert checker.states() == {"a": UP, "b": OFF}
    assert checker.status("nope") is None and checker.state("nope") is None


# --- the schedule ---------------------------------------------------------------


def test_first_checks_spread_over_the_first_interval():
    """
    Each backend's first check is at a random moment in [0, interval), so
    that a hundred backends are not checked at once.
    """
    backends = [backend(f"b{i}") for i in range(100)]
    _, clock, _, _ = make(*backends, interval=2.0)
    times = [c.getTime() for c in clock.getDelayedCalls()]
    assert len(times) == 100
    assert all(0 <= t < 2.0 for t in times)
    assert len(set(times)) == 100
    assert min(times) < 0.5 and max(times) > 1.5


def test_later_checks_every_interval_give_or_take_ten_percent():
    """
    After a check ends, the next is an interval later, give or take 10%, at
    random.
    """
    _, clock, _, probe = make(backend("a"), interval=2.0)
    gaps = []
    for _ in range(200):
        step(clock)
        (call,) = clock.getDelayedCalls()
        gaps.append(call.getTime() - clock.seconds())
    assert all(1.8 <= g <= 2.2 for g in gaps)
    assert min(gaps) < 1.85 and max(gaps) > 2.15
    assert probe.count("a") == 200


def test_hanging_check_times_out_and_counts_as_failed():
    """
    A check still running after the timeout is cancelled and counts as a
    failure whose reason gives the timeout; the next check follows.
    """
    probe = FakeProbe(default=None)
    checker, clock, _, _ = make(backend("a"), probe=probe, timeout=1.5, fall=1)
    step(clock)
    assert len(probe.hanging) == 1 and checker.state("a") == UNKNOWN
    clock.advance(1.5)
    assert probe.cancelled == ["a"]
    assert checker.state("a") == DOWN
    status = checker.status("a")
    assert status is not None and status.reason == "timeout after 1.5s"
    assert len(clock.getDelayedCalls()) == 1  # the next check


def test_probe_that_raises_or_fails_does_not_stop_the_checks(events: List[Dict[str, Any]]):
    """
    A probe that raises, or whose Deferred fails, counts as a failed check
    and is logged as a bug; the checks go on.
    """
    calls: List[str] = []

    def broken(backend: Backend, spec: HealthCheckSpec) -> Deferred[ProbeResult]:
        calls.append(backend.id)
        if len(calls) % 2:
            raise RuntimeError("boom")
        d: Deferred[ProbeResult] = Deferred()
        d.errback(KeyError("bang"))
        return d

    clock = Clock()
    overlay = StateOverlay()
    checker = HealthChecker(clock, overlay, probe=broken, fall=3, rng=random.Random(1))
    checker.update(snapshot(backend("a")))
    checker.start()
    for _ in range(6):
        step(clock)
    assert len(calls) == 6
    assert checker.state("a") == DOWN
    assert any("log_failure" in e for e in events)
    assert len(clock.getDelayedCalls()) == 1


def test_stop_cancels_everything_and_start_resumes():
    """
    stop() leaves no pending call (timers and timeouts) and cancels the
    checks in flight; states and verdicts stay; start() schedules again.
    """
    probe = FakeProbe(default=FAIL)
    checker, clock, overlay, _ = make(backend("a"), backend("b"), probe=probe, fall=1)
    checks(clock, probe, "a", 1)
    checks(clock, probe, "b", 1)
    probe.default = None
    step(clock)
    assert probe.hanging
    checker.stop()
    assert clock.getDelayedCalls() == []
    assert probe.cancelled == [b for b, _ in probe.hanging] and probe.cancelled
    assert checker.states() == {"a": DOWN, "b": DOWN}
    assert overlay.unavailable == {"a", "b"}
    clock.advance(100)
    assert clock.getDelayedCalls() == []
    probe.default = PASS
    checker.start()
    assert len(clock.getDelayedCalls()) == 2
    checks(clock, probe, "a", 2)
    assert checker.state("a") == UP


def test_stopService_is_stop():
    """
    Stopping the service stops the checks (no pending call left).
    """
    checker, clock, _, _ = make(backend("a"), start=False)
    assert clock.getDelayedCalls() == []
    checker.startService()
    assert len(clock.getDelayedCalls()) == 1
    checker.stopService()
    assert clock.getDelayedCalls() == [] and not checker.running


# --- the table ------------------------------------------------------------------


def test_only_healthy_live_backends_are_checked():
    """
    Backends the table says are unhealthy or deleted are not checked (the
    table already keeps them out); draining ones are.
    """
    checker, _, _, _ = make(
        backend("ok"),
        backend("sick", healthy=False),
        backend("gone", deleted=True),
        backend("drain", draining=True),
    )
    assert checker.states() == {"ok": UNKNOWN, "drain": UNKNOWN}


def test_off_is_never_probed_and_override_wins():
    """
    A backend whose check is off is never probed and stays routable; a
    backend's own check wins over the default, in either direction.
    """
    probe = FakeProbe(default=FAIL)
    checker, clock, overlay, _ = make(
        backend("plain"),
        backend("quiet", health_check="off"),
        backend("web", health_check="http:/healthz"),
        probe=probe,
        default="tcp",
        fall=1,
    )
    for _ in range(30):
        step(clock)
    assert probe.count("quiet") == 0
    assert checker.state("quiet") == OFF and overlay.verdict("quiet") == AVAILABLE
    specs = {b: s for b, s in probe.calls}
    assert specs == {"plain": parse_check("tcp"), "web": parse_check("http:/healthz")}

    probe2 = FakeProbe()
    checker2, clock2, _, _ = make(
        backend("plain"), backend("tcp", health_check="tcp"), probe=probe2, default="off"
    )
    for _ in range(5):
        step(clock2)
    assert {b for b, _ in probe2.calls} == {"tcp"}
    assert checker2.states() == {"plain": OFF, "tcp": UP}


def test_removed_backend_stops_and_forgets_its_verdict():
    """
    A backend that leaves the table (or becomes unhealthy or deleted in it)
    is no longer checked, its pending check and any check in flight are
    cancelled, and its health verdict is forgotten; the others go on.
    """
    probe = FakeProbe(default=FAIL)
    repository = InMemoryBackendRepository([backend("a"), backend("b"), backend("c")])
    clock = Clock()
    overlay = StateOverlay()
    overlay.setVerdict("a", "admin", UNAVAILABLE)
    checker = HealthChecker(clock, overlay, probe=probe, fall=1, rng=random.Random(3))
    checker.update(repository.current())
    repository.addListener(checker.routingTableChanged)
    checker.start()
    for name in "abc":
        checks(clock, probe, name, 1)
    assert overlay.unavailable == {"a", "b", "c"}
    probe.default = None
    checks(clock, probe, "b", 1)  # one check of b in flight
    repository.set([backend("c"), backend("b", healthy=False)])
    assert checker.states() == {"c": DOWN}
    assert overlay.sources("a") == {"admin": UNAVAILABLE}  # only health forgotten
    assert overlay.verdict("b") == AVAILABLE
    hung = {b for b, d in probe.hanging if b != "c"}
    assert "b" in hung and set(probe.cancelled) == hung
    assert len(clock.getDelayedCalls()) == 1  # c's next check or its timeout
    before = probe.count("a") + probe.count("b")
    clock.advance(60)
    assert probe.count("a") + probe.count("b") == before


def test_changed_address_or_check_starts_afresh(events: List[Dict[str, Any]]):
    """
    A backend whose host, port or check changes is checked afresh: unknown,
    routable, its verdict forgotten and its RTT reset.  Other changes (the
    weight) keep its state; so does a check that reads the same as the
    default it replaces.
    """
    probe = FakeProbe(default=FAIL)
    repository = InMemoryBackendRepository([backend("a")])
    checker, clock, overlay, _ = make(probe=probe, fall=1)
    checker.update(repository.current())
    repository.addListener(checker.routingTableChanged)
    probe.answer("a", ProbeResult(True, "HTTP 200", 0.5))
    checks(clock, probe, "a", 2)
    assert checker.state("a") == DOWN and checker.rtt("a") == 0.5
    repository.set([backend("a", weight=5)])
    repository.set([backend("a", weight=5, health_check="tcp")])
    assert checker.state("a") == DOWN
    for change in ({"port": 9001}, {"host": "127.0.0.2"}, {"health_check": "http:/x"}):
        repository.set([backend("a", **change)])
        assert checker.state("a") == UNKNOWN
        assert overlay.verdict("a") == AVAILABLE and checker.rtt("a") is None
        assert "a" not in checker.rtts
        checks(clock, probe, "a", 1)
        assert checker.state("a") == DOWN
    assert any("checking it afresh" in t for t in texts(events, LogLevel.info))


def test_routingTableChanged_never_raises(events: List[Dict[str, Any]]):
    """
    A failure while following a new table (here, the overlay raising) is
    logged; the listener does not raise.
    """

    class BrokenOverlay(StateOverlay):
        def forget(self, backend_ids: Any, sources: Any) -> None:
            raise RuntimeError("no")

    checker = HealthChecker(Clock(), BrokenOverlay(), probe=FakeProbe())
    checker.update(snapshot(backend("a")))
    checker.routingTableChanged(snapshot(backend("a")), snapshot())
    assert any("log_failure" in e for e in events)


def test_invalid_check_text_uses_the_default(events: List[Dict[str, Any]]):
    """
    A backend built by other code with a check text parse_check refuses is
    checked with the default, with a warning.
    """
    probe = FakeProbe()
    _, clock, _, _ = make(backend("a", health_check="ping"), probe=probe)
    checks(clock, probe, "a", 1)
    assert probe.calls == [("a", TCP_CHECK)]
    assert any("invalid health check 'ping'" in t for t in texts(events, LogLevel.warn))


# --- real sockets: the prober ---------------------------------------------------


class Status(Resource):
    """
    Answers every GET with C{code} (and a Location when given), counting
    requests.
    """

    isLeaf = True

    def __init__(self, code: int, location: Optional[bytes] = None, body: bytes = b"") -> None:
        super().__init__()
        self.code = code
        self.location = location
        self.body = body
        self.requests: List[Tuple[bytes, Optional[bytes], Optional[bytes]]] = []

    def render_GET(self, request: Request) -> bytes:
        self.requests.append(
            (request.uri, request.getHeader(b"host"), request.getHeader(b"user-agent"))
        )
        request.setResponseCode(self.code)
        if self.location is not None:
            request.setHeader(b"location", self.location)
        return self.body


@attrs.define
class WebBackend:
    resource: Status
    listening: Any

    @property
    def port(self) -> int:
        return int(self.listening.getHost().port)

    def stop(self) -> Any:
        return self.listening.stopListening()


def web(code: int, location: Optional[bytes] = None, body: bytes = b"") -> WebBackend:
    resource = Status(code, location, body)
    site = Site(resource)
    site.noisy = False
    site.log = lambda request: None  # type: ignore[method-assign]
    return WebBackend(resource, REACTOR.listenTCP(0, site, interface=LOCALHOST))


def established(port: int) -> List[Tuple[int, int, str]]:
    return [s for s in tcp_sockets([port]) if s[2] not in ("TIME_WAIT", "LISTEN")]


@pytest_twisted.inlineCallbacks
def test_prober_tcp():
    """
    A TCP check passes on a listening port (measuring the connect time) and
    hangs up at once; it fails on a refusing port with "connection
    refused".
    """
    server = listen(reactor, Echo)
    refusing = RefusingPort()
    try:
        prober = Prober(reactor, timeout=2.0)
        result = yield prober(backend("a", port=server.port), TCP_CHECK)
        assert result.up and result.reason == "connected"
        assert result.connect_time is not None and 0 <= result.connect_time < 2.0
        yield wait_until(reactor, lambda: server.protocols and server.protocols[0].lost)
        assert server.protocols[0].received == b""
        result = yield prober(backend("b", port=refusing.port), TCP_CHECK)
        assert result == ProbeResult(False, "connection refused")
    finally:
        refusing.close()
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_prober_http_status_decides():
    """
    An HTTP check GETs the path with a Host header naming the backend and
    its own User-Agent: 200 and 204 pass, 503 and 404 fail, with the status
    as the reason.
    """
    servers = [web(200, body=b"ok"), web(204), web(503), web(404)]
    try:
        prober = Prober(reactor, timeout=5.0)
        results = []
        for server in servers:
            results.append(
                (yield prober(backend("w", port=server.port), parse_check("http:/healthz?deep=1")))
            )
        assert [(r.up, r.reason) for r in results] == [
            (True, "HTTP 200"),
            (True, "HTTP 204"),
            (False, "HTTP 503"),
            (False, "HTTP 404"),
        ]
        assert all(r.connect_time is not None for r in results)
        for server in servers:
            ((uri, host, agent),) = server.resource.requests
            assert uri == b"/healthz?deep=1"
            assert host == f"127.0.0.1:{server.port}".encode()
            assert agent is not None and agent.startswith(b"edgeproxy-health-check/")
    finally:
        for server in servers:
            yield server.stop()


@pytest_twisted.inlineCallbacks
def test_prober_http_leaves_no_connection_open():
    """
    The response body is read (or, past 64 KiB, cut off) so that no
    connection is left open after a check, neither for a short body nor
    for one larger than the socket buffers.  (The garbage collector is off,
    so that it cannot close a forgotten socket for us.)
    """
    servers = [web(503, body=b"busy"), web(200, body=b"x" * 8_000_000)]
    gc.disable()
    try:
        prober = Prober(reactor, timeout=5.0)
        for server in servers:
            result = yield prober(backend("w", port=server.port), parse_check("http:/"))
            assert result.reason in ("HTTP 503", "HTTP 200")
        for server in servers:
            yield wait_until(reactor, lambda s=server: not established(s.port))
    finally:
        gc.enable()
        for server in servers:
            yield server.stop()


@pytest_twisted.inlineCallbacks
def test_prober_http_redirect_is_not_followed():
    """
    A 302 to another host is up, and the other host gets no request.
    """
    other = web(200)
    redirecting = web(302, location=f"http://127.0.0.1:{other.port}/elsewhere".encode())
    try:
        prober = Prober(reactor, timeout=5.0)
        result = yield prober(backend("r", port=redirecting.port), parse_check("http:/"))
        assert (result.up, result.reason) == (True, "HTTP 302")
        yield sleep(reactor, 0.2)
        assert len(redirecting.resource.requests) == 1
        assert other.resource.requests == []
    finally:
        yield other.stop()
        yield redirecting.stop()


@pytest_twisted.inlineCallbacks
def test_prober_http_against_a_tcp_only_backend():
    """
    An HTTP check of a backend that closes without answering HTTP fails
    with a reason saying so; one that refuses, with "connection refused".
    """

    class Hangup(Echo):
        def connectionMade(self) -> None:
            self.transport.loseConnection()  # type: ignore[union-attr]

    server = listen(reactor, Hangup)
    refusing = RefusingPort()
    try:
        prober = Prober(reactor, timeout=5.0)
        result = yield prober(backend("a", port=server.port), parse_check("http:/"))
        assert result.up is False
        assert result.reason == "connection closed before an HTTP response"
        result = yield prober(backend("a", port=refusing.port), parse_check("http:/"))
        assert result == ProbeResult(False, "connection refused")
    finally:
        refusing.close()
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_prober_uses_the_host_resolver():
    """
    A backend named by host name is checked at the resolver's first
    address; one with no address yet fails without connecting; the HTTP
    Host header keeps the name.
    """
    server = web(200)
    resolver = StaticHostResolver({"backend.test": ["127.0.0.1"]})
    try:
        prober = Prober(reactor, timeout=5.0, resolver=resolver)
        named = backend("n", host="backend.test", port=server.port)
        result = yield prober(named, TCP_CHECK)
        assert result.up
        result = yield prober(named, parse_check("http:/"))
        assert result.up
        assert server.resource.requests[0][1] == f"backend.test:{server.port}".encode()
        result = yield prober(backend("m", host="missing.test", port=server.port), TCP_CHECK)
        assert result == ProbeResult(False, "host missing.test has no address yet")
    finally:
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_prober_ipv6():
    """
    IPv6 literal backends are checked too, TCP and HTTP (whose URL cannot
    hold the literal: the Host header brackets it).
    """
    resource = Status(200)
    site = Site(resource)
    site.noisy = False
    site.log = lambda request: None  # type: ignore[method-assign]
    try:
        listening = REACTOR.listenTCP(0, site, interface="::1")
    except Exception:
        pytest.skip("no IPv6 loopback")
    try:
        port = listening.getHost().port
        prober = Prober(reactor, timeout=5.0)
        result = yield prober(backend("v6", host="::1", port=port), TCP_CHECK)
        assert result.up
        result = yield prober(backend("v6", host="::1", port=port), parse_check("http:/six"))
        assert (result.up, result.reason) == (True, "HTTP 200")
        assert resource.requests[0][:2] == (b"/six", f"[::1]:{port}".encode())
    finally:
        yield listening.stopListening()


# --- real sockets: the checker --------------------------------------------------


def real_checker(overlay: StateOverlay, *backends: Backend, **options: Any) -> HealthChecker:
    options.setdefault("interval", 0.05)
    options.setdefault("timeout", 2.0)
    checker = HealthChecker(reactor, overlay, rng=random.Random(8), **options)
    checker.update(snapshot(*backends))
    return checker


def own_calls() -> List[Any]:
    """
    Pending reactor calls of the health checker.
    """
    return [
        c
        for c in reactor.getDelayedCalls()
        if "edgeproxy.net.health" in getattr(getattr(c, "func", None), "__module__", "")
    ]


@pytest_twisted.inlineCallbacks
def test_killed_backend_stops_getting_connections_and_gets_them_back(
    events: List[Dict[str, Any]],
):
    """
    Under a live proxy and without any table change: a backend killed
    mid-run (stops listening, its connections dropped) goes down after fall
    failed checks, within a few times fall x interval, and the proxy stops
    trying it (a new client gets no backend instead of a failed connect);
    once it listens again on the same port it comes back after rise passed
    checks and takes new clients.  Each change is logged once, with its
    reason.
    """
    server = listen(reactor, Echo)
    port = server.port
    harness = ProxyHarness(reactor, [backend("a", port=port)], ProxySettings())
    # The only backend: without panic routing (which would still try it).
    harness.router.panic = False
    metrics = MetricsStore()
    overlay = harness.router.overlay
    assert isinstance(overlay, StateOverlay)
    interval, rise, fall = 0.1, 2, 3
    checker = real_checker(
        overlay, backend("a", port=port), interval=interval, rise=rise, fall=fall, metrics=metrics
    )
    checker.start()
    revived = None
    try:
        yield wait_until(reactor, lambda: checker.state("a") == UP)
        yield harness.assert_fresh_connection_works()

        yield server.stop()
        killed = reactor.seconds()
        failed_before = metrics.counter("health_probes", "down")
        yield wait_until(reactor, lambda: checker.state("a") == DOWN, timeout=20 * fall * interval)
        assert reactor.seconds() - killed >= (fall - 1) * interval * 0.9
        assert metrics.counter("health_probes", "down") - failed_before == fall
        assert overlay.unavailable == {"a"}

        client = yield harness.connect(Client(reactor))
        yield client.wait_closed()
        assert harness.logs.causes()[-1] == "no-backend"
        assert metrics.counter("health_transitions", "down") == 1

        revived = reactor.listenTCP(port, server.factory, interface=LOCALHOST)
        passed_before = metrics.counter("health_probes", "up")
        yield wait_until(reactor, lambda: checker.state("a") == UP, timeout=20 * rise * interval)
        assert metrics.counter("health_probes", "up") - passed_before == rise
        assert overlay.verdict("a") == AVAILABLE
        yield harness.assert_fresh_connection_works()

        down, up = transitions(events)
        assert down.startswith("backend a is down: connection refused (health check tcp")
        assert up.startswith("backend a is up again: connected")
    finally:
        checker.stop()
        extra = [revived] if revived is not None else []
        yield harness.stop()
        for listening in extra:
            yield listening.stopListening()
    assert own_calls() == []


@pytest_twisted.inlineCallbacks
def test_http_backend_answering_503_is_down_and_200_up():
    """
    With the default http:/healthz check, a backend answering 503 goes down
    and the router gives it no client; once it answers 200 it comes back.
    """
    server = web(503)
    repository = InMemoryBackendRepository([backend("w", port=server.port)])
    metrics = MetricsStore()
    router = Router(repository, BindingTable(ttl=600.0), None, metrics, "sa", reactor, panic=False)
    overlay = router.overlay
    assert isinstance(overlay, StateOverlay)
    checker = real_checker(
        overlay, *repository.current().backends, default="http:/healthz", rise=1, fall=2
    )
    checker.start()
    try:
        yield wait_until(reactor, lambda: checker.state("w") == DOWN)
        assert router.choose("203.0.113.5", "app", frozenset()) is None
        status = checker.status("w")
        assert status is not None and status.reason == "HTTP 503"
        server.resource.code = 200
        yield wait_until(reactor, lambda: checker.state("w") == UP)
        chosen = router.choose("203.0.113.6", "app", frozenset())
        assert chosen is not None and chosen.id == "w"
        router.release("w")
        assert all(uri == b"/healthz" for uri, _, _ in server.resource.requests)
    finally:
        checker.stop()
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_per_backend_check_overrides_the_default():
    """
    An echo backend fails the default HTTP check (it answers no HTTP) but
    passes its own tcp check.
    """
    server = listen(reactor, Echo)
    overlay = StateOverlay()
    checker = real_checker(
        overlay,
        backend("http", port=server.port),
        backend("tcp", port=server.port, health_check="tcp"),
        default="http:/",
        fall=1,
        timeout=0.5,
    )
    checker.start()
    try:
        yield wait_until(
            reactor, lambda: checker.state("http") == DOWN and checker.state("tcp") == UP
        )
        assert overlay.unavailable == {"http"}
    finally:
        checker.stop()
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_black_holed_backend_times_out():
    """
    A backend that never answers the SYN fails its checks by timeout, with
    the timeout as the reason; stopping the checker then leaves no timer
    behind and abandons the connect in flight.
    """
    hole = BlackHole()
    if not hole.is_black():
        hole.close()
        pytest.skip("this kernel answers SYNs to a full accept queue")
    overlay = StateOverlay()
    checker = real_checker(overlay, backend("h", port=hole.port), timeout=0.2, fall=1)
    before = set(reactor.getDelayedCalls())
    checker.start()
    try:
        yield wait_until(reactor, lambda: checker.state("h") == DOWN)
        status = checker.status("h")
        assert status is not None and status.reason == "timeout after 0.2s"
        yield wait_until(reactor, lambda: checker._checks["h"].inFlight is not None)
    finally:
        checker.stop()
        hole.close()
    yield sleep(reactor, 0.05)
    assert own_calls() == []
    assert [c for c in reactor.getDelayedCalls() if c not in before and c.active()] == []


@pytest_twisted.inlineCallbacks
def test_off_backend_is_never_connected_to():
    """
    A backend whose check is off gets no connection from the checker; it
    stays routable.
    """
    server = listen(reactor, Echo)
    metrics = MetricsStore()
    overlay = StateOverlay()
    checker = real_checker(
        overlay, backend("q", port=server.port, health_check="off"), metrics=metrics
    )
    checker.start()
    try:
        yield sleep(reactor, 0.3)
        assert checker.state("q") == OFF
        assert server.protocols == []
        assert metrics.counters() == {}
        assert overlay.verdict("q") == AVAILABLE
    finally:
        checker.stop()
        yield server.stop()
