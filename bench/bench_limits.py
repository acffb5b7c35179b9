"""
Micro-benchmark of the per-client limiter (L{edgeproxy.net.limits}).

  - nanoseconds per C{admit()} + C{release()} for each configuration
    (concurrency only, rate only, both): a returning client that has no
    other connection open, a returning client that holds another one, new
    clients in a full table (each evicts the least recently used idle
    client), and a refused flood (one client over its limits, log lines
    suppressed); the clock is Twisted's reactor clock, as in production;
  - bytes per tracked client (tracemalloc, keys included), idle and busy;
  - milliseconds for C{sweep()} to forget a table of refilled clients,
    and microseconds for one that forgets nothing.

    PYTHONPATH=. python bench/bench_limits.py [--clients 100000] [--repeat 5]

Not a test: timing on a shared machine is noisy.
"""

from __future__ import annotations

import argparse
import gc
import time
import tracemalloc
from typing import Callable, List, Tuple

from twisted.internet import reactor
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock

from edgeproxy.net.limits import ClientLimiter

CLOCK: IReactorTime = reactor  # type: ignore[assignment]

CONFIGS: List[Tuple[str, dict[str, float]]] = [
    ("concurrency", {"max_connections": 100}),
    ("rate", {"rate": 1e9, "burst": 1e9}),
    ("both", {"max_connections": 100, "rate": 1e9, "burst": 1e9}),
]


def ips(n: int, offset: int = 0) -> List[str]:
    """
    C{n} distinct IPv4 addresses (as a transport gives them: new strings).
    """
    return [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(offset, offset + n)]


def timed(run: Callable[[], None], calls: int, repeat: int) -> float:
    """
    Best nanoseconds per call over C{repeat} runs of C{run} (which makes
    C{calls} calls), the garbage collector off as in C{timeit}: on a shared
    machine the best run is the one least disturbed.
    """
    times = []
    for _ in range(repeat):
        gc.disable()
        try:
            start = time.perf_counter_ns()
            run()
            times.append((time.perf_counter_ns() - start) / calls)
        finally:
            gc.enable()
    return min(times)


def bench_calls(clients: int, repeat: int) -> None:
    n = 200_000
    print(f"ns per admit()+release(), loop included (best of {repeat} runs of {n:,})")
    header = (
        f"{'limits':<12} {'returning, idle':>15} {'returning, busy':>15}"
        f" {'new (evicting)':>14} {'refused flood':>13} {'empty loop':>10}"
    )
    print(header)
    print("-" * len(header))
    fresh = ips(n, offset=clients)
    for name, kw in CONFIGS:
        row = []

        limiter = ClientLimiter(clock=CLOCK, max_clients=clients, **kw)  # type: ignore[arg-type]

        def returning(limiter: ClientLimiter = limiter) -> None:
            admit, release = limiter.admit, limiter.release
            key = "203.0.113.45"
            for _ in range(n):
                admit(key)
                release(key)

        row.append(timed(returning, n, repeat))

        limiter.admit("203.0.113.46")

        def busy(limiter: ClientLimiter = limiter) -> None:
            admit, release = limiter.admit, limiter.release
            key = "203.0.113.46"
            for _ in range(n):
                admit(key)
                release(key)

        row.append(timed(busy, n, repeat))

        new_times: List[float] = []
        for _ in range(repeat):
            table = ClientLimiter(clock=CLOCK, max_clients=clients, **kw)  # type: ignore[arg-type]
            for key in ips(clients):
                table.admit(key)
                table.release(key)
            admit, release = table.admit, table.release
            gc.disable()
            start = time.perf_counter_ns()
            for key in fresh:
                admit(key)
                release(key)
            new_times.append((time.perf_counter_ns() - start) / n)
            gc.enable()
            assert len(table) == clients and table.stats().evicted == n
        row.append(min(new_times))

        flood_kw = dict(kw)
        if "max_connections" in flood_kw:
            flood_kw["max_connections"] = 1
        if "rate" in flood_kw:
            flood_kw["rate"], flood_kw["burst"] = 1.0, 1.0
        flooded = ClientLimiter(clock=CLOCK, max_clients=clients, log_lines=0, **flood_kw)  # type: ignore[arg-type]
        flooded.admit("198.51.100.7")

        def flood(limiter: ClientLimiter = flooded) -> None:
            admit = limiter.admit
            key = "198.51.100.7"
            for _ in range(n):
                admit(key)

        row.append(timed(flood, n, repeat))
        assert flooded.stats().suppressed >= n

        def empty() -> None:
            key = "203.0.113.45"
            for _ in range(n):
                len(key)
                len(key)

        row.append(timed(empty, n, repeat))
        print(
            f"{name:<12} {row[0]:>15.0f} {row[1]:>15.0f} {row[2]:>14.0f} {row[3]:>13.0f}"
            f" {row[4]:>10.0f}"
        )
    print("(refused flood: admit() only; empty loop: the loop with two len() calls)")
    print()


def bytes_per_client(kw: dict[str, float], n: int, release: bool) -> float:
    """
    Bytes tracemalloc sees held by a limiter tracking C{n} clients (their
    address strings included), per client.
    """
    gc.collect()
    tracemalloc.start()
    limiter = ClientLimiter(clock=CLOCK, max_clients=n, **kw)  # type: ignore[arg-type]
    for key in ips(n):
        limiter.admit(key)
        if release:
            limiter.release(key)
    size, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(limiter) == n
    del limiter
    return size / n


def bench_memory(sizes: List[int]) -> None:
    print("bytes per tracked client (tracemalloc; address strings included)")
    header = f"{'clients':>10}  {'limits':<12} {'idle':>7} {'busy':>7}"
    print(header)
    print("-" * len(header))
    for n in sizes:
        for name, kw in CONFIGS:
            idle = bytes_per_client(kw, n, release=True)
            busy = bytes_per_client(kw, n, release=False) if "max_connections" in kw else 0.0
            print(f"{n:>10,}  {name:<12} {idle:>7.1f} {busy or float('nan'):>7.1f}")
    print()


def bench_sweep(clients: int, repeat: int) -> None:
    times = []
    for _ in range(repeat):
        clock = Clock()
        limiter = ClientLimiter(
            max_connections=10, rate=10.0, clock=clock, max_clients=clients, log_interval=10.0
        )
        for key in ips(clients):
            limiter.admit(key)
            limiter.release(key)
        clock.advance(60)
        gc.disable()
        start = time.perf_counter()
        freed = limiter.sweep()
        times.append(time.perf_counter() - start)
        gc.enable()
        assert freed == clients and len(limiter) == 0
        keep = ClientLimiter(rate=10.0, clock=clock, max_clients=clients)
        for key in ips(clients):
            keep.admit(key)
    kept = float("inf")
    for _ in range(100):
        kept_start = time.perf_counter()
        freed = keep.sweep()
        kept = min(kept, time.perf_counter() - kept_start)
        assert freed == 0
    print(
        f"sweep(): {min(times) * 1e3:.1f} ms to forget {clients:,} refilled"
        f" idle clients; {kept * 1e6:.1f} µs when the oldest is still refilling"
    )
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--clients", type=int, default=100_000, help="table size")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--memory-sizes", type=int, nargs="+", default=[100_000, 1_000_000], metavar="N"
    )
    args = parser.parse_args()
    bench_calls(args.clients, args.repeat)
    bench_memory(args.memory_sizes)
    bench_sweep(args.clients, args.repeat)


if __name__ == "__main__":
    main()
