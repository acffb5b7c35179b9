#!/usr/bin/env python3
"""
edgeproxy benchmark: edgeproxy (routing on) against HAProxy, nginx stream and
a direct connection, on one pinned core each.

    python bench/run.py [--quick] [--rounds N] [--duration S] [--json out.json]
                        [--peers edgeproxy,haproxy,nginx-stream,direct]
                        [--variant NAME:KEY=VAL,...] [--pypy PATH] [--workers 1,2]

What it does (everything on 127.0.0.1, every process cleaned up on exit or
Ctrl-C, every loop bounded in count and time):

  - starts nginx (1 worker, tiny static response, keepalive) as the HTTP
    backend and C{iperf3 -s} as the bulk backend, pinned to core 0 with the
    load generators (wrk, iperf3 -c, the idle-connection client);
  - starts each proxy in turn, fresh for every round, pinned to core 1:
      edgeproxy     the full proxy: a routing.db with several rows, a geo
                    lookup for every client (127.0.0.0/8 -> BR override),
                    bindings, counters, one access-log line per connection to a
                    file (C{--access-log}, written in batches off the
                    reactor thread; C{accesslog=0} for the process log's line
                    instead);
      haproxy       mode tcp, nbthread 1, no logging;
      nginx-stream  the stream module, 1 worker, no logging;
      direct        no proxy at all (the floor for latency);
      twisted-portforward  (opt-in) Twisted's own bare forwarder;
      edgeproxy-pypy  (C{--pypy PATH}) the edgeproxy column's proxy, settings
                    and all, run by another interpreter, e.g. PyPy: the
                    C{python} knob of a variant (C{--variant
                    edgeproxy-pypy:python=PATH}), with C{gcnursery=16M}
                    (PYPY_GC_NURSERY) and C{warmup=15} (seconds of each
                    warm-up load) unless given.  That interpreter needs
                    edgeproxy's dependencies (e.g. a venv with
                    C{pip install .}); the tree is on its PYTHONPATH;
  - alternates the peers inside each round (A B C D A B C D ...) and reports
    the median and min-max over rounds;
  - measures: memory per idle proxied connection (N idle connections, RSS
    delta / N, on the freshly started proxy), new connections/s (wrk,
    C{Connection: close}), requests/s over persistent connections (wrk
    keepalive), one-stream bulk throughput (iperf3, 1 stream), latency
    p50/p99 at a fixed rate (wrk with a Lua C{delay()}: exponential pauses
    between the requests of each connection; the rate is half of edgeproxy's
    keepalive saturation, calibrated first) reported as added to direct,
    and the routing decision time with 10/1,000/10,000 backends
    (in-process, pinned to core 1, the cases of C{bench/bench_selection.py});
  - records the proxy's CPU seconds during each test, hence the figures per
    proxy CPU-second (sturdier than wall-clock ones on a shared machine)
    and how much of the proxy's core other processes took;
  - prints a table with ratios to HAProxy and writes the numbers as JSON
    (default C{bench/results/<timestamp>.json}).

With C{--workers 1,2}: each edgeproxy peer (and variant) runs once per count
with C{--workers N} (N > 1: C{steer=off}, the groups without client steering,
since every wrk connection comes from 127.0.0.1) and HAProxy with C{nbthread
N}; N=1 on the proxy core, N>1 on cores 0..N-1, shared with the load
generator (wall-clock rates are then capped by wrk's share: compare the
per-CPU-second figures).  Only new connections/s and keepalive are
measured; the proxy's CPU is summed over its whole process tree; a scaling
report compares N with 1 per proxy CPU-second.

Peers that are not installed are skipped with the command that installs
them.  Requires Linux (taskset, /proc).
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
HOST = "127.0.0.1"
LOADGEN_CPU = "0"
PROXY_CPU = "1"
STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"

INSTALL_HINTS = {
    "haproxy": "apt-get install haproxy",
    "nginx": "apt-get install nginx",
    "nginx-stream": "apt-get install nginx libnginx-mod-stream",
    "wrk": "apt-get install wrk",
    "iperf3": "apt-get install iperf3",
    "taskset": "apt-get install util-linux",
    "edgeproxy": "pip install . (from the repository root)",
}

DEFAULT_PEERS = ["edgeproxy", "haproxy", "nginx-stream", "direct"]


def log(msg: str) -> None:
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


# ---------------------------------------------------------------- processes

_PR_SET_PDEATHSIG = 1


def _child_setup() -> None:
    """
    In the child before exec: die with the harness (even on SIGKILL), and use
    the full file-descriptor allowance.
    """
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except OSError:
        pass
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Processes:
    """
    Every process the harness starts, so that all of them are stopped on
    exit, on an exception and on SIGINT/SIGTERM.
    """

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self.live: List[subprocess.Popen[bytes]] = []

    def start(
        self,
        argv: Sequence[str],
        cpu: Optional[str],
        *,
        env: Optional[Dict[str, str]] = None,
        stdout: Any = subprocess.DEVNULL,
        stderr: Any = subprocess.DEVNULL,
        stdin: Any = subprocess.DEVNULL,
        cwd: Optional[str] = None,
    ) -> "subprocess.Popen[bytes]":
        full = list(argv)
        if cpu is not None and self.pin:
            full = ["taskset", "-c", cpu, *full]  # taskset execs: same pid
        p = subprocess.Popen(
            full,
            env=env,
            stdout=stdout,
            stderr=stderr,
            stdin=stdin,
            cwd=cwd,
            preexec_fn=_child_setup,
            start_new_session=True,
        )
        self.live.append(p)
        return p

    def run(
        self, argv: Sequence[str], cpu: Optional[str], timeout: float, **kw: Any
    ) -> Tuple[int, str, str]:
        """
        Run to completion (bounded by C{timeout}); return (rc, stdout, stderr).
        """
        p = self.start(argv, cpu, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(p)
            out, err = p.communicate()
            return -999, out.decode(errors="replace"), err.decode(errors="replace")
        finally:
            if p in self.live:
                self.live.remove(p)
        return p.returncode, out.decode(errors="replace"), err.decode(errors="replace")

    def stop(self, p: "subprocess.Popen[bytes]", grace: float = 3.0) -> None:
        if p.poll() is None:
            try:
                p.terminate()
                p.wait(grace)
            except subprocess.TimeoutExpired:
                p.kill()
                try:
                    p.wait(grace)
                except subprocess.TimeoutExpired:
                    pass
            except ProcessLookupError:
                pass
        if p in self.live:
            self.live.remove(p)

    def stop_all(self) -> None:
        for p in list(reversed(self.live)):
            self.stop(p, grace=2.0)


# ---------------------------------------------------------------- sockets


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _tcp_table() -> List[Tuple[int, int, str]]:
    """
    (local port, remote port, state hex) of every IPv4 TCP socket.
    """
    rows = []
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            lport = int(parts[1].rsplit(":", 1)[1], 16)
            rport = int(parts[2].rsplit(":", 1)[1], 16)
            rows.append((lport, rport, parts[3]))
    return rows


def listening(port: int) -> bool:
    return any(lp == port and st == "0A" for lp, _, st in _tcp_table())


def established_to(port: int) -> int:
    """
    Established sockets whose local port is C{port} (accepted by it).
    """
    return sum(1 for lp, _, st in _tcp_table() if lp == port and st == "01")


def wait_listening(
    ports: Sequence[int], proc: Optional["subprocess.Popen[bytes]"], timeout: float, what: str
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before listening")
        if all(listening(p) for p in ports):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {ports} within {timeout}s")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_seconds(pids: Sequence[int]) -> float:
    """
    User + system CPU seconds used so far by C{pids}.
    """
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _CLK_TCK


def _children(pid: int) -> List[int]:
    """
    The live children of C{pid}: /proc/<pid>/task/*/children, or a scan of
    every /proc/<n>/stat's parent where the kernel lacks that file.
    """
    kids: List[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    found = False
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(x) for x in f.read().split()]
            found = True
        except OSError:
            continue
    if found:
        return kids
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == pid:
                kids.append(int(name))
    return kids


def proc_tree(roots: Sequence[int]) -> List[int]:
    """
    C{roots} and all their live descendants (bounded: at most 4,096).
    """
    seen: List[int] = []
    todo = list(roots)
    while todo and len(seen) < 4096:
        pid = todo.pop(0)
        if pid in seen:
            continue
        seen.append(pid)
        todo += _children(pid)
    return seen


def tree_cpu(roots: Sequence[int]) -> Dict[int, Tuple[float, float]]:
    """
    For every process of the trees under C{roots}: (its own user + system
    CPU seconds, those of its children that ended and were reaped).  The
    second term keeps a worker that dies during a test counted: its time
    moves to its parent's once it is reaped.
    """
    out: Dict[int, Tuple[float, float]] = {}
    for pid in proc_tree(roots):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        own = (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime
        reaped = (int(fields[13]) + int(fields[14])) / _CLK_TCK  # cutime, cstime
        out[pid] = (own, reaped)
    return out


def core_busy_seconds(cpu: str) -> float:
    """
    Busy (non-idle) seconds of one CPU since boot, from /proc/stat.
    """
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                v = [int(x) for x in line.split()[1:]]
                # user nice system idle iowait irq softirq steal ...
                return (v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)) / _CLK_TCK
    return 0.0


def _cores(spec: Optional[str]) -> List[str]:
    """
    The CPU numbers of a taskset list ("1", "0,1", "0-3"); every CPU for None.
    """
    if spec is None:
        return [str(i) for i in range(os.cpu_count() or 1)]
    cores: List[str] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        cores += [str(i) for i in range(int(lo), int(hi or lo) + 1)]
    return cores


class CpuMeter:
    """
    CPU used by the proxy during one test, and by everything else on its
    core(s) (other tenants of a shared machine): the noise indicator, and
    the denominator of the per-CPU-second figures.

    The proxy's CPU is that of the whole process tree under C{pids} (a
    supervisor and its workers), walked at the start and at the end of the
    test: a process present at both counts its difference, one started
    during the test all of its time, one that ended its time until its
    parent reaped it (its parent's children's time).
    """

    def __init__(self, pids: Sequence[int], cpu: Optional[str] = PROXY_CPU) -> None:
        self.pids = list(pids)
        self.cores = _cores(cpu)
        self.t0 = time.monotonic()
        self.tree0 = tree_cpu(self.pids)
        self.c0 = sum(core_busy_seconds(c) for c in self.cores)

    def stop(self) -> Dict[str, Any]:
        wall = time.monotonic() - self.t0
        tree1 = tree_cpu(self.pids)
        core = sum(core_busy_seconds(c) for c in self.cores) - self.c0
        total0 = sum(own + reaped for own, reaped in self.tree0.values())
        total1 = sum(own + reaped for own, reaped in tree1.values())
        proxy = total1 - total0
        per = {
            str(pid): round(own - self.tree0.get(pid, (0.0, 0.0))[0], 3)
            for pid, (own, _) in tree1.items()
        }
        return {
            "wall_s": round(wall, 3),
            "proxy_cpu_s": round(proxy, 3),
            "proxy_util": round(proxy / wall, 3) if wall > 0 else 0.0,
            "cores": ",".join(self.cores),
            # with the proxy on several cores, "others" includes the load
            # generator (core 0): not a noise indicator then
            "core_other_util": round(max(0.0, core - proxy) / wall, 3) if wall > 0 else 0.0,
            "per_process_cpu_s": per,
            "started": sorted(set(tree1) - set(self.tree0)),
            "ended": sorted(set(self.tree0) - set(tree1)),
        }


def nofile_hard() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


# ---------------------------------------------------------------- backends


@dataclass
class Backends:
    http_port: int
    iperf_port: int
    workdir: str
    nginx: Optional["subprocess.Popen[bytes]"] = None
    iperf: Optional["subprocess.Popen[bytes]"] = None


NGINX_BACKEND_CONF = """\
daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile {nofile};
pid {dir}/nginx-backend.pid;
error_log {dir}/nginx-backend.error.log warn;
events {{ worker_connections {conns}; use epoll; }}
http {{
    access_log off;
    default_type text/plain;
    keepalive_timeout 3600s;
    keepalive_requests 100000000;
    client_header_timeout 3600s;
    client_body_temp_path {dir}/nb-body;
    proxy_temp_path {dir}/nb-proxy;
    fastcgi_temp_path {dir}/nb-fcgi;
    uwsgi_temp_path {dir}/nb-uwsgi;
    scgi_temp_path {dir}/nb-scgi;
    server {{
        listen {host}:{port} backlog=4096;
        location / {{ return 200 "hello from the nginx backend\\n"; }}
    }}
}}
"""


def start_backends(procs: Processes, workdir: str) -> Backends:
    b = Backends(http_port=free_port(), iperf_port=free_port(), workdir=workdir)
    conf = os.path.join(workdir, "nginx-backend.conf")
    with open(conf, "w") as f:
        f.write(
            NGINX_BACKEND_CONF.format(
                dir=workdir,
                host=HOST,
                port=b.http_port,
                nofile=nofile_hard(),
                conns=max(1024, nofile_hard() - 64),
            )
        )
    b.nginx = procs.start(
        ["nginx", "-p", workdir, "-c", conf],
        LOADGEN_CPU,
        stderr=open(os.path.join(workdir, "nginx-backend.stderr"), "wb"),
    )
    restart_iperf(procs, b)
    wait_listening([b.http_port], b.nginx, 10, "nginx backend")
    return b


def restart_iperf(procs: Processes, b: Backends) -> None:
    if b.iperf is not None:
        procs.stop(b.iperf)
    b.iperf = procs.start(
        ["iperf3", "-s", "-B", HOST, "-p", str(b.iperf_port)],
        LOADGEN_CPU,
        stderr=open(os.path.join(b.workdir, "iperf3-server.stderr"), "ab"),
    )
    wait_listening([b.iperf_port], b.iperf, 10, "iperf3 server")


# ---------------------------------------------------------------- peers


@dataclass
class Running:
    """
    A started peer: where to send HTTP and bulk traffic, and whose RSS to read.
    """

    http_port: int
    bulk_port: int
    rss_pid: Optional[int]
    procs: List["subprocess.Popen[bytes]"] = field(default_factory=list)
    logfile: Optional[str] = None


class Peer:
    name = "?"
    needs: Tuple[str, ...] = ()
    #: The proxy's CPUs (a taskset list; None: unpinned).
    cpu: Optional[str] = PROXY_CPU
    #: Processes or threads (C{--workers}); 0: the peer has no such setting.
    workers = 0

    def missing(self) -> Optional[str]:
        """
        None if runnable, else the install hint.
        """
        for tool in self.needs:
            if shutil.which(tool) is None:
                return INSTALL_HINTS.get(self.name, INSTALL_HINTS.get(tool, tool))
        return None

    def start(self, procs: Processes, b: Backends, workdir: str, max_conns: int) -> Running:
        raise NotImplementedError


class Direct(Peer):
    name = "direct"

    def start(self, procs: Processes, b: Backends, workdir: str, max_conns: int) -> Running:
        return Running(b.http_port, b.iperf_port, None)


HAPROXY_CONF = """\
global
    nbthread {nbthread}
    maxconn {maxconn}
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    maxconn {maxconn}
frontend web
    bind {host}:{web} backlog 4096
    default_backend web
backend web
    server nginx {host}:{http_port}
frontend bulk
    bind {host}:{bulk} backlog 4096
    default_backend bulk
backend bulk
    server iperf {host}:{iperf_port}
"""


class HAProxy(Peer):
    name = "haproxy"
    needs = ("haproxy",)

    def __init__(self, name: str = "haproxy", threads: int = 1) -> None:
        self.name = name
        self.threads = threads

    def start(self, procs: Processes, b: Backends, workdir: str, max_conns: int) -> Running:
        web, bulk = free_port(), free_port()
        conf = os.path.join(workdir, "haproxy.cfg")
        with open(conf, "w") as f:
            f.write(
                HAPROXY_CONF.format(
                    host=HOST,
                    web=web,
                    bulk=bulk,
                    http_port=b.http_port,
                    iperf_port=b.iperf_port,
                    maxconn=max_conns,
                    nbthread=self.threads,
                )
            )
        p = procs.start(
            ["haproxy", "-db", "-f", conf],
            self.cpu,
            stderr=open(os.path.join(workdir, "haproxy.stderr"), "ab"),
        )
        wait_listening([web, bulk], p, 10, "haproxy")
        return Running(web, bulk, p.pid, [p])


NGINX_STREAM_CONF = """\
daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile {nofile};
{load_module}
pid {dir}/nginx-stream.pid;
error_log {dir}/nginx-stream.error.log warn;
events {{ worker_connections {conns}; use epoll; }}
stream {{
    server {{
        listen {host}:{web} backlog=4096;
        proxy_pass {host}:{http_port};
        proxy_connect_timeout 5s;
        proxy_timeout 1h;
    }}
    server {{
        listen {host}:{bulk} backlog=4096;
        proxy_pass {host}:{iperf_port};
        proxy_connect_timeout 5s;
        proxy_timeout 1h;
    }}
}}
"""


def _nginx_stream_builtin() -> bool:
    try:
        out = subprocess.run(["nginx", "-V"], capture_output=True, text=True, timeout=10).stderr
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--with-stream " in out + " " and "--with-stream=dynamic" not in out


class NginxStream(Peer):
    name = "nginx-stream"
    needs = ("nginx",)

    def missing(self) -> Optional[str]:
        hint = super().missing()
        if hint:
            return hint
        if not os.path.exists(STREAM_MODULE) and not _nginx_stream_builtin():
            return INSTALL_HINTS["nginx-stream"]
        return None

    def start(self, procs: Processes, b: Backends, workdir: str, max_conns: int) -> Running:
        web, bulk = free_port(), free_port()
        conf = os.path.join(workdir, "nginx-stream.conf")
        load = f"load_module {STREAM_MODULE};" if os.path.exists(STREAM_MODULE) else ""
        with open(conf, "w") as f:
            f.write(
                NGINX_STREAM_CONF.format(
                    dir=workdir,
                    host=HOST,
                    web=web,
                    bulk=bulk,
                    http_port=b.http_port,
                    iperf_port=b.iperf_port,
                    nofile=nofile_hard(),
                    conns=max(1024, nofile_hard() - 64),
                    load_module=load,
                )
            )
        p = procs.start(
            ["nginx", "-p", workdir, "-c", conf],
            PROXY_CPU,
            stderr=open(os.path.join(workdir, "nginx-stream.stderr"), "ab"),
        )
        wait_listening([web, bulk], p, 10, "nginx stream")
        return Running(web, bulk, p.pid, [p])


def _child_env(
    extra: Optional[Dict[str, str]] = None, root: Optional[str] = None
) -> Dict[str, str]:
    env = dict(os.environ)
    root = root or ROOT
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if extra:
        env.update(extra)
    return env


def write_routing_db(path: str, b: Backends, hard_limit: int = 0) -> None:
    """
    A routing table like a small POP's: three Brazilian rows for the web app
    (the geo path picks among them), two rows elsewhere (scored, not picked),
    one bulk row.  All web rows point at the same nginx.  C{hard_limit} on
    every row (0: none).
    """
    schema = os.path.join(ROOT, "edgeproxy", "data", "schema.sql")
    con = sqlite3.connect(path)
    try:
        if os.path.exists(schema):
            with open(schema) as f:
                con.executescript(f.read())
        else:
            con.execute(
                "CREATE TABLE backends (id TEXT PRIMARY KEY NOT NULL, app TEXT,"
                " region TEXT NOT NULL, country TEXT, wg_ip TEXT NOT NULL,"
                " port INTEGER NOT NULL, healthy INTEGER DEFAULT 1, weight INTEGER DEFAULT 1,"
                " soft_limit INTEGER DEFAULT 100, hard_limit INTEGER DEFAULT 0,"
                " deleted INTEGER DEFAULT 0, proxy_protocol INTEGER DEFAULT 0)"
            )
        rows = [
            ("web-gru-1", "web", "sa", "BR", HOST, b.http_port),
            ("web-gru-2", "web", "sa", "BR", HOST, b.http_port),
            ("web-gig-1", "web", "sa", "BR", HOST, b.http_port),
            ("web-scl-1", "web", "sa", "CL", HOST, b.http_port),
            ("web-cdg-1", "web", "eu", "FR", HOST, b.http_port),
            ("bulk-gru-1", "bulk", "sa", "BR", HOST, b.iperf_port),
        ]
        con.executemany(
            "INSERT INTO backends (id, app, region, country, wg_ip, port, healthy, weight,"
            " soft_limit, hard_limit, deleted, proxy_protocol) VALUES (?,?,?,?,?,?,1,1,1000,?,0,0)",
            [(*row, hard_limit) for row in rows],
        )
        con.commit()
    finally:
        con.close()


class Edgeproxy(Peer):
    """
    The full edgeproxy via its twistd plugin (C{python -m twisted edgeproxy}).

    C{knobs}: experiment settings for variants -- C{reactor} (twist
    --reactor; C{edgeepoll} unless given, C{default} for Twisted's
    default), C{loglevel} (twist --log-level), C{bufsize}, C{sockbuf},
    C{noconnlog}, C{eagerwrite}, C{fastctx} (see C{bench/twist_knobs.py}), C{accesslog}
    (C{0}: no --access-log, the process log carries the per-connection line),
    C{python} (interpreter),
    C{root} (another checkout of edgeproxy, e.g. a git worktree of an older
    commit, to compare two versions in one run),
    C{args} (extra plugin options, C{+}-separated, e.g.
    C{args=--binding-ttl=0.001}),
    C{hardlimit} (C{hard_limit} of every routing.db row; make it higher
    than the connections ever open, so that nothing is refused: a hard
    limit makes several workers take the shared slot's lock per
    connection), C{workers} (C{--workers N}), C{steer} (C{off}: with
    several workers, C{EDGEPROXY_WORKERS_STEER=off}, the groups without
    client steering; C{bench/run.py --workers} sets it unless given).
    """

    needs = ()

    def __init__(self, name: str = "edgeproxy", knobs: Optional[Dict[str, str]] = None) -> None:
        self.name = name
        self.knobs = knobs or {}

    def missing(self) -> Optional[str]:
        python = self.knobs.get("python", sys.executable)
        try:
            r = subprocess.run(
                [python, "-c", "import edgeproxy.tap"],
                env=_child_env(root=self.knobs.get("root")),
                capture_output=True,
                timeout=60,
            )
        except (OSError, subprocess.TimeoutExpired):
            return INSTALL_HINTS["edgeproxy"]
        return None if r.returncode == 0 else INSTALL_HINTS["edgeproxy"]

    def start(self, procs: Processes, b: Backends, workdir: str, max_conns: int) -> Running:
        web, bulk = free_port(), free_port()
        tag = self.name
        db = os.path.join(workdir, f"{tag}-routing.db")
        if os.path.exists(db):
            os.remove(db)
        write_routing_db(db, b, int(self.knobs.get("hardlimit", "0")))
        overrides = os.path.join(workdir, "geo-overrides.txt")
        with open(overrides, "w") as f:
            f.write("# client CIDR -> country (the benchmark client is loopback)\n127.0.0.0/8 BR\n")
        logfile = os.path.join(workdir, f"{tag}.log")
        python = self.knobs.get("python", sys.executable)
        env_extra: Dict[str, str] = {}
        wrapped = False
        for knob, var in (
            ("bufsize", "EDGEPROXY_BENCH_BUFSIZE"),
            ("readsize", "EDGEPROXY_BENCH_READ_SIZE"),
            ("sockbuf", "EDGEPROXY_BENCH_SOCKBUF"),
            ("noconnlog", "EDGEPROXY_BENCH_NO_CONN_LOG"),
            ("eagerwrite", "EDGEPROXY_BENCH_EAGER_WRITE"),
            ("fastctx", "EDGEPROXY_BENCH_FAST_LOG_CONTEXT"),
        ):
            if knob in self.knobs:
                env_extra[var] = self.knobs[knob]
                wrapped = True
        if self.knobs.get("steer") == "off":
            env_extra["EDGEPROXY_WORKERS_STEER"] = "off"
        if "gcnursery" in self.knobs:
            # PyPy's minor-collection nursery (read at interpreter start).
            env_extra["PYPY_GC_NURSERY"] = self.knobs["gcnursery"]
        argv = [python]
        argv += [os.path.join(HERE, "twist_knobs.py")] if wrapped else ["-m", "twisted"]
        argv += [f"--log-file={logfile}", "--log-format=text"]
        # edgeproxy's own reactor plugin (epoll without the legacy per-event
        # log context) unless a variant asks for another; "default" means
        # Twisted's default reactor (no --reactor).
        reactor_name = self.knobs.get("reactor", "edgeepoll")
        if reactor_name != "default":
            argv.append(f"--reactor={reactor_name}")
        if "logformat" in self.knobs:
            argv[argv.index("--log-format=text")] = f"--log-format={self.knobs['logformat']}"
        if "loglevel" in self.knobs:
            argv.append(f"--log-level={self.knobs['loglevel']}")
        argv += [
            "edgeproxy",
            "--db",
            db,
            "--region",
            "sa",
            "--geo-overrides",
            overrides,
            "--max-connections",
            str(max_conns),
            "--listen",
            f"web=tcp:{web}:interface={HOST}:backlog=1024",
            "--listen",
            f"bulk=tcp:{bulk}:interface={HOST}:backlog=1024",
        ]
        if self.knobs.get("accesslog", "1") != "0":
            argv += ["--access-log", os.path.join(workdir, f"{tag}-access.log")]
        workers = int(self.knobs.get("workers", "0"))
        if workers:
            argv += ["--workers", str(workers)]
        if self.knobs.get("args"):
            argv += self.knobs["args"].split("+")
        p = procs.start(
            argv,
            self.cpu,
            env=_child_env(env_extra, self.knobs.get("root")),
            stderr=open(os.path.join(workdir, f"{tag}.stderr"), "ab"),
            stdout=open(os.path.join(workdir, f"{tag}.stdout"), "ab"),
            cwd=workdir,
        )
        wait_listening([web, bulk], p, 30, self.name)
        if workers > 1:
            # the supervisor listens before its workers run: wait for them
            wait_workers(logfile, workers, p, 60, self.name)
        return Running(web, bulk, p.pid, [p], logfile)


def wait_workers(
    logfile: str, count: int, proc: "subprocess.Popen[bytes]", timeout: float, what: str
) -> None:
    """
    Wait until the supervisor's log shows C{count} workers running.
    """
    deadline = time.monotonic() + timeout
    seen: set = set()
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before its workers ran")
        try:
            with open(logfile, errors="replace") as f:
                text = f.read()
        except OSError:
            text = ""
        seen = set(re.findall(rf"worker (\d+) of {count} running", text))
        if len(seen) >= count:
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what}: only {len(seen)} of {count} workers running after {timeout}s")


#: Log lines worth a note after a run (edgeproxy's process log).
_LOG_TROUBLE = re.compile(
    r"Traceback|Unhandled|ended after|still running at the deadline|cannot |refused|"
    r"released more often|malformed|error",
    re.IGNORECASE,
)


def log_trouble(logfile: str, limit: int = 5) -> Tuple[int, List[str]]:
    """
    How many lines of C{logfile} look like trouble, and the first few.
    """
    n = 0
    first: List[str] = []
    try:
        with open(logfile, errors="replace") as f:
            for line in f:
                if _LOG_TROUBLE.search(line):
                    n += 1
                    if len(first) < limit:
                        first.append(line.strip()[:300])
    except OSError:
        pass
    return n, first


class TwistedPortforward(Peer):
    """
    Twisted's own forwarder (no routing at all): two processes, one per port.
    """

    name = "twisted-portforward"

    def start(self, procs: Processes, b: Backends, workdir: str, max_conns: int) -> Running:
        web, bulk = free_port(), free_port()
        ps = []
        for port, dest in ((web, b.http_port), (bulk, b.iperf_port)):
            ps.append(
                procs.start(
                    [
                        sys.executable,
                        "-m",
                        "twisted",
                        f"--log-file={os.path.join(workdir, f'portforward-{port}.log')}",
                        "--log-format=text",
                        "portforward",
                        f"--port=tcp:{port}:interface={HOST}:backlog=1024",
                        f"--host={HOST}",
                        f"--dest_port={dest}",
                    ],
                    PROXY_CPU,
                    env=_child_env(),
                )
            )
        wait_listening([web], ps[0], 30, self.name)
        wait_listening([bulk], ps[1], 30, self.name)
        return Running(web, bulk, ps[0].pid, ps)


def make_peer(name: str, variants: Dict[str, Dict[str, str]]) -> Peer:
    if name in variants:
        return Edgeproxy(name, variants[name])
    table: Dict[str, Callable[[], Peer]] = {
        "edgeproxy": Edgeproxy,
        "haproxy": HAProxy,
        "nginx-stream": NginxStream,
        "direct": Direct,
        "twisted-portforward": TwistedPortforward,
    }
    if name not in table:
        raise SystemExit(f"unknown peer {name!r}; known: {', '.join(table)} or a --variant name")
    return table[name]()


# ---------------------------------------------------------------- load generators

WRK_DONE = """
done = function(summary, latency, requests)
  io.write(string.format(
    "BENCHJSON {\\"requests\\":%d,\\"duration_us\\":%d,\\"bytes\\":%d,"
    .. "\\"connect_err\\":%d,\\"read_err\\":%d,\\"write_err\\":%d,"
    .. "\\"status_err\\":%d,\\"timeout_err\\":%d,"
    .. "\\"p50_us\\":%d,\\"p90_us\\":%d,\\"p99_us\\":%d,\\"max_us\\":%d}\\n",
    summary.requests, summary.duration, summary.bytes,
    summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.status, summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


def wrk(
    procs: Processes,
    workdir: str,
    port: int,
    duration: float,
    conns: int,
    close: bool = False,
    delay_ms: Optional[int] = None,
) -> Dict[str, Any]:
    script = os.path.join(workdir, f"wrk-{delay_ms}.lua")
    if not os.path.exists(script):
        with open(script, "w") as f:
            if delay_ms is not None:
                # exponential pauses (mean delay_ms) so that the connections do not
                # fire in lock-step bursts; wrk rounds the pause to whole ms
                f.write(
                    f"local mean = {int(delay_ms)}\n"
                    "delay = function()\n"
                    "  return math.floor(-mean * math.log(1 - math.random()) + 0.5)\n"
                    "end\n"
                )
            f.write(WRK_DONE)
    argv = [
        "wrk",
        "-t1",
        f"-c{conns}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "5s",
        "-s",
        script,
    ]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(f"http://{HOST}:{port}/")
    rc, out, err = procs.run(argv, LOADGEN_CPU, timeout=duration + 30)
    for line in out.splitlines():
        if line.startswith("BENCHJSON "):
            r: Dict[str, Any] = json.loads(line[len("BENCHJSON ") :])
            secs = r["duration_us"] / 1e6
            r["rps"] = r["requests"] / secs if secs > 0 else 0.0
            r["errors"] = sum(
                r[k] for k in ("connect_err", "read_err", "write_err", "status_err", "timeout_err")
            )
            return r
    raise RuntimeError(f"wrk failed (rc={rc}): {err.strip()[:300]} {out.strip()[:300]}")


def iperf(procs: Processes, b: Backends, port: int, duration: float) -> float:
    """
    One-stream throughput in Gbit/s (received), client -> server.
    """
    argv = [
        "iperf3",
        "-c",
        HOST,
        "-p",
        str(port),
        "-t",
        str(max(1, round(duration))),
        "-P",
        "1",
        "-J",
        "--connect-timeout",
        "3000",
    ]
    last = ""
    for _attempt in range(2):
        _rc, out, err = procs.run(argv, LOADGEN_CPU, timeout=duration + 20)
        try:
            data = json.loads(out)
            if "error" not in data:
                return float(data["end"]["sum_received"]["bits_per_second"]) / 1e9
            last = data["error"]
        except (ValueError, KeyError) as e:
            last = f"{e}: {err.strip()[:200]}"
        restart_iperf(procs, b)  # a failed test can wedge iperf3 -s
    raise RuntimeError(f"iperf3 failed: {last}")


def idle_memory(
    procs: Processes, running: Running, backend_port: int, n: int, timeout: float
) -> Dict[str, Any]:
    """
    RSS growth of the proxy per idle proxied connection.
    """
    pid = running.rss_pid
    base_backend = established_to(backend_port)
    before = rss_bytes(pid) if pid else 0
    client = procs.start(
        [
            sys.executable,
            os.path.join(HERE, "idle_client.py"),
            HOST,
            str(running.http_port),
            str(n),
            "--hold",
            str(timeout + 30),
        ],
        LOADGEN_CPU,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert client.stdout is not None
        deadline = time.monotonic() + timeout
        line = b""
        # READY arrives once every connect finished (each bounded in idle_client)
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(client.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline and not line.endswith(b"\n"):
            if sel.select(0.5):
                chunk = os.read(client.stdout.fileno(), 256)
                if not chunk:
                    break
                line += chunk
        sel.close()
        if not line.startswith(b"READY"):
            raise RuntimeError("idle client did not finish opening connections in time")
        _, opened_s, failed_s = line.split()
        opened, failed = int(opened_s), int(failed_s)
        # wait until the proxy has its backend legs up (bounded)
        proxied = 0
        while time.monotonic() < deadline:
            proxied = established_to(backend_port) - base_backend
            if proxied >= opened:
                break
            time.sleep(0.2)
        time.sleep(0.5)
        after = rss_bytes(pid) if pid else 0
        result = {
            "opened": opened,
            "failed": failed,
            "proxied": proxied,
            "rss_before": before,
            "rss_after": after,
            "bytes_per_conn": (after - before) / opened if opened and pid else None,
        }
    finally:
        if client.stdin:
            try:
                client.stdin.close()
            except OSError:
                pass
        try:
            client.wait(30)
        except subprocess.TimeoutExpired:
            pass
        procs.stop(client)
    # let the proxy tear the connections down before the next test (bounded)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 60 and established_to(backend_port) > base_backend + 5:
        time.sleep(0.2)
    result["teardown_s"] = round(time.monotonic() - t0, 2)
    return result


# ---------------------------------------------------------------- routing decision


SELECTION_SNIPPET = r"""
import json, random, statistics, sys, time
sys.path.insert(0, {root!r})
sys.path.insert(0, {bench!r})
sizes = {sizes!r}
quick = {quick!r}
try:
    import bench_selection
except Exception:
    bench_selection = None
if hasattr(bench_selection, "build") and hasattr(bench_selection, "cases"):
    # the cases of bench/bench_selection.py; the headline is its first case
    try:
        res = {{}}
        for n in sizes:
            snap, names = bench_selection.build(n)
            per_case = {{}}
            try:
                # what the router runs: the index, with the default RTT weight
                case_list = bench_selection.cases(snap, names, with_rtt=True, weight=0.01,
                                                  indexed=True)
                what = "the router's index, --rtt-weight 0.01"
            except TypeError:  # (a checkout before the index)
                case_list = bench_selection.cases(snap, names)
                what = "the plain scan"
            for cname, fn in case_list:
                per = []
                batch = 200
                for _ in range(15 if quick else 60):
                    t0 = time.perf_counter()
                    for _ in range(batch):
                        fn()
                    per.append((time.perf_counter() - t0) / batch * 1e6)
                per_case[cname] = {{"median_us": statistics.median(per), "min_us": min(per),
                                    "max_us": max(per)}}
            first = next(iter(per_case))
            worst = max(per_case, key=lambda k: per_case[k]["median_us"])
            res[str(n)] = dict(per_case[first], case=first, worst_case=worst,
                               worst_median_us=per_case[worst]["median_us"], cases=per_case)
        out = {{"source": "bench/bench_selection.py build()/cases(), " + what
                          + ", headline case: " + first,
               "result": res}}
    except Exception as e:
        out = {{"source_error": repr(e)}}
if "result" not in out:
    from edgeproxy.model import Backend, GeoInfo, RoutingSnapshot
    from edgeproxy.routing.selection import select
    countries = [("BR","sa"),("AR","sa"),("CL","sa"),("PE","sa"),("CO","sa"),("US","us"),
                 ("CA","us"),
                 ("MX","us"),("FR","eu"),("DE","eu"),("GB","eu"),("NL","eu"),("ES","eu"),("IT","eu"),
                 ("PL","eu"),("SE","eu"),("JP","ap"),("KR","ap"),("SG","ap"),("AU","ap"),("IN","ap"),
                 ("HK","ap"),("TW","ap"),("ID","ap")]
    rng = random.Random(7)
    res = {{}}
    for n in sizes:
        bs = [Backend(id="b%d" % i, app="web", region=countries[i % len(countries)][1],
                      country=countries[i % len(countries)][0], host="10.0.0.1",
                      port=8000 + i % 1000,
                      weight=1 + i % 3, soft_limit=100) for i in range(n)]
        snap = RoutingSnapshot.build(bs)
        load = {{b.id: rng.randrange(0, 80) for b in bs}}
        geo = GeoInfo("BR", "sa")
        per = []
        batch = 200
        reps = 15 if quick else 50
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(batch):
                select(snap, "web", geo, "sa", load, rng)
            per.append((time.perf_counter() - t0) / batch * 1e6)
        res[str(n)] = {{"median_us": statistics.median(per), "min_us": min(per), "max_us": max(per),
                        "calls": batch * reps}}
    out.update({{"source": "bench/run.py fallback: edgeproxy.routing.selection.select, "
                 "backends spread evenly over %d countries, client BR/sa, random loads"
                 % len(countries),
                 "result": res}})
print("BENCHJSON " + json.dumps(out))
"""


def routing_decision(procs: Processes, quick: bool) -> Dict[str, Any]:
    code = SELECTION_SNIPPET.format(root=ROOT, bench=HERE, sizes=[10, 1000, 10000], quick=quick)
    rc, out, err = procs.run([sys.executable, "-c", code], PROXY_CPU, timeout=300, env=_child_env())
    for line in out.splitlines():
        if line.startswith("BENCHJSON "):
            r: Dict[str, Any] = json.loads(line[len("BENCHJSON ") :])
            return r
    return {"error": f"rc={rc}: {err.strip()[-500:]}"}


def _selection_median(res: Any, n: int) -> Optional[float]:
    """
    Median µs per decision for C{n} backends, from whatever shape the result has.
    """
    if not isinstance(res, dict):
        return None
    v = res.get(str(n), res.get(n))  # type: ignore[call-overload]
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, dict):
        for k in ("median_us", "median", "us"):
            if isinstance(v.get(k), (int, float)):
                return float(v[k])
    return None


# ---------------------------------------------------------------- run


MEASURES = [
    # key, label, unit, higher is better
    ("mem_per_conn", "memory per idle conn", "B", False),
    ("conn_rate", "new connections/s", "/s", True),
    ("keepalive_rps", "keepalive requests/s", "/s", True),
    ("bulk_gbps", "one-stream bulk", "Gbit/s", True),
    ("lat_p50_added", "latency p50 added", "µs", False),
    ("lat_p99_added", "latency p99 added", "µs", False),
    ("lat_rate", "  (latency test rate)", "/s", True),
    ("conn_per_cpu", "new conns per proxy CPU-s", "/s", True),
    ("keepalive_per_cpu", "requests per proxy CPU-s", "/s", True),
    ("bulk_per_cpu", "bulk per proxy CPU-s", "Gbit/s", True),
    ("conn_cpu_us", "proxy CPU per new conn", "µs", False),
    ("conn_util", "proxy CPUs busy (conn test)", "CPUs", False),
    ("keepalive_util", "proxy CPUs busy (keepalive)", "CPUs", False),
    ("worker_max_share", "busiest worker's CPU share", "%", False),
    ("supervisor_share", "supervisor's CPU share", "%", False),
    ("core_other", "proxy core used by others", "%", False),
]

#: Measures of C{--workers} runs (the others are skipped there).
WORKER_MEASURES = (
    "conn_rate",
    "keepalive_rps",
    "conn_per_cpu",
    "keepalive_per_cpu",
    "conn_cpu_us",
    "conn_util",
    "keepalive_util",
    "worker_max_share",
    "supervisor_share",
    "core_other",
)


def summarise(values: List[float]) -> Dict[str, Any]:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"values": values, "median": None, "min": None, "max": None}
    return {
        "values": values,
        "median": statistics.median(vals),
        "min": min(vals),
        "max": max(vals),
    }


def fmt(v: Optional[float], unit: str) -> str:
    if v is None:
        return "-"
    if unit == "Gbit/s":
        return f"{v:.2f}"
    if unit == "B":
        return f"{v:,.0f}"
    if unit == "CPUs":
        return f"{v:.2f}"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.1f}"


def print_table(
    results: Dict[str, Dict[str, Dict[str, Any]]],
    peers: List[str],
    refs: Optional[Dict[str, str]] = None,
    only: Optional[Sequence[str]] = None,
) -> str:
    """
    The table of medians (C{only}: those measures; C{refs}: the column
    each is compared with, HAProxy's unless given).
    """
    refs = refs or {}
    lines = []
    head = f"{'measure':<30}" + "".join(f"{p:>30}" for p in peers)
    lines.append(head)
    lines.append("-" * len(head))
    for key, label, unit, _ in MEASURES:
        if only is not None and key not in only:
            continue
        if key in ("worker_max_share", "supervisor_share") and not any(
            results.get(p, {}).get(key) for p in peers
        ):
            continue
        row = f"{label + ' (' + unit + ')':<30}"
        for p in peers:
            s = results.get(p, {}).get(key)
            if not s or s["median"] is None:
                row += f"{'-':>30}"
                continue
            cell = f"{fmt(s['median'], unit)} [{fmt(s['min'], unit)}..{fmt(s['max'], unit)}]"
            ratio = results[p].get("ratio_to_haproxy", {}).get(key)
            if (
                ratio is not None
                and p not in ("haproxy", "direct")
                and refs.get(p, "haproxy") != p
                and key
                not in (
                    "lat_rate",
                    "core_other",
                    "conn_util",
                    "keepalive_util",
                    "worker_max_share",
                    "supervisor_share",
                )
            ):
                cell += f" {ratio:.2f}x"
            row += f"{cell:>30}"
        lines.append(row)
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        description="edgeproxy vs HAProxy / nginx stream / direct, pinned cores, "
        "alternating rounds.",
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 round, short tests (~2 min)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds (default 3; quick 1)")
    ap.add_argument(
        "--duration", type=float, default=None, help="seconds per load test (default 5; quick 2)"
    )
    ap.add_argument(
        "--json", default=None, help="write results here (default bench/results/<time>.json)"
    )
    ap.add_argument(
        "--peers",
        default=",".join(DEFAULT_PEERS),
        help="comma list, in round order (default: %(default)s)",
    )
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:KEY=VAL,...",
        help="an extra edgeproxy peer with knobs: reactor=poll|select|asyncio, "
        "loglevel=warn, logformat=json, accesslog=0, bufsize=N, readsize=N, sockbuf=N, "
        "noconnlog=1, "
        "eagerwrite=1, fastctx=1, python=PATH, gcnursery=16M (PYPY_GC_NURSERY), "
        "warmup=SECS, root=CHECKOUT, args=--opt=v+--opt2=v "
        "(add NAME to --peers, or it is appended)",
    )
    ap.add_argument(
        "--pypy",
        default=None,
        metavar="PATH",
        help="add an edgeproxy-pypy column: the edgeproxy column's proxy run by this "
        "interpreter (e.g. a PyPy venv's bin/python with edgeproxy's dependencies)",
    )
    ap.add_argument(
        "--idle-conns",
        type=int,
        default=None,
        help="idle connections (default 10000, capped by RLIMIT_NOFILE)",
    )
    ap.add_argument(
        "--skip",
        default="",
        help="comma list of measures to skip: mem,conn,keepalive,bulk,latency,select",
    )
    ap.add_argument(
        "--conns", type=int, default=50, help="wrk connections for the saturation tests"
    )
    ap.add_argument(
        "--latency-rate",
        type=float,
        default=None,
        help="req/s of the latency test (default: half of edgeproxy's keepalive saturation)",
    )
    ap.add_argument(
        "--warmup",
        type=float,
        default=1.0,
        help="seconds of each warm-up load before a peer's tests (JITs)",
    )
    ap.add_argument(
        "--workers",
        default=None,
        metavar="LIST",
        help="comma list of worker counts, e.g. 1,2: each edgeproxy peer runs with "
        "--workers N (groups unsteered: steer=off), HAProxy with nbthread N; N=1 on "
        "the proxy core, N>1 on cores 0..N-1 (shared with the load generator); "
        "measures new connections and keepalive only, CPU over the whole process tree",
    )
    ap.add_argument("--no-pin", action="store_true", help="do not use taskset")
    ap.add_argument(
        "--keep-workdir", action="store_true", help="keep the temporary directory (configs, logs)"
    )
    args = ap.parse_args(argv)

    rounds = args.rounds or (1 if args.quick else 3)
    duration = args.duration or (2.0 if args.quick else 5.0)
    bulk_duration = duration
    skip = set(filter(None, args.skip.split(",")))
    hard = nofile_hard()
    # each proxied connection needs two descriptors in the proxy
    max_conns = max(100, (hard - 200) // 2)
    idle_n = args.idle_conns or (2000 if args.quick else 10000)
    if idle_n > max_conns - 50:
        log(f"idle connections capped at {max_conns - 50} by RLIMIT_NOFILE hard limit {hard}")
        idle_n = max_conns - 50

    if rounds < 1 or rounds > 50 or duration <= 0 or duration > 120:
        ap.error("rounds must be 1..50 and duration 0..120 s")

    for tool in ("wrk",):
        if shutil.which(tool) is None:
            log(f"{tool} is required: {INSTALL_HINTS[tool]}")
            return 2
    if shutil.which("iperf3") is None:
        log(f"iperf3 not installed, bulk skipped: {INSTALL_HINTS['iperf3']}")
        skip.add("bulk")
    if shutil.which("nginx") is None:
        log(f"nginx is the backend and is required: {INSTALL_HINTS['nginx']}")
        return 2
    pin = not args.no_pin and shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    if not pin:
        log("not pinning (no taskset, fewer than 2 CPUs, or --no-pin)")

    variants: Dict[str, Dict[str, str]] = {}
    for v in args.variant:
        name, _, spec = v.partition(":")
        knobs = dict(kv.split("=", 1) for kv in spec.split(",") if "=" in kv)
        variants[name] = knobs
    if args.pypy:
        if shutil.which(args.pypy) is None:
            ap.error(f"--pypy {args.pypy}: no such interpreter")
        pypy = variants.setdefault("edgeproxy-pypy", {})
        pypy["python"] = args.pypy
        # As README's "On PyPy" recommends: a nursery of 16 MB (PyPy sizes
        # it from the L2 cache, 256 KB here, and then collects several
        # times per thousand connections), and a JIT warm-up.
        pypy.setdefault("gcnursery", "16M")
        pypy.setdefault("warmup", str(max(args.warmup, 15.0)))
    peer_names = [p for p in args.peers.split(",") if p]
    for name in variants:
        if name not in peer_names:
            peer_names.append(name)

    peers: List[Peer] = []
    for name in peer_names:
        peer = make_peer(name, variants)
        hint = peer.missing()
        if hint:
            log(f"skipping {name}: not installed -- install with: {hint}")
            continue
        peers.append(peer)
    if not peers:
        log("no peer to run")
        return 2
    refs: Dict[str, str] = {}
    bases: Dict[str, Tuple[str, int]] = {}
    workers_list: List[int] = []
    if args.workers:
        try:
            workers_list = [int(x) for x in args.workers.split(",") if x]
        except ValueError:
            ap.error(f"--workers {args.workers!r}: a comma list of numbers")
        if not workers_list or min(workers_list) < 1 or max(workers_list) > 64:
            ap.error("--workers: numbers 1..64")
        ncpu = os.cpu_count() or 1
        expanded: List[Peer] = []
        for count in workers_list:
            for peer in peers:
                clone: Peer
                if isinstance(peer, Edgeproxy):
                    knobs = dict(peer.knobs, workers=str(count))
                    if count > 1:
                        knobs.setdefault("steer", "off")
                    clone = Edgeproxy(f"{peer.name}-w{count}", knobs)
                elif isinstance(peer, HAProxy):
                    clone = HAProxy(f"{peer.name}-w{count}", threads=count)
                else:
                    if count == workers_list[0]:
                        expanded.append(peer)
                    continue
                clone.workers = count
                clone.cpu = (
                    PROXY_CPU if count == 1 else (f"0-{count - 1}" if count <= ncpu else None)
                )
                refs[clone.name] = f"haproxy-w{count}"
                bases[clone.name] = (peer.name, count)
                expanded.append(clone)
        peers = expanded
        dropped = {"mem", "bulk", "latency", "select"} - skip
        if dropped:
            log(
                f"--workers: skipping {','.join(sorted(dropped))} (new connections and "
                "keepalive only)"
            )
        skip |= dropped
    names = [p.name for p in peers]

    procs = Processes(pin)
    atexit.register(procs.stop_all)

    def on_signal(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    workdir = tempfile.mkdtemp(prefix="edgeproxy-bench-")
    started = time.time()
    results: Dict[str, Dict[str, Dict[str, Any]]] = {n: {} for n in names}
    raw: Dict[str, Dict[str, List[Any]]] = {n: {} for n in names}
    notes: List[str] = []
    lat_rate: Optional[float] = None
    lat_conns = 0
    lat_delay_ms = 2
    interrupted = False

    def record(peer: str, key: str, value: Any) -> None:
        raw[peer].setdefault(key, []).append(value)

    try:
        log(
            f"workdir {workdir}; peers {names}; rounds {rounds}; {duration}s per test; "
            f"{idle_n} idle conns"
        )
        b = start_backends(procs, workdir)
        # warm the backend
        wrk(procs, workdir, b.http_port, 1, 8)

        if "latency" not in skip:
            lat_rate = args.latency_rate
            if lat_rate is None:
                # fixed load for every latency test of the run: half of the
                # reference peer's (edgeproxy's) keepalive saturation
                ref = next((p for p in peers if p.name == "edgeproxy"), peers[0])
                pdir = os.path.join(workdir, "calibrate")
                os.makedirs(pdir, exist_ok=True)
                running = ref.start(procs, b, pdir, max_conns)
                try:
                    wrk(procs, pdir, running.http_port, 1, 8)
                    w = wrk(procs, pdir, running.http_port, min(duration, 3.0), args.conns)
                finally:
                    for p in running.procs:
                        procs.stop(p)
                lat_rate = w["rps"] / 2
                log(f"calibration: {ref.name} keepalive saturation {w['rps']:,.0f} req/s")
            # each connection sends, waits for the answer, then sleeps delay_ms
            lat_conns = max(1, min(2000, round(lat_rate * (lat_delay_ms + 0.3) / 1000)))
            log(
                f"latency load: {lat_conns} connections x 1 request then a random pause "
                f"(exponential, mean {lat_delay_ms} ms) "
                f"(target {lat_rate:,.0f} req/s)"
            )

        for r in range(rounds):
            for peer in peers:
                log(f"round {r + 1}/{rounds}: {peer.name}")
                pdir = os.path.join(workdir, f"r{r}-{peer.name}")
                os.makedirs(pdir, exist_ok=True)
                running = peer.start(procs, b, pdir, max_conns)
                try:
                    if "mem" not in skip and running.rss_pid:
                        m = idle_memory(procs, running, b.http_port, idle_n, timeout=90)
                        record(peer.name, "mem_detail", m)
                        if m["proxied"] < m["opened"]:
                            notes.append(
                                f"{peer.name} round {r + 1}: only {m['proxied']} of "
                                f"{m['opened']} idle "
                                "connections reached the backend"
                            )
                        record(peer.name, "mem_per_conn", m["bytes_per_conn"])
                        time.sleep(0.5)
                    # warm-up (JITs, caches, first-connection paths)
                    warmup = float(getattr(peer, "knobs", {}).get("warmup", args.warmup))
                    wrk(procs, pdir, running.http_port, warmup, 8, close=True)
                    wrk(procs, pdir, running.http_port, warmup, 8)
                    pids = [p.pid for p in running.procs]
                    # "others" on the proxy's cores is noise only where the
                    # proxy has its core to itself
                    own_core = len(_cores(peer.cpu)) == 1
                    if "conn" not in skip:
                        cm = CpuMeter(pids, peer.cpu)
                        w = wrk(procs, pdir, running.http_port, duration, args.conns, close=True)
                        w["cpu"] = cpu = cm.stop()
                        record(peer.name, "conn_detail", w)
                        record(peer.name, "conn_rate", w["rps"])
                        if pids and cpu["proxy_cpu_s"] > 0:
                            record(peer.name, "conn_per_cpu", w["requests"] / cpu["proxy_cpu_s"])
                            record(
                                peer.name, "conn_cpu_us", 1e6 * cpu["proxy_cpu_s"] / w["requests"]
                            )
                            record(peer.name, "conn_util", cpu["proxy_util"])
                            if own_core:
                                record(peer.name, "core_other", 100 * cpu["core_other_util"])
                            worker_shares(peer, pids, cpu, record, notes, r, "conn")
                    if "keepalive" not in skip:
                        cm = CpuMeter(pids, peer.cpu)
                        w = wrk(procs, pdir, running.http_port, duration, args.conns)
                        w["cpu"] = cpu = cm.stop()
                        record(peer.name, "keepalive_detail", w)
                        record(peer.name, "keepalive_rps", w["rps"])
                        if pids and cpu["proxy_cpu_s"] > 0:
                            record(
                                peer.name, "keepalive_per_cpu", w["requests"] / cpu["proxy_cpu_s"]
                            )
                            record(peer.name, "keepalive_util", cpu["proxy_util"])
                            if own_core:
                                record(peer.name, "core_other", 100 * cpu["core_other_util"])
                            worker_shares(peer, pids, cpu, record, notes, r, "keepalive")
                    if "bulk" not in skip:
                        cm = CpuMeter(pids, peer.cpu)
                        g = iperf(procs, b, running.bulk_port, bulk_duration)
                        cpu = cm.stop()
                        record(peer.name, "bulk_gbps", g)
                        record(peer.name, "bulk_cpu", cpu)
                        if pids and cpu["proxy_util"] > 0:
                            record(peer.name, "bulk_per_cpu", g / cpu["proxy_util"])
                            record(peer.name, "core_other", 100 * cpu["core_other_util"])
                    if "latency" not in skip and lat_conns:
                        w = wrk(
                            procs,
                            pdir,
                            running.http_port,
                            duration,
                            lat_conns,
                            delay_ms=lat_delay_ms,
                        )
                        record(peer.name, "lat_detail", w)
                        record(peer.name, "lat_p50", float(w["p50_us"]))
                        record(peer.name, "lat_p99", float(w["p99_us"]))
                        record(peer.name, "lat_rate", w["rps"])
                finally:
                    for p in running.procs:
                        procs.stop(p)
                    if running.logfile:
                        n_bad, first = log_trouble(running.logfile)
                        if n_bad:
                            notes.append(
                                f"{peer.name} round {r + 1}: {n_bad} log line(s) like trouble, "
                                f"first: {' | '.join(first)}"
                            )

        if "select" not in skip and any(isinstance(p, Edgeproxy) for p in peers):
            log("routing decision timing (in-process, pinned to the proxy core)")
            sel = routing_decision(procs, args.quick)
        else:
            sel = {}
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: stopping every process")
        sel = {}
    finally:
        procs.stop_all()

    # ------------------------------------------------ summary
    for n in names:
        for key in (
            "mem_per_conn",
            "conn_rate",
            "keepalive_rps",
            "bulk_gbps",
            "lat_p50",
            "lat_p99",
            "lat_rate",
            "conn_per_cpu",
            "keepalive_per_cpu",
            "bulk_per_cpu",
            "conn_cpu_us",
            "conn_util",
            "keepalive_util",
            "worker_max_share",
            "supervisor_share",
            "core_other",
        ):
            if key in raw[n]:
                results[n][key] = summarise(raw[n][key])
    if "direct" in results:
        for q in ("p50", "p99"):
            d = results["direct"].get(f"lat_{q}")
            for n in names:
                s = results[n].get(f"lat_{q}")
                if d and s and d["median"] is not None:
                    # added = peer minus direct's median, per round value
                    vals = [v - d["median"] for v in s["values"]]
                    results[n][f"lat_{q}_added"] = summarise(vals)
    else:
        for n in names:
            for q in ("p50", "p99"):
                if f"lat_{q}" in results[n]:
                    results[n][f"lat_{q}_added"] = results[n][f"lat_{q}"]
        notes.append("no direct peer: latency columns are absolute, not added")
    for n in names:
        ref_name = refs.get(n, "haproxy")
        if ref_name in results:
            ratios = {}
            for key, _, _, _ in MEASURES:
                a, h = results[n].get(key), results[ref_name].get(key)
                if a and h and a["median"] is not None and h["median"]:
                    ratios[key] = a["median"] / h["median"]
            results[n]["ratio_to_haproxy"] = ratios  # type: ignore[assignment]

    sel_res = sel.get("result") if isinstance(sel, dict) else None
    table = print_table(results, names, refs, WORKER_MEASURES if workers_list else None)
    print()
    if workers_list:
        print(
            f"median [min..max] over {rounds} round(s); x = ratio to the median of HAProxy "
            "with as many threads (-wN: --workers N / nbthread N)"
        )
    else:
        print(f"median [min..max] over {rounds} round(s); x = ratio to HAProxy's median")
    print(table)
    scaling: List[Dict[str, Any]] = []
    if workers_list:
        hard_limited = [
            p.name for p in peers if isinstance(p, Edgeproxy) and int(p.knobs.get("hardlimit", 0))
        ]
        scaling = scaling_report(results, bases, hard_limited)
        if scaling:
            print()
            print("scaling (per proxy CPU-second, -wN against -w1 of the same peer):")
            for line in scaling:
                print("  " + line["text"])
    if sel:
        print()
        if sel_res is not None:
            parts = []
            for size in (10, 1000, 10000):
                med = _selection_median(sel_res, size)
                parts.append(
                    f"{size:,} backends: {med:.2f} µs" if med is not None else f"{size:,}: ?"
                )
            print("routing decision (median per call): " + "; ".join(parts))
            worst = [
                f"{n:,}: {sel_res[str(n)]['worst_median_us']:.2f} µs "
                f"({sel_res[str(n)]['worst_case']})"
                for n in (10, 1000, 10000)
                if isinstance(sel_res.get(str(n)), dict) and "worst_median_us" in sel_res[str(n)]
            ]
            if worst:
                print("  slowest case: " + "; ".join(worst))
            print(f"  source: {sel.get('source')}")
        else:
            print(f"routing decision: {sel}")

    targets = evaluate_targets(results, sel_res)
    if targets:
        print()
        print("targets (edgeproxy vs haproxy, same run):")
        for t in targets:
            print(
                f"  {'MET ' if t['met'] else 'MISS' if t['met'] is False else ' ?  '} "
                f"{t['what']}: {t['value']}"
            )
    for note in notes:
        print(f"note: {note}")

    out = {
        "meta": {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
            "seconds": round(time.time() - started, 1),
            "interrupted": interrupted,
            "rounds": rounds,
            "duration": duration,
            "idle_conns": idle_n,
            "wrk_conns": args.conns,
            "latency_load": {"rate_target": lat_rate, "conns": lat_conns, "delay_ms": lat_delay_ms},
            "pinned": pin,
            "loadgen_cpu": LOADGEN_CPU,
            "proxy_cpu": PROXY_CPU,
            "peers": names,
            "variants": variants,
            "workers": workers_list,
            "proxy_cpus": {p.name: p.cpu for p in peers},
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "cpu": _cpu_model(),
            "versions": _versions(),
        },
        "results": results,
        "raw": raw,
        "routing_decision": sel,
        "targets": targets,
        "scaling": scaling,
        "notes": notes,
        "table": table,
    }
    path = args.json or os.path.join(HERE, "results", time.strftime("%Y%m%d-%H%M%S") + ".json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=2, default=str)
    print(f"\nJSON written to {path}")
    if args.keep_workdir or interrupted:
        print(f"configs and logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 130 if interrupted else 0


def worker_shares(
    peer: Peer,
    roots: Sequence[int],
    cpu: Dict[str, Any],
    record: Callable[[str, str, Any], None],
    notes: List[str],
    rnd: int,
    test: str,
) -> None:
    """
    For a peer with several worker processes: the busiest worker's share of
    the workers' CPU and the supervisor's (the root's) share of the whole
    tree's, and a note if a process started or ended during the test.
    """
    if peer.workers < 2 or not isinstance(peer, Edgeproxy):
        return
    per = {int(k): v for k, v in cpu["per_process_cpu_s"].items()}
    root = sum(per.get(pid, 0.0) for pid in roots)
    workers = [v for pid, v in per.items() if pid not in roots]
    total = cpu["proxy_cpu_s"]
    if workers and sum(workers) > 0:
        record(peer.name, "worker_max_share", 100 * max(workers) / sum(workers))
    if total > 0:
        record(peer.name, "supervisor_share", 100 * root / total)
    if len(workers) != peer.workers:
        notes.append(
            f"{peer.name} round {rnd + 1} {test}: {len(workers)} worker processes "
            f"(expected {peer.workers})"
        )
    if cpu["started"] or cpu["ended"]:
        notes.append(
            f"{peer.name} round {rnd + 1} {test}: processes started {cpu['started']} / "
            f"ended {cpu['ended']} during the test"
        )


def scaling_report(
    results: Dict[str, Dict[str, Dict[str, Any]]],
    bases: Dict[str, Tuple[str, int]],
    hard_limited: Sequence[str] = (),
) -> List[Dict[str, Any]]:
    """
    Per peer and worker count N > 1: new connections and keepalive requests
    per proxy CPU-second with N against with 1 (the scaling figure, target
    >= 0.9), its complement (the sharing overhead), the wall-clock ratio,
    and for edgeproxy peers with a hard limit the per-connection CPU against
    the same count without one.
    """
    out: List[Dict[str, Any]] = []
    by_base: Dict[str, Dict[int, str]] = {}
    for name, (base, n) in bases.items():
        by_base.setdefault(base, {})[n] = name

    def med(name: str, key: str) -> Optional[float]:
        s = results.get(name, {}).get(key)
        return None if not s else s.get("median")

    for base, counts in by_base.items():
        one = counts.get(1)
        if one is None:
            continue
        for n, name in sorted(counts.items()):
            if n == 1:
                continue
            entry: Dict[str, Any] = {"peer": base, "workers": n}
            parts = []
            for key, what in (("conn_per_cpu", "new conns"), ("keepalive_per_cpu", "requests")):
                a, b = med(name, key), med(one, key)
                if a and b:
                    ratio = a / b
                    entry[key] = {"ratio": ratio, "overhead": 1 - ratio}
                    parts.append(f"{what} {ratio:.2f} (overhead {100 * (1 - ratio):+.0f}%)")
            a, b = med(name, "conn_rate"), med(one, "conn_rate")
            if a and b:
                entry["conn_rate_ratio"] = a / b
                parts.append(f"wall-clock new conns/s {a / b:.2f}x")
            c = entry.get("conn_per_cpu")
            verdict = "" if c is None else ("MET  " if c["ratio"] >= 0.9 else "MISS ")
            entry["met"] = None if c is None else c["ratio"] >= 0.9
            entry["text"] = f"{verdict}{base} {n} vs 1: " + "; ".join(parts)
            out.append(entry)
    # the hard limit's cost: a peer whose knobs set hardlimit, against the
    # plain edgeproxy with as many workers
    for name, (base, n) in bases.items():
        if name not in hard_limited:
            continue
        plain = by_base.get("edgeproxy", {}).get(n)
        a, b = med(name, "conn_cpu_us"), med(plain, "conn_cpu_us") if plain else None
        if a and b:
            out.append(
                {
                    "peer": base,
                    "workers": n,
                    "conn_cpu_us": a,
                    "edgeproxy_conn_cpu_us": b,
                    "text": f"hard limit, {n} worker(s): {base} {a:.0f} µs of proxy CPU per new "
                    f"connection against edgeproxy's {b:.0f} ({100 * (a / b - 1):+.1f}%)",
                }
            )
    return out


def evaluate_targets(
    results: Dict[str, Dict[str, Dict[str, Any]]], sel_res: Any
) -> List[Dict[str, Any]]:
    ep, ha = results.get("edgeproxy"), results.get("haproxy")
    out: List[Dict[str, Any]] = []
    if not ep:
        return out

    def ratio(key: str) -> Optional[float]:
        r: Optional[float] = ep.get("ratio_to_haproxy", {}).get(key)  # type: ignore[union-attr]
        return r

    if ha:
        for key, what, goal in (
            ("conn_rate", "new connections/s >= 0.8x HAProxy", 0.8),
            ("keepalive_rps", "keepalive requests/s >= 0.8x HAProxy", 0.8),
            ("bulk_gbps", "one-stream bulk >= 1.0x HAProxy", 1.0),
        ):
            r = ratio(key)
            out.append(
                {
                    "what": what,
                    "value": f"{r:.2f}x" if r is not None else "?",
                    "met": None if r is None else r >= goal,
                }
            )
        m, h = ep.get("mem_per_conn"), ha.get("mem_per_conn")
        if m and h and m["median"] is not None and h["median"] is not None:
            out.append(
                {
                    "what": "memory per idle conn <= HAProxy's",
                    "value": f"{m['median']:,.0f} B vs {h['median']:,.0f} B",
                    "met": m["median"] <= h["median"],
                }
            )
    p99 = ep.get("lat_p99_added")
    if p99 and p99["median"] is not None:
        out.append(
            {
                "what": "latency p99 added over direct <= 1 ms",
                "value": f"{p99['median']:.0f} µs",
                "met": p99["median"] <= 1000,
            }
        )
    m10k = _selection_median(sel_res, 10000) if sel_res is not None else None
    if m10k is not None:
        out.append(
            {
                "what": "routing decision, 10,000 backends <= 10 µs",
                "value": f"{m10k:.2f} µs",
                "met": m10k <= 10,
            }
        )
    return out


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return platform.processor()


def _versions() -> Dict[str, str]:
    v: Dict[str, str] = {}
    for tool, argv in (
        ("haproxy", ["haproxy", "-v"]),
        ("nginx", ["nginx", "-v"]),
        ("wrk", ["wrk", "-v"]),
        ("iperf3", ["iperf3", "--version"]),
    ):
        if shutil.which(tool):
            try:
                r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
                v[tool] = (
                    (r.stdout + r.stderr).strip().splitlines()[0]
                    if (r.stdout + r.stderr).strip()
                    else "?"
                )
            except (OSError, subprocess.TimeoutExpired, IndexError):
                v[tool] = "?"
    try:
        import twisted

        v["twisted"] = twisted.__version__
    except ImportError:
        pass
    return v


if __name__ == "__main__":
    sys.exit(main())
