"""
Real loopback tests of L{edgeproxy.net.splice}: bulk streams between two
lean legs relayed with splice(2), backpressure through the pipe, half-close
during a spliced stream, and the fallbacks (splice off, unavailable, refused
by the kernel).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
import termios
import zlib
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
    Sink,
    StreamSource,
    Uploader,
    _PullSource,
    fd_targets,
    listen,
    pattern_crc,
    proxy_delayed_calls,
    wait_until,
)
from twisted.internet import defer, reactor, tcp
from twisted.internet.interfaces import IHalfCloseableProtocol
from zope.interface import implementer

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
    assert h.listening.transport is lean.LeanServer
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
        total = 1 + 8 * MiB
        for _ in range(8 * MiB // len(PATTERN)):
            client.send(PATTERN)
        yield wait_until(reactor, lambda: client.count >= total, timeout=30.0)
        assert client.count == total
        assert client.crc == _crc(b"x", PATTERN, 8 * MiB // len(PATTERN))
        assert up.splicedBytes > 4 * MiB
        assert up._spliceOut is down and down._spliceOut is up
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


def _queue(sock: socket.socket, request: int) -> int:
    """
    A socket queue length (FIONREAD: bytes to read; TIOCOUTQ: bytes sent
    and not yet acknowledged).
    """
    return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), request, b"\0\0\0\0"))[0])


def _assert_stalled_on_the_pipe(reader: Any, out: Any, taken: int, peer: Any) -> None:
    """
    The proxy waits for C{out}'s peer (which reads nothing): C{reader} is
    not read, C{out} waits for writability, the proxy holds no more than
    one pipe of the direction (nothing in Twisted's buffer), and every byte
    it took is in that pipe or in the kernel's queues towards the peer.
    """
    assert out._pipeWaiter is reader
    assert reader not in reactor.getReaders()
    assert out in reactor.getWriters()
    assert 0 < out._pipeLen <= splice.PIPE_SIZE
    assert len(out.dataBuffer) - out.offset + out._tempDataLen == 0
    in_kernel = _queue(out.socket, termios.TIOCOUTQ) + _queue(
        peer.transport.socket, termios.FIONREAD
    )
    assert taken <= out._pipeLen + in_kernel


@pytest_twisted.inlineCallbacks
def test_upload_to_a_reader_that_stops_is_bounded_by_the_pipe():
    """
    A client uploads 64 MiB to a backend that reads nothing: the spliced
    direction stalls with the proxy holding at most one pipe (it stops
    reading the client); once the backend reads, all of it arrives intact
    and the client's FIN closes the connection.
    """
    fds = _fds()
    sink = listen(reactor, Sink, start_paused=True)
    h = _lean_harness([backend("sink", port=sink.port)])
    total = 64 * MiB
    try:
        client = yield h.connect(Uploader(reactor, total))
        yield wait_until(reactor, lambda: sink.protocols and h.sessions())
        [session] = h.sessions()
        up, down = session.transport, session._out
        yield wait_until(reactor, lambda: down._pipeWaiter is up, timeout=20.0)
        _assert_stalled_on_the_pipe(up, down, session.bytesToBackend, sink.protocols[0])
        assert session.bytesToBackend < total
        sink.protocols[0].resume()
        yield wait_until(reactor, lambda: sink.protocols[0].lost is not None, timeout=60.0)
        assert sink.protocols[0].count == total
        assert sink.protocols[0].crc == pattern_crc(total)
        assert up.splicedBytes > total // 2
        yield client.wait_closed()
        yield wait_until(reactor, h.idle)
        [line] = h.logs.connection_lines()
        assert line["bytes_to_backend"] == total
    finally:
        yield _finish(h, [sink], fds)


@pytest_twisted.inlineCallbacks
def test_download_to_a_client_that_stops_is_bounded_by_the_pipe():
    """
    A backend streams 64 MiB to a client that reads nothing: the proxy
    stops reading the backend with at most one pipe held; once the client
    reads, all of it arrives intact, then the backend's close.
    """
    fds = _fds()
    total = 64 * MiB
    src = listen(reactor, StreamSource, total=total)
    h = _lean_harness([backend("src", port=src.port)])
    try:
        client = yield h.connect(Client(reactor, keep=False, start_paused=True))
        yield wait_until(reactor, lambda: src.protocols and h.sessions())
        [session] = h.sessions()
        down, up = session._out, session.transport
        yield wait_until(reactor, lambda: up._pipeWaiter is down, timeout=20.0)
        side = session._backendSide
        _assert_stalled_on_the_pipe(down, up, side.bytesToClient, client)
        assert side.bytesToClient < total
        client.resume()
        yield client.wait_closed(timeout=60.0)
        assert client.count == total
        assert client.crc == pattern_crc(total)
        assert down.splicedBytes > total // 2
        yield wait_until(reactor, h.idle)
        [line] = h.logs.connection_lines()
        assert line["bytes_to_client"] == total
        assert line["cause"] == "backend-closed"
    finally:
        yield _finish(h, [src], fds)


@pytest_twisted.inlineCallbacks
def test_client_fin_after_a_spliced_upload():
    """
    Half-close, client first, during a spliced stream: the client uploads
    8 MiB and sends FIN; the backend sees EOF only after every byte (intact),
    replies over the direction still open, and the reply reaches the client.
    """
    fds = _fds()
    srv = listen(reactor, ReplyAfterEOF, keep=False)
    h = _lean_harness([backend("hc", port=srv.port)])
    total = 8 * MiB
    try:
        client = Uploader(reactor, total)
        client.keep = True
        yield h.connect(client)
        yield wait_until(reactor, lambda: h.sessions())
        [session] = h.sessions()
        up = session.transport
        yield client.wait_closed(timeout=30.0)
        assert bytes(client.received) == b"got %d" % total
        backend_side = srv.protocols[0]
        assert backend_side.eof and backend_side.count == total
        assert backend_side.crc == pattern_crc(total)
        assert up.splicedBytes > total // 2
        yield wait_until(reactor, h.idle)
        assert h.logs.causes() == ["client-closed"]
    finally:
        yield _finish(h, [srv], fds)


@implementer(IHalfCloseableProtocol)
class StreamThenShutdown(Recorder):
    """
    Streams C{total} bytes of PATTERN, then shuts down its write side (FIN)
    and keeps reading (CRC, no copy) until the peer's EOF, then closes.
    """

    total = 8 * MiB
    keep = False

    def connectionMade(self) -> None:
        self.source = _PullSource(self.transport, self.total, self.transport.loseWriteConnection)
        self.transport.registerProducer(self.source, False)

    def readConnectionLost(self) -> None:
        self.eof = True
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


@pytest_twisted.inlineCallbacks
def test_backend_fin_after_a_spliced_download_then_a_spliced_upload():
    """
    Half-close, backend first, during a spliced stream: the backend streams
    8 MiB and sends FIN; the client gets every byte and the EOF, then
    uploads 8 MiB over the direction still open and sends its own FIN; the
    backend gets all of it and the EOF.  Both directions were spliced.
    """
    fds = _fds()
    total = 8 * MiB
    srv = listen(reactor, StreamThenShutdown, total=total)
    h = _lean_harness([backend("hc", port=srv.port)])
    try:
        client = yield h.connect(Client(reactor, keep=False, close_on_eof=False))
        yield wait_until(reactor, lambda: client.eof, timeout=30.0)
        assert client.count == total and client.crc == pattern_crc(total)
        assert client.lost is None
        [session] = h.sessions()
        up, down = session.transport, session._out
        assert down.splicedBytes > total // 2
        source = _PullSource(client.transport, total, client.shutdown_write)
        client.transport.registerProducer(source, False)
        yield client.wait_closed(timeout=30.0)
        yield wait_until(reactor, lambda: srv.protocols[0].lost is not None)
        assert srv.protocols[0].eof
        assert srv.protocols[0].count == total
        assert srv.protocols[0].crc == pattern_crc(total)
        assert up.splicedBytes > total // 2
        yield wait_until(reactor, h.idle)
        assert h.logs.causes() == ["backend-closed"]
    finally:
        yield _finish(h, [srv], fds)


@defer.inlineCallbacks
def _echo_bulk(h: ProxyHarness, total: int) -> Any:
    """
    Send C{total} bytes of PATTERN through C{h} to its echo backend; check
    they come back intact; return the session's two transports.
    """
    client = yield h.connect(Client(reactor, keep=False))
    client.send(b"x")
    yield wait_until(reactor, lambda: client.count >= 1)
    [session] = h.sessions()
    legs = (session.transport, session._out)
    for _ in range(total // len(PATTERN)):
        client.send(PATTERN)
    yield wait_until(reactor, lambda: client.count >= total + 1, timeout=30.0)
    assert client.count == total + 1
    assert client.crc == _crc(b"x", PATTERN, total // len(PATTERN))
    client.transport.loseConnection()
    yield client.wait_closed()
    yield wait_until(reactor, h.idle)
    [line] = h.logs.connection_lines()
    assert line["bytes_to_backend"] == line["bytes_to_client"] == total + 1
    return legs


@pytest_twisted.inlineCallbacks
def test_splice_setting_off():
    """
    With settings.splice off, two lean legs are never paired: the bulk
    stream is copied, nothing is spliced, no pipe is made.
    """
    fds = _fds()
    echo = listen(reactor, Echo)
    settings = ProxySettings(idle_timeout=10.0, half_closed_timeout=10.0, splice=False)
    h = _lean_harness([backend("echo", port=echo.port)], settings)
    try:
        assert not h.factory.splicePipes
        up, down = yield _echo_bulk(h, 4 * MiB)
        assert up.splicedBytes == down.splicedBytes == 0
        assert up._spliceOut is None and down._spliceOut is None
    finally:
        yield _finish(h, [echo], fds)


@pytest_twisted.inlineCallbacks
def test_no_splice_without_os_splice(monkeypatch: pytest.MonkeyPatch):
    """
    Where os.splice does not exist (Python before 3.10, PyPy 3.9), the
    factory does not splice and two lean legs are never paired.
    """
    monkeypatch.setattr(splice, "AVAILABLE", False)
    assert not splice.engage(object(), object(), 1024)
    fds = _fds()
    echo = listen(reactor, Echo)
    h = _lean_harness([backend("echo", port=echo.port)])
    try:
        assert not h.factory.splicePipes
        up, down = yield _echo_bulk(h, 4 * MiB)
        assert up.splicedBytes == down.splicedBytes == 0
    finally:
        yield _finish(h, [echo], fds)


@pytest_twisted.inlineCallbacks
def test_plain_twisted_client_leg_is_not_spliced():
    """
    A client accepted as Twisted's own tcp.Server (a listener the lean path
    did not adapt) is never paired with its lean backend leg: splicing
    needs two lean legs.
    """
    fds = _fds()
    echo = listen(reactor, Echo)
    h = ProxyHarness(reactor, [backend("echo", port=echo.port)], SETTINGS)
    h.listening.transport = tcp.Server
    try:
        up, down = yield _echo_bulk(h, 2 * MiB)
        assert type(up) is tcp.Server and type(down) is lean.LeanClient
        assert down.splicedBytes == 0 and down._spliceOut is None
    finally:
        yield _finish(h, [echo], fds)


def _refusing(err: int, leg: str) -> Any:
    """
    os.splice that fails with C{err}: C{leg} "in" for socket-to-pipe
    splices, "out" for pipe-to-socket ones (the others are real).
    """
    real = splice._splice

    def fake(src: int, dst: int, count: int, *args: Any, **kwargs: Any) -> int:
        from_pipe = _is_pipe(src)
        if (leg == "out") == from_pipe:
            raise OSError(err, "refused by the test")
        return int(real(src, dst, count, *args, **kwargs))

    return fake


def _is_pipe(fd: int) -> bool:
    import stat

    return stat.S_ISFIFO(os.fstat(fd).st_mode)


@pytest.mark.parametrize("err", [errno.EINVAL, errno.ENOSYS])
@pytest.mark.parametrize("leg", ["in", "out"])
@pytest_twisted.inlineCallbacks
def test_kernel_refusing_splice_falls_back_for_good(
    err: int, leg: str, monkeypatch: pytest.MonkeyPatch
):
    """
    When the kernel refuses splice (EINVAL, ENOSYS) from the socket into
    the pipe or from the pipe into the socket, that connection goes back to
    ordinary reads for good; bytes already in a pipe are handed to Twisted's
    buffer first, so the echoed stream is intact either way.
    """
    monkeypatch.setattr(splice, "_splice", _refusing(err, leg))
    fds = _fds()
    echo = listen(reactor, Echo)
    h = _lean_harness([backend("echo", port=echo.port)])
    try:
        up, down = yield _echo_bulk(h, 4 * MiB)
        assert up._spliceOut is None and down._spliceOut is None
        if leg == "in":
            assert up.splicedBytes == down.splicedBytes == 0
    finally:
        yield _finish(h, [echo], fds)


@pytest_twisted.inlineCallbacks
def test_pipe_limit_leaves_the_rest_copying(monkeypatch: pytest.MonkeyPatch):
    """
    With room for one pipe only, one direction splices and the other keeps
    copying (and asking again later); both streams are intact and never
    more than one pipe is open.
    """
    fds = _fds()
    echo = listen(reactor, Echo)
    settings = ProxySettings(idle_timeout=10.0, half_closed_timeout=10.0, splice_pipes=1)
    h = _lean_harness([backend("echo", port=echo.port)], settings)
    most = [0]
    real = splice._openPipe

    def counting(out: Any, limit: int) -> int:
        w = real(out, limit)
        most[0] = max(most[0], splice.pipes_open())
        return w

    monkeypatch.setattr(splice, "_openPipe", counting)
    try:
        up, down = yield _echo_bulk(h, 4 * MiB)
        assert most[0] == 1
        assert (up.splicedBytes > 0) != (down.splicedBytes > 0)
    finally:
        yield _finish(h, [echo], fds)


@pytest_twisted.inlineCallbacks
def test_backend_reset_while_the_pipe_waits():
    """
    The backend resets its connection while the proxy holds spliced bytes
    for it in the pipe: the connection ends as a backend error, the client
    is closed, and no socket or pipe is left.
    """
    fds = _fds()
    sink = listen(reactor, Sink, start_paused=True)
    h = _lean_harness([backend("sink", port=sink.port)])
    try:
        client = yield h.connect(Uploader(reactor, 64 * MiB))
        yield wait_until(reactor, lambda: sink.protocols and h.sessions())
        [session] = h.sessions()
        up, down = session.transport, session._out
        yield wait_until(reactor, lambda: down._pipeWaiter is up, timeout=20.0)
        sink.protocols[0].transport.abortConnection()
        yield client.wait_closed(timeout=10.0)
        yield wait_until(reactor, h.idle)
        assert h.logs.causes() in (["backend-error"], ["backend-closed"])
    finally:
        yield _finish(h, [sink], fds)


@pytest_twisted.inlineCallbacks
def test_kernel_refusing_to_drain_a_waiting_pipe(monkeypatch: pytest.MonkeyPatch):
    """
    If splicing out is refused (EINVAL) while bytes wait in the pipe for a
    slow backend, they move to Twisted's write buffer, the client is read
    again the ordinary way, and the upload arrives intact.
    """
    refuse = [False]
    real = splice._splice

    def fake(src: int, dst: int, count: int, *args: Any, **kwargs: Any) -> int:
        if refuse[0] and _is_pipe(src):
            raise OSError(errno.EINVAL, "refused by the test")
        return int(real(src, dst, count, *args, **kwargs))

    monkeypatch.setattr(splice, "_splice", fake)
    fds = _fds()
    sink = listen(reactor, Sink, start_paused=True)
    h = _lean_harness([backend("sink", port=sink.port)])
    total = 64 * MiB
    try:
        client = yield h.connect(Uploader(reactor, total))
        yield wait_until(reactor, lambda: sink.protocols and h.sessions())
        [session] = h.sessions()
        up, down = session.transport, session._out
        yield wait_until(reactor, lambda: down._pipeWaiter is up, timeout=20.0)
        refuse[0] = True
        sink.protocols[0].resume()
        yield wait_until(reactor, lambda: sink.protocols[0].lost is not None, timeout=60.0)
        assert sink.protocols[0].count == total
        assert sink.protocols[0].crc == pattern_crc(total)
        assert up._spliceOut is None
        yield client.wait_closed()
        yield wait_until(reactor, h.idle)
    finally:
        yield _finish(h, [sink], fds)


@pytest_twisted.inlineCallbacks
def test_small_messages_on_a_long_connection_are_copied():
    """
    Request/response traffic (one 300-byte message echoed at a time, 600
    of them: far more than a pipe's worth in all) never reads a bulk
    chunk, so it is never spliced and no pipe is made for it.
    """
    fds = _fds()
    echo = listen(reactor, Echo)
    h = _lean_harness([backend("echo", port=echo.port)])
    try:
        client = yield h.connect(Client(reactor, keep=False))
        message = PATTERN[:300]
        for i in range(1, 601):
            client.send(message)
            yield client.wait_for(i * len(message))
        [session] = h.sessions()
        up, down = session.transport, session._out
        # Nothing set on either transport (an idle or chatty connection
        # costs no memory for splicing).
        for transport in (up, down):
            assert not {"_spliceOut", "_pipeLimit", "doRead"} & set(vars(transport))
        assert up.splicedBytes == down.splicedBytes == 0
        assert splice.pipes_open() == 0
        client.transport.loseConnection()
        yield client.wait_closed()
        yield wait_until(reactor, h.idle)
    finally:
        yield _finish(h, [echo], fds)


@pytest_twisted.inlineCallbacks
def test_lean_path_off_is_not_spliced():
    """
    With the lean path off (Twisted's tcp.Server and connectTCP for every
    leg) nothing is paired or spliced.
    """
    fds = _fds()
    echo = listen(reactor, Echo)
    settings = ProxySettings(idle_timeout=10.0, half_closed_timeout=10.0, lean=False)
    h = ProxyHarness(reactor, [backend("echo", port=echo.port)], settings)
    try:
        up, down = yield _echo_bulk(h, 2 * MiB)
        assert type(up) is tcp.Server and type(down) is tcp.Client
        assert splice.pipes_open() == 0
    finally:
        yield _finish(h, [echo], fds)
