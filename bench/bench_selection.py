"""
Micro-benchmark of the routing decision: L{edgeproxy.routing.index.SelectionIndex.select}
(what the router runs) and the plain tier walk
L{edgeproxy.routing.selection.select_plain} (the reference).

Builds snapshots of 10, 1,000 and 10,000 backends spread over countries,
regions and apps, and times one call of C{select} in a few typical cases.
Prints the median (and 90th percentile) in microseconds per call.

Each case runs five ways: the selection index without RTT (column
"index": the scoring of SPEC section 3, the router's path with the RTT
term off), the selection index with an RTT table and C{rtt_weight=0.01}
("index w=0.01": the router's path with the default C{--rtt-weight}),
and the plain tier walk without an RTT table ("no rtt", the same scoring
as "index"), with an RTT table and C{rtt_weight=0} ("w=0", the term off),
and with C{rtt_weight=0.01} ("w=0.01", the same choice as "index
w=0.01").  The RTT table has three backends in four measured (the others
score as their tier's median).

    PYTHONPATH=. python bench/bench_selection.py [--repeat 200] [--number 200]

Not a test: timing on a shared machine is noisy.
"""

from __future__ import annotations

import argparse
import random
import statistics
import timeit
from typing import Callable, Dict, List, Tuple

from edgeproxy.model import Backend, GeoInfo, RoutingSnapshot
from edgeproxy.routing.index import SelectionIndex
from edgeproxy.routing.load import RttTable
from edgeproxy.routing.selection import select_plain

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


#: How each case is run: (column title, with an RTT table, rtt_weight);
#: the first two are the selection index.
MODES: List[Tuple[str, bool, float]] = [
    ("index", False, 0.0),
    ("index w=0.01", True, 0.01),
    ("no rtt", False, 0.0),
    ("w=0", True, 0.0),
    ("w=0.01", True, 0.01),
]


def cases(
    snapshot: RoutingSnapshot,
    names: List[str],
    with_rtt: bool = False,
    weight: float = 0.0,
    indexed: bool = False,
) -> List[Tuple[str, Callable[[], Backend | None]]]:
    rng = random.Random(1)
    ids = [b.id for b in snapshot.backends]
    load = {i: (hash(i) % 30) for i in ids[: len(ids) // 2]}
    rtt: Dict[str, float] = (
        {i: (n % 97) / 1000.0 for n, i in enumerate(ids) if n % 4} if with_rtt else {}
    )
    probe = snapshot.backends[min(5, len(ids) - 1)]
    app = probe.app
    geo = GeoInfo(probe.country, probe.region)
    region_only = GeoInfo("ZZ", probe.region)
    foreign = GeoInfo("ZZ", "zz")

    table = RttTable(rtt)
    index = SelectionIndex(snapshot, load, set(), table, table.changed) if indexed else None

    def call(app: str | None, geo: GeoInfo | None, local: str) -> Callable[[], Backend | None]:
        if index is not None:
            return lambda: index.select(app, geo, local, rng, rtt_weight=weight)
        if not with_rtt:
            return lambda: select_plain(snapshot, app, geo, local, load, rng)
        return lambda: select_plain(
            snapshot, app, geo, local, load, rng, rtt=rtt, rtt_weight=weight
        )

    return [
        ("app, country hit", call(app, geo, "us")),
        ("no app, country hit", call(None, geo, "us")),
        ("app, region hit", call(app, region_only, "us")),
        ("app, no geo (local)", call(app, None, "eu")),
        ("app, nothing near", call(app, foreign, "xx")),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--number", type=int, default=200)
    args = parser.parse_args()
    print("routing decision: microseconds per call, median (p90); lower is better")
    header = "".join(f" {title:>17}" for title, _, _ in MODES)
    print(f"{'backends':>8}  {'case':<22}{header}")
    for n in (10, 1000, 10000):
        snapshot, names = build(n)
        columns = [
            cases(snapshot, names, with_rtt, weight, indexed=i < 2)
            for i, (_, with_rtt, weight) in enumerate(MODES)
        ]
        for row in zip(*columns):
            name = row[0][0]
            cells = []
            for _, fn in row:
                assert fn() is not None, (n, name)
                times = timeit.repeat(fn, repeat=args.repeat, number=args.number)
                per = sorted(t / args.number * 1e6 for t in times)
                p90 = per[int(len(per) * 0.9)]
                cells.append(f" {statistics.median(per):>8.2f} ({p90:>6.2f})")
            print(f"{n:>8}  {name:<22}{''.join(cells)}")


if __name__ == "__main__":
    main()
