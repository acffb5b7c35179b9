"""
Where a client is: an L{IGeoResolver} adapter on a MaxMind-format database.

The lookup (SPEC section 2) is, in order: operator overrides (CIDR ->
country, most specific prefix first); then nothing for loopback, private,
link-local, multicast, unspecified and reserved addresses; then the
database.  The country gives the region through a replaceable table, and a
country missing from the table falls back to its continent.  No network
I/O, ever; results are cached per address string, because this runs on
every new connection.

Every common MaxMind-format database is read (L{open_database}): GeoIP2 and
GeoLite2 City, Country and Enterprise, DB-IP Lite (country and city), and
the files that carry a flat C{country_code} (ip-location-db's
C{*-country-mmdb}), whose continent comes from L{COUNTRY_CONTINENTS}.  The
format is told from the metadata and the shape of the records.  The
default is L{SHIPPED_DATABASE}, in the package's C{data} folder.

A missing or corrupt database is not fatal (FAULTS F13): the resolver then
knows only the overrides, and says so once.  A MaxMind DB file without
countries (an ASN database) is refused at startup.  L{GeoDatabaseWatcher}
reloads the file when it changes, keeping the old database when the new
file is broken, and reports a database older than the resolver's
C{maxAge}.
"""

from __future__ import annotations

import io
import ipaddress
import itertools
import os
import platform
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any, Callable, Dict, List, Protocol, Tuple, Union

import attrs
import maxminddb
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from edgeproxy.interfaces import IGeoResolver
from edgeproxy.model import GeoInfo, Network

__all__ = [
    "CONTINENT_REGIONS",
    "COUNTRY_CONTINENTS",
    "DEFAULT_MAX_AGE_DAYS",
    "DEFAULT_POLL_INTERVAL",
    "DEFAULT_REGIONS",
    "RELOAD_COUNTER",
    "SHIPPED_ATTRIBUTION",
    "SHIPPED_DATABASE",
    "FileIdentity",
    "GeoDatabase",
    "GeoDatabaseError",
    "GeoDatabaseWatcher",
    "GeoIPResolver",
    "Network",
    "NotALocationDatabaseError",
    "default_geoip_path",
    "load_overrides",
    "load_regions",
    "open_database",
    "parse_overrides",
    "parse_regions",
    "region_for",
]

_log = Logger()

_Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


def _table(spec: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(
        {country: region for region, countries in spec.items() for country in countries.split()}
    )


#: The original's country -> region table (SPEC section 2).
DEFAULT_REGIONS: Mapping[str, str] = _table(
    {
        "sa": "BR AR CL PE CO UY PY BO EC VE",
        "us": "US CA MX",
        "eu": "PT ES FR DE NL IT GB IE BE CH AT PL CZ SE NO DK FI RU UA",
        "ap": "JP KR TW HK SG MY TH VN ID PH AU NZ CN IN",
    }
)

#: Continent code (as in MaxMind databases) -> region, for countries not in
#: the region table.
CONTINENT_REGIONS: Mapping[str, str] = MappingProxyType(
    {"NA": "us", "SA": "sa", "EU": "eu", "AS": "ap", "OC": "ap", "AF": "eu", "AN": "us"}
)


def region_for(
    country: str | None, continent: str | None, regions: Mapping[str, str] = DEFAULT_REGIONS
) -> str | None:
    """
    The region of a country (upper-case ISO code), else of its continent.
    """
    if country is not None:
        region = regions.get(country)
        if region is not None:
            return region
    if continent is not None:
        return CONTINENT_REGIONS.get(continent)
    return None


#: Country (ISO 3166-1 alpha-2) -> continent code, for databases whose
#: records carry a country and no continent (ip-location-db's
#: C{country_code} files).  The continent of each country as MaxMind
#: databases give it (Turkey, Cyprus and the Caucasus in Asia, Russia in
#: Europe).
COUNTRY_CONTINENTS: Mapping[str, str] = _table(
    {
        "AF": "AO BF BI BJ BW CD CF CG CI CM CV DJ DZ EG EH ER ET GA GH GM GN GQ GW KE KM LR"
        " LS LY MA MG ML MR MU MW MZ NA NE NG RE RW SC SD SH SL SN SO SS ST SZ TD TG TN TZ UG"
        " YT ZA ZM ZW",
        "AN": "AQ BV GS HM TF",
        "AS": "AE AF AM AZ BD BH BN BT CC CN CX GE HK ID IL IN IO IQ IR JO JP KG KH KP KR KW"
        " KZ LA LB LK MM MN MO MV MY NP OM PH PK PS QA SA SG SY TH TJ TM TR TW UZ VN YE",
        "EU": "AD AL AT AX BA BE BG BY CH CY CZ DE DK EE ES FI FO FR GB GG GI GR HR HU IE IM IS"
        " IT JE LI LT LU LV MC MD ME MK MT NL NO PL PT RO RS RU SE SI SJ SK SM UA VA XK",
        "NA": "AG AI AW BB BL BM BQ BS BZ CA CR CU CW DM DO GD GL GP GT HN HT JM KN KY LC MF MQ"
        " MS MX NI PA PM PR SV SX TC TT US VC VG VI",
        "OC": "AS AU CK FJ FM GU KI MH MP NC NF NR NU NZ PF PG PN PW SB TK TL TO TV UM VU WF WS",
        "SA": "AR BO BR CL CO EC FK GF GY PE PY SR UY VE",
    }
)

#: The database shipped in C{edgeproxy/data/} (see L{SHIPPED_ATTRIBUTION}).
SHIPPED_DATABASE = "geo-whois-asn-country.mmdb"

#: Where the shipped database comes from, and its licence, for C{--version}
#: and the README (CC BY 4.0 asks for this attribution).
SHIPPED_ATTRIBUTION = (
    "Geo data: geo-whois-asn-country (ip-location-db by sapics, CC0 1.0,"
    " https://github.com/sapics/ip-location-db), built from RIR whois and ASN"
    " data by the NRO (CC BY 4.0, https://www.nro.net) and published geofeeds"
)

#: Seconds between checks of the database file for a new version.
DEFAULT_POLL_INTERVAL = 5.0

#: Days after its build date from which a database is reported as stale.
DEFAULT_MAX_AGE_DAYS = 60.0


def default_geoip_path() -> str | None:
    """
    The database shipped with edgeproxy (L{SHIPPED_DATABASE} in the
    package's C{data} folder), or C{None} if it is missing from this
    install.
    """
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", SHIPPED_DATABASE)
    return path if os.path.isfile(path) else None


# --- database files -----------------------------------------------------------


class GeoDatabaseError(ValueError):
    """
    A file is not a usable location database: unreadable, not a MaxMind DB
    file, corrupt, or a MaxMind DB without countries (an ASN database).
    """


class NotALocationDatabaseError(GeoDatabaseError):
    """
    A readable MaxMind DB file whose records carry no country (an ASN, ISP
    or domain database, or an unknown format).
    """


#: Record shapes L{open_database} understands (L{GeoDatabase.shape}).
SHAPE_GEOIP2 = "geoip2"  # {"country": {"iso_code"}, "continent": {"code"}}
SHAPE_COUNTRY_CODE = "country_code"  # {"country_code": "FR"} (ip-location-db)

#: Words in a C{database_type} that name a database without locations
#: (unless it also has one of L{_LOCATION}: C{GeoIP2-City-ISP-Org} has both).
_NOT_LOCATION = ("ASN", "ISP", "Domain", "Connection-Type", "Anonymous", "User-Count")
_LOCATION = ("City", "Country", "Enterprise", "Location")

#: Addresses sampled to learn a database's record shape (well spread, long
#: allocated), before its first records in tree order.
_PROBES = ("8.8.8.8", "1.1.1.1", "81.2.69.160", "200.160.2.3", "133.242.0.3", "41.0.0.1")


@attrs.frozen
class FileIdentity:
    """
    What tells two versions of a file apart without reading it: a new file
    renamed over the old one has a new inode; rewritten in place, a new
    size or modification time.
    """

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: str) -> FileIdentity:
        """
        The identity of the file at C{path} now.  @raise OSError: no file.
        """
        st = os.stat(path)
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _shape(record: Any) -> str | None:
    if not isinstance(record, dict):
        return None
    if isinstance(record.get("country_code"), str):
        return SHAPE_COUNTRY_CODE
    for key in ("country", "registered_country", "continent"):
        value = record.get(key)
        if isinstance(value, dict) and ("iso_code" in value or "code" in value):
            return SHAPE_GEOIP2
    return None


def _code(value: Any) -> str | None:
    """
    A two-letter code, upper-cased; anything else (C{ZZ} and C{XX} mean
    unknown in some databases) is C{None}.
    """
    if isinstance(value, str) and len(value) == 2 and value.isascii() and value.isalpha():
        code = value.upper()
        if code not in ("ZZ", "XX"):
            return code
    return None


@attrs.define(eq=False)
class GeoDatabase:
    """
    One open location database file: its reader, its format and its build
    date (L{open_database} makes them).

    @ivar path: The file it was read from.
    @ivar reader: The C{maxminddb} reader, on a private in-memory copy of
        the file (so a file rewritten in place cannot crash a lookup).
    @ivar shape: L{SHAPE_GEOIP2} or L{SHAPE_COUNTRY_CODE}.
    @ivar databaseType: The metadata's C{database_type}, e.g.
        C{GeoLite2-City}, C{DBIP-Country-Lite}, C{country}.
    @ivar built: The metadata's C{build_epoch}, epoch seconds.
    @ivar identity: The file's identity when it was read.
    """

    path: str
    reader: Any
    shape: str
    databaseType: str
    built: float
    identity: FileIdentity | None = None

    @property
    def builtDate(self) -> str:
        """
        The build date, C{YYYY-MM-DD} (UTC).
        """
        return f"{datetime.fromtimestamp(self.built, timezone.utc):%Y-%m-%d}"

    def describe(self) -> str:
        """
        C{TYPE YYYY-MM-DD}, e.g. C{GeoLite2-City 2018-07-03}, or for a file
        whose type is not a product name (ip-location-db's C{country
        ipvAll}) C{NAME (TYPE) YYYY-MM-DD}, NAME being the file's.
        """
        kind = self.databaseType
        if " " in kind or "-" not in kind:
            name = os.path.basename(self.path)
            if name.endswith(".mmdb"):
                name = name[: -len(".mmdb")]
            if name:
                kind = f"{name} ({kind})"
        return f"{kind} {self.builtDate}"

    def age(self, now: float) -> float:
        """
        Seconds from the build time to C{now} (epoch seconds).
        """
        return max(0.0, now - self.built)

    def lookup(self, address: _Address) -> Tuple[str | None, str | None]:
        """
        The (country, continent) of C{address}, either maybe C{None}.

        @raise maxminddb.InvalidDatabaseError: corrupt data.
        """
        record = self.reader.get(address)
        if not isinstance(record, dict):
            return None, None
        if self.shape == SHAPE_COUNTRY_CODE:
            country = _code(record.get("country_code"))
            continent = _code(record.get("continent_code")) or (
                COUNTRY_CONTINENTS.get(country) if country is not None else None
            )
            return country, continent
        found = record.get("country")
        country = _code(found.get("iso_code")) if isinstance(found, dict) else None
        found = record.get("continent")
        continent = _code(found.get("code")) if isinstance(found, dict) else None
        if continent is None and country is not None:
            continent = COUNTRY_CONTINENTS.get(country)
        return country, continent

    def close(self) -> None:
        """
        Close the reader.
        """
        self.reader.close()

    @classmethod
    def fromReader(
        cls, reader: Any, path: str = "", identity: FileIdentity | None = None
    ) -> GeoDatabase:
        """
        Wrap an open reader: a C{maxminddb} reader (C{metadata()} and
        C{get()}), or a C{geoip2.database.Reader} (its C{maxminddb} reader
        is used).

        @raise GeoDatabaseError: Its records carry no country.
        """
        inner = getattr(reader, "_db_reader", reader)
        metadata = inner.metadata()
        kind = str(metadata.database_type)
        where = f"{path}: " if path else ""
        if any(word in kind for word in _NOT_LOCATION) and not any(
            word in kind for word in _LOCATION
        ):
            raise NotALocationDatabaseError(
                f"{where}{kind} is not a location database (no countries in it)"
            )
        shapes: Dict[str, int] = {}
        sampled: List[Any] = []
        for probe in _PROBES:
            try:
                sampled.append(inner.get(probe))
            except ValueError:  # a database without IPv4 addresses
                continue
        try:
            for _, record in itertools.islice(iter(inner), 32):
                sampled.append(record)
        except TypeError:  # a reader that cannot be iterated
            pass
        first_keys: List[str] = []
        for record in sampled:
            shape = _shape(record)
            if shape is not None:
                shapes[shape] = shapes.get(shape, 0) + 1
            elif isinstance(record, dict) and not first_keys:
                first_keys = sorted(record)[:8]
        if not shapes:
            raise NotALocationDatabaseError(
                f"{where}{kind} is not a location database this edgeproxy can read:"
                " its records have no country ('country.iso_code' as in GeoIP2, GeoLite2"
                " and DB-IP, or 'country_code' as in ip-location-db)"
                + (f"; they have {', '.join(first_keys)}" if first_keys else "")
            )
        shape = max(shapes, key=lambda s: shapes[s])
        return cls(path, inner, shape, kind, float(metadata.build_epoch), identity)


def _private_reader(path: str) -> Tuple[FileIdentity, Any]:
    """
    A reader on a private in-memory copy of the file, and the identity of
    what was read: whatever later happens to the file (rewritten in place,
    truncated), the reader never sees it.

    On Linux with C{maxminddb}'s C extension the copy is an anonymous
    memory file (C{memfd_create}) mapped by the extension (lookups in
    about a third of the pure-Python reader's time); elsewhere the
    pure-Python reader holds the bytes.
    """
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        data = f.read()
    identity = FileIdentity(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is not None and _has_extension():
        fd = memfd_create("edgeproxy-geoip", getattr(os, "MFD_CLOEXEC", 0))
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            # The extension maps the file and closes what it opened; the
            # mapping keeps the memory file alive until the reader closes.
            return identity, maxminddb.open_database(f"/proc/self/fd/{fd}", _MODE_MMAP_EXT)
        except OSError:
            pass  # no /proc: the pure-Python reader below
        finally:
            os.close(fd)
    buffer = io.BytesIO(data)
    # maxminddb before 3.0 names the database in its errors by the file's
    # name, and a BytesIO has none.
    buffer.name = path  # type: ignore[attr-defined]
    return identity, maxminddb.open_database(buffer, maxminddb.MODE_FD)


_MODE_MMAP_EXT: int = getattr(maxminddb, "MODE_MMAP_EXT", -1)


def _has_extension() -> bool:
    """
    Whether to read with C{maxminddb}'s C extension: where it is installed,
    except on PyPy.  There it runs through cpyext, where iterating its
    reader aborts the process (PyPy 7.3.11, maxminddb 2.8), and its lookups
    cost more than the JIT-compiled pure-Python reader's (about 210,000 a
    second against 600,000 on the shipped database; CPython: 630,000 with
    the extension, 56,000 without).
    """
    if platform.python_implementation() == "PyPy":
        return False
    try:
        from maxminddb import extension
    except ImportError:
        return False
    return hasattr(extension, "Reader") and _MODE_MMAP_EXT != -1


def open_database(path: str) -> GeoDatabase:
    """
    Open and check a location database: a MaxMind DB file (GeoIP2 or
    GeoLite2 City, Country or Enterprise; DB-IP Lite; ip-location-db's
    C{country_code} files), read whole into memory.  Blocking: call it in
    a thread once the reactor runs.

    The format is told by the metadata (an ASN, ISP or domain database is
    refused) and the shape of its records.

    @raise GeoDatabaseError: The file is missing, unreadable, not a MaxMind
        DB file, corrupt, or has no countries; the message names the file.
    """
    try:
        identity, reader = _private_reader(path)
    except (OSError, ValueError, maxminddb.InvalidDatabaseError) as e:
        raise GeoDatabaseError(f"{path}: not a readable MaxMind DB file: {e}") from None
    except Exception as e:  # a truncated file fails in odd ways
        raise GeoDatabaseError(f"{path}: not a readable MaxMind DB file: {e!r}") from None
    try:
        database = GeoDatabase.fromReader(reader, path, identity)
        # A lookup walks the tree into the data section: a truncated or
        # corrupt file fails here rather than on a client's connection.
        for probe in _PROBES:
            database.lookup(ipaddress.ip_address(probe))
    except GeoDatabaseError:
        reader.close()
        raise
    except Exception as e:
        reader.close()
        raise GeoDatabaseError(f"{path}: corrupt MaxMind DB file: {e}") from None
    return database


# --- configuration files ------------------------------------------------------


def _lines(text: str) -> List[Tuple[int, str]]:
    """
    (line number, content) of the non-blank lines, '#' comments removed.
    """
    result = []
    for number, line in enumerate(text.splitlines(), 1):
        content = line.split("#", 1)[0].strip()
        if content:
            result.append((number, content))
    return result


def _country(token: str, where: str) -> str:
    if len(token) != 2 or not (token.isascii() and token.isalpha()):
        raise ValueError(f"{where}: {token!r} is not a two-letter country code")
    return token.upper()


def parse_regions(text: str, source: str = "<regions>") -> Dict[str, str]:
    """
    Parse a region table: C{region: CC CC CC} lines, C{#} comments.

    The result replaces L{DEFAULT_REGIONS} entirely.

    @raise ValueError: A malformed line, naming C{source} and the line.
    """
    regions: Dict[str, str] = {}
    for number, content in _lines(text):
        where = f"{source}:{number}"
        name, colon, countries = content.partition(":")
        name = name.strip()
        if not colon:
            raise ValueError(f"{where}: expected 'region: CC CC ...', got {content!r}")
        if not name or not all(c.isascii() and (c.isalnum() or c in "-_") for c in name):
            raise ValueError(f"{where}: {name!r} is not a region name (letters, digits, - or _)")
        for token in countries.split():
            country = _country(token, where)
            if country in regions:
                raise ValueError(f"{where}: {country} is already in region {regions[country]!r}")
            regions[country] = name
    return regions


def parse_overrides(text: str, source: str = "<overrides>") -> List[Tuple[Network, str]]:
    """
    Parse geo overrides: C{CIDR COUNTRY} lines, C{#} comments.

    @raise ValueError: A malformed line (bad network, host bits set, bad
        country, repeated network), naming C{source} and the line.
    """
    overrides: List[Tuple[Network, str]] = []
    seen: Dict[Network, int] = {}
    for number, content in _lines(text):
        where = f"{source}:{number}"
        fields = content.split()
        if len(fields) != 2:
            raise ValueError(f"{where}: expected 'CIDR COUNTRY', got {content!r}")
        try:
            network = ipaddress.ip_network(fields[0], strict=True)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if network in seen:
            raise ValueError(f"{where}: {network} is already on line {seen[network]}")
        seen[network] = number
        overrides.append((network, _country(fields[1], where)))
    return overrides


def _readText(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read: {e}") from None


def load_regions(path: str) -> Dict[str, str]:
    """
    L{parse_regions} of a file.  @raise ValueError: unreadable or malformed.
    """
    return parse_regions(_readText(path), path)


def load_overrides(path: str) -> List[Tuple[Network, str]]:
    """
    L{parse_overrides} of a file.  @raise ValueError: unreadable or malformed.
    """
    return parse_overrides(_readText(path), path)


# --- the resolver -------------------------------------------------------------

_MISS = object()


def _unwrap(ip: str) -> _Address | None:
    """
    Parse C{ip}; an IPv4-mapped IPv6 address becomes its IPv4 address.
    """
    try:
        address = ipaddress.ip_address(ip)
    except (ValueError, TypeError):
        return None
    if address.version == 6:
        mapped = address.ipv4_mapped  # type: ignore[union-attr]
        if mapped is not None:
            return mapped
    return address


@implementer(IGeoResolver)
class GeoIPResolver:
    """
    Locate clients with a MaxMind-format database, operator overrides and a
    country -> region table.

    The database can be replaced while the resolver runs (L{swap}, which
    L{GeoDatabaseWatcher} calls when the file changes): a lookup uses
    whichever database is in force when it starts, and the cache is
    emptied with each swap.

    @param reader: A L{GeoDatabase}, an open C{maxminddb} or C{geoip2}
        reader (wrapped with L{GeoDatabase.fromReader}), or C{None} to run
        without geo (overrides only).
    @param regions: Country -> region; countries not in it fall back to
        L{CONTINENT_REGIONS}.
    @param overrides: (network, country) pairs consulted before the
        database; the most specific network wins.
    @param cache_size: Addresses remembered (answers and non-answers);
        the cache is emptied when full.
    @param maxAge: Seconds after its build time from which the database is
        reported as stale (L{status}, L{warnIfStale}).

    @ivar path: The database file to watch (set by L{fromPaths}), or
        C{None}.
    @ivar shipped: The database is the one shipped with edgeproxy.
    @ivar geoError: Why there is no database (set by L{fromPaths}).
    @ivar lastReloadError: Why the last attempt to load a new version of
        the file failed, or C{None} (set by L{GeoDatabaseWatcher}).
    @ivar reloads: Successful reloads by L{GeoDatabaseWatcher}.
    @ivar reloadErrors: Failed reload attempts (each broken version of the
        file is counted once).
    """

    def __init__(
        self,
        reader: Any,
        regions: Mapping[str, str] = DEFAULT_REGIONS,
        overrides: Sequence[Tuple[Network, str]] = (),
        cache_size: int = 65536,
        maxAge: float = DEFAULT_MAX_AGE_DAYS * 86400,
    ) -> None:
        self._regions = regions
        self._cacheSize = max(1, cache_size)
        self._cache: Dict[str, GeoInfo | None] = {}
        self._infos: Dict[Tuple[str | None, str | None], GeoInfo] = {}
        self._lookupFailed = False
        self.maxAge = maxAge
        self.path: str | None = None
        self.shipped = False
        self.geoError: str | None = None
        self.lastReloadError: str | None = None
        self.reloads = 0
        self.reloadErrors = 0
        self._staleWarned: GeoDatabase | None = None
        database: GeoDatabase | None = None
        if isinstance(reader, GeoDatabase):
            database = reader
        elif reader is not None:
            try:
                database = GeoDatabase.fromReader(reader)
            except GeoDatabaseError as e:
                raise ValueError(str(e)) from None
        self._database = database
        # Overrides by (IP version, prefix length), longest prefix first.
        by_prefix: Dict[Tuple[int, int], Dict[int, str]] = {}
        for network, country in overrides:
            by_prefix.setdefault((network.version, network.prefixlen), {})[
                int(network.network_address)
            ] = country
        self._overrides = [
            (version, 32 if version == 4 else 128, prefixlen, table)
            for (version, prefixlen), table in sorted(by_prefix.items(), key=lambda kv: -kv[0][1])
        ]

    @classmethod
    def fromPaths(
        cls,
        geoip_path: str | None,
        overrides_path: str | None = None,
        regions_path: str | None = None,
        maxAge: float = DEFAULT_MAX_AGE_DAYS * 86400,
    ) -> GeoIPResolver:
        """
        Build a resolver from files, at startup.

        @param geoip_path: A MaxMind-format database; C{None} means the
            shipped default (L{default_geoip_path}); C{""} means no
            database.  A missing, unreadable or corrupt database gives a
            resolver without geo (overrides only) and an error in the log;
            never fatal (FAULTS F13).  The path is kept (L{path}) so that
            L{GeoDatabaseWatcher} loads the file once it appears or is
            fixed.
        @param overrides_path: A C{CIDR COUNTRY} file, or C{None}.
        @param regions_path: A C{region: CC CC} file replacing
            L{DEFAULT_REGIONS}, or C{None}.
        @param maxAge: See L{GeoIPResolver}.
        @raise NotALocationDatabaseError: The database is a MaxMind DB file
            without countries (an ASN database, say): a configuration
            mistake, not a fault to run through.
        @raise ValueError: The overrides or regions file is unreadable or
            malformed (the message names the file and line).
        """
        regions: Mapping[str, str] = DEFAULT_REGIONS
        if regions_path is not None:
            regions = MappingProxyType(load_regions(regions_path))
        overrides = load_overrides(overrides_path) if overrides_path is not None else []
        shipped = geoip_path is None
        if geoip_path is None:
            geoip_path = default_geoip_path()
        error: str | None = None
        if not geoip_path:
            error = "no GeoIP database configured or installed"
        else:
            try:
                database = open_database(geoip_path)
            except NotALocationDatabaseError:
                raise
            except GeoDatabaseError as e:
                error = f"cannot use GeoIP database {e}"
            else:
                resolver = cls(database, regions, overrides, maxAge=maxAge)
                resolver.path = geoip_path
                resolver.shipped = shipped
                return resolver
        _log.error(
            "Running without geo: {error}; clients are routed to the local region first "
            "({overrides} overrides still apply)",
            error=error,
            overrides=len(overrides),
        )
        resolver = cls(None, regions, overrides, maxAge=maxAge)
        resolver.geoError = error
        resolver.path = geoip_path or None
        resolver.shipped = shipped
        return resolver

    @property
    def database(self) -> GeoDatabase | None:
        """
        The database in force, or C{None}.
        """
        return self._database

    def describe(self) -> str:
        """
        A short description for the startup log, e.g. C{GeoLite2-City
        2018-07-03} or C{no geo database}.
        """
        database = self._database
        return database.describe() if database is not None else "no geo database"

    def swap(self, database: GeoDatabase) -> None:
        """
        Put C{database} in force (on the reactor thread), close the one it
        replaces and forget the cached answers.
        """
        old, self._database = self._database, database
        self._cache.clear()
        self._lookupFailed = False
        self.geoError = None
        if old is not None and old is not database:
            old.close()

    def isStale(self, now: float) -> bool:
        """
        Whether the database in force was built more than L{maxAge} seconds
        before C{now} (epoch seconds).
        """
        database = self._database
        return database is not None and database.age(now) > self.maxAge

    def warnIfStale(self, now: float) -> bool:
        """
        Log a warning naming the build date if the database is stale, once
        per database.  @return: Whether it is stale.
        """
        database = self._database
        if not self.isStale(now) or database is None:
            return False
        if self._staleWarned is not database:
            self._staleWarned = database
            _log.warn(
                "GeoIP database {path} ({kind}) was built on {built}, {days} days ago,"
                " more than --geoip-max-age ({max_days} days): clients may be located in"
                " the wrong country; refresh it (python -m edgeproxy.geodata update, or"
                " geoipupdate)",
                path=database.path or "(given reader)",
                kind=database.databaseType,
                built=database.builtDate,
                days=int(database.age(now) // 86400),
                max_days=f"{self.maxAge / 86400:g}",
            )
        return True

    def status(self, now: float) -> Dict[str, Any]:
        """
        The database's state for the status page and the metrics: JSON
        data (C{None} values where there is no database).

        @param now: Epoch seconds.
        """
        database = self._database
        return {
            "path": self.path,
            "shipped": self.shipped,
            "type": database.databaseType if database is not None else None,
            "built": database.builtDate if database is not None else None,
            "build_epoch": database.built if database is not None else None,
            "age_days": round(database.age(now) / 86400, 1) if database is not None else None,
            "max_age_days": round(self.maxAge / 86400, 3),
            "stale": self.isStale(now),
            "error": self.geoError,
            "reloads": self.reloads,
            "reload_errors": self.reloadErrors,
            "last_reload_error": self.lastReloadError,
        }

    def close(self) -> None:
        """
        Close the database (lookups then use overrides only).
        """
        if self._database is not None:
            self._database.close()
            self._database = None
            self._cache.clear()

    def resolve(self, ip: str) -> GeoInfo | None:
        """
        Locate C{ip}; see L{IGeoResolver.resolve}.  Never raises.
        """
        info = self._cache.get(ip, _MISS)
        if info is not _MISS:
            return info  # type: ignore[return-value]
        try:
            result = self._locate(ip)
        except Exception:
            if not self._lookupFailed:
                self._lookupFailed = True
                _log.failure("GeoIP lookup failed for {ip!r}; treating it as unknown", ip=ip)
            result = None
        if len(self._cache) >= self._cacheSize:
            self._cache.clear()
        self._cache[ip] = result
        return result

    def _info(self, country: str | None, region: str | None) -> GeoInfo | None:
        if country is None and region is None:
            return None
        key = (country, region)
        info = self._infos.get(key)
        if info is None:
            info = self._infos[key] = GeoInfo(country, region)
        return info

    def _locate(self, ip: str) -> GeoInfo | None:
        address = _unwrap(ip)
        if address is None:
            return None
        if self._overrides:
            value = int(address)
            version = address.version
            for v, bits, prefixlen, table in self._overrides:
                if v == version:
                    country = table.get(value >> (bits - prefixlen) << (bits - prefixlen))
                    if country is not None:
                        return self._info(country, region_for(country, None, self._regions))
        if not address.is_global or address.is_multicast:
            return None
        database = self._database
        if database is None:
            return None
        try:
            country, continent = database.lookup(address)
        except ValueError:  # an IPv6 address in an IPv4-only database
            if address.version == 6:
                return None
            raise
        return self._info(country, region_for(country, continent, self._regions))


# --- keeping it current -------------------------------------------------------


class _Metrics(Protocol):
    def increment(self, name: str, label: str = "", amount: int = 1) -> None: ...


#: The store counter of database reloads (label C{ok} or C{error}).
RELOAD_COUNTER = "geoip_reload"


class GeoDatabaseWatcher:
    """
    Reload the resolver's database when its file changes, as
    C{geoipupdate} (a new file renamed over the old one) or
    C{python -m edgeproxy.geodata update} change it; for a
    C{TimerService} every few seconds.

    L{check} compares the file's identity (device, inode, size,
    modification time) with the one in force, and on a change opens and
    checks the new file in the reactor's thread pool, then swaps it in on
    the reactor thread.  A broken version (truncated, not a location
    database, half written) leaves the old database in force; it is logged
    once and counted once (C{geoip_reload} C{error}), and tried again only
    when the file changes again.  It also warns, once per database, when
    the database in force grows older than the resolver's C{maxAge}.

    @param resolver: The resolver whose C{path} is watched.
    @param reactor: For its thread pool (C{IReactorThreads}); C{None} (or a
        reactor without threads, such as C{MemoryReactorClock}) opens files
        on the calling thread.
    @param metrics: Where reloads are counted, or C{None}.
    @param wallClock: Epoch seconds, for the age.
    """

    def __init__(
        self,
        resolver: GeoIPResolver,
        reactor: Any = None,
        metrics: _Metrics | None = None,
        wallClock: Callable[[], float] = time.time,
    ) -> None:
        self.resolver = resolver
        self.reactor = reactor
        self.metrics = metrics
        self.wallClock = wallClock
        database = resolver.database
        self._current: FileIdentity | None = database.identity if database else None
        self._failed: FileIdentity | None = None
        # Without a database, fromPaths has already said the file is missing.
        self._missingLogged = database is None
        self._busy: Deferred[None] | None = None

    def __repr__(self) -> str:
        return f"<GeoDatabaseWatcher path={self.resolver.path!r}>"

    def check(self) -> Deferred[None]:
        """
        Look at the file once; load it if it changed.  Never fails.

        @return: Fires when the check (and any load) is over; while one is
            in flight, the same one.
        """
        if self._busy is not None:
            return self._busy
        try:
            self.resolver.warnIfStale(self.wallClock())
        except Exception:
            _log.failure("GeoIP database age check failed")
        path = self.resolver.path
        if not path:
            return succeed(None)
        try:
            identity = FileIdentity.of(path)
        except OSError as e:
            if not self._missingLogged:
                self._missingLogged = True
                _log.warn(
                    "GeoIP database {path} is gone ({error}); keeping the one loaded",
                    path=path,
                    error=e.strerror or str(e),
                )
            return succeed(None)
        self._missingLogged = False
        if identity == self._current or identity == self._failed:
            return succeed(None)
        pool = getattr(self.reactor, "getThreadPool", None)
        if pool is not None:
            from twisted.internet.threads import deferToThreadPool

            opened: Deferred[GeoDatabase] = deferToThreadPool(
                self.reactor, pool(), open_database, path
            )
        else:
            opened = maybeDeferred(open_database, path)
        self._busy = d = opened.addCallbacks(
            lambda database: self._loaded(database, identity),
            lambda failure: self._broken(failure, path, identity),
        )

        def done(result: object) -> None:
            self._busy = None

        d.addBoth(done)
        return d

    def _loaded(self, database: GeoDatabase, identity: FileIdentity) -> None:
        resolver = self.resolver
        old = resolver.describe()
        # The file may have changed again while it was read: what was read
        # is what counts.
        current = database.identity or identity
        resolver.swap(database)
        self._current = current
        self._failed = None
        resolver.reloads += 1
        resolver.lastReloadError = None
        if self.metrics is not None:
            self.metrics.increment(RELOAD_COUNTER, "ok")
        _log.info(
            "GeoIP database reloaded from {path}: {new} (was {old})",
            path=database.path,
            new=database.describe(),
            old=old,
        )
        resolver.warnIfStale(self.wallClock())

    def _broken(self, failure: Failure, path: str, identity: FileIdentity) -> None:
        resolver = self.resolver
        self._failed = identity
        error = failure.value
        reason = str(error) if isinstance(error, GeoDatabaseError) else repr(error)
        resolver.reloadErrors += 1
        resolver.lastReloadError = reason
        if self.metrics is not None:
            self.metrics.increment(RELOAD_COUNTER, "error")
        _log.error(
            "GeoIP database {path} changed but cannot be used ({reason}); keeping {kept}",
            path=path,
            reason=reason,
            kept=resolver.describe(),
        )
