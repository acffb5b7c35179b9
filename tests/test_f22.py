"""
FAULTS F22 on real loopback sockets: transfers that are slow but alive are
never cut by the idle or the half-closed timeout, and are cut promptly once
they stop (issue 7, defects 1 and 2).
"""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest
import pytest_twisted
from faultkit import (
    Echo,
    ProxyHarness,
    Recorder,
    StreamSource,
    listen,
    open_sockets,
    wait_until,
)
from twisted.internet import reactor, threads
from twisted.internet.interfaces import IHalfCloseableProtocol
from zope.interface import implementer

from edgeproxy.config import ProxySettings
from edgeproxy.testing import backend

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]


def _slow_reader(port: int, rate: int, seconds: float, then_stop: float) -> dict[str, Any]:
    """
    In a thread: connect with a small receive buffer, read C{rate} bytes a
    second in 4 KiB steps for C{seconds}, then stop reading (holding the
    socket) for C{then_stop} seconds; report what was read and whether the
    reading was cut.
    """
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    sock.connect(("127.0.0.1", port))
    sock.settimeout(5.0)
    got = 0
    cut_at: float | None = None
    start = time.monotonic()
    step = 4096
    interval = step / rate
    try:
        while time.monotonic() - start < seconds:
            try:
                data = sock.recv(step)
            except ConnectionResetError:
                data = b""
            if not data:
                cut_at = time.monotonic() - start
                break
            got += len(data)
            time.sleep(interval)
        reading_for = time.monotonic() - start
        # Stop reading, keep the socket: the proxy must give up after about
        # one idle period.
        time.sleep(then_stop)
        return {"got": got, "cut_at": cut_at, "reading_for": reading_for}
    finally:
        sock.close()


@pytest_twisted.inlineCallbacks
def test_slow_reader_is_not_idle():
    """
    F22 / defect 2: a client reading 40 KiB/s from a fast backend, with
    --idle-timeout 2, is not cut for 7 s of steady reading (the proxy's
    queue draining towards it is activity, even while the backend is paused
    for it), and is reset once it stops reading for good.
    """
    before = open_sockets()
    src = listen(reactor, StreamSource, total=50 * 1024 * 1024)
    settings = ProxySettings(idle_timeout=2.0, half_closed_timeout=2.0, connect_timeout=1.0)
    h = ProxyHarness(reactor, [backend("src", port=src.port)], settings)
    try:
        result = yield threads.deferToThread(_slow_reader, h.port, 40 * 1024, 7.0, 6.0)
        assert result["cut_at"] is None, result
        assert result["got"] >= 40 * 1024 * 5, result
        yield wait_until(reactor, h.idle)
        [line] = h.logs.connection_lines()
        assert line["cause"] == "idle-timeout"
        # Cut 2 to 2.5 s after the last read (which came up to one read
        # interval before reading_for), plus scheduling slack.
        assert 1.8 <= line["duration"] - result["reading_for"] <= 4.0, (line, result)
    finally:
        yield h.stop([src])
    yield wait_until(reactor, lambda: open_sockets() <= before)


@implementer(IHalfCloseableProtocol)
class _Trickle(Recorder):
    """
    A backend that waits for the client's FIN, then sends C{chunks} chunks
    of 1000 bytes, one every C{every} seconds, then (if C{close}) closes;
    otherwise it goes silent with the connection open.
    """

    chunks = 16
    every = 0.5
    close = True
    sent = 0

    def readConnectionLost(self) -> None:
        self.eof = True
        self._tick()

    def writeConnectionLost(self) -> None:
        pass

    def _tick(self) -> None:
        if self.lost is not None:
            return
        if self.sent >= self.chunks:
            if self.close:
                self.transport.loseConnection()  # type: ignore[union-attr]
            return
        self.sent += 1
        self.transport.write(b"t" * 1000)  # type: ignore[union-attr]
        reactor.callLater(self.every, self._tick)  # type: ignore[attr-defined]


def _request_then_shut(port: int, timeout: float) -> dict[str, Any]:
    """
    In a thread: send a request, SHUT_WR (as BusyBox wget does), read to
    EOF or reset; report what came back and how it ended.
    """
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(timeout)
    start = time.monotonic()
    sock.sendall(b"GET /slow\r\n")
    sock.shutdown(socket.SHUT_WR)
    got = 0
    how = "eof"
    try:
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                how = "reset"
                break
            if not data:
                break
            got += len(data)
    finally:
        sock.close()
    return {"got": got, "how": how, "after": time.monotonic() - start}


@pytest_twisted.inlineCallbacks
def test_half_closed_client_gets_a_slow_answer():
    """
    F22 / defect 1: a client that sends its request and half-closes while
    the backend streams the answer for 8 s (one chunk every 0.5 s), with
    --half-closed-timeout 2, receives the whole answer and the backend's
    close: the half-closed timeout is inactivity, not a deadline.
    """
    trickle = listen(reactor, _Trickle, chunks=16, every=0.5, close=True)
    echo = listen(reactor, Echo)
    settings = ProxySettings(idle_timeout=30.0, half_closed_timeout=2.0, connect_timeout=1.0)
    h = ProxyHarness(reactor, [backend("trickle", port=trickle.port)], settings)
    try:
        result = yield threads.deferToThread(_request_then_shut, h.port, 20.0)
        assert result == {"got": 16_000, "how": "eof", "after": result["after"]}
        assert result["after"] >= 7.5
        yield wait_until(reactor, h.idle)
        assert h.logs.causes() == ["client-closed"]
    finally:
        yield h.stop([trickle, echo])


@pytest_twisted.inlineCallbacks
def test_half_closed_connection_that_stops_is_cut():
    """
    F22: once the trickle stops (the backend goes silent without closing),
    the half-closed connection is cut between 1.25 and 1.5 half-closed
    timeouts (plus slack) after the last byte.
    """
    trickle = listen(reactor, _Trickle, chunks=4, every=0.5, close=False)
    settings = ProxySettings(idle_timeout=30.0, half_closed_timeout=2.0, connect_timeout=1.0)
    h = ProxyHarness(reactor, [backend("trickle", port=trickle.port)], settings)
    try:
        result = yield threads.deferToThread(_request_then_shut, h.port, 20.0)
        assert result["got"] == 4000
        # Last byte at about 1.5 s; cut 2.5 to 3 s later.
        assert 3.5 <= result["after"] <= 7.0, result
        yield wait_until(reactor, h.idle)
        assert h.logs.causes() == ["half-closed-timeout"]
    finally:
        yield h.stop([trickle])
