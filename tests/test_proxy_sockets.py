"""
Real loopback tests of L{edgeproxy.net.proxy}: bytes both ways, PROXY headers
out, socket options, half-close each way (F6), with the real router.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest
import pytest_twisted
from faultkit import (
    PATTERN,
    Client,
    Echo,
    ProxyHarness,
    Recorder,
    ReplyAfterEOF,
    SendThenShutdown,
    connect,
    fd_targets,
    half_closed_sockets,
    listen,
    open_sockets,
    pattern_crc,
    proxy_delayed_calls,
    tcp_sockets,
    wait_until,
)
from twisted.internet import defer, reactor

from edgeproxy.config import ProxySettings
from edgeproxy.testing import backend

pytestmark = pytest.mark.slow

SETTINGS = ProxySettings(
    connect_timeout=0.5,
    connect_budget=1.5,
    idle_timeout=5.0,
    half_closed_timeout=5.0,
)


@defer.inlineCallbacks
def _finish(h: ProxyHarness, fakes: list, fds_before: int):
    """
    Stop everything; no traceback logged, no fd left, no proxy timer left.
    """
    try:
        assert h.logs.failures() == []
    finally:
        yield h.stop(fakes)
    try:
        yield wait_until(reactor, lambda: open_sockets() <= fds_before, timeout=3.0)
    except AssertionError:
        raise AssertionError(f"sockets left: {fd_targets()}") from None
    assert proxy_delayed_calls(reactor) == []


@pytest_twisted.inlineCallbacks
def test_bytes_both_ways():
    """
    A megabyte sent through the proxy to an echo backend comes back
    intact, and the connection's log line counts it both ways.
    """
    fds = open_sockets()
    echo = listen(reactor, Echo)
    h = ProxyHarness(reactor, [backend("echo", port=echo.port)], SETTINGS)
    try:
        client = yield h.connect(Client(reactor, keep=False))
        total = 16 * len(PATTERN)
        for _ in range(16):
            client.send(PATTERN)
        yield wait_until(reactor, lambda: client.count >= total, timeout=10.0)
        assert client.count == total
        assert client.crc == pattern_crc(total)
        client.transport.loseConnection()
        yield client.wait_closed()
        yield wait_until(reactor, h.idle)
        [line] = h.logs.connection_lines()
        assert (line["bytes_to_backend"], line["bytes_to_client"]) == (total, total)
        assert line["cause"] == "client-closed"
        assert line["backend"] == "echo"
    finally:
        yield _finish(h, [echo], fds)


@pytest.mark.parametrize("version", [1, 2])
@pytest_twisted.inlineCallbacks
def test_proxy_protocol_out(version):
    """
    A backend with proxy_protocol set gets, before the client's first
    byte, a header naming the client's real address and port and the
    proxy address the client connected to.
    """
    fds = open_sockets()
    rec = listen(reactor, Recorder)
    h = ProxyHarness(reactor, [backend("pp", port=rec.port, proxy_protocol=version)], SETTINGS)
    try:
        client = yield h.connect()
        client.send(b"hello")
        yield wait_until(reactor, lambda: rec.protocols and rec.protocols[0].received)
        yield wait_until(reactor, lambda: rec.protocols[0].received.endswith(b"hello"))
        cport = client.transport.getHost().port
        data = bytes(rec.protocols[0].received)
        if version == 1:
            assert data == b"PROXY TCP4 127.0.0.1 127.0.0.1 %d %d\r\nhello" % (cport, h.port)
        else:
            assert data[:12] == b"\r\n\r\n\x00\r\nQUIT\n"
            assert data[12:16] == b"\x21\x11\x00\x0c"
            assert data[16:24] == socket.inet_aton("127.0.0.1") * 2
            assert data[24:28] == cport.to_bytes(2, "big") + h.port.to_bytes(2, "big")
            assert data[28:] == b"hello"
    finally:
        yield _finish(h, [rec], fds)


@pytest_twisted.inlineCallbacks
def test_keepalive_and_nodelay_on_both_legs():
    """
    With keepalive on, both proxy sockets have SO_KEEPALIVE and
    TCP_NODELAY set.
    """
    fds = open_sockets()
    echo = listen(reactor, Echo)
    h = ProxyHarness(reactor, [backend("echo", port=echo.port)], SETTINGS)
    try:
        client = yield h.connect()
        client.send(b"x")
        yield client.wait_for(1)
        [session] = h.sessions()
        for t in (session.transport, session._out):
            sock = t.getHandle()
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) != 0
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        yield _finish(h, [echo], fds)


@pytest_twisted.inlineCallbacks
def test_half_close_client_first():
    """
    F6 (client first): the client sends a request and FIN; the backend
    sees EOF only after the whole request, replies, and the reply reaches
    the client over the still-open direction; afterwards no socket of
    these ports is in CLOSE_WAIT or FIN_WAIT2.
    """
    fds = open_sockets()
    srv = listen(reactor, ReplyAfterEOF)
    h = ProxyHarness(reactor, [backend("hc", port=srv.port)], SETTINGS)
    try:
        client = yield h.connect()
        client.send(b"r" * 100_000)
        client.shutdown_write()
        yield client.wait_closed()
        assert bytes(client.received) == b"got 100000"
        assert srv.protocols[0].eof
        assert srv.protocols[0].count == 100_000
        yield wait_until(reactor, h.idle)
        yield wait_until(reactor, lambda: not half_closed_sockets([h.port, srv.port]), 3.0)
        assert h.logs.causes() == ["client-closed"]
        assert not [s for s in tcp_sockets([h.port, srv.port]) if s[2] == "ESTABLISHED"]
    finally:
        yield _finish(h, [srv], fds)


@pytest_twisted.inlineCallbacks
def test_half_close_backend_first():
    """
    F6 (backend first): the backend sends a banner and FIN; the client
    gets the banner and EOF yet can still send; the backend receives that
    and the client's FIN; no CLOSE_WAIT or FIN_WAIT2 remains.
    """
    fds = open_sockets()
    srv = listen(reactor, SendThenShutdown)
    h = ProxyHarness(reactor, [backend("hc", port=srv.port)], SETTINGS)
    try:
        client = yield h.connect(Client(reactor, close_on_eof=False))
        yield wait_until(reactor, lambda: client.eof)
        assert bytes(client.received) == SendThenShutdown.payload
        assert client.lost is None
        client.send(b"late words")
        client.shutdown_write()
        yield client.wait_closed()
        yield wait_until(reactor, lambda: srv.protocols[0].lost is not None)
        assert bytes(srv.protocols[0].received) == b"late words"
        assert srv.protocols[0].eof
        yield wait_until(reactor, h.idle)
        yield wait_until(reactor, lambda: not half_closed_sockets([h.port, srv.port]), 3.0)
        assert h.logs.causes() == ["backend-closed"]
    finally:
        yield _finish(h, [srv], fds)


@pytest_twisted.inlineCallbacks
def test_many_connections_leave_nothing_behind():
    """
    Fifty short connections, closed from either side, leave no file
    descriptor, no half-closed socket and no load count behind, and log
    fifty lines.
    """
    fds = open_sockets()
    echo = listen(reactor, Echo)
    h = ProxyHarness(reactor, [backend("echo", port=echo.port)], SETTINGS)
    try:
        clients = []
        for _ in range(50):
            c = yield h.connect()
            c.send(b"ping")
            clients.append(c)
        for i, c in enumerate(clients):
            yield c.wait_for(4)
            if i % 2:
                c.transport.loseConnection()
            else:
                c.shutdown_write()
        for c in clients:
            yield c.wait_closed()
        yield wait_until(reactor, h.idle)
        yield wait_until(reactor, lambda: not half_closed_sockets([h.port, echo.port]), 3.0)
        assert len(h.logs.connection_lines()) == 50
        assert h.metrics.counter("connections_accepted") == 50
    finally:
        yield _finish(h, [echo], fds)


@pytest_twisted.inlineCallbacks
def test_behind_proxy_header_listener():
    """
    Behind the PROXY-header listener (C{haproxy:} endpoint) the proxy
    routes and logs by the address in the header, sends that address on
    in its own PROXY header, relays the bytes that came in the same
    segment as the header, and carries a half-close through the wrapper.
    """
    from edgeproxy.net.endpoints import server_endpoint

    fds = open_sockets()
    srv = listen(reactor, ReplyAfterEOF)
    h = ProxyHarness(reactor, [backend("pp", port=srv.port, proxy_protocol=1)], SETTINGS)
    endpoint = server_endpoint(
        reactor, "haproxy:tcp:0:interface=127.0.0.1", metrics=h.metrics, header_timeout=2.0
    )
    port = yield endpoint.listen(h.factory)
    try:
        client = Client(reactor)
        h.clients.append(client)
        yield connect(reactor, port.getHost().port, client)
        client.send(b"PROXY TCP4 198.51.100.7 203.0.113.9 5555 443\r\nhello")
        client.shutdown_write()
        yield client.wait_closed()
        assert bytes(client.received) == b"got %d" % len(
            b"PROXY TCP4 198.51.100.7 203.0.113.9 5555 443\r\nhello"
        )
        assert bytes(srv.protocols[0].received) == (
            b"PROXY TCP4 198.51.100.7 203.0.113.9 5555 443\r\nhello"
        )
        yield wait_until(reactor, h.idle)
        [line] = h.logs.connection_lines()
        assert (line["client"], line["client_port"], line["cause"]) == (
            "198.51.100.7",
            5555,
            "client-closed",
        )
        binding = h.bindings.lookup(("198.51.100.7", "app"), reactor.seconds())
        assert binding is not None and binding.backend_id == "pp"
    finally:
        yield port.stopListening()
        yield _finish(h, [srv], fds)


@pytest_twisted.inlineCallbacks
def test_eager_and_queued_writes_keep_order():
    """
    Between plain TCP legs the relay writes eagerly (straight to the socket
    when nothing is queued) and reads READ_SIZE bytes at a time; bursts of
    odd-sized writes, some sent at once and some queued behind a partial
    send (the proxy's send buffers are made small so that sends are
    partial), come back from an echo backend complete and in order.
    """
    from edgeproxy.net.proxy import READ_SIZE

    fds = open_sockets()
    echo = listen(reactor, Echo)
    h = ProxyHarness(reactor, [backend("echo", port=echo.port)], SETTINGS)
    try:
        client = yield h.connect(Client(reactor, keep=False))
        client.send(PATTERN[:1])
        yield wait_until(reactor, lambda: client.count >= 1)
        [session] = h.sessions()
        side = session._backendSide
        assert session._outSocket is session._out.socket
        assert side.outSocket is session.transport.socket
        assert session.transport.bufferSize == session._out.bufferSize == READ_SIZE
        for sock in (session._out.socket, session.transport.socket):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        queued = {"up": 0, "down": 0}
        for key, t in (("up", session._out), ("down", session.transport)):
            original = t.write

            def counting(data: bytes, _key: str = key, _original: Any = original) -> None:
                queued[_key] += len(data)
                _original(data)

            t.write = counting
        # A continuous pattern stream cut into odd sizes: order is checked
        # by the CRC of everything echoed back.
        stream = PATTERN * 64  # 4 MiB
        doubled = stream + stream
        total, offset = len(stream) * 4, 1
        sizes = [1, 7, 1500, 65536, 300000, 13, 1 << 20]
        i = 0
        while offset < total:
            n = min(sizes[i % len(sizes)], total - offset)
            start = offset % len(stream)
            client.send(doubled[start : start + n])
            offset += n
            i += 1
        yield wait_until(reactor, lambda: client.count >= total, timeout=20.0)
        assert client.count == total
        assert client.crc == pattern_crc(total)
        # Some bytes went straight to the sockets, some through the queue.
        assert 0 <= queued["up"] < total - 1 and 0 <= queued["down"] < total
        assert queued["up"] + queued["down"] > 0
        client.transport.loseConnection()
        yield client.wait_closed()
        yield wait_until(reactor, h.idle)
    finally:
        yield _finish(h, [echo], fds)


@pytest_twisted.inlineCallbacks
def test_idle_connection_registers_no_producer_and_one_sweep():
    """
    A joined, idle connection over plain TCP legs has no producer
    registered on either transport (they are registered lazily, at the
    first write that queues), the idle sweep of the connection table is
    scheduled once for it (beside it, at most the connect-timeout timer
    of the lean path, with no attempt left in it), and it is gone when the
    connection ends.
    """
    fds = open_sockets()
    echo = listen(reactor, Echo)
    h = ProxyHarness(reactor, [backend("echo", port=echo.port)], SETTINGS)
    try:
        client = yield h.connect(Client(reactor, keep=False))
        client.send(b"ping")
        yield wait_until(reactor, lambda: client.count >= 4)
        [session] = h.sessions()
        assert session.transport.producer is None
        assert session._out.producer is None
        assert h.factory.connections.sweeping
        timers = [
            c
            for c in proxy_delayed_calls(reactor)
            if "ConnectDeadlines" not in repr(getattr(c, "func", None))
        ]
        assert len(timers) == 1
        assert h.factory.connectDeadlines.connecting == 0
        client.transport.loseConnection()
        yield client.wait_closed()
        yield wait_until(reactor, h.idle)
        assert not h.factory.connections.sweeping
        [line] = h.logs.connection_lines()
        assert (line["bytes_to_backend"], line["bytes_to_client"]) == (4, 4)
    finally:
        yield _finish(h, [echo], fds)
