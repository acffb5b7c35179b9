"""
The choice of store by the C{--db} value (L{edgeproxy.stores.open}).
"""

from __future__ import annotations

import pytest

from edgeproxy.metrics import MetricsStore
from edgeproxy.stores.open import StoreError, open_store, store_kind, validate_db
from edgeproxy.tap import redact_db


@pytest.mark.parametrize(
    "value, kind",
    [
        ("routing.db", "sqlite"),
        ("/var/lib/edgeproxy/routing.db", "sqlite"),
        ("postgresql://edge@db/edgeproxy", "postgresql"),
        ("postgres://db/edgeproxy", "postgresql"),
        ("POSTGRESQL://db/edgeproxy", "postgresql"),
        ("etcd://127.0.0.1:2379/edgeproxy", "etcd"),
        ("etcds://a:2379,b:2379/edgeproxy", "etcd"),
    ],
)
def test_store_kind_follows_the_scheme(value: str, kind: str) -> None:
    """
    A URL scheme names the store; anything else is a SQLite file name.
    """
    assert store_kind(value) == kind


def test_unknown_scheme_is_refused_with_the_choices() -> None:
    """
    A value that looks like a URL of an unknown scheme is refused rather
    than taken as a file name, and the error lists what is accepted.
    """
    with pytest.raises(ValueError, match=r"unknown store scheme 'mysql://'.*postgresql"):
        validate_db("mysql://db/edgeproxy")


def test_directory_and_empty_values_are_refused(tmp_path: object) -> None:
    """
    A directory or an empty value is not a routing table.
    """
    with pytest.raises(ValueError, match="is a directory"):
        validate_db(str(tmp_path))
    with pytest.raises(ValueError, match="empty value"):
        validate_db("  ")


def test_sqlite_store_loads_its_first_table(tmp_path: object) -> None:
    """
    Opening a SQLite value creates the file from the schema, loads it, and
    gives a writer and the POPs table, with local files beside the database.
    """
    import os

    path = os.path.join(str(tmp_path), "routing.db")
    store = open_store(path, None, MetricsStore())
    assert store.kind == "sqlite"
    assert store.repository.current().backends == ()
    assert store.writer is not None
    assert store.pops is not None
    assert store.localDirectory == str(tmp_path)


def test_sqlite_store_that_cannot_load_is_a_store_error(tmp_path: object) -> None:
    """
    A file that is not a SQLite database is a L{StoreError} naming the
    problem, for the startup error.
    """
    import os

    path = os.path.join(str(tmp_path), "routing.db")
    with open(path, "wb") as f:
        f.write(b"this is not a database" * 100)
    with pytest.raises(StoreError):
        open_store(path, None, MetricsStore())


@pytest.mark.parametrize(
    "value, shown",
    [
        ("routing.db", "routing.db"),
        ("postgresql://edge:s3cret@db:5432/edgeproxy", "postgresql://edge:***@db:5432/edgeproxy"),
        ("postgresql://edge@db/edgeproxy", "postgresql://edge@db/edgeproxy"),
        ("etcds://root:pw@a:2379,b:2379/edge", "etcds://root:***@a:2379,b:2379/edge"),
        (
            "postgresql://edge@db/edgeproxy?sslmode=require&password=s3cret",
            "postgresql://edge@db/edgeproxy?sslmode=require&password=***",
        ),
    ],
)
def test_passwords_are_not_logged(value: str, shown: str) -> None:
    """
    The --db value as logged has its password replaced.
    """
    assert redact_db(value) == shown
