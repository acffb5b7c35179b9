"""
Micro-benchmark of the binding table (L{edgeproxy.routing.bindings}).

  - C{removeBackends} of one backend holding 1% of the bindings and of a
    backend holding none, in tables of 200,000 and 1,000,000 bindings,
    against the algorithm it replaced (a scan of the whole table, timed
    here on a plain C{OrderedDict} like the one the old table held);
  - bytes per binding (tracemalloc, keys included) of the table, and of the bare
    C{OrderedDict} that was all the old table held;
  - nanoseconds per call of C{client_key} for IPv4, IPv4-mapped and IPv6
    clients (one client again and again: cache hits; 100,000 different
    clients: cache misses).

    PYTHONPATH=. python bench/bench_bindings.py [--sizes 200000 1000000] [--repeat 5]

Not a test: timing on a shared machine is noisy.  Each binding is made
with its own float time, shared by C{created} and C{last_seen} (a refreshed
binding holds one more float, 24 bytes, old and new alike).
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
import timeit
import tracemalloc
from collections import OrderedDict
from typing import AbstractSet, Callable, Dict, List

from edgeproxy.model import Binding, BindingKey
from edgeproxy.routing.bindings import BindingTable, client_key

BACKENDS = 100
"""Bindings spread round-robin over this many backends: each holds 1%."""


def keys(n: int) -> List[BindingKey]:
    """
    C{n} distinct (IPv4 client, app) keys.
    """
    return [(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", "app") for i in range(n)]


def backend_of(i: int) -> str:
    return f"b{i % BACKENDS}"


def old_remove_backends(
    bindings: OrderedDict[BindingKey, Binding], backend_ids: AbstractSet[str]
) -> Dict[str, int]:
    """
    The algorithm C{removeBackends} had before the index: one scan of the
    whole table.
    """
    doomed = [(k, b.backend_id) for k, b in bindings.items() if b.backend_id in backend_ids]
    freed: Dict[str, int] = {}
    for k, backend_id in doomed:
        del bindings[k]
        freed[backend_id] = freed.get(backend_id, 0) + 1
    return freed


def build_old(ks: List[BindingKey]) -> OrderedDict[BindingKey, Binding]:
    bindings: OrderedDict[BindingKey, Binding] = OrderedDict()
    for i, key in enumerate(ks):
        now = 1e9 + i * 1e-3
        bindings[key] = Binding(backend_id=backend_of(i), created=now, last_seen=now)
    return bindings


def build_new(ks: List[BindingKey]) -> BindingTable:
    table = BindingTable(ttl=600.0, max_size=len(ks))
    for i, key in enumerate(ks):
        table.bind(key, backend_of(i), 1e9 + i * 1e-3)
    return table


def bytes_per_binding(build: Callable[[List[BindingKey]], object], n: int) -> float:
    """
    Bytes tracemalloc sees allocated by making C{n} keys and C{build}ing a
    table of them, and still held, per binding (the list of keys is taken
    off: a table holds its keys, not a list of them).
    """
    gc.collect()
    tracemalloc.start()
    ks = keys(n)
    held = build(ks)
    size, _ = tracemalloc.get_traced_memory()
    list_size = ks.__sizeof__()
    tracemalloc.stop()
    del held, ks
    return (size - list_size) / n


def time_removal(remove: Callable[[], int], restore: Callable[[], None], repeat: int) -> float:
    """
    Median seconds of C{remove()}, with C{restore()} (untimed) after each;
    the garbage collector is off while timing, as in C{timeit}.
    """
    times = []
    for _ in range(repeat):
        gc.disable()
        try:
            start = time.perf_counter()
            remove()
            times.append(time.perf_counter() - start)
        finally:
            gc.enable()
        restore()
    return statistics.median(times)


def bench_remove(sizes: List[int], repeat: int) -> None:
    print("removeBackends({one backend}): median ms per call (lower is better)")
    header = f"{'bindings':>10}  {'backend holds':>13}  {'old (scan) ms':>13}  {'new ms':>9}"
    print(header)
    print("-" * len(header))
    for n in sizes:
        ks = keys(n)
        held = [k for i, k in enumerate(ks) if backend_of(i) == "b0"]
        results: Dict[str, List[float]] = {}

        old = build_old(ks)

        def old_restore(
            bindings: OrderedDict[BindingKey, Binding] = old, held: List[BindingKey] = held
        ) -> None:
            for key in held:
                bindings[key] = Binding(backend_id="b0", created=2e9, last_seen=2e9)

        for name, ids in (("1%", frozenset({"b0"})), ("none", frozenset({"absent"}))):

            def old_remove(
                bindings: OrderedDict[BindingKey, Binding] = old, ids: AbstractSet[str] = ids
            ) -> int:
                return sum(old_remove_backends(bindings, ids).values())

            results[name] = [time_removal(old_remove, old_restore, repeat)]
        del old

        table = build_new(ks)

        def new_restore(table: BindingTable = table, held: List[BindingKey] = held) -> None:
            for key in held:
                table.bind(key, "b0", 2e9)

        for name, ids in (("1%", frozenset({"b0"})), ("none", frozenset({"absent"}))):

            def new_remove(table: BindingTable = table, ids: AbstractSet[str] = ids) -> int:
                return sum(table.removeBackends(ids).values())

            results[name].append(time_removal(new_remove, new_restore, repeat))
        assert table.removeBackend("b0") == len(held)
        del table

        for name, (old_s, new_s) in results.items():
            label = f"{name} ({len(held) if name == '1%' else 0:,})"
            print(f"{n:>10,}  {label:>13}  {old_s * 1e3:>13.2f}  {new_s * 1e3:>9.3f}")
    print()


def bench_memory(sizes: List[int]) -> None:
    print(f"bytes per binding (tracemalloc; keys included; {BACKENDS} backends)")
    header = f"{'bindings':>10}  {'old: OrderedDict':>16}  {'new: table+index':>16}  {'index':>7}"
    print(header)
    print("-" * len(header))
    for n in sizes:
        old = bytes_per_binding(build_old, n)
        new = bytes_per_binding(build_new, n)
        print(f"{n:>10,}  {old:>16.1f}  {new:>16.1f}  {new - old:>7.1f}")
    print()


def bench_client_key(repeat: int) -> None:
    print("client_key(ip): ns per call, loop included (median of runs)")
    rng = random.Random(1)
    distinct = [
        f"2001:db8:{rng.randrange(65536):x}:{rng.randrange(65536):x}::{rng.randrange(65536):x}"
        for _ in range(100_000)
    ]
    cases = [
        ("IPv4", ["203.0.113.45"] * 100_000),
        ("IPv4-mapped, one client", ["::ffff:203.0.113.45"] * 100_000),
        ("IPv6, one client", ["2001:db8:1:2:aaaa:bbbb:cccc:dddd"] * 100_000),
        ("IPv6, 100,000 clients", distinct),
    ]

    def identity(ip: str, prefix: int = 64) -> str:
        return ip

    header = f"{'case':<26} {'client_key ns':>13} {'empty call ns':>13}"
    print(header)
    print("-" * len(header))
    for name, ips in cases:
        row = []
        for fn in (client_key, identity):

            def run(fn: Callable[[str, int], str] = fn, ips: List[str] = ips) -> None:
                for ip in ips:
                    fn(ip, 64)

            run()  # warm the cache, as steady traffic would
            times = timeit.repeat(run, number=1, repeat=repeat)
            row.append(statistics.median(times) / len(ips) * 1e9)
        print(f"{name:<26} {row[0]:>13.0f} {row[1]:>13.0f}")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--sizes", type=int, nargs="+", default=[200_000, 1_000_000])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-memory", action="store_true", help="skip the tracemalloc part")
    args = parser.parse_args()
    bench_remove(args.sizes, args.repeat)
    if not args.no_memory:
        bench_memory(args.sizes)
    bench_client_key(args.repeat)


if __name__ == "__main__":
    main()
