"""
Three POPs on one etcd cluster (issue 12): three C{twistd -n edgeproxy}
processes, regions C{sa}, C{eu} and C{ap}, each attached first to its own
member of a real three-member etcd cluster (C{tests/etcdkit.py}).

 - a backend registered through one POP's API is routed by the other two
   within 1 s (the watch, not the periodic reload: C{--db-reload} is 300 s);
 - its heartbeats stopping removes it everywhere within the lease TTL
   (etcd deletes the key when the lease runs out);
 - the member a POP is attached to stopped with SIGSTOP: that POP keeps
   serving its last good table, and after SIGCONT it has caught up with
   what changed meanwhile;
 - all of etcd stopped: every POP keeps routing, and a POP restarted
   meanwhile starts from its offline cache (and says so).

The tests share one cluster and one set of POPs, in this order; each uses
its own backend names.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest
from etcdkit import EtcdCluster
from faultkit import Greeter, edgeproxy_argv, edgeproxy_env, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

TOKEN = "three-pops-token-0123456789abcdef"
REGIONS = ("sa", "eu", "ap")
PREFIX = "edgeproxy-three-pops"
#: The lease TTL (--heartbeat-ttl) of registered backends.
TTL = 3.0


class Pop:
    """
    One C{twistd -n edgeproxy} POP on the cluster.
    """

    def __init__(self, region: str, db: str, directory: Path, tokens: Path) -> None:
        self.region = region
        self.db = db
        self.directory = directory
        self.tokens = tokens
        self.listen = free_port()
        self.cache = directory / "etcd-cache.db"
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.admin = ""
        self.log = directory / "edgeproxy.log"
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        self.log = self.directory / f"edgeproxy-{self.starts}.log"
        argv = edgeproxy_argv(
            "--db", self.db, "--region", self.region, "--geoip-db", "none",
            "--listen", f"tcp:{self.listen}:interface=127.0.0.1",
            "--admin", "tcp:0:interface=127.0.0.1",
            "--api-token-file", str(self.tokens), "--health-check", "off",
            "--heartbeat-ttl", str(TTL), "--db-reload", "300",
            "--db-cache", str(self.cache),
        )  # fmt: skip
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=edgeproxy_env(),
                cwd=str(self.directory),
            )
        deadline = time.monotonic() + 60
        while True:
            found = re.search(r"admin listener on 127\.0\.0\.1:(\d+)", self.text())
            if found:
                break
            assert self.proc.poll() is None, self.text()
            assert time.monotonic() < deadline, self.text()
            time.sleep(0.05)
        self.admin = f"http://127.0.0.1:{found.group(1)}"

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def reach(self) -> Optional[str]:
        """
        Connect through this POP: the name of the backend that answers, or
        C{None} when the POP closes the connection without one.
        """
        with socket.create_connection(("127.0.0.1", self.listen), timeout=5) as s:
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(100)
                if not chunk:
                    break
                data += chunk
        return data.decode().strip() or None

    def call(self, method: str, path: str, body: Optional[Dict[str, Any]] = None) -> Any:
        request = urllib.request.Request(
            self.admin + path,
            data=None if body is None else json.dumps(body).encode(),
            method=method,
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as answer:
                return json.loads(answer.read())
        except urllib.error.HTTPError as e:
            raise AssertionError(f"{method} {path}: {e.code} {e.read()!r}") from None


def eventually(check: Callable[[], bool], within: float, what: str) -> float:
    """
    Poll C{check} until it is true; fail after C{within} seconds.  The time
    it took.
    """
    start = time.monotonic()
    while True:
        if check():
            return time.monotonic() - start
        if time.monotonic() - start > within:
            raise AssertionError(f"not within {within} s: {what}")
        time.sleep(0.02)


def everywhere(
    pops: List[Pop], name: Optional[str], within: float, what: str, since: Optional[float] = None
) -> None:
    """
    Wait until every POP of C{pops} routes to the backend C{name} (C{None}:
    to none), all of them within C{within} seconds of C{since} (a
    C{time.monotonic()} taken before the change; default now).
    """
    deadline = (time.monotonic() if since is None else since) + within
    for pop in pops:

        def routed(pop: Pop = pop) -> bool:
            return pop.reach() == name

        eventually(routed, max(deadline - time.monotonic(), 0.0), f"{pop.region} {what}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster.start_new(str(tmp_path_factory.mktemp("etcd")))
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture(scope="module")
def pops(cluster: EtcdCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[List[Pop]]:
    base = tmp_path_factory.mktemp("pops")
    tokens = base / "tokens"
    tokens.write_text(TOKEN + "\n")
    tokens.chmod(0o600)
    started: List[Pop] = []
    try:
        for i, region in enumerate(REGIONS):
            directory = base / region
            directory.mkdir()
            # Each POP talks to its own member first, then the others.
            order = [i, (i + 1) % 3, (i + 2) % 3]
            pop = Pop(region, cluster.url(PREFIX, members=order), directory, tokens)
            pop.start()
            started.append(pop)
        yield started
    finally:
        for pop in started:
            pop.stop()
        for pop in started:
            assert "Traceback" not in pop.text(), pop.text()


def static_backend(cluster: EtcdCluster, name: str, port: int, region: str = "sa") -> None:
    """
    A backend written straight into etcd (no lease: like a row written by
    hand, it never expires).
    """
    value = {
        "app": "web", "region": region, "country": None, "wg_ip": "127.0.0.1", "port": port,
        "healthy": 1, "weight": 1, "soft_limit": 100, "hard_limit": 0, "deleted": 0,
    }  # fmt: skip
    cluster.put(f"/{PREFIX}/backends/{name}", json.dumps(value))


def remove_backend(cluster: EtcdCluster, name: str) -> None:
    cluster.delete(f"/{PREFIX}/backends/{name}")


def test_registration_through_one_pop_is_routed_by_the_others(
    cluster: EtcdCluster, pops: List[Pop]
) -> None:
    """
    A backend registered through the sa POP's API is routed by the eu and
    ap POPs within 1 s, by the watch (their periodic reload is 300 s away);
    deregistering it removes it from both just as fast.
    """
    sa, eu, ap = pops
    backend = Greeter("reg-1")
    try:
        assert eu.reach() is None and ap.reach() is None
        since = time.monotonic()
        sa.call(
            "POST",
            "/api/v1/register",
            {"id": "reg-1", "app": "web", "region": "eu", "ip": "127.0.0.1", "port": backend.port},
        )
        everywhere([eu, ap, sa], "reg-1", 1.0, "routes reg-1", since)
        since = time.monotonic()
        sa.call("DELETE", "/api/v1/backends/reg-1")
        everywhere([eu, ap, sa], None, 1.0, "forgets reg-1", since)
    finally:
        backend.close()


def test_heartbeats_stopping_removes_the_backend_everywhere_within_the_ttl(
    cluster: EtcdCluster, pops: List[Pop]
) -> None:
    """
    A registered backend kept alive by heartbeats through the ap POP stays
    routable at every POP past several TTLs; once its heartbeats stop, every
    POP stops routing it within the lease TTL (plus the watch's delivery).
    """
    ap = pops[2]
    backend = Greeter("beat-1")
    try:
        ap.call(
            "POST",
            "/api/v1/register",
            {"id": "beat-1", "app": "web", "region": "ap", "ip": "127.0.0.1", "port": backend.port},
        )
        everywhere(pops, "beat-1", 1.0, "routes beat-1")
        end = time.monotonic() + 2 * TTL
        while time.monotonic() < end:
            ap.call("POST", "/api/v1/heartbeat/beat-1")
            for pop in pops:
                assert pop.reach() == "beat-1", f"{pop.region} lost a heartbeating backend"
            time.sleep(TTL / 4)
        stopped = time.monotonic()
        everywhere(pops, None, TTL + 1.0, "drops beat-1", stopped)
    finally:
        backend.close()


def test_a_paused_member_keeps_its_pop_serving_and_it_catches_up(
    cluster: EtcdCluster, pops: List[Pop]
) -> None:
    """
    With the eu POP's own member stopped by SIGSTOP, the eu POP keeps
    routing to the backend it knows; a change made meanwhile (through the
    sa POP's member) reaches the eu POP at the latest shortly after SIGCONT.
    """
    sa, eu = pops[0], pops[1]
    old, new = Greeter("pause-old"), Greeter("pause-new")
    try:
        static_backend(cluster, "pause-old", old.port)
        everywhere(pops, "pause-old", 1.0, "routes pause-old")
        cluster.pause(1)
        try:
            for _ in range(20):
                assert eu.reach() == "pause-old"
            # A change while the member is paused, through the sa POP.
            remove_backend(cluster, "pause-old")
            sa.call(
                "POST",
                "/api/v1/register",
                {"id": "pause-new", "app": "web", "region": "eu", "ip": "127.0.0.1",
                 "port": new.port},
            )  # fmt: skip
            eventually(lambda: sa.reach() == "pause-new", 1.0, "sa routes pause-new")
            # Every connection meanwhile is served, by the old table or the new.
            for _ in range(20):
                assert eu.reach() in ("pause-old", "pause-new")
                time.sleep(0.05)
        finally:
            cluster.resume(1)
        eventually(lambda: eu.reach() == "pause-new", 10.0, "eu caught up after SIGCONT")
        sa.call("DELETE", "/api/v1/backends/pause-new")
        everywhere(pops, None, 2.0, "forgets pause-new")
    finally:
        old.close()
        new.close()


def test_without_etcd_the_pops_keep_routing_and_restart_from_their_cache(
    cluster: EtcdCluster, pops: List[Pop]
) -> None:
    """
    With every etcd member stopped, all three POPs keep routing from their
    last good table; the ap POP restarted meanwhile starts from its offline
    cache, says so, and routes as before; once etcd is back, a change
    reaches it again.
    """
    ap = pops[2]
    backend = Greeter("offline-1")
    later = Greeter("offline-2")
    try:
        static_backend(cluster, "offline-1", backend.port)
        everywhere(pops, "offline-1", 1.0, "routes offline-1")
        # The cache is written in a thread after each change: give it a moment.
        time.sleep(1.0)
        cluster.stop_all()
        try:
            for pop in pops:
                for _ in range(10):
                    assert pop.reach() == "offline-1"
            ap.stop()
            ap.start()
            assert re.search(r"starting from the offline cache", ap.text()), ap.text()
            for _ in range(10):
                assert ap.reach() == "offline-1"
        finally:
            cluster.heal()
        remove_backend(cluster, "offline-1")
        static_backend(cluster, "offline-2", later.port)
        everywhere(pops, "offline-2", 15.0, "back on etcd")
        remove_backend(cluster, "offline-2")
    finally:
        backend.close()
        later.close()
