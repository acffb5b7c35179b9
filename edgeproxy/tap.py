"""
The twistd plugin's options and service maker: C{twistd edgeproxy ...}.

This is the only module that reads the process environment or the global
reactor, and only in L{makeService}.  Everything it builds comes from
L{edgeproxy.service.build_service}, which another Twisted application can
call directly with parts of its own.

Every option has an C{EDGEPROXY_*} environment variable; the command line
wins over the environment, the environment over the defaults.  Invalid values
stop startup with a message that names the option.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import sys
import textwrap
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Optional, Sequence

import attrs
from twisted.application.service import IService
from twisted.internet.defer import setDebugging
from twisted.logger import Logger
from twisted.python import usage

from edgeproxy.config import ListenerSpec, ProxySettings

if TYPE_CHECKING:
    from edgeproxy.net.endpoints import TrustedSender

_log = Logger()


#: What C{--proxy-protocol-trusted} means when it is not given.
DEFAULT_TRUSTED = ("127.0.0.0/8", "::1/128")

#: C{--geoip-db} value that turns geo routing off.
NO_GEOIP = "none"

#: Marker for "use the database that ships with the install"
#: (L{edgeproxy.geo.SHIPPED_DATABASE}).
SHIPPED_GEOIP = "shipped"

#: The description under C{twistd edgeproxy --help}, printed exactly as it is
#: written here (see L{Options.getUsage}); keep lines within 79 columns.
LONGDESC = """\
edgeproxy accepts TCP connections on one or more listeners and relays each one
to the best backend of a SQLite routing table: the client's country first,
then its region, then this POP's region, then anything, and within a tier the
least loaded backend relative to its soft limit and weight.  A client sticks
to the backend it got for --binding-ttl seconds.

Listeners (--listen, repeatable; default tcp:8080):
  tcp:PORT[:interface=ADDR]   plain TCP, e.g. tcp:8080:interface=127.0.0.1;
                              any Twisted endpoint description works (tcp6:,
                              unix:, systemd:)
  haproxy:DESC                DESC, where each connection must start with a
                              PROXY v1/v2 header from a sender in
                              --proxy-protocol-trusted (haproxy:tcp:8081)
  txsni:CERTDIR:DESC          terminate TLS on DESC; the certificate is
                              CERTDIR/<SNI name>.pem, else DEFAULT.pem
  txsni:CERTDIR:haproxy:DESC  a PROXY header first, then the TLS handshake
  APP=DESC                    route this listener to APP's backends only
  HOST:PORT                   0.0.0.0:8080 or [::]:8080, the same as tcp:

Routing table (--db): the SQLite table "backends", one row per backend,
re-read every --db-reload seconds (no restart needed).  Columns:
  id (unique), app, region, country (ISO code or NULL), wg_ip and port (where
  to connect), healthy (1 or 0), weight, soft_limit, hard_limit (0 for no
  limit), deleted (1 for soft-deleted), proxy_protocol (0 off, 1 or 2 to send
  a PROXY v1 or v2 header to the backend), draining (optional; 1 takes no
  new connections).
Its schema is conf/schema.sql in the source tree, installed with the package
as edgeproxy/data/schema.sql; a missing --db file is created from it (empty,
with a warning).

Every option can also be set with an EDGEPROXY_* environment variable (shown
with each option); the command line wins.  A bad option or value stops
twistd edgeproxy with one line on stderr and exit status 1.
"""


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"not a number: {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"must be a positive number of seconds, got {value!r}")
    return number


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            number = int(value.strip())
        except ValueError:
            raise ValueError(f"not an integer: {value!r}") from None
        if number < minimum:
            raise ValueError(f"must be at least {minimum}, got {value!r}")
        return number

    return parse


def _workers(value: str) -> int:
    text = value.strip().lower()
    if text == "auto":
        if hasattr(os, "sched_getaffinity"):
            cpus = len(os.sched_getaffinity(0))
        else:  # PyPy 3.9: the machine's, not this process's affinity
            cpus = os.cpu_count() or 1
        return max(1, min(cpus, 256))
    try:
        count = int(text)
    except ValueError:
        raise ValueError(f"not a number of workers or auto: {value!r}") from None
    if not 1 <= count <= 256:
        raise ValueError(f"must be from 1 to 256 or auto, got {count}")
    return count


def _health_check(value: str) -> str:
    from edgeproxy.model import parse_check

    parse_check(value)
    return value.strip().lower()


def _dns_listen(value: str) -> str:
    from edgeproxy.control.dns import parse_dns_listen

    text = value.strip()
    if parse_dns_listen(text) is None:  # raises ValueError naming the problem
        return "none"
    return text


def _dns_domain(value: str) -> str:
    domain = value.strip().strip(".").lower()
    labels = domain.split(".")
    if not domain or any(
        not 1 <= len(label) <= 63 or not all(c.isalnum() or c == "-" for c in label)
        for label in labels
    ):
        raise ValueError(f"not a DNS domain: {value!r}")
    return domain


def _admin_description(value: str) -> str:
    text = value.strip()
    if text.lower() == "none":
        return "none"
    _check_description(text)
    return text


def _non_negative_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"not a number: {value!r}") from None
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"must be a number >= 0, got {value!r}")
    return number


def _positive_float_value(value: str) -> float:
    number = _non_negative_float(value)
    if number <= 0:
        raise ValueError(f"must be a positive number, got {value!r}")
    return number


def _int_between(low: int, high: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        number = _int_at_least(low)(value)
        if number > high:
            raise ValueError(f"must be at most {high}, got {value!r}")
        return number

    return parse


def _state_path(value: str) -> str:
    if not value.strip():
        raise ValueError("must be a file name, got an empty value")
    if os.path.isdir(value):
        raise ValueError(f"{value!r} is a directory")
    return value


def default_state_file(directory: str) -> str:
    """
    Where the admin states live when --state-file is not given: in the
    store's local directory (beside a SQLite routing database).
    """
    return os.path.join(os.path.abspath(directory), "edgeproxy-state.json")


def redact_db(value: str) -> str:
    """
    A --db value as it may be logged: a URL's password replaced by C{***}.
    """
    scheme, sep, rest = value.partition("://")
    if not sep:
        return value
    rest, question, query = rest.partition("?")
    authority, slash, path = rest.partition("/")
    userinfo, at, hostport = authority.rpartition("@")
    if at and ":" in userinfo:
        user = userinfo.split(":", 1)[0]
        authority = f"{user}:***@{hostport}"
    if question:
        # libpq also takes the password as a parameter (?password=...).
        query = "&".join(
            "password=***" if part.split("=", 1)[0] == "password" else part
            for part in query.split("&")
        )
    return f"{scheme}://{authority}{slash}{path}{question}{query}"


def _region(value: str) -> str:
    region = value.strip()
    if not region or any(c.isspace() for c in region):
        raise ValueError(f"must be a non-empty region code without spaces, got {value!r}")
    return region


def _db_path(value: str) -> str:
    from edgeproxy.stores.open import validate_db

    return validate_db(value)


def _etcd_user(value: str) -> str:
    if not value.strip() or any(c.isspace() for c in value):
        raise ValueError(f"must be a user name without blanks, got {value!r}")
    return value


def _readable_file(value: str) -> str:
    if not value.strip():
        raise ValueError("must be a file name, got an empty value")
    try:
        with open(value, "rb"):
            pass
    except OSError as e:
        raise ValueError(f"cannot read {value!r}: {e.strerror or e}") from None
    return value


def _overrides_file(value: str) -> str:
    from edgeproxy.geo import load_overrides

    load_overrides(_readable_file(value))
    return value


def _regions_file(value: str) -> str:
    from edgeproxy.geo import load_regions

    load_regions(_readable_file(value))
    return value


def _geoip_path(value: str) -> str:
    if value.strip() in ("", NO_GEOIP):
        return NO_GEOIP
    return value


def _flag(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"must be one of 1/0, true/false, yes/no, on/off, got {value!r}")


def parse_network(value: str) -> TrustedSender:
    """
    Parse one C{--proxy-protocol-trusted} value: a CIDR, a single address,
    or C{unix} (L{edgeproxy.net.endpoints.UNIX_PEERS}).
    """
    from edgeproxy.net.endpoints import parse_cidrs

    (network,) = parse_cidrs([value])
    return network


_APP_PREFIX = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.-]*)=(.+)$", re.DOTALL)
_HOST_PORT = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<v4>[0-9.]+)):(?P<port>[0-9]+)$")


def _host_port_description(value: str) -> Optional[str]:
    """
    Turn the original's C{host:port} form (C{0.0.0.0:8080}, C{[::]:8080})
    into an endpoint description, or return C{None} if C{value} is not in
    that form.
    """
    match = _HOST_PORT.match(value)
    if match is None:
        return None
    port = int(match.group("port"))
    if port > 65535:
        raise ValueError(f"port out of range in {value!r}")
    v6 = match.group("v6")
    if v6 is not None:
        try:
            address = ipaddress.IPv6Address(v6)
        except ValueError:
            raise ValueError(f"not an IPv6 address in {value!r}") from None
        return "tcp6:{}:interface={}".format(port, str(address).replace(":", "\\:"))
    try:
        address4 = ipaddress.IPv4Address(match.group("v4"))
    except ValueError:
        raise ValueError(f"not an IPv4 address in {value!r}") from None
    return f"tcp:{port}:interface={address4}"


def _check_description(description: str) -> None:
    """
    Build (but do not start) the endpoint for C{description} against a fake
    reactor, so that a typo stops startup instead of surfacing later.
    """
    from twisted.internet.testing import MemoryReactor

    from edgeproxy.metrics import MetricsStore
    from edgeproxy.net.endpoints import server_endpoint

    try:
        server_endpoint(MemoryReactor(), description, metrics=MetricsStore())
    except Exception as e:
        raise ValueError(f"unusable endpoint description {description!r}: {e}") from None


def parse_listener(value: str) -> ListenerSpec:
    """
    Parse one C{--listen} value: C{[APP=]DESCRIPTION} or C{[APP=]HOST:PORT}.
    """
    text = value.strip()
    if not text:
        raise ValueError("empty listen description")
    app: Optional[str] = None
    match = _APP_PREFIX.match(text)
    if match is not None:
        app, text = match.group(1), match.group(2).strip()
    description = _host_port_description(text) or text
    _check_description(description)
    return ListenerSpec(description=description, app=app)


@attrs.frozen
class _Option:
    """
    One option: its name, its environment variable, its default and parser.

    C{repeat} options take several values (repeated on the command line,
    comma-separated in the environment) and hold a tuple.
    """

    name: str
    env: str
    default: Any
    parse: Callable[[str], Any]
    help: str
    repeat: bool = False
    flag: bool = False


_OPTIONS: tuple[_Option, ...] = (
    _Option(
        "listen",
        "EDGEPROXY_LISTEN_ADDR",
        (ListenerSpec("tcp:8080"),),
        parse_listener,
        "",  # the docstring of Options.opt_listen
        repeat=True,
    ),
    _Option(
        "db",
        "EDGEPROXY_DB_PATH",
        "routing.db",
        _db_path,
        "Routing table: a SQLite file, postgresql://... or etcd://host:port/prefix",
    ),
    _Option("region", "EDGEPROXY_REGION", "sa", _region, "Region of this POP"),
    _Option(
        "db-reload",
        "EDGEPROXY_DB_RELOAD_SECS",
        5.0,
        _positive_float,
        "Seconds between routing table reloads",
    ),
    _Option(
        "binding-ttl",
        "EDGEPROXY_BINDING_TTL_SECS",
        600.0,
        _positive_float,
        "Sliding lifetime of a client binding, seconds",
    ),
    _Option(
        "binding-gc-interval",
        "EDGEPROXY_BINDING_GC_INTERVAL_SECS",
        60.0,
        _positive_float,
        "Seconds between sweeps of expired bindings",
    ),
    _Option(
        "binding-max",
        "EDGEPROXY_BINDING_MAX",
        1_000_000,
        _int_at_least(1),
        "Most bindings held; least recently used go first",
    ),
    # --- geo data (issue 13) ---
    _Option(
        "geoip-db",
        "EDGEPROXY_GEOIP_PATH",
        SHIPPED_GEOIP,
        _geoip_path,
        "MaxMind-format database: GeoIP2/GeoLite2 City or Country, DB-IP Lite,"
        " ip-location-db country files (default: the geo-whois-asn-country database"
        " shipped with edgeproxy; 'none' turns geo off); reloaded when the file changes",
    ),
    _Option(
        "geoip-max-age",
        "EDGEPROXY_GEOIP_MAX_AGE_DAYS",
        60.0,
        _positive_float_value,
        "Days after its build date from which the GeoIP database is reported as stale"
        " (a warning in the log, edgeproxy_geoip_stale, the status page)",
    ),
    _Option(
        "geoip-poll",
        "EDGEPROXY_GEOIP_POLL_SECS",
        5.0,
        _positive_float,
        "Seconds between checks of the GeoIP database file for a new version",
    ),
    # --- end of geo data ---
    _Option(
        "geo-overrides",
        "EDGEPROXY_GEO_OVERRIDES",
        None,
        _overrides_file,
        "File of 'CIDR COUNTRY' lines consulted before the GeoIP database",
    ),
    _Option(
        "regions",
        "EDGEPROXY_REGIONS",
        None,
        _regions_file,
        "File of 'REGION: CC CC ...' lines replacing the built-in country->region table",
    ),
    _Option(
        "connect-timeout",
        "EDGEPROXY_CONNECT_TIMEOUT",
        5.0,
        _positive_float,
        "Seconds for one backend connect attempt",
    ),
    _Option(
        "connect-attempts",
        "EDGEPROXY_CONNECT_ATTEMPTS",
        3,
        _int_at_least(1),
        "Backend connect attempts per client (1 = no failover)",
    ),
    _Option(
        "connect-budget",
        "EDGEPROXY_CONNECT_BUDGET",
        10.0,
        _positive_float,
        "Seconds for all connect attempts of one client together",
    ),
    _Option(
        "idle-timeout",
        "EDGEPROXY_IDLE_TIMEOUT",
        600.0,
        _positive_float,
        "Seconds without a byte either way before a connection is closed",
    ),
    _Option(
        "half-closed-timeout",
        "EDGEPROXY_HALF_CLOSED_TIMEOUT",
        30.0,
        _positive_float,
        "Seconds a connection may stay half-closed",
    ),
    _Option(
        "proxy-header-timeout",
        "EDGEPROXY_PROXY_HEADER_TIMEOUT",
        5.0,
        _positive_float,
        "Seconds for a PROXY header to arrive on haproxy: listeners",
    ),
    _Option(
        "max-connections",
        "EDGEPROXY_MAX_CONNECTIONS",
        10000,
        _int_at_least(0),
        "Concurrent client connections across all listeners (0 = unlimited)",
    ),
    _Option(
        "client-max-connections",
        "EDGEPROXY_CLIENT_MAX_CONNECTIONS",
        0,
        _int_at_least(0),
        "Concurrent connections one client (IPv6: one /64) may hold (0 = no limit)",
    ),
    _Option(
        "client-rate",
        "EDGEPROXY_CLIENT_RATE",
        0.0,
        _non_negative_float,
        "New connections per second one client may open, a token bucket (0 = no limit)",
    ),
    _Option(
        "client-burst",
        "EDGEPROXY_CLIENT_BURST",
        None,
        _positive_float_value,
        "Connections a client may open at once, refilled at --client-rate",
    ),
    _Option(
        "proxy-protocol-trusted",
        "EDGEPROXY_PROXY_PROTOCOL_TRUSTED",
        tuple(ipaddress.ip_network(n) for n in DEFAULT_TRUSTED),
        parse_network,
        "",  # the docstring of Options.opt_proxy_protocol_trusted
        repeat=True,
    ),
    _Option(
        "tls-handshake-timeout",
        "EDGEPROXY_TLS_HANDSHAKE_TIMEOUT",
        10.0,
        _positive_float,
        "Seconds for a TLS handshake on txsni: listeners, and for the whole"
        " ClientHello on sni: listeners",
    ),
    _Option(
        "binding-ipv6-prefix",
        "EDGEPROXY_BINDING_IPV6_PREFIX",
        64,
        _int_between(0, 128),
        "IPv6 clients are bound to a backend by this prefix (64: their /64, inside"
        " which privacy addresses rotate; 128: each address)",
    ),
    _Option(
        "health-check",
        "EDGEPROXY_HEALTH_CHECK",
        "tcp",
        _health_check,
        "Active check of every backend: tcp (connect), http:PATH (GET, 2xx/3xx is up,"
        " no redirect followed) or off; the health_check column overrides it per backend",
    ),
    _Option(
        "health-interval",
        "EDGEPROXY_HEALTH_INTERVAL",
        2.0,
        _positive_float,
        "Seconds between checks of one backend (each spread by up to 10%)",
    ),
    _Option(
        "health-timeout",
        "EDGEPROXY_HEALTH_TIMEOUT",
        1.0,
        _positive_float,
        "Seconds one check may take",
    ),
    _Option(
        "health-rise",
        "EDGEPROXY_HEALTH_RISE",
        2,
        _int_at_least(1),
        "Passed checks in a row that bring a down backend back",
    ),
    _Option(
        "health-fall",
        "EDGEPROXY_HEALTH_FALL",
        3,
        _int_at_least(1),
        "Failed checks that take an up backend out of routing",
    ),
    _Option(
        "breaker-failures",
        "EDGEPROXY_BREAKER_FAILURES",
        5,
        _int_at_least(0),
        "Consecutive connect failures that open a backend's circuit breaker (0 = off)",
    ),
    _Option(
        "breaker-cooldown",
        "EDGEPROXY_BREAKER_COOLDOWN",
        30.0,
        _positive_float,
        "Seconds an open breaker waits before one trial connection",
    ),
    _Option(
        "panic-routing",
        "EDGEPROXY_PANIC_ROUTING",
        True,
        _flag,
        "on: when health checks or breakers eject every candidate, route to the best"
        " of them anyway (Envoy's panic mode); off: refuse the client",
    ),
    _Option(
        "lean-path",
        "EDGEPROXY_LEAN_PATH",
        True,
        _flag,
        "on: plain TCP legs take the lean path (own backend sockets for IP literals,"
        " lean accepted transports); off: Twisted's connectTCP and tcp.Server for every leg",
    ),
    _Option(
        "workers",
        "EDGEPROXY_WORKERS",
        1,
        lambda v: _workers(v),
        "worker processes accepting on the listeners, a number or auto (the CPUs this"
        " process may run on); above 1 this process supervises them (see the README's"
        " Several workers)",
    ),
    _Option(
        "splice",
        "EDGEPROXY_SPLICE",
        True,
        _flag,
        "on: a bulk stream between two lean legs is relayed with splice(2) through a pipe"
        " (Linux, Python 3.10+); off: every byte is copied through the proxy",
    ),
    # --- RTT-aware closeness (issue 13) ---
    _Option(
        "rtt-weight",
        "EDGEPROXY_RTT_WEIGHT",
        0.01,
        _non_negative_float,
        "Score points per millisecond of a backend's health-check connect RTT inside a"
        " geo tier (0.01: 100 ms weigh as much as a full soft limit of load); 0 = no RTT term",
    ),
    _Option(
        "state-file",
        "EDGEPROXY_STATE_FILE",
        None,
        _state_path,
        "JSON file keeping the backends' admin states (drain, maint) across reloads and"
        " restarts; edgeproxy-ctl state writes it",
    ),
    _Option(
        "admin",
        "EDGEPROXY_ADMIN",
        "tcp:8090:interface=127.0.0.1",
        _admin_description,
        "Admin HTTP listener (an endpoint description; /metrics for Prometheus,"
        " /health); none to disable",
    ),
    _Option(
        "api-token-file",
        "EDGEPROXY_API_TOKEN_FILE",
        None,
        _readable_file,
        "Bearer tokens of the admin API, one per line ('TOKEN' or 'TOKEN register');"
        " without it every write is refused, and --admin must be on loopback",
    ),
    _Option(
        "heartbeat-ttl",
        "EDGEPROXY_HEARTBEAT_TTL",
        30.0,
        _positive_float,
        "Seconds after its last heartbeat a registered backend stops taking new connections",
    ),
    # --- etcd (--db etcd://...) ---
    _Option(
        "etcd-user",
        "EDGEPROXY_ETCD_USER",
        None,
        _etcd_user,
        "etcd user name (with --etcd-password-file); without it, no etcd authentication",
    ),
    _Option(
        "etcd-password-file",
        "EDGEPROXY_ETCD_PASSWORD_FILE",
        None,
        _readable_file,
        "File holding the etcd user's password (one line)",
    ),
    _Option(
        "etcd-ca",
        "EDGEPROXY_ETCD_CA",
        None,
        _readable_file,
        "CA certificates (PEM) that etcd's server certificates must chain to (etcds://);"
        " the system's roots by default",
    ),
    _Option(
        "etcd-cert",
        "EDGEPROXY_ETCD_CERT",
        None,
        _readable_file,
        "TLS client certificate (PEM) for etcd (etcds://), with --etcd-key",
    ),
    _Option(
        "etcd-key",
        "EDGEPROXY_ETCD_KEY",
        None,
        _readable_file,
        "Private key (PEM) of --etcd-cert",
    ),
    _Option(
        "db-cache",
        "EDGEPROXY_DB_CACHE",
        None,
        _state_path,
        "Offline cache of an etcd routing table (a SQLite file, written after each"
        " change; a POP started while etcd is unreachable starts from it);"
        " default edgeproxy-etcd-cache.db in the working directory",
    ),
    _Option(
        "dns",
        "EDGEPROXY_DNS",
        "none",
        _dns_listen,
        "Internal geo DNS on [HOST:]PORT, UDP and TCP (a bare port is on 127.0.0.1);"
        " none to disable",
    ),
    _Option(
        "dns-domain",
        "EDGEPROXY_DNS_DOMAIN",
        "edge.internal",
        _dns_domain,
        "Zone the DNS answers: APP.DOMAIN, REGION.backends.DOMAIN, REGION.pops.DOMAIN",
    ),
    _Option(
        "dns-ttl",
        "EDGEPROXY_DNS_TTL",
        30,
        _int_between(0, 86400),
        "TTL of the DNS answers, seconds",
    ),
    _Option(
        "access-log",
        "EDGEPROXY_ACCESS_LOG",
        None,
        _state_path,
        "Also write one JSON object per connection to this file (buffered, off the"
        " reactor thread; reopened on SIGUSR1 for logrotate)",
    ),
    _Option(
        "shutdown-timeout",
        "EDGEPROXY_SHUTDOWN_TIMEOUT",
        30.0,
        _positive_float,
        "On SIGTERM, seconds open connections may take to finish before they are closed",
    ),
    _Option(
        "debug",
        "EDGEPROXY_DEBUG",
        False,
        _flag,
        "Debug mode: Deferred debugging on, full configuration logged at startup",
        flag=True,
    ),
)

_BY_NAME = {o.name: o for o in _OPTIONS}


def _describe_default(option: _Option) -> str:
    if option.flag:
        return "off"
    if option.name == "listen":
        return "tcp:8080"
    if option.name == "proxy-protocol-trusted":
        return ", ".join(DEFAULT_TRUSTED)
    if option.name == "geoip-db":
        return "shipped geo-whois-asn-country"
    if option.name == "client-burst":
        return "the rate, at least 1"
    if option.name == "state-file":
        return "edgeproxy-state.json beside --db"
    if option.default is True:
        return "on"
    if option.default is None:
        return "none"
    if isinstance(option.default, float) and option.default.is_integer():
        return str(int(option.default))
    return str(option.default)


def _help(option: _Option) -> str:
    return f"{option.help} [default: {_describe_default(option)}; env {option.env}]"


class Options(usage.Options):
    """
    Options of C{twistd edgeproxy}.

    After L{parseOptions}, every option name (C{"listen"}, C{"db"},
    C{"db-reload"}...) maps to its parsed value: command-line values where
    given, defaults elsewhere.  L{applyEnvironment} then fills the options
    the command line did not give from C{EDGEPROXY_*} variables.
    C{sources[name]} says where each value came from.
    """

    synopsis = "[options]"
    # Not LONGDESC: usage.Options would reflow it into one paragraph (see
    # getUsage).
    longdesc = ""

    optFlags = [["debug", None, _help(_BY_NAME["debug"])]]
    optParameters = [[o.name, None, None, _help(o)] for o in _OPTIONS if not (o.repeat or o.flag)]

    def __init__(self) -> None:
        super().__init__()
        self._repeated: dict[str, list[str]] = {"listen": [], "proxy-protocol-trusted": []}
        self.sources: dict[str, str] = {}
        self.given: set[str] = set()
        self.arguments: list[str] = []

    def parseOptions(self, options: Optional[Sequence[str]] = None) -> None:
        """
        Parse C{options} (the command line by default), as
        L{usage.Options.parseOptions} does.

        Run by twistd (as its C{edgeproxy} subcommand, so with a C{parent}),
        a bad option or value ends the process with one line naming it and a
        hint on stderr and status 1: twistd itself would print the whole
        help on stdout first, and before Twisted 26.10 exit with status 0.

        @raise usage.UsageError: For a bad option or value, when parsed
            without a parent command (by a program or a test).
        @raise SystemExit: Instead, under twistd.
        """
        #: The arguments as given (a supervisor starts its workers with them).
        self.arguments = list(options) if options is not None else list(sys.argv[1:])
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            if self.parent is None:
                raise
            raise SystemExit(f"edgeproxy: {e}\nsee: twistd edgeproxy --help") from None

    def getUsage(self, width: Optional[int] = None) -> str:
        """
        The options, one per entry with its help wrapped beside it, then
        L{LONGDESC} exactly as written.

        usage.Options renders the same layout but wraps help text at hyphens
        and inside long words (C{comma-} / C{separated},
        C{EDGEPROXY_BINDING_G} / C{C_INTERVAL_SECS}) and reflows a
        C{longdesc} into one paragraph (C{interface=} / C{127.0.0.1}).

        @param width: Columns to wrap the help to; by default C{$COLUMNS}
            or 80, as usage.Options does.
        """
        if not width:
            width = int(os.environ.get("COLUMNS", "80"))
        shorts = {long: key for key, long in self.synonyms.items() if len(key) == 1}
        names = sorted(self.longOpt, key=lambda n: shorts.get(n.rstrip("="), n.rstrip("=")))
        name_width = max(len(n) for n in names)
        indent = " " * (name_width + len("  -s, --  "))
        lines = ["Options:"]
        for name in names:
            short = shorts.get(name.rstrip("="))
            lead = f"  -{short}, --" if short else "      --"
            doc = textwrap.wrap(
                " ".join((self.docs.get(name.rstrip("=")) or "").split()),
                max(width - len(indent), 20),
                break_on_hyphens=False,
                break_long_words=False,
            ) or [""]
            lines.append(f"{lead}{name:<{name_width}}  {doc[0]}".rstrip())
            lines.extend(indent + more for more in doc[1:])
        return "\n".join(lines) + "\n\n" + LONGDESC

    def opt_version(self) -> None:
        """
        Display edgeproxy's version (and Twisted's) and exit.
        """
        import platform

        from edgeproxy import __version__
        from edgeproxy.geo import SHIPPED_ATTRIBUTION, SHIPPED_DATABASE, default_geoip_path
        from twisted import copyright

        print(
            f"edgeproxy {__version__} (Twisted {copyright.version},"
            f" Python {platform.python_version()})"
        )
        shipped = default_geoip_path()
        built = ""
        if shipped is not None:
            try:
                from edgeproxy.geo import open_database

                database = open_database(shipped)
                built = f", built {database.builtDate}"
                database.close()
            except ValueError:
                built = ", unreadable"
        print(
            f"Shipped GeoIP database: {SHIPPED_DATABASE}{built if shipped else ', not installed'}"
        )
        print(SHIPPED_ATTRIBUTION)
        raise SystemExit(0)

    def opt_listen(self, value: str) -> None:
        """
        Listen on this endpoint; repeat for several.  APP=DESC routes only to
        APP's backends; host:port is accepted; sni:DESC routes TLS by its
        server name (the sni column) without terminating it, APP=sni:DESC
        sending unknown names there. [default: tcp:8080; env
        EDGEPROXY_LISTEN_ADDR, comma-separated]
        """
        self._repeated["listen"].append(value)

    def opt_proxy_protocol_trusted(self, value: str) -> None:
        """
        Accept PROXY headers only from this CIDR or address, or with "unix"
        from any peer of a haproxy:unix: listener (never trusted by default:
        whoever can open the socket could claim any client address); repeat
        for several. [default: 127.0.0.0/8, ::1/128; env
        EDGEPROXY_PROXY_PROTOCOL_TRUSTED, comma-separated]
        """
        self._repeated["proxy-protocol-trusted"].append(value)

    def postOptions(self) -> None:
        """
        Parse and check every command-line value; fill in the defaults.
        """
        for option in _OPTIONS:
            if option.repeat:
                raw: Any = self._repeated[option.name] or None
            elif option.flag:
                raw = True if self[option.name] else None
            else:
                raw = self[option.name]
            if raw is None:
                self[option.name] = option.default
                self.sources[option.name] = "default"
                continue
            self.given.add(option.name)
            self.sources[option.name] = "command line"
            if option.flag:
                self[option.name] = True
            elif option.repeat:
                self[option.name] = tuple(_convert(option, v, f"--{option.name}") for v in raw)
            else:
                self[option.name] = _convert(option, raw, f"--{option.name}")

    def applyEnvironment(self, environ: Mapping[str, str]) -> None:
        """
        Take each option the command line did not give from its C{EDGEPROXY_*}
        variable in C{environ}, if set and not empty.

        @raise usage.UsageError: naming the option and the variable, if a
            value is invalid.
        """
        for option in _OPTIONS:
            if option.name in self.given:
                continue
            value = environ.get(option.env)
            if value is None or (value.strip() == "" and not option.flag):
                continue
            where = f"--{option.name} (from {option.env})"
            if option.repeat:
                parts = [p for p in (s.strip() for s in value.split(",")) if p]
                if not parts:
                    continue
                self[option.name] = tuple(_convert(option, p, where) for p in parts)
            else:
                self[option.name] = _convert(option, value, where)
            self.sources[option.name] = option.env

    def settings(self) -> ProxySettings:
        """
        The per-connection settings these options describe.
        """
        return ProxySettings(
            connect_timeout=self["connect-timeout"],
            connect_budget=self["connect-budget"],
            max_attempts=self["connect-attempts"],
            idle_timeout=self["idle-timeout"],
            half_closed_timeout=self["half-closed-timeout"],
            max_connections=self["max-connections"],
            lean=self["lean-path"],
            splice=self["splice"],
        )


def _convert(option: _Option, value: str, where: str) -> Any:
    try:
        return option.parse(value)
    except ValueError as e:
        raise usage.UsageError(f"{where}: {e}") from None


def _fatal(message: str) -> SystemExit:
    """
    An exit that twistd reports as one line on stderr, status 1, no traceback.
    """
    return SystemExit(f"edgeproxy: {message}")


def _listener_names(listeners: Iterable[ListenerSpec]) -> list[str]:
    return [s.description if s.app is None else f"{s.app}={s.description}" for s in listeners]


# usage.Options shows an opt_ method's docstring as its help text, with the
# docstring's line-break indentation intact: fold it to single spaces.
for _method in (Options.opt_listen, Options.opt_proxy_protocol_trusted):
    _method.__doc__ = " ".join((_method.__doc__ or "").split())


def raise_nofile_limit(max_connections: int, reserve: int = 0) -> int:
    """
    Raise this process's soft file descriptor limit to what
    C{max_connections} proxied connections need (two descriptors each, plus
    headroom), within the hard limit; warn when the hard limit is too low.

    @param reserve: Descriptors wanted on top (the splice pipes), where the
        hard limit allows; no warning when it does not.
    @return: The soft limit now in force.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    infinity = resource.RLIM_INFINITY
    needed = 2 * max_connections + 64 if max_connections else hard
    wanted = needed + reserve if max_connections else needed
    want = wanted if hard == infinity else min(wanted, hard)
    if soft != infinity and want != infinity and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        soft = want
    if max_connections and hard != infinity and hard < needed:
        _log.warn(
            "file descriptor hard limit {hard} is below the {needed} that"
            " --max-connections {cap} needs; raise LimitNOFILE / ulimit -Hn,"
            " or lower --max-connections",
            hard=hard,
            needed=needed,
            cap=max_connections,
        )
    return soft


def makeService(
    options: Options,
    reactor: Any = None,
    environ: Optional[Mapping[str, str]] = None,
) -> IService:
    """
    Build the edgeproxy service tree from C{options}.

    Reads C{os.environ} and the global reactor unless C{environ} and
    C{reactor} are given (tests give both).  Loads the routing table
    synchronously, so the listeners never accept before it is in force.

    @raise SystemExit: with a one-line reason when an environment value is
        invalid, the routing database is unusable (corrupt, not a database,
        unreadable) or a geo file cannot be used.
    """
    from edgeproxy.geo import GeoIPResolver
    from edgeproxy.metrics import MetricsStore
    from edgeproxy.routing.bindings import BindingTable
    from edgeproxy.routing.router import Router
    from edgeproxy.service import build_service

    if environ is None:
        environ = os.environ
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor

    try:
        options.applyEnvironment(environ)
    except usage.UsageError as e:
        raise _fatal(str(e)) from None

    if options["debug"]:
        setDebugging(True)
        for option in _OPTIONS:
            _log.debug(
                "option --{name} = {value!r} (from {source})",
                name=option.name,
                value=redact_db(options[option.name])
                if option.name == "db"
                else options[option.name],
                source=options.sources.get(option.name, "default"),
            )

    from edgeproxy.net import splice

    cap = options["max-connections"]
    settings = options.settings()
    if settings.splice and splice.AVAILABLE:
        # Two descriptors per pipe on top of the connections' own: the
        # pipes get what the hard limit leaves once the cap is served.
        soft = raise_nofile_limit(cap, 2 * splice.PIPE_LIMIT)
        if cap:
            pipes = max(0, min(splice.PIPE_LIMIT, (soft - (2 * cap + 64)) // 2))
            settings = attrs.evolve(settings, splice_pipes=pipes)
    else:
        raise_nofile_limit(cap)

    from edgeproxy.net.workers import WORKER_ENV, WorkerFds, WorkerMetrics

    worker_fds: Optional[WorkerFds] = None
    if environ.get(WORKER_ENV):
        try:
            worker_fds = WorkerFds.decode(environ[WORKER_ENV])
        except ValueError as e:
            raise _fatal(str(e)) from None
    supervising = worker_fds is None and options["workers"] > 1
    metrics = WorkerMetrics() if supervising else MetricsStore()
    from edgeproxy.stores.open import StoreError, open_store

    try:
        store = open_store(options["db"], reactor, metrics, options)
    except StoreError as e:
        shown = redact_db(options["db"])
        raise _fatal(f"cannot load the routing database {shown!r} (--db): {e}") from None
    repository = store.repository

    geoip: Optional[str] = options["geoip-db"]
    if geoip == NO_GEOIP:
        geoip = ""  # fromPaths: no database
    elif geoip == SHIPPED_GEOIP:
        geoip = None  # fromPaths: the shipped default
    from edgeproxy.geo import GeoDatabaseError

    try:
        geo = GeoIPResolver.fromPaths(
            geoip,
            options["geo-overrides"],
            options["regions"],
            maxAge=options["geoip-max-age"] * 86400,
        )
    except GeoDatabaseError as e:
        raise _fatal(f"cannot use --geoip-db: {e}") from None
    except (OSError, ValueError) as e:
        raise _fatal(f"cannot use --geo-overrides/--regions: {e}") from None
    geo.warnIfStale(time.time())
    from edgeproxy.geo import DEFAULT_REGIONS, load_regions

    geo_regions = load_regions(options["regions"]) if options["regions"] else DEFAULT_REGIONS

    from edgeproxy.net.resolve import HostResolver, backend_hosts

    resolver = HostResolver(reactor)
    # Before listening: names the table uses have addresses from the first
    # connection on (later names are resolved in the background).
    resolver.resolveBlocking(backend_hosts(repository.current()))

    from edgeproxy.routing.admin import AdminStates
    from edgeproxy.routing.breaker import CircuitBreaker
    from edgeproxy.routing.overlay import StateOverlay
    from edgeproxy.stores.statefile import StateFile, StateFileError

    overlay = StateOverlay()
    admin = AdminStates(overlay)
    state_path = options["state-file"] or default_state_file(store.localDirectory)
    state_file = StateFile(state_path, admin, reactor)
    try:
        held = state_file.loadInitial()
    except StateFileError as e:
        raise _fatal(f"cannot use the admin state file (--state-file): {e}") from None
    if held:
        _log.info(
            "{count} admin states from {path}: {states}",
            count=held,
            path=state_path,
            states=", ".join(f"{b} {s.state}" for b, s in sorted(admin.all().items())),
        )
    breaker = CircuitBreaker(
        overlay, reactor, options["breaker-failures"], options["breaker-cooldown"], metrics
    )
    bindings = BindingTable(ttl=options["binding-ttl"], max_size=options["binding-max"])
    load: Any = None
    counters: Any = None
    if worker_fds is not None or supervising:
        from edgeproxy.net.sharedload import SharedCounters, SharedLoadTable, SharedLoadView

        try:
            if worker_fds is not None:
                counters = SharedCounters.attach(
                    worker_fds.counters, worker_fds.count, worker_fds.slots
                )
                load = SharedLoadTable(counters, worker_fds.index, metrics)
            else:
                counters = SharedCounters.create(options["workers"])
                load = SharedLoadView(counters)
        except OSError as e:
            raise _fatal(f"cannot share connection counts between workers: {e}") from None
    router = Router(
        repository,
        bindings,
        geo,
        metrics,
        options["region"],
        reactor,
        overlay=overlay,
        ipv6_prefix=options["binding-ipv6-prefix"],
        breaker=breaker,
        panic=options["panic-routing"],
        rtt_weight=options["rtt-weight"],
        load=load,
    )
    from edgeproxy.net.health import HealthChecker

    # Always there: with --health-check off it still checks the backends
    # whose health_check column asks for it.
    health = HealthChecker(
        reactor,
        overlay,
        default=options["health-check"],
        interval=options["health-interval"],
        timeout=options["health-timeout"],
        rise=options["health-rise"],
        fall=options["health-fall"],
        resolver=resolver,
        metrics=metrics,
    )
    health_checker: Any = health
    if worker_fds is not None:
        # The supervisor checks, once per machine, and sends this worker the
        # verdicts and RTTs.
        from edgeproxy.routing.load import RttTable

        health_checker = None
        router.rtt = RttTable()
    from edgeproxy.net.limits import ClientLimiter

    limiter = ClientLimiter(
        options["client-max-connections"],
        options["client-rate"],
        options["client-burst"],
        clock=reactor,
        max_clients=max(100_000, options["max-connections"]),
        metrics=metrics,
    )
    from edgeproxy.control.auth import TokenFileError, check_admin_security, load_tokens

    tokens = None
    if options["api-token-file"]:
        try:
            tokens = load_tokens(options["api-token-file"])
        except TokenFileError as e:
            raise _fatal(f"--api-token-file: {e}") from None
    try:
        check_admin_security(None if options["admin"] == "none" else options["admin"], tokens)
    except ValueError as e:
        raise _fatal(f"--admin: {e}") from None

    from edgeproxy.control.dns import DNSResolver, dns_service

    pops = store.pops
    dns = None
    if options["dns"] != "none" and worker_fds is None:
        dns = dns_service(
            reactor,
            options["dns"],
            DNSResolver(
                repository,
                geo,
                router,
                pops,
                domain=options["dns-domain"],
                ttl=options["dns-ttl"],
                hosts=resolver,
            ),
            metrics,
        )
    access_log = None
    if options["access-log"] and not supervising:
        from edgeproxy.net.accesslog import AccessLog, AccessLogError

        try:
            access_log = AccessLog(options["access-log"], reactor, metrics)
        except AccessLogError as e:
            raise _fatal(f"--access-log: {e}") from None
    reactor.callWhenRunning(_exit_zero_on_sigterm, reactor)

    listeners: Sequence[ListenerSpec] = options["listen"]
    socket_endpoints: Any = None
    steerings: Any = None
    handoff: Any = None
    addresses: list[tuple[str, int, bool]] = []
    supervised: Sequence[ListenerSpec] = ()
    if supervising:
        addresses = [_socket_address(reactor, spec) for spec in listeners]
        supervised, listeners = listeners, ()
    elif worker_fds is not None:
        import socket as _socket

        from edgeproxy.net.workers import AdoptedPortEndpoint, Handoff, ListenerSteering

        if len(worker_fds.listeners) != len(listeners):
            raise _fatal(
                f"worker {worker_fds.index}: {len(worker_fds.listeners)} sockets"
                f" for {len(listeners)} listeners"
            )
        handoff = Handoff(
            reactor,
            worker_fds.index,
            worker_fds.count,
            worker_fds.ipv6_prefix,
            [None if fd < 0 else _socket.socket(fileno=fd) for fd in worker_fds.outboxes],
            metrics,
        )
        socket_endpoints = [
            AdoptedPortEndpoint(reactor, fd, family, index, handoff)
            for index, (fd, family) in enumerate(zip(worker_fds.listeners, worker_fds.families))
        ]
        steerings = [ListenerSteering(handoff, index) for index in range(len(listeners))]

    top = build_service(
        reactor=reactor,
        repository=repository,
        bindings=bindings,
        geo=geo,
        metrics=metrics,
        router=router,
        listeners=listeners,
        socket_endpoints=socket_endpoints,
        steerings=steerings,
        settings=settings,
        trusted=options["proxy-protocol-trusted"],
        header_timeout=options["proxy-header-timeout"],
        tls_handshake_timeout=options["tls-handshake-timeout"],
        db_reload=options["db-reload"],
        binding_gc=options["binding-gc-interval"],
        region=options["region"],
        geo_description=geo.describe(),
        geo_poll=options["geoip-poll"],
        resolver=resolver,
        shutdown_timeout=options["shutdown-timeout"],
        admin_states=admin,
        state_file=state_file,
        health_checker=health_checker,
        access_log=access_log,
        client_limiter=limiter,
        admin="none" if worker_fds is not None else options["admin"],
        dns=dns,
        pops=pops,
        api_tokens=tokens,
        heartbeat_ttl=options["heartbeat-ttl"],
        regions=geo_regions,
        writer=store.writer,
        store_services=store.services,
    )
    if worker_fds is not None:
        from edgeproxy.net.workers import WorkerRuntime

        top.admission.shared = load
        # Slots for every backend of the table, so that other workers' counts
        # reach this one's scoring before it first connects to them.
        load.follow(repository.current().backends)
        repository.addListener(lambda old, new: load.follow(new.backends))
        WorkerRuntime(
            reactor,
            worker_fds,
            metrics=metrics,
            load=load,
            overlay=overlay,
            rtts=router.rtt,
            handoff=handoff,
            bindings=bindings,
            admission=top.admission,
            state_file=state_file,
        ).setServiceParent(top)
    elif supervising:
        # For the startup summary: the workers' listeners.
        top.listeners = list(supervised)
        _supervise(reactor, options, top, addresses, counters, load, metrics, health, admin)
    return top


def _socket_address(reactor: Any, spec: ListenerSpec) -> tuple[str, int, bool]:
    """
    Where a listener's sockets listen (host, port) and whether connections
    on it may be steered by their peer address (no PROXY header on it).
    """
    from twisted.internet.endpoints import (
        TCP4ServerEndpoint,
        TCP6ServerEndpoint,
        serverFromString,
    )

    from edgeproxy.net.endpoints import socket_layer

    inner, behind = socket_layer(spec.description)
    endpoint = serverFromString(reactor, inner)
    if not isinstance(endpoint, (TCP4ServerEndpoint, TCP6ServerEndpoint)):
        raise _fatal(
            f"--workers: listener {spec.description!r} is not a TCP socket"
            " (several workers share TCP listeners only)"
        )
    host = endpoint._interface  # type: ignore[attr-defined]
    if not host:
        host = "::" if isinstance(endpoint, TCP6ServerEndpoint) else "0.0.0.0"
    return host, int(endpoint._port), not behind  # type: ignore[attr-defined]


def _supervise(
    reactor: Any,
    options: Options,
    top: Any,
    addresses: Sequence[tuple[str, int, bool]],
    counters: Any,
    load: Any,
    metrics: Any,
    health: Any,
    admin: Any,
) -> None:
    """
    Make C{top} the supervisor of C{--workers} worker processes: it owns
    their sockets and shared counters, and its admin listener shows them
    all.
    """
    import signal

    from twisted.application.internet import TimerService

    from edgeproxy.net.workers import (
        GroupAdmission,
        GroupBindings,
        WorkerSupervisor,
        forward_signals,
        worker_command,
    )

    supervisor = WorkerSupervisor(
        reactor,
        options["workers"],
        addresses,
        worker_command(options.arguments, reactor),
        counters=counters,
        metrics=metrics,
        ipv6_prefix=options["binding-ipv6-prefix"],
        shutdown_timeout=options["shutdown-timeout"],
        overlay=getattr(top.router, "overlay", None),
        rtts=health.rtts if health is not None else None,
        state=admin,
    )
    supervisor.setServiceParent(top)
    top.supervisor = supervisor
    # The admin listener's figures are the whole group's.
    group = GroupAdmission(counters, options["max-connections"])
    bindings = GroupBindings(metrics)
    top.admission = group
    for part in (getattr(top, "status", None), getattr(top, "collector", None)):
        if part is not None:
            part.admission = group
            part.bindings = bindings
    track = getattr(load, "track", None)
    if callable(track):
        repository = top.repository
        track(b.id for b in repository.current().backends)
        repository.addListener(lambda old, new: track(b.id for b in new.backends))
    refresh = getattr(load, "refresh", None)
    if callable(refresh):
        refreshing = TimerService(1.0, refresh)
        refreshing.clock = reactor
        refreshing.setServiceParent(top)
    if options["access-log"]:
        # The workers write the access log: SIGUSR1 (logrotate) reopens theirs.
        reactor.callWhenRunning(forward_signals, supervisor, (signal.SIGUSR1,))


def _exit_zero_on_sigterm(reactor: Any) -> None:
    """
    Replace twistd's SIGTERM handler (stop, then die by the signal) with one
    that stops the reactor, which runs the graceful shutdown, and then lets
    the process exit with status 0 (FAULTS F15).
    """
    import signal

    stopping: list[int] = []

    def terminate(signum: int, frame: Any) -> None:
        if stopping:
            # Already shutting down (systemd signals a whole control group,
            # so a worker hears it from systemd and from its supervisor).
            return
        stopping.append(signum)
        _log.info("SIGTERM: shutting down gracefully")
        reactor.callFromThread(reactor.stop)

    try:
        signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # not the main thread (an embedding application)
        pass


__all__: Sequence[str] = [
    "DEFAULT_TRUSTED",
    "Options",
    "makeService",
    "parse_listener",
    "parse_network",
]
