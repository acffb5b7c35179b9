"""
The registration and admin API (issue 9, SPEC section 8) on the admin
listener: JSON in and out, every error a JSON C{{"error", "detail",
"status"}} with the right status.

Registration (any token; see L{edgeproxy.control.auth}):

  - C{POST /api/v1/register}: the original edgeProxy's body, C{{"id",
    "app", "region", "country", "ip", "port", "weight", "soft_limit",
    "hard_limit"}} (C{ip} is the C{wg_ip} column; C{country}, C{weight},
    C{soft_limit} and C{hard_limit} are optional and take the schema's
    defaults: none, 1, 100, 0 = unlimited), plus the optional
    C{proxy_protocol} (0, 1, 2) and C{health_check} (C{tcp}, C{off},
    C{http:/path}).  201 with the backend, routable on this POP at once.
  - C{POST /api/v1/heartbeat/{id}}: 200; 404 for an unknown id, 409 for a
    row written by hand (it has no heartbeat and never expires).
  - C{DELETE /api/v1/backends/{id}}: 200; 404, or 409 for a row written by
    hand (the API never deletes those: the operator owns them).

Reads (open on a loopback listener):

  - C{GET /api/v1/backends}: every row with its state (the table's health,
    the health check, the circuit breaker, the admin state, the heartbeat
    and its age, the overlay's verdict, the load in open connections).
  - C{GET /api/v1/backends/{id}}: one of them.
  - C{GET /api/v1/explain?ip=ADDRESS&app=APP}: why a client at ADDRESS
    would go where it goes (L{edgeproxy.routing.router.Router.explain}).

Admin (a full token):

  - C{PUT /api/v1/backends/{id}/state}: C{{"state": "ready" | "drain" |
    "maint", "deadline": SECONDS, "reason": TEXT}} (a deadline only with
    a drain, seconds from now).
  - C{POST /api/v1/reload}: reload the routing table now; 200 with its size,
    or 503 when the reload failed (the last good table stays).

Bodies are validated by a JSON Schema (draft 2020-12; L{REGISTER_SCHEMA},
L{STATE_SCHEMA}), then by the routing table's own row rules
(L{edgeproxy.stores.sqlite.validate_row}, shared with the SQLite loader),
then by the API's rules (L{check_registration}): soft limit not above a
hard one, no link-local or cloud metadata address, a known region, a new
id.  Nothing is written on any error.  A collaborator given as C{None} is
"not available": its endpoints answer 501.

Wiring::

    auth = ApiAuth.forListener(options["admin"], tokens, metrics)
    api = Api(auth=auth, repository=repository, clock=reactor, writer=writer,
              router=router, admin=state_file, overlay=router.overlay,
              health=health_checker, breaker=router.breaker, load=router.load,
              expiry=expiry, regions=known_regions(region_table),
              local_region=region, metrics=metrics)
    install_api(site.resource, api)
"""

from __future__ import annotations

import ipaddress
import json
from typing import (
    AbstractSet,
    Any,
    Dict,
    FrozenSet,
    List,
    Mapping,
    NoReturn,
    Optional,
    Tuple,
    Union,
)

import attrs
from jsonschema import Draft202012Validator
from jsonschema.validators import extend
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, UnsupportedMethod

from edgeproxy.control.admin import (
    DEFAULT_MAX_BODY_SIZE,
    AdminRoot,
    JSONResource,
    json_body,
    json_error,
)
from edgeproxy.control.auth import ADMIN, READ, REGISTER, ApiAuth
from edgeproxy.geo import CONTINENT_REGIONS
from edgeproxy.interfaces import (
    AVAILABLE,
    BackendWriteError,
    DuplicateBackendError,
    IBackendRepository,
    IBackendWriter,
    ILoadCounter,
    IMetricsStore,
    IStateOverlay,
)
from edgeproxy.model import METADATA_ADDRESSES, Backend
from edgeproxy.routing.admin import DRAIN, STATES, AdminState, AdminStates
from edgeproxy.routing.heartbeats import SOURCE as HEARTBEAT
from edgeproxy.routing.heartbeats import HeartbeatExpiry
from edgeproxy.routing.overlay import VERDICT_NAMES
from edgeproxy.stores.sqlite import InvalidRowError, validate_row
from edgeproxy.stores.statefile import StateFile

__all__ = [
    "API_WRITES",
    "MAX_DEPTH",
    "REGISTER_SCHEMA",
    "STATE_SCHEMA",
    "Api",
    "ApiError",
    "ApiRoot",
    "check_registration",
    "install_api",
    "known_regions",
    "parse_json",
    "registration_row",
]

_log = Logger()

#: Counter of the API's writes, labelled C{register}, C{heartbeat},
#: C{deregister}, C{state} and C{reload}.
API_WRITES = "api_writes"

#: How deeply a JSON body may nest (a registration needs 1).
MAX_DEPTH = 32

#: Integers above this are refused (SQLite's INTEGER is 64-bit; nothing
#: here needs more than 32).
_MAX_INT = 2**31 - 1

#: An id, app or region name: letters, digits, C{.}, C{_} and C{-},
#: starting with a letter or digit.  (C{(?![\s\S])} is the end of the text:
#: C{$} would also match before a final newline.)
_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*(?![\s\S])"

#: The registration body (the original edgeProxy's, plus proxy_protocol and
#: health_check).
REGISTER_SCHEMA: Mapping[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "required": ["id", "app", "region", "ip", "port"],
    "properties": {
        "id": {"type": "string", "minLength": 1, "maxLength": 128, "pattern": _NAME},
        "app": {"type": "string", "minLength": 1, "maxLength": 128, "pattern": _NAME},
        "region": {"type": "string", "minLength": 1, "maxLength": 64, "pattern": _NAME},
        "country": {"type": ["string", "null"], "pattern": r"^[A-Za-z]{2}(?![\s\S])"},
        "ip": {"type": "string", "minLength": 1, "maxLength": 255},
        "port": {"type": "integer", "minimum": 1, "maximum": 65535},
        "weight": {"type": "integer", "minimum": 1, "maximum": _MAX_INT},
        "soft_limit": {"type": "integer", "minimum": 0, "maximum": _MAX_INT},
        "hard_limit": {"type": "integer", "minimum": 0, "maximum": _MAX_INT},
        "proxy_protocol": {"type": "integer", "enum": [0, 1, 2]},
        "health_check": {"type": ["string", "null"], "minLength": 1, "maxLength": 1100},
    },
}

#: The defaults of the optional registration fields: the schema's
#: (C{conf/schema.sql}) column defaults.
_REGISTER_DEFAULTS: Mapping[str, Any] = {
    "country": None,
    "weight": 1,
    "soft_limit": 100,
    "hard_limit": 0,
    "proxy_protocol": 0,
    "health_check": None,
}

#: C{PUT /api/v1/backends/{id}/state}.
STATE_SCHEMA: Mapping[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "required": ["state"],
    "properties": {
        "state": {"type": "string", "enum": sorted(STATES)},
        "deadline": {"type": "number", "exclusiveMinimum": 0, "maximum": 30 * 86400},
        "reason": {"type": "string", "maxLength": 200},
    },
}


def _isInteger(checker: Any, instance: object) -> bool:
    # JSON Schema's "integer" takes 80.0 too; a table column does not.
    return type(instance) is int


_Validator = extend(
    Draft202012Validator,
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine("integer", _isInteger),
)
_REGISTER = _Validator(REGISTER_SCHEMA)
_STATE = _Validator(STATE_SCHEMA)

_METADATA_ADDRESSES = METADATA_ADDRESSES
_METADATA_NAMES: FrozenSet[str] = frozenset(
    {
        "metadata",
        "metadata.google.internal",
        "metadata.goog",
        "instance-data",
        "instance-data.ec2.internal",
    }
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")

#: Body fields by routing table column, where they differ.
_FIELD_OF_COLUMN: Mapping[str, str] = {"wg_ip": "ip"}


def known_regions(table: Mapping[str, str]) -> FrozenSet[str]:
    """
    The region names a region table (country -> region, as
    L{edgeproxy.geo.DEFAULT_REGIONS}) and the continent fallback can locate
    a client in.
    """
    return frozenset(table.values()) | frozenset(CONTINENT_REGIONS.values())


class ApiError(Exception):
    """
    An answer other than success: C{code} with the JSON error
    C{{"error": error, "detail": detail}}.
    """

    def __init__(self, code: int, error: str, detail: Any = None) -> None:
        super().__init__(error)
        self.code = code
        self.error = error
        self.detail = detail

    def render(self, request: Any) -> bytes:
        return json_error(request, self.code, self.error, self.detail)


def _invalid(field: Optional[str], reason: str, errors: Any = None) -> NoReturn:
    detail: Dict[str, Any] = {"field": field, "reason": reason}
    if errors is not None:
        detail["errors"] = errors
    message = f"invalid {field}: {reason}" if field else f"invalid body: {reason}"
    raise ApiError(400, message, detail)


# --- reading a body -----------------------------------------------------------


class _DuplicateKeyError(ValueError):
    pass


def _noDuplicates(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    result: Dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKeyError(f"the key {_short(key)!r} is given twice")
        result[key] = value
    return result


def _noConstant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _short(text: str, limit: int = 64) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _depth(value: Any, limit: int) -> bool:
    """
    Whether C{value} nests deeper than C{limit} levels (explicit stack: no
    recursion).
    """
    stack: List[Tuple[Any, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if level > limit:
            return True
        stack.extend((child, level + 1) for child in children)
    return False


def parse_json(raw: bytes, maxSize: int = DEFAULT_MAX_BODY_SIZE) -> Any:
    """
    A request body as JSON: strict UTF-8, no C{NaN}/C{Infinity}, no key given
    twice, at most L{MAX_DEPTH} levels.

    @raise ApiError: 413 over C{maxSize} bytes, 400 for anything else wrong.
    """
    if len(raw) > maxSize:
        raise ApiError(413, "request body too large", f"the limit is {maxSize} bytes")
    if not raw.strip():
        raise ApiError(400, "invalid JSON: the body is empty", None)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, "invalid JSON: not UTF-8", f"byte {e.start}") from None
    try:
        value = json.loads(text, object_pairs_hook=_noDuplicates, parse_constant=_noConstant)
    except RecursionError:
        raise ApiError(
            400, "invalid JSON: nested too deeply", f"at most {MAX_DEPTH} levels"
        ) from None
    except _DuplicateKeyError as e:
        raise ApiError(400, "invalid JSON: a key is given twice", str(e)) from None
    except ValueError as e:
        raise ApiError(400, "invalid JSON", _short(str(e), 200)) from None
    if _depth(value, MAX_DEPTH):
        raise ApiError(400, "invalid JSON: nested too deeply", f"at most {MAX_DEPTH} levels")
    return value


def _readBody(request: Any) -> Any:
    """
    The JSON body of C{request} (see L{parse_json}); a content type other
    than JSON is a 415 (none at all is taken as JSON).
    """
    content_type = request.getHeader(b"content-type")
    if content_type is not None:
        mime = content_type.split(b";", 1)[0].strip().lower()
        if mime != b"application/json" and not mime.endswith(b"+json"):
            raise ApiError(
                415,
                "unsupported content type",
                "send the body as JSON (Content-Type: application/json)",
            )
    content = request.content
    raw = content.read(DEFAULT_MAX_BODY_SIZE + 1) if content is not None else b""
    return parse_json(raw)


_TYPE_WORDS = {
    "object": "an object",
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "null": "null",
    "boolean": "true or false",
    "array": "a list",
}


def _reason(error: Any) -> str:
    kind = error.validator
    value = error.validator_value
    if kind == "type":
        kinds = [value] if isinstance(value, str) else list(value)
        return "must be " + " or ".join(_TYPE_WORDS.get(k, k) for k in kinds)
    if kind == "minimum":
        return f"must be at least {value}"
    if kind == "exclusiveMinimum":
        return f"must be more than {value}"
    if kind == "maximum":
        return f"must be at most {value}"
    if kind == "minLength":
        return "must not be empty" if value == 1 else f"must be at least {value} characters"
    if kind == "maxLength":
        return f"must be at most {value} characters"
    if kind == "pattern":
        return "has characters that are not allowed"
    if kind == "enum":
        return "must be one of " + ", ".join(json.dumps(v) for v in value)
    return _short(str(error.message), 200)


def _schemaCheck(validator: Any, body: Any) -> Dict[str, Any]:
    """
    C{body} if C{validator} passes it; else a 400 naming the fields.
    """
    problems: List[Dict[str, Any]] = []
    properties = validator.schema.get("properties", {})
    for error in sorted(validator.iter_errors(body), key=lambda e: [str(p) for p in e.path]):
        path = [str(p) for p in error.absolute_path]
        if error.validator == "required":
            for name in error.validator_value:
                if isinstance(error.instance, dict) and name not in error.instance:
                    problems.append({"field": name, "reason": "is required"})
        elif error.validator == "additionalProperties":
            for name in sorted(set(error.instance) - set(properties)):
                problems.append({"field": _short(str(name)), "reason": "is not a known field"})
        else:
            problems.append({"field": ".".join(path) or None, "reason": _reason(error)})
    if problems:
        first = problems[0]
        _invalid(first["field"], first["reason"], problems[:20])
    assert isinstance(body, dict)
    return body


# --- the API's own rules ----------------------------------------------------------


def registration_row(fields: Mapping[str, Any]) -> Dict[str, object]:
    """
    A registration body (valid by L{REGISTER_SCHEMA}) as a routing table
    row for L{validate_row} and L{IBackendWriter.register}: C{ip} is
    C{wg_ip}, missing fields take their defaults, and the row is healthy
    and not deleted.
    """
    given = {**_REGISTER_DEFAULTS, **fields}
    return {
        "id": given["id"],
        "app": given["app"],
        "region": given["region"],
        "country": given["country"],
        "wg_ip": given["ip"],
        "port": given["port"],
        "healthy": 1,
        "weight": given["weight"],
        "soft_limit": given["soft_limit"],
        "hard_limit": given["hard_limit"],
        "deleted": 0,
        "proxy_protocol": given["proxy_protocol"],
        "health_check": given["health_check"],
    }


def _hostProblem(host: str) -> Optional[str]:
    """
    Why a backend may not be at C{host} (as L{validate_row} normalised it),
    or C{None}.
    """
    if host.rstrip(".").lower() in _METADATA_NAMES:
        return "is a cloud metadata service"
    try:
        address: Union[ipaddress.IPv4Address, ipaddress.IPv6Address] = ipaddress.ip_address(
            host.partition("%")[0]
        )
    except ValueError:
        return None
    candidates = [address]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            candidates.append(address.ipv4_mapped)
        if address in _NAT64:
            candidates.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    for candidate in candidates:
        if candidate in _METADATA_ADDRESSES:
            return "is a cloud metadata address"
        if candidate.is_link_local:
            return "is link-local (169.254.0.0/16, fe80::/10)"
        if candidate.is_unspecified:
            return "is unspecified (0.0.0.0, ::)"
        if candidate.is_multicast:
            return "is multicast"
        if candidate == ipaddress.IPv4Address("255.255.255.255"):
            return "is broadcast"
    return None


def check_registration(
    fields: Mapping[str, Any], backend: Backend, regions: AbstractSet[str]
) -> None:
    """
    The API's rules beyond the schema and the row's: a soft limit above a
    (non-zero) hard limit, a link-local, unspecified, multicast or cloud
    metadata address, or a region not in C{regions} is a 400.

    @raise ApiError: The first rule broken.
    """
    given = {**_REGISTER_DEFAULTS, **fields}
    soft, hard = given["soft_limit"], given["hard_limit"]
    if hard > 0 and soft > hard:
        _invalid("soft_limit", f"{soft} is above the hard limit {hard}")
    problem = _hostProblem(backend.host)
    if problem is not None:
        _invalid("ip", f"{_short(backend.host)} {problem}")
    if backend.region not in regions:
        known = sorted(regions)
        listed = ", ".join(known[:20]) + (", ..." if len(known) > 20 else "")
        _invalid("region", f"unknown region {backend.region!r} (known: {listed or 'none'})")


# --- the collaborators ---------------------------------------------------------------


_Answer = Tuple[int, Mapping[str, Any]]


@attrs.define(eq=False)
class Api:
    """
    What the API works with; any collaborator but C{auth}, C{repository}
    and C{clock} may be C{None} ("not available": its endpoints answer
    501, its part of a backend's state is C{null}).

    @ivar auth: Who may do what (L{edgeproxy.control.auth.ApiAuth}).
    @ivar repository: The routing table.
    @ivar clock: The reactor's clock (epoch seconds).
    @ivar writer: The routing table's write port (register, heartbeat,
        deregister).
    @ivar router: Anything with C{explain(client_ip, app, limit)} (the
        L{edgeproxy.routing.router.Router}).
    @ivar admin: The admin states: a L{StateFile} (set, then written) or
        an L{AdminStates} (set in memory only).
    @ivar overlay: The state overlay (the verdicts shown per backend).
    @ivar health: Anything with C{status(backend_id)} returning a
        L{edgeproxy.net.health.HealthStatus} or C{None} (the health
        checker).
    @ivar breaker: Anything with C{state(backend_id)} (the circuit breaker).
    @ivar load: The load counter (C{connections}).
    @ivar expiry: The heartbeat expiry, told of every heartbeat at once.
    @ivar regions: The configured region names (L{known_regions}); the
        POP's own region and the regions already in the table are known
        too.
    @ivar local_region: The POP's region.
    @ivar metrics: Where writes are counted (L{API_WRITES}).
    """

    auth: ApiAuth
    repository: IBackendRepository
    clock: IReactorTime
    writer: Optional[IBackendWriter] = None
    router: Any = None
    admin: Union[StateFile, AdminStates, None] = None
    overlay: Optional[IStateOverlay] = None
    health: Any = None
    breaker: Any = None
    load: Optional[ILoadCounter] = None
    expiry: Optional[HeartbeatExpiry] = None
    regions: AbstractSet[str] = frozenset()
    local_region: Optional[str] = None
    metrics: Optional[IMetricsStore] = None
    _beatsFailing: bool = attrs.field(init=False, default=False, repr=False)

    # -- views

    def _adminStates(self) -> Optional[AdminStates]:
        if isinstance(self.admin, StateFile):
            return self.admin.states
        return self.admin

    def view(self, backend: Backend) -> Dict[str, Any]:
        """
        C{backend} and everything known about it, JSON-ready.
        """
        now = self.clock.seconds()
        last = self.expiry.lastBeat(backend) if self.expiry is not None else backend.heartbeat_at
        overlay = self.overlay
        verdict = overlay.verdict(backend.id) if overlay is not None else AVAILABLE
        sources = overlay.sources(backend.id) if overlay is not None else {}
        status = self.health.status(backend.id) if self.health is not None else None
        admins = self._adminStates()
        admin = admins.get(backend.id) if admins is not None else None
        load = self.load.connections.get(backend.id, 0) if self.load is not None else None
        full = backend.hard_limit > 0 and load is not None and load >= backend.hard_limit
        return {
            "id": backend.id,
            "app": backend.app,
            "region": backend.region,
            "country": backend.country,
            "ip": backend.host,
            "port": backend.port,
            "weight": backend.weight,
            "soft_limit": backend.soft_limit,
            "hard_limit": backend.hard_limit,
            "proxy_protocol": backend.proxy_protocol,
            "health_check": backend.health_check,
            "healthy": backend.healthy,
            "deleted": backend.deleted,
            "draining": backend.draining,
            "registered": backend.heartbeat_at is not None,
            "heartbeat_at": last,
            "last_heartbeat_secs": None if last is None else round(max(0.0, now - last), 3),
            "heartbeat_expired": None if last is None else HEARTBEAT in sources,
            "health": None
            if status is None
            else {
                "state": status.state,
                "check": status.check,
                "reason": status.reason,
                "since": status.since,
                "last_check": status.last_check,
                "rtt": status.rtt,
            },
            "breaker": self.breaker.state(backend.id) if self.breaker is not None else None,
            "admin": None
            if admin is None
            else {
                "state": admin.state,
                "deadline": admin.deadline,
                "since": admin.since,
                "reason": admin.reason,
            },
            "verdict": VERDICT_NAMES.get(verdict, str(verdict)),
            "verdicts": {s: VERDICT_NAMES.get(v, str(v)) for s, v in sorted(sources.items())},
            "load": load,
            "available": backend.routable and verdict == AVAILABLE and not full,
        }

    def _count(self, label: str) -> None:
        if self.metrics is not None:
            self.metrics.increment(API_WRITES, label)

    def _find(self, backend_id: str) -> Backend:
        found = self.repository.current().by_id.get(backend_id)
        if found is None:
            raise ApiError(404, "backend not found", {"id": backend_id})
        return found

    def _handWritten(self, backend_id: str) -> bool:
        found = self.repository.current().by_id.get(backend_id)
        return found is not None and found.heartbeat_at is None

    def _needWriter(self) -> IBackendWriter:
        if self.writer is None:
            raise ApiError(
                501,
                "registration is not available",
                "this proxy has no writable routing table",
            )
        return self.writer

    # -- the endpoints

    def listBackends(self, request: Any) -> _Answer:
        snapshot = self.repository.current()
        return 200, {
            "backends": [self.view(b) for b in snapshot.backends],
            "total": len(snapshot.backends),
            "heartbeat_ttl": self.expiry.ttl if self.expiry is not None else None,
        }

    def getBackend(self, request: Any, backend_id: str) -> _Answer:
        return 200, self.view(self._find(backend_id))

    def register(self, request: Any) -> "Deferred[_Answer]":
        writer = self._needWriter()
        fields = _schemaCheck(_REGISTER, _readBody(request))
        row = registration_row(fields)
        try:
            backend = validate_row(row)
        except InvalidRowError as e:
            _invalid(_FIELD_OF_COLUMN.get(e.column, e.column), e.reason.split(": ", 1)[-1])
        snapshot = self.repository.current()
        regions = set(self.regions) | {b.region for b in snapshot.backends}
        if self.local_region is not None:
            regions.add(self.local_region)
        check_registration(fields, backend, regions)
        if backend.id in snapshot.by_id:
            raise ApiError(409, "a backend with this id exists", {"id": backend.id})
        d: Deferred[Any] = maybeDeferred(writer.register, row)

        def registered(written: Backend) -> _Answer:
            self._count("register")
            if self.expiry is not None and written.heartbeat_at is not None:
                self.expiry.beat(written.id, written.heartbeat_at)
            view = self.view(written)
            view["message"] = "backend registered"
            return 201, view

        def failed(failure: Failure) -> NoReturn:
            error = failure.value
            if isinstance(error, DuplicateBackendError):
                raise ApiError(409, "a backend with this id exists", {"id": error.backend_id})
            if isinstance(error, InvalidRowError):
                _invalid(
                    _FIELD_OF_COLUMN.get(error.column, error.column),
                    error.reason.split(": ", 1)[-1],
                )
            if isinstance(error, BackendWriteError):
                raise ApiError(503, "the routing table cannot be written", str(error))
            failure.raiseException()
            raise AssertionError("unreachable")

        return d.addCallbacks(registered, failed)

    def heartbeat(self, request: Any, backend_id: str) -> "Deferred[_Answer]":
        writer = self._needWriter()
        d: Deferred[Any] = maybeDeferred(writer.heartbeat, backend_id)

        def answer(persisted: bool) -> _Answer:
            self._count("heartbeat")
            now = self.clock.seconds()
            if self.expiry is not None:
                self.expiry.beat(backend_id, now)
            return 200, {
                "id": backend_id,
                "status": "ok",
                "heartbeat_at": now,
                "persisted": persisted,
            }

        def written(ok: bool) -> _Answer:
            if self._beatsFailing:
                self._beatsFailing = False
                _log.info("heartbeats are written to the routing table again")
            if ok:
                return answer(True)
            if self._handWritten(backend_id):
                raise ApiError(
                    409,
                    "not a registered backend",
                    "this row was written by hand: it has no heartbeat and never expires",
                )
            raise ApiError(404, "backend not registered", {"id": backend_id})

        def failed(failure: Failure) -> _Answer:
            failure.trap(BackendWriteError)
            found = self.repository.current().by_id.get(backend_id)
            if found is None or found.heartbeat_at is None:
                raise ApiError(503, "the routing table cannot be written", str(failure.value))
            # A registered backend this POP routes to: its heartbeat counts
            # here even if the table cannot take it now (a locked file must
            # not expire every backend).  Logged once per failing spell.
            if not self._beatsFailing:
                self._beatsFailing = True
                _log.warn(
                    "heartbeats cannot be written ({error}); counting them in memory"
                    " until they can",
                    error=str(failure.value),
                )
            return answer(False)

        return d.addCallbacks(written, failed)

    def deregister(self, request: Any, backend_id: str) -> "Deferred[_Answer]":
        writer = self._needWriter()
        d: Deferred[Any] = maybeDeferred(writer.deregister, backend_id)

        def written(gone: bool) -> _Answer:
            if gone:
                self._count("deregister")
                return 200, {"id": backend_id, "deregistered": True}
            if self._handWritten(backend_id):
                raise ApiError(
                    409,
                    "not a registered backend",
                    "this row was written by hand: remove it from the routing table,"
                    " or set its state to maint",
                )
            raise ApiError(404, "backend not registered", {"id": backend_id})

        def failed(failure: Failure) -> NoReturn:
            failure.trap(BackendWriteError)
            raise ApiError(503, "the routing table cannot be written", str(failure.value))

        return d.addCallbacks(written, failed)

    def setState(self, request: Any, backend_id: str) -> Union[_Answer, "Deferred[_Answer]"]:
        if self.admin is None:
            raise ApiError(501, "admin states are not available", None)
        body = _schemaCheck(_STATE, _readBody(request))
        now = self.clock.seconds()
        deadline = body.get("deadline")
        if deadline is not None and body["state"] != DRAIN:
            _invalid("deadline", "only a drain has a deadline")
        state = AdminState(
            state=body["state"],
            deadline=None if deadline is None else now + float(deadline),
            since=now,
            reason=body.get("reason", ""),
        )
        in_table = backend_id in self.repository.current().by_id

        def answer(persisted: Optional[bool]) -> _Answer:
            self._count("state")
            return 200, {
                "id": backend_id,
                "admin": {
                    "state": state.state,
                    "deadline": state.deadline,
                    "since": state.since,
                    "reason": state.reason,
                },
                "in_table": in_table,
                "persisted": persisted,
            }

        if isinstance(self.admin, StateFile):
            state_file = self.admin
            d: Deferred[Any] = maybeDeferred(state_file.set, backend_id, state)
            return d.addCallback(lambda _: answer(state_file.lastError is None))
        self.admin.set(backend_id, state)
        return answer(None)

    def reload(self, request: Any) -> "Deferred[_Answer]":
        d: Deferred[Any] = maybeDeferred(self.repository.reload)

        def reloaded(snapshot: Any) -> _Answer:
            self._count("reload")
            error = getattr(self.repository, "lastError", None)
            summary = {
                "ok": error is None,
                "backends": len(snapshot),
                "routable": len(snapshot.routable),
                "skipped": len(getattr(self.repository, "skipped", ())),
            }
            if error is not None:
                raise ApiError(
                    503,
                    "the reload failed; the last good table stays",
                    {**summary, "reason": error},
                )
            return 200, summary

        return d.addCallback(reloaded)

    def explain(self, request: Any) -> _Answer:
        if self.router is None:
            raise ApiError(501, "explain is not available", None)
        args = request.args
        ip = _arg(args, b"ip")
        if ip is None:
            _invalid("ip", "is required (?ip=ADDRESS)")
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            _invalid("ip", f"{_short(ip)!r} is not an IP address")
        app = _arg(args, b"app") or None
        limit_text = _arg(args, b"limit")
        limit = 5
        if limit_text is not None:
            if not limit_text.isdigit() or not 1 <= int(limit_text) <= 100:
                _invalid("limit", "must be a number from 1 to 100")
            limit = int(limit_text)
        return 200, self.router.explain(str(address), app, limit)


def _arg(args: Mapping[bytes, List[bytes]], name: bytes) -> Optional[str]:
    values = args.get(name)
    if not values:
        return None
    try:
        return values[-1].decode("utf-8").strip()
    except UnicodeDecodeError:
        _invalid(name.decode("ascii"), "is not UTF-8")


# --- the resources -------------------------------------------------------------------


def _later(request: Any, d: "Deferred[_Answer]") -> Any:
    """
    Answer C{request} when C{d} fires (NOT_DONE_YET for C{render}); nothing
    is written once the client is gone.
    """
    gone: List[bool] = []
    request.notifyFinish().addErrback(lambda _: gone.append(True))

    def done(answer: _Answer) -> None:
        if gone:
            return
        code, body = answer
        request.write(json_body(request, code, body))
        request.finish()

    def failed(failure: Failure) -> None:
        if gone:
            return
        error = failure.value
        if isinstance(error, ApiError):
            request.write(error.render(request))
        else:
            _log.failure("admin API request {uri} failed", failure, uri=request.uri)
            request.write(json_error(request, 500, "internal error", None))
        request.finish()

    d.addCallbacks(done, failed).addErrback(
        lambda f: _log.failure("answering an admin API request failed", f)
    )
    return NOT_DONE_YET


class _Endpoint(JSONResource):
    """
    An API resource: checks access per method (L{access}: method -> what it
    needs), then answers with L{handle}'s result, an L{ApiError} or a JSON
    500; other methods are a JSON 405.
    """

    checksAccess = True
    access: Mapping[bytes, str] = {}

    def __init__(self, api: Api) -> None:
        JSONResource.__init__(self)
        self.api = api

    def servedMethods(self) -> List[bytes]:
        methods = set(self.access)
        if b"GET" in methods:
            methods.add(b"HEAD")
        return sorted(methods)

    def handle(self, request: Any, method: bytes) -> Union[_Answer, "Deferred[_Answer]"]:
        raise NotImplementedError()

    def render(self, request: Any) -> Any:
        if self.isLeaf and any(request.postpath):
            # A leaf is handed the rest of the path: /api/v1/reload/x is
            # nothing.
            return json_error(request, 404, "not found", None)
        method = request.method
        need = self.access.get(method)
        if need is None:
            allowed = self.servedMethods()
            if method == b"HEAD" and b"GET" in allowed:
                # twisted.web answers HEAD by rendering GET without the body.
                raise UnsupportedMethod(allowed)
            request.setHeader(b"Allow", b", ".join(allowed))
            return json_error(
                request,
                405,
                "method not allowed",
                {"allowed": [m.decode("ascii") for m in allowed]},
            )
        refusal = self.api.auth.check(request, need)
        if refusal is not None:
            return self.api.auth.refuse(request, refusal)
        try:
            result = self.handle(request, method)
        except ApiError as e:
            return e.render(request)
        except Exception:
            _log.failure("admin API request {uri} failed", uri=request.uri)
            return json_error(request, 500, "internal error", None)
        if isinstance(result, Deferred):
            return _later(request, result)
        code, body = result
        return json_body(request, code, body)


def _backendId(path: bytes) -> Optional[str]:
    try:
        backend_id = path.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return backend_id or None


class _NotFound(Resource):
    """
    A JSON 404 (with C{detail}, as every API error) for every method and
    every path below it.
    """

    isLeaf = True

    def render(self, request: Any) -> bytes:
        return json_error(request, 404, "not found", None)


class _Index(_Endpoint):
    """
    C{/api/v1}: what is served.
    """

    access = {b"GET": READ}

    def getChild(self, path: bytes, request: Any) -> Resource:
        if path == b"":
            return self
        return _NotFound()

    def handle(self, request: Any, method: bytes) -> Any:
        return 200, {"endpoints": _ENDPOINTS}


_ENDPOINTS = [
    "POST /api/v1/register",
    "POST /api/v1/heartbeat/{id}",
    "GET /api/v1/backends",
    "GET /api/v1/backends/{id}",
    "DELETE /api/v1/backends/{id}",
    "PUT /api/v1/backends/{id}/state",
    "POST /api/v1/reload",
    "GET /api/v1/explain?ip=ADDRESS&app=APP",
]


class _Register(_Endpoint):
    access = {b"POST": REGISTER}
    isLeaf = True

    def handle(self, request: Any, method: bytes) -> Any:
        return self.api.register(request)


class _Reload(_Endpoint):
    access = {b"POST": ADMIN}
    isLeaf = True

    def handle(self, request: Any, method: bytes) -> Any:
        return self.api.reload(request)


class _Explain(_Endpoint):
    access = {b"GET": READ}
    isLeaf = True

    def handle(self, request: Any, method: bytes) -> Any:
        return self.api.explain(request)


class _Heartbeats(JSONResource):
    """
    C{/api/v1/heartbeat}: only its children (C{/{id}}) answer.
    """

    def __init__(self, api: Api) -> None:
        JSONResource.__init__(self)
        self.api = api

    def getChild(self, path: bytes, request: Any) -> Resource:
        backend_id = _backendId(path)
        if backend_id is None:
            return _NotFound()
        return _Heartbeat(self.api, backend_id)

    def render(self, request: Any) -> bytes:
        return json_error(request, 404, "not found", "POST /api/v1/heartbeat/{id}")


class _Heartbeat(_Endpoint):
    access = {b"POST": REGISTER}
    isLeaf = True

    def __init__(self, api: Api, backend_id: str) -> None:
        _Endpoint.__init__(self, api)
        self.backend_id = backend_id

    def handle(self, request: Any, method: bytes) -> Any:
        return self.api.heartbeat(request, self.backend_id)


class _Backends(_Endpoint):
    access = {b"GET": READ}

    def getChild(self, path: bytes, request: Any) -> Resource:
        if path == b"":
            return self
        backend_id = _backendId(path)
        if backend_id is None:
            return _NotFound()
        return _Backend(self.api, backend_id)

    def handle(self, request: Any, method: bytes) -> Any:
        return self.api.listBackends(request)


class _Backend(_Endpoint):
    access = {b"GET": READ, b"DELETE": REGISTER}

    def __init__(self, api: Api, backend_id: str) -> None:
        _Endpoint.__init__(self, api)
        self.backend_id = backend_id

    def getChild(self, path: bytes, request: Any) -> Resource:
        if path == b"":
            return self
        if path == b"state":
            return _State(self.api, self.backend_id)
        return _NotFound()

    def handle(self, request: Any, method: bytes) -> Any:
        if method == b"DELETE":
            return self.api.deregister(request, self.backend_id)
        return self.api.getBackend(request, self.backend_id)


class _State(_Endpoint):
    access = {b"PUT": ADMIN}
    isLeaf = True

    def __init__(self, api: Api, backend_id: str) -> None:
        _Endpoint.__init__(self, api)
        self.backend_id = backend_id

    def handle(self, request: Any, method: bytes) -> Any:
        return self.api.setState(request, self.backend_id)


class ApiRoot(JSONResource):
    """
    C{/api}: the tree of the module docstring under C{/api/v1}.  Every
    endpoint checks access itself (per method), so L{AdminRoot.guard}
    leaves this tree alone.
    """

    checksAccess = True

    def __init__(self, api: Api) -> None:
        JSONResource.__init__(self)
        self.api = api
        v1 = _Index(api)
        v1.putChild(b"register", _Register(api))
        v1.putChild(b"heartbeat", _Heartbeats(api))
        v1.putChild(b"backends", _Backends(api))
        v1.putChild(b"reload", _Reload(api))
        v1.putChild(b"explain", _Explain(api))
        self.putChild(b"v1", v1)

    def getChild(self, path: bytes, request: Any) -> Resource:
        return _NotFound()

    def render(self, request: Any) -> bytes:
        return json_error(request, 404, "not found", "see /api/v1")


def install_api(root: AdminRoot, api: Api) -> ApiRoot:
    """
    Serve C{api} at C{/api} of the admin site's C{root}, and make C{root}
    apply C{api.auth}'s read rule to every other page (C{/metrics},
    C{/health}, the status page).
    """
    resource = ApiRoot(api)
    root.putChild(b"api", resource)
    root.guard = api.auth.guard
    return resource
