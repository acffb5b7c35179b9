"""
Tests for L{edgeproxy.stores.sqlite}: the SQLite routing table (SPEC sections 1
and 6, FAULTS F12), on real SQLite files.
"""

from __future__ import annotations

import ipaddress
import math
import os
import shutil
import sqlite3
import threading
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence

import attrs
import pytest
import pytest_twisted
from faultkit import EventCollector
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from zope.interface.verify import verifyObject

from edgeproxy.interfaces import (
    BackendWriteError,
    DuplicateBackendError,
    IBackendRepository,
    IBackendWriter,
)
from edgeproxy.metrics import MetricsStore
from edgeproxy.model import PROXY_OFF, PROXY_V2, Backend, RoutingSnapshot, parse_check
from edgeproxy.stores import sqlite as edgesqlite
from edgeproxy.stores.sqlite import (
    MANDATORY_COLUMNS,
    OPTIONAL_COLUMNS,
    InvalidRowError,
    RoutingDatabaseError,
    SqliteBackendRepository,
    SqliteBackendWriter,
    load_backends,
    schema_sql,
    validate_row,
)
from edgeproxy.tap import Options, makeService

ROOT = Path(__file__).resolve().parent.parent

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
    "health_check",
    "heartbeat_at",
    "sni",
)

# The original's schema: no country, no proxy_protocol.
ORIGINAL_SCHEMA = """
CREATE TABLE backends (
    id TEXT PRIMARY KEY, app TEXT, region TEXT, wg_ip TEXT, port INTEGER,
    healthy INTEGER, weight INTEGER, soft_limit INTEGER, hard_limit INTEGER,
    deleted INTEGER
);
"""

# Every SPEC column, without declared types: SQLite then keeps each value
# exactly as inserted (TEXT '12' stays text, REAL stays real).
UNTYPED_SCHEMA = "CREATE TABLE backends ({});".format(", ".join(COLUMNS))

# SPEC section 1: the only SPEC columns a table may lack (health_check and
# heartbeat_at, optional columns added later, included).
SPEC_OPTIONAL = ("country", "proxy_protocol", "health_check", "heartbeat_at", "sni")

# SPEC section 1: every other SPEC column must be there.
SPEC_MANDATORY = tuple(c for c in COLUMNS if c not in SPEC_OPTIONAL)

NO_PORT_SCHEMA = """
CREATE TABLE backends (
    id TEXT PRIMARY KEY, app TEXT, region TEXT, country TEXT, wg_ip TEXT,
    healthy INTEGER, weight INTEGER, soft_limit INTEGER, hard_limit INTEGER,
    deleted INTEGER, proxy_protocol INTEGER
);
"""


def good_row(backend_id: str, **overrides: object) -> Dict[str, object]:
    """
    A valid row with every SPEC column.
    """
    row: Dict[str, object] = {
        "id": backend_id,
        "app": "web",
        "region": "sa",
        "country": "BR",
        "wg_ip": "10.50.1.1",
        "port": 8080,
        "healthy": 1,
        "weight": 2,
        "soft_limit": 50,
        "hard_limit": 100,
        "deleted": 0,
        "proxy_protocol": 0,
    }
    row.update(overrides)
    return row


def write_db(path: Path, rows: Sequence[Mapping[str, object]], schema: str | None = None) -> None:
    """
    Write a complete database to C{path}, atomically (built aside, renamed).
    """
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        tmp.unlink()
    conn = sqlite3.connect(tmp)
    conn.executescript(schema if schema is not None else schema_sql())
    for row in rows:
        names = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        conn.execute(f"INSERT INTO backends ({names}) VALUES ({marks})", tuple(row.values()))
    conn.commit()
    conn.close()
    os.replace(tmp, path)


def many_rows(prefix: str, count: int = 400) -> List[Dict[str, object]]:
    """
    Enough rows to span many database pages.
    """
    return [
        good_row(f"{prefix}-{i:04d}-" + "x" * 40, wg_ip=f"10.0.{i // 250}.{i % 250}")
        for i in range(count)
    ]


@pytest.fixture
def events():
    """
    Log events of L{edgeproxy.stores.sqlite} emitted during the test.
    """
    collector = EventCollector("edgeproxy.stores.sqlite")
    globalLogPublisher.addObserver(collector)
    yield collector.events
    globalLogPublisher.removeObserver(collector)


def texts(events: List[Dict[str, Any]], level: LogLevel | None = None) -> List[str]:
    return [formatEvent(e) for e in events if level is None or e["log_level"] is level]


# --- load_backends ------------------------------------------------------------


def test_valid_load(tmp_path: Path) -> None:
    """
    Every SPEC column is read into a L{Backend}, normalised: country
    upper-cased, region and host stripped, weight/soft_limit 0 counted as 1,
    hard_limit 0 kept (unlimited), deleted NULL active, table order kept.
    """
    db = tmp_path / "routing.db"
    write_db(
        db,
        [
            good_row("fly-gru-1"),
            good_row(
                "fly-cdg-1",
                app=None,
                region=" eu ",
                country="fr",
                wg_ip=" fd00::2 ",
                port=443,
                healthy=0,
                weight=0,
                soft_limit=0,
                hard_limit=0,
                deleted=None,
                proxy_protocol=2,
            ),
        ],
    )
    backends, skipped = load_backends(str(db), 0.1)
    assert skipped == []
    assert backends == [
        Backend("fly-gru-1", "web", "sa", "BR", "10.50.1.1", 8080, True, 2, 50, 100, False, 0),
        Backend("fly-cdg-1", None, "eu", "FR", "fd00::2", 443, False, 1, 1, 0, False, PROXY_V2),
    ]


def test_original_schema_loads(tmp_path: Path) -> None:
    """
    A database with the original schema (no country, no proxy_protocol)
    loads, with country None and proxy_protocol off.
    """
    db = tmp_path / "routing.db"
    row = good_row("old-1")
    del row["country"], row["proxy_protocol"]
    write_db(db, [row], ORIGINAL_SCHEMA)
    backends, skipped = load_backends(str(db), 0.1)
    assert skipped == []
    assert [(b.id, b.country, b.proxy_protocol, b.port, b.health_check) for b in backends] == [
        ("old-1", None, PROXY_OFF, 8080, None)
    ]


def test_column_names_are_case_insensitive(tmp_path: Path) -> None:
    """
    Column names match whatever their case, as SQLite's own names do.
    """
    db = tmp_path / "routing.db"
    schema = UNTYPED_SCHEMA.replace("wg_ip", "WG_IP").replace("port", "Port")
    write_db(db, [good_row("b1")], schema)
    backends, _ = load_backends(str(db), 0.1)
    assert [(b.host, b.port) for b in backends] == [("10.50.1.1", 8080)]


def test_integer_affinity_conversions_are_sqlite_s(tmp_path: Path) -> None:
    """
    In the shipped schema SQLite itself stores TEXT '12' and REAL 7.0 put in
    an INTEGER column as integers; those rows load.  A REAL 1.5 stays real
    and is refused.
    """
    db = tmp_path / "routing.db"
    write_db(db, [good_row("a", port="9000", weight=7.0), good_row("b", weight=1.5)])
    backends, skipped = load_backends(str(db), 0.1)
    assert [(b.id, b.port, b.weight) for b in backends] == [("a", 9000, 7)]
    assert skipped == [("b", "weight: float 1.5 is not an integer")]


BAD_ROWS = [
    # (overrides, expected label or None for the id, reason starts with)
    ({"id": None}, "<row 2>", "id: is NULL"),
    ({"id": ""}, "<row 2>", "id: is empty"),
    ({"id": "   "}, "<row 2>", "id: is empty"),
    ({"id": 7}, "<row 2>", "id: int 7 is not text"),
    ({"port": 0}, "bad", "port: 0 is outside 1-65535"),
    ({"port": 65536}, "bad", "port: 65536 is outside 1-65535"),
    ({"port": -1}, "bad", "port: -1 is outside 1-65535"),
    ({"port": 2**40 + 80}, "bad", f"port: {2**40 + 80} is outside"),
    ({"port": "12"}, "bad", "port: str '12' is not an integer"),
    ({"port": 80.5}, "bad", "port: float 80.5 is not an integer"),
    ({"port": None}, "bad", "port: is NULL"),
    ({"port": b"\x00\x50"}, "bad", "port: a blob is not an integer"),
    ({"weight": -1}, "bad", "weight: -1 is negative"),
    ({"weight": "1"}, "bad", "weight: str '1' is not an integer"),
    ({"soft_limit": -5}, "bad", "soft_limit: -5 is negative"),
    ({"hard_limit": -1}, "bad", "hard_limit: -1 is negative"),
    ({"hard_limit": 2.0}, "bad", "hard_limit: float 2.0 is not an integer"),
    ({"healthy": 2}, "bad", "healthy: 2 is not 0 or 1"),
    ({"healthy": None}, "bad", "healthy: is NULL"),
    ({"healthy": "yes"}, "bad", "healthy: str 'yes' is not an integer"),
    ({"deleted": 2}, "bad", "deleted: 2 is not 0 or 1"),
    ({"deleted": -1}, "bad", "deleted: -1 is not 0 or 1"),
    ({"proxy_protocol": 3}, "bad", "proxy_protocol: 3 is not 0, 1 or 2"),
    ({"proxy_protocol": -1}, "bad", "proxy_protocol: -1 is not 0, 1 or 2"),
    ({"wg_ip": None}, "bad", "wg_ip: is NULL"),
    ({"wg_ip": " "}, "bad", "wg_ip: is empty"),
    ({"wg_ip": "10.0.0.1 10.0.0.2"}, "bad", "wg_ip: str '10.0.0.1 10.0.0.2' is not an address"),
    ({"wg_ip": "1.2.3.4:80"}, "bad", "wg_ip: str '1.2.3.4:80' is not an address"),
    ({"wg_ip": "[fd00::1]"}, "bad", "wg_ip: str '[fd00::1]' is not an address"),
    ({"wg_ip": "[fd00::1]:80"}, "bad", "wg_ip: str '[fd00::1]:80' is not an address"),
    ({"wg_ip": "http://10.0.0.1"}, "bad", "wg_ip: str 'http://10.0.0.1' is not an address"),
    ({"wg_ip": "10.0.0.0/24"}, "bad", "wg_ip: str '10.0.0.0/24' is not an address"),
    ({"wg_ip": "fd00::/64"}, "bad", "wg_ip: str 'fd00::/64' is not an address"),
    ({"wg_ip": "backend.example:8080"}, "bad", "wg_ip: str 'backend.example:8080' is not"),
    ({"wg_ip": "10.0.0.1%eth0"}, "bad", "wg_ip: str '10.0.0.1%eth0' is not an address"),
    ({"wg_ip": "backend%eth0"}, "bad", "wg_ip: str 'backend%eth0' is not an address"),
    ({"wg_ip": "fe80::1%"}, "bad", "wg_ip: str 'fe80::1%' is not an address"),
    ({"wg_ip": "fe80::1%eth0/1"}, "bad", "wg_ip: str 'fe80::1%eth0/1' is not an address"),
    ({"wg_ip": "fd00::1::2"}, "bad", "wg_ip: str 'fd00::1::2' is not an address"),
    ({"wg_ip": "10.0.0.256"}, "bad", "wg_ip: str '10.0.0.256' is not an address"),
    ({"wg_ip": "010.0.0.1"}, "bad", "wg_ip: str '010.0.0.1' is not an address"),
    ({"wg_ip": "10.1"}, "bad", "wg_ip: str '10.1' is not an address"),
    ({"wg_ip": "0x7f000001"}, "bad", "wg_ip: str '0x7f000001' is not an address"),
    ({"wg_ip": "-backend.example"}, "bad", "wg_ip: str '-backend.example' is not"),
    ({"wg_ip": "backend-.example"}, "bad", "wg_ip: str 'backend-.example' is not"),
    ({"wg_ip": "a..example"}, "bad", "wg_ip: str 'a..example' is not an address"),
    ({"wg_ip": ".example"}, "bad", "wg_ip: str '.example' is not an address"),
    ({"wg_ip": "under_score.example"}, "bad", "wg_ip: str 'under_score.example' is not"),
    ({"wg_ip": "b\u00fccher.example"}, "bad", "wg_ip: str 'b\u00fccher.example' is not"),
    ({"wg_ip": "a" * 64 + ".example"}, "bad", "wg_ip: str 'aaaa"),
    ({"wg_ip": ".".join(["a" * 63] * 4)}, "bad", "wg_ip: str 'aaaa"),
    ({"region": None}, "bad", "region: is NULL"),
    ({"region": ""}, "bad", "region: is empty"),
    ({"country": "BRA"}, "bad", "country: str 'BRA' is not a two-letter code"),
    ({"country": "B1"}, "bad", "country: str 'B1' is not a two-letter code"),
    ({"country": 55}, "bad", "country: int 55 is not text"),
    ({"app": 5}, "bad", "app: int 5 is not text"),
    ({"app": b"web"}, "bad", "app: a blob is not text"),
    ({"health_check": "udp"}, "bad", "health_check: str 'udp' is not a health check: expected"),
    ({"health_check": "tcp:80"}, "bad", "health_check: str 'tcp:80' is not a health check"),
    ({"health_check": "http:healthz"}, "bad", "health_check: str 'http:healthz' is not a"),
    ({"health_check": "http://b/hz"}, "bad", "health_check: str 'http://b/hz' is not a"),
    ({"health_check": "http:/a b"}, "bad", "health_check: str 'http:/a b' is not a health"),
    ({"health_check": "http:/" + "a" * 1024}, "bad", "health_check: str 'http:/aaaa"),
    ({"health_check": 1}, "bad", "health_check: int 1 is not text"),
    ({"health_check": b"tcp"}, "bad", "health_check: a blob is not text"),
]


@pytest.mark.parametrize(("overrides", "label", "reason"), BAD_ROWS)
def test_bad_row_skipped_with_its_id(
    tmp_path: Path, overrides: Dict[str, object], label: str, reason: str
) -> None:
    """
    A row with an invalid value is skipped and reported with its id (or its
    position when the id itself is unusable) and a reason naming the column;
    the rows around it still load, and no value is wrapped or truncated.
    """
    db = tmp_path / "routing.db"
    write_db(
        db,
        [good_row("first"), good_row("bad", **overrides), good_row("last")],
        UNTYPED_SCHEMA,
    )
    backends, skipped = load_backends(str(db), 0.1)
    assert [b.id for b in backends] == ["first", "last"]
    assert len(skipped) == 1
    assert skipped[0][0] == label
    assert skipped[0][1].startswith(reason)


@pytest.mark.parametrize(
    ("wg_ip", "host"),
    [
        ("10.50.1.1", "10.50.1.1"),
        ("fd00::1", "fd00::1"),
        ("FD00:0000:0:0::0001", "fd00::1"),
        ("fe80::1%wg0", "fe80::1%wg0"),
        ("FE80:0::1%2", "fe80::1%2"),
        ("localhost", "localhost"),
        ("backend-1.internal", "backend-1.internal"),
        ("gru-1.fly.example.", "gru-1.fly.example."),
        ("1e100.net", "1e100.net"),
        ("a" * 63 + ".example", "a" * 63 + ".example"),
        (".".join(["a" * 63] * 3 + ["a" * 61]), ".".join(["a" * 63] * 3 + ["a" * 61])),
    ],
)
def test_valid_hosts(wg_ip: str, host: str) -> None:
    """
    wg_ip takes an IPv4 literal, an IPv6 literal without brackets (with an
    optional zone index, normalised to the compressed form) or an RFC 1123
    host name of at most 253 characters with an optional trailing dot.
    """
    assert validate_row(good_row("a", wg_ip=wg_ip)).host == host


def _is_host_name(host: str) -> bool:
    """
    RFC 1123 host name, checked label by label (independently of the code
    under test): 1-63 letters, digits and hyphens, no hyphen at either end,
    253 characters at most without the optional trailing dot, and a last
    label that is not numeric (RFC 1123 2.1: it would read as an address).
    """
    name = host[:-1] if host.endswith(".") else host
    if not name or len(name) > 253:
        return False
    labels = name.split(".")
    for label in labels:
        if not 1 <= len(label) <= 63 or label[0] == "-" or label[-1] == "-":
            return False
        if not all(c.isascii() and (c.isalnum() or c == "-") for c in label):
            return False
    last = labels[-1].lower()
    # Numeric: what inet_aton would read as a number (decimal, or 0x hex).
    hexadecimal = last.startswith("0x") and all(c in "0123456789abcdef" for c in last[2:])
    return not (last.isdigit() or hexadecimal)


def _is_ip_literal(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return str(address) == host


_HOST_PIECES = st.sampled_from(
    ["10", "0", "256", "a", "A", "1", "fd00", "example", "-", ".", ":", "::", "%", "eth0"]
)
_HOST_PIECES = _HOST_PIECES | st.sampled_from(["[", "]", "/", "http://", "_", "0x1f", "é"])
_HOSTS = st.one_of(
    st.text(max_size=20),
    st.lists(_HOST_PIECES, min_size=1, max_size=10).map("".join),
    st.ip_addresses().map(str),
    st.ip_addresses(v=6).map(lambda a: a.exploded.upper()),
    st.from_regex(r"\A[a-z0-9-]{1,70}(\.[a-z0-9-]{1,70}){0,4}\.?\Z"),
)


@given(_HOSTS)
def test_accepted_hosts_are_addresses_or_names(wg_ip: str) -> None:
    """
    Whatever wg_ip holds, a host validate_row accepts is an IPv4 literal, an
    IPv6 literal in compressed form (no brackets, optionally with a zone) or
    an RFC 1123 host name; anything else is an InvalidRowError on wg_ip.
    """
    try:
        host = validate_row(good_row("a", wg_ip=wg_ip)).host
    except InvalidRowError as e:
        assert e.column == "wg_ip"
        return
    assert _is_ip_literal(host) or _is_host_name(host)
    if ":" in host:
        assert host == str(ipaddress.ip_address(wg_ip.strip()))


@pytest.mark.parametrize(
    ("value", "check"),
    [
        (None, None),
        ("", None),
        ("  ", None),
        ("tcp", "tcp"),
        (" TCP ", "tcp"),
        ("off", "off"),
        ("http:/healthz", "http:/healthz"),
        ("Http:/Ready?deep=1", "http:/Ready?deep=1"),
    ],
)
def test_health_check_column(tmp_path: Path, value: object, check: str | None) -> None:
    """
    The optional health_check column (issue 8): NULL or empty is the
    proxy's default check (None); tcp, off and http:/path are read in their
    canonical form (keyword lower-cased, surrounding spaces stripped, the
    path as written).
    """
    db = tmp_path / "routing.db"
    write_db(db, [good_row("a", health_check=value)])
    backends, skipped = load_backends(str(db), 0.1)
    assert skipped == []
    assert [b.health_check for b in backends] == [check]


@pytest.mark.parametrize(
    ("value", "heartbeat"),
    [(None, None), (0, 0.0), (1764640000, 1764640000.0), (1764640000.25, 1764640000.25)],
)
def test_heartbeat_at_column(tmp_path: Path, value: object, heartbeat: float | None) -> None:
    """
    The optional heartbeat_at column (issue 9): NULL is a row written by
    hand (None); a number is a registered row's last heartbeat, as a float.
    """
    db = tmp_path / "routing.db"
    write_db(db, [good_row("a", heartbeat_at=value)])
    backends, skipped = load_backends(str(db), 0.1)
    assert skipped == []
    assert [b.heartbeat_at for b in backends] == [heartbeat]


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (-1, "heartbeat_at: int -1 is not a time"),
        ("1764640000", "heartbeat_at: str '1764640000' is not a number"),
        (b"\x00", "heartbeat_at: a blob is not a number"),
    ],
)
def test_bad_heartbeat_at_skips_its_row(tmp_path: Path, value: object, reason: str) -> None:
    """
    A heartbeat_at that is not a time skips its row (named), the rest loads.
    """
    db = tmp_path / "routing.db"
    write_db(db, [good_row("ok"), good_row("bad", heartbeat_at=value)], UNTYPED_SCHEMA)
    backends, skipped = load_backends(str(db), 0.1)
    assert [b.id for b in backends] == ["ok"]
    assert skipped == [("bad", reason)]


def test_validate_row_refuses_infinite_heartbeat() -> None:
    """
    NaN and infinities are no time (and a huge integer does not raise).
    """
    for value in (math.nan, math.inf, -math.inf, 10**400):
        with pytest.raises(InvalidRowError) as caught:
            validate_row(good_row("a", heartbeat_at=value))
        assert caught.value.column == "heartbeat_at"


def test_table_without_health_check_loads(tmp_path: Path) -> None:
    """
    A table made with the schema shipped before the health_check column
    (every other SPEC column) loads, every backend on the default check.
    """
    db = tmp_path / "routing.db"
    columns = ", ".join(c for c in COLUMNS if c != "health_check")
    write_db(db, [good_row("a"), good_row("b")], f"CREATE TABLE backends ({columns});")
    backends, skipped = load_backends(str(db), 0.1)
    assert skipped == []
    assert [(b.id, b.health_check) for b in backends] == [("a", None), ("b", None)]


def test_undecodable_text_skips_only_its_row(tmp_path: Path) -> None:
    """
    TEXT that is not valid UTF-8 fails its own row, not the whole query.
    """
    db = tmp_path / "routing.db"
    write_db(db, [good_row("ok"), good_row("bad")], UNTYPED_SCHEMA)
    conn = sqlite3.connect(db)
    conn.execute("UPDATE backends SET region = CAST(x'ff61' AS TEXT) WHERE id = 'bad'")
    conn.commit()
    conn.close()
    backends, skipped = load_backends(str(db), 0.1)
    assert [b.id for b in backends] == ["ok"]
    assert skipped == [("bad", "region: text that is not valid UTF-8 is not text")]


def test_repeated_id_skipped(tmp_path: Path) -> None:
    """
    In a table without a primary key, a repeated id is skipped (the first
    row wins) and reported.
    """
    db = tmp_path / "routing.db"
    write_db(db, [good_row("a", port=1), good_row("a", port=2)], UNTYPED_SCHEMA)
    backends, skipped = load_backends(str(db), 0.1)
    assert [(b.id, b.port) for b in backends] == [("a", 1)]
    assert skipped == [("a", "id: repeats an earlier row")]


@pytest.mark.parametrize("column", MANDATORY_COLUMNS)
def test_missing_mandatory_column_fails_the_load(tmp_path: Path, column: str) -> None:
    """
    A table without a mandatory column is a failure of the whole load,
    naming the column.
    """
    db = tmp_path / "routing.db"
    columns = [c for c in COLUMNS if c != column]
    write_db(db, [], "CREATE TABLE backends ({});".format(", ".join(columns)))
    with pytest.raises(RoutingDatabaseError, match=column):
        load_backends(str(db), 0.1)


@pytest.mark.parametrize("column", SPEC_MANDATORY)
def test_spec_columns_other_than_country_and_proxy_protocol_are_mandatory(
    tmp_path: Path, column: str
) -> None:
    """
    SPEC section 1: a table without any SPEC column other than country and
    proxy_protocol (healthy, deleted, app, weight, the limits, ...) fails the
    whole load with a message naming the column and pointing at the schema,
    rather than loading with defaults that change routing.
    """
    db = tmp_path / "routing.db"
    columns = [c for c in COLUMNS if c != column]
    write_db(db, [], "CREATE TABLE backends ({});".format(", ".join(columns)))
    with pytest.raises(RoutingDatabaseError) as caught:
        load_backends(str(db), 0.1)
    assert str(caught.value) == (
        f"table 'backends' in {db} lacks column(s) {column} (see conf/schema.sql)"
    )


def test_column_sets_follow_the_spec() -> None:
    """
    Only country, proxy_protocol, health_check, heartbeat_at, sni and the
    undocumented draining column are optional; every other SPEC column is
    mandatory.
    """
    assert set(MANDATORY_COLUMNS) == set(SPEC_MANDATORY)
    assert set(OPTIONAL_COLUMNS) == {
        "country",
        "proxy_protocol",
        "draining",
        "health_check",
        "heartbeat_at",
        "sni",
    }
    assert not set(MANDATORY_COLUMNS) & set(OPTIONAL_COLUMNS)


def test_dropped_columns_fail_the_load(tmp_path: Path) -> None:
    """
    Columns dropped with ALTER TABLE ... DROP COLUMN from a table made with
    the shipped schema fail the load, all of them named in one message.
    """
    db = tmp_path / "routing.db"
    write_db(db, [good_row("a"), good_row("sick", healthy=0), good_row("gone", deleted=1)])
    conn = sqlite3.connect(db)
    conn.execute("ALTER TABLE backends DROP COLUMN deleted")
    conn.execute("ALTER TABLE backends DROP COLUMN healthy")
    conn.commit()
    conn.close()
    with pytest.raises(RoutingDatabaseError) as caught:
        load_backends(str(db), 0.1)
    assert str(caught.value) == (
        f"table 'backends' in {db} lacks column(s) healthy, deleted (see conf/schema.sql)"
    )


def test_missing_table_fails_the_load(tmp_path: Path) -> None:
    """
    A database without a backends table fails the load, saying where the
    schema is.
    """
    db = tmp_path / "routing.db"
    write_db(db, [], "CREATE TABLE other (x);")
    with pytest.raises(RoutingDatabaseError) as caught:
        load_backends(str(db), 0.1)
    assert str(caught.value) == f"{db} has no 'backends' table; create it with conf/schema.sql"


def test_path_needing_uri_quoting(tmp_path: Path) -> None:
    """
    A path with characters special in URIs (?, #, %, space) opens fine.
    """
    db = tmp_path / "odd ?#% name.db"
    write_db(db, [good_row("a")])
    backends, _ = load_backends(str(db), 0.1)
    assert [b.id for b in backends] == ["a"]


def test_load_does_not_write(tmp_path: Path) -> None:
    """
    The file is opened read-only: loading leaves it byte for byte intact
    and creates no journal beside it.
    """
    db = tmp_path / "routing.db"
    write_db(db, [good_row("a")])
    before = db.read_bytes()
    load_backends(str(db), 0.1)
    assert db.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["routing.db"]


_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.binary(max_size=8),
    st.sampled_from(["0", "1", "BR", "sa", "10.0.0.1", " ", ""]),
)


def _mostlyGood(column: str) -> st.SearchStrategy[object]:
    """
    The value of C{good_row} for C{column} three times in four, else anything.
    """
    good: st.SearchStrategy[object]
    if column == "health_check":
        good = st.sampled_from([None, "tcp", "off", "HTTP:/healthz", " http:/ "])
    elif column == "heartbeat_at":
        good = st.one_of(st.none(), st.floats(0, 2e9), st.integers(0, 2**40))
    else:
        good = st.just(good_row("a", draining=0)[column])
    return st.one_of(good, good, good, _VALUES)


_ROWS = st.one_of(
    st.dictionaries(st.sampled_from(MANDATORY_COLUMNS + OPTIONAL_COLUMNS), _VALUES),
    # Rows with most or all columns, so that many are valid.
    st.fixed_dictionaries(
        {c: _mostlyGood(c) for c in SPEC_MANDATORY if c not in ("healthy", "deleted")},
        optional={
            c: _mostlyGood(c)
            for c in (
                "healthy",
                "deleted",
                "country",
                "proxy_protocol",
                "draining",
                "health_check",
                "heartbeat_at",
            )
        },
    ),
)


@given(_ROWS)
def test_validate_row_only_ever_skips(row: Dict[str, object]) -> None:
    """
    Whatever the values, validation either gives a normalised L{Backend}
    within the documented ranges or raises L{InvalidRowError} naming a
    column -- nothing else.
    """
    try:
        backend = validate_row(row)
    except InvalidRowError as e:
        assert e.column in MANDATORY_COLUMNS + OPTIONAL_COLUMNS
        assert e.reason.startswith(e.column + ": ")
        return
    assert set(SPEC_MANDATORY) <= set(row)
    assert type(backend.port) is int and 1 <= backend.port <= 65535
    assert backend.port == row["port"]
    assert backend.weight >= 1 and backend.soft_limit >= 1 and backend.hard_limit >= 0
    assert backend.proxy_protocol in (0, 1, 2)
    assert backend.id == row["id"] and backend.id.strip()
    assert backend.country is None or (len(backend.country) == 2 and backend.country.isupper())
    assert backend.health_check is None or str(parse_check(backend.health_check)) == (
        backend.health_check
    )
    assert backend.heartbeat_at is None or (
        type(backend.heartbeat_at) is float
        and math.isfinite(backend.heartbeat_at)
        and backend.heartbeat_at >= 0
    )


@pytest.mark.parametrize("column", SPEC_MANDATORY)
def test_validate_row_missing_mandatory_key(column: str) -> None:
    """
    A mapping without a mandatory column is invalid, naming the column; it
    never takes a default.
    """
    row = good_row("a")
    del row[column]
    with pytest.raises(InvalidRowError) as caught:
        validate_row(row)
    assert caught.value.column == column
    assert caught.value.reason == f"{column}: is missing"


def test_validate_row_defaults_only_optional_columns() -> None:
    """
    A mapping without the optional columns takes their documented defaults:
    country NULL, proxy_protocol off, not draining, the default health check.
    """
    row = good_row("a")
    del row["country"], row["proxy_protocol"]
    backend = validate_row(row)
    assert (backend.country, backend.proxy_protocol, backend.draining) == (None, PROXY_OFF, False)
    assert backend.health_check is None
    assert backend == attrs.evolve(validate_row(good_row("a")), country=None)


_SQL_VALUES = st.one_of(
    st.none(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=6),
    st.binary(max_size=4),
)


@given(st.lists(st.fixed_dictionaries({c: _SQL_VALUES for c in COLUMNS}), max_size=6))
def test_arbitrary_table_loads_or_skips_every_row(rows: List[Dict[str, object]]) -> None:
    """
    Whatever a typeless table holds, a load never fails: every row is either
    loaded or reported as skipped.
    """
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        db = Path(d) / "routing.db"
        write_db(db, rows, UNTYPED_SCHEMA)
        backends, skipped = load_backends(str(db), 0.1)
    assert len(backends) + len(skipped) == len(rows)


# --- loadInitial ----------------------------------------------------------------


def test_schema_files_match() -> None:
    """
    conf/schema.sql and the packaged edgeproxy/data/schema.sql are the same.
    """
    conf = (ROOT / "conf" / "schema.sql").read_text(encoding="utf-8")
    assert conf == schema_sql()
    assert conf == (ROOT / "edgeproxy" / "data" / "schema.sql").read_text(encoding="utf-8")


def test_schema_has_every_column(tmp_path: Path) -> None:
    """
    The shipped schema creates every SPEC column, and its defaults give a
    valid row from just id, region, wg_ip and port.
    """
    db = tmp_path / "routing.db"
    write_db(db, [{"id": "a", "region": "eu", "wg_ip": "10.0.0.1", "port": 80}])
    conn = sqlite3.connect(db)
    names = [r[1] for r in conn.execute("PRAGMA table_info(backends)")]
    conn.close()
    assert names == list(COLUMNS)
    backends, skipped = load_backends(str(db), 0.1)
    assert skipped == []
    assert backends[0].routable and backends[0].hard_limit == 0


def test_loadInitial_creates_missing_file(tmp_path: Path, events: List[Dict[str, Any]]) -> None:
    """
    A missing database is created with the schema and an empty table, with
    a warning naming the file.
    """
    db = tmp_path / "routing.db"
    repo = SqliteBackendRepository(str(db))
    snapshot = repo.loadInitial()
    assert len(snapshot) == 0 and repo.current() is snapshot
    assert repo.lastError is None and repo.lastReloadOk is not None
    conn = sqlite3.connect(db)
    assert [r[1] for r in conn.execute("PRAGMA table_info(backends)")] == list(COLUMNS)
    conn.close()
    warnings = texts(events, LogLevel.warn)
    assert len(warnings) == 1 and str(db) in warnings[0] and "created" in warnings[0]


def test_loadInitial_reads_table_and_logs_bad_rows(
    tmp_path: Path, events: List[Dict[str, Any]]
) -> None:
    """
    The first load reads the table and logs one line per skipped row with
    its id and reason; skipped rows are counted by column.
    """
    db = tmp_path / "routing.db"
    write_db(db, [good_row("a"), good_row("b", port=0), good_row("c", weight=-2)], UNTYPED_SCHEMA)
    metrics = MetricsStore()
    repo = SqliteBackendRepository(str(db), metrics=metrics)
    snapshot = repo.loadInitial()
    assert [b.id for b in snapshot.backends] == ["a"]
    lines = texts(events, LogLevel.warn)
    assert len(lines) == 2
    assert "b" in lines[0] and "port: 0 is outside 1-65535" in lines[0]
    assert "c" in lines[1] and "weight: -2 is negative" in lines[1]
    assert metrics.counter("routing_rows_skipped", "port") == 1
    assert metrics.counter("routing_rows_skipped", "weight") == 1
    assert metrics.counter("routing_reload", "ok") == 1


def test_loadInitial_corrupt_file_raises(tmp_path: Path) -> None:
    """
    A corrupt file at startup is a clear RoutingDatabaseError.
    """
    db = tmp_path / "routing.db"
    db.write_bytes(b"this is not a database" * 100)
    repo = SqliteBackendRepository(str(db))
    with pytest.raises(RoutingDatabaseError, match="not a database"):
        repo.loadInitial()
    assert repo.lastError is not None


@pytest.mark.parametrize(
    "schema", ["CREATE TABLE other (x);", "PRAGMA user_version = 7;"], ids=["other", "none"]
)
def test_loadInitial_database_without_table_raises(tmp_path: Path, schema: str) -> None:
    """
    A non-empty SQLite file without a backends table (another table, or no
    table at all) is fatal at startup, never filled in; the message points
    at conf/schema.sql.
    """
    db = tmp_path / "routing.db"
    write_db(db, [], schema)
    before = db.read_bytes()
    assert before
    repo = SqliteBackendRepository(str(db))
    with pytest.raises(RoutingDatabaseError) as caught:
        repo.loadInitial()
    assert str(caught.value) == f"{db} has no 'backends' table; create it with conf/schema.sql"
    assert repo.lastError == str(caught.value)
    assert db.read_bytes() == before


def test_loadInitial_fills_empty_file(tmp_path: Path, events: List[Dict[str, Any]]) -> None:
    """
    A zero-length file (C{touch routing.db}) is treated like a missing one:
    the schema is created in it, with the same warning naming the file.
    """
    db = tmp_path / "routing.db"
    db.touch()
    repo = SqliteBackendRepository(str(db))
    snapshot = repo.loadInitial()
    assert len(snapshot) == 0 and repo.current() is snapshot
    assert repo.lastError is None and repo.lastReloadOk is not None
    conn = sqlite3.connect(db)
    assert [r[1] for r in conn.execute("PRAGMA table_info(backends)")] == list(COLUMNS)
    conn.close()
    warnings = [e for e in events if e["log_level"] is LogLevel.warn]
    assert len(warnings) == 1 and warnings[0]["path"] == str(db)
    assert "created it with an empty backends table" in formatEvent(warnings[0])


def test_loadInitial_missing_column_raises(tmp_path: Path) -> None:
    """
    At startup a table lacking a mandatory column (here healthy, dropped
    with ALTER TABLE) is a RoutingDatabaseError naming it, not a table
    whose unhealthy backends become routable.
    """
    db = tmp_path / "routing.db"
    write_db(db, [good_row("sick", healthy=0)])
    conn = sqlite3.connect(db)
    conn.execute("ALTER TABLE backends DROP COLUMN healthy")
    conn.commit()
    conn.close()
    repo = SqliteBackendRepository(str(db))
    with pytest.raises(RoutingDatabaseError, match=r"lacks column\(s\) healthy \(see conf/schema"):
        repo.loadInitial()
    assert repo.lastError is not None and "healthy" in repo.lastError
    assert len(repo.current()) == 0


def test_make_service_missing_column_is_fatal(tmp_path: Path) -> None:
    """
    The twistd plugin turns a missing mandatory column at startup into a
    one-line fatal message naming the option, the column and the schema.
    """
    db = tmp_path / "routing.db"
    write_db(db, [good_row("gone", deleted=1)])
    conn = sqlite3.connect(db)
    conn.execute("ALTER TABLE backends DROP COLUMN deleted")
    conn.commit()
    conn.close()
    options = Options()
    options.parseOptions([f"--db={db}", "--geoip-db=none"])
    with pytest.raises(SystemExit) as caught:
        makeService(options, reactor=MemoryReactorClock(), environ={})
    message = str(caught.value.code)
    assert "\n" not in message and "--db" in message
    assert message.endswith(
        f"table 'backends' in {db} lacks column(s) deleted (see conf/schema.sql)"
    )


def test_loadInitial_truncated_file_raises(tmp_path: Path) -> None:
    """
    A truncated database at startup is a clear RoutingDatabaseError.
    """
    db = tmp_path / "routing.db"
    write_db(db, many_rows("a"))
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 2])
    with pytest.raises(RoutingDatabaseError, match="malformed"):
        SqliteBackendRepository(str(db)).loadInitial()


def test_loadInitial_uncreatable_file_raises(tmp_path: Path) -> None:
    """
    A missing file that cannot be created (no such directory) raises
    RoutingDatabaseError naming the path.
    """
    db = tmp_path / "nowhere" / "routing.db"
    with pytest.raises(RoutingDatabaseError, match="cannot create"):
        SqliteBackendRepository(str(db)).loadInitial()


def test_loadInitial_directory_raises(tmp_path: Path) -> None:
    """
    A directory where the file should be is not mistaken for a missing
    file: RoutingDatabaseError.
    """
    db = tmp_path / "routing.db"
    db.mkdir()
    with pytest.raises(RoutingDatabaseError, match="cannot open"):
        SqliteBackendRepository(str(db)).loadInitial()


def test_verifyObject(tmp_path: Path) -> None:
    """
    SqliteBackendRepository provides IBackendRepository.
    """
    assert verifyObject(IBackendRepository, SqliteBackendRepository(str(tmp_path / "r.db")))


# --- reload, with the real reactor thread pool -----------------------------------


def repository(path: Path, **kwargs: Any) -> SqliteBackendRepository:
    kwargs.setdefault("busy_timeout", 0.05)
    return SqliteBackendRepository(str(path), reactor=reactor, **kwargs)


@pytest_twisted.inlineCallbacks
def test_reload_replaces_and_notifies_only_on_change(tmp_path: Path):
    """
    A reload with new content replaces the snapshot and tells listeners
    (old, new); a reload with the same routing content (heartbeat times
    aside) puts the fresh snapshot in force and tells nobody.
    """
    db = tmp_path / "routing.db"
    write_db(db, [good_row("a")])
    repo = repository(db)
    first = repo.loadInitial()
    calls: List[tuple[RoutingSnapshot, RoutingSnapshot]] = []
    repo.addListener(lambda old, new: calls.append((old, new)))

    same = yield repo.reload()
    # The same content: the fresh snapshot is in force, nobody is told.
    assert same.same_content(first) and repo.current() is same and calls == []

    write_db(db, [good_row("a"), good_row("b", region="eu")])
    second = yield repo.reload()
    assert [b.id for b in second.backends] == ["a", "b"]
    assert repo.current() is second
    assert calls == [(same, second)]


@pytest_twisted.inlineCallbacks
def test_reload_runs_off_the_reactor_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """
    The file is read in a thread-pool thread, never on the reactor thread.
    """
    db = tmp_path / "routing.db"
    write_db(db, [good_row("a")])
    threads: List[int] = []
    real = edgesqlite.load_backends

    def recording(path: str, busy_timeout: float):
        threads.append(threading.get_ident())
        return real(path, busy_timeout)

    monkeypatch.setattr(edgesqlite, "load_backends", recording)
    repo = repository(db)
    snapshot = yield repo.reload()
    assert [b.id for b in snapshot.backends] == ["a"]
    assert len(threads) == 1
    assert threads[0] != threading.get_ident()


@pytest_twisted.inlineCallbacks
def test_concurrent_reloads_never_overlap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """
    Reloads asked for while one runs wait for it and are then served by one
    further load; two loads never run at once, and every caller gets the
    snapshot in force.
    """
    db = tmp_path / "routing.db"
    write_db(db, [good_row("a")])
    running: List[int] = []
    overlaps: List[int] = []
    calls: List[int] = []
    real = edgesqlite.load_backends

    def tracking(path: str, busy_timeout: float):
        running.append(1)
        if len(running) > 1:
            overlaps.append(1)
        calls.append(1)
        try:
            return real(path, busy_timeout)
        finally:
            running.pop()

    monkeypatch.setattr(edgesqlite, "load_backends", tracking)
    repo = repository(db)
    results = yield gatherResults([repo.reload() for _ in range(5)])
    assert overlaps == []
    assert len(calls) == 2
    assert all(r.same_content(repo.current()) for r in results)
    assert [b.id for b in repo.current().backends] == ["a"]


def _corrupt(db: Path) -> None:
    db.write_bytes(b"\x00garbage, not SQLite\xff" * 512)


def _truncate(db: Path) -> None:
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 3])


def _delete(db: Path) -> None:
    db.unlink()


def _dropColumn(db: Path) -> None:
    write_db(db, [{k: v for k, v in good_row("x").items() if k != "port"}], NO_PORT_SCHEMA)


def _dropHealthy(db: Path) -> None:
    conn = sqlite3.connect(db)
    conn.execute("ALTER TABLE backends DROP COLUMN healthy")
    conn.commit()
    conn.close()


def _empty(db: Path) -> None:
    db.write_bytes(b"")


def _directory(db: Path) -> None:
    db.unlink()
    db.mkdir()


def _halfWritten(db: Path) -> None:
    # Another complete database, copied over the file in place and
    # interrupted halfway.
    other = db.with_name("other.db")
    write_db(other, many_rows("new"))
    data = other.read_bytes()
    with open(db, "r+b") as f:
        f.write(data[: len(data) // 2])
        f.truncate()


FAULTS = {
    "corrupted": _corrupt,
    "truncated": _truncate,
    "deleted": _delete,
    "column dropped": _dropColumn,
    "healthy dropped in place": _dropHealthy,
    "emptied": _empty,
    "unreadable (a directory)": _directory,
    "replaced non-atomically": _halfWritten,
}


@pytest.mark.parametrize("fault", list(FAULTS))
@pytest_twisted.inlineCallbacks
def test_reload_survives_fault(tmp_path: Path, fault: str, events: List[Dict[str, Any]]):
    """
    F12: after the file is broken the last good snapshot stays in force,
    the reload's Deferred still fires with it, the failure is recorded and
    logged once, and the next good file is picked up.
    """
    db = tmp_path / "routing.db"
    write_db(db, many_rows("old"))
    metrics = MetricsStore()
    repo = repository(db, metrics=metrics)
    good = repo.loadInitial()
    assert len(good) == 400

    FAULTS[fault](db)
    for _ in range(3):
        kept = yield repo.reload()
        assert kept is good and repo.current() is good
    assert repo.lastError is not None
    assert metrics.counter("routing_reload", "error") == 3
    assert len(texts(events, LogLevel.error)) == 1

    if db.is_dir():
        shutil.rmtree(db)
    write_db(db, [good_row("fresh")])
    fresh = yield repo.reload()
    assert [b.id for b in fresh.backends] == ["fresh"] and repo.current() is fresh
    assert repo.lastError is None
    infos = [t for t in texts(events, LogLevel.info) if "again after failure" in t]
    assert len(infos) == 1


@pytest_twisted.inlineCallbacks
def test_reload_dropped_column_keeps_table_until_restored(
    tmp_path: Path, events: List[Dict[str, Any]]
):
    """
    F12 for a dropped column: after C{ALTER TABLE backends DROP COLUMN
    healthy} a reload fails (logged once, naming the column) and the last
    good table stays, so the unhealthy backend stays out of rotation; once
    the column is added back the next reload is picked up.
    """
    db = tmp_path / "routing.db"
    write_db(db, [good_row("a"), good_row("sick", healthy=0)])
    repo = repository(db)
    good = repo.loadInitial()
    assert [b.id for b in good.backends if b.routable] == ["a"]

    _dropHealthy(db)
    for _ in range(3):
        kept = yield repo.reload()
        assert kept is good
    assert [b.id for b in repo.current().backends if b.routable] == ["a"]
    assert repo.lastError is not None and "lacks column(s) healthy" in repo.lastError
    errors = texts(events, LogLevel.error)
    assert len(errors) == 1 and "lacks column(s) healthy (see conf/schema.sql)" in errors[0]

    conn = sqlite3.connect(db)
    conn.execute("ALTER TABLE backends ADD COLUMN healthy INTEGER NOT NULL DEFAULT 1")
    conn.execute("UPDATE backends SET healthy = 0 WHERE id = 'a'")
    conn.commit()
    conn.close()
    fresh = yield repo.reload()
    assert repo.current() is fresh and repo.lastError is None
    assert [(b.id, b.healthy) for b in fresh.backends] == [("a", False), ("sick", True)]
    assert len([t for t in texts(events, LogLevel.info) if "again after failure" in t]) == 1
    assert len(texts(events, LogLevel.error)) == 1


@pytest_twisted.inlineCallbacks
def test_reload_of_empty_file_fails(tmp_path: Path):
    """
    Only the first load fills in an empty file: a reload that finds the file
    emptied (say, mid-replacement) fails, keeps the last good table and
    leaves the file alone.
    """
    db = tmp_path / "routing.db"
    write_db(db, [good_row("a")])
    repo = repository(db)
    good = repo.loadInitial()
    _empty(db)
    kept = yield repo.reload()
    assert kept is good and repo.current() is good
    assert repo.lastError is not None and "backends" in repo.lastError
    assert db.read_bytes() == b""


@pytest_twisted.inlineCallbacks
def test_reload_survives_lock(tmp_path: Path):
    """
    F12: while another connection holds an EXCLUSIVE transaction the
    reload gives up after the busy timeout and keeps the last good table;
    once the lock is gone the new content is picked up.
    """
    db = tmp_path / "routing.db"
    write_db(db, [good_row("a")])
    repo = repository(db, busy_timeout=0.05)
    good = repo.loadInitial()

    holder = sqlite3.connect(db, isolation_level=None, timeout=0)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        holder.execute("INSERT INTO backends (id, region, wg_ip, port) VALUES ('b', 'eu', 'h', 1)")
        kept = yield repo.reload()
        assert kept is good
        assert repo.lastError is not None and "locked" in repo.lastError
        holder.execute("COMMIT")
    finally:
        holder.close()
    fresh = yield repo.reload()
    assert [b.id for b in fresh.backends] == ["a", "b"]
    assert repo.lastError is None


@pytest_twisted.inlineCallbacks
def test_failure_logged_once_per_change_of_state(tmp_path: Path, events: List[Dict[str, Any]]):
    """
    A failure is logged when it first happens, not again while it repeats,
    again when it turns into a different failure, and recovery is logged
    once.
    """
    db = tmp_path / "routing.db"
    write_db(db, [good_row("a")])
    repo = repository(db)
    repo.loadInitial()

    _corrupt(db)
    yield repo.reload()
    yield repo.reload()
    db.unlink()
    yield repo.reload()
    yield repo.reload()
    errors = texts(events, LogLevel.error)
    assert len(errors) == 2
    # sqlite3's own words for the second: "unable to open database file"
    # (CPython), "Could not open database" (PyPy's sqlite3).
    assert "not a database" in errors[0] and "cannot open" in errors[1]
    assert all("keeping the last good table (1 backends)" in e for e in errors)

    write_db(db, [good_row("a")])
    yield repo.reload()
    yield repo.reload()
    assert len([t for t in texts(events) if "again after failure" in t]) == 1
    assert len(texts(events, LogLevel.error)) == 2


@pytest_twisted.inlineCallbacks
def test_skipped_rows_logged_when_the_set_changes(tmp_path: Path, events: List[Dict[str, Any]]):
    """
    A skipped row is logged (and counted) once, not at every reload; a row
    newly skipped later is logged then.
    """
    db = tmp_path / "routing.db"
    write_db(db, [good_row("a"), good_row("b", port=0)], UNTYPED_SCHEMA)
    metrics = MetricsStore()
    repo = repository(db, metrics=metrics)
    repo.loadInitial()
    yield repo.reload()
    yield repo.reload()
    assert len(texts(events, LogLevel.warn)) == 1
    assert metrics.counter("routing_rows_skipped", "port") == 1

    write_db(db, [good_row("a"), good_row("b", port=0), good_row("c", deleted=7)], UNTYPED_SCHEMA)
    yield repo.reload()
    yield repo.reload()
    warnings = texts(events, LogLevel.warn)
    assert len(warnings) == 2 and "c" in warnings[1] and "deleted: 7" in warnings[1]
    assert repo.skipped == (("b", "port: 0 is outside 1-65535"), ("c", "deleted: 7 is not 0 or 1"))
    assert metrics.counter("routing_rows_skipped", "deleted") == 1


@pytest_twisted.inlineCallbacks
def test_reload_never_fails_on_unexpected_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, events: List[Dict[str, Any]]
):
    """
    Even an unexpected exception in the loader leaves the last good table in
    force and the Deferred firing with it (logged once with its traceback),
    so a periodic job calling reload() cannot die; a failing listener does
    not stop the swap either.
    """
    db = tmp_path / "routing.db"
    write_db(db, [good_row("a")])
    repo = repository(db)
    good = repo.loadInitial()

    def broken(path: str, busy_timeout: float):
        raise RuntimeError("bug")

    monkeypatch.setattr(edgesqlite, "load_backends", broken)
    assert (yield repo.reload()) is good
    assert (yield repo.reload()) is good
    assert repo.lastError == "RuntimeError: bug"
    failures = [e for e in events if "log_failure" in e]
    assert len(failures) == 1
    monkeypatch.undo()

    def badListener(old: RoutingSnapshot, new: RoutingSnapshot) -> None:
        raise ValueError("listener bug")

    seen: List[RoutingSnapshot] = []
    repo.addListener(badListener)
    repo.addListener(lambda old, new: seen.append(new))
    write_db(db, [good_row("b")])
    new = yield repo.reload()
    assert [b.id for b in new.backends] == ["b"] and seen == [new]
    # The expected failures were logged by us; don't leave them to pytest.
    assert any("listener" in formatEvent(e) for e in events if "log_failure" in e)


# --- the write port (issue 9) ----------------------------------------------------


def table(path: Path) -> tuple[List[str], List[tuple[Any, ...]]]:
    """
    The columns and every row (by id) of the backends table, read directly.
    """
    conn = sqlite3.connect(path)
    try:
        columns = [r[1] for r in conn.execute("PRAGMA table_info(backends)")]
        rows = conn.execute("SELECT * FROM backends ORDER BY id").fetchall()
    finally:
        conn.close()
    return columns, rows


def registration(backend_id: str, **overrides: object) -> Dict[str, object]:
    """
    A row as the registration API writes it (no heartbeat_at: the writer
    sets it).
    """
    row = good_row(backend_id, health_check=None)
    row.update(overrides)
    return row


def writer_for(path: Path, rows: Sequence[Mapping[str, object]] = (), schema: str | None = None):
    write_db(path, rows, schema)
    repo = repository(path)
    repo.loadInitial()
    return repo, SqliteBackendWriter(repo, busy_timeout=0.2)


def test_writer_verifyObject(tmp_path: Path) -> None:
    """
    SqliteBackendWriter provides IBackendWriter.
    """
    repo = SqliteBackendRepository(str(tmp_path / "r.db"))
    assert verifyObject(IBackendWriter, SqliteBackendWriter(repo))


@pytest_twisted.inlineCallbacks
def test_register_writes_and_is_in_force_when_it_fires(tmp_path: Path):
    """
    register() inserts the row with heartbeat_at = now and fires once the
    repository's snapshot has it (no wait for a periodic reload): the
    backend it fires with is the one in force, routable.
    """
    db = tmp_path / "routing.db"
    repo, writer = writer_for(db, [good_row("hand")])
    before = reactor.seconds()
    backend = yield writer.register(registration("reg-1", wg_ip="10.9.9.9", port=7000))
    assert repo.current().by_id["reg-1"] is backend
    assert "reg-1" in repo.current().routable
    assert backend.host == "10.9.9.9" and backend.port == 7000
    assert backend.heartbeat_at is not None and before <= backend.heartbeat_at <= reactor.seconds()
    columns, rows = table(db)
    by_id = {r[0]: dict(zip(columns, r)) for r in rows}
    assert by_id["reg-1"]["heartbeat_at"] == backend.heartbeat_at
    assert by_id["hand"]["heartbeat_at"] is None


@pytest_twisted.inlineCallbacks
def test_register_duplicate_id_writes_nothing(tmp_path: Path):
    """
    A registration with an id already in the table (written by hand or
    registered) fails with DuplicateBackendError; the table is unchanged.
    """
    db = tmp_path / "routing.db"
    _repo, writer = writer_for(db, [good_row("hand")])
    yield writer.register(registration("reg-1"))
    before = table(db)
    for backend_id in ("hand", "reg-1"):
        with pytest.raises(DuplicateBackendError) as caught:
            yield writer.register(registration(backend_id, port=9999))
        assert caught.value.backend_id == backend_id
    assert table(db) == before


@pytest_twisted.inlineCallbacks
def test_register_invalid_row_writes_nothing(tmp_path: Path):
    """
    The writer validates the row itself (validate_row): an invalid one
    fails with InvalidRowError and never reaches the file.
    """
    db = tmp_path / "routing.db"
    _repo, writer = writer_for(db, [good_row("hand")])
    before = table(db)
    with pytest.raises(InvalidRowError) as caught:
        yield writer.register(registration("bad", port=70000))
    assert caught.value.column == "port"
    assert table(db) == before


@pytest_twisted.inlineCallbacks
def test_register_adds_heartbeat_column_to_original_schema(
    tmp_path: Path, events: List[Dict[str, Any]]
):
    """
    On a table made with the original schema (no country, proxy_protocol,
    health_check, heartbeat_at), the first registration adds heartbeat_at
    (and country, which it has a value for; not proxy_protocol or
    health_check, which it leaves at their defaults), with a warning; the
    rows written by hand read NULL there and stay rows written by hand.
    """
    db = tmp_path / "routing.db"
    original = {k: v for k, v in good_row("hand").items() if k not in ("country", "proxy_protocol")}
    repo, writer = writer_for(db, [original], ORIGINAL_SCHEMA)
    backend = yield writer.register(
        {k: v for k, v in registration("reg-1").items() if k != "health_check"}
    )
    columns, _ = table(db)
    assert columns[-2:] == ["country", "heartbeat_at"]
    assert "proxy_protocol" not in columns and "health_check" not in columns
    assert backend.country == "BR" and backend.heartbeat_at is not None
    assert repo.current().by_id["hand"].heartbeat_at is None
    warnings = texts(events, LogLevel.warn)
    assert any("country, heartbeat_at" in w for w in warnings)


@pytest_twisted.inlineCallbacks
def test_heartbeat_only_for_registered_rows(tmp_path: Path):
    """
    heartbeat() sets heartbeat_at to now on a registered row (True); an
    unknown id or a row written by hand gives False and writes nothing.
    Heartbeats asked for together are written by one transaction and each
    gets its own answer.
    """
    db = tmp_path / "routing.db"
    _repo, writer = writer_for(db, [good_row("hand")])
    first = yield writer.register(registration("reg-1"))
    yield writer.register(registration("reg-2", wg_ip="10.0.0.2"))
    hand_row = [r for r in table(db)[1] if r[0] == "hand"]
    results = yield gatherResults(
        [writer.heartbeat(i) for i in ("reg-1", "hand", "nope", "reg-2", "reg-1")]
    )
    assert results == [True, False, False, True, True]
    columns, rows = table(db)
    by_id = {r[0]: dict(zip(columns, r)) for r in rows}
    assert by_id["reg-1"]["heartbeat_at"] >= first.heartbeat_at
    assert [r for r in rows if r[0] == "hand"] == hand_row


@pytest_twisted.inlineCallbacks
def test_heartbeat_on_original_schema_is_false(tmp_path: Path):
    """
    A table without heartbeat_at has no registered row: heartbeat() and
    deregister() give False and do not add the column.
    """
    db = tmp_path / "routing.db"
    original = {k: v for k, v in good_row("hand").items() if k not in ("country", "proxy_protocol")}
    _repo, writer = writer_for(db, [original], ORIGINAL_SCHEMA)
    before = table(db)
    assert (yield writer.heartbeat("hand")) is False
    assert (yield writer.deregister("hand")) is False
    assert table(db) == before


@pytest_twisted.inlineCallbacks
def test_deregister_deletes_only_registered_rows(tmp_path: Path):
    """
    deregister() deletes a registered row and fires once the snapshot in
    force no longer has it; a row written by hand, or an unknown id, gives
    False and the table is unchanged.
    """
    db = tmp_path / "routing.db"
    repo, writer = writer_for(db, [good_row("hand")])
    yield writer.register(registration("reg-1"))
    assert (yield writer.deregister("reg-1")) is True
    assert "reg-1" not in repo.current().by_id
    before = table(db)
    assert (yield writer.deregister("hand")) is False
    assert (yield writer.deregister("reg-1")) is False
    assert table(db) == before and "hand" in repo.current().by_id


@pytest_twisted.inlineCallbacks
def test_writes_run_off_the_reactor_thread_one_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """
    Every write runs in a thread-pool thread, never the reactor's, and
    never two at once: a burst of registrations and heartbeats holds one
    pool thread at a time.
    """
    db = tmp_path / "routing.db"
    repo, writer = writer_for(db)
    reactor_thread = threading.get_ident()
    running: List[int] = []
    overlap: List[int] = []
    threads: List[int] = []
    lock = threading.Lock()

    def tracked(f: Any) -> Any:
        def call(*args: Any) -> Any:
            with lock:
                running.append(1)
                overlap.append(len(running))
                threads.append(threading.get_ident())
            try:
                return f(*args)
            finally:
                with lock:
                    running.pop()

        return call

    monkeypatch.setattr(edgesqlite, "insert_backend", tracked(edgesqlite.insert_backend))
    monkeypatch.setattr(edgesqlite, "update_heartbeats", tracked(edgesqlite.update_heartbeats))
    work = [writer.register(registration(f"r{i}", wg_ip=f"10.0.1.{i}")) for i in range(8)]
    work += [writer.heartbeat(f"r{i}") for i in range(8)]
    results = yield gatherResults(work)
    assert results[8:] == [True] * 8
    assert max(overlap) == 1
    assert reactor_thread not in threads
    assert len(repo.current().by_id) == 8


@pytest_twisted.inlineCallbacks
def test_locked_database_fails_clearly_and_writes_nothing(tmp_path: Path):
    """
    A database locked by another writer past the busy timeout fails the
    write with BackendWriteError saying so; nothing is written, and the
    next write after the lock is released succeeds.
    """
    db = tmp_path / "routing.db"
    _repo, writer = writer_for(db, [good_row("hand")])
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(BackendWriteError) as caught:
            yield writer.register(registration("reg-1"))
        assert "locked" in str(caught.value)
        with pytest.raises(BackendWriteError):
            yield writer.heartbeat("hand")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert [r[0] for r in table(db)[1]] == ["hand"]
    backend = yield writer.register(registration("reg-1"))
    assert backend.id == "reg-1"


@pytest_twisted.inlineCallbacks
def test_writer_never_creates_a_database(tmp_path: Path):
    """
    A missing file is a BackendWriteError (a writer never creates an empty
    routing table behind the loader's back).
    """
    db = tmp_path / "routing.db"
    _repo, writer = writer_for(db)
    db.unlink()
    with pytest.raises(BackendWriteError):
        yield writer.register(registration("reg-1"))
    assert not db.exists()
