"""
L{edgeproxy.net.lean}: the lean path's pieces on their own (one timer for
every connect timeout; the backend connect on a socket of its own; lean
accepted transports; closing at once), and that the proxy takes the lean
path, or the general one when told to.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest
import pytest_twisted
from faultkit import (
    BlackHole,
    Echo,
    ProxyHarness,
    Recorder,
    RefusingPort,
    ReplyAfterEOF,
    listen,
    open_sockets,
    sleep,
    wait_until,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, error, tcp
from twisted.internet import reactor as _reactor
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from edgeproxy.config import ProxySettings
from edgeproxy.net import lean
from edgeproxy.testing import backend

reactor: Any = _reactor

# -- ConnectDeadlines, on a Clock ---------------------------------------------


class Attempt:
    """
    What L{lean.ConnectDeadlines} needs of an attempt: C{_timeoutCall} and
    C{_timedOut}, recording when it timed out.
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._timeoutCall: Any = None
        self.timedOut: list[float] = []

    def _timedOut(self) -> None:
        self._timeoutCall = None
        self.timedOut.append(self.clock.seconds())

    def connected(self) -> None:
        """
        As L{lean.LeanClient._stopTimeout} does when the connect completes.
        """
        call, self._timeoutCall = self._timeoutCall, None
        if type(call) is list:
            call[1] = None
        elif call is not None:
            call.cancel()


def _add(deadlines: lean.ConnectDeadlines, attempt: Attempt, timeout: float) -> None:
    attempt._timeoutCall = deadlines.add(attempt, timeout)  # type: ignore[arg-type]


def test_deadlines_fire_in_order_on_one_timer() -> None:
    """
    Attempts started one after another time out each exactly at its own
    deadline, with one delayed call pending at any time for all of them.
    """
    clock = Clock()
    deadlines = lean.ConnectDeadlines(clock)
    attempts = [Attempt(clock) for _ in range(3)]
    for attempt in attempts:
        _add(deadlines, attempt, 5.0)
        assert len(clock.getDelayedCalls()) == 1
        clock.advance(1.0)
    assert deadlines.connecting == 3
    for _ in range(8):
        clock.advance(0.5)
        assert len(clock.getDelayedCalls()) <= 1
    assert [a.timedOut for a in attempts] == [[5.0], [6.0], [7.0]]
    assert clock.getDelayedCalls() == []
    assert deadlines.connecting == 0


def test_connected_attempts_never_time_out_and_leave_the_queue() -> None:
    """
    An attempt that connected only clears its entry: it never times out,
    and cleared entries leave the queue as new attempts arrive, so a busy
    proxy's queue holds the attempts since the oldest one still
    connecting, not every attempt of the last connect timeout.
    """
    clock = Clock()
    deadlines = lean.ConnectDeadlines(clock)
    done = []
    for _ in range(1000):
        attempt = Attempt(clock)
        _add(deadlines, attempt, 5.0)
        attempt.connected()
        done.append(attempt)
        clock.advance(0.001)
    assert len(deadlines) == 1
    assert deadlines.connecting == 0
    clock.advance(10.0)
    assert all(a.timedOut == [] for a in done)
    assert clock.getDelayedCalls() == []


def test_an_earlier_deadline_gets_its_own_timer() -> None:
    """
    A deadline earlier than the newest queued one (a failover attempt with
    less of its budget left) is not queued behind it: it gets a delayed
    call of its own and times out when due; the queue's own are unchanged.
    """
    clock = Clock()
    deadlines = lean.ConnectDeadlines(clock)
    first, failover = Attempt(clock), Attempt(clock)
    _add(deadlines, first, 5.0)
    _add(deadlines, failover, 1.0)
    assert type(failover._timeoutCall) is not list
    assert len(clock.getDelayedCalls()) == 2
    clock.advance(1.0)
    assert failover.timedOut == [1.0]
    assert first.timedOut == []
    clock.advance(4.0)
    assert first.timedOut == [5.0]


def test_stop_drops_everything() -> None:
    """
    C{stop()} (the last session is gone) leaves no delayed call and
    nothing times out afterwards.
    """
    clock = Clock()
    deadlines = lean.ConnectDeadlines(clock)
    attempt = Attempt(clock)
    _add(deadlines, attempt, 5.0)
    deadlines.stop()
    assert clock.getDelayedCalls() == []
    assert len(deadlines) == 0
    clock.advance(10.0)
    assert attempt.timedOut == []


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([0.5, 1.0, 2.0, 5.0]),  # the attempt's timeout
            st.integers(min_value=0, max_value=4),  # half-seconds until the next one
            st.one_of(st.none(), st.integers(min_value=0, max_value=12)),  # connects after
        ),
        max_size=40,
    )
)
def test_deadlines_match_one_timer_per_attempt(plan: list[tuple[float, int, int | None]]) -> None:
    """
    Whatever the mix of timeouts, start times and connects, every attempt
    times out exactly when a timer of its own would have fired (at its
    deadline, if it had not connected by then) and at no other time, once.
    """
    clock = Clock()
    deadlines = lean.ConnectDeadlines(clock)
    expected: dict[int, list[float]] = {}
    connects: list[tuple[float, int, Attempt]] = []
    attempts: list[Attempt] = []

    def settle() -> None:
        # The connects due by now complete, in order.
        connects.sort(key=lambda c: c[:2])
        while connects and connects[0][0] <= clock.seconds():
            connects.pop(0)[2].connected()

    for timeout, gap, connect_after in plan:
        now = clock.seconds()
        attempt = Attempt(clock)
        attempts.append(attempt)
        _add(deadlines, attempt, timeout)
        deadline = now + timeout
        connected_at = None if connect_after is None else now + connect_after * 0.5
        # Only a connect strictly before the deadline is in time (the
        # clock reaching the deadline fires the timeout first).
        timed_out = connected_at is None or connected_at >= deadline
        expected[id(attempt)] = [deadline] if timed_out else []
        if connected_at is not None and not timed_out:
            connects.append((connected_at, len(attempts), attempt))
        settle()
        for _ in range(gap):
            clock.advance(0.5)
            settle()
    for _ in range(40):
        clock.advance(0.5)
        settle()
    assert {id(a): a.timedOut for a in attempts} == expected
    assert clock.getDelayedCalls() == []


# -- ip_family ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "family"),
    [
        ("127.0.0.1", socket.AF_INET),
        ("10.0.0.255", socket.AF_INET),
        ("::1", socket.AF_INET6),
        ("2001:db8::7", socket.AF_INET6),
        ("backend.example", 0),
        ("fe80::1%eth0", 0),
        ("999.1.1.1", 0),
        ("", 0),
    ],
)
def test_ip_family(host: str, family: int) -> None:
    """
    Only IP literals the lean connect can take as they are get a family;
    a name, a scoped IPv6 address or garbage gets 0 (the general path).
    """
    assert lean.ip_family(host) == family
    assert lean.ip_family(host) == family  # (the cached answer)


# -- the lean connect, on real sockets ----------------------------------------


class Recording(ClientFactory):
    """
    Records what the lean connect tells its factory; C{done} fires (with
    C{None}) once it has been told either.
    """

    def __init__(self) -> None:
        self.built: list[Recorder] = []
        self.failed: list[Failure] = []
        self.done: defer.Deferred[None] = defer.Deferred()

    def buildProtocol(self, addr: Any) -> Protocol:
        protocol = Recorder()
        self.built.append(protocol)
        reactor.callLater(0, self.done.callback, None)  # (once it has its transport)
        return protocol

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.failed.append(reason)
        self.done.callback(None)


@pytest_twisted.inlineCallbacks
def test_connect_relays_bytes():
    """
    A lean connect to a listening backend builds the protocol once
    connected, on a non-blocking socket with C{TCP_NODELAY} and keepalive
    set, whose peer is the backend; bytes go both ways; closing it closes
    the socket.
    """
    fds = open_sockets()
    echo = listen(reactor, Echo)
    factory = Recording()
    transport = lean.connect(reactor, socket.AF_INET, "127.0.0.1", echo.port, factory, 5.0, True)
    yield factory.done
    assert factory.failed == []
    (protocol,) = factory.built
    assert protocol.transport is transport
    sock = transport.socket
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
    assert not sock.getblocking()
    assert (transport.getPeer().host, transport.getPeer().port) == ("127.0.0.1", echo.port)
    assert transport.getHost().port == echo.protocols[0].transport.getPeer().port
    transport.write(b"hello")
    yield wait_until(reactor, lambda: bytes(protocol.received) == b"hello")
    transport.loseConnection()
    yield wait_until(reactor, lambda: protocol.lost is not None)
    yield echo.stop()
    yield wait_until(reactor, lambda: open_sockets() <= fds)


@pytest_twisted.inlineCallbacks
def test_connect_refused_fails_once():
    """
    A refused connect tells the factory once, with Twisted's
    C{ConnectionRefusedError}, and leaves no socket open.
    """
    fds = open_sockets()
    refusing = RefusingPort()
    try:
        factory = Recording()
        lean.connect(reactor, socket.AF_INET, "127.0.0.1", refusing.port, factory, 5.0, True)
        yield factory.done
        (reason,) = factory.failed
        assert reason.check(error.ConnectionRefusedError)
        yield sleep(reactor, 0.05)
        assert len(factory.failed) == 1
        assert factory.built == []
    finally:
        refusing.close()
    yield wait_until(reactor, lambda: open_sockets() <= fds)


@pytest.fixture
def blackhole() -> Any:
    hole = BlackHole()
    if not hole.is_black():
        hole.close()
        pytest.skip("this kernel answers SYNs to a full accept queue")
    yield hole
    hole.close()


@pytest_twisted.inlineCallbacks
def test_connect_times_out_on_the_shared_timer(blackhole: BlackHole):
    """
    A connect nobody answers fails once with C{TimeoutError}, from the
    shared deadline queue, and its socket is closed.
    """
    fds = open_sockets()
    deadlines = lean.ConnectDeadlines(reactor)
    factory = Recording()
    transport = lean.connect(
        reactor, socket.AF_INET, "127.0.0.1", blackhole.port, factory, 0.2, True, deadlines
    )
    assert deadlines.connecting == 1
    yield factory.done
    (reason,) = factory.failed
    assert reason.check(error.TimeoutError)
    assert transport.disconnected
    assert deadlines.connecting == 0
    yield wait_until(reactor, lambda: open_sockets() <= fds)
    deadlines.stop()


@pytest_twisted.inlineCallbacks
def test_stop_connecting(blackhole: BlackHole):
    """
    C{stopConnecting()} abandons an attempt: the factory hears once, with
    Twisted's C{UserError} (as from a connector), its timer is gone, and a
    second C{stopConnecting()} raises C{NotConnectingError}.
    """
    factory = Recording()
    transport = lean.connect(
        reactor, socket.AF_INET, "127.0.0.1", blackhole.port, factory, 5.0, True
    )
    transport.stopConnecting()
    yield factory.done
    (reason,) = factory.failed
    assert reason.check(error.UserError)
    assert len(factory.failed) == 1
    assert transport._timeoutCall is None
    with pytest.raises(error.NotConnectingError):
        transport.stopConnecting()


# -- lean accepted transports, closing at once --------------------------------


class Keep(Protocol):
    """
    A server protocol that hands its transport to the test.
    """

    factory: "Keeping"

    def connectionMade(self) -> None:
        self.factory.accepted.callback(self.transport)


class Keeping(Factory):
    """
    Builds L{Keep}s; C{accepted} fires with the first one's transport.
    """

    protocol = Keep  # type: ignore[assignment]

    def __init__(self) -> None:
        self.accepted: defer.Deferred[Any] = defer.Deferred()


@pytest_twisted.inlineCallbacks
def test_adapted_port_accepts_lean_transports():
    """
    An adapted listening port accepts L{lean.LeanServer}s whose sockets
    inherited C{TCP_NODELAY} and keepalive from the listening socket;
    closing one with nothing buffered closes its socket in the call, and
    the peer reads the end of the stream.
    """
    factory = Keeping()
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        assert lean.adapt_port(port, keepalive=True)
        assert not lean.adapt_port(port, keepalive=True)  # (already adapted)
        peer = socket.create_connection(("127.0.0.1", port.getHost().port))
        try:
            transport = yield factory.accepted
            assert type(transport) is lean.LeanServer
            sock = transport.socket
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
            transport.write(b"bye")
            yield wait_until(
                reactor, lambda: transport.dataBuffer == b"" and not transport._tempDataLen
            )
            transport.loseConnection()
            assert transport.disconnected
            peer.settimeout(5.0)
            received = b""
            while True:
                chunk = peer.recv(100)
                if not chunk:
                    break
                received += chunk
            assert received == b"bye"
        finally:
            peer.close()
    finally:
        yield port.stopListening()


def test_adapt_port_leaves_other_ports_alone(tmp_path: Any) -> None:
    """
    Only a plain C{tcp.Port} is adapted: a UNIX listening port is left as
    it is.
    """
    port = reactor.listenUNIX(str(tmp_path / "s"), Factory.forProtocol(Protocol))
    try:
        assert not lean.adapt_port(port, keepalive=True)
    finally:
        port.stopListening()


@pytest_twisted.inlineCallbacks
def test_close_with_bytes_buffered_delivers_them():
    """
    A lean transport asked to close with bytes still buffered (its peer
    reads slowly) takes Twisted's graceful path: every byte arrives before
    the end of the stream.
    """
    factory = Keeping()
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    lean.adapt_port(port, keepalive=False)
    peer = socket.create_connection(("127.0.0.1", port.getHost().port))
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    try:
        transport = yield factory.accepted
        payload = bytes(range(256)) * 8192  # 2 MiB: more than the socket buffers hold
        transport.write(payload)
        transport.loseConnection()
        assert not transport.disconnected  # (waiting for its buffer to drain)
        peer.setblocking(False)
        received = bytearray()
        while True:
            try:
                chunk = peer.recv(65536)
            except BlockingIOError:
                yield sleep(reactor, 0.001)
                continue
            if not chunk:
                break
            received += chunk
        assert bytes(received) == payload
    finally:
        peer.close()
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_half_close_sends_the_fin_at_once_and_keeps_reading():
    """
    C{loseWriteConnection()} with nothing buffered shuts the write side in
    the call: the peer reads the end of the stream, and what the peer sends
    afterwards still arrives.
    """
    replier = listen(reactor, ReplyAfterEOF)
    factory = Recording()
    transport = lean.connect(
        reactor, socket.AF_INET, "127.0.0.1", replier.port, factory, 5.0, False
    )
    yield factory.done
    (protocol,) = factory.built
    transport.write(b"12345")
    yield wait_until(reactor, lambda: len(replier.protocols) == 1)
    yield wait_until(reactor, lambda: replier.protocols[0].count == 5)
    transport.loseWriteConnection()
    assert transport._writeDisconnected
    yield wait_until(reactor, lambda: protocol.lost is not None)
    assert replier.protocols[0].eof
    assert bytes(protocol.received) == b"got 5"
    yield replier.stop()


# -- the proxy on either path -------------------------------------------------


@pytest.mark.parametrize("use_lean", [True, False])
@pytest_twisted.inlineCallbacks
def test_proxy_takes_the_path_it_is_told(use_lean: bool):
    """
    With C{lean} on (the default) a proxied connection through a plain
    listener is a L{lean.LeanServer} paired with a L{lean.LeanClient};
    with it off, Twisted's C{tcp.Server} and C{tcp.Client} (so the fault
    suite, which runs on the default, exercises the lean path, and the
    general path still carries bytes).
    """
    echo = listen(reactor, Echo)
    settings_ = ProxySettings(connect_timeout=2.0, connect_budget=4.0, lean=use_lean)
    h = ProxyHarness(reactor, [backend("b1", port=echo.port, app="app")], settings_)
    try:
        yield h.assert_fresh_connection_works(b"first")
        client = yield h.connect()
        client.send(b"ping")
        yield wait_until(reactor, lambda: bytes(client.received) == b"ping")
        (session,) = h.sessions()
        server_type, backend_type = type(session.transport), type(session._out)
        if use_lean:
            assert (server_type, backend_type) == (lean.LeanServer, lean.LeanClient)
        else:
            assert (server_type, backend_type) == (tcp.Server, tcp.Client)
        assert h.logs.failures() == []
    finally:
        yield h.stop([echo])
