"""
Tests for L{edgeproxy.net.tls}: SNI certificate choice, hot reload, the handshake
gate and timeout, F9 bad input, half-close and backpressure through TLS.

Certificates are generated during the run; networking tests make real TLS
handshakes over 127.0.0.1 with the real reactor, the client side being
Python's C{ssl} module in a thread.
"""

from __future__ import annotations

import datetime
import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import defer, reactor, threads
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IHandshakeListener,
    IListeningPort,
    IPushProducer,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.logger import ILogObserver, globalLogPublisher
from zope.interface import implementer
from zope.interface.verify import verifyObject

from edgeproxy.metrics import MetricsStore
from edgeproxy.net.tls import (
    CertificateDirectoryError,
    CertificateStore,
    _connection_maker,
    _HandshakeGate,
    _TLSServerFactory,
    _TLSServerProtocol,
    load_pem,
    sni_server_endpoint,
)

ROOT = Path(__file__).resolve().parent.parent

# -- certificates ----------------------------------------------------------------


def make_pem(host: str) -> bytes:
    """
    A fresh EC key and a self-signed certificate whose CN and SAN are C{host}.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ) + cert.public_bytes(serialization.Encoding.PEM)


_PEMS: dict[str, bytes] = {}


def pem(host: str) -> bytes:
    """
    A PEM for C{host}, generated once per test run.
    """
    if host not in _PEMS:
        _PEMS[host] = make_pem(host)
    return _PEMS[host]


def write(path: Path, data: bytes) -> None:
    """
    Replace C{path} atomically, as an operator (or the script) would.
    """
    temporary = path.with_name("." + path.name + ".tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


@pytest.fixture
def certdir(tmp_path: Path) -> Path:
    """
    DEFAULT.pem (CN default.test), a.test.pem, b.test.pem and a wildcard.
    """
    directory = tmp_path / "certs"
    directory.mkdir()
    write(directory / "DEFAULT.pem", pem("default.test"))
    write(directory / "a.test.pem", pem("a.test"))
    write(directory / "b.test.pem", pem("b.test"))
    write(directory / "*.wild.test.pem", pem("*.wild.test"))
    return directory


def common_name(der: bytes) -> str:
    """
    The CN of a DER certificate.
    """
    cert = x509.load_der_x509_certificate(der)
    value = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    return value if isinstance(value, str) else value.decode()


# -- clients (run in a thread) ------------------------------------------------------


def client_context(
    minimum: ssl.TLSVersion | None = None, maximum: ssl.TLSVersion | None = None
) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if minimum is not None or maximum is not None:
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    if minimum is not None:
        context.minimum_version = minimum
    if maximum is not None:
        context.maximum_version = maximum
    return context


class BioClient:
    """
    A blocking TLS client over a memory BIO, so that it can half-close
    (send close_notify and keep reading) and control every byte.
    """

    def __init__(
        self, port: int, sni: str | None, prefix: bytes = b"", context: ssl.SSLContext | None = None
    ) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        if prefix:
            self.sock.sendall(prefix)
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = (context or client_context()).wrap_bio(
            self.incoming, self.outgoing, server_hostname=sni
        )

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.sock.sendall(data)

    def _fill(self) -> bool:
        data = self.sock.recv(1 << 16)
        if not data:
            self.incoming.write_eof()
            return False
        self.incoming.write(data)
        return True

    def handshake(self) -> str:
        """
        Complete the handshake; return the server certificate's CN.
        """
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                if not self._fill():
                    raise ConnectionError("closed during handshake") from None
        self._flush()
        der = self.obj.getpeercert(binary_form=True)
        assert der is not None
        return common_name(der)

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        for start in range(0, len(view), 1 << 16):
            self.obj.write(view[start : start + (1 << 16)])
            self._flush()

    def close_notify(self) -> None:
        """
        Send close_notify; keep the socket open for reading.
        """
        try:
            self.obj.unwrap()
        except (ssl.SSLWantReadError, ssl.SSLError):
            pass
        self._flush()

    def read_until_eof(self, limit: int | None = None) -> bytes:
        """
        Read until close_notify or EOF (or C{limit} bytes).
        """
        chunks = []
        total = 0
        while limit is None or total < limit:
            try:
                chunk = self.obj.read(1 << 16)
            except ssl.SSLWantReadError:
                if not self._fill():
                    break
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                break
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        self.sock.close()


def fetch(port: int, sni: str | None, payload: bytes = b"") -> tuple[str, bytes]:
    """
    Handshake with C{sni}, send C{payload}, half-close, read the reply.
    """
    client = BioClient(port, sni)
    try:
        name = client.handshake()
        if payload:
            client.send(payload)
        client.close_notify()
        return name, client.read_until_eof()
    finally:
        client.close()


def server_name(port: int, sni: str | None) -> str:
    """
    The CN of the certificate served for C{sni}.
    """
    return fetch(port, sni)[0]


def raw_exchange(
    port: int, data: bytes = b"", trickle: float = 0.0, fin: bool = False, wait: float = 10.0
) -> tuple[bytes, float, int]:
    """
    Send raw bytes (optionally one at a time every C{trickle} seconds), then
    read until the server closes.  Returns (what the server sent, seconds
    until it closed, bytes sent).
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=wait)
    started = time.monotonic()
    sent = 0
    received = b""
    try:
        if trickle:
            sock.settimeout(trickle)
            for index in range(len(data)):
                try:
                    sock.send(data[index : index + 1])
                    sent += 1
                except OSError:
                    break
                try:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    received += chunk
                except socket.timeout:  # TimeoutError from Python 3.10 on
                    continue
                except OSError:
                    break
            else:
                raise AssertionError("server never closed a trickling client")
        else:
            if data:
                sock.sendall(data)
                sent = len(data)
            if fin:
                sock.shutdown(socket.SHUT_WR)
            sock.settimeout(wait)
            while True:
                try:
                    chunk = sock.recv(4096)
                except OSError:
                    break
                if not chunk:
                    break
                received += chunk
        return received, time.monotonic() - started, sent
    finally:
        sock.close()


def client_hello(sni: str = "a.test") -> bytes:
    """
    The bytes of a real ClientHello.
    """
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = client_context().wrap_bio(incoming, outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


# -- server-side applications -----------------------------------------------------


@implementer(IHalfCloseableProtocol)
class Collect(Protocol):
    """
    Collects what the client sends; on the client's half-close answers
    C{got:<n>} and closes.
    """

    def __init__(self, factory: AppFactory) -> None:
        self.factory = factory
        self.received: list[bytes] = []

    def connectionMade(self) -> None:
        self.factory.connected.append(self)
        self.peer = self.transport.getPeer()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def readConnectionLost(self) -> None:
        self.transport.write(b"got:%d" % len(b"".join(self.received)))  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        pass


class AppFactory(Factory):
    """
    Counts protocols built; builds C{protocolClass(self)}.
    """

    def __init__(self, protocolClass: type = Collect) -> None:
        self.protocolClass = protocolClass
        self.built = 0
        self.connected: list[Any] = []

    def buildProtocol(self, addr: Any) -> Protocol:
        self.built += 1
        protocol: Protocol = self.protocolClass(self)
        return protocol


@implementer(ILogObserver)
class LogCapture:
    """
    Collects log events while installed.
    """

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def tls_failures(self) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events
            if e.get("log_namespace") == "edgeproxy.net.tls"
            and "handshake" in (e.get("log_format") or "")
        ]

    def tracebacks(self) -> list[dict[str, Any]]:
        return [e for e in self.events if "log_failure" in e or e.get("isError")]


@pytest.fixture(autouse=True)
def no_leftovers() -> Any:
    """
    Each test leaves no delayed calls (timers, rescans) behind.
    """
    yield
    pytest_twisted.blockon(deferLater(reactor, 0.05, lambda: None))
    left = [c for c in reactor.getDelayedCalls() if c.active()]  # type: ignore[attr-defined]
    assert left == []


@pytest.fixture
def logs() -> Any:
    capture = LogCapture()
    globalLogPublisher.addObserver(capture)
    yield capture
    globalLogPublisher.removeObserver(capture)


async def listen(
    certdir: Path, factory: Factory, **kwargs: Any
) -> tuple[Any, int, MetricsStore, Any]:
    """
    A TLS listener on an ephemeral 127.0.0.1 port.
    """
    metrics = MetricsStore()
    kwargs.setdefault("metrics", metrics)
    endpoint = sni_server_endpoint(
        reactor, str(certdir), TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"), **kwargs
    )
    port: Any = await endpoint.listen(factory)
    return port, port.getHost().port, kwargs["metrics"], endpoint


async def eventually(check: Any, timeout: float = 10.0) -> None:
    """
    Wait (without blocking the reactor) until C{check()} is true.
    """
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await deferLater(reactor, 0.02, lambda: None)


# -- unit tests: the certificate store ----------------------------------------------


def test_store_lookup(certdir: Path) -> None:
    """
    Names are matched case-insensitively (bytes or text, trailing dot
    ignored), a one-label wildcard file serves its subdomains, and no SNI,
    an unknown name or a non-ASCII name get the default.
    """
    store = CertificateStore(str(certdir), Clock())
    default = store[None]
    assert store["DEFAULT"] is default
    assert store[b"a.test"] is store["A.TEST"] is store[b"a.test."]
    assert store[b"a.test"] is not default
    assert store[b"b.test"] is not store[b"a.test"]
    assert store[b"x.wild.test"] is store[b"y.WILD.test"] is not default
    assert store[b"x.y.wild.test"] is default
    assert store[b"unknown.test"] is default
    assert store["\u00e9.a.test".encode()] is default
    assert store.names() == {"a.test", "b.test", "*.wild.test"}


def test_store_underscore_wildcard(tmp_path: Path) -> None:
    """
    C{_.domain.pem} is the shell-friendly spelling of C{*.domain.pem}.
    """
    write(tmp_path / "DEFAULT.pem", pem("default.test"))
    write(tmp_path / "_.u.test.pem", pem("*.u.test"))
    store = CertificateStore(str(tmp_path), Clock())
    assert store.names() == {"*.u.test"}
    assert store[b"host.u.test"] is not store[None]


def test_missing_default_is_an_error(tmp_path: Path) -> None:
    """
    A directory without DEFAULT.pem is refused at startup with a clear
    reason.
    """
    write(tmp_path / "a.test.pem", pem("a.test"))
    with pytest.raises(CertificateDirectoryError, match=r"DEFAULT\.pem is missing"):
        sni_server_endpoint(Clock(), str(tmp_path), TCP4ServerEndpoint(reactor, 0))


def test_broken_default_is_an_error(tmp_path: Path) -> None:
    """
    A DEFAULT.pem that does not parse is refused at startup, with why.
    """
    write(
        tmp_path / "DEFAULT.pem", b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n"
    )
    with pytest.raises(CertificateDirectoryError, match=r"DEFAULT\.pem: "):
        CertificateStore(str(tmp_path), Clock())


def test_missing_directory_is_an_error(tmp_path: Path) -> None:
    """
    A certificate directory that does not exist is refused at startup.
    """
    with pytest.raises(CertificateDirectoryError, match="No such file"):
        CertificateStore(str(tmp_path / "nope"), Clock())


def test_broken_file_at_startup_is_skipped(certdir: Path, logs: LogCapture) -> None:
    """
    A broken non-default PEM at startup is refused with one log line; the
    other names are served.
    """
    write(certdir / "c.test.pem", b"garbage")
    key_only = pem("d.test").split(b"-----BEGIN CERTIFICATE-----")[0]
    write(certdir / "d.test.pem", key_only)
    store = CertificateStore(str(certdir), Clock())
    assert store.names() == {"a.test", "b.test", "*.wild.test"}
    refused = [e for e in logs.events if "Refused" in (e.get("log_format") or "")]
    assert sorted(e["file"] for e in refused) == ["c.test.pem", "d.test.pem"]
    assert {e["reason"] for e in refused} == {
        "expected 1 private key, found 0",
        "no certificate",
    }


def test_load_pem_key_must_match() -> None:
    """
    A PEM whose key does not belong to its certificate is refused.
    """
    key = pem("a.test").split(b"-----BEGIN CERTIFICATE-----")[0]
    cert = b"-----BEGIN CERTIFICATE-----" + pem("b.test").split(b"-----BEGIN CERTIFICATE-----")[1]
    with pytest.raises(ValueError, match="no certificate matches the private key"):
        load_pem(key + cert)


def test_interfaces(certdir: Path) -> None:
    """
    The endpoint provides IStreamServerEndpoint and the gate
    IHandshakeListener.
    """
    endpoint = sni_server_endpoint(Clock(), str(certdir), TCP4ServerEndpoint(reactor, 0))
    assert verifyObject(IStreamServerEndpoint, endpoint)
    assert IHandshakeListener.implementedBy(_HandshakeGate)


def test_factory_makes_accepting_connections(certdir: Path) -> None:
    """
    The TLS factory finds this Twisted's connection maker, and it makes a
    server-side (accept state) OpenSSL connection with the default
    certificate's context.
    """
    from OpenSSL.SSL import Connection, WantReadError

    store = CertificateStore(str(certdir), Clock(), rescan_interval=0)
    factory = _TLSServerFactory(store.sniMap, False, Factory.forProtocol(Protocol), Clock())
    protocol = factory.buildProtocol(None)
    assert isinstance(protocol, _TLSServerProtocol)
    connection = factory._newTLSConnection(protocol)
    assert isinstance(connection, Connection)
    assert connection.get_context() is store.sniMap.context
    # A server connection waits for the client's hello and has nothing to
    # send (a client connection would have written its hello to the BIO; one
    # in neither state would fail outright).
    with pytest.raises(WantReadError):
        connection.do_handshake()
    with pytest.raises(WantReadError):
        connection.bio_read(65536)


@pytest.mark.parametrize("during_handshake", [True, False])
def test_empty_openssl_error_queue_is_an_eof(certdir: Path, during_handshake: bool) -> None:
    """
    An OpenSSL error with an empty error queue (how OpenSSL 4 reports some
    EOFs), during the handshake or after it, ends the connection as
    ConnectionLost on every supported Twisted, instead of an IndexError
    inside Twisted's EOF check on older ones.
    """
    from OpenSSL.SSL import Error, WantReadError
    from twisted.internet.error import ConnectionLost
    from twisted.internet.testing import StringTransport
    from twisted.python.failure import Failure

    reasons: list[Failure] = []

    class Recorder(Protocol):
        def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
            reasons.append(reason)

    class EmptyQueue:
        def bio_write(self, data: bytes) -> int:
            return len(data)

        def bio_read(self, size: int) -> bytes:
            raise WantReadError()

        def do_handshake(self) -> None:
            if during_handshake:
                raise Error([])

        def recv(self, size: int) -> bytes:
            raise Error([])

    store = CertificateStore(str(certdir), Clock(), rescan_interval=0)
    factory = _TLSServerFactory(store.sniMap, False, Factory.forProtocol(Recorder), Clock())
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol._tlsConnection = EmptyQueue()  # type: ignore[assignment]
    protocol.dataReceived(b"\x16")
    assert transport.disconnecting
    protocol.connectionLost(Failure(ConnectionLost("closed below")))
    assert len(reasons) == 1
    assert reasons[0].check(ConnectionLost)
    assert "closed below" not in str(reasons[0].value)


def test_connection_maker_feature_detection() -> None:
    """
    The connection maker is C{_creatorCallable} when the factory has one,
    else C{_createConnection}; with neither, a clear error names both.
    """

    def newer(protocol: Any) -> Any:
        return "newer"

    def older(protocol: Any) -> Any:
        return "older"

    class Newer:
        _creatorCallable = staticmethod(newer)
        _createConnection = staticmethod(older)

    class Older:
        _createConnection = staticmethod(older)

    assert _connection_maker(Newer()) is newer  # type: ignore[arg-type]
    assert _connection_maker(Older()) is older  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match=r"_creatorCallable.*_createConnection"):
        _connection_maker(object())  # type: ignore[arg-type]


def test_script_makes_a_usable_pair(tmp_path: Path) -> None:
    """
    conf/make-selfsigned-cert writes NAME.pem (mode 0600) that the store
    loads and serves for NAME.
    """
    script = ROOT / "conf" / "make-selfsigned-cert"
    for name in ("DEFAULT", "www.example.test"):
        subprocess.run(
            [sys.executable, str(script), name, str(tmp_path)],
            check=True,
            capture_output=True,
        )
    assert (tmp_path / "www.example.test.pem").stat().st_mode & 0o777 == 0o600
    store = CertificateStore(str(tmp_path), Clock())
    assert store.names() == {"www.example.test"}
    context = store[b"www.example.test"].getContext()
    assert context is not store[None].getContext()


# -- real handshakes ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_port_is_a_listening_port(certdir: Path) -> None:
    """
    listen() gives an IListeningPort on the inner endpoint's address.
    """
    port, number, _, _ = await listen(certdir, AppFactory())
    try:
        assert verifyObject(IListeningPort, port)
        assert number > 0
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_sni_selects_certificates(certdir: Path) -> None:
    """
    Two names on one port each get their own certificate; a wildcard file
    serves its subdomains; no SNI and an unknown name get the default.
    """
    factory = AppFactory()
    port, number, _, _ = await listen(certdir, factory)
    try:
        for sni, expected in [
            ("a.test", "a.test"),
            ("B.Test", "b.test"),
            ("x.wild.test", "*.wild.test"),
            (None, "default.test"),
            ("unknown.test", "default.test"),
        ]:
            name = await threads.deferToThread(server_name, number, sni)
            assert name == expected, sni
        assert factory.built == 5
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_plaintext_reaches_application_and_reply_comes_back(certdir: Path) -> None:
    """
    The application sees the plaintext, the client's half-close
    (close_notify) as readConnectionLost, and its reply reaches the client;
    getPeer() is the client's address.
    """
    factory = AppFactory()
    port, number, _, _ = await listen(certdir, factory)
    payload = os.urandom(300_000)
    try:
        name, reply = await threads.deferToThread(fetch, number, "a.test", payload)
        assert name == "a.test"
        assert reply == b"got:300000"
        (app,) = factory.connected
        assert b"".join(app.received) == payload
        assert app.peer.host == "127.0.0.1"
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_fin_without_close_notify_is_a_half_close(certdir: Path) -> None:
    """
    A client that sends FIN without close_notify after a completed handshake
    is treated like a TCP half-close: the application can still answer.
    """
    factory = AppFactory()
    port, number, _, _ = await listen(certdir, factory)

    def run() -> bytes:
        client = BioClient(number, "a.test")
        try:
            client.handshake()
            client.send(b"x" * 1000)
            client.sock.shutdown(socket.SHUT_WR)
            return client.read_until_eof()
        finally:
            client.close()

    try:
        assert await threads.deferToThread(run) == b"got:1000"
    finally:
        await port.stopListening()


@implementer(IHalfCloseableProtocol)
class HalfCloseFirst(Protocol):
    """
    Writes a greeting and half-closes at once; then records what the client
    still sends until it half-closes too.
    """

    def __init__(self, factory: AppFactory) -> None:
        self.factory = factory
        self.received: list[bytes] = []
        self.done: defer.Deferred[bytes] = defer.Deferred()
        self.writeLost = False

    def connectionMade(self) -> None:
        self.factory.connected.append(self)
        self.transport.write(b"hello")  # type: ignore[union-attr]
        self.transport.loseWriteConnection()  # type: ignore[union-attr]
        self.transport.write(b"dropped after half-close")  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def readConnectionLost(self) -> None:
        self.done.callback(b"".join(self.received))
        self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        self.writeLost = True


@pytest_twisted.ensureDeferred
async def test_server_half_close_keeps_reading(certdir: Path) -> None:
    """
    loseWriteConnection() on the TLS transport sends close_notify (the
    client sees the end of the data) and keeps reading: what the client
    sends afterwards still reaches the application.
    """
    factory = AppFactory(HalfCloseFirst)
    port, number, _, _ = await listen(certdir, factory)

    def run() -> bytes:
        client = BioClient(number, "a.test")
        try:
            client.handshake()
            greeting = client.read_until_eof()
            client.send(b"late data")
            client.close_notify()
            client.read_until_eof()
            return greeting
        finally:
            client.close()

    try:
        greeting = await threads.deferToThread(run)
        assert greeting == b"hello"
        (app,) = factory.connected
        assert await app.done == b"late data"
        assert app.writeLost
    finally:
        await port.stopListening()


@implementer(IPushProducer)
class Flood(Protocol):
    """
    Writes C{total} bytes as fast as the transport lets it, as a push
    producer (like a backend leg).
    """

    total = 20_000_000
    chunk = b"z" * 65536

    def __init__(self, factory: AppFactory) -> None:
        self.factory = factory
        self.sent = 0
        self.paused = False
        self.pauses = 0
        self.call: Any = None

    def connectionMade(self) -> None:
        self.factory.connected.append(self)
        self.transport.registerProducer(self, True)  # type: ignore[union-attr]
        self._schedule()

    def _schedule(self) -> None:
        if self.call is None and not self.paused and self.sent < self.total:
            self.call = reactor.callLater(0, self._produce)  # type: ignore[attr-defined]

    def _produce(self) -> None:
        self.call = None
        while not self.paused and self.sent < self.total:
            self.transport.write(self.chunk)  # type: ignore[union-attr]
            self.sent += len(self.chunk)
        if self.sent >= self.total:
            self.transport.unregisterProducer()  # type: ignore[union-attr]
            self.transport.loseConnection()  # type: ignore[union-attr]

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False
        self._schedule()

    def stopProducing(self) -> None:
        self.paused = True

    def connectionLost(self, reason: Any = None) -> None:
        if self.call is not None:
            self.call.cancel()
            self.call = None


@pytest_twisted.ensureDeferred
async def test_backpressure_to_a_paused_reader(certdir: Path) -> None:
    """
    20 MB written towards a client that does not read: the producer is
    paused and the bytes held in user space stay bounded; once the client
    reads, everything arrives.
    """
    Flood.total = 20 * 65536 * 16  # about 20 MB
    factory = AppFactory(Flood)
    port, number, _, _ = await listen(certdir, factory)
    client = await threads.deferToThread(BioClient, number, "a.test")
    try:
        await threads.deferToThread(client.handshake)
        await eventually(lambda: bool(factory.connected) and factory.connected[0].paused)
        await deferLater(reactor, 0.5, lambda: None)
        (app,) = factory.connected
        assert app.paused
        assert app.sent < Flood.total / 2
        tcp = app.transport.transport
        buffered = len(tcp.dataBuffer) + tcp._tempDataLen
        assert buffered < 2 * 1024 * 1024
        assert not app.transport._appSendBuffer
        data = await threads.deferToThread(client.read_until_eof)
        assert len(data) == Flood.total
        assert app.pauses >= 1
    finally:
        client.close()
        await port.stopListening()


# -- F9: bad input ---------------------------------------------------------------------


async def _bad(
    certdir: Path, logs: LogCapture, run: Any, reason: str, timeout: float = 10.0
) -> Any:
    factory = AppFactory()
    port, number, metrics, _ = await listen(certdir, factory, handshake_timeout=timeout)
    try:
        result = await threads.deferToThread(run, number)
        await eventually(lambda: metrics.counter("tls_handshake_failed", reason) == 1)
        assert factory.built == 0
        failures = logs.tls_failures()
        assert len(failures) == 1
        assert failures[0]["reason"] == reason
        assert logs.tracebacks() == []
        return result
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_f9_random_bytes(certdir: Path, logs: LogCapture) -> None:
    """
    Random bytes: the connection closes, the application never sees it, one
    log line, counted.
    """
    await _bad(certdir, logs, lambda n: raw_exchange(n, os.urandom(600)), "bad-handshake")


@pytest_twisted.ensureDeferred
async def test_f9_plain_http(certdir: Path, logs: LogCapture) -> None:
    """
    A plain HTTP request on the TLS port is refused and counted as such.
    """
    request = b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n"
    await _bad(certdir, logs, lambda n: raw_exchange(n, request), "plain-http")


@pytest_twisted.ensureDeferred
async def test_f9_truncated_client_hello(certdir: Path, logs: LogCapture) -> None:
    """
    Half a ClientHello followed by FIN closes the connection without
    reaching the application.
    """
    hello = client_hello()
    received, _, _ = await _bad(
        certdir, logs, lambda n: raw_exchange(n, hello[: len(hello) // 2], fin=True), "eof"
    )
    assert received == b""


@pytest_twisted.ensureDeferred
async def test_f9_stalled_handshake(certdir: Path, logs: LogCapture) -> None:
    """
    A client that connects and sends nothing is cut off by the handshake
    timeout.
    """
    _, elapsed, _ = await _bad(certdir, logs, lambda n: raw_exchange(n), "timeout", timeout=0.3)
    assert 0.2 < elapsed < 5


@pytest_twisted.ensureDeferred
async def test_f9_trickling_client_hits_the_timeout(certdir: Path, logs: LogCapture) -> None:
    """
    A client sending its ClientHello one byte at a time (faster than the
    timeout) is still cut off when the handshake timeout expires: data does
    not reset the timer.
    """
    hello = client_hello()
    _, elapsed, sent = await _bad(
        certdir, logs, lambda n: raw_exchange(n, hello, trickle=0.05), "timeout", timeout=0.5
    )
    assert 0.4 < elapsed < 5
    assert 3 <= sent < len(hello)


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1], ids=["tls1.0", "tls1.1"]
)
@pytest_twisted.ensureDeferred
async def test_f9_old_protocol_versions(
    certdir: Path, logs: LogCapture, version: ssl.TLSVersion
) -> None:
    """
    A TLS 1.0 or 1.1 client is refused (TLS 1.2 is the floor).
    """

    def run(number: int) -> str:
        client = BioClient(number, "a.test", context=client_context(version, version))
        try:
            client.handshake()
        except (ssl.SSLError, ConnectionError) as e:
            return str(e)
        finally:
            client.close()
        raise AssertionError("old protocol version accepted")

    await _bad(certdir, logs, run, "protocol-version")


@pytest_twisted.ensureDeferred
async def test_tls12_client_accepted(certdir: Path) -> None:
    """
    A TLS 1.2-only client completes the handshake (the floor is 1.2, not
    1.3).
    """
    factory = AppFactory()
    port, number, _, _ = await listen(certdir, factory)

    def run() -> str:
        client = BioClient(number, "b.test", context=client_context(maximum=ssl.TLSVersion.TLSv1_2))
        try:
            name = client.handshake()
            assert client.obj.version() == "TLSv1.2"
            return name
        finally:
            client.close()

    try:
        assert await threads.deferToThread(run) == "b.test"
    finally:
        await port.stopListening()


# -- hot reload ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_hot_reload(certdir: Path, logs: LogCapture) -> None:
    """
    Without a restart: an added certificate is served on a later handshake;
    a replacement is picked up; a broken replacement is refused (logged
    once) while the last good version and the other names keep working; a
    removed certificate falls back to the default.
    """
    factory = AppFactory()
    port, number, _, endpoint = await listen(certdir, factory, rescan_interval=0.05)
    store = endpoint.store  # type: ignore[attr-defined]

    async def served(sni: str | None) -> str:
        name: str = await threads.deferToThread(server_name, number, sni)
        return name

    try:
        assert await served("c.test") == "default.test"
        write(certdir / "c.test.pem", pem("c.test"))
        await eventually(lambda: "c.test" in store.names())
        assert await served("c.test") == "c.test"

        write(certdir / "a.test.pem", pem("a2.test"))
        await eventually(
            lambda: store[b"a.test"] is not None and _cn(store, b"a.test") == "a2.test"
        )
        assert await served("a.test") == "a2.test"

        write(certdir / "a.test.pem", b"-----BEGIN PRIVATE KEY-----\ntruncated")
        write(certdir / "e.test.pem", b"not a pem")
        await eventually(lambda: len(_refused(logs)) == 2)
        await deferLater(reactor, 0.3, lambda: None)  # several more rescans
        assert sorted(e["file"] for e in _refused(logs)) == ["a.test.pem", "e.test.pem"]
        assert await served("a.test") == "a2.test"
        assert await served("e.test") == "default.test"
        assert await served("b.test") == "b.test"

        (certdir / "b.test.pem").unlink()
        await eventually(lambda: "b.test" not in store.names())
        assert await served("b.test") == "default.test"

        write(certdir / "DEFAULT.pem", pem("default2.test"))
        await eventually(lambda: _cn(store, None) == "default2.test")
        assert await served("nothing.test") == "default2.test"
        assert await served(None) == "default2.test"
        assert logs.tracebacks() == []
    finally:
        await port.stopListening()


def _cn(store: CertificateStore, name: bytes | None) -> str:
    cert: Any = store[name].certificate
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def _refused(logs: LogCapture) -> list[dict[str, Any]]:
    return [e for e in logs.events if "Refused" in (e.get("log_format") or "")]


@pytest_twisted.ensureDeferred
async def test_rescan_stops_with_the_port(certdir: Path) -> None:
    """
    Stopping the listening port stops the periodic rescan: a certificate
    added afterwards is not loaded.
    """
    port, _, _, endpoint = await listen(certdir, AppFactory(), rescan_interval=0.05)
    store = endpoint.store  # type: ignore[attr-defined]
    await port.stopListening()
    write(certdir / "late.test.pem", pem("late.test"))
    await deferLater(reactor, 0.3, lambda: None)
    assert "late.test" not in store.names()
    assert store._loop is None


@implementer(IHalfCloseableProtocol)
class Paused(Protocol):
    """
    Pauses its transport as soon as it is connected; counts what arrives.
    """

    def __init__(self, factory: AppFactory) -> None:
        self.factory = factory
        self.count = 0

    def connectionMade(self) -> None:
        self.factory.connected.append(self)
        self.transport.pauseProducing()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.count += len(data)

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        pass


@pytest_twisted.ensureDeferred
async def test_backpressure_from_the_client(certdir: Path) -> None:
    """
    pauseProducing() on the TLS transport stops reading from the client:
    a client pushing 20 MB is held back (its sends block) instead of the
    data piling up in the proxy; resumeProducing() lets it flow again.
    """
    factory = AppFactory(Paused)
    port, number, _, _ = await listen(certdir, factory)
    client = await threads.deferToThread(BioClient, number, "a.test")
    chunk = os.urandom(1 << 16)

    def push() -> int:
        client.handshake()
        client.sock.settimeout(1.0)
        sent = 0
        try:
            while sent < 20_000_000:
                client.send(chunk)
                sent += len(chunk)
        except socket.timeout:
            pass
        return sent

    try:
        sent = await threads.deferToThread(push)
        (app,) = factory.connected
        assert sent < 20_000_000
        # At most what one read had already taken in when the pause came.
        held = app.count
        assert held <= 1 << 17
        app.transport.resumeProducing()
        await eventually(lambda: app.count > held)
    finally:
        client.close()
        await port.stopListening()


# -- through the real proxy and the endpoint strings ------------------------------------


@implementer(IHalfCloseableProtocol)
class Echo(Protocol):
    """
    A backend that echoes, and answers a half-close with its own.
    """

    def connectionMade(self) -> None:
        self.factory.accepted += 1  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]

    def readConnectionLost(self) -> None:
        self.transport.loseWriteConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        pass


async def proxy_listener(certdir: Path) -> tuple[Any, int, Any, Any, MetricsStore]:
    """
    An echo backend and an edgeproxy listener C{txsni:CERTDIR:tcp:0} routing
    to it.
    """
    from edgeproxy.config import ProxySettings
    from edgeproxy.net.endpoints import server_endpoint
    from edgeproxy.net.proxy import ProxyFactory
    from edgeproxy.routing.bindings import BindingTable
    from edgeproxy.routing.router import Router
    from edgeproxy.testing import InMemoryBackendRepository, backend

    echo = Factory.forProtocol(Echo)
    echo.accepted = 0  # type: ignore[attr-defined]
    backend_port: Any = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(echo)
    metrics = MetricsStore()
    repository = InMemoryBackendRepository([backend("b1", port=backend_port.getHost().port)])
    router = Router(repository, BindingTable(), None, metrics, "sa", reactor)
    proxy = ProxyFactory(router, reactor, ProxySettings(), metrics)
    endpoint = server_endpoint(
        reactor, f"txsni:{certdir}:tcp:0:interface=127.0.0.1", metrics=metrics
    )
    port: Any = await endpoint.listen(proxy)
    return port, port.getHost().port, backend_port, echo, metrics


@pytest_twisted.ensureDeferred
async def test_through_the_proxy(certdir: Path) -> None:
    """
    Through ProxyFactory on a txsni: listener: the plaintext reaches the
    backend, the echo comes back, and the half-close travels both ways
    (client close_notify -> backend FIN -> backend FIN -> our close_notify).
    """
    port, number, backend_port, echo, _ = await proxy_listener(certdir)
    payload = os.urandom(1_000_000)
    try:
        name, reply = await threads.deferToThread(fetch, number, "b.test", payload)
        assert name == "b.test"
        assert reply == payload
        assert echo.accepted == 1
    finally:
        await port.stopListening()
        await backend_port.stopListening()


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
@pytest_twisted.ensureDeferred
async def test_bad_input_never_connects_a_backend(certdir: Path, logs: LogCapture) -> None:
    """
    F9 through the real proxy: random bytes, plain HTTP and an old protocol
    version each fail the handshake without any backend connect.
    """
    port, number, backend_port, echo, metrics = await proxy_listener(certdir)

    def old(n: int) -> None:
        context = client_context(ssl.TLSVersion.TLSv1_1, ssl.TLSVersion.TLSv1_1)
        client = BioClient(n, "a.test", context=context)
        try:
            with pytest.raises((ssl.SSLError, ConnectionError)):
                client.handshake()
        finally:
            client.close()

    try:
        await threads.deferToThread(raw_exchange, number, os.urandom(300))
        await threads.deferToThread(raw_exchange, number, b"GET / HTTP/1.0\r\n\r\n")
        await threads.deferToThread(old, number)
        await eventually(lambda: len(logs.tls_failures()) == 3)
        assert echo.accepted == 0
        assert metrics.counter("connections_accepted") == 0
        assert (
            sum(v for (k, _), v in metrics.counters().items() if k == "tls_handshake_failed") == 3
        )
    finally:
        await port.stopListening()
        await backend_port.stopListening()


@pytest_twisted.ensureDeferred
async def test_proxy_header_before_tls(certdir: Path) -> None:
    """
    txsni:CERTDIR:haproxy:tcp:PORT: a PROXY header from a trusted (loopback)
    sender precedes the handshake; SNI still selects the certificate and the
    application's getPeer() is the header's source.
    """
    from edgeproxy.net.endpoints import server_endpoint

    factory = AppFactory()
    endpoint = server_endpoint(
        reactor, f"txsni:{certdir}:haproxy:tcp:0:interface=127.0.0.1", metrics=MetricsStore()
    )
    port: Any = await endpoint.listen(factory)
    header = b"PROXY TCP4 203.0.113.7 127.0.0.1 5555 443\r\n"

    def run() -> tuple[str, bytes]:
        client = BioClient(port.getHost().port, "a.test", prefix=header)
        try:
            name = client.handshake()
            client.send(b"hi")
            client.close_notify()
            return name, client.read_until_eof()
        finally:
            client.close()

    try:
        name, reply = await threads.deferToThread(run)
        assert name == "a.test"
        assert reply == b"got:2"
        (app,) = factory.connected
        assert (app.peer.host, app.peer.port) == ("203.0.113.7", 5555)
    finally:
        await port.stopListening()
