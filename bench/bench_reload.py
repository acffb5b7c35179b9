"""
Reload cost of the routing table with 10,000 backends, SQLite and
PostgreSQL (issue 12).

For each store, a proxy is built by C{makeService} (on a
C{MemoryReactorClock}: the real service tree, with every listener the
proxy registers on the repository) on a table of C{--backends} rows.  Each
repetition changes one row (so that the reload is a change and the
listeners run), then times, apart:

  - B{off the reactor}: the store's blocking load, as the thread pool runs
    it (the query, the row validation, the snapshot's indexes);
  - B{on the reactor}: installing the new snapshot (the reload rules, the
    listeners: bindings invalidation, the metrics pruner...).

    PYTHONPATH=. python bench/bench_reload.py [--backends 10000] [--repeat 7]
        [--pg-url postgresql://...]

Without C{--pg-url}, a throw-away PostgreSQL server is started as the tests
do (C{tests/pgkit.py}: C{initdb} + C{pg_ctl} on a Unix socket); without
the PostgreSQL binaries that column is skipped.  Not a test: timings on a
shared machine are noisy; the table prints the median and the minimum.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Tuple

from twisted.internet.testing import MemoryReactorClock

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))


def rows(n: int) -> List[Tuple[Any, ...]]:
    """
    C{n} valid rows (id, app, region, country, wg_ip, port).
    """
    regions = ["sa", "us", "eu", "ap"]
    countries = ["BR", "US", "FR", "JP"]
    return [
        (
            f"b{i}",
            f"app{i % 50}",
            regions[i % 4],
            countries[i % 4],
            f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}",
            1000 + i % 60000,
        )
        for i in range(n)
    ]


COLUMNS = "id, app, region, country, wg_ip, port, healthy, weight, soft_limit, hard_limit, deleted"


def fill_sqlite(path: str, n: int) -> None:
    from edgeproxy.stores.sqlite import schema_sql

    conn = sqlite3.connect(path)
    conn.executescript(schema_sql())
    conn.executemany(
        f"INSERT INTO backends ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, 1, 1, 100, 0, 0)", rows(n)
    )
    conn.commit()
    conn.close()


def fill_postgres(url: str, n: int) -> None:
    import psycopg

    from edgeproxy.stores.postgres import schema_sql

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(schema_sql())
        with conn.cursor() as cur:
            with cur.copy(
                "COPY backends (id, app, region, country, wg_ip, port, healthy, weight,"
                " soft_limit, hard_limit, deleted) FROM STDIN"
            ) as copy:
                for row in rows(n):
                    copy.write_row((*row, 1, 1, 100, 0, 0))


def build(db: str, tmp: str) -> Any:
    """
    The proxy's service tree on C{db}, on a memory reactor.
    """
    from edgeproxy.tap import Options, makeService

    options = Options()
    options.parseOptions(
        [
            "--db", db, "--geoip-db", "none", "--health-check", "off",
            "--listen", "tcp:0:interface=127.0.0.1",
            "--state-file", os.path.join(tmp, "state.json"),
        ]
    )  # fmt: skip
    return makeService(options, reactor=MemoryReactorClock(), environ={})


def measure(
    repository: Any, change: Callable[[int], None], repeat: int
) -> Tuple[List[float], List[float]]:
    off: List[float] = []
    on: List[float] = []
    load = repository._blockingLoad()
    for i in range(repeat):
        change(i)
        t0 = time.perf_counter()
        result = load()
        t1 = time.perf_counter()
        repository._succeeded(result)
        t2 = time.perf_counter()
        assert repository.lastError is None
        off.append(t1 - t0)
        on.append(t2 - t1)
    return off, on


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--pg-url", default=None)
    args = parser.parse_args()
    results: Dict[str, Tuple[List[float], List[float]]] = {}

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "routing.db")
        fill_sqlite(path, args.backends)
        service = build(path, tmp)
        assert len(service.repository.current()) == args.backends

        def change_sqlite(i: int) -> None:
            with sqlite3.connect(path) as conn:
                conn.execute("UPDATE backends SET weight = ? WHERE id = 'b0'", (i + 2,))
            conn.close()

        results["SQLite"] = measure(service.repository, change_sqlite, args.repeat)

        server = None
        url = args.pg_url
        if url is None:
            try:
                import pgkit

                server = pgkit.PostgresServer()
                server.start()
                url = server.url(server.createDatabase(schema=False))
            except BaseException as e:  # pytest.skip is a BaseException
                print(f"PostgreSQL: skipped ({e})", file=sys.stderr)
                server = None
        try:
            if url is not None:
                import psycopg

                fill_postgres(url, args.backends)
                service = build(url, tmp)
                assert len(service.repository.current()) == args.backends

                def change_pg(i: int) -> None:
                    with psycopg.connect(url, autocommit=True) as conn:
                        conn.execute("UPDATE backends SET weight = %s WHERE id = 'b0'", (i + 2,))

                results["PostgreSQL"] = measure(service.repository, change_pg, args.repeat)
                service.repository.database.close()
        finally:
            if server is not None:
                server.stop()

    print(f"reload of {args.backends} backends, {args.repeat} repetitions (ms)")
    print(
        f"{'store':<12} {'off reactor median':>19} {'min':>8} {'on reactor median':>18} {'min':>8}"
    )
    for store, (off, on) in results.items():
        print(
            f"{store:<12} {statistics.median(off) * 1e3:>19.1f} {min(off) * 1e3:>8.1f}"
            f" {statistics.median(on) * 1e3:>18.1f} {min(on) * 1e3:>8.1f}"
        )


if __name__ == "__main__":
    main()
