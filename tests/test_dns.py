"""
Tests for the internal geo DNS (L{edgeproxy.control.dns}) and the POPs
table (L{edgeproxy.stores.pops}).

Most tests ask a real server on 127.0.0.1 (port 0) with dnspython; a few
use Debian's C{dig}; the F10 battery sends raw bytes on a UDP socket.
"""

from __future__ import annotations

import shutil
import socket
import sqlite3
import struct
from pathlib import Path
from typing import Any, Dict, Generator, List, Optional, Sequence, Tuple

import pytest
import pytest_twisted
from faultkit import LogCapture
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import LogLevel
from zope.interface import implementer
from zope.interface.verify import verifyObject

from edgeproxy.control import dns as dnsserver
from edgeproxy.control.dns import (
    DNSResolver,
    DNSServer,
    DroppedQueryError,
    MalformedQueryError,
    SourceLimiter,
    dns_service,
    parse_dns_listen,
    parse_query,
)
from edgeproxy.geo import GeoIPResolver, default_geoip_path
from edgeproxy.interfaces import NO_NEW_CLIENTS, UNAVAILABLE
from edgeproxy.metrics import MetricsStore
from edgeproxy.model import Backend, GeoInfo
from edgeproxy.routing.bindings import BindingTable
from edgeproxy.routing.router import Router
from edgeproxy.stores.pops import (
    IPopRepository,
    Pop,
    PopsDatabaseError,
    SqlitePopRepository,
    load_pops,
    validate_pop,
)
from edgeproxy.stores.sqlite import InvalidRowError, schema_sql
from edgeproxy.testing import (
    InMemoryBackendRepository,
    StaticGeoResolver,
    StaticHostResolver,
    backend,
)

pytest.importorskip("dns.message", reason="pip install dnspython")
import dns.edns
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype

ROOT = Path(__file__).resolve().parent.parent

FR, BR, JP, US = "90.85.1.1", "200.160.2.3", "133.242.0.3", "8.8.8.8"

#: The routing table of most tests: one backend of app "web" per country,
#: an IPv6-only app, and 40 backends of app "big" in region "us".
TABLE: Tuple[Backend, ...] = (
    backend("cdg-1", app="web", region="eu", country="FR", host="192.0.2.1"),
    backend("gru-1", app="web", region="sa", country="BR", host="192.0.2.2"),
    backend("nrt-1", app="web", region="ap", country="JP", host="192.0.2.3"),
    backend("iad-1", app="web", region="us", country="US", host="192.0.2.4"),
    backend("gru-6", app="six", region="sa", country="BR", host="2001:db8::6"),
    *(
        backend(f"big-{i}", app="big", region="us", country="US", host=f"198.51.100.{i + 1}")
        for i in range(40)
    ),
)

POPS = (
    Pop("gru", "sa", "192.0.2.10"),
    Pop("gru-v6", "sa", "2001:db8::10"),
    Pop("cdg", "eu", "192.0.2.20"),
    Pop("nrt", "ap", "192.0.2.30"),
)


@implementer(IPopRepository)
class StaticPops:
    """
    An L{IPopRepository} holding a fixed list.
    """

    def __init__(self, pops: Sequence[Pop] = ()) -> None:
        self.pops = tuple(pops)

    def current(self) -> Tuple[Pop, ...]:
        return self.pops

    def reload(self) -> "Deferred[Tuple[Pop, ...]]":
        d: Deferred[Tuple[Pop, ...]] = Deferred()
        d.callback(self.pops)
        return d


def shipped_geo() -> GeoIPResolver:
    if default_geoip_path() is None:
        pytest.skip("the shipped GeoIP database (edgeproxy/data) is missing")
    return GeoIPResolver.fromPaths(None)


class Harness:
    """
    A resolver on the real router parts, and optionally a real listener.
    """

    def __init__(
        self,
        backends: Sequence[Backend] = TABLE,
        geo: Any = None,
        pops: Sequence[Pop] = POPS,
        hosts: Any = None,
        clock: Any = None,
        **resolver_kw: Any,
    ) -> None:
        self.repository = InMemoryBackendRepository(backends)
        self.metrics = MetricsStore()
        self.router = Router(
            self.repository, BindingTable(), geo, self.metrics, "sa", clock or Clock()
        )
        self.pops = StaticPops(pops)
        self.resolver = DNSResolver(
            self.repository, geo, self.router, self.pops, serial=7, hosts=hosts, **resolver_kw
        )
        self.clock = clock or Clock()
        self.server = DNSServer(self.resolver, self.clock, self.metrics)
        self.service: Optional[dnsserver.DNSService] = None

    def listen(self, **kw: Any) -> int:
        service = dns_service(reactor, "127.0.0.1:0", self.resolver, self.metrics, **kw)
        assert service is not None
        service.startService()
        self.service = service
        return service.port

    def stop(self) -> Deferred[Any]:
        assert self.service is not None
        return self.service.stopService()

    def ask(
        self,
        name: str,
        rdtype: str = "A",
        subnet: Optional[Tuple[str, int]] = None,
        peer: str = "127.0.0.1",
        udp: bool = True,
        edns: bool = True,
    ) -> dns.message.Message:
        """
        Ask the server object directly (no socket).
        """
        query = make_query(name, rdtype, subnet, edns)
        wire = self.server.handle(query.to_wire(), peer, udp=udp)
        assert wire is not None
        response = dns.message.from_wire(wire)
        assert query.is_response(response)
        return response


def make_query(
    name: str,
    rdtype: str = "A",
    subnet: Optional[Tuple[str, int]] = None,
    edns: bool = True,
    payload: int = 1232,
) -> dns.message.Message:
    options: List[dns.edns.Option] = [dns.edns.ECSOption(*subnet)] if subnet is not None else []
    return dns.message.make_query(
        name,
        rdtype,
        use_edns=0 if (edns or subnet) else False,
        payload=payload,
        options=options,
    )


def ask(
    port: int,
    name: str,
    rdtype: str = "A",
    subnet: Optional[Tuple[str, int]] = None,
    tcp: bool = False,
    edns: bool = True,
    source: str = "127.0.0.1",
) -> "Deferred[dns.message.Message]":
    """
    Ask the server on C{port} with dnspython, in a thread.
    """
    query = make_query(name, rdtype, subnet, edns)
    if tcp:
        return deferToThread(dns.query.tcp, query, "127.0.0.1", timeout=5, port=port, source=source)
    return deferToThread(dns.query.udp, query, "127.0.0.1", timeout=5, port=port, source=source)


def addresses(response: dns.message.Message) -> List[str]:
    return [rdata.address for rrset in response.answer for rdata in rrset]


def subnet_option(response: dns.message.Message) -> Any:
    found = [o for o in response.options if isinstance(o, dns.edns.ECSOption)]
    assert len(found) == 1
    return found[0]


def soa_in_authority(response: dns.message.Message) -> bool:
    return [rrset.rdtype for rrset in response.authority] == [dns.rdatatype.SOA]


# --- raw packets -----------------------------------------------------------------


def header(
    msg_id: int, flags: int = 0x0100, qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0
) -> bytes:
    return struct.pack("!HHHHHH", msg_id, flags, qd, an, ns, ar)


def wire_name(*labels: bytes) -> bytes:
    return b"".join(bytes((len(label),)) + label for label in labels) + b"\0"


WEB = (b"web", b"edge", b"internal")
QUESTION = wire_name(*WEB) + struct.pack("!HH", 1, 1)


def opt(rdata: bytes = b"", version: int = 0) -> bytes:
    return b"\0" + struct.pack("!HHIH", 41, 1232, version << 16, len(rdata)) + rdata


def ecs(data: bytes) -> bytes:
    return struct.pack("!HH", 8, len(data)) + data


def valid_query(msg_id: int) -> bytes:
    return header(msg_id) + QUESTION


DROP = "drop"

#: F10: name -> (datagram, what the server does: DROP or the rcode).
F10_CASES: Dict[str, Tuple[bytes, Any]] = {
    "0 bytes": (b"", DROP),
    "11 bytes": (header(0x1111)[:11], DROP),
    "QDCOUNT 0": (header(0x2222, qd=0), dns.rcode.FORMERR),
    "QDCOUNT 2": (header(0x2223, qd=2) + QUESTION + QUESTION, dns.rcode.FORMERR),
    "label over 63": (
        header(0x3333) + b"\x40" + b"a" * 64 + b"\0" + struct.pack("!HH", 1, 1),
        dns.rcode.FORMERR,
    ),
    "name over 255": (
        header(0x4444) + wire_name(*[b"a" * 63] * 4) + struct.pack("!HH", 1, 1),
        dns.rcode.FORMERR,
    ),
    "compression loop": (
        header(0x5555) + b"\xc0\x0c" + struct.pack("!HH", 1, 1),
        dns.rcode.FORMERR,
    ),
    "compression loop through a label": (
        header(0x5556) + b"\x01a\xc0\x0c" + struct.pack("!HH", 1, 1),
        dns.rcode.FORMERR,
    ),
    "forward pointer": (header(0x5557) + b"\xc0\x40" + b"\0" * 80, dns.rcode.FORMERR),
    "QR=1": (header(0x6666, flags=0x8400) + QUESTION, DROP),
    "65 KB datagram": (valid_query(0x7777) + b"\0" * (65000 - len(valid_query(0))), DROP),
    "unknown type": (
        header(0x8888) + wire_name(*WEB) + struct.pack("!HH", 65280, 1),
        dns.rcode.NOERROR,
    ),
    "truncated question": (header(0x9999) + wire_name(*WEB)[:6], dns.rcode.FORMERR),
    "trailing bytes": (valid_query(0x999A) + b"junk", dns.rcode.FORMERR),
    "answer section in a query": (header(0x999B, an=1) + QUESTION, dns.rcode.FORMERR),
    "opcode STATUS": (header(0xAAAA, flags=2 << 11), dns.rcode.NOTIMP),
    "EDNS version 1": (header(0xBBBB, ar=1) + QUESTION + opt(version=1), dns.rcode.BADVERS),
    "two OPT records": (header(0xBBBC, ar=2) + QUESTION + opt() + opt(), dns.rcode.FORMERR),
    "OPT record cut short": (header(0xBBBD, ar=1) + QUESTION + opt()[:7], dns.rcode.FORMERR),
    "ECS too many address octets": (
        header(0xCCCC, ar=1) + QUESTION + opt(ecs(struct.pack("!HBB", 1, 24, 0) + b"\2\2\2\2")),
        dns.rcode.FORMERR,
    ),
    "ECS bits beyond the prefix": (
        header(0xCCCD, ar=1) + QUESTION + opt(ecs(struct.pack("!HBB", 1, 20, 0) + b"\2\2\x0f")),
        dns.rcode.FORMERR,
    ),
    "ECS unknown family": (
        header(0xCCCE, ar=1) + QUESTION + opt(ecs(struct.pack("!HBB", 3, 8, 0) + b"\2")),
        dns.rcode.FORMERR,
    ),
    "ECS scope in a query": (
        header(0xCCCF, ar=1) + QUESTION + opt(ecs(struct.pack("!HBB", 1, 24, 24) + b"\2\2\2")),
        dns.rcode.FORMERR,
    ),
    "ECS option of 2 bytes": (
        header(0xCCD0, ar=1) + QUESTION + opt(ecs(b"\0\1")),
        dns.rcode.FORMERR,
    ),
    "QTYPE OPT": (header(0xDDDD) + wire_name(*WEB) + struct.pack("!HH", 41, 1), dns.rcode.FORMERR),
    "QTYPE AXFR": (
        header(0xDDDE) + wire_name(b"edge", b"internal") + struct.pack("!HH", 252, 1),
        dns.rcode.REFUSED,
    ),
    "class CHAOS": (
        header(0xDDDF) + wire_name(b"version", b"bind") + struct.pack("!HH", 16, 3),
        dns.rcode.REFUSED,
    ),
}


def udp_socket(source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((source, 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    return sock


def receive(sock: socket.socket, timeout: float = 5.0) -> "Deferred[Optional[bytes]]":
    """
    The next datagram on C{sock} (or C{None} after C{timeout}), in a thread.
    """

    def recv() -> Optional[bytes]:
        sock.settimeout(timeout)
        try:
            return sock.recv(65535)
        except socket.timeout:  # TimeoutError from Python 3.10 on
            return None

    return deferToThread(recv)


# --- the wire parser ----------------------------------------------------------------


def test_parse_query_reads_dnspython_queries() -> None:
    """
    A query made by dnspython parses to its id, flags, question, EDNS
    payload, DO bit and client subnet (address cut to the source prefix).
    """
    query = make_query("Web.Edge.Internal", "AAAA", ("2.2.2.0", 24))
    query.flags |= dns.flags.CD
    query.want_dnssec(True)
    request = parse_query(query.to_wire())
    assert request.id == query.id
    assert request.opcode == 0 and request.rd and request.cd
    assert request.question is not None
    assert request.question.labels == (b"Web", b"Edge", b"Internal")
    assert request.question.qtype == 28 and request.question.qclass == 1
    assert request.edns is not None
    assert (request.edns.payload, request.edns.version, request.edns.dnssecOK) == (1232, 0, True)
    assert request.edns.subnet == dnsserver.ClientSubnet(1, 24, b"\2\2\2")
    plain = parse_query(make_query("web.edge.internal", edns=False).to_wire())
    assert plain.edns is None


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "short"),
        (b"\0" * 11, "short"),
        (header(1, flags=0x8000) + QUESTION, "response"),
        (valid_query(1) + b"\0" * 4100, "oversize"),
    ],
)
def test_parse_query_drops(data: bytes, reason: str) -> None:
    """
    Fewer than 12 bytes, QR=1 and a message over the size limit are
    dropped, each with its reason.
    """
    with pytest.raises(DroppedQueryError) as raised:
        parse_query(data, max_size=4096)
    assert raised.value.reason == reason


@pytest.mark.parametrize(
    "data, reason",
    [
        (header(1, qd=0), "qdcount"),
        (header(1, qd=2) + QUESTION + QUESTION, "qdcount"),
        (header(1) + b"\x40" + b"a" * 64 + b"\0\0\1\0\1", "label"),
        (header(1) + b"\x80" + b"a" * 10, "label"),
        (header(1) + wire_name(*[b"a" * 63] * 4) + b"\0\1\0\1", "name_length"),
        (header(1) + b"\xc0\x0c\0\1\0\1", "compression"),
        (header(1) + b"\x01a\xc0\x0c\0\1\0\1", "compression"),
        (header(1) + b"\x01a\xc0", "truncated"),
        (header(1) + wire_name(*WEB) + b"\0", "truncated"),
        (valid_query(1) + b"x", "trailing"),
        (header(1, ns=1) + QUESTION, "sections"),
        (header(1, ar=1) + QUESTION + opt() + b"", "opt_ok"),
        (header(1, ar=1) + QUESTION + b"\x01a\0" + opt()[1:], "opt"),
        (header(1, ar=1) + QUESTION + opt(b"\0\1\0\5ab"), "opt"),
        (header(1, ar=1) + QUESTION + opt(ecs(b"\0\1\x18\0\2\2\2") + ecs(b"\0\1\0\0")), "ecs"),
        (header(1, ar=1) + QUESTION + opt(ecs(struct.pack("!HBB", 1, 33, 0) + b"\0" * 5)), "ecs"),
        (header(1, ar=1) + QUESTION + opt(ecs(struct.pack("!HBB", 2, 129, 0))), "ecs"),
        (header(1, ar=1) + QUESTION + opt(ecs(struct.pack("!HBB", 1, 24, 0) + b"\2\2")), "ecs"),
        (header(1, ar=1) + QUESTION + opt(ecs(struct.pack("!HBB", 0, 8, 0) + b"\2")), "ecs"),
    ],
)
def test_parse_query_formerr(data: bytes, reason: str) -> None:
    """
    Every kind of malformed query is a L{MalformedQueryError} with its
    reason (and the one well-formed message of the list parses).
    """
    if reason == "opt_ok":
        assert parse_query(data).edns is not None
        return
    with pytest.raises(MalformedQueryError) as raised:
        parse_query(data)
    assert raised.value.reason == reason
    assert raised.value.partial.id == 1


def test_parse_query_follows_backward_pointers() -> None:
    """
    A name compressed with pointers that point backwards (as encoders
    write them) is read, across several pointers.
    """
    # An OPT-less additional record whose owner points into the question.
    record = b"\x03www\xc0\x10" + struct.pack("!HHIH", 1, 1, 0, 4) + b"\1\2\3\4"
    data = header(9, ar=1) + QUESTION + record
    request = parse_query(data)
    assert request.question is not None and request.question.labels == WEB


def test_other_opcodes_read_only_the_header() -> None:
    """
    A message with another opcode (NOTIFY, UPDATE...) is not read beyond
    its header: it is answered NOTIMP whatever follows.
    """
    request = parse_query(header(5, flags=5 << 11, qd=7) + b"garbage")
    assert request.opcode == 5 and request.question is None


@given(st.binary(max_size=600))
def test_parse_query_never_raises_anything_else(data: bytes) -> None:
    """
    Whatever the bytes, parsing either succeeds or raises one of the two
    documented errors.
    """
    try:
        parse_query(data, max_size=4096)
    except (DroppedQueryError, MalformedQueryError):
        pass


_LABEL = st.binary(min_size=1, max_size=63)


@given(st.lists(_LABEL, min_size=1, max_size=4), st.integers(0, 0xFFFF))
def test_parse_query_round_trips_names(labels: List[bytes], qtype: int) -> None:
    """
    Any name (any bytes in its labels, dots included) and type that a
    query can carry is read back exactly.
    """
    if sum(len(label) + 1 for label in labels) + 1 > 255:
        return
    data = header(3) + wire_name(*labels) + struct.pack("!HH", qtype, 1)
    request = parse_query(data)
    assert request.question == dnsserver.Question(tuple(labels), qtype, 1)


_HARNESS = Harness()


@given(
    st.one_of(
        st.binary(max_size=300),
        st.builds(
            lambda head, body: head + body,
            st.sampled_from([header(1), header(2, ar=1), header(3, qd=2)]),
            st.binary(max_size=200),
        ),
    )
)
def test_server_answers_garbage_with_a_response_or_nothing(data: bytes) -> None:
    """
    The server never raises on arbitrary input; what it sends is a
    response (QR=1) with the query's id that dnspython can read.
    """
    wire = _HARNESS.server.handle(data, "192.0.2.99", udp=True)
    if wire is None:
        return
    response = dns.message.from_wire(wire)
    assert response.flags & dns.flags.QR
    assert response.id == struct.unpack("!H", data[:2])[0]
    assert len(wire) <= dnsserver.UDP_PAYLOAD


# --- answers (the server object, no socket) ----------------------------------------


def test_geo_answers_with_static_geo() -> None:
    """
    An app name answers the backend of the client subnet's country (ECS),
    with the scope of the bits used; without ECS the querier's location
    decides and no option is sent back.
    """
    geo = StaticGeoResolver(
        {
            "203.0.113.0": GeoInfo("FR", "eu"),
            "2001:db8:1234:5600::": GeoInfo("JP", "ap"),
            "192.0.2.77": GeoInfo("US", "us"),
        }
    )
    h = Harness(geo=geo)
    r = h.ask("web.edge.internal", subnet=("203.0.113.77", 32))
    assert addresses(r) == ["192.0.2.1"]
    option = subnet_option(r)
    assert (option.address, option.srclen, option.scopelen) == ("203.0.113.77", 32, 24)
    r = h.ask("web.edge.internal", subnet=("2001:db8:1234:5678::", 64))
    assert addresses(r) == ["192.0.2.3"]
    assert subnet_option(r).scopelen == 56
    r = h.ask("web.edge.internal", peer="192.0.2.77")
    assert addresses(r) == ["192.0.2.4"] and list(r.options) == []
    # The subnet is unknown to geo: the querier's location is used instead,
    # and the answer is valid for any client of the resolver (scope 0).
    r = h.ask("web.edge.internal", subnet=("10.9.8.0", 24), peer="192.0.2.77")
    assert addresses(r) == ["192.0.2.4"] and subnet_option(r).scopelen == 0
    # Source prefix 0: the client asks that its address not be used.
    r = h.ask("web.edge.internal", subnet=("0.0.0.0", 0), peer="192.0.2.77")
    assert addresses(r) == ["192.0.2.4"] and subnet_option(r).scopelen == 0


def test_client_subnet_located_bits() -> None:
    """
    A client subnet is looked at with at most 24 (IPv4) or 56 (IPv6) bits;
    shorter prefixes as they are.
    """
    assert dnsserver.ClientSubnet(1, 32, b"\2\2\2\2").located() == ("2.2.2.0", 24)
    assert dnsserver.ClientSubnet(1, 16, b"\2\2").located() == ("2.2.0.0", 16)
    v6 = dnsserver.ClientSubnet(2, 64, bytes.fromhex("20010db812345678"))
    assert v6.located() == ("2001:db8:1234:5600::", 56)
    assert dnsserver.ClientSubnet(1, 0, b"").located() == (None, 0)


def test_blocked_and_unresolved_backends_are_not_answered() -> None:
    """
    A backend the overlay closes to new clients is not answered for its
    app nor listed under its region; a backend named by a host name is
    answered with the host resolver's addresses, and skipped while it has
    none.
    """
    table = (
        backend("a", app="app", region="sa", country="BR", host="192.0.2.1"),
        backend("b", app="app", region="sa", country="BR", host="api.example", weight=9),
    )
    hosts = StaticHostResolver({})
    h = Harness(backends=table, hosts=hosts)
    assert addresses(h.ask("app.edge.internal")) == ["192.0.2.1"]
    hosts.set("api.example", ["192.0.2.50", "2001:db8::50"])
    h.router.load.acquire(table[0])  # "a" now has load, "b" none
    assert addresses(h.ask("app.edge.internal")) == ["192.0.2.50"]
    assert addresses(h.ask("app.edge.internal", "AAAA")) == ["2001:db8::50"]
    assert addresses(h.ask("sa.backends.edge.internal")) == ["192.0.2.1", "192.0.2.50"]
    h.router.overlay.setVerdict("b", "admin", NO_NEW_CLIENTS)
    assert addresses(h.ask("app.edge.internal")) == ["192.0.2.1"]
    assert addresses(h.ask("sa.backends.edge.internal")) == ["192.0.2.1"]
    # Nothing left: NODATA, not an error.
    h.router.overlay.setVerdict("a", "admin", UNAVAILABLE)
    r = h.ask("app.edge.internal")
    assert r.rcode() == dns.rcode.NOERROR and r.answer == [] and soa_in_authority(r)


def test_panic_routing_is_followed() -> None:
    """
    When health checks eject every backend of an app, the name still
    answers one (the router's panic mode); an operator's maint is never
    overridden.
    """
    table = (backend("a", app="app", host="192.0.2.1"),)
    h = Harness(backends=table)
    h.router.overlay.setVerdict("a", "health", UNAVAILABLE)
    assert addresses(h.ask("app.edge.internal")) == ["192.0.2.1"]
    h.router.overlay.setVerdict("a", "admin", UNAVAILABLE)
    assert addresses(h.ask("app.edge.internal")) == []


def test_names_of_the_zone() -> None:
    """
    The apex has SOA and NS; ns1 its addresses; the names between the
    apex and regions exist without data; names are matched whatever their
    case and echoed as asked; an app of two labels has its name; other
    names are NXDOMAIN and names outside the zone REFUSED, with RA never
    set.
    """
    table = (*TABLE, backend("v2", app="API.v2", region="eu", host="192.0.2.9"))
    h = Harness(backends=table, ns_addresses=["192.0.2.53"])
    r = h.ask("edge.internal", "SOA")
    assert r.answer[0][0].serial == 7 and r.answer[0][0].minimum == 30
    assert r.flags & dns.flags.AA and not r.flags & dns.flags.RA
    assert [str(rd) for rd in h.ask("edge.internal", "NS").answer[0]] == ["ns1.edge.internal."]
    assert addresses(h.ask("ns1.edge.internal")) == ["192.0.2.53"]
    for name in ("backends.edge.internal", "pops.edge.internal", "v2.edge.internal"):
        r = h.ask(name)
        assert r.rcode() == dns.rcode.NOERROR and r.answer == [] and soa_in_authority(r), name
    r = h.ask("WeB.EDGE.internal")
    assert str(r.answer[0].name) == "WeB.EDGE.internal." and addresses(r) == ["192.0.2.2"]
    assert addresses(h.ask("api.v2.edge.internal")) == ["192.0.2.9"]
    for name in ("nope.edge.internal", "x.sa.pops.edge.internal", "zz.backends.edge.internal"):
        r = h.ask(name)
        assert r.rcode() == dns.rcode.NXDOMAIN and soa_in_authority(r), name
    for name in ("example.com", "internal", "edge.internal.example"):
        r = h.ask(name)
        assert r.rcode() == dns.rcode.REFUSED and not r.flags & dns.flags.AA, name
    assert h.metrics.counter(dnsserver.QUERIES, "REFUSED") == 3


def test_a_aaaa_and_nodata() -> None:
    """
    An IPv4 backend is an A record and an IPv6 one an AAAA; the other type
    (and any other type) is NODATA with the SOA; ANY gives what there is.
    """
    h = Harness()
    assert addresses(h.ask("six.edge.internal", "AAAA")) == ["2001:db8::6"]
    for rdtype in ("A", "TXT", "MX"):
        r = h.ask("six.edge.internal", rdtype)
        assert r.rcode() == dns.rcode.NOERROR and r.answer == [] and soa_in_authority(r)
    assert addresses(h.ask("sa.pops.edge.internal", "ANY")) == ["192.0.2.10", "2001:db8::10"]
    assert addresses(h.ask("sa.pops.edge.internal", "AAAA")) == ["2001:db8::10"]
    # A region known only from the POPs, or the local region, exists.
    assert h.ask("ap.pops.edge.internal").rcode() == dns.rcode.NOERROR
    r = h.ask("us.pops.edge.internal")
    assert r.rcode() == dns.rcode.NOERROR and r.answer == []


def test_ecs_scope_zero_for_answers_that_ignore_location() -> None:
    """
    Backends and POPs names, the apex and negative answers echo the
    client subnet with scope 0 (RFC 7871 sections 7.2.1 and 7.4).
    """
    h = Harness(geo=StaticGeoResolver({"203.0.113.0": GeoInfo("FR", "eu")}))
    for name, rdtype in (
        ("sa.pops.edge.internal", "A"),
        ("sa.backends.edge.internal", "A"),
        ("edge.internal", "SOA"),
        ("nope.edge.internal", "A"),
        ("six.edge.internal", "A"),
    ):
        option = subnet_option(h.ask(name, rdtype, subnet=("203.0.113.0", 24)))
        assert (option.srclen, option.scopelen) == (24, 0), name


def test_truncation_without_edns() -> None:
    """
    Without EDNS a UDP answer over 512 bytes is sent empty with TC=1 (and
    counted); with EDNS it fits the client's payload size, and over TCP it
    is whole.
    """
    h = Harness()
    r = h.ask("us.backends.edge.internal", edns=False)
    assert r.flags & dns.flags.TC and r.answer == []
    assert h.metrics.counter(dnsserver.TRUNCATED) == 1
    assert len(addresses(h.ask("us.backends.edge.internal"))) == 41
    assert len(addresses(h.ask("us.backends.edge.internal", edns=False, udp=False))) == 41


def test_resolver_refuses_bad_settings() -> None:
    """
    A domain that is not a DNS name and a TTL out of range are refused.
    """
    repo = InMemoryBackendRepository()
    router = Router(repo, BindingTable(), None, MetricsStore(), "sa", Clock())
    with pytest.raises(ValueError):
        DNSResolver(repo, None, router, domain="a..b")
    with pytest.raises(ValueError):
        DNSResolver(repo, None, router, domain="x" * 64 + ".internal")
    with pytest.raises(ValueError):
        DNSResolver(repo, None, router, ttl=-1)
    resolver = DNSResolver(repo, None, router, domain="Edge.Example.")
    assert resolver.domain == "edge.example"


def test_a_bug_is_servfail_logged_once() -> None:
    """
    An exception while answering (a bug) answers SERVFAIL and logs one
    traceback per interval, not one per query.
    """
    h = Harness()

    def broken(request: Any, peer: str) -> Any:
        raise RuntimeError("boom")

    h.resolver.answer = broken  # type: ignore[method-assign]
    logs = LogCapture().start()
    try:
        for _ in range(5):
            assert h.ask("web.edge.internal").rcode() == dns.rcode.SERVFAIL
        h.clock.advance(61)
        h.ask("web.edge.internal")
    finally:
        logs.stop()
    assert len([e for e in logs.events if "log_failure" in e]) == 2
    assert h.metrics.counter(dnsserver.QUERIES, "SERVFAIL") == 6


def test_reports_once_per_reason_per_interval() -> None:
    """
    The same malformed query repeated is counted each time and logged once
    per minute, the next line saying how many were left out.
    """
    h = Harness()
    logs = LogCapture().start()
    try:
        for _ in range(10):
            h.server.handle(header(1, qd=0), "192.0.2.1", udp=True)
        h.server.handle(b"", "192.0.2.1", udp=True)
        h.clock.advance(60)
        h.server.handle(header(1, qd=0), "192.0.2.1", udp=True)
    finally:
        logs.stop()
    lines = [e for e in logs.events if e.get("log_namespace") == "edgeproxy.control.dns"]
    assert [e.get("quiet") for e in lines] == [0, 0, 9]
    assert h.metrics.counter(dnsserver.MALFORMED, "qdcount") == 11
    assert h.metrics.counter(dnsserver.QUERIES, "FORMERR") == 11
    assert h.metrics.counter(dnsserver.DROPPED, "short") == 1


# --- the rate limiter and the listen syntax -------------------------------------------


def test_source_limiter() -> None:
    """
    Each source has a bucket of C{burst} tokens refilled at C{rate} per
    second; an IPv6 source is its /64; at most C{max_sources} buckets are
    kept, the least recently seen going first.
    """
    clock = Clock()
    limiter = SourceLimiter(clock, rate=2, burst=3, max_sources=2)
    assert [limiter.allow("192.0.2.1") for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("192.0.2.2")
    clock.advance(0.5)
    assert limiter.allow("192.0.2.1") and not limiter.allow("192.0.2.1")
    assert [limiter.allow("2001:db8::1"), limiter.allow("2001:db8::2")] == [True, True]
    assert len(limiter) == 2
    # 192.0.2.2 was evicted by the IPv6 /64: it starts afresh.
    assert [limiter.allow("192.0.2.2") for _ in range(3)] == [True, True, True]
    assert SourceLimiter(clock, rate=0).allow("192.0.2.1")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("5353", ("127.0.0.1", 5353)),
        ("0.0.0.0:53", ("0.0.0.0", 53)),
        ("[::1]:5353", ("::1", 5353)),
        (" none ", None),
        ("off", None),
        ("", None),
    ],
)
def test_parse_dns_listen(text: str, expected: Any) -> None:
    """
    C{--dns} is C{[HOST:]PORT} (loopback by default) or C{none}.
    """
    assert parse_dns_listen(text) == expected


@pytest.mark.parametrize("text", ["x", "70000", "::1:53", "[::1]53", "host:53", "[1.2.3.4]:5", ":"])
def test_parse_dns_listen_refuses(text: str) -> None:
    """
    Anything but C{[HOST:]PORT} with an address and a port is refused.
    """
    with pytest.raises(ValueError):
        parse_dns_listen(text)


def test_dns_service_none() -> None:
    """
    C{--dns none} gives no service.
    """
    h = Harness()
    assert dns_service(reactor, "none", h.resolver) is None


# --- real sockets -----------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_geo_answers_via_ecs_for_three_countries() -> Generator[Any, Any, None]:
    """
    With the shipped GeoIP database, a client subnet in France, Brazil
    and Japan gets that country's backend, with the scope echoed; over UDP
    and TCP.
    """
    h = Harness(geo=shipped_geo())
    port = h.listen()
    try:
        for address, expected in ((FR, "192.0.2.1"), (BR, "192.0.2.2"), (JP, "192.0.2.3")):
            for tcp in (False, True):
                r = yield ask(port, "web.edge.internal", subnet=(address, 24), tcp=tcp)
                assert addresses(r) == [expected], (address, tcp)
                option = subnet_option(r)
                assert (option.srclen, option.scopelen) == (24, 24)
                assert option.address == address.rsplit(".", 1)[0] + ".0"
        # A querier without ECS is located by its own address: loopback
        # has no geo, so the local region (sa) comes first.
        r = yield ask(port, "web.edge.internal")
        assert addresses(r) == ["192.0.2.2"] and list(r.options) == []
    finally:
        yield h.stop()
    assert h.metrics.counter(dnsserver.QUERIES, "NOERROR") == 7


@pytest_twisted.inlineCallbacks
def test_pops_backends_and_errors_over_udp_and_tcp() -> Generator[Any, Any, None]:
    """
    The pops and backends names, NODATA, NXDOMAIN and REFUSED over UDP and
    TCP; TC=1 on a big answer without EDNS over UDP, the whole answer over
    TCP.
    """
    h = Harness()
    port = h.listen()
    try:
        for tcp in (False, True):
            r = yield ask(port, "sa.pops.edge.internal", tcp=tcp)
            assert addresses(r) == ["192.0.2.10"]
            r = yield ask(port, "sa.pops.edge.internal", "AAAA", tcp=tcp)
            assert addresses(r) == ["2001:db8::10"]
            r = yield ask(port, "eu.backends.edge.internal", tcp=tcp)
            assert addresses(r) == ["192.0.2.1"]
            r = yield ask(port, "six.edge.internal", "AAAA", tcp=tcp)
            assert addresses(r) == ["2001:db8::6"]
            r = yield ask(port, "six.edge.internal", "A", tcp=tcp)
            assert r.rcode() == dns.rcode.NOERROR and r.answer == [] and soa_in_authority(r)
            r = yield ask(port, "nope.edge.internal", tcp=tcp)
            assert r.rcode() == dns.rcode.NXDOMAIN
            r = yield ask(port, "example.com", tcp=tcp)
            assert r.rcode() == dns.rcode.REFUSED
        r = yield ask(port, "us.backends.edge.internal", edns=False)
        assert r.flags & dns.flags.TC and r.answer == []
        r = yield ask(port, "us.backends.edge.internal", edns=False, tcp=True)
        assert not r.flags & dns.flags.TC and len(addresses(r)) == 41
    finally:
        yield h.stop()


@pytest.mark.parametrize("case", list(F10_CASES))
@pytest_twisted.inlineCallbacks
def test_f10_malformed_packet_then_a_valid_query(case: str) -> Generator[Any, Any, None]:
    """
    F10: each malformed packet, sent as raw bytes on a UDP socket, is
    dropped or answered with the documented response code; the valid
    query sent right after it is answered; no traceback is logged.
    """
    data, expected = F10_CASES[case]
    logs = LogCapture().start()
    h = Harness()
    port = h.listen()
    sock = udp_socket()
    try:
        sock.sendto(data, ("127.0.0.1", port))
        sock.sendto(valid_query(0x4242), ("127.0.0.1", port))
        first = yield receive(sock)
        assert first is not None
        if expected == DROP:
            reply = dns.message.from_wire(first)
        else:
            garbage = dns.message.from_wire(first)
            assert garbage.id == struct.unpack("!H", data[:2])[0]
            assert garbage.flags & dns.flags.QR and not garbage.flags & dns.flags.RA
            assert garbage.rcode() == expected
            if case == "unknown type":
                assert garbage.answer == [] and soa_in_authority(garbage)
            second = yield receive(sock)
            assert second is not None
            reply = dns.message.from_wire(second)
        assert reply.id == 0x4242
        assert reply.rcode() == dns.rcode.NOERROR and addresses(reply) == ["192.0.2.2"]
    finally:
        sock.close()
        yield h.stop()
        logs.stop()
    assert logs.failures() == []
    assert [e for e in logs.events if "log_failure" in e] == []


@pytest_twisted.inlineCallbacks
def test_f10_flood_from_one_source() -> Generator[Any, Any, None]:
    """
    F10: a flood of queries from one source is cut to its bucket (the rest
    dropped silently and counted) while another source is answered.
    """
    h = Harness()
    port = h.listen(rate=1.0, burst=5)
    flood = udp_socket("127.0.0.1")
    try:
        for i in range(50):
            flood.sendto(valid_query(i), ("127.0.0.1", port))
        r = yield ask(port, "web.edge.internal", source="127.0.0.2")
        assert addresses(r) == ["192.0.2.2"]
        flood.setblocking(False)
        answered = 0
        while True:
            try:
                flood.recv(65535)
            except BlockingIOError:
                break
            answered += 1
    finally:
        flood.close()
        yield h.stop()
    # 5 (the burst) plus one per second the flood lasted: far fewer than 50.
    assert 5 <= answered < 50
    assert h.metrics.counter(dnsserver.DROPPED, "rate") == 50 - answered


def tcp_exchange(port: int, data: bytes, expect: int) -> List[bytes]:
    """
    Send C{data} on a new TCP connection; return the messages received,
    once C{expect} are in or when the server closes or resets the
    connection (or 5 s pass).
    """
    messages: List[bytes] = []
    buffered = b""
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    except ConnectionResetError:
        return messages
    try:
        sock.sendall(data)
        while len(messages) < expect or expect == 0:
            more = sock.recv(65535)
            if not more:
                break
            buffered += more
            while len(buffered) >= 2 and len(buffered) >= 2 + struct.unpack("!H", buffered[:2])[0]:
                (length,) = struct.unpack("!H", buffered[:2])
                messages.append(buffered[2 : 2 + length])
                buffered = buffered[2 + length :]
    except (socket.timeout, ConnectionResetError, BrokenPipeError):
        pass
    finally:
        sock.close()
    return messages


def framed(message: bytes) -> bytes:
    return struct.pack("!H", len(message)) + message


@pytest_twisted.inlineCallbacks
def test_tcp_pipelining_and_garbage() -> Generator[Any, Any, None]:
    """
    Over TCP: pipelined queries are answered in order; a malformed one gets
    FORMERR and the connection goes on; a message too short for a header
    closes the connection, and the next connection is answered.
    """
    h = Harness()
    port = h.listen()
    logs = LogCapture().start()
    try:
        pipelined = framed(valid_query(1)) + framed(header(2, qd=0)) + framed(valid_query(3))
        messages = yield deferToThread(tcp_exchange, port, pipelined, 3)
        replies = [dns.message.from_wire(m) for m in messages]
        assert [(r.id, r.rcode()) for r in replies] == [
            (1, dns.rcode.NOERROR),
            (2, dns.rcode.FORMERR),
            (3, dns.rcode.NOERROR),
        ]
        messages = yield deferToThread(
            tcp_exchange, port, framed(b"short") + framed(valid_query(4)), 0
        )
        assert messages == []
        r = yield ask(port, "web.edge.internal", tcp=True)
        assert addresses(r) == ["192.0.2.2"]
    finally:
        logs.stop()
        yield h.stop()
    assert logs.failures() == []
    assert h.metrics.counter(dnsserver.DROPPED, "short") == 1


@pytest_twisted.inlineCallbacks
def test_tcp_idle_timeout_and_connection_cap() -> Generator[Any, Any, None]:
    """
    Over TCP a connection over the cap is closed at once (and counted),
    and an idle connection is closed by the server.
    """
    h = Harness()
    port = h.listen(tcp_idle=0.5, max_tcp=1)
    held = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        held.sendall(framed(valid_query(5)))
        answer = yield deferToThread(held.recv, 65535)
        assert dns.message.from_wire(answer[2:]).id == 5
        refused = yield deferToThread(tcp_exchange, port, framed(valid_query(6)), 1)
        assert refused == []
        assert h.metrics.counter(dnsserver.DROPPED, "tcp_limit") == 1
        closed = yield deferToThread(held.recv, 65535)
        assert closed == b""
    finally:
        held.close()
        yield h.stop()


@pytest_twisted.inlineCallbacks
def test_listens_on_ipv6_loopback() -> Generator[Any, Any, None]:
    """
    C{[::1]:0} listens on IPv6 loopback, UDP and TCP on one port.
    """
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    h = Harness()
    service = dns_service(reactor, "[::1]:0", h.resolver)
    assert service is not None
    try:
        service.startService()
    except Exception as e:  # pragma: no cover - a host without ::1
        pytest.skip(f"cannot listen on ::1: {e}")
    try:
        query = make_query("web.edge.internal")
        for fn in (dns.query.udp, dns.query.tcp):
            r = yield deferToThread(fn, query, "::1", timeout=5, port=service.port)
            assert addresses(r) == ["192.0.2.2"]
    finally:
        yield service.stopService()


# --- dig -------------------------------------------------------------------------


def dig_path() -> str:
    path = shutil.which("dig")
    if path is None:
        pytest.skip("dig is not installed: apt-get install dnsutils")
    return path


@pytest_twisted.inlineCallbacks
def test_dig_geo_answers_via_ecs() -> Generator[Any, Any, None]:
    """
    Debian's dig, with +subnet, gets the French, Brazilian and Japanese
    backends, and sees the scope echoed.
    """
    dig = dig_path()
    h = Harness(geo=shipped_geo())
    port = h.listen()
    try:
        for subnet, expected in (
            ("90.85.1.0/24", "192.0.2.1"),
            ("200.160.2.0/24", "192.0.2.2"),
            ("133.242.0.0/24", "192.0.2.3"),
        ):
            out, err, code = yield getProcessOutputAndValue(
                dig,
                ["@127.0.0.1", "-p", str(port), "web.edge.internal", f"+subnet={subnet}"],
            )
            text = out.decode()
            assert code == 0, err
            assert "status: NOERROR" in text
            assert f"CLIENT-SUBNET: {subnet}/24" in text
            assert f"web.edge.internal.\t30\tIN\tA\t{expected}" in text
    finally:
        yield h.stop()


@pytest_twisted.inlineCallbacks
def test_dig_pops_backends_and_tcp_fallback() -> Generator[Any, Any, None]:
    """
    dig gets the POPs and backends of a region, NXDOMAIN inside the zone,
    REFUSED outside it, and falls back to TCP on a truncated answer.
    """
    dig = dig_path()
    h = Harness()
    port = h.listen()

    def run(*args: str) -> "Deferred[Tuple[bytes, bytes, int]]":
        return getProcessOutputAndValue(dig, ["@127.0.0.1", "-p", str(port), *args])

    try:
        out, _, code = yield run("+short", "sa.pops.edge.internal")
        assert code == 0 and out.decode().split() == ["192.0.2.10"]
        out, _, _ = yield run("+short", "sa.pops.edge.internal", "AAAA")
        assert out.decode().split() == ["2001:db8::10"]
        out, _, _ = yield run("+short", "eu.backends.edge.internal")
        assert out.decode().split() == ["192.0.2.1"]
        out, _, _ = yield run("nope.edge.internal")
        assert "status: NXDOMAIN" in out.decode()
        out, _, _ = yield run("example.com")
        assert "status: REFUSED" in out.decode()
        out, _, _ = yield run("+noedns", "us.backends.edge.internal")
        text = out.decode()
        assert "Truncated, retrying in TCP mode" in text and "(TCP)" in text
        assert text.count("\tIN\tA\t") == 41
    finally:
        yield h.stop()


# --- the pops table ------------------------------------------------------------------


def make_db(path: Path, pops: Sequence[Tuple[Any, Any, Any]], schema: Optional[str] = None) -> None:
    conn = sqlite3.connect(path)
    conn.executescript(schema if schema is not None else schema_sql())
    conn.executemany("INSERT INTO pops (id, region, address) VALUES (?, ?, ?)", pops)
    conn.commit()
    conn.close()


def test_load_pops_skips_invalid_rows(tmp_path: Path) -> None:
    """
    Valid rows load in table order (IPv6 normalised); a row with a NULL or
    empty value, a host name, a port or a zone is skipped with its id.
    """
    db = tmp_path / "routing.db"
    make_db(
        db,
        [
            ("gru", "sa", "192.0.2.10"),
            ("gru6", " sa ", "2001:DB8:0::10"),
            ("bad1", "sa", "pop.example"),
            ("bad2", "sa", "192.0.2.1:53"),
            ("bad3", "", "192.0.2.1"),
            ("bad4", "sa", "fe80::1%eth0"),
            ("bad5", "sa", None),
            (" ", "sa", "192.0.2.1"),
        ],
        schema=schema_sql().replace("address  TEXT NOT NULL", "address  TEXT"),
    )
    pops, skipped = load_pops(str(db))
    assert pops == [Pop("gru", "sa", "192.0.2.10"), Pop("gru6", "sa", "2001:db8::10")]
    assert [row_id for row_id, _ in skipped] == ["bad1", "bad2", "bad3", "bad4", "bad5", "<row 8>"]
    assert skipped[0][1].startswith("address:")
    assert skipped[2][1] == "region: is empty"


def test_load_pops_without_table_and_broken_files(tmp_path: Path) -> None:
    """
    A database without a C{pops} table has no POPs; a missing file or a
    table without a column is an error.
    """
    db = tmp_path / "old.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE backends (id TEXT)")
    conn.commit()
    conn.close()
    assert load_pops(str(db)) == ([], [])
    with pytest.raises(PopsDatabaseError):
        load_pops(str(tmp_path / "missing.db"))
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE pops (id TEXT, region TEXT)")
    conn.commit()
    conn.close()
    with pytest.raises(PopsDatabaseError, match="address"):
        load_pops(str(db))


def test_validate_pop() -> None:
    """
    L{validate_pop} wants all three columns as text, and an address.
    """
    assert validate_pop({"id": "a", "region": "eu", "address": "192.0.2.1"}).ipv6 is False
    with pytest.raises(InvalidRowError, match="region: is missing"):
        validate_pop({"id": "a", "address": "192.0.2.1"})
    with pytest.raises(InvalidRowError, match="id: int is not text"):
        validate_pop({"id": 5, "region": "eu", "address": "192.0.2.1"})


def test_pop_repository_initial_load_never_raises(tmp_path: Path) -> None:
    """
    The first load of a missing file logs an error and leaves no POPs; it
    does not stop the proxy.  A good file then loads.
    """
    repo = SqlitePopRepository(str(tmp_path / "missing.db"), metrics=MetricsStore())
    logs = LogCapture().start()
    try:
        assert repo.loadInitial() == ()
    finally:
        logs.stop()
    errors = [e for e in logs.events if e.get("log_level") == LogLevel.error]
    assert repo.lastError is not None and len(errors) == 1
    assert verifyObject(IPopRepository, repo)
    assert verifyObject(IPopRepository, StaticPops())


@pytest_twisted.inlineCallbacks
def test_pop_repository_reload(tmp_path: Path) -> Generator[Any, Any, None]:
    """
    A reload reads the table again off the reactor thread; a failed reload
    keeps the last good list; skipped rows are logged once.
    """
    db = tmp_path / "routing.db"
    make_db(db, [("gru", "sa", "192.0.2.10")])
    metrics = MetricsStore()
    repo = SqlitePopRepository(str(db), reactor=reactor, metrics=metrics)
    assert repo.loadInitial() == (Pop("gru", "sa", "192.0.2.10"),)
    conn = sqlite3.connect(db)
    conn.execute("INSERT INTO pops VALUES ('cdg', 'eu', '192.0.2.20'), ('x', 'eu', 'name')")
    conn.commit()
    conn.close()
    both = yield gather(repo.reload(), repo.reload())
    assert [len(p) for p in both] == [2, 2]
    assert repo.skipped == (("x", "address: 'name' is not an IPv4 or IPv6 address"),)
    db.unlink()
    kept = yield repo.reload()
    assert len(kept) == 2 and repo.lastError is not None
    assert metrics.counter("pops_reload", "error") == 1
    assert metrics.counter("pops_rows_skipped", "address") == 1


def gather(*ds: "Deferred[Any]") -> "Deferred[List[Any]]":
    from twisted.internet.defer import gatherResults

    return gatherResults(list(ds))


def test_schema_files_and_sample(tmp_path: Path) -> None:
    """
    conf/schema.sql and the packaged schema are the same file and create
    the C{pops} table; the sample rows load as POPs.
    """
    conf = (ROOT / "conf" / "schema.sql").read_text()
    assert conf == (ROOT / "edgeproxy" / "data" / "schema.sql").read_text()
    db = tmp_path / "routing.db"
    conn = sqlite3.connect(db)
    conn.executescript(conf)
    conn.executescript((ROOT / "conf" / "routing-sample.sql").read_text())
    conn.commit()
    conn.close()
    pops, skipped = load_pops(str(db))
    assert skipped == []
    assert {p.region for p in pops} == {"sa", "eu", "ap", "us"}
