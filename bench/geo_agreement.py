"""
How far apart are GeoIP databases?  The share of random public IPv4
addresses on whose country two databases agree (issue 13's closing note).

    python bench/geo_agreement.py [--count 20000] [--seed 13] \\
        --db new=edgeproxy/data/geo-whois-asn-country.mmdb \\
        --db old=/path/to/GeoLite2-City.mmdb \\
        --db dbip=/path/to/dbip-country.mmdb [--db NAME=PATH ...]

Addresses are drawn uniformly from the IPv4 space with a seeded generator,
keeping only global unicast ones (no private, shared, loopback,
link-local, multicast, reserved or documentation ranges).  Each database is
read with edgeproxy's own reader (L{edgeproxy.geo.open_database}), so every
format counts the same way.  For every pair it prints: both give the same
country; both give a country and they differ; exactly one gives none; and,
where a third database was given, which side of a disagreement the others
take.  Without C{--db} it compares the shipped database with the 2018
GeoLite2 City of the C{maxminddb-geolite2} package, if installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import itertools
import os
import random
import sys
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from edgeproxy.geo import default_geoip_path, open_database


def addresses(count: int, seed: int) -> List[ipaddress.IPv4Address]:
    """
    C{count} distinct random global unicast IPv4 addresses.
    """
    rng = random.Random(seed)
    found: Dict[int, ipaddress.IPv4Address] = {}
    while len(found) < count:
        value = rng.getrandbits(32)
        address = ipaddress.IPv4Address(value)
        if address.is_global and not address.is_multicast and value not in found:
            found[value] = address
    return list(found.values())


def countries(path: str, ips: Sequence[ipaddress.IPv4Address]) -> List[Optional[str]]:
    """
    The country each database gives each address (C{None}: none).
    """
    database = open_database(path)
    try:
        return [database.lookup(ip)[0] for ip in ips]
    finally:
        database.close()


def _old_geolite2() -> Optional[str]:
    spec = importlib.util.find_spec("_maxminddb_geolite2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, "GeoLite2-City.mmdb")
        if os.path.isfile(path):
            return path
    return None


def compare(
    results: Dict[str, List[Optional[str]]],
) -> List[Tuple[str, str, float, float, float]]:
    """
    (a, b, agree, differ, one missing) shares for every pair.
    """
    rows = []
    for a, b in itertools.combinations(results, 2):
        total = len(results[a])
        agree = differ = 0
        for x, y in zip(results[a], results[b]):
            if x is not None and x == y:
                agree += 1
            elif x is not None and y is not None:
                differ += 1
        rows.append((a, b, agree / total, differ / total, (total - agree - differ) / total))
    return rows


def arbitration(
    results: Dict[str, List[Optional[str]]], a: str, b: str
) -> Dict[str, Tuple[int, int, int]]:
    """
    Where C{a} and C{b} both give a country and differ: for each other
    database, how often it sides with C{a}, with C{b}, or with neither.
    """
    out: Dict[str, Tuple[int, int, int]] = {}
    for judge in results:
        if judge in (a, b):
            continue
        with_a = with_b = neither = 0
        for x, y, z in zip(results[a], results[b], results[judge]):
            if x is None or y is None or x == y:
                continue
            if z == x:
                with_a += 1
            elif z == y:
                with_b += 1
            else:
                neither += 1
        out[judge] = (with_a, with_b, neither)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--db", action="append", default=[], metavar="NAME=PATH")
    args = parser.parse_args(argv)
    databases: Dict[str, str] = {}
    for item in args.db:
        name, sep, path = item.partition("=")
        if not sep:
            parser.error(f"--db wants NAME=PATH, got {item!r}")
        databases[name] = path
    if not databases:
        shipped, old = default_geoip_path(), _old_geolite2()
        if shipped is None or old is None:
            parser.error("give --db NAME=PATH (at least two)")
        databases = {"new": shipped, "old": old}
    if len(databases) < 2:
        parser.error("give at least two databases")
    ips = addresses(args.count, args.seed)
    results = {name: countries(path, ips) for name, path in databases.items()}
    print(f"{args.count} random global IPv4 addresses, seed {args.seed}")
    for name, path in databases.items():
        database = open_database(path)
        missing = sum(c is None for c in results[name]) / args.count
        print(f"  {name}: {database.describe()} ({path}); no country for {missing:.2%}")
        database.close()
    print(f"{'pair':<24} {'agree':>8} {'differ':>8} {'one none':>9}")
    for a, b, agree, differ, missing in compare(results):
        print(f"{a + ' / ' + b:<24} {agree:>8.2%} {differ:>8.2%} {missing:>9.2%}")
        for judge, (with_a, with_b, neither) in arbitration(results, a, b).items():
            print(
                f"    where they differ, {judge} sides with {a} {with_a},"
                f" with {b} {with_b}, with neither {neither}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
