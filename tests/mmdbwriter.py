"""
A minimal MaxMind DB writer for the tests: small databases of any record
shape (GeoIP2 City or Country, DB-IP Lite, ip-location-db's flat
C{country_code}, an ASN database...), read back by the real C{maxminddb} and
C{geoip2} readers.

The format (https://maxmind.github.io/MaxMind-DB/) is a binary search tree
over the address bits, a 16-byte separator, a data section of typed values,
and a metadata map after the marker C{\\xab\\xcd\\xefMaxMind.com}.  This
writer uses 24-bit records, stores IPv4 networks of an IPv6 database at
C{::a.b.c.d} (where the readers look for them) and shares identical values.
"""

from __future__ import annotations

import ipaddress
import struct
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

__all__ = ["METADATA_MARKER", "encode", "write_mmdb"]

METADATA_MARKER = b"\xab\xcd\xefMaxMind.com"

_Network = Union[str, ipaddress.IPv4Network, ipaddress.IPv6Network]


def _control(type_: int, size: int) -> bytes:
    """
    The control byte(s) of a value of C{type_} and C{size}.
    """
    extra = b""
    if size < 29:
        low = size
    elif size < 29 + 256:
        low, extra = 29, bytes([size - 29])
    elif size < 285 + 65536:
        low, extra = 30, struct.pack(">H", size - 285)
    else:
        low, extra = 31, struct.pack(">I", size - 65821)[1:]
    if type_ <= 7:
        return bytes([(type_ << 5) | low]) + extra
    return bytes([low, type_ - 7]) + extra


def _uint(type_: int, value: int) -> bytes:
    body = value.to_bytes((value.bit_length() + 7) // 8, "big") if value else b""
    return _control(type_, len(body)) + body


def encode(value: Any) -> bytes:
    """
    One value in the data section's encoding: C{str} is a UTF-8 string,
    C{bool} a boolean, C{int} a uint32 (uint64 when larger; negative ones an
    int32), C{float} a double, C{bytes} bytes, C{dict} a map, C{list} an
    array.
    """
    if isinstance(value, bool):
        return _control(14, int(value))
    if isinstance(value, str):
        body = value.encode("utf-8")
        return _control(2, len(body)) + body
    if isinstance(value, float):
        return _control(3, 8) + struct.pack(">d", value)
    if isinstance(value, bytes):
        return _control(4, len(value)) + value
    if isinstance(value, int):
        if value < 0:
            return _control(8, 4) + struct.pack(">i", value)
        return _uint(6 if value < 2**32 else 9, value)
    if isinstance(value, dict):
        out = _control(7, len(value))
        for key, item in value.items():
            out += encode(str(key)) + encode(item)
        return out
    if isinstance(value, (list, tuple)):
        return _control(11, len(value)) + b"".join(encode(item) for item in value)
    raise TypeError(f"cannot encode {value!r}")


class _Node:
    __slots__ = ("children",)

    def __init__(self) -> None:
        # Each child: None (empty), a _Node, or ("data", offset).
        self.children: List[Any] = [None, None]


def write_mmdb(
    path: str,
    records: Sequence[Tuple[_Network, Mapping[str, Any]]],
    *,
    database_type: str = "Test-Country",
    ip_version: int = 6,
    build_epoch: Optional[int] = None,
    languages: Sequence[str] = ("en",),
    description: Optional[Mapping[str, str]] = None,
) -> str:
    """
    Write a MaxMind DB file at C{path} mapping each network to its record.

    Later networks inside earlier ones override them for their addresses.

    @param ip_version: 6 (IPv4 networks are stored at C{::/96}) or 4 (IPv6
        networks are refused).
    @param build_epoch: The metadata's build time (default now).
    @return: C{path}.
    """
    root = _Node()
    data = b""
    offsets: Dict[bytes, int] = {}
    bits = 128 if ip_version == 6 else 32
    for network, record in records:
        net = ipaddress.ip_network(network) if isinstance(network, str) else network
        if net.version == 6 and ip_version == 4:
            raise ValueError(f"{net} in an IPv4 database")
        value = int(net.network_address)
        prefix = net.prefixlen
        if net.version == 4 and ip_version == 6:
            prefix += 96
        encoded = encode(dict(record))
        if encoded not in offsets:
            offsets[encoded] = len(data)
            data += encoded
        leaf = ("data", offsets[encoded])
        node = root
        for depth in range(prefix):
            if net.version == 4 and ip_version == 6:
                bit = 0 if depth < 96 else (value >> (127 - depth)) & 1
            else:
                bit = (value >> (bits - 1 - depth)) & 1
            if depth == prefix - 1:
                node.children[bit] = leaf
                break
            child = node.children[bit]
            if not isinstance(child, _Node):
                pushed = _Node()
                pushed.children = [child, child]
                node.children[bit] = child = pushed
            node = child
    nodes: List[_Node] = []
    numbers: Dict[int, int] = {}
    queue = [root]
    while queue:
        node = queue.pop(0)
        numbers[id(node)] = len(nodes)
        nodes.append(node)
        queue.extend(c for c in node.children if isinstance(c, _Node))
    count = len(nodes)

    def record_value(child: Any) -> int:
        if child is None:
            return count
        if isinstance(child, _Node):
            return numbers[id(child)]
        return count + 16 + child[1]

    tree = bytearray()
    for node in nodes:
        for child in node.children:
            tree += record_value(child).to_bytes(3, "big")
    metadata: Dict[str, Any] = {
        "node_count": count,
        "record_size": 24,
        "ip_version": ip_version,
        "database_type": database_type,
        "languages": list(languages),
        "binary_format_major_version": 2,
        "binary_format_minor_version": 0,
        "build_epoch": int(time.time()) if build_epoch is None else build_epoch,
        "description": dict(description or {"en": f"edgeproxy test {database_type}"}),
    }
    meta = _control(7, len(metadata))
    for key, item in metadata.items():
        if key in ("record_size", "ip_version") or key.startswith("binary_format"):
            meta += encode(key) + _uint(5, item)
        elif key == "build_epoch":
            meta += encode(key) + _uint(9, item)
        else:
            meta += encode(key) + encode(item)
    with open(path, "wb") as f:
        f.write(bytes(tree) + b"\x00" * 16 + data + METADATA_MARKER + meta)
    return path
