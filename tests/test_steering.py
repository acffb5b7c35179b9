"""
Tests for L{edgeproxy.net.steering}: reuseport groups on real sockets whose
connections the kernel steers by client address with the classic BPF
program, the Python twin of the program's hash (L{owner_of}), and an
interpreter of the program that checks both branches (IPv4 and IPv6)
against L{owner_of}, which loopback alone cannot for IPv6.
"""

from __future__ import annotations

import errno
import ipaddress
import select
import socket
import struct
import time
from typing import Dict, Iterator, List

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from edgeproxy.net.steering import (
    SO_ATTACH_REUSEPORT_CBPF,
    attach_steering,
    owner_of,
    reuseport_group,
    steering_program,
)

#: setsockopt(SOL_SOCKET) detaching the group's program: ENOENT if it has
#: none (Linux 5.3).
SO_DETACH_REUSEPORT_BPF = 68

U32 = 0xFFFFFFFF


# -- a classic BPF interpreter, written from linux/filter.h ---------------

SKF_NET_OFF = -0x100000 & U32


def run_cbpf(program: bytes, net: bytes) -> int:
    """
    Run a classic BPF program for a packet whose network header (and what
    follows) is C{net}, as the kernel runs a reuseport program: only loads
    relative to C{SKF_NET_OFF} are allowed (absolute offset 0 is past the
    TCP header there).  Only the opcodes the steering program uses are
    known; any other fails the test.
    """
    insns = list(struct.iter_unpack("=HBBI", program))
    a = x = pc = 0
    while True:
        assert 0 <= pc < len(insns), "ran off the program"
        code, jt, jf, k = insns[pc]
        pc += 1
        cls = code & 0x07
        if cls == 0x00:  # BPF_LD
            assert code & 0xE0 == 0x20, "only BPF_ABS loads"
            size = {0x00: 4, 0x08: 2, 0x10: 1}[code & 0x18]
            assert k >= SKF_NET_OFF, "a load not relative to SKF_NET_OFF"
            offset = k - SKF_NET_OFF
            assert offset + size <= len(net), "a load past the header"
            a = int.from_bytes(net[offset : offset + size], "big")
        elif cls == 0x04:  # BPF_ALU
            src = x if code & 0x08 else k
            op = code & 0xF0
            if op == 0x00:
                a = a + src
            elif op == 0x20:
                a = a * src
            elif op == 0x50:
                a = a & src
            elif op == 0x70:
                a = a >> src
            elif op == 0x90:
                assert src != 0
                a = a % src
            else:
                raise AssertionError(f"ALU op {op:#x}")
            a &= U32
        elif cls == 0x05:  # BPF_JMP
            assert code == 0x15, "only jeq #k"
            pc += jt if a == k else jf
        elif cls == 0x07:  # BPF_MISC
            assert code in (0x07, 0x87)
            if code == 0x07:  # TAX
                x = a
            else:  # TXA
                a = x
        elif cls == 0x06:  # BPF_RET
            return a if code & 0x18 == 0x10 else k
        else:
            raise AssertionError(f"instruction class {cls:#x}")


def ipv4_header(source: str) -> bytes:
    """
    A 20-byte IPv4 header from C{source} (to 127.0.0.1).
    """
    return (
        bytes([0x45, 0, 0, 60, 0, 0, 0x40, 0, 64, 6, 0, 0])
        + socket.inet_pton(socket.AF_INET, source)
        + socket.inet_pton(socket.AF_INET, "127.0.0.1")
    )


def ipv6_header(source: str) -> bytes:
    """
    A 40-byte IPv6 header from C{source} (to ::1).
    """
    return (
        bytes([0x60, 0, 0, 0, 0, 40, 6, 64])
        + socket.inet_pton(socket.AF_INET6, source)
        + socket.inet_pton(socket.AF_INET6, "::1")
    )


# -- real sockets ---------------------------------------------------------


@pytest.fixture
def opened() -> Iterator[List[socket.socket]]:
    """
    A list the test appends its sockets to; all closed at the end.
    """
    sockets: List[socket.socket] = []
    yield sockets
    for sock in sockets:
        sock.close()


def group(opened: List[socket.socket], host: str, workers: int, **kw: object) -> list:
    """
    L{reuseport_group} on port 0, its sockets closed at the end of the test;
    the test is skipped if the kernel refuses the program.
    """
    try:
        sockets = reuseport_group(host, 0, workers, **kw)  # type: ignore[arg-type]
    except OSError as e:
        if "SO_ATTACH_REUSEPORT_CBPF" in str(e):
            pytest.skip(str(e))
        raise
    opened.extend(sockets)
    return sockets


def connect_from(
    opened: List[socket.socket], family: int, source: str, target: tuple
) -> socket.socket:
    """
    A client connected to C{target} from address C{source}.
    """
    client = socket.socket(family, socket.SOCK_STREAM)
    opened.append(client)
    client.bind((source, 0))
    client.settimeout(5)
    client.connect(target)
    return client


def accept_all(listeners: List[socket.socket], expected: int) -> Dict[tuple, int]:
    """
    Accept C{expected} connections from C{listeners}: each one's peer
    address mapped to the index of the listener that accepted it.
    """
    poller = select.poll()
    by_fd = {sock.fileno(): index for index, sock in enumerate(listeners)}
    for fd in by_fd:
        poller.register(fd, select.POLLIN)
    owners: Dict[tuple, int] = {}
    deadline = time.monotonic() + 5
    while len(owners) < expected:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"only {len(owners)} of {expected} connections accepted"
        for fd, _ in poller.poll(remaining * 1000):
            listener = listeners[by_fd[fd]]
            while True:
                try:
                    conn, peer = listener.accept()
                except BlockingIOError:
                    break
                conn.close()
                assert peer[:2] not in owners
                owners[peer[:2]] = by_fd[fd]
    return owners


def has_program(sock: socket.socket) -> bool:
    """
    Whether the reuseport group of C{sock} has a program, found by
    detaching it (so the group has none afterwards).
    """
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_REUSEPORT_BPF, 0)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return False
        if e.errno == errno.ENOPROTOOPT:
            pytest.skip("no SO_DETACH_REUSEPORT_BPF (Linux < 5.3)")
        raise
    return True


def ipv6_usable(address: str) -> bool:
    """
    Whether this host has C{address} and can listen on C{"::"}.
    """
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind((address, 0))
    except OSError:
        return False
    return True


def global_ipv6_addresses() -> List[str]:
    """
    This host's usable global IPv6 addresses (from C{/proc/net/if_inet6}).
    """
    found = []
    try:
        with open("/proc/net/if_inet6") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split()
        hexaddr, scope, flags = fields[0], int(fields[3], 16), int(fields[4], 16)
        # Global scope, not tentative (0x40) or DAD-failed (0x08).
        if scope == 0 and not flags & 0x48:
            found.append(str(ipaddress.IPv6Address(bytes.fromhex(hexaddr))))
    return found


@pytest.mark.parametrize("workers", [2, 3])
def test_ipv4_clients_land_on_their_owner(opened: List[socket.socket], workers: int) -> None:
    """
    In a steered group on 127.0.0.1, the connection from each of 199 client
    addresses is accepted by the socket at index L{owner_of} of its source,
    and every socket gets some.
    """
    listeners = group(opened, "127.0.0.1", workers)
    port = listeners[0].getsockname()[1]
    assert all(sock.getsockname() == ("127.0.0.1", port) for sock in listeners)
    sources = [f"127.0.0.{n}" for n in range(2, 201)]
    for source in sources:
        connect_from(opened, socket.AF_INET, source, ("127.0.0.1", port))
    owners = accept_all(listeners, len(sources))
    assert {host for host, _ in owners} == set(sources)
    for (host, _), index in owners.items():
        assert index == owner_of(host, workers), host
    assert set(owners.values()) == set(range(workers))


def test_same_client_same_worker(opened: List[socket.socket]) -> None:
    """
    Many connections from one client address, each from another port, all
    reach one socket: the program ignores the ports the kernel's own hash
    uses.
    """
    listeners = group(opened, "127.0.0.1", 4)
    port = listeners[0].getsockname()[1]
    for _ in range(30):
        connect_from(opened, socket.AF_INET, "127.0.0.7", ("127.0.0.1", port))
    owners = accept_all(listeners, 30)
    assert set(owners.values()) == {owner_of("127.0.0.7", 4)}


def test_dual_stack_ipv4_clients(opened: List[socket.socket]) -> None:
    """
    In a steered dual-stack group on C{"::"}, IPv4 clients are accepted as
    IPv4-mapped addresses, by the socket L{owner_of} gives for both the
    mapped and the plain form.
    """
    if not ipv6_usable("::"):
        pytest.skip("no IPv6")
    listeners = group(opened, "::", 3)
    assert all(sock.family == socket.AF_INET6 for sock in listeners)
    port = listeners[0].getsockname()[1]
    sources = [f"127.0.0.{n}" for n in range(2, 62)]
    for source in sources:
        connect_from(opened, socket.AF_INET, source, ("127.0.0.1", port))
    owners = accept_all(listeners, len(sources))
    assert {host for host, _ in owners} == {f"::ffff:{s}" for s in sources}
    for (host, _), index in owners.items():
        assert owner_of(host, 3) == owner_of(host[len("::ffff:") :], 3) == index, host
    assert set(owners.values()) == {0, 1, 2}


@pytest.mark.parametrize("source", ["::1", *global_ipv6_addresses()])
def test_ipv6_client(opened: List[socket.socket], source: str) -> None:
    """
    An IPv6 client (C{::1}, and any global address of this host) reaches the
    socket L{owner_of} gives, whatever the group size and prefix length,
    for all of its connections.
    """
    if not ipv6_usable(source):
        pytest.skip(f"no {source}")
    for workers in (2, 3, 5, 8):
        for prefix in (16, 64, 128):
            listeners = group(opened, "::", workers, ipv6_prefix=prefix)
            port = listeners[0].getsockname()[1]
            for _ in range(6):
                connect_from(opened, socket.AF_INET6, source, (source, port))
            owners = accept_all(listeners, 6)
            assert set(owners.values()) == {owner_of(source, workers, prefix)}
            for sock in listeners:
                sock.close()


def test_unsteered_group(opened: List[socket.socket]) -> None:
    """
    C{steer=False} leaves the group without a program (detaching finds
    none) and the group still accepts every connection; C{steer=True} does
    attach one.
    """
    listeners = group(opened, "127.0.0.1", 3, steer=False)
    port = listeners[0].getsockname()[1]
    for n in range(2, 42):
        connect_from(opened, socket.AF_INET, f"127.0.0.{n}", ("127.0.0.1", port))
    assert len(accept_all(listeners, 40)) == 40
    assert not has_program(listeners[0])
    steered = group(opened, "127.0.0.1", 3)
    assert has_program(steered[0])


def test_one_worker(opened: List[socket.socket]) -> None:
    """
    A group of one socket has no program, and every client's owner is 0;
    the program for one worker returns 0.
    """
    (listener,) = group(opened, "127.0.0.1", 1)
    assert not has_program(listener)
    assert owner_of("192.0.2.1", 1) == owner_of("2001:db8::1", 1) == 0
    assert run_cbpf(steering_program(1), ipv4_header("192.0.2.1")) == 0


def test_socket_options(opened: List[socket.socket]) -> None:
    """
    Every socket of a group is a non-blocking, close-on-exec, listening TCP
    socket with C{SO_REUSEADDR} and C{SO_REUSEPORT} on the one port; C{""}
    is IPv4 and C{"::"} dual-stack.
    """
    listeners = group(opened, "", 2)
    if ipv6_usable("::"):
        v6 = group(opened, "::", 2)
        assert all(s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0 for s in v6)
        assert all(s.family == socket.AF_INET6 for s in v6)
    assert [s.getsockname() for s in listeners] == [("0.0.0.0", listeners[0].getsockname()[1])] * 2
    for sock in opened:
        assert sock.type == socket.SOCK_STREAM
        assert not sock.getblocking()
        assert not sock.get_inheritable()
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    assert listeners[0].family == socket.AF_INET


def test_attach_refused(opened: List[socket.socket]) -> None:
    """
    Attaching to a listening socket without C{SO_REUSEPORT} raises an
    C{OSError} that names the option and keeps the kernel's errno.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    opened.append(sock)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    with pytest.raises(OSError) as raised:
        attach_steering(sock, 2)
    if raised.value.errno == errno.ENOPROTOOPT:
        pytest.skip(str(raised.value))
    assert raised.value.errno == errno.EINVAL
    assert "SO_ATTACH_REUSEPORT_CBPF" in str(raised.value)
    assert SO_ATTACH_REUSEPORT_CBPF == 51


def test_group_taken_port_closes_sockets(opened: List[socket.socket]) -> None:
    """
    A group that cannot bind (its port held by a socket without
    C{SO_REUSEPORT}) raises and leaves none of its sockets open.
    """
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    opened.append(holder)
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    with pytest.raises(OSError) as raised:
        reuseport_group("127.0.0.1", holder.getsockname()[1], 2)
    assert raised.value.errno == errno.EADDRINUSE


@pytest.mark.parametrize(
    "call",
    [
        lambda: owner_of("127.0.0.1", 0),
        lambda: owner_of("127.0.0.1", 1 << 16),
        lambda: owner_of("::1", 2, 129),
        lambda: owner_of("::1", 2, -1),
        lambda: owner_of("localhost", 2),
        lambda: owner_of("1.2.3", 2),
        lambda: steering_program(0),
        lambda: reuseport_group("localhost", 0, 2),
        lambda: reuseport_group("127.0.0.1", 0, 0),
    ],
)
def test_bad_arguments(call: object) -> None:
    """
    A worker count, prefix length or address the hash cannot take is a
    C{ValueError}.
    """
    with pytest.raises(ValueError):
        call()  # type: ignore[operator]


# -- the hash and the program ---------------------------------------------

workers_st = st.integers(min_value=1, max_value=300)
prefix_st = st.integers(min_value=0, max_value=128)
ipv4_st = st.ip_addresses(v=4).map(str)
# An IPv6 SYN from an IPv4-mapped source is dropped by the kernel (and such
# an address is IPv4 for owner_of): none comes from the wire.
ipv6_st: st.SearchStrategy[ipaddress.IPv6Address] = (
    st.ip_addresses(v=6)
    .map(lambda a: ipaddress.IPv6Address(int(a)))
    .filter(lambda a: a.ipv4_mapped is None)
)


@given(st.one_of(ipv4_st, ipv6_st.map(str)), workers_st, prefix_st)
def test_owner_in_range_and_stable(host: str, workers: int, prefix: int) -> None:
    """
    L{owner_of} is an index of the group, the same every time and for
    every spelling of the address.
    """
    index = owner_of(host, workers, prefix)
    assert 0 <= index < workers
    assert owner_of(host, workers, prefix) == index
    assert owner_of(ipaddress.ip_address(host).exploded, workers, prefix) == index


@given(ipv6_st, st.integers(min_value=0, max_value=(1 << 128) - 1), workers_st, prefix_st)
def test_owner_by_ipv6_prefix(
    address: ipaddress.IPv6Address, noise: int, workers: int, prefix: int
) -> None:
    """
    Two IPv6 addresses that share their first C{min(prefix, 64)} bits have
    one owner.
    """
    bits = min(prefix, 64)
    keep = ((1 << bits) - 1) << (128 - bits)
    other = ipaddress.IPv6Address((int(address) & keep) | (noise & ~keep & ((1 << 128) - 1)))
    assume(other.ipv4_mapped is None)
    assert owner_of(str(address), workers, prefix) == owner_of(str(other), workers, prefix)


@given(ipv4_st, workers_st, prefix_st)
def test_ipv4_mapped_is_ipv4(host: str, workers: int, prefix: int) -> None:
    """
    An IPv4-mapped IPv6 address has its IPv4 address's owner.
    """
    mapped = ipaddress.IPv6Address(f"::ffff:{host}")
    index = owner_of(host, workers, prefix)
    assert owner_of(f"::ffff:{host}", workers, prefix) == index
    assert owner_of(mapped.exploded, workers, prefix) == index


def test_owner_of_known_values() -> None:
    """
    The hash is the documented one: Fibonacci hashing of the IPv4 address,
    of the masked first 64 bits for IPv6; a scope suffix is ignored.
    """
    a = 0x7F000001
    assert owner_of("127.0.0.1", 1000) == (((a * 0x9E3779B1) & U32) >> 16) % 1000
    w0, w1 = 0x20010DB8, 0x00010000
    h = ((((w0 * 0x9E3779B1) + w1) & U32) * 0x9E3779B1) & U32
    assert owner_of("2001:db8:1:2::3", 1000, 48) == (h >> 16) % 1000
    assert owner_of("fe80::1%lo", 7) == owner_of("fe80::1", 7)


@given(ipv4_st, workers_st, prefix_st)
def test_program_ipv4(host: str, workers: int, prefix: int) -> None:
    """
    The program run on an IPv4 header returns L{owner_of} of its source.
    """
    program = steering_program(workers, prefix)
    assert run_cbpf(program, ipv4_header(host)) == owner_of(host, workers, prefix)


@given(ipv6_st.map(str), workers_st, prefix_st)
def test_program_ipv6(host: str, workers: int, prefix: int) -> None:
    """
    The program run on an IPv6 header returns L{owner_of} of its source.
    """
    program = steering_program(workers, prefix)
    assert run_cbpf(program, ipv6_header(host)) == owner_of(host, workers, prefix)


def test_program_shape() -> None:
    """
    The program is whole C{struct sock_filter}s (at most a few dozen: the
    kernel's limit is 4096) ending in a return.
    """
    for prefix in (0, 1, 31, 32, 33, 48, 64, 65, 128):
        program = steering_program(7, prefix)
        assert len(program) % 8 == 0 and len(program) // 8 < 32
        (last,) = struct.unpack_from("=H", program, len(program) - 8)
        assert last & 0x07 == 0x06


def test_kernel_accepts_every_shape(opened: List[socket.socket]) -> None:
    """
    The kernel's checker accepts the program for every shape it takes (a
    prefix that masks one word, both, neither, or leaves out the second;
    any group size), attached to a listening group.
    """
    listeners = group(opened, "127.0.0.1", 2)
    for prefix in (0, 1, 16, 31, 32, 33, 48, 63, 64, 65, 128):
        for workers in (1, 2, 3, 64, 65535):
            attach_steering(listeners[1], workers, prefix)
    assert has_program(listeners[0])
