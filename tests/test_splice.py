"""
Real loopback tests of L{edgeproxy.net.splice}: bulk streams between two
lean legs relayed with splice(2), backpressure through the pipe, half-close
during a spliced stream, and the fallbacks (splice off, unavailable, refused
by the kernel).
"""

from __future__ import annotations

import errno
import os
import socket
import zlib
from typing import Any

import pytest
import pytest_twisted
from faultkit import (
    PATTERN,
    Client,
    Echo,
    ProxyHarness,
    Sink,
    StreamSource,
    Uploader,
    fd_targets,
    listen,
    open_sockets,
    pattern_crc,
    proxy_delayed_calls,
    wait_until,
)
from twisted.internet import defer, reactor

from edgeproxy.config import ProxySettings
from edgeproxy.net import lean, splice
from edgeproxy.testing import backend

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not splice.AVAILABLE, reason="no os.splice here"),
]

SETTINGS = ProxySettings(
    connect_timeout=0.5,
    connect_budget=1.5,
    idle_timeout=10.0,
    half_closed_timeout=10.0,
)

MiB = 1 << 20


def _lean_harness(backends: list[Any], settings: ProxySettings = SETTINGS) -> ProxyHarness:
    """
    A proxy whose clients are lean transports (as on a plain tcp: listener
    of the service) and whose backends, IP literals, are lean too.
    """
    h = ProxyHarness(reactor, backends, settings)
    assert lean.adapt_port(h.listening, settings.keepalive)
    assert h.factory.leanConnect
    return h


def _crc(first: bytes, chunk: bytes, times: int) -> int:
    """
    CRC32 of C{first} followed by C{times} copies of C{chunk}.
    """
    crc = zlib.crc32(first)
    for _ in range(times):
        crc = zlib.crc32(chunk, crc)
    return crc


def _fds() -> tuple[int, int]:
    """
    (sockets, pipes) this process has open.
    """
    targets = fd_targets().values()
    return (
        sum(1 for t in targets if t.startswith("socket:")),
        sum(1 for t in targets if t.startswith("pipe:")),
    )


@defer.inlineCallbacks
def _finish(h: ProxyHarness, fakes: list, fds_before: tuple[int, int]):
    """
    Stop everything; no traceback logged, no socket or pipe left, no pipe
    counted, no proxy timer left.
    """
    try:
        assert h.logs.failures() == []
    finally:
        yield h.stop(fakes)
    try:
        yield wait_until(
            reactor,
            lambda: _fds()[0] <= fds_before[0] and _fds()[1] <= fds_before[1],
            timeout=3.0,
        )
    except AssertionError:
        raise AssertionError(f"descriptors left: {fd_targets()}") from None
    assert splice.pipes_open() == 0
    assert proxy_delayed_calls(reactor) == []


@pytest_twisted.inlineCallbacks
def test_bulk_both_ways_is_spliced():
    """
    Several MiB through the proxy to an echo backend come back intact (CRC)
    with both directions spliced: each lean transport counts spliced bytes,
    most of the stream went through the pipes, and the log line counts every
    byte both ways.
    """
    fds = _fds()
    echo = listen(reactor, Echo)
    h = _lean_harness([backend("echo", port=echo.port)])
    try:
        client = yield h.connect(Client(reactor, keep=False))
        client.send(b"x")
        yield wait_until(reactor, lambda: client.count >= 1)
        [session] = h.sessions()
        up, down = session.transport, session._out
        assert type(up) is lean.LeanServer and type(down) is lean.LeanClient
        assert up._spliceOut is down and down._spliceOut is up
        total = 1 + 8 * MiB
        for _ in range(8 * MiB // len(PATTERN)):
            client.send(PATTERN)
        yield wait_until(reactor, lambda: client.count >= total, timeout=30.0)
        assert client.count == total
        assert client.crc == _crc(b"x", PATTERN, 8 * MiB // len(PATTERN))
        assert up.splicedBytes > 4 * MiB
        assert down.splicedBytes > 4 * MiB
        assert splice.pipes_open() == 2
        client.transport.loseConnection()
        yield client.wait_closed()
        yield wait_until(reactor, h.idle)
        [line] = h.logs.connection_lines()
        assert (line["bytes_to_backend"], line["bytes_to_client"]) == (total, total)
        assert line["cause"] == "client-closed"
        assert splice.pipes_open() == 0
    finally:
        yield _finish(h, [echo], fds)
