"""
The internal geo DNS (C{--dns}): names answered from the routing table.

One zone, C{--dns-domain} (default C{edge.internal}), is served with
authority; every answer carries the short C{--dns-ttl} (30 s)::

    <domain>                      SOA and NS (ns1.<domain>)
    ns1.<domain>                  the addresses given as ns_addresses (else
                                  no data)
    <app>.<domain>                the best backend of the app for the client's
                                  location: the routing decision of
                                  L{edgeproxy.routing.selection.select} with
                                  the router's overlay and current load, no
                                  binding made and no load taken
    <region>.backends.<domain>    every routable backend of the region (any
                                  app) the overlay does not close to new
                                  clients
    <region>.pops.<domain>        the POPs of the region (the C{pops} table,
                                  L{edgeproxy.stores.pops})

An IPv4 address is an A record and an IPv6 one an AAAA; a query for the
other type gets NOERROR without answer (NODATA) and the SOA in the
authority section, as do other types (RFC 3597: unknown types are not an
error).  A name inside the zone that does not exist gets NXDOMAIN; a name
outside it REFUSED.  There is no recursion (RA is never set).  Names are
matched without regard to ASCII case; C{ns1}, C{backends} and C{pops} are
reserved and win over an app of that name.  An app named by several labels
(C{api.v2}) is C{api.v2.<domain>}.

The client's location is where the querier is, or, when the query carries
an EDNS Client Subnet option (RFC 7871), where the client subnet is: its
address cut to at most 24 bits (IPv4) or 56 (IPv6) is given to the geo
resolver (when that knows nothing of the subnet, the querier's own address
is used).  The option is echoed with SCOPE PREFIX-LENGTH set to the bits
used for an app answer, and to 0 for every answer that does not depend on
the location (backends and POPs names, the apex, negative answers).  A
malformed option gets FORMERR (RFC 7871 section 6).

Malformed input (FAULTS F10) never stops the server nor logs a traceback
per packet: a datagram too short for a header (0-11 bytes) or with QR=1 (a
response: answering it would let a spoofer make two servers talk forever)
is dropped; a header followed by garbage (QDCOUNT other than 1, a label over
63 octets or any label type but the plain one, a name over 255 octets, a
compression pointer that does not point strictly backwards, a truncated
record, trailing bytes, a second OPT record, a malformed ECS option) gets
FORMERR; an opcode other than QUERY gets NOTIMP, an EDNS version other than
0 BADVERS.  A UDP datagram over 4096 bytes is dropped unread (the socket
reads 4097).  Each source (an IPv4 address, an IPv6 /64) has a token bucket
on UDP; queries over its rate are dropped silently.  At most
C{max_sources} buckets are kept (least recently seen first out), so a flood
of spoofed sources costs bounded memory.  Drops and malformed queries are
counted by reason and logged at most once per reason per minute.  UDP
answers are cut to 512 bytes without EDNS and to the client's payload size
(at most 1232) with it; a longer answer is sent empty with TC=1, so that
the client asks again over TCP.

Counters (in the optional L{IMetricsStore}): C{dns_queries} by response
code (C{NOERROR}, C{NXDOMAIN}, C{REFUSED}, C{FORMERR}, C{NOTIMP},
C{SERVFAIL}, C{BADVERS}), C{dns_dropped} by reason (C{short}, C{response},
C{oversize}, C{rate}, C{tcp_limit}, C{send_error}), C{dns_malformed} by
reason (what made a query FORMERR) and C{dns_truncated}.

Wiring::

    resolver = DNSResolver(repository, geo, router, pops=pops,
                           domain=options["dns-domain"], ttl=options["dns-ttl"],
                           hosts=host_resolver)
    service = dns_service(reactor, options["dns"], resolver, metrics=metrics)
    if service is not None:               # None for "none"
        service.setServiceParent(top)

C{--dns} takes C{[HOST:]PORT} (L{parse_dns_listen}): C{5353} is
C{127.0.0.1:5353}, C{0.0.0.0:53} every IPv4 interface, C{[::]:53} every
IPv6 one; UDP and TCP listen on the same port.
"""

from __future__ import annotations

import collections
import ipaddress
import random
import struct
import time
from typing import (
    Any,
    Dict,
    FrozenSet,
    Iterable,
    List,
    Mapping,
    Optional,
    Sequence,
    Set,
    Tuple,
)

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import DatagramProtocol, Factory
from twisted.logger import Logger
from twisted.names import dns
from twisted.protocols.basic import Int16StringReceiver
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from edgeproxy.interfaces import IBackendRepository, IGeoResolver, IHostResolver, IMetricsStore
from edgeproxy.model import Backend, GeoInfo, RoutingSnapshot
from edgeproxy.routing.selection import select
from edgeproxy.stores.pops import IPopRepository, Pop

__all__ = [
    "DEFAULT_BURST",
    "DEFAULT_DOMAIN",
    "DEFAULT_RATE",
    "DEFAULT_TTL",
    "DROPPED",
    "EDNS",
    "MALFORMED",
    "QUERIES",
    "TRUNCATED",
    "Answer",
    "ClientSubnet",
    "DNSResolver",
    "DNSServer",
    "DNSService",
    "DroppedQueryError",
    "MalformedQueryError",
    "Question",
    "Request",
    "SourceLimiter",
    "dns_service",
    "encode_response",
    "parse_dns_listen",
    "parse_query",
]

_log = Logger()

#: The default zone (C{--dns-domain}).
DEFAULT_DOMAIN = "edge.internal"

#: The default TTL of every record, and the SOA's negative-caching TTL.
DEFAULT_TTL = 30

#: Default per-source UDP rate (queries per second) and burst.
DEFAULT_RATE = 200.0
DEFAULT_BURST = 400

#: Sources whose token bucket is kept at most.
DEFAULT_MAX_SOURCES = 10_000

#: TCP: connections open at once, and seconds a connection may stay idle.
DEFAULT_MAX_TCP = 128
DEFAULT_TCP_IDLE = 10.0

#: Counter names (see the module docstring).
QUERIES = "dns_queries"
DROPPED = "dns_dropped"
MALFORMED = "dns_malformed"
TRUNCATED = "dns_truncated"

#: The longest UDP query read; longer datagrams are dropped.
MAX_UDP_QUERY = 4096

#: The UDP payload size this server advertises and uses at most with EDNS
#: (the 2020 DNS flag day's value: no IP fragmentation on usual paths).
UDP_PAYLOAD = 1232

#: Without EDNS a UDP answer fits in 512 bytes (RFC 1035).
CLASSIC_UDP = 512

#: RFC 7871 option code, and how many bits of a client subnet are looked at.
ECS_OPTION = 8
ECS_BITS_V4 = 24
ECS_BITS_V6 = 56

BADVERS = 16

_RCODE_NAMES: Mapping[int, str] = {
    dns.OK: "NOERROR",
    dns.EFORMAT: "FORMERR",
    dns.ESERVER: "SERVFAIL",
    dns.ENAME: "NXDOMAIN",
    dns.ENOTIMP: "NOTIMP",
    dns.EREFUSED: "REFUSED",
    BADVERS: "BADVERS",
}

#: Query types answered with FORMERR (they are not questions: RFC 6891
#: section 6.1.1 for OPT; TKEY and TSIG are transaction records).
_FORMERR_TYPES = frozenset({dns.OPT, dns.TKEY, dns.TSIG})
#: Zone transfers: not offered.
_TRANSFER_TYPES = frozenset({dns.AXFR, dns.IXFR})
#: MAILB, MAILA: obsolete meta types.
_NOTIMP_TYPES = frozenset({dns.MAILB, dns.MAILA})

#: Overlay sources panic routing may override (as the router does).
_PROXY_SOURCES = frozenset({"health", "breaker"})

#: Backends tried per app answer when the chosen one has no address yet.
_MAX_PICKS = 8

#: Seconds between two log lines of one reason.
_LOG_INTERVAL = 60.0


# --- the wire format of a query ---------------------------------------------


class DroppedQueryError(ValueError):
    """
    A datagram that gets no answer at all.

    @ivar reason: C{short} (no whole header), C{response} (QR=1) or
        C{oversize}.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class MalformedQueryError(ValueError):
    """
    A query with a readable header but malformed after it: FORMERR.

    @ivar reason: A short token for counters and logs (C{qdcount},
        C{label}, C{name_length}, C{compression}, C{truncated},
        C{trailing}, C{sections}, C{opt}, C{ecs}).
    @ivar detail: What exactly is wrong, for the log.
    @ivar partial: The request as far as it was read (header fields, the
        question and EDNS if they were read), for the FORMERR answer.
    """

    def __init__(self, reason: str, detail: str, partial: "Request") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.partial = partial


@attrs.frozen(slots=True)
class ClientSubnet:
    """
    An EDNS Client Subnet option of a query (RFC 7871 section 6).

    @ivar family: 1 (IPv4), 2 (IPv6), or 0 with no address bits.
    @ivar source: SOURCE PREFIX-LENGTH.
    @ivar address: ADDRESS as sent: C{ceil(source / 8)} octets, the bits
        beyond C{source} zero.
    """

    family: int
    source: int
    address: bytes

    def located(self) -> Tuple[Optional[str], int]:
        """
        The address to locate, and how many bits of it are used: the
        subnet cut to at most L{ECS_BITS_V4} or L{ECS_BITS_V6} bits.
        C{(None, 0)} when the option carries no address bits.
        """
        if self.source == 0 or self.family not in (1, 2):
            return None, 0
        size = 4 if self.family == 1 else 16
        bits = min(self.source, ECS_BITS_V4 if self.family == 1 else ECS_BITS_V6)
        full = int.from_bytes(self.address.ljust(size, b"\0"), "big")
        mask = ((1 << bits) - 1) << (size * 8 - bits)
        value = full & mask
        address = ipaddress.IPv4Address(value) if size == 4 else ipaddress.IPv6Address(value)
        return str(address), bits

    def option(self, scope: int) -> bytes:
        """
        The option's data echoed in an answer with SCOPE PREFIX-LENGTH
        C{scope} (FAMILY, SOURCE PREFIX-LENGTH and ADDRESS as received).
        """
        return struct.pack("!HBB", self.family, self.source, scope) + self.address


@attrs.frozen(slots=True)
class EDNS:
    """
    The OPT record of a query (RFC 6891).

    @ivar payload: The requestor's UDP payload size (at least 512).
    @ivar version: EDNS version (only 0 is served).
    @ivar dnssecOK: The DO bit (copied into the answer, RFC 3225).
    @ivar subnet: The Client Subnet option, if any.
    """

    payload: int
    version: int
    dnssecOK: bool
    subnet: Optional[ClientSubnet] = None


@attrs.frozen(slots=True)
class Question:
    """
    The question of a query.

    @ivar labels: The name's labels as received (case kept, for the echo).
    @ivar qtype: QTYPE.
    @ivar qclass: QCLASS.
    """

    labels: Tuple[bytes, ...]
    qtype: int
    qclass: int

    @property
    def text(self) -> str:
        """
        The name in presentation form (for logs).
        """
        return ".".join(label.decode("ascii", "backslashreplace") for label in self.labels) + "."


@attrs.frozen(slots=True)
class Request:
    """
    A parsed query.

    @ivar id: The message id.
    @ivar opcode: OPCODE (0 for QUERY; nothing else is read further).
    @ivar rd: The RD bit (copied into the answer).
    @ivar cd: The CD bit (copied into the answer).
    @ivar question: The question; C{None} for another opcode, or when a
        malformed query broke off before it.
    @ivar edns: The OPT record, or C{None}.
    """

    id: int
    opcode: int
    rd: bool
    cd: bool
    question: Optional[Question] = None
    edns: Optional[EDNS] = None


_HEADER = struct.Struct("!HHHHHH")
_RR_FIXED = struct.Struct("!HHIH")


class _Reader:
    """
    The strict parser of one query message.
    """

    def __init__(self, data: bytes, request: Request) -> None:
        self.data = data
        self.pos = _HEADER.size
        self.request = request

    def fail(self, reason: str, detail: str) -> MalformedQueryError:
        return MalformedQueryError(reason, detail, self.request)

    def name(self) -> Tuple[bytes, ...]:
        """
        Read a name at C{pos} (RFC 1035 section 4.1.4), following
        compression pointers only strictly backwards: each pointer must
        point before the start of the name and before every earlier
        pointer's target, so that no loop is possible.
        """
        data = self.data
        size = len(data)
        labels: List[bytes] = []
        wire = 0
        pos = self.pos
        lowest = pos
        end: Optional[int] = None
        while True:
            if pos >= size:
                raise self.fail("truncated", "the message ends inside a name")
            length = data[pos]
            kind = length & 0xC0
            if kind == 0xC0:
                if pos + 1 >= size:
                    raise self.fail("truncated", "the message ends inside a pointer")
                target = ((length & 0x3F) << 8) | data[pos + 1]
                if end is None:
                    end = pos + 2
                if target >= lowest:
                    raise self.fail(
                        "compression", f"pointer at {pos} to {target} does not point backwards"
                    )
                lowest = pos = target
                continue
            if kind:
                raise self.fail("label", f"label length byte {length:#04x} (over 63)")
            wire += length + 1
            if wire > 255:
                raise self.fail("name_length", "a name over 255 octets")
            if length == 0:
                self.pos = end if end is not None else pos + 1
                return tuple(labels)
            if pos + 1 + length > size:
                raise self.fail("truncated", "the message ends inside a label")
            labels.append(data[pos + 1 : pos + 1 + length])
            pos += 1 + length

    def fixed(self, fmt: struct.Struct, what: str) -> Tuple[int, ...]:
        if self.pos + fmt.size > len(self.data):
            raise self.fail("truncated", f"the message ends inside {what}")
        values = fmt.unpack_from(self.data, self.pos)
        self.pos += fmt.size
        return values

    def take(self, length: int, what: str) -> bytes:
        if self.pos + length > len(self.data):
            raise self.fail("truncated", f"the message ends inside {what}")
        chunk = self.data[self.pos : self.pos + length]
        self.pos += length
        return chunk


_QUESTION_FIXED = struct.Struct("!HH")
_OPTION_HEAD = struct.Struct("!HH")


def parse_query(data: bytes, max_size: Optional[int] = None) -> Request:
    """
    Parse a query message strictly.

    @param max_size: Longer messages are dropped (the UDP limit), or
        C{None}.
    @return: The request.  For an opcode other than QUERY only the header
        is read (the answer is NOTIMP).
    @raise DroppedQueryError: No answer must be sent: fewer than 12 bytes, QR=1,
        or over C{max_size}.
    @raise MalformedQueryError: The answer is FORMERR; see its C{reason}.
    """
    if len(data) < _HEADER.size:
        raise DroppedQueryError("short")
    if max_size is not None and len(data) > max_size:
        raise DroppedQueryError("oversize")
    msg_id, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(data)
    if flags & 0x8000:
        raise DroppedQueryError("response")
    opcode = (flags >> 11) & 0xF
    request = Request(id=msg_id, opcode=opcode, rd=bool(flags & 0x0100), cd=bool(flags & 0x0010))
    if opcode != dns.OP_QUERY:
        return request
    reader = _Reader(data, request)
    if qdcount != 1:
        raise reader.fail("qdcount", f"QDCOUNT {qdcount}")
    if ancount or nscount:
        raise reader.fail("sections", f"ANCOUNT {ancount}, NSCOUNT {nscount} in a query")
    labels = reader.name()
    qtype, qclass = reader.fixed(_QUESTION_FIXED, "the question")
    question = Question(labels, qtype, qclass)
    request = reader.request = attrs.evolve(request, question=question)
    edns: Optional[EDNS] = None
    for _ in range(arcount):
        owner = reader.name()
        rtype, rclass, ttl, rdlength = reader.fixed(_RR_FIXED, "a record")
        rdata = reader.take(rdlength, "a record's data")
        if rtype != dns.OPT:
            continue  # e.g. a TSIG: not verified, not needed
        if edns is not None:
            raise reader.fail("opt", "a second OPT record")
        if owner:
            raise reader.fail("opt", "an OPT record not owned by the root")
        edns = EDNS(
            payload=max(rclass, CLASSIC_UDP),
            version=(ttl >> 16) & 0xFF,
            dnssecOK=bool(ttl & 0x8000),
        )
        request = reader.request = attrs.evolve(request, edns=edns)
        edns = attrs.evolve(edns, subnet=_options(reader, rdata))
        request = reader.request = attrs.evolve(request, edns=edns)
    if reader.pos != len(data):
        raise reader.fail("trailing", f"{len(data) - reader.pos} bytes after the message")
    return request


def _options(reader: _Reader, rdata: bytes) -> Optional[ClientSubnet]:
    """
    The Client Subnet option among the OPT record's options (others are
    ignored), checked as RFC 7871 section 6 says.
    """
    subnet: Optional[ClientSubnet] = None
    pos = 0
    while pos < len(rdata):
        if pos + _OPTION_HEAD.size > len(rdata):
            raise reader.fail("opt", "an option header cut short")
        code, length = _OPTION_HEAD.unpack_from(rdata, pos)
        pos += _OPTION_HEAD.size
        if pos + length > len(rdata):
            raise reader.fail("opt", "an option cut short")
        value = rdata[pos : pos + length]
        pos += length
        if code != ECS_OPTION:
            continue
        if subnet is not None:
            raise reader.fail("ecs", "a second client subnet option")
        subnet = _subnet(reader, value)
    return subnet


def _subnet(reader: _Reader, value: bytes) -> ClientSubnet:
    if len(value) < 4:
        raise reader.fail("ecs", f"client subnet option of {len(value)} bytes")
    family, source, scope = struct.unpack_from("!HBB", value)
    address = value[4:]
    if family == 1:
        bits = 32
    elif family == 2:
        bits = 128
    elif family == 0 and source == 0:
        bits = 0
    else:
        raise reader.fail("ecs", f"client subnet family {family}")
    if source > bits:
        raise reader.fail("ecs", f"source prefix length {source} for family {family}")
    if scope != 0:
        raise reader.fail("ecs", f"scope prefix length {scope} in a query")
    if len(address) != (source + 7) // 8:
        raise reader.fail("ecs", f"{len(address)} address octets for source prefix length {source}")
    if source % 8 and address[-1] & (0xFF >> (source % 8)):
        raise reader.fail("ecs", "address bits set beyond the source prefix length")
    return ClientSubnet(family, source, address)


# --- answers ------------------------------------------------------------------


@attrs.frozen(slots=True)
class Answer:
    """
    What the resolver says to a question.

    @ivar rcode: The response code.
    @ivar answers: The answer section.
    @ivar authority: The authority section (the SOA of negative answers).
    @ivar authoritative: The AA bit.
    @ivar scope: The ECS SCOPE PREFIX-LENGTH to echo (0: the answer does
        not depend on the client's location).
    """

    rcode: int
    answers: Tuple[dns.RRHeader, ...] = ()
    authority: Tuple[dns.RRHeader, ...] = ()
    authoritative: bool = False
    scope: int = 0


class _WireName(dns.Name):
    """
    A name encoded from its labels as received, so that the echoed question
    is the question even when a label holds a dot byte (which the dotted
    form of L{dns.Name} would split).
    """

    def __init__(self, labels: Tuple[bytes, ...]) -> None:
        super().__init__(b".".join(labels))
        self.labels = labels
        self.plain = all(b"." not in label for label in labels)

    def encode(self, strio: Any, compDict: Optional[Dict[bytes, int]] = None) -> None:
        if self.plain:
            super().encode(strio, compDict)
            return
        for label in self.labels:
            strio.write(bytes((len(label),)) + label)
        strio.write(b"\0")


def encode_response(request: Request, answer: Answer, limit: int) -> Tuple[bytes, bool]:
    """
    The answer message to C{request}, at most C{limit} bytes.

    RD, CD and the DO bit are copied; RA is never set.  With EDNS in the
    request the answer has an OPT record (version 0, payload
    L{UDP_PAYLOAD}, the extended response code) that echoes a Client
    Subnet option with C{answer.scope}.  An answer over C{limit} is sent
    without its records and with TC=1.

    @return: (the message, whether it was truncated).
    """
    message = dns.Message(
        id=request.id,
        answer=1,
        opCode=request.opcode,
        auth=answer.authoritative,
        recDes=int(request.rd),
        recAv=0,
        rCode=answer.rcode & 0xF,
        checkingDisabled=int(request.cd),
    )
    message.maxSize = 0  # truncation is done here, by records, not mid-record
    question = request.question
    if question is not None:
        message.queries = [dns.Query(b"", question.qtype, question.qclass)]
        message.queries[0].name = _WireName(question.labels)
    message.answers = list(answer.answers)
    message.authority = list(answer.authority)
    edns = request.edns
    if edns is not None:
        options = []
        if edns.subnet is not None and answer.rcode != BADVERS:
            options.append(dns._OPTVariableOption(ECS_OPTION, edns.subnet.option(answer.scope)))
        message.additional = [
            dns._OPTHeader(  # type: ignore[list-item]
                udpPayloadSize=UDP_PAYLOAD,
                extendedRCODE=answer.rcode >> 4,
                version=0,
                dnssecOK=edns.dnssecOK,
                options=options,
            )
        ]
    data = message.toStr()
    if len(data) <= limit:
        return data, False
    message.answers = []
    message.authority = []
    message.trunc = 1
    return message.toStr(), True


def _labels(text: str) -> Tuple[bytes, ...]:
    """
    A name as lower-case labels, or C{()} when it cannot be a DNS name.
    """
    labels = tuple(text.encode("utf-8").lower().strip(b".").split(b"."))
    if not all(0 < len(label) <= 63 for label in labels):
        return ()
    if sum(len(label) + 1 for label in labels) + 1 > 255:
        return ()
    return labels


@attrs.frozen(slots=True)
class _TableIndex:
    """
    What the names of the zone need from one routing snapshot.

    @ivar apps: App name labels (lower case) -> the app, for apps with a
        row that is not deleted (the first app in table order when two
        differ only in case).
    @ivar between: Label tuples that lie between the apex and an app of
        several labels (names that exist without data).
    @ivar regions: Region label (lower case) -> its routable backends, in
        table order.
    @ivar known: Regions of the table's rows that are not deleted.
    """

    apps: Mapping[Tuple[bytes, ...], str]
    between: FrozenSet[Tuple[bytes, ...]]
    regions: Mapping[bytes, Tuple[Backend, ...]]
    known: FrozenSet[bytes]

    @classmethod
    def build(cls, snapshot: RoutingSnapshot) -> "_TableIndex":
        apps: Dict[Tuple[bytes, ...], str] = {}
        between: Set[Tuple[bytes, ...]] = set()
        known: Set[bytes] = set()
        for b in snapshot.backends:
            if b.deleted:
                continue
            known.add(b.region.encode("utf-8").lower())
            if b.app is None:
                continue
            labels = _labels(b.app)
            if labels and labels not in apps:
                apps[labels] = b.app
                for i in range(1, len(labels)):
                    between.add(labels[i:])
        regions: Dict[bytes, List[Backend]] = {}
        for b in snapshot.routable.values():
            regions.setdefault(b.region.encode("utf-8").lower(), []).append(b)
        return cls(
            apps=apps,
            between=frozenset(between),
            regions={k: tuple(v) for k, v in regions.items()},
            known=frozenset(known),
        )


_A_TYPES = frozenset({dns.A, dns.ALL_RECORDS})
_AAAA_TYPES = frozenset({dns.AAAA, dns.ALL_RECORDS})


class DNSResolver:
    """
    Answers the questions of the zone from the routing table, the router's
    state and the POPs (see the module docstring).

    Nothing is cached but indexes of the snapshot and the POP list in
    force, rebuilt when they are replaced: a reload, a health verdict or a
    change of load is seen by the next query.

    @ivar domain: The zone, lower case, without the final dot.
    @ivar ttl: The TTL of every record.
    """

    def __init__(
        self,
        repository: IBackendRepository,
        geo: Optional[IGeoResolver],
        router: Any,
        pops: Optional[IPopRepository] = None,
        *,
        domain: str = DEFAULT_DOMAIN,
        ttl: int = DEFAULT_TTL,
        hosts: Optional[IHostResolver] = None,
        ns_addresses: Sequence[str] = (),
        serial: Optional[int] = None,
        rng: Optional[random.Random] = None,
    ) -> None:
        """
        @param repository: The routing table.
        @param geo: Where clients are; C{None} for no geo (every client
            then gets the local region first).
        @param router: The router whose C{overlay} (its C{closedToNew}
            set), C{load} (its C{connections}), C{local_region} and
            C{panic} are read at every app answer (duck-typed: any object
            with these).
        @param pops: The POPs; C{None} for none.
        @param domain: The zone (C{--dns-domain}).
        @param ttl: Seconds, 0 to 2**31 - 1 (C{--dns-ttl}).
        @param hosts: Addresses of backends named by host name; without it
            such backends are skipped (a DNS answer needs an address).
        @param ns_addresses: The addresses of C{ns1.<domain>}, the name
            server the apex's NS record names.
        @param serial: The SOA serial; default the UNIX time now.
        @param rng: Breaks exact ties between backends.
        @raise ValueError: C{domain} is not a DNS name, C{ttl} is out of
            range or an C{ns_addresses} entry is not an IP address.
        """
        labels = _labels(domain)
        if not labels:
            raise ValueError(f"{domain!r} is not a DNS domain name")
        if not 0 <= ttl <= 0x7FFFFFFF:
            raise ValueError(f"DNS TTL {ttl!r} is outside 0-2147483647")
        self._repository = repository
        self._geo = geo
        self._router = router
        self._pops = pops
        self._hosts = hosts
        self._rng = rng if rng is not None else random.Random()
        self._zone = labels
        self.domain = b".".join(labels).decode("ascii", "replace")
        self.ttl = int(ttl)
        self._apex = b".".join(labels)
        self._ns = b"ns1." + self._apex
        self._nsAddresses = tuple(ipaddress.ip_address(a).compressed for a in ns_addresses)
        self._serial = (int(time.time()) if serial is None else serial) & 0xFFFFFFFF
        self._table: Tuple[Optional[RoutingSnapshot], Optional[_TableIndex]] = (None, None)
        self._popIndex: Tuple[Optional[Tuple[Pop, ...]], Mapping[bytes, Tuple[Pop, ...]]] = (
            None,
            {},
        )

    def __repr__(self) -> str:
        return f"<DNSResolver domain={self.domain!r} ttl={self.ttl}>"

    # indexes

    def _index(self) -> Tuple[RoutingSnapshot, _TableIndex]:
        snapshot = self._repository.current()
        cached, index = self._table
        if cached is not snapshot or index is None:
            index = _TableIndex.build(snapshot)
            self._table = (snapshot, index)
        return snapshot, index

    def _popsByRegion(self) -> Mapping[bytes, Tuple[Pop, ...]]:
        pops = self._pops.current() if self._pops is not None else ()
        cached, index = self._popIndex
        if cached is not pops:
            grouped: Dict[bytes, List[Pop]] = {}
            for pop in pops:
                grouped.setdefault(pop.region.encode("utf-8").lower(), []).append(pop)
            index = {k: tuple(v) for k, v in grouped.items()}
            self._popIndex = (pops, index)
        return index

    # records

    def _soa(self) -> dns.RRHeader:
        return dns.RRHeader(
            self._apex,
            dns.SOA,
            dns.IN,
            self.ttl,
            dns.Record_SOA(
                mname=self._ns,
                rname=b"hostmaster." + self._apex,
                serial=self._serial,
                refresh=3600,
                retry=600,
                expire=86400,
                minimum=self.ttl,
                ttl=self.ttl,
            ),
            auth=True,
        )

    def _addresses(
        self, owner: bytes, addresses: Iterable[str], qtype: int
    ) -> Tuple[dns.RRHeader, ...]:
        """
        A and AAAA records of C{owner} for C{qtype}, without duplicates.
        """
        records: List[dns.RRHeader] = []
        seen: Set[str] = set()
        for address in addresses:
            if address in seen:
                continue
            seen.add(address)
            if ":" in address:
                if qtype in _AAAA_TYPES:
                    payload: Any = dns.Record_AAAA(address, self.ttl)
                    records.append(
                        dns.RRHeader(owner, dns.AAAA, dns.IN, self.ttl, payload, auth=True)
                    )
            elif qtype in _A_TYPES:
                payload = dns.Record_A(address, self.ttl)
                records.append(dns.RRHeader(owner, dns.A, dns.IN, self.ttl, payload, auth=True))
        return tuple(records)

    def _backendAddresses(self, backend: Backend) -> Tuple[str, ...]:
        """
        The addresses of a backend: its literal, or what the host resolver
        knows of its name (nothing without one).  Zoned IPv6 addresses
        (C{fe80::1%eth0}) mean nothing to another host and are left out.
        """
        host = backend.host
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if "%" in host:
                return ()
            found = self._hosts.addresses(host) if self._hosts is not None else None
            return tuple(a for a in found or () if "%" not in a)
        return (host,)

    def _answer(self, records: Tuple[dns.RRHeader, ...], scope: int = 0) -> Answer:
        if records:
            return Answer(dns.OK, records, authoritative=True, scope=scope)
        return Answer(dns.OK, authority=(self._soa(),), authoritative=True)

    # the question

    def answer(self, request: Request, peer: str) -> Answer:
        """
        Answer the question of C{request} (a QUERY with a question) asked
        by C{peer} (the querier's IP address).
        """
        question = request.question
        assert question is not None
        labels = tuple(label.lower() for label in question.labels)
        zone = self._zone
        depth = len(labels) - len(zone)
        if depth < 0 or labels[depth:] != zone:
            return Answer(dns.EREFUSED)
        if question.qclass not in (dns.IN, dns.ANY):
            return Answer(dns.EREFUSED)
        qtype = question.qtype
        relative = labels[:depth]
        owner = b".".join(question.labels)
        nxdomain = Answer(dns.ENAME, authority=(self._soa(),), authoritative=True)
        if any(b"." in label for label in relative):
            return nxdomain
        if not relative:
            records: List[dns.RRHeader] = []
            if qtype in (dns.SOA, dns.ALL_RECORDS):
                records.append(self._soa())
            if qtype in (dns.NS, dns.ALL_RECORDS):
                records.append(
                    dns.RRHeader(
                        self._apex,
                        dns.NS,
                        dns.IN,
                        self.ttl,
                        dns.Record_NS(self._ns, self.ttl),
                        auth=True,
                    )
                )
            return self._answer(tuple(records))
        if relative == (b"ns1",):
            return self._answer(self._addresses(owner, self._nsAddresses, qtype))
        if relative in ((b"backends",), (b"pops",)):
            return self._answer(())
        snapshot, index = self._index()
        if len(relative) == 2 and relative[1] in (b"backends", b"pops"):
            region = relative[0]
            pops = self._popsByRegion()
            if region not in index.known and region not in pops and region != self._localRegion():
                return nxdomain
            if relative[1] == b"pops":
                addresses: Iterable[str] = (pop.address for pop in pops.get(region, ()))
            else:
                blocked = self._router.overlay.closedToNew
                addresses = (
                    address
                    for b in index.regions.get(region, ())
                    if b.id not in blocked
                    for address in self._backendAddresses(b)
                )
            return self._answer(self._addresses(owner, addresses, qtype))
        app = index.apps.get(relative)
        if app is None:
            if relative in index.between:
                return self._answer(())
            return nxdomain
        if qtype not in _A_TYPES and qtype not in _AAAA_TYPES:
            return self._answer(())
        geo, scope = self._locate(request, peer)
        best = self._best(snapshot, app, geo)
        if best is None:
            return self._answer(())
        return self._answer(self._addresses(owner, best, qtype), scope)

    def _localRegion(self) -> bytes:
        return str(self._router.local_region).encode("utf-8").lower()

    def _locate(self, request: Request, peer: str) -> Tuple[Optional[GeoInfo], int]:
        """
        Where the client is, and the ECS scope of an answer that depends on
        it: the client subnet's location (the bits used as scope) when the
        query has one with address bits that geo knows, else the querier's
        (scope 0).
        """
        geo = self._geo
        if geo is None:
            return None, 0
        subnet = request.edns.subnet if request.edns is not None else None
        if subnet is not None:
            address, bits = subnet.located()
            if address is not None:
                found = geo.resolve(address)
                if found is None:
                    # The subnet is unknown to geo: the answer is the
                    # querier's, good for any client of the resolver.
                    return geo.resolve(peer), 0
                return found, bits
        return geo.resolve(peer), 0

    def _best(
        self, snapshot: RoutingSnapshot, app: str, geo: Optional[GeoInfo]
    ) -> Optional[Tuple[str, ...]]:
        """
        The addresses of the best backend of C{app} for a client at
        C{geo}, as a new connection would be routed (panic included), or
        C{None}.
        """
        router = self._router
        overlay = router.overlay
        blocked = overlay.closedToNew
        found = self._pick(snapshot, app, geo, blocked)
        if found is None and blocked and getattr(router, "panic", False):
            candidates = snapshot.by_app.get(app, ())
            if candidates and all(b.id in blocked for b in candidates):
                found = self._pick(snapshot, app, geo, overlay.closedToNewIgnoring(_PROXY_SOURCES))
        return found

    def _pick(
        self,
        snapshot: RoutingSnapshot,
        app: str,
        geo: Optional[GeoInfo],
        blocked: Any,
    ) -> Optional[Tuple[str, ...]]:
        router = self._router
        exclude: Set[str] = set()
        for _ in range(_MAX_PICKS):
            chosen = select(
                snapshot,
                app,
                geo,
                router.local_region,
                router.load.connections,
                self._rng,
                exclude,
                blocked,
            )
            if chosen is None:
                return None
            addresses = self._backendAddresses(chosen)
            if addresses:
                return addresses
            exclude.add(chosen.id)
        return None


# --- the server -----------------------------------------------------------------


class _Reports:
    """
    Log at most once per reason per interval, with the count of what was
    not logged in between.
    """

    def __init__(self, clock: IReactorTime, interval: float = _LOG_INTERVAL) -> None:
        self._clock = clock
        self._interval = interval
        self._last: Dict[str, float] = {}
        self._quiet: Dict[str, int] = collections.Counter()

    def due(self, reason: str) -> Optional[int]:
        """
        C{None} to stay quiet about C{reason}, else how many reports were
        left out since the last one logged.
        """
        now = self._clock.seconds()
        last = self._last.get(reason)
        if last is not None and now - last < self._interval:
            self._quiet[reason] += 1
            return None
        self._last[reason] = now
        return self._quiet.pop(reason, 0)


class SourceLimiter:
    """
    A token bucket per source (an IPv4 address, an IPv6 /64), for UDP.

    At most C{max_sources} buckets are kept; a new source beyond that
    evicts the least recently seen one (which then starts afresh).

    @ivar rate: Tokens (queries) per second; 0 or less disables the limit.
    @ivar burst: Bucket size.
    """

    def __init__(
        self,
        clock: IReactorTime,
        rate: float = DEFAULT_RATE,
        burst: int = DEFAULT_BURST,
        max_sources: int = DEFAULT_MAX_SOURCES,
    ) -> None:
        if max_sources < 1:
            raise ValueError(f"max_sources must be at least 1, got {max_sources!r}")
        self._clock = clock
        self.rate = float(rate)
        self.burst = float(max(1, burst))
        self.max_sources = max_sources
        self._buckets: "collections.OrderedDict[str, List[float]]" = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, source: str) -> bool:
        """
        Whether a query from C{source} (an IP address) may be answered now;
        takes a token if so.
        """
        if self.rate <= 0:
            return True
        key = _sourceKey(source)
        now = self._clock.seconds()
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            if len(buckets) >= self.max_sources:
                buckets.popitem(last=False)
            buckets[key] = [self.burst - 1.0, now]
            return True
        buckets.move_to_end(key)
        tokens = min(self.burst, bucket[0] + max(0.0, now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return True
        bucket[0] = tokens
        return False


def _sourceKey(source: str) -> str:
    if ":" not in source:
        return source
    try:
        address = ipaddress.IPv6Address(source.split("%", 1)[0])
    except ValueError:
        return source
    mapped = address.ipv4_mapped
    if mapped is not None:
        return str(mapped)
    return str(ipaddress.IPv6Network((address, 64), strict=False).network_address)


def _peerAddress(host: str) -> str:
    """
    The querier's address as the geo resolver wants it (an IPv4-mapped
    IPv6 address as IPv4).
    """
    if ":" in host:
        try:
            mapped = ipaddress.IPv6Address(host.split("%", 1)[0]).ipv4_mapped
        except ValueError:
            return host
        if mapped is not None:
            return str(mapped)
    return host


class DNSServer:
    """
    Turns query bytes into answer bytes (or nothing), whatever the bytes:
    parsing, the checks of F10, counting and rate-limited logging around a
    L{DNSResolver}.  Transport-independent: the UDP and TCP protocols feed
    it.
    """

    def __init__(
        self,
        resolver: DNSResolver,
        clock: IReactorTime,
        metrics: Optional[IMetricsStore] = None,
        log_interval: float = _LOG_INTERVAL,
    ) -> None:
        self.resolver = resolver
        self._metrics = metrics
        self._reports = _Reports(clock, log_interval)

    def _count(self, name: str, label: str = "") -> None:
        if self._metrics is not None:
            self._metrics.increment(name, label)

    def dropped(self, reason: str, peer: str) -> None:
        """
        Count (and perhaps log) a query dropped unanswered.
        """
        self._count(DROPPED, reason)
        quiet = self._reports.due("drop:" + reason)
        if quiet is None:
            return
        if reason == "rate":
            _log.warn(
                "DNS: dropping queries from {peer} over its rate"
                " ({quiet} more drops of this kind since the last report)",
                peer=peer,
                quiet=quiet,
            )
        else:
            _log.info(
                "DNS: dropped a query from {peer}: {reason}"
                " ({quiet} more of this kind since the last report)",
                peer=peer,
                reason=reason,
                quiet=quiet,
            )

    def handle(self, data: bytes, host: str, udp: bool) -> Optional[bytes]:
        """
        The answer to the message C{data} from C{host}, or C{None} to send
        nothing.  Never raises.
        """
        peer = _peerAddress(host)
        limit = CLASSIC_UDP if udp else 0xFFFF
        try:
            try:
                request = parse_query(data, MAX_UDP_QUERY if udp else None)
            except DroppedQueryError as e:
                self.dropped(e.reason, peer)
                return None
            except MalformedQueryError as e:
                self._count(MALFORMED, e.reason)
                quiet = self._reports.due("formerr:" + e.reason)
                if quiet is not None:
                    _log.info(
                        "DNS: FORMERR to {peer}: {detail}"
                        " ({quiet} more of this kind since the last report)",
                        peer=peer,
                        detail=e.detail,
                        quiet=quiet,
                    )
                return self._send(e.partial, Answer(dns.EFORMAT), limit, udp)
            if udp and request.edns is not None:
                limit = max(CLASSIC_UDP, min(request.edns.payload, UDP_PAYLOAD))
            question = request.question
            if request.opcode != dns.OP_QUERY:
                answer = Answer(dns.ENOTIMP)
            elif request.edns is not None and request.edns.version != 0:
                answer = Answer(BADVERS)
            elif question is None:  # pragma: no cover - parse_query always sets it
                answer = Answer(dns.EFORMAT)
            elif question.qtype in _FORMERR_TYPES:
                self._count(MALFORMED, "qtype")
                answer = Answer(dns.EFORMAT)
            elif question.qtype in _TRANSFER_TYPES:
                answer = Answer(dns.EREFUSED)
            elif question.qtype in _NOTIMP_TYPES:
                answer = Answer(dns.ENOTIMP)
            else:
                answer = self.resolver.answer(request, peer)
            return self._send(request, answer, limit, udp)
        except Exception:
            quiet = self._reports.due("bug")
            if quiet is not None:
                _log.failure(
                    "DNS: answering a query from {peer} failed"
                    " ({quiet} more failures since the last report)",
                    peer=peer,
                    quiet=quiet,
                )
            return self._servfail(data)

    def _send(self, request: Request, answer: Answer, limit: int, udp: bool) -> bytes:
        data, truncated = encode_response(request, answer, limit)
        if truncated:
            self._count(TRUNCATED)
        self._count(QUERIES, _RCODE_NAMES.get(answer.rcode, str(answer.rcode)))
        return data

    def _servfail(self, data: bytes) -> Optional[bytes]:
        try:
            msg_id, flags = struct.unpack_from("!HH", data)
            request = Request(
                id=msg_id, opcode=(flags >> 11) & 0xF, rd=bool(flags & 0x100), cd=False
            )
            self._count(QUERIES, "SERVFAIL")
            return encode_response(request, Answer(dns.ESERVER), CLASSIC_UDP)[0]
        except Exception:
            return None


# --- transports -----------------------------------------------------------------


class _UDP(DatagramProtocol):
    """
    The UDP side: the per-source limit, then the server.
    """

    transport: Any

    def __init__(self, server: DNSServer, limiter: SourceLimiter) -> None:
        self.server = server
        self.limiter = limiter

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        host = str(addr[0])
        if not self.limiter.allow(host):
            self.server.dropped("rate", _peerAddress(host))
            return
        reply = self.server.handle(data, host, udp=True)
        if reply is None:
            return
        try:
            self.transport.write(reply, addr)
        except Exception:
            self.server.dropped("send_error", _peerAddress(host))


@implementer(IPushProducer)
class _TCP(Int16StringReceiver, TimeoutMixin):
    """
    The TCP side (RFC 7766): length-prefixed messages, pipelined; an idle
    connection is closed; reading pauses while the client does not read
    its answers.
    """

    MAX_LENGTH = 0xFFFF
    factory: "_TCPFactory"
    transport: Any
    _counted = False
    _closing = False
    _peer = ""
    _abortCall: Optional[IDelayedCall] = None

    def connectionMade(self) -> None:
        factory = self.factory
        if factory.open >= factory.maxConnections:
            factory.server.dropped("tcp_limit", str(getattr(self.transport.getPeer(), "host", "")))
            self.transport.abortConnection()
            return
        factory.open += 1
        self._counted = True
        self._peer = str(getattr(self.transport.getPeer(), "host", ""))
        self.callLater = factory.reactor.callLater  # type: ignore[method-assign]
        self.setTimeout(factory.idleTimeout)
        self.transport.registerProducer(self, True)

    def stringReceived(self, string: bytes) -> None:
        if self._closing:
            return  # the rest of a chunk after a message that closed us
        self.resetTimeout()
        reply = self.factory.server.handle(string, self._peer, udp=False)
        if reply is None:
            self._closing = True
            self.transport.loseConnection()
            return
        self.sendString(reply)

    def timeoutConnection(self) -> None:
        # Close cleanly (the answers already written are delivered), and
        # abort if the client does not even read them within another idle
        # period.
        self.transport.loseConnection()
        self._abortCall = self.factory.reactor.callLater(
            self.factory.idleTimeout, self.transport.abortConnection
        )

    def connectionLost(self, reason: Optional[Failure] = None) -> None:
        self.setTimeout(None)
        if self._abortCall is not None and self._abortCall.active():
            self._abortCall.cancel()
        self._abortCall = None
        if self._counted:
            self._counted = False
            self.factory.open -= 1

    # IPushProducer: the transport's write buffer is full / drained

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        pass


class _TCPFactory(Factory):
    protocol = _TCP  # type: ignore[assignment]

    def __init__(
        self, server: DNSServer, reactor: Any, maxConnections: int, idleTimeout: float
    ) -> None:
        self.server = server
        self.reactor = reactor
        self.maxConnections = maxConnections
        self.idleTimeout = idleTimeout
        self.open = 0


def parse_dns_listen(text: str) -> Optional[Tuple[str, int]]:
    """
    Read C{--dns}: C{[HOST:]PORT}, where HOST is an IPv4 address or an IPv6
    address in brackets (default C{127.0.0.1}, loopback only), or C{none}
    (or C{off}, or empty) for no DNS listener.

    @return: (host, port), or C{None} for none.
    @raise ValueError: Anything else (the message says why).
    """
    value = text.strip()
    if value.lower() in ("", "none", "off"):
        return None
    host = "127.0.0.1"
    port_text = value
    if value.startswith("["):
        inside, bracket, rest = value[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise ValueError(f"{text!r}: expected [IPV6]:PORT")
        host, port_text = inside, rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} is not an IPv6 address") from None
    elif ":" in value:
        host, _, port_text = value.rpartition(":")
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(
                f"{text!r}: {host!r} is not an IPv4 address (put IPv6 in brackets)"
            ) from None
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: {port_text!r} is not a port (0-65535)")
    return host, int(port_text)


class DNSService(Service):
    """
    The DNS listener: UDP and TCP on one address and port.

    Both sockets are bound in L{privilegedStartService} (so that port 53
    can be bound before twistd drops privileges).  With port 0 the TCP
    socket takes the port the kernel gave the UDP one (tried again a few
    times if that TCP port is taken).

    @ivar host: The listen address.
    @ivar port: The port, the actual one once listening.
    @ivar server: The L{DNSServer}.
    @ivar limiter: The per-source UDP limiter.
    """

    def __init__(
        self,
        reactor: Any,
        host: str,
        port: int,
        server: DNSServer,
        limiter: SourceLimiter,
        max_tcp: int = DEFAULT_MAX_TCP,
        tcp_idle: float = DEFAULT_TCP_IDLE,
    ) -> None:
        self.reactor = reactor
        self.host = host
        self.port = port
        self._requested = port
        self.server = server
        self.limiter = limiter
        self._tcpFactory = _TCPFactory(server, reactor, max_tcp, tcp_idle)
        self._udp: Any = None
        self._tcp: Any = None

    def __repr__(self) -> str:
        return f"<DNSService {self.host}:{self.port}>"

    def _listen(self) -> None:
        attempts = 5 if self._requested == 0 else 1
        for attempt in range(attempts):
            udp = self.reactor.listenUDP(
                self._requested,
                _UDP(self.server, self.limiter),
                interface=self.host,
                maxPacketSize=MAX_UDP_QUERY + 1,
            )
            port = udp.getHost().port
            try:
                tcp = self.reactor.listenTCP(port, self._tcpFactory, interface=self.host)
            except CannotListenError:
                udp.stopListening()
                if attempt + 1 < attempts:
                    continue
                raise
            self._udp, self._tcp, self.port = udp, tcp, port
            return

    def privilegedStartService(self) -> None:
        self._listen()
        super().privilegedStartService()

    def startService(self) -> None:
        if self._udp is None:
            self._listen()
        super().startService()
        _log.info(
            "DNS for {domain} on {host} port {port} (UDP and TCP)",
            domain=self.server.resolver.domain,
            host=self.host,
            port=self.port,
        )

    def stopService(self) -> "Deferred[Any]":
        super().stopService()
        ports = [p for p in (self._udp, self._tcp) if p is not None]
        self._udp = self._tcp = None
        return gatherResults([maybeDeferred(p.stopListening) for p in ports])


def dns_service(
    reactor: Any,
    description: str,
    resolver: DNSResolver,
    metrics: Optional[IMetricsStore] = None,
    *,
    rate: float = DEFAULT_RATE,
    burst: int = DEFAULT_BURST,
    max_sources: int = DEFAULT_MAX_SOURCES,
    max_tcp: int = DEFAULT_MAX_TCP,
    tcp_idle: float = DEFAULT_TCP_IDLE,
) -> Optional[DNSService]:
    """
    The DNS listener for C{--dns DESC} (see L{parse_dns_listen}), or
    C{None} for C{none}.

    @param reactor: Provides C{listenUDP}, C{listenTCP}, C{seconds} and
        C{callLater}.
    @param rate: Per-source UDP queries per second (0: no limit).
    @param burst: Per-source UDP burst.
    @param max_sources: Sources whose bucket is kept at most.
    @param max_tcp: TCP connections open at once (more are closed at once).
    @param tcp_idle: Seconds a TCP connection may be idle.
    @raise ValueError: A malformed description.
    """
    address = parse_dns_listen(description)
    if address is None:
        return None
    host, port = address
    server = DNSServer(resolver, reactor, metrics)
    limiter = SourceLimiter(reactor, rate, burst, max_sources)
    return DNSService(reactor, host, port, server, limiter, max_tcp, tcp_idle)
