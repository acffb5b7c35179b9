"""
Tests of L{edgeproxy.net.reactor}: the C{edgeepoll} reactor plugin, a real
loopback connection through it, and a protocol error that drops only its own
connection.

Each test drives its own L{EdgeEPollReactor} instance by hand (C{iterate}),
next to the global reactor pytest-twisted runs, and closes everything it
opened.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

import pytest
from faultkit import LogCapture
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.protocol import ClientFactory, Factory, Protocol, connectionDone
from twisted.python.failure import Failure

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="epoll is Linux-only")


def _open_fds() -> int:
    """
    Open sockets, pipes and epoll fds of this process (not Twisted's
    process-wide reserved /dev/null fd, opened on first listen).
    """
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(("socket:", "pipe:", "anon_inode:")):
            count += 1
    return count


def _spin(reactor: Any, done: Callable[[], bool], limit: float = 5.0) -> None:
    """
    Iterate C{reactor} until C{done()} (or fail after C{limit} seconds).
    """
    deadline = reactor.seconds() + limit
    while not done():
        assert reactor.seconds() < deadline, "timed out"
        reactor.iterate(0.01)


def _close(reactor: Any) -> None:
    """
    Drop every reader/writer (closing their sockets) and the waker.
    """
    for selectable in reactor.removeAll():
        selectable.connectionLost(Failure(Exception("test over")))
    waker = getattr(reactor, "waker", None)
    if waker is not None:
        reactor.removeReader(waker)
        waker.connectionLost(None)
    reactor._poller.close()


class _Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]


class _Boom(Protocol):
    def dataReceived(self, data: bytes) -> None:
        raise ZeroDivisionError("boom")


class _Talker(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.lost: Failure | None = None

    def connectionMade(self) -> None:
        self.transport.write(b"ping")  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = reason


def _connect(reactor: Any, port: int) -> _Talker:
    talker = _Talker()
    factory = ClientFactory()
    factory.protocol = lambda: talker  # type: ignore[assignment]
    reactor.connectTCP("127.0.0.1", port, factory)
    return talker


def test_plugin_registers_edgeepoll():
    """
    The C{edgeepoll} reactor plugin is found by twistd's reactor lookup and
    installs L{edgeproxy.net.reactor}'s reactor.
    """
    from twisted.application.reactors import getReactorTypes

    [found] = [r for r in getReactorTypes() if r.shortName == "edgeepoll"]
    assert found.moduleName == "edgeproxy.net.reactor"  # type: ignore[attr-defined]
    from edgeproxy.net import reactor as module

    assert callable(module.install)
    assert issubclass(module.EdgeEPollReactor, EPollReactor)


def test_a_real_connection_through_edgeepoll():
    """
    A loopback client and an echo server, both on an L{EdgeEPollReactor},
    exchange bytes: the poll loop dispatches reads and writes.
    """
    from edgeproxy.net.reactor import EdgeEPollReactor

    fds = _open_fds()
    reactor = EdgeEPollReactor()
    try:
        port = reactor.listenTCP(0, Factory.forProtocol(_Echo), interface="127.0.0.1")
        talker = _connect(reactor, port.getHost().port)
        _spin(reactor, lambda: talker.received == b"ping")
        assert talker.received == b"ping"
        talker.transport.loseConnection()  # type: ignore[union-attr]
        _spin(reactor, lambda: talker.lost is not None)
        port.stopListening()
        reactor.iterate(0)
    finally:
        _close(reactor)
    assert _open_fds() <= fds


def test_protocol_error_drops_only_that_connection():
    """
    An exception in a protocol's dataReceived is logged (with the failure
    and the selectable as fields) and drops that connection; the reactor
    carries on and serves the next connection.
    """
    from edgeproxy.net.reactor import EdgeEPollReactor

    fds = _open_fds()
    reactor = EdgeEPollReactor()
    capture = LogCapture()
    capture.start()
    try:
        boom = reactor.listenTCP(0, Factory.forProtocol(_Boom), interface="127.0.0.1")
        echo = reactor.listenTCP(0, Factory.forProtocol(_Echo), interface="127.0.0.1")
        victim = _connect(reactor, boom.getHost().port)
        _spin(reactor, lambda: victim.lost is not None)
        failures = [e for e in capture.events if "log_failure" in e]
        assert len(failures) == 1
        assert failures[0]["log_failure"].check(ZeroDivisionError)
        assert "selectable" in failures[0] and failures[0]["prefix"]
        survivor = _connect(reactor, echo.getHost().port)
        _spin(reactor, lambda: survivor.received == b"ping")
        assert survivor.received == b"ping" and survivor.lost is None
        survivor.transport.loseConnection()  # type: ignore[union-attr]
        _spin(reactor, lambda: survivor.lost is not None)
        boom.stopListening()
        echo.stopListening()
        reactor.iterate(0)
    finally:
        capture.stop()
        _close(reactor)
    assert _open_fds() <= fds
