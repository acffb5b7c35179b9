"""
End to end: C{twistd -n edgeproxy} as a subprocess on a temporary routing
database, with real backends on loopback, proves geo routing, stickiness and
reload-driven failover.

The backends are L{edgeproxy.demo.IdentifyFactory} listeners in this test
process: each answers with one line naming itself and the client address it
was told by the proxy's PROXY v1 header.  Clients present PROXY v1 headers
from a French (90.85.1.1), a Brazilian (200.160.2.3) and a Japanese
(133.242.0.3) address, located by the GeoIP database shipped with
edgeproxy (geo-whois-asn-country).
"""

from __future__ import annotations

import signal
import socket
import sqlite3
import subprocess
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest
import pytest_twisted
from faultkit import edgeproxy_argv, edgeproxy_env
from twisted.internet import reactor, threads
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure

from edgeproxy.demo import DemoBackend, IdentifyFactory

ROOT = Path(__file__).resolve().parent.parent

FR, BR, JP = "90.85.1.1", "200.160.2.3", "133.242.0.3"

BACKENDS = (
    DemoBackend("fra-1", "FR", "eu", 0),
    DemoBackend("gru-1", "BR", "sa", 0),
    DemoBackend("gru-2", "BR", "sa", 0),
    DemoBackend("nrt-1", "JP", "ap", 0),
)

RELOAD = 0.5

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


class LineClient(Protocol):
    """
    Send C{data} on connect; fire C{line} with the first line received.
    """

    transport: Any

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.buffer = b""
        self.line: Deferred[str] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.data)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if b"\n" in self.buffer and not self.line.called:
            self.line.callback(self.buffer.split(b"\n", 1)[0].decode("ascii"))
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if not self.line.called:
            self.line.errback(reason)


async def ask(port: int, client_ip: str, client_port: int = 40000) -> str:
    """
    Connect to the proxy as C{client_ip} (by PROXY v1 header) and return
    the backend's greeting line.
    """
    header = f"PROXY TCP4 {client_ip} 127.0.0.1 {client_port} {port}\r\n".encode()
    client = LineClient(header + b"ping\n")
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
    await connectProtocol(endpoint, client)

    def abort(result: Any, timeout: float) -> Any:
        client.transport.abortConnection()
        return result

    client.line.addTimeout(5, reactor, onTimeoutCancel=abort)
    return await client.line


async def scrape(log: Path) -> Dict[Any, float]:
    """
    The admin listener's port from the proxy's log, then its /health (which
    must say ok), the status page and its JSON (every backend listed), and
    its /metrics, parsed: (name, sorted labels) -> value.
    """
    import json
    import re

    import treq
    from prometheus_client.parser import text_string_to_metric_families

    found = re.search(r"admin listener on 127\.0\.0\.1:(\d+)", log.read_text())
    assert found, log.read_text()
    from twisted.web.client import HTTPConnectionPool

    # Not treq's default persistent pool: no connection (and no timer) may
    # outlive the test.
    pool = HTTPConnectionPool(reactor, persistent=False)
    base = f"http://127.0.0.1:{found.group(1)}"
    health = await treq.get(base + "/health", pool=pool)
    assert health.code == 200
    assert json.loads(await health.content())["status"] == "ok"
    page = await treq.get(base + "/", pool=pool)
    assert page.code == 200
    assert b"<html" in (await page.content()).lower()
    status = await treq.get(base + "/api/v1/status", pool=pool)
    assert status.code == 200
    assert {b["id"] for b in json.loads(await status.content())["backends"]} == {
        b.id for b in BACKENDS
    }
    response = await treq.get(base + "/metrics", pool=pool)
    assert response.code == 200
    text = (await response.content()).decode()
    samples: Dict[Any, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def backend_of(line: str) -> str:
    return line.split(" ", 1)[0]


@pytest.fixture
def routing_db(tmp_path: Path) -> Path:
    return tmp_path / "routing.db"


@pytest.fixture
def proxy_log(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "edgeproxy.log"


def write_table(path: Path, ports: Dict[str, int]) -> None:
    with sqlite3.connect(path) as conn:
        conn.executescript((ROOT / "conf" / "schema.sql").read_text())
        for b in BACKENDS:
            conn.execute(
                "INSERT INTO backends (id, app, region, country, wg_ip, port, healthy, weight,"
                " soft_limit, hard_limit, deleted, proxy_protocol)"
                " VALUES (?, 'demo', ?, ?, '127.0.0.1', ?, 1, 1, 100, 0, 0, 1)",
                (b.id, b.region, b.country, ports[b.id]),
            )
    conn.close()


def mark_unhealthy(path: Path, backend_id: str) -> None:
    conn = sqlite3.connect(path)
    try:
        with conn:
            conn.execute("UPDATE backends SET healthy = 0 WHERE id = ?", (backend_id,))
    finally:
        conn.close()


def start_proxy(db: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = edgeproxy_env()
    argv = edgeproxy_argv(
        "--db",
        str(db),
        "--listen",
        f"haproxy:tcp:{port}:interface=127.0.0.1",
        "--db-reload",
        str(RELOAD),
        "--region",
        "sa",
        "--admin",
        "tcp:0:interface=127.0.0.1",
    )
    with open(log, "wb") as out:
        return subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(db.parent)
        )


async def first_answer(port: int, client_ip: str, proc: subprocess.Popen[bytes], log: Path) -> str:
    """
    Ask until the freshly started proxy answers (bounded wait).
    """
    deadline = reactor.seconds() + 60
    while True:
        try:
            return await ask(port, client_ip)
        except Exception:
            if proc.poll() is not None:
                raise AssertionError(f"edgeproxy exited early:\n{log.read_text()}") from None
            if reactor.seconds() > deadline:
                raise
            await sleep(0.2)


async def stop_proxy(proc: subprocess.Popen[bytes]) -> Optional[int]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    deadline = reactor.seconds() + 30
    while proc.poll() is None and reactor.seconds() < deadline:
        await sleep(0.1)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
        return None
    return proc.returncode


@pytest_twisted.ensureDeferred
async def test_geo_routing_stickiness_and_reload(routing_db: Path, proxy_log: Path) -> None:
    """
    Through a real C{twistd -n edgeproxy}: French, Brazilian and Japanese
    clients reach the French, a Brazilian and the Japanese backend, each
    told the client's real address; a client sticks to its backend across
    connections (two equal Brazilian backends, so only the binding keeps it
    on one); once that backend is marked unhealthy in the database the next
    connections move to the other Brazilian backend within a reload or two;
    SIGTERM stops the proxy cleanly, with no traceback in its log.
    """
    factories = {b.id: IdentifyFactory(b, reactor) for b in BACKENDS}
    ports: List[IListeningPort] = []
    proc: Optional[subprocess.Popen[bytes]] = None
    try:
        for b in BACKENDS:
            endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
            ports.append(await endpoint.listen(factories[b.id]))
        write_table(
            routing_db,
            {b.id: p.getHost().port for b, p in zip(BACKENDS, ports)},  # type: ignore[attr-defined]
        )
        port = free_port()
        proc = start_proxy(routing_db, port, proxy_log)

        # Geo routing: country tier.
        fr = await first_answer(port, FR, proc, proxy_log)
        assert backend_of(fr) == "fra-1"
        assert f"you are {FR} port 40000" in fr
        jp = await ask(port, JP)
        assert backend_of(jp) == "nrt-1"
        assert f"you are {JP} port 40000" in jp
        br = await ask(port, BR)
        chosen = backend_of(br)
        assert chosen in ("gru-1", "gru-2")
        assert f"you are {BR} port 40000" in br

        # The admin listener: /health and /metrics count what was sent.
        metrics = await scrape(proxy_log)
        assert metrics[("edgeproxy_routing_decisions_total", (("tier", "0"),))] >= 3
        assert metrics[("edgeproxy_connections_accepted_total", ())] >= 3
        assert metrics[("edgeproxy_routing_table_backends", ())] == 4
        assert metrics[("edgeproxy_backend_up", (("backend", "fra-1"),))] == 1

        # Stickiness: the same client IP, new connections from other ports.
        again = [backend_of(await ask(port, BR, 41000 + i)) for i in range(12)]
        assert again == [chosen] * 12

        # The backend goes unhealthy in the database: the next connections
        # move to the other Brazilian backend once the reload picked it up.
        other = "gru-2" if chosen == "gru-1" else "gru-1"
        mark_unhealthy(routing_db, chosen)
        marked = reactor.seconds()
        deadline = marked + 30  # generous: the reload runs every RELOAD s
        seen = chosen
        while seen == chosen and reactor.seconds() < deadline:
            await sleep(RELOAD / 5)
            seen = backend_of(await ask(port, BR, 42000))
        assert seen == other
        # ... and sticks there.
        assert [backend_of(await ask(port, BR, 43000 + i)) for i in range(5)] == [other] * 5
        # The unhealthy backend got nothing after the move.
        served_after = len(factories[chosen].served)
        assert backend_of(await ask(port, BR, 44000)) == other
        assert len(factories[chosen].served) == served_after

        status = await stop_proxy(proc)
        proc = None
        log = proxy_log.read_text()
        # The graceful shutdown exits 0 (not by re-raising SIGTERM).
        assert status == 0, log
        assert "Server Shut Down." in log, log
        assert "Traceback" not in log, log
        assert "edgeproxy 0.1" in log and "starting" in log
        assert "fra-1" in log and "nrt-1" in log
    finally:
        if proc is not None:
            await stop_proxy(proc)
        for p in ports:
            await maybeDeferred(p.stopListening)


# --- the demo's pieces (the newcomer path: conf/demo.sh) --------------------


def demo_connection(clock: Any = None) -> tuple[Any, Any, IdentifyFactory]:
    from twisted.internet.testing import StringTransport

    factory = IdentifyFactory(DemoBackend("cdg-1", "FR", "eu", 9102), clock or Clock())
    protocol = factory.buildProtocol(None)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5555))
    assert protocol is not None
    protocol.makeConnection(transport)
    return protocol, transport, factory


def test_demo_backend_reports_proxy_header_source() -> None:
    """
    A demo backend told the client's address by a PROXY v1 header (even
    one split across segments) names itself and that address, then echoes.
    """
    protocol, transport, factory = demo_connection()
    protocol.dataReceived(b"PROXY TCP4 90.85.1.1 127.0.0.1 40000 8081")
    assert transport.value() == b""
    protocol.dataReceived(b"\r\nhello\n")
    assert transport.value() == (
        b"cdg-1 (country FR, region eu) here; you are 90.85.1.1 port 40000 "
        b"(PROXY v1 header from the proxy)\nhello\n"
    )
    protocol.dataReceived(b"more")
    assert transport.value().endswith(b"hello\nmore")
    assert factory.served == [("90.85.1.1", 40000)]


def test_demo_backend_without_header() -> None:
    """
    Without a PROXY header the demo backend reports the socket peer: at
    once when data that is no header arrives, after its delay when the
    client is silent, and before closing when the client half-closes.
    """
    protocol, transport, _ = demo_connection()
    protocol.dataReceived(b"hello\n")
    assert transport.value().startswith(b"cdg-1 (country FR, region eu) here; you are 127.0.0.1")
    assert transport.value().endswith(b"no PROXY header came)\nhello\n")

    clock = Clock()
    protocol, transport, factory = demo_connection(clock)
    clock.advance(factory.greetDelay)
    assert b"you are 127.0.0.1 port 5555" in transport.value()

    protocol, transport, _ = demo_connection()
    protocol.readConnectionLost()
    assert b"you are 127.0.0.1 port 5555" in transport.value()
    assert transport.disconnecting


def test_sample_rows_match_demo_backends(tmp_path: Path) -> None:
    """
    conf/routing-sample.sql (loaded after conf/schema.sql) holds exactly
    the demo backends, at their ports, asking for a PROXY v1 header; and
    --explain ranks the French backend first for a French client.
    """
    from edgeproxy.demo import DEMO_BACKENDS, explain
    from edgeproxy.model import PROXY_V1
    from edgeproxy.stores.sqlite import SqliteBackendRepository

    db = tmp_path / "routing.db"
    with sqlite3.connect(db) as conn:
        conn.executescript((ROOT / "conf" / "schema.sql").read_text())
        conn.executescript((ROOT / "conf" / "routing-sample.sql").read_text())
    conn.close()
    snapshot = SqliteBackendRepository(str(db)).loadInitial()
    rows = {b.id: b for b in snapshot.backends}
    assert set(rows) == {d.id for d in DEMO_BACKENDS}
    for d in DEMO_BACKENDS:
        row = rows[d.id]
        assert (row.country, row.region, row.host, row.port) == (
            d.country,
            d.region,
            "127.0.0.1",
            d.port,
        )
        assert row.proxy_protocol == PROXY_V1 and row.routable
    text = explain(str(db), FR, "sa")
    lines = text.splitlines()
    assert lines[0] == "client 90.85.1.1: country FR, region eu; this POP's region is sa"
    assert lines[3].split()[:3] == ["cdg-1", "tier", "0"]
    assert lines[4].split()[:3] == ["gru-1", "tier", "2"]


@pytest_twisted.ensureDeferred
async def test_geo_dns_through_twistd(routing_db: Path, proxy_log: Path) -> None:
    """
    Through a real C{twistd -n edgeproxy --dns}: the app name answers the
    backend closest to the client subnet of an EDNS Client Subnet option
    (France, Brazil, Japan), and the POPs name answers from the pops table
    of the same database, reloaded with it.
    """
    import dns.edns
    import dns.message
    import dns.query
    import dns.rdatatype

    write_table(routing_db, {b.id: 9 for b in BACKENDS})
    with sqlite3.connect(routing_db) as conn:
        for b, address in zip(BACKENDS, ("10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4")):
            conn.execute("UPDATE backends SET wg_ip = ? WHERE id = ?", (address, b.id))
    conn.close()
    dns_port = free_port()
    env = edgeproxy_env()
    argv = edgeproxy_argv(
        "--db", str(routing_db), "--listen", f"tcp:{free_port()}:interface=127.0.0.1",
        "--db-reload", str(RELOAD), "--region", "sa", "--health-check", "off",
        "--dns", f"127.0.0.1:{dns_port}",
    )  # fmt: skip
    with open(proxy_log, "wb") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(routing_db.parent)
        )

    def ask_dns(subnet: str | None, name: str = "demo.edge.internal") -> List[str]:
        options: List[dns.edns.Option] = [dns.edns.ECSOption(subnet, 24)] if subnet else []
        query = dns.message.make_query(name, dns.rdatatype.A, use_edns=0, options=options)
        answer = dns.query.udp(query, "127.0.0.1", port=dns_port, timeout=2)
        return sorted(r.address for rrset in answer.answer for r in rrset)

    async def ask_until(subnet: str | None, name: str = "demo.edge.internal") -> List[str]:
        deadline = reactor.seconds() + 60
        while True:
            try:
                return await threads.deferToThread(ask_dns, subnet, name)
            except Exception:
                if proc.poll() is not None:
                    raise AssertionError(proxy_log.read_text()) from None
                if reactor.seconds() > deadline:
                    raise
                await sleep(0.2)

    try:
        assert await ask_until("90.85.1.0") == ["10.0.0.1"]  # fra-1
        assert await ask_until("133.242.0.0") == ["10.0.0.4"]  # nrt-1
        assert set(await ask_until("200.160.2.0")) <= {"10.0.0.2", "10.0.0.3"}  # gru-*
        with sqlite3.connect(routing_db) as conn:
            conn.execute(
                "INSERT INTO pops (id, region, address) VALUES ('pop-sa', 'sa', '192.0.2.9')"
            )
        conn.close()
        deadline = reactor.seconds() + 30
        while await ask_until(None, "sa.pops.edge.internal") != ["192.0.2.9"]:
            assert reactor.seconds() < deadline, proxy_log.read_text()
            await sleep(RELOAD / 2)
        assert await stop_proxy(proc) == 0
        assert "Traceback" not in proxy_log.read_text()
    finally:
        if proc.poll() is None:
            await stop_proxy(proc)
