"""
Who may use the admin listener (issue 9, FAULTS F24): bearer tokens from
C{--api-token-file}, checked in constant time.

The token file has one token per line, optionally followed by its scope::

    # operators: everything
    4f3c9d0e0a7b4e21b9a5c6d7e8f90123
    # backends: register, heartbeat and deregister only
    b7e1c2d3e4f5a6b7c8d9e0f1a2b3c4d5 register

Blank lines and lines starting with C{#} are ignored.  A token is at least
L{MIN_TOKEN_LENGTH} characters of the RFC 6750 token alphabet (letters,
digits and C{-._~+/}, optionally ending in C{=}); a line with anything
else is refused at startup with its line number (never the token).

The rules (L{ApiAuth}), with C{Authorization: Bearer TOKEN}:

  - B{Writes always need a token}: registering, heartbeats and
    deregistering (L{REGISTER}) take any valid token; setting admin states
    and reloading (L{ADMIN}) take a full token (a C{register} token gets a
    403).  Without a token file every write is refused with a 401 saying to
    configure C{--api-token-file}.
  - B{Reads} (L{READ}: C{/metrics}, C{/health}, the API's C{GET}s, the
    status page) are open without a token when the admin listener is on
    loopback (or a UNIX socket); on any other address they need a valid
    token too.
  - The admin listener refuses to start on an address that is not loopback
    without a token file (L{check_admin_security}).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
import stat
from typing import Any, Dict, List, Optional, Sequence, Tuple

import attrs
from twisted.logger import Logger
from twisted.web.resource import Resource

from edgeproxy.control.admin import json_error
from edgeproxy.interfaces import IMetricsStore

__all__ = [
    "ADMIN",
    "MIN_TOKEN_LENGTH",
    "READ",
    "REFUSED",
    "REGISTER",
    "ApiAuth",
    "Refusal",
    "TokenFileError",
    "Tokens",
    "check_admin_security",
    "is_loopback_description",
    "load_tokens",
    "parse_tokens",
]

_log = Logger()

#: What a request needs: reading, the registration writes, the admin writes.
READ = "read"
REGISTER = "register"
ADMIN = "admin"

#: Token scopes, from the token file: a full token and a register-only one.
_SCOPES = (ADMIN, REGISTER)

#: The shortest token accepted.
MIN_TOKEN_LENGTH = 16

#: Counter of requests refused for want of a (good enough) token, labelled
#: C{no-token-file}, C{missing}, C{invalid} or C{scope}.
REFUSED = "admin_auth_refused"

#: RFC 6750 section 2.1: C{b64token}.
_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")

_REALM = b'Bearer realm="edgeproxy"'


class TokenFileError(ValueError):
    """
    The token file cannot be used; the message says why (and where, by line
    number, never by quoting a token).
    """


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


class Tokens:
    """
    The valid tokens and their scopes.

    Only SHA-256 digests are kept; L{scope} compares the digest of the
    token presented with every one of them (C{hmac.compare_digest}, equal
    lengths) without stopping at a match, so how long a check takes says
    nothing about which token matched or how much of one did.
    """

    def __init__(self, tokens: Sequence[Tuple[str, str]]) -> None:
        """
        @param tokens: C{(token, scope)} pairs; scope L{ADMIN} or L{REGISTER}.
        @raise TokenFileError: An empty list, a short or malformed token,
            an unknown scope, a token given twice.
        """
        if not tokens:
            raise TokenFileError("no tokens")
        entries: List[Tuple[bytes, str]] = []
        seen: set[bytes] = set()
        for position, (token, scope) in enumerate(tokens, 1):
            problem = _tokenProblem(token)
            if problem is not None:
                raise TokenFileError(f"token {position}: {problem}")
            if scope not in _SCOPES:
                raise TokenFileError(
                    f"token {position}: unknown scope {scope!r} (admin or register)"
                )
            digest = _digest(token.encode("ascii"))
            if digest in seen:
                raise TokenFileError(f"token {position}: given twice")
            seen.add(digest)
            entries.append((digest, scope))
        self._entries: Tuple[Tuple[bytes, str], ...] = tuple(entries)

    def __repr__(self) -> str:
        return f"<Tokens {len(self._entries)}>"

    def __len__(self) -> int:
        return len(self._entries)

    def scope(self, presented: bytes) -> Optional[str]:
        """
        The scope of C{presented} (L{ADMIN} or L{REGISTER}), or C{None} if
        it is no valid token; in constant time over every token.
        """
        digest = _digest(presented)
        found: Optional[str] = None
        for known, scope in self._entries:
            # No early exit: every token is compared, whatever matched.
            if hmac.compare_digest(digest, known):
                found = scope
        return found


def _tokenProblem(token: str) -> Optional[str]:
    if len(token) < MIN_TOKEN_LENGTH:
        return f"shorter than {MIN_TOKEN_LENGTH} characters"
    if _TOKEN.fullmatch(token) is None:
        return "not a bearer token (letters, digits and -._~+/ only, optionally ending in =)"
    return None


def parse_tokens(text: str, source: str = "the token file") -> Tokens:
    """
    Read a token file's text (see the module docstring).

    @raise TokenFileError: A bad line (named by its number, never by its
        token), a token given twice, or no token at all.
    """
    pairs: List[Tuple[str, str]] = []
    seen: Dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        words = line.split()
        if len(words) > 2:
            raise TokenFileError(f"{source}, line {number}: expected TOKEN or TOKEN register")
        token = words[0]
        scope = words[1].lower() if len(words) == 2 else ADMIN
        if scope not in _SCOPES:
            raise TokenFileError(
                f"{source}, line {number}: unknown scope {words[1]!r} (expected register)"
            )
        problem = _tokenProblem(token)
        if problem is not None:
            raise TokenFileError(f"{source}, line {number}: the token is {problem}")
        if token in seen:
            raise TokenFileError(f"{source}, line {number}: the same token as line {seen[token]}")
        seen[token] = number
        pairs.append((token, scope))
    if not pairs:
        raise TokenFileError(f"{source} has no tokens")
    return Tokens(pairs)


def load_tokens(path: str) -> Tokens:
    """
    Read the token file at C{path} (blocking: at startup).  A file that
    anyone can read is used, with a warning.

    @raise TokenFileError: It cannot be read, or L{parse_tokens} refuses it.
    """
    try:
        with open(path, "rb") as f:
            info = os.fstat(f.fileno())
            data = f.read(1 << 20)
    except OSError as e:
        raise TokenFileError(f"cannot read the token file {path}: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise TokenFileError(f"the token file {path} is not UTF-8 text") from None
    tokens = parse_tokens(text, f"the token file {path}")
    if info.st_mode & stat.S_IROTH:
        _log.warn(
            "the token file {path} can be read by anyone (mode {mode:o}): chmod o-r it",
            path=path,
            mode=stat.S_IMODE(info.st_mode),
        )
    return tokens


# --- where the admin listener is -----------------------------------------------


def _split(description: str) -> List[str]:
    """
    An endpoint description's colon-separated fields (C{\\:} escapes a
    colon, as in Twisted's syntax).
    """
    fields: List[str] = []
    current: List[str] = []
    index = 0
    while index < len(description):
        char = description[index]
        if char == "\\" and index + 1 < len(description):
            current.append(description[index + 1])
            index += 2
            continue
        if char == ":":
            fields.append("".join(current))
            current = []
        else:
            current.append(char)
        index += 1
    fields.append("".join(current))
    return fields


def _isLoopbackHost(host: str) -> bool:
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def is_loopback_description(description: str) -> bool:
    """
    Whether the endpoint C{description} listens only where the local host
    alone can connect: C{tcp}/C{tcp6}/C{ssl} with an C{interface} on
    loopback (C{127.0.0.0/8}, C{::1}, C{localhost}), or a C{unix} socket.
    C{haproxy:} and C{txsni:CERTDIR:} prefixes are looked through.  Any
    other description (no interface: every address; C{systemd:}, an
    unknown plugin) is not loopback.
    """
    fields = _split(description.strip())
    while fields:
        kind = fields[0].strip().lower()
        if kind == "haproxy":
            fields = fields[1:]
        elif kind == "txsni":
            fields = fields[2:]
        else:
            break
    if not fields:
        return False
    kind = fields[0].strip().lower()
    if kind == "unix":
        return True
    if kind not in ("tcp", "tcp4", "tcp6", "ssl"):
        return False
    # As Twisted reads it: positional arguments (port, then interface for
    # tcp and tcp6), keyword arguments with the last one winning.
    positional: list[str] = []
    interface: Optional[str] = None
    for field in fields[1:]:
        key, equals, value = field.partition("=")
        if equals:
            if key.strip() == "interface":
                interface = value
        else:
            positional.append(field)
    if interface is None and kind != "ssl" and len(positional) >= 2:
        interface = positional[1]
    return interface is not None and _isLoopbackHost(interface)


def check_admin_security(description: Optional[str], tokens: Optional[Tokens]) -> None:
    """
    Refuse an admin listener that is not on loopback without tokens.

    @param description: C{--admin} (C{None} or C{none}: no listener).
    @param tokens: From C{--api-token-file}, or C{None} without one.
    @raise ValueError: C{description} is not loopback and there are no
        tokens; the message says what to do.
    """
    if description is None or description.strip().lower() == "none":
        return
    if tokens is not None and len(tokens) > 0:
        return
    if is_loopback_description(description):
        return
    raise ValueError(
        f"the admin listener {description!r} is not on loopback: give --api-token-file"
        " (bearer tokens for the API and the status page), or listen on loopback"
        " (e.g. tcp:8090:interface=127.0.0.1)"
    )


# --- the rules -------------------------------------------------------------------


@attrs.frozen
class Refusal:
    """
    Why a request is refused.

    @ivar code: 401 or 403.
    @ivar error: The JSON error message.
    @ivar detail: More, for the JSON C{detail}.
    @ivar challenge: The C{WWW-Authenticate} value.
    @ivar reason: The label of the L{REFUSED} counter.
    """

    code: int
    error: str
    detail: Optional[str]
    challenge: bytes
    reason: str


_NO_TOKEN_FILE = Refusal(
    401,
    "writes are disabled: no API tokens are configured",
    "start edgeproxy with --api-token-file FILE (one token per line)",
    _REALM,
    "no-token-file",
)
_MISSING = Refusal(
    401,
    "a bearer token is required",
    "send Authorization: Bearer TOKEN",
    _REALM,
    "missing",
)
_INVALID = Refusal(
    401,
    "invalid token",
    None,
    _REALM + b', error="invalid_token"',
    "invalid",
)
_SCOPE = Refusal(
    403,
    "this token may only register, heartbeat and deregister",
    "admin endpoints need a token without the register scope",
    _REALM + b', error="insufficient_scope", scope="admin"',
    "scope",
)


class ApiAuth:
    """
    The rules of the module docstring for one admin listener.

    @ivar tokens: The valid tokens, or C{None} (no C{--api-token-file}).
    @ivar openReads: Whether reads need no token (the listener is on
        loopback).
    """

    def __init__(
        self,
        tokens: Optional[Tokens],
        *,
        openReads: bool,
        metrics: Optional[IMetricsStore] = None,
    ) -> None:
        self.tokens = tokens
        self.openReads = openReads
        self.metrics = metrics

    @classmethod
    def forListener(
        cls,
        description: str,
        tokens: Optional[Tokens],
        metrics: Optional[IMetricsStore] = None,
    ) -> "ApiAuth":
        """
        The rules for the admin listener C{description}: reads are open when
        it is on loopback (L{is_loopback_description}).
        """
        return cls(tokens, openReads=is_loopback_description(description), metrics=metrics)

    def __repr__(self) -> str:
        count = len(self.tokens) if self.tokens is not None else 0
        return f"<ApiAuth tokens={count} openReads={self.openReads}>"

    def check(self, request: Any, need: str) -> Optional[Refusal]:
        """
        Whether C{request} may do what C{need}s (L{READ}, L{REGISTER} or
        L{ADMIN}): C{None} if it may, else the L{Refusal}.
        """
        if need == READ and self.openReads:
            return None
        refusal = self._check(request, need)
        if refusal is not None and self.metrics is not None:
            self.metrics.increment(REFUSED, refusal.reason)
        return refusal

    def _check(self, request: Any, need: str) -> Optional[Refusal]:
        if self.tokens is None:
            return _NO_TOKEN_FILE if need != READ else _MISSING
        headers = request.requestHeaders.getRawHeaders(b"authorization")
        if not headers:
            return _MISSING
        if len(headers) != 1:
            return _INVALID
        scheme, _, token = headers[0].strip().partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token:
            return _INVALID
        scope = self.tokens.scope(token)
        if scope is None:
            return _INVALID
        if need == ADMIN and scope != ADMIN:
            return _SCOPE
        return None

    def refuse(self, request: Any, refusal: Refusal) -> bytes:
        """
        Answer C{request} with C{refusal}: the status, C{WWW-Authenticate}
        and the JSON error.
        """
        request.setHeader(b"WWW-Authenticate", refusal.challenge)
        return json_error(request, refusal.code, refusal.error, refusal.detail)

    def guard(self, request: Any) -> Optional[Resource]:
        """
        For L{edgeproxy.control.admin.AdminRoot.guard}: the read rule for
        the pages that do not check for themselves (C{/metrics},
        C{/health}, the status page): C{None} when C{request} may read, else
        a resource answering the refusal.
        """
        refusal = self.check(request, READ)
        if refusal is None:
            return None
        return _Refused(self, refusal)


class _Refused(Resource):
    """
    Answers every request with a L{Refusal}.
    """

    isLeaf = True

    def __init__(self, auth: ApiAuth, refusal: Refusal) -> None:
        Resource.__init__(self)
        self.auth = auth
        self.refusal = refusal

    def render(self, request: Any) -> bytes:
        return self.auth.refuse(request, self.refusal)


class ReadGuarded(Resource):
    """
    A leaf resource served only to requests that may read (the status
    page's JSON inside the C{/api} tree, whose endpoints check access
    themselves).
    """

    isLeaf = True

    def __init__(self, inner: Resource, auth: ApiAuth) -> None:
        Resource.__init__(self)
        self.inner = inner
        self.auth = auth

    def render(self, request: Any) -> Any:
        refusal = self.auth.check(request, READ)
        if refusal is not None:
            return self.auth.refuse(request, refusal)
        return self.inner.render(request)
