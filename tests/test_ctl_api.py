"""
edgeproxy-ctl against a real C{twistd -n edgeproxy}'s admin API (issue 9
items 1, 2, 3 and 5): register a backend and reach it through the proxy on
the very next connection, heartbeat, list, drain/maint/ready, reload,
explain, deregister; the token rules as the command line meets them; and a
public admin address refused at startup without a token file.
"""

from __future__ import annotations

import io
import json
import re
import socket
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest
from faultkit import Greeter, edgeproxy_argv, edgeproxy_env, free_port

from edgeproxy import ctl

ROOT = Path(__file__).resolve().parent.parent
ADMIN_TOKEN = "admin-token-0123456789abcdef"
REGISTER_TOKEN = "register-token-0123456789ab"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[dict[str, object]]:
    db = tmp_path / "routing.db"
    with sqlite3.connect(db) as conn:
        conn.executescript((ROOT / "conf" / "schema.sql").read_text())
    conn.close()
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{ADMIN_TOKEN}\n{REGISTER_TOKEN} register\n")
    tokens.chmod(0o600)
    admin_token = tmp_path / "admin.token"
    admin_token.write_text(ADMIN_TOKEN + "\n")
    register_token = tmp_path / "register.token"
    register_token.write_text(REGISTER_TOKEN + "\n")
    listen = free_port()
    log = tmp_path / "edgeproxy.log"
    argv = edgeproxy_argv(
        "--db", str(db), "--region", "sa", "--geoip-db", "none",
        "--listen", f"tcp:{listen}:interface=127.0.0.1",
        "--admin", "tcp:0:interface=127.0.0.1",
        "--api-token-file", str(tokens), "--health-check", "off",
    )  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=edgeproxy_env(), cwd=str(tmp_path)
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            found = re.search(r"admin listener on 127\.0\.0\.1:(\d+)", log.read_text())
            if found:
                break
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield {
            "url": f"http://127.0.0.1:{found.group(1)}",
            "listen": listen,
            "admin_token": str(admin_token),
            "register_token": str(register_token),
            "log": log,
            "db": db,
        }
    finally:
        proc.terminate()
        proc.wait(30)
        assert "Traceback" not in log.read_text(), log.read_text()


def run(url: str, *argv: str, token: str | None = None) -> tuple[int, str]:
    out = io.StringIO()
    prefix = ["--admin", url] + (["--token-file", token] if token else [])
    code = ctl.main([*prefix, *argv], out)
    return code, out.getvalue()


def ask(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.settimeout(5)
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(100)
            if not chunk:
                break
            data += chunk
        return data


def test_register_route_operate_and_deregister(proxy: dict[str, object], capsys) -> None:
    """
    A backend registered with a register-only token is reached on the very
    next connection; it heartbeats; `backends` lists it with its state and
    load; `drain`/`ready` need the admin token; `reload` and `explain`
    work; `deregister` removes it and the next connection finds no backend.
    """
    url, listen = str(proxy["url"]), int(proxy["listen"])  # type: ignore[call-overload]
    greeter = Greeter("web-1")
    try:
        assert ask(listen) == b""  # an empty table: no backend
        code, out = run(
            url, "register", "web-1", "--app", "demo", "--region", "sa", "--country", "BR",
            "--ip", "127.0.0.1", "--port", str(greeter.port),
            token=str(proxy["register_token"]),
        )  # fmt: skip
        assert code == 0, capsys.readouterr().err
        assert out.strip() == "web-1: registered"
        assert ask(listen) == b"web-1\n"
        assert run(url, "heartbeat", "web-1", token=str(proxy["register_token"]))[0] == 0
        code, out = run(url, "--json", "backends")
        rows = json.loads(out)
        rows = rows.get("backends", rows) if isinstance(rows, dict) else rows
        assert [r["id"] for r in rows] == ["web-1"]
        code, out = run(url, "backends")
        assert code == 0 and "web-1" in out and "backend" in out.splitlines()[0]
        # Admin endpoints refuse a register-only token, and no token at all.
        assert run(url, "drain", "web-1", token=str(proxy["register_token"]))[0] == 1
        assert "403" in capsys.readouterr().err
        assert run(url, "drain", "web-1")[0] == 1
        assert "401" in capsys.readouterr().err
        code, out = run(url, "drain", "web-1", "--reason", "test", token=str(proxy["admin_token"]))
        assert (code, out.strip()) == (0, "web-1: drain")
        code, out = run(url, "explain", "127.0.0.1", "--app", "demo")
        assert code == 0 and "web-1" in out and "admin drain" in out
        assert run(url, "ready", "web-1", token=str(proxy["admin_token"]))[0] == 0
        code, out = run(url, "reload", token=str(proxy["admin_token"]))
        assert code == 0 and out.startswith("routing table reloaded")
        code, out = run(url, "deregister", "web-1", token=str(proxy["register_token"]))
        assert (code, out.strip()) == (0, "web-1: deregistered")
        assert ask(listen) == b""
        # Nothing is left in the table.
        with sqlite3.connect(str(proxy["db"])) as conn:
            assert conn.execute("SELECT count(*) FROM backends").fetchone()[0] == 0
        conn.close()
    finally:
        greeter.close()


def test_ctl_reports_errors_with_a_non_zero_status(proxy: dict[str, object], capsys) -> None:
    """
    A bad registration is refused with the API's own reason on stderr and
    status 1; so is an unreachable admin listener.
    """
    url = str(proxy["url"])
    code, _ = run(
        url, "register", "bad", "--app", "demo", "--region", "sa",
        "--ip", "169.254.169.254", "--port", "80", token=str(proxy["register_token"]),
    )  # fmt: skip
    assert code == 1
    assert "metadata" in capsys.readouterr().err
    assert run("http://127.0.0.1:9", "backends")[0] == 1
    assert "cannot reach" in capsys.readouterr().err


def test_public_admin_without_tokens_refused_at_startup(tmp_path: Path) -> None:
    """
    The admin listener refuses to start on a non-loopback address without
    a token file: twistd stops with one line naming --admin.
    """
    db = tmp_path / "routing.db"
    argv = edgeproxy_argv(
        "--db", str(db), "--listen", f"tcp:{free_port()}:interface=127.0.0.1",
        "--admin", f"tcp:{free_port()}:interface=0.0.0.0",
    )  # fmt: skip
    result = subprocess.run(
        argv, capture_output=True, text=True, env=edgeproxy_env(), cwd=str(tmp_path), timeout=60
    )
    assert result.returncode != 0
    assert "--admin" in result.stdout + result.stderr
    assert "token" in (result.stdout + result.stderr).lower()
