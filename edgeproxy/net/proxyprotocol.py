"""
A strict, incremental parser and a writer for the PROXY protocol, v1 and v2.

The format is HAProxy's C{proxy-protocol.txt}.  L{parse} is fed the bytes
received so far on a connection and answers one of three ways:

  - C{None}: the bytes so far are a valid beginning of a header and more are
    needed.  Only returned while that is true, and never beyond the size
    limits (107 bytes for v1, 16 + C{max_v2_length} for v2), so a caller that
    buffers until L{parse} decides holds a bounded amount of memory.
  - C{(header, length)}: a complete header of C{length} bytes; any bytes after
    it belong to the proxied stream.
  - L{ProxyHeaderError}: the bytes cannot be (the beginning of) a valid
    header.  Its C{reason} is a short, stable machine string for counters and
    logs.  Nothing else is ever raised, whatever the input.

A v2 header's TLVs must be well formed (C{"v2-bad-tlv"}); their contents are
not used, except a PP2_TYPE_CRC32C TLV, which must be 4 bytes long
(C{"v2-bad-tlv"}) and hold the CRC-32C of the whole header
(C{"v2-bad-crc32c"}), checked once the whole header is in.  A LOCAL header's
block, TLVs included, is ignored, as the specification and HAProxy do.

L{header_for} writes a header for the proxy's PROXY-out side.
"""

from __future__ import annotations

import re
import socket
import struct
from typing import Tuple

import attrs

__all__ = [
    "DEFAULT_V2_MAX_LENGTH",
    "V1_MAX_LENGTH",
    "V2_SIGNATURE",
    "ProxyHeader",
    "ProxyHeaderError",
    "crc32c",
    "header_for",
    "parse",
]

#: The 12 bytes every v2 header starts with.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

#: The most bytes a v1 header may take, CRLF included.
V1_MAX_LENGTH = 107

#: Default ceiling of the v2 length field (address block plus TLVs).  The
#: protocol allows 65535; real senders need a few hundred bytes at most.
DEFAULT_V2_MAX_LENGTH = 1024

_V1_PREFIX = b"PROXY "
_V2_HEADER_LENGTH = 16

# v2 family/transport byte -> (family name, address block length).  Every
# other value (UDP, unassigned) is rejected, as the specification requires.
_V2_FAMILIES = {
    0x00: ("UNKNOWN", 0),  # AF_UNSPEC: no address, like LOCAL
    0x11: ("TCP4", 12),  # AF_INET, STREAM
    0x21: ("TCP6", 36),  # AF_INET6, STREAM
    0x31: ("UNKNOWN", 216),  # AF_UNIX, STREAM: not an address we can use
}

_V1_FAMILIES = ("TCP4", "TCP6", "UNKNOWN")

_OCTET = rb"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
# A dotted quad: four decimal octets 0-255, no heading zeroes (the spec
# forbids them, to avoid any octal confusion).
_IPV4 = re.compile(rb"(?:%s\.){3}%s" % (_OCTET, _OCTET))
# Every beginning of a dotted quad (each beginning of an octet is an octet).
_IPV4_PREFIX = re.compile(rb"(?:%s\.){0,3}%s?" % (_OCTET, _OCTET))
_IPV6_CHARS = re.compile(rb"[0-9A-Fa-f:.]{1,45}")
# 0-65535 without sign, spaces or heading zeroes; every beginning of a valid
# port is itself one of these (or empty).
_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")
# Anything outside printable ASCII in a v1 line.
_V1_BAD_CHAR = re.compile(rb"[^\x20-\x7e]")

_PORTS = struct.Struct("!HH")
_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"


def _crc32c_table() -> Tuple[int, ...]:
    """
    The 256 CRC-32C remainders of each byte value, reflected (Castagnoli
    polynomial 0x1EDC6F41, bit-reversed 0x82F63B78).
    """
    table = []
    for value in range(256):
        crc = value
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """
    The CRC-32C (Castagnoli) checksum of C{data}, as iSCSI, SCTP and the
    PROXY v2 PP2_TYPE_CRC32C TLV use it (initial value and final XOR
    0xFFFFFFFF, reflected): C{crc32c(b"123456789") == 0xE3069283}.
    """
    table = _CRC32C_TABLE
    crc = 0xFFFFFFFF
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


class ProxyHeaderError(ValueError):
    """
    The bytes are not a valid PROXY protocol header.

    @ivar reason: A short, stable machine string (C{"v1-bad-port"},
        C{"v2-too-long"}...) suitable as a counter label.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@attrs.frozen(slots=True)
class ProxyHeader:
    """
    A parsed PROXY header.

    @ivar version: 1 or 2.
    @ivar command: C{"PROXY"}, or C{"LOCAL"} (v2 only: a health check or
        similar from the proxy itself; use the real connection endpoints).
    @ivar family: C{"TCP4"}, C{"TCP6"} or C{"UNKNOWN"} (v1 UNKNOWN, v2 LOCAL,
        AF_UNSPEC or AF_UNIX): with C{"UNKNOWN"} there are no addresses and
        the real connection endpoints apply.
    @ivar source: C{(host, port)} of the client, or C{None}.  IPv6 hosts are
        normalised (compressed, lower case, as the socket layer writes them).
    @ivar destination: C{(host, port)} the client connected to, or C{None}.
    """

    version: int
    command: str
    family: str
    source: Tuple[str, int] | None
    destination: Tuple[str, int] | None


_V2_LOCAL = ProxyHeader(2, "LOCAL", "UNKNOWN", None, None)
_V2_UNKNOWN = ProxyHeader(2, "PROXY", "UNKNOWN", None, None)
_V1_UNKNOWN = ProxyHeader(1, "PROXY", "UNKNOWN", None, None)


def parse(
    data: bytes, *, max_v2_length: int = DEFAULT_V2_MAX_LENGTH
) -> Tuple[ProxyHeader, int] | None:
    """
    Parse the PROXY header at the start of C{data}.

    @param data: Every byte received on the connection so far.
    @param max_v2_length: Refuse a v2 header whose length field (address
        block plus TLVs) says more than this, as soon as the field is seen.
    @return: C{None} if C{data} is a valid beginning of a header but not a
        whole one; else C{(header, length of the header in bytes)}.
    @raise ProxyHeaderError: C{data} does not start with a valid header.
    """
    if data[:6] == _V1_PREFIX:
        return _parse_v1(data)
    if data[:12] == V2_SIGNATURE:
        return _parse_v2(data, max_v2_length)
    if len(data) < 12 and (_V1_PREFIX.startswith(data) or V2_SIGNATURE.startswith(data)):
        return None
    raise ProxyHeaderError("not-proxy")


# -- v1 ---------------------------------------------------------------------


def _parse_v1(data: bytes) -> Tuple[ProxyHeader, int] | None:
    end = data.find(b"\n", 0, V1_MAX_LENGTH)
    if end < 0:
        _check_v1_beginning(data[:V1_MAX_LENGTH])
        if len(data) >= V1_MAX_LENGTH:
            raise ProxyHeaderError("v1-too-long")
        return None
    if data[end - 1] != 0x0D:
        # data starts with "PROXY ", so end >= 6.
        raise ProxyHeaderError("v1-bare-lf")
    return _parse_v1_line(data[: end - 1]), end + 1


def _check_v1_chars(line: bytes) -> None:
    bad = _V1_BAD_CHAR.search(line)
    if bad is not None:
        if line[bad.start()] >= 0x80:
            raise ProxyHeaderError("v1-not-ascii")
        if line[bad.start()] == 0x0D:
            raise ProxyHeaderError("v1-bare-cr")
        raise ProxyHeaderError("v1-bad-char")


def _parse_v1_line(line: bytes) -> ProxyHeader:
    """
    Parse a whole v1 line, without its CRLF.
    """
    _check_v1_chars(line)
    parts = line.split(b" ")
    family = parts[1]
    if family == b"UNKNOWN":
        # The specification says to ignore whatever follows UNKNOWN.
        return _V1_UNKNOWN
    if family == b"TCP4":
        name = "TCP4"
    elif family == b"TCP6":
        name = "TCP6"
    else:
        raise ProxyHeaderError("v1-bad-family")
    # Left to right, as the incremental check goes.
    count = len(parts)
    source = _v1_address(name, parts[2]) if count > 2 else ""
    destination = _v1_address(name, parts[3]) if count > 3 else ""
    source_port = _v1_port(parts[4]) if count > 4 else 0
    destination_port = _v1_port(parts[5]) if count > 5 else 0
    if count != 6:
        raise ProxyHeaderError("v1-bad-syntax")
    return ProxyHeader(1, "PROXY", name, (source, source_port), (destination, destination_port))


def _check_v1_beginning(line: bytes) -> None:
    """
    Raise unless C{line} (no LF in it yet) can still begin a valid v1 line.
    """
    if line[-1:] == b"\r":
        # A CR can only be the one of the final CRLF: the line is complete.
        _parse_v1_line(line[:-1])
        return
    _check_v1_chars(line)
    parts = line.split(b" ")
    family = parts[1]
    if len(parts) == 2:
        for known in (b"TCP4", b"TCP6", b"UNKNOWN"):
            if known.startswith(family):
                return
        raise ProxyHeaderError("v1-bad-family")
    if family == b"UNKNOWN":
        return
    if family == b"TCP4":
        name = "TCP4"
    elif family == b"TCP6":
        name = "TCP6"
    else:
        raise ProxyHeaderError("v1-bad-family")
    last = len(parts) - 1
    for index in range(2, len(parts)):
        if index == 6:
            raise ProxyHeaderError("v1-bad-syntax")
        token = parts[index]
        if index < 4:
            if index == last:
                _check_v1_address_beginning(name, token)
            else:
                _v1_address(name, token)
        elif index == last:
            if token and (_PORT.fullmatch(token) is None or int(token) > 65535):
                raise ProxyHeaderError("v1-bad-port")
        else:
            _v1_port(token)


def _v1_port(token: bytes) -> int:
    if _PORT.fullmatch(token) is None:
        raise ProxyHeaderError("v1-bad-port")
    port = int(token)
    if port > 65535:
        raise ProxyHeaderError("v1-bad-port")
    return port


def _v1_address(family: str, token: bytes) -> str:
    """
    Validate a whole v1 address of C{family}; return its normalised text.
    """
    if family == "TCP4":
        if _IPV4.fullmatch(token) is not None:
            return token.decode("ascii")
        if _ipv6_packed(token) is not None:
            raise ProxyHeaderError("v1-family-mismatch")
        raise ProxyHeaderError("v1-bad-address")
    packed = _ipv6_packed(token)
    if packed is not None:
        return socket.inet_ntop(socket.AF_INET6, packed)
    if _IPV4.fullmatch(token) is not None:
        raise ProxyHeaderError("v1-family-mismatch")
    raise ProxyHeaderError("v1-bad-address")


def _check_v1_address_beginning(family: str, token: bytes) -> None:
    """
    Raise unless C{token} can begin a valid v1 address of C{family}.
    """
    if family == "TCP4":
        if _IPV4_PREFIX.fullmatch(token) is not None:
            return
        if b":" in token and _ipv6_beginning(token):
            raise ProxyHeaderError("v1-family-mismatch")
        raise ProxyHeaderError("v1-bad-address")
    if _ipv6_beginning(token):
        return
    if _IPV4_PREFIX.fullmatch(token) is not None:
        raise ProxyHeaderError("v1-family-mismatch")
    raise ProxyHeaderError("v1-bad-address")


def _ipv6_packed(token: bytes) -> bytes | None:
    """
    The 16 bytes of the IPv6 address C{token}, or C{None} if it is not one.

    Only hex digits, colons and dots are allowed (no zone index); dotted
    IPv4 tails follow the dotted-quad rules.
    """
    if _IPV6_CHARS.fullmatch(token) is None:
        return None
    try:
        return socket.inet_pton(socket.AF_INET6, token.decode("ascii"))
    except OSError:
        return None


def _ipv6_beginning(token: bytes) -> bool:
    """
    Whether C{token} can be completed into a valid IPv6 address.
    """
    if not token:
        return True
    if _IPV6_CHARS.fullmatch(token) is None:
        return False
    colon = token.rfind(b":")
    if b"." in token:
        # Inside a dotted IPv4 tail: the tail must be a dotted-quad beginning
        # and the head must accept a dotted tail.
        if colon < 0 or _IPV4_PREFIX.fullmatch(token[colon + 1 :]) is None:
            return False
        return _ipv6_packed(token[: colon + 1] + b"0.0.0.0") is not None
    # Hex groups only: the token itself, or it followed by one more zero
    # group, a colon (to make "::") or "::" completes it if anything does.
    for suffix in (b"", b"0", b":", b"::"):
        if _ipv6_packed(token + suffix) is not None:
            return True
    return False


# -- v2 ---------------------------------------------------------------------


def _parse_v2(data: bytes, max_length: int) -> Tuple[ProxyHeader, int] | None:
    size = len(data)
    if size < 13:
        return None
    version_command = data[12]
    if version_command >> 4 != 2:
        raise ProxyHeaderError("v2-bad-version")
    command = version_command & 0x0F
    if command > 1:
        raise ProxyHeaderError("v2-bad-command")
    if size < 14:
        return None
    family = _V2_FAMILIES.get(data[13])
    if family is None:
        raise ProxyHeaderError("v2-bad-family")
    if size < _V2_HEADER_LENGTH:
        return None
    length = (data[14] << 8) | data[15]
    if length > max_length:
        raise ProxyHeaderError("v2-too-long")
    name, address_length = family
    if command == 1 and length < address_length:
        raise ProxyHeaderError("v2-short-address")
    total = _V2_HEADER_LENGTH + length
    if size < total:
        return None
    if command == 0:
        # LOCAL: the receiver uses the real endpoints and ignores the block.
        return _V2_LOCAL, total
    _check_tlvs(data, _V2_HEADER_LENGTH + address_length, total)
    layout = _V2_ADDRESS_LAYOUT.get(name)
    if layout is None:
        header = _V2_UNKNOWN
    else:
        af, size_one = layout
        middle = _V2_HEADER_LENGTH + size_one
        end = middle + size_one
        source_port, destination_port = _PORTS.unpack_from(data, end)
        header = ProxyHeader(
            2,
            "PROXY",
            name,
            (socket.inet_ntop(af, data[_V2_HEADER_LENGTH:middle]), source_port),
            (socket.inet_ntop(af, data[middle:end]), destination_port),
        )
    return header, total


#: v2 address block layout per family: (socket family, bytes per address);
#: the two ports follow the two addresses.
_V2_ADDRESS_LAYOUT = {"TCP4": (socket.AF_INET, 4), "TCP6": (socket.AF_INET6, 16)}


#: PP2_TYPE_CRC32C: a big-endian CRC-32C of the whole header, computed with
#: its own 4 value bytes zeroed.
_PP2_TYPE_CRC32C = 0x03


def _check_tlvs(data: bytes, offset: int, end: int) -> None:
    """
    Raise unless C{data[offset:end]} is a sequence of whole TLVs and every
    CRC32c TLV among them (a 4-byte value) matches C{data[:end]}, the
    whole header.  Other TLV types are not looked into.
    """
    checksums = []
    while offset < end:
        if offset + 3 > end:
            raise ProxyHeaderError("v2-bad-tlv")
        kind = data[offset]
        value = offset + 3
        length = (data[offset + 1] << 8) | data[offset + 2]
        offset = value + length
        if offset > end:
            raise ProxyHeaderError("v2-bad-tlv")
        if kind == _PP2_TYPE_CRC32C:
            if length != 4:
                raise ProxyHeaderError("v2-bad-tlv")
            checksums.append(value)
    for value in checksums:
        zeroed = data[:value] + b"\x00\x00\x00\x00" + data[value + 4 : end]
        if crc32c(zeroed) != int.from_bytes(data[value : value + 4], "big"):
            raise ProxyHeaderError("v2-bad-crc32c")


# -- writer -----------------------------------------------------------------


def _packed(host: str) -> bytes:
    """
    The 4 (IPv4, IPv4-mapped IPv6) or 16 (IPv6) bytes of C{host}.
    """
    try:
        if ":" in host:
            packed = socket.inet_pton(socket.AF_INET6, host.partition("%")[0])
            if packed[:12] == _MAPPED_PREFIX:
                return packed[12:]
            return packed
        return socket.inet_pton(socket.AF_INET, host)
    except (OSError, TypeError, ValueError):
        raise ValueError(f"not an IP address: {host!r}") from None


def _check_port(port: int) -> None:
    if port.__class__ is not int or not 0 <= port <= 65535:
        raise ValueError(f"not a TCP port: {port!r}")


_V2_PROXY_TCP4 = V2_SIGNATURE + b"\x21\x11\x00\x0c"
_V2_PROXY_TCP6 = V2_SIGNATURE + b"\x21\x21\x00\x24"
_V2_LOCAL_UNSPEC = V2_SIGNATURE + b"\x20\x00\x00\x00"
_V1_UNKNOWN_LINE = b"PROXY UNKNOWN\r\n"
_CRC32C_TLV_ZERO = b"\x03\x00\x04\x00\x00\x00\x00"


def _with_crc32c(header: bytes) -> bytes:
    """
    The v2 C{header} (without TLVs) followed by a PP2_TYPE_CRC32C TLV, its
    length field counting the TLV.
    """
    length = len(header) - _V2_HEADER_LENGTH + len(_CRC32C_TLV_ZERO)
    zeroed = header[:14] + length.to_bytes(2, "big") + header[16:] + _CRC32C_TLV_ZERO
    return zeroed[:-4] + crc32c(zeroed).to_bytes(4, "big")


def _host_port(address: Tuple[str, int] | None) -> Tuple[bytes | None, int]:
    """
    The packed host (C{None} if there is none) and the port of C{address}.
    """
    if address is None:
        return None, 0
    host, port = address
    _check_port(port)
    return _packed(host), port


def header_for(
    version: int,
    source: Tuple[str, int] | None,
    destination: Tuple[str, int] | None,
    *,
    crc32c: bool = False,
) -> bytes:
    """
    A PROXY header announcing a TCP connection from C{source} to
    C{destination}.

    IPv4 and IPv4-mapped IPv6 addresses are written as TCP4 / AF_INET; if
    only one side is IPv4 it is written as mapped IPv6 and the header is
    TCP6 / AF_INET6.  A zone index (C{%eth0}) is dropped.

    A side given as C{None} (a client without an IP address, such as a
    UNIX socket's peer) makes a connection the proxy cannot describe: the
    header says so, as the specification asks, with v1 C{PROXY UNKNOWN}
    or v2 command LOCAL, family AF_UNSPEC and no address block; the
    receiver then uses the connection's own endpoints.

    @param version: 1 (text) or 2 (binary).
    @param source: C{(host, port)} of the client, or C{None}.
    @param destination: C{(host, port)} the client connected to, or
        C{None}.
    @param crc32c: v2 only (v1 has no TLVs): end the header with a
        PP2_TYPE_CRC32C TLV, the checksum of the whole header.
    @raise ValueError: Bad version or port, or a host that is not an IP
        address (the empty string included: pass C{None} for no address).
    """
    if version not in (1, 2):
        raise ValueError(f"unsupported PROXY protocol version: {version!r}")
    src, source_port = _host_port(source)
    dst, destination_port = _host_port(destination)
    if src is None or dst is None:
        if version == 1:
            return _V1_UNKNOWN_LINE
        return _with_crc32c(_V2_LOCAL_UNSPEC) if crc32c else _V2_LOCAL_UNSPEC
    if len(src) != len(dst):
        if len(src) == 4:
            src = _MAPPED_PREFIX + src
        else:
            dst = _MAPPED_PREFIX + dst
    if version == 2:
        prefix = _V2_PROXY_TCP4 if len(src) == 4 else _V2_PROXY_TCP6
        header = prefix + src + dst + _PORTS.pack(source_port, destination_port)
        return _with_crc32c(header) if crc32c else header
    if len(src) == 4:
        family, address_family = b"TCP4", socket.AF_INET
    else:
        family, address_family = b"TCP6", socket.AF_INET6
    return b"PROXY %s %s %s %d %d\r\n" % (
        family,
        socket.inet_ntop(address_family, src).encode("ascii"),
        socket.inet_ntop(address_family, dst).encode("ascii"),
        source_port,
        destination_port,
    )
