"""
Open many idle TCP connections and hold them: the client side of the
"memory per idle proxied connection" measure of C{bench/run.py}.

Usage::

    python bench/idle_client.py HOST PORT COUNT [--concurrency 32] [--hold 120]

Only C{127.0.0.1} (or C{::1}) is accepted as HOST.  Opens COUNT connections
(at most C{--concurrency} connects in flight, so a listen backlog is not
overrun), sends nothing, then prints one line C{READY <opened> <failed>} on
stdout and holds them until stdin is closed (or C{--hold} seconds pass),
then closes them all and exits.  Every step is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import time


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _main(host: str, port: int, count: int, concurrency: int, hold: float) -> int:
    loop = asyncio.get_running_loop()
    writers: list[asyncio.StreamWriter] = []
    failed = 0
    sem = asyncio.Semaphore(concurrency)
    deadline = time.monotonic() + 60.0  # opening phase bound

    async def one() -> None:
        nonlocal failed
        async with sem:
            if time.monotonic() > deadline:
                failed += 1
                return
            try:
                _, w = await asyncio.wait_for(asyncio.open_connection(host, port), 10.0)
            except (OSError, asyncio.TimeoutError):
                failed += 1
                return
            writers.append(w)

    await asyncio.gather(*(one() for _ in range(count)))
    sys.stdout.write(f"READY {len(writers)} {failed}\n")
    sys.stdout.flush()

    # Hold until stdin closes (the harness is done measuring) or hold expires.
    stdin_closed = loop.create_future()

    def on_stdin() -> None:
        data = sys.stdin.buffer.read1(4096) if hasattr(sys.stdin.buffer, "read1") else b""
        if not data and not stdin_closed.done():
            stdin_closed.set_result(None)

    loop.add_reader(sys.stdin.fileno(), on_stdin)
    try:
        await asyncio.wait_for(stdin_closed, hold)
    except asyncio.TimeoutError:
        pass
    loop.remove_reader(sys.stdin.fileno())
    for w in writers:
        w.transport.abort()
    await asyncio.sleep(0)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("count", type=int)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--hold", type=float, default=120.0)
    a = p.parse_args()
    if a.host not in ("127.0.0.1", "::1"):
        p.error("only loopback addresses are allowed")
    if not 0 < a.count <= 100_000:
        p.error("count must be in 1..100000")
    _raise_nofile()
    return asyncio.run(_main(a.host, a.port, a.count, a.concurrency, a.hold))


if __name__ == "__main__":
    sys.exit(main())
