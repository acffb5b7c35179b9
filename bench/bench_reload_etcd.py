"""
Reload cost of the etcd routing table (L{edgeproxy.stores.etcd}) with
10,000 backends, against a real single-member etcd started here (from
C{tests/etcdkit.py}; needs C{apt-get install etcd-server}).

Measured, best of C{--repeat}:
  - off the reactor: the range read over HTTP (the stdlib client, as
    L{open_etcd} does before the reactor runs; C{reload} does the same
    request with treq), then JSON decoding, base64, validation and
    indexing (L{_decodeAndBuild}, what C{reload} runs in the thread pool);
  - on the reactor: installing the new snapshot (L{_install}: skipped-row
    bookkeeping, listeners, the swap) -- what a reload costs the thread
    that serves connections;
  - a watch burst: building a snapshot from 10,000 decoded entries after a
    batch of events (L{build_snapshot}; in the thread pool above
    C{INLINE_BUILD} keys, on the reactor below);
  - the offline cache write (in a thread).

    PYTHONPATH=.:tests python bench/bench_reload_etcd.py [--backends 10000] [--repeat 5]

Not a test: timing on a shared machine is noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any, Callable, List

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from etcdkit import EtcdCluster, b64

from edgeproxy.stores.etcd import (
    Credentials,
    EtcdBackendRepository,
    EtcdClient,
    _decodeAndBuild,
    blocking_read,
    build_snapshot,
    parse_etcd_url,
    write_cache,
)


def best(repeat: int, f: Callable[[], Any]) -> float:
    times: List[float] = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backends", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    cluster = EtcdCluster.start_new(size=1)
    try:
        prefix = "/bench"
        t0 = time.perf_counter()
        # Fill with transactions of 100 puts (etcd's default limit is 128).
        for start in range(0, args.backends, 100):
            ops = []
            for i in range(start, min(args.backends, start + 100)):
                value = {
                    "id": f"b-{i:05d}",
                    "app": f"app-{i % 50}",
                    "region": ("sa", "us", "eu", "ap")[i % 4],
                    "country": ("BR", "US", "FR", "JP")[i % 4],
                    "wg_ip": f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}",
                    "port": 8000 + i % 1000,
                    "healthy": 1,
                    "weight": 1 + i % 3,
                    "soft_limit": 100,
                    "hard_limit": 200,
                    "deleted": 0,
                }
                ops.append(
                    {
                        "request_put": {
                            "key": b64(f"{prefix}/backends/b-{i:05d}"),
                            "value": b64(json.dumps(value)),
                        }
                    }
                )
            cluster.request("/v3/kv/txn", {"success": ops})
        fill = time.perf_counter() - t0
        target = parse_etcd_url(cluster.url(prefix))
        credentials = Credentials()
        body: List[bytes] = []

        def read() -> None:
            body[:] = [blocking_read(target, credentials)[1]]

        http = best(args.repeat, read)
        size = len(body[0])
        decoded: List[Any] = []

        def decode() -> None:
            decoded[:] = [_decodeAndBuild(body[0], target)]

        decode_time = best(args.repeat, decode)
        table, built = decoded[0]
        assert len(built[0]) == args.backends, len(built[0])

        class FakeReactor:
            def seconds(self) -> float:
                return time.time()

        repository = EtcdBackendRepository(client=EtcdClient(reactor=FakeReactor(), target=target))
        repository.addListener(lambda old, new: None)
        install = best(args.repeat, lambda: repository._install(built, table.revision))
        # A changed table (one backend fewer): the content comparison and
        # the listener call too.
        fewer = dict(table.entries)
        fewer.pop(sorted(fewer)[0])
        other = build_snapshot(fewer)
        flip = [built, other]

        def changed() -> None:
            flip.reverse()
            repository._install(flip[0], table.revision)

        install_changed = best(args.repeat, changed)
        rebuild = best(args.repeat, lambda: build_snapshot(table.entries))
        directory = tempfile.mkdtemp()
        path = os.path.join(directory, "cache.db")
        cache = best(
            args.repeat,
            lambda: write_cache(path, built[0], built[2], built[3], "bench", table.revision),
        )
        print(f"{args.backends} backends, range answer {size / 1e6:.1f} MB (fill {fill:.1f} s)")
        print(f"off the reactor: HTTP range read      {http * 1000:8.1f} ms")
        print(f"off the reactor: JSON+validate+index  {decode_time * 1000:8.1f} ms")
        print(f"on the reactor:  snapshot install     {install * 1000:8.3f} ms (same content)")
        print(f"on the reactor:  snapshot install     {install_changed * 1000:8.3f} ms (changed)")
        print(f"off the reactor: watch-burst rebuild  {rebuild * 1000:8.1f} ms")
        print(f"in a thread:     offline cache write  {cache * 1000:8.1f} ms")
    finally:
        cluster.destroy()


if __name__ == "__main__":
    main()
