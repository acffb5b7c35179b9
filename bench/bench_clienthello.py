#!/usr/bin/env python3
"""
What reading the TLS ClientHello costs an C{sni:} listener
(L{edgeproxy.net.clienthello}), without the kernel and Twisted's I/O.

Four hellos: the one Python's C{ssl} writes (TLS 1.3, about 520 bytes), a
2 KiB one (the size of a hello with a post-quantum key share), the same
spread over one TLS record per 100 bytes, and the small one fed one byte
at a time (the worst a trickling client can make the reader do).  Also
the name lookup in a routing snapshot of 10,000 names.

    PYTHONPATH=. python bench/bench_clienthello.py

Prints microseconds per hello (best of --repeat runs of --count).
"""

from __future__ import annotations

import argparse
import ssl
import struct
import time
from typing import Callable

from edgeproxy.model import RoutingSnapshot
from edgeproxy.net.clienthello import ClientHelloReader, ServerName, parse_client_hello
from edgeproxy.testing import backend


def python_hello(name: str) -> bytes:
    """
    The first flight of a Python C{ssl} client.
    """
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def padded_hello(name: str, size: int, record: int = 1 << 14) -> bytes:
    """
    A hand-built hello of about C{size} bytes (a padding extension), cut
    into records of C{record} payload bytes.
    """
    host = name.encode()
    sni = struct.pack("!HHHBH", 0, len(host) + 5, len(host) + 3, 0, len(host)) + host
    padding_length = max(0, size - 100 - len(sni))
    padding = struct.pack("!HH", 21, padding_length) + b"\0" * padding_length
    extensions = sni + padding
    body = (
        b"\x03\x03"
        + b"\x01" * 32
        + b"\x20"
        + b"\x02" * 32
        + b"\x00\x04\x13\x01\x13\x02"
        + b"\x01\x00"
        + struct.pack("!H", len(extensions))
        + extensions
    )
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    out = b""
    for offset in range(0, len(message), record):
        chunk = message[offset : offset + record]
        out += b"\x16\x03\x01" + struct.pack("!H", len(chunk)) + chunk
    return out


def best_of(repeat: int, count: int, work: Callable[[], object]) -> float:
    """
    The best time per call over C{repeat} runs of C{count} calls.
    """
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        for _ in range(count):
            work()
        best = min(best, (time.perf_counter() - started) / count)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=5_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    small = python_hello("api.example.com")
    large = padded_hello("api.example.com", 2048)
    fragmented = padded_hello("api.example.com", 2048, record=100)
    for hello in (small, large, fragmented):
        assert parse_client_hello(hello) == ServerName("api.example.com")

    def one_byte_at_a_time() -> object:
        reader = ClientHelloReader()
        outcome = None
        for i in range(len(small)):
            outcome = reader.feed(small[i : i + 1])
        return outcome

    assert one_byte_at_a_time() == ServerName("api.example.com")
    snapshot = RoutingSnapshot.build(
        [backend(f"b{i}", app=f"app{i % 100}", sni=(f"n{i}.example.com",)) for i in range(10_000)]
        + [backend("w", app="wild", sni=("*.example.com",))]
    )

    rows = [
        (f"whole, {len(small)} bytes (Python ssl)", lambda: parse_client_hello(small), args.count),
        (f"whole, {len(large)} bytes", lambda: parse_client_hello(large), args.count),
        (
            f"{len(fragmented)} bytes in records of 100",
            lambda: parse_client_hello(fragmented),
            args.count,
        ),
        (f"{len(small)} bytes, one per feed", one_byte_at_a_time, max(1, args.count // 50)),
        (
            "name lookup, exact (10,000 names)",
            lambda: snapshot.app_for_name("n77.example.com"),
            args.count * 20,
        ),
        (
            "name lookup, wildcard",
            lambda: snapshot.app_for_name("www.example.com"),
            args.count * 20,
        ),
    ]
    for label, work, count in rows:
        print(f"{best_of(args.repeat, count, work) * 1e6:9.2f} us  {label}")


if __name__ == "__main__":
    main()
