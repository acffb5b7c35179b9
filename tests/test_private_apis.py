"""
Behaviour tests of the private Twisted APIs edgeproxy relies on.

Three modules reach into Twisted internals (issue 7, defect 11):

  - L{edgeproxy.net.tls}: L{_TLSServerProtocol} overrides private hooks of
    L{twisted.protocols.tls.TLSMemoryBIOProtocol} (half-close both ways,
    close without waiting for the peer's close_notify, an EOF with an empty
    OpenSSL error queue) and picks the factory's connection maker
    (C{_creatorCallable} or C{_createConnection}).
  - L{edgeproxy.net.proxy}: eager writes (L{_eagerSocket}, L{_sendNow},
    L{_lazyProducer}) read the buffering attributes of C{tcp.Server} /
    C{tcp.Client} and write to their socket directly; C{bufferSize} is both
    the read size and the pause threshold.
  - L{edgeproxy.net.reactor}: L{EdgeEPollReactor} re-implements
    C{_PollLikeMixin._doReadOrWrite} and C{EPollReactor.doPoll} on
    C{_selectables}, C{_poller}, C{_reads}, C{_POLL_*},
    C{_disconnectSelectable} and C{_NO_FILEDESC}.

A Twisted release that changes one of these internals must fail here, with
an assertion message naming the Twisted API that no longer behaves as
assumed, rather than somewhere in production.  setup.py bounds the Twisted
range to the releases this file was run on; widen it only after running the
suite on a new release.

Everything runs on 127.0.0.1 with real sockets: TLS and eager-write tests on
the global reactor (pytest-twisted), with the TLS client in a thread (Python's
C{ssl} over a memory BIO, so that it controls close_notify and FIN
separately); reactor tests on a private L{EdgeEPollReactor} driven by hand
(C{iterate}, which is its C{doPoll}) or in a subprocess.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import socket
import ssl
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import pytest_twisted
from faultkit import LogCapture
from OpenSSL.SSL import Connection, Error
from test_reactor import _close, _connect, _open_fds, _spin
from test_tls import BioClient, client_context, client_hello, pem, raw_exchange, write
from twisted.internet import abstract, tcp, threads
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.error import ConnectionDone, ConnectionFdescWentAway, ConnectionLost
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import ClientFactory, Factory, Protocol, connectionDone
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python import context, log
from twisted.python.failure import Failure
from zope.interface import implementer, providedBy

import edgeproxy.net.tls as tls_module
from edgeproxy.metrics import MetricsStore
from edgeproxy.net.proxy import _EAGER_ATTRS, READ_SIZE, _eagerSocket, _lazyProducer, _sendNow
from edgeproxy.net.tls import (
    CertificateStore,
    _connection_maker,
    _GateFactory,
    _TLSServerFactory,
    _TLSServerProtocol,
    load_pem,
)

LOCALHOST = "127.0.0.1"

#: The global reactor pytest-twisted runs (typed loosely: it provides many interfaces).
reactor: Any = _reactor

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="epoll is Linux-only")


async def eventually(check: Callable[[], object], timeout: float = 10.0, what: str = "") -> None:
    """
    Wait (without blocking the reactor) until C{check()} is true; fail with
    C{what} after C{timeout} seconds.
    """
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what or "condition not reached in time"
        await deferLater(reactor, 0.005, lambda: None)


# -- early warning: the names exist ------------------------------------------------

_TLS_HOOKS = [
    "_flushReceiveBIO",
    "_flushSendBIO",
    "_shutdownTLS",
    "_tlsShutdownFinished",
    "_checkHandshakeStatus",
    "_handshakeDone",
    "_lostTLSConnection",
    "_aborted",
    "_producer",
]
_REACTOR_NAMES = [
    "doPoll",
    "_doReadOrWrite",
    "_disconnectSelectable",
    "_POLL_DISCONNECTED",
    "_POLL_IN",
    "_POLL_OUT",
]


@pytest.mark.parametrize(
    "owner, name",
    [(TLSMemoryBIOProtocol, name) for name in _TLS_HOOKS]
    + [(EPollReactor, name) for name in _REACTOR_NAMES],
    ids=lambda v: v if isinstance(v, str) else v.__name__,
)
def test_twisted_still_has(owner: type, name: str) -> None:
    """
    Each private name of Twisted that edgeproxy overrides or reads exists in
    the installed Twisted (a cheap early warning: the behaviour tests below
    say what broke when one of them changes meaning instead).
    """
    assert hasattr(owner, name), (
        f"{owner.__module__}.{owner.__name__}.{name} is gone in Twisted "
        f"{_twisted_version()}: edgeproxy relies on it (see tests/test_private_apis.py)"
    )


def test_tls_overrides_are_overrides() -> None:
    """
    The hooks L{_TLSServerProtocol} replaces are defined on it, over the
    upstream ones of the same name (a rename upstream would leave ours dead).
    """
    for name in ["_flushReceiveBIO", "_shutdownTLS", "_tlsShutdownFinished", "makeConnection"]:
        assert name in vars(_TLSServerProtocol), name
        assert hasattr(TLSMemoryBIOProtocol, name), (
            f"TLSMemoryBIOProtocol.{name} is gone: _TLSServerProtocol.{name} overrides nothing"
        )


def test_no_filedesc_marker_is_twisteds() -> None:
    """
    The C{_NO_FILEDESC} reason L{edgeproxy.net.reactor} reports is Twisted's
    own C{posixbase._NO_FILEDESC}, a C{ConnectionFdescWentAway}.
    """
    from twisted.internet import posixbase

    from edgeproxy.net import reactor as module

    assert module._NO_FILEDESC is posixbase._NO_FILEDESC
    assert isinstance(posixbase._NO_FILEDESC, ConnectionFdescWentAway)


def _twisted_version() -> str:
    import twisted

    return twisted.__version__


# -- TLS ---------------------------------------------------------------------------


@pytest.fixture
def certdir(tmp_path: Path) -> Path:
    """
    DEFAULT.pem (CN default.test) and a.test.pem.
    """
    directory = tmp_path / "certs"
    directory.mkdir()
    write(directory / "DEFAULT.pem", pem("default.test"))
    write(directory / "a.test.pem", pem("a.test"))
    return directory


@pytest.fixture
def logs() -> Any:
    capture = LogCapture().start()
    yield capture
    capture.stop()


def _store(certdir: Path) -> CertificateStore:
    return CertificateStore(str(certdir), Clock(), rescan_interval=0)


def test_tls_make_connection_sets_up_what_upstream_does(certdir: Path) -> None:
    """
    L{_TLSServerProtocol.makeConnection} replaces Twisted's wholesale: after
    it the protocol has every attribute, and provides every interface, that
    C{TLSMemoryBIOProtocol.makeConnection} sets up on the same transport.
    """
    store = _store(certdir)
    upstream_factory = TLSMemoryBIOFactory(store.sniMap, False, Factory.forProtocol(Protocol))
    upstream = TLSMemoryBIOProtocol(upstream_factory, Protocol())
    upstream.makeConnection(StringTransport())
    factory = _TLSServerFactory(store.sniMap, False, Factory.forProtocol(Protocol), Clock())
    ours = factory.buildProtocol(None)
    ours.makeConnection(StringTransport())
    missing = sorted(set(vars(upstream)) - set(vars(ours)))
    assert missing == [], (
        f"TLSMemoryBIOProtocol.makeConnection now also sets {missing}; "
        "_TLSServerProtocol.makeConnection, which replaces it, must too"
    )
    interfaces = set(providedBy(upstream)) - set(providedBy(ours))
    assert interfaces == set(), f"interfaces upstream makeConnection declares: {interfaces}"
    assert isinstance(ours._tlsConnection, Connection)
    assert ours._appSendBuffer == []


def test_tls_connection_maker_is_the_factorys(certdir: Path) -> None:
    """
    L{_connection_maker} finds this Twisted's own connection maker on a
    plain C{TLSMemoryBIOFactory} (C{_creatorCallable}, or C{_createConnection}
    on older releases) and it makes a server-side OpenSSL connection.
    """
    from OpenSSL.SSL import WantReadError

    store = _store(certdir)
    factory = TLSMemoryBIOFactory(store.sniMap, False, Factory.forProtocol(Protocol))
    try:
        maker = _connection_maker(factory)
    except RuntimeError as e:
        raise AssertionError(f"TLSMemoryBIOFactory's connection maker changed: {e}") from None
    upstream: Any = factory
    expected = getattr(upstream, "_creatorCallable", None) or upstream._createConnection
    assert maker == expected
    connection = maker(TLSMemoryBIOProtocol(factory, Protocol()))
    assert isinstance(connection, Connection)
    # Accept state: waits for a hello and has none of its own to send.
    with pytest.raises(WantReadError):
        connection.do_handshake()
    with pytest.raises(WantReadError):
        connection.bio_read(65536)


@implementer(IHalfCloseableProtocol)
class _App(Protocol):
    """
    A server application behind the TLS wrapper: records everything; what
    it does on connect and on the client's half-close is configurable.
    """

    def __init__(self, factory: _AppFactory) -> None:
        self.factory = factory
        self.received: list[bytes] = []
        self.readLost = False
        self.writeLost = False
        self.lost: Failure | None = None

    def connectionMade(self) -> None:
        self.factory.apps.append(self)
        if self.factory.onConnect is not None:
            self.factory.onConnect(self)

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def readConnectionLost(self) -> None:
        self.readLost = True
        if self.factory.onReadLost is not None:
            self.factory.onReadLost(self)

    def writeConnectionLost(self) -> None:
        self.writeLost = True

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = reason


class _AppFactory(Factory):
    def __init__(
        self,
        onConnect: Callable[[_App], None] | None = None,
        onReadLost: Callable[[_App], None] | None = None,
    ) -> None:
        self.onConnect = onConnect
        self.onReadLost = onReadLost
        self.apps: list[_App] = []

    def buildProtocol(self, addr: Any) -> _App:
        return _App(self)


async def _tls_listen(
    certdir: Path, app: Factory, metrics: MetricsStore | None = None
) -> tuple[Any, int, _TLSServerFactory]:
    """
    edgeproxy's TLS stack (gate + L{_TLSServerFactory}) on an ephemeral
    loopback port; returns (port, number, TLS factory).
    """
    gate = _GateFactory(app, reactor, 10.0, metrics)
    factory = _TLSServerFactory(_store(certdir).sniMap, False, gate, clock=reactor)
    port = reactor.listenTCP(0, factory, interface=LOCALHOST)
    return port, port.getHost().port, factory


def _read_to_close_notify(client: BioClient) -> tuple[bytes, str]:
    """
    Read application data until the server's close_notify (C{"close_notify"})
    or a TCP EOF without one (C{"eof"}).
    """
    chunks: list[bytes] = []
    while True:
        try:
            chunk = client.obj.read(1 << 16)
        except ssl.SSLWantReadError:
            if not client._fill():
                return b"".join(chunks), "eof"
            continue
        except ssl.SSLZeroReturnError:
            return b"".join(chunks), "close_notify"
        except ssl.SSLEOFError:
            return b"".join(chunks), "eof"
        if not chunk:
            # Python's ssl reports a close_notify as b"" while ours is unsent.
            return b"".join(chunks), "close_notify"
        chunks.append(chunk)


def _tcp_eof(client: BioClient, wait: float = 10.0) -> bool:
    """
    Whether the server's FIN arrives (C{recv} returns C{b""}) within
    C{wait} seconds, with no further bytes before it.
    """
    client.sock.settimeout(wait)
    try:
        return client.sock.recv(1) == b""
    except socket.timeout:  # TimeoutError from Python 3.10 on
        return False
    except ConnectionResetError:
        return False


@pytest.mark.parametrize("how", ["close_notify", "fin"])
@pytest_twisted.ensureDeferred
async def test_tls_client_half_close_reaches_a_half_closeable_app(
    certdir: Path, logs: LogCapture, how: str
) -> None:
    """
    After a real handshake, the client's close_notify (TCP still open) or a
    bare FIN is the application's C{readConnectionLost} with its write side
    still open: its reply reaches the client, followed by our close_notify
    and a FIN.
    """

    def reply(app: _App) -> None:
        app.transport.write(b"got:%d" % len(b"".join(app.received)))  # type: ignore[union-attr]
        app.transport.loseWriteConnection()  # type: ignore[union-attr]

    apps = _AppFactory(onReadLost=reply)
    port, number, _ = await _tls_listen(certdir, apps)

    def run() -> tuple[bytes, str, bool]:
        client = BioClient(number, "a.test")
        try:
            client.handshake()
            client.send(b"x" * 100_000)
            if how == "close_notify":
                client.close_notify()
            else:
                client.sock.shutdown(socket.SHUT_WR)
            data, end = _read_to_close_notify(client)
            return data, end, _tcp_eof(client)
        finally:
            client.close()

    try:
        data, end, fin = await threads.deferToThread(run)
        (app,) = apps.apps
        assert app.readLost, (
            f"the client's {how} did not reach readConnectionLost: _TLSServerProtocol."
            "_flushReceiveBIO / readConnectionLost are no longer what TLSMemoryBIOProtocol "
            "calls (dataReceived -> _flushReceiveBIO, ProtocolWrapper.readConnectionLost)"
        )
        assert data == b"got:100000", (
            "the application could not answer after the client's half-close "
            f"(got {data!r}): TLSMemoryBIOProtocol shut the connection down itself"
        )
        assert end == "close_notify", "no close_notify from _TLSServerProtocol._shutdownTLS"
        assert fin, "no TCP FIN after our close_notify (_TLSServerProtocol._shutdownTLS)"
        await eventually(lambda: app.lost is not None, what="the TLS connection never closed")
        assert app.lost is not None and app.lost.check(ConnectionDone), app.lost
        assert logs.failures() == []
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_tls_lose_write_connection_sends_close_notify_then_fin_and_keeps_reading(
    certdir: Path, logs: LogCapture
) -> None:
    """
    The application's C{loseWriteConnection} on the TLS transport sends
    close_notify followed by a TCP FIN (the client reads both, in that
    order) and keeps reading: what the client sends afterwards reaches the
    application, then its half-close; writes after C{loseWriteConnection}
    are dropped.
    """

    def greet(app: _App) -> None:
        app.transport.write(b"greeting")  # type: ignore[union-attr]
        app.transport.loseWriteConnection()  # type: ignore[union-attr]
        app.transport.write(b"dropped")  # type: ignore[union-attr]

    def finish(app: _App) -> None:
        app.transport.loseConnection()  # type: ignore[union-attr]

    apps = _AppFactory(onConnect=greet, onReadLost=finish)
    port, number, _ = await _tls_listen(certdir, apps)

    def run() -> tuple[bytes, str, bool]:
        client = BioClient(number, "a.test")
        try:
            client.handshake()
            data, end = _read_to_close_notify(client)
            fin = _tcp_eof(client)
            client.send(b"late data")
            client.close_notify()
            return data, end, fin
        finally:
            client.close()

    try:
        data, end, fin = await threads.deferToThread(run)
        assert (data, end) == (b"greeting", "close_notify"), (data, end)
        assert fin, (
            "no TCP FIN after close_notify: _TLSServerProtocol.loseWriteConnection's "
            "transport.loseWriteConnection() (TLSMemoryBIOProtocol._flushSendBIO first)"
        )
        (app,) = apps.apps
        await eventually(lambda: app.lost is not None, what="the TLS connection never closed")
        assert b"".join(app.received) == b"late data", (
            "reading stopped after loseWriteConnection (TLSMemoryBIOProtocol._flushReceiveBIO "
            "/ _lostTLSConnection changed?)"
        )
        assert app.readLost and app.writeLost, (app.readLost, app.writeLost)
        assert app.lost is not None and app.lost.check(ConnectionDone), app.lost
        assert logs.failures() == []
    finally:
        await port.stopListening()


@implementer(IPushProducer)
class _IdleProducer:
    """
    A streaming producer that never produces.
    """

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@pytest.mark.parametrize("producer", [False, True], ids=["no-producer", "producer"])
@pytest_twisted.ensureDeferred
async def test_tls_lose_connection_does_not_wait_for_the_client(
    certdir: Path, logs: LogCapture, producer: bool
) -> None:
    """
    C{loseConnection} on the TLS transport sends what was written, then
    close_notify, then closes the TCP connection without waiting for the
    client's close_notify (which this client never sends), even with a
    streaming producer still registered.
    """

    def bye(app: _App) -> None:
        if producer:
            app.transport.registerProducer(_IdleProducer(), True)  # type: ignore[union-attr]
        app.transport.write(b"bye")  # type: ignore[union-attr]
        app.transport.loseConnection()  # type: ignore[union-attr]

    apps = _AppFactory(onConnect=bye)
    port, number, _ = await _tls_listen(certdir, apps)

    def run() -> tuple[bytes, str, bool]:
        client = BioClient(number, "a.test")
        try:
            client.handshake()
            data, end = _read_to_close_notify(client)
            return data, end, _tcp_eof(client)
        finally:
            client.close()

    try:
        data, end, fin = await threads.deferToThread(run)
        assert data == b"bye"
        hint = (
            ", or the producer check moved off TLSMemoryBIOProtocol._producer" if producer else ""
        )
        assert end == "close_notify", "loseConnection sent no close_notify" + hint
        assert fin, (
            "the TCP connection stayed open waiting for the client's close_notify: "
            "TLSMemoryBIOProtocol.loseConnection no longer calls _TLSServerProtocol._shutdownTLS"
            + hint
        )
        (app,) = apps.apps
        await eventually(lambda: app.lost is not None, what="the TLS connection never closed")
        assert logs.failures() == []
    finally:
        await port.stopListening()


def _old_version_hello(number: int) -> None:
    context = client_context(ssl.TLSVersion.TLSv1_1, ssl.TLSVersion.TLSv1_1)
    client = BioClient(number, "a.test", context=context)
    try:
        client.handshake()
    except (ssl.SSLError, ConnectionError, OSError):
        return
    finally:
        client.close()
    raise AssertionError("a TLS 1.1 handshake succeeded")


def _half_hello(number: int) -> None:
    hello = client_hello()
    raw_exchange(number, hello[: len(hello) // 2], fin=True)


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
@pytest.mark.parametrize(
    "run, expected, openssl_error",
    [
        (lambda n: raw_exchange(n, os.urandom(600)), "bad-handshake", True),
        (_old_version_hello, "protocol-version", True),
        (_half_hello, "eof", False),
    ],
    ids=["garbage", "tls1.1", "half-hello-fin"],
)
@pytest_twisted.ensureDeferred
async def test_tls_handshake_failure_reaches_the_gate_classified(
    certdir: Path,
    logs: LogCapture,
    monkeypatch: pytest.MonkeyPatch,
    run: Callable[[int], object],
    expected: str,
    openssl_error: bool,
) -> None:
    """
    A failed handshake on a real socket reaches the gate's C{connectionLost}
    as OpenSSL's own error, with its error queue (what the classification
    reads), or as a lost connection for an EOF; it is classified, counted
    and logged in one line, and the application never sees it.
    """
    reasons: list[Failure] = []
    classify = tls_module._classify

    def recording(reason: Failure) -> tuple[str, str]:
        reasons.append(reason)
        return classify(reason)

    monkeypatch.setattr(tls_module, "_classify", recording)
    metrics = MetricsStore()
    apps = _AppFactory()
    port, number, _ = await _tls_listen(certdir, apps, metrics)
    try:
        await threads.deferToThread(run, number)
        await eventually(lambda: metrics.counter("tls_handshake_failed", expected) == 1)
        (reason,) = reasons
        if openssl_error:
            value: Any = reason.value
            assert reason.check(Error) and isinstance(value.args[0], list), (
                "the handshake error no longer reaches the application's connectionLost as "
                "OpenSSL's Error with its error queue (TLSMemoryBIOProtocol."
                f"_checkHandshakeStatus -> _tlsShutdownFinished -> _reason): {reason!r}"
            )
            assert value.args[0], "empty OpenSSL error queue"
        else:
            assert reason.check(ConnectionLost, ConnectionDone), reason
        assert apps.apps == []
        assert logs.failures() == []
    finally:
        await port.stopListening()


class _EmptyQueueConnection:
    """
    A real OpenSSL connection that, once armed, reports an OpenSSL error with
    an empty error queue (how OpenSSL 4 reports some EOFs) from C{method}.
    """

    def __init__(self, real: Connection, method: str) -> None:
        self._real = real
        self._method = method
        self.armed = method == "do_handshake"
        self._handshakes = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def do_handshake(self) -> None:
        self._handshakes += 1
        # The first call (at accept, with no data yet) is real.
        if self._method == "do_handshake" and self._handshakes > 1:
            raise Error([])
        self._real.do_handshake()

    def recv(self, size: int) -> bytes:
        if self._method == "recv" and self.armed:
            raise Error([])
        data: bytes = self._real.recv(size)
        return data


@pytest.mark.parametrize("method", ["do_handshake", "recv"])
@pytest_twisted.ensureDeferred
async def test_tls_empty_error_queue_is_a_lost_connection(
    certdir: Path, logs: LogCapture, method: str
) -> None:
    """
    On a real connection, an OpenSSL error with an empty error queue during
    the handshake (C{_checkHandshakeStatus}) or after it (our
    C{_flushReceiveBIO}) ends the connection as C{ConnectionLost}: counted as
    an C{eof} handshake failure, or delivered to the application, without a
    traceback (Twisted 23.10's EOF check would raise C{IndexError}).
    """
    metrics = MetricsStore()

    def arm(app: _App) -> None:
        app.transport._tlsConnection.armed = True  # type: ignore[union-attr]

    apps = _AppFactory(onConnect=arm)
    port, number, factory = await _tls_listen(certdir, apps, metrics)
    make = factory._newTLSConnection
    factory._newTLSConnection = lambda p: _EmptyQueueConnection(make(p), method)  # type: ignore[assignment,return-value]

    def run() -> None:
        client = BioClient(number, "a.test")
        try:
            client.handshake()
            client.send(b"data")
            _read_to_close_notify(client)
        except (ssl.SSLError, ConnectionError, OSError):
            pass
        finally:
            client.close()

    try:
        await threads.deferToThread(run)
        if method == "do_handshake":
            await eventually(lambda: metrics.counter("tls_handshake_failed", "eof") == 1)
            assert apps.apps == []
        else:
            await eventually(lambda: bool(apps.apps) and apps.apps[0].lost is not None)
            lost = apps.apps[0].lost
            assert lost is not None and lost.check(ConnectionLost), (
                "an empty OpenSSL error queue after the handshake did not end as "
                f"ConnectionLost (_TLSServerProtocol._tlsShutdownFinished): {lost!r}"
            )
        assert logs.failures() == [], (
            "a traceback was logged: TLSMemoryBIOProtocol._tlsShutdownFinished (or its EOF "
            "check) no longer takes the SysCallError form _TLSServerProtocol maps to"
        )
    finally:
        await port.stopListening()


# -- eager writes on real TCP transports -------------------------------------------


class _Server(Protocol):
    """
    The accepted side: records what it reads and its loss.
    """

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.lost: Failure | None = None
        self.made: Deferred[_Server] = Deferred()

    def connectionMade(self) -> None:
        self.made.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = reason


class _NeverSend:
    """
    Stands in for the socket where L{_sendNow} must not send.
    """

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        return len(data)


async def _accept(rcvbuf: int | None = None) -> tuple[Any, _Server, socket.socket, Any]:
    """
    A real accepted C{tcp.Server} on the global reactor and the raw,
    non-blocking peer socket connected to it (C{rcvbuf}: the peer's
    C{SO_RCVBUF}, set before connecting).
    """
    server = _Server()
    factory = Factory()
    factory.protocol = lambda: server  # type: ignore[assignment]
    port = reactor.listenTCP(0, factory, interface=LOCALHOST)
    peer = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    peer.settimeout(10)
    peer.connect((LOCALHOST, port.getHost().port))
    peer.setblocking(False)
    await server.made.addTimeout(10, reactor)
    return server.transport, server, peer, port


def _read_available(peer: socket.socket, into: bytearray, limit: int = 1 << 30) -> bool:
    """
    Read what the non-blocking C{peer} has (at most C{limit} bytes); C{False}
    once it reached EOF.
    """
    while limit > 0:
        try:
            data = peer.recv(min(1 << 16, limit))
        except BlockingIOError:
            return True
        if not data:
            return False
        into += data
        limit -= len(data)
    return True


def _queued(t: Any) -> int:
    """
    Bytes a Twisted TCP transport holds in user space, by the attributes
    L{_sendNow} reads.
    """
    return len(t.dataBuffer) - t.offset + t._tempDataLen


def _assert_eager_attrs(t: Any) -> None:
    missing = [name for name in _EAGER_ATTRS if not hasattr(t, name)]
    assert missing == [], (
        f"{type(t).__module__}.{type(t).__name__} has no {missing} in Twisted "
        f"{_twisted_version()}: eager writes (edgeproxy.net.proxy._sendNow) rely on them"
    )


@pytest_twisted.ensureDeferred
async def test_eager_socket_of_real_tcp_transports() -> None:
    """
    Both plain TCP transports, an accepted C{tcp.Server} and a connected
    C{tcp.Client}, have the attributes eager writes read, and
    L{_eagerSocket} gives their own socket.
    """
    t, server, peer, port = await _accept()
    client_proto = _Server()
    client_factory = ClientFactory()
    client_factory.protocol = lambda: client_proto  # type: ignore[assignment]
    try:
        assert type(t) is tcp.Server
        _assert_eager_attrs(t)
        assert _eagerSocket(t) is t.socket
        reactor.connectTCP(LOCALHOST, port.getHost().port, client_factory)
        await client_proto.made.addTimeout(10, reactor)
        c: Any = client_proto.transport
        assert type(c) is tcp.Client
        _assert_eager_attrs(c)
        assert _eagerSocket(c) is c.socket
    finally:
        peer.close()
        t.abortConnection()
        client_transport: Any = client_proto.transport
        if client_transport is not None:
            client_transport.abortConnection()
        await port.stopListening()
        await eventually(lambda: server.lost is not None and client_proto.lost is not None)


@pytest_twisted.ensureDeferred
async def test_eager_socket_falls_back_on_tls_transports(certdir: Path) -> None:
    """
    L{_eagerSocket} is C{None} for TLS: a plain C{tcp.Server} after
    C{startTLS} (Twisted's C{TLS} flag) and edgeproxy's own TLS transport
    (what the proxy's client leg is on a C{txsni:} listener).
    """
    t, server, peer, port = await _accept()
    try:
        assert _eagerSocket(t) is t.socket
        t.startTLS(load_pem(pem("a.test")), False)
        assert t.TLS, "tcp.Server.startTLS no longer sets the TLS attribute _eagerSocket reads"
        assert _eagerSocket(t) is None
    finally:
        peer.close()
        t.abortConnection()
        await port.stopListening()
        await eventually(lambda: server.lost is not None)

    apps = _AppFactory()
    tls_port, number, _ = await _tls_listen(certdir, apps)
    client = await threads.deferToThread(BioClient, number, "a.test")
    try:
        await threads.deferToThread(client.handshake)
        await eventually(lambda: bool(apps.apps))
        (app,) = apps.apps
        assert isinstance(app.transport, _TLSServerProtocol)
        assert _eagerSocket(app.transport) is None
        app.transport.loseConnection()
        await eventually(lambda: app.lost is not None, what="the TLS connection never closed")
    finally:
        client.close()
        await tls_port.stopListening()


@pytest_twisted.ensureDeferred
async def test_send_now_and_write_interleave_in_order() -> None:
    """
    On a real C{tcp.Server}: with nothing queued, L{_sendNow} puts the bytes
    in the kernel at once (the peer can read them without a reactor turn)
    and leaves the transport's buffers as they were; a C{transport.write}
    shows up in C{_tempDataLen}, and while it is queued L{_sendNow} leaves
    the next bytes for C{write}; once Twisted has written the queue out
    (C{dataBuffer}/C{offset} empty again) it sends directly again.  The peer
    reads everything in order.
    """
    t, server, peer, port = await _accept()
    received = bytearray()
    try:
        sock = _eagerSocket(t)
        assert sock is not None
        assert _sendNow(t, sock, b"one,") is None
        assert (t.dataBuffer, t.offset, t._tempDataLen) == (b"", 0, 0)
        deadline = time.monotonic() + 10
        while len(received) < 4 and time.monotonic() < deadline:
            _read_available(peer, received)
        assert received == b"one,"

        t.write(b"two,")
        assert t._tempDataLen == 4 and _queued(t) == 4, (
            "transport.write no longer queues in _tempDataBuffer/_tempDataLen "
            "(abstract.FileDescriptor.write changed)"
        )
        spy: Any = _NeverSend()
        assert _sendNow(t, spy, b"three,") == b"three," and spy.sent == [], (
            "_sendNow would overtake bytes queued by transport.write"
        )
        t.write(b"three,")
        await eventually(lambda: _queued(t) == 0, what="Twisted never wrote its queue out")
        assert t.offset == len(t.dataBuffer) and not t._tempDataLen, (
            "an empty Twisted write queue no longer shows as offset == len(dataBuffer) "
            "and _tempDataLen == 0 (abstract.FileDescriptor.doWrite changed)"
        )
        assert _sendNow(t, sock, b"four") is None
        expected = b"one,two,three,four"
        await eventually(lambda: _read_available(peer, received) and len(received) >= 18)
        assert received == expected
    finally:
        peer.close()
        t.abortConnection()
        await port.stopListening()
        await eventually(lambda: server.lost is not None)


@implementer(IPushProducer)
class _Relay:
    """
    Writes C{stream} to a real TCP transport exactly as the proxy's relay
    does (L{_sendNow}, then L{_lazyProducer} and C{transport.write} for what
    is left), as a streaming producer; checks at every step that the
    transport's attributes agree with the bytes handed over.
    """

    sizes = (1, 1500, 7, 65536, 300_000, 13, 40_000)

    def __init__(self, transport: Any, sock: socket.socket, stream: bytes) -> None:
        self.t = transport
        self.sock = sock
        self.stream = stream
        self.offset = 0
        self.eager = 0
        self.byTwisted = 0
        self.paused = False
        self.pauses = 0
        self.resumes = 0
        self.registered = False
        self.problems: list[str] = []
        self.call: Any = None
        self._sizes = itertools.cycle(self.sizes)
        original = transport.writeSomeData

        def counting(data: bytes) -> Any:
            n = original(data)
            if isinstance(n, int) and n > 0:
                self.byTwisted += n
            return n

        transport.writeSomeData = counting

    def _check(self, where: str) -> None:
        t = self.t
        if self.eager + self.byTwisted + _queued(t) != self.offset:
            self.problems.append(
                f"{where}: {self.eager} sent eagerly + {self.byTwisted} written by Twisted "
                f"+ {_queued(t)} queued (len(dataBuffer) - offset + _tempDataLen) != "
                f"{self.offset} handed over"
            )

    def start(self) -> None:
        self.call = reactor.callLater(0, self.pump)

    def pump(self) -> None:
        self.call = None
        t = self.t
        total = len(self.stream)
        while not self.paused and self.offset < total:
            n = min(next(self._sizes), total - self.offset)
            data = self.stream[self.offset : self.offset + n]
            self.offset += n
            rest = _sendNow(t, self.sock, data)
            self.eager += n - (0 if rest is None else len(rest))
            if rest is not None:
                if not self.registered:
                    self.registered = _lazyProducer(t, self)
                    if not (self.registered and t.producer is self and t.streamingProducer):
                        self.problems.append("_lazyProducer did not register a streaming producer")
                t.write(rest)
                full = len(t.dataBuffer) + t._tempDataLen > t.bufferSize
                if self.paused != full:
                    self.problems.append(
                        f"after a write leaving {len(t.dataBuffer) + t._tempDataLen} bytes "
                        f"queued, bufferSize {t.bufferSize}: producer paused={self.paused}"
                    )
            self._check("pump")

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        t = self.t
        if t._tempDataLen or t.offset != len(t.dataBuffer):
            self.problems.append(
                f"resumeProducing with bytes still queued ({_queued(t)}): _sendNow would "
                "never send directly again"
            )
        self._check("resume")
        self.paused = False
        self.resumes += 1
        if self.call is None:
            self.start()

    def stopProducing(self) -> None:
        self.paused = True


@pytest_twisted.ensureDeferred
async def test_eager_and_queued_writes_under_backpressure_keep_the_stream_intact() -> None:
    """
    A relay-style writer on a real C{tcp.Server} with small kernel buffers
    (C{SO_SNDBUF} here, C{SO_RCVBUF} at a peer that stops reading, reads a
    little, stops, then catches up, several times): L{_sendNow} sends
    directly while nothing is queued; queued bytes are exactly
    C{len(dataBuffer) - offset + _tempDataLen}; the producer is paused by the
    write that takes the queue past C{bufferSize} (the proxy's L{READ_SIZE})
    and resumed only once the queue is empty; while Twisted holds a
    partially written C{dataBuffer} L{_sendNow} sends nothing; and the peer
    reads the whole stream, unchanged and in order.
    """
    t, server, peer, port = await _accept(rcvbuf=4096)
    stream = os.urandom(3 << 20)
    received = bytearray()
    try:
        t.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sock = _eagerSocket(t)
        assert sock is not None
        t.bufferSize = READ_SIZE
        relay = _Relay(t, sock, stream)
        relay.start()
        total = len(stream)
        partial_seen = 0
        while relay.offset < total:
            # Not reading: the relay fills the kernel buffers, queues, pauses.
            await eventually(
                lambda: relay.paused or relay.offset >= total,
                what="the producer was never paused (FileDescriptor._maybePauseProducer / "
                "bufferSize changed?)",
            )
            if not relay.paused:
                break

            # Read a little at a time until Twisted has moved its queue into
            # dataBuffer and written part of it.
            async def partial() -> bool:
                _read_available(peer, received, 2048)
                return not t._tempDataLen and t.offset < len(t.dataBuffer)

            deadline = time.monotonic() + 10
            while not await partial():
                assert time.monotonic() < deadline, "Twisted never partially wrote dataBuffer"
                await deferLater(reactor, 0.005, lambda: None)
            partial_seen += 1
            spy: Any = _NeverSend()
            assert _sendNow(t, spy, b"probe") == b"probe" and spy.sent == [], (
                "_sendNow would overtake a partially written dataBuffer (offset < "
                "len(dataBuffer), _tempDataLen == 0)"
            )
            # Catch up until Twisted has emptied its queue and resumed us.
            resumes = relay.resumes

            def resumed_or_eof(n: int = resumes) -> bool:
                return not _read_available(peer, received) or relay.resumes > n

            await eventually(
                resumed_or_eof, what="the producer was never resumed after the queue drained"
            )
        await eventually(
            lambda: not _read_available(peer, received) or len(received) >= total,
            timeout=30,
            what=f"peer read {len(received)} of {total} bytes",
        )
        assert relay.problems == []
        assert relay.offset == total and relay.pauses >= 2 and partial_seen >= 2, (
            relay.offset,
            relay.pauses,
            partial_seen,
        )
        assert relay.eager > 0 and relay.byTwisted > 0, (relay.eager, relay.byTwisted)
        assert relay.eager + relay.byTwisted == total
        assert len(received) == total
        if received != stream:
            first = next(i for i, (a, b) in enumerate(zip(received, stream)) if a != b)
            raise AssertionError(f"the stream differs from byte {first} on")
        assert hashlib.sha256(received).digest() == hashlib.sha256(stream).digest()
    finally:
        peer.close()
        t.abortConnection()
        await port.stopListening()
        await eventually(lambda: server.lost is not None)


@pytest_twisted.ensureDeferred
async def test_closing_states_stop_eager_writes() -> None:
    """
    The closing states L{_sendNow} and L{_lazyProducer} read are the ones a
    real C{tcp.Server} goes through: C{loseWriteConnection} sets
    C{_writeDisconnecting}, then C{_writeDisconnected} once the FIN is out;
    C{loseConnection} (with the write side open) sets C{disconnecting}; a
    lost connection has C{connected} false.  In each, nothing is sent directly and no producer is
    registered.
    """
    producer = _IdleProducer()

    def refused(where: str) -> None:
        spy: Any = _NeverSend()
        assert _sendNow(t, spy, b"x") == b"x" and spy.sent == [], where
        assert _lazyProducer(t, producer) is False and t.producer is None, where

    t, server, peer, port = await _accept()
    received = bytearray()
    try:
        assert _lazyProducer(t, producer) is True and t.producer is producer
        t.unregisterProducer()

        t.loseWriteConnection()
        assert t._writeDisconnecting, "loseWriteConnection no longer sets _writeDisconnecting"
        refused("after loseWriteConnection")
        await eventually(
            lambda: not _read_available(peer, received), what="no FIN after loseWriteConnection"
        )
        assert t._writeDisconnected, "the FIN went out without _writeDisconnected being set"
        refused("after the FIN went out")
        # With the write side already shut, loseConnection closes at once.
        t.loseConnection()
        await eventually(lambda: server.lost is not None)
        assert not t.connected, "a lost tcp.Server still has connected set"
        refused("after the connection was lost")
    finally:
        peer.close()
        t.abortConnection()
        await port.stopListening()

    t, server, peer, port = await _accept()
    try:
        t.loseConnection()
        assert t.disconnecting, "loseConnection no longer sets disconnecting"
        refused("after loseConnection")
        await eventually(lambda: server.lost is not None)
    finally:
        peer.close()
        t.abortConnection()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_buffer_size_is_the_read_size() -> None:
    """
    C{bufferSize} set on a live C{tcp.Server} (as the proxy sets
    L{READ_SIZE}) is the size of each later read from its socket.
    """
    t, server, peer, port = await _accept()
    try:
        t.bufferSize = 1000
        peer.setblocking(True)
        peer.sendall(os.urandom(200_000))
        await eventually(lambda: sum(map(len, server.chunks)) >= 200_000)
        sizes = {len(chunk) for chunk in server.chunks}
        assert max(sizes) == 1000, (
            f"reads of {sorted(sizes)[-3:]} bytes with bufferSize 1000: tcp.Connection.doRead "
            "no longer reads bufferSize bytes"
        )
    finally:
        peer.close()
        t.abortConnection()
        await port.stopListening()
        await eventually(lambda: server.lost is not None)


# -- the edgeepoll reactor ---------------------------------------------------------


class _BoomOrEcho(Protocol):
    """
    Echoes, recording the legacy log context it runs in; raises on C{boom}.
    """

    def dataReceived(self, data: bytes) -> None:
        system = context.get(log.ILogContext)["system"]
        self.factory.systems.append((system, self.transport.logPrefix()))  # type: ignore[attr-defined,union-attr]
        if b"boom" in data:
            raise ZeroDivisionError("boom")
        self.transport.write(data)  # type: ignore[union-attr]


@linux_only
def test_reactor_error_drops_one_of_two_live_connections() -> None:
    """
    Two live connections on one listener under a private L{EdgeEPollReactor}:
    the one whose protocol raises in C{dataReceived} is dropped and logged
    (with the failure, the selectable and its log prefix, by edgeproxy's
    logger) while the other keeps working; C{dataReceived} runs without
    Twisted's legacy per-event log context (our C{doPoll} is the loop).
    """
    from edgeproxy.net.reactor import EdgeEPollReactor

    fds = _open_fds()
    r = EdgeEPollReactor()
    capture = LogCapture().start()
    try:
        factory: Any = Factory.forProtocol(_BoomOrEcho)
        factory.systems = []
        port = r.listenTCP(0, factory, interface=LOCALHOST)
        a = _connect(r, port.getHost().port)
        b = _connect(r, port.getHost().port)
        _spin(r, lambda: a.received == b.received == b"ping")
        a.transport.write(b"boom")  # type: ignore[union-attr]
        _spin(r, lambda: a.lost is not None)
        failures = capture.failures()
        assert len(failures) == 1, failures
        (event,) = failures
        assert event["log_failure"].check(ZeroDivisionError)
        assert event.get("log_namespace") == "edgeproxy.net.reactor", (
            "the protocol's error was not logged by EdgeEPollReactor._doReadOrWrite: "
            "Twisted's EPollReactor.doPoll / _PollLikeMixin._doReadOrWrite is dispatching "
            f"instead ({event.get('log_namespace')})"
        )
        assert isinstance(event["selectable"], tcp.Server) and event["prefix"]
        b.transport.write(b", again")  # type: ignore[union-attr]
        _spin(r, lambda: b.received == b"ping, again")
        assert b.lost is None
        systems = factory.systems
        assert systems and all(system != prefix for system, prefix in systems), (
            f"dataReceived ran in the legacy log context {systems[0]}: EdgeEPollReactor.doPoll "
            "is not the poll loop (EPollReactor.doIteration / doPoll changed?)"
        )
        b.transport.loseConnection()  # type: ignore[union-attr]
        _spin(r, lambda: b.lost is not None)
        port.stopListening()
        r.iterate(0)
    finally:
        capture.stop()
        _close(r)
    assert _open_fds() <= fds


@implementer(IHalfCloseableProtocol)
class _Events(Protocol):
    """
    Records the disconnect events it is given.
    """

    def __init__(self) -> None:
        self.events: list[str] = []
        self.lost: Failure | None = None

    def readConnectionLost(self) -> None:
        self.events.append("readConnectionLost")

    def writeConnectionLost(self) -> None:
        self.events.append("writeConnectionLost")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.events.append("connectionLost")
        self.lost = reason


class _Plain(Protocol):
    """
    Like L{_Events}, without half-close.
    """

    def __init__(self) -> None:
        self.events: list[str] = []
        self.lost: Failure | None = None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.events.append("connectionLost")
        self.lost = reason


def _serve(r: Any, protocol: Protocol) -> tuple[Any, socket.socket, Any]:
    """
    Accept one raw blocking peer socket on C{r} into C{protocol}; returns
    (port, peer, server transport).
    """
    factory = Factory()
    factory.protocol = lambda: protocol  # type: ignore[assignment]
    port = r.listenTCP(0, factory, interface=LOCALHOST)
    peer = socket.create_connection((LOCALHOST, port.getHost().port), timeout=10)
    _spin(r, lambda: protocol.transport is not None)
    return port, peer, protocol.transport


@linux_only
@pytest.mark.parametrize("how", ["fin", "close", "reset"])
def test_reactor_delivers_disconnect_events(how: str) -> None:
    """
    Under a private L{EdgeEPollReactor}, a peer's FIN is
    C{readConnectionLost} for a half-closeable protocol (then our own close
    is a clean C{connectionLost}); for any other protocol a peer's close is
    C{connectionLost(ConnectionDone)} and a reset C{ConnectionLost}.
    """
    from edgeproxy.net.reactor import EdgeEPollReactor

    fds = _open_fds()
    r = EdgeEPollReactor()
    protocol: Any = _Events() if how == "fin" else _Plain()
    port, peer, t = _serve(r, protocol)
    try:
        if how == "fin":
            peer.shutdown(socket.SHUT_WR)
        elif how == "close":
            peer.close()
        else:
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            peer.close()
        if how == "fin":
            _spin(r, lambda: "readConnectionLost" in protocol.events)
            assert protocol.events == ["readConnectionLost"], (
                "a FIN was not a half-close: EdgeEPollReactor._doReadOrWrite's in-read "
                "disconnect (CONNECTION_DONE, _disconnectSelectable(..., True)) changed meaning"
            )
            t.loseConnection()
        _spin(r, lambda: protocol.lost is not None)
        expected = ConnectionLost if how == "reset" else ConnectionDone
        assert protocol.lost.check(expected), protocol.lost
        assert protocol.events.count("connectionLost") == 1, protocol.events
        assert protocol.events[-1] == "connectionLost", protocol.events
        port.stopListening()
        r.iterate(0)
    finally:
        peer.close()
        _close(r)
    assert _open_fds() <= fds


@linux_only
def test_reactor_hangup_event_maps_on_reads() -> None:
    """
    A hang-up event without input (C{_POLL_DISCONNECTED}, no C{_POLL_IN})
    is a clean read-side close for a reading descriptor (its fd is in
    C{_reads}: a half-close) and a lost connection for one that is not
    reading; an event for a selectable whose C{fileno()} is -1 disconnects
    it with C{_NO_FILEDESC}.
    """
    from edgeproxy.net.reactor import EdgeEPollReactor

    fds = _open_fds()
    r = EdgeEPollReactor()
    reading = _Events()
    paused = _Events()
    port1, peer1, t1 = _serve(r, reading)
    port2, peer2, t2 = _serve(r, paused)
    try:
        assert t1.fileno() in r._reads, (
            "EPollReactor._reads no longer holds the file descriptors of readers: "
            "EdgeEPollReactor._doReadOrWrite tests fd membership"
        )
        assert r._selectables[t1.fileno()] is t1, "EPollReactor._selectables: not fd -> selectable"
        t2.pauseProducing()
        assert t2.fileno() not in r._reads
        r._doReadOrWrite(t1, t1.fileno(), r._POLL_DISCONNECTED)
        assert reading.events == ["readConnectionLost"], reading.events
        r._doReadOrWrite(t2, t2.fileno(), r._POLL_DISCONNECTED)
        assert paused.lost is not None and paused.lost.check(ConnectionLost), paused.lost

        lost: list[Failure] = []

        class Gone(abstract.FileDescriptor):
            def connectionLost(self, reason: Failure) -> None:
                lost.append(reason)

        gone = Gone(reactor=r)
        assert gone.fileno() == -1
        r._doReadOrWrite(gone, 12345, r._POLL_IN)
        assert len(lost) == 1 and lost[0].check(ConnectionFdescWentAway), lost

        t1.loseConnection()
        _spin(r, lambda: reading.lost is not None)
        port1.stopListening()
        port2.stopListening()
        r.iterate(0)
    finally:
        peer1.close()
        peer2.close()
        _close(r)
    assert _open_fds() <= fds


class _BrokenLoss(Protocol):
    def connectionLost(self, reason: Failure = connectionDone) -> None:
        raise ValueError("broken connectionLost")


@linux_only
def test_reactor_survives_an_error_while_disconnecting() -> None:
    """
    An exception raised while a connection is being disconnected (its
    protocol's C{connectionLost}) is logged by C{doPoll}, which carries on
    dispatching: another connection keeps working.
    """
    from edgeproxy.net.reactor import EdgeEPollReactor

    fds = _open_fds()
    r = EdgeEPollReactor()
    capture = LogCapture().start()
    broken = _BrokenLoss()
    port, peer, _ = _serve(r, broken)
    echo = r.listenTCP(0, Factory.forProtocol(_EchoProtocol), interface=LOCALHOST)
    try:
        talker = _connect(r, echo.getHost().port)
        _spin(r, lambda: talker.received == b"ping")
        peer.close()
        _spin(r, lambda: bool(capture.failures()))
        (event,) = capture.failures()
        assert event.get("log_namespace") == "edgeproxy.net.reactor", (
            "the error while disconnecting was not logged by EdgeEPollReactor.doPoll "
            f"(namespace {event.get('log_namespace')}): Twisted's doPoll is the loop"
        )
        assert event["log_failure"].check(ValueError)
        talker.transport.write(b"pong")  # type: ignore[union-attr]
        _spin(r, lambda: talker.received == b"pingpong")
        talker.transport.loseConnection()  # type: ignore[union-attr]
        _spin(r, lambda: talker.lost is not None)
        port.stopListening()
        echo.stopListening()
        r.iterate(0)
    finally:
        capture.stop()
        _close(r)
    assert _open_fds() <= fds


class _EchoProtocol(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]


_SUBPROCESS = r"""
import json, sys
from edgeproxy.net.reactor import EdgeEPollReactor, install
reactor = install()
from twisted.internet import reactor as installed
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.logger import globalLogPublisher

failures = []
globalLogPublisher.addObserver(
    lambda e: failures.append(e.get("log_namespace")) if "log_failure" in e else None
)

class Server(Protocol):
    def dataReceived(self, data):
        if data == b"boom":
            raise ZeroDivisionError()
        self.transport.write(data)

result = {"installed": type(installed).__name__, "received": b"", "lost": {}}

class Client(Protocol):
    def __init__(self, name, message):
        self.name, self.message = name, message
    def connectionMade(self):
        self.transport.write(self.message)
    def dataReceived(self, data):
        result["received"] += data
        if result["received"] == b"hello":
            self.transport.loseConnection()
    def connectionLost(self, reason):
        result["lost"][self.name] = reason.type.__name__
        if len(result["lost"]) == 2:
            reactor.stop()

def client(name, message):
    f = ClientFactory()
    f.protocol = lambda: Client(name, message)
    return f

port = reactor.listenTCP(0, Factory.forProtocol(Server), interface="127.0.0.1")
reactor.connectTCP("127.0.0.1", port.getHost().port, client("victim", b"boom"))
reactor.connectTCP("127.0.0.1", port.getHost().port, client("survivor", b"hello"))
reactor.callLater(20, reactor.stop)
reactor.run()
result["received"] = result["received"].decode()
result["failures"] = failures
print(json.dumps(result))
"""


@linux_only
@pytest.mark.slow
def test_reactor_installed_in_a_process_runs_connections(tmp_path: Path) -> None:
    """
    In a process of its own, C{edgeproxy.net.reactor.install()} makes
    L{EdgeEPollReactor} the global reactor and C{reactor.run()} (Twisted's
    main loop over our C{doPoll}) serves real connections: a protocol error
    drops its connection, logged once by edgeproxy, while another
    connection completes.
    """
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root))
    done = subprocess.run(
        [sys.executable, "-c", _SUBPROCESS],
        capture_output=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr.decode()
    result = json.loads(done.stdout.decode().strip().splitlines()[-1])
    assert result["installed"] == "EdgeEPollReactor"
    assert result["lost"]["victim"] in ("ConnectionDone", "ConnectionLost"), result
    assert result["lost"]["survivor"] == "ConnectionDone", result
    assert result["received"] == "hello"
    assert result["failures"] == ["edgeproxy.net.reactor"], result
