"""
Tests for the passive circuit breaker (L{edgeproxy.routing.breaker}) and
panic routing (issue 8 item 2): on a Clock with the real router, then on
real sockets through the proxy.
"""

from __future__ import annotations

import random

import pytest
import pytest_twisted
from faultkit import Echo, LogCapture, ProxyHarness, RefusingPort, listen, wait_until
from twisted.internet import reactor
from twisted.internet.task import Clock

from edgeproxy.config import ProxySettings
from edgeproxy.interfaces import AVAILABLE, NO_NEW_CLIENTS, UNAVAILABLE
from edgeproxy.routing.breaker import CLOSED, HALF_OPEN, OPEN, TRIAL, CircuitBreaker
from edgeproxy.routing.router import NO_BACKEND, PANIC, Router
from edgeproxy.testing import (
    BindingTable,
    InMemoryBackendRepository,
    MetricsStore,
    StateOverlay,
    backend,
)


def _breaker(failures: int = 3, cooldown: float = 10.0):
    clock = Clock()
    overlay = StateOverlay()
    return CircuitBreaker(overlay, clock, failures, cooldown, MetricsStore()), overlay, clock


def test_opens_after_consecutive_failures_only():
    """
    N consecutive connect failures open the breaker (verdict UNAVAILABLE);
    a success in between resets the count.
    """
    breaker, overlay, _ = _breaker(failures=3)
    breaker.connectFailed("a")
    breaker.connectFailed("a")
    breaker.connectSucceeded("a")
    breaker.connectFailed("a")
    breaker.connectFailed("a")
    assert breaker.state("a") == CLOSED and overlay.verdict("a") == AVAILABLE
    breaker.connectFailed("a")
    assert breaker.state("a") == OPEN and overlay.verdict("a") == UNAVAILABLE


def test_cooldown_then_one_trial_then_closed():
    """
    After the cooldown the breaker is half-open: the backend may be chosen
    again; the first connection chosen is the trial and nothing else goes
    there while it runs; its success closes the breaker.
    """
    breaker, overlay, clock = _breaker(failures=1, cooldown=10.0)
    breaker.connectFailed("a")
    clock.advance(9.9)
    assert breaker.state("a") == OPEN
    clock.advance(0.1)
    assert breaker.state("a") == HALF_OPEN and overlay.verdict("a") == AVAILABLE
    assert breaker.halfOpen == {"a"}
    breaker.trialStarted("a")
    assert breaker.state("a") == TRIAL and overlay.verdict("a") == UNAVAILABLE
    assert breaker.halfOpen == set()
    breaker.connectSucceeded("a")
    assert breaker.state("a") == CLOSED and overlay.verdict("a") == AVAILABLE
    assert clock.getDelayedCalls() == []


def test_failed_trial_reopens():
    """
    A failed trial opens the breaker again for another cooldown.
    """
    breaker, overlay, clock = _breaker(failures=1, cooldown=5.0)
    breaker.connectFailed("a")
    clock.advance(5.0)
    breaker.trialStarted("a")
    breaker.connectFailed("a")
    assert breaker.state("a") == OPEN and overlay.verdict("a") == UNAVAILABLE
    clock.advance(5.0)
    assert breaker.state("a") == HALF_OPEN


def test_zero_failures_disables_and_forget_and_stop():
    """
    C{failures=0} never opens; C{forget} drops a removed backend's state,
    timer and verdict; C{stop} leaves no pending call.
    """
    breaker, overlay, clock = _breaker(failures=0)
    for _ in range(100):
        breaker.connectFailed("a")
    assert breaker.state("a") == CLOSED
    breaker2, overlay2, clock2 = _breaker(failures=1)
    breaker2.connectFailed("a")
    breaker2.connectFailed("b")
    breaker2.forget({"a"})
    assert overlay2.verdict("a") == AVAILABLE and breaker2.state("a") == CLOSED
    breaker2.stop()
    assert [c for c in clock2.getDelayedCalls() if c.active()] == []
    with pytest.raises(ValueError):
        CircuitBreaker(overlay, clock, failures=-1)


def test_transitions_logged_once_each():
    """
    Each state change is one log line with the reason; repeated failures
    while open add none.
    """
    logs = LogCapture().start()
    try:
        breaker, _, clock = _breaker(failures=2, cooldown=1.0)
        for _ in range(10):
            breaker.connectFailed("a")
        clock.advance(1.0)
        breaker.trialStarted("a")
        breaker.connectSucceeded("a")
    finally:
        logs.stop()
    mine = [e for e in logs.events if e.get("log_namespace") == "edgeproxy.routing.breaker"]
    assert [(e["old"], e["new"]) for e in mine] == [
        (CLOSED, OPEN),
        (OPEN, HALF_OPEN),
        (HALF_OPEN, TRIAL),
        (TRIAL, CLOSED),
    ]
    assert "consecutive connect failures" in mine[0]["reason"]


def _router(rows, failures=1, panic=True):
    clock = Clock()
    overlay = StateOverlay()
    metrics = MetricsStore()
    breaker = CircuitBreaker(overlay, clock, failures, 10.0, metrics)
    router = Router(
        InMemoryBackendRepository(rows),
        BindingTable(),
        None,
        metrics,
        "sa",
        clock,
        random.Random(2),
        overlay=overlay,
        breaker=breaker,
        panic=panic,
    )
    return router, breaker, overlay, clock, metrics


def test_router_sends_exactly_one_trial():
    """
    Through the router: once the cooldown is over, exactly one connection
    goes to the half-open backend (bound client or new), the others go
    elsewhere until the trial has succeeded.
    """
    a = backend("a")
    b = backend("b", region="eu", country="FR")
    router, breaker, _, clock, _ = _router([a, b])
    router.connectFailed("192.0.2.1", "app", "a")
    assert breaker.state("a") == OPEN
    assert router.choose("192.0.2.2", "app").id == "b"  # type: ignore[union-attr]
    clock.advance(10.0)
    picks = [router.choose(f"192.0.2.{i}", "app").id for i in range(10, 20)]  # type: ignore[union-attr]
    assert picks.count("a") == 1 and picks[0] == "a"
    router.connectSucceeded("a")
    assert breaker.state("a") == CLOSED
    assert router.choose("192.0.2.99", "app").id == "a"  # type: ignore[union-attr]


def test_panic_routes_to_the_ejected_when_nothing_else_is_left():
    """
    With every candidate ejected by the proxy's own verdicts (breaker or
    health), panic routing sends the client to the best of them, counted
    and logged once; with panic off it is no-backend; the operator's drain
    and maint are never overridden.
    """
    a = backend("a")
    router, _, overlay, _, metrics = _router([a])
    router.connectFailed("192.0.2.1", "app", "a")
    overlay.setVerdict("a", "health", UNAVAILABLE)
    logs = LogCapture().start()
    try:
        assert router.choose("192.0.2.2", "app").id == "a"  # type: ignore[union-attr]
        assert router.choose("192.0.2.3", "app").id == "a"  # type: ignore[union-attr]
    finally:
        logs.stop()
    assert metrics.counter(PANIC) == 2
    assert len([e for e in logs.events if "panic" in e.get("log_format", "")]) == 1
    overlay.setVerdict("a", "admin", NO_NEW_CLIENTS)
    assert router.choose("192.0.2.4", "app") is None
    assert metrics.counter(NO_BACKEND) == 1

    strict, _, overlay2, _, metrics2 = _router([a], panic=False)
    overlay2.setVerdict("a", "health", UNAVAILABLE)
    assert strict.choose("192.0.2.2", "app") is None
    assert metrics2.counter(PANIC) == 0 and metrics2.counter(NO_BACKEND) == 1


@pytest.mark.slow
@pytest_twisted.inlineCallbacks
def test_breaker_on_real_sockets():
    """
    A backend that refuses connections: after --breaker-failures refusals
    its breaker opens and new clients go straight to the other backend
    (no more attempts at the refusing one); once it listens again and the
    cooldown is over, one trial connection closes the breaker and it takes
    clients again.
    """
    refusing = RefusingPort()
    echo = listen(reactor, Echo)
    rows = [
        backend("flaky", port=refusing.port, weight=10),
        backend("steady", port=echo.port, region="eu", country="FR"),
    ]
    settings = ProxySettings(connect_timeout=1.0, max_attempts=2, connect_budget=3.0)
    h = ProxyHarness(reactor, rows, settings)
    breaker = CircuitBreaker(h.router.overlay, reactor, failures=3, cooldown=0.5, metrics=h.metrics)
    h.router.breaker = breaker
    h.router._halfOpen = breaker.halfOpen  # type: ignore[attr-defined]
    revived = None
    try:
        for i in range(3):
            client = yield h.connect()
            client.send(b"x%d" % i)
            yield client.wait_for(2)
            client.transport.loseConnection()
            yield client.wait_closed()
            # Every client is 127.0.0.1: forget its binding to the backend
            # it failed over to, so the next one tries the flaky one first.
            h.bindings.removeBackend("steady")
        assert breaker.state("flaky") == OPEN
        failures_when_open = h.metrics.counter("backend_connect_failures", "flaky")
        assert failures_when_open == 3
        for i in range(3):
            client = yield h.connect()
            client.send(b"y%d" % i)
            yield client.wait_for(2)
            client.transport.loseConnection()
            yield client.wait_closed()
            h.bindings.removeBackend("steady")
        assert h.metrics.counter("backend_connect_failures", "flaky") == failures_when_open
        port = refusing.port
        refusing.close()
        revived = reactor.listenTCP(port, echo.factory, interface="127.0.0.1")
        yield wait_until(reactor, lambda: breaker.state("flaky") == HALF_OPEN, timeout=5.0)
        client = yield h.connect()
        client.send(b"trial")
        yield client.wait_for(5)
        assert breaker.state("flaky") == CLOSED
        client.transport.loseConnection()
        yield client.wait_closed()
    finally:
        breaker.stop()
        if revived is not None:
            yield revived.stopListening()
        yield h.stop([echo])


def test_panic_is_logged_once_per_app_and_not_when_backends_are_only_full():
    """
    Panic routing is logged once per app and episode (alternating
    connections of a panicking and a healthy app do not flip it), and a
    backend that is merely at its hard limit does not trigger panic: the
    client is refused (no-backend) rather than sent to an ejected backend.
    """
    rows = [
        backend("a1", app="a"),
        backend("b1", app="b"),
        backend("c-full", app="c", hard_limit=1),
        backend("c-down", app="c", region="eu", country="FR"),
    ]
    router, _, overlay, _, metrics = _router(rows)
    overlay.setVerdict("a1", "health", UNAVAILABLE)
    logs = LogCapture().start()
    try:
        for i in range(6):
            assert router.choose(f"192.0.2.{i}", "a" if i % 2 == 0 else "b") is not None
    finally:
        logs.stop()
    panic_lines = [e for e in logs.events if "panic routing" in e.get("log_format", "")]
    assert len(panic_lines) == 1
    overlay.setVerdict("c-down", "health", UNAVAILABLE)
    assert router.choose("198.51.100.1", "c").id == "c-full"  # type: ignore[union-attr]
    assert router.choose("198.51.100.2", "c") is None
    assert metrics.counter(PANIC) == 3
    assert router.lastTier is None


def test_a_trial_without_a_result_lets_another_try():
    """
    A trial whose connection never reports (the client hung up while it was
    connecting, it was cut, a local error) does not leave the backend
    ejected for good: after the trial timeout another connection may try.
    """
    breaker, overlay, clock = _breaker(failures=1, cooldown=5.0)
    breaker.trialTimeout = 3.0
    breaker.connectFailed("a")
    clock.advance(5.0)
    breaker.trialStarted("a")
    assert breaker.state("a") == TRIAL and overlay.verdict("a") == UNAVAILABLE
    clock.advance(3.0)
    assert breaker.state("a") == HALF_OPEN and overlay.verdict("a") == AVAILABLE
    assert breaker.halfOpen == {"a"}


def test_backends_leaving_the_table_are_forgotten():
    """
    A reload that removes a backend forgets its breaker state and verdict
    (so a backend re-added later starts closed).
    """
    from edgeproxy.model import RoutingSnapshot

    breaker, overlay, _ = _breaker(failures=1)
    breaker.connectFailed("a")
    breaker.connectFailed("b")
    old = RoutingSnapshot.build([backend("a"), backend("b")])
    new = RoutingSnapshot.build([backend("b")])
    breaker.routingTableChanged(old, new)
    assert breaker.state("a") == CLOSED and overlay.verdict("a") == AVAILABLE
    assert breaker.state("b") == OPEN
