"""
C{edgeproxy-ctl}: the operator's command line, talking to a running
proxy's admin API (C{--admin URL}, default C{http://127.0.0.1:8090}; a
bearer token from C{--token-file} or C{$EDGEPROXY_API_TOKEN})::

    edgeproxy-ctl backends                       # every backend: state and load
    edgeproxy-ctl backend gru-1
    edgeproxy-ctl register gru-9 --app web --region sa --country BR --ip 10.50.1.9 --port 8080
    edgeproxy-ctl heartbeat gru-9
    edgeproxy-ctl deregister gru-9
    edgeproxy-ctl drain gru-1 --deadline 600 --reason "kernel update"
    edgeproxy-ctl maint gru-1
    edgeproxy-ctl ready gru-1
    edgeproxy-ctl reload
    edgeproxy-ctl explain 90.85.1.1 --app web

C{edgeproxy-ctl state list|set ...} edits the state file itself
(C{--state-file}) for when the API cannot be reached; the proxy applies it
within a second.  C{--json} prints machine-readable output; the exit status
is non-zero on any failure, with a one-line reason on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Dict, List, Mapping, Optional, Sequence, TextIO, Tuple

from edgeproxy.routing.admin import DRAIN, STATES, AdminState
from edgeproxy.stores.statefile import StateFileError, load_states, save_states

__all__ = ["main", "main_exit"]

DEFAULT_STATE_FILE = "edgeproxy-state.json"
DEFAULT_ADMIN_URL = "http://127.0.0.1:8090"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeproxy-ctl", description="Operate a running edgeproxy through its admin API."
    )
    parser.add_argument(
        "--admin",
        default=os.environ.get("EDGEPROXY_ADMIN_URL", DEFAULT_ADMIN_URL),
        metavar="URL",
        help="the proxy's admin listener [default: $EDGEPROXY_ADMIN_URL or %(default)s]",
    )
    parser.add_argument(
        "--token-file",
        default=os.environ.get("EDGEPROXY_API_TOKEN_FILE"),
        metavar="PATH",
        help="a file whose first token is sent as the bearer token"
        " [default: $EDGEPROXY_API_TOKEN_FILE; or the token in $EDGEPROXY_API_TOKEN]",
    )
    parser.add_argument(
        "--timeout", type=float, default=10.0, metavar="SECS", help="per request [default: 10]"
    )
    parser.add_argument(
        "--state-file",
        default=os.environ.get("EDGEPROXY_STATE_FILE", DEFAULT_STATE_FILE),
        help="for 'state': the proxy's --state-file, edited directly"
        " [default: $EDGEPROXY_STATE_FILE or %(default)s]",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("backends", help="every backend with its state and load")
    show = sub.add_parser("backend", help="one backend")
    show.add_argument("id")
    reg = sub.add_parser("register", help="register a backend (it heartbeats from then on)")
    reg.add_argument("id")
    reg.add_argument("--app", required=True)
    reg.add_argument("--region", required=True)
    reg.add_argument("--country")
    reg.add_argument("--ip", required=True, help="address (or host name) to connect to")
    reg.add_argument("--port", type=int, required=True)
    reg.add_argument("--weight", type=int)
    reg.add_argument("--soft-limit", type=int)
    reg.add_argument("--hard-limit", type=int)
    beat = sub.add_parser("heartbeat", help="a registered backend is alive")
    beat.add_argument("id")
    gone = sub.add_parser("deregister", help="remove a registered backend")
    gone.add_argument("id")
    for name, what in (
        ("drain", "no new clients; bound ones finish"),
        ("maint", "no traffic; open connections closed"),
        ("ready", "back to normal"),
    ):
        setting = sub.add_parser(name, help=f"admin state {name}: {what}")
        setting.add_argument("id")
        if name == "drain":
            setting.add_argument(
                "--deadline",
                type=float,
                metavar="SECONDS",
                help="close what is still open after this many seconds",
            )
        setting.add_argument("--reason", default="", help="free text, shown to other operators")
    sub.add_parser("reload", help="reload the routing table now")
    why = sub.add_parser("explain", help="why a client would get the backend it gets")
    why.add_argument("ip")
    why.add_argument("--app")

    state = sub.add_parser(
        "state", help="admin states in the state file itself (when the API is not reachable)"
    )
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


class ApiError(Exception):
    """
    The admin API answered an error, or could not be reached.
    """


def _token(args: argparse.Namespace) -> Optional[str]:
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as f:
                for line in f:
                    token = line.split("#", 1)[0].split()
                    if token:
                        return token[0]
        except OSError as e:
            raise ApiError(f"cannot read {args.token_file}: {e.strerror or e}") from None
        raise ApiError(f"{args.token_file} holds no token")
    return os.environ.get("EDGEPROXY_API_TOKEN") or None


def call(
    args: argparse.Namespace, method: str, path: str, body: Optional[Mapping[str, Any]] = None
) -> Any:
    """
    One request to the admin API; the decoded JSON answer.

    @raise ApiError: With the API's own error message when it answered one.
    """
    url = args.admin.rstrip("/") + path
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Accept", "application/json")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    token = _token(args)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as response:
            raw = response.read()
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            detail = json.loads(raw)
            message = detail.get("error") or detail
            extra = detail.get("detail")
        except (ValueError, AttributeError):
            message, extra = raw.decode("utf-8", "replace").strip(), None
        text = f"{method} {path}: {e.code} {message}"
        if extra:
            text += f" ({extra})"
        raise ApiError(text) from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ApiError(f"cannot reach the admin API at {args.admin}: {reason}") from None
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        raise ApiError(f"{method} {path}: the answer is not JSON") from None


def _table(rows: List[Mapping[str, Any]], columns: List[Tuple[str, str]], out: TextIO) -> None:
    cells = [[_cell(row.get(key)) for key, _ in columns] for row in rows]
    widths = [
        max([len(title)] + [len(c[i]) for c in cells]) for i, (_, title) in enumerate(columns)
    ]
    print("  ".join(t.ljust(w) for (_, t), w in zip(columns, widths)).rstrip(), file=out)
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)).rstrip(), file=out)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.1f}"
    if isinstance(value, Mapping):
        return value.get("state") or json.dumps(value, sort_keys=True)
    return str(value)


_BACKEND_COLUMNS = [
    ("id", "backend"),
    ("app", "app"),
    ("region", "region"),
    ("country", "country"),
    ("address", "address"),
    ("available", "takes new"),
    ("health", "health"),
    ("breaker", "breaker"),
    ("admin", "admin"),
    ("load", "conns"),
    ("soft_limit", "soft"),
    ("hard_limit", "hard"),
    ("last_heartbeat_secs", "heartbeat age"),
]


def _backendRows(answer: Any) -> List[Mapping[str, Any]]:
    rows = answer.get("backends", answer) if isinstance(answer, Mapping) else answer
    if not isinstance(rows, list):
        raise ApiError("unexpected answer from /api/v1/backends")
    result: List[Mapping[str, Any]] = []
    for row in rows:
        row = dict(row)
        host = row.get("ip", row.get("host"))
        if "address" not in row and host is not None:
            row["address"] = (
                f"[{host}]:{row.get('port')}" if ":" in host else f"{host}:{row.get('port')}"
            )
        if row.get("hard_limit") == 0:
            row["hard_limit"] = "none"
        result.append(row)
    return result


def _api(args: argparse.Namespace, out: TextIO) -> int:
    quoted = urllib.parse.quote
    command = args.command
    if command == "backends":
        answer = call(args, "GET", "/api/v1/backends")
        if args.json:
            return _dump(answer, out)
        _table(_backendRows(answer), _BACKEND_COLUMNS, out)
        return 0
    if command == "backend":
        answer = call(args, "GET", f"/api/v1/backends/{quoted(args.id, safe='')}")
        if args.json:
            return _dump(answer, out)
        for key, value in (
            answer.get("backend", answer) if isinstance(answer, dict) else {}
        ).items():
            print(f"{key:<16} {_cell(value)}", file=out)
        return 0
    if command == "register":
        body: Dict[str, Any] = {
            "id": args.id,
            "app": args.app,
            "region": args.region,
            "ip": args.ip,
            "port": args.port,
        }
        for key in ("country", "weight", "soft_limit", "hard_limit"):
            value = getattr(args, key)
            if value is not None:
                body[key] = value
        answer = call(args, "POST", "/api/v1/register", body)
        return _done(args, answer, f"{args.id}: registered", out)
    if command == "heartbeat":
        answer = call(args, "POST", f"/api/v1/heartbeat/{quoted(args.id, safe='')}", {})
        return _done(args, answer, f"{args.id}: alive", out)
    if command == "deregister":
        answer = call(args, "DELETE", f"/api/v1/backends/{quoted(args.id, safe='')}")
        return _done(args, answer, f"{args.id}: deregistered", out)
    if command in ("drain", "maint", "ready"):
        body = {"state": command, "reason": args.reason}
        deadline = getattr(args, "deadline", None)
        if deadline is not None:
            if not deadline > 0:
                raise ValueError("--deadline must be a positive number of seconds")
            body["deadline"] = deadline
        answer = call(args, "PUT", f"/api/v1/backends/{quoted(args.id, safe='')}/state", body)
        return _done(args, answer, f"{args.id}: {command}", out)
    if command == "reload":
        answer = call(args, "POST", "/api/v1/reload", {})
        summary = "routing table reloaded"
        if isinstance(answer, Mapping):
            summary += ": " + ", ".join(f"{k} {_cell(v)}" for k, v in sorted(answer.items()))
        return _done(args, answer, summary, out)
    if command == "explain":
        query = {"ip": args.ip}
        if args.app:
            query["app"] = args.app
        answer = call(args, "GET", "/api/v1/explain?" + urllib.parse.urlencode(query))
        if args.json:
            return _dump(answer, out)
        _explain(answer, out)
        return 0
    raise ValueError(f"unknown command {command!r}")


def _explain(answer: Mapping[str, Any], out: TextIO) -> None:
    geo = answer.get("geo") or {}
    where = (
        f"country {geo.get('country') or '-'}, region {geo.get('region') or '-'}"
        if geo
        else "no geo"
    )
    print(
        f"client {answer.get('client_ip')}: {where}; this POP's region is"
        f" {answer.get('local_region')}",
        file=out,
    )
    if answer.get("binding"):
        print(f"  bound to {answer['binding']}", file=out)
    if answer.get("rtt_weight"):
        print(f"  rtt weight {answer['rtt_weight']:g} per ms", file=out)
    for c in answer.get("candidates", []):
        rtt = ""
        if "rtt_term" in c:
            ms = c.get("rtt_ms")
            rtt = (
                f", rtt {ms:g} ms" if ms is not None else ", rtt unmeasured"
            ) + f" +{c['rtt_term'] or 0.0:.3f}"
        print(
            f"  {c['id']:<8} tier {c['tier']}  score {c['score']:.3f}  (load {c['load']},"
            f" soft_limit {c['soft_limit']}, weight {c['weight']}{rtt})",
            file=out,
        )
    for e in answer.get("excluded", []):
        print(f"  {e['id']:<8} not a candidate: {e['reason']}", file=out)


def _dump(answer: Any, out: TextIO) -> int:
    json.dump(answer, out, indent=1, sort_keys=True)
    out.write("\n")
    return 0


def _done(args: argparse.Namespace, answer: Any, summary: str, out: TextIO) -> int:
    if args.json:
        return _dump(answer, out)
    print(summary, file=out)
    return 0


def main(argv: Optional[Sequence[str]] = None, out: TextIO = sys.stdout) -> int:
    """
    Run the command line; return the exit status.
    """
    args = _parser().parse_args(argv)
    try:
        if args.command != "state":
            return _api(args, out)
        if args.action == "list":
            return _list(args.state_file, args.json, out)
        return _set(args, out)
    except (ApiError, StateFileError, ValueError) as e:
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
