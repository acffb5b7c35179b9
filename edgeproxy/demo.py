"""
Sample backends for trying edgeproxy on one machine.

C{python -m edgeproxy.demo} listens on loopback ports 9101-9104 with four
backends that pretend to be in Brazil, France, Japan and the USA (the rows of
C{conf/routing-sample.sql}).  Each answers a connection with one line that
says who it is and which client address it was told about by the proxy's
PROXY header, then echoes whatever it receives::

    gru-1 (country BR, region sa) here; you are 90.85.1.1 port 40000 (PROXY v1 header from
    the proxy)

C{conf/demo.sh} starts these and the proxy together.

C{python -m edgeproxy.demo --connect HOST:PORT} is a small client for trying
the proxy without C{nc}: it connects, optionally sends a PROXY v1 header as if
the connection came from elsewhere (C{--proxy-from IP:PORT}), sends a line,
half-closes and prints what comes back until the other side closes.
C{--explain IP} shows how the proxy would route a client at IP.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import socket
import sys
import time
from typing import Any, BinaryIO, Dict, List, Mapping, Optional, Sequence

import attrs
from twisted.internet.defer import Deferred, FirstError, gatherResults, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHalfCloseableProtocol,
    IListeningPort,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from edgeproxy.net.proxyprotocol import ProxyHeaderError, header_for, parse

_log = Logger()

_V1 = b"PROXY "
_V2 = b"\r\n\r\n\x00\r\nQUIT\n"


@attrs.frozen
class DemoBackend:
    """
    One sample backend: what it says about itself and where it listens.
    """

    id: str
    country: str
    region: str
    port: int


#: The backends of C{conf/routing-sample.sql}.
DEMO_BACKENDS: tuple[DemoBackend, ...] = (
    DemoBackend("gru-1", "BR", "sa", 9101),
    DemoBackend("cdg-1", "FR", "eu", 9102),
    DemoBackend("nrt-1", "JP", "ap", 9103),
    DemoBackend("iad-1", "US", "us", 9104),
)


def _could_be_header(data: bytes) -> bool:
    """
    Whether C{data} is, or may still become, the start of a PROXY header.
    """
    n = min(len(data), len(_V1))
    if data[:n] == _V1[:n]:
        return True
    n = min(len(data), len(_V2))
    return data[:n] == _V2[:n]


@implementer(IHalfCloseableProtocol)
class IdentifyProtocol(Protocol):
    """
    Say who we are and who the client is, then echo.

    The client address comes from a PROXY v1/v2 header if the connection
    starts with one (edgeproxy sends it when the row's C{proxy_protocol} is 1
    or 2), else from the socket peer.  Without any data the greeting goes
    out after C{factory.greetDelay} seconds.  When the peer half-closes
    (C{--connect} does after sending) the greeting and the echo are
    still delivered, then the connection closes.
    """

    factory: "IdentifyFactory"
    transport: Any

    def __init__(self) -> None:
        self._buffer = b""
        self._greeted = False
        self._timer: Optional[IDelayedCall] = None

    def connectionMade(self) -> None:
        self._timer = self.factory.clock.callLater(self.factory.greetDelay, self._noHeader)

    def _noHeader(self) -> None:
        self._timer = None
        self._greet(None, "the socket peer; no PROXY header came")
        self._flush()

    def dataReceived(self, data: bytes) -> None:
        if self._greeted:
            self.transport.write(data)
            return
        self._buffer += data
        if not _could_be_header(self._buffer):
            self._greet(None, "the socket peer; no PROXY header came")
            self._flush()
            return
        try:
            parsed = parse(self._buffer)
        except ProxyHeaderError as e:
            self._greet(None, f"the socket peer; the PROXY header was bad: {e.reason}")
            self._flush()
            return
        if parsed is None:
            return
        header, length = parsed
        self._buffer = self._buffer[length:]
        if header.source is None:
            self._greet(None, f"the socket peer; PROXY v{header.version} {header.command}")
        else:
            self._greet(header.source, f"PROXY v{header.version} header from the proxy")
        self._flush()

    def _flush(self) -> None:
        data, self._buffer = self._buffer, b""
        if data:
            self.transport.write(data)

    def _greet(self, source: Optional[tuple[str, int]], how: str) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._greeted = True
        if source is None:
            peer: Any = self.transport.getPeer()
            source = (getattr(peer, "host", str(peer)), getattr(peer, "port", 0))
        backend = self.factory.backend
        line = (
            f"{backend.id} (country {backend.country}, region {backend.region}) here; "
            f"you are {source[0]} port {source[1]} ({how})\n"
        )
        self.transport.write(line.encode("ascii", "replace"))
        self.factory.served.append(source)

    def readConnectionLost(self) -> None:
        if not self._greeted:
            self._greet(None, "the socket peer; no PROXY header came")
            self._flush()
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class IdentifyFactory(Factory):
    """
    Builds L{IdentifyProtocol}s for one L{DemoBackend}.

    @ivar served: The client address each greeted connection was given, in
        order (for tests).
    """

    noisy = False

    def __init__(self, backend: DemoBackend, clock: Any, greetDelay: float = 0.5) -> None:
        self.backend = backend
        self.clock = clock
        self.greetDelay = greetDelay
        self.served: List[tuple[str, int]] = []

    def buildProtocol(self, addr: Optional[IAddress]) -> Optional[Protocol]:
        p = IdentifyProtocol()
        p.factory = self
        return p


def start_backends(
    reactor: Any, backends: Sequence[DemoBackend], interface: str = "127.0.0.1"
) -> "Deferred[List[IListeningPort]]":
    """
    Listen with every backend in C{backends} on C{interface}.
    """
    listening = []
    for backend in backends:
        endpoint = TCP4ServerEndpoint(reactor, backend.port, interface=interface)
        listening.append(endpoint.listen(IdentifyFactory(backend, reactor)))
    return gatherResults(listening, consumeErrors=True)


def measure_rtts(backends: Sequence[Any], timeout: float = 0.5, tries: int = 3) -> Dict[str, float]:
    """
    The connect RTT of each of C{backends} (L{edgeproxy.model.Backend}s) as
    the health checks would estimate it: C{tries} TCP connects, each closed
    at once, fed to an L{edgeproxy.net.health.RttEstimate}.  A backend whose
    connect fails is left out (unmeasured).  Blocking: for the command line
    only, never on a reactor.
    """
    from edgeproxy.net.health import RttEstimate

    found: Dict[str, float] = {}
    for b in backends:
        estimate = RttEstimate()
        for _ in range(tries):
            started = time.perf_counter()
            try:
                socket.create_connection((b.host, b.port), timeout=timeout).close()
            except OSError:
                break
            estimate.add(time.perf_counter() - started)
        else:
            if estimate.value is not None:
                found[b.id] = estimate.value
    return found


def explain(
    db: str,
    client_ip: str,
    region: str,
    app: Optional[str] = None,
    rtt_weight: float = 0.01,
    measure: bool = True,
) -> str:
    """
    Why a new client at C{client_ip} would get the backend it gets from the
    routing table in C{db} (nothing is bound or counted): the client's geo,
    then the candidates by score, best first, with their RTT and RTT term,
    then the backends that are no candidate (unhealthy, deleted,
    draining...) with the reason.

    @param rtt_weight: The proxy's C{--rtt-weight}.
    @param measure: Measure each routable backend's connect RTT now (see
        L{measure_rtts}), as the proxy's health checks do; without it every
        backend is unmeasured.
    """
    from edgeproxy.geo import GeoIPResolver
    from edgeproxy.metrics import MetricsStore
    from edgeproxy.routing.router import Router
    from edgeproxy.stores.sqlite import SqliteBackendRepository
    from edgeproxy.testing import BindingTable

    if not os.path.exists(db):
        raise SystemExit(f"no routing table at {db!r} (run conf/demo.sh first, or pass --db)")
    repository = SqliteBackendRepository(db)
    repository.loadInitial()
    geo = GeoIPResolver.fromPaths(None)
    from twisted.internet.task import Clock

    snapshot = repository.current()
    routable = snapshot.by_app.get(app, ())
    rtts = measure_rtts(routable) if measure and rtt_weight > 0 else {}
    router = Router(
        repository,
        BindingTable(),
        geo,
        MetricsStore(),
        region,
        Clock(),
        rtt=rtts,
        rtt_weight=rtt_weight,
    )
    why = router.explain(client_ip, app, limit=10)
    geo.close()
    where = why["geo"]
    lines = [
        f"client {client_ip}: "
        + (
            "no geo (loopback, private or unknown)"
            if where is None
            else f"country {where['country']}, region {where['region']}"
        )
        + f"; this POP's region is {region}",
        "  score = tier * 100 + (connections / soft_limit) / weight"
        f" + {rtt_weight:g} * rtt_ms; lowest wins",
        "  tier 0 same country, 1 same region, 2 this POP's region, 3 anything else",
    ]
    for c in why["candidates"]:
        lines.append(
            f"  {c['id']:<8} tier {c['tier']}  score {c['score']:.3f}  "
            f"(load {c['load']}, soft_limit {c['soft_limit']}, weight {c['weight']}, "
            f"{rtt_text(c)})"
        )
    for e in why["excluded"]:
        lines.append(f"  {e['id']:<8} not a candidate: {e['reason']}")
    return "\n".join(lines)


def rtt_text(candidate: Mapping[str, Any]) -> str:
    """
    A candidate's RTT and RTT term from L{Router.explain}, for humans:
    C{rtt 12 ms +0.120}, or C{rtt unmeasured, as its tier's median +0.120}.
    """
    ms = candidate.get("rtt_ms")
    term = candidate.get("rtt_term") or 0.0
    if ms is None:
        return f"rtt unmeasured, as its tier's median +{term:.3f}"
    return f"rtt {ms:g} ms +{term:.3f}"


class ClientError(Exception):
    """
    C{--connect} could not do its job; the message is one line for humans.
    """


_HOST_PORT = re.compile(r"^(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:\[\]]+)):(?P<port>[0-9]{1,5})$")


def host_port(value: str) -> tuple[str, int]:
    """
    Parse C{HOST:PORT} or C{[IPV6]:PORT}.

    @raise ValueError: If C{value} is not in that form or the port is not
        1-65535.
    """
    match = _HOST_PORT.match(value.strip())
    if match is None:
        raise ValueError(f"expected HOST:PORT or [IPV6]:PORT, got {value!r}")
    port = int(match.group("port"))
    if not 1 <= port <= 65535:
        raise ValueError(f"port out of range in {value!r}")
    return (match.group("v6") or match.group("host"), port)


def address_port(value: str) -> tuple[str, int]:
    """
    Parse C{IP:PORT} or C{[IPV6]:PORT} with a literal address (for
    C{--proxy-from}).

    @raise ValueError: If the host is not an IP address.
    """
    host, port = host_port(value)
    try:
        return (str(ipaddress.ip_address(host)), port)
    except ValueError:
        raise ValueError(f"not an IP address in {value!r}") from None


_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\"}


def unescape(text: str) -> bytes:
    """
    C{text} as UTF-8 bytes, with the escapes C{\\n}, C{\\r}, C{\\t} and
    C{\\\\} (so that a shell argument can hold a line break).

    @raise ValueError: On any other backslash escape.
    """

    def replace(match: "re.Match[str]") -> str:
        escaped = match.group(1)
        if escaped not in _ESCAPES:
            raise ValueError(f"unknown escape \\{escaped} (use \\n, \\r, \\t or \\\\)")
        return _ESCAPES[escaped]

    return re.sub(r"\\(.?)", replace, text, flags=re.DOTALL).encode("utf-8")


def connect(
    target: tuple[str, int],
    data: bytes,
    out: BinaryIO,
    proxy_from: Optional[tuple[str, int]] = None,
    timeout: float = 10.0,
) -> int:
    """
    Connect to C{target}, send a PROXY v1 header announcing C{proxy_from} as
    the client (if given) and then C{data}, half-close, and copy everything
    received to C{out} until the other side closes.

    A plain blocking client, for the command line: not for a reactor thread.

    @param timeout: Seconds for the whole exchange, connecting included.
    @return: The number of bytes received.
    @raise ClientError: If the connection is refused, fails, or does not
        end within C{timeout}.
    """
    where = f"{target[0]}:{target[1]}"
    deadline = time.monotonic() + timeout
    try:
        sock = socket.create_connection(target, timeout=timeout)
    except (TimeoutError, socket.timeout):  # one class from Python 3.10 on
        raise ClientError(f"cannot connect to {where}: no answer within {timeout:g}s") from None
    except OSError as e:
        raise ClientError(f"cannot connect to {where}: {e.strerror or e}") from None
    received = 0
    with sock:
        try:
            header = b""
            if proxy_from is not None:
                header = header_for(1, proxy_from, sock.getpeername()[:2])
            sock.sendall(header + data)
            sock.shutdown(socket.SHUT_WR)
            while True:
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                chunk = sock.recv(65536)
                if not chunk:
                    return received
                received += len(chunk)
                out.write(chunk)
                out.flush()
        except (TimeoutError, socket.timeout):
            raise ClientError(
                f"{where} did not close the connection within {timeout:g}s"
                f" ({received} bytes received)"
            ) from None
        except OSError as e:
            raise ClientError(
                f"connection to {where} failed: {e.strerror or e} ({received} bytes received)"
            ) from None


def _ids(value: str) -> tuple[str, ...]:
    """
    A comma-separated list of demo backend ids, each one that exists.
    """
    known = {b.id for b in DEMO_BACKENDS}
    ids = tuple(i.strip() for i in value.split(",") if i.strip())
    unknown = [i for i in ids if i not in known]
    if not ids or unknown:
        raise argparse.ArgumentTypeError(
            f"not a demo backend: {', '.join(unknown) or value!r}"
            f" (there are {', '.join(sorted(known))})"
        )
    return ids


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m edgeproxy.demo",
        description="Sample backends for the edgeproxy demo, and a client to try the proxy.",
    )
    parser.add_argument(
        "--connect",
        metavar="HOST:PORT",
        type=host_port,
        help="do not start backends: connect to HOST:PORT, send --send, half-close"
        " and print everything received until the connection closes",
    )
    parser.add_argument(
        "--proxy-from",
        metavar="IP:PORT",
        type=address_port,
        help="with --connect: first send a PROXY v1 header saying the client is IP:PORT",
    )
    parser.add_argument(
        "--send",
        metavar="TEXT",
        default="hello\\n",
        help="with --connect: what to send (UTF-8; \\n, \\r, \\t and \\\\ escapes);"
        " default: hello\\n",
    )
    parser.add_argument(
        "--timeout",
        metavar="SECS",
        type=float,
        default=10.0,
        help="with --connect: seconds for the whole exchange (default: 10)",
    )
    parser.add_argument(
        "--explain",
        metavar="CLIENT_IP",
        help="do not start backends: show how the proxy would route CLIENT_IP",
    )
    parser.add_argument("--db", default="routing.db", help="routing table for --explain")
    parser.add_argument("--region", default="sa", help="this POP's region for --explain")
    parser.add_argument(
        "--rtt-weight",
        metavar="W",
        type=float,
        default=0.01,
        help="with --explain: the proxy's --rtt-weight (default: 0.01); the RTTs are"
        " measured now with three TCP connects to each backend",
    )
    parser.add_argument("--interface", default="127.0.0.1", help="address to listen on")
    parser.add_argument(
        "--only",
        metavar="ID[,ID...]",
        type=_ids,
        help="start only these demo backends (e.g. --only cdg-1); default: all four",
    )
    parser.add_argument(
        "--base-port",
        type=int,
        default=DEMO_BACKENDS[0].port,
        help="port of the first backend; the others follow",
    )
    return parser


def run(argv: Sequence[str]) -> None:
    """
    The command line, C{python -m edgeproxy.demo ARGV}: C{--connect} and
    C{--explain} do their job without a reactor and return; otherwise the
    demo backends run until interrupted (L{main}).

    @raise SystemExit: With a one-line message when C{--connect} fails, and
        from argparse on a bad argument.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if args.connect is not None:
        if args.explain is not None:
            parser.error("--connect and --explain do not go together")
        try:
            data = unescape(args.send)
        except ValueError as e:
            parser.error(f"--send: {e}")
        try:
            received = connect(args.connect, data, sys.stdout.buffer, args.proxy_from, args.timeout)
        except ClientError as e:
            raise SystemExit(f"{parser.prog}: {e}") from None
        if not received:
            print(
                f"{parser.prog}: the connection closed without any data",
                file=sys.stderr,
            )
        return
    if args.proxy_from is not None:
        parser.error("--proxy-from needs --connect")
    if not 0 <= args.rtt_weight < float("inf"):
        parser.error(f"--rtt-weight must be a number >= 0, not {args.rtt_weight!r}")
    if args.explain is not None:
        print(explain(args.db, args.explain, args.region, rtt_weight=args.rtt_weight))
        return
    from twisted.internet.task import react

    react(main, argv)


def main(reactor: Any, *argv: str) -> "Deferred[Any]":
    """
    Run the demo backends until interrupted (or, with C{--explain}, print
    why a client would get the backend it gets, and exit); for
    C{twisted.internet.task.react}.  C{--connect} is L{run}'s alone: it
    blocks.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if args.connect is not None:
        parser.error("--connect is for the command line (edgeproxy.demo.run), not a reactor")
    if args.explain is not None:
        print(explain(args.db, args.explain, args.region, rtt_weight=args.rtt_weight))
        return succeed(None)
    backends = [attrs.evolve(b, port=args.base_port + i) for i, b in enumerate(DEMO_BACKENDS)]
    if args.only:
        backends = [b for b in backends if b.id in args.only]

    def listening(ports: List[IListeningPort]) -> "Deferred[None]":
        for backend in backends:
            print(
                f"demo backend {backend.id} (country {backend.country}, region "
                f"{backend.region}) listening on {args.interface}:{backend.port}",
                flush=True,
            )
        return Deferred()  # forever: until SIGINT/SIGTERM stops the reactor

    d = start_backends(reactor, backends, args.interface)
    d.addCallback(listening)
    d.addErrback(_cannot_listen)
    return d


def _cannot_listen(failure: Failure) -> Failure:
    """
    Turn a port that is taken into a one-line exit instead of a traceback.
    """
    error: Any = failure.value
    if isinstance(error, FirstError):
        error = error.subFailure.value
    if isinstance(error, CannotListenError):
        reason = getattr(error.socketError, "strerror", None) or error.socketError
        raise SystemExit(
            f"python -m edgeproxy.demo: cannot listen on {error.interface}:{error.port}:"
            f" {reason} (is the demo already running?)"
        )
    return failure


if __name__ == "__main__":  # pragma: no cover
    run(sys.argv[1:])
