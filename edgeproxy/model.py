"""
Value types of the routing domain.

Everything here is plain data: no I/O, no reactor, no clock.  A
L{RoutingSnapshot} is immutable and replaced whole on reload; it carries the
indexes that let L{edgeproxy.routing.selection.select} look at a handful of
candidates instead of scanning every backend.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Dict, Iterable, Mapping, Optional, Tuple, Union

import attrs

#: PROXY protocol versions a backend can ask for (``proxy_protocol`` column).
PROXY_OFF = 0
PROXY_V1 = 1
PROXY_V2 = 2


@attrs.frozen(slots=True)
class Backend:
    """
    One row of the routing table, validated and normalised.

    @ivar id: Unique backend id, e.g. C{fly-gru-1}.
    @ivar app: Application name; C{None} matches no app-bound listener.
    @ivar region: Region code (C{sa}, C{us}, C{eu}, C{ap} or the operator's).
    @ivar country: ISO 3166-1 alpha-2, upper case, or C{None}.
    @ivar host: Address to connect to (the C{wg_ip} column).
    @ivar port: TCP port, 1-65535.
    @ivar healthy: Whether the row says the backend is healthy.
    @ivar weight: Effective weight, at least 1 (0 in the table means 1).
    @ivar soft_limit: Effective soft limit, at least 1 (0 means 1).
    @ivar hard_limit: Absolute maximum of connections; 0 means unlimited.
    @ivar deleted: Soft-delete flag.
    @ivar proxy_protocol: L{PROXY_OFF}, L{PROXY_V1} or L{PROXY_V2}.
    @ivar draining: Finish open connections, take no new ones.
    @ivar health_check: This backend's active health check in the canonical
        text form of L{parse_check} (C{tcp}, C{off} or C{http:/path}), or
        C{None} for the proxy's default (C{--health-check}).
    @ivar heartbeat_at: For a backend registered through the API, when it
        last sent a heartbeat (epoch seconds; the registration counts as
        one); C{None} for a row written by hand, which never expires.
    @ivar sni: The TLS server names this backend's app answers on C{sni:}
        listeners (the C{sni} column): exact host names and C{*.domain}
        wildcards, normalised (lower case, no trailing dot; see
        L{parse_sni_names}); empty for none.
    """

    id: str
    app: Optional[str]
    region: str
    country: Optional[str]
    host: str
    port: int
    healthy: bool = True
    weight: int = 1
    soft_limit: int = 1
    hard_limit: int = 0
    deleted: bool = False
    proxy_protocol: int = PROXY_OFF
    draining: bool = False
    health_check: Optional[str] = None
    sni: Tuple[str, ...] = ()
    # Not part of equality or the hash: a heartbeat does not change what
    # the table routes, so it must not make every reload look like a
    # change (listeners rebuilding indexes, bindings re-checked...).
    heartbeat_at: Optional[float] = attrs.field(default=None, eq=False)

    @property
    def routable(self) -> bool:
        """
        Whether new connections may be sent here at all (load aside).
        """
        return self.healthy and not self.deleted and not self.draining


#: Kinds of active health check (see L{HealthCheckSpec}).
CHECK_TCP = "tcp"
CHECK_HTTP = "http"
CHECK_OFF = "off"

#: The longest path an HTTP health check may ask for.
MAX_CHECK_PATH = 1024


@attrs.frozen(slots=True)
class HealthCheckSpec:
    """
    How a backend is checked (C{--health-check}, the C{health_check}
    column): see L{parse_check}.

    @ivar kind: L{CHECK_TCP} (a TCP connect), L{CHECK_HTTP} (a GET of
        C{path}; 2xx and 3xx are up) or L{CHECK_OFF} (never checked, always
        up).
    @ivar path: The path (and query) of an HTTP check; C{None} otherwise.
    """

    kind: str
    path: Optional[str] = None

    def __str__(self) -> str:
        """
        The canonical text form, which L{parse_check} reads back.
        """
        return f"{CHECK_HTTP}:{self.path}" if self.kind == CHECK_HTTP else self.kind


def parse_check(text: str) -> HealthCheckSpec:
    """
    Read a health check: C{tcp}, C{off} or C{http:/path}.

    The keyword is case-insensitive; the path is kept as given.  It must
    start with C{/} (and not C{//}, which would read as a host), be
    printable ASCII without spaces (percent-encode anything else), carry no
    C{#fragment} (never sent) and be at most L{MAX_CHECK_PATH} characters.

    @raise ValueError: C{text} is none of these; the message says why, in
        words that fit after "C{'text' is not a health check: }".
    """
    if type(text) is not str:
        raise ValueError(f"{type(text).__name__} is not text")
    keyword, colon, path = text.partition(":")
    keyword = keyword.lower()
    if not colon:
        if keyword in (CHECK_TCP, CHECK_OFF):
            return HealthCheckSpec(keyword)
        raise ValueError("expected tcp, off or http:/PATH")
    if keyword != CHECK_HTTP:
        raise ValueError("expected tcp, off or http:/PATH")
    if not path.startswith("/"):
        raise ValueError("the path of an HTTP check must start with /")
    if path.startswith("//"):
        raise ValueError("an HTTP check takes a path, not a URL")
    if len(path) > MAX_CHECK_PATH:
        raise ValueError(f"the path is longer than {MAX_CHECK_PATH} characters")
    if not all("!" <= c <= "~" for c in path):
        raise ValueError("the path must be printable ASCII without spaces")
    if "#" in path:
        raise ValueError("the path must not have a #fragment")
    return HealthCheckSpec(CHECK_HTTP, path)


_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\Z")


def normalise_name(text: str) -> Optional[str]:
    """
    C{text} as a host name: lower case, one trailing dot dropped; C{None}
    unless it is ASCII letters, digits, hyphens and underscores in labels of
    1 to 63 characters (no hyphen at either end), at most 253 in all.
    """
    if not text.isascii():
        return None
    name = text.lower()
    if name.endswith("."):
        name = name[:-1]
    if not name or len(name) > 253:
        return None
    for label in name.split("."):
        if not _LABEL.match(label):
            return None
    return name


#: The most names one C{sni} column may list.
MAX_SNI_NAMES = 100


def parse_sni_names(text: str) -> Tuple[str, ...]:
    """
    Read an C{sni} column: a comma-separated list of host names
    (C{api.example.com}) and wildcards (C{*.example.com}, which matches
    exactly one more label, as in certificates: C{a.example.com}, neither
    C{example.com} nor C{a.b.example.com}).

    Names are case-insensitive and a trailing dot is ignored: they come out
    lower case without it, duplicates dropped, in their first order.  A
    name must be ASCII (an internationalised name in its C{xn--} form),
    with labels of letters, digits, hyphens and underscores; a wildcard
    needs at least two labels after its C{*.}; an IP address is not a
    name (RFC 6066 sends none).

    @raise ValueError: An invalid entry; the message names it.
    """
    if type(text) is not str:
        raise ValueError(f"{type(text).__name__} is not text")
    names: list[str] = []
    for entry in text.split(","):
        entry = entry.strip()
        if not entry:
            continue
        wildcard = entry.startswith("*.")
        name = normalise_name(entry[2:] if wildcard else entry)
        if name is None:
            raise ValueError(f"{entry!r} is not a host name or *.domain wildcard")
        try:
            ipaddress.ip_address(name)
        except ValueError:
            pass
        else:
            raise ValueError(f"{entry!r} is an IP address, which TLS clients never send")
        if wildcard:
            if "." not in name:
                raise ValueError(f"{entry!r}: a wildcard needs a domain of two labels or more")
            name = "*." + name
        if name not in names:
            names.append(name)
    if not names:
        raise ValueError(f"no name in {text!r}")
    if len(names) > MAX_SNI_NAMES:
        raise ValueError(f"more than {MAX_SNI_NAMES} names")
    return tuple(names)


@attrs.frozen(slots=True)
class SniConflict:
    """
    Several apps claim one server name; the first of them in name order
    wins (the same whatever the table order).

    @ivar name: The name or C{*.domain} wildcard.
    @ivar app: The app it routes to.
    @ivar others: The apps whose claim is ignored, sorted.
    """

    name: str
    app: str
    others: Tuple[str, ...]


@attrs.frozen(slots=True)
class GeoInfo:
    """
    Where a client (or a POP) is.

    @ivar country: ISO 3166-1 alpha-2, upper case, or C{None} if unknown.
    @ivar region: Region code derived from the country (or continent).
    """

    country: Optional[str]
    region: Optional[str]


@attrs.define(slots=True)
class Binding:
    """
    Client affinity: a (client IP, app) pair stuck to one backend.

    Mutable on purpose: C{last_seen} slides on every use.
    """

    backend_id: str
    created: float
    last_seen: float


BindingKey = Tuple[str, Optional[str]]
"""(client key, app) -- the key of a L{Binding}: the client key is its IPv4
address, or its IPv6 address masked to a prefix (see
L{edgeproxy.routing.bindings.client_key})."""

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
"""An IPv4 or IPv6 network, as C{ipaddress.ip_network} returns."""

#: Cloud instance metadata services, which a backend address must never
#: point at (a proxied client would read the POP's credentials): AWS
#: (IPv4, IPv6), GCP, Azure, OpenStack, DigitalOcean... (169.254.169.254),
#: Alibaba (100.100.100.200), Azure's wire server (168.63.129.16).
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200", "168.63.129.16")
)


def is_forbidden_target(address: str) -> bool:
    """
    Whether C{address} (an IP literal) is one a backend must never be: a
    cloud metadata service or a link-local address (169.254/16, fe80::/10),
    also inside IPv4-mapped IPv6.
    """
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:  # type: ignore[union-attr]
        ip = ip.ipv4_mapped  # type: ignore[union-attr]
    return ip in METADATA_ADDRESSES or ip.is_link_local


def _sni_index(
    rows: Iterable[Backend],
) -> Tuple[Dict[str, str], Dict[str, str], Tuple[SniConflict, ...]]:
    """
    (exact name -> app, parent domain -> app, conflicts) of C{rows}.
    """
    claims: Dict[str, set[str]] = {}
    for b in rows:
        if b.deleted or b.app is None:
            continue
        for name in b.sni:
            claims.setdefault(name, set()).add(b.app)
    names: Dict[str, str] = {}
    wildcards: Dict[str, str] = {}
    conflicts = []
    for name in sorted(claims):
        apps = sorted(claims[name])
        if len(apps) > 1:
            conflicts.append(SniConflict(name, apps[0], tuple(apps[1:])))
        if name.startswith("*."):
            wildcards[name[2:]] = apps[0]
        else:
            names[name] = apps[0]
    return names, wildcards, tuple(conflicts)


_Index = Dict[Tuple[Optional[str], Optional[str]], Tuple[Backend, ...]]


@attrs.frozen(slots=True, eq=False)
class RoutingSnapshot:
    """
    An immutable, indexed view of the routing table at one instant.

    Built once per (re)load by L{RoutingSnapshot.build}; never mutated.

    @ivar backends: Every valid row, routable or not, in table order.
    @ivar by_id: Every valid row by id.
    @ivar routable: Rows that may take new connections (healthy, not deleted,
        not draining), by id.
    @ivar by_app: Routable rows per app; key C{None} holds every app.
    @ivar by_app_country: Routable rows per (app or C{None}, country).
    @ivar by_app_region: Routable rows per (app or C{None}, region).
    @ivar version: An opaque token that changes when the content changes.
    @ivar sni_names: Server name -> app, from the C{sni} column of every
        row not deleted (unhealthy and draining rows keep their names: the
        name still belongs to the app).
    @ivar sni_wildcards: Parent domain -> app, for C{*.domain} entries.
    @ivar sni_conflicts: Names claimed by more than one app, and who won.
    """

    backends: Tuple[Backend, ...]
    by_id: Mapping[str, Backend]
    routable: Mapping[str, Backend]
    by_app: Mapping[Optional[str], Tuple[Backend, ...]]
    by_app_country: Mapping[Tuple[Optional[str], Optional[str]], Tuple[Backend, ...]]
    by_app_region: Mapping[Tuple[Optional[str], Optional[str]], Tuple[Backend, ...]]
    version: int
    sni_names: Mapping[str, str] = attrs.field(factory=dict)
    sni_wildcards: Mapping[str, str] = attrs.field(factory=dict)
    sni_conflicts: Tuple[SniConflict, ...] = ()

    @classmethod
    def build(cls, backends: Iterable[Backend]) -> "RoutingSnapshot":
        """
        Index C{backends}.  Later duplicates of an id are ignored.
        """
        rows: list[Backend] = []
        by_id: dict[str, Backend] = {}
        for b in backends:
            if b.id in by_id:
                continue
            by_id[b.id] = b
            rows.append(b)
        routable = {b.id: b for b in rows if b.routable}
        by_app: dict[Optional[str], list[Backend]] = {None: []}
        by_country: dict[Tuple[Optional[str], Optional[str]], list[Backend]] = {}
        by_region: dict[Tuple[Optional[str], Optional[str]], list[Backend]] = {}
        for b in routable.values():
            for app in (None, b.app) if b.app is not None else (None,):
                by_app.setdefault(app, []).append(b)
                if b.country is not None:
                    by_country.setdefault((app, b.country), []).append(b)
                by_region.setdefault((app, b.region), []).append(b)
        rows_t = tuple(rows)
        names, wildcards, conflicts = _sni_index(rows_t)
        return cls(
            backends=rows_t,
            by_id=by_id,
            routable=routable,
            by_app={k: tuple(v) for k, v in by_app.items()},
            by_app_country={k: tuple(v) for k, v in by_country.items()},
            by_app_region={k: tuple(v) for k, v in by_region.items()},
            version=hash(rows_t),
            sni_names=names,
            sni_wildcards=wildcards,
            sni_conflicts=conflicts,
        )

    @classmethod
    def empty(cls) -> "RoutingSnapshot":
        """
        A snapshot with no backends.
        """
        return cls.build(())

    def __len__(self) -> int:
        return len(self.backends)

    def app_for_name(self, name: str) -> Optional[Tuple[str, bool]]:
        """
        The app a TLS server name routes to, and whether it was through a
        wildcard: an exact name first, then the wildcard of its parent
        domain; C{None} if neither.

        @param name: Normalised (lower case, no trailing dot), as
            L{edgeproxy.net.clienthello.ServerName} gives it.
        """
        app = self.sni_names.get(name)
        if app is not None:
            return app, False
        _, dot, parent = name.partition(".")
        if dot:
            app = self.sni_wildcards.get(parent)
            if app is not None:
                return app, True
        return None

    def same_content(self, other: "RoutingSnapshot") -> bool:
        """
        Whether C{other} holds exactly the same rows.
        """
        return self.version == other.version and self.backends == other.backends
