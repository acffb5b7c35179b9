#!/usr/bin/env python3
"""
Profile edgeproxy under load: the same backends, routing table and pinning
as C{bench/run.py}, one load pattern at a time, with py-spy (sampling, from
outside the process) or pyinstrument (inside it).

    python bench/profile.py [--load conn|keepalive|bulk] [--duration 10]
                            [--tool py-spy|pyinstrument] [--out DIR]
                            [--variant KEY=VAL,...]

Writes to C{--out} (default C{bench/results/profile-<load>-<time>/}):
  - C{py-spy.speedscope.json} (open in https://www.speedscope.app) and
    C{py-spy.collapsed.txt} (collapsed stacks), plus a summary on stdout:
    the functions with the most samples on top of the stack (self) and
    anywhere on it (total), as % of all samples;
  - or C{pyinstrument.txt} / C{pyinstrument.html}.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import run  # noqa: E402  (bench/run.py, the harness)


def summarise_collapsed(path: str, top: int = 25) -> str:
    """
    Self and total sample shares per function from a py-spy collapsed file.
    """
    self_counts: Dict[str, int] = collections.Counter()
    total_counts: Dict[str, int] = collections.Counter()
    samples = 0
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            stack, _, n_s = line.rpartition(" ")
            try:
                n = int(n_s)
            except ValueError:
                continue
            frames = [
                fr.split(" (")[0] + " (" + fr.split(" (")[1].split(":")[0].rsplit("/", 1)[-1] + ")"
                if " (" in fr
                else fr
                for fr in stack.split(";")
            ]
            samples += n
            self_counts[frames[-1]] += n
            for fr in set(frames):
                total_counts[fr] += n
    if not samples:
        return "no samples"
    lines = [f"{samples} samples", "", "self %   function (file)"]
    for fr, n in sorted(self_counts.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"{100 * n / samples:6.1f}   {fr}")
    lines += ["", "total %  function (file)"]
    for fr, n in sorted(total_counts.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"{100 * n / samples:6.1f}   {fr}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description="profile edgeproxy under one load pattern")
    ap.add_argument("--load", choices=["conn", "keepalive", "bulk"], default="conn")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--tool", choices=["py-spy", "pyinstrument"], default="py-spy")
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--conns", type=int, default=50)
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--variant", default="", help="knobs as for bench/run.py --variant (KEY=VAL,...)"
    )
    a = ap.parse_args()
    if not 0 < a.duration <= 120:
        ap.error("duration must be in (0, 120]")
    out = a.out or os.path.join(
        HERE, "results", f"profile-{a.load}-{a.tool}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    os.makedirs(out, exist_ok=True)
    pyspy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if a.tool == "py-spy" and not os.path.exists(pyspy):
        print("py-spy not found: pip install py-spy", file=sys.stderr)
        return 2

    knobs = dict(kv.split("=", 1) for kv in a.variant.split(",") if "=" in kv)
    procs = run.Processes(pin=(os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None)
    workdir = tempfile.mkdtemp(prefix="edgeproxy-profile-")
    try:
        b = run.start_backends(procs, workdir)
        peer = run.Edgeproxy("edgeproxy", knobs)
        running = start_peer(peer, procs, b, workdir, a.tool, out)
        run.wrk(procs, workdir, running.http_port, 1, 8)  # warm-up
        sampler = None
        if a.tool == "py-spy":
            raw = os.path.join(out, "py-spy.collapsed.txt")
            sampler = subprocess.Popen(
                [
                    pyspy,
                    "record",
                    "-p",
                    str(running.rss_pid),
                    "-r",
                    str(a.rate),
                    "-d",
                    str(int(a.duration) + 1),
                    "-f",
                    "raw",
                    "-o",
                    raw,
                    "--nonblocking",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            time.sleep(0.5)
        t0 = time.monotonic()
        if a.load == "conn":
            r = run.wrk(procs, workdir, running.http_port, a.duration, a.conns, close=True)
            result = f"{r['rps']:,.0f} new connections/s (errors {r['errors']})"
        elif a.load == "keepalive":
            r = run.wrk(procs, workdir, running.http_port, a.duration, a.conns)
            result = f"{r['rps']:,.0f} requests/s (errors {r['errors']})"
        else:
            g = run.iperf(procs, b, running.bulk_port, a.duration)
            result = f"{g:.2f} Gbit/s"
        elapsed = time.monotonic() - t0
        print(f"load {a.load}: {result} over {elapsed:.1f}s (under the profiler)")
        if sampler is not None:
            try:
                _, err = sampler.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                sampler.kill()
                _, err = sampler.communicate()
            raw = os.path.join(out, "py-spy.collapsed.txt")
            if os.path.exists(raw):
                summary = summarise_collapsed(raw)
                with open(os.path.join(out, "summary.txt"), "w") as f:
                    f.write(f"load {a.load}: {result}\n\n{summary}\n")
                print(summary)
            else:
                print("py-spy wrote nothing:", err.decode(errors="replace")[-500:])
        for p in running.procs:
            procs.stop(p, grace=90.0)  # pyinstrument renders at exit
        if a.tool == "pyinstrument":
            txt = os.path.join(out, "pyinstrument.txt")
            if os.path.exists(txt):
                with open(txt) as f:
                    print(f.read()[:8000])
        print(f"output in {out}")
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def start_peer(
    peer: "run.Edgeproxy",
    procs: "run.Processes",
    b: "run.Backends",
    workdir: str,
    tool: str,
    out: str,
) -> "run.Running":
    if tool != "pyinstrument":
        return peer.start(procs, b, workdir, 5000)
    # Same command as Edgeproxy.start, under pyinstrument.
    original_start = procs.start

    def start(argv: List[str], cpu: str | None, **kw: Any) -> "subprocess.Popen[bytes]":
        argv = list(argv)
        if argv[1:3] == ["-m", "twisted"] or argv[1].endswith("twist_knobs.py"):
            rest = argv[3:] if argv[1] == "-m" else argv[2:]
            argv = [
                argv[0],
                "-m",
                "pyinstrument",
                "-i",
                "0.001",
                "-r",
                "text",
                "-o",
                os.path.join(out, "pyinstrument.txt"),
                os.path.join(HERE, "twist_knobs.py"),
                *rest,
            ]
            env = dict(kw.get("env") or os.environ)
            env["EDGEPROXY_BENCH_NO_EXIT_SIGNAL"] = "1"
            kw["env"] = env
        return original_start(argv, cpu, **kw)  # type: ignore[arg-type]

    procs.start = start  # type: ignore[method-assign]
    try:
        return peer.start(procs, b, workdir, 5000)
    finally:
        procs.start = original_start  # type: ignore[method-assign]


if __name__ == "__main__":
    sys.exit(main())
