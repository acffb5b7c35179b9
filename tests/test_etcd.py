"""
Tests for the etcd routing-table store (L{edgeproxy.stores.etcd}) against a
real three-member etcd cluster started by the tests (L{etcdkit}); skipped
with the install command when etcd is absent.  Plus unit tests of the URL
parser, the value decoder and the watch stream reader.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any, Dict, Iterator, List, cast

import etcdkit
import pytest
import pytest_twisted
from etcdkit import EtcdCluster, free_port
from faultkit import sleep, wait_until
from hypothesis import given
from hypothesis import strategies as st
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from zope.interface.verify import verifyObject

from edgeproxy.interfaces import IBackendRepository, IBackendWriter, ILeasedRepository
from edgeproxy.metrics import MetricsStore
from edgeproxy.routing.heartbeats import HeartbeatExpiry
from edgeproxy.routing.overlay import StateOverlay
from edgeproxy.stores import etcd as etcd_store
from edgeproxy.stores.etcd import (
    MAX_VALUE_BYTES,
    EtcdBackendRepository,
    EtcdBackendWriter,
    EtcdTarget,
    EtcdWatchService,
    WatchProtocol,
    decode_entry,
    parse_etcd_url,
)
from edgeproxy.stores.open import Store, StoreError, open_store
from edgeproxy.stores.pops import IPopRepository

#: The fixtures (one cluster for the session, a fresh prefix per test).
etcd_cluster = etcdkit.etcd_cluster
etcd_prefix = etcdkit.etcd_prefix

TOKEN = "etcd-admin-token-0123456789abcdef"


def row(backend_id: str, port: object = 9000, **overrides: object) -> Dict[str, object]:
    """
    A valid backend value.
    """
    value: Dict[str, object] = {
        "id": backend_id,
        "app": "web",
        "region": "sa",
        "country": "BR",
        "wg_ip": "127.0.0.1",
        "port": port,
        "healthy": 1,
        "weight": 1,
        "soft_limit": 10,
        "hard_limit": 20,
        "deleted": 0,
    }
    value.update(overrides)
    return value


def put_backend(cluster: EtcdCluster, prefix: str, backend_id: str, **overrides: object) -> int:
    return cluster.put(f"{prefix}/backends/{backend_id}", json.dumps(row(backend_id, **overrides)))


@pytest.fixture(autouse=True)
def no_parked_connections() -> Iterator[None]:
    """
    Each test leaves no HTTP connection parked in a pool (a closed etcd
    client closes even the connections handed back to it after the close:
    the later tests of the suite check that the reactor has no timers
    left).
    """
    yield
    pytest_twisted.blockon(deferLater(reactor, 0.05, lambda: None))
    left = [
        c
        for c in reactor.getDelayedCalls()  # type: ignore[attr-defined]
        if c.active() and "_removeConnection" in repr(c)
    ]
    for call in left:
        call.cancel()
    assert left == []


@pytest.fixture
def events() -> Iterator[List[Dict[str, Any]]]:
    """
    Every log event emitted during the test.
    """
    captured: List[Dict[str, Any]] = []
    observer = cast(ILogObserver, captured.append)
    globalLogPublisher.addObserver(observer)
    try:
        yield captured
    finally:
        globalLogPublisher.removeObserver(observer)


def opened(cluster: EtcdCluster, prefix: str, tmp_path: Path, **options: Any) -> Store:
    options.setdefault("db-cache", str(tmp_path / "cache.db"))
    options.setdefault("heartbeat-ttl", 30.0)
    return open_store(cluster.url(prefix), reactor, MetricsStore(), options)


def repo(store: Store) -> EtcdBackendRepository:
    assert isinstance(store.repository, EtcdBackendRepository)
    return store.repository


def watcher(store: Store) -> EtcdWatchService:
    service = store.services[0]
    assert isinstance(service, EtcdWatchService)
    return service


# --- unit tests ---------------------------------------------------------------


def test_parse_url_forms() -> None:
    """
    Members (default port 2379, IPv6 in brackets), the prefix, TLS from
    etcds://; a URL without a prefix, with credentials or a bad port is
    refused with the reason.
    """
    t = parse_etcd_url("etcd://a:1,b,[::1]:3/edge/proxy/")
    assert t.endpoints == ("http://a:1", "http://b:2379", "http://[::1]:3")
    assert t.prefix == "/edge/proxy" and not t.tls
    assert t.backends == "/edge/proxy/backends/"
    assert parse_etcd_url("etcds://h:2379/p").endpoints == ("https://h:2379",)
    for bad, reason in [
        ("etcd://h:2379", "prefix"),
        ("etcd://h:2379/", "prefix"),
        ("etcd://u:pw@h:2379/p", "--etcd-user"),
        ("etcd://h:99999/p", "unusable member"),
        ("etcd://h:1,,h:2/p", "empty member"),
    ]:
        with pytest.raises(ValueError, match=reason):
            parse_etcd_url(bad)


@given(st.text(max_size=60))
def test_parse_url_never_raises_anything_else(text: str) -> None:
    """
    Whatever the text, the parser returns a target or raises ValueError.
    """
    try:
        target = parse_etcd_url("etcd://" + text)
    except ValueError:
        return
    assert target.prefix.startswith("/") and target.endpoints


TARGET = EtcdTarget(endpoints=("http://h:1",), prefix="/p", tls=False)


@given(st.binary(max_size=200))
def test_decode_entry_never_raises(raw: bytes) -> None:
    """
    Any value under backends/ decodes to a backend or a skip reason.
    """
    entry = decode_entry("/p/backends/x", raw, 0, TARGET)
    assert entry is not None
    assert (entry.backend is None) != (entry.skipped is None)


def test_decode_entry_rules() -> None:
    """
    The key gives the id (a different id in the value is refused), JSON
    booleans are flags, a value over the cap or not an object is refused,
    keys outside backends/ and pops/ are ignored, POPs are validated.
    """
    ok = decode_entry("/p/backends/a", json.dumps(row("a", healthy=True)).encode(), 7, TARGET)
    assert ok is not None and ok.backend is not None and ok.backend.healthy and ok.lease == 7
    no_id = {k: v for k, v in row("a").items() if k != "id"}
    entry = decode_entry("/p/backends/b", json.dumps(no_id).encode(), 0, TARGET)
    assert entry is not None and entry.backend is not None and entry.backend.id == "b"
    entry = decode_entry("/p/backends/c", json.dumps(row("a")).encode(), 0, TARGET)
    assert entry is not None and entry.skipped == "id: 'a' does not match its key"
    big = json.dumps(row("d", app="x" * MAX_VALUE_BYTES)).encode()
    entry = decode_entry("/p/backends/d", big, 0, TARGET)
    assert entry is not None and entry.skipped is not None and "more than" in entry.skipped
    entry = decode_entry("/p/backends/e", b"[1, 2]", 0, TARGET)
    assert entry is not None and entry.skipped == "value: a JSON list, not an object"
    entry = decode_entry("/p/backends/f", json.dumps(row("f", port="80")).encode(), 0, TARGET)
    assert entry is not None and entry.skipped is not None and entry.skipped.startswith("port:")
    assert decode_entry("/p/other/x", b"{}", 0, TARGET) is None
    pop = decode_entry("/p/pops/gru", b'{"region": "sa", "address": "192.0.2.1"}', 0, TARGET)
    assert pop is not None and pop.pop is not None and pop.pop.region == "sa"
    bad = decode_entry("/p/pops/x", b'{"region": "sa", "address": "host.example"}', 0, TARGET)
    assert bad is not None and bad.skipped is not None and bad.skipped.startswith("address:")


@given(st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=30))
def test_watch_protocol_splits_messages_anywhere(cuts: List[int]) -> None:
    """
    The stream reader yields the same messages however the stream is cut.
    """
    messages = [{"result": {"n": i, "s": "é" * i}} for i in range(5)]
    stream = b"".join(json.dumps(m).encode() + b"\n" for m in messages)
    got: List[Any] = []
    ended: List[str] = []
    protocol = WatchProtocol(got.append, ended.append)
    position = 0
    for cut in cuts:
        protocol.dataReceived(stream[position : position + cut])
        position += cut
    protocol.dataReceived(stream[position:])
    assert got == messages and ended == []


def test_watch_stream_refuses_what_is_not_a_message() -> None:
    """
    A line of the watch stream that is not JSON, or a message that grows
    past the limit without ending, ends the stream with the reason; the
    messages before it were delivered.
    """
    got: List[Any] = []
    ended: List[str] = []
    protocol = WatchProtocol(got.append, ended.append)
    protocol.dataReceived(b'{"result": {}}\n{not json}\n{"result": {"x": 1}}\n')
    assert got == [{"result": {}}]
    assert len(ended) == 1 and "not JSON" in ended[0]

    got, ended = [], []
    protocol = WatchProtocol(got.append, ended.append)
    chunk = b"x" * (1024 * 1024)
    for _ in range(80):
        protocol.dataReceived(chunk)
        if ended:
            break
    assert got == [] and len(ended) == 1 and "larger than" in ended[0]


def _event(key: str, value: Dict[str, object], revision: int) -> Dict[str, Any]:
    return {
        "kv": {
            "key": etcdkit.b64(key),
            "value": etcdkit.b64(json.dumps(value)),
            "mod_revision": str(revision),
        }
    }


def test_events_are_coalesced_into_one_snapshot() -> None:
    """
    Events arriving within the coalescing delay make one new snapshot (one
    listener call); a revision waiter fires once that snapshot is in force;
    a DELETE event removes the key; a bad value in an event is skipped with
    its key while the rest applies.
    """
    clock = Clock()
    client = etcdkit_client(clock)
    repository = EtcdBackendRepository(client=client, metrics=MetricsStore(), coalesce=0.05)
    calls: List[int] = []
    repository.addListener(lambda old, new: calls.append(len(new)))
    waited: List[bool] = []
    repository.waitFor(500, timeout=5.0).addCallback(waited.append)
    for i in range(500):
        repository.applyEvents([_event(f"/p/backends/b{i}", row(f"b{i}"), i + 1)])
    assert calls == [] and waited == []
    clock.advance(0.05)
    assert calls == [500] and waited == [True] and repository.snapshots == 1
    repository.applyEvents(
        [
            {"type": "DELETE", "kv": {"key": etcdkit.b64("/p/backends/b0"), "mod_revision": "501"}},
            _event("/p/backends/bad", row("bad", port=0), 502),
        ]
    )
    clock.advance(0.05)
    assert calls == [500, 499]
    assert repository.skipped == (("/p/backends/bad", "port: 0 is outside 1-65535"),)
    late: List[bool] = []
    repository.waitFor(10_000, timeout=1.0).addCallback(late.append)
    clock.advance(1.0)
    assert late == [False]


def etcdkit_client(clock: Clock) -> Any:
    from edgeproxy.stores.etcd import EtcdClient

    return EtcdClient(reactor=clock, target=TARGET)


# --- against the cluster ------------------------------------------------------


def test_initial_load(etcd_cluster: EtcdCluster, etcd_prefix: str, tmp_path: Path) -> None:
    """
    open_store reads the whole prefix before the reactor runs: backends,
    POPs, interfaces verified; keys outside the layout are ignored.
    """
    put_backend(etcd_cluster, etcd_prefix, "gru-1")
    put_backend(etcd_cluster, etcd_prefix, "cdg-1", region="eu", country="FR", port=9001)
    etcd_cluster.put(f"{etcd_prefix}/pops/gru", '{"region": "sa", "address": "192.0.2.1"}')
    etcd_cluster.put(f"{etcd_prefix}/something/else", "not json")
    etcd_cluster.put(f"{etcd_prefix}-sibling/backends/zz", json.dumps(row("zz")))
    store = opened(etcd_cluster, etcd_prefix, tmp_path)
    repository = repo(store)
    assert store.kind == "etcd"
    verifyObject(IBackendRepository, repository)
    verifyObject(ILeasedRepository, repository)
    verifyObject(IBackendWriter, store.writer)
    verifyObject(IPopRepository, store.pops)
    assert sorted(repository.current().by_id) == ["cdg-1", "gru-1"]
    assert repository.current().by_id["cdg-1"].country == "FR"
    assert [p.id for p in store.pops.current()] == ["gru"]
    assert repository.lastError is None and repository.lastReloadOk is not None
    assert repository.skipped == ()


def test_bad_values_skipped_with_their_key(
    etcd_cluster: EtcdCluster, etcd_prefix: str, tmp_path: Path, events: List[Dict[str, Any]]
) -> None:
    """
    Malformed JSON, an oversize value, a wrongly typed field, an id that
    does not match the key: each skipped with its key, counted by column,
    logged once; the rest loads.
    """
    p = etcd_prefix
    put_backend(etcd_cluster, p, "good")
    etcd_cluster.put(f"{p}/backends/broken", "{not json")
    etcd_cluster.put(f"{p}/backends/huge", json.dumps(row("huge", app="x" * (70 * 1024))))
    etcd_cluster.put(f"{p}/backends/typed", json.dumps(row("typed", port="9000")))
    etcd_cluster.put(f"{p}/backends/other", json.dumps(row("someone-else")))
    metrics = MetricsStore()
    store = open_store(etcd_cluster.url(p), reactor, metrics, {"db-cache": str(tmp_path / "c.db")})
    repository = repo(store)
    assert list(repository.current().by_id) == ["good"]
    skipped = dict(repository.skipped)
    assert set(skipped) == {f"{p}/backends/{k}" for k in ("broken", "huge", "typed", "other")}
    assert skipped[f"{p}/backends/broken"].startswith("value: not JSON")
    assert skipped[f"{p}/backends/typed"] == "port: str '9000' is not an integer"
    assert metrics.counter("routing_rows_skipped", "value") == 2
    assert metrics.counter("routing_rows_skipped", "port") == 1
    assert metrics.counter("routing_rows_skipped", "id") == 1
    assert metrics.counter("routing_reload", "ok") == 1
    warned = [e for e in events if "Skipping routing table row" in e.get("log_format", "")]
    assert sorted(e["backend_id"] for e in warned) == sorted(skipped)


@pytest_twisted.inlineCallbacks
def test_watch_routes_a_put_within_a_second(
    etcd_cluster: EtcdCluster, etcd_prefix: str, tmp_path: Path, monkeypatch: Any
) -> Any:
    """
    With the watch running, a put is in the repository's snapshot within
    1 s, a delete is gone within 1 s, and a burst of 1,000 puts makes far
    fewer than 1,000 snapshots (built in the thread pool once the table is
    over INLINE_BUILD keys, lowered here to 100); the offline cache follows.
    """
    monkeypatch.setattr(etcd_store, "INLINE_BUILD", 100)
    store = opened(etcd_cluster, etcd_prefix, tmp_path)
    repository = repo(store)
    service = watcher(store)
    service.startService()
    try:
        yield wait_until(reactor, lambda: service.watching, timeout=5.0)
        put_backend(etcd_cluster, etcd_prefix, "new-1")
        yield wait_until(reactor, lambda: "new-1" in repository.current().by_id, timeout=1.0)
        etcd_cluster.delete(f"{etcd_prefix}/backends/new-1")
        yield wait_until(reactor, lambda: "new-1" not in repository.current().by_id, timeout=1.0)

        before = repository.snapshots

        def burst() -> None:
            for i in range(1000):
                put_backend(etcd_cluster, etcd_prefix, f"b-{i:04d}", port=10000 + i)

        yield deferToThread(burst)
        yield wait_until(reactor, lambda: len(repository.current()) == 1000, timeout=10.0)
        made = repository.snapshots - before
        assert 1 <= made < 500, made
        yield service.stopService()
        conn = sqlite3.connect(tmp_path / "cache.db")
        try:
            assert conn.execute("SELECT count(*) FROM backends").fetchone()[0] == 1000
        finally:
            conn.close()
    finally:
        if service.running:
            yield service.stopService()


@pytest_twisted.inlineCallbacks
def test_compaction_resyncs_with_a_full_read(
    etcd_cluster: EtcdCluster, etcd_prefix: str, tmp_path: Path, events: List[Dict[str, Any]]
) -> Any:
    """
    Changes made while the watch was down, then compacted away: the watch
    from the old revision is refused as compacted, and the repository
    resyncs with a full read (deletes included).
    """
    put_backend(etcd_cluster, etcd_prefix, "old")
    store = opened(etcd_cluster, etcd_prefix, tmp_path)
    repository = repo(store)
    put_backend(etcd_cluster, etcd_prefix, "missed")
    etcd_cluster.delete(f"{etcd_prefix}/backends/old")
    etcd_cluster.compact()
    service = watcher(store)
    service.startService()
    try:
        yield wait_until(
            reactor, lambda: list(repository.current().by_id) == ["missed"], timeout=5.0
        )
        assert any("compacted" in str(e.get("reason", "")) for e in events)
        put_backend(etcd_cluster, etcd_prefix, "after")
        yield wait_until(reactor, lambda: "after" in repository.current().by_id, timeout=2.0)
    finally:
        yield service.stopService()


@pytest_twisted.inlineCallbacks
def test_paused_member_fails_over(
    etcd_cluster: EtcdCluster, etcd_prefix: str, tmp_path: Path
) -> Any:
    """
    SIGSTOP of the member the watch is on: the probe times out, the
    repository moves to another member and keeps following the table;
    reload() (the periodic safety net) works meanwhile too.
    """
    store = opened(etcd_cluster, etcd_prefix, tmp_path)
    repository = repo(store)
    service = watcher(store)
    service.startService()
    try:
        yield wait_until(reactor, lambda: service.watching, timeout=5.0)
        paused = repository.client.index
        etcd_cluster.pause(paused)
        try:
            yield deferToThread(put_backend, etcd_cluster, etcd_prefix, "during-pause")
            yield wait_until(
                reactor, lambda: "during-pause" in repository.current().by_id, timeout=15.0
            )
            assert repository.client.index != paused
            yield deferToThread(put_backend, etcd_cluster, etcd_prefix, "by-reload")
            snapshot = yield repository.reload()
            assert "by-reload" in snapshot.by_id
        finally:
            etcd_cluster.resume(paused)
        yield deferToThread(put_backend, etcd_cluster, etcd_prefix, "after-resume")
        yield wait_until(reactor, lambda: "after-resume" in repository.current().by_id, timeout=5.0)
    finally:
        yield service.stopService()


@pytest_twisted.inlineCallbacks
def test_watch_follows_its_own_member_after_the_client_moved_on(
    etcd_cluster: EtcdCluster, etcd_prefix: str, tmp_path: Path
) -> Any:
    """
    The client moved to another member by some other request (a failed
    reload or heartbeat) while the watch stays on its member: when that
    member is then paused, the probe of the watched member (not of the
    client's current one) notices, and the watch moves; changes keep
    arriving without any reload.
    """
    store = opened(etcd_cluster, etcd_prefix, tmp_path)
    repository = repo(store)
    service = watcher(store)
    service.startService()
    try:
        yield wait_until(reactor, lambda: service.watching, timeout=5.0)
        watched = repository.client.index
        repository.client.rotate("moved on by another request")
        assert repository.client.index != watched
        etcd_cluster.pause(watched)
        try:
            yield deferToThread(put_backend, etcd_cluster, etcd_prefix, "while-paused")
            yield wait_until(
                reactor, lambda: "while-paused" in repository.current().by_id, timeout=15.0
            )
        finally:
            etcd_cluster.resume(watched)
    finally:
        yield service.stopService()


@pytest_twisted.inlineCallbacks
def test_lease_expiry_removes_a_registered_backend(
    etcd_cluster: EtcdCluster, etcd_prefix: str, tmp_path: Path
) -> Any:
    """
    A registration is a leased key; heartbeats keep the lease alive; once
    they stop, etcd deletes the key and the backend leaves the table.  A
    POP that heard no heartbeat never expires it by its stored time (the
    lease is its heartbeat); deregistering revokes the lease.
    """
    store = opened(etcd_cluster, etcd_prefix, tmp_path, **{"heartbeat-ttl": 2.0})
    repository = repo(store)
    writer = store.writer
    assert isinstance(writer, EtcdBackendWriter)
    service = watcher(store)
    service.startService()
    try:
        written = yield writer.register(row("leased"))
        assert written.id == "leased" and written.heartbeat_at is not None
        assert "leased" in repository.current().by_id and repository.leased("leased")
        lease = repository.leases["leased"]
        assert etcd_cluster.lease_ttl(lease) > 0
        clock = Clock()
        clock.advance(written.heartbeat_at + 3600)
        expiry = HeartbeatExpiry(repository, StateOverlay(), clock, ttl=2.0)
        expiry.check()
        assert expiry.expired == frozenset()
        for _ in range(3):
            alive = yield writer.heartbeat("leased")
            assert alive is True
            yield sleep(reactor, 0.8)
        assert (yield writer.heartbeat("nobody")) is False
        yield wait_until(reactor, lambda: "leased" not in repository.current().by_id, timeout=6.0)
        assert (yield writer.heartbeat("leased")) is False

        yield writer.register(row("second"))
        assert "second" in repository.current().by_id
        gone = yield writer.deregister("second")
        assert gone is True and "second" not in repository.current().by_id
        assert etcd_cluster.get(f"{etcd_prefix}/backends/second") is None
        put_backend(etcd_cluster, etcd_prefix, "by-hand")
        yield wait_until(reactor, lambda: "by-hand" in repository.current().by_id, timeout=2.0)
        assert (yield writer.deregister("by-hand")) is False
        assert (yield writer.heartbeat("by-hand")) is False
    finally:
        yield service.stopService()


@pytest_twisted.inlineCallbacks
def test_registration_api_writes_to_etcd(
    etcd_cluster: EtcdCluster, etcd_prefix: str, tmp_path: Path
) -> Any:
    """
    The whole proxy built by makeService on --db etcd://, with an admin
    listener and a token: register, heartbeat and deregister through the
    HTTP API write to etcd (a leased key), and a second repository on the
    same cluster (another POP) sees the registration.
    """
    from edgeproxy.tap import Options, makeService

    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    admin = free_port()
    options = Options()
    options.parseOptions(
        [
            f"--db={etcd_cluster.url(etcd_prefix)}",
            f"--db-cache={tmp_path / 'cache.db'}",
            f"--state-file={tmp_path / 'state.json'}",
            "--listen=tcp:0:interface=127.0.0.1",
            f"--admin=tcp:{admin}:interface=127.0.0.1",
            f"--api-token-file={tokens}",
            "--geoip-db=none",
            "--heartbeat-ttl=5",
        ]
    )
    service = makeService(options, reactor=reactor, environ={})
    other = opened(
        etcd_cluster, etcd_prefix, tmp_path / "..", **{"db-cache": str(tmp_path / "o.db")}
    )
    other_watch = watcher(other)
    service.startService()
    other_watch.startService()
    pool = HTTPConnectionPool(reactor, persistent=False)
    http = HTTPClient(Agent(reactor, pool=pool))

    @inlineCallbacks
    def call(method: str, path: str, payload: Any = None) -> Any:
        headers = Headers({b"authorization": [b"Bearer " + TOKEN.encode()]})
        data = None
        if payload is not None:
            data = json.dumps(payload).encode()
            headers.setRawHeaders(b"content-type", [b"application/json"])
        response = yield http.request(
            method, f"http://127.0.0.1:{admin}{path}", headers=headers, data=data
        )
        content = yield response.content()
        return response.code, json.loads(content) if content else None

    try:
        registration = {
            "id": "api-1",
            "app": "web",
            "region": "sa",
            "country": "BR",
            "ip": "127.0.0.1",
            "port": 9555,
        }
        code, answer = yield call("POST", "/api/v1/register", registration)
        assert code == 201, answer
        assert answer["registered"] is True
        stored = json.loads(etcd_cluster.get(f"{etcd_prefix}/backends/api-1") or "{}")
        assert stored["port"] == 9555 and stored["wg_ip"] == "127.0.0.1"
        yield wait_until(reactor, lambda: "api-1" in other.repository.current().by_id, timeout=1.0)
        code, answer = yield call("POST", "/api/v1/heartbeat/api-1")
        assert code == 200 and answer["persisted"] is True, answer
        code, answer = yield call("DELETE", "/api/v1/backends/api-1")
        assert code == 200 and answer["deregistered"] is True, answer
        assert etcd_cluster.get(f"{etcd_prefix}/backends/api-1") is None
        yield wait_until(
            reactor, lambda: "api-1" not in other.repository.current().by_id, timeout=1.0
        )
    finally:
        yield pool.closeCachedConnections()
        yield other_watch.stopService()
        yield service.stopService()


def test_user_password_auth(tmp_path: Path) -> None:
    """
    On a cluster with authentication on: the right user and password read
    the table; a wrong password or no credentials at all is a clear
    startup error (no password in it); the offline cache is not used for
    a refused login.
    """
    cluster = EtcdCluster.start_new(size=1)
    try:
        secret = "s3cret-pass"
        cluster.put("/auth/backends/a", json.dumps(row("a")))
        cluster.enable_auth(secret, user="edgeproxy", prefix="/auth")
        good = tmp_path / "good"
        good.write_text(secret + "\n")
        bad = tmp_path / "bad"
        bad.write_text("wrong-password\n")
        base = {"db-cache": str(tmp_path / "cache.db")}
        store = open_store(
            cluster.url("/auth"),
            reactor,
            MetricsStore(),
            {**base, "etcd-user": "edgeproxy", "etcd-password-file": str(good)},
        )
        assert list(store.repository.current().by_id) == ["a"]
        with pytest.raises(StoreError) as caught:
            open_store(
                cluster.url("/auth"),
                reactor,
                MetricsStore(),
                {**base, "etcd-user": "edgeproxy", "etcd-password-file": str(bad)},
            )
        message = str(caught.value)
        assert "authentication failed" in message and "--etcd-password-file" in message
        assert "wrong-password" not in message
        with pytest.raises(StoreError) as caught:
            open_store(cluster.url("/auth"), reactor, MetricsStore(), base)
        assert "--etcd-user" in str(caught.value)
        with pytest.raises(StoreError) as caught:
            open_store(
                cluster.url("/elsewhere"),
                reactor,
                MetricsStore(),
                {**base, "etcd-user": "edgeproxy", "etcd-password-file": str(good)},
            )
        assert "permission denied" in str(caught.value)
    finally:
        cluster.destroy()


@pytest_twisted.inlineCallbacks
def test_offline_cache_start(
    etcd_cluster: EtcdCluster,
    etcd_prefix: str,
    tmp_path: Path,
    events: List[Dict[str, Any]],
) -> Any:
    """
    The cache is written after each change; a POP started while no member
    answers starts from it (and says so), with its leases; without a cache
    that is a clear fatal error.  Once a member answers the table follows
    etcd again.
    """
    cache = tmp_path / "cache.db"
    store = opened(etcd_cluster, etcd_prefix, tmp_path)
    service = watcher(store)
    service.startService()
    writer = store.writer
    try:
        yield writer.register(row("cached-leased"))
        put_backend(etcd_cluster, etcd_prefix, "cached")
        yield wait_until(reactor, lambda: len(store.repository.current()) == 2, timeout=2.0)
    finally:
        yield service.stopService()
    assert cache.exists() and oct(os.stat(cache).st_mode & 0o777) == "0o600"

    dead = f"etcd://127.0.0.1:{free_port()},127.0.0.1:{free_port()}/{etcd_prefix.lstrip('/')}"
    offline = open_store(dead, reactor, MetricsStore(), {"db-cache": str(cache)})
    repository = repo(offline)
    assert sorted(repository.current().by_id) == ["cached", "cached-leased"]
    assert repository.fromCache and repository.leased("cached-leased")
    assert repository.lastError is not None and "no etcd member answers" in repository.lastError
    assert any("starting from the offline cache" in e.get("log_format", "") for e in events)

    with pytest.raises(StoreError) as caught:
        open_store(dead, reactor, MetricsStore(), {"db-cache": str(tmp_path / "none.db")})
    assert "no offline cache" in str(caught.value)

    # A cache start against the real cluster catches up when it answers.
    etcd_cluster.delete(f"{etcd_prefix}/backends/cached")
    resumed = EtcdBackendRepository(
        client=type(repository.client)(
            reactor=reactor, target=parse_etcd_url(etcd_cluster.url(etcd_prefix))
        ),
        metrics=MetricsStore(),
    )
    resumed.loadFromCache(str(cache), "test: starting offline")
    later = EtcdWatchService(resumed)
    later.startService()
    try:
        yield wait_until(
            reactor, lambda: list(resumed.current().by_id) == ["cached-leased"], timeout=5.0
        )
        assert resumed.lastError is None and not resumed.fromCache
    finally:
        yield later.stopService()


def _unrelated_ca() -> bytes:
    """
    A self-signed CA certificate (PEM) of another name, signing nothing.
    """
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "unrelated test CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest_twisted.inlineCallbacks
def test_tls_client_certificates(tmp_path: Path) -> Any:
    """
    etcds:// on a member that requires client certificates: with the CA
    (in a bundle behind another CA), the certificate and the key, the
    first read (stdlib) and the watch (treq on the reactor) both work;
    without the client certificate, or with another CA, startup fails
    with a TLS reason (not the offline cache: it is a set-up error, not
    an unreachable etcd).
    """
    cluster = EtcdCluster.start_new(size=1, tls=True)
    try:
        assert cluster.tls is not None
        files = cluster.tls
        cluster.put("/tls/backends/a", json.dumps(row("a")))
        url = cluster.url("/tls", scheme="etcds")
        other = etcdkit.make_tls_files(str(tmp_path / "other"))
        # A bundle whose first certificate is another CA: every one counts,
        # on the reactor as at startup.
        bundle = tmp_path / "bundle.pem"
        bundle.write_bytes(_unrelated_ca() + Path(files.ca).read_bytes())
        options = {
            "db-cache": str(tmp_path / "cache.db"),
            "etcd-ca": str(bundle),
            "etcd-cert": files.client_cert,
            "etcd-key": files.client_key,
        }
        store = open_store(url, reactor, MetricsStore(), options)
        repository = repo(store)
        assert list(repository.current().by_id) == ["a"]
        service = watcher(store)
        service.startService()
        try:
            yield wait_until(reactor, lambda: service.watching, timeout=5.0)
            cluster.put("/tls/backends/b", json.dumps(row("b")))
            yield wait_until(reactor, lambda: "b" in repository.current().by_id, timeout=2.0)
            snapshot = yield repository.reload()
            assert sorted(snapshot.by_id) == ["a", "b"] and repository.lastError is None
        finally:
            yield service.stopService()
        without = {k: v for k, v in options.items() if k not in ("etcd-cert", "etcd-key")}
        with pytest.raises(StoreError, match="TLS with etcd member"):
            open_store(url, reactor, MetricsStore(), without)
        with pytest.raises(StoreError, match="certificate verify failed"):
            open_store(url, reactor, MetricsStore(), {**options, "etcd-ca": other.ca})
        with pytest.raises(StoreError, match="etcds://"):
            open_store(cluster.url("/tls"), reactor, MetricsStore(), options)
    finally:
        cluster.destroy()


def test_a_refused_client_certificate_is_always_a_tls_error(tmp_path: Path) -> None:
    """
    Without the client certificate a member that requires one refuses with
    an alert after the TLS 1.3 handshake, racing the request (which may
    fail with the alert, a broken pipe or a reset): every try of twenty is
    a TLS error, never a member that does not answer.
    """
    cluster = EtcdCluster.start_new(size=1, tls=True)
    try:
        assert cluster.tls is not None
        url = cluster.url("/race", scheme="etcds")
        options = {"db-cache": str(tmp_path / "cache.db"), "etcd-ca": cluster.tls.ca}
        for _ in range(20):
            with pytest.raises(StoreError, match="TLS with etcd member"):
                open_store(url, reactor, MetricsStore(), options)
    finally:
        cluster.destroy()


@pytest_twisted.inlineCallbacks
def test_expired_auth_token_is_renewed(tmp_path: Path) -> Any:
    """
    etcd forgets an idle simple token after --auth-token-ttl: the next
    read gets "invalid auth token", authenticates again and succeeds (no
    reload failure).  With the password changed meanwhile, the reload
    fails with a logged reason and the last good table stays.
    """
    cluster = EtcdCluster.start_new(size=1, extra_args=["--auth-token-ttl", "1"])
    try:
        secret = "token-ttl-pass"
        cluster.put("/ttl/backends/a", json.dumps(row("a")))
        cluster.enable_auth(secret, user="edgeproxy", prefix="/ttl")
        password = tmp_path / "password"
        password.write_text(secret)
        metrics = MetricsStore()
        store = open_store(
            cluster.url("/ttl"),
            reactor,
            metrics,
            {
                "db-cache": str(tmp_path / "cache.db"),
                "etcd-user": "edgeproxy",
                "etcd-password-file": str(password),
            },
        )
        repository = repo(store)
        first = repository.client.token
        assert first
        yield sleep(reactor, 2.5)
        cluster.token = cluster.authenticate("root", secret)
        cluster.put("/ttl/backends/b", json.dumps(row("b")))
        snapshot = yield repository.reload()
        assert sorted(snapshot.by_id) == ["a", "b"]
        assert repository.lastError is None and repository.client.token != first
        cluster.request("/v3/auth/user/changepw", {"name": "edgeproxy", "password": "changed-pass"})
        repository.client.token = None
        snapshot = yield repository.reload()
        assert sorted(snapshot.by_id) == ["a", "b"]
        assert repository.lastError is not None
        assert "authentication failed" in repository.lastError
        assert metrics.counter("routing_reload", "error") == 1
        yield repository.client.close()
    finally:
        cluster.destroy()


@pytest_twisted.inlineCallbacks
def test_whole_cluster_down_keeps_the_last_good_table(
    etcd_cluster: EtcdCluster,
    etcd_prefix: str,
    tmp_path: Path,
    events: List[Dict[str, Any]],
) -> Any:
    """
    Every member stopped: reloads keep the last good table, set lastError,
    count routing_reload errors and log the failure once (not once per
    retry or per member); once the members are back, the watch resyncs by
    itself, the recovery is logged and new puts are routed again.
    """
    put_backend(etcd_cluster, etcd_prefix, "kept")
    metrics = MetricsStore()
    store = open_store(
        etcd_cluster.url(etcd_prefix), reactor, metrics, {"db-cache": str(tmp_path / "c.db")}
    )
    repository = repo(store)
    service = watcher(store)
    service.startService()
    try:
        yield wait_until(reactor, lambda: service.watching, timeout=5.0)
        yield deferToThread(etcd_cluster.stop_all)
        for _ in range(2):
            snapshot = yield repository.reload()
            assert list(snapshot.by_id) == ["kept"]
        assert repository.lastError is not None and "does not answer" in repository.lastError
        assert metrics.counter("routing_reload", "error") >= 2
        failed = [e for e in events if "read from etcd failed" in e.get("log_format", "")]
        assert len(failed) == 1, failed
        yield deferToThread(etcd_cluster.heal)
        yield deferToThread(put_backend, etcd_cluster, etcd_prefix, "back")
        yield wait_until(reactor, lambda: "back" in repository.current().by_id, timeout=10.0)
        assert repository.lastError is None
        assert any("read from etcd again" in e.get("log_format", "") for e in events)
    finally:
        yield service.stopService()


def test_offline_cache_keeps_every_column(tmp_path: Path) -> None:
    """
    The offline cache written from a table and read back gives the same
    backends, every optional column included (an SNI passthrough name
    list, a health check, PROXY out, a lease), so a POP started from it
    routes as it did on etcd.
    """
    from edgeproxy.model import Backend, RoutingSnapshot
    from edgeproxy.stores.etcd import read_cache, write_cache

    backends = [
        Backend(
            id="web-1",
            app="web",
            region="eu",
            country="FR",
            host="10.0.0.1",
            port=443,
            weight=2,
            soft_limit=10,
            hard_limit=20,
            proxy_protocol=2,
            health_check="http:/ready",
            sni=("www.example.com", "*.example.org"),
        ),
        Backend(id="db-1", app=None, region="sa", country=None, host="db.internal", port=5432),
    ]
    path = str(tmp_path / "cache.db")
    write_cache(path, RoutingSnapshot.build(backends), (), {"web-1": 77}, "etcd://x/p", 5)
    snapshot, skipped, pops, leases, written = read_cache(path)
    assert pops == ()
    assert skipped == ()
    assert {b.id: b for b in snapshot.backends} == {b.id: b for b in backends}
    assert leases == {"web-1": 77}
    assert written > 0


def test_a_member_that_is_not_etcd_is_a_clear_startup_error(tmp_path: Path) -> None:
    """
    A --db member that answers HTTP but is not etcd (a proxy, another
    service on the port) gives an authentication answer that is not etcd's:
    startup fails with a StoreError naming it, not a traceback.
    """
    import http.server
    import threading

    class NotEtcd(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            body = b"<html>hello</html>"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotEtcd)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    password = tmp_path / "password"
    password.write_text("secret")
    try:
        with pytest.raises(StoreError, match="not etcd's"):
            open_store(
                f"etcd://127.0.0.1:{server.server_address[1]}/edgeproxy",
                reactor,
                MetricsStore(),
                {
                    "db-cache": str(tmp_path / "cache.db"),
                    "etcd-user": "edgeproxy",
                    "etcd-password-file": str(password),
                },
            )
    finally:
        server.shutdown()
        server.server_close()
