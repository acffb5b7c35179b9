"""
TLS termination: edgeproxy's txsni: listener against HAProxy, same certificate,
same backend, same pinned core.

    python bench/bench_tls.py [--seconds 5] [--megabytes 200] [--rounds 3]

Each proxy runs alone on core 0 (taskset); the load generators (openssl s_time for
handshakes, a Python ssl client for bulk) and the backend share core 1.  Reported:

  - handshakes per second (--clients concurrent openssl s_time -new loops: full
    handshakes, no SNI, so both serve the same DEFAULT certificate; each
    connection is also proxied to the backend, as both proxies connect a backend
    after the handshake);
  - bulk throughput: the backend sends N MB through the proxy to a TLS client
    (best of --rounds);
  - the proxy's own CPU seconds per 1000 handshakes and per GB (from /proc), which
    is the fairer figure when the shared load-generator core is the bottleneck;
  - ratios edgeproxy / HAProxy.

Needs haproxy, openssl and taskset on PATH; run from the repository root with the
project's virtualenv.  Timing on a shared 2-core machine is noisy: read the
ratios as rough.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROXY_CORE = "0"
LOAD_CORE = "1"


# -- roles run as subprocesses ------------------------------------------------------


def run_backend(port: int) -> None:
    """
    Sends C{n} bytes for a request line C{GET n}; closes on EOF otherwise.
    """

    chunk = memoryview(bytes(256 * 1024))

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            if line.startswith(b"GET "):
                remaining = int(line[4:])
                while remaining > 0:
                    size = min(remaining, len(chunk))
                    writer.write(chunk[:size])
                    remaining -= size
                    await writer.drain()
        except (ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def run_edgeproxy(port: int, backend_port: int, certdir: str) -> None:
    """
    edgeproxy with one backend and a txsni: listener, default (epoll) reactor.
    """
    sys.path.insert(0, ROOT)
    from twisted.internet import reactor

    from edgeproxy.config import ProxySettings
    from edgeproxy.metrics import MetricsStore
    from edgeproxy.net.endpoints import server_endpoint
    from edgeproxy.net.proxy import ProxyFactory
    from edgeproxy.routing.bindings import BindingTable
    from edgeproxy.routing.router import Router
    from edgeproxy.testing import InMemoryBackendRepository, backend

    metrics = MetricsStore()
    repository = InMemoryBackendRepository([backend("b1", port=backend_port, soft_limit=100000)])
    router = Router(repository, BindingTable(), None, metrics, "sa", reactor)
    factory = ProxyFactory(router, reactor, ProxySettings(max_connections=0), metrics)
    endpoint = server_endpoint(
        reactor, f"txsni:{certdir}:tcp:{port}:interface=127.0.0.1:backlog=1024", metrics=metrics
    )
    endpoint.listen(factory)
    reactor.run()  # type: ignore[attr-defined]


HAPROXY_CFG = """
global
    nbthread 1
    maxconn 4000
    ssl-default-bind-options ssl-min-ver TLSv1.2 no-tls-tickets
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend fe
    bind 127.0.0.1:{port} ssl crt {certdir}/DEFAULT.pem
    default_backend be
backend be
    server s1 127.0.0.1:{backend_port}
"""


# -- helpers -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_certdir() -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory = tempfile.mkdtemp(prefix="bench-tls-")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench.test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("bench.test")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    with open(os.path.join(directory, "DEFAULT.pem"), "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            + cert.public_bytes(serialization.Encoding.PEM)
        )
    return directory


def handshakes(port: int, seconds: int, clients: int) -> float:
    """
    Full handshakes per second: C{clients} concurrent openssl s_time loops on
    the load core.
    """
    command = ["taskset", "-c", LOAD_CORE, "openssl", "s_time", "-connect", f"127.0.0.1:{port}"]
    runs = [
        subprocess.Popen(
            [*command, "-new", "-time", str(seconds)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for _ in range(clients)
    ]
    total = 0.0
    for run in runs:
        out = run.communicate()[0]
        match = re.search(r"(\d+) connections in (\d+) real seconds", out)
        if match is None:
            raise RuntimeError(f"unexpected s_time output: {out!r}")
        total += int(match.group(1)) / max(1, int(match.group(2)))
    return total


def bulk(port: int, size: int) -> float:
    """
    Seconds to receive C{size} bytes from the backend through the proxy.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    buffer = bytearray(1 << 20)
    view = memoryview(buffer)
    with context.wrap_socket(socket.create_connection(("127.0.0.1", port))) as sock:
        started = time.perf_counter()
        sock.sendall(b"GET %d\n" % size)
        received = 0
        while received < size:
            n = sock.recv_into(view)
            if not n:
                break
            received += n
        elapsed = time.perf_counter() - started
    if received != size:
        raise RuntimeError(f"received {received} of {size} bytes")
    return elapsed


def measure(name: str, command: list[str], port: int, args: Any) -> dict[str, float]:
    proxy = subprocess.Popen(["taskset", "-c", PROXY_CORE, *command])
    try:
        wait_port(port)
        time.sleep(0.3)
        before = cpu_seconds(proxy.pid)
        rate = handshakes(port, args.seconds, args.clients)
        hs_cpu = cpu_seconds(proxy.pid) - before
        count = rate * args.seconds
        size = args.megabytes * 1_000_000
        times = []
        cpus = []
        for _ in range(args.rounds):
            before = cpu_seconds(proxy.pid)
            times.append(bulk(port, size))
            cpus.append(cpu_seconds(proxy.pid) - before)
        best = min(times)
        result = {
            "handshakes_per_s": rate,
            "cpu_ms_per_handshake": 1000 * hs_cpu / max(count, 1),
            "bulk_mb_per_s": size / best / 1e6,
            "cpu_s_per_gb": min(cpus) / (size / 1e9),
        }
        print(
            f"{name:10s} {rate:8.0f} handshakes/s "
            f"({result['cpu_ms_per_handshake']:.2f} ms CPU each)   "
            f"bulk {result['bulk_mb_per_s']:7.0f} MB/s ({result['cpu_s_per_gb']:.2f} CPU s/GB)",
            flush=True,
        )
        return result
    finally:
        proxy.terminate()
        proxy.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=5, help="handshake run length")
    parser.add_argument("--megabytes", type=int, default=200, help="bulk transfer size")
    parser.add_argument("--clients", type=int, default=4, help="concurrent s_time loops")
    parser.add_argument("--rounds", type=int, default=3, help="bulk rounds (best kept)")
    parser.add_argument("--role", choices=["backend", "edgeproxy"], help=argparse.SUPPRESS)
    parser.add_argument("role_args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "backend":
        run_backend(int(args.role_args[0]))
        return 0
    if args.role == "edgeproxy":
        run_edgeproxy(int(args.role_args[0]), int(args.role_args[1]), args.role_args[2])
        return 0
    for tool in ("haproxy", "openssl", "taskset"):
        if shutil.which(tool) is None:
            print(f"{tool} not found", file=sys.stderr)
            return 2
    os.sched_setaffinity(0, {int(LOAD_CORE)})
    certdir = make_certdir()
    backend_port = free_port()
    backend = subprocess.Popen(
        [
            "taskset",
            "-c",
            LOAD_CORE,
            sys.executable,
            __file__,
            "--role",
            "backend",
            str(backend_port),
        ]
    )
    try:
        wait_port(backend_port)
        ep_port = free_port()
        edge = measure(
            "edgeproxy",
            [
                sys.executable,
                __file__,
                "--role",
                "edgeproxy",
                str(ep_port),
                str(backend_port),
                certdir,
            ],
            ep_port,
            args,
        )
        ha_port = free_port()
        cfg = os.path.join(certdir, "haproxy.cfg")
        with open(cfg, "w") as f:
            f.write(HAPROXY_CFG.format(port=ha_port, certdir=certdir, backend_port=backend_port))
        ha = measure("haproxy", ["haproxy", "-f", cfg, "-db"], ha_port, args)
    finally:
        backend.terminate()
        backend.wait(10)
        shutil.rmtree(certdir, ignore_errors=True)
    print(
        "ratios edgeproxy/haproxy: handshakes/s {:.2f}, bulk MB/s {:.2f}; "
        "proxy CPU per handshake {:.2f}x, per GB {:.2f}x".format(
            edge["handshakes_per_s"] / ha["handshakes_per_s"],
            edge["bulk_mb_per_s"] / ha["bulk_mb_per_s"],
            edge["cpu_ms_per_handshake"] / ha["cpu_ms_per_handshake"],
            edge["cpu_s_per_gb"] / ha["cpu_s_per_gb"],
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
