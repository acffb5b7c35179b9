"""
The etcd routing table: a table shared between POPs through an etcd
cluster's v3 JSON gateway (SPEC section 10, issue 12).

C{--db etcd://host:2379[,host2:2379...]/prefix} (C{etcds://} for TLS).  Key
layout, one JSON object per key::

    <prefix>/backends/<id>   the fields of a routing table row (see
                             L{edgeproxy.stores.sqlite.validate_row}); "id"
                             may be left out (the key says it) and must
                             match the key when present
    <prefix>/pops/<id>       {"region": "sa", "address": "192.0.2.1"}

A value that is not a JSON object, is larger than L{MAX_VALUE_BYTES} or has
an invalid field is skipped with its key (logged once, counted in
C{routing_rows_skipped}); the rest of the table loads.

Reading (L{EtcdBackendRepository}): the first table is read before the
reactor runs, with the standard library (L{open_etcd}); then
L{EtcdWatchService} keeps it current on the reactor with C{treq}: a watch of
the whole prefix from the next revision, events applied in bursts (one new
snapshot per burst, not per event).  A compacted revision, a cancelled or
broken watch, or a member that stops answering the probe (a paused or
partitioned member: its requests hang, so every request has a timeout)
makes it reconnect to the next member and resync with a full read.
L{EtcdBackendRepository.reload} (the periodic C{--db-reload}) is a full
read too: the safety net.  Every reload rule of the SQLite store holds: the
last good snapshot stays on failure, C{lastError}/C{lastReloadOk},
C{routing_reload} ok/error, the state change logged once.

Writing (L{EtcdBackendWriter}): a registration is written with a lease of
C{--heartbeat-ttl} seconds, a heartbeat keeps the lease alive, a
deregistration revokes it (which deletes the key).  A backend that stops
heartbeating is deleted by etcd itself when its lease runs out, so it
disappears at every POP at once.  A leased value is read with no
C{heartbeat_at} (the lease is its heartbeat): L{HeartbeatExpiry} never
expires it on a POP that does not hear its heartbeats.

Offline cache (L{OfflineCache}): each new table is written (in a thread,
atomically: a temporary file renamed over the old one) to a local SQLite
file in the SQLite store's schema; a POP started while no member answers
starts from it, and says so.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import socket
import sqlite3
import ssl
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple
from urllib.parse import quote, urlsplit

import attrs
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from edgeproxy.interfaces import (
    BackendWriteError,
    DuplicateBackendError,
    IBackendRepository,
    IBackendWriter,
    ILeasedRepository,
    IMetricsStore,
    SnapshotListener,
)
from edgeproxy.model import Backend, RoutingSnapshot
from edgeproxy.stores.open import OPENERS, Store, StoreError
from edgeproxy.stores.pops import IPopRepository, Pop, load_pops, validate_pop
from edgeproxy.stores.sqlite import (
    MANDATORY_COLUMNS,
    OPTIONAL_COLUMNS,
    InvalidRowError,
    RoutingDatabaseError,
    load_backends,
    note_skipped,
    validate_row,
)

__all__ = [
    "DEFAULT_CACHE_NAME",
    "MAX_VALUE_BYTES",
    "EtcdBackendRepository",
    "EtcdBackendWriter",
    "EtcdClient",
    "EtcdError",
    "EtcdPopRepository",
    "EtcdTarget",
    "EtcdWatchService",
    "OfflineCache",
    "decode_table",
    "open_etcd",
    "parse_etcd_url",
]

_log = Logger()

#: The largest value read as a backend or POP; a larger one is skipped.
MAX_VALUE_BYTES = 64 * 1024

#: The offline cache's file name in the store's local directory.
DEFAULT_CACHE_NAME = "edgeproxy-etcd-cache.db"

#: The largest watch message read (a catch-up after a long pause can carry
#: the whole table in one message: 3.6 MB for 10,000 backends).
MAX_WATCH_MESSAGE = 64 * 1024 * 1024

#: Seconds a request (other than a watch) may take before the member is
#: given up on and the next one asked.
REQUEST_TIMEOUT = 2.0

#: Seconds between probes of the watched member (a paused member's watch
#: just goes quiet).
PROBE_INTERVAL = 1.0

#: Seconds events are gathered before a new snapshot is built.
COALESCE_DELAY = 0.02

#: Below this many keys a snapshot after watch events is built on the
#: reactor (a few ms); above, in the thread pool.
INLINE_BUILD = 2000

#: Reconnection backoff bounds, seconds.
BACKOFF_MIN = 0.1
BACKOFF_MAX = 2.0


class EtcdError(Exception):
    """
    An etcd request failed; the message says why (no password in it).

    @ivar unavailable: The member did not answer (connection refused or
        reset, timeout, no leader): another member may.
    @ivar auth: The request was refused for authentication or permission.
    """

    def __init__(self, message: str, unavailable: bool = False, auth: bool = False) -> None:
        super().__init__(message)
        self.unavailable = unavailable
        self.auth = auth


# --- the URL ----------------------------------------------------------------


@attrs.frozen
class EtcdTarget:
    """
    A parsed C{etcd://} value.

    @ivar endpoints: C{http(s)://host:port} of each member, in order.
    @ivar prefix: The key prefix, C{/name} (no trailing slash).
    @ivar tls: C{etcds://}.
    """

    endpoints: Tuple[str, ...]
    prefix: str
    tls: bool

    @property
    def backends(self) -> str:
        """
        The prefix of the backend keys.
        """
        return self.prefix + "/backends/"

    @property
    def pops(self) -> str:
        """
        The prefix of the POP keys.
        """
        return self.prefix + "/pops/"

    @property
    def root(self) -> str:
        """
        The prefix of every key of the table.
        """
        return self.prefix + "/"


def parse_etcd_url(value: str) -> EtcdTarget:
    """
    Parse C{etcd://host:port[,host:port...]/prefix} (C{etcds://} for TLS).
    A member without a port is on 2379; an IPv6 member is in brackets.

    @raise ValueError: With the reason.
    """
    scheme, sep, rest = value.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in ("etcd", "etcds"):
        raise ValueError(f"not an etcd:// URL: {value!r}")
    members, slash, prefix = rest.partition("/")
    if "@" in members:
        raise ValueError("put etcd credentials in --etcd-user/--etcd-password-file, not the URL")
    prefix = "/" + prefix.strip("/")
    if prefix == "/" or not slash:
        raise ValueError("an etcd:// URL needs a key prefix: etcd://host:2379/edgeproxy")
    if any(c in prefix for c in "?#\0"):
        raise ValueError(f"unusable key prefix {prefix!r}")
    endpoints = []
    for member in members.split(","):
        member = member.strip()
        if not member:
            raise ValueError(f"an empty member in {value!r}")
        if member.startswith("["):
            host, close, port = member[1:].partition("]")
            if not close or (port and not port.startswith(":")):
                raise ValueError(f"unusable member {member!r}")
            port = port[1:]
            host = f"[{host}]"
        else:
            host, _, port = member.partition(":")
        port = port or "2379"
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"unusable member {member!r}: use host:port")
        endpoints.append(f"{'https' if scheme == 'etcds' else 'http'}://{host}:{int(port)}")
    return EtcdTarget(endpoints=tuple(endpoints), prefix=prefix, tls=scheme == "etcds")


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def _end(prefix: str) -> str:
    raw = bytearray(prefix.encode("utf-8"))
    raw[-1] += 1
    return raw.decode("utf-8")


# --- decoding values --------------------------------------------------------

#: The flag columns, where a JSON boolean is read as 0/1.
_FLAGS = ("healthy", "deleted", "draining")


@attrs.frozen
class Entry:
    """
    One decoded key: a backend, a POP, or the reason it was skipped.

    @ivar lease: The key's lease id (0: none).
    """

    key: str
    backend: Optional[Backend] = None
    pop: Optional[Pop] = None
    skipped: Optional[str] = None
    lease: int = 0


def _decodeObject(raw: bytes, kind: str) -> Dict[str, object]:
    if len(raw) > MAX_VALUE_BYTES:
        raise InvalidRowError("value", f"{len(raw)} bytes, more than {MAX_VALUE_BYTES}")
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise InvalidRowError("value", f"not JSON ({e})") from None
    if not isinstance(value, dict):
        raise InvalidRowError("value", f"a JSON {type(value).__name__}, not an object")
    return value


def decode_entry(key: str, raw: bytes, lease: int, target: EtcdTarget) -> Optional[Entry]:
    """
    Decode the value C{raw} at C{key}: an L{Entry}, or C{None} for a key
    that is neither a backend nor a POP (ignored).  Never raises.
    """
    for kind, prefix in (("backend", target.backends), ("pop", target.pops)):
        if not key.startswith(prefix):
            continue
        wanted = key[len(prefix) :]
        try:
            if not wanted:
                raise InvalidRowError("id", "the key has no id")
            row = _decodeObject(raw, kind)
            given = row.get("id", wanted)
            if given != wanted:
                raise InvalidRowError("id", f"{str(given)[:40]!r} does not match its key")
            row["id"] = wanted
            if kind == "pop":
                return Entry(key=key, pop=validate_pop(row))
            for flag in _FLAGS:
                if type(row.get(flag)) is bool:
                    row[flag] = int(bool(row[flag]))
            backend = validate_row(row)
            return Entry(key=key, backend=backend, lease=lease)
        except InvalidRowError as e:
            return Entry(key=key, skipped=e.reason, lease=lease)
        except Exception as e:  # validate_pop on odd types: never fail the table
            return Entry(key=key, skipped=f"value: {type(e).__name__}: {e}", lease=lease)
    return None


def _kvEntry(kv: Mapping[str, Any], target: EtcdTarget) -> Optional[Entry]:
    try:
        key = base64.b64decode(kv.get("key", ""), validate=True).decode("utf-8")
        raw = base64.b64decode(kv.get("value", ""), validate=True)
        lease = int(kv.get("lease", 0) or 0)
    except (binascii.Error, UnicodeDecodeError, ValueError, TypeError):
        return None
    return decode_entry(key, raw, lease, target)


@attrs.frozen
class Table:
    """
    The decoded content under the prefix at one revision.
    """

    revision: int
    entries: Mapping[str, Entry]


def decode_table(answer: Mapping[str, Any], target: EtcdTarget) -> Table:
    """
    Decode a C{/v3/kv/range} answer of the whole prefix.

    @raise EtcdError: The answer is not a range answer.
    """
    try:
        revision = int(answer["header"]["revision"])
    except (KeyError, TypeError, ValueError):
        raise EtcdError(f"not a range answer: {str(answer)[:200]}") from None
    entries: Dict[str, Entry] = {}
    for kv in answer.get("kvs") or ():
        entry = _kvEntry(kv, target) if isinstance(kv, dict) else None
        if entry is not None:
            entries[entry.key] = entry
    return Table(revision=revision, entries=entries)


def build_snapshot(
    entries: Mapping[str, Entry],
) -> Tuple[RoutingSnapshot, Tuple[Tuple[str, str], ...], Tuple[Pop, ...], Dict[str, int]]:
    """
    The snapshot, the skipped (key, reason) pairs, the POPs and the lease
    of each leased backend id, from C{entries} (in key order).
    """
    backends: List[Backend] = []
    skipped: List[Tuple[str, str]] = []
    pops: List[Pop] = []
    leases: Dict[str, int] = {}
    for key in sorted(entries):
        entry = entries[key]
        if entry.backend is not None:
            backends.append(entry.backend)
            if entry.lease:
                leases[entry.backend.id] = entry.lease
        elif entry.pop is not None:
            pops.append(entry.pop)
        elif entry.skipped is not None:
            skipped.append((key, entry.skipped))
    return RoutingSnapshot.build(backends), tuple(skipped), tuple(pops), leases


def _decodeAndBuild(body: bytes, target: EtcdTarget) -> Tuple[Table, Any]:
    """
    Off the reactor: JSON decode, validation and indexing of a full read.
    """
    try:
        answer = json.loads(body)
    except ValueError as e:
        raise EtcdError(f"the range answer is not JSON: {e}") from None
    if not isinstance(answer, dict):
        raise EtcdError("the range answer is not a JSON object")
    table = decode_table(answer, target)
    return table, build_snapshot(table.entries)


# --- errors from the gateway ------------------------------------------------

_AUTH_WORDS = ("auth", "permission denied", "user name", "password", "token")


def _gatewayError(status: int, body: bytes, endpoint: str) -> EtcdError:
    try:
        detail = json.loads(body)
        message = str(detail.get("error") or detail.get("message") or detail)
    except (ValueError, AttributeError):
        message = body[:200].decode("utf-8", "replace")
    lower = message.lower()
    auth = status in (401, 403) or any(w in lower for w in _AUTH_WORDS)
    unavailable = not auth and (
        status in (502, 503, 504) or "no leader" in lower or "unavailable" in lower
    )
    hint = ""
    if auth:
        hint = " (check --etcd-user, --etcd-password-file and the user's role)"
    return EtcdError(
        f"etcd member {endpoint} refused the request: {message}{hint}",
        unavailable=unavailable,
        auth=auth,
    )


def _errorKind(failure: Optional[Failure]) -> str:
    """
    The kind of a read failure, for logging each episode once.
    """
    error = failure.value if failure is not None else None
    if isinstance(error, EtcdError):
        return "unavailable" if error.unavailable else "auth" if error.auth else "refused"
    return type(error).__name__


def _tokenExpired(error: EtcdError) -> bool:
    text = str(error).lower()
    return error.auth and ("invalid auth token" in text or ("token" in text and "expired" in text))


# --- TLS and credentials ----------------------------------------------------


@attrs.frozen
class Credentials:
    """
    How to authenticate: a user and password, TLS files.
    """

    user: Optional[str] = None
    password: Optional[str] = attrs.field(default=None, repr=False)
    ca: Optional[str] = None
    cert: Optional[str] = None
    key: Optional[str] = None

    @classmethod
    def fromOptions(cls, options: Mapping[str, Any]) -> "Credentials":
        """
        The credentials the parsed options name (the password read from its file).

        @raise StoreError: A file cannot be read, or options that go together are not.
        """
        password = None
        path = options.get("etcd-password-file")
        if path:
            try:
                with open(path, encoding="utf-8") as f:
                    password = f.read().strip("\r\n")
            except OSError as e:
                raise StoreError(f"cannot read --etcd-password-file {path!r}: {e}") from None
        user = options.get("etcd-user")
        if password is not None and not user:
            raise StoreError("--etcd-password-file needs --etcd-user")
        if user and password is None:
            raise StoreError("--etcd-user needs --etcd-password-file")
        cert, key = options.get("etcd-cert"), options.get("etcd-key")
        if bool(cert) != bool(key):
            raise StoreError("--etcd-cert and --etcd-key go together")
        return cls(
            user=user or None, password=password, ca=options.get("etcd-ca"), cert=cert, key=key
        )

    def sslContext(self) -> ssl.SSLContext:
        """
        For the blocking first read.
        """
        context = ssl.create_default_context(cafile=self.ca)
        if self.cert and self.key:
            context.load_cert_chain(self.cert, self.key)
        return context

    def tlsPolicy(self) -> Any:
        """
        An C{IPolicyForHTTPS} for treq's agent: the CA (or the system's
        roots), the client certificate.
        """
        from twisted.internet import ssl as tssl
        from twisted.web.client import BrowserLikePolicyForHTTPS
        from twisted.web.iweb import IPolicyForHTTPS

        trust: Any = None
        if self.ca:
            with open(self.ca, "rb") as f:
                bundle = f.read()
            # Every certificate of the bundle, as ssl.create_default_context
            # (the startup read) trusts them all.
            blocks = re.findall(
                rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", bundle, re.S
            )
            if not blocks:
                raise ValueError(f"{self.ca}: no PEM certificate in it")
            trust = tssl.trustRootFromCertificates(
                [tssl.Certificate.loadPEM(block) for block in blocks]
            )
        client: Any = None
        if self.cert and self.key:
            with open(self.cert, "rb") as f:
                cert_pem = f.read()
            with open(self.key, "rb") as f:
                key_pem = f.read()
            client = tssl.PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem)
        if trust is None and client is None:
            return BrowserLikePolicyForHTTPS()

        @implementer(IPolicyForHTTPS)
        class Policy:
            def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
                return tssl.optionsForClientTLS(
                    hostname.decode("ascii"),
                    trustRoot=trust if trust is not None else tssl.platformTrust(),
                    clientCertificate=client,
                )

        return Policy()


# --- the blocking client (before the reactor runs) --------------------------


def _blockingPost(
    endpoint: str,
    path: str,
    body: Mapping[str, Any],
    token: Optional[str],
    context: Optional[ssl.SSLContext],
    timeout: float,
) -> Any:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = token
    request = urllib.request.Request(
        endpoint + path, data=json.dumps(body).encode("utf-8"), headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return response.read()
    except urllib.error.HTTPError as e:
        raise _gatewayError(e.code, e.read(), endpoint) from None
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        if isinstance(e, ssl.SSLError) or isinstance(reason, ssl.SSLError):
            # Not a member that is away: the TLS set-up is wrong.
            raise EtcdError(
                f"TLS with etcd member {endpoint} failed: {reason} (check --etcd-ca,"
                " --etcd-cert and --etcd-key)"
            ) from None
        refusal = (
            _tlsRefusal(endpoint, context, timeout)
            if context is not None and isinstance(reason, (BrokenPipeError, ConnectionResetError))
            else None
        )
        if refusal is not None:
            raise EtcdError(
                f"TLS with etcd member {endpoint} failed: {refusal} (check --etcd-ca,"
                " --etcd-cert and --etcd-key)"
            ) from None
        raise EtcdError(
            f"etcd member {endpoint} does not answer: {reason}", unavailable=True
        ) from None


def _tlsRefusal(endpoint: str, context: ssl.SSLContext, timeout: float) -> Optional[str]:
    """
    Why the member at C{endpoint} refuses this client's TLS, if it does.

    With TLS 1.3 a member that requires a client certificate (and gets none,
    or one it does not trust) says so with an alert after the handshake,
    while the request is already on its way: the request then fails with
    the alert, or with a broken pipe or a reset, by a race (PyPy 7.3.11's
    ssl reports the broken pipe about half the time; CPython's an
    SSLEOFError).  That is a set-up error, not a member that is away, so
    after such a failure a fresh handshake waits (at most a second) for the
    alert.  Blocking.

    @return: The alert, or C{None} if none came (the member took the
        handshake and sent nothing, closed, or could not be reached).
    """
    parts = urlsplit(endpoint)
    host, port = parts.hostname, parts.port
    if host is None or port is None:
        return None
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with context.wrap_socket(raw, server_hostname=host) as tls:
                tls.settimeout(min(timeout, 1.0))
                tls.recv(1)
    except ssl.SSLError as e:
        return str(e)
    except OSError:
        pass
    return None


def blocking_read(
    target: EtcdTarget, credentials: Credentials, timeout: float = REQUEST_TIMEOUT
) -> Tuple[int, bytes, Optional[str]]:
    """
    Read the whole prefix from the first member that answers.  Blocking.

    @return: (the member's index, the range answer's body, the auth token).
    @raise EtcdError: No member answered (C{unavailable}) or the request
        was refused (C{auth}...).
    """
    context = credentials.sslContext() if target.tls else None
    errors = []
    for index, endpoint in enumerate(target.endpoints):
        try:
            token = None
            if credentials.user:
                raw = _blockingPost(
                    endpoint,
                    "/v3/auth/authenticate",
                    {"name": credentials.user, "password": credentials.password},
                    None,
                    context,
                    timeout,
                )
                try:
                    token = str(json.loads(raw)["token"])
                except (ValueError, KeyError, TypeError):
                    # A proxy or another service on that port, not etcd.
                    raise EtcdError(
                        f"{endpoint}: the authentication answer is not etcd's ({raw[:80]!r})",
                        unavailable=True,
                    ) from None
            body = _blockingPost(
                endpoint,
                "/v3/kv/range",
                {"key": _b64(target.root), "range_end": _b64(_end(target.root))},
                token,
                context,
                timeout,
            )
            return index, body, token
        except EtcdError as e:
            if not e.unavailable:
                raise
            errors.append(str(e))
    raise EtcdError("no etcd member answers: " + "; ".join(errors), unavailable=True)


# --- the client on the reactor ----------------------------------------------


@attrs.define(eq=False)
class EtcdClient:
    """
    Requests to the cluster's JSON gateway with C{treq}, on the reactor.

    Each request goes to the current member; a member that does not answer
    within C{timeout} (or refuses the connection, or has no leader) is left
    for the next one, and the request is tried there, once around the
    cluster.  An expired auth token is renewed and the request tried again.

    @ivar index: The current member.
    """

    reactor: Any
    target: EtcdTarget
    credentials: Credentials = attrs.field(factory=Credentials)
    timeout: float = REQUEST_TIMEOUT
    index: int = 0
    token: Optional[str] = attrs.field(default=None, repr=False)
    _http: Any = attrs.field(init=False, default=None, repr=False)
    _stream: Any = attrs.field(init=False, default=None, repr=False)
    _failed: set[str] = attrs.field(init=False, factory=set, repr=False)

    def _clients(self) -> Tuple[Any, Any]:
        if self._http is None:
            from treq.client import HTTPClient
            from twisted.web.client import Agent, HTTPConnectionPool

            policy = self.credentials.tlsPolicy() if self.target.tls else None

            class Pool(HTTPConnectionPool):
                """
                A pool that, once closed, closes every connection handed
                back to it (a request in flight during L{close} would
                otherwise park its connection for four minutes).
                """

                closed = False

                def _putConnection(self, key: Any, connection: Any) -> None:
                    if self.closed:
                        connection.transport.loseConnection()
                        return
                    super()._putConnection(key, connection)

            def agent(persistent: bool) -> Any:
                pool = Pool(self.reactor, persistent=persistent)
                pool.maxPersistentPerHost = 4
                pool.retryAutomatically = False
                kwargs: Dict[str, Any] = {"pool": pool, "connectTimeout": self.timeout}
                if policy is not None:
                    kwargs["contextFactory"] = policy
                return HTTPClient(Agent(self.reactor, **kwargs))

            self._http = agent(True)
            self._stream = agent(False)
        return self._http, self._stream

    def close(self) -> "Deferred[object]":
        """
        Close the idle persistent connections.
        """
        if self._http is None:
            return succeed(None)
        pool = self._http._agent._pool
        pool.closed = True
        return pool.closeCachedConnections()  # type: ignore[no-any-return]

    @property
    def endpoint(self) -> str:
        """
        The current member's URL.
        """
        return self.target.endpoints[self.index % len(self.target.endpoints)]

    def rotate(self, reason: str, failed: Optional[str] = None) -> None:
        """
        Leave the current member for the next one; when C{failed} (the
        member that failed) is given and another request already left it,
        stay on the member in use.
        """
        old = self.endpoint if failed is None else failed
        if old == self.endpoint:
            self.index = (self.index + 1) % len(self.target.endpoints)
        if len(self.target.endpoints) > 1 and old not in self._failed:
            # Once per member until it answers again (an outage of the
            # whole cluster is one warning per member, not one per retry).
            self._failed.add(old)
            _log.warn(
                "etcd member {old} failed ({reason}); trying {new}",
                old=old,
                reason=reason,
                new=self.endpoint,
            )

    def _answered(self, endpoint: str) -> None:
        if endpoint in self._failed:
            self._failed.discard(endpoint)
            _log.info("etcd member {endpoint} answers again", endpoint=endpoint)

    def _headers(self) -> Dict[str, List[str]]:
        headers = {"Content-Type": ["application/json"]}
        if self.token:
            headers["Authorization"] = [self.token]
        return headers

    def _once(
        self, endpoint: str, path: str, body: Mapping[str, Any], raw: bool
    ) -> "Deferred[Any]":
        http, _ = self._clients()
        d: Deferred[Any] = http.post(
            endpoint + path,
            data=json.dumps(body).encode("utf-8"),
            headers=self._headers(),
            timeout=self.timeout,
            unbuffered=True,
        )

        def answered(response: Any) -> "Deferred[Any]":
            # The body too within the timeout: a member paused mid-answer.
            content = _readBody(response)
            timer = self.reactor.callLater(self.timeout, content.cancel)

            def done(result: object) -> object:
                if timer.active():
                    timer.cancel()
                return result

            content.addBoth(done)

            def got(data: bytes) -> Any:
                self._answered(endpoint)
                if response.code != 200:
                    raise _gatewayError(response.code, data, endpoint)
                if raw:
                    return data
                try:
                    return json.loads(data)
                except ValueError as e:
                    raise EtcdError(f"etcd member {endpoint} sent no JSON: {e}") from None

            return content.addCallback(got)

        def failed(failure: Failure) -> Failure:
            if failure.check(EtcdError):
                return failure
            error = failure.value
            if failure.check(CancelledError):
                reason = f"no answer within {self.timeout:g} s"
            else:
                reason = f"{type(error).__name__}: {error}"
            raise EtcdError(f"etcd member {endpoint} does not answer: {reason}", unavailable=True)

        return d.addCallback(answered).addErrback(failed)

    def authenticate(self, endpoint: str) -> "Deferred[None]":
        """
        Get a new auth token from C{endpoint} (with the user and password).
        """
        saved, self.token = self.token, None
        d = self._once(
            endpoint,
            "/v3/auth/authenticate",
            {"name": self.credentials.user, "password": self.credentials.password},
            False,
        )

        def got(answer: Any) -> None:
            self.token = str(answer["token"])

        def failed(failure: Failure) -> Failure:
            self.token = saved
            return failure

        return d.addCallbacks(got, failed)

    def post(self, path: str, body: Mapping[str, Any], raw: bool = False) -> "Deferred[Any]":
        """
        POST C{body} to C{path} (C{/v3/...}); the decoded answer (the body
        bytes when C{raw}).  Fails with L{EtcdError}.
        """
        result: Deferred[Any] = Deferred()
        tries = [0]
        renewed = [False]
        used = [self.endpoint]

        def attempt() -> None:
            endpoint = used[0] = self.endpoint
            if self.credentials.user and self.token is None:
                d = self.authenticate(endpoint).addCallback(
                    lambda _: self._once(endpoint, path, body, raw)
                )
            else:
                d = self._once(endpoint, path, body, raw)
            d.addCallbacks(result.callback, failed)

        def failed(failure: Failure) -> None:
            error = failure.value
            if isinstance(error, EtcdError) and _tokenExpired(error) and not renewed[0]:
                renewed[0] = True
                self.token = None
                attempt()
                return
            if isinstance(error, EtcdError) and error.unavailable:
                tries[0] += 1
                self.rotate(str(error), used[0])
                # Once around the cluster, plus one: a single member gets a
                # second try (a connection lost mid-answer, say).
                if tries[0] <= len(self.target.endpoints):
                    attempt()
                    return
            result.errback(failure)

        attempt()
        return result

    def watch(self, body: Mapping[str, Any], protocol: "WatchProtocol") -> "Deferred[Any]":
        """
        Open a watch on the current member and deliver its stream to
        C{protocol}; fires with the response once the headers arrived.
        """
        _, stream = self._clients()
        endpoint = self.endpoint
        d: Deferred[Any] = stream.post(
            endpoint + "/v3/watch",
            data=json.dumps(body).encode("utf-8"),
            headers=self._headers(),
            timeout=self.timeout,
            unbuffered=True,
        )

        def answered(response: Any) -> Any:
            if response.code != 200:
                return _readBody(response).addCallback(
                    lambda data: fail(_gatewayError(response.code, data, endpoint))
                )
            response.deliverBody(protocol)
            return response

        def failed(failure: Failure) -> Failure:
            if failure.check(EtcdError):
                return failure
            reason = (
                f"no answer within {self.timeout:g} s"
                if failure.check(CancelledError)
                else str(failure.value)
            )
            raise EtcdError(f"etcd member {endpoint} does not answer: {reason}", unavailable=True)

        return d.addCallback(answered).addErrback(failed)


class _BodyReader(Protocol):
    """
    Collects a response body.  An error answer's body counts even when the
    connection ends oddly after it: etcd's gateway sends HTTP trailers after
    an error answer, which Twisted before 24.3 cannot parse.
    """

    def __init__(self, code: int, done: "Deferred[bytes]") -> None:
        self._code = code
        self._done = done
        self._chunks: List[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._done.called:
            return
        from twisted.web.client import ResponseDone

        if reason.check(ResponseDone) or (self._code != 200 and self._chunks):
            self._done.callback(b"".join(self._chunks))
        else:
            self._done.errback(reason)


def _readBody(response: Any) -> "Deferred[bytes]":
    """
    The body of C{response}; cancelling stops reading (the connection is
    closed).
    """
    readers: List[_BodyReader] = []

    def cancel(d: "Deferred[bytes]") -> None:
        transport: Any = readers[0].transport if readers else None
        if transport is not None:
            transport.stopProducing()
        if not d.called:
            d.errback(CancelledError())

    done: Deferred[bytes] = Deferred(cancel)
    reader = _BodyReader(response.code, done)
    readers.append(reader)
    response.deliverBody(reader)
    return done


class WatchProtocol(Protocol):
    """
    Reads a watch's stream: newline-delimited JSON objects (what etcd's
    gateway writes), each handed to C{onMessage}; C{onEnd(reason)} when the
    stream ends.  Each byte is looked at a bounded number of times, however
    a large message is cut into chunks (no decoding of a partial message);
    a message larger than L{MAX_WATCH_MESSAGE} or a line that is not JSON
    ends the stream.
    """

    def __init__(self, onMessage: Callable[[Any], None], onEnd: Callable[[str], None]) -> None:
        self._onMessage = onMessage
        self._onEnd = onEnd
        self._buffer = bytearray()
        self._ended = False

    def dataReceived(self, data: bytes) -> None:
        if self._ended:
            return
        last = data.rfind(b"\n")
        if last < 0:
            self._buffer += data
            if len(self._buffer) > MAX_WATCH_MESSAGE:
                self.abort(f"a watch message larger than {MAX_WATCH_MESSAGE} bytes")
            return
        complete = bytes(self._buffer) + data[: last + 1]
        self._buffer = bytearray(data[last + 1 :])
        for line in complete.split(b"\n"):
            if not line.strip():
                continue
            if len(line) > MAX_WATCH_MESSAGE:
                self.abort(f"a watch message larger than {MAX_WATCH_MESSAGE} bytes")
                return
            try:
                message = json.loads(line)
            except ValueError as e:
                self.abort(f"a watch message that is not JSON ({e})")
                return
            self._onMessage(message)
            if self._ended:
                return

    def abort(self, reason: str) -> None:
        """
        Stop reading (the connection closes).
        """
        transport: Any = self.transport
        if transport is not None:
            transport.stopProducing()
        self._end(reason)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._end(f"the watch stream ended: {reason.getErrorMessage()}")

    def _end(self, reason: str) -> None:
        if not self._ended:
            self._ended = True
            self._onEnd(reason)


# --- the offline cache ------------------------------------------------------

_CACHE_COLUMNS = MANDATORY_COLUMNS + OPTIONAL_COLUMNS + ("lease",)


def _backendRow(b: Backend, leases: Mapping[str, int]) -> Tuple[object, ...]:
    values = {
        "lease": leases.get(b.id, 0),
        "id": b.id,
        "app": b.app,
        "region": b.region,
        "wg_ip": b.host,
        "port": b.port,
        "healthy": int(b.healthy),
        "weight": b.weight,
        "soft_limit": b.soft_limit,
        "hard_limit": b.hard_limit,
        "deleted": int(b.deleted),
        "country": b.country,
        "proxy_protocol": b.proxy_protocol,
        "draining": int(b.draining),
        "health_check": b.health_check,
        "heartbeat_at": b.heartbeat_at,
        "sni": ",".join(b.sni) or None,
    }
    return tuple(values[c] for c in _CACHE_COLUMNS)


def write_cache(
    path: str,
    snapshot: RoutingSnapshot,
    pops: Sequence[Pop],
    leases: Mapping[str, int],
    source: str,
    revision: int,
) -> None:
    """
    Write the table to the SQLite file C{path} atomically (a temporary file
    in the same directory, renamed over it).  Blocking.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(prefix=".edgeproxy-cache-", dir=directory)
    os.close(fd)
    try:
        conn = sqlite3.connect(temporary)
        try:
            columns = ", ".join(_CACHE_COLUMNS)
            conn.execute(f"CREATE TABLE backends ({columns})")
            conn.execute("CREATE TABLE pops (id, region, address)")
            conn.execute("CREATE TABLE cache_info (source, revision, written_at)")
            marks = ", ".join("?" for _ in _CACHE_COLUMNS)
            conn.executemany(
                f"INSERT INTO backends ({columns}) VALUES ({marks})",
                [_backendRow(b, leases) for b in snapshot.backends],
            )
            conn.executemany(
                "INSERT INTO pops VALUES (?, ?, ?)", [(p.id, p.region, p.address) for p in pops]
            )
            conn.execute("INSERT INTO cache_info VALUES (?, ?, ?)", (source, revision, time.time()))
            conn.commit()
        finally:
            conn.close()
        with open(temporary, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise


def read_cache(
    path: str,
) -> Tuple[RoutingSnapshot, Tuple[Tuple[str, str], ...], Tuple[Pop, ...], Dict[str, int], float]:
    """
    The table in the cache file: (snapshot, skipped rows, POPs, the lease
    of each leased backend, when it was written).  Blocking.

    @raise RoutingDatabaseError: No usable cache.
    """
    if not os.path.isfile(path):
        raise RoutingDatabaseError(f"there is no offline cache at {path}")
    backends, skipped = load_backends(path, 1.0)
    pops, _ = load_pops(path)
    written = 0.0
    leases: Dict[str, int] = {}
    try:
        conn = sqlite3.connect(f"file:{quote(path, safe='/')}?mode=ro", uri=True)
        try:
            row = conn.execute("SELECT written_at FROM cache_info").fetchone()
            written = float(row[0]) if row else 0.0
            for backend_id, lease in conn.execute("SELECT id, lease FROM backends"):
                if type(backend_id) is str and type(lease) is int and lease:
                    leases[backend_id] = lease
        finally:
            conn.close()
    except (sqlite3.Error, TypeError, ValueError):
        pass
    return RoutingSnapshot.build(backends), tuple(skipped), tuple(pops), leases, written


@attrs.define(eq=False)
class OfflineCache:
    """
    Writes the last good table to C{path} in the reactor's thread pool, one
    write at a time; changes that arrive while a write runs are written by
    one more write after it.
    """

    path: str
    reactor: Any
    source: str
    _writing: Optional["Deferred[None]"] = attrs.field(init=False, default=None)
    _next: Optional[Tuple[RoutingSnapshot, Tuple[Pop, ...], Dict[str, int], int]] = attrs.field(
        init=False, default=None, repr=False
    )
    _failing: bool = attrs.field(init=False, default=False)

    def save(
        self,
        snapshot: RoutingSnapshot,
        pops: Tuple[Pop, ...],
        leases: Dict[str, int],
        revision: int,
    ) -> None:
        """
        Write this table to the cache (after the write in progress, if any).
        """
        self._next = (snapshot, pops, leases, revision)
        if self._writing is None:
            self._write()

    def _write(self) -> None:
        if self._next is None:
            self._writing = None
            return
        snapshot, pops, leases, revision = self._next
        self._next = None
        d: Deferred[None] = deferToThreadPool(
            self.reactor,
            self.reactor.getThreadPool(),
            write_cache,
            self.path,
            snapshot,
            pops,
            leases,
            self.source,
            revision,
        )
        self._writing = d

        def ok(_: object) -> None:
            if self._failing:
                self._failing = False
                _log.info("Offline cache {path} written again", path=self.path)

        def failed(failure: Failure) -> None:
            if not self._failing:
                self._failing = True
                _log.error(
                    "Cannot write the offline cache {path}: {error}",
                    path=self.path,
                    error=failure.getErrorMessage(),
                )

        d.addCallbacks(ok, failed)
        d.addBoth(lambda _: self._write())

    def flushed(self) -> "Deferred[None]":
        """
        Fires once no write is running or queued.
        """
        if self._writing is None:
            return succeed(None)
        d: Deferred[None] = Deferred()

        def check(_: object = None) -> None:
            if self._writing is None:
                d.callback(None)
            else:
                self.reactor.callLater(0.01, check)

        self.reactor.callLater(0.01, check)
        return d


# --- the repository ---------------------------------------------------------


@implementer(IBackendRepository, ILeasedRepository)
@attrs.define(eq=False)
class EtcdBackendRepository:
    """
    The routing table from etcd (see the module docstring).

    @ivar client: The gateway client (on the reactor).
    @ivar cache: The offline cache, or C{None}.
    @ivar revision: The etcd revision the table in force reflects.
    @ivar lastError: Why the last read (or the watch) failed, or C{None}.
    @ivar lastReloadOk: When the last read succeeded (reactor seconds).
    @ivar skipped: The (key, reason) pairs of the values skipped.
    @ivar leases: The lease of each leased backend id.
    @ivar fromCache: The table in force came from the offline cache (no
        member has answered since the start).
    """

    client: EtcdClient
    metrics: Optional[IMetricsStore] = None
    cache: Optional[OfflineCache] = None
    coalesce: float = COALESCE_DELAY
    revision: int = attrs.field(init=False, default=0)
    lastError: Optional[str] = attrs.field(init=False, default=None)
    lastReloadOk: Optional[float] = attrs.field(init=False, default=None)
    skipped: Tuple[Tuple[str, str], ...] = attrs.field(init=False, default=(), repr=False)
    leases: Dict[str, int] = attrs.field(init=False, factory=dict, repr=False)
    pops: Tuple[Pop, ...] = attrs.field(init=False, default=(), repr=False)
    fromCache: bool = attrs.field(init=False, default=False)
    _errorKind: str = attrs.field(init=False, default="", repr=False)
    _readRevision: int = attrs.field(init=False, default=0, repr=False)
    _installedRevision: int = attrs.field(init=False, default=0, repr=False)
    _building: bool = attrs.field(init=False, default=False, repr=False)
    _dirty: bool = attrs.field(init=False, default=False, repr=False)
    snapshots: int = attrs.field(init=False, default=0)
    _entries: Dict[str, Entry] = attrs.field(init=False, factory=dict, repr=False)
    _snapshot: RoutingSnapshot = attrs.field(init=False, factory=RoutingSnapshot.empty, repr=False)
    _listeners: List[SnapshotListener] = attrs.field(init=False, factory=list, repr=False)
    _installCall: Any = attrs.field(init=False, default=None, repr=False)
    _reading: bool = attrs.field(init=False, default=False)
    _readers: List["Deferred[RoutingSnapshot]"] = attrs.field(init=False, factory=list, repr=False)
    _waiters: List[Tuple[int, "Deferred[bool]"]] = attrs.field(init=False, factory=list, repr=False)

    @property
    def reactor(self) -> Any:
        """
        The reactor (the client's).
        """
        return self.client.reactor

    @property
    def target(self) -> EtcdTarget:
        """
        The cluster and prefix (the client's).
        """
        return self.client.target

    # IBackendRepository

    def current(self) -> RoutingSnapshot:
        """
        The snapshot in force.
        """
        return self._snapshot

    def addListener(self, listener: SnapshotListener) -> None:
        """
        Call C{listener(old, new)} after every new snapshot that changes content.
        """
        self._listeners.append(listener)

    # ILeasedRepository

    def leased(self, backend_id: str) -> bool:
        """
        See L{ILeasedRepository.leased}.
        """
        return backend_id in self.leases

    def reload(self) -> "Deferred[RoutingSnapshot]":
        """
        A full read of the prefix (range read on the reactor; JSON decoding,
        validation and indexing in the thread pool).  Reads asked for while
        one runs share it.  Never fails: fires with the snapshot in force.
        """
        result: Deferred[RoutingSnapshot] = Deferred()
        self._readers.append(result)
        if self._reading:
            return result
        self._reading = True
        d: Deferred[Any] = self.client.post(
            "/v3/kv/range",
            {"key": _b64(self.target.root), "range_end": _b64(_end(self.target.root))},
            raw=True,
        )
        d.addCallback(
            lambda body: deferToThreadPool(
                self.reactor, self.reactor.getThreadPool(), _decodeAndBuild, body, self.target
            )
        )
        d.addCallbacks(self._readSucceeded, self._failed)
        d.addErrback(self._bug)

        def finished(_: object) -> None:
            self._reading = False
            readers, self._readers = self._readers, []
            for reader in readers:
                reader.callback(self._snapshot)

        d.addBoth(finished)
        return result

    # loading

    def loadFromBody(self, body: bytes) -> RoutingSnapshot:
        """
        Install a full read's answer (blocking work: before the reactor).
        """
        return self._readSucceeded(_decodeAndBuild(body, self.target))

    def loadFromCache(self, path: str, reason: str) -> RoutingSnapshot:
        """
        Install the offline cache's table (before the reactor), noting
        C{reason} (why etcd was not read) as the last error.
        """
        snapshot, skipped, pops, leases, written = read_cache(path)
        self.leases = leases
        self.fromCache = True
        self.lastError = reason
        self._errorKind = "unavailable"
        self._count("routing_reload", "error")
        self.pops = pops
        self.skipped = skipped
        self._snapshot = snapshot
        age = time.time() - written if written else None
        _log.warn(
            "etcd is unreachable ({reason}): starting from the offline cache {path}"
            " ({count} backends, written {age} ago); the table follows etcd again once a"
            " member answers",
            reason=reason,
            path=path,
            count=len(snapshot),
            age="?" if age is None else f"{age:.0f} s",
        )
        return snapshot

    def _readSucceeded(self, result: Tuple[Table, Any]) -> RoutingSnapshot:
        table, built = result
        if table.revision < self.revision:
            # An older member's answer (it lags behind): keep the newer table.
            self._ok()
            return self._snapshot
        self._entries = dict(table.entries)
        self.revision = self._readRevision = table.revision
        self._cancelInstall()
        self._install(built, table.revision)
        self._ok()
        return self._snapshot

    def _ok(self) -> None:
        self.lastReloadOk = float(self.reactor.seconds())
        if self.lastError is not None:
            _log.info(
                "Routing table read from etcd again: {count} backends at revision {revision}",
                count=len(self._snapshot),
                revision=self.revision,
            )
            self.lastError = None
        self.fromCache = False
        self._count("routing_reload", "ok")

    def _failed(self, failure: Failure) -> None:
        self.noteFailure(failure.getErrorMessage() if failure.check(EtcdError) else None, failure)

    def noteFailure(self, message: Optional[str], failure: Optional[Failure] = None) -> None:
        """
        A read or the watch failed: keep the last good table; log the
        change of state once.
        """
        if message is None and failure is not None:
            message = f"{type(failure.value).__name__}: {failure.value}"
        assert message is not None
        kind = _errorKind(failure)
        if self.lastError is None or kind != self._errorKind:
            # Once per episode (and when the kind of failure changes): the
            # message names whichever member failed last, so it changes at
            # every retry while etcd is away.
            _log.error(
                "Routing table read from etcd failed, keeping the last good table"
                " ({count} backends): {error}",
                count=len(self._snapshot),
                error=message,
            )
        self.lastError = message
        self._errorKind = kind
        self._count("routing_reload", "error")

    def _bug(self, failure: Failure) -> None:
        _log.failure("Unexpected error after an etcd read", failure)

    # the watch

    def applyEvents(self, events: Sequence[Mapping[str, Any]], revision: int = 0) -> None:
        """
        Apply watch events (PUT and DELETE of keys under the prefix); the
        table then reflects their latest C{mod_revision} (or C{revision}).
        A new snapshot follows after C{coalesce} seconds, for all the events
        of a burst together.
        """
        for event in events:
            kv = event.get("kv") or {}
            try:
                modified = int(kv.get("mod_revision", 0))
            except (TypeError, ValueError):
                modified = 0
            if modified and modified <= self._readRevision:
                # Already in the full read that replaced the table (a watch
                # opened before it can still deliver older events).
                continue
            revision = max(revision, modified)
            try:
                key = base64.b64decode(kv.get("key", ""), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError, ValueError, TypeError):
                continue
            if event.get("type") == "DELETE":
                self._entries.pop(key, None)
                continue
            entry = _kvEntry(kv, self.target)
            if entry is not None:
                self._entries[key] = entry
        if revision > self.revision:
            self.revision = revision
        if events and self._installCall is None:
            self._installCall = self.reactor.callLater(self.coalesce, self._installEntries)

    def _cancelInstall(self) -> None:
        if self._installCall is not None and self._installCall.active():
            self._installCall.cancel()
        self._installCall = None

    def _installEntries(self) -> None:
        """
        Build and install a snapshot of the entries: on the reactor for a
        small table, in the thread pool for a large one (one build at a
        time; events that arrive meanwhile make one more build after it).
        """
        self._installCall = None
        if self._building:
            self._dirty = True
            return
        revision = self.revision
        if len(self._entries) < INLINE_BUILD:
            try:
                self._install(build_snapshot(self._entries), revision)
            except Exception:
                _log.failure("Cannot apply etcd watch events")
            return
        self._building = True
        reactor = self.reactor
        d: Deferred[Any] = deferToThreadPool(
            reactor, reactor.getThreadPool(), build_snapshot, dict(self._entries)
        )

        def built(result: Any) -> None:
            if revision >= self._installedRevision:
                # (Else a full read installed a newer table meanwhile.)
                self._install(result, revision)

        def finished(_: object) -> None:
            self._building = False
            if self._dirty:
                self._dirty = False
                self._installEntries()

        d.addCallback(built)
        d.addErrback(lambda f: _log.failure("Cannot apply etcd watch events", f))
        d.addBoth(finished)

    def _install(self, built: Any, revision: int) -> None:
        self._installedRevision = revision
        new, skipped, pops, leases = built
        note_skipped(self.skipped, skipped, self.metrics)
        self.skipped = skipped
        self.leases = leases
        self.pops = pops
        old = self._snapshot
        self._snapshot = new
        self.snapshots += 1
        if not old.same_content(new):
            for listener in list(self._listeners):
                try:
                    listener(old, new)
                except Exception:
                    _log.failure("Routing table listener {listener!r} failed", listener=listener)
        if self.cache is not None:
            self.cache.save(new, pops, leases, revision)
        self._wake()

    def waitFor(self, revision: int, timeout: float) -> "Deferred[bool]":
        """
        Fires with C{True} once the table in force reflects C{revision}, or
        C{False} after C{timeout} seconds.
        """
        if self._installedRevision >= revision:
            return succeed(True)
        d: Deferred[bool] = Deferred()
        entry = (revision, d)
        self._waiters.append(entry)

        def late() -> None:
            if entry in self._waiters:
                self._waiters.remove(entry)
                d.callback(False)

        timer = self.reactor.callLater(timeout, late)
        d.addBoth(lambda r: (timer.cancel() if timer.active() else None, r)[1])
        return d

    def _wake(self) -> None:
        ready = [w for w in self._waiters if w[0] <= self._installedRevision]
        for w in ready:
            self._waiters.remove(w)
            w[1].callback(True)

    def _count(self, name: str, label: str) -> None:
        if self.metrics is not None:
            self.metrics.increment(name, label)


@implementer(IPopRepository)
@attrs.define(eq=False)
class EtcdPopRepository:
    """
    The POPs under C{<prefix>/pops/}, read with the backends (one read and
    one watch for both): C{reload} returns the POPs in force.
    """

    repository: EtcdBackendRepository

    def current(self) -> Tuple[Pop, ...]:
        """
        The POPs in force.
        """
        return self.repository.pops

    def reload(self) -> "Deferred[Tuple[Pop, ...]]":
        """
        The POPs in force: the routing table's reload (and its watch) read
        them too.
        """
        return succeed(self.repository.pops)


# --- the watch --------------------------------------------------------------


@attrs.define(eq=False)
class EtcdWatchService(Service):
    """
    Keeps L{EtcdBackendRepository} current: a full read, then a watch of
    the prefix from the next revision on the current member, probed every
    C{probe} seconds; any failure leaves the member for the next one, and
    the cycle starts again (with backoff while no member answers).
    """

    repository: EtcdBackendRepository
    probe: float = PROBE_INTERVAL
    _protocol: Optional[WatchProtocol] = attrs.field(init=False, default=None)
    _probeCall: Any = attrs.field(init=False, default=None)
    _retryCall: Any = attrs.field(init=False, default=None)
    _backoff: float = attrs.field(init=False, default=BACKOFF_MIN)
    _generation: int = attrs.field(init=False, default=0)
    watching: bool = attrs.field(init=False, default=False)
    _endpoint: Optional[str] = attrs.field(init=False, default=None)

    @property
    def client(self) -> EtcdClient:
        """
        The gateway client (the repository's).
        """
        return self.repository.client

    @property
    def reactor(self) -> Any:
        """
        The reactor (the client's).
        """
        return self.client.reactor

    def startService(self) -> None:
        """
        Watch from the revision read at startup (or read first, after a cache start).
        """
        Service.startService(self)
        if self.repository.revision and not self.repository.fromCache:
            # The first table was read before the reactor ran: watch on.
            self._watch(self.repository.revision + 1, self._generation)
        else:
            self._cycle()

    def stopService(self) -> "Deferred[object]":
        """
        Stop the watch and the probe; fires once the offline cache is written.
        """
        Service.stopService(self)
        self._generation += 1
        self._stopWatch("stopping")
        for call in (self._probeCall, self._retryCall):
            if call is not None and call.active():
                call.cancel()
        d = self.client.close()
        if self.repository.cache is not None:
            cache = self.repository.cache
            d.addBoth(lambda _: cache.flushed())
        return d

    def _cycle(self) -> None:
        """
        Full read, then watch from the next revision.
        """
        self._retryCall = None
        if not self.running:
            return
        generation = self._generation
        d: Deferred[Any] = self.client.post(
            "/v3/kv/range",
            {
                "key": _b64(self.repository.target.root),
                "range_end": _b64(_end(self.repository.target.root)),
            },
            raw=True,
        )
        repository = self.repository
        d.addCallback(
            lambda body: deferToThreadPool(
                self.reactor, self.reactor.getThreadPool(), _decodeAndBuild, body, repository.target
            )
        )

        def read(result: Tuple[Table, Any]) -> None:
            if generation != self._generation or not self.running:
                return
            table = result[0]
            repository._readSucceeded(result)
            self._watch(table.revision + 1, generation)

        def failed(failure: Failure) -> None:
            if generation != self._generation or not self.running:
                return
            repository._failed(failure)
            self._retry()

        d.addCallbacks(read, failed)
        d.addErrback(repository._bug)

    def _retry(self) -> None:
        if not self.running or (self._retryCall is not None and self._retryCall.active()):
            return
        delay, self._backoff = self._backoff, min(BACKOFF_MAX, self._backoff * 2)
        self._retryCall = self.reactor.callLater(delay, self._cycle)

    def _watch(self, start: int, generation: int) -> None:
        target = self.repository.target
        body = {
            "create_request": {
                "key": _b64(target.root),
                "range_end": _b64(_end(target.root)),
                "start_revision": str(start),
            }
        }

        def message(msg: Any) -> None:
            self._message(msg, generation)

        def ended(reason: str) -> None:
            self._broken(reason, generation)

        protocol = WatchProtocol(message, ended)
        self._protocol = protocol
        self._endpoint = self.client.endpoint
        d = self.client.watch(body, protocol)

        def opened(_: object) -> None:
            if generation != self._generation:
                protocol.abort("superseded")
                return
            self.watching = True
            self._backoff = BACKOFF_MIN
            self._probeCall = self.reactor.callLater(self.probe, self._probe, generation)

        def failed(failure: Failure) -> None:
            self._broken(failure.getErrorMessage(), generation)

        d.addCallbacks(opened, failed)

    def _message(self, msg: Any, generation: int) -> None:
        if generation != self._generation:
            return
        result = msg.get("result") if isinstance(msg, dict) else None
        if not isinstance(result, dict):
            error = msg.get("error") if isinstance(msg, dict) else msg
            self._broken(f"the watch failed: {str(error)[:200]}", generation)
            return
        compacted = int(result.get("compact_revision", 0) or 0)
        if compacted:
            self._broken(
                f"the watch's revision was compacted (at {compacted}): reading the table again",
                generation,
                warn=False,
            )
            return
        if result.get("canceled"):
            self._broken(f"the watch was cancelled: {result.get('cancel_reason', '')}", generation)
            return
        # Not the header's revision: a watch catching up gets the store's
        # current revision there before the events that lead to it.
        events = result.get("events") or []
        if events:
            self.repository.applyEvents(events)

    def _probe(self, generation: int) -> None:
        """
        Ask the watched member something cheap: a member that does not
        answer is left (a paused member's watch is silent, not broken).
        """
        self._probeCall = None
        if generation != self._generation:
            return
        # The member the watch is on, not the client's current one: another
        # request (a reload, a heartbeat) may have moved the client on, and
        # a probe of a healthy member would then keep a dead watch forever.
        d = self.client._once(
            self._endpoint or self.client.endpoint,
            "/v3/kv/range",
            {"key": _b64(self.repository.target.root), "count_only": True, "limit": 1},
            False,
        )

        def ok(_: object) -> None:
            if generation == self._generation:
                self._probeCall = self.reactor.callLater(self.probe, self._probe, generation)

        def failed(failure: Failure) -> None:
            error = failure.value
            if isinstance(error, EtcdError) and error.auth:
                # The member answers; the token is renewed by the next
                # request (and a refused login shows in the reload).
                self.client.token = None
                ok(None)
                return
            if generation == self._generation:
                self._broken(
                    f"the watched member failed a probe: {failure.getErrorMessage()}", generation
                )

        d.addCallbacks(ok, failed)

    def _broken(self, reason: str, generation: int, warn: bool = True) -> None:
        if generation != self._generation or not self.running:
            return
        self._generation += 1
        self.watching = False
        self._stopWatch(reason)
        if warn:
            self.client.rotate(reason, self._endpoint)
        else:
            _log.info("etcd watch: {reason}", reason=reason)
        self._retry()

    def _stopWatch(self, reason: str) -> None:
        if self._probeCall is not None and self._probeCall.active():
            self._probeCall.cancel()
        self._probeCall = None
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            protocol.abort(reason)


# --- the writer -------------------------------------------------------------


@implementer(IBackendWriter)
@attrs.define(eq=False)
class EtcdBackendWriter:
    """
    The registration API's write port on etcd: leased keys (see the module
    docstring).  A write fires once this POP's table reflects it (or after
    C{settle} seconds).

    @ivar ttl: The lease TTL, seconds (C{--heartbeat-ttl}).
    """

    repository: EtcdBackendRepository
    ttl: float = 30.0
    settle: float = 2.0

    @property
    def client(self) -> EtcdClient:
        """
        The gateway client (the repository's).
        """
        return self.repository.client

    def _key(self, backend_id: str) -> str:
        return self.repository.target.backends + backend_id

    def _writeError(self, failure: Failure) -> Failure:
        if failure.check(EtcdError):
            raise BackendWriteError(f"cannot write to etcd: {failure.getErrorMessage()}")
        return failure

    def register(self, fields: Mapping[str, object]) -> "Deferred[Backend]":
        """
        See L{IBackendWriter.register}: a lease of C{ttl} seconds, then the key
        created with it in one transaction (an existing key is a
        L{DuplicateBackendError}, and the new lease is revoked).
        """
        row = dict(fields)
        try:
            validated = validate_row(row)
        except InvalidRowError:
            return fail()
        now = float(self.repository.reactor.seconds())
        value = {k: v for k, v in row.items() if k in MANDATORY_COLUMNS + OPTIONAL_COLUMNS}
        value["heartbeat_at"] = now
        key = _b64(self._key(validated.id))
        lease: List[str] = []

        def granted(answer: Any) -> "Deferred[Any]":
            lease.append(str(answer["ID"]))
            return self.client.post(
                "/v3/kv/txn",
                {
                    "compare": [
                        {"key": key, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}
                    ],
                    "success": [
                        {
                            "request_put": {
                                "key": key,
                                "value": base64.b64encode(json.dumps(value).encode()).decode(),
                                "lease": lease[0],
                            }
                        }
                    ],
                },
            )

        def written(answer: Any) -> "Deferred[Any]":
            if not answer.get("succeeded"):
                self.client.post("/v3/lease/revoke", {"ID": lease[0]}).addErrback(lambda _: None)
                raise DuplicateBackendError(validated.id)
            _log.info(
                "Backend {backend_id} registered in etcd: {host}:{port}, app {app}, region"
                " {region}, lease {ttl:g} s",
                backend_id=validated.id,
                host=validated.host,
                port=validated.port,
                app=validated.app,
                region=validated.region,
                ttl=self.ttl,
            )
            revision = int(answer["header"]["revision"])
            return self.repository.waitFor(revision, self.settle)

        def settled(_: object) -> Backend:
            found = self.repository.current().by_id.get(validated.id)
            return found if found is not None else attrs.evolve(validated, heartbeat_at=None)

        d = self.client.post("/v3/lease/grant", {"TTL": str(max(1, round(self.ttl)))})
        d.addCallback(granted)
        d.addCallback(written)
        d.addErrback(self._writeError)
        d.addCallback(settled)
        return d

    def _lease(self, backend_id: str) -> "Deferred[int]":
        """
        The lease of C{backend_id}'s key (0: no such key or no lease),
        asked of etcd when this POP's table does not know it.
        """
        known = self.repository.leases.get(backend_id)
        if known:
            return succeed(known)
        d = self.client.post("/v3/kv/range", {"key": _b64(self._key(backend_id))})
        return d.addCallback(
            lambda answer: int(((answer.get("kvs") or [{}])[0]).get("lease", 0) or 0)
        )

    def heartbeat(self, backend_id: str) -> "Deferred[bool]":
        """
        Keep the backend's lease alive; C{False} when it has none (a value
        written by hand) or it has run out (the key is gone).
        """

        def keep(lease: int) -> Any:
            if not lease:
                return False
            d = self.client.post("/v3/lease/keepalive", {"ID": str(lease)})

            def alive(answer: Any) -> bool:
                result = answer.get("result", answer) if isinstance(answer, dict) else {}
                return int(result.get("TTL", 0) or 0) > 0

            return d.addCallback(alive)

        d = self._lease(backend_id).addCallback(keep)
        return d.addErrback(self._writeError)

    def deregister(self, backend_id: str) -> "Deferred[bool]":
        """
        Revoke the backend's lease (etcd deletes its key).
        """

        def revoke(lease: int) -> Any:
            if not lease:
                return False
            d = self.client.post("/v3/lease/revoke", {"ID": str(lease)})

            def revoked(answer: Any) -> Any:
                _log.info("Backend {backend_id} deregistered from etcd", backend_id=backend_id)
                revision = int(answer.get("header", {}).get("revision", 0))
                return self.repository.waitFor(revision, self.settle).addCallback(lambda _: True)

            def gone(failure: Failure) -> Any:
                if failure.check(EtcdError) and "not found" in failure.getErrorMessage():
                    return False
                return failure

            return d.addCallbacks(revoked, gone)

        d = self._lease(backend_id).addCallback(revoke)
        return d.addErrback(self._writeError)


# --- opening ----------------------------------------------------------------


def open_etcd(
    value: str, reactor: Any, metrics: IMetricsStore, options: Mapping[str, Any]
) -> Store:
    """
    The etcd store's opener (L{edgeproxy.stores.open.OPENERS}): read the
    table (blocking, before the reactor), or start from the offline cache
    when no member answers.

    @raise StoreError: A malformed URL, refused credentials, or no member
        answers and there is no cache.
    """
    try:
        target = parse_etcd_url(value)
    except ValueError as e:
        raise StoreError(str(e)) from None
    credentials = Credentials.fromOptions(options)
    if (credentials.cert or credentials.ca) and not target.tls:
        raise StoreError("--etcd-ca/--etcd-cert/--etcd-key need an etcds:// URL")
    local = os.getcwd()
    cache_path = options.get("db-cache") or os.path.join(local, DEFAULT_CACHE_NAME)
    client = EtcdClient(reactor=reactor, target=target, credentials=credentials)
    # The HTTP clients (and the TLS files they read) before the reactor runs.
    client._clients()
    cache = OfflineCache(cache_path, reactor, source=value)
    repository = EtcdBackendRepository(client=client, metrics=metrics, cache=cache)
    description = f"{value} (offline cache {cache_path})"
    try:
        index, body, token = blocking_read(target, credentials)
    except EtcdError as e:
        if not e.unavailable:
            raise StoreError(str(e)) from None
        try:
            repository.loadFromCache(cache_path, str(e))
        except RoutingDatabaseError as c:
            raise StoreError(f"{e}; and {c}: cannot start without a table") from None
    except ssl.SSLError as e:
        raise StoreError(f"TLS to etcd failed: {e}") from None
    else:
        client.index = index
        client.token = token
        try:
            repository.loadFromBody(body)
        except EtcdError as e:
            raise StoreError(str(e)) from None
        _log.info(
            "Routing table from etcd {url}: {count} backends at revision {revision}",
            url=value,
            count=len(repository.current()),
            revision=repository.revision,
        )
    ttl = float(options.get("heartbeat-ttl") or 30.0)
    return Store(
        kind="etcd",
        repository=repository,
        writer=EtcdBackendWriter(repository, ttl=ttl),
        pops=EtcdPopRepository(repository),
        description=description,
        services=[EtcdWatchService(repository)],
        localDirectory=local,
    )


OPENERS["etcd"] = open_etcd
