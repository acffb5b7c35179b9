"""
The parts of L{edgeproxy.net.workers} on fakes and real sockets, without
processes: the worker description, the group's metrics, the supervisor's
restart and stop logic (a fake spawn, a L{MemoryReactorClock}), verdict
forwarding, and the handoff's refusals.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Dict, List, Tuple

import pytest
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from edgeproxy.metrics import MetricsStore
from edgeproxy.net.sharedload import SharedCounters
from edgeproxy.net.workers import (
    HANDOFFS,
    Handoff,
    WorkerFds,
    WorkerMetrics,
    WorkerRuntime,
    WorkerSupervisor,
    worker_command,
)
from edgeproxy.routing.load import RttTable
from edgeproxy.routing.overlay import StateOverlay

UNAVAILABLE = 2


def fds(**changes: Any) -> WorkerFds:
    values: Dict[str, Any] = dict(
        index=1,
        count=2,
        listeners=(3, 4),
        families=(2, 10),
        counters=5,
        slots=64,
        control=6,
        inbox=7,
        outboxes=(8, -1),
        ipv6_prefix=56,
    )
    values.update(changes)
    return WorkerFds(**values)


def test_worker_description_round_trip() -> None:
    """
    What the supervisor writes into the worker's environment reads back
    the same.
    """
    description = fds()
    assert WorkerFds.decode(description.encode()) == description


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        "[]",
        '{"index": 0}',
        fds(index=2).encode(),
        fds(outboxes=(8,)).encode(),
        fds(families=(2,)).encode(),
    ],
)
def test_worker_description_refused(text: str) -> None:
    """
    A malformed or inconsistent description is refused with a reason naming
    the variable, not a traceback from deep inside the worker's startup.
    """
    with pytest.raises(ValueError, match="EDGEPROXY_WORKER"):
        WorkerFds.decode(text)


def test_worker_command_runs_twistd_in_the_foreground() -> None:
    """
    A worker is twistd in the foreground, without a pid file, with the
    supervisor's edgeproxy arguments.
    """
    command = worker_command(["--listen", "tcp:8080"])
    assert command[command.index("edgeproxy") :] == ["edgeproxy", "--listen", "tcp:8080"]
    assert "--nodaemon" in command and "--pidfile=" in command
    assert "--reactor=edgeepoll" not in command


def _report(counters: Dict[Tuple[str, str], int], observed: Tuple[float, ...] = ()) -> Any:
    store = MetricsStore()
    for (name, label), value in counters.items():
        store.increment(name, label, value)
    for seconds in observed:
        store.observe("connect_seconds", seconds)
    from edgeproxy.net.workers import _encode_report

    return _encode_report(store)


def test_group_metrics_sum_workers_and_keep_the_dead() -> None:
    """
    The supervisor's metrics are its own plus each worker's last report;
    when a worker is replaced its counts stay in the sums (counters never go
    backwards), and a fresh report from the replacement adds to them.
    """
    metrics = WorkerMetrics()
    metrics.increment("health_probes", "up", 2)
    metrics.report(0, _report({("connections_accepted", ""): 5}, (0.001,)))
    metrics.report(1, _report({("connections_accepted", ""): 7}, (0.002, 0.003)))
    assert metrics.counter("connections_accepted") == 12
    assert metrics.counters()[("health_probes", "up")] == 2
    assert metrics.histograms()["connect_seconds"].count == 3
    metrics.retire(0)
    assert metrics.counter("connections_accepted") == 12
    metrics.report(0, _report({("connections_accepted", ""): 1}))
    assert metrics.counter("connections_accepted") == 13
    assert metrics.counters()[("connections_accepted", "")] == 13
    assert metrics.histograms()["connect_seconds"].count == 3


def test_group_metrics_refuse_a_malformed_report() -> None:
    """
    A report that is not what a worker sends is refused with a reason, and
    the worker's previous report stays in force.
    """
    metrics = WorkerMetrics()
    metrics.report(0, _report({("connections_accepted", ""): 5}))
    with pytest.raises(ValueError, match="malformed"):
        metrics.report(0, {"counters": [["connections_accepted", "", "many"]]})
    assert metrics.counter("connections_accepted") == 5


def test_group_metrics_retain_prunes_retired_backends() -> None:
    """
    Counters of a backend that left the table go from the retired sums too.
    """
    metrics = WorkerMetrics()
    metrics.report(0, _report({("backend_connect_failures", "gone"): 3}))
    metrics.retire(0)
    assert metrics.counter("backend_connect_failures", "gone") == 3
    assert metrics.retain("backend_connect_failures", {"kept"}) == 1
    assert metrics.counter("backend_connect_failures", "gone") == 0


def test_group_gauges_from_reports() -> None:
    """
    Gauges the workers report (bindings) are summed over the live workers.
    """
    metrics = WorkerMetrics()
    metrics.report(0, {"counters": [], "histograms": {}, "gauges": {"bindings": 4}})
    metrics.report(1, {"counters": [], "histograms": {}, "gauges": {"bindings": 6}})
    assert metrics.gauge("bindings") == 10
    metrics.retire(1)
    assert metrics.gauge("bindings") == 4


class FakeProcessTransport:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: List[str] = []

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class Spawner:
    """
    Records spawnProcess calls; each gets a fake transport with a new pid.
    """

    def __init__(self) -> None:
        self.calls: List[Dict[str, Any]] = []
        self.protocols: List[Any] = []
        self.transports: List[FakeProcessTransport] = []

    def __call__(self, protocol: Any, executable: str, args: Any, env: Any, childFDs: Any) -> Any:
        transport = FakeProcessTransport(1000 + len(self.calls))
        self.calls.append({"args": args, "env": env, "childFDs": childFDs})
        protocol.transport = transport
        protocol.connectionMade()
        self.protocols.append(protocol)
        self.transports.append(transport)
        return transport


@pytest.fixture
def counters() -> Any:
    c = SharedCounters.create(2, slots=64)
    yield c
    c.close()


def supervisor(counters: Any, **kwargs: Any) -> Tuple[WorkerSupervisor, Spawner, Any]:
    reactor = MemoryReactorClock()
    spawner = Spawner()
    sup = WorkerSupervisor(
        reactor,
        2,
        [("127.0.0.1", 0, True)],
        ["python", "-c", "pass"],
        counters=counters,
        metrics=WorkerMetrics(),
        spawn=spawner,
        **kwargs,
    )
    return sup, spawner, reactor


def _end(protocol: Any, code: int = 1) -> None:
    reason = ProcessDone(0) if code == 0 else ProcessTerminated(code)
    protocol.processEnded(Failure(reason))


def test_supervisor_gives_each_worker_its_descriptors(counters: Any) -> None:
    """
    Each worker gets its own member of every listener's group, the shared
    counters, a control connection, its inbox and the others' outboxes,
    at the descriptor numbers its environment names.
    """
    sup, spawner, reactor = supervisor(counters)
    sup.privilegedStartService()
    sup.startService()
    try:
        assert len(spawner.calls) == 2
        for index, call in enumerate(spawner.calls):
            description = WorkerFds.decode(call["env"]["EDGEPROXY_WORKER"])
            child = call["childFDs"]
            assert description.index == index and description.count == 2
            assert child[description.listeners[0]] == sup.groups[0][index].fileno()
            assert child[description.counters] == counters.fd
            assert child[description.inbox] == sup.inboxes[index][0].fileno()
            assert description.outboxes[index] == -1
            other = 1 - index
            assert child[description.outboxes[other]] == sup.inboxes[other][1].fileno()
        # The control connections were adopted, one per worker.
        assert len(reactor.adoptedStreamConnections) == 2
        assert sup.pids == {0: 1000, 1: 1001}
    finally:
        sup._closeSockets()


def test_supervisor_replaces_a_dead_worker_with_backoff(counters: Any) -> None:
    """
    A worker that dies is replaced after 0.5 s, its shared counts zeroed
    first; one that keeps dying young waits twice as long each time; one
    that ran for a while is replaced after 0.5 s again.
    """
    sup, spawner, reactor = supervisor(counters)
    sup.privilegedStartService()
    sup.startService()
    try:
        slot = counters.slotFor("b1")
        counters.acquire(slot, 0, 0)
        counters.acquire(slot, 0, 0)
        counters.acquire(slot, 1, 0)
        _end(spawner.protocols[0])
        assert counters.total(slot) == 1
        assert 0 not in sup.pids
        reactor.advance(0.4)
        assert len(spawner.calls) == 2
        reactor.advance(0.1)
        assert len(spawner.calls) == 3
        _end(spawner.protocols[2])
        reactor.advance(0.9)
        assert len(spawner.calls) == 3
        reactor.advance(0.1)
        assert len(spawner.calls) == 4
        spawner.protocols[3].started -= 60  # it ran for a minute
        _end(spawner.protocols[3])
        reactor.advance(0.5)
        assert len(spawner.calls) == 5
        assert sup.describe()[0]["restarts"] == 3
    finally:
        sup._closeSockets()


def test_supervisor_stop_terminates_and_waits(counters: Any) -> None:
    """
    Stopping sends every worker SIGTERM and fires only when all have
    exited; a worker that ends meanwhile is not replaced; one still running
    at the deadline is killed.
    """
    sup, spawner, reactor = supervisor(counters, shutdown_timeout=5.0)
    sup.privilegedStartService()
    sup.startService()
    stopped = sup.stopService()
    fired: List[Any] = []
    stopped.addCallback(fired.append)
    assert [t.signals for t in spawner.transports] == [["TERM"], ["TERM"]]
    _end(spawner.protocols[0], 0)
    reactor.advance(10)
    assert not fired and len(spawner.calls) == 2
    reactor.advance(5)
    assert spawner.transports[1].signals == ["TERM", "KILL"]
    _end(spawner.protocols[1], 0)
    assert fired == [None]
    assert sup.groups == [] and sup.inboxes == []


def test_verdicts_forwarded_only_for_supervisor_sources(counters: Any) -> None:
    """
    The supervisor sends the workers its health and heartbeat verdicts (a
    change under an admin state included, by the periodic sync), not the
    sources each worker has itself; a worker applies them to its overlay.
    """
    overlay = StateOverlay()
    sup, _, _ = supervisor(counters, overlay=overlay)
    sent: List[Any] = []
    sup.broadcast = sent.append  # type: ignore[method-assign,assignment]
    overlay.setVerdict("b1", "admin", UNAVAILABLE)
    overlay.setVerdict("b1", "health", UNAVAILABLE)
    sup._syncVerdicts()
    assert sent == [{"verdicts": {"b1": {"health": UNAVAILABLE}}}]
    sup._syncVerdicts()
    assert len(sent) == 1
    overlay.setVerdict("b1", "health", 0)
    sup._syncVerdicts()
    assert sent[-1] == {"verdicts": {"b1": {}}}

    worker_overlay = StateOverlay()
    runtime = WorkerRuntime(
        MemoryReactorClock(),
        fds(),
        metrics=MetricsStore(),
        load=None,
        overlay=worker_overlay,
        rtts=RttTable(),
        handoff=None,
    )
    runtime.applyVerdicts(sent[0]["verdicts"])
    assert "b1" in worker_overlay.unavailable
    runtime.applyVerdicts(sent[-1]["verdicts"])
    assert "b1" not in worker_overlay.unavailable
    runtime.applyRtts({"b1": 0.002})
    assert dict(runtime.rtts) == {"b1": 0.002}
    runtime.applyRtts({})
    assert dict(runtime.rtts) == {}


class FakeTransport:
    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock
        self._shouldShutdown = True
        self.events: List[str] = []

    def stopReading(self) -> None:
        self.events.append("stopReading")

    def loseConnection(self) -> None:
        self.events.append("loseConnection")


class Protocol:
    def __init__(self, transport: Any) -> None:
        self.transport = transport


def test_handoff_sends_the_socket_and_closes_without_shutdown() -> None:
    """
    A handed-off connection's descriptor and bytes reach the owner's inbox;
    the sender closes its copy without shutdown() (which would end the
    connection for the owner too).
    """
    inbox, outbox = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a, b = socket.socketpair()
    try:
        metrics = MetricsStore()
        handoff = Handoff(MemoryReactorClock(), 0, 2, 64, [None, outbox], metrics)
        transport = FakeTransport(a)
        assert handoff.send(3, Protocol(transport), b"PROXY ...\r\nhello", 1)
        assert transport._shouldShutdown is False
        assert transport.events == ["stopReading", "loseConnection"]
        data, received, _, _ = socket.recv_fds(inbox, 1024, 2)
        assert data[3:] == b"PROXY ...\r\nhello" and data[1:3] == b"\x00\x03"
        assert len(received) == 1
        # It is the same connection.
        passed = socket.socket(fileno=received[0])
        passed.sendall(b"x")
        assert b.recv(1) == b"x"
        passed.close()
        assert metrics.counter(HANDOFFS, "sent") == 1
    finally:
        for s in (inbox, outbox, a, b):
            s.close()


def test_handoff_serves_here_when_the_owner_inbox_is_full() -> None:
    """
    When the owner's inbox is full the connection is served where it was
    accepted (counted as failed, logged once), and its transport is left
    alone.
    """
    inbox, outbox = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a, b = socket.socketpair()
    outbox.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    try:
        metrics = MetricsStore()
        handoff = Handoff(MemoryReactorClock(), 0, 2, 64, [None, outbox], metrics)
        sent = 0
        while True:
            transport = FakeTransport(a)
            if not handoff.send(0, Protocol(transport), b"x" * 2048, 1):
                break
            sent += 1
            assert sent < 10_000
        assert transport.events == [] and transport._shouldShutdown is True
        assert metrics.counter(HANDOFFS, "failed") == 1
    finally:
        for s in (inbox, outbox, a, b):
            s.close()


def test_handoff_drops_malformed_messages_and_closes_their_descriptors() -> None:
    """
    A handoff message without exactly one descriptor, of another version,
    or for a listener this worker does not have is dropped, counted, and
    its descriptors are closed (none leaks).
    """
    metrics = MetricsStore()
    handoff = Handoff(MemoryReactorClock(), 0, 2, 64, [None, None], metrics)
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    handoff.received(b"\x01\x00\x00data", [r1, w1])
    handoff.received(b"\x09\x00\x00data", [r2])
    handoff.received(b"\x01\x00\x05data", [w2])
    handoff.received(b"", [])
    for fd in (r1, w1, r2, w2):
        with pytest.raises(OSError):
            os.fstat(fd)
    assert metrics.counter(HANDOFFS, "dropped") == 4


def test_handoff_owner_matches_the_kernel_steering() -> None:
    """
    The handoff's owner of a client is the steering's, so a connection
    handed over lands where a direct one would.
    """
    from edgeproxy.net.steering import owner_of

    handoff = Handoff(MemoryReactorClock(), 0, 3, 48, [None, None, None], MetricsStore())
    for host in ("203.0.113.7", "2001:db8:1:2::1", "::ffff:198.51.100.1"):
        assert handoff.owner(host) == owner_of(host, 3, 48)


class ExplodingReactor(MemoryReactorClock):
    def adoptStreamConnection(self, fileDescriptor: int, addressFamily: int, factory: Any) -> Any:
        raise RuntimeError("boom")


def test_handoff_survives_a_connection_that_fails_on_adoption() -> None:
    """
    An exception while adopting one handed-off connection is logged and
    counted, and the next one is still taken: one bad connection does not
    take the inbox down.
    """
    metrics = MetricsStore()
    handoff = Handoff(ExplodingReactor(), 0, 2, 64, [None, None], metrics)
    handoff.factories[0] = object()  # type: ignore[assignment]
    for _ in range(2):
        a, b = socket.socketpair()
        fd = os.dup(a.fileno())
        handoff.received(b"\x01\x00\x00PROXY", [fd])
        with pytest.raises(OSError):
            os.fstat(fd)
        a.close()
        b.close()
    assert metrics.counter(HANDOFFS, "dropped") == 2


def test_handoff_counts_an_adoption_refused_by_admission_as_dropped() -> None:
    """
    A handed-off connection that the owner's admission refuses (its port's
    factory returns no protocol) is counted as dropped, not received.
    """
    metrics = MetricsStore()
    handoff = Handoff(MemoryReactorClock(), 0, 2, 64, [None, None], metrics)
    handoff.factories[0] = object()  # type: ignore[assignment]
    a, b = socket.socketpair()
    handoff.received(b"\x01\x00\x00PROXY", [os.dup(a.fileno())])
    a.close()
    b.close()
    assert metrics.counter(HANDOFFS, "dropped") == 1
    assert metrics.counter(HANDOFFS, "received") == 0


def test_late_report_of_an_ended_worker_is_ignored(counters: Any) -> None:
    """
    A metrics report still unread when its worker's process ended is
    ignored: its counts were retired, and counting them again would make
    the group's counters jump and then fall when the replacement reports.
    """
    from edgeproxy.net.workers import SupervisorLink

    sup, spawner, _ = supervisor(counters)
    sup.privilegedStartService()
    sup.startService()
    try:
        link = SupervisorLink(sup, 0)
        sup.links[0] = link
        link.messageReceived({"metrics": _report({("connections_accepted", ""): 5})})
        _end(spawner.protocols[0])
        link.messageReceived({"metrics": _report({("connections_accepted", ""): 6})})
        assert sup.metrics.counter("connections_accepted") == 5
    finally:
        sup._closeSockets()


def test_supervisor_refuses_a_port_in_use(counters: Any) -> None:
    """
    A port another process listens on fails startup with a reason, as with
    one process (the reuseport group would otherwise join its socket).
    """
    taken = socket.socket()
    taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        reactor = MemoryReactorClock()
        sup = WorkerSupervisor(
            reactor,
            2,
            [("127.0.0.1", taken.getsockname()[1], True)],
            ["python"],
            counters=counters,
            metrics=WorkerMetrics(),
            spawn=Spawner(),
        )
        with pytest.raises(SystemExit, match=r"cannot listen on 127\.0\.0\.1"):
            sup.privilegedStartService()
    finally:
        taken.close()


@pytest.mark.parametrize("steer", ["on", "off"])
def test_supervisor_steers_unless_the_bench_switch_says_off(
    counters: Any, monkeypatch: Any, steer: str
) -> None:
    """
    A plain listener's group gets the steering program; the benchmark-only
    EDGEPROXY_WORKERS_STEER=off leaves it to the kernel's hash.
    """
    from test_steering import has_program

    if steer == "off":
        monkeypatch.setenv("EDGEPROXY_WORKERS_STEER", "off")
    else:
        monkeypatch.delenv("EDGEPROXY_WORKERS_STEER", raising=False)
    sup, _, _ = supervisor(counters)
    sup.privilegedStartService()
    try:
        assert has_program(sup.groups[0][0]) is (steer == "on")
    finally:
        sup._closeSockets()
