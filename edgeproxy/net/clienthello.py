# -*- test-case-name: tests.test_clienthello -*-
"""
The server name of a TLS ClientHello, read without terminating TLS.

Pure: no I/O, no reactor.  L{ClientHelloReader} is fed the first bytes of a
connection as they arrive (any split: one byte per segment, the hello
spread over several TLS records) and answers C{None} while it needs more,
then one L{Outcome}:

  - L{ServerName}: the C{host_name} of the C{server_name} extension
    (RFC 6066), lower case, without a trailing dot;
  - L{NoServerName}: a well-formed hello without a usable name (C{no-sni}:
    no extension; C{ip-literal}: an IP address where RFC 6066 wants a host
    name), which a listener may send to its default app;
  - L{Refused}: not a ClientHello it will pass on, with a short reason
    (see L{REASONS}).

The decision only ever depends on bytes already seen, so any split of the
same bytes gives the same outcome, and once an outcome is given, more bytes
never change it.  Work per fed segment is proportional to the segment
(records are reassembled as they complete; the hello body is parsed once),
so a client trickling its hello a byte at a time costs no more than one
sending it whole.  Nothing raises on any input.
"""

from __future__ import annotations

import ipaddress
from typing import Optional, Union

import attrs

from edgeproxy.model import normalise_name

__all__ = [
    "DEFAULT_MAX_SIZE",
    "REASONS",
    "ClientHelloReader",
    "NoServerName",
    "Outcome",
    "Refused",
    "ServerName",
    "normalise_name",
    "parse_client_hello",
]

#: The most bytes (TLS record headers included) a ClientHello may take.
#: A real one is 200 bytes to 2 KiB (a post-quantum key share included).
DEFAULT_MAX_SIZE = 16 * 1024

#: Every reason a L{Refused} (or a L{NoServerName}) can carry.
REASONS = (
    "not-tls",  # the first byte is not a TLS handshake record
    "plain-http",  # the first byte is an upper-case ASCII letter (GET, POST...)
    "sslv2",  # an SSL 2.0 format CLIENT-HELLO
    "bad-version",  # a record version other than 3.x
    "bad-record",  # a record of length 0 or beyond 2^14
    "not-handshake",  # a non-handshake record before the hello was complete
    "not-client-hello",  # a handshake message other than ClientHello first
    "oversize",  # the hello needs more than the size limit
    "malformed",  # the hello's structure does not add up
    "old-version",  # a hello older than TLS 1.0 (SSL 3.0)
    "bad-name",  # a server name that is not a valid host name
    "no-sni",  # no server_name extension (a NoServerName)
    "ip-literal",  # an IP address as server name (a NoServerName)
)

_RECORD_HEADER = 5
_HANDSHAKE = 22
_CLIENT_HELLO = 1
_MAX_RECORD = 1 << 14
_EXT_SERVER_NAME = 0
_HOST_NAME = 0


@attrs.frozen(slots=True)
class ServerName:
    """
    The hello names a host.

    @ivar name: Lower case, no trailing dot, a valid host name.
    """

    name: str


@attrs.frozen(slots=True)
class NoServerName:
    """
    A well-formed hello without a usable server name.

    @ivar reason: C{no-sni} or C{ip-literal}.
    """

    reason: str


@attrs.frozen(slots=True)
class Refused:
    """
    Not a ClientHello to pass on.

    @ivar reason: One of L{REASONS}.
    """

    reason: str


Outcome = Union[ServerName, NoServerName, Refused]


def _is_ip_literal(text: str) -> bool:
    candidate = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        ipaddress.ip_address(candidate.partition("%")[0])
    except ValueError:
        return False
    return True


def _u16(data: bytes, offset: int) -> int:
    return (data[offset] << 8) | data[offset + 1]


def _server_name(body: bytes) -> Outcome:
    """
    Parse a whole ClientHello body (after the 4-byte handshake header).
    """
    end = len(body)
    if end < 2 + 32 + 1:
        return Refused("malformed")
    if body[0] != 3:
        return Refused("malformed")
    if body[1] == 0:
        return Refused("old-version")
    offset = 34
    session_id = body[offset]
    offset += 1 + session_id
    if session_id > 32 or offset + 2 > end:
        return Refused("malformed")
    suites = _u16(body, offset)
    offset += 2 + suites
    if suites < 2 or suites % 2 or offset + 1 > end:
        return Refused("malformed")
    methods = body[offset]
    offset += 1 + methods
    if methods < 1 or offset > end:
        return Refused("malformed")
    if offset == end:
        # No extensions at all (allowed before TLS 1.3).
        return NoServerName("no-sni")
    if offset + 2 > end:
        return Refused("malformed")
    extensions_end = offset + 2 + _u16(body, offset)
    if extensions_end != end:
        return Refused("malformed")
    offset += 2
    seen: set[int] = set()
    found: Optional[bytes] = None
    while offset < end:
        if offset + 4 > end:
            return Refused("malformed")
        kind = _u16(body, offset)
        length = _u16(body, offset + 2)
        offset += 4
        if offset + length > end or kind in seen:
            return Refused("malformed")
        seen.add(kind)
        if kind == _EXT_SERVER_NAME:
            result = _host_name(body[offset : offset + length])
            if isinstance(result, Refused):
                return result
            found = result
        offset += length
    if found is None:
        return NoServerName("no-sni")
    try:
        text = found.decode("ascii")
    except UnicodeDecodeError:
        return Refused("bad-name")
    if _is_ip_literal(text):
        return NoServerName("ip-literal")
    name = normalise_name(text)
    if name is None:
        return Refused("bad-name")
    return ServerName(name)


def _host_name(data: bytes) -> Union[bytes, Refused]:
    """
    The host_name of a server_name extension's ServerNameList.
    """
    if len(data) < 2 or _u16(data, 0) != len(data) - 2 or len(data) == 2:
        return Refused("malformed")
    offset = 2
    found: Optional[bytes] = None
    while offset < len(data):
        if offset + 3 > len(data):
            return Refused("malformed")
        kind = data[offset]
        length = _u16(data, offset + 1)
        offset += 3
        if offset + length > len(data):
            return Refused("malformed")
        if kind == _HOST_NAME:
            if found is not None or length == 0:
                # RFC 6066: at most one name of a type.
                return Refused("malformed")
            found = data[offset : offset + length]
        offset += length
    if found is None:
        return Refused("malformed")
    return found


class ClientHelloReader:
    """
    Reassembles a ClientHello from the first bytes of a connection.

    @ivar consumed: Once an outcome is given for a hello (not a refusal):
        the bytes of the records that carried it.  Whatever came after them
        belongs to the connection too, untouched.
    """

    __slots__ = ("_handshake", "_header", "_maxSize", "_outcome", "_record", "_seen", "consumed")

    def __init__(self, max_size: int = DEFAULT_MAX_SIZE) -> None:
        self._maxSize = max_size
        self._seen = 0  # bytes taken into records so far
        self._header = b""  # an incomplete record header
        self._record = 0  # payload bytes still due in the current record
        self._handshake = bytearray()
        self._outcome: Optional[Outcome] = None
        self.consumed = 0

    @property
    def outcome(self) -> Optional[Outcome]:
        """
        The outcome, once known.
        """
        return self._outcome

    def feed(self, data: bytes) -> Optional[Outcome]:
        """
        The next bytes from the client; the outcome, or C{None} for more.

        After an outcome, further bytes are ignored and the same outcome is
        answered.
        """
        if self._outcome is not None:
            return self._outcome
        outcome = self._feed(data)
        if outcome is not None:
            self._outcome = outcome
        return outcome

    def _feed(self, data: bytes) -> Optional[Outcome]:
        offset = 0
        size = len(data)
        while offset < size:
            due = self._record
            if due:
                take = min(due, size - offset)
                self._handshake += data[offset : offset + take]
                offset += take
                self._seen += take
                self._record = due - take
                outcome = self._handshakeProgress(self._record == 0)
                if outcome is not None:
                    return outcome
                continue
            need = _RECORD_HEADER - len(self._header)
            header = self._header + data[offset : offset + need]
            offset += len(header) - len(self._header)
            self._header = header
            outcome = self._checkHeader(header)
            if outcome is not None:
                return outcome
            if len(header) < _RECORD_HEADER:
                return None
            self._header = b""
            length = _u16(header, 3)
            self._seen += _RECORD_HEADER
            if self._seen + length > self._maxSize:
                return Refused("oversize")
            self._record = length
        return None

    def _checkHeader(self, header: bytes) -> Optional[Outcome]:
        """
        Judge a (possibly partial) record header as soon as its bytes allow.
        """
        first = self._seen == 0
        kind = header[0]
        if kind != _HANDSHAKE:
            if not first:
                return Refused("not-handshake")
            if kind & 0x80:
                # SSL 2.0: a two-byte length with the high bit, then
                # message type 1 (CLIENT-HELLO).
                if len(header) < 3:
                    return None
                return Refused("sslv2" if header[2] == 1 else "not-tls")
            if 0x41 <= kind <= 0x5A:
                return Refused("plain-http")
            return Refused("not-tls")
        if len(header) >= 2 and header[1] != 3:
            return Refused("bad-version")
        if len(header) >= 5:
            length = _u16(header, 3)
            if length == 0 or length > _MAX_RECORD:
                return Refused("bad-record")
        return None

    def _handshakeProgress(self, recordDone: bool) -> Optional[Outcome]:
        """
        Judge the handshake bytes gathered so far.
        """
        handshake = self._handshake
        if handshake[0] != _CLIENT_HELLO:
            return Refused("not-client-hello")
        if len(handshake) < 4:
            return None
        length = (handshake[1] << 16) | (handshake[2] << 8) | handshake[3]
        missing = 4 + length - len(handshake)
        if missing > 0:
            extra = missing - self._record
            if extra > 0:
                # Further records are needed, each with its header, at
                # most 2^14 bytes each.
                headers = _RECORD_HEADER * ((extra + _MAX_RECORD - 1) // _MAX_RECORD)
                if self._seen + self._record + extra + headers > self._maxSize:
                    return Refused("oversize")
            return None
        if not recordDone:
            # Complete inside a record: the relay starts at a record
            # boundary, so wait for the end of this one.
            return None
        self.consumed = self._seen
        return _server_name(bytes(handshake[4 : 4 + length]))


def parse_client_hello(data: bytes, max_size: int = DEFAULT_MAX_SIZE) -> Optional[Outcome]:
    """
    The outcome of the hello at the start of C{data}, or C{None} if more
    bytes are needed.
    """
    return ClientHelloReader(max_size).feed(data)
