"""
Tests for L{edgeproxy.net.accesslog}: the JSON-lines access log, on real
files, with the real reactor's thread pool.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Generator, List, Optional

import pytest
import pytest_twisted
from faultkit import EventCollector
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.logger import globalLogPublisher

from edgeproxy.metrics import MetricsStore
from edgeproxy.net.accesslog import (
    ACCESS_LOG_SERVICE,
    FIELDS,
    KEYS,
    MODE,
    AccessLog,
    AccessLogError,
    AccessLogService,
    Sink,
    encode_records,
    install_sigusr1,
    open_append,
)

T = 1796173842.123  # 2026-12-02T01:10:42.123Z

NAMESPACE = "edgeproxy.net.accesslog"


def fields(i: int = 0, **changes: Any) -> List[Any]:
    """
    The arguments of L{AccessLog.record} for a connection numbered C{i}
    (its client port and bytes say which it is).
    """
    values: Dict[str, Any] = {
        "start": T,
        "end": T + 0.25,
        "clientHost": "203.0.113.7",
        "clientPort": 10000 + i,
        "backend": "b1",
        "tier": 0,
        "cause": "client-closed",
        "bytesUp": i,
        "bytesDown": 2 * i,
        "attempts": 1,
        "connect": 0.004,
        "app": "web",
    }
    values.update(changes)
    return [values[name] for name in FIELDS]


def lines(path: Path) -> List[Dict[str, Any]]:
    """
    Every line of C{path}, parsed (each must be one JSON object).
    """
    text = path.read_bytes().decode("ascii")
    assert text == "" or text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def numbers(path: Path) -> List[int]:
    """
    The connection numbers (see L{fields}) of the lines of C{path}.
    """
    return [line["bytes_up"] for line in lines(path)]


class CountingSink:
    """
    A real L{open_append} file that counts its writes, and may hold each
    write (in its thread) until C{gate} is set.
    """

    def __init__(self, path: str, gate: Optional[threading.Event]) -> None:
        self.real = open_append(path)
        self.path = path
        self.gate = gate
        self.writes: List[bytes] = []
        self.entered = threading.Event()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(30), "test gate never opened"
        self.writes.append(data)
        self.real.write(data)

    def close(self) -> None:
        self.closed = True
        self.real.close()


class Opener:
    """
    An opener that keeps the sinks it made.
    """

    def __init__(self, gate: Optional[threading.Event] = None) -> None:
        self.gate = gate
        self.sinks: List[CountingSink] = []

    def __call__(self, path: str) -> Sink:
        sink = CountingSink(path, self.gate)
        self.sinks.append(sink)
        return sink

    def writes(self) -> List[bytes]:
        return [w for sink in self.sinks for w in sink.writes]


def until(
    predicate: Callable[[], bool], timeout: float = 20.0
) -> Generator[Deferred[None], None, None]:
    """
    Let the reactor run until C{predicate()} (for C{yield from} in an
    C{inlineCallbacks} test); fail after C{timeout} seconds.
    """
    waited = 0.0
    while not predicate():
        assert waited < timeout, "condition never became true"
        yield deferLater(reactor, 0.01, lambda: None)
        waited += 0.01


@pytest.fixture
def gate() -> Generator[threading.Event, None, None]:
    """
    An event that blocked writes wait on; set at teardown whatever happens,
    so that no thread-pool thread stays blocked.
    """
    event = threading.Event()
    yield event
    event.set()


@pytest.fixture
def logged() -> Generator[EventCollector, None, None]:
    """
    The access log's own log events.
    """
    collector = EventCollector(NAMESPACE)
    globalLogPublisher.addObserver(collector)
    yield collector
    globalLogPublisher.removeObserver(collector)


# --- the format ---------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_records_become_json_lines(tmp_path: Path):
    """
    Each record becomes one JSON object on its own line, with exactly the
    documented keys in the documented order: times in ISO 8601 UTC with
    milliseconds, durations in seconds to the microsecond, C{null} for
    what is missing (no backend, no tier, no connect, no app, a client
    without an IP address).
    """
    path = tmp_path / "access.log"
    log = AccessLog(str(path), reactor)
    log.record(
        T,
        T + 1.2345678,
        "2001:db8::1",
        443,
        "b7",
        2,
        "idle-timeout",
        100,
        2000,
        2,
        0.0123456,
        "web",
    )
    log.record(T, T + 0.5, "", 0, None, None, "no-backend", 0, 0, 0, None, None)
    yield log.close()
    text = path.read_text()
    assert text.count("\n") == 2
    first, second = (json.loads(line) for line in text.splitlines())
    assert list(first) == list(KEYS) and list(second) == list(KEYS)
    assert first == {
        "time": "2026-12-02T01:10:43.357Z",
        "start": "2026-12-02T01:10:42.123Z",
        "client": "2001:db8::1",
        "client_port": 443,
        "app": "web",
        "backend": "b7",
        "tier": 2,
        "cause": "idle-timeout",
        "bytes_up": 100,
        "bytes_down": 2000,
        "attempts": 2,
        "connect_s": 0.012346,
        "duration_s": 1.234568,
    }
    assert second == {
        "time": "2026-12-02T01:10:42.623Z",
        "start": "2026-12-02T01:10:42.123Z",
        "client": None,
        "client_port": None,
        "app": None,
        "backend": None,
        "tier": None,
        "cause": "no-backend",
        "bytes_up": 0,
        "bytes_down": 0,
        "attempts": 0,
        "connect_s": None,
        "duration_s": 0.5,
    }


def test_milliseconds_are_truncated():
    """
    The timestamps keep the millisecond the instant falls in (truncated,
    not rounded into the next second), including instants a float cannot
    hold exactly.
    """
    data = encode_records(
        [
            tuple(fields(start=T - 0.124, end=T + 0.876 - 1e-5)),
            tuple(fields(start=T, end=T + 0.877)),
        ]
    )
    first, second = (json.loads(line) for line in data.splitlines())
    assert first["start"] == "2026-12-02T01:10:41.999Z"
    assert first["time"] == "2026-12-02T01:10:42.998Z"
    assert second["time"] == "2026-12-02T01:10:43.000Z"


texts = st.text(st.characters(), max_size=40)


@given(host=texts.filter(bool), backend=texts, cause=texts, app=texts)
def test_strings_are_escaped(host: str, backend: str, cause: str, app: str):
    """
    Any string (quotes, backslashes, control characters, newlines, non-ASCII,
    lone surrogates) comes back unchanged from the JSON, the line stays one
    line, and the file is pure ASCII.
    """
    data = encode_records([tuple(fields(clientHost=host, backend=backend, cause=cause, app=app))])
    assert data.count(b"\n") == 1 and data.endswith(b"\n")
    data.decode("ascii")
    line = json.loads(data)
    assert (line["client"], line["backend"], line["cause"], line["app"]) == (
        host,
        backend,
        cause,
        app,
    )


def test_unexpected_fields_cost_only_themselves():
    """
    A record with fields of the wrong type, a NaN or infinite number, or the
    wrong number of fields still becomes a valid JSON line: what cannot be
    converted is C{null}, the rest is kept; the records around it are
    untouched.
    """
    records: List[Any] = [
        tuple(fields(1)),
        tuple(fields(2, bytesUp="2", clientPort="x", tier=1.0, connect=math.nan)),
        tuple(fields(3, end=math.inf)),
        tuple(fields(4, cause=b"bytes", backend=7)),
        (T, T + 1.0, "198.51.100.1"),
        tuple(fields(6)),
    ]
    out = [json.loads(line) for line in encode_records(records).decode("ascii").splitlines()]
    assert len(out) == 6 and all(list(line) == list(KEYS) for line in out)
    assert out[0] == json.loads(encode_records([records[0]]))
    assert out[5]["bytes_up"] == 6
    assert out[1]["bytes_up"] == 2 and out[1]["client_port"] is None
    assert out[1]["tier"] == 1 and out[1]["connect_s"] is None
    assert out[1]["duration_s"] == 0.25 and out[1]["bytes_down"] == 4
    assert out[2]["time"] is None and out[2]["duration_s"] is None
    assert out[2]["start"] == "2026-12-02T01:10:42.123Z"
    assert out[3]["cause"] == "b'bytes'" and out[3]["backend"] == "7"
    assert out[4]["client"] == "198.51.100.1" and out[4]["duration_s"] == 1.0
    assert out[4]["cause"] is None and out[4]["bytes_up"] is None


# --- batching -----------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_one_write_per_batch(tmp_path: Path):
    """
    A batch is written with one write: every C{batchSize} records (the
    batch is full), and on C{flush} for what there is; each write holds
    exactly its batch, in order.
    """
    path = tmp_path / "access.log"
    opener = Opener()
    log = AccessLog(str(path), reactor, batchSize=100, opener=opener)
    n = 0
    for _ in range(3):
        for _ in range(100):
            log.record(*fields(n))
            n += 1
        yield log.sync()
    for _ in range(7):
        log.record(*fields(n))
        n += 1
    assert len(opener.writes()) == 3
    log.flush()
    yield log.sync()
    writes = opener.writes()
    assert [w.count(b"\n") for w in writes] == [100, 100, 100, 7]
    assert b"".join(writes) == path.read_bytes()
    assert numbers(path) == list(range(n))
    yield log.close()


@pytest_twisted.inlineCallbacks
def test_batches_wait_in_order_and_are_written_together(tmp_path: Path, gate: threading.Event):
    """
    While a write runs, batches flushed meanwhile wait in order, and the next
    write takes them all at once; nothing is lost or reordered.
    """
    path = tmp_path / "access.log"
    opener = Opener(gate)
    log = AccessLog(str(path), reactor, batchSize=10, opener=opener)
    for i in range(10):
        log.record(*fields(i))
    yield from until(opener.sinks[0].entered.is_set)
    for i in range(10, 45):
        log.record(*fields(i))
    log.flush()
    assert log.pending() == 35
    gate.set()
    yield log.close()
    assert [w.count(b"\n") for w in opener.writes()] == [10, 35]
    assert numbers(path) == list(range(45))


@pytest_twisted.inlineCallbacks
def test_writes_run_off_the_reactor_thread(tmp_path: Path):
    """
    The encoding and the write happen in a thread-pool thread.
    """
    threads: List[threading.Thread] = []

    class Spy(CountingSink):
        def write(self, data: bytes) -> None:
            threads.append(threading.current_thread())
            super().write(data)

    log = AccessLog(str(tmp_path / "a.log"), reactor, opener=lambda p: Spy(p, None))
    log.record(*fields())
    yield log.close()
    assert threads and threading.current_thread() not in threads


@pytest_twisted.inlineCallbacks
def test_stalled_disk_never_blocks_and_drops_the_oldest(
    tmp_path: Path, gate: threading.Event, logged: EventCollector
):
    """
    A write that never ends blocks nothing on the reactor thread: records
    keep being accepted, the reactor keeps turning, no more than
    C{maxPending} records wait, the oldest beyond are dropped and counted
    (C{access_log_dropped}, C{overflow}) with one warning for the episode.
    When the disk moves again, what was kept is written, in order, and the
    end of the episode is logged.
    """
    path = tmp_path / "access.log"
    metrics = MetricsStore()
    opener = Opener(gate)
    log = AccessLog(str(path), reactor, metrics, batchSize=100, maxPending=1000, opener=opener)
    for i in range(100):
        log.record(*fields(i))
    yield from until(opener.sinks[0].entered.is_set)
    for i in range(100, 5000):
        log.record(*fields(i))
        if i % 250 == 0:
            log.flush()
    log.flush()
    # The reactor still runs timed calls while the write is stuck.
    yield deferLater(reactor, 0.01, lambda: None)
    assert log.pending() == 1000
    assert log.dropped == 3900
    assert metrics.counter("access_log_dropped", "overflow") == 3900
    warnings = [e for e in logged.events if "stalled" in e["log_format"]]
    assert len(warnings) == 1
    assert opener.sinks[0].writes == []
    gate.set()
    yield log.close()
    assert numbers(path) == list(range(100)) + list(range(4000, 5000))
    recovered = [e for e in logged.events if "after dropping" in e["log_format"]]
    assert len(recovered) == 1 and recovered[0]["count"] == 3900


@pytest_twisted.inlineCallbacks
def test_failed_write_is_counted_and_logged_once(tmp_path: Path, logged: EventCollector):
    """
    A write that fails (disk full, I/O error) loses its records, counted as
    C{access_log_dropped} C{error}, logged once for consecutive failures;
    the next write that succeeds says so, and later records are written.
    """
    path = tmp_path / "access.log"
    metrics = MetricsStore()
    failures = [OSError(28, "No space left on device")] * 2

    class Failing(CountingSink):
        def write(self, data: bytes) -> None:
            if failures:
                raise failures.pop()
            super().write(data)

    log = AccessLog(str(path), reactor, metrics, opener=lambda p: Failing(p, None))
    for i in range(3):
        log.record(*fields(i))
        yield log.sync()
    yield log.close()
    assert numbers(path) == [2]
    assert metrics.counter("access_log_dropped", "error") == 2 and log.dropped == 2
    errors = [e for e in logged.events if "write failed" in e["log_format"]]
    assert len(errors) == 1 and "No space" in str(errors[0]["error"])
    assert [e for e in logged.events if e["log_format"].endswith("writing again")]


def test_flush_never_raises(tmp_path: Path, logged: EventCollector):
    """
    C{flush} is safe to call from a L{LoopingCall}: an unexpected error (here
    a reactor whose thread pool is gone) is logged, not raised.
    """

    class Broken:
        def getThreadPool(self) -> Any:
            raise RuntimeError("no pool")

    log = AccessLog(str(tmp_path / "a.log"), Broken())
    log.record(*fields())
    log.flush()
    assert [e for e in logged.events if "log_failure" in e]


# --- reopen, SIGUSR1 ----------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_reopen_after_logrotate_moved_the_file(tmp_path: Path):
    """
    logrotate's move-then-signal: after the file is renamed and C{reopen}
    is called, later records go to a new file at the path, earlier ones are
    in the moved file, none lost or duplicated.
    """
    path = tmp_path / "access.log"
    log = AccessLog(str(path), reactor)
    for i in range(50):
        log.record(*fields(i))
    yield log.sync()
    for i in range(50, 70):
        log.record(*fields(i))
    path.rename(tmp_path / "access.log.1")
    yield log.reopen()
    for i in range(70, 100):
        log.record(*fields(i))
    yield log.close()
    assert numbers(tmp_path / "access.log.1") == list(range(70))
    assert numbers(path) == list(range(70, 100))
    assert stat.S_IMODE(path.stat().st_mode) == MODE


@pytest_twisted.inlineCallbacks
def test_reopen_is_in_order_with_writes(tmp_path: Path, gate: threading.Event):
    """
    A reopen asked for while a write is stuck waits for it and for every
    batch recorded before it: those still go to the moved file, the records
    after the reopen to the new one, and the old file is closed.
    """
    path = tmp_path / "access.log"
    opener = Opener(gate)
    log = AccessLog(str(path), reactor, batchSize=10, opener=opener)
    for i in range(10):
        log.record(*fields(i))
    yield from until(opener.sinks[0].entered.is_set)
    for i in range(10, 25):
        log.record(*fields(i))
    path.rename(tmp_path / "access.log.1")
    reopened = log.reopen()
    for i in range(25, 40):
        log.record(*fields(i))
    log.flush()
    assert not reopened.called
    gate.set()
    yield reopened
    yield log.close()
    assert numbers(tmp_path / "access.log.1") == list(range(25))
    assert numbers(path) == list(range(25, 40))
    assert [s.closed for s in opener.sinks] == [True, True]


@pytest_twisted.inlineCallbacks
def test_failed_reopen_keeps_the_old_file(tmp_path: Path, logged: EventCollector):
    """
    If the path cannot be opened again (here a directory took its place),
    the error is logged and counted and the records keep going to the file
    open before: nothing is lost.
    """
    path = tmp_path / "access.log"
    metrics = MetricsStore()
    log = AccessLog(str(path), reactor, metrics)
    log.record(*fields(0))
    path.rename(tmp_path / "access.log.1")
    path.mkdir()
    yield log.reopen()
    log.record(*fields(1))
    yield log.close()
    assert numbers(tmp_path / "access.log.1") == [0, 1]
    assert metrics.counter("access_log_reopen_errors") == 1
    errors = [e for e in logged.events if "still writing" in e["log_format"]]
    assert len(errors) == 1 and "is a directory" in errors[0]["message"]


@pytest.fixture
def sigusr1() -> Generator[None, None, None]:
    """
    Put SIGUSR1's handler (and SIGINT's and SIGTERM's) back after the test.
    """
    saved = {n: signal.getsignal(n) for n in (signal.SIGUSR1, signal.SIGINT, signal.SIGTERM)}
    yield
    for number, handler in saved.items():
        signal.signal(number, handler)


@pytest_twisted.inlineCallbacks
def test_sigusr1_reopens_and_chains(tmp_path: Path, sigusr1: None):
    """
    With the handler installed, a SIGUSR1 delivered to the process reopens
    the log (from the reactor thread) and calls the Python handler that was
    there before (as twistd's own, that rotates twistd.log); SIGINT and
    SIGTERM are untouched; uninstalling puts the previous handler back.
    """
    path = tmp_path / "access.log"
    log = AccessLog(str(path), reactor)
    calls: List[int] = []

    def previous(signum: int, frame: Any) -> None:
        calls.append(signum)

    signal.signal(signal.SIGUSR1, previous)
    others = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    uninstall = install_sigusr1(reactor, log)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == others
    log.record(*fields(0))
    yield log.sync()
    path.rename(tmp_path / "access.log.1")
    os.kill(os.getpid(), signal.SIGUSR1)
    yield from until(path.exists)
    log.record(*fields(1))
    yield log.close()
    uninstall()
    assert signal.getsignal(signal.SIGUSR1) is previous
    assert calls == [signal.SIGUSR1]
    assert numbers(tmp_path / "access.log.1") == [0]
    assert numbers(path) == [1]


@pytest_twisted.inlineCallbacks
def test_sigusr1_does_not_chain_the_default_action(tmp_path: Path, sigusr1: None):
    """
    When SIGUSR1 had its default action (terminate the process) or was
    ignored, the handler only reopens: the process survives the signal.
    """
    path = tmp_path / "access.log"
    log = AccessLog(str(path), reactor)
    for before in (signal.SIG_DFL, signal.SIG_IGN):
        signal.signal(signal.SIGUSR1, before)
        uninstall = install_sigusr1(reactor, log)
        path.rename(tmp_path / "moved.log")
        os.kill(os.getpid(), signal.SIGUSR1)
        yield from until(path.exists)
        uninstall()
        assert signal.getsignal(signal.SIGUSR1) == before
    yield log.close()


@pytest_twisted.inlineCallbacks
def test_service_flushes_installs_and_closes(tmp_path: Path, sigusr1: None):
    """
    L{AccessLogService} flushes every C{interval} on its clock, installs the
    SIGUSR1 handler when it starts (after twistd set up its own) and on stop
    puts the previous handler back and closes the log after writing
    everything.
    """
    path = tmp_path / "access.log"
    log = AccessLog(str(path), reactor, interval=5.0)
    clock = Clock()
    service = AccessLogService(log, clock)
    assert service.name == ACCESS_LOG_SERVICE
    before = signal.getsignal(signal.SIGUSR1)
    service.startService()
    assert signal.getsignal(signal.SIGUSR1) is not before
    log.record(*fields(0))
    clock.advance(5.0)
    assert log.pending() == 0
    log.record(*fields(1))
    yield service.stopService()
    assert signal.getsignal(signal.SIGUSR1) is before
    assert numbers(path) == [0, 1]


# --- close --------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_close_writes_everything(tmp_path: Path):
    """
    C{close} writes every record, flushed or not, then closes the file; a
    second C{close} is harmless; records after it are dropped and counted
    (C{access_log_dropped}, C{closed}).
    """
    path = tmp_path / "access.log"
    metrics = MetricsStore()
    opener = Opener()
    log = AccessLog(str(path), reactor, metrics, batchSize=1000, opener=opener)
    for i in range(2500):
        log.record(*fields(i))
    first, second = log.close(), log.close()
    yield first
    yield second
    assert numbers(path) == list(range(2500))
    assert opener.sinks[0].closed
    log.record(*fields(2500))
    log.flush()
    yield log.close()
    assert metrics.counter("access_log_dropped", "closed") == 1
    assert len(lines(path)) == 2500


# --- opening ------------------------------------------------------------------


def test_new_file_is_0640_and_appended(tmp_path: Path):
    """
    A new file is created with mode 0640 whatever the umask (twistd sets
    0077 when it daemonizes); an existing file keeps its mode and content
    and is opened with C{O_APPEND}.
    """
    path = tmp_path / "access.log"
    old = os.umask(0o077)
    try:
        sink = open_append(str(path))
    finally:
        os.umask(old)
    sink.write(b"one\n")
    sink.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    path.chmod(0o600)
    sink = open_append(str(path))
    fd: int = sink.fd  # type: ignore[attr-defined]
    assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND
    sink.write(b"two\n")
    sink.close()
    assert path.read_bytes() == b"one\ntwo\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_path_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """
    A relative path is resolved when the log is made: a later reopen (after
    twistd changed directory) still finds the same file.
    """
    monkeypatch.chdir(tmp_path)
    log = AccessLog("access.log", reactor)
    assert log.path == str(tmp_path / "access.log")
    log._sink.close()


def missing_directory(d: Path) -> Path:
    return d / "missing" / "access.log"


def a_directory(d: Path) -> Path:
    return d


def under_a_file(d: Path) -> Path:
    (d / "file").write_text("")
    return d / "file" / "access.log"


@pytest.mark.parametrize(
    "make, reason",
    [
        (missing_directory, "directory {d}/missing does not exist"),
        (a_directory, "it is a directory"),
        (under_a_file, "{d}/file is not a directory"),
    ],
)
def test_construction_errors_are_clear(tmp_path: Path, make: Callable[[Path], Path], reason: str):
    """
    A path that cannot be opened for writing (a missing directory, a
    directory, a file where a directory should be) is an L{AccessLogError}
    when the log is made (before the reactor runs), naming the path and why.
    """
    path = make(tmp_path)
    with pytest.raises(AccessLogError) as e:
        AccessLog(str(path), reactor)
    assert str(e.value) == (
        f"cannot open access log {path} for writing: {reason.format(d=tmp_path)}"
    )


def test_unwritable_file_is_a_clear_error(tmp_path: Path):
    """
    A file the process may not write is an L{AccessLogError} saying
    "permission denied" (the opener raises what C{open(2)} raises for a
    file of mode 0444 when not root).
    """
    path = tmp_path / "access.log"

    def opener(p: str) -> Sink:
        raise PermissionError(13, "Permission denied", p)

    with pytest.raises(AccessLogError, match=r"access log .*access\.log.*: permission denied"):
        AccessLog(str(path), reactor, opener=opener)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write a file of mode 0444")
def test_unwritable_file_is_a_clear_error_for_real(tmp_path: Path):
    """
    As L{test_unwritable_file_is_a_clear_error}, with a real file of mode
    0444.
    """
    path = tmp_path / "access.log"
    path.write_text("")
    path.chmod(0o444)
    with pytest.raises(AccessLogError, match="permission denied"):
        AccessLog(str(path), reactor)


def test_bad_settings():
    """
    A non-positive interval, batch size or bound is a C{ValueError}.
    """
    for kwargs in ({"interval": 0}, {"batchSize": 0}, {"maxPending": 0}, {"interval": math.nan}):
        with pytest.raises(ValueError):
            AccessLog("/dev/null", reactor, **kwargs)


# --- under twistd -------------------------------------------------------------

TAC = """
from twisted.application import service
from twisted.internet import reactor
from twisted.internet.task import LoopingCall

from edgeproxy.net.accesslog import AccessLog, AccessLogService

application = service.Application("accesslog-test")
log = AccessLog({path!r}, reactor, interval=0.05)
AccessLogService(log).setServiceParent(application)
count = [0]


def tick():
    n = count[0]
    count[0] += 1
    log.record(
        {start!r}, {start!r} + 1.0, "192.0.2.1", 1000, "b1", 0, "client-closed", n, 0, 1,
        0.001, "web",
    )


reactor.callWhenRunning(LoopingCall(tick).start, 0.005)
"""

ROOT = Path(__file__).resolve().parent.parent


def wait_for(predicate: Callable[[], bool], timeout: float = 60.0) -> None:
    """
    Sleep-poll (no reactor here) until C{predicate()}.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_under_twistd_sigusr1_reopens_and_rotates_twistd_log(tmp_path: Path):
    """
    In a real C{twistd -n} logging to a file: SIGUSR1 reopens the access
    log (after a move) and twistd still rotates its own log (our handler
    chains twistd's, installed after the application was made); SIGTERM
    still stops twistd cleanly and the stop writes every record: across
    the moved and the new file the records are exactly 0..N-1, each once.
    """
    path = tmp_path / "access.log"
    tac = tmp_path / "app.tac"
    tac.write_text(TAC.format(path=str(path), start=T))
    twistd_log = tmp_path / "twistd.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "-n",
            "--pidfile=",
            f"--logfile={twistd_log}",
            "-y",
            str(tac),
        ],
        cwd=str(tmp_path),
        env=env,
    )
    try:
        wait_for(lambda: path.exists() and len(lines(path)) >= 20)
        path.rename(tmp_path / "access.log.1")
        proc.send_signal(signal.SIGUSR1)
        wait_for(lambda: path.exists() and len(lines(path)) >= 20)
        wait_for((tmp_path / "twistd.log.1").exists)
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = twistd_log.read_text() + (tmp_path / "twistd.log.1").read_text()
    assert status in (0, -signal.SIGTERM), log
    assert "Traceback" not in log, log
    assert "reopened" in log
    old, new = numbers(tmp_path / "access.log.1"), numbers(path)
    assert old and new
    assert old + new == list(range(len(old) + len(new)))
