"""
A real PostgreSQL server for the tests: C{initdb} and C{pg_ctl} in a
temporary directory, listening only on a Unix socket in that directory
(C{listen_addresses=''}), with password (SCRAM) authentication so that a
wrong password is a real refusal.

The binaries are found on C{PATH} or in Debian's
C{/usr/lib/postgresql/<version>/bin}; without them the tests skip with the
install command.  PostgreSQL refuses to run as root: as root (CI), the
server runs as the C{postgres} user Debian's package creates (or
C{nobody}), through C{runuser}, with the directory handed to that user.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import urllib.parse
from typing import Any, List, Optional

import pytest

SKIP_REASON = "PostgreSQL server binaries not found: apt-get install postgresql"

USER = "edgeproxy"
PASSWORD = "pg-test-secret-7f3a"


def find_binary(name: str) -> Optional[str]:
    """
    The path of a PostgreSQL server program, or C{None}.
    """
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(
        glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0,
    )
    return candidates[-1] if candidates else None


def _runAs() -> List[str]:
    """
    The command prefix that runs a server program as an unprivileged user
    when we are root; empty otherwise.
    """
    if os.geteuid() != 0:
        return []
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        runuser = shutil.which("runuser")
        if runuser:
            return [runuser, "-u", name, "--"]
        setpriv = shutil.which("setpriv")
        if setpriv:
            entry = pwd.getpwnam(name)
            return [
                setpriv,
                f"--reuid={entry.pw_uid}",
                f"--regid={entry.pw_gid}",
                "--clear-groups",
            ]
    pytest.skip("running as root without a postgres or nobody user to run PostgreSQL as")


class PostgresServer:
    """
    One PostgreSQL cluster in a temporary directory.

    @ivar directory: The cluster's directory (data, socket, log).
    @ivar socketDir: Where the Unix socket is.
    """

    def __init__(self) -> None:
        initdb = find_binary("initdb")
        pg_ctl = find_binary("pg_ctl")
        if initdb is None or pg_ctl is None:
            pytest.skip(SKIP_REASON)
        self.initdb = initdb
        self.pg_ctl = pg_ctl
        self.prefix = _runAs()
        self.directory = tempfile.mkdtemp(prefix="edgeproxy-pg-")
        self.socketDir = self.directory
        self.data = os.path.join(self.directory, "data")
        self.log = os.path.join(self.directory, "server.log")
        self._databases = 0

    def _chown(self) -> None:
        if self.prefix:
            user = self.prefix[2] if self.prefix[0].endswith("runuser") else None
            if user is None:
                uid = int(self.prefix[1].split("=")[1])
                gid = int(self.prefix[2].split("=")[1])
            else:
                entry = pwd.getpwnam(user)
                uid, gid = entry.pw_uid, entry.pw_gid
            for root, _dirs, files in os.walk(self.directory):
                os.chown(root, uid, gid)
                for name in files:
                    os.chown(os.path.join(root, name), uid, gid)

    def start(self) -> None:
        """
        C{initdb}, then C{pg_ctl start} (waiting until it accepts).
        """
        pwfile = os.path.join(self.directory, "pwfile")
        with open(pwfile, "w") as f:
            f.write(PASSWORD + "\n")
        self._chown()
        self._run(
            self.initdb,
            "-D",
            self.data,
            "-U",
            USER,
            f"--pwfile={pwfile}",
            "--auth=scram-sha-256",
            "-E",
            "UTF8",
            "--no-sync",
        )
        os.unlink(pwfile)
        options = (
            f"-c listen_addresses='' -k {self.socketDir} -c fsync=off"
            " -c synchronous_commit=off -c full_page_writes=off"
        )
        self._run(self.pg_ctl, "-D", self.data, "-l", self.log, "-o", options, "-w", "start")

    def stop(self) -> None:
        """
        Stop the server and remove its directory.
        """
        try:
            self._run(self.pg_ctl, "-D", self.data, "-m", "immediate", "-w", "stop")
        except Exception:
            pass
        shutil.rmtree(self.directory, ignore_errors=True)

    def _run(self, *argv: str) -> None:
        result = subprocess.run(
            [*self.prefix, *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=self.directory,
            timeout=120,
        )
        if result.returncode != 0:
            log = ""
            if os.path.exists(self.log):
                with open(self.log) as f:
                    log = f.read()
            raise RuntimeError(
                f"{argv[0]} failed ({result.returncode}): {result.stdout.decode()}\n{log}"
            )

    def url(
        self, database: str = "postgres", password: Optional[str] = PASSWORD, user: str = USER
    ) -> str:
        """
        A libpq URL for C{database} on this server's Unix socket.
        """
        host = urllib.parse.quote(self.socketDir, safe="")
        secret = f":{urllib.parse.quote(password, safe='')}" if password is not None else ""
        return f"postgresql://{user}{secret}@{host}/{database}"

    def connect(self, database: str = "postgres", **extra: Any) -> Any:
        """
        A psycopg connection (autocommit) to C{database}.
        """
        import psycopg

        return psycopg.connect(self.url(database), autocommit=True, **extra)

    def createDatabase(self, schema: bool = True) -> str:
        """
        A new empty database, with the project's schema unless told not to.

        @return: Its name.
        """
        self._databases += 1
        name = f"edge{os.getpid()}_{self._databases}"
        with self.connect() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        if schema:
            from edgeproxy.stores.postgres import schema_sql

            with self.connect(name) as conn:
                conn.execute(schema_sql())
        return name


def backend_row(backend_id: str, port: int, **columns: Any) -> dict[str, Any]:
    """
    A valid row of the C{backends} table, with C{columns} overriding.
    """
    row: dict[str, Any] = {
        "id": backend_id,
        "app": None,
        "region": "sa",
        "country": None,
        "wg_ip": "127.0.0.1",
        "port": port,
        "healthy": 1,
        "weight": 1,
        "soft_limit": 100,
        "hard_limit": 0,
        "deleted": 0,
    }
    row.update(columns)
    return row


def insert(conn: Any, row: dict[str, Any]) -> None:
    """
    Insert C{row} into C{backends}.
    """
    from psycopg import sql

    conn.execute(
        sql.SQL("INSERT INTO backends ({}) VALUES ({})").format(
            sql.SQL(", ").join(sql.Identifier(c) for c in row),
            sql.SQL(", ").join(sql.Placeholder() for _ in row),
        ),
        list(row.values()),
    )
