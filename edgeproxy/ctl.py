"""
C{edgeproxy-ctl}: the operator's command line.

For now it manages the admin states in the state file that a running
proxy watches (C{--state-file}; the proxy applies a change within its poll
interval, about a second)::

    edgeproxy-ctl --state-file /var/lib/edgeproxy/state.json state list
    edgeproxy-ctl --state-file ... state set gru-1 drain --deadline 600 --reason "kernel"
    edgeproxy-ctl --state-file ... state set gru-1 maint
    edgeproxy-ctl --state-file ... state set gru-1 ready

C{--json} prints machine-readable output; the exit status is non-zero on any
failure, with a one-line reason on stderr.  (The control-plane issue adds
the admin API, which this tool will talk to as well.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List, Optional, Sequence, TextIO

from edgeproxy.routing.admin import DRAIN, STATES, AdminState
from edgeproxy.stores.statefile import StateFileError, load_states, save_states

__all__ = ["main", "main_exit"]

DEFAULT_STATE_FILE = "edgeproxy-state.json"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeproxy-ctl", description="Operate a running edgeproxy."
    )
    parser.add_argument(
        "--state-file",
        default=os.environ.get("EDGEPROXY_STATE_FILE", DEFAULT_STATE_FILE),
        help="the proxy's --state-file [default: $EDGEPROXY_STATE_FILE or %(default)s]",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="command", required=True)
    state = sub.add_parser("state", help="backends' admin states (ready, drain, maint)")
    actions = state.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="every backend whose state is not ready")
    setting = actions.add_parser("set", help="set one backend's state")
    setting.add_argument("backend", help="backend id")
    setting.add_argument("state", choices=sorted(STATES))
    setting.add_argument(
        "--deadline",
        type=float,
        metavar="SECONDS",
        help="drain only: close what is still open after this many seconds",
    )
    setting.add_argument("--reason", default="", help="free text, shown to other operators")
    return parser


def main(argv: Optional[Sequence[str]] = None, out: TextIO = sys.stdout) -> int:
    """
    Run the command line; return the exit status.
    """
    args = _parser().parse_args(argv)
    try:
        if args.action == "list":
            return _list(args.state_file, args.json, out)
        return _set(args, out)
    except (StateFileError, ValueError) as e:
        print(f"edgeproxy-ctl: {e}", file=sys.stderr)
        return 1


def _list(path: str, as_json: bool, out: TextIO) -> int:
    states = load_states(path)
    if as_json:
        rows = {
            b: {"state": s.state, "deadline": s.deadline, "since": s.since, "reason": s.reason}
            for b, s in sorted(states.items())
        }
        json.dump(rows, out, indent=1)
        out.write("\n")
        return 0
    if not states:
        print("every backend is ready", file=out)
        return 0
    lines: List[str] = [f"{'backend':<24} {'state':<6} {'deadline':<20} reason"]
    for backend_id, s in sorted(states.items()):
        deadline = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.deadline)) if s.deadline else "-"
        )
        lines.append(f"{backend_id:<24} {s.state:<6} {deadline:<20} {s.reason}")
    print("\n".join(lines), file=out)
    return 0


def _set(args: argparse.Namespace, out: TextIO) -> int:
    if args.deadline is not None:
        if args.state != DRAIN:
            raise ValueError("--deadline is for drain only")
        if not args.deadline > 0:
            raise ValueError("--deadline must be a positive number of seconds")
    now = time.time()
    state = AdminState(
        state=args.state,
        deadline=now + args.deadline if args.deadline is not None else None,
        since=now,
        reason=args.reason,
    )
    states = load_states(args.state_file)
    if args.state == "ready":
        states.pop(args.backend, None)
    else:
        states[args.backend] = state
    save_states(args.state_file, states)
    if args.json:
        json.dump({"backend": args.backend, "state": args.state}, out)
        out.write("\n")
    else:
        print(f"{args.backend}: {args.state}", file=out)
    return 0


def main_exit() -> None:
    """
    The console script's entry point.
    """
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    main_exit()
