# -*- test-case-name: tests.test_steering -*-
"""
Steering accepted TCP connections to worker processes by client address,
on Linux: the same client always lands on the same worker.

A supervisor makes one listening socket per worker on the same address and
port with C{SO_REUSEPORT} (L{reuseport_group}); the kernel keeps them in one
reuseport group, indexed in the order they called C{listen()}.  A classic
BPF program attached to the group (L{steering_program}, L{attach_steering})
runs on every SYN and returns the index of the socket that gets the
connection, computed from the client's address alone, so a client's
connections (and an IPv6 client's whole prefix) always reach the same
worker; L{owner_of} computes the same index in Python, bit for bit.

The hash, with C{K = 0x9E3779B1} and all arithmetic modulo 2**32:

  - IPv4 (also an IPv4 client of a dual-stack C{AF_INET6} socket: its SYN is
    an IPv4 packet; for L{owner_of}, an IPv4-mapped C{::ffff:a.b.c.d}):
    C{a} is the source address as a big-endian u32;
    C{index = ((a * K) >> 16) % workers}.
  - IPv6: only the first C{min(ipv6_prefix, 64)} bits of the source address
    count, so every address of a client's prefix has one owner.  C{w0} and
    C{w1} are its bytes 0-3 and 4-7 (big-endian) under the prefix's mask;
    C{index = ((((w0 * K) + w1) * K) >> 16) % workers}.

The program reads the addresses with loads relative to C{SKF_NET_OFF} (for
reuseport TCP the kernel runs it with the packet's data pulled past the TCP
header) and tells the families apart by the version nibble of the network
header's first byte.  It needs C{BPF_MOD} (Linux 3.7) and
C{SO_ATTACH_REUSEPORT_CBPF} for TCP (Linux 4.6).  An index the group does
not have (fewer sockets than C{workers}) makes the kernel fall back to its
own 4-tuple hash.

A member of the group that is closed is replaced at its index by the last
member, which would move clients between workers: the supervisor keeps
every socket of the group open for as long as the group serves.
"""

from __future__ import annotations

import ctypes
import errno
import socket
import struct
import sys
from typing import List, Tuple

__all__ = [
    "SO_ATTACH_REUSEPORT_CBPF",
    "attach_steering",
    "owner_of",
    "reuseport_group",
    "steering_program",
]

#: The socket option (C{SOL_SOCKET}) attaching a classic BPF program to a
#: socket's reuseport group.
SO_ATTACH_REUSEPORT_CBPF = 51

#: The multiplier of the hash (the 32-bit golden ratio).
_K = 0x9E3779B1
_U32 = 0xFFFFFFFF

#: The most workers a group can have: a reuseport group holds fewer than
#: 2**16 sockets, and the hash keeps 16 bits.
_MAX_WORKERS = 0xFFFF

# Classic BPF (linux/filter.h, linux/bpf_common.h).
_BPF_LD = 0x00
_BPF_ALU = 0x04
_BPF_JMP = 0x05
_BPF_RET = 0x06
_BPF_MISC = 0x07
_BPF_W = 0x00
_BPF_B = 0x10
_BPF_ABS = 0x20
_BPF_ADD = 0x00
_BPF_MUL = 0x20
_BPF_AND = 0x50
_BPF_RSH = 0x70
_BPF_MOD = 0x90
_BPF_JEQ = 0x10
_BPF_K = 0x00
_BPF_X = 0x08
_BPF_A = 0x10
_BPF_TAX = 0x00

#: Loads at C{SKF_NET_OFF + n} read byte C{n} of the network header.
_SKF_NET_OFF = -0x100000

#: One C{struct sock_filter}: u16 code, u8 jt, u8 jf, u32 k, native order.
_INSN = struct.Struct("=HBBI")

_V4_MAPPED = b"\x00" * 10 + b"\xff\xff"


def _check(workers: int, ipv6_prefix: int) -> None:
    """
    Refuse a worker count or an IPv6 prefix length the hash cannot take.

    @raise ValueError: C{workers} outside [1, 65535] or C{ipv6_prefix}
        outside [0, 128].
    """
    if not 1 <= workers <= _MAX_WORKERS:
        raise ValueError(f"workers must be between 1 and {_MAX_WORKERS}, not {workers!r}")
    if not 0 <= ipv6_prefix <= 128:
        raise ValueError(f"ipv6_prefix must be between 0 and 128, not {ipv6_prefix!r}")


def _masks(ipv6_prefix: int) -> Tuple[int, int]:
    """
    The masks of an IPv6 address's first and second 32-bit words for a
    prefix of C{ipv6_prefix} bits, of which at most 64 count.
    """
    bits = min(ipv6_prefix, 64)
    mask = ((1 << bits) - 1) << (64 - bits)
    return mask >> 32, mask & _U32


def owner_of(host: str, workers: int, ipv6_prefix: int = 64) -> int:
    """
    The index of the worker that owns a client: the index
    L{steering_program} makes the kernel pick for a connection from it.

    @param host: the client's address, an IPv4 or IPv6 literal (a scope
        C{%zone} suffix is ignored); an IPv4-mapped C{::ffff:a.b.c.d} is
        that IPv4 address.
    @param workers: the size of the reuseport group.
    @param ipv6_prefix: the prefix length an IPv6 client is keyed by (at
        most 64 bits count).
    @return: an index in C{[0, workers)}.
    @raise ValueError: C{host} is not an IP address literal, or
        C{workers} or C{ipv6_prefix} is out of range.
    """
    _check(workers, ipv6_prefix)
    try:
        packed = socket.inet_pton(socket.AF_INET, host)
    except (OSError, ValueError):
        try:
            packed = socket.inet_pton(socket.AF_INET6, host.partition("%")[0])
        except (OSError, ValueError):
            raise ValueError(f"{host!r} is not an IP address literal") from None
        if packed[:12] == _V4_MAPPED:
            packed = packed[12:]
    if workers == 1:
        return 0
    if len(packed) == 4:
        h = (int.from_bytes(packed, "big") * _K) & _U32
    else:
        mask0, mask1 = _masks(ipv6_prefix)
        w0 = int.from_bytes(packed[0:4], "big") & mask0
        w1 = int.from_bytes(packed[4:8], "big") & mask1
        h = (((w0 * _K + w1) & _U32) * _K) & _U32
    return (h >> 16) % workers


def _insn(code: int, k: int = 0, jt: int = 0, jf: int = 0) -> bytes:
    """
    One packed C{struct sock_filter}.
    """
    return _INSN.pack(code, jt, jf, k & _U32)


def steering_program(workers: int, ipv6_prefix: int = 64) -> bytes:
    """
    The classic BPF program choosing a connection's socket in a reuseport
    group of C{workers} sockets: the index L{owner_of} gives for the SYN's
    source address.

    @param workers: the size of the group.
    @param ipv6_prefix: the prefix length an IPv6 client is keyed by.
    @return: the instructions, an array of C{struct sock_filter} in native
        byte order, for C{SO_ATTACH_REUSEPORT_CBPF}.
    @raise ValueError: C{workers} or C{ipv6_prefix} is out of range.
    """
    _check(workers, ipv6_prefix)
    if workers == 1:
        return _insn(_BPF_RET | _BPF_K, 0)
    tail = [
        _insn(_BPF_ALU | _BPF_MUL | _BPF_K, _K),
        _insn(_BPF_ALU | _BPF_RSH | _BPF_K, 16),
        _insn(_BPF_ALU | _BPF_MOD | _BPF_K, workers),
        _insn(_BPF_RET | _BPF_A),
    ]
    v4 = [_insn(_BPF_LD | _BPF_W | _BPF_ABS, _SKF_NET_OFF + 12), *tail]
    mask0, mask1 = _masks(ipv6_prefix)
    v6 = [_insn(_BPF_LD | _BPF_W | _BPF_ABS, _SKF_NET_OFF + 8)]
    if mask0 != _U32:
        v6.append(_insn(_BPF_ALU | _BPF_AND | _BPF_K, mask0))
    if mask1:
        v6.append(_insn(_BPF_ALU | _BPF_MUL | _BPF_K, _K))
        v6.append(_insn(_BPF_MISC | _BPF_TAX))
        v6.append(_insn(_BPF_LD | _BPF_W | _BPF_ABS, _SKF_NET_OFF + 12))
        if mask1 != _U32:
            v6.append(_insn(_BPF_ALU | _BPF_AND | _BPF_K, mask1))
        v6.append(_insn(_BPF_ALU | _BPF_ADD | _BPF_X))
    else:
        # w1 is 0: the sum is w0 * K itself.
        v6.append(_insn(_BPF_ALU | _BPF_MUL | _BPF_K, _K))
    v6.extend(tail)
    head = [
        _insn(_BPF_LD | _BPF_B | _BPF_ABS, _SKF_NET_OFF),
        _insn(_BPF_ALU | _BPF_RSH | _BPF_K, 4),
        _insn(_BPF_JMP | _BPF_JEQ | _BPF_K, 4, jt=0, jf=len(v4)),
    ]
    return b"".join(head + v4 + v6)


class _SockFprog(ctypes.Structure):
    """
    C{struct sock_fprog}.
    """

    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def attach_steering(sock: socket.socket, workers: int, ipv6_prefix: int = 64) -> None:
    """
    Attach L{steering_program} to the reuseport group of C{sock}, which
    then steers the connections of every socket in the group.

    @param sock: a TCP socket with C{SO_REUSEPORT}, listening (or not yet
        bound).
    @param workers: the size of the group.
    @param ipv6_prefix: the prefix length an IPv6 client is keyed by.
    @raise ValueError: C{workers} or C{ipv6_prefix} is out of range.
    @raise OSError: not Linux, or the kernel refused the program (too old,
        or a socket without C{SO_REUSEPORT}); the message says which.
    """
    program = steering_program(workers, ipv6_prefix)
    if not sys.platform.startswith("linux"):
        raise OSError(
            errno.ENOPROTOOPT,
            f"connection steering needs Linux (SO_ATTACH_REUSEPORT_CBPF), not {sys.platform}",
        )
    # The kernel copies the instructions during the call, from this buffer,
    # which the local name keeps alive until the call returns.
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // _INSN.size, ctypes.addressof(buffer))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, bytes(fprog))
    except OSError as e:
        raise OSError(
            e.errno,
            "the kernel refused the connection steering program "
            f"(SO_ATTACH_REUSEPORT_CBPF: {e.strerror}); it needs Linux 4.6 or later "
            "and a socket with SO_REUSEPORT",
        ) from e


def _sockaddr(host: str, port: int) -> Tuple[int, Tuple[object, ...]]:
    """
    The family and socket address to bind for an address literal.

    @raise ValueError: C{host} is not an IP address literal.
    """
    if host in ("", "0.0.0.0"):
        return socket.AF_INET, ("0.0.0.0", port)
    try:
        infos = socket.getaddrinfo(
            host,
            port,
            socket.AF_UNSPEC,
            socket.SOCK_STREAM,
            0,
            socket.AI_NUMERICHOST | socket.AI_PASSIVE,
        )
    except socket.gaierror:
        raise ValueError(f"{host!r} is not an IP address literal") from None
    family, _, _, _, address = infos[0]
    return family, tuple(address)


def reuseport_group(
    host: str,
    port: int,
    workers: int,
    *,
    backlog: int = 1024,
    steer: bool = True,
    ipv6_prefix: int = 64,
) -> List[socket.socket]:
    """
    Make the listening sockets of one reuseport group: C{workers} TCP
    sockets on C{(host, port)}, socket C{i} at index C{i} of the group.

    Each socket has C{SO_REUSEADDR} and C{SO_REUSEPORT}, is non-blocking
    and close-on-exec, and is made, bound and listening before the next is
    made.  An IPv6 address gives C{AF_INET6} sockets with C{IPV6_V6ONLY}
    off (C{"::"} is dual-stack); C{""} and C{"0.0.0.0"} are every IPv4
    address.  Keep every socket open while the group serves: a closed one
    is replaced at its index by the last.

    @param host: an IP address literal, or C{""}.
    @param port: the port; 0 for one the kernel picks (for the first
        socket, the others bind to the same).
    @param workers: how many sockets.
    @param backlog: each socket's C{listen()} backlog.
    @param steer: attach L{steering_program} (for more than one worker),
        so a client's connections all reach one socket, L{owner_of}'s; if
        false the kernel spreads connections by its hash of the 4-tuple
        (for PROXY-protocol listeners, whose socket peer is a load
        balancer, not the client).
    @param ipv6_prefix: the prefix length an IPv6 client is keyed by.
    @return: the sockets, in group order.
    @raise ValueError: C{host} is not an address literal, or C{workers} or
        C{ipv6_prefix} is out of range.
    @raise OSError: a socket could not be made, bound or listen, or the
        kernel refused the program (see L{attach_steering}); no socket is
        left open.
    """
    _check(workers, ipv6_prefix)
    family, address = _sockaddr(host, port)
    reuseport = getattr(socket, "SO_REUSEPORT", None)
    if reuseport is None:
        raise OSError(errno.ENOPROTOOPT, "SO_REUSEPORT is not available on this platform")
    sockets: List[socket.socket] = []
    try:
        for _ in range(workers):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.set_inheritable(False)
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, reuseport, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(address)
            if address[1] == 0:
                address = (address[0], sock.getsockname()[1], *address[2:])
            sock.listen(backlog)
        if steer and workers > 1:
            attach_steering(sockets[0], workers, ipv6_prefix)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets
