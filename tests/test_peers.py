"""
PROXY protocol against real peers (issue 7, defects 7 and 8): HAProxy and
nginx, from Debian's packages, started by the tests themselves on
loopback, as senders in front of edgeproxy's C{haproxy:} listener and as
receivers of the headers edgeproxy sends to backends.

Each test skips with the install command when its binary is absent;
C{.ci/run} installs both.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import pytest_twisted
from faultkit import Recorder, listen, wait_until
from twisted.internet import reactor, threads

from edgeproxy.config import ProxySettings
from edgeproxy.metrics import MetricsStore
from edgeproxy.net.admission import Admission
from edgeproxy.net.endpoints import server_endpoint
from edgeproxy.net.proxy import ProxyFactory
from edgeproxy.routing.router import Router
from edgeproxy.testing import BindingTable, InMemoryBackendRepository, backend

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

HOST = "127.0.0.1"
STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"


def _need(binary: str, package: str) -> str:
    path = shutil.which(binary) or (
        f"/usr/sbin/{binary}" if os.path.exists(f"/usr/sbin/{binary}") else None
    )
    if path is None:
        pytest.skip(f"{binary} is not installed: apt-get install {package}")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _wait_listening(port: int, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{what} exited with {process.returncode}")
        try:
            socket.create_connection((HOST, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"{what} is not listening on {port}")


def _start(argv: list[str], port: int, what: str, log: Path) -> subprocess.Popen[bytes]:
    out = open(log, "wb")
    process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_listening(port, process, what)
    except AssertionError:
        process.kill()
        process.wait()
        out.close()
        raise AssertionError(f"{what} did not start: {log.read_text(errors='replace')}") from None
    return process


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        p.terminate()
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _exchange(port: int, payload: bytes = b"hello\n") -> tuple[bytes, int]:
    """
    In a thread: connect, send, half-close, read to EOF; (reply, our port).
    """
    with socket.create_connection((HOST, port), timeout=10) as s:
        mine = s.getsockname()[1]
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks), mine


class _HeaderEcho(Recorder):
    """
    A backend that, at EOF, answers with everything it received (the PROXY
    header edgeproxy sent first included), then closes.
    """

    def readConnectionLost(self) -> None:
        self.transport.write(bytes(self.received))  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        pass


from twisted.internet.interfaces import IHalfCloseableProtocol  # noqa: E402
from zope.interface import classImplements  # noqa: E402

classImplements(_HeaderEcho, IHalfCloseableProtocol)


def _proxy(rows: list[Any], description: str) -> tuple[Any, Any]:
    """
    An edgeproxy listener (C{description}) over C{rows}, in this process.
    """
    metrics = MetricsStore()
    admission = Admission(100, metrics)
    router = Router(InMemoryBackendRepository(rows), BindingTable(), None, metrics, "sa", reactor)
    factory = ProxyFactory(
        router,
        reactor,
        ProxySettings(connect_timeout=2.0),
        metrics,
        app="app",
        admission=admission,
        admitsPeers=False,
    )
    endpoint = server_endpoint(reactor, description, metrics=metrics, admission=admission)
    return endpoint, factory


HAPROXY_FRONT = """\
global
    log stdout format raw local0 warning
defaults
    mode tcp
    timeout connect 5s
    timeout client 10s
    timeout server 10s
frontend front
    bind {host}:{front}
    default_backend edge
backend edge
    unique-id-format %{{+X}}o%ci:%cp_%fi:%fp_%Ts_%rt
    server edgeproxy {host}:{edge} send-proxy-v2 proxy-v2-options crc32c,unique-id,authority
"""


@pytest_twisted.inlineCallbacks
def test_haproxy_v2_with_crc32c_and_tlvs_is_accepted(tmp_path, processes):
    """
    HAProxy in front sends PROXY v2 with a CRC32c, a unique-id and an
    authority TLV: edgeproxy's C{haproxy:} listener verifies and accepts it
    and routes the real client, which the backend learns from edgeproxy's
    own PROXY v1 header (the client's port, not HAProxy's).
    """
    haproxy = _need("haproxy", "haproxy")
    echo = listen(reactor, _HeaderEcho)
    endpoint, factory = _proxy(
        [backend("echo", port=echo.port, proxy_protocol=1)], f"haproxy:tcp:0:interface={HOST}"
    )
    port = yield endpoint.listen(factory)
    try:
        front = _free_port()
        config = tmp_path / "haproxy.cfg"
        config.write_text(HAPROXY_FRONT.format(host=HOST, front=front, edge=port.getHost().port))
        processes.append(
            _start([haproxy, "-db", "-f", str(config)], front, "haproxy", tmp_path / "h.log")
        )
        reply, mine = yield threads.deferToThread(_exchange, front)
        assert reply.startswith(b"PROXY TCP4 127.0.0.1 127.0.0.1 %d %d\r\n" % (mine, front)), (
            reply,
            factory.metrics.counters(),
        )
        assert reply.endswith(b"hello\n")
        assert factory.metrics.counters().get(("proxy_header_rejected", "v2-bad-crc32c")) is None
    finally:
        yield port.stopListening()
        yield echo.stop()


NGINX_FRONT = """\
daemon off;
master_process off;
{load_module}
pid {dir}/nginx.pid;
error_log {dir}/nginx.error.log warn;
events {{ worker_connections 64; }}
stream {{
    server {{
        listen {host}:{front};
        proxy_pass {host}:{edge};
        proxy_protocol on;
        proxy_half_close on;
    }}
}}
"""


@pytest_twisted.inlineCallbacks
def test_nginx_v1_is_accepted(tmp_path, processes):
    """
    nginx C{stream} in front with C{proxy_protocol on} sends PROXY v1:
    edgeproxy accepts it and passes the real client on to the backend.
    """
    nginx = _need("nginx", "nginx libnginx-mod-stream")
    echo = listen(reactor, _HeaderEcho)
    endpoint, factory = _proxy(
        [backend("echo", port=echo.port, proxy_protocol=1)], f"haproxy:tcp:0:interface={HOST}"
    )
    port = yield endpoint.listen(factory)
    try:
        front = _free_port()
        config = tmp_path / "nginx.conf"
        load = f"load_module {STREAM_MODULE};" if os.path.exists(STREAM_MODULE) else ""
        config.write_text(
            NGINX_FRONT.format(
                host=HOST, front=front, edge=port.getHost().port, dir=tmp_path, load_module=load
            )
        )
        processes.append(
            _start(
                [nginx, "-p", str(tmp_path), "-c", str(config)], front, "nginx", tmp_path / "n.log"
            )
        )
        reply, mine = yield threads.deferToThread(_exchange, front)
        assert reply.startswith(b"PROXY TCP4 127.0.0.1 127.0.0.1 %d %d\r\n" % (mine, front))
        assert reply.endswith(b"hello\n")
    finally:
        yield port.stopListening()
        yield echo.stop()


HAPROXY_BACK = """\
global
    log stdout format raw local0 warning
defaults
    mode http
    timeout connect 5s
    timeout client 10s
    timeout server 10s
frontend back
    bind {host}:{back} accept-proxy
    http-request return status 200 content-type text/plain {answer}
"""
#: What the HAProxy backend answers: the client address it was told.
HAPROXY_ANSWER = 'lf-string "src=%[src] port=%[src_port]\\n"'


@pytest.mark.parametrize("version", [1, 2])
@pytest_twisted.inlineCallbacks
def test_haproxy_reads_the_header_edgeproxy_sends(tmp_path, processes, version):
    """
    HAProxy as a backend with C{accept-proxy} reads edgeproxy's PROXY v1 and
    v2 headers and sees the real client address and port.
    """
    haproxy = _need("haproxy", "haproxy")
    back = _free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(HAPROXY_BACK.format(host=HOST, back=back, answer=HAPROXY_ANSWER))
    processes.append(
        _start([haproxy, "-db", "-f", str(config)], back, "haproxy", tmp_path / "h.log")
    )
    endpoint, factory = _proxy(
        [backend("haproxy", port=back, proxy_protocol=version)], f"tcp:0:interface={HOST}"
    )
    port = yield endpoint.listen(factory)
    try:
        request = b"GET / HTTP/1.0\r\nHost: x\r\n\r\n"
        reply, mine = yield threads.deferToThread(_exchange, port.getHost().port, request)
        assert reply.startswith(b"HTTP/1.")
        assert b"src=127.0.0.1 port=%d\n" % mine in reply
    finally:
        yield port.stopListening()


NGINX_BACK = """\
daemon off;
master_process off;
{load_module}
pid {dir}/nginx.pid;
error_log {dir}/nginx.error.log warn;
events {{ worker_connections 64; }}
stream {{
    server {{
        listen {host}:{back} proxy_protocol;
        return "src=$proxy_protocol_addr port=$proxy_protocol_port\\n";
    }}
}}
"""


@pytest.mark.parametrize("version", [1, 2])
@pytest_twisted.inlineCallbacks
def test_nginx_reads_the_header_edgeproxy_sends(tmp_path, processes, version):
    """
    nginx C{stream} with C{listen ... proxy_protocol} reads edgeproxy's
    PROXY v1 and v2 headers and sees the real client address and port.
    """
    nginx = _need("nginx", "nginx libnginx-mod-stream")
    back = _free_port()
    config = tmp_path / "nginx.conf"
    load = f"load_module {STREAM_MODULE};" if os.path.exists(STREAM_MODULE) else ""
    config.write_text(NGINX_BACK.format(host=HOST, back=back, dir=tmp_path, load_module=load))
    processes.append(
        _start([nginx, "-p", str(tmp_path), "-c", str(config)], back, "nginx", tmp_path / "n.log")
    )
    endpoint, factory = _proxy(
        [backend("nginx", port=back, proxy_protocol=version)], f"tcp:0:interface={HOST}"
    )
    port = yield endpoint.listen(factory)
    try:
        reply, mine = yield threads.deferToThread(_exchange, port.getHost().port)
        assert reply == b"src=127.0.0.1 port=%d\n" % mine
        yield wait_until(reactor, lambda: not factory.connections)
    finally:
        yield port.stopListening()
