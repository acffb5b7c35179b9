"""
One C{--db} value, one store: the choice of routing-table adapter by the
value's form.

 - a file name: the embedded SQLite file (L{edgeproxy.stores.sqlite});
 - C{postgresql://...} or C{postgres://...}: a PostgreSQL database;
 - C{etcd://host:port[,host:port...]/prefix} (C{etcds://} for TLS): a table
   shared between POPs through etcd.

L{open_store} runs before the reactor starts (it may block: the first load
of the table happens there, so that a POP that cannot read its table fails
at startup with the reason instead of serving nothing).
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Callable, Dict, List, Mapping, Optional

import attrs
from twisted.application.service import IService

from edgeproxy.interfaces import IBackendRepository, IMetricsStore

#: Store kinds by URL scheme; anything without a known scheme is a file name.
SCHEMES: Dict[str, str] = {
    "postgresql": "postgresql",
    "postgres": "postgresql",
    "etcd": "etcd",
    "etcds": "etcd",
}


class StoreError(Exception):
    """
    The store cannot be opened or its first table cannot be read; the
    message says why, for the startup error.
    """


@attrs.define
class Store:
    """
    An opened routing-table store.

    @ivar kind: C{"sqlite"}, C{"postgresql"} or C{"etcd"}.
    @ivar repository: The read port, holding its first table.
    @ivar writer: The write port (registrations and heartbeats), or C{None}
        when the store cannot be written.
    @ivar pops: The POPs table (for the geo DNS), or C{None}.
    @ivar description: The store as it may be logged (no password).
    @ivar services: Services that must run with the proxy (a notification
        listener, a watch); started and stopped with it.
    @ivar localDirectory: Where local files (the admin state file) go by
        default.
    """

    kind: str
    repository: IBackendRepository
    writer: Any = None
    pops: Any = None
    description: str = ""
    services: List[IService] = attrs.field(factory=list)
    localDirectory: str = "."


def store_kind(value: str) -> str:
    """
    The kind of store a C{--db} value names.
    """
    scheme, sep, _ = value.partition("://")
    if sep and scheme.lower() in SCHEMES:
        return SCHEMES[scheme.lower()]
    return "sqlite"


def validate_db(value: str) -> str:
    """
    Check a C{--db} value's form (not whether the store answers).

    @raise ValueError: With the reason.
    """
    if not value.strip():
        raise ValueError(
            "must be a file name or a postgresql:// or etcd:// URL, got an empty value"
        )
    if store_kind(value) == "sqlite":
        scheme, sep, _ = value.partition("://")
        if sep and scheme.isalpha():
            raise ValueError(
                f"unknown store scheme {scheme + '://'!r}: use a file name, "
                "postgresql://... or etcd://host:port/prefix"
            )
        if os.path.isdir(value):
            raise ValueError(f"{value!r} is a directory")
    return value


Opener = Callable[[str, Any, IMetricsStore, Mapping[str, Any]], Store]

#: Openers by kind; each store module registers its own (the SQLite one is
#: built in).  An opener takes the --db value, the reactor, the metrics store
#: and the parsed options, and returns a L{Store} holding its first table.
OPENERS: Dict[str, Opener] = {}


def _open_sqlite(
    value: str, reactor: Any, metrics: IMetricsStore, options: Mapping[str, Any]
) -> Store:
    from edgeproxy.stores.pops import SqlitePopRepository
    from edgeproxy.stores.sqlite import (
        RoutingDatabaseError,
        SqliteBackendRepository,
        SqliteBackendWriter,
    )

    repository = SqliteBackendRepository(value, reactor=reactor, metrics=metrics)
    try:
        repository.loadInitial()
    except RoutingDatabaseError as e:
        raise StoreError(str(e)) from None
    pops = SqlitePopRepository(value, reactor=reactor, metrics=metrics)
    pops.loadInitial()
    return Store(
        kind="sqlite",
        repository=repository,
        writer=SqliteBackendWriter(repository),
        pops=pops,
        description=value,
        localDirectory=os.path.dirname(os.path.abspath(value)),
    )


OPENERS["sqlite"] = _open_sqlite


#: The module that registers each store kind's opener when imported.
MODULES: Dict[str, str] = {
    "postgresql": "edgeproxy.stores.postgres",
    "etcd": "edgeproxy.stores.etcd",
}


def _opener(kind: str) -> Optional[Opener]:
    if kind not in OPENERS and kind in MODULES:
        try:
            importlib.import_module(MODULES[kind])
        except ImportError as e:
            raise StoreError(f"the {kind} store cannot be loaded: {e}") from None
    return OPENERS.get(kind)


def open_store(
    value: str,
    reactor: Any,
    metrics: IMetricsStore,
    options: Optional[Mapping[str, Any]] = None,
) -> Store:
    """
    Open the store a C{--db} value names and load its first table.

    @raise StoreError: The store cannot be opened or read (the reason is
        in the message, without any password).
    """
    kind = store_kind(value)
    opener = _opener(kind)
    if opener is None:
        raise StoreError(f"no {kind} store in this installation")
    return opener(value, reactor, metrics, options or {})


__all__ = [
    "OPENERS",
    "SCHEMES",
    "Store",
    "StoreError",
    "open_store",
    "store_kind",
    "validate_db",
]
