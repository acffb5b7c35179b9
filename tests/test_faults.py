"""
Fault tests of the proxy on real loopback sockets (FAULTS.md F1-F5, F7
lite, F14, F20), with the fakes of L{tests.faultkit} and the real router.

Every test also checks, at the end, that a fresh connection still
completes, that no traceback was logged, that no socket (fd) and no
half-closed socket is left behind and that no load count is left.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from faultkit import (
    CHUNK,
    BlackHole,
    Client,
    Echo,
    Identify,
    ProxyHarness,
    RefusingPort,
    ResetAfter,
    Sink,
    Stall,
    StreamSource,
    Uploader,
    fd_targets,
    half_closed_sockets,
    listen,
    open_sockets,
    pattern_crc,
    proxy_delayed_calls,
    rss_bytes,
    sleep,
    tcp_sockets,
    transport_buffered,
    wait_until,
)
from twisted.internet import defer, reactor

from edgeproxy.config import ProxySettings
from edgeproxy.testing import backend

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

SETTINGS = ProxySettings(
    connect_timeout=0.3,
    connect_budget=1.0,
    max_attempts=3,
    idle_timeout=2.0,
    half_closed_timeout=2.0,
)

#: Measured numbers, printed at the end of the F5 tests (pytest -s).
MEASURED: dict[str, Any] = {}


@defer.inlineCallbacks
def after_fault(h: ProxyHarness, ports: list[int], fresh: bool = True) -> Any:
    """
    What every fault test asserts afterwards: a fresh connection is served,
    nothing is left half-closed, nothing is counted, nothing was a
    traceback.
    """
    if fresh:
        took = yield h.assert_fresh_connection_works()
        assert took < 5.0
    for c in h.clients:
        c.close()
    yield wait_until(reactor, h.idle)
    yield wait_until(reactor, lambda: not half_closed_sockets([h.port, *ports]), timeout=3.0)
    assert h.router.load.connections == {}
    assert h.logs.failures() == []
    lines = h.logs.connection_lines()
    # One line per session; connections refused by admission have none.
    assert len(lines) == h.metrics.counter("connections_accepted")


@defer.inlineCallbacks
def no_leak(sockets_before: int) -> Any:
    """
    Once everything is stopped, the process holds no more sockets than
    before the test, and no proxy timer is pending.
    """
    try:
        yield wait_until(reactor, lambda: open_sockets() <= sockets_before, timeout=3.0)
    except AssertionError:
        raise AssertionError(f"sockets left: {fd_targets()}") from None
    assert proxy_delayed_calls(reactor) == []


@pytest_twisted.inlineCallbacks
def test_f1_refused_fails_over_and_clears_binding():
    """
    F1: the best backend refuses; the client is served by the next one
    with no byte lost, the refusal is counted, and the client's binding
    points at the backend that served it.
    """
    before = open_sockets()
    refuse = RefusingPort()
    echo = listen(reactor, Echo)
    h = ProxyHarness(
        reactor,
        [
            backend("refuse", port=refuse.port, region="sa"),
            backend("echo", port=echo.port, region="eu"),
        ],
        SETTINGS,
    )
    try:
        client = yield h.connect()
        client.send(b"first words")
        data = yield client.wait_for(11)
        assert data == b"first words"
        assert h.metrics.counter("backend_connect_failures", "refuse") == 1
        binding = h.bindings.lookup(("127.0.0.1", "app"), reactor.seconds())
        assert binding is not None and binding.backend_id == "echo"
        [session] = h.sessions()
        assert session.attempts == 2
        yield after_fault(h, [echo.port, refuse.port])
        assert h.logs.connection_lines()[0]["attempts"] == 2
    finally:
        yield h.stop([echo, refuse])
    yield no_leak(before)


@pytest_twisted.inlineCallbacks
def test_black_hole_really_drops_syns():
    """
    The faultkit's black hole makes a connect hang (no answer to the
    SYN) rather than be refused, so F3 tests what it says.
    """
    hole = BlackHole()
    try:
        assert hole.is_black(0.2)
        client = Client(reactor)
        from faultkit import connect

        start = reactor.seconds()
        with pytest.raises(Exception) as e:
            yield connect(reactor, hole.port, client, timeout=0.3)
        assert "TimeoutError" in type(e.value).__name__
        assert reactor.seconds() - start >= 0.25
    finally:
        hole.close()


@pytest_twisted.inlineCallbacks
def test_f3_black_hole_times_out_then_fails_over():
    """
    F3: the best backend never answers the SYN; after the connect timeout
    the proxy fails over and the client is served, its total wait bounded
    by the connect timeout plus a little, not by the kernel's SYN retries.
    """
    before = open_sockets()
    hole = BlackHole()
    echo = listen(reactor, Echo)
    h = ProxyHarness(
        reactor,
        [
            backend("hole", port=hole.port, region="sa"),
            backend("echo", port=echo.port, region="eu"),
        ],
        SETTINGS,
    )
    try:
        start = reactor.seconds()
        client = yield h.connect()
        client.send(b"hello")
        yield client.wait_for(5)
        waited = reactor.seconds() - start
        assert SETTINGS.connect_timeout * 0.9 <= waited < SETTINGS.connect_budget + 2.0
        assert h.metrics.counter("backend_connect_failures", "hole") == 1
        yield after_fault(h, [echo.port, hole.port])
        MEASURED["f3_wait_s"] = round(waited, 3)
    finally:
        yield h.stop([echo, hole])
    yield no_leak(before)


@pytest_twisted.inlineCallbacks
def test_f1_f3_every_attempt_fails_within_budget():
    """
    F1/F3: when every backend refuses or black-holes, the client is closed
    within the connect budget (plus scheduling slack), counted and logged
    as connect-failed.
    """
    before = open_sockets()
    refuse = RefusingPort()
    holes = [BlackHole(), BlackHole()]
    h = ProxyHarness(
        reactor,
        [
            backend("refuse", port=refuse.port, region="sa"),
            backend("hole1", port=holes[0].port, region="eu"),
            backend("hole2", port=holes[1].port, region="eu"),
        ],
        SETTINGS.__class__(
            connect_timeout=0.4, connect_budget=0.6, max_attempts=3, idle_timeout=2.0
        ),
    )
    try:
        start = reactor.seconds()
        client = yield h.connect()
        client.send(b"anyone?")
        yield client.wait_closed()
        waited = reactor.seconds() - start
        assert waited < 0.6 + 1.0
        assert client.count == 0
        [line] = h.logs.connection_lines()
        assert line["cause"] == "connect-failed"
        assert line["attempts"] == 3 or line["duration"] >= 0.55
        assert h.metrics.counter("connections_closed", "connect-failed") == 1
        assert h.bindings.lookup(("127.0.0.1", "app"), reactor.seconds()) is None
        yield after_fault(h, [refuse.port, *(x.port for x in holes)], fresh=False)
        MEASURED["all_fail_wait_s"] = round(waited, 3)
    finally:
        yield h.stop([refuse, *holes])
    yield no_leak(before)


@pytest_twisted.inlineCallbacks
def test_f2_reset_mid_stream():
    """
    F2: a backend that sends 200 kB then resets: all 200 kB reach the
    client intact, then the client is closed; no second backend is tried.
    """
    before = open_sockets()
    rst = listen(reactor, ResetAfter, size=200_000)
    other = listen(reactor, Identify, ident=b"other")
    h = ProxyHarness(
        reactor,
        [
            backend("rst", port=rst.port, region="sa"),
            backend("other", port=other.port, region="eu"),
        ],
        SETTINGS,
    )
    try:
        client = yield h.connect(Client(reactor, keep=False))
        yield client.wait_closed()
        assert client.count == 200_000
        assert client.crc == pattern_crc(200_000)
        assert other.protocols == []
        yield wait_until(reactor, h.idle)
        [line] = h.logs.connection_lines()
        assert (line["cause"], line["attempts"], line["bytes_to_client"]) == (
            "backend-error",
            1,
            200_000,
        )
        h.repository.set([backend("other", port=other.port, region="eu")])
        yield after_fault(h, [rst.port, other.port])
    finally:
        yield h.stop([rst, other])
    yield no_leak(before)


@pytest_twisted.inlineCallbacks
def test_f4_idle_timeout_with_data_queued():
    """
    F4: a backend that accepts and never reads: the client's upload fills
    the proxy's buffer towards it; the idle timeout still closes both
    sides (abort, queued data dropped) within about 1.25 idle periods.
    """
    before = open_sockets()
    stall = listen(reactor, Stall)
    echo = listen(reactor, Echo)
    settings = SETTINGS.__class__(idle_timeout=0.4, half_closed_timeout=5.0)
    h = ProxyHarness(reactor, [backend("stall", port=stall.port)], settings)
    try:
        client = yield h.connect(Client(reactor))
        client.send(b"z" * (8 * 1024 * 1024))
        yield wait_until(reactor, lambda: h.sessions() and h.sessions()[0]._out is not None)
        [session] = h.sessions()
        yield wait_until(reactor, lambda: transport_buffered(session._out) > 0)
        queued = transport_buffered(session._out)
        start = session._started
        yield client.wait_closed()
        closed_after = reactor.seconds() - start
        assert 0.4 <= closed_after < 0.4 * 1.25 + 1.0
        yield wait_until(reactor, h.idle)
        assert h.logs.causes() == ["idle-timeout"]
        assert not [s for s in tcp_sockets([stall.port]) if s[2] == "ESTABLISHED"]
        h.repository.set([backend("echo", port=echo.port)])
        yield after_fault(h, [stall.port, echo.port])
        MEASURED["f4_queued_bytes"] = queued
        MEASURED["f4_closed_after_s"] = round(closed_after, 3)
    finally:
        yield h.stop([stall, echo])
    yield no_leak(before)


F5_TOTAL = 100 * 1024 * 1024
#: The proxy's user-space buffer towards a paused peer must stay below this.
F5_BUFFER_BOUND = 4 * 1024 * 1024


@defer.inlineCallbacks
def _sample_buffers(sessions_fn: Any, pick: Any, stop: list[bool], into: dict[str, int]) -> Any:
    while not stop[0]:
        for s in sessions_fn():
            t = pick(s)
            if t is not None:
                into["max"] = max(into.get("max", 0), transport_buffered(t))
        into["rss_max"] = max(into.get("rss_max", 0), rss_bytes())
        yield sleep(reactor, 0.005)


@pytest_twisted.inlineCallbacks
def test_f5_backend_streams_to_non_reading_client():
    """
    F5: a backend streams 100 MB to a client that does not read for a
    while: the proxy stops reading the backend (the source stalls), its
    buffer towards the client stays under a few MB and its memory flat;
    once the client reads, all 100 MB arrive intact.
    """
    before = open_sockets()
    src = listen(reactor, StreamSource, total=F5_TOTAL)
    echo = listen(reactor, Echo)
    settings = SETTINGS.__class__(idle_timeout=10.0, half_closed_timeout=10.0)
    h = ProxyHarness(reactor, [backend("src", port=src.port)], settings)
    stop = [False]
    seen: dict[str, int] = {}
    try:
        rss0 = rss_bytes()
        sampler = _sample_buffers(h.sessions, lambda s: s.transport, stop, seen)
        client = yield h.connect(Client(reactor, keep=False, start_paused=True))
        yield wait_until(reactor, lambda: src.protocols)
        yield sleep(reactor, 0.4)
        sent_a = src.protocols[0].source.sent
        yield sleep(reactor, 0.3)
        sent_b = src.protocols[0].source.sent
        paused_max = seen.get("max", 0)
        rss_paused = rss_bytes()
        assert sent_a == sent_b, "the source kept going: the proxy did not stop reading it"
        assert sent_b < F5_TOTAL // 4
        assert paused_max < F5_BUFFER_BOUND
        assert client.count == 0
        start = reactor.seconds()
        client.resume()
        yield client.wait_closed(timeout=40.0)
        took = reactor.seconds() - start
        assert client.count == F5_TOTAL
        assert client.crc == pattern_crc(F5_TOTAL)
        stop[0] = True
        yield sampler
        assert seen["max"] < F5_BUFFER_BOUND
        assert rss_paused - rss0 < 32 * 1024 * 1024
        assert seen["rss_max"] - rss0 < 64 * 1024 * 1024
        h.repository.set([backend("echo", port=echo.port)])
        yield after_fault(h, [src.port, echo.port])
        MEASURED["f5_down"] = {
            "stalled_source_after_bytes": sent_b,
            "max_proxy_buffer_to_client_paused": paused_max,
            "max_proxy_buffer_to_client_overall": seen["max"],
            "rss_growth_while_paused": rss_paused - rss0,
            "rss_growth_max": seen["rss_max"] - rss0,
            "transfer_s": round(took, 2),
        }
        print("\nF5 backend->client:", MEASURED["f5_down"])
    finally:
        stop[0] = True
        yield h.stop([src, echo])
    yield no_leak(before)


@pytest_twisted.inlineCallbacks
def test_f5_client_uploads_to_non_reading_backend():
    """
    F5 mirror: a client uploads 100 MB to a backend that does not read for
    a while: the proxy stops reading the client, its buffer towards the
    backend stays under a few MB; once the backend reads, all 100 MB
    arrive intact.
    """
    before = open_sockets()
    sink = listen(reactor, Sink, start_paused=True)
    echo = listen(reactor, Echo)
    settings = SETTINGS.__class__(idle_timeout=10.0, half_closed_timeout=10.0)
    h = ProxyHarness(reactor, [backend("sink", port=sink.port)], settings)
    stop = [False]
    seen: dict[str, int] = {}
    try:
        rss0 = rss_bytes()
        sampler = _sample_buffers(h.sessions, lambda s: s._out, stop, seen)
        client = yield h.connect(Uploader(reactor, F5_TOTAL))
        yield wait_until(reactor, lambda: sink.protocols)
        yield sleep(reactor, 0.4)
        sent_a = client.source.sent
        yield sleep(reactor, 0.3)
        sent_b = client.source.sent
        paused_max = seen.get("max", 0)
        rss_paused = rss_bytes()
        assert sent_a == sent_b, "the uploader kept going: the proxy did not stop reading it"
        assert sent_b < F5_TOTAL // 4
        assert paused_max < F5_BUFFER_BOUND
        start = reactor.seconds()
        sink.protocols[0].resume()
        yield wait_until(reactor, lambda: sink.protocols[0].lost is not None, timeout=40.0)
        took = reactor.seconds() - start
        assert sink.protocols[0].count == F5_TOTAL
        assert sink.protocols[0].crc == pattern_crc(F5_TOTAL)
        yield client.wait_closed()
        stop[0] = True
        yield sampler
        assert seen["max"] < F5_BUFFER_BOUND
        assert rss_paused - rss0 < 32 * 1024 * 1024
        h.repository.set([backend("echo", port=echo.port)])
        yield after_fault(h, [sink.port, echo.port])
        MEASURED["f5_up"] = {
            "stalled_uploader_after_bytes": sent_b,
            "max_proxy_buffer_to_backend_paused": paused_max,
            "max_proxy_buffer_to_backend_overall": seen["max"],
            "rss_growth_while_paused": rss_paused - rss0,
            "rss_growth_max": seen["rss_max"] - rss0,
            "transfer_s": round(took, 2),
        }
        print("\nF5 client->backend:", MEASURED["f5_up"])
    finally:
        stop[0] = True
        yield h.stop([sink, echo])
    yield no_leak(before)


@pytest_twisted.inlineCallbacks
def test_f7_lite_connection_cap():
    """
    F7 (lite): with max_connections=3, three clients are served; a fourth
    is closed at once without reaching a backend, counted as rejected and
    logged once; the three still work, and once one leaves a new client is
    served.
    """
    before = open_sockets()
    echo = listen(reactor, Echo)
    h = ProxyHarness(
        reactor,
        [backend("echo", port=echo.port)],
        SETTINGS.__class__(max_connections=3, idle_timeout=5.0),
    )
    try:
        clients = []
        for i in range(3):
            c = yield h.connect()
            c.send(b"c%d" % i)
            yield c.wait_for(2)
            clients.append(c)
        extra = yield h.connect()
        yield extra.wait_closed()
        assert extra.count == 0
        assert len(echo.protocols) == 3
        assert h.metrics.counter("connections_rejected", "limit") == 1
        assert h.factory.openConnections == 3
        for c in clients:
            c.send(b"again")
            yield c.wait_for(2 + 5)
        clients[0].transport.loseConnection()
        yield clients[0].wait_closed()
        yield wait_until(reactor, lambda: h.factory.openConnections == 2)
        yield after_fault(h, [echo.port])
        # Refused at accept: no session, so no connection line of its own;
        # the cap is logged once when it starts refusing and once when it
        # admits again.
        assert "limit" not in h.logs.causes()
        cap_lines = [
            e for e in h.logs.events if e.get("log_namespace") == "edgeproxy.net.admission"
        ]
        assert [e.get("refused") for e in cap_lines] == [None, 1]
    finally:
        yield h.stop([echo])
    yield no_leak(before)


@pytest_twisted.inlineCallbacks
def test_f14_backend_removed_while_connected():
    """
    F14: a backend removed by a reload while a connection to it is open:
    that connection goes on working; the next connection from the same
    client goes to the remaining backend (the stale binding is dropped).
    """
    before = open_sockets()
    one = listen(reactor, Identify, ident=b"one")
    two = listen(reactor, Identify, ident=b"two")
    b_one = backend("one", port=one.port, region="sa")
    b_two = backend("two", port=two.port, region="eu")
    h = ProxyHarness(reactor, [b_one, b_two], SETTINGS)
    try:
        first = yield h.connect()
        yield first.wait_for(4)
        assert bytes(first.received) == b"one\n"
        h.repository.set([b_two])
        first.send(b"still here")
        data = yield first.wait_for(4 + 10)
        assert data == b"one\nstill here"
        second = yield h.connect()
        data = yield second.wait_for(4)
        assert data == b"two\n"
        binding = h.bindings.lookup(("127.0.0.1", "app"), reactor.seconds())
        assert binding is not None and binding.backend_id == "two"
        assert first.lost is None
        yield after_fault(h, [one.port, two.port], fresh=False)
    finally:
        yield h.stop([one, two])
    yield no_leak(before)


@pytest_twisted.inlineCallbacks
def test_f20_no_backend():
    """
    F20: with no routable backend the client is closed promptly, counted
    and logged as no-backend; once a backend appears, a fresh connection
    is served.
    """
    before = open_sockets()
    echo = listen(reactor, Echo)
    h = ProxyHarness(reactor, [backend("sick", port=echo.port, healthy=False)], SETTINGS)
    try:
        client = yield h.connect()
        start = reactor.seconds()
        yield client.wait_closed()
        assert reactor.seconds() - start < 1.0
        assert client.count == 0
        assert echo.protocols == []
        assert h.metrics.counter("connections_closed", "no-backend") == 1
        assert h.logs.causes() == ["no-backend"]
        h.repository.set([backend("echo", port=echo.port)])
        yield after_fault(h, [echo.port])
    finally:
        yield h.stop([echo])
    yield no_leak(before)


def test_chunk_size_is_twisted_read_size():
    """
    The faultkit's stream chunk matches Twisted's read size (64 KiB), so the
    F5 bounds above are in units the proxy actually buffers.
    """
    from twisted.internet.tcp import Connection

    assert Connection.bufferSize == CHUNK
