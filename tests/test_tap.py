"""
Tests for L{edgeproxy.tap}: the options of C{twistd edgeproxy}, their
environment variables and their validation.
"""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
from pathlib import Path

import pytest
from faultkit import edgeproxy_argv, edgeproxy_env
from twisted.python import usage

from edgeproxy.config import ListenerSpec, ProxySettings
from edgeproxy.tap import LONGDESC, Options, parse_listener, parse_network

ROOT = Path(__file__).resolve().parent.parent

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))

#: Every option name with its environment variable.
ENV_NAMES = {
    "listen": "EDGEPROXY_LISTEN_ADDR",
    "db": "EDGEPROXY_DB_PATH",
    "region": "EDGEPROXY_REGION",
    "db-reload": "EDGEPROXY_DB_RELOAD_SECS",
    "binding-ttl": "EDGEPROXY_BINDING_TTL_SECS",
    "binding-gc-interval": "EDGEPROXY_BINDING_GC_INTERVAL_SECS",
    "binding-max": "EDGEPROXY_BINDING_MAX",
    "geoip-db": "EDGEPROXY_GEOIP_PATH",
    "geoip-max-age": "EDGEPROXY_GEOIP_MAX_AGE_DAYS",
    "geoip-poll": "EDGEPROXY_GEOIP_POLL_SECS",
    "geo-overrides": "EDGEPROXY_GEO_OVERRIDES",
    "regions": "EDGEPROXY_REGIONS",
    "connect-timeout": "EDGEPROXY_CONNECT_TIMEOUT",
    "connect-attempts": "EDGEPROXY_CONNECT_ATTEMPTS",
    "connect-budget": "EDGEPROXY_CONNECT_BUDGET",
    "idle-timeout": "EDGEPROXY_IDLE_TIMEOUT",
    "half-closed-timeout": "EDGEPROXY_HALF_CLOSED_TIMEOUT",
    "proxy-header-timeout": "EDGEPROXY_PROXY_HEADER_TIMEOUT",
    "max-connections": "EDGEPROXY_MAX_CONNECTIONS",
    "proxy-protocol-trusted": "EDGEPROXY_PROXY_PROTOCOL_TRUSTED",
    "tls-handshake-timeout": "EDGEPROXY_TLS_HANDSHAKE_TIMEOUT",
    "binding-ipv6-prefix": "EDGEPROXY_BINDING_IPV6_PREFIX",
    "health-check": "EDGEPROXY_HEALTH_CHECK",
    "health-interval": "EDGEPROXY_HEALTH_INTERVAL",
    "health-timeout": "EDGEPROXY_HEALTH_TIMEOUT",
    "health-rise": "EDGEPROXY_HEALTH_RISE",
    "health-fall": "EDGEPROXY_HEALTH_FALL",
    "breaker-failures": "EDGEPROXY_BREAKER_FAILURES",
    "breaker-cooldown": "EDGEPROXY_BREAKER_COOLDOWN",
    "panic-routing": "EDGEPROXY_PANIC_ROUTING",
    "lean-path": "EDGEPROXY_LEAN_PATH",
    "workers": "EDGEPROXY_WORKERS",
    "splice": "EDGEPROXY_SPLICE",
    "rtt-weight": "EDGEPROXY_RTT_WEIGHT",
    "state-file": "EDGEPROXY_STATE_FILE",
    "admin": "EDGEPROXY_ADMIN",
    "api-token-file": "EDGEPROXY_API_TOKEN_FILE",
    "heartbeat-ttl": "EDGEPROXY_HEARTBEAT_TTL",
    "etcd-user": "EDGEPROXY_ETCD_USER",
    "etcd-password-file": "EDGEPROXY_ETCD_PASSWORD_FILE",
    "etcd-ca": "EDGEPROXY_ETCD_CA",
    "etcd-cert": "EDGEPROXY_ETCD_CERT",
    "etcd-key": "EDGEPROXY_ETCD_KEY",
    "db-cache": "EDGEPROXY_DB_CACHE",
    "dns": "EDGEPROXY_DNS",
    "dns-domain": "EDGEPROXY_DNS_DOMAIN",
    "dns-ttl": "EDGEPROXY_DNS_TTL",
    "access-log": "EDGEPROXY_ACCESS_LOG",
    "client-max-connections": "EDGEPROXY_CLIENT_MAX_CONNECTIONS",
    "client-rate": "EDGEPROXY_CLIENT_RATE",
    "client-burst": "EDGEPROXY_CLIENT_BURST",
    "shutdown-timeout": "EDGEPROXY_SHUTDOWN_TIMEOUT",
    "debug": "EDGEPROXY_DEBUG",
}


def parsed(*argv: str, environ: dict[str, str] | None = None) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    options.applyEnvironment(environ or {})
    return options


@pytest.fixture
def overrides(tmp_path: Path) -> str:
    path = tmp_path / "overrides.txt"
    path.write_text("# the WireGuard overlay\n10.50.1.0/24 BR\n")
    return str(path)


@pytest.fixture
def regions(tmp_path: Path) -> str:
    path = tmp_path / "regions.txt"
    path.write_text("sa: BR AR\neu: FR DE\n")
    return str(path)


def test_defaults() -> None:
    """
    Without command line or environment every option has the documented
    default, and says so in C{sources}.
    """
    options = parsed()
    assert options["listen"] == (ListenerSpec("tcp:8080"),)
    assert options["db"] == "routing.db"
    assert options["region"] == "sa"
    assert options["db-reload"] == 5.0
    assert options["binding-ttl"] == 600.0
    assert options["binding-gc-interval"] == 60.0
    assert options["binding-max"] == 1_000_000
    assert options["geoip-db"] == "shipped"
    assert options["geo-overrides"] is None
    assert options["regions"] is None
    assert options["connect-timeout"] == 5.0
    assert options["connect-attempts"] == 3
    assert options["connect-budget"] == 10.0
    assert options["idle-timeout"] == 600.0
    assert options["half-closed-timeout"] == 30.0
    assert options["proxy-header-timeout"] == 5.0
    assert options["max-connections"] == 10000
    assert options["proxy-protocol-trusted"] == LOOPBACK
    assert options["tls-handshake-timeout"] == 10.0
    assert options["binding-ipv6-prefix"] == 64
    assert options["health-check"] == "tcp"
    assert options["health-interval"] == 2.0
    assert options["health-timeout"] == 1.0
    assert options["health-rise"] == 2
    assert options["health-fall"] == 3
    assert options["breaker-failures"] == 5
    assert options["breaker-cooldown"] == 30.0
    assert options["panic-routing"] is True
    assert options["lean-path"] is True
    assert options["workers"] == 1
    assert options["splice"] is True
    assert options["rtt-weight"] == 0.01
    assert options["state-file"] is None
    assert options["admin"] == "tcp:8090:interface=127.0.0.1"
    assert options["api-token-file"] is None
    assert options["heartbeat-ttl"] == 30.0
    for name in ("etcd-user", "etcd-password-file", "etcd-ca", "etcd-cert", "etcd-key"):
        assert options[name] is None
    assert options["db-cache"] is None
    assert options["dns"] == "none"
    assert options["dns-domain"] == "edge.internal"
    assert options["dns-ttl"] == 30
    assert options["access-log"] is None
    assert options["client-max-connections"] == 0
    assert options["client-rate"] == 0.0
    assert options["client-burst"] is None
    assert options["shutdown-timeout"] == 30.0
    assert options["debug"] is False
    assert set(options.sources) == set(ENV_NAMES)
    assert set(options.sources.values()) == {"default"}


def test_every_option_from_the_command_line(tmp_path: Path, overrides: str, regions: str) -> None:
    """
    Every option is parsed from the command line into its typed value.
    """
    db = str(tmp_path / "r.db")
    options = parsed(
        "--listen=tcp:9000",
        "--listen",
        "api=haproxy:tcp:9001",
        f"--db={db}",
        "--region=eu",
        "--db-reload=0.5",
        "--binding-ttl=30",
        "--binding-gc-interval=7",
        "--binding-max=10",
        "--geoip-db=/nonexistent.mmdb",
        "--geoip-max-age=30",
        "--geoip-poll=2",
        f"--geo-overrides={overrides}",
        f"--regions={regions}",
        "--connect-timeout=1.5",
        "--connect-attempts=2",
        "--connect-budget=4",
        "--idle-timeout=99",
        "--half-closed-timeout=3",
        "--proxy-header-timeout=2",
        "--max-connections=0",
        "--proxy-protocol-trusted=10.0.0.0/8",
        "--proxy-protocol-trusted=192.0.2.7",
        "--tls-handshake-timeout=6",
        "--binding-ipv6-prefix=56",
        "--health-check=http:/healthz",
        "--health-interval=0.5",
        "--health-timeout=0.25",
        "--health-rise=4",
        "--health-fall=5",
        "--breaker-failures=0",
        "--breaker-cooldown=7",
        "--panic-routing=off",
        "--lean-path=off",
        "--workers=3",
        "--splice=off",
        "--rtt-weight=0.5",
        f"--state-file={tmp_path / 's.json'}",
        "--admin=tcp:0:interface=127.0.0.1",
        f"--api-token-file={overrides}",
        "--heartbeat-ttl=12",
        "--etcd-user=edge",
        f"--etcd-password-file={overrides}",
        f"--etcd-ca={overrides}",
        f"--etcd-cert={overrides}",
        f"--etcd-key={overrides}",
        f"--db-cache={tmp_path / 'cache.db'}",
        "--dns=127.0.0.1:5354",
        "--dns-domain=Geo.Example.",
        "--dns-ttl=5",
        f"--access-log={tmp_path / 'access.jsonl'}",
        "--client-max-connections=8",
        "--client-rate=2.5",
        "--client-burst=10",
        "--shutdown-timeout=9",
        "--debug",
    )
    assert options["listen"] == (
        ListenerSpec("tcp:9000"),
        ListenerSpec("haproxy:tcp:9001", app="api"),
    )
    assert options["db"] == db
    assert options["region"] == "eu"
    assert options["db-reload"] == 0.5
    assert options["binding-ttl"] == 30.0
    assert options["binding-gc-interval"] == 7.0
    assert options["binding-max"] == 10
    assert options["geoip-db"] == "/nonexistent.mmdb"
    assert options["geoip-max-age"] == 30.0
    assert options["geoip-poll"] == 2.0
    assert options["geo-overrides"] == overrides
    assert options["regions"] == regions
    assert options["connect-timeout"] == 1.5
    assert options["connect-attempts"] == 2
    assert options["connect-budget"] == 4.0
    assert options["idle-timeout"] == 99.0
    assert options["half-closed-timeout"] == 3.0
    assert options["proxy-header-timeout"] == 2.0
    assert options["max-connections"] == 0
    assert options["proxy-protocol-trusted"] == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("192.0.2.7/32"),
    )
    assert options["tls-handshake-timeout"] == 6.0
    assert options["binding-ipv6-prefix"] == 56
    assert options["health-check"] == "http:/healthz"
    assert options["health-interval"] == 0.5
    assert options["health-timeout"] == 0.25
    assert options["health-rise"] == 4
    assert options["health-fall"] == 5
    assert options["breaker-failures"] == 0
    assert options["breaker-cooldown"] == 7.0
    assert options["panic-routing"] is False
    assert options["lean-path"] is False
    assert options["workers"] == 3
    assert options["splice"] is False
    assert options["rtt-weight"] == 0.5
    assert options["state-file"] == str(tmp_path / "s.json")
    assert options["admin"] == "tcp:0:interface=127.0.0.1"
    assert options["api-token-file"] == overrides
    assert options["heartbeat-ttl"] == 12.0
    assert options["etcd-user"] == "edge"
    for name in ("etcd-password-file", "etcd-ca", "etcd-cert", "etcd-key"):
        assert options[name] == overrides
    assert options["db-cache"] == str(tmp_path / "cache.db")
    assert options["dns"] == "127.0.0.1:5354"
    assert options["dns-domain"] == "geo.example"
    assert options["dns-ttl"] == 5
    assert options["access-log"] == str(tmp_path / "access.jsonl")
    assert options["client-max-connections"] == 8
    assert options["client-rate"] == 2.5
    assert options["client-burst"] == 10.0
    assert options["shutdown-timeout"] == 9.0
    assert options["debug"] is True
    assert set(options.sources.values()) == {"command line"}


def test_settings() -> None:
    """
    L{Options.settings} carries the per-connection options into
    L{ProxySettings}.
    """
    options = parsed(
        "--connect-timeout=1",
        "--connect-budget=2",
        "--connect-attempts=4",
        "--idle-timeout=5",
        "--half-closed-timeout=6",
        "--max-connections=7",
    )
    assert options.settings() == ProxySettings(
        connect_timeout=1.0,
        connect_budget=2.0,
        max_attempts=4,
        idle_timeout=5.0,
        half_closed_timeout=6.0,
        max_connections=7,
    )


def test_every_option_from_the_environment(tmp_path: Path, overrides: str, regions: str) -> None:
    """
    Every option is taken from its C{EDGEPROXY_*} variable (the original's
    names where it had them) when the command line does not give it.
    """
    environ = {
        "EDGEPROXY_LISTEN_ADDR": "tcp:7000, api=tcp:7001",
        "EDGEPROXY_DB_PATH": str(tmp_path / "env.db"),
        "EDGEPROXY_REGION": "ap",
        "EDGEPROXY_DB_RELOAD_SECS": "2",
        "EDGEPROXY_BINDING_TTL_SECS": "20",
        "EDGEPROXY_BINDING_GC_INTERVAL_SECS": "3",
        "EDGEPROXY_BINDING_MAX": "50",
        "EDGEPROXY_GEOIP_PATH": "none",
        "EDGEPROXY_GEOIP_MAX_AGE_DAYS": "90",
        "EDGEPROXY_GEOIP_POLL_SECS": "1.5",
        "EDGEPROXY_GEO_OVERRIDES": overrides,
        "EDGEPROXY_REGIONS": regions,
        "EDGEPROXY_CONNECT_TIMEOUT": "0.25",
        "EDGEPROXY_CONNECT_ATTEMPTS": "5",
        "EDGEPROXY_CONNECT_BUDGET": "8",
        "EDGEPROXY_IDLE_TIMEOUT": "11",
        "EDGEPROXY_HALF_CLOSED_TIMEOUT": "12",
        "EDGEPROXY_PROXY_HEADER_TIMEOUT": "1",
        "EDGEPROXY_MAX_CONNECTIONS": "123",
        "EDGEPROXY_PROXY_PROTOCOL_TRUSTED": "10.1.0.0/16,fd00::/8",
        "EDGEPROXY_TLS_HANDSHAKE_TIMEOUT": "4",
        "EDGEPROXY_BINDING_IPV6_PREFIX": "128",
        "EDGEPROXY_HEALTH_CHECK": "off",
        "EDGEPROXY_HEALTH_INTERVAL": "3",
        "EDGEPROXY_HEALTH_TIMEOUT": "2",
        "EDGEPROXY_HEALTH_RISE": "1",
        "EDGEPROXY_HEALTH_FALL": "1",
        "EDGEPROXY_BREAKER_FAILURES": "9",
        "EDGEPROXY_BREAKER_COOLDOWN": "0.5",
        "EDGEPROXY_PANIC_ROUTING": "no",
        "EDGEPROXY_LEAN_PATH": "off",
        "EDGEPROXY_SPLICE": "off",
        "EDGEPROXY_WORKERS": "auto",
        "EDGEPROXY_RTT_WEIGHT": "0",
        "EDGEPROXY_STATE_FILE": str(tmp_path / "env-state.json"),
        "EDGEPROXY_ADMIN": "none",
        "EDGEPROXY_API_TOKEN_FILE": regions,
        "EDGEPROXY_HEARTBEAT_TTL": "7",
        "EDGEPROXY_ETCD_USER": "pop",
        "EDGEPROXY_ETCD_PASSWORD_FILE": regions,
        "EDGEPROXY_ETCD_CA": regions,
        "EDGEPROXY_ETCD_CERT": regions,
        "EDGEPROXY_ETCD_KEY": regions,
        "EDGEPROXY_DB_CACHE": str(tmp_path / "env-cache.db"),
        "EDGEPROXY_DNS": "5355",
        "EDGEPROXY_DNS_DOMAIN": "edge.test",
        "EDGEPROXY_DNS_TTL": "60",
        "EDGEPROXY_ACCESS_LOG": str(tmp_path / "env-access.jsonl"),
        "EDGEPROXY_CLIENT_MAX_CONNECTIONS": "3",
        "EDGEPROXY_CLIENT_RATE": "100",
        "EDGEPROXY_CLIENT_BURST": "200",
        "EDGEPROXY_SHUTDOWN_TIMEOUT": "2",
        "EDGEPROXY_DEBUG": "true",
    }
    assert set(environ) == set(ENV_NAMES.values())
    options = parsed(environ=environ)
    assert options["listen"] == (ListenerSpec("tcp:7000"), ListenerSpec("tcp:7001", app="api"))
    assert options["db"] == str(tmp_path / "env.db")
    assert options["region"] == "ap"
    assert options["db-reload"] == 2.0
    assert options["binding-ttl"] == 20.0
    assert options["binding-gc-interval"] == 3.0
    assert options["binding-max"] == 50
    assert options["geoip-db"] == "none"
    assert options["geoip-max-age"] == 90.0
    assert options["geoip-poll"] == 1.5
    assert options["geo-overrides"] == overrides
    assert options["regions"] == regions
    assert options["connect-timeout"] == 0.25
    assert options["connect-attempts"] == 5
    assert options["connect-budget"] == 8.0
    assert options["idle-timeout"] == 11.0
    assert options["half-closed-timeout"] == 12.0
    assert options["proxy-header-timeout"] == 1.0
    assert options["max-connections"] == 123
    assert options["proxy-protocol-trusted"] == (
        ipaddress.ip_network("10.1.0.0/16"),
        ipaddress.ip_network("fd00::/8"),
    )
    assert options["tls-handshake-timeout"] == 4.0
    assert options["binding-ipv6-prefix"] == 128
    assert options["health-check"] == "off"
    assert options["health-interval"] == 3.0
    assert options["health-timeout"] == 2.0
    assert options["health-rise"] == 1
    assert options["health-fall"] == 1
    assert options["breaker-failures"] == 9
    assert options["breaker-cooldown"] == 0.5
    assert options["panic-routing"] is False
    assert options["lean-path"] is False
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert options["workers"] == max(1, min(256, cpus or 1))
    assert options["splice"] is False
    assert options["rtt-weight"] == 0.0
    assert options["state-file"] == str(tmp_path / "env-state.json")
    assert options["admin"] == "none"
    assert options["api-token-file"] == regions
    assert options["heartbeat-ttl"] == 7.0
    assert options["etcd-user"] == "pop"
    for name in ("etcd-password-file", "etcd-ca", "etcd-cert", "etcd-key"):
        assert options[name] == regions
    assert options["db-cache"] == str(tmp_path / "env-cache.db")
    assert options["dns"] == "5355"
    assert options["dns-domain"] == "edge.test"
    assert options["dns-ttl"] == 60
    assert options["access-log"] == str(tmp_path / "env-access.jsonl")
    assert options["client-max-connections"] == 3
    assert options["client-rate"] == 100.0
    assert options["client-burst"] == 200.0
    assert options["shutdown-timeout"] == 2.0
    assert options["debug"] is True
    assert options.sources == ENV_NAMES


def test_command_line_wins_over_environment() -> None:
    """
    An option given on the command line ignores its environment variable;
    the others still come from the environment.
    """
    options = parsed(
        "--region=eu",
        "--listen=tcp:9000",
        "--idle-timeout=50",
        environ={
            "EDGEPROXY_REGION": "ap",
            "EDGEPROXY_LISTEN_ADDR": "tcp:7000",
            "EDGEPROXY_IDLE_TIMEOUT": "not-even-a-number",
            "EDGEPROXY_DB_RELOAD_SECS": "9",
        },
    )
    assert options["region"] == "eu"
    assert options["listen"] == (ListenerSpec("tcp:9000"),)
    assert options["idle-timeout"] == 50.0
    assert options["db-reload"] == 9.0
    assert options.sources["region"] == "command line"
    assert options.sources["db-reload"] == "EDGEPROXY_DB_RELOAD_SECS"


def test_empty_environment_values_are_unset() -> None:
    """
    A variable set to the empty string (as a systemd EnvironmentFile line
    C{EDGEPROXY_REGION=} does) leaves the default in force.
    """
    options = parsed(environ={"EDGEPROXY_REGION": "", "EDGEPROXY_LISTEN_ADDR": " , "})
    assert options["region"] == "sa"
    assert options["listen"] == (ListenerSpec("tcp:8080"),)


@pytest.mark.parametrize(
    "value, expected",
    [
        ("0", False),
        ("false", False),
        ("no", False),
        ("1", True),
        ("YES", True),
        ("on", True),
    ],
)
def test_debug_from_environment(value: str, expected: bool) -> None:
    """
    C{EDGEPROXY_DEBUG} accepts the usual spellings of true and false.
    """
    assert parsed(environ={"EDGEPROXY_DEBUG": value})["debug"] is expected


BAD_VALUES = [
    ("idle-timeout", "-1"),
    ("idle-timeout", "0"),
    ("idle-timeout", "ten"),
    ("db-reload", "0"),
    ("db-reload", "nan"),
    ("db-reload", "inf"),
    ("binding-ttl", "-5"),
    ("binding-gc-interval", "0"),
    ("binding-max", "0"),
    ("binding-max", "1.5"),
    ("connect-timeout", "0"),
    ("connect-attempts", "0"),
    ("connect-attempts", "two"),
    ("connect-budget", "-1"),
    ("half-closed-timeout", "x"),
    ("proxy-header-timeout", "0"),
    ("max-connections", "-1"),
    ("tls-handshake-timeout", "0"),
    ("region", ""),
    ("region", "s a"),
    ("db", ""),
    ("proxy-protocol-trusted", "10.0.0.0/33"),
    ("proxy-protocol-trusted", "not-a-network"),
    ("listen", "nonsense:8080"),
    ("listen", "tcp:notaport"),
    ("listen", "1.2.3.4:99999"),
    ("listen", "999.1.1.1:8080"),
    ("listen", ""),
    ("geo-overrides", "/nonexistent/overrides.txt"),
    ("regions", "/nonexistent/regions.txt"),
]


@pytest.mark.parametrize("name, value", BAD_VALUES)
def test_invalid_command_line_value_names_the_option(name: str, value: str) -> None:
    """
    An invalid command-line value raises L{usage.UsageError} whose message
    names the option.
    """
    with pytest.raises(usage.UsageError) as caught:
        parsed(f"--{name}={value}")
    assert f"--{name}" in str(caught.value)


@pytest.mark.parametrize("name, value", [bv for bv in BAD_VALUES if bv[1].strip()])
def test_invalid_environment_value_names_option_and_variable(name: str, value: str) -> None:
    """
    An invalid environment value raises L{usage.UsageError} naming both the
    option and the variable.
    """
    with pytest.raises(usage.UsageError) as caught:
        parsed(environ={ENV_NAMES[name]: value})
    assert f"--{name}" in str(caught.value)
    assert ENV_NAMES[name] in str(caught.value)


def test_invalid_debug_environment_value() -> None:
    """
    C{EDGEPROXY_DEBUG} with a value that is neither true nor false is
    rejected, naming the variable.
    """
    with pytest.raises(usage.UsageError, match="EDGEPROXY_DEBUG"):
        parsed(environ={"EDGEPROXY_DEBUG": "maybe"})


def test_malformed_geo_files_name_the_option(tmp_path: Path) -> None:
    """
    A readable but malformed overrides or regions file is rejected at
    option time, naming the option and the line.
    """
    bad = tmp_path / "bad.txt"
    bad.write_text("10.0.0.0/8\n")
    with pytest.raises(usage.UsageError, match=r"--geo-overrides.*bad\.txt:1"):
        parsed(f"--geo-overrides={bad}")
    with pytest.raises(usage.UsageError, match=r"--regions.*bad\.txt:1"):
        parsed(f"--regions={bad}")


def test_geoip_none() -> None:
    """
    C{--geoip-db=none} and an empty C{--geoip-db=} both turn geo off.
    """
    assert parsed("--geoip-db=none")["geoip-db"] == "none"
    assert parsed("--geoip-db=")["geoip-db"] == "none"


def test_db_directory_rejected(tmp_path: Path) -> None:
    """
    A directory is not a routing database.
    """
    with pytest.raises(usage.UsageError, match="--db"):
        parsed(f"--db={tmp_path}")


@pytest.mark.parametrize(
    "value, expected",
    [
        ("tcp:8080", ListenerSpec("tcp:8080")),
        ("tcp:8080:interface=127.0.0.1", ListenerSpec("tcp:8080:interface=127.0.0.1")),
        ("api=tcp:8080", ListenerSpec("tcp:8080", app="api")),
        (
            "my-app.v2=haproxy:tcp:8081:interface=127.0.0.1",
            ListenerSpec("haproxy:tcp:8081:interface=127.0.0.1", app="my-app.v2"),
        ),
        ("0.0.0.0:8080", ListenerSpec("tcp:8080:interface=0.0.0.0")),
        ("127.0.0.1:9", ListenerSpec("tcp:9:interface=127.0.0.1")),
        ("[::]:8080", ListenerSpec("tcp6:8080:interface=\\:\\:")),
        ("[::1]:8080", ListenerSpec("tcp6:8080:interface=\\:\\:1")),
        ("web=0.0.0.0:80", ListenerSpec("tcp:80:interface=0.0.0.0", app="web")),
    ],
)
def test_listen_forms(value: str, expected: ListenerSpec) -> None:
    """
    C{--listen} takes endpoint descriptions (an C{=} inside one is not an
    app prefix), C{APP=DESC}, and the original's C{host:port} form.
    """
    assert parse_listener(value) == expected


def test_listen_addr_host_port_from_environment() -> None:
    """
    C{EDGEPROXY_LISTEN_ADDR} in the original's C{host:port} form, several
    comma-separated, becomes TCP endpoint descriptions.
    """
    options = parsed(environ={"EDGEPROXY_LISTEN_ADDR": "0.0.0.0:8080,[::]:8443"})
    assert options["listen"] == (
        ListenerSpec("tcp:8080:interface=0.0.0.0"),
        ListenerSpec("tcp6:8443:interface=\\:\\:"),
    )


def test_proxy_protocol_trusted_unix() -> None:
    """
    C{--proxy-protocol-trusted unix} (or C{unix} in the environment list)
    trusts the peers of UNIX-socket listeners, alongside any networks given;
    the default (loopback) does not include them.
    """
    from edgeproxy.net.endpoints import UNIX_PEERS

    options = parsed("--proxy-protocol-trusted=unix", "--proxy-protocol-trusted=10.0.0.0/8")
    assert options["proxy-protocol-trusted"] == (UNIX_PEERS, ipaddress.ip_network("10.0.0.0/8"))
    options = parsed(environ={"EDGEPROXY_PROXY_PROTOCOL_TRUSTED": "127.0.0.0/8, unix"})
    assert options["proxy-protocol-trusted"] == (ipaddress.ip_network("127.0.0.0/8"), UNIX_PEERS)
    assert UNIX_PEERS not in parsed()["proxy-protocol-trusted"]
    assert parse_network(" unix ") is UNIX_PEERS
    assert parse_network("::1") == ipaddress.ip_network("::1/128")


def test_proxy_protocol_trusted_help_mentions_unix() -> None:
    """
    The help of C{--proxy-protocol-trusted} says that C{unix} trusts
    UNIX-socket peers, and that they are not trusted by default.
    """
    text = " ".join(str(Options()).split())
    start = text.index("--proxy-protocol-trusted=")
    help_text = text[start : text.index("--region=", start)]
    assert "unix" in help_text
    assert "[default: 127.0.0.0/8, ::1/128;" in help_text


@pytest.mark.parametrize(
    ("argv", "unix_trusted"),
    [((), False), (("--proxy-protocol-trusted=unix",), True)],
    ids=["default", "unix"],
)
def test_make_service_passes_unix_trust(tmp_path: Path, argv: tuple, unix_trusted: bool) -> None:
    """
    makeService hands the trusted list, UNIX_PEERS included when given, to
    the haproxy:unix: listener's endpoint.
    """
    from twisted.internet.testing import MemoryReactorClock

    from edgeproxy.net.endpoints import UNIX_PEERS, ProxyHeaderServerEndpoint
    from edgeproxy.service import listener_service_name
    from edgeproxy.tap import makeService

    options = parsed(
        f"--db={tmp_path / 'r.db'}",
        "--geoip-db=none",
        f"--listen=haproxy:unix:{tmp_path / 's.sock'}",
        *argv,
    )
    service = makeService(options, reactor=MemoryReactorClock(), environ={})
    endpoint = service.getServiceNamed(listener_service_name(0)).endpoint  # type: ignore[attr-defined]
    assert isinstance(endpoint, ProxyHeaderServerEndpoint)
    assert (UNIX_PEERS in endpoint.trusted) is unix_trusted


def test_help_lists_environment_variables() -> None:
    """
    C{--help} shows each option's environment variable and default.
    """
    text = str(Options())
    for name, env in ENV_NAMES.items():
        assert f"--{name}" in text
        assert env in text
    assert "[default: 600; env EDGEPROXY_IDLE_TIMEOUT]" in " ".join(text.split())


def run_edgeproxy(
    *options: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """
    Run the real C{twistd -n edgeproxy OPTIONS} (as L{faultkit.edgeproxy_argv}
    builds it) to completion and collect its output.
    """
    environment = edgeproxy_env()
    environment.pop("COLUMNS", None)
    environment.update(env or {})
    return subprocess.run(
        edgeproxy_argv(*options),
        capture_output=True,
        text=True,
        env=environment,
        cwd=str(ROOT),
        timeout=120,
    )


#: What C{--help} must teach: the listener forms, the routing table's columns
#: and where its schema lives.
HELP_MUST_SHOW = [
    "tcp:8080:interface=127.0.0.1",
    "haproxy:DESC",
    "txsni:CERTDIR:DESC",
    "txsni:CERTDIR:haproxy:DESC",
    "APP=DESC",
    "HOST:PORT",
    "conf/schema.sql",
    "edgeproxy/data/schema.sql",
]

#: The routing table's columns, which C{--help} names.
COLUMNS = (
    "id",
    "app",
    "region",
    "country",
    "wg_ip",
    "port",
    "healthy",
    "weight",
    "soft_limit",
    "hard_limit",
    "deleted",
    "proxy_protocol",
    "draining",
)


@pytest.mark.parametrize("columns", [None, "60", "80", "200"])
def test_help_describes_listeners_and_table_unbroken(
    columns: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    C{--help} shows the listener syntax, the routing table's columns and the
    schema's whereabouts, with the description exactly as written (at any
    terminal width: usage.Options would otherwise reflow it into one
    paragraph and break C{tcp:8080:interface= 127.0.0.1}); every option's
    help survives wrapping without a word broken at a hyphen.
    """
    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)
    text = str(Options())
    assert LONGDESC in text
    for needle in HELP_MUST_SHOW:
        assert needle in LONGDESC, needle
    for column in COLUMNS:
        assert re.search(rf"\b{column}\b", LONGDESC), column
    assert "= " not in LONGDESC
    assert max(len(line) for line in LONGDESC.splitlines()) <= 79
    flat = " ".join(text.split())
    for doc in Options().docs.values():
        assert " ".join(doc.split()) in flat, doc


@pytest.mark.slow
def test_twistd_help_shows_listeners_and_schema() -> None:
    """
    The real C{twistd edgeproxy --help} prints the edgeproxy description
    intact (with the listener syntax and the schema's location) and exits 0.
    """
    result = run_edgeproxy("--help")
    assert result.returncode == 0, result.stderr
    assert LONGDESC in result.stdout
    assert "tcp:8080:interface= 127.0.0.1" not in result.stdout


@pytest.mark.slow
def test_twistd_version_is_edgeproxy_version() -> None:
    """
    C{twistd edgeproxy --version} prints edgeproxy's version (and Twisted's)
    in its first line, not Twisted's C{--version} text, then the shipped
    GeoIP database and its attribution, and exits 0.
    """
    import edgeproxy
    from edgeproxy.geo import SHIPPED_ATTRIBUTION
    from twisted import copyright

    result = run_edgeproxy("--version")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 3
    assert lines[1].startswith("Shipped GeoIP database: geo-whois-asn-country.mmdb, built ")
    assert lines[2] == SHIPPED_ATTRIBUTION
    assert lines[0].startswith(f"edgeproxy {edgeproxy.__version__} (Twisted {copyright.version}")
    assert "Twisted version:" not in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    "argv, named",
    [
        (["--bogus"], "--bogus"),
        (["--idle-timeout=-1"], "--idle-timeout: must be a positive number of seconds, got '-1'"),
        (["--idle-timeout"], "--idle-timeout"),
        (["--listen=nonsense:8080"], "--listen"),
        (["stray-argument"], "arguments"),
    ],
)
def test_twistd_bad_option_is_one_line_on_stderr(argv: list[str], named: str) -> None:
    """
    A bad command-line option or value stops C{twistd edgeproxy} with one
    error line naming it on stderr (plus a hint line pointing at --help),
    nothing on stdout (no 75-line help), no traceback, and a non-zero exit
    status on every supported Twisted (twistd itself exits 0 on a usage
    error before 26.10).
    """
    result = run_edgeproxy(*argv)
    assert result.returncode != 0
    assert result.stdout.strip() == ""
    lines = result.stderr.strip().splitlines()
    assert 1 <= len(lines) <= 2, result.stderr
    assert lines[0].startswith("edgeproxy: ") and named in lines[0]
    assert lines[1:] in ([], ["see: twistd edgeproxy --help"])
    assert "Traceback" not in result.stderr


def test_bad_option_raises_usage_error_outside_twistd() -> None:
    """
    Parsed directly (no parent command, as another program or a test would),
    a bad option still raises L{usage.UsageError}: only under twistd is it
    turned into the one-line exit.
    """
    with pytest.raises(usage.UsageError, match="bogus"):
        Options().parseOptions(["--bogus"])


@pytest.mark.slow
def test_twistd_rejects_invalid_environment(tmp_path: Path) -> None:
    """
    An invalid C{EDGEPROXY_*} value stops C{twistd edgeproxy} with one line
    naming the option and the variable, and no traceback.
    """
    result = run_edgeproxy(
        f"--db={tmp_path / 'r.db'}",
        env={"EDGEPROXY_CONNECT_ATTEMPTS": "lots"},
    )
    assert result.returncode != 0
    assert "--connect-attempts (from EDGEPROXY_CONNECT_ATTEMPTS)" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "r.db").exists()


def test_nofile_limit_raised_for_the_connection_cap() -> None:
    """
    raise_nofile_limit lifts the soft file descriptor limit to two
    descriptors per allowed connection plus headroom (within the hard limit),
    so --max-connections is not silently capped by a default ulimit of 1024.
    """
    import resource

    from edgeproxy.tap import raise_nofile_limit

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        cap = 900
        needed = 2 * cap + 64
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"hard limit {hard} below {needed}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        now = raise_nofile_limit(cap)
        assert now == needed
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == needed
        # Never lowered: a smaller cap leaves a higher limit alone.
        assert raise_nofile_limit(10) == needed
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class _FakeRlimits:
    """
    Stands in for the C{resource} module's NOFILE limits.
    """

    def __init__(self, soft: int, hard: int) -> None:
        self.limits = (soft, hard)

    def getrlimit(self, which: int) -> tuple[int, int]:
        return self.limits

    def setrlimit(self, which: int, limits: tuple[int, int]) -> None:
        self.limits = limits


@pytest.mark.parametrize("cap, warns", [(100, False), (480, False), (481, True), (10000, True)])
def test_nofile_warning_only_when_the_hard_limit_is_too_low(
    cap: int, warns: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    Under a hard limit of 1024 descriptors, a cap that fits (two per
    connection plus 64) raises the soft limit without a word, and one that
    does not is warned about, naming the cap and how to fix it: the warning
    stays for operators whose limit really is too low.
    """
    import resource

    from faultkit import LogCapture

    from edgeproxy.tap import raise_nofile_limit

    fake = _FakeRlimits(256, 1024)
    monkeypatch.setattr(resource, "getrlimit", fake.getrlimit)
    monkeypatch.setattr(resource, "setrlimit", fake.setrlimit)
    capture = LogCapture().start()
    try:
        soft = raise_nofile_limit(cap)
    finally:
        capture.stop()
    assert soft == fake.limits[0] == min(2 * cap + 64, 1024)
    warnings = [e for e in capture.events if e.get("log_namespace") == "edgeproxy.tap"]
    assert len(warnings) == int(warns)
    if warns:
        assert warnings[0]["cap"] == cap
        assert "--max-connections" in warnings[0]["log_format"]


def test_env_example_names_every_option_and_parses() -> None:
    """
    conf/edgeproxy.env.example sets every option's variable, and what it
    sets is valid (it would start a proxy as written).
    """
    from edgeproxy.tap import _OPTIONS

    text = (ROOT / "conf" / "edgeproxy.env.example").read_text()
    environ = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            environ[name] = value
    assert {o.env for o in _OPTIONS} <= set(environ)
    environ.pop("EDGEPROXY_GEO_OVERRIDES", None)
    environ.pop("EDGEPROXY_REGIONS", None)
    options = parsed(environ=environ)
    assert options["admin"] == "tcp:8090:interface=127.0.0.1"


@pytest.mark.parametrize("cap, soft", [(100, 1024), (400, 1024), (10000, 1024)])
def test_nofile_reserve_for_splice_pipes_never_warns(
    cap: int, soft: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    Descriptors reserved on top of the cap (the splice pipes) raise the
    soft limit as far as the hard limit allows, and a hard limit that
    leaves no room for them is no reason to warn: only the cap's own
    need is.
    """
    import resource

    from faultkit import LogCapture

    from edgeproxy.tap import raise_nofile_limit

    fake = _FakeRlimits(256, 1024)
    monkeypatch.setattr(resource, "getrlimit", fake.getrlimit)
    monkeypatch.setattr(resource, "setrlimit", fake.setrlimit)
    capture = LogCapture().start()
    try:
        now = raise_nofile_limit(cap, 2048)
    finally:
        capture.stop()
    assert now == fake.limits[0] == soft
    warnings = [e for e in capture.events if e.get("log_namespace") == "edgeproxy.tap"]
    assert len(warnings) == int(2 * cap + 64 > 1024)
