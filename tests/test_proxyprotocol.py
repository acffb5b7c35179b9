"""
Tests for L{edgeproxy.net.proxyprotocol}: the strict PROXY v1/v2 parser and the
writer.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from edgeproxy.net.proxyprotocol import (
    DEFAULT_V2_MAX_LENGTH,
    V1_MAX_LENGTH,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    crc32c,
    header_for,
    parse,
)


def v2(
    command: int = 1,
    family: int = 0x11,
    body: bytes = b"",
    version: int = 2,
    length: int | None = None,
) -> bytes:
    """
    A hand-built v2 header (not using the writer under test).
    """
    if length is None:
        length = len(body)
    return V2_SIGNATURE + bytes([version << 4 | command, family]) + struct.pack("!H", length) + body


IPV4_BODY = bytes([10, 1, 2, 3, 192, 168, 0, 1]) + struct.pack("!HH", 54321, 443)
IPV6_BODY = (
    socket.inet_pton(socket.AF_INET6, "2001:db8::1")
    + socket.inet_pton(socket.AF_INET6, "2001:db8::2")
    + struct.pack("!HH", 1234, 8443)
)
# Two TLVs: PP2_TYPE_ALPN "h2" and PP2_TYPE_AUTHORITY "example.com".
TLVS = b"\x01\x00\x02h2" + b"\x02\x00\x0bexample.com"


def tlv(kind: int, value: bytes) -> bytes:
    """
    One hand-built TLV: type, big-endian 16-bit length, value.
    """
    return struct.pack("!BH", kind, len(value)) + value


# HAProxy's TLVs as its senders write them (proxy-protocol.txt 2.2).
ALPN = tlv(0x01, b"http/1.1")
AUTHORITY = tlv(0x02, b"www.example.com")
NOOP = tlv(0x04, b"")
NOOP_PADDING = tlv(0x04, b"\x00" * 5)
UNIQUE_ID = tlv(0x05, b"7F000001:D4F2_7F000001:1F90_65A1B2C3_0001:3E8")
# PP2_TYPE_SSL: client flags (PP2_CLIENT_SSL | CERT_CONN | CERT_SESS), verify
# result 0 (verified), then sub-TLVs: version, CN, cipher, sig alg, key alg.
SSL = tlv(
    0x20,
    b"\x07"
    + struct.pack("!I", 0)
    + tlv(0x21, b"TLSv1.3")
    + tlv(0x22, b"client.example.com")
    + tlv(0x23, b"TLS_AES_256_GCM_SHA384")
    + tlv(0x24, b"RSA-SHA256")
    + tlv(0x25, b"RSA2048"),
)
# A plain-TCP client: PP2_TYPE_SSL with no flag and no sub-TLV.
SSL_NOT_TLS = tlv(0x20, b"\x00" + struct.pack("!I", 1))
NETNS = tlv(0x30, b"blue")
# Types this parser knows nothing about: cloud vendors' custom ones (GCP PSC
# connection id, AWS VPC endpoint id, Azure private link id) and an
# unassigned one.
GCP_PSC = tlv(0xE0, struct.pack("!Q", 1234567890123))
AWS_VPCE = tlv(0xEA, b"\x01vpce-0123456789abcdef0")
AZURE_LINK = tlv(0xEE, b"\x01" + struct.pack("<I", 12345))
UNASSIGNED = tlv(0x2A, b"?")
EVERY_TLV = (
    ALPN + AUTHORITY + NOOP + UNIQUE_ID + SSL + NETNS + GCP_PSC + AWS_VPCE + AZURE_LINK + UNASSIGNED
)

#: A PP2_TYPE_CRC32C TLV with its value zeroed, as the checksum is computed.
CRC_ZERO = b"\x03\x00\x04\x00\x00\x00\x00"


def crc_filled(header: bytes) -> bytes:
    """
    The hand-built v2 C{header} with the value of its zeroed CRC32c TLV (the
    first L{CRC_ZERO} after the fixed 16 bytes) set to the checksum of the
    whole header.
    """
    at = header.index(CRC_ZERO, 16) + 3
    return header[:at] + struct.pack("!I", crc32c(header)) + header[at + 4 :]


def crc_damaged(header: bytes) -> bytes:
    """
    C{crc_filled(header)} with one bit of the checksum wrong.
    """
    good = crc_filled(header)
    at = header.index(CRC_ZERO, 16) + 6
    return good[:at] + bytes([good[at] ^ 0x01]) + good[at + 1 :]


def crc_byte_swapped(header: bytes) -> bytes:
    """
    C{crc_filled(header)} with the checksum written little-endian.
    """
    at = header.index(CRC_ZERO, 16) + 3
    value = crc32c(header)
    assert struct.pack("!I", value) != struct.pack("<I", value)
    return header[:at] + struct.pack("<I", value) + header[at + 4 :]


def crc_of_addresses_only(header: bytes) -> bytes:
    """
    The hand-built v2 C{header} with a CRC32c over its address block alone
    (the fixed 16 bytes left out), not the whole header.
    """
    at = header.index(CRC_ZERO, 16) + 3
    return header[:at] + struct.pack("!I", crc32c(header[16 : at - 3])) + header[at + 4 :]


MALFORMED = [
    # (case, bytes, reason)  -- the F8 list and then some
    ("no header", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "not-proxy"),
    ("lower-case proxy", b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "not-proxy"),
    ("TLS hello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "not-proxy"),
    ("no CRLF within 107 bytes", b"PROXY UNKNOWN " + b"x" * 200, "v1-too-long"),
    ("CRLF just past 107 bytes", b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n", "v1-too-long"),
    ("bare LF", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "v1-bare-lf"),
    ("bare CR", b"PROXY TCP4 1.2.3.4\r5.6.7.8 1 2\r\n", "v1-bare-cr"),
    ("TCP4 with an IPv6 address", b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "v1-family-mismatch"),
    ("TCP6 with an IPv4 address", b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "v1-family-mismatch"),
    ("address 999.1.1.1", b"PROXY TCP4 999.1.1.1 5.6.7.8 1 2\r\n", "v1-bad-address"),
    ("three-part IPv4", b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "v1-bad-address"),
    ("IPv4 heading zero", b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "v1-bad-address"),
    ("hostname", b"PROXY TCP4 localhost 5.6.7.8 1 2\r\n", "v1-bad-address"),
    ("IPv6 zone index", b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "v1-bad-address"),
    ("IPv6 group too long", b"PROXY TCP6 12345::1 ::1 1 2\r\n", "v1-bad-address"),
    ("two double colons", b"PROXY TCP6 1::2::3 ::1 1 2\r\n", "v1-bad-address"),
    ("double space", b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "v1-bad-address"),
    ("port 70000", b"PROXY TCP4 1.2.3.4 5.6.7.8 70000 2\r\n", "v1-bad-port"),
    ("port 65536", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", "v1-bad-port"),
    ("non-numeric port", b"PROXY TCP4 1.2.3.4 5.6.7.8 http 2\r\n", "v1-bad-port"),
    ("signed port", b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", "v1-bad-port"),
    ("negative port", b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "v1-bad-port"),
    ("port heading zero", b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "v1-bad-port"),
    ("empty port", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \r\n", "v1-bad-port"),
    ("missing port", b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "v1-bad-syntax"),
    ("extra field", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "v1-bad-syntax"),
    ("trailing space", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "v1-bad-syntax"),
    ("non-UTF-8 bytes", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \xff\xfe\r\n", "v1-not-ascii"),
    ("UTF-8 but not ASCII", "PROXY TCP4 1.2.3.4 5.6.7.8 1 \u0663\r\n".encode(), "v1-not-ascii"),
    ("NUL byte", b"PROXY TCP4 1.2.3.4\x005.6.7.8 1 2\r\n", "v1-bad-char"),
    ("tab", b"PROXY TCP4\t1.2.3.4 5.6.7.8 1 2\r\n", "v1-bad-char"),
    ("unknown v1 family", b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "v1-bad-family"),
    ("empty v1 family", b"PROXY \r\n", "v1-bad-family"),
    ("UNKNOWN glued", b"PROXY UNKNOWNX\r\n", "v1-bad-family"),
    ("v2 wrong version 1", v2(version=1, body=IPV4_BODY), "v2-bad-version"),
    ("v2 wrong version 3", v2(version=3, body=IPV4_BODY), "v2-bad-version"),
    ("v2 unknown command", v2(command=2, body=IPV4_BODY), "v2-bad-command"),
    ("v2 unknown family", v2(family=0x41, body=IPV4_BODY), "v2-bad-family"),
    ("v2 UDP over IPv4", v2(family=0x12, body=IPV4_BODY), "v2-bad-family"),
    ("v2 INET unspecified transport", v2(family=0x10, body=IPV4_BODY), "v2-bad-family"),
    ("v2 length 65535", v2(length=65535), "v2-too-long"),
    ("v2 length above the ceiling", v2(length=DEFAULT_V2_MAX_LENGTH + 1), "v2-too-long"),
    ("v2 IPv4 block too short", v2(body=IPV4_BODY[:11]), "v2-short-address"),
    ("v2 IPv6 block too short", v2(family=0x21, body=IPV4_BODY), "v2-short-address"),
    ("v2 UNIX block too short", v2(family=0x31, body=IPV6_BODY), "v2-short-address"),
    ("v2 truncated TLV header", v2(body=IPV4_BODY + b"\x01\x00"), "v2-bad-tlv"),
    ("v2 TLV overruns", v2(body=IPV4_BODY + b"\x01\x00\x05ab"), "v2-bad-tlv"),
    ("v2 wrong CRC32c", crc_damaged(v2(body=IPV4_BODY + CRC_ZERO)), "v2-bad-crc32c"),
    (
        "v2 wrong CRC32c among other TLVs",
        crc_damaged(v2(family=0x21, body=IPV6_BODY + ALPN + CRC_ZERO + SSL)),
        "v2-bad-crc32c",
    ),
    ("v2 CRC32c of zero", v2(body=IPV4_BODY + CRC_ZERO), "v2-bad-crc32c"),
    (
        "v2 CRC32c little-endian",
        crc_byte_swapped(v2(body=IPV4_BODY + CRC_ZERO)),
        "v2-bad-crc32c",
    ),
    (
        "v2 CRC32c of the addresses only",
        crc_of_addresses_only(v2(body=IPV4_BODY + CRC_ZERO)),
        "v2-bad-crc32c",
    ),
    (
        "v2 wrong CRC32c with AF_UNSPEC",
        crc_damaged(v2(family=0x00, body=CRC_ZERO)),
        "v2-bad-crc32c",
    ),
    ("v2 CRC32c TLV of 3 bytes", v2(body=IPV4_BODY + b"\x03\x00\x03abc"), "v2-bad-tlv"),
    ("v2 CRC32c TLV of 5 bytes", v2(body=IPV4_BODY + b"\x03\x00\x05abcde"), "v2-bad-tlv"),
    ("v2 CRC32c TLV of 0 bytes", v2(body=IPV4_BODY + b"\x03\x00\x00"), "v2-bad-tlv"),
]


@pytest.mark.parametrize(
    ("data", "reason"),
    [(data, reason) for _, data, reason in MALFORMED],
    ids=[case for case, _, _ in MALFORMED],
)
def test_malformed(data: bytes, reason: str) -> None:
    """
    Each malformed header is refused with a ProxyHeaderError (a ValueError)
    whose reason names what is wrong.
    """
    with pytest.raises(ProxyHeaderError) as info:
        parse(data)
    assert info.value.reason == reason
    assert isinstance(info.value, ValueError)
    assert str(info.value) == reason


@pytest.mark.parametrize(
    "data", [data for _, data, _ in MALFORMED], ids=[case for case, _, _ in MALFORMED]
)
def test_malformed_byte_by_byte(data: bytes) -> None:
    """
    Fed one byte more at a time, a malformed header is refused at the
    latest when all of it is in: never accepted, never waited on forever.
    """
    with pytest.raises(ProxyHeaderError):
        for cut in range(1, len(data) + 1):
            assert parse(data[:cut]) is None


def test_v2_long_length_refused_as_soon_as_seen() -> None:
    """
    A v2 header announcing 65535 bytes is refused once its 16 fixed bytes are
    in, without waiting for the body (a slow sender cannot hold a buffer).
    """
    header = v2(length=65535)
    assert len(header) == 16
    for cut in range(16):
        assert parse(header[:cut]) is None
    with pytest.raises(ProxyHeaderError) as info:
        parse(header)
    assert info.value.reason == "v2-too-long"


def test_v2_ceiling_configurable() -> None:
    """
    The v2 length ceiling is a parameter: a header with TLVs beyond a low
    ceiling is refused, and accepted with a higher one.
    """
    header = v2(body=IPV4_BODY + b"\x04\x01\x00" + b"x" * 256)
    with pytest.raises(ProxyHeaderError) as info:
        parse(header, max_v2_length=100)
    assert info.value.reason == "v2-too-long"
    assert parse(header, max_v2_length=4096) is not None


V2_IPV4_HEADER = ProxyHeader(2, "PROXY", "TCP4", ("10.1.2.3", 54321), ("192.168.0.1", 443))

VALID = [
    (
        "v1 TCP4",
        b"PROXY TCP4 192.168.0.1 10.0.0.2 56324 443\r\n",
        ProxyHeader(1, "PROXY", "TCP4", ("192.168.0.1", 56324), ("10.0.0.2", 443)),
    ),
    (
        "v1 TCP4 extreme ports",
        b"PROXY TCP4 255.255.255.255 0.0.0.0 0 65535\r\n",
        ProxyHeader(1, "PROXY", "TCP4", ("255.255.255.255", 0), ("0.0.0.0", 65535)),
    ),
    (
        "v1 TCP6 normalised",
        b"PROXY TCP6 2001:DB8:0:0:0:0:0:1 ::FFFF:10.0.0.1 1 2\r\n",
        ProxyHeader(1, "PROXY", "TCP6", ("2001:db8::1", 1), ("::ffff:10.0.0.1", 2)),
    ),
    (
        "v1 longest",
        b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
        b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
        ProxyHeader(
            1,
            "PROXY",
            "TCP6",
            ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
            ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
        ),
    ),
    ("v1 UNKNOWN", b"PROXY UNKNOWN\r\n", ProxyHeader(1, "PROXY", "UNKNOWN", None, None)),
    (
        "v1 UNKNOWN with ignored addresses",
        b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n",
        ProxyHeader(1, "PROXY", "UNKNOWN", None, None),
    ),
    (
        "v2 IPv4",
        v2(body=IPV4_BODY),
        ProxyHeader(2, "PROXY", "TCP4", ("10.1.2.3", 54321), ("192.168.0.1", 443)),
    ),
    (
        "v2 IPv4 with TLVs",
        v2(body=IPV4_BODY + TLVS),
        ProxyHeader(2, "PROXY", "TCP4", ("10.1.2.3", 54321), ("192.168.0.1", 443)),
    ),
    (
        "v2 IPv6 with TLVs",
        v2(family=0x21, body=IPV6_BODY + TLVS),
        ProxyHeader(2, "PROXY", "TCP6", ("2001:db8::1", 1234), ("2001:db8::2", 8443)),
    ),
    (
        "v2 LOCAL",
        v2(command=0, family=0x00),
        ProxyHeader(2, "LOCAL", "UNKNOWN", None, None),
    ),
    (
        "v2 LOCAL with an address block, ignored",
        v2(command=0, family=0x11, body=IPV4_BODY + b"junk"),
        ProxyHeader(2, "LOCAL", "UNKNOWN", None, None),
    ),
    (
        "v2 AF_UNSPEC",
        v2(family=0x00, body=TLVS),
        ProxyHeader(2, "PROXY", "UNKNOWN", None, None),
    ),
    (
        "v2 AF_UNIX",
        v2(family=0x31, body=b"/tmp/a".ljust(108, b"\0") + b"/tmp/b".ljust(108, b"\0")),
        ProxyHeader(2, "PROXY", "UNKNOWN", None, None),
    ),
    *(
        (f"v2 IPv4 with {name}", v2(body=IPV4_BODY + block), V2_IPV4_HEADER)
        for name, block in [
            ("ALPN", ALPN),
            ("authority", AUTHORITY),
            ("empty noop", NOOP),
            ("noop padding", NOOP_PADDING),
            ("unique-id", UNIQUE_ID),
            ("SSL and its sub-TLVs", SSL),
            ("SSL of a plain-TCP client", SSL_NOT_TLS),
            ("netns", NETNS),
            ("GCP PSC connection id", GCP_PSC),
            ("AWS VPC endpoint id", AWS_VPCE),
            ("Azure private link id", AZURE_LINK),
            ("an unassigned TLV type", UNASSIGNED),
            ("every TLV", EVERY_TLV),
        ]
    ),
    (
        "v2 IPv4 with a CRC32c",
        crc_filled(v2(body=IPV4_BODY + CRC_ZERO)),
        V2_IPV4_HEADER,
    ),
    (
        "v2 IPv4 with a CRC32c first, then every TLV",
        crc_filled(v2(body=IPV4_BODY + CRC_ZERO + EVERY_TLV)),
        V2_IPV4_HEADER,
    ),
    (
        "v2 IPv6 with every TLV, then a CRC32c",
        crc_filled(v2(family=0x21, body=IPV6_BODY + EVERY_TLV + CRC_ZERO)),
        ProxyHeader(2, "PROXY", "TCP6", ("2001:db8::1", 1234), ("2001:db8::2", 8443)),
    ),
    (
        "v2 AF_UNSPEC with a CRC32c",
        crc_filled(v2(family=0x00, body=AUTHORITY + CRC_ZERO)),
        ProxyHeader(2, "PROXY", "UNKNOWN", None, None),
    ),
    (
        "v2 AF_UNIX with a CRC32c",
        crc_filled(
            v2(
                family=0x31,
                body=b"/tmp/a".ljust(108, b"\0") + b"/tmp/b".ljust(108, b"\0") + CRC_ZERO,
            )
        ),
        ProxyHeader(2, "PROXY", "UNKNOWN", None, None),
    ),
    (
        # As HAProxy does: LOCAL's block (TLVs included) is not read at all.
        "v2 LOCAL with a wrong CRC32c, ignored",
        crc_damaged(v2(command=0, family=0x11, body=IPV4_BODY + CRC_ZERO)),
        ProxyHeader(2, "LOCAL", "UNKNOWN", None, None),
    ),
]


@pytest.mark.parametrize(
    ("data", "expected"),
    [(data, expected) for _, data, expected in VALID],
    ids=[case for case, _, _ in VALID],
)
def test_valid(data: bytes, expected: ProxyHeader) -> None:
    """
    A valid header parses to the expected value and its exact length; the
    bytes after it are not part of it.
    """
    assert parse(data) == (expected, len(data))
    assert parse(data + b"GET / HTTP/1.1\r\n\r\n") == (expected, len(data))


@pytest.mark.parametrize("data", [data for _, data, _ in VALID], ids=[case for case, _, _ in VALID])
def test_every_prefix_needs_more(data: bytes) -> None:
    """
    Every proper prefix of a valid header (including the empty one) is a
    valid beginning: the parser asks for more bytes instead of failing.
    """
    for cut in range(len(data)):
        assert parse(data[:cut]) is None, data[:cut]


@pytest.mark.parametrize(
    ("prefix", "reason"),
    [
        (b"X", "not-proxy"),
        (b"PROXY TCP5", "v1-bad-family"),
        (b"PROXY TCP4 999", "v1-bad-address"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 99999", "v1-bad-port"),
        (b"PROXY TCP4 ::", "v1-family-mismatch"),
        (b"PROXY TCP6 1.2", "v1-family-mismatch"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 ", "v1-bad-syntax"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r", "v1-bad-syntax"),
        (V2_SIGNATURE + b"\x11", "v2-bad-version"),
        (V2_SIGNATURE + b"\x2f", "v2-bad-command"),
        (V2_SIGNATURE + b"\x21\x22", "v2-bad-family"),
        (V2_SIGNATURE + b"\x21\x11\x00\x04", "v2-short-address"),
    ],
)
def test_refused_early(prefix: bytes, reason: str) -> None:
    """
    An incomplete header that can no longer become valid is refused at
    once, not when the CRLF or the announced length arrives.
    """
    with pytest.raises(ProxyHeaderError) as info:
        parse(prefix)
    assert info.value.reason == reason


def test_v1_limit_is_107_bytes() -> None:
    """
    A v1 line of exactly 107 bytes (CRLF included) is accepted, one more
    byte is refused, and without a LF the parser stops waiting at 107.
    """
    exact = b"PROXY UNKNOWN " + b"x" * 91 + b"\r\n"
    assert len(exact) == V1_MAX_LENGTH
    assert parse(exact) == (ProxyHeader(1, "PROXY", "UNKNOWN", None, None), 107)
    assert parse(exact[:-1]) is None
    with pytest.raises(ProxyHeaderError):
        parse(b"PROXY UNKNOWN " + b"x" * 93)


# -- CRC32c -------------------------------------------------------------------

# The iSCSI SCSI Read (10) command PDU of RFC 3720 B.4.
ISCSI_READ_PDU = bytes.fromhex(
    "01c00000000000000000000000000000"
    "14000000000004000000001400000018"
    "28000000000000000200000000000000"
)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", 0x00000000),
        (b"123456789", 0xE3069283),
        (b"\x00" * 32, 0x8A9136AA),
        (b"\xff" * 32, 0x62A8AB43),
        (bytes(range(32)), 0x46DD794E),
        (bytes(range(31, -1, -1)), 0x113FDB5C),
        (ISCSI_READ_PDU, 0xD9963A56),
    ],
    ids=["empty", "check", "zeros", "ones", "incrementing", "decrementing", "iscsi-read"],
)
def test_crc32c_known_values(data: bytes, expected: int) -> None:
    """
    crc32c is CRC-32C (Castagnoli): the catalogue check value of
    "123456789" and the RFC 3720 B.4 vectors.
    """
    assert crc32c(data) == expected


def test_v2_crc32c_checked_only_when_complete() -> None:
    """
    A v2 header with a wrong CRC32c is a valid beginning until its last byte
    arrives (the checksum covers the whole header), then refused.
    """
    header = crc_damaged(v2(body=IPV4_BODY + CRC_ZERO + AUTHORITY))
    for cut in range(len(header)):
        assert parse(header[:cut]) is None
    with pytest.raises(ProxyHeaderError) as info:
        parse(header + b"stream bytes")
    assert info.value.reason == "v2-bad-crc32c"


def test_v2_crc32c_excludes_the_stream() -> None:
    """
    The CRC32c covers the header only: the stream bytes after it in the
    buffer are not part of it.
    """
    header = crc_filled(v2(body=IPV4_BODY + CRC_ZERO))
    assert parse(header + b"\x00\x01\x02") == (V2_IPV4_HEADER, len(header))


# -- properties ---------------------------------------------------------------

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
port = st.integers(0, 65535)

valid_headers = st.one_of(
    st.builds(
        lambda v, s, d, sp, dp: header_for(v, (s, sp), (d, dp)),
        st.sampled_from([1, 2]),
        ipv4,
        ipv4,
        port,
        port,
    ),
    st.builds(
        lambda v, s, d, sp, dp: header_for(v, (s, sp), (d, dp)),
        st.sampled_from([1, 2]),
        ipv6,
        ipv6,
        port,
        port,
    ),
    st.builds(
        lambda s, d, sp, dp: header_for(2, (s, sp), (d, dp), crc32c=True),
        st.one_of(ipv4, ipv6),
        st.one_of(ipv4, ipv6),
        port,
        port,
    ),
    st.builds(
        header_for,
        st.sampled_from([1, 2]),
        st.sampled_from([None, ("192.0.2.1", 5000)]),
        st.just(None),
        crc32c=st.booleans(),
    ),
    st.sampled_from([data for _, data, _ in VALID]),
)


@given(st.binary(max_size=300))
@example(b"PROXY TCP6 ::ffff:1.2.3.4" + b"\xff")
@example(V2_SIGNATURE + b"\x21\x11\x00\x0c")
def test_parse_never_raises_anything_else(data: bytes) -> None:
    """
    Whatever the bytes, parse returns None, a header and its length within
    the data, or raises ProxyHeaderError with a reason: never anything else.
    """
    try:
        result = parse(data)
    except ProxyHeaderError as e:
        assert e.reason
        return
    if result is not None:
        header, length = result
        assert 0 < length <= len(data)
        assert header.version in (1, 2)


@given(valid_headers, st.binary(max_size=40))
def test_parse_never_raises_on_mutations(header: bytes, noise: bytes) -> None:
    """
    Headers damaged near valid ones (a byte changed, bytes spliced in or cut
    out) never make parse raise anything but ProxyHeaderError.
    """
    for damaged in (
        header[: len(header) // 2] + noise,
        header[:-3] + noise + header[-3:],
        bytes([header[0] ^ 1]) + header[1:],
        header[: len(header) - 5] + bytes([header[-5] ^ 0xFF]) + header[len(header) - 4 :],
    ):
        try:
            parse(damaged)
        except ProxyHeaderError:
            pass


def _normalised(host: str) -> str:
    address = ipaddress.ip_address(host)
    if address.version == 6:
        mapped = address.ipv4_mapped  # type: ignore[union-attr]
        if mapped is not None:
            return str(mapped)
        return socket.inet_ntop(socket.AF_INET6, address.packed)
    return str(address)


@given(
    st.sampled_from([1, 2]),
    st.one_of(ipv4, ipv6),
    st.one_of(ipv4, ipv6),
    port,
    port,
)
def test_round_trip(version: int, source: str, destination: str, sport: int, dport: int) -> None:
    """
    parse(header_for(...)) gives back the addresses and ports written, with
    IPv4-mapped addresses as IPv4 when both sides are IPv4, and a mixed pair
    written as TCP6.
    """
    data = header_for(version, (source, sport), (destination, dport))
    result = parse(data)
    assert result is not None
    header, length = result
    assert length == len(data)
    assert header.version == version
    assert header.command == "PROXY"
    src, dst = _normalised(source), _normalised(destination)
    if ":" not in src and ":" not in dst:
        assert header.family == "TCP4"
        assert header.source == (src, sport)
        assert header.destination == (dst, dport)
    else:
        assert header.family == "TCP6"
        assert header.source is not None and header.destination is not None
        assert ipaddress.ip_address(header.source[0]) == ipaddress.ip_address(_as_v6(src)), header
        assert ipaddress.ip_address(header.destination[0]) == ipaddress.ip_address(_as_v6(dst))
        assert (header.source[1], header.destination[1]) == (sport, dport)


def _as_v6(host: str) -> str:
    return host if ":" in host else "::ffff:" + host


@given(
    st.one_of(ipv4, ipv6),
    st.one_of(ipv4, ipv6),
    port,
    port,
)
def test_round_trip_crc32c(source: str, destination: str, sport: int, dport: int) -> None:
    """
    A v2 header written with a CRC32c TLV parses to the same header as one
    written without, and is 7 bytes longer (the TLV).
    """
    plain = header_for(2, (source, sport), (destination, dport))
    data = header_for(2, (source, sport), (destination, dport), crc32c=True)
    assert len(data) == len(plain) + 7
    expected = parse(plain)
    assert expected is not None
    assert parse(data) == (expected[0], len(data))


@given(
    st.one_of(ipv4, ipv6),
    st.one_of(ipv4, ipv6),
    port,
    port,
    st.data(),
)
def test_crc32c_catches_any_changed_byte(
    source: str, destination: str, sport: int, dport: int, data: st.DataObject
) -> None:
    """
    Changing any byte of a v2 header written with a CRC32c makes parse
    refuse it: a signature byte as "not-proxy", an address, port or
    checksum byte as "v2-bad-crc32c".

    Left out are the bytes that frame the rest (version and command,
    family, length, and the CRC32c TLV's own type and length): changing
    them can turn the header into a LOCAL one (whose block the
    specification says to ignore), change where the TLVs are, or make the
    CRC32c TLV another type; those are covered by the structural checks
    and the never-raises properties.
    """
    header = header_for(2, (source, sport), (destination, dport), crc32c=True)
    tlv_at = len(header) - 7
    position = data.draw(
        st.integers(0, len(header) - 1).filter(
            lambda i: not (12 <= i < 16 or tlv_at <= i < tlv_at + 3)
        )
    )
    mask = data.draw(st.integers(1, 255))
    damaged = header[:position] + bytes([header[position] ^ mask]) + header[position + 1 :]
    with pytest.raises(ProxyHeaderError) as info:
        parse(damaged)
    assert info.value.reason == ("not-proxy" if position < 12 else "v2-bad-crc32c")


@given(valid_headers, st.data())
def test_fragmentation_is_irrelevant(header: bytes, data: st.DataObject) -> None:
    """
    However the header is cut into segments, feeding the growing buffer
    gives None until the last segment, then the same result as all at once.
    """
    whole = parse(header)
    assert whole is not None and whole[1] == len(header)
    cuts = sorted(data.draw(st.sets(st.integers(1, len(header) - 1), max_size=len(header))))
    buffer = b""
    for cut in cuts:
        buffer = header[:cut]
        assert parse(buffer) is None
    assert parse(header + b"trailing") == whole


@given(st.ip_addresses(v=6).map(lambda a: a.exploded), st.data())
def test_ipv6_every_spelling_prefix(address: str, data: st.DataObject) -> None:
    """
    Every prefix of a v1 TCP6 line is accepted as a beginning whichever
    valid spelling of the address is used (exploded, compressed, upper
    case, dotted IPv4 tail).
    """
    packed = ipaddress.IPv6Address(address).packed
    spelling = data.draw(
        st.sampled_from(
            [
                address,
                socket.inet_ntop(socket.AF_INET6, packed),
                str(ipaddress.IPv6Address(packed)).upper(),
                "::" + str(ipaddress.IPv4Address(packed[12:])),
                "::ffff:" + str(ipaddress.IPv4Address(packed[12:])),
                ":".join(address.split(":")[:6]) + ":" + str(ipaddress.IPv4Address(packed[12:])),
            ]
        )
    )
    line = f"PROXY TCP6 {spelling} ::1 1 2\r\n".encode()
    for cut in range(len(line)):
        assert parse(line[:cut]) is None, line[:cut]
    result = parse(line)
    assert result is not None
    source = result[0].source
    assert source is not None
    assert ipaddress.ip_address(source[0]) == ipaddress.ip_address(spelling)


# -- writer -------------------------------------------------------------------


def test_header_for_v1_bytes() -> None:
    """
    The v1 writer produces the canonical text line, IPv4-mapped addresses
    written as TCP4.
    """
    assert (
        header_for(1, ("192.168.0.1", 56324), ("10.0.0.2", 443))
        == b"PROXY TCP4 192.168.0.1 10.0.0.2 56324 443\r\n"
    )
    assert (
        header_for(1, ("::ffff:192.168.0.1", 1), ("::ffff:10.0.0.2", 2))
        == b"PROXY TCP4 192.168.0.1 10.0.0.2 1 2\r\n"
    )
    assert header_for(1, ("2001:DB8::1", 1), ("::1", 2)) == b"PROXY TCP6 2001:db8::1 ::1 1 2\r\n"


def test_header_for_v2_bytes() -> None:
    """
    The v2 writer produces signature, PROXY command, AF_INET/STREAM or
    AF_INET6/STREAM, the address block length, and the addresses.
    """
    assert header_for(2, ("10.1.2.3", 54321), ("192.168.0.1", 443)) == v2(body=IPV4_BODY)
    assert header_for(2, ("2001:db8::1", 1234), ("2001:db8::2", 8443)) == v2(
        family=0x21, body=IPV6_BODY
    )


@pytest.mark.parametrize(
    ("version", "source", "destination"),
    [
        (3, ("1.2.3.4", 1), ("5.6.7.8", 2)),
        (1, ("1.2.3.4", 70000), ("5.6.7.8", 2)),
        (1, ("1.2.3.4", -1), ("5.6.7.8", 2)),
        (2, ("1.2.3.4", 1), ("5.6.7.8", 2.0)),
        (1, ("999.1.1.1", 1), ("5.6.7.8", 2)),
        (2, ("localhost", 1), ("5.6.7.8", 2)),
        (2, ("1.2.3.4", 1), ("1::2::3", 2)),
    ],
)
def test_header_for_refuses_bad_input(version, source, destination) -> None:
    """
    The writer refuses an unknown version, a bad port or a non-address with
    ValueError instead of writing a bad header.
    """
    with pytest.raises(ValueError):
        header_for(version, source, destination)


@pytest.mark.parametrize(
    ("source", "destination"),
    [
        (None, ("10.0.0.1", 443)),
        (("192.0.2.1", 5000), None),
        (None, ("2001:db8::1", 443)),
        (None, None),
    ],
)
def test_header_for_without_addresses(source, destination) -> None:
    """
    When either side has no IP address (None: a UNIX socket's peer), the
    writer says it cannot describe the connection: v1 "PROXY UNKNOWN", v2
    LOCAL with AF_UNSPEC and no address block; the parser reads them back
    as UNKNOWN and LOCAL.
    """
    v1 = header_for(1, source, destination)
    assert v1 == b"PROXY UNKNOWN\r\n"
    assert parse(v1) == (ProxyHeader(1, "PROXY", "UNKNOWN", None, None), len(v1))
    v2_header = header_for(2, source, destination)
    assert v2_header == V2_SIGNATURE + b"\x20\x00\x00\x00"
    assert parse(v2_header) == (ProxyHeader(2, "LOCAL", "UNKNOWN", None, None), 16)


@pytest.mark.parametrize(
    ("version", "source", "destination"),
    [
        (3, None, None),
        (0, None, ("1.2.3.4", 1)),
        (1, ("1.2.3.4", 70000), None),
        (2, None, ("1.2.3.4", -1)),
        (2, None, ("1.2.3.4", "80")),
        (1, ("999.1.1.1", 1), None),
        (2, None, ("localhost", 1)),
    ],
)
def test_header_for_without_addresses_still_checks(version, source, destination) -> None:
    """
    A missing address does not hide a bad version, a bad port or a
    malformed IP address on the other side: still ValueError.
    """
    with pytest.raises(ValueError):
        header_for(version, source, destination)


def test_header_for_v2_crc32c_bytes() -> None:
    """
    With crc32c=True the v2 writer appends one PP2_TYPE_CRC32C TLV (type
    3, length 4) after the address block, counts it in the length field,
    and its big-endian value is the CRC32c of the whole header with those
    4 bytes zeroed.
    """
    data = header_for(2, ("10.1.2.3", 54321), ("192.168.0.1", 443), crc32c=True)
    assert data[:-4] == v2(body=IPV4_BODY + CRC_ZERO)[:-4]
    assert struct.unpack("!I", data[-4:]) == (crc32c(data[:-4] + b"\x00" * 4),)
    assert data == crc_filled(v2(body=IPV4_BODY + CRC_ZERO))


def test_header_for_crc32c_without_addresses_and_v1() -> None:
    """
    crc32c=True adds the TLV to a v2 LOCAL header too (length 7), and is
    ignored for v1, which has no TLVs.
    """
    local = header_for(2, None, None, crc32c=True)
    assert local == crc_filled(v2(command=0, family=0x00, body=CRC_ZERO))
    assert parse(local) == (ProxyHeader(2, "LOCAL", "UNKNOWN", None, None), 23)
    assert header_for(1, ("1.2.3.4", 1), ("5.6.7.8", 2), crc32c=True) == (
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"
    )
    assert header_for(1, None, None, crc32c=True) == b"PROXY UNKNOWN\r\n"


def test_header_for_drops_zone_index() -> None:
    """
    A link-local peer's zone index (which has no meaning elsewhere) is not
    written.
    """
    assert header_for(1, ("fe80::1%eth0", 1), ("fe80::2", 2)) == (
        b"PROXY TCP6 fe80::1 fe80::2 1 2\r\n"
    )
