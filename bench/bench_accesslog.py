"""
Micro-benchmark of the access log (L{edgeproxy.net.accesslog}).

  - nanoseconds per call, on the calling thread, of
      - C{AccessLog.record} (what a finished connection pays; the flush at
        every C{batchSize}-th record included, with a writer that does
        nothing so that only the reactor-thread side is timed);
      - today's C{_log.info(...)} line per connection (the one in
        C{ProxyClientProtocol._maybeFinish}), with the global log
        publisher having no observer, and with a text file observer
        (what C{twistd --logfile} installs) writing to a file;
      - for scale, a bare C{list.append} of a 12-tuple and a C{record}
        taking C{*fields};
  - records per second of the flush job (encoding and the one write),
    by the precompiled format that L{encode_records} uses and by
    C{json.dumps} of a dict per record (a prebuilt C{JSONEncoder}), to a
    real file.

    PYTHONPATH=. python bench/bench_accesslog.py [--records 100000] [--repeat 5]

Not a test: timing on a shared machine is noisy (best of C{--repeat}).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from typing import Any, Callable, Dict, List

from twisted.logger import Logger, LogPublisher, textFileLogObserver

from edgeproxy.net.accesslog import (
    AccessLog,
    Record,
    _prefix,
    encode_records,
    open_append,
)

T0 = 1_764_637_842.0


def sample(n: int) -> List[Record]:
    """
    C{n} records like real ones (distinct clients, a few backends).
    """
    out: List[Record] = []
    for i in range(n):
        start = T0 + i * 1e-4
        out.append(
            (
                start,
                start + 0.210734,
                f"203.0.{i >> 8 & 255}.{i & 255}",
                1024 + i % 60000,
                f"b{i % 10}",
                i % 3,
                "client-closed",
                512 + i,
                20480 + i,
                1,
                0.004211,
                "web",
            )
        )
    return out


class NullReactor:
    """
    Enough of a reactor for C{AccessLog} whose jobs succeed at once without
    running: the reactor-thread side of the flush only, with a writer that
    keeps up.
    """

    class Pool:
        def callInThreadWithCallback(self, onResult: Any, f: Any, *a: Any, **kw: Any) -> None:
            onResult(True, None)

    pool = Pool()

    def getThreadPool(self) -> Any:
        return self.pool

    def callFromThread(self, f: Any, *a: Any) -> None:
        f(*a)


class NullSink:
    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        pass


def best_ns(fn: Callable[[], None], loops: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter_ns()
        fn()
        best = min(best, (time.perf_counter_ns() - t) / loops)
    return best


def interleaved(
    candidates: Dict[str, Callable[[], None]], loops: int, repeat: int
) -> Dict[str, float]:
    """
    Best nanoseconds per loop of each candidate, timed in turn in each of
    C{repeat} rounds (so that a noisy moment hurts all alike).
    """
    best = {name: float("inf") for name in candidates}
    for _ in range(repeat):
        for name, fn in candidates.items():
            t = time.perf_counter_ns()
            fn()
            best[name] = min(best[name], (time.perf_counter_ns() - t) / loops)
    return best


def reactor_side(n: int, repeat: int, logfile: Any) -> Dict[str, float]:
    """
    Nanoseconds per finished connection of each way to note it, loop
    overhead (the same loop, building the same arguments) subtracted.
    """
    rs = sample(1000)
    log = AccessLog("/dev/null", NullReactor(), opener=lambda p: NullSink())

    class Batch:
        def __init__(self) -> None:
            self.batch: List[Any] = []

        def named(self, a, b, c, d, e, f, g, h, i, j, k, m) -> None:  # type: ignore[no-untyped-def]
            batch = self.batch
            batch.append((a, b, c, d, e, f, g, h, i, j, k, m))
            if len(batch) >= 1000:
                batch.clear()

        def star(self, *fields: Any) -> None:
            batch = self.batch
            batch.append(fields)
            if len(batch) >= 1000:
                batch.clear()

    target = Batch()

    def call(method: Callable[..., None]) -> Callable[[], None]:
        def run() -> None:
            for i in range(n):
                r = rs[i % 1000]
                method(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[10], r[11])

        return run

    def nothing(*fields: Any) -> None:
        pass

    def logger(observer: Any) -> Callable[[], None]:
        """
        The C{_log.info} of C{_maybeFinish}, through a publisher with
        C{observer} (or none).
        """
        publisher = LogPublisher()
        if observer is not None:
            publisher.addObserver(observer)
        log = Logger(namespace="edgeproxy.net.proxy", observer=publisher)

        def run() -> None:
            for i in range(n):
                r = rs[i % 1000]
                log.info(
                    "{client}:{client_port} via {backend}: {cause} after {duration}s,"
                    " {bytes_to_backend} bytes up, {bytes_to_client} bytes down,"
                    " {attempts} attempts",
                    client=r[2],
                    client_port=r[3],
                    backend=r[4],
                    bytes_to_backend=r[7],
                    bytes_to_client=r[8],
                    duration=round(r[1] - r[0], 3),
                    attempts=r[9],
                    cause=r[6],
                )

        return run

    candidates = {
        "loop": call(nothing),
        "record": call(log.record),
        "named": call(target.named),
        "star": call(target.star),
        "log-none": logger(None),
        "log-file": logger(textFileLogObserver(logfile)),
    }
    best = interleaved(candidates, n, repeat)
    loop = best.pop("loop")
    return {name: ns - loop for name, ns in best.items()}


_dict_encode = json.JSONEncoder(ensure_ascii=True, separators=(",", ":")).encode


def encode_dicts(records: List[Record]) -> bytes:
    """
    The alternative: one dict per record through C{json}.
    """
    prefixes: Dict[int, str] = {}
    get = prefixes.get
    lines = []
    for r in records:
        start, end, host, port, backend, tier, cause, up, down, attempts, connect, app = r
        e = int(end * 1000.0 + 0.001)
        s = int(start * 1000.0 + 0.001)
        es, ss = e // 1000, s // 1000
        lines.append(
            _dict_encode(
                {
                    "time": "%s%03dZ" % (get(es) or _prefix(prefixes, es), e % 1000),  # noqa: UP031
                    "start": "%s%03dZ" % (get(ss) or _prefix(prefixes, ss), s % 1000),  # noqa: UP031
                    "client": host or None,
                    "client_port": port if host else None,
                    "app": app,
                    "backend": backend,
                    "tier": tier,
                    "cause": cause,
                    "bytes_up": up,
                    "bytes_down": down,
                    "attempts": attempts,
                    "connect_s": None if connect is None else round(connect, 6),
                    "duration_s": round(end - start, 6),
                }
            )
        )
        lines.append("\n")
    return "".join(lines).encode("ascii")


def bench_flush(
    records: List[Record], repeat: int, encode: Callable[[List[Record]], bytes]
) -> float:
    """
    Records per second of encode plus one write, in batches of 1,000, to
    a real file.
    """
    with tempfile.TemporaryDirectory() as d:
        sink = open_append(os.path.join(d, "access.log"))
        best = float("inf")
        for _ in range(repeat):
            t = time.perf_counter()
            for i in range(0, len(records), 1000):
                sink.write(encode(records[i : i + 1000]))
            best = min(best, time.perf_counter() - t)
        sink.close()
    return len(records) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    n, repeat = args.records, args.repeat

    records = sample(10_000)
    assert [json.loads(line) for line in encode_records(records).splitlines()] == [
        json.loads(line) for line in encode_dicts(records).splitlines()
    ]

    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "twistd.log"), "w") as f:
            ns = reactor_side(n, repeat, f)
    print(f"per finished connection, on the calling thread (best of {repeat}, {n} calls,")
    print("call overhead subtracted):")
    print(f"  AccessLog.record (its flushes included)      {ns['record']:8.0f} ns")
    print(f"  for scale: method, 12 named parameters       {ns['named']:8.0f} ns")
    print(f"  for scale: method, *fields                   {ns['star']:8.0f} ns")
    print(f"  today's _log.info line, no observer          {ns['log-none']:8.0f} ns")
    print(f"  today's _log.info line, text file observer   {ns['log-file']:8.0f} ns")

    records = sample(n)
    print(f"flush job (encode + one write per 1000 records, {n} records, best of {repeat}):")
    fast = bench_flush(records, repeat, encode_records)
    print(f"  precompiled format (encode_records)  {fast:12,.0f} records/s")
    slow = bench_flush(records, repeat, encode_dicts)
    print(f"  json dict per record                 {slow:12,.0f} records/s")
    line = encode_records(records[:1])
    print(f"  bytes per line: {len(line)}")


if __name__ == "__main__":
    main()
