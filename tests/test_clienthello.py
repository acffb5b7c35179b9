"""
Tests for L{edgeproxy.net.clienthello}: the server name of a TLS
ClientHello, from hand-built hellos (Hypothesis), real ones from Python's
C{ssl} and from C{openssl s_client}, and bad input of every kind.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import struct
import subprocess
import time
from typing import List, Optional

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeproxy.net.clienthello import (
    DEFAULT_MAX_SIZE,
    REASONS,
    ClientHelloReader,
    NoServerName,
    Outcome,
    Refused,
    ServerName,
    normalise_name,
    parse_client_hello,
)


def extension(kind: int, data: bytes) -> bytes:
    """
    One hand-built extension: type, length, data.
    """
    return struct.pack("!HH", kind, len(data)) + data


def sni_extension(*names: bytes, name_type: int = 0) -> bytes:
    """
    A server_name extension listing C{names}.
    """
    entries = b"".join(struct.pack("!BH", name_type, len(n)) + n for n in names)
    return extension(0, struct.pack("!H", len(entries)) + entries)


def hello_body(
    extensions: Optional[List[bytes]] = None,
    version: bytes = b"\x03\x03",
    session_id: bytes = b"\x11" * 32,
) -> bytes:
    """
    A hand-built ClientHello body (not through the parser under test).
    """
    suites = b"\x13\x01\x13\x02\xc0\x2f"
    body = (
        version
        + b"\x42" * 32
        + bytes([len(session_id)])
        + session_id
        + struct.pack("!H", len(suites))
        + suites
        + b"\x01\x00"
    )
    if extensions is not None:
        block = b"".join(extensions)
        body += struct.pack("!H", len(block)) + block
    return body


def records(body: bytes, sizes: Optional[List[int]] = None, msg_type: int = 1) -> bytes:
    """
    The handshake message around C{body}, cut into TLS records of the given
    payload sizes (the last takes the rest).
    """
    message = bytes([msg_type]) + len(body).to_bytes(3, "big") + body
    out = b""
    offset = 0
    for size in sizes or []:
        if offset >= len(message):
            break
        chunk = message[offset : offset + max(1, size)]
        out += b"\x16\x03\x01" + struct.pack("!H", len(chunk)) + chunk
        offset += len(chunk)
    if offset < len(message):
        chunk = message[offset:]
        out += b"\x16\x03\x01" + struct.pack("!H", len(chunk)) + chunk
    return out


def feed_in_pieces(data: bytes, cuts: List[int]) -> Optional[Outcome]:
    """
    Feed C{data} to a fresh reader cut at C{cuts}; the first outcome.
    """
    reader = ClientHelloReader()
    previous = 0
    for cut in [*sorted(set(c for c in cuts if 0 < c < len(data))), len(data)]:
        outcome = reader.feed(data[previous:cut])
        previous = cut
        if outcome is not None:
            return outcome
    return None


_LABELS = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)


def _isAddress(name: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


#: Host names; an IPv4 literal such as 0.0.0.0 is not one (the reader
#: answers it with NoServerName("ip-literal"), tested on its own).
_NAMES = st.lists(_LABELS, min_size=2, max_size=5).map(".".join).filter(lambda n: not _isAddress(n))


@given(st.binary(max_size=600), st.lists(st.integers(0, 600), max_size=20))
def test_arbitrary_bytes_never_raise(data: bytes, cuts: List[int]) -> None:
    """
    Any bytes, cut anywhere, give C{None} or an outcome; nothing raises, and
    the outcome is the one the whole bytes give.
    """
    whole = parse_client_hello(data)
    assert whole is None or isinstance(whole, (ServerName, NoServerName, Refused))
    if isinstance(whole, (Refused, NoServerName)):
        assert whole.reason in REASONS
    assert feed_in_pieces(data, cuts) == whole


@given(
    _NAMES,
    st.lists(st.integers(1, 300), max_size=8),
    st.lists(st.integers(0, 2000), max_size=30),
    st.binary(max_size=40),
)
def test_any_split_same_name(name: str, sizes: List[int], cuts: List[int], tail: bytes) -> None:
    """
    A valid hello spread over any number of records and cut into any
    segments gives its server name; C{consumed} covers exactly its records
    (bytes after them are left to the relay).
    """
    data = records(
        hello_body([extension(0x2B, b"\x02\x03\x04"), sni_extension(name.encode())]), sizes
    )
    reader = ClientHelloReader()
    outcome: Optional[Outcome] = None
    previous = 0
    stream = data + tail
    for cut in [*sorted(set(c for c in cuts if 0 < c < len(stream))), len(stream)]:
        outcome = reader.feed(stream[previous:cut])
        previous = cut
        if outcome is not None:
            break
    assert outcome == ServerName(name)
    assert reader.consumed == len(data)


@given(st.binary(min_size=1, max_size=300))
def test_prefixes_are_monotonic(data: bytes) -> None:
    """
    Once a prefix gives an outcome, every longer prefix gives the same.
    """
    first = None
    for end in range(1, len(data) + 1):
        outcome = parse_client_hello(data[:end])
        if first is None:
            first = outcome
        else:
            assert outcome == first


def test_name_is_normalised() -> None:
    """
    The name comes out in lower case without its trailing dot.
    """
    data = records(hello_body([sni_extension(b"WWW.Example.COM.")]))
    assert parse_client_hello(data) == ServerName("www.example.com")


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", Refused("plain-http")),
        (b"\x00\x01\x02", Refused("not-tls")),
        (b"\x15\x03\x03\x00\x02\x02\x28", Refused("not-tls")),
        (b"\x80\x2e\x01\x00\x02\x00\x15", Refused("sslv2")),
        (b"\x80\x2e\x04", Refused("not-tls")),
        (b"\x16\x02\x00\x00\x10", Refused("bad-version")),
        (b"\x16\x03\x01\x00\x00", Refused("bad-record")),
        (b"\x16\x03\x01\x40\x01", Refused("bad-record")),
        (b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", Refused("not-client-hello")),
        (records(hello_body([]))[:-1], None),
        (records(hello_body()), NoServerName("no-sni")),
        (records(hello_body([])), NoServerName("no-sni")),
        (records(hello_body([extension(0x2B, b"\x02\x03\x04")])), NoServerName("no-sni")),
        (records(hello_body([sni_extension(b"192.0.2.1")])), NoServerName("ip-literal")),
        (records(hello_body([sni_extension(b"2001:db8::1")])), NoServerName("ip-literal")),
        (records(hello_body([sni_extension(b"bad name")])), Refused("bad-name")),
        (records(hello_body([sni_extension(b"a..b")])), Refused("bad-name")),
        (records(hello_body([sni_extension(b"-a.example")])), Refused("bad-name")),
        (records(hello_body([sni_extension("caf\xe9.fr".encode("latin-1"))])), Refused("bad-name")),
        (records(hello_body([sni_extension(b"a" * 64 + b".com")])), Refused("bad-name")),
        (records(hello_body([sni_extension(b"a.example", b"b.example")])), Refused("malformed")),
        (records(hello_body([sni_extension(b"")])), Refused("malformed")),
        (records(hello_body([sni_extension(b"x.example", name_type=7)])), Refused("malformed")),
        (records(hello_body([extension(0, b"")])), Refused("malformed")),
        (
            records(hello_body([sni_extension(b"a.example"), sni_extension(b"b.example")])),
            Refused("malformed"),
        ),
        (
            records(hello_body([sni_extension(b"a.example")], version=b"\x03\x00")),
            Refused("old-version"),
        ),
        (
            records(hello_body([sni_extension(b"a.example")], version=b"\x02\x00")),
            Refused("malformed"),
        ),
        (records(hello_body([], session_id=b"\x00" * 33)), Refused("malformed")),
        (records(b""), Refused("malformed")),
        (records(hello_body([sni_extension(b"a.example")]) + b"\x00"), Refused("malformed")),
        (records(hello_body([]), msg_type=2), Refused("not-client-hello")),
        (
            records(hello_body([sni_extension(b"a.example")]), [10])[:15]
            + b"\x17\x03\x03\x00\x01\x00",
            Refused("not-handshake"),
        ),
    ],
)
def test_bad_and_odd_hellos(data: bytes, expected: Optional[Outcome]) -> None:
    """
    Garbage, plain HTTP, SSLv2, a bad record, a handshake other than a
    ClientHello, missing and IP-literal names, invalid names, malformed
    structures and interleaved records each give their outcome, whole and
    one byte at a time.
    """
    assert parse_client_hello(data) == expected
    assert feed_in_pieces(data, list(range(len(data)))) == expected


def test_oversize_refused_early() -> None:
    """
    A hello announcing more than the limit is refused as soon as its
    length is known, before its bytes are buffered.
    """
    header = b"\x16\x03\x01\x40\x00\x01\x00\x80\x00"
    assert parse_client_hello(header) == Refused("oversize")
    body = hello_body([extension(0x15, b"\x00" * 5000), sni_extension(b"a.example")])
    data = records(body, [1000] * 10)
    assert parse_client_hello(data, max_size=4096) == Refused("oversize")
    assert parse_client_hello(data, max_size=DEFAULT_MAX_SIZE) == ServerName("a.example")


def test_tiny_records_oversize() -> None:
    """
    A hello trickled in one-byte records runs into the limit through its
    record headers: the buffer never exceeds the limit.
    """
    data = records(hello_body([sni_extension(b"a.example")]), [1] * 200)
    assert parse_client_hello(data, max_size=600) == Refused("oversize")
    assert parse_client_hello(data, max_size=DEFAULT_MAX_SIZE) == ServerName("a.example")


def test_after_outcome_more_bytes_ignored() -> None:
    """
    After its outcome the reader ignores further bytes.
    """
    reader = ClientHelloReader()
    assert reader.feed(b"GET /") == Refused("plain-http")
    assert reader.feed(b"\x16\x03\x01") == Refused("plain-http")
    assert reader.outcome == Refused("plain-http")


def test_normalise_name() -> None:
    """
    Host names are lower-cased, lose one trailing dot, and must be LDH (or
    underscore) labels of 1-63 characters, 253 in all.
    """
    assert normalise_name("Api.Example.COM.") == "api.example.com"
    assert normalise_name("_acme.example") == "_acme.example"
    assert normalise_name("") is None
    assert normalise_name(".") is None
    assert normalise_name("a-.example") is None
    assert normalise_name("é.example") is None
    assert normalise_name(".".join(["a" * 63] * 4)) is None
    assert normalise_name(".".join(["a" * 62] * 4)) == ".".join(["a" * 62] * 4)


def _python_hello(name: Optional[str], **kwargs: object) -> bytes:
    """
    The first flight of a real Python C{ssl} client.
    """
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    for key, value in kwargs.items():
        setattr(ctx, key, value)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


@pytest.mark.parametrize(
    "version",
    [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3],
)
def test_python_ssl_hellos(version: ssl.TLSVersion) -> None:
    """
    ClientHellos written by Python's C{ssl} (OpenSSL), TLS 1.2 and 1.3,
    parse whole and byte by byte; without a name they are C{no-sni}.
    """
    data = _python_hello("Shop.Example.TEST", maximum_version=version)
    assert parse_client_hello(data) == ServerName("shop.example.test")
    assert feed_in_pieces(data, list(range(len(data)))) == ServerName("shop.example.test")
    assert parse_client_hello(_python_hello(None, maximum_version=version)) == NoServerName(
        "no-sni"
    )


def test_openssl_s_client_hello() -> None:
    """
    The ClientHello C{openssl s_client -servername} sends over a real
    socket parses to its name, also with a large padded hello.
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl missing (apt-get install openssl)")
    for extra in ([], ["-tls1_2"]):
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        client = subprocess.Popen(
            [
                openssl,
                "s_client",
                "-connect",
                f"127.0.0.1:{port}",
                "-servername",
                "Api.Example.Net",
                *extra,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            server.settimeout(10)
            conn, _ = server.accept()
            conn.settimeout(10)
            reader = ClientHelloReader()
            outcome = None
            deadline = time.monotonic() + 10
            while outcome is None and time.monotonic() < deadline:
                chunk = conn.recv(1)
                if not chunk:
                    break
                outcome = reader.feed(chunk)
            conn.close()
        finally:
            server.close()
            client.kill()
            client.wait()
        assert outcome == ServerName("api.example.net")
