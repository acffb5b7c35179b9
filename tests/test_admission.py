"""
Admission at accept time (issue 7, defect 3; FAULTS F21): the global
connection cap holds before any TLS handshake or PROXY header work, for
every listener type.  Unit tests of L{edgeproxy.net.admission} on fakes,
then floods of silent connections on real loopback sockets.
"""

from __future__ import annotations

import errno
import select
import socket
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from faultkit import LogCapture, Stall, listen, wait_until
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from edgeproxy.config import ProxySettings
from edgeproxy.metrics import MetricsStore
from edgeproxy.net.admission import Admission, AdmissionFactory
from edgeproxy.net.endpoints import ProxyHeaderProtocol, server_endpoint
from edgeproxy.net.proxy import ProxyFactory
from edgeproxy.routing.router import Router
from edgeproxy.testing import BindingTable, InMemoryBackendRepository, backend

PEER = IPv4Address("TCP", "192.0.2.1", 5000)


class _Plain(Protocol):
    """
    A protocol that knows nothing of admission.
    """


def test_admission_counts_and_refuses_at_the_cap():
    """
    C{acceptPeer} takes slots up to the cap and refuses beyond it, counting
    each refusal as C{connections_rejected}/C{limit}; a released slot can be
    taken again; 0 means unlimited.
    """
    metrics = MetricsStore()
    admission = Admission(2, metrics)
    assert admission.acceptPeer(PEER) and admission.acceptPeer(PEER)
    assert not admission.acceptPeer(PEER)
    assert not admission.acceptPeer(PEER)
    assert metrics.counter("connections_rejected", "limit") == 2
    admission.leave()
    assert admission.open == 1
    assert admission.acceptPeer(PEER)
    unlimited = Admission(0, metrics)
    assert all(unlimited.acceptPeer(PEER) for _ in range(10_000))
    with pytest.raises(ValueError):
        Admission(-1, metrics)


def test_admission_logs_once_per_episode():
    """
    A flood at the cap is logged twice, not once per refused connection:
    when refusals start, and when a connection is admitted again (with how
    many were refused meanwhile).
    """
    logs = LogCapture().start()
    try:
        admission = Admission(1, MetricsStore())
        admission.acceptPeer(PEER)
        for _ in range(1000):
            admission.acceptPeer(PEER)
        admission.leave()
        admission.acceptPeer(PEER)
    finally:
        logs.stop()
    mine = [e for e in logs.events if e.get("log_namespace") == "edgeproxy.net.admission"]
    assert [e.get("refused") for e in mine] == [None, 1000]


def test_factory_returns_none_over_the_cap():
    """
    Over the cap the admission factory builds nothing (Twisted's port then
    closes the socket before any transport or protocol exists), and never
    asks the wrapped factory.
    """
    built: list[Any] = []
    inner = Factory.forProtocol(_Plain)
    original = inner.buildProtocol

    def counting(addr: Any) -> Any:
        built.append(addr)
        return original(addr)

    inner.buildProtocol = counting  # type: ignore[method-assign]
    admission = Admission(1, MetricsStore())
    factory = AdmissionFactory(inner, admission)
    assert factory.buildProtocol(PEER) is not None
    assert factory.buildProtocol(PEER) is None
    assert len(built) == 1


def test_protocols_that_hold_their_slot():
    """
    The package's own socket-level protocols (the proxied session, the
    PROXY header reader) are handed the slot and give it back on
    connectionLost; any other protocol is wrapped by one that does.
    """
    admission = Admission(10, MetricsStore())
    repository = InMemoryBackendRepository([])
    metrics = MetricsStore()
    router = Router(repository, BindingTable(), None, metrics, "sa", reactor)
    proxy = ProxyFactory(router, reactor, ProxySettings(), metrics, admitsPeers=False)
    session = AdmissionFactory(proxy, admission).buildProtocol(PEER)
    assert session is not None and type(session).__name__ == "ProxyClientProtocol"
    assert session.admission is admission  # type: ignore[attr-defined]
    other = AdmissionFactory(Factory.forProtocol(_Plain), admission).buildProtocol(PEER)
    assert other is not None and not isinstance(other, _Plain)
    other.makeConnection(StringTransport())
    assert admission.open == 2
    session.connectionLost(Failure(ConnectionDone()))
    other.connectionLost(Failure(ConnectionDone()))
    assert admission.open == 0


# -- real sockets -----------------------------------------------------------------

FLOOD = 300
CAP = 5
#: A backlog that takes the whole flood at once (Twisted's default is 50).
TCP = "tcp:0:interface=127.0.0.1:backlog=1024"


def _certdir(tmp_path: Path) -> Path:
    from test_tls import pem

    directory = tmp_path / "certs"
    directory.mkdir()
    (directory / "DEFAULT.pem").write_bytes(pem("default.test"))
    return directory


def _closed_by_peer(sock: socket.socket) -> bool:
    """
    Whether the proxy has closed (FIN or RST) this client socket.
    """
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except OSError as e:
        return e.errno in (errno.ECONNRESET, errno.EPIPE)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["plain", "haproxy", "txsni", "txsni-over-haproxy"])
@pytest_twisted.inlineCallbacks
def test_silent_flood_is_capped_before_handshake_or_header(kind, tmp_path):
    """
    F21 / defect 3: 300 silent connections to a listener with a cap of 5:
    5 are held (waiting for a handshake or header that never comes, under
    timeouts far longer than the test), the other 295 are closed at once
    and counted, for plain, C{haproxy:}, C{txsni:} and
    C{txsni:...:haproxy:} listeners alike; once the silent ones go, a new
    connection is admitted again.
    """
    metrics = MetricsStore()
    admission = Admission(CAP, metrics)
    if kind == "plain":
        description = TCP
    elif kind == "haproxy":
        description = f"haproxy:{TCP}"
    elif kind == "txsni":
        description = f"txsni:{_certdir(tmp_path)}:{TCP}"
    else:
        description = f"txsni:{_certdir(tmp_path)}:haproxy:{TCP}"
    endpoint = server_endpoint(
        reactor,
        description,
        metrics=metrics,
        header_timeout=60.0,
        tls_handshake_timeout=60.0,
        admission=admission,
    )
    # A backend that accepts and never answers holds the plain sessions.
    stall = listen(reactor, Stall)
    repository = InMemoryBackendRepository([backend("stall", port=stall.port)])
    router = Router(repository, BindingTable(), None, metrics, "sa", reactor)
    # (The silent plain sessions end by the half-closed timeout once their
    # clients close: the stalled backend never answers the FIN.)
    settings = ProxySettings(max_connections=CAP, connect_timeout=1.0, half_closed_timeout=1.0)
    proxy = ProxyFactory(router, reactor, settings, metrics, admission=admission, admitsPeers=False)
    port = yield endpoint.listen(proxy)
    address = port.getHost()
    sockets: list[socket.socket] = []
    try:
        for _ in range(FLOOD):
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect((address.host, address.port))
            except BlockingIOError:
                pass
            sockets.append(s)
        try:
            yield wait_until(
                reactor,
                lambda: metrics.counter("connections_rejected", "limit") == FLOOD - CAP,
                timeout=10.0,
            )
        except AssertionError:
            raise AssertionError((metrics.counters(), admission.open)) from None
        assert admission.open == CAP
        yield wait_until(
            reactor,
            lambda: sum(_closed_by_peer(s) for s in sockets) == FLOOD - CAP,
            timeout=10.0,
        )
        held = [s for s in sockets if not _closed_by_peer(s)]
        assert len(held) == CAP
        for s in sockets:
            s.close()
        sockets = []
        yield wait_until(reactor, lambda: admission.open == 0, timeout=10.0)
        late = socket.create_connection((address.host, address.port))
        sockets.append(late)
        yield wait_until(reactor, lambda: admission.open == 1, timeout=10.0)
        assert metrics.counter("connections_rejected", "limit") == FLOOD - CAP
        # Only admitted connections ever became sessions: the plain ones;
        # behind a header or a handshake nothing got that far.
        assert metrics.counter("connections_accepted") == (CAP + 1 if kind == "plain" else 0)
    finally:
        for s in sockets:
            s.close()
        yield port.stopListening()
        yield stall.stop()


def test_header_protocol_is_admission_aware():
    """
    The PROXY header reader and the TLS layer can hold a slot themselves
    (no wrapper on their data path).
    """
    from edgeproxy.net.tls import _TLSServerProtocol

    assert ProxyHeaderProtocol.admissionAware
    assert _TLSServerProtocol.admissionAware
