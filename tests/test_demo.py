"""
Tests for L{edgeproxy.demo} and C{conf/demo.sh}: the newcomer's path.

The C{--connect} client is tested as the README uses it, as a subprocess
(C{python -m edgeproxy.demo --connect ...}) against real sockets served by
the test's reactor; its parsers with Hypothesis.
"""

from __future__ import annotations

import ipaddress
import re
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_twisted
from faultkit import BlackHole, RefusingPort, Stall, edgeproxy_env, listen
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import maybeDeferred
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread
from zope.interface import implementer

from edgeproxy.demo import DemoBackend, IdentifyFactory, address_port, explain, host_port, unescape

ROOT = Path(__file__).resolve().parent.parent

PROG = "python -m edgeproxy.demo"


def demo_command(*args: str) -> subprocess.CompletedProcess[str]:
    """
    Run C{python -m edgeproxy.demo ARGS} with this checkout's package and
    collect its output (blocking: call it in a thread from reactor tests).
    """
    return subprocess.run(
        [sys.executable, "-m", "edgeproxy.demo", *args],
        capture_output=True,
        text=True,
        env=edgeproxy_env(),
        cwd=str(ROOT),
        timeout=60,
    )


def serve(factory: Any) -> tuple[Any, str]:
    """
    Listen with C{factory} on a free loopback port of the test's reactor;
    return the port and its C{HOST:PORT}.
    """
    port = cast(Any, reactor).listenTCP(0, factory, interface="127.0.0.1")
    return port, f"127.0.0.1:{port.getHost().port}"


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """
    Check that C{result} failed with one line on stderr and nothing on
    stdout; return that line.
    """
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{PROG}: ")
    return lines[0]


# --- --connect, against real sockets ---------------------------------------


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_connect_with_proxy_header_prints_the_reply() -> None:
    """
    C{--connect HOST:PORT --proxy-from IP:PORT} sends a PROXY v1 header
    naming IP:PORT as the client, then C{hello\\n}, half-closes, prints
    everything the backend sends until it closes, and exits 0.
    """
    factory = IdentifyFactory(DemoBackend("cdg-1", "FR", "eu", 0), reactor)
    port, target = serve(factory)
    try:
        result = await deferToThread(
            demo_command, "--connect", target, "--proxy-from", "90.85.1.1:40000"
        )
    finally:
        await maybeDeferred(port.stopListening)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == (
        "cdg-1 (country FR, region eu) here; you are 90.85.1.1 port 40000"
        " (PROXY v1 header from the proxy)\nhello\n"
    )
    assert factory.served == [("90.85.1.1", 40000)]


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_connect_without_header_and_custom_text() -> None:
    """
    Without C{--proxy-from} no header is sent (the backend sees the socket
    peer); C{--send} text has its escapes decoded; an empty C{--send} sends
    nothing and the half-close alone gets the greeting.
    """
    factory = IdentifyFactory(DemoBackend("gru-1", "BR", "sa", 0), reactor)
    port, target = serve(factory)
    try:
        text = await deferToThread(demo_command, "--connect", target, "--send", "a\\tb\\nc\\n")
        empty = await deferToThread(demo_command, "--connect", target, "--send", "")
    finally:
        await maybeDeferred(port.stopListening)
    assert (text.returncode, text.stderr) == (0, "")
    greeting, echoed = text.stdout.split("\n", 1)
    assert greeting.startswith("gru-1 (country BR, region sa) here; you are 127.0.0.1 port ")
    assert greeting.endswith("(the socket peer; no PROXY header came)")
    assert echoed == "a\tb\nc\n"
    assert (empty.returncode, empty.stderr) == (0, "")
    assert empty.stdout.startswith("gru-1 ") and empty.stdout.count("\n") == 1


@pytest.mark.slow
def test_connect_refused_is_one_line() -> None:
    """
    A refused connection ends C{--connect} with one line on stderr and a
    non-zero status.
    """
    refusing = RefusingPort()
    try:
        result = demo_command("--connect", f"127.0.0.1:{refusing.port}")
    finally:
        refusing.close()
    line = one_error_line(result)
    assert f"cannot connect to 127.0.0.1:{refusing.port}" in line
    assert "refused" in line.lower()


@pytest.mark.slow
def test_connect_unanswered_is_a_timeout() -> None:
    """
    A connect that gets no answer (SYNs dropped) gives up after
    C{--timeout} seconds with one line on stderr and a non-zero status.
    """
    hole = BlackHole()
    try:
        if not hole.is_black():
            pytest.skip("this kernel answers SYNs beyond a full accept queue")
        result = demo_command("--connect", f"127.0.0.1:{hole.port}", "--timeout", "1")
    finally:
        hole.close()
    assert "no answer within 1s" in one_error_line(result)


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_connect_never_closed_is_a_timeout() -> None:
    """
    A peer that never closes the connection ends C{--connect} after
    C{--timeout} seconds with one line on stderr and a non-zero status.
    """
    stall = listen(reactor, Stall)
    try:
        result = await deferToThread(
            demo_command, "--connect", f"127.0.0.1:{stall.port}", "--timeout", "1"
        )
    finally:
        await stall.stop()
    assert "did not close the connection within 1s" in one_error_line(result)


class _CloseAtOnce(Protocol):
    def connectionMade(self) -> None:
        self.transport.loseConnection()  # type: ignore[union-attr]


@implementer(IHalfCloseableProtocol)
class _CloseAtEOF(Protocol):
    """
    Reads until the client half-closes, then closes without a byte (closing
    before that would race the client's send into a reset).
    """

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        pass


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_connect_closed_without_data_says_so() -> None:
    """
    A connection closed without a byte (as the proxy does when it has no
    backend for the client) exits 0 with nothing on stdout and a note on
    stderr, so that the silence is not mistaken for a hang.
    """
    port, target = serve(Factory.forProtocol(_CloseAtEOF))
    try:
        result = await deferToThread(demo_command, "--connect", target)
    finally:
        await maybeDeferred(port.stopListening)
    assert (result.returncode, result.stdout) == (0, "")
    assert result.stderr == f"{PROG}: the connection closed without any data\n"


@pytest.mark.parametrize(
    "args",
    [
        ["--connect", "127.0.0.1"],
        ["--connect", "127.0.0.1:0"],
        ["--connect", "127.0.0.1:8080", "--proxy-from", "example.com:1"],
        ["--connect", "127.0.0.1:8080", "--send", "\\q"],
        ["--proxy-from", "90.85.1.1:40000"],
    ],
)
def test_bad_client_arguments_are_refused(args: list[str]) -> None:
    """
    Bad C{--connect}/C{--proxy-from}/C{--send} values (and C{--proxy-from}
    without C{--connect}) are usage errors, before any connection.
    """
    result = demo_command(*args)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "error:" in result.stderr


# --- the parsers -------------------------------------------------------------


ports = st.integers(min_value=1, max_value=65535)


@given(st.ip_addresses(), ports)
def test_address_port_round_trip(address: ipaddress._BaseAddress, port: int) -> None:
    """
    C{address_port} reads back any IPv4 C{A:P} or IPv6 C{[A]:P} written
    from an address and a port; C{host_port} reads the same.
    """
    text = f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"
    assert address_port(text) == (str(address), port)
    assert host_port(text) == (str(address), port)


@given(st.from_regex(r"\A[a-z][a-z0-9.-]{0,30}\Z"), ports)
def test_host_port_takes_names(name: str, port: int) -> None:
    """
    C{host_port} takes host names too; C{address_port} refuses them.
    """
    assert host_port(f"{name}:{port}") == (name, port)
    with pytest.raises(ValueError, match="not an IP address"):
        address_port(f"{name}:{port}")


@pytest.mark.parametrize(
    "text", ["", "host", "host:", ":80", "host:0", "host:65536", "::1:80", "[::1]", "a:b:80"]
)
def test_host_port_rejects(text: str) -> None:
    """
    C{host_port} refuses anything but C{HOST:PORT} / C{[IPV6]:PORT} with a
    port in 1-65535.
    """
    with pytest.raises(ValueError):
        host_port(text)


@given(st.text())
def test_unescape_round_trip(text: str) -> None:
    """
    Any text, escaped with the four supported escapes, unescapes to its own
    UTF-8 bytes; text without a backslash is sent as it is.
    """
    escaped = (
        text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    )
    assert unescape(escaped) == text.encode("utf-8")
    if "\\" not in text:
        assert unescape(text) == text.encode("utf-8")


@pytest.mark.parametrize("text", ["\\", "a\\", "\\x41", "\\q"])
def test_unescape_rejects_unknown_escapes(text: str) -> None:
    """
    A lone or unknown backslash escape is an error, not silently sent.
    """
    with pytest.raises(ValueError, match="unknown escape"):
        unescape(text)


# --- --explain and conf/demo.sh ----------------------------------------------


def test_explain_lists_backends_that_are_no_candidate(tmp_path: Path) -> None:
    """
    C{--explain} prints the candidates by score, then every backend that is
    no candidate with the reason: the demo's unhealthy, deleted and
    draining backends no longer vanish from the explanation.
    """
    db = tmp_path / "routing.db"
    with sqlite3.connect(db) as conn:
        conn.executescript((ROOT / "conf" / "schema.sql").read_text())
        conn.executescript((ROOT / "conf" / "routing-sample.sql").read_text())
        conn.execute("ALTER TABLE backends ADD COLUMN draining INTEGER DEFAULT 0")
        conn.execute("UPDATE backends SET healthy = 0 WHERE id = 'cdg-1'")
        conn.execute("UPDATE backends SET deleted = 1 WHERE id = 'nrt-1'")
        conn.execute("UPDATE backends SET draining = 1 WHERE id = 'iad-1'")
    conn.close()
    lines = explain(str(db), "90.85.1.1", "sa").splitlines()
    assert [line.split()[:3] for line in lines[3:]] == [
        ["gru-1", "tier", "2"],
        ["cdg-1", "not", "a"],
        ["nrt-1", "not", "a"],
        ["iad-1", "not", "a"],
    ]
    assert lines[4:] == [
        "  cdg-1    not a candidate: unhealthy",
        "  nrt-1    not a candidate: deleted",
        "  iad-1    not a candidate: draining",
    ]


def test_demo_connection_cap_fits_common_descriptor_limits() -> None:
    """
    conf/demo.sh passes a --max-connections whose descriptors (two per
    connection plus 64, see tap.raise_nofile_limit) fit a hard limit of
    1024, so the demo starts without the file descriptor warning that the
    default 10000 gives wherever the hard limit is below 20064.
    """
    lines = (ROOT / "conf" / "demo.sh").read_text().splitlines()
    code = "\n".join(line for line in lines if not line.lstrip().startswith("#"))
    caps = re.findall(r"--max-connections[ =](\d+)", code)
    assert len(caps) == 1
    assert 2 * int(caps[0]) + 64 <= 1024


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_backend_port_taken_is_one_line() -> None:
    """
    When a demo backend's port is taken (the demo already runs), the
    backends exit non-zero with one line naming the address instead of a
    traceback.
    """
    taken, target = serve(Factory.forProtocol(_CloseAtOnce))
    try:
        result = await deferToThread(demo_command, "--base-port", target.rsplit(":", 1)[1])
    finally:
        await maybeDeferred(taken.stopListening)
    line = one_error_line(result)
    assert f"cannot listen on {target}" in line
    assert "Traceback" not in result.stderr
