# -*- test-case-name: tests.test_accesslog -*-
"""
The access log: one JSON object per finished connection, in a file.

The session's only cost is L{AccessLog.record}: one tuple of the raw fields
appended to a list, on the reactor thread.  Every C{interval} seconds
(L{AccessLog.flush}, driven by L{AccessLogService}) or when a batch reaches
C{batchSize} records, the batch is handed to the reactor's thread pool,
which encodes it to JSON lines and writes it with one C{write} call (an
C{O_APPEND} file descriptor: one C{write(2)} per batch).  At most one job
runs at a time; batches flushed meanwhile wait, in order, and are written
together by the next job.  If the disk stalls, no more than C{maxPending}
records wait: the oldest beyond that are dropped and counted
(C{access_log_dropped}, label C{overflow}), with one warning per episode.
The reactor thread never waits on the file.

L{AccessLog.reopen} (for logrotate's move-then-signal: L{install_sigusr1})
opens the path again and closes the old descriptor, as a job in the same
queue, so that every record before it goes to the old file and every
record after it to the new one.

One line, keys always present and in this order (compact separators,
ASCII only: anything else is escaped)::

    {"time":"2026-12-02T01:10:42.123Z","start":"2026-12-02T01:10:41.912Z",
     "client":"203.0.113.7","client_port":51234,"app":"web","backend":"b1",
     "tier":0,"cause":"client-closed","bytes_up":512,"bytes_down":20480,
     "attempts":1,"connect_s":0.004211,"duration_s":0.210734}

(one line in the file; wrapped here).  C{time} is when the connection
ended, C{start} when it was accepted (ISO 8601, UTC, milliseconds);
C{client} and C{client_port} are C{null} for a client without an IP
address; C{backend} is C{null} if no backend was chosen; C{tier} (the geo
tier of the choice) and C{app} may be C{null}; C{connect_s} (accept to
backend connected) is C{null} if no backend connected; C{duration_s} is
C{time - start}.  Durations are seconds with six decimals.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections import deque
from json.encoder import encode_basestring_ascii
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional, Protocol, Tuple, Union

from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from edgeproxy.interfaces import IMetricsStore

__all__ = [
    "ACCESS_LOG_SERVICE",
    "FIELDS",
    "KEYS",
    "AccessLog",
    "AccessLogError",
    "AccessLogService",
    "Opener",
    "Record",
    "Sink",
    "encode_records",
    "install_sigusr1",
    "open_append",
]

_log = Logger()

ACCESS_LOG_SERVICE = "access-log"
"""The name of the L{AccessLogService} in the service tree."""

FIELDS = (
    "start",
    "end",
    "clientHost",
    "clientPort",
    "backend",
    "tier",
    "cause",
    "bytesUp",
    "bytesDown",
    "attempts",
    "connect",
    "app",
)
"""The positional arguments of L{AccessLog.record}, in order."""

KEYS = (
    "time",
    "start",
    "client",
    "client_port",
    "app",
    "backend",
    "tier",
    "cause",
    "bytes_up",
    "bytes_down",
    "attempts",
    "connect_s",
    "duration_s",
)
"""The keys of every JSON line, in order."""

Record = Tuple[
    float, float, str, int, Optional[str], Optional[int], str, int, int, int, Optional[float],
    Optional[str],
]  # fmt: skip
"""One record as L{AccessLog.record} stores it (the L{FIELDS}, in order)."""

MODE = 0o640
"""Permissions of a file the access log creates (whatever the umask)."""


class AccessLogError(Exception):
    """
    The access log file cannot be opened.  The message names the path and
    the reason.
    """


class Sink(Protocol):
    """
    Where encoded batches go: the open file.
    """

    def write(self, data: bytes) -> None:
        """
        Write all of C{data} (called in a thread-pool thread).

        @raise OSError: If it cannot.
        """

    def close(self) -> None:
        """
        Close the file.
        """


Opener = Callable[[str], Sink]


class _FileSink:
    """
    An C{O_APPEND} file descriptor.  C{write} is one C{write(2)} for the
    whole buffer unless the kernel takes less (not for a regular file).
    """

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]

    def close(self) -> None:
        os.close(self.fd)


def open_append(path: str) -> Sink:
    """
    Open C{path} for appending, creating it with mode L{MODE} (0640,
    whatever the umask) if it does not exist.  The default opener.

    @raise OSError: If it cannot.
    """
    flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC
    for _ in range(3):
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, MODE)
        except FileExistsError:
            pass
        else:
            try:
                os.fchmod(fd, MODE)
            except BaseException:
                os.close(fd)
                raise
            return _FileSink(fd)
        try:
            return _FileSink(os.open(path, flags))
        except FileNotFoundError:
            # Removed between the two opens: create it again.  (A missing
            # directory fails the O_CREAT open above instead.)
            continue
    # A dangling symbolic link: create its target.
    return _FileSink(os.open(path, flags | os.O_CREAT, MODE))


def _openError(path: str, error: OSError) -> AccessLogError:
    """
    A clear message for a file that cannot be opened.
    """
    directory = os.path.dirname(path)
    if isinstance(error, FileNotFoundError) and not os.path.isdir(directory):
        reason = f"directory {directory} does not exist"
    elif isinstance(error, NotADirectoryError):
        reason = f"{directory} is not a directory"
    elif isinstance(error, IsADirectoryError) or os.path.isdir(path):
        reason = "it is a directory"
    elif isinstance(error, PermissionError):
        reason = "permission denied"
    else:
        reason = error.strerror or str(error)
    return AccessLogError(f"cannot open access log {path} for writing: {reason}")


# --- encoding ---------------------------------------------------------------


_LINE = (
    '{"time":"%s%03dZ","start":"%s%03dZ","client":%s,"client_port":%s,"app":%s,"backend":%s,'
    '"tier":%s,"cause":%s,"bytes_up":%d,"bytes_down":%d,"attempts":%d,'
    '"connect_s":%s,"duration_s":%.6f}\n'
)

_json = json.JSONEncoder(ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode


def _prefix(cache: Dict[int, str], second: int) -> str:
    """
    The ISO 8601 UTC text of C{second} up to the decimal point, cached.
    """
    prefix = cache[second] = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))
    return prefix


def _iso(t: float) -> str:
    """
    C{t} (seconds since the epoch) as ISO 8601 UTC with milliseconds
    (truncated, to the microsecond).

    @raise ValueError: For a NaN.
    @raise OverflowError: For an infinity or a time out of range.
    """
    milli = int(t * 1000.0 + 0.001)
    return "%s%03dZ" % (_prefix({}, milli // 1000), milli % 1000)  # noqa: UP031


def _safeLine(r: Any) -> str:
    """
    One record of unexpected shape or types as a JSON line, never raising:
    what cannot be converted is C{null}.
    """

    def number(x: Any, kind: Callable[[Any], Any]) -> Any:
        try:
            value = kind(x)
        except Exception:
            return None
        if isinstance(value, float):
            return round(value, 6) if math.isfinite(value) else None
        return value

    def text(x: Any) -> Any:
        if x is None or isinstance(x, str):
            return x
        try:
            return str(x)
        except Exception:
            return None

    def iso(x: Any) -> Any:
        try:
            return _iso(float(x))
        except Exception:
            return None

    try:
        fields = list(r)
    except Exception:
        fields = []
    fields += [None] * (len(FIELDS) - len(fields))
    start, end, host, port, backend, tier, cause, up, down, attempts, connect, app = fields[
        : len(FIELDS)
    ]
    duration = number(end, float)
    if duration is not None:
        begin = number(start, float)
        duration = None if begin is None else number(duration - begin, float)
    line = {
        "time": iso(end),
        "start": iso(start),
        "client": text(host) or None,
        "client_port": number(port, int) if host else None,
        "app": text(app),
        "backend": text(backend),
        "tier": number(tier, int),
        "cause": text(cause),
        "bytes_up": number(up, int),
        "bytes_down": number(down, int),
        "attempts": number(attempts, int),
        "connect_s": number(connect, float),
        "duration_s": duration,
    }
    return _json(line) + "\n"


def encode_records(records: Iterable[Any]) -> bytes:
    """
    Records (see L{FIELDS}) as JSON lines (see the module docstring),
    ASCII-encoded.

    Records of the expected types take a precompiled format (strings
    through the C{json} module's escaper, so that anything from the network
    is quoted and escaped); any other record (the wrong length, a string
    for a number, a NaN or an infinity) is encoded field by field by
    L{_safeLine}, so that one bad record costs its own bad fields and
    nothing else.
    """
    prefixes: Dict[int, str] = {}
    get = prefixes.get
    enc = encode_basestring_ascii
    line = _LINE
    lines: List[str] = []
    append = lines.append
    for r in records:
        try:
            start, end, host, port, backend, tier, cause, up, down, attempts, connect, app = r
            e = int(end * 1000.0 + 0.001)
            s = int(start * 1000.0 + 0.001)
            es = e // 1000
            ss = s // 1000
            if connect is None:
                c = "null"
            elif connect - connect == 0.0:  # finite
                c = "%.6f" % connect  # noqa: UP031
            else:
                raise ValueError(connect)
            append(
                line
                % (
                    get(es) or _prefix(prefixes, es),
                    e % 1000,
                    get(ss) or _prefix(prefixes, ss),
                    s % 1000,
                    enc(host) if host else "null",
                    "%d" % port if host else "null",  # noqa: UP031
                    "null" if app is None else enc(app),
                    "null" if backend is None else enc(backend),
                    "null" if tier is None else "%d" % tier,  # noqa: UP031
                    enc(cause),
                    up,
                    down,
                    attempts,
                    c,
                    end - start,
                )
            )
        except Exception:
            append(_safeLine(r))
    return "".join(lines).encode("ascii")


def _writeBatch(sink: Sink, records: List[Record]) -> None:
    """
    In a thread-pool thread: encode C{records} and write them in one call.
    """
    sink.write(encode_records(records))


def _reopenSink(opener: Opener, path: str, old: Sink) -> Sink:
    """
    In a thread-pool thread: open C{path} afresh, then close C{old}.  If
    the open fails, C{old} stays open (and in use).
    """
    new = opener(path)
    try:
        old.close()
    except OSError:
        pass
    return new


# --- the log ----------------------------------------------------------------


class _Mark:
    """
    A point in the queue: its C{done} fires when every job before it is
    done.
    """

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done: Deferred[None] = Deferred()


class _Reopen(_Mark):
    """
    A reopen, queued in order with the batches.
    """

    __slots__ = ()


class _Close(_Mark):
    """
    The last job: close the file.
    """

    __slots__ = ()


_Job = Union[List[Record], _Mark]


class AccessLog:
    """
    Buffered JSON-lines access log.  Everything but the thread-pool jobs
    runs on the reactor thread.

    @ivar path: The file (absolute: twistd may change directory later).
    @ivar interval: Seconds between flushes (for L{AccessLogService}).
    @ivar batchSize: A batch of this many records is flushed at once.
    @ivar maxPending: At most this many records wait while a write runs;
        the oldest beyond it are dropped.
    @ivar dropped: Records dropped so far (any reason).
    @ivar reactor: Runs the jobs in its thread pool.
    """

    __slots__ = (
        "_batch",
        "_closed",
        "_closing",
        "_dropping",
        "_episodeDropped",
        "_failing",
        "_inFlight",
        "_jobs",
        "_metrics",
        "_opener",
        "_sink",
        "_waiting",
        "batchSize",
        "dropped",
        "interval",
        "maxPending",
        "path",
        "reactor",
    )

    def __init__(
        self,
        path: str,
        reactor: Any,
        metrics: IMetricsStore | None = None,
        *,
        interval: float = 1.0,
        batchSize: int = 1000,
        maxPending: int = 100_000,
        opener: Opener = open_append,
    ) -> None:
        """
        Open the file now, synchronously (call this before the reactor
        runs).

        @param reactor: Provides L{IReactorThreads} and
            L{IReactorFromThreads} (the jobs go to its thread pool).
        @param metrics: Where to count dropped records
            (C{access_log_dropped}, labelled C{overflow}, C{error} or
            C{closed}) and failed reopens (C{access_log_reopen_errors}).
        @param opener: Opens a path for appending (L{open_append}; tests
            inject others).

        @raise AccessLogError: The file cannot be opened for writing (a
            missing directory, a directory, no permission, ...).
        @raise ValueError: For a non-positive C{interval}, C{batchSize} or
            C{maxPending}.
        """
        if not interval > 0 or batchSize < 1 or maxPending < 1:
            raise ValueError("interval, batchSize and maxPending must be positive")
        path = os.path.abspath(path)
        try:
            sink = opener(path)
        except OSError as e:
            raise _openError(path, e) from None
        self.path = path
        self.interval = interval
        self.batchSize = batchSize
        self.maxPending = maxPending
        self.dropped = 0
        self.reactor: Any = reactor
        self._metrics = metrics
        self._opener = opener
        self._sink = sink
        self._batch: List[Record] = []
        self._jobs: Deque[_Job] = deque()
        self._waiting = 0
        self._inFlight = False
        self._dropping = False
        self._episodeDropped = 0
        self._failing = False
        self._closing: Optional[_Close] = None
        self._closed = False

    def __repr__(self) -> str:
        return f"<AccessLog {self.path} pending={self.pending()} dropped={self.dropped}>"

    # -- the reactor-thread API ----------------------------------------------

    def record(
        self,
        start: float,
        end: float,
        clientHost: str,
        clientPort: int,
        backend: Optional[str],
        tier: Optional[int],
        cause: str,
        bytesUp: int,
        bytesDown: int,
        attempts: int,
        connect: Optional[float],
        app: Optional[str],
    ) -> None:
        """
        Note one finished connection: no formatting, no I/O.

        @param start: When it was accepted (seconds since the epoch).
        @param end: When it ended (seconds since the epoch).
        @param clientHost: The client's IP address, or C{""} if it has none.
        @param clientPort: The client's port.
        @param backend: The id of the last backend chosen, or C{None}.
        @param tier: The geo tier of that choice, or C{None}.
        @param cause: Why it ended (one of L{edgeproxy.net.proxy.CAUSES}).
        @param bytesUp: Bytes relayed from the client to the backend.
        @param bytesDown: Bytes relayed from the backend to the client.
        @param attempts: Backend connect attempts.
        @param connect: Seconds from accept to backend connected, or
            C{None} if no backend connected.
        @param app: The listener's application name, or C{None}.
        """
        batch = self._batch
        batch.append(
            (
                start,
                end,
                clientHost,
                clientPort,
                backend,
                tier,
                cause,
                bytesUp,
                bytesDown,
                attempts,
                connect,
                app,
            )
        )
        if len(batch) >= self.batchSize:
            self.flush()

    def flush(self) -> None:
        """
        Hand the current batch to the writer.  Never raises (a
        L{LoopingCall}/L{TimerService} callable).
        """
        try:
            batch = self._batch
            if not batch:
                return
            self._batch = []
            if self._closed or self._closing is not None:
                self._drop(len(batch), "closed")
                return
            self._jobs.append(batch)
            self._waiting += len(batch)
            if self._waiting > self.maxPending:
                self._overflow()
            self._next()
        except Exception:
            _log.failure("access log {path}: flush failed", path=self.path)

    def reopen(self) -> "Deferred[None]":
        """
        Open the path again and close the old file (after logrotate moved
        it), in order with the writes: what was recorded before goes to the
        old file, what is recorded after to the new one.  If the path
        cannot be opened, the old file stays in use and the error is logged
        and counted (C{access_log_reopen_errors}).

        @return: Fires with C{None} once done (never fails).
        """
        if self._closed or self._closing is not None:
            return succeed(None)
        self.flush()
        job = _Reopen()
        self._jobs.append(job)
        self._next()
        return job.done

    def sync(self) -> "Deferred[None]":
        """
        Flush, and wait for the writes.

        @return: Fires with C{None} once everything recorded before the call
            is written (or dropped); never fails.
        """
        if self._closed or self._closing is not None:
            return self.close()
        self.flush()
        mark = _Mark()
        self._jobs.append(mark)
        self._next()
        return mark.done

    def close(self) -> "Deferred[None]":
        """
        Write everything recorded so far, then close the file.  Later
        records are dropped (counted with the label C{closed}).

        @return: Fires with C{None} once the file is closed (never fails).
        """
        if self._closing is not None:
            closing = self._closing
            d: Deferred[None] = Deferred()
            closing.done.addBoth(lambda _: d.callback(None))
            return d
        if self._closed:
            return succeed(None)
        self.flush()
        job = self._closing = _Close()
        self._jobs.append(job)
        self._next()
        result: Deferred[None] = Deferred()
        job.done.addBoth(lambda _: result.callback(None))
        return result

    def pending(self) -> int:
        """
        Records recorded and not yet handed to a write (the current batch
        and the queued ones).
        """
        return len(self._batch) + self._waiting

    # -- the queue -----------------------------------------------------------

    def _drop(self, count: int, reason: str) -> None:
        self.dropped += count
        if self._metrics is not None:
            self._metrics.increment("access_log_dropped", reason, count)

    def _overflow(self) -> None:
        """
        Drop the oldest waiting records beyond C{maxPending}.
        """
        excess = self._waiting - self.maxPending
        jobs = self._jobs
        dropped = 0
        index = 0
        while excess > 0 and index < len(jobs):
            job = jobs[index]
            if isinstance(job, _Mark):
                index += 1
                continue
            if len(job) <= excess:
                del jobs[index]
                n = len(job)
            else:
                n = excess
                del job[:n]
                index += 1
            excess -= n
            dropped += n
        self._waiting -= dropped
        self._drop(dropped, "overflow")
        self._episodeDropped += dropped
        if not self._dropping:
            self._dropping = True
            _log.warn(
                "access log {path}: writing is stalled, dropping the oldest records"
                " beyond {limit} waiting",
                path=self.path,
                limit=self.maxPending,
            )

    def _next(self) -> None:
        """
        Start the next job, if none runs.
        """
        if self._inFlight or not self._jobs:
            return
        jobs = self._jobs
        job = jobs.popleft()
        reactor = self.reactor
        pool = reactor.getThreadPool()
        d: Deferred[Any]
        if isinstance(job, _Close):
            d = deferToThreadPool(reactor, pool, self._sink.close)
            d.addBoth(self._reopened, job)
        elif isinstance(job, _Reopen):
            d = deferToThreadPool(reactor, pool, _reopenSink, self._opener, self.path, self._sink)
            d.addBoth(self._reopened, job)
        elif isinstance(job, _Mark):
            job.done.callback(None)
            self._next()
            return
        else:
            # Every batch waiting goes into this one write.
            while jobs and not isinstance(jobs[0], _Mark):
                more = jobs.popleft()
                assert not isinstance(more, _Mark)
                job.extend(more)
            self._waiting -= len(job)
            d = deferToThreadPool(reactor, pool, _writeBatch, self._sink, job)
            d.addBoth(self._written, len(job))
        self._inFlight = True
        d.addErrback(lambda f: _log.failure("access log {path}: bug", f, path=self.path))

    def _written(self, result: Union[Failure, None], count: int) -> None:
        self._inFlight = False
        try:
            if isinstance(result, Failure):
                self._drop(count, "error")
                if not self._failing:
                    self._failing = True
                    _log.error(
                        "access log {path}: write failed, {count} records lost: {error}",
                        path=self.path,
                        count=count,
                        error=result.value,
                    )
            else:
                if self._failing:
                    self._failing = False
                    _log.info("access log {path}: writing again", path=self.path)
                if self._dropping and self._waiting <= self.maxPending:
                    _log.info(
                        "access log {path}: writing again after dropping {count} records",
                        path=self.path,
                        count=self._episodeDropped,
                    )
                    self._dropping = False
                    self._episodeDropped = 0
        finally:
            self._next()

    def _reopened(self, result: Union[Sink, Failure, None], job: _Mark) -> None:
        self._inFlight = False
        try:
            if isinstance(job, _Close):
                self._closed = True
                self._closing = None
                if isinstance(result, Failure):
                    _log.error(
                        "access log {path}: close failed: {error}",
                        path=self.path,
                        error=result.value,
                    )
            elif isinstance(result, Failure):
                if self._metrics is not None:
                    self._metrics.increment("access_log_reopen_errors")
                error = result.value
                message = (
                    _openError(self.path, error) if isinstance(error, OSError) else repr(error)
                )
                _log.error(
                    "{message}; still writing to the file open before",
                    message=str(message),
                )
            elif result is not None:
                self._sink = result
                _log.info("access log {path} reopened", path=self.path)
        finally:
            job.done.callback(None)
            self._next()


# --- the service and the signal ---------------------------------------------


def install_sigusr1(reactor: Any, accesslog: AccessLog) -> Callable[[], None]:
    """
    Make SIGUSR1 reopen C{accesslog} (from the reactor thread), calling
    any Python handler that was there before as well (twistd's own, that
    rotates C{twistd.log} when it logs to a file).  Other signals are left
    alone.  Call it from the main thread.

    twistd installs its SIGUSR1 handler after C{makeService} and only if
    there is none yet: install this one when the service starts
    (L{AccessLogService} does), not in C{makeService}, to keep both.

    @param reactor: Provides C{callFromThread} (L{IReactorFromThreads}).
    @return: A function that puts the previous handler back (if ours is
        still the one installed).
    @raise ValueError: Not called from the main thread.
    """
    number = getattr(signal, "SIGUSR1", None)
    if number is None:
        return lambda: None
    previous = signal.getsignal(number)

    def handler(signum: int, frame: Any) -> None:
        reactor.callFromThread(accesslog.reopen)
        if callable(previous):
            previous(signum, frame)

    signal.signal(number, handler)

    def uninstall() -> None:
        if signal.getsignal(number) is handler:
            signal.signal(number, previous)

    return uninstall


class AccessLogService(TimerService):
    """
    Flush an L{AccessLog} every C{accesslog.interval} seconds while running;
    on start, make SIGUSR1 reopen it (unless C{sigusr1} is false); on stop,
    put the previous SIGUSR1 handler back, write what remains and close the
    file.  Add it to the top service before the listeners, so that it stops
    after them and logs the connections they close.

    @ivar accesslog: The log.
    @ivar clock: Drives the flushes (L{IReactorTime}); the log's reactor by
        default.
    """

    def __init__(self, accesslog: AccessLog, clock: Any = None, sigusr1: bool = True) -> None:
        TimerService.__init__(self, accesslog.interval, accesslog.flush)
        self.clock = accesslog.reactor if clock is None else clock
        self.accesslog = accesslog
        self.sigusr1 = sigusr1
        self._uninstall: Optional[Callable[[], None]] = None
        self.setName(ACCESS_LOG_SERVICE)

    def startService(self) -> None:
        """
        Start flushing; install the SIGUSR1 handler (now, not in
        C{makeService}: see L{install_sigusr1}).
        """
        TimerService.startService(self)
        if self.sigusr1:
            try:
                self._uninstall = install_sigusr1(self.accesslog.reactor, self.accesslog)
            except ValueError as e:
                _log.warn(
                    "access log {path}: SIGUSR1 will not reopen it: {error}",
                    path=self.accesslog.path,
                    error=e,
                )

    def stopService(self) -> "Deferred[None]":
        """
        Stop flushing, remove the SIGUSR1 handler, write everything and close.

        @return: Fires once the file is closed.
        """
        uninstall, self._uninstall = self._uninstall, None
        if uninstall is not None:
            uninstall()
        d: Deferred[Any] = maybeDeferred(TimerService.stopService, self)
        d.addBoth(lambda _: self.accesslog.close())
        return d
