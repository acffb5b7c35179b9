"""
Tests for L{edgeproxy.geo}: locating clients (SPEC section 2, FAULTS F13)
with the real database shipped in C{edgeproxy/data}
(geo-whois-asn-country, from ip-location-db).  The database formats, hot
reload and the age warning are in C{test_geodata.py}.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any, Dict, Iterator, List

import maxminddb
import pytest
from faultkit import EventCollector
from hypothesis import given
from hypothesis import strategies as st
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from zope.interface.verify import verifyObject

from edgeproxy.geo import (
    CONTINENT_REGIONS,
    DEFAULT_REGIONS,
    GeoIPResolver,
    default_geoip_path,
    load_overrides,
    load_regions,
    open_database,
    parse_overrides,
    parse_regions,
    region_for,
)
from edgeproxy.interfaces import IGeoResolver
from edgeproxy.model import GeoInfo

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def events() -> Iterator[List[Dict[str, Any]]]:
    """
    Log events of L{edgeproxy.geo} emitted during the test.
    """
    collector = EventCollector("edgeproxy.geo")
    globalLogPublisher.addObserver(collector)
    yield collector.events
    globalLogPublisher.removeObserver(collector)


@pytest.fixture(scope="module")
def resolver() -> Iterator[GeoIPResolver]:
    """
    A resolver on the shipped database, default regions, no overrides.
    """
    r = GeoIPResolver.fromPaths(None)
    yield r
    r.close()


class SpyReader:
    """
    A maxminddb reader stand-in that counts lookups and passes them to the
    real shipped database (or raises C{error} if set, once C{armed}: the
    resolver samples a few records when it is built).
    """

    def __init__(self, error: Exception | None = None) -> None:
        path = default_geoip_path()
        assert path is not None
        # edgeproxy's choice of reader (not maxminddb's C extension on PyPy).
        self.real = open_database(path).reader
        self.lookups: List[object] = []
        self.error = error
        self.armed = False

    def metadata(self) -> Any:
        return self.real.metadata()

    def get(self, address: Any) -> Any:
        if not self.armed:
            return self.real.get(address)
        self.lookups.append(address)
        if self.error is not None:
            raise self.error
        return self.real.get(address)

    def __iter__(self) -> Any:
        return iter(self.real)

    def close(self) -> None:
        self.real.close()


def spied(spy: SpyReader, **kw: Any) -> GeoIPResolver:
    """
    A resolver on C{spy}, whose lookups count from now on.
    """
    resolver = GeoIPResolver(spy, **kw)
    spy.armed = True
    return resolver


# --- the shipped database -------------------------------------------------------


def test_default_geoip_path() -> None:
    """
    The database shipped in the package's data folder is found, in the
    package that is imported (a checkout or an installed copy, as under
    tox), and it is the file of the repository.
    """
    import edgeproxy

    path = default_geoip_path()
    assert path is not None
    assert Path(path) == Path(edgeproxy.__file__).parent / "data" / "geo-whois-asn-country.mmdb"
    assert (
        Path(path).read_bytes()
        == (ROOT / "edgeproxy" / "data" / "geo-whois-asn-country.mmdb").read_bytes()
    )


def test_describe(resolver: GeoIPResolver) -> None:
    """
    describe() names the database (its file, as its type is generic) and
    its build date, which is recent (2026 or later).
    """
    match = re.fullmatch(
        r"geo-whois-asn-country \(country ipvAll\) (\d{4})-\d\d-\d\d", resolver.describe()
    )
    assert match is not None, resolver.describe()
    assert int(match.group(1)) >= 2026


@pytest.mark.parametrize(
    ("ip", "country", "continent"),
    [
        ("90.85.1.1", "FR", "EU"),
        ("2001:41d0::1", "FR", "EU"),
        ("200.160.2.3", "BR", "SA"),
        ("133.242.0.3", "JP", "AS"),
        ("8.8.8.8", "US", "NA"),
        ("1.1.1.1", "AU", "OC"),
        ("41.0.0.1", "ZA", "AF"),
        ("81.2.69.160", "GB", "EU"),
        ("2001:4860::1", "US", "NA"),
    ],
)
def test_known_addresses(resolver: GeoIPResolver, ip: str, country: str, continent: str) -> None:
    """
    Well-known addresses (the same in every current database and in the
    2018 GeoLite2 City) map to their country, and the country to its region
    (table first, else the continent from COUNTRY_CONTINENTS, as this
    database has none).
    """
    expected = DEFAULT_REGIONS.get(country, CONTINENT_REGIONS[continent])
    assert resolver.resolve(ip) == GeoInfo(country, expected)


def test_continent_fallback(resolver: GeoIPResolver) -> None:
    """
    A country missing from the region table (ZA) gets its continent's region
    (AF -> eu) instead of a blanket default.
    """
    assert "ZA" not in DEFAULT_REGIONS
    assert resolver.resolve("41.0.0.1") == GeoInfo("ZA", "eu")


def test_v4_mapped_is_unwrapped(resolver: GeoIPResolver) -> None:
    """
    An IPv4-mapped IPv6 address is located as its IPv4 address.
    """
    assert resolver.resolve("::ffff:90.85.1.1") == GeoInfo("FR", "eu")
    assert resolver.resolve("::ffff:127.0.0.1") is None


def test_ipv6_lookup(resolver: GeoIPResolver) -> None:
    """
    Plain IPv6 addresses are looked up in the database.
    """
    assert resolver.resolve("2001:4860::1") == GeoInfo("US", "us")


@pytest.mark.parametrize(
    "ip",
    [
        "127.0.0.1",
        "::1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "100.64.0.1",
        "169.254.1.1",
        "fe80::1",
        "fd00::1",
        "224.0.0.1",
        "ff02::1",
        "0.0.0.0",
        "::",
        "240.0.0.1",
        "255.255.255.255",
        "192.0.2.1",
    ],
)
def test_non_public_addresses_have_no_geo(resolver: GeoIPResolver, ip: str) -> None:
    """
    Loopback, private, shared, link-local, multicast, unspecified, reserved
    and documentation addresses have no geo without an override.
    """
    assert resolver.resolve(ip) is None


@pytest.mark.parametrize(
    "text",
    ["", "x", "1.2.3", "256.1.1.1", "8.8.8.8:80", " 8.8.8.8", "::ffff:", "1.1.1.1/32", "\x00"],
)
def test_garbage_gives_none(resolver: GeoIPResolver, text: str) -> None:
    """
    Text that is not an address gives None, never an exception.
    """
    assert resolver.resolve(text) is None


def test_unknown_public_address() -> None:
    """
    A public address absent from the database gives None, and the miss is
    cached too.
    """
    spy = SpyReader()
    r = spied(spy)
    absent = "2c0f:ffff::1"
    try:
        assert spy.real.get(absent) is None
        assert r.resolve(absent) is None
        assert r.resolve(absent) is None
        assert len(spy.lookups) == 1
    finally:
        spy.close()


# --- overrides ------------------------------------------------------------------


def test_override_private_overlay() -> None:
    """
    The overlay override 10.50.1.0/24 -> BR gives BR/sa to its addresses.
    """
    r = GeoIPResolver(None, overrides=parse_overrides("10.50.1.0/24 BR"))
    assert r.resolve("10.50.1.7") == GeoInfo("BR", "sa")
    assert r.resolve("10.50.2.7") is None


def test_most_specific_override_wins() -> None:
    """
    Overlapping overrides: the longest matching prefix wins, whatever the
    order in the file.
    """
    overrides = parse_overrides(
        """
        10.50.1.7/32 PT
        10.0.0.0/8 US
        10.50.1.0/24 BR
        10.50.0.0/16 DE
        """
    )
    r = GeoIPResolver(None, overrides=overrides)
    assert r.resolve("10.50.1.7") == GeoInfo("PT", "eu")
    assert r.resolve("10.50.1.8") == GeoInfo("BR", "sa")
    assert r.resolve("10.50.9.9") == GeoInfo("DE", "eu")
    assert r.resolve("10.9.9.9") == GeoInfo("US", "us")
    assert r.resolve("11.0.0.1") is None


def test_override_beats_database_and_applies_to_mapped_and_v6() -> None:
    """
    Overrides are consulted before the database, match v4-mapped addresses
    through their IPv4 form, and work for IPv6 networks.
    """
    spy = SpyReader()
    overrides = parse_overrides("8.8.8.0/24 br\nfd00:50:1::/48 JP\n")
    r = spied(spy, overrides=overrides)
    try:
        assert r.resolve("8.8.8.8") == GeoInfo("BR", "sa")
        assert r.resolve("::ffff:8.8.8.9") == GeoInfo("BR", "sa")
        assert r.resolve("fd00:50:1:2::9") == GeoInfo("JP", "ap")
        assert spy.lookups == []
        assert r.resolve("8.8.4.4") == GeoInfo("US", "us")
    finally:
        spy.close()


def test_override_country_outside_table() -> None:
    """
    An override to a country missing from the region table has the country
    and no region (there is no continent to fall back on).
    """
    r = GeoIPResolver(None, overrides=parse_overrides("10.0.0.0/8 ZA"))
    assert r.resolve("10.1.1.1") == GeoInfo("ZA", None)


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        ("10.0.0.0/8", 1, "expected 'CIDR COUNTRY'"),
        ("# c\n10.0.0.0/8 BR extra", 2, "expected 'CIDR COUNTRY'"),
        ("\n\n10.0.0.0/33 BR", 3, "10.0.0.0/33"),
        ("10.0.0.1/8 BR", 1, "host bits set"),
        ("banana BR", 1, "banana"),
        ("10.0.0.0/8 BRA", 1, "'BRA' is not a two-letter country code"),
        ("10.0.0.0/8 B1", 1, "'B1' is not a two-letter country code"),
        ("10.0.0.0/8 BR\n10.0.0.0/8 US", 2, "already on line 1"),
    ],
)
def test_malformed_overrides(text: str, line: int, problem: str) -> None:
    """
    A malformed overrides line is a ValueError naming the source and line.
    """
    with pytest.raises(ValueError, match=rf"^overrides.txt:{line}: .*{problem}"):
        parse_overrides(text, "overrides.txt")


def test_example_overrides_file() -> None:
    """
    conf/geo-overrides.example parses, comments and all.
    """
    overrides = load_overrides(str(ROOT / "conf" / "geo-overrides.example"))
    assert (ipaddress.ip_network("10.50.1.0/24"), "BR") in overrides


# --- regions --------------------------------------------------------------------


def test_region_for() -> None:
    """
    Country first, then continent, else None; a custom table is used as
    given.
    """
    assert region_for("BR", "SA") == "sa"
    assert region_for("ZA", "AF") == "eu"
    assert region_for("XX", "OC") == "ap"
    assert region_for(None, "AN") == "us"
    assert region_for("ZA", None) is None
    assert region_for(None, None) is None
    assert region_for("BR", "SA", {"BR": "latam"}) == "latam"


def test_shipped_regions_file_is_the_default() -> None:
    """
    conf/regions.conf holds exactly the built-in table.
    """
    assert load_regions(str(ROOT / "conf" / "regions.conf")) == dict(DEFAULT_REGIONS)


def test_parse_regions() -> None:
    """
    Region lines with comments, blank lines, lower-case codes and a region
    continued on a second line.
    """
    text = "# table\n\nlatam: br ar  # south\nlatam: MX\n gru-1 : cl\n"
    assert parse_regions(text) == {"BR": "latam", "AR": "latam", "MX": "latam", "CL": "gru-1"}


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        ("sa BR AR", 1, "expected 'region: CC CC ...'"),
        ("# x\n: BR", 2, "'' is not a region name"),
        ("s a: BR", 1, "'s a' is not a region name"),
        ("sa: BRA", 1, "'BRA' is not a two-letter country code"),
        ("sa: BR\nus: br", 2, "BR is already in region 'sa'"),
    ],
)
def test_malformed_regions(text: str, line: int, problem: str) -> None:
    """
    A malformed regions line is a ValueError naming the source and line.
    """
    with pytest.raises(ValueError, match=rf"^regions.conf:{line}: {problem}"):
        parse_regions(text, "regions.conf")


def test_regions_file_replaces_table(tmp_path: Path) -> None:
    """
    A regions file replaces the table: listed countries take its regions,
    the others fall back to their continent.
    """
    regions = tmp_path / "regions.conf"
    regions.write_text("latam: BR MX\n")
    r = GeoIPResolver.fromPaths(None, regions_path=str(regions))
    try:
        assert r.resolve("200.160.2.3") == GeoInfo("BR", "latam")
        assert r.resolve("90.85.1.1") == GeoInfo("FR", "eu")
    finally:
        r.close()


def test_fromPaths_rejects_bad_files(tmp_path: Path) -> None:
    """
    At startup a malformed regions file or a missing overrides file is a
    ValueError naming the file.
    """
    regions = tmp_path / "regions.conf"
    regions.write_text("sa: BR\nnonsense\n")
    with pytest.raises(ValueError, match=r"regions.conf:2:"):
        GeoIPResolver.fromPaths("", regions_path=str(regions))
    with pytest.raises(ValueError, match=r"nope\.txt: cannot read"):
        GeoIPResolver.fromPaths("", overrides_path=str(tmp_path / "nope.txt"))


# --- running without geo (F13) --------------------------------------------------


def _truncated(tmp_path: Path) -> str:
    path = default_geoip_path()
    assert path is not None
    target = tmp_path / "truncated.mmdb"
    with open(path, "rb") as f:
        target.write_bytes(f.read(1 << 20))
    return str(target)


def _garbage(tmp_path: Path) -> str:
    target = tmp_path / "garbage.mmdb"
    target.write_bytes(b"\xab\xcd\xefMaxMind.com" + b"\x00" * 4096)
    return str(target)


def _missing(tmp_path: Path) -> str:
    return str(tmp_path / "missing.mmdb")


def _directory(tmp_path: Path) -> str:
    return str(tmp_path)


@pytest.mark.parametrize("make", [_missing, _garbage, _truncated, _directory])
def test_unusable_database_runs_without_geo(
    tmp_path: Path, make: Any, events: List[Dict[str, Any]]
) -> None:
    """
    F13: a missing, corrupt or truncated database gives a resolver without
    geo that still honours overrides; it is logged once, clearly.
    """
    overrides = tmp_path / "overrides"
    overrides.write_text("10.50.1.0/24 BR\n")
    path = make(tmp_path)
    r = GeoIPResolver.fromPaths(path, overrides_path=str(overrides))
    assert r.describe() == "no geo database"
    assert r.geoError is not None and path in r.geoError
    assert r.resolve("8.8.8.8") is None
    assert r.resolve("10.50.1.9") == GeoInfo("BR", "sa")
    errors = [formatEvent(e) for e in events if e["log_level"] is LogLevel.error]
    assert len(errors) == 1
    assert errors[0].startswith("Running without geo: ") and path in errors[0]


def test_no_database_configured(events: List[Dict[str, Any]]) -> None:
    """
    An empty path means no database on purpose: no geo, said once.
    """
    r = GeoIPResolver.fromPaths("")
    assert r.describe() == "no geo database"
    assert r.resolve("8.8.8.8") is None
    assert len(events) == 1


def test_lookup_error_gives_none_logged_once(events: List[Dict[str, Any]]) -> None:
    """
    A database that fails on lookup (corrupt data section) gives None, and
    the failure is logged once, not per connection.
    """
    spy = SpyReader(error=maxminddb.InvalidDatabaseError("corrupt search tree"))
    r = spied(spy)
    try:
        assert r.resolve("8.8.8.8") is None
        assert r.resolve("90.85.1.1") is None
        assert len(spy.lookups) == 2
        assert len([e for e in events if "log_failure" in e]) == 1
    finally:
        spy.close()


# --- cache ----------------------------------------------------------------------


def test_cache_returns_same_answers() -> None:
    """
    A repeated address is answered from the cache (no second database
    lookup) with the same answer, misses included.
    """
    spy = SpyReader()
    r = spied(spy)
    try:
        first = r.resolve("90.85.1.1")
        assert first == GeoInfo("FR", "eu")
        assert r.resolve("90.85.1.1") is first
        assert r.resolve("127.0.0.1") is None and r.resolve("127.0.0.1") is None
        assert len(spy.lookups) == 1
    finally:
        spy.close()


def test_cache_is_bounded() -> None:
    """
    With a full cache old entries go (and are looked up again), and answers
    stay right.
    """
    spy = SpyReader()
    r = spied(spy, cache_size=2)
    try:
        for ip in ["90.85.1.1", "8.8.8.8", "1.1.1.1", "90.85.1.1"]:
            assert r.resolve(ip) is not None
        assert len(spy.lookups) == 4
        assert r.resolve("90.85.1.1") == GeoInfo("FR", "eu")
        assert len(spy.lookups) == 4
    finally:
        spy.close()


def test_verifyObject(resolver: GeoIPResolver) -> None:
    """
    GeoIPResolver provides IGeoResolver, with and without a database.
    """
    assert verifyObject(IGeoResolver, resolver)
    assert verifyObject(IGeoResolver, GeoIPResolver(None))


_REGIONS = set(DEFAULT_REGIONS.values()) | set(CONTINENT_REGIONS.values())


@given(text=st.text())
def test_resolve_never_raises_on_text(resolver: GeoIPResolver, text: str) -> None:
    """
    Arbitrary text gives None or a GeoInfo, never an exception.
    """
    result = resolver.resolve(text)
    assert result is None or isinstance(result, GeoInfo)


@given(address=st.ip_addresses())
def test_resolve_any_address(resolver: GeoIPResolver, address: Any) -> None:
    """
    Any IPv4 or IPv6 address gives None or a GeoInfo whose region is one of
    the table's or a continent's.
    """
    result = resolver.resolve(str(address))
    assert result is None or result.region is None or result.region in _REGIONS
