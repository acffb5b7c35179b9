"""
Where a client is: an L{IGeoResolver} adapter on a MaxMind database.

The lookup (SPEC section 2) is, in order: operator overrides (CIDR ->
country, most specific prefix first); then nothing for loopback, private,
link-local, multicast, unspecified and reserved addresses; then the MaxMind
database (City or Country, read with C{geoip2}).  The country gives the
region through a replaceable table, and a country missing from the table
falls back to its continent.  No network I/O, ever; results are cached per
address string, because this runs on every new connection.

A missing or corrupt database is not fatal (FAULTS F13): the resolver then
knows only the overrides, and says so once.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any, Callable, Dict, List, Tuple, Union

import geoip2.database
import geoip2.errors
from twisted.logger import Logger
from zope.interface import implementer

from edgeproxy.interfaces import IGeoResolver
from edgeproxy.model import GeoInfo, Network

__all__ = [
    "CONTINENT_REGIONS",
    "DEFAULT_REGIONS",
    "GeoIPResolver",
    "Network",
    "default_geoip_path",
    "load_overrides",
    "load_regions",
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


def default_geoip_path() -> str | None:
    """
    The GeoLite2-City database installed by the C{maxminddb-geolite2}
    package, or C{None} if it is not installed.
    """
    try:
        spec = importlib.util.find_spec("_maxminddb_geolite2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, "GeoLite2-City.mmdb")
        if os.path.isfile(path):
            return path
    return None


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
    Locate clients with a MaxMind database, operator overrides and a
    country -> region table.

    @param reader: An open C{geoip2} reader (City, Country or Enterprise
        database), or C{None} to run without geo (overrides only).
    @param regions: Country -> region; countries not in it fall back to
        L{CONTINENT_REGIONS}.
    @param overrides: (network, country) pairs consulted before the
        database; the most specific network wins.
    @param cache_size: Addresses remembered (answers and non-answers);
        the cache is emptied when full.
    """

    def __init__(
        self,
        reader: geoip2.database.Reader | None,
        regions: Mapping[str, str] = DEFAULT_REGIONS,
        overrides: Sequence[Tuple[Network, str]] = (),
        cache_size: int = 65536,
    ) -> None:
        self._reader = reader
        self._regions = regions
        self._cacheSize = max(1, cache_size)
        self._cache: Dict[str, GeoInfo | None] = {}
        self._infos: Dict[Tuple[str | None, str | None], GeoInfo] = {}
        self._lookupFailed = False
        #: Why there is no database (set by L{fromPaths}), for L{describe}.
        self.geoError: str | None = None
        self._query: Callable[[Any], Any] | None = None
        self._description = "no geo database"
        if reader is not None:
            metadata = reader.metadata()
            kind = metadata.database_type
            if "City" in kind:
                self._query = reader.city
            elif "Enterprise" in kind:
                self._query = reader.enterprise
            elif "Country" in kind:
                self._query = reader.country
            else:
                raise ValueError(f"{kind} is not a City, Country or Enterprise database")
            built = datetime.fromtimestamp(metadata.build_epoch, timezone.utc)
            self._description = f"{kind} {built:%Y-%m-%d}"
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
    ) -> GeoIPResolver:
        """
        Build a resolver from files, at startup.

        @param geoip_path: A MaxMind database; C{None} means the shipped
            default (L{default_geoip_path}); C{""} means no database.  A
            missing, unreadable or corrupt database gives a resolver without
            geo (overrides only) and an error in the log; never fatal.
        @param overrides_path: A C{CIDR COUNTRY} file, or C{None}.
        @param regions_path: A C{region: CC CC} file replacing
            L{DEFAULT_REGIONS}, or C{None}.
        @raise ValueError: The overrides or regions file is unreadable or
            malformed (the message names the file and line).
        """
        regions: Mapping[str, str] = DEFAULT_REGIONS
        if regions_path is not None:
            regions = MappingProxyType(load_regions(regions_path))
        overrides = load_overrides(overrides_path) if overrides_path is not None else []
        if geoip_path is None:
            geoip_path = default_geoip_path()
        reader: geoip2.database.Reader | None = None
        error: str | None = None
        if not geoip_path:
            error = "no GeoIP database configured or installed"
        else:
            try:
                reader = geoip2.database.Reader(geoip_path)
                resolver = cls(reader, regions, overrides)
            except Exception as e:
                if reader is not None:
                    reader.close()
                    reader = None
                error = f"cannot use GeoIP database {geoip_path}: {e}"
            else:
                return resolver
        _log.error(
            "Running without geo: {error}; clients are routed to the local region first "
            "({overrides} overrides still apply)",
            error=error,
            overrides=len(overrides),
        )
        resolver = cls(None, regions, overrides)
        resolver.geoError = error
        return resolver

    def describe(self) -> str:
        """
        A short description for the startup log, e.g. C{GeoLite2-City
        2018-07-03} or C{no geo database}.
        """
        return self._description

    def close(self) -> None:
        """
        Close the database (lookups then use overrides only).
        """
        if self._reader is not None:
            self._reader.close()
            self._reader = None
            self._query = None
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
        query = self._query
        if query is None:
            return None
        try:
            record = query(address)
        except geoip2.errors.AddressNotFoundError:
            return None
        country = record.country.iso_code
        continent = record.continent.code
        if country is not None:
            country = country.upper()
        return self._info(country, region_for(country, continent, self._regions))
