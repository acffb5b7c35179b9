"""
SNI passthrough end to end with real TLS on both ends, over 127.0.0.1.

Backends are Twisted TLS servers, each with its own self-signed
certificate; clients are Python's C{ssl} (over a memory BIO, so the test
controls every byte: a ClientHello one byte per segment, a PROXY header
before it) and C{openssl s_client}.  Every client verifies the certificate
it gets against the backend's own (the proxy holds none): a client routed
to the wrong backend fails its handshake.
"""

from __future__ import annotations

import datetime
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any, List, Optional, Tuple

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import defer, reactor, threads
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import PrivateCertificate
from twisted.internet.task import deferLater

from edgeproxy.config import ProxySettings
from edgeproxy.metrics import MetricsStore
from edgeproxy.model import Backend
from edgeproxy.net.admission import Admission
from edgeproxy.net.endpoints import LOOPBACK_NETWORKS, server_endpoint
from edgeproxy.net.sni import REJECTED_COUNTER, ROUTED_COUNTER, SniProxyFactory
from edgeproxy.routing.bindings import BindingTable
from edgeproxy.routing.router import Router
from edgeproxy.testing import InMemoryBackendRepository, backend

# Twisted's PrivateCertificate.options() hands pyOpenSSL objects to
# pyOpenSSL, which newer releases deprecate; not this project's code.
pytestmark = pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")

# -- certificates ------------------------------------------------------------------


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


def peer_names(der: bytes) -> Tuple[str, List[str]]:
    """
    (CN, SAN DNS names) of a DER certificate.
    """
    cert = x509.load_der_x509_certificate(der)
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return str(cn), list(san.get_values_for_type(x509.DNSName))


# -- backends ----------------------------------------------------------------------


class Named(Protocol):
    """
    A backend that answers C{<its id>:<what it got>} and closes.
    """

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(self.factory.name.encode() + b":" + data)  # type: ignore[attr-defined, union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]


class Recorder(Protocol):
    """
    A plain TCP backend that keeps every byte it receives.
    """

    def connectionMade(self) -> None:
        self.factory.received.append(b"")  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self.factory.received[-1] += data  # type: ignore[attr-defined]


class Backends:
    """
    TLS backends on ephemeral ports, each with its own certificate.
    """

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.ports: List[Any] = []
        self.accepted: dict[str, int] = {}

    def tls(self, backend_id: str, host: str) -> Tuple[int, Path]:
        """
        Start a TLS backend for C{host}: (port, its certificate file).
        """
        pem = make_pem(host)
        path = self.tmp_path / f"{backend_id}.pem"
        path.write_bytes(pem)
        factory = Factory.forProtocol(Named)
        factory.name = backend_id  # type: ignore[attr-defined]
        self.accepted[backend_id] = 0
        accepted = self.accepted

        class Counting(Named):
            def connectionMade(self) -> None:
                accepted[backend_id] += 1

        factory.protocol = Counting
        options = PrivateCertificate.loadPEM(pem.decode()).options()
        port = reactor.listenSSL(0, factory, options, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.ports.append(port)
        return port.getHost().port, path

    async def recorder(self) -> Tuple[int, List[bytes]]:
        """
        Start a plain recording backend: (port, what each connection got).
        """
        factory = Factory.forProtocol(Recorder)
        factory.received = []  # type: ignore[attr-defined]
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.ports.append(port)
        return port.getHost().port, factory.received  # type: ignore[attr-defined]

    async def stop(self) -> None:
        for port in self.ports:
            await port.stopListening()


async def sni_proxy(
    rows: List[Backend],
    default: Optional[str] = None,
    description: str = "sni:tcp:0:interface=127.0.0.1",
    hello_timeout: float = 5.0,
) -> Tuple[Any, int, MetricsStore]:
    """
    An SNI passthrough listener wired as L{edgeproxy.service} wires one:
    (port, port number, metrics).
    """
    metrics = MetricsStore()
    repository = InMemoryBackendRepository(rows)
    router = Router(repository, BindingTable(), None, metrics, "sa", reactor)
    admission = Admission(100, metrics)
    factory = SniProxyFactory(
        router,
        reactor,
        ProxySettings(connect_timeout=2.0),
        metrics,
        app=default,
        admission=admission,
        admitsPeers=False,
        repository=repository,
        helloTimeout=hello_timeout,
    )
    factory.clientsAdmittedAtAccept = "haproxy:" not in description
    endpoint = server_endpoint(
        reactor,
        description,
        metrics=metrics,
        trusted=LOOPBACK_NETWORKS,
        admission=admission,
    )
    port: Any = await endpoint.listen(factory)
    return port, port.getHost().port, metrics


# -- the client (in a thread) ------------------------------------------------------


class Client:
    """
    A Python C{ssl} client over a memory BIO on a real socket, verifying
    the server's certificate against C{cafile} (and its name, when given).
    """

    def __init__(
        self,
        port: int,
        name: Optional[str],
        cafile: Path,
        prefix: bytes = b"",
        trickle: bool = False,
    ) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        context = ssl.create_default_context(cafile=str(cafile))
        context.check_hostname = name is not None
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname=name)
        self.trickle = trickle
        self.segments = 0
        if prefix:
            self.sock.sendall(prefix)

    def _flush(self, trickle: bool = False) -> None:
        data = self.outgoing.read()
        if trickle:
            for i in range(len(data)):
                self.sock.send(data[i : i + 1])
                self.segments += 1
                time.sleep(0.001)
        elif data:
            self.sock.sendall(data)

    def handshake(self) -> Tuple[str, List[str]]:
        """
        Complete the handshake; the (CN, SANs) of the server's certificate.
        """
        first = True
        while True:
            try:
                self.tls.do_handshake()
                self._flush()
                break
            except ssl.SSLWantReadError:
                self._flush(trickle=first and self.trickle)
                first = False
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("closed during the handshake") from None
                self.incoming.write(chunk)
        der = self.tls.getpeercert(binary_form=True)
        assert der is not None
        return peer_names(der)

    def request(self, data: bytes) -> bytes:
        """
        Send C{data}, read the answer until the server closes.
        """
        self.tls.write(data)
        self._flush()
        reply = b""
        while True:
            try:
                data = self.tls.read(65536)
                if not data:
                    return reply
                reply += data
                continue
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:
                return reply
            chunk = self.sock.recv(65536)
            if not chunk:
                return reply
            self.incoming.write(chunk)

    def close(self) -> None:
        self.sock.close()


def exchange(
    port: int, name: Optional[str], cafile: Path, **kwargs: Any
) -> Tuple[Tuple[str, List[str]], bytes]:
    """
    Handshake, one request, the answer: (certificate names, answer).
    """
    client = Client(port, name, cafile, **kwargs)
    try:
        names = client.handshake()
        return names, client.request(b"ping")
    finally:
        client.close()


def first_flight(name: Optional[str]) -> bytes:
    """
    The ClientHello a Python C{ssl} client sends for C{name}.
    """
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=name)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


async def eventually(check: Any, timeout: float = 10.0) -> None:
    """
    Wait (without blocking the reactor) until C{check()} is true.
    """
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await deferLater(reactor, 0.02, lambda: None)


@pytest.fixture(autouse=True)
def no_leftovers() -> Any:
    """
    Each test leaves no timer behind (hello timeouts, idle sweeps) once its
    connections are gone.
    """
    yield

    async def settle() -> None:
        await eventually(
            lambda: not [c for c in reactor.getDelayedCalls() if c.active()]  # type: ignore[attr-defined]
        )

    pytest_twisted.blockon(defer.ensureDeferred(settle()))


@pytest.fixture
def backends(tmp_path: Path) -> Any:
    made = Backends(tmp_path)
    yield made
    pytest_twisted.blockon(defer.ensureDeferred(made.stop()))


# -- the tests -----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_names_wildcard_and_default(backends: Backends) -> None:
    """
    Two names go to two apps, a name under a wildcard to the wildcard's
    app, and a client without SNI to the default app; each client
    completes the handshake with, and sees the certificate of, the backend
    of its app.
    """
    api_port, api_cert = backends.tls("api-1", "api.test")
    web_port, web_cert = backends.tls("web-1", "web.test")
    shop_port, shop_cert = backends.tls("shop-1", "*.shop.test")
    default_port, default_cert = backends.tls("default-1", "default.test")
    rows = [
        backend("api-1", app="api", port=api_port, sni=("api.test",)),
        backend("web-1", app="web", port=web_port, sni=("web.test",)),
        backend("shop-1", app="shop", port=shop_port, sni=("*.shop.test",)),
        backend("default-1", app="fallback", port=default_port),
    ]
    port, number, metrics = await sni_proxy(rows, default="fallback")
    try:
        for name, cafile, expected, answer in [
            ("api.test", api_cert, ("api.test", ["api.test"]), b"api-1:ping"),
            ("WEB.test", web_cert, ("web.test", ["web.test"]), b"web-1:ping"),
            ("cart.shop.test", shop_cert, ("*.shop.test", ["*.shop.test"]), b"shop-1:ping"),
            (None, default_cert, ("default.test", ["default.test"]), b"default-1:ping"),
        ]:
            names, reply = await threads.deferToThread(exchange, number, name, cafile)
            assert names == expected
            assert reply == answer
        assert backends.accepted == {"api-1": 1, "web-1": 1, "shop-1": 1, "default-1": 1}
        assert metrics.counter(ROUTED_COUNTER, "name") == 2
        assert metrics.counter(ROUTED_COUNTER, "wildcard") == 1
        assert metrics.counter(ROUTED_COUNTER, "default") == 1
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_openssl_s_client(backends: Backends) -> None:
    """
    C{openssl s_client -servername} reaches the backend of its name and
    verifies that backend's certificate and host name.
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl missing (apt-get install openssl)")
    api_port, api_cert = backends.tls("api-1", "api.test")
    web_port, web_cert = backends.tls("web-1", "web.test")
    rows = [
        backend("api-1", app="api", port=api_port, sni=("api.test",)),
        backend("web-1", app="web", port=web_port, sni=("web.test",)),
    ]
    port, number, _ = await sni_proxy(rows)

    def run(name: str, cafile: Path) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [
                openssl,
                "s_client",
                "-connect",
                f"127.0.0.1:{number}",
                "-servername",
                name,
                "-CAfile",
                str(cafile),
                "-verify_hostname",
                name,
                "-verify_return_error",
                "-quiet",
            ],
            input=b"ping",
            capture_output=True,
            timeout=30,
        )

    try:
        for name, cafile, answer in [
            ("api.test", api_cert, b"api-1:ping"),
            ("web.test", web_cert, b"web-1:ping"),
        ]:
            result = await threads.deferToThread(run, name, cafile)
            assert result.returncode == 0, result.stderr
            assert answer in result.stdout
        # The wrong CA for the name: the client refuses the backend's
        # certificate (so the checks above are real).
        result = await threads.deferToThread(run, "api.test", web_cert)
        assert result.returncode != 0
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_hello_one_byte_per_segment(backends: Backends) -> None:
    """
    A ClientHello sent one byte per TCP segment over a real socket is
    reassembled and routed by its name.
    """
    api_port, api_cert = backends.tls("api-1", "api.test")
    rows = [backend("api-1", app="api", port=api_port, sni=("api.test",))]
    port, number, _ = await sni_proxy(rows)

    def run() -> Tuple[Tuple[str, List[str]], bytes, int]:
        client = Client(number, "api.test", api_cert, trickle=True)
        try:
            names = client.handshake()
            return names, client.request(b"ping"), client.segments
        finally:
            client.close()

    try:
        names, reply, segments = await threads.deferToThread(run)
        assert names == ("api.test", ["api.test"])
        assert reply == b"api-1:ping"
        assert segments > 200
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_hello_timeout(backends: Backends) -> None:
    """
    A client that sends half a ClientHello and stalls is closed once the
    handshake timeout passes, without a backend connect.
    """
    api_port, _ = backends.tls("api-1", "api.test")
    rows = [backend("api-1", app="api", port=api_port, sni=("api.test",))]
    port, number, metrics = await sni_proxy(rows, hello_timeout=0.5)
    hello = first_flight("api.test")

    def run() -> Tuple[bytes, float]:
        sock = socket.create_connection(("127.0.0.1", number), timeout=10)
        try:
            started = time.monotonic()
            sock.sendall(hello[: len(hello) // 2])
            try:
                got = sock.recv(100)
            except ConnectionResetError:
                got = b""
            return got, time.monotonic() - started
        finally:
            sock.close()

    try:
        got, waited = await threads.deferToThread(run)
        assert got == b""
        assert waited < 5.0
        assert backends.accepted["api-1"] == 0
        assert metrics.counter(REJECTED_COUNTER, "timeout") == 1
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_unknown_name_and_garbage_closed(backends: Backends) -> None:
    """
    Without a default app, an unknown name, plain HTTP and random bytes are
    closed without any backend connect, each counted by reason; a good
    client is served afterwards.
    """
    api_port, api_cert = backends.tls("api-1", "api.test")
    rows = [backend("api-1", app="api", port=api_port, sni=("api.test",))]
    port, number, metrics = await sni_proxy(rows)

    def raw(data: bytes) -> bytes:
        sock = socket.create_connection(("127.0.0.1", number), timeout=10)
        try:
            sock.sendall(data)
            try:
                return sock.recv(100)
            except ConnectionResetError:
                return b""
        finally:
            sock.close()

    try:
        for data in (first_flight("other.test"), b"GET / HTTP/1.1\r\n\r\n", b"\x01" * 50):
            assert await threads.deferToThread(raw, data) == b""
        assert backends.accepted["api-1"] == 0
        await eventually(
            lambda: sum(v for (k, _), v in metrics.counters().items() if k == REJECTED_COUNTER) == 3
        )
        assert metrics.counter(REJECTED_COUNTER, "unknown-name") == 1
        assert metrics.counter(REJECTED_COUNTER, "plain-http") == 1
        assert metrics.counter(REJECTED_COUNTER, "not-tls") == 1
        names, reply = await threads.deferToThread(exchange, number, "api.test", api_cert)
        assert (names[0], reply) == ("api.test", b"api-1:ping")
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_proxy_out_then_untouched_hello(backends: Backends) -> None:
    """
    Towards a backend with C{proxy_protocol} 1, the backend receives the
    PROXY header with the client's address, then the ClientHello byte for
    byte; a backend that refuses first is failed over with the same bytes.
    """
    record_port, received = await backends.recorder()
    refusing = socket.socket()
    refusing.bind(("127.0.0.1", 0))
    dead_port = refusing.getsockname()[1]
    refusing.close()
    rows = [
        backend("dead", app="api", port=dead_port, sni=("api.test",), country="BR"),
        backend(
            "rec",
            app="api",
            port=record_port,
            sni=("api.test",),
            proxy_protocol=1,
            country="US",
            region="us",
        ),
    ]
    port, number, _ = await sni_proxy(rows)
    hello = first_flight("api.test")

    def run() -> int:
        sock = socket.create_connection(("127.0.0.1", number), timeout=10)
        try:
            sock.sendall(hello)
            time.sleep(0.2)
            return sock.getsockname()[1]
        finally:
            sock.close()

    try:
        client_port = await threads.deferToThread(run)
        await eventually(lambda: len(received) == 1 and len(received[0]) >= len(hello))
        header = f"PROXY TCP4 127.0.0.1 127.0.0.1 {client_port} {number}\r\n".encode()
        assert received[0] == header + hello
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_sni_behind_a_proxy_header(backends: Backends, tmp_path: Path) -> None:
    """
    C{sni:haproxy:tcp:PORT}: a PROXY header from a trusted (loopback)
    sender comes first; the hello after it is routed by name, the client
    completes its handshake with the backend of that name, and a backend
    asking for PROXY v1 gets the header's client address.
    """
    api_port, api_cert = backends.tls("api-1", "api.test")
    record_port, received = await backends.recorder()
    rows = [
        backend("api-1", app="api", port=api_port, sni=("api.test",)),
        backend("rec", app="rec", port=record_port, sni=("rec.test",), proxy_protocol=1),
    ]
    port, number, _ = await sni_proxy(rows, description="sni:haproxy:tcp:0:interface=127.0.0.1")
    header = b"PROXY TCP4 203.0.113.7 198.51.100.1 5555 443\r\n"
    hello = first_flight("rec.test")

    def run_raw() -> None:
        sock = socket.create_connection(("127.0.0.1", number), timeout=10)
        try:
            sock.sendall(header + hello)
            time.sleep(0.2)
        finally:
            sock.close()

    try:
        names, reply = await threads.deferToThread(
            exchange, number, "api.test", api_cert, prefix=header
        )
        assert names == ("api.test", ["api.test"])
        assert reply == b"api-1:ping"
        await threads.deferToThread(run_raw)
        await eventually(lambda: len(received) == 1 and len(received[0]) >= len(hello))
        assert received[0] == b"PROXY TCP4 203.0.113.7 198.51.100.1 5555 443\r\n" + hello
    finally:
        await port.stopListening()
