"""
Current geo data, kept current (issue 13, part 3): every common
MaxMind-format database is read (each format written here by
L{mmdbwriter} and read back by the real C{maxminddb} and C{geoip2}
readers), the database reloads when its file is replaced, a stale one is
reported (log, metrics, status page), the shipped default is current and
attributed, and C{python -m edgeproxy.geodata update} installs a verified
database from an npm-style registry over HTTPS.
"""

from __future__ import annotations

import base64
import datetime
import gzip
import hashlib
import io
import ipaddress
import json
import os
import shutil
import ssl
import tarfile
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Tuple

import geoip2.database
import pytest
import pytest_twisted
from faultkit import EventCollector
from hypothesis import given, settings
from hypothesis import strategies as st
from mmdbwriter import write_mmdb
from prometheus_client.exposition import generate_latest
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python import usage

from edgeproxy.control.metrics import EdgeproxyCollector, metrics_registry
from edgeproxy.control.status import StatusData
from edgeproxy.geo import (
    COUNTRY_CONTINENTS,
    RELOAD_COUNTER,
    SHIPPED_ATTRIBUTION,
    GeoDatabaseError,
    GeoDatabaseWatcher,
    GeoIPResolver,
    NotALocationDatabaseError,
    default_geoip_path,
    open_database,
    region_for,
)
from edgeproxy.geodata import UpdateError, update, update_from_url
from edgeproxy.metrics import MetricsStore
from edgeproxy.model import GeoInfo
from edgeproxy.service import EdgeProxyService
from edgeproxy.tap import Options, makeService

ROOT = Path(__file__).resolve().parent.parent
DAY = 86400.0


@pytest.fixture
def events() -> Iterator[List[Dict[str, Any]]]:
    """
    Log events of L{edgeproxy.geo} emitted during the test.
    """
    collector = EventCollector("edgeproxy.geo")
    globalLogPublisher.addObserver(collector)
    yield collector.events
    globalLogPublisher.removeObserver(collector)


def _geoip2_record(country: str, continent: str, **more: Any) -> Dict[str, Any]:
    return {
        "continent": {"code": continent, "geoname_id": 1, "names": {"en": continent}},
        "country": {"iso_code": country, "geoname_id": 2, "names": {"en": country}},
        "registered_country": {"iso_code": country, "geoname_id": 2},
        **more,
    }


_CITY = {"city": {"geoname_id": 3, "names": {"en": "Somewhere"}}, "location": {"latitude": 1.5}}

#: (name, database_type, ip_version, records): one of each common format,
#: with the record shapes the real files have.
FORMATS: List[Tuple[str, str, int, List[Tuple[str, Dict[str, Any]]]]] = [
    (
        "geolite2-city",
        "GeoLite2-City",
        6,
        [
            ("81.2.69.0/24", _geoip2_record("GB", "EU", **_CITY)),
            ("2400:8500:1::/48", _geoip2_record("JP", "AS", **_CITY)),
            ("41.0.0.0/16", _geoip2_record("ZA", "AF")),
        ],
    ),
    (
        "geoip2-country",
        "GeoIP2-Country",
        6,
        [
            ("81.2.69.0/24", _geoip2_record("GB", "EU")),
            ("2400:8500:1::/48", _geoip2_record("JP", "AS")),
            ("41.0.0.0/16", _geoip2_record("ZA", "AF")),
        ],
    ),
    (
        "dbip-country-lite",
        "DBIP-Country-Lite",
        6,
        [
            (
                "81.2.69.0/24",
                {
                    "continent": {"code": "EU", "names": {"en": "Europe"}},
                    "country": {"iso_code": "GB", "is_in_european_union": False},
                },
            ),
            ("2400:8500:1::/48", {"continent": {"code": "AS"}, "country": {"iso_code": "JP"}}),
            ("41.0.0.0/16", {"continent": {"code": "AF"}, "country": {"iso_code": "ZA"}}),
        ],
    ),
    (
        "dbip-city-lite",
        "DBIP-City-Lite",
        6,
        [
            ("81.2.69.0/24", {**_CITY, "country": {"iso_code": "GB"}, "continent": {"code": "EU"}}),
            ("2400:8500:1::/48", {**_CITY, "country": {"iso_code": "JP"}}),  # no continent
            ("41.0.0.0/16", {"country": {"iso_code": "ZA"}, "continent": {"code": "AF"}}),
        ],
    ),
    (
        "geoip2-city-isp-org",
        "GeoIP2-City-ISP-Org",
        6,
        [
            ("81.2.69.0/24", _geoip2_record("GB", "EU", isp="x", organization="y")),
            ("2400:8500:1::/48", _geoip2_record("JP", "AS", isp="z")),
            ("41.0.0.0/16", _geoip2_record("ZA", "AF")),
        ],
    ),
    (
        "ip-location-db-country",
        "country",
        6,
        [
            ("81.2.69.0/24", {"country_code": "GB"}),
            ("2400:8500:1::/48", {"country_code": "JP"}),
            ("41.0.0.0/16", {"country_code": "ZA"}),
        ],
    ),
    (
        "ip-location-db-country-ipv4",
        "country",
        4,
        [("81.2.69.0/24", {"country_code": "gb"}), ("41.0.0.0/16", {"country_code": "ZA"})],
    ),
]


@pytest.mark.parametrize(
    ("name", "kind", "version", "records"), FORMATS, ids=[f[0] for f in FORMATS]
)
def test_each_format(
    tmp_path: Path, name: str, kind: str, version: int, records: List[Tuple[str, Dict[str, Any]]]
) -> None:
    """
    Each common format is read: the country from its records, the region
    from the table, the continent from the record or (flat country_code
    files, or a record without one) from COUNTRY_CONTINENTS.  IPv6 lookups
    in an IPv4-only file give no geo; unknown addresses give no geo.
    """
    path = write_mmdb(
        str(tmp_path / f"{name}.mmdb"), records, database_type=kind, ip_version=version
    )
    maxmind = geoip2.database.Reader(path)  # the real readers take the file
    assert maxmind.metadata().database_type == kind
    maxmind.close()
    r = GeoIPResolver.fromPaths(path, regions_path=None)
    try:
        assert r.database is not None and r.database.databaseType == kind
        assert r.resolve("81.2.69.160") == GeoInfo("GB", "eu")
        assert r.resolve("::ffff:81.2.69.1") == GeoInfo("GB", "eu")
        # ZA is not in the region table: its continent AF gives eu.
        assert r.resolve("41.0.3.4") == GeoInfo("ZA", "eu")
        assert r.resolve("8.8.8.8") is None
        expected_v6 = GeoInfo("JP", "ap") if version == 6 else None
        assert r.resolve("2400:8500:1::5") == expected_v6
        assert r.resolve("2400:8500:2::5") is None
    finally:
        r.close()


def test_flat_country_code_uses_continent_table(tmp_path: Path) -> None:
    """
    A country outside the region table in a country_code file gets its
    continent's region from COUNTRY_CONTINENTS (KE -> AF -> eu, CL -> SA ->
    sa, NZ in the table, FJ -> OC -> ap), and a record's own continent_code
    wins; ZZ (unknown) is no country.
    """
    path = write_mmdb(
        str(tmp_path / "flat.mmdb"),
        [
            ("41.90.0.0/16", {"country_code": "KE"}),
            ("103.1.0.0/16", {"country_code": "FJ"}),
            ("5.5.0.0/16", {"country_code": "TR", "continent_code": "EU"}),
            ("6.6.0.0/16", {"country_code": "ZZ"}),
        ],
        database_type="country",
    )
    r = GeoIPResolver.fromPaths(path)
    try:
        assert r.resolve("41.90.1.1") == GeoInfo("KE", "eu")
        assert r.resolve("103.1.1.1") == GeoInfo("FJ", "ap")
        assert COUNTRY_CONTINENTS["TR"] == "AS"
        assert r.resolve("5.5.1.1") == GeoInfo("TR", "eu")
        assert r.resolve("6.6.1.1") is None
    finally:
        r.close()


_GLOBAL_SLASH16 = [
    n for n in range(1, 224 * 256) if ipaddress.ip_network(f"{n >> 8}.{n & 255}.0.0/16").is_global
]


@settings(max_examples=25, deadline=None)
@given(
    entries=st.dictionaries(
        st.sampled_from(_GLOBAL_SLASH16),
        st.tuples(st.sampled_from(sorted(COUNTRY_CONTINENTS)), st.integers(0, 65535)),
        min_size=1,
        max_size=20,
    ),
    flat=st.booleans(),
)
def test_any_database_reads_back(entries: Dict[int, Tuple[str, int]], flat: bool) -> None:
    """
    Property: whatever /16 networks and countries a database holds, in
    either record shape, every address in them resolves to its country and
    the region of that country (or of its continent), and the addresses
    just outside them to no geo.
    """
    folder = tempfile.mkdtemp(prefix="edgeproxy-geo-")
    try:
        records = []
        for n, (country, _) in entries.items():
            record: Dict[str, Any] = (
                {"country_code": country}
                if flat
                else _geoip2_record(country, COUNTRY_CONTINENTS[country])
            )
            records.append((f"{n >> 8}.{n & 255}.0.0/16", record))
        path = write_mmdb(
            os.path.join(folder, "db.mmdb"), records, database_type="country" if flat else "X-City"
        )
        r = GeoIPResolver.fromPaths(path)
        try:
            for n, (country, low) in entries.items():
                ip = f"{n >> 8}.{n & 255}.{low >> 8}.{low & 255}"
                expected = region_for(country, COUNTRY_CONTINENTS[country])
                assert r.resolve(ip) == GeoInfo(country, expected)
                outside = n + 1
                if outside not in entries and outside in _GLOBAL_SET:
                    assert r.resolve(f"{outside >> 8}.{outside & 255}.0.1") is None
        finally:
            r.close()
    finally:
        shutil.rmtree(folder)


_GLOBAL_SET = frozenset(_GLOBAL_SLASH16)


@pytest.mark.parametrize("extension", [True, False])
def test_both_readers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extension: bool) -> None:
    """
    The C extension's reader (on a private memory file) and the pure-Python
    one (without the extension or memfd_create) give the same answers.
    """
    import edgeproxy.geo as geo_module

    if not extension:
        monkeypatch.setattr(geo_module, "_has_extension", lambda: False)
    elif not geo_module._has_extension():
        pytest.skip("maxminddb's C extension is not installed, or this is PyPy (not used there)")
    path = write_mmdb(str(tmp_path / "c.mmdb"), FORMATS[0][3], database_type="GeoLite2-City")
    database = open_database(path)
    try:
        assert ("extension" in type(database.reader).__module__) is extension
        r = GeoIPResolver(database)
        assert r.resolve("81.2.69.160") == GeoInfo("GB", "eu")
        assert r.resolve("2400:8500:1::1") == GeoInfo("JP", "ap")
    finally:
        database.close()


def test_continent_table_covers_iso_3166() -> None:
    """
    COUNTRY_CONTINENTS has every ISO 3166-1 country the databases use (250
    with XK), each on one of the seven continent codes.
    """
    assert len(COUNTRY_CONTINENTS) == 250
    assert set(COUNTRY_CONTINENTS.values()) == {"AF", "AN", "AS", "EU", "NA", "OC", "SA"}
    for country, continent in [("BR", "SA"), ("US", "NA"), ("FR", "EU"), ("JP", "AS")]:
        assert COUNTRY_CONTINENTS[country] == continent


@pytest.mark.parametrize(
    ("kind", "record"),
    [
        (
            "GeoLite2-ASN",
            {"autonomous_system_number": 15169, "autonomous_system_organization": "G"},
        ),
        ("Some-Vendor-Thing", {"asn": 15169, "name": "x"}),
        ("country", {"something_else": "x"}),
    ],
)
def test_unknown_format_is_refused(tmp_path: Path, kind: str, record: Dict[str, Any]) -> None:
    """
    A readable MaxMind DB file without countries (an ASN database, an
    unknown record shape) is refused with a message naming the file and
    what it lacks, and stops twistd at startup (a configuration mistake, not
    a fault to run through).
    """
    path = write_mmdb(str(tmp_path / "asn.mmdb"), [("8.8.8.0/24", record)], database_type=kind)
    with pytest.raises(NotALocationDatabaseError, match=f"{path}: {kind} is not a location"):
        open_database(path)
    with pytest.raises(NotALocationDatabaseError):
        GeoIPResolver.fromPaths(path)
    options = Options()
    options.parseOptions([f"--db={tmp_path / 'r.db'}", f"--geoip-db={path}", "--admin=none"])
    with pytest.raises(SystemExit) as caught:
        makeService(options, reactor=MemoryReactorClock(), environ={})
    assert str(caught.value.code).startswith(f"edgeproxy: cannot use --geoip-db: {path}: {kind}")


def test_corrupt_file_is_a_database_error(tmp_path: Path) -> None:
    """
    A truncated database (no metadata) and garbage are GeoDatabaseErrors
    naming the file, not NotALocationDatabaseError: at startup they run
    without geo (F13, tested in test_geo.py).
    """
    good = write_mmdb(str(tmp_path / "good.mmdb"), FORMATS[0][3], database_type="GeoLite2-City")
    data = Path(good).read_bytes()
    truncated = tmp_path / "truncated.mmdb"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.mmdb"
    garbage.write_bytes(os.urandom(4096))
    for path in (truncated, garbage, tmp_path / "missing.mmdb"):
        with pytest.raises(GeoDatabaseError, match=str(path)) as caught:
            open_database(str(path))
        assert not isinstance(caught.value, NotALocationDatabaseError)


# --- hot reload -------------------------------------------------------------------


def _install(path: Path, records: List[Tuple[str, Dict[str, Any]]], **kw: Any) -> None:
    """
    Write a database beside C{path} and rename it over C{path}, as
    geoipupdate does.
    """
    temporary = path.with_name(path.name + ".tmp")
    write_mmdb(str(temporary), records, **kw)
    os.replace(temporary, path)


def _watched(tmp_path: Path) -> Tuple[Path, GeoIPResolver, GeoDatabaseWatcher, MetricsStore]:
    path = tmp_path / "GeoLite2-Country.mmdb"
    _install(path, [("8.8.8.0/24", _geoip2_record("US", "NA"))], database_type="GeoLite2-Country")
    resolver = GeoIPResolver.fromPaths(str(path))
    metrics = MetricsStore()
    return path, resolver, GeoDatabaseWatcher(resolver, None, metrics), metrics


def _reloads(metrics: MetricsStore) -> Mapping[str, int]:
    return {label: n for (name, label), n in metrics.counters().items() if name == RELOAD_COUNTER}


def test_reload_on_atomic_rename(tmp_path: Path, events: List[Dict[str, Any]]) -> None:
    """
    A new file renamed over the database is loaded at the next check: new
    answers (the cache is dropped), counted as an ok reload, logged; an
    unchanged file is not read again.
    """
    path, resolver, watcher, metrics = _watched(tmp_path)
    try:
        assert resolver.resolve("8.8.8.8") == GeoInfo("US", "us")
        watcher.check()
        assert _reloads(metrics) == {}
        _install(
            path, [("8.8.8.0/24", _geoip2_record("CA", "NA"))], database_type="GeoLite2-Country"
        )
        watcher.check()
        assert resolver.resolve("8.8.8.8") == GeoInfo("CA", "us")
        assert _reloads(metrics) == {"ok": 1}
        assert resolver.reloads == 1
        watcher.check()
        assert _reloads(metrics) == {"ok": 1}
        lines = [formatEvent(e) for e in events if e["log_level"] is LogLevel.info]
        assert any(line.startswith(f"GeoIP database reloaded from {path}") for line in lines)
    finally:
        resolver.close()


def test_service_reloads_every_poll(tmp_path: Path) -> None:
    """
    twistd edgeproxy watches --geoip-db: once started, a file renamed over
    it is in force after --geoip-poll seconds of the reactor's clock.
    """
    path = tmp_path / "GeoLite2-Country.mmdb"
    _install(path, [("8.8.8.0/24", _geoip2_record("US", "NA"))], database_type="GeoLite2-Country")
    clock = MemoryReactorClock()
    options = Options()
    options.parseOptions(
        [f"--db={tmp_path / 'r.db'}", f"--geoip-db={path}", "--geoip-poll=3", "--admin=none"]
    )
    service = makeService(options, reactor=clock, environ={})
    assert isinstance(service, EdgeProxyService)
    geo = service.geo
    assert isinstance(geo, GeoIPResolver)
    service.startService()
    try:
        assert geo.resolve("8.8.8.8") == GeoInfo("US", "us")
        _install(
            path, [("8.8.8.0/24", _geoip2_record("BR", "SA"))], database_type="GeoLite2-Country"
        )
        clock.advance(2.9)
        assert geo.resolve("8.8.8.8") == GeoInfo("US", "us")
        clock.advance(0.2)
        assert geo.resolve("8.8.8.8") == GeoInfo("BR", "sa")
    finally:
        service.stopService()
        geo.close()


def test_reload_to_another_format(tmp_path: Path) -> None:
    """
    The new file may be of another format (GeoLite2 Country replaced by an
    ip-location-db country_code file): it is read as such.
    """
    path, resolver, watcher, _ = _watched(tmp_path)
    try:
        _install(path, [("8.8.8.0/24", {"country_code": "BR"})], database_type="country")
        watcher.check()
        assert resolver.resolve("8.8.8.8") == GeoInfo("BR", "sa")
    finally:
        resolver.close()


@pytest.mark.parametrize("broken", ["garbage", "truncated", "asn"])
def test_broken_new_file_keeps_old_reader(
    tmp_path: Path, broken: str, events: List[Dict[str, Any]]
) -> None:
    """
    A broken new version (garbage, truncated, an ASN database) leaves the
    old database in force; it is logged once and counted once however
    often it is checked, shown as the last reload error; a good version
    afterwards is loaded.
    """
    path, resolver, watcher, metrics = _watched(tmp_path)
    try:
        resolver.resolve("8.8.8.8")
        temporary = tmp_path / "new.tmp"
        if broken == "garbage":
            temporary.write_bytes(b"\x00garbage" * 1000)
        elif broken == "truncated":
            temporary.write_bytes(path.read_bytes()[:100])
        else:
            write_mmdb(
                str(temporary),
                [("8.8.8.0/24", {"autonomous_system_number": 1})],
                database_type="GeoLite2-ASN",
            )
        os.replace(temporary, path)
        for _ in range(3):
            watcher.check()
        assert resolver.resolve("8.8.8.8") == GeoInfo("US", "us")
        assert (
            resolver.database is not None and resolver.database.databaseType == "GeoLite2-Country"
        )
        assert _reloads(metrics) == {"error": 1}
        assert resolver.reloadErrors == 1
        assert resolver.lastReloadError is not None and str(path) in resolver.lastReloadError
        errors = [formatEvent(e) for e in events if e["log_level"] is LogLevel.error]
        assert len(errors) == 1 and "keeping GeoLite2-Country" in errors[0]
        _install(
            path, [("8.8.8.0/24", _geoip2_record("MX", "NA"))], database_type="GeoLite2-Country"
        )
        watcher.check()
        assert resolver.resolve("8.8.8.8") == GeoInfo("MX", "us")
        assert _reloads(metrics) == {"error": 1, "ok": 1}
        assert resolver.lastReloadError is None
    finally:
        resolver.close()


def test_file_rewritten_in_place_cannot_hurt_lookups(tmp_path: Path) -> None:
    """
    The database in force is a private in-memory copy: the file truncated
    and rewritten in place (cp over it, not a rename) changes no answer and
    cannot crash a lookup; the watcher then sees a broken file and keeps
    the database, and loads the file once it is whole.
    """
    path, resolver, watcher, metrics = _watched(tmp_path)
    try:
        good = path.read_bytes()
        with open(path, "r+b") as f:
            f.truncate(64)
            f.write(b"\xff" * 64)
        for ip in ("8.8.8.8", "8.8.8.200", "::ffff:8.8.8.1", "2400:8500::1"):
            resolver.resolve(ip)
        assert resolver.resolve("8.8.8.9") == GeoInfo("US", "us")
        watcher.check()
        assert _reloads(metrics) == {"error": 1}
        with open(path, "r+b") as f:
            f.write(good)
        os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
        watcher.check()
        assert _reloads(metrics) == {"error": 1, "ok": 1}
        assert resolver.resolve("8.8.8.10") == GeoInfo("US", "us")
    finally:
        resolver.close()


def test_missing_at_startup_then_appears(tmp_path: Path, events: List[Dict[str, Any]]) -> None:
    """
    F13 at startup (no file: no geo), then the file appears (geoipupdate's
    first run): it is loaded without a restart.  A file deleted later keeps
    the loaded database, said once.
    """
    path = tmp_path / "later.mmdb"
    resolver = GeoIPResolver.fromPaths(str(path))
    watcher = GeoDatabaseWatcher(resolver)
    try:
        assert resolver.database is None and resolver.resolve("8.8.8.8") is None
        watcher.check()
        _install(path, [("8.8.8.0/24", {"country_code": "US"})], database_type="country")
        watcher.check()
        assert resolver.resolve("8.8.8.8") == GeoInfo("US", "us")
        assert resolver.geoError is None
        path.unlink()
        watcher.check()
        watcher.check()
        assert resolver.resolve("8.8.8.9") == GeoInfo("US", "us")
        gone = [formatEvent(e) for e in events if "is gone" in formatEvent(e)]
        assert len(gone) == 1
    finally:
        resolver.close()


@pytest_twisted.inlineCallbacks
def test_reload_reads_in_a_thread() -> Any:
    """
    With a reactor, the new file is opened in the reactor's thread pool
    and swapped in on the reactor thread; a check while one is in flight
    returns the same Deferred.
    """
    from twisted.internet import reactor

    folder = Path(tempfile.mkdtemp(prefix="edgeproxy-geo-"))
    path = folder / "geo.mmdb"
    try:
        _install(path, [("8.8.8.0/24", {"country_code": "US"})], database_type="country")
        resolver = GeoIPResolver.fromPaths(str(path))
        watcher = GeoDatabaseWatcher(resolver, reactor, MetricsStore())
        threads: List[str] = []
        import edgeproxy.geo as geo_module

        real = geo_module.open_database

        def spying(p: str) -> Any:
            threads.append(threading.current_thread().name)
            return real(p)

        geo_module.open_database = spying  # type: ignore[assignment]
        try:
            _install(path, [("8.8.8.0/24", {"country_code": "PT"})], database_type="country")
            first = watcher.check()
            assert watcher.check() is first
            yield first
        finally:
            geo_module.open_database = real  # type: ignore[assignment]
        assert threads and threads[0] != threading.current_thread().name
        assert resolver.resolve("8.8.8.8") == GeoInfo("PT", "eu")
        resolver.close()
    finally:
        shutil.rmtree(folder)


# --- the age warning ----------------------------------------------------------------


def _old(tmp_path: Path, days: float) -> str:
    return write_mmdb(
        str(tmp_path / "old.mmdb"),
        [("8.8.8.0/24", _geoip2_record("US", "NA"))],
        database_type="GeoLite2-City",
        build_epoch=int(time.time() - days * DAY),
    )


def test_stale_database_warned_once(tmp_path: Path, events: List[Dict[str, Any]]) -> None:
    """
    A database older than maxAge is stale: a warning naming its build date
    and the limit, once per database; a fresh one is not.
    """
    path = _old(tmp_path, 100)
    then = datetime.datetime.fromtimestamp(time.time() - 100 * DAY, datetime.timezone.utc)
    built = f"{then:%Y-%m-%d}"
    r = GeoIPResolver.fromPaths(path, maxAge=60 * DAY)
    try:
        now = time.time()
        assert r.isStale(now)
        assert r.warnIfStale(now) and r.warnIfStale(now)
        warnings = [formatEvent(e) for e in events if e["log_level"] is LogLevel.warn]
        assert len(warnings) == 1
        assert f"was built on {built}, 100 days ago" in warnings[0]
        assert "more than --geoip-max-age (60 days)" in warnings[0]
        assert not GeoIPResolver.fromPaths(path, maxAge=120 * DAY).isStale(now)
    finally:
        r.close()


def test_stale_warning_at_startup(tmp_path: Path) -> None:
    """
    twistd edgeproxy with a database older than --geoip-max-age logs the
    warning while it starts.
    """
    path = _old(tmp_path, 45)
    collector = EventCollector("edgeproxy.geo")
    globalLogPublisher.addObserver(collector)
    try:
        options = Options()
        options.parseOptions(
            [f"--db={tmp_path / 'r.db'}", f"--geoip-db={path}", "--geoip-max-age=30"]
        )
        service = makeService(options, reactor=MemoryReactorClock(), environ={})
    finally:
        globalLogPublisher.removeObserver(collector)
    warnings = [formatEvent(e) for e in collector.events if e["log_level"] is LogLevel.warn]
    assert len(warnings) == 1 and "45 days ago" in warnings[0]
    assert isinstance(service, EdgeProxyService)
    assert service.getServiceNamed("geoip-reload") is not None
    service.geo.close()  # type: ignore[union-attr]


def _samples(collector: EdgeproxyCollector) -> Dict[str, float]:
    """
    The exposition's samples, C{name{labels}} -> value.
    """
    text = generate_latest(metrics_registry(collector, process=False)).decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_stale_in_metrics_and_status(tmp_path: Path) -> None:
    """
    The metrics export the build time, the age, the limit, stale=1 and the
    reload counters; the status JSON names the build date and says stale.
    """
    path = _old(tmp_path, 100)
    r = GeoIPResolver.fromPaths(path, maxAge=60 * DAY)
    metrics = MetricsStore()
    metrics.increment(RELOAD_COUNTER, "error")
    now = time.time()
    try:
        collector = EdgeproxyCollector(metrics, geo=r, wallClock=lambda: now)
        samples = _samples(collector)
        assert r.database is not None
        assert samples["edgeproxy_geoip_build_timestamp_seconds"] == r.database.built
        assert samples["edgeproxy_geoip_stale"] == 1
        assert samples["edgeproxy_geoip_database_loaded"] == 1
        assert samples["edgeproxy_geoip_max_age_seconds"] == 60 * DAY
        assert abs(samples["edgeproxy_geoip_age_seconds"] - 100 * DAY) < 120
        assert samples['edgeproxy_geoip_reloads_total{result="error"}'] == 1
        assert samples['edgeproxy_geoip_reloads_total{result="ok"}'] == 0
        body = StatusData(geo=r, wallClock=lambda: now).render()
        geo = body["geo_database"]
        assert geo["stale"] is True and geo["type"] == "GeoLite2-City"
        assert geo["built"] == r.database.builtDate and geo["max_age_days"] == 60
        assert 99.9 <= geo["age_days"] <= 100.1
        json.dumps(body)
        fresh = GeoIPResolver.fromPaths(path, maxAge=365 * DAY)
        assert _samples(EdgeproxyCollector(metrics, geo=fresh))["edgeproxy_geoip_stale"] == 0
        fresh.close()
    finally:
        r.close()


def test_no_database_in_metrics_and_status() -> None:
    """
    Without a database: loaded 0, not stale, no build time; the status
    shows the error.
    """
    r = GeoIPResolver.fromPaths("")
    samples = _samples(EdgeproxyCollector(MetricsStore(), geo=r))
    assert samples["edgeproxy_geoip_database_loaded"] == 0
    assert "edgeproxy_geoip_build_timestamp_seconds" not in samples
    status = StatusData(geo=r).render()["geo_database"]
    assert status["type"] is None and status["error"] is not None


def test_status_page_shows_geo_database() -> None:
    """
    The status page has the GeoIP database card its script fills.
    """
    from edgeproxy.control.status import status_page

    page, _ = status_page()
    assert b'id="geodb-card"' in page and b"renderGeoDatabase" in page


# --- the shipped default ------------------------------------------------------------


def test_shipped_default_is_current_and_packaged() -> None:
    """
    The shipped database is a 2026 (or later) ip-location-db country file
    covering IPv4 and IPv6, at most 16 MB, installed as package data
    (setup.py's edgeproxy/data/* and MANIFEST.in), and the old
    maxminddb-geolite2 dependency is gone.
    """
    path = default_geoip_path()
    assert path is not None
    database = open_database(path)
    try:
        assert database.shape == "country_code"
        assert database.reader.metadata().ip_version == 6
        assert datetime.datetime.fromtimestamp(database.built, datetime.timezone.utc).year >= 2026
    finally:
        database.close()
    assert os.path.getsize(path) < 16 * 1024 * 1024
    setup = (ROOT / "setup.py").read_text()
    assert '"data/*"' in setup and "maxminddb-geolite2" not in setup
    assert "recursive-include edgeproxy/data *" in (ROOT / "MANIFEST.in").read_text()


@pytest.mark.parametrize(
    ("ip", "country", "region"),
    [
        ("8.8.8.8", "US", "us"),
        ("90.85.1.1", "FR", "eu"),
        ("200.160.2.3", "BR", "sa"),
        ("133.242.0.3", "JP", "ap"),
        ("81.2.69.160", "GB", "eu"),
        ("41.0.0.1", "ZA", "eu"),
        ("2001:41d0::1", "FR", "eu"),
    ],
)
def test_shipped_default_locates_well_known_addresses(ip: str, country: str, region: str) -> None:
    """
    The shipped default puts well-known addresses (Google DNS, Orange,
    NIC.br, Sakura, a UK ISP, South Africa's TENET, OVH v6) in their
    countries.
    """
    r = GeoIPResolver.fromPaths(None)
    try:
        assert r.shipped and r.resolve(ip) == GeoInfo(country, region)
    finally:
        r.close()


def test_version_names_the_geo_data(capsys: pytest.CaptureFixture[str]) -> None:
    """
    twistd edgeproxy --version names the shipped database, its build date
    and its attribution (ip-location-db, CC0; NRO data, CC BY 4.0).
    """
    with pytest.raises(SystemExit) as caught:
        Options().parseOptions(["--version"])
    assert caught.value.code == 0
    out = capsys.readouterr().out
    assert "Shipped GeoIP database: geo-whois-asn-country.mmdb, built 20" in out
    assert SHIPPED_ATTRIBUTION in out
    for word in ("ip-location-db", "CC0", "NRO", "CC BY 4.0"):
        assert word in out


def test_geoip_options() -> None:
    """
    --geoip-max-age (days) and --geoip-poll (seconds) parse, with
    environment variables, and refuse non-positive values.
    """
    options = Options()
    options.parseOptions(["--geoip-max-age=7.5"])
    options.applyEnvironment({"EDGEPROXY_GEOIP_POLL_SECS": "2"})
    assert options["geoip-max-age"] == 7.5 and options["geoip-poll"] == 2.0
    for bad in ("--geoip-max-age=0", "--geoip-poll=-1"):
        with pytest.raises(usage.UsageError):
            Options().parseOptions([bad])


# --- the refresh ------------------------------------------------------------------


def _certificate(tmp_path: Path) -> Tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path = tmp_path / "registry.pem"
    key_path = tmp_path / "registry.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


def _tarball(files: Mapping[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


class Registry:
    """
    An npm-style registry on loopback HTTPS: package metadata with a
    tarball address and its integrity, and the tarball.
    """

    def __init__(self, tmp_path: Path) -> None:
        self.cafile, keyfile = _certificate(tmp_path)
        self.routes: Dict[str, bytes] = {}
        routes = self.routes

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = routes.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cafile, keyfile)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://localhost:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def publish(self, package: str, version: str, tarball: bytes, integrity: str = "") -> None:
        tar_path = f"/tarballs/{version}.tgz"
        digest = base64.b64encode(hashlib.sha512(tarball).digest()).decode()
        self.routes[tar_path] = tarball
        self.routes["/" + package.replace("/", "%2F")] = json.dumps(
            {
                "dist-tags": {"latest": version},
                "versions": {
                    version: {
                        "dist": {
                            "tarball": self.url + tar_path,
                            "integrity": integrity or f"sha512-{digest}",
                        }
                    }
                },
            }
        ).encode()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    """
    A loopback HTTPS registry, stopped after the test.
    """
    r = Registry(tmp_path)
    yield r
    r.close()


PACKAGE = "@ip-location-db/geo-whois-asn-country-mmdb"


def _flat(tmp_path: Path, country: str, days_ago: float) -> bytes:
    path = write_mmdb(
        str(tmp_path / f"{country}.mmdb"),
        [("8.8.8.0/24", {"country_code": country})],
        database_type="country",
        build_epoch=int(time.time() - days_ago * DAY),
    )
    return Path(path).read_bytes()


def test_update_installs_verified_database(tmp_path: Path, registry: Registry) -> None:
    """
    update() fetches the latest version over HTTPS, checks its SHA-512
    against the registry's integrity, takes the both-families .mmdb out of
    the tarball, and renames it over the destination (a new inode, as the
    watcher expects), which a watching resolver then loads.
    """
    dest = tmp_path / "geo.mmdb"
    dest.write_bytes(_flat(tmp_path, "US", 10))
    resolver = GeoIPResolver.fromPaths(str(dest))
    watcher = GeoDatabaseWatcher(resolver)
    inode = dest.stat().st_ino
    registry.publish(
        PACKAGE,
        "2.3.1",
        _tarball(
            {
                "geo-whois-asn-country.mmdb": _flat(tmp_path, "BR", 1),
                "geo-whois-asn-country-ipv4.mmdb": _flat(tmp_path, "AR", 1),
                "README.md": b"hello",
            }
        ),
    )
    line = update(str(dest), PACKAGE, registry=registry.url, cafile=registry.cafile)
    assert line.startswith(f"installed geo-whois-asn-country.mmdb from {PACKAGE} 2.3.1")
    assert dest.stat().st_ino != inode
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".geodata-")] == []
    watcher.check()
    assert resolver.resolve("8.8.8.8") == GeoInfo("BR", "sa")
    resolver.close()


@pytest.mark.parametrize("problem", ["integrity", "not-mmdb", "asn", "older", "untrusted"])
def test_update_refuses_bad_downloads(tmp_path: Path, registry: Registry, problem: str) -> None:
    """
    A tarball whose hash is not the registry's, a file that is not a
    MaxMind DB or has no countries, a database older than the installed
    one, a registry whose certificate is not trusted: UpdateError, and the
    destination is untouched.
    """
    dest = tmp_path / "geo.mmdb"
    original = _flat(tmp_path, "US", 10)
    dest.write_bytes(original)
    content = _flat(tmp_path, "BR", 1)
    integrity = ""
    if problem == "integrity":
        integrity = "sha512-" + base64.b64encode(hashlib.sha512(b"other").digest()).decode()
    elif problem == "not-mmdb":
        content = b"not a database" * 100
    elif problem == "asn":
        content = Path(
            write_mmdb(
                str(tmp_path / "asn.mmdb"),
                [("8.8.8.0/24", {"autonomous_system_number": 1})],
                database_type="GeoLite2-ASN",
            )
        ).read_bytes()
    elif problem == "older":
        content = _flat(tmp_path, "BR", 30)
    registry.publish(PACKAGE, "9.9.9", _tarball({"geo.mmdb": content}), integrity)
    cafile = None if problem == "untrusted" else registry.cafile
    with pytest.raises(UpdateError):
        update(str(dest), PACKAGE, registry=registry.url, cafile=cafile, timeout=10)
    assert dest.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".geodata-")] == []
    if problem == "older":
        update(str(dest), PACKAGE, registry=registry.url, cafile=cafile, force=True)
        assert dest.read_bytes() == content


@pytest.mark.parametrize("form", ["mmdb", "mmdb.gz", "tar.gz"])
def test_update_from_url(tmp_path: Path, registry: Registry, form: str) -> None:
    """
    update_from_url() installs a .mmdb, a gzipped .mmdb.gz (DB-IP's monthly
    files) or a .tar.gz release archive from an HTTPS address, checked
    against the given SHA-256; a wrong hash installs nothing.
    """
    dest = tmp_path / "geo.mmdb"
    original = _flat(tmp_path, "US", 10)
    dest.write_bytes(original)
    content = _flat(tmp_path, "CL", 1)
    if form == "mmdb.gz":
        body = gzip.compress(content)
    elif form == "tar.gz":
        body = _tarball({"dbip-country-lite.mmdb": content})
    else:
        body = content
    registry.routes[f"/releases/db.{form}"] = body
    url = f"{registry.url}/releases/db.{form}"
    with pytest.raises(UpdateError, match="SHA-256"):
        update_from_url(str(dest), url, hashlib.sha256(b"x").hexdigest(), cafile=registry.cafile)
    assert dest.read_bytes() == original
    line = update_from_url(
        str(dest), url, hashlib.sha256(body).hexdigest().upper(), cafile=registry.cafile
    )
    assert line.startswith("installed ")
    assert dest.read_bytes() == content


def test_update_refuses_plain_http(tmp_path: Path) -> None:
    """
    The registry must be HTTPS.
    """
    with pytest.raises(UpdateError, match="non-HTTPS"):
        update(str(tmp_path / "x.mmdb"), PACKAGE, registry="http://127.0.0.1:9")


def test_geodata_info_command(capsys: pytest.CaptureFixture[str]) -> None:
    """
    python -m edgeproxy.geodata info names a database, its date and age.
    """
    from edgeproxy.geodata import main

    path = default_geoip_path()
    assert path is not None
    assert main(["info", path]) == 0
    out = capsys.readouterr().out
    assert "geo-whois-asn-country (country ipvAll) 20" in out and "days old" in out
    assert main(["info", "/nonexistent.mmdb"]) == 1
