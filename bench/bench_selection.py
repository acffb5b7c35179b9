"""
Micro-benchmark of L{edgeproxy.routing.selection.select}.

Builds snapshots of 10, 1,000 and 10,000 backends spread over countries,
regions and apps, and times one call of C{select} in a few typical cases.
Prints the median (and 90th percentile) in microseconds per call.

    PYTHONPATH=. python bench/bench_selection.py [--repeat 200] [--number 200]

Not a test: timing on a shared machine is noisy.
"""

from __future__ import annotations

import argparse
import random
import statistics
import timeit
from typing import Callable, List, Tuple

from edgeproxy.model import Backend, GeoInfo, RoutingSnapshot
from edgeproxy.routing.selection import select

REGIONS = ["sa", "us", "eu", "ap"]


def build(n: int, countries: int = 50, apps: int = 10) -> Tuple[RoutingSnapshot, List[str]]:
    """
    C{n} backends round-robin over C{countries} countries (each in one of
    the four regions) and C{apps} apps; 1 in 20 unhealthy.
    """
    names = [f"C{i:02d}" for i in range(countries)]
    rows = []
    for i in range(n):
        country = names[i % countries]
        region = REGIONS[(i % countries) % len(REGIONS)]
        rows.append(
            Backend(
                id=f"b{i}",
                app=f"app{(i // countries) % apps}",
                region=region,
                country=country,
                host="10.0.0.1",
                port=9000,
                healthy=i % 20 != 7,
                weight=1 + i % 3,
                soft_limit=10 + i % 7,
                hard_limit=0 if i % 5 else 50,
            )
        )
    return RoutingSnapshot.build(rows), names


def cases(
    snapshot: RoutingSnapshot, names: List[str]
) -> List[Tuple[str, Callable[[], Backend | None]]]:
    rng = random.Random(1)
    ids = [b.id for b in snapshot.backends]
    load = {i: (hash(i) % 30) for i in ids[: len(ids) // 2]}
    probe = snapshot.backends[min(5, len(ids) - 1)]
    app = probe.app
    geo = GeoInfo(probe.country, probe.region)
    region_only = GeoInfo("ZZ", probe.region)
    foreign = GeoInfo("ZZ", "zz")
    return [
        ("app, country hit", lambda: select(snapshot, app, geo, "us", load, rng)),
        ("no app, country hit", lambda: select(snapshot, None, geo, "us", load, rng)),
        ("app, region hit", lambda: select(snapshot, app, region_only, "us", load, rng)),
        ("app, no geo (local)", lambda: select(snapshot, app, None, "eu", load, rng)),
        ("app, nothing near", lambda: select(snapshot, app, foreign, "xx", load, rng)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--number", type=int, default=200)
    args = parser.parse_args()
    print("select(): microseconds per call (lower is better)")
    print(f"{'backends':>8}  {'case':<22} {'median us':>10} {'p90 us':>8}")
    for n in (10, 1000, 10000):
        snapshot, names = build(n)
        for name, fn in cases(snapshot, names):
            assert fn() is not None, (n, name)
            times = timeit.repeat(fn, repeat=args.repeat, number=args.number)
            per = sorted(t / args.number * 1e6 for t in times)
            p90 = per[int(len(per) * 0.9)]
            print(f"{n:>8}  {name:<22} {statistics.median(per):>10.2f} {p90:>8.2f}")


if __name__ == "__main__":
    main()
