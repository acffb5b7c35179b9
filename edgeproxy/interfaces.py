"""
The ports of edgeproxy's hexagon.

The domain (L{edgeproxy.routing}) and the proxy
protocols talk only to these interfaces; adapters at the edges (SQLite,
MaxMind, in-memory tables, later PostgreSQL and replication) implement them.
Every adapter is declared with C{@implementer} and checked with
C{verifyObject} in the tests; L{edgeproxy.testing} has an in-memory
implementation of each for other projects' tests.

Methods return a L{Deferred} only when they may do I/O.
"""

from __future__ import annotations

from typing import (
    TYPE_CHECKING,
    AbstractSet,
    Callable,
    FrozenSet,
    Iterable,
    Mapping,
    Optional,
    Tuple,
)

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from edgeproxy.model import Backend, Binding, BindingKey, GeoInfo, RoutingSnapshot


SnapshotListener = Callable[["RoutingSnapshot", "RoutingSnapshot"], None]
"""Called with (old, new) whenever a reload changes the routing table."""


class IBackendRepository(Interface):
    """
    Where the routing table comes from (SQLite, PostgreSQL, replication...).

    The repository always holds a current L{RoutingSnapshot}; reads are
    synchronous and cheap, because they happen on every new connection.
    """

    def current() -> "RoutingSnapshot":
        """
        The routing snapshot in force now.  Never blocks, never fails.
        """

    def reload() -> "Deferred[RoutingSnapshot]":
        """
        Read the table again off the reactor thread.

        On success the new snapshot replaces the current one (and listeners
        are told if the content changed).  On failure the last good snapshot
        stays in force; the returned L{Deferred} still fires with the
        snapshot in force, never with a failure, so that a periodic job that
        calls this can never die.
        """

    def addListener(listener: SnapshotListener) -> None:
        """
        Call C{listener(old, new)} after every reload that changes content.
        """


class ILeasedRepository(Interface):
    """
    A repository whose store expires registered backends itself (etcd: a
    registration is a key with a lease, deleted when the lease runs out).
    Heartbeat expiry (L{edgeproxy.routing.heartbeats}) leaves its leased
    backends alone: a POP that does not hear a backend's heartbeats (they
    went to another POP) must not expire it by its stored C{heartbeat_at}.
    """

    def leased(backend_id: str) -> bool:
        """
        Whether C{backend_id}'s row is held by a lease in the table in
        force.
        """


class DuplicateBackendError(Exception):
    """
    L{IBackendWriter.register}: the table already has a row with this id.

    @ivar backend_id: The id.
    """

    def __init__(self, backend_id: str) -> None:
        self.backend_id = backend_id
        super().__init__(f"a backend with id {backend_id!r} already exists")


class BackendWriteError(Exception):
    """
    An L{IBackendWriter} could not write (the store is unreachable, locked
    past its timeout, read-only...); nothing was written.  The message says
    why, for the operator.
    """


class IBackendWriter(Interface):
    """
    The write side of the routing table, for the registration API: backends
    register themselves, send heartbeats and deregister.  (SQLite now; the
    PostgreSQL and etcd adapters implement the same port.)

    Rows written here are I{registered} rows: they carry a heartbeat time
    (L{Backend.heartbeat_at}) and stop taking new clients once it is older
    than the heartbeat TTL (see L{edgeproxy.routing.heartbeats}).  Rows the
    operator wrote by hand have none; this port never changes or deletes
    them.

    Every method writes in one transaction, off the reactor thread; on any
    failure nothing is written.
    """

    def register(fields: Mapping[str, object]) -> "Deferred[Backend]":
        """
        Insert a new registered row.

        @param fields: The row, column name -> value, as
            L{edgeproxy.stores.sqlite.validate_row} reads it (C{wg_ip} for
            the address); the heartbeat time is set by the writer (now).
        @return: Fires with the L{Backend} once the routing table in force
            on this POP has it (routable at once, with no wait for the next
            poll); fails with L{edgeproxy.stores.sqlite.InvalidRowError}
            (an invalid row), L{DuplicateBackendError} (the id exists) or
            L{BackendWriteError}.
        """

    def heartbeat(backend_id: str) -> "Deferred[bool]":
        """
        Set the heartbeat time of a registered row to now.

        @return: Fires with C{True}, or C{False} when there is no such row
            or the row was written by hand (it has no heartbeat); fails with
            L{BackendWriteError}.
        """

    def deregister(backend_id: str) -> "Deferred[bool]":
        """
        Delete a registered row.  Rows written by hand are never deleted
        here (the operator owns them: remove them from the table, or set
        their admin state to C{maint}).

        @return: Fires with C{True} once the routing table in force no
            longer has it, or C{False} when there is no such row or it was
            written by hand; fails with L{BackendWriteError}.
        """


class IBindingRepository(Interface):
    """
    Client affinity: (client IP, app) -> backend id, with a sliding TTL.
    """

    ttl = Attribute("Sliding time-to-live of a binding, in seconds (float).")

    def lookup(key: "BindingKey", now: float) -> Optional["Binding"]:
        """
        The live binding for C{key}, refreshed to C{now}, or C{None}.

        An expired binding is removed and never returned.
        """

    def bind(key: "BindingKey", backend_id: str, now: float) -> "Binding":
        """
        Get-or-create: return the live binding for C{key} if there is one
        (refreshed), else create one to C{backend_id}.  When the table is
        full the least recently used binding is evicted.
        """

    def remove(key: "BindingKey") -> None:
        """
        Forget the binding for C{key}, if any.
        """

    def removeBackend(backend_id: str) -> int:
        """
        Forget every binding to C{backend_id}; return how many went.
        """

    def removeBackends(backend_ids: AbstractSet[str]) -> Mapping[str, int]:
        """
        Forget every binding to any of C{backend_ids} in one pass; return
        how many went per backend id (ids with none are left out).
        """

    def keysFor(backend_id: str) -> FrozenSet["BindingKey"]:
        """
        The keys of every binding to C{backend_id} (live or not yet
        collected), at a cost proportional to how many there are.
        """

    def collect(now: float) -> int:
        """
        Free expired bindings; return how many were freed.
        """

    def __len__() -> int:
        """
        Number of bindings held (live or not yet collected).
        """


class IGeoResolver(Interface):
    """
    Where a client is.
    """

    def resolve(ip: str) -> Optional["GeoInfo"]:
        """
        Locate C{ip} (text form, IPv4 or IPv6).  Never raises and never does
        network I/O; returns C{None} when the address has no geo (unknown,
        loopback or private without an override, unparsable).
        """


class IMetricsStore(Interface):
    """
    The proxy's counters (connections accepted, closed by cause, refusals
    by reason...), each keyed by a name and an optional label.
    """

    def increment(name: str, label: str = "", amount: int = 1) -> None:
        """
        Add C{amount} to the counter C{name} (with an optional label value,
        e.g. the reason a connection ended).
        """

    def observe(name: str, value: float) -> None:
        """
        Count C{value} (e.g. a connect latency in seconds) in the histogram
        C{name}, whose buckets are fixed by the store.  Cheap enough for
        every connection: no allocation beyond the running sum.
        """

    def counter(name: str, label: str = "") -> int:
        """
        Current value of a counter (0 if never incremented).
        """

    def counters() -> Mapping[tuple[str, str], int]:
        """
        A copy of every counter, keyed by (name, label).
        """


class ILoadCounter(Interface):
    """
    Per-backend load: open connections plus connects in flight.

    The counts are read on every routing decision (for the soft-limit
    term of the score), so C{connections} is a live mapping.  Taking a
    slot is one atomic step that respects the backend's hard limit, so
    that several workers sharing one counter table can never, between
    them, exceed it.
    """

    connections = Attribute(
        "Live Mapping[str, int]: backend id -> current connections "
        "(open plus connecting).  Missing ids count as 0.  May be slightly "
        "stale when shared between processes; acquire() never is."
    )

    def acquire(backend: "Backend") -> bool:
        """
        Count one more connection to C{backend} if it is below its hard
        limit (C{hard_limit <= 0}: no limit), in one atomic step.

        @return: C{True} if the slot was taken (the caller must call
            L{release} exactly once later), C{False} if the backend is full.
        """

    def release(backend_id: str) -> None:
        """
        Give back a slot taken by L{acquire}.
        """


#: Verdicts of the state overlay, from best to worst (see L{IStateOverlay}).
AVAILABLE = 0
NO_NEW_CLIENTS = 1
UNAVAILABLE = 2

StateListener = Callable[[str, int, int], None]
"""Called with (backend id, old verdict, new verdict) when a backend's
effective verdict in the state overlay changes."""


class IStateOverlay(Interface):
    """
    The proxy's own word on each backend, on top of the routing table
    (SPEC section 9, decided): health checks, the circuit breaker and the
    operator's admin state each give a verdict per backend, and the worst
    one is in force.  A backend takes a new client only when both the table
    and the overlay allow it.  Changing a verdict never rebuilds the routing
    snapshot.

    Verdicts: L{AVAILABLE}; L{NO_NEW_CLIENTS} (drain: clients bound to it
    may still reach it, new ones may not); L{UNAVAILABLE} (no connection at
    all: down, breaker open, maintenance).
    """

    closedToNew = Attribute(
        "AbstractSet[str]: ids whose verdict is NO_NEW_CLIENTS or worse "
        "(read on every routing decision; never mutated in place by readers)."
    )
    unavailable = Attribute("AbstractSet[str]: ids whose verdict is UNAVAILABLE.")

    def setVerdict(backend_id: str, source: str, verdict: int) -> None:
        """
        Record C{source}'s verdict on C{backend_id} (C{AVAILABLE} clears it);
        listeners are told when the effective verdict changes.
        """

    def verdict(backend_id: str) -> int:
        """
        The effective (worst) verdict on C{backend_id}.
        """

    def sources(backend_id: str) -> Mapping[str, int]:
        """
        Every source's verdict on C{backend_id} other than AVAILABLE.
        """

    def forget(backend_ids: AbstractSet[str], sources: AbstractSet[str]) -> None:
        """
        Drop the verdicts of C{sources} on C{backend_ids} (backends that left
        the table); listeners are told of effective changes.
        """

    def closedToNewIgnoring(sources: AbstractSet[str]) -> AbstractSet[str]:
        """
        The ids that would be closed to new clients if C{sources}' verdicts
        did not count (e.g. the operator's drain and maint alone, health and
        breaker aside).
        """

    def addListener(listener: StateListener) -> None:
        """
        Call C{listener(backend_id, old, new)} after every change of a
        backend's effective verdict.
        """


class IRouter(Interface):
    """
    The routing decision as the proxy sees it: bindings, geo, selection and
    load accounting in one synchronous call per connect attempt.
    """

    lastTier = Attribute(
        "The geo tier (0-3) of the backend the last choose() returned, or None "
        "(read by the session right after choose(), for its access-log record)."
    )

    def choose(client_ip: str, app: Optional[str], exclude: FrozenSet[str]) -> Optional["Backend"]:
        """
        Pick the backend for a new connect attempt from C{client_ip} on a
        listener bound to C{app} (C{None}: every app), skipping the ids in
        C{exclude} (attempts that already failed).  The chosen backend counts
        one more connection from this moment; the caller must call
        L{release} exactly once for every backend returned.  Binds the
        client.  Returns C{None} when there is no candidate.
        """

    def release(backend_id: str) -> None:
        """
        The connection (or attempt) to C{backend_id} is over.
        """

    def connectFailed(client_ip: str, app: Optional[str], backend_id: str) -> None:
        """
        A connect to C{backend_id} failed: clear the client's binding to it
        (and tell the circuit breaker, if there is one).
        """

    def connectSucceeded(backend_id: str) -> None:
        """
        A connect to C{backend_id} succeeded (for the circuit breaker).
        """


class IHostResolver(Interface):
    """
    Backend hosts (the C{wg_ip} column) -> addresses to connect to, resolved
    ahead of the connect path.

    A host is an IP literal (IPv4 or IPv6, no brackets), which stands for
    itself, or a host name, which is resolved in the background and cached.
    The connect path only ever asks L{addresses}, a dictionary lookup; DNS
    happens off the reactor thread, when the routing table names a host, and
    again when its cached addresses are older than a TTL.
    """

    def addresses(host: str) -> Optional[Tuple[str, ...]]:
        """
        The addresses to try for C{host}, best first; synchronous and cheap
        (called for every connect attempt), never raises, never blocks.

        An IP literal gives C{(host,)}.  A host name gives its cached
        addresses (IPv6 and IPv4 in the system resolver's order, no
        duplicates), or C{None} if it has never been resolved successfully;
        in that case a background resolution is started unless one is
        already in flight or the last attempt failed too recently.
        """

    def resolve(hosts: Iterable[str]) -> "Deferred[None]":
        """
        Resolve the host names among C{hosts} now, off the reactor thread
        (one lookup in flight per name at most: a name already being
        resolved is not resolved twice), and keep them.  Fires with C{None}
        once every one of them is done; never fails (failures are logged and
        the last good addresses stay).
        """

    def refresh() -> None:
        """
        Start a background resolution of every kept name whose addresses are
        older than the TTL (or whose last attempt failed and is due again).
        The periodic job: only starts work, returns at once, never raises.
        """

    def watch(hosts: Iterable[str]) -> None:
        """
        Keep exactly C{hosts}: start resolving the host names among them that
        are not kept yet, and forget every kept host not among them.  Only
        starts background work.
        """

    def routingTableChanged(old: "RoutingSnapshot", new: "RoutingSnapshot") -> None:
        """
        A L{SnapshotListener}: L{watch} the hosts of every backend of C{new}
        that is not deleted.  Only starts background work; never raises.
        """

    def stats() -> Mapping[str, int]:
        """
        Counts for metrics: at least C{hosts} (kept), C{resolved} (names
        with addresses), C{unresolved} (names without), C{failing} (names
        whose last lookup failed), C{in_flight}, C{lookups} and
        C{lookup_failures} (since start).
        """

    def __len__() -> int:
        """
        Number of hosts kept (IP literals and names).
        """
