"""
Tests for L{edgeproxy.net.sharedload}: connection counts shared by worker
processes through a real memfd, real record locks and real processes.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import signal
import subprocess
import sys
from typing import Dict, Iterator, List, Tuple

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from zope.interface.verify import verifyObject

from edgeproxy.interfaces import ILoadCounter
from edgeproxy.net.sharedload import (
    GLOBAL_BLOCK,
    GLOBAL_SLOT,
    HARD_BLOCK,
    RESERVED_ID,
    SharedCounters,
    SharedLoadTable,
    SharedLoadView,
    reservedId,
)
from edgeproxy.routing.load import UNDERFLOW
from edgeproxy.routing.router import Router
from edgeproxy.testing import (
    BindingTable,
    InMemoryBackendRepository,
    MetricsStore,
    backend,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Shared:
    """
    One shared table and a L{SharedLoadTable} per worker, each over its own
    mapping of the file (as in separate worker processes).
    """

    def __init__(self, workers: int = 3, slots: int = 64) -> None:
        self.counters = SharedCounters.create(workers, slots)
        self.metrics = MetricsStore()
        self.attached: List[SharedCounters] = []
        self.tables: List[SharedLoadTable] = []
        for w in range(workers):
            c = SharedCounters.attach(os.dup(self.counters.fd), workers, slots)
            self.attached.append(c)
            self.tables.append(SharedLoadTable(c, w, self.metrics))

    def close(self) -> None:
        for c in self.attached:
            c.close()
        self.counters.close()


@pytest.fixture
def shared() -> Iterator[_Shared]:
    s = _Shared()
    yield s
    s.close()


def test_verify_object(shared: _Shared) -> None:
    """
    L{SharedLoadTable} provides L{ILoadCounter}.
    """
    assert verifyObject(ILoadCounter, shared.tables[0])


def test_attach_checks_shape(shared: _Shared) -> None:
    """
    Attaching with another shape than the table was created with, or to a
    file that is no table, fails with L{ValueError}.
    """
    fd = os.dup(shared.counters.fd)
    with pytest.raises(ValueError):
        SharedCounters.attach(fd, 3, 32)
    with pytest.raises(ValueError):
        SharedCounters.attach(fd, 4, 64)
    os.close(fd)
    other = os.memfd_create("not-a-table")
    os.ftruncate(other, shared.counters.size)
    with pytest.raises(ValueError):
        SharedCounters.attach(other, 3, 64)
    os.close(other)


def test_create_is_zeroed_and_cloexec() -> None:
    """
    A new table has every count and generation at 0, and its descriptor is
    not inherited across exec unless passed on purpose.
    """
    c = SharedCounters.create(2, 16)
    try:
        assert not os.get_inheritable(c.fd)
        assert all(c.total(s) == 0 for s in range(16))
        assert c.generation(0) == c.generation(1) == 0
    finally:
        c.close()
    c.close()  # idempotent


def test_hard_limit_exact_across_workers(shared: _Shared) -> None:
    """
    Three workers taking connections to one backend in turn get exactly
    C{hard_limit} of them between them; then every one is refused.
    """
    b = backend("b1", hard_limit=5)
    taken = [t.acquire(b) for _ in range(3) for t in shared.tables]
    assert taken.count(True) == 5
    assert taken[:5] == [True] * 5
    assert not any(t.acquire(b) for t in shared.tables)
    slot = shared.counters.slotFor("b1")
    assert shared.counters.total(slot) == 5
    assert [shared.counters.count(slot, w) for w in range(3)] == [2, 2, 1]


def test_refused_acquire_changes_no_count(shared: _Shared) -> None:
    """
    A refused acquire changes no cell nor generation, and leaves the
    refusing worker's C{connections} at the total it saw, noted in
    C{changed}, so that scoring sees the backend full.
    """
    a, b_, c = shared.tables
    b = backend("b1", hard_limit=2)
    assert a.acquire(b) and a.acquire(b)
    c.track(["b1"])
    c.connections.clear()  # as if c had not seen a's connections yet
    c.changed.clear()
    slot = shared.counters.slotFor("b1")
    cells = [shared.counters.count(slot, w) for w in range(3)]
    gens = [shared.counters.generation(w) for w in range(3)]
    assert not c.acquire(b)
    assert [shared.counters.count(slot, w) for w in range(3)] == cells
    assert [shared.counters.generation(w) for w in range(3)] == gens
    assert c.connections == {"b1": 2}
    assert c.changed == {"b1"}
    assert b_.acquire(backend("b1", hard_limit=3))


def test_release_frees_room_for_another_worker(shared: _Shared) -> None:
    """
    A connection released by one worker can be taken by another.
    """
    a, b_, _ = shared.tables
    b = backend("b1", hard_limit=1)
    assert a.acquire(b)
    assert not b_.acquire(b)
    a.release("b1")
    assert a.connections == {}
    assert b_.acquire(b)
    assert b_.connections == {"b1": 1}


def test_acquire_without_limit(shared: _Shared) -> None:
    """
    Without a hard limit every acquire succeeds and counts in the worker's
    own cell; C{connections} counts this worker's connections at once.
    """
    a, b_, _ = shared.tables
    b = backend("b1")
    for _ in range(4):
        assert a.acquire(b)
    assert b_.acquire(b)
    slot = shared.counters.slotFor("b1")
    assert shared.counters.total(slot) == 5
    assert a.connections == {"b1": 4}
    assert shared.counters.acquire(slot, 2, 0) == 6


def test_refresh_brings_other_workers_in(shared: _Shared) -> None:
    """
    L{SharedLoadTable.refresh} sets C{connections} to the totals across
    workers of the ids it follows and notes the ids that moved in
    C{changed}; ids at 0 leave C{connections}; a refresh with nothing new
    notes nothing.
    """
    a, b_, c = shared.tables
    c.track(["b1", "b2"])
    c.refresh()
    c.changed.clear()
    assert a.acquire(backend("b1")) and a.acquire(backend("b1"))
    assert b_.acquire(backend("b2", hard_limit=9))
    assert a.acquire(backend("b3"))  # not followed by c
    assert c.connections == {}
    c.refresh()
    assert c.connections == {"b1": 2, "b2": 1}
    assert c.changed == {"b1", "b2"}
    c.changed.clear()
    c.refresh()
    assert c.changed == set()
    a.release("b1")
    b_.release("b2")
    c.refresh()
    assert c.connections == {"b1": 1}
    assert c.changed == {"b1", "b2"}


def test_refresh_after_fresh_read_that_went_back(shared: _Shared) -> None:
    """
    A total read fresh on acquire (or on a refusal) that includes other
    workers' connections is corrected by the next refresh even when those
    workers' cells went back to what the last refresh copied (the chunk
    compares equal).
    """
    a, b_, _ = shared.tables
    b = backend("b1", hard_limit=2)
    b_.track(["b1"])
    b_.refresh()
    assert a.acquire(b)
    assert b_.acquire(b)
    assert b_.connections == {"b1": 2}
    a.release("b1")
    b_.refresh()
    assert b_.connections == {"b1": 1}
    b_.release("b1")
    assert a.acquire(b) and a.acquire(b)
    assert not b_.acquire(b)
    assert b_.connections == {"b1": 2}
    a.release("b1")
    a.release("b1")
    b_.refresh()
    assert b_.connections == {}


def test_track_reads_current_totals(shared: _Shared) -> None:
    """
    An id given to L{SharedLoadTable.track} after other workers counted
    connections to it starts at their total.
    """
    a, b_, _ = shared.tables
    assert a.acquire(backend("b1")) and a.acquire(backend("b1"))
    b_.track(["b1", "b9"])
    assert b_.connections == {"b1": 2}
    assert b_.changed == {"b1"}


def test_underflow(shared: _Shared) -> None:
    """
    Releasing more than a worker took changes no count (not even another
    worker's), counts L{UNDERFLOW} per release and logs once.
    """
    a, b_, _ = shared.tables
    assert a.acquire(backend("b1", hard_limit=3))
    b_.track(["b1"])
    with capturedLogs() as events:
        b_.release("b1")
        b_.release("b1")
        b_.release("never-seen")
    slot = shared.counters.slotFor("b1")
    assert shared.counters.total(slot) == 1
    assert b_.connections == {"b1": 1}
    assert shared.metrics.counter(UNDERFLOW, "b1") == 2
    assert shared.metrics.counter(UNDERFLOW, "never-seen") == 1
    assert len([e for e in events if e["log_level"] == LogLevel.warn]) == 1
    assert not shared.counters.release(slot, 1)


def test_clear_worker(shared: _Shared) -> None:
    """
    L{SharedCounters.clearWorker} zeroes a dead worker's row and moves its
    generation on, so that the others' refresh drops its connections.
    """
    a, b_, c = shared.tables
    for _ in range(3):
        assert a.acquire(backend("b1", hard_limit=10))
    assert b_.acquire(backend("b1", hard_limit=10))
    assert a.acquire(backend("b2"))
    c.track(["b1", "b2"])
    c.refresh()
    assert c.connections == {"b1": 4, "b2": 1}
    generation = shared.counters.generation(0)
    shared.counters.clearWorker(0)
    assert shared.counters.generation(0) > generation
    slot = shared.counters.slotFor("b1")
    assert shared.counters.total(slot) == 1
    assert shared.counters.count(slot, 1) == 1
    c.refresh()
    assert c.connections == {"b1": 1}
    with pytest.raises(IndexError):
        shared.counters.clearWorker(3)


def test_directory_never_gives_slot_zero() -> None:
    """
    Ids get distinct slots from 1 to C{slots - 1}, the same in every
    mapping; once they are all taken a new id gets -1 (logged once) and
    ids already in keep theirs.
    """
    c = SharedCounters.create(2, 8)
    other = SharedCounters.attach(os.dup(c.fd), 2, 8)
    try:
        ids = [f"backend-{i}" for i in range(7)]
        slots = [c.slotFor(i) for i in ids]
        assert sorted(slots) == list(range(1, 8))
        assert [other.slotFor(i) for i in ids] == slots
        assert [other.lookup(i) for i in reversed(ids)] == slots[::-1]
        with capturedLogs() as events:
            assert other.slotFor("one-too-many") == -1
            assert other.slotFor("two-too-many") == -1
        assert len(events) == 1
        assert other.lookup("one-too-many") == -1
        assert c.slotFor(ids[3]) == slots[3]
    finally:
        other.close()
        c.close()


def test_directory_full_counts_locally() -> None:
    """
    An id with no room in the directory is counted per worker as a plain
    L{LoadTable} counts it: its hard limit holds per worker, refresh leaves
    it alone, release works.
    """
    s = _Shared(workers=2, slots=2)  # one slot for ids
    try:
        a, b_ = s.tables
        assert a.acquire(backend("first", hard_limit=1))
        b = backend("second", hard_limit=1)
        assert a.acquire(b)
        assert not a.acquire(b)
        assert b_.acquire(b)
        assert s.counters.lookup("second") == -1
        a.refresh()
        assert a.connections == {"first": 1, "second": 1}
        a.release("second")
        a.release("second")
        assert a.connections == {"first": 1}
        assert s.metrics.counter(UNDERFLOW, "second") == 1
        assert not b_.acquire(backend("first", hard_limit=1))
    finally:
        s.close()


def test_global_count(shared: _Shared) -> None:
    """
    The global count (slot 0) caps connections across workers; a cap of 0
    counts without a limit.
    """
    a, b_, c = shared.tables
    assert a.acquireGlobal(2)
    assert b_.acquireGlobal(2)
    assert not c.acquireGlobal(2)
    assert c.globalTotal() == 2
    a.releaseGlobal()
    assert c.acquireGlobal(2)
    assert c.acquireGlobal(0)
    assert a.globalTotal() == 3
    a.releaseGlobal()  # a holds none now
    assert shared.metrics.counter(UNDERFLOW, "(global)") == 1
    assert shared.counters.total(GLOBAL_SLOT) == 3


def test_view(shared: _Shared) -> None:
    """
    L{SharedLoadView} reports the tracked ids' totals across workers as of
    its last refresh, leaves out ids at 0, and inserts nothing in the
    directory.
    """
    a, b_, _ = shared.tables
    assert a.acquire(backend("b1")) and b_.acquire(backend("b1"))
    assert b_.acquire(backend("b2"))
    assert a.acquireGlobal(0)
    view = SharedLoadView(shared.counters)
    view.track(["b1", "b2", "b3"])
    assert dict(view.connections) == {}
    view.refresh()
    assert dict(view.connections) == {"b1": 2, "b2": 1}
    assert shared.counters.lookup("b3") == -1
    assert view.globalTotal() == 1
    b_.release("b2")
    view.track(["b2"])
    view.refresh()
    assert dict(view.connections) == {}
    assert shared.counters.totals(["b1", "b2", "b3"]) == {"b1": 2, "b2": 0, "b3": 0}


def test_routers_share_hard_limit(shared: _Shared) -> None:
    """
    Two routers, each over its worker's table, never hand out more than a
    backend's hard limit between them, and route the rest to the other
    backend once a refresh shows it full.
    """
    backends = [backend("full", hard_limit=2), backend("spare", region="eu", country="FR")]

    def router(table: SharedLoadTable) -> Router:
        return Router(
            InMemoryBackendRepository(backends),
            BindingTable(),
            None,
            MetricsStore(),
            "sa",
            Clock(),
            random.Random(1),
            load=table,
        )

    one, two = router(shared.tables[0]), router(shared.tables[1])
    chosen: List[str] = []
    for _ in range(3):
        for r in (one, two):
            b = r.choose(f"192.0.2.{len(chosen) + 1}", "app", frozenset())
            assert b is not None
            chosen.append(b.id)
        shared.tables[0].refresh()
        shared.tables[1].refresh()
    assert chosen.count("full") == 2
    slot = shared.counters.slotFor("full")
    assert shared.counters.total(slot) == 2


class SharedMachine(RuleBasedStateMachine):
    """
    Random acquires, releases, refreshes and reloads over several workers'
    tables: every shared total is what succeeded minus what was released; an
    acquire succeeds only below the hard limit, and does far from it; after
    a refresh a table's counts are the totals; every count a table changed
    is noted in its C{changed}.
    """

    WORKERS = 3
    IDS = ("a", "b", "c", "d", "e")
    HARD = {"a": 2, "b": 3, "c": 0, "d": 1, "e": 40}

    @initialize()
    def setUp(self) -> None:
        self.shared = _Shared(self.WORKERS, 16)
        # "e" has blocks of 3 at 40 and changes on a reload.
        self.hard = dict(self.HARD)
        self.held: Dict[Tuple[int, str], int] = {}
        # What each table's reader (the selection index) last drained.
        self.drained: List[Dict[str, int]] = [{} for _ in range(self.WORKERS)]
        self.underflows = 0

    def teardown(self) -> None:
        if hasattr(self, "shared"):
            self.shared.close()

    def total(self, bid: str) -> int:
        return sum(self.held.get((w, bid), 0) for w in range(self.WORKERS))

    @rule(w=st.integers(0, WORKERS - 1), bid=st.sampled_from(IDS))
    def acquire(self, w: int, bid: str) -> None:
        hard = self.hard[bid]
        total = self.total(bid)
        got = self.shared.tables[w].acquire(backend(bid, hard_limit=hard))
        block = max(1, min(HARD_BLOCK, hard // (4 * self.WORKERS)))
        if hard <= 0 or total < hard - 2 * (self.WORKERS - 1) * block:
            assert got
        elif total >= hard:
            assert not got
        if got:
            self.held[(w, bid)] = self.held.get((w, bid), 0) + 1

    @rule(hard=st.sampled_from([0, 8, 40]))
    def reload(self, hard: int) -> None:
        """Every worker reloads a table where "e" has another limit."""
        self.hard["e"] = hard
        backends = [backend(bid, hard_limit=h) for bid, h in self.hard.items()]
        for table in self.shared.tables:
            table.follow(backends)

    @rule(w=st.integers(0, WORKERS - 1), bid=st.sampled_from(IDS))
    def release(self, w: int, bid: str) -> None:
        self.shared.tables[w].release(bid)
        n = self.held.get((w, bid), 0)
        if n:
            self.held[(w, bid)] = n - 1
        else:
            self.underflows += 1

    @rule(w=st.integers(0, WORKERS - 1))
    def refresh(self, w: int) -> None:
        table = self.shared.tables[w]
        table.refresh()
        for bid in self.IDS:
            if bid in table._slots:
                assert table.connections.get(bid, 0) == self.total(bid)

    @rule(w=st.integers(0, WORKERS - 1))
    def drain(self, w: int) -> None:
        table = self.shared.tables[w]
        for bid in table.changed:
            self.drained[w][bid] = table.connections.get(bid, 0)
        table.changed.clear()

    @rule(w=st.integers(0, WORKERS - 1))
    def crash(self, w: int) -> None:
        """A worker dies: the supervisor clears its row, a new one takes it."""
        s = self.shared
        s.counters.clearWorker(w)
        s.attached[w].close()
        s.attached[w] = SharedCounters.attach(os.dup(s.counters.fd), self.WORKERS, 16)
        s.tables[w] = SharedLoadTable(s.attached[w], w, s.metrics)
        self.drained[w] = {}
        for bid in self.IDS:
            self.held.pop((w, bid), None)

    @invariant()
    def totals(self) -> None:
        if not hasattr(self, "shared"):
            return
        counters = self.shared.counters
        for bid in self.IDS:
            slot = counters.lookup(bid)
            total = counters.total(slot) if slot > 0 else 0
            assert total == self.total(bid)
            hard = self.HARD[bid]
            if bid != "e":
                assert hard <= 0 or total <= hard
            for w in range(self.WORKERS):
                own = counters.count(slot, w) if slot > 0 else 0
                assert own == self.held.get((w, bid), 0)
                hold = self.shared.tables[w]._holds.get(bid)
                if hold is not None:
                    assert counters.count(counters.lookup(reservedId(bid)), w) == hold.reserved
        underflows = self.shared.metrics.counters()
        assert sum(n for (name, _), n in underflows.items() if name == UNDERFLOW) == self.underflows

    @invariant()
    def changes_noted(self) -> None:
        if not hasattr(self, "shared"):
            return
        for w, table in enumerate(self.shared.tables):
            assert all(n > 0 for n in table.connections.values())
            for bid in self.IDS:
                if table.connections.get(bid, 0) != self.drained[w].get(bid, 0):
                    assert bid in table.changed


TestSharedMachine = SharedMachine.TestCase


# Real processes.

_HAMMER = r"""
import json, sys
from edgeproxy.net.sharedload import SharedCounters

fd, workers, slots, w, rounds, want, hard = map(int, sys.argv[1:8])
c = SharedCounters.attach(fd, workers, slots)
print("up", flush=True)
sys.stdin.readline()
slot = c.slotFor("b1")
mine = {f"w{w}-{k}": c.slotFor(f"w{w}-{k}") for k in range(10)}
print(json.dumps({"slot": slot, "mine": mine}), flush=True)
sys.stdin.readline()
held = seen = refused = taken = 0
for i in range(rounds):
    while held < want:
        n = c.acquire(slot, w, hard)
        if n < 0:
            refused += 1
            break
        held += 1
        taken += 1
        seen = max(seen, n, c.total(slot, locked=True))
    for _ in range((i % held) + 1 if held else 0):
        assert c.release(slot, w)
        held -= 1
while held:
    assert c.release(slot, w)
    held -= 1
print(json.dumps({"max": seen, "refused": refused, "taken": taken}), flush=True)
"""

_HOLD = r"""
import fcntl, sys
from edgeproxy.net.sharedload import SharedCounters

fd, workers, slots, w = map(int, sys.argv[1:5])
c = SharedCounters.attach(fd, workers, slots)
slot = c.slotFor("b1")
for _ in range(3):
    assert c.acquire(slot, w, 10) > 0
fcntl.lockf(fd, fcntl.LOCK_EX, 1, 1 + slot)
print("locked", flush=True)
sys.stdin.read()
"""


def _spawn(script: str, fd: int, *args: int) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.Popen(
        [sys.executable, "-c", script, str(fd), *map(str, args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        pass_fds=(fd,),
        env=env,
    )


@pytest.mark.slow
def test_processes_hammering_one_backend() -> None:
    """
    Three processes inserting ids at once agree on their slots; then,
    hammering acquire and release on one backend with a hard limit of 10
    while this process holds 7 (so that each of them alone hits the limit),
    none ever sees more than 10, each is refused, and the count ends at 0.
    """
    workers, slots = 4, 128
    counters = SharedCounters.create(workers, slots)
    procs = [_spawn(_HAMMER, counters.fd, workers, slots, w, 3000, 4, 10) for w in (1, 2, 3)]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline() == "up\n"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("\n")
            p.stdin.flush()
        inserted = [json.loads(p.stdout.readline()) for p in procs if p.stdout is not None]
        slot = counters.slotFor("b1")
        assert {r["slot"] for r in inserted} == {slot}
        mine = {k: v for r in inserted for k, v in r["mine"].items()}
        assert len(set(mine.values()) | {slot}) == 31
        assert all(counters.lookup(k) == v for k, v in mine.items())
        for _ in range(7):
            assert counters.acquire(slot, 0, 10) > 0
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("\n")
            p.stdin.close()
        results = []
        for p in procs:
            assert p.stdout is not None
            results.append(json.loads(p.stdout.readline()))
            assert p.wait(timeout=120) == 0
        print(results)
        assert max(r["max"] for r in results) <= 10
        assert all(r["refused"] > 0 and r["taken"] > 0 for r in results)
        assert counters.total(slot) == 7
        for _ in range(7):
            assert counters.release(slot, 0)
        assert counters.total(slot) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        counters.close()


@pytest.mark.slow
def test_killed_lock_holder() -> None:
    """
    A process killed with SIGKILL while holding a slot's lock leaves it
    free (the kernel drops a dead process's record locks): another
    process's acquire then succeeds; clearing the dead worker's row takes
    its connections out of the total.
    """
    workers, slots = 2, 16
    counters = SharedCounters.create(workers, slots)
    proc = _spawn(_HOLD, counters.fd, workers, slots, 1)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
        slot = counters.slotFor("b1")
        with pytest.raises(OSError):
            fcntl.lockf(counters.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 1 + slot)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
        assert counters.acquire(slot, 0, 10) == 4
        assert counters.count(slot, 1) == 3
        counters.clearWorker(1)
        assert counters.total(slot) == 1
        assert counters.acquire(slot, 1, 2) == 2
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        counters.close()


def _tables(n: int) -> list:
    counters = SharedCounters.create(n, slots=64)
    return [SharedLoadTable(counters, w) for w in range(n)]


def test_global_cap_reserves_room_in_blocks() -> None:
    """
    Far from the cap a worker reserves room for many connections under one
    lock and admits from it; the group's open count is what the workers
    hold, not what they reserved.
    """
    a, b = _tables(2)
    assert a.acquireGlobal(1000)
    slot = a.counters.lookup(RESERVED_ID)
    assert slot > 0
    block = min(GLOBAL_BLOCK, 1000 // 8)
    assert a.counters.total(slot) == block
    for _ in range(block - 1):
        assert a.acquireGlobal(1000)
    assert a.counters.total(slot) == block
    assert a.acquireGlobal(1000)
    assert a.counters.total(slot) == 2 * block
    assert b.acquireGlobal(1000)
    assert a.globalTotal() == block + 2


def test_global_cap_exact_with_the_last_connections_anywhere() -> None:
    """
    Near the cap room is taken one connection at a time and given back at
    once: with 29 of 30 held by one worker the other takes the 30th, and
    nobody takes a 31st; when one closes, any worker may take its place.
    """
    a, b = _tables(2)
    for _ in range(29):
        assert a.acquireGlobal(30)
    assert b.acquireGlobal(30)
    assert not a.acquireGlobal(30)
    assert not b.acquireGlobal(30)
    assert a.globalTotal() == 30
    a.releaseGlobal()
    assert b.acquireGlobal(30)
    assert not a.acquireGlobal(30)
    b.releaseGlobal()
    assert a.acquireGlobal(30)


@pytest.mark.parametrize("seed", range(20))
def test_global_cap_never_exceeded_and_refuses_little_early(seed: int) -> None:
    """
    Random acquires and releases over three workers: the open connections
    never add up to more than the cap, every refusal comes within two
    blocks per other worker of it, and when everything is closed the
    reservations are back to what fits the rule (all returned near the cap).
    """
    import random

    rng = random.Random(seed)
    cap = rng.choice([5, 30, 200, 1000])
    tables = _tables(3)
    held = [0, 0, 0]
    block = max(1, min(GLOBAL_BLOCK, cap // 12))
    for _ in range(3000):
        w = rng.randrange(3)
        if held[w] and rng.random() < 0.45:
            tables[w].releaseGlobal()
            held[w] -= 1
        elif tables[w].acquireGlobal(cap):
            held[w] += 1
        else:
            assert sum(held) >= cap - 2 * 2 * block, (sum(held), cap, block)
        assert sum(held) <= cap
        assert tables[0].globalTotal() == sum(held)
    for w in range(3):
        while held[w]:
            tables[w].releaseGlobal()
            held[w] -= 1
    assert tables[0].globalTotal() == 0


def _reserved(table: SharedLoadTable, bid: str, worker: int = -1) -> int:
    """
    The room reserved under C{bid}'s hard limit by C{worker} (-1: by every
    worker).
    """
    slot = table.counters.lookup(reservedId(bid))
    if slot < 0:
        return 0
    if worker < 0:
        return table.counters.total(slot)
    return table.counters.count(slot, worker)


def test_hard_limit_reserves_room_in_blocks() -> None:
    """
    Far from a backend's hard limit a worker reserves room for a block of
    connections under one lock and admits from it: the reservation moves
    once per block, while the backend's count is the open connections.
    """
    a, b = _tables(2)
    big = backend("b1", hard_limit=1000)
    assert HARD_BLOCK == 64
    assert a.acquire(big)
    assert _reserved(a, "b1") == 64
    for _ in range(63):
        assert a.acquire(big)
    assert _reserved(a, "b1") == 64
    assert a.acquire(big)
    assert _reserved(a, "b1") == 128
    assert b.acquire(big)
    assert _reserved(a, "b1", 1) == 64
    slot = a.counters.lookup("b1")
    assert a.counters.total(slot) == 66
    # A small limit has blocks of one: a quarter of a worker's share.
    assert a.acquire(backend("small", hard_limit=7))
    assert _reserved(a, "small") == 1


def test_hard_limit_exact_with_the_last_connections_anywhere() -> None:
    """
    Near a hard limit room is taken one connection at a time and given back
    at once: with 29 of 30 held by one worker the other takes the 30th, and
    nobody takes a 31st; when one closes, either worker may take its place.
    """
    a, b = _tables(2)
    limited = backend("b1", hard_limit=30)
    for _ in range(29):
        assert a.acquire(limited)
    assert b.acquire(limited)
    assert not a.acquire(limited)
    assert not b.acquire(limited)
    assert a.connections == {"b1": 30}
    assert a.counters.total(a.counters.lookup("b1")) == 30
    a.release("b1")
    assert _reserved(a, "b1") == 29
    assert b.acquire(limited)
    assert not a.acquire(limited)
    b.release("b1")
    assert a.acquire(limited)
    for _ in range(29):
        a.release("b1")
    for _ in range(2):
        b.release("b1")
    assert a.counters.total(a.counters.lookup("b1")) == 0
    # Far from the limit again, each keeps at most two blocks (of 3).
    assert all(_reserved(a, "b1", w) <= 6 for w in (0, 1))


def test_refresh_gives_back_spare_room_near_the_limit() -> None:
    """
    Room a worker reserved far from the limit and no longer needs is given
    back at its next refresh once the group has come near the limit, so
    that another worker refused meanwhile is admitted after it.
    """
    a, b = _tables(2)
    limited = backend("b1", hard_limit=200)  # blocks of 25, near below 100 free
    assert a.acquire(limited)
    assert _reserved(a, "b1", 0) == 25
    taken = 0
    while b.acquire(limited):
        taken += 1
    assert taken == 175  # a's 24 spare are not b's to take
    a.refresh()
    assert _reserved(a, "b1", 0) == 1
    for _ in range(24):
        assert b.acquire(limited)
    assert not b.acquire(limited)
    assert a.counters.total(a.counters.lookup("b1")) == 200


@pytest.mark.parametrize("seed", range(20))
def test_hard_limit_never_exceeded_and_refuses_little_early(seed: int) -> None:
    """
    Random acquires, releases and refreshes over three workers: the open
    connections never add up to more than the hard limit, every refusal
    comes within two blocks per other worker of it, a worker's room never
    falls below its connections, and once every worker has refreshed, a
    refusal means the backend is full.
    """
    rng = random.Random(seed)
    hard = rng.choice([5, 30, 200, 1000])
    limited = backend("b1", hard_limit=hard)
    tables = _tables(3)
    held = [0, 0, 0]
    block = max(1, min(HARD_BLOCK, hard // 12))
    counters = tables[0].counters
    for _ in range(3000):
        w = rng.randrange(3)
        r = rng.random()
        if r < 0.02:
            for t in tables:
                t.refresh()
            least = held.index(min(held))
            if tables[least].acquire(limited):
                held[least] += 1
            else:
                assert sum(held) == hard
        elif held[w] and r < 0.45:
            tables[w].release("b1")
            held[w] -= 1
        elif tables[w].acquire(limited):
            held[w] += 1
        else:
            assert sum(held) >= hard - 2 * 2 * block, (sum(held), hard, block)
        assert sum(held) <= hard
        slot = counters.lookup("b1")
        assert counters.total(slot) == sum(held)
        assert all(_reserved(tables[0], "b1", v) >= held[v] for v in range(3))
        assert _reserved(tables[0], "b1") <= hard
    for w in range(3):
        while held[w]:
            tables[w].release("b1")
            held[w] -= 1
    assert counters.total(counters.lookup("b1")) == 0


def test_follow_resizes_room_when_a_limit_changes() -> None:
    """
    A reload that lowers a hard limit makes a worker give back its spare
    room at once (L{SharedLoadTable.follow}), so another worker may use
    what the new limit leaves; one that removes the limit gives back all of
    it; and connections opened without a limit count once it returns.
    """
    a, b = _tables(2)
    assert all(a.acquire(backend("b1", hard_limit=1000)) for _ in range(5))
    assert _reserved(a, "b1", 0) == 64
    lowered = [backend("b1", hard_limit=8)]
    a.follow(lowered)
    b.follow(lowered)
    assert _reserved(a, "b1", 0) == 5
    assert [b.acquire(lowered[0]) for _ in range(4)] == [True, True, True, False]
    unlimited = [backend("b1")]
    a.follow(unlimited)
    b.follow(unlimited)
    assert _reserved(a, "b1") == 0
    assert all(a.acquire(unlimited[0]) for _ in range(5))
    # a now holds 10 and b 3; the limit comes back at 12 and b sees it
    # first: a's connections count although a holds no room yet.
    back = backend("b1", hard_limit=12)
    b.follow([back])
    assert not b.acquire(back)
    a.release("b1")
    assert not b.acquire(back)
    a.release("b1")
    assert b.acquire(back)
    assert not a.acquire(back)
    assert a.counters.total(a.counters.lookup("b1")) == 12


def test_dead_workers_room_is_freed_with_its_row() -> None:
    """
    Clearing a dead worker's row frees the room it reserved under a hard
    limit along with its connections.
    """
    a, b = _tables(2)
    limited = backend("b1", hard_limit=10)
    assert all(a.acquire(limited) for _ in range(10))
    assert not b.acquire(limited)
    a.counters.clearWorker(0)
    assert _reserved(b, "b1") == 0
    assert all(b.acquire(limited) for _ in range(10))
    assert not b.acquire(limited)
