"""
Tests for L{edgeproxy.net.limits.ClientLimiter}: per-client concurrency and
rate limits with a table of bounded size (issue 8 item 3; FAULTS F19).
"""

from __future__ import annotations

import gc
import platform
from fractions import Fraction
from typing import Any

import pytest
from faultkit import LogCapture
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from twisted.internet.task import Clock

from edgeproxy.metrics import MetricsStore
from edgeproxy.net.limits import (
    CONCURRENCY,
    RATE,
    REJECTED,
    TABLE_FULL,
    ClientLimiter,
    LimiterStats,
)
from edgeproxy.routing.bindings import client_key

A = "192.0.2.1"
B = "192.0.2.2"
C = "192.0.2.3"


def limiter(clock: Clock | None = None, **kw: Any) -> ClientLimiter:
    return ClientLimiter(clock=clock if clock is not None else Clock(), **kw)


def lines(logs: LogCapture) -> list[dict[str, Any]]:
    """
    The limiter's refusal lines (not its summaries).
    """
    return [
        e for e in logs.events if e.get("log_namespace") == "edgeproxy.net.limits" and "reason" in e
    ]


def test_concurrency_limit_is_exact():
    """
    With C{max_connections=3} a client is admitted three times and refused
    the fourth (reason C{concurrency}) while the others are unaffected; one
    release frees exactly one slot; releasing everything makes the client
    idle (still tracked, holding nothing).
    """
    lim = limiter(max_connections=3)
    assert [lim.admit(A) for _ in range(3)] == [None, None, None]
    assert lim.connections(A) == 3
    assert lim.admit(A) == CONCURRENCY
    assert lim.admit(A) == CONCURRENCY
    assert lim.connections(A) == 3
    assert lim.admit(B) is None
    lim.release(A)
    assert lim.connections(A) == 2
    assert lim.admit(A) is None
    assert lim.admit(A) == CONCURRENCY
    for _ in range(3):
        lim.release(A)
    assert lim.connections(A) == 0
    assert lim.stats().busy == 1 and len(lim) == 2
    assert [lim.admit(A) for _ in range(4)] == [None, None, None, CONCURRENCY]
    lim._check_invariants()


def test_rate_burst_then_rate_per_second():
    """
    With C{rate=5, burst=10} a quiet client gets exactly 10 connections at
    once, then exactly 5 per second (one every 0.2 s), and nothing more in
    between; refusals have reason C{rate}.
    """
    clock = Clock()
    lim = limiter(clock, rate=5, burst=10)
    assert [lim.admit(A) for _ in range(10)] == [None] * 10
    assert lim.admit(A) == RATE
    for _ in range(20):
        clock.advance(1)
        assert [lim.admit(A) for _ in range(6)] == [None] * 5 + [RATE]
    clock.advance(0.2)
    assert lim.admit(A) is None
    assert lim.admit(A) == RATE
    clock.advance(0.1)
    assert lim.admit(A) == RATE
    clock.advance(0.1)
    assert lim.admit(A) is None


def test_rate_refills_up_to_burst_only():
    """
    An emptied bucket refills at C{rate} per second, partly after part of
    the time it takes, and never beyond C{burst} however long the client
    was quiet.
    """
    clock = Clock()
    lim = limiter(clock, rate=4, burst=8)
    assert [lim.admit(A) for _ in range(9)] == [None] * 8 + [RATE]
    clock.advance(0.5)
    assert [lim.admit(A) for _ in range(3)] == [None, None, RATE]
    clock.advance(3600)
    assert [lim.admit(A) for _ in range(9)] == [None] * 8 + [RATE]


def test_rate_exact_far_from_the_epoch():
    """
    Counts stay exact at wall-clock times (about 1.7e9 s) and fractional
    rates: C{rate=3, burst=3} gives exactly 3 connections per second for
    1,000 seconds; C{rate=0.5} one every 2 s, and its default burst is 1.
    """
    clock = Clock()
    clock.advance(1.7e9)
    lim = limiter(clock, rate=3)
    assert lim.burst == 3
    for _ in range(1000):
        assert [lim.admit(A) for _ in range(4)] == [None] * 3 + [RATE]
        clock.advance(1)
    slow = limiter(clock, rate=0.5)
    assert slow.burst == 1
    assert [slow.admit(A), slow.admit(A)] == [None, RATE]
    clock.advance(1)
    assert slow.admit(A) == RATE
    clock.advance(1)
    assert slow.admit(A) is None


def test_both_limits_together():
    """
    With both limits on, a refusal for one takes nothing from the other: a
    client refused for concurrency does not spend tokens, and one refused
    for its rate does not take a slot; each refusal gives its own reason.
    """
    clock = Clock()
    lim = limiter(clock, max_connections=2, rate=1, burst=3)
    assert [lim.admit(A), lim.admit(A)] == [None, None]
    assert [lim.admit(A) for _ in range(5)] == [CONCURRENCY] * 5
    lim.release(A)
    assert lim.admit(A) is None
    lim.release(A)
    lim.release(A)
    assert lim.admit(A) == RATE
    assert lim.connections(A) == 0
    clock.advance(1)
    assert lim.admit(A) is None
    assert lim.connections(A) == 1
    assert lim.stats().rejected == {CONCURRENCY: 5, RATE: 1, TABLE_FULL: 0}


def test_zero_turns_each_limit_off():
    """
    C{max_connections=0} leaves only the rate limit (any number open at
    once, release a no-op); C{rate=0} leaves only the concurrency limit
    (any number per second); both 0 admits everything and tracks nothing.
    """
    clock = Clock()
    rate_only = limiter(clock, rate=100, burst=100)
    assert all(rate_only.admit(A) is None for _ in range(100))
    assert rate_only.admit(A) == RATE
    assert rate_only.connections(A) == 0
    rate_only.release(A)
    assert rate_only.stats().underflow == 0

    cap_only = limiter(clock, max_connections=1000)
    assert all(cap_only.admit(A) is None for _ in range(1000))
    assert cap_only.admit(A) == CONCURRENCY
    for _ in range(1000):
        cap_only.release(A)
    assert all(cap_only.admit(A) is None for _ in range(1000))

    off = limiter(clock, burst=5)
    assert not off.enabled and rate_only.enabled and cap_only.enabled
    assert all(off.admit(f"10.0.{i >> 8}.{i & 255}") is None for i in range(10_000))
    assert len(off) == 0
    off.release(A)
    assert off.stats() == LimiterStats(
        clients=0,
        busy=0,
        rejected={CONCURRENCY: 0, RATE: 0, TABLE_FULL: 0},
        evicted=0,
        swept=0,
        suppressed=0,
        underflow=0,
    )


def test_bad_arguments_are_refused():
    """
    Negative limits, a burst below 1 with a rate, a non-finite rate, an
    empty table and a non-positive log interval are refused at once.
    """
    clock = Clock()
    for kw in [
        {"max_connections": -1},
        {"rate": -1.0},
        {"rate": float("inf")},
        {"rate": float("nan")},
        {"rate": 5.0, "burst": 0.5},
        {"max_clients": 0},
        {"log_interval": 0.0},
        {"log_lines": -1},
    ]:
        with pytest.raises(ValueError):
            ClientLimiter(clock=clock, **kw)  # type: ignore[arg-type]
    assert ClientLimiter(clock=clock, burst=0.5).burst == 0.5


def test_flooding_client_does_not_slow_the_others():
    """
    FAULTS F19: one client opening 1,000 connections per second for 5 s
    gets its burst plus its rate and no more, while another client
    connecting every 100 ms (within its rate) is admitted every time; every refusal
    is counted, and the flood is logged once, not once per refusal.
    """
    clock = Clock()
    metrics = MetricsStore()
    lim = limiter(clock, max_connections=10, rate=20, burst=40, metrics=metrics)
    flooder, other = "198.51.100.7", "203.0.113.9"
    logs = LogCapture().start()
    try:
        admitted = refused = 0
        for ms in range(5000):
            clock.advance(0.001)
            if lim.admit(flooder) is None:
                admitted += 1
                lim.release(flooder)
            else:
                refused += 1
            if ms % 100 == 0:
                assert lim.admit(other) is None
                lim.release(other)
        # Burst plus five seconds of rate (the last token may fall exactly
        # at the end, on one side or the other of float rounding).
        assert 40 + 99 <= admitted <= 40 + 100
        assert metrics.counter(REJECTED, RATE) == refused == 5000 - admitted
        # Then it holds connections open: the concurrency cap applies.
        clock.advance(10)
        held = [lim.admit(flooder) for _ in range(1000)]
        assert held.count(None) == 10 and held.count(CONCURRENCY) == 990
        assert lim.admit(other) is None
    finally:
        logs.stop()
    mine = lines(logs)
    assert [(e["client"], e["reason"]) for e in mine] == [
        (flooder, RATE),
        (flooder, CONCURRENCY),
    ]
    assert mine[1]["suppressed"] == refused - 1


def test_ipv6_clients_are_limited_by_their_64():
    """
    Keyed with L{client_key}, like bindings, the privacy addresses of one
    IPv6 host (one /64) share one limit; another /64 has its own.
    """
    lim = limiter(max_connections=2)
    keys = [client_key(f"2001:db8:1:2::{i:x}") for i in range(1, 4)]
    assert [lim.admit(k) for k in keys] == [None, None, CONCURRENCY]
    assert lim.admit(client_key("2001:db8:1:3::1")) is None
    lim.release(client_key("2001:db8:1:2::99"))
    assert lim.connections(keys[0]) == 1


def test_idle_clients_are_evicted_least_recently_used_busy_never():
    """
    At C{max_clients}, a new client evicts the least recently used idle
    client (a refused attempt counts as use, so a flooder stays tracked);
    clients holding connections are never evicted.
    """
    clock = Clock()
    lim = limiter(clock, max_connections=5, rate=1, burst=1, max_clients=3)
    assert lim.admit(A) is None  # A holds one: never evicted
    assert lim.admit(B) is None
    lim.release(B)
    assert lim.admit(C) is None
    lim.release(C)
    assert lim.admit(B) == RATE  # B is now more recent than C
    assert lim.admit("192.0.2.4") is None  # evicts C
    lim.release("192.0.2.4")
    assert lim.admit(B) == RATE  # B's empty bucket was kept
    assert lim.admit(C) is None  # C is new again: evicts 192.0.2.4
    assert lim.connections(A) == 1
    assert lim.stats().evicted == 2
    lim._check_invariants()


def test_table_full_of_busy_clients_refuses_new_ones():
    """
    When every tracked client holds connections, a new client is refused
    with reason C{table-full} (counted, logged once per interval), clients
    already tracked go on as before, and a release makes room again.
    """
    clock = Clock()
    metrics = MetricsStore()
    lim = limiter(clock, max_connections=5, max_clients=2, metrics=metrics)
    assert lim.admit(A) is None and lim.admit(B) is None
    logs = LogCapture().start()
    try:
        assert [lim.admit(C) for _ in range(50)] == [TABLE_FULL] * 50
        assert lim.admit(A) is None
        clock.advance(10)
        assert lim.admit(C) == TABLE_FULL
    finally:
        logs.stop()
    assert metrics.counter(REJECTED, TABLE_FULL) == 51
    assert [(e["reason"], e["suppressed"]) for e in lines(logs)] == [
        (TABLE_FULL, 0),
        (TABLE_FULL, 49),
    ]
    lim.release(B)
    assert lim.admit(C) is None
    assert lim.connections(A) == 2 and lim.connections(B) == 0
    assert len(lim) == 2


def test_release_without_admit_never_goes_negative():
    """
    A release the limiter did not admit (a caller bug) is counted as an
    underflow and changes nothing: counts never go negative.
    """
    lim = limiter(max_connections=1)
    lim.release(A)
    assert lim.admit(A) is None
    lim.release(A)
    lim.release(A)
    assert lim.connections(A) == 0
    assert lim.stats().underflow == 2
    assert lim.admit(A) is None
    assert lim.admit(A) == CONCURRENCY


def test_clock_stepped_back_costs_one_token_interval():
    """
    A wall clock stepped back by an hour does not lock a client out for an
    hour: its bucket counts as just emptied, refilled one token per
    C{1 / rate} from the new time.
    """
    clock = Clock()
    clock.advance(7200)
    lim = limiter(clock, rate=2, burst=2)
    assert [lim.admit(A), lim.admit(A), lim.admit(A)] == [None, None, RATE]
    clock.rightNow -= 3600
    assert lim.admit(A) == RATE
    clock.advance(0.5)
    assert [lim.admit(A), lim.admit(A)] == [None, RATE]


def test_sweep_forgets_idle_refilled_clients_only():
    """
    C{sweep} forgets idle clients whose bucket is full again and whose last
    log line is older than C{log_interval}; it keeps clients holding
    connections, clients still refilling, and recently logged ones; it
    stops at the first client to keep.
    """
    clock = Clock()
    lim = limiter(clock, max_connections=3, rate=1, burst=2, log_interval=10)
    for key in (A, B):
        lim.admit(key)
        lim.release(key)
    assert lim.admit(C) is None  # C holds a connection
    clock.advance(0.5)
    assert lim.sweep() == 0  # A's bucket is full 1 s after its token
    clock.advance(0.5)
    assert lim.sweep() == 2
    assert len(lim) == 1 and lim.connections(C) == 1
    # A refused client is kept for log_interval, whatever its bucket.
    assert [lim.admit(A), lim.admit(A), lim.admit(A)] == [None, None, RATE]
    lim.release(A)
    lim.release(A)
    clock.advance(5)
    assert lim.sweep() == 0
    clock.advance(5)
    assert lim.sweep() == 1
    # Behind a client still refilling, others wait for a later sweep.
    assert [lim.admit(A), lim.admit(A)] == [None, None]  # full at 13
    lim.release(A)
    lim.release(A)
    clock.advance(0.5)
    assert lim.admit(B) is None  # full at 12.5
    lim.release(B)
    clock.advance(1.1)
    assert lim.sweep() == 0
    assert len(lim) == 3
    clock.advance(0.4)
    assert lim.sweep() == 2
    assert len(lim) == 1
    assert lim.stats().swept == 5
    lim._check_invariants()


def test_refusals_logged_once_per_client_per_interval():
    """
    A client refused every 100 ms for 35 s is logged at most once per
    C{log_interval} (each line saying how many refusals went unlogged since
    that client's last one), independently of another refused client, with
    the client and reason as named fields; C{sweep} logs the number not
    logged since its last summary.
    """
    clock = Clock()
    lim = limiter(clock, rate=1, burst=1, log_interval=10)
    logs = LogCapture().start()
    try:
        lim.admit(A)
        lim.admit(B)
        for _ in range(350):
            clock.advance(0.1)
            lim.admit(A)
            lim.admit(B)
        lim.sweep()
        lim.sweep()
    finally:
        logs.stop()
    refusals = lim.stats().rejected[RATE]
    for key in (A, B):
        mine = [e for e in lines(logs) if e["client"] == key]
        assert len(mine) == 4
        assert {e["reason"] for e in mine} == {RATE}
        assert mine[0]["suppressed"] == 0
    summaries = [e for e in logs.events if "unlogged" in e]
    assert len(summaries) == 1
    assert summaries[0]["unlogged"] == lim.stats().suppressed == refusals - 8


def test_log_spacing_follows_the_clock():
    """
    The spacing of one client's lines is measured on the limiter's clock:
    no two lines about a client are less than C{log_interval} apart, and a
    refused client is logged again once the interval has passed.
    """
    clock = Clock()
    lim = limiter(clock, max_connections=1, log_interval=10)
    lim.admit(A)
    logged_at = []
    logs = LogCapture().start()
    try:
        for _ in range(1000):
            clock.advance(0.037)
            before = len(lines(logs))
            lim.admit(A)
            if len(lines(logs)) > before:
                logged_at.append(clock.seconds())
    finally:
        logs.stop()
    assert len(logged_at) == 4
    assert all(b - a >= 10 for a, b in zip(logged_at, logged_at[1:]))
    assert all(b - a < 10.037 + 1e-9 for a, b in zip(logged_at, logged_at[1:]))


def test_log_lines_are_capped_across_clients():
    """
    However many clients are refused, at most C{log_lines} refusal lines
    are logged per C{log_interval}; the rest are counted as not logged.
    """
    clock = Clock()
    lim = limiter(clock, max_connections=1, log_lines=100, log_interval=10)
    keys = [f"10.0.{i >> 8}.{i & 255}" for i in range(500)]
    for key in keys:
        lim.admit(key)
    logs = LogCapture().start()
    try:
        for key in keys:
            lim.admit(key)
        clock.advance(10)
        for key in keys[:150]:
            lim.admit(key)
    finally:
        logs.stop()
    assert len(lines(logs)) == 200
    assert lim.stats().suppressed == 450


def test_metrics_count_refusals_by_reason():
    """
    Refusals are counted in the metrics store as C{client_limit_rejected},
    labelled with the reason, matching C{stats()}.
    """
    clock = Clock()
    metrics = MetricsStore()
    lim = limiter(clock, max_connections=1, rate=1, burst=1, max_clients=1, metrics=metrics)
    lim.admit(A)
    lim.admit(A)
    lim.admit(B)
    lim.release(A)
    lim.admit(A)
    assert metrics.counters() == {
        (REJECTED, CONCURRENCY): 1,
        (REJECTED, TABLE_FULL): 1,
        (REJECTED, RATE): 1,
    }
    assert lim.stats().rejected == {CONCURRENCY: 1, RATE: 1, TABLE_FULL: 1}
    assert "clients=1/1" in repr(lim)


class HeapMeter:
    """
    The bytes that live Python objects take, counted from L{start}.

    On CPython, tracemalloc: every allocation is traced, and the peak is
    the true peak.  PyPy has no tracemalloc (its C{tracemalloc} module
    fails to import: there is no C{_tracemalloc}, since PyPy's objects are
    not allocated through a traceable malloc); there the count is its GC's
    own: after a full collection, the bytes its objects take in the arenas
    and the large objects it allocated outside them (C{gc._get_stats()}'s
    C{total_arena_memory} and C{total_rawmalloced_memory}), less the same
    count at the start.  The whole process's, so the test allocates nothing
    else between the readings; and the peak is the largest reading (what
    survived a collection), not the transient garbage between two
    collections, which PyPy's GC lets grow to about the live size before
    collecting.
    """

    def __init__(self) -> None:
        self.pypy = platform.python_implementation() == "PyPy"
        self._base = 0
        self._peak = 0

    def _live(self) -> int:
        gc.collect()
        stats = gc._get_stats()  # type: ignore[attr-defined]  # PyPy's raw numbers
        return int(stats.total_arena_memory + stats.total_rawmalloced_memory)

    def start(self) -> None:
        if self.pypy:
            # Several collections: objects with finalizers (earlier tests'
            # sockets, transports) go only on a later one, and would come
            # off the count in the middle of the measure.
            for _ in range(3):
                gc.collect()
            self._base = self._live()
            self._peak = 0
        else:
            import tracemalloc

            tracemalloc.start()

    def reading(self) -> int:
        """
        The bytes in use now, above the start.
        """
        if self.pypy:
            live = self._live()
            if live < self._base:
                # Something alive at the start was freed since (not this
                # test's: it only adds): count from here.
                self._base = live
            now = live - self._base
            self._peak = max(self._peak, now)
            return now
        import tracemalloc

        return tracemalloc.get_traced_memory()[0]

    def peak(self) -> int:
        """
        The most bytes in use since the start (on PyPy: of the readings).
        """
        if self.pypy:
            return self._peak
        import tracemalloc

        return tracemalloc.get_traced_memory()[1]

    def stop(self) -> None:
        if not self.pypy:
            import tracemalloc

            tracemalloc.stop()


@pytest.mark.slow
def test_a_million_addresses_stay_within_max_clients():
    """
    A million distinct addresses through admit/release (one in a thousand
    holding its connection to the end) leave at most C{max_clients}
    entries, the clients holding connections with exact counts, and the
    memory the limiter holds does not grow past what a full table takes
    (L{HeapMeter}: tracemalloc on CPython, the GC's count after a full
    collection on PyPy, read eleven times; the bytes are printed).
    """
    clock = Clock()
    max_clients = 10_000
    meter = HeapMeter()
    meter.start()
    try:
        lim = limiter(clock, max_connections=4, rate=10, burst=20, max_clients=max_clients)
        held = []
        full = refused = 0
        for i in range(1_000_000):
            key = f"{10 + (i >> 24)}.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"
            if lim.admit(key) is not None:
                refused += 1
            if i % 1000 == 0:
                held.append(key)
                clock.advance(0.001)
            else:
                lim.release(key)
            if i == 2 * max_clients:
                full = meter.reading()
            if i % 100_000 == 0:
                assert len(lim) <= max_clients
                meter.reading()
        end = meter.reading()
        peak = meter.peak()
    finally:
        meter.stop()
    assert refused == 0
    assert len(lim) == max_clients
    assert all(lim.connections(key) == 1 for key in held)
    # held (1,000 strings and a list) grows by about 60 KB between the two
    # readings; the table itself stays the same size.
    assert end < full + 200_000
    assert peak < 2 * full
    print(
        f"\n{max_clients:,} clients after 1,000,000 addresses: {end:,} bytes"
        f" {'(PyPy GC)' if meter.pypy else 'traced'} ({end / max_clients:.0f} per client),"
        f" peak {peak:,}"
    )
    for key in held:
        lim.release(key)
    assert lim.stats().busy == 0
    lim._check_invariants()


# A model of the limiter: exact arithmetic (Fractions), lists for the LRU
# order, the same configuration.  Times move in quarter seconds, exact in
# binary floats too.

KEYS = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "2001:db8::/64"]
RATE_ = Fraction(2)
BURST = Fraction(3)
EMISSION = 1 / RATE_
TAU = (BURST - 1) * EMISSION
INTERVAL = Fraction(2)


class _ModelClient:
    def __init__(self) -> None:
        self.open = 0
        self.tat: Fraction | None = None
        self.logged: Fraction | None = None


class ClientLimiterMachine(RuleBasedStateMachine):
    """
    L{ClientLimiter} against the model, with a small C{max_clients}: every
    decision and reason agree, clients holding connections are never
    evicted (their counts match what the caller holds), eviction is least
    recently used among idle clients, C{sweep} forgets the same clients,
    and the same refusals go unlogged.
    """

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.now = Fraction(0)
        self.held: dict[str, int] = {}
        self.busy: dict[str, _ModelClient] = {}
        self.idle: dict[str, _ModelClient] = {}  # insertion order = LRU order
        self.rejected = {CONCURRENCY: 0, RATE: 0, TABLE_FULL: 0}
        self.suppressed = 0
        self.full_logged: Fraction | None = None
        self.cap = 2
        self.rate = True
        self.max_clients = 3
        self.lim = self._make()

    def _make(self) -> ClientLimiter:
        return ClientLimiter(
            max_connections=self.cap,
            rate=float(RATE_) if self.rate else 0.0,
            burst=float(BURST),
            clock=self.clock,
            max_clients=self.max_clients,
            log_interval=float(INTERVAL),
        )

    @initialize(
        limits=st.sampled_from([(2, True), (0, True), (2, False), (1, True)]),
        max_clients=st.integers(1, 4),
    )
    def configure(self, limits, max_clients):
        self.cap, self.rate = limits
        self.max_clients = max_clients
        self.lim = self._make()

    def _refuse(self, entry: _ModelClient | None, reason: str) -> str:
        self.rejected[reason] += 1
        if entry is None:
            logged, self.full_logged = self.full_logged, self.now
            if logged is not None and self.now - logged < INTERVAL:
                self.full_logged = logged
                self.suppressed += 1
        elif entry.logged is None or self.now - entry.logged >= INTERVAL:
            entry.logged = self.now
        else:
            self.suppressed += 1
        return reason

    def _model_admit(self, key: str) -> str | None:
        entry = self.busy.get(key)
        if entry is None:
            entry = self.idle.get(key)
            if entry is None:
                if len(self.busy) + len(self.idle) >= self.max_clients:
                    if not self.idle:
                        return self._refuse(None, TABLE_FULL)
                    del self.idle[next(iter(self.idle))]
                entry = _ModelClient()
                self.idle[key] = entry
        elif entry.open >= self.cap:
            return self._refuse(entry, CONCURRENCY)
        if self.rate:
            tat = self.now if entry.tat is None else max(entry.tat, self.now)
            if tat - self.now > TAU:
                if not entry.open:
                    self.idle[key] = self.idle.pop(key)
                return self._refuse(entry, RATE)
            entry.tat = tat + EMISSION
        if self.cap:
            if not entry.open:
                del self.idle[key]
                self.busy[key] = entry
            entry.open += 1
        else:
            self.idle[key] = self.idle.pop(key)
        return None

    @rule(dt=st.sampled_from([Fraction(0), Fraction(1, 4), Fraction(1, 2), 1, 2, 5]))
    def advance(self, dt):
        self.now += dt
        self.clock.advance(float(dt))

    @rule(key=st.sampled_from(KEYS))
    def admit(self, key):
        expected = self._model_admit(key)
        assert self.lim.admit(key) == expected
        if expected is None:
            self.held[key] = self.held.get(key, 0) + 1

    @precondition(lambda self: any(self.held.values()))
    @rule(data=st.data())
    def release(self, data):
        key = data.draw(st.sampled_from(sorted(k for k, n in self.held.items() if n)))
        self.held[key] -= 1
        self.lim.release(key)
        entry = self.busy.get(key)
        if entry is not None:
            entry.open -= 1
            if not entry.open:
                del self.busy[key]
                self.idle[key] = entry

    @rule()
    def sweep(self):
        freed = 0
        while self.idle:
            key = next(iter(self.idle))
            entry = self.idle[key]
            if entry.tat is not None and entry.tat > self.now:
                break
            if entry.logged is not None and entry.logged > self.now - INTERVAL:
                break
            del self.idle[key]
            freed += 1
        assert self.lim.sweep() == freed

    @invariant()
    def agrees(self):
        lim = self.lim
        lim._check_invariants()
        assert len(lim) == len(self.busy) + len(self.idle) <= self.max_clients
        assert list(lim._idle) == list(self.idle)
        assert set(lim._busy) == set(self.busy)
        for key in KEYS:
            # A client holding connections is tracked with the exact count.
            assert lim.connections(key) == (self.held.get(key, 0) if self.cap else 0)
        assert lim.stats().rejected == self.rejected
        assert lim.stats().suppressed == self.suppressed


TestClientLimiterMachine = ClientLimiterMachine.TestCase
TestClientLimiterMachine.settings = settings(
    max_examples=300, stateful_step_count=60, deadline=None
)
