"""
Several workers (SPEC section 11, FAULTS F16 and F23), against real
C{twistd -n edgeproxy --workers N} process groups: a supervisor that owns
the sockets and N worker processes accepting on them.

The backends are greeting servers in a thread of this process: each sends
its id and a newline to every connection and holds it, counting how many it
holds at once (its peak is what a hard limit must bound).  Clients bind
distinct loopback source addresses (127.0.0.2, 127.0.0.3...) so that the
kernel's steering spreads them over the workers.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import pytest
from faultkit import edgeproxy_argv, edgeproxy_env, free_port

ROOT = Path(__file__).resolve().parent.parent
LOCALHOST = "127.0.0.1"

pytestmark = [
    pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="needs SO_REUSEPORT (Linux)"),
    pytest.mark.skipif(not hasattr(socket, "send_fds"), reason="needs socket.send_fds"),
]


class Backends:
    """
    Greeting backends on 127.0.0.1, served by one selectors thread: each
    connection reads C{ID\\n}, then is held until the peer closes.

    @ivar current: Backend id -> connections held now.
    @ivar peak: Backend id -> most connections held at once.
    @ivar total: Backend id -> connections accepted.
    """

    def __init__(self, ids: Sequence[str]) -> None:
        self.ports: Dict[str, int] = {}
        self.current: Dict[str, int] = {i: 0 for i in ids}
        self.peak: Dict[str, int] = {i: 0 for i in ids}
        self.total: Dict[str, int] = {i: 0 for i in ids}
        self._lock = threading.Lock()
        self._selector = selectors.DefaultSelector()
        self._listeners: List[socket.socket] = []
        for backend_id in ids:
            listener = socket.socket()
            listener.bind((LOCALHOST, 0))
            listener.listen(1024)
            listener.setblocking(False)
            self.ports[backend_id] = listener.getsockname()[1]
            self._selector.register(listener, selectors.EVENT_READ, ("listener", backend_id))
            self._listeners.append(listener)
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            for key, _ in self._selector.select(0.1):
                kind, backend_id = key.data
                if kind == "listener":
                    while True:
                        try:
                            conn, _ = key.fileobj.accept()  # type: ignore[union-attr]
                        except (BlockingIOError, InterruptedError):
                            break
                        conn.setblocking(False)
                        with self._lock:
                            self.current[backend_id] += 1
                            self.total[backend_id] += 1
                            self.peak[backend_id] = max(
                                self.peak[backend_id], self.current[backend_id]
                            )
                        try:
                            conn.send(backend_id.encode() + b"\n")
                        except OSError:
                            pass
                        self._selector.register(conn, selectors.EVENT_READ, ("conn", backend_id))
                else:
                    held: socket.socket = key.fileobj  # type: ignore[assignment]
                    conn = held
                    try:
                        data = conn.recv(65536)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        data = b""
                    if not data:
                        self._selector.unregister(conn)
                        conn.close()
                        with self._lock:
                            self.current[backend_id] -= 1

    def stop(self) -> None:
        self._stop = True
        self._thread.join(5)
        for key in list(self._selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self._selector.close()


def write_table(
    path: Path,
    rows: Sequence[Tuple[str, int, int, int]],
    checks: Optional[Dict[str, str]] = None,
    regions: Optional[Dict[str, str]] = None,
) -> None:
    """
    A routing table of (id, port, weight, hard_limit) rows, app C{app},
    region sa, no health checks (the backends count every connection)
    unless C{checks} gives a row's C{health_check}, or C{regions} its
    region.
    """
    checks = checks or {}
    regions = regions or {}
    conn = sqlite3.connect(path)
    try:
        with conn:
            conn.executescript((ROOT / "conf" / "schema.sql").read_text())
            for backend_id, port, weight, hard in rows:
                conn.execute(
                    "INSERT INTO backends (id, app, region, country, wg_ip, port, healthy, weight,"
                    " soft_limit, hard_limit, deleted, proxy_protocol, health_check)"
                    " VALUES (?, 'app', ?, 'BR', '127.0.0.1', ?, 1, ?, 100, ?, 0, 0, ?)",
                    (
                        backend_id,
                        regions.get(backend_id, "sa"),
                        port,
                        weight,
                        hard,
                        checks.get(backend_id, "off"),
                    ),
                )
    finally:
        conn.close()


class Group:
    """
    C{twistd -n edgeproxy --workers N} with an admin listener, logging to a
    file.
    """

    def __init__(
        self,
        tmp_path: Path,
        workers: int,
        listen: str = "tcp:{port}:interface=127.0.0.1",
        extra: Sequence[str] = (),
    ) -> None:
        self.port = free_port()
        self.admin = free_port()
        self.log = tmp_path / "edgeproxy.log"
        argv = edgeproxy_argv(
            "--db",
            str(tmp_path / "routing.db"),
            "--listen",
            listen.format(port=self.port),
            "--admin",
            f"tcp:{self.admin}:interface=127.0.0.1",
            "--geoip-db",
            "none",
            "--region",
            "sa",
            "--workers",
            str(workers),
            *extra,
        )
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=edgeproxy_env(), cwd=tmp_path
            )
        self.workers = workers
        self.seen_pids: set[int] = set()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def health(self) -> Dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/health", timeout=5) as r:
            return json.loads(r.read())  # type: ignore[no-any-return]

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/metrics", timeout=5) as r:
            return r.read().decode()  # type: ignore[no-any-return]

    def wait(self, condition: Any, what: str, timeout: float = 60.0) -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"edgeproxy exited ({self.proc.returncode}):\n{self.text()}")
            try:
                last = condition()
            except OSError:
                last = None
            if last:
                return last
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what} (last {last!r}):\n{self.text()}")

    def pids(self) -> List[Optional[int]]:
        return [w["pid"] for w in self.health()["workers"]]

    def wait_ready(self) -> List[int]:
        """
        Wait until every worker runs and reports; their pids.
        """

        def ready() -> Optional[List[int]]:
            workers = self.health()["workers"]
            if all(w["pid"] and w["open_connections"] is not None for w in workers):
                return [w["pid"] for w in workers]
            return None

        pids: List[int] = self.wait(ready, "every worker to report")
        self.seen_pids.update(pids)
        return pids

    def stop(self) -> Optional[int]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


@pytest.fixture
def group_factory(tmp_path: Path) -> Iterator[Any]:
    made: List[Group] = []

    def make(*args: Any, **kwargs: Any) -> Group:
        g = Group(tmp_path, *args, **kwargs)
        made.append(g)
        return g

    yield make
    for g in made:
        g.stop()
        # No worker outlives its supervisor.
        leftovers = [p for p in _children_of(g) if _alive(p)]
        for pid in leftovers:
            os.kill(pid, signal.SIGKILL)
        assert not leftovers, f"workers {leftovers} outlived the supervisor"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def _children_of(g: Group) -> List[int]:
    return sorted(g.seen_pids)


def dial(
    port: int, source: str = LOCALHOST, header: bytes = b"", timeout: float = 20.0
) -> Tuple[socket.socket, str]:
    """
    Connect from C{source} (sending C{header} first), read the backend's
    greeting; the socket and the backend id it names (C{""}: closed without
    one).
    """
    s = socket.socket()
    s.settimeout(timeout)
    s.bind((source, 0))
    s.connect((LOCALHOST, port))
    if header:
        s.sendall(header)
    line = b""
    while not line.endswith(b"\n"):
        chunk = s.recv(64)
        if not chunk:
            break
        line += chunk
    return s, line.decode().strip()


def sources(n: int, start: int = 2) -> List[str]:
    """
    C{n} distinct loopback source addresses.
    """
    return [f"127.0.{(i // 250)}.{i % 250 + 1}" for i in range(start, start + n)]


def owners(addresses: Sequence[str], workers: int) -> Dict[int, List[str]]:
    from edgeproxy.net.steering import owner_of

    out: Dict[int, List[str]] = {}
    for a in addresses:
        out.setdefault(owner_of(a, workers), []).append(a)
    return out


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("workers", [2, 3])
def test_hard_limit_exact_across_workers(tmp_path: Path, group_factory: Any, workers: int) -> None:
    """
    200 clients connecting at once through N workers to a preferred backend
    with hard_limit 10: the backend never holds more than 10 connections,
    it does hold 10, and the other 190 go to the next-best backend; the
    clients were spread over every worker; when they all close, the shared
    counts are back to zero.
    """
    backends = Backends(["near", "far"])
    try:
        write_table(
            tmp_path / "routing.db",
            [("near", backends.ports["near"], 100, 10), ("far", backends.ports["far"], 1, 0)],
        )
        group = group_factory(workers, extra=("--max-connections", "1000"))
        group.wait_ready()
        addresses = sources(200)
        assert len(owners(addresses, workers)) == workers
        with ThreadPoolExecutor(max_workers=64) as pool:
            results = list(pool.map(lambda a: dial(group.port, a), addresses))
        try:
            names = [name for _, name in results]
            assert names.count("near") == 10, names
            assert names.count("far") == 190, names
            assert backends.peak["near"] == 10

            # Every worker proxied some of them (as their reports say, a
            # second at most after the fact).
            def reported() -> Optional[List[int]]:
                counts = [w["open_connections"] for w in group.health()["workers"]]
                return counts if sum(counts) == 200 else None

            per_worker = group.wait(reported, "every worker to report its connections")
            assert all(per_worker), per_worker

            # The status page shows the whole group: connections and bindings
            # (the supervisor reads the backends' counts every second, so
            # they may lag the bindings by that much).
            def status() -> Optional[Dict[str, Any]]:
                url = f"http://127.0.0.1:{group.admin}/api/v1/status"
                with urllib.request.urlopen(url, timeout=5) as r:
                    body: Dict[str, Any] = json.loads(r.read())
                near = [b["connections"] for b in body["backends"] if b["id"] == "near"]
                return body if body["bindings"] == 200 and near == [10] else None

            body = group.wait(status, "the status page to show 200 bindings and near's 10")
            assert body["connections"]["open"] == 200
            # The supervisor's metrics show the group's counts.
            group.wait(
                lambda: 'edgeproxy_backend_connections{backend="near"} 10.0' in group.metrics(),
                "the group's count of the near backend",
            )
            assert group.health()["open_connections"] == 200
        finally:
            for s, _ in results:
                s.close()

        def drained() -> bool:
            held = [
                line
                for line in group.metrics().splitlines()
                if line.startswith("edgeproxy_backend_connections{") and not line.endswith(" 0.0")
            ]
            return group.health()["open_connections"] == 0 and not held

        group.wait(drained, "the shared counts to drop to zero")
        assert backends.peak["near"] == 10
    finally:
        backends.stop()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_first_connections_of_one_client_through_workers_share_one_binding(
    tmp_path: Path, group_factory: Any
) -> None:
    """
    F16 across workers: 100 simultaneous first connections that a load
    balancer sends with one client's PROXY header reach different workers
    (the kernel spreads them by the balancer's ports), and all end on one
    backend: the workers that do not own the client pass the connection to
    the one that does.
    """
    ids = ["b1", "b2", "b3"]
    backends = Backends(ids)
    try:
        write_table(tmp_path / "routing.db", [(i, backends.ports[i], 1, 0) for i in ids])
        group = group_factory(2, listen="haproxy:tcp:{port}:interface=127.0.0.1")
        group.wait_ready()
        header = b"PROXY TCP4 203.0.113.7 192.0.2.1 40000 443\r\n"
        with ThreadPoolExecutor(max_workers=100) as pool:
            results = list(pool.map(lambda _: dial(group.port, header=header), range(100)))
        try:
            names = {name for _, name in results}
            assert len(names) == 1 and names <= set(ids), names
        finally:
            for s, _ in results:
                s.close()

        def handoffs() -> Optional[Dict[str, float]]:
            found = {
                line.split('"')[1]: float(line.split()[-1])
                for line in group.metrics().splitlines()
                if line.startswith("edgeproxy_worker_handoffs_total{")
            }
            return found if found.get("received") else None

        # Connections were passed between workers, and none failed.
        counts = group.wait(handoffs, "handoffs to be reported")
        assert counts["sent"] == counts["received"] > 0, counts
        assert counts["failed"] == counts["dropped"] == 0, counts
    finally:
        backends.stop()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_killed_worker_is_replaced_and_the_others_keep_serving(
    tmp_path: Path, group_factory: Any
) -> None:
    """
    F23: a worker killed with SIGKILL while it holds connections is
    replaced (a new pid at its index, a restart counted); the other worker
    serves its clients all along; the dead worker's connections leave the
    shared counts (no leak: a backend with hard_limit 4 that the dead one
    filled takes 4 new connections afterwards); clients it owns are served
    by the replacement.
    """
    backends = Backends(["only"])
    try:
        write_table(tmp_path / "routing.db", [("only", backends.ports["only"], 1, 4)])
        group = group_factory(2)
        pids = group.wait_ready()
        by_owner = owners(sources(40), 2)
        victim, survivor = by_owner[0], by_owner[1]
        held = [dial(group.port, a) for a in victim[:4]]
        assert [name for _, name in held] == ["only"] * 4
        # Full now: the survivor's clients are refused (hard limit, shared).
        s, name = dial(group.port, survivor[0])
        s.close()
        assert name == ""
        group.wait(lambda: group.health()["open_connections"] == 4, "4 open connections")
        os.kill(pids[0], signal.SIGKILL)
        # The survivor keeps serving: its clients get the 4 slots the dead
        # worker's connections held.
        replaced = group.wait(
            lambda: ((p := group.pids())[0] not in (None, pids[0]) and p) or None,
            "a replacement for worker 0",
        )
        group.seen_pids.update(p for p in replaced if p)
        assert replaced[1] == pids[1]
        served = [dial(group.port, a) for a in survivor[1:5]]
        try:
            assert [name for _, name in served] == ["only"] * 4
        finally:
            for s, _ in served:
                s.close()
        for s, _ in held:
            s.close()
        group.wait_ready()
        # The replacement serves the clients it owns.
        again = [dial(group.port, a) for a in victim[4:8]]
        try:
            assert [name for _, name in again] == ["only"] * 4
        finally:
            for s, _ in again:
                s.close()
        assert group.health()["workers"][0]["restarts"] == 1
        assert "worker 0 (pid" in group.text() and "starting a replacement" in group.text()
    finally:
        backends.stop()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_sigterm_drains_every_worker(tmp_path: Path, group_factory: Any) -> None:
    """
    F15 with workers: on SIGTERM to the supervisor the port refuses new
    connections at once, the connections every worker holds stay open
    until the shutdown deadline, then they are closed and the supervisor
    and every worker exit, the supervisor with status 0.
    """
    backends = Backends(["only"])
    try:
        write_table(tmp_path / "routing.db", [("only", backends.ports["only"], 1, 0)])
        group = group_factory(2, extra=("--shutdown-timeout", "4"))
        pids = group.wait_ready()
        by_owner = owners(sources(40), 2)
        held = [dial(group.port, a) for a in by_owner[0][:3] + by_owner[1][:3]]
        assert [name for _, name in held] == ["only"] * 6
        group.wait(
            lambda: all(w["open_connections"] == 3 for w in group.health()["workers"]),
            "3 connections on each worker",
        )
        sent = time.monotonic()
        group.proc.send_signal(signal.SIGTERM)
        refused = None
        while time.monotonic() - sent < 5:
            probe = socket.socket()
            probe.settimeout(1.0)
            code = probe.connect_ex((LOCALHOST, group.port))
            probe.close()
            if code != 0:
                refused = time.monotonic() - sent
                break
            time.sleep(0.05)
        assert refused is not None and refused < 2.0, refused
        time.sleep(max(0.0, 1.5 - refused))
        for s, _ in held:
            s.settimeout(0)
            with pytest.raises(BlockingIOError):
                s.recv(1)  # still open: nothing to read, no EOF
        status = group.proc.wait(60)
        assert status == 0, group.text()[-4000:]
        for s, _ in held:
            # Closed at the deadline (aborted, as with one process).
            s.settimeout(5)
            try:
                assert s.recv(1) == b""
            except ConnectionResetError:
                pass
            s.close()
        assert not [p for p in pids if _alive(p)]
        text = group.text()
        assert text.count("shutdown deadline of 4.0s reached: closed 3 connections") == 2, text
    finally:
        backends.stop()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_handed_off_connections_fit_the_global_cap(tmp_path: Path, group_factory: Any) -> None:
    """
    A connection passed to the worker that owns its client gives back the
    sender's slot of the global cap before the owner takes one: with 29 of
    --max-connections 30 held, a 30th connection is served every time,
    however often it is handed over (no double count at the cap).
    """
    from edgeproxy.net.steering import owner_of

    backends = Backends(["only"])
    try:
        write_table(tmp_path / "routing.db", [("only", backends.ports["only"], 1, 0)])
        group = group_factory(
            2,
            listen="haproxy:tcp:{port}:interface=127.0.0.1",
            extra=("--max-connections", "30"),
        )
        group.wait_ready()
        clients = [f"198.51.100.{i}" for i in range(1, 60)]
        held_client = next(c for c in clients if owner_of(c, 2) == 0)
        other_client = next(c for c in clients if owner_of(c, 2) == 1)

        def header(client: str) -> bytes:
            return f"PROXY TCP4 {client} 192.0.2.1 40000 443\r\n".encode()

        held = [dial(group.port, header=header(held_client)) for _ in range(29)]
        try:
            assert [name for _, name in held] == ["only"] * 29
            for _ in range(40):
                s, name = dial(group.port, header=header(other_client))
                s.close()
                assert name == "only"
                group.wait(lambda: group.health()["open_connections"] <= 29, "the 30th to close")
        finally:
            for s, _ in held:
                s.close()

        def handoffs() -> Optional[float]:
            for line in group.metrics().splitlines():
                if line.startswith('edgeproxy_worker_handoffs_total{result="received"}'):
                    value = float(line.split()[-1])
                    return value if value >= 10 else None
            return None

        # The kernel spread the 40 over both workers: about half were passed.
        group.wait(handoffs, "at least 10 handoffs to be reported")
    finally:
        backends.stop()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_health_checks_run_once_and_hold_for_every_worker(
    tmp_path: Path, group_factory: Any
) -> None:
    """
    The supervisor checks the backends (the workers do not) and its
    verdicts hold in every worker: a preferred backend that accepts TCP but
    fails its HTTP check takes no client through any worker, and it sees
    the probes of one checker only.
    """
    backends = Backends(["sick", "well"])
    try:
        write_table(
            tmp_path / "routing.db",
            [("sick", backends.ports["sick"], 100, 0), ("well", backends.ports["well"], 1, 0)],
            checks={"sick": "http:/health"},
            # Closer: sick would take every client if a worker thought it up.
            regions={"well": "eu"},
        )
        group = group_factory(
            2, extra=("--health-interval", "0.5", "--health-timeout", "0.3", "--health-fall", "1")
        )
        group.wait_ready()
        group.wait(
            lambda: 'edgeproxy_backend_up{backend="sick"} 0.0' in group.metrics(),
            "the sick backend to be marked down",
        )
        checked = backends.total["sick"]
        addresses = sources(40)
        assert len(owners(addresses, 2)) == 2
        results = [dial(group.port, a) for a in addresses]
        try:
            assert [name for _, name in results] == ["well"] * 40
        finally:
            for s, _ in results:
                s.close()
        # Only the supervisor's checks reached it: one every half second,
        # not one per worker.
        time.sleep(2.0)
        probes = backends.total["sick"] - checked
        assert 1 <= probes <= 6, probes
    finally:
        backends.stop()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_workers_stop_when_the_supervisor_dies(tmp_path: Path, group_factory: Any) -> None:
    """
    A supervisor killed with SIGKILL leaves no orphans: each worker sees its
    control connection close and shuts down by itself.
    """
    backends = Backends(["only"])
    try:
        write_table(tmp_path / "routing.db", [("only", backends.ports["only"], 1, 0)])
        group = group_factory(2, extra=("--shutdown-timeout", "2"))
        pids = group.wait_ready()
        group.proc.kill()
        group.proc.wait(10)
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids)
    finally:
        backends.stop()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_admin_state_holds_in_every_worker(tmp_path: Path, group_factory: Any) -> None:
    """
    An admin state set in the state file (edgeproxy-ctl state set, as when
    the API is unreachable) reaches every worker: a preferred backend put in
    maint takes no client through any worker, and back to ready it takes
    new ones again.
    """
    backends = Backends(["main", "spare"])
    try:
        write_table(
            tmp_path / "routing.db",
            [("main", backends.ports["main"], 1, 0), ("spare", backends.ports["spare"], 1, 0)],
            # The POP's region: main is closer, whatever the load.
            regions={"spare": "eu"},
        )
        state = tmp_path / "state.json"
        group = group_factory(2, extra=("--state-file", str(state)))
        group.wait_ready()
        addresses = sources(30)
        assert len(owners(addresses, 2)) == 2

        def ctl(*args: str) -> None:
            subprocess.run(
                [sys.executable, "-m", "edgeproxy.ctl", "--state-file", str(state), *args],
                check=True,
                env=edgeproxy_env(),
                capture_output=True,
            )

        def reached(addresses: Sequence[str]) -> List[str]:
            results = [dial(group.port, a) for a in addresses]
            for s, _ in results:
                s.close()
            return [name for _, name in results]

        ctl("state", "set", "main", "maint")
        group.wait(lambda: reached(addresses) == ["spare"] * 30, "every client to reach spare")
        ctl("state", "set", "main", "ready")
        # Those clients stay bound to spare: new ones (new at each try, as
        # a try before the change binds its clients) go to main.
        tries = iter(range(100, 10_000, 30))

        def fresh() -> bool:
            batch = sources(30, start=next(tries))
            return len(owners(batch, 2)) == 2 and reached(batch) == ["main"] * 30

        group.wait(fresh, "new clients to reach main again")
    finally:
        backends.stop()
