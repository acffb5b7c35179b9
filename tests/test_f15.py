"""
F15 (FAULTS.md): graceful shutdown with 1,000 open connections, against a
real C{twistd -n edgeproxy} subprocess (issue 8 item 5).

On SIGTERM the proxy stops accepting at once, lets open connections go on
until C{--shutdown-timeout}, closes the rest, logs how many it cut, and
exits with status 0.  Uses the greeting backend, the proxy runner and the
socket crowd of C{test_f7}.
"""

from __future__ import annotations

import errno
import re
import select
import signal
import socket
import time
from pathlib import Path

import pytest
from test_f7 import LOCALHOST, Backend, Crowd, Proxy, no_errors_in, write_table

CONNECTIONS = 1000
SHUTDOWN_TIMEOUT = 4.0


def _closed(s: socket.socket) -> bool:
    """
    Whether the proxy closed this client socket (EOF or reset).

    poll, not select: the thousand sockets may have descriptors past
    select's FD_SETSIZE (1024), as on PyPy, where sockets that earlier
    tests dropped stay open until the garbage collector runs.
    """
    poller = select.poll()
    poller.register(s, select.POLLIN)
    if not poller.poll(0):
        return False
    try:
        return s.recv(16, socket.MSG_PEEK) == b""
    except OSError:
        return True


@pytest.fixture
def backend():
    b = Backend()
    try:
        yield b
    finally:
        b.stop()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_sigterm_with_1000_open_connections(tmp_path: Path, backend: Backend) -> None:
    """
    F15: 1,000 proxied connections are open; on SIGTERM new connections are
    refused at once, the open ones stay open (half of them finish by
    themselves meanwhile), and at the shutdown deadline the other 500 are
    closed, the count is logged, and twistd exits 0.
    """
    db = tmp_path / "routing.db"
    write_table(db, backend.port)
    log = tmp_path / "edgeproxy.log"
    proxy = Proxy(
        db,
        log,
        max_connections=CONNECTIONS + 100,
        extra=("--shutdown-timeout", str(SHUTDOWN_TIMEOUT)),
    )
    crowd = Crowd(proxy.port)
    try:
        proxy.wait_ready()
        crowd.dial(CONNECTIONS, timeout=90.0)
        assert len(crowd.greeted) == CONNECTIONS, (crowd.refused, crowd.pending)
        sent = time.monotonic()
        proxy.proc.send_signal(signal.SIGTERM)
        # Stop accepting at once: within a second a new connect is refused.
        refused_after = None
        probes = 0
        while time.monotonic() - sent < 5.0:
            probes += 1
            probe = socket.socket()
            code = probe.connect_ex((LOCALHOST, proxy.port))
            probe.close()
            if code == errno.ECONNREFUSED:
                refused_after = time.monotonic() - sent
                break
            time.sleep(0.02)
        assert refused_after is not None and refused_after < 2.0
        # The open connections are not cut before the deadline...
        time.sleep(1.0)
        assert not any(_closed(s) for s in crowd.greeted)
        # ...half of them finish meanwhile...
        for _ in range(CONNECTIONS // 2):
            crowd.close_one()
        # ...and the rest are closed at the deadline, then the proxy exits 0.
        status = proxy.proc.wait(SHUTDOWN_TIMEOUT + 30)
        exited_after = time.monotonic() - sent
        assert status == 0, proxy.text()[-5000:]
        assert SHUTDOWN_TIMEOUT - 0.5 <= exited_after <= SHUTDOWN_TIMEOUT + 20
        assert all(_closed(s) for s in crowd.greeted)
        text = proxy.text()
        # (A probe that connected just before the listener closed may be
        # counted too: it closes at once.)
        waiting = re.findall(r"for (\d+) open connections", text)
        cut = re.findall(r"reached: closed (\d+) connections", text)
        assert len(waiting) == 1 and CONNECTIONS <= int(waiting[0]) <= CONNECTIONS + probes, text
        assert len(cut) == 1 and CONNECTIONS // 2 <= int(cut[0]) <= CONNECTIONS // 2 + probes
        no_errors_in(text)
    finally:
        crowd.close()
        proxy.stop()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sigterm_exits_as_soon_as_connections_finish(tmp_path: Path, backend: Backend) -> None:
    """
    When every open connection finishes before the deadline the proxy
    exits then, without waiting for the deadline, cutting nothing.
    """
    db = tmp_path / "routing.db"
    write_table(db, backend.port)
    proxy = Proxy(db, tmp_path / "edgeproxy.log", 100, extra=("--shutdown-timeout", "60"))
    crowd = Crowd(proxy.port)
    try:
        proxy.wait_ready()
        crowd.dial(20, timeout=30.0)
        assert len(crowd.greeted) == 20
        sent = time.monotonic()
        proxy.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        crowd.close()
        assert proxy.proc.wait(30) == 0
        assert time.monotonic() - sent < 30
        text = proxy.text()
        assert "all connections finished" in text
        assert "shutdown deadline" not in text
        no_errors_in(text)
    finally:
        crowd.close()
        proxy.stop()
