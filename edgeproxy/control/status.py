"""
The live status page of the admin listener (HAProxy's stats page is the
model): C{GET /} is one self-contained HTML page, C{GET /api/v1/status} the
JSON it renders, polled every 2 s.

The page shows every backend of the routing table with its region,
country, address, overall status, health check, circuit breaker, admin
state, load against its soft and hard limits, and connect RTT with the RTT
term it adds to its score inside its geo tier (C{--rtt-weight}); the connections open
against the cap, the bindings held, the routing table's age and reload
status, the GeoIP database's build date and age (flagged when stale), and
the geo mix of recent routing decisions (geo tiers as shares, top
countries) over the last 5 minutes.  It updates itself with C{fetch()}
and never reloads; a failed poll shows a banner and the last data stays.

The page is built to be safe to open anywhere:

  - No external asset: the CSS and the script are inline, allowed by their
    SHA-256 in a C{Content-Security-Policy} that allows nothing else
    (C{default-src 'none'}; C{connect-src 'self'} for the polls).
  - The script inserts every value with C{textContent} or
    C{setAttribute}, never as HTML, so a backend id such as
    C{<img onerror=...>} is shown as text.
  - C{X-Content-Type-Options: nosniff}, C{X-Frame-Options: DENY},
    C{Referrer-Policy: no-referrer}; the JSON is C{no-store}.
  - Where the admin listener wants a bearer token for reads, open the page
    as C{/#token=TOKEN}: the script keeps the token in the tab's session
    storage, sends it as C{Authorization: Bearer} with each poll and drops
    it from the address bar (a fragment never reaches the server or a log).

The data (L{StatusData}) comes from duck-typed parts, each optional (a part
not given leaves its fields C{null}); it is assembled on the reactor
thread, where the parts live, at most once per C{maxAge} seconds however
many pages poll (L{StatusJSONResource}).  The geo mix is the difference
between the counters now and a small ring of their earlier values
(L{RecentCounters}, one sample per 10 s over 5 minutes: bounded memory).

Wiring (the admin site's root is an L{edgeproxy.control.admin.AdminRoot})::

    status = StatusData(
        repository=repository, load=load, overlay=overlay, checker=checker,
        breaker=breaker, admin=admin_states, bindings=bindings,
        admission=admission, metrics=metrics, region=options["region"],
        clock=reactor.seconds,
    )
    repository.addListener(status.routingTableChanged)
    TimerService(SAMPLE_INTERVAL, status.sample).setServiceParent(top)
    mount_status(site.resource, status)
"""

from __future__ import annotations

import base64
import hashlib
import html
import math
import time
from collections import deque
from typing import (
    Any,
    Callable,
    Deque,
    Dict,
    Iterable,
    List,
    Mapping,
    Optional,
    Protocol,
    Sized,
    Tuple,
)

from twisted.logger import Logger
from twisted.web.resource import Resource

from edgeproxy import __version__
from edgeproxy.control.admin import JSONResource, json_body, json_error
from edgeproxy.interfaces import AVAILABLE, NO_NEW_CLIENTS, UNAVAILABLE, IStateOverlay
from edgeproxy.model import Backend, RoutingSnapshot
from edgeproxy.routing.router import COUNTRIES, DECISIONS
from edgeproxy.routing.selection import in_tier, rtt_ms

__all__ = [
    "CLOSED",
    "MAX_BACKENDS",
    "SAMPLE_INTERVAL",
    "STATUSES",
    "STATUS_PATH",
    "TIER_NAMES",
    "WINDOW",
    "RecentCounters",
    "StatusData",
    "StatusJSONResource",
    "StatusResource",
    "mount_status",
    "status_page",
]

_log = Logger()

#: Where the page finds its JSON, by default.
STATUS_PATH = "/api/v1/status"

#: Seconds between two samples of the counters (L{RecentCounters}).
SAMPLE_INTERVAL = 10.0

#: Seconds of the "recent" geo mix.
WINDOW = 300.0

#: The store counter of closed connections, by cause.
CLOSED = "connections_closed"

#: What each geo tier (the C{routing_decisions} label) means.
TIER_NAMES: Mapping[str, str] = {
    "0": "same country",
    "1": "same region",
    "2": "this POP's region",
    "3": "anywhere else",
}

#: How many countries the geo mix names (the rest are summed).
TOP_COUNTRIES = 5

#: How many skipped rows of the last load are listed (all are counted).
SKIPPED_LISTED = 20

#: Backends listed in full at most (a 10,000-row table would be 4 MB of
#: JSON every 2 s, and about 0.2 s of the reactor's time to build).
MAX_BACKENDS = 500

#: Overall status of a backend, worst first (see L{StatusData.backend}).
STATUSES = ("deleted", "maint", "down", "ejected", "drain", "full", "up")

_VERDICTS = {AVAILABLE: "available", NO_NEW_CLIENTS: "no-new-clients", UNAVAILABLE: "unavailable"}

Counters = Dict[Tuple[str, str], int]


# --- the parts, as far as they are read ----------------------------------------


class _Repository(Protocol):
    def current(self) -> RoutingSnapshot: ...


class _Load(Protocol):
    @property
    def connections(self) -> Mapping[str, int]: ...


class _Checker(Protocol):
    def status(self, backend_id: str) -> Any: ...


class _Breaker(Protocol):
    def state(self, backend_id: str) -> str: ...


class _AdminStates(Protocol):
    def get(self, backend_id: str) -> Any: ...


class _Admission(Protocol):
    @property
    def open(self) -> int: ...

    @property
    def maxConnections(self) -> int: ...


class _Counters(Protocol):
    def counters(self) -> Mapping[Tuple[str, str], int]: ...


# --- the geo mix ---------------------------------------------------------------


class RecentCounters:
    """
    The store counters named C{names}, as they were over the last
    C{window} seconds: a ring of samples, one every C{interval} seconds at
    most, so its memory is bounded (at most C{window / interval} samples
    plus two, each holding only the counters named: the geo tiers, the
    client countries -- ISO codes, a bounded set -- and the close causes).

    L{sample} is meant for a C{TimerService} every C{interval} seconds; it
    is also called by L{deltas}, so the ring fills while a page polls even
    without the timer.  The first sample is taken when this is made, so
    until the window is full the counts are those since then.

    @param metrics: The counters (anything with C{counters()}).
    @param clock: Seconds, monotonic enough (the reactor's C{seconds}).
    """

    def __init__(
        self,
        metrics: _Counters,
        clock: Callable[[], float],
        *,
        names: Iterable[str] = (DECISIONS, COUNTRIES, CLOSED),
        interval: float = SAMPLE_INTERVAL,
        window: float = WINDOW,
    ) -> None:
        if not interval > 0 or not window >= interval:
            raise ValueError(f"need 0 < interval <= window, got {interval!r}, {window!r}")
        self.metrics = metrics
        self.clock = clock
        self.names = frozenset(names)
        self.interval = float(interval)
        self.window = float(window)
        # Samples closer than this are not taken (a timer and the polls
        # both sample; a timer that fires a little early still does).
        self._minGap = 0.9 * self.interval
        self.samples: Deque[Tuple[float, Counters]] = deque(
            maxlen=int(self.window // self._minGap) + 2
        )
        self.sample()

    def __repr__(self) -> str:
        return f"<RecentCounters samples={len(self.samples)} window={self.window}>"

    def _read(self) -> Counters:
        names = self.names
        return {k: v for k, v in self.metrics.counters().items() if k[0] in names}

    def sample(self) -> None:
        """
        Keep the counters as they are now, unless the newest sample is
        younger than the interval; forget samples older than the window.
        Never raises (it runs from a timer): a failure is logged.
        """
        try:
            now = self.clock()
            samples = self.samples
            if samples and now - samples[-1][0] < self._minGap:
                return
            samples.append((now, self._read()))
            horizon = now - self.window
            while len(samples) > 1 and samples[0][0] < horizon:
                samples.popleft()
        except Exception:
            _log.failure("status page: sampling the counters failed")

    def deltas(self) -> Tuple[float, Counters]:
        """
        How much each counter grew over the window: C{(seconds covered,
        {(name, label): increase})}.  The baseline is the oldest sample
        inside the window (the newest one if none is: the seconds covered
        then say so).  A counter that went down (a reset) counts what it
        has now.
        """
        self.sample()
        now = self.clock()
        current = self._read()
        horizon = now - self.window
        baseline_at, baseline = self.samples[-1] if self.samples else (now, {})
        for at, counters in self.samples:
            if at >= horizon:
                baseline_at, baseline = at, counters
                break
        grown: Counters = {}
        for key, value in current.items():
            before = baseline.get(key, 0)
            delta = value - before if value >= before else value
            if delta:
                grown[key] = delta
        return max(0.0, now - baseline_at), grown


def _share(count: int, total: int) -> Optional[float]:
    return round(count / total, 4) if total else None


def geo_mix(seconds: float, grown: Mapping[Tuple[str, str], int]) -> Dict[str, Any]:
    """
    The JSON of the geo mix from L{RecentCounters.deltas}: the decisions per
    geo tier (all four, with their share), the L{TOP_COUNTRIES} client
    countries (ties by code) with the rest summed as C{other_countries} and
    clients without geo as C{no_geo}, and connections closed by cause.
    """
    tiers = {label: 0 for label in TIER_NAMES}
    countries: Dict[str, int] = {}
    closed: Dict[str, int] = {}
    for (name, label), n in grown.items():
        if name == DECISIONS and label in tiers:
            tiers[label] += n
        elif name == COUNTRIES:
            countries[label] = countries.get(label, 0) + n
        elif name == CLOSED:
            closed[label] = closed.get(label, 0) + n
    decisions = sum(tiers.values())
    no_geo = countries.pop("", 0)
    clients = sum(countries.values()) + no_geo
    ranked = sorted(countries.items(), key=lambda item: (-item[1], item[0]))
    top = ranked[:TOP_COUNTRIES]
    return {
        "window": round(seconds, 3),
        "decisions": decisions,
        "tiers": [
            {
                "tier": int(label),
                "name": TIER_NAMES[label],
                "count": tiers[label],
                "share": _share(tiers[label], decisions),
            }
            for label in sorted(TIER_NAMES)
        ],
        "clients": clients,
        "countries": [
            {"country": code, "count": n, "share": _share(n, clients)} for code, n in top
        ],
        "other_countries": sum(n for _, n in ranked[TOP_COUNTRIES:]),
        "no_geo": no_geo,
        "closed": dict(sorted(closed.items())),
    }


# --- the data ------------------------------------------------------------------


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _age(now: float, then: Optional[float]) -> Optional[float]:
    return None if then is None else round(max(0.0, now - then), 3)


_NO_SOURCES: Mapping[str, int] = {}

#: Rank of each status, worst first.
_RANK: Mapping[str, int] = {name: i for i, name in enumerate(STATUSES)}


def _status(
    b: Backend, in_routable: bool, sources: Mapping[str, int], connections: int
) -> Tuple[str, bool]:
    """
    A backend's overall status and whether it is routable now.

    The status is the worst that applies, in this order: C{deleted} (the
    table's soft delete), C{maint} (the admin state: the C{admin} source
    says L{UNAVAILABLE}), C{down} (the table says unhealthy, or the health
    checks or any other source but the breaker say L{UNAVAILABLE}),
    C{ejected} (the circuit breaker holds it out), C{drain} (the table's
    C{draining}, or a L{NO_NEW_CLIENTS} verdict such as the admin state
    C{drain}), C{full} (at its hard limit), C{up}.

    Routable: the router would consider it for a new client now (routable
    in the table, no overlay verdict closing it, below its hard limit).
    """
    full = b.hard_limit > 0 and connections >= b.hard_limit
    routable = in_routable and not full and not sources
    if b.deleted:
        return "deleted", routable
    if not sources:
        if not b.healthy:
            return "down", routable
        if b.draining:
            return "drain", routable
        return ("full" if full else "up"), routable
    if sources.get("admin") == UNAVAILABLE:
        return "maint", routable
    if not b.healthy or any(
        v == UNAVAILABLE for s, v in sources.items() if s not in ("admin", "breaker")
    ):
        return "down", routable
    if sources.get("breaker", AVAILABLE) != AVAILABLE:
        return "ejected", routable
    if b.draining or NO_NEW_CLIENTS in sources.values():
        return "drain", routable
    return ("full" if full else "up"), routable


class StatusData:
    """
    What the status page shows, assembled from the proxy's live parts on
    the reactor thread (L{render}); every part is optional and read
    duck-typed:

    @param repository: The routing table: C{current()} (a
        L{RoutingSnapshot}); C{lastReloadOk} (reactor seconds),
        C{lastError} and C{skipped} are read where it has them
        (L{edgeproxy.stores.sqlite.SqliteBackendRepository}).
    @param load: C{connections}: backend id -> open connections
        (L{edgeproxy.routing.load.LoadTable}).
    @param overlay: The L{IStateOverlay}: C{closedToNew} and C{sources(id)}.
    @param checker: C{status(id)} -> a
        L{edgeproxy.net.health.HealthStatus} or C{None}.
    @param breaker: C{state(id)} -> C{"closed"}, C{"open"}, ...
        (L{edgeproxy.routing.breaker.CircuitBreaker}).
    @param admin: C{get(id)} -> an L{edgeproxy.routing.admin.AdminState}.
    @param bindings: The binding table (its length).
    @param admission: C{open} and C{maxConnections} (0: no cap).
    @param metrics: The store counters (C{counters()}) for the geo mix.
    @param region: This POP's region.
    @param version: Shown on the page (edgeproxy's by default).
    @param clock: Reactor seconds (C{lastReloadOk}, the health checks'
        times, the geo mix); C{time.monotonic} when not given.
    @param wallClock: Epoch seconds (C{time}, the admin states' times).
    @param interval: Seconds between samples of the geo mix.
    @param window: Seconds of the geo mix.
    @param maxBackends: At most this many backends are listed in full (the
        worst first; see L{render}).
    @param geo: The geo resolver; its C{status(now)} (epoch seconds) is
        shown as C{geo_database} where it has one
        (L{edgeproxy.geo.GeoIPResolver.status}): the database's type, build
        date, age, whether it is stale, and its reloads.
    @param rttWeight: The router's C{rtt_weight}: each backend's
        C{rtt_term} is what its RTT adds to its score (given its load now);
        C{null} for a backend not measured yet, which is scored as the
        median of its tier's measured candidates (that depends on the
        client, see C{/api/v1/explain}).

    @ivar recent: The L{RecentCounters} of the geo mix (C{None} without
        C{metrics}).
    """

    def __init__(
        self,
        *,
        repository: Optional[_Repository] = None,
        load: Optional[_Load] = None,
        overlay: Optional[IStateOverlay] = None,
        checker: Optional[_Checker] = None,
        breaker: Optional[_Breaker] = None,
        admin: Optional[_AdminStates] = None,
        bindings: Optional[Sized] = None,
        admission: Optional[_Admission] = None,
        metrics: Optional[_Counters] = None,
        region: Optional[str] = None,
        version: str = __version__,
        clock: Optional[Callable[[], float]] = None,
        wallClock: Callable[[], float] = time.time,
        interval: float = SAMPLE_INTERVAL,
        window: float = WINDOW,
        maxBackends: int = MAX_BACKENDS,
        geo: Optional[Any] = None,
        rttWeight: float = 0.0,
    ) -> None:
        self.geo = geo
        if maxBackends < 1:
            raise ValueError(f"maxBackends must be >= 1, got {maxBackends!r}")
        self.maxBackends = maxBackends
        self.rttWeight = rttWeight
        self.repository = repository
        self.load = load
        self.overlay = overlay
        self.checker = checker
        self.breaker = breaker
        self.admin = admin
        self.bindings = bindings
        self.admission = admission
        self.metrics = metrics
        self.region = region
        self.version = version
        self.clock: Callable[[], float] = clock if clock is not None else time.monotonic
        self.wallClock = wallClock
        self.recent = (
            RecentCounters(metrics, self.clock, interval=interval, window=window)
            if metrics is not None
            else None
        )
        self._tableVersion: Optional[int] = None
        self._tableChanged: Optional[float] = None
        if repository is not None:
            self._tableVersion = repository.current().version
            self._tableChanged = self.clock()

    def __repr__(self) -> str:
        return f"<StatusData region={self.region!r}>"

    def sample(self) -> None:
        """
        Sample the counters of the geo mix (for a C{TimerService} every
        L{SAMPLE_INTERVAL} seconds; never raises).
        """
        if self.recent is not None:
            self.recent.sample()

    def routingTableChanged(self, old: RoutingSnapshot, new: RoutingSnapshot) -> None:
        """
        A L{edgeproxy.interfaces.SnapshotListener}: note when the table's
        content changed.  Without it the change is noticed at the next
        L{render}.
        """
        self._tableVersion = new.version
        self._tableChanged = self.clock()

    def _noteTable(self, snapshot: RoutingSnapshot, now: float) -> None:
        if snapshot.version != self._tableVersion:
            self._tableVersion = snapshot.version
            self._tableChanged = now

    def render(self) -> Dict[str, Any]:
        """
        The status now, as JSON-serialisable data (see the README for the
        fields).  Call it on the reactor thread.

        Every backend's status is worked out (a few comparisons each: about
        5 ms per 10,000 backends), and at most C{maxBackends} are listed in
        full: all of them if they fit, else the worst first (by
        L{STATUSES}; in table order within a status), then shown in table
        order.  C{summary} counts them all.
        """
        now = self.clock()
        wall = self.wallClock()
        repository = self.repository
        snapshot = repository.current() if repository is not None else None
        statuses = {name: 0 for name in STATUSES}
        listed: List[Dict[str, Any]] = []
        routable = 0
        if snapshot is not None:
            overlay = self.overlay
            closed = getattr(overlay, "closedToNew", None) if overlay is not None else None
            connections = self.load.connections if self.load is not None else {}
            found: List[Tuple[int, int, Backend, Mapping[str, int], int, str, bool]] = []
            for position, b in enumerate(snapshot.backends):
                bid = b.id
                sources: Mapping[str, int] = _NO_SOURCES
                if overlay is not None and (closed is None or bid in closed):
                    sources = {s: v for s, v in overlay.sources(bid).items() if v != AVAILABLE}
                n = connections.get(bid, 0)
                status, ok = _status(b, bid in snapshot.routable, sources, n)
                statuses[status] += 1
                routable += ok
                found.append((_RANK[status], position, b, sources, n, status, ok))
            if len(found) > self.maxBackends:
                found = sorted(found, key=lambda entry: entry[:2])[: self.maxBackends]
                found.sort(key=lambda entry: entry[1])
            listed = [
                self.backend(b, sources, n, status, ok, now, wall)
                for _, _, b, sources, n, status, ok in found
            ]
        body: Dict[str, Any] = {
            "service": "edgeproxy",
            "version": self.version,
            "region": self.region,
            "rtt_weight": self.rttWeight,
            "time": round(wall, 3),
            "summary": {
                "backends": sum(statuses.values()),
                "listed": len(listed),
                "routable": routable,
                "statuses": statuses,
            },
            "backends": listed,
            "bindings": len(self.bindings) if self.bindings is not None else None,
            "connections": (
                {"open": self.admission.open, "max": self.admission.maxConnections}
                if self.admission is not None
                else None
            ),
            "geo": geo_mix(*self.recent.deltas()) if self.recent is not None else None,
            "geo_database": self._geoDatabase(wall),
            "reload": None,
            "table": None,
        }
        if snapshot is not None:
            self._noteTable(snapshot, now)
            last_ok = getattr(repository, "lastReloadOk", None)
            skipped = tuple(getattr(repository, "skipped", ()))
            last_error = getattr(repository, "lastError", None)
            body["reload"] = {
                "ok": None if not hasattr(repository, "lastError") else last_error is None,
                "last_ok_age": _age(now, last_ok),
                "last_error": last_error,
                "skipped": len(skipped),
                "skipped_rows": [
                    {"id": row_id, "reason": reason} for row_id, reason in skipped[:SKIPPED_LISTED]
                ],
            }
            body["table"] = {
                "age": _age(now, last_ok),
                "changed_age": _age(now, self._tableChanged),
                "backends": len(snapshot.backends),
                "routable": len(snapshot.routable),
                "version": str(snapshot.version),  # past 2**53: a string for JavaScript
            }
        return body

    def _geoDatabase(self, wall: float) -> Optional[Dict[str, Any]]:
        status = getattr(self.geo, "status", None)
        if not callable(status):
            return None
        try:
            return dict(status(wall))
        except Exception:
            _log.failure("GeoIP status for the status page failed")
            return None

    def backend(
        self,
        b: Backend,
        sources: Mapping[str, int],
        connections: int,
        status: str,
        routable: bool,
        now: float,
        wall: float,
    ) -> Dict[str, Any]:
        """
        One backend's entry, its C{status} and C{routable} worked out (see
        L{_status}), the health check, breaker and admin state read from
        their parts.
        """
        bid = b.id
        ms, term = self._rtt(b, connections)
        return {
            "id": bid,
            "app": b.app,
            "region": b.region,
            "country": b.country,
            "address": _address(b.host, b.port),
            "weight": b.weight,
            "table": {"healthy": b.healthy, "deleted": b.deleted, "draining": b.draining},
            "status": status,
            "routable": routable,
            "verdicts": {s: _VERDICTS.get(v, str(v)) for s, v in sorted(sources.items())},
            "health": self._health(bid, sources, now),
            "breaker": self.breaker.state(bid) if self.breaker is not None else None,
            "admin": self._admin(bid, sources, wall),
            "connections": connections,
            "soft_limit": b.soft_limit,
            "hard_limit": b.hard_limit,
            "rtt_ms": ms,
            "rtt_term": term,
        }

    def _health(self, bid: str, sources: Mapping[str, int], now: float) -> Optional[Dict[str, Any]]:
        status = self.checker.status(bid) if self.checker is not None else None
        if status is None:
            if "health" in sources:
                # No checker to ask (or it stopped following the backend),
                # but the overlay has its verdict.
                return {
                    "state": "down" if sources["health"] == UNAVAILABLE else "unknown",
                    "check": None,
                    "reason": None,
                    "since_age": None,
                    "last_check_age": None,
                    "rtt_ms": None,
                }
            return None
        rtt = getattr(status, "rtt", None)
        return {
            "state": status.state,
            "check": getattr(status, "check", None),
            "reason": getattr(status, "reason", None),
            "since_age": _age(now, getattr(status, "since", None)),
            "last_check_age": _age(now, getattr(status, "last_check", None)),
            "rtt_ms": round(rtt * 1000.0, 3) if rtt is not None else None,
        }

    def _rtt(self, b: Backend, connections: int) -> Tuple[Optional[float], Optional[float]]:
        """
        The backend's RTT in whole milliseconds as the score counts it, and
        the term it adds to its score at this load (see
        L{edgeproxy.routing.selection}); C{(None, None)} when unmeasured.
        """
        status = self.checker.status(b.id) if self.checker is not None else None
        seconds = getattr(status, "rtt", None)
        ms = rtt_ms(seconds) if seconds is not None else None
        if ms is None:
            return None, None
        if not self.rttWeight:
            return ms, 0.0
        load = connections / max(1, b.soft_limit) / max(1, b.weight)
        return ms, round(in_tier(load, ms, self.rttWeight) - load, 6)

    def _admin(self, bid: str, sources: Mapping[str, int], wall: float) -> Optional[Dict[str, Any]]:
        if self.admin is None:
            if "admin" not in sources:
                return None
            return {
                "state": "maint" if sources["admin"] == UNAVAILABLE else "drain",
                "reason": "",
                "since_age": None,
                "deadline_in": None,
            }
        state = self.admin.get(bid)
        deadline = getattr(state, "deadline", None)
        return {
            "state": state.state,
            "reason": getattr(state, "reason", ""),
            "since_age": _age(wall, getattr(state, "since", None)),
            "deadline_in": round(deadline - wall, 3) if deadline is not None else None,
        }


# --- the resources -------------------------------------------------------------


class StatusJSONResource(JSONResource):
    """
    C{GET /api/v1/status}: L{StatusData.render} as JSON (C{no-store}).

    The JSON is assembled on the reactor thread (where the parts live) and
    kept for C{maxAge} seconds, so any number of open pages cost at most one
    assembly per C{maxAge}: about 13 ms for 10,000 backends (500 listed).
    A failure is a JSON 500 (logged); a path below it is a JSON 404.

    @param data: The L{StatusData}.
    @param clock: Seconds for C{maxAge} (the data's clock by default).
    """

    isLeaf = True

    def __init__(
        self,
        data: StatusData,
        *,
        maxAge: float = 1.0,
        clock: Optional[Callable[[], float]] = None,
    ) -> None:
        Resource.__init__(self)
        self.data = data
        self.maxAge = maxAge
        self.clock = clock if clock is not None else data.clock
        self._cache: Optional[Tuple[float, bytes]] = None
        #: Assemblies done (for tests and the curious).
        self.renders = 0

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        if request.postpath and request.postpath != [b""]:
            return json_error(request, 404, "not found")
        now = self.clock()
        cached = self._cache
        if cached is None or not 0 <= now - cached[0] < self.maxAge:
            self.renders += 1
            try:
                status = self.data.render()
            except Exception:
                _log.failure("status page: assembling the status failed")
                return json_error(request, 500, "status failed")
            body = json_body(request, 200, status)
            self._cache = (now, body)
            return body
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        return cached[1]


def _sha256(source: str) -> str:
    digest = hashlib.sha256(source.encode("utf-8")).digest()
    return "'sha256-" + base64.b64encode(digest).decode("ascii") + "'"


_CSS = """
:root{color-scheme:light dark;--bg:#f6f7f9;--fg:#1b1f24;--muted:#5c6570;--card:#fff;
--line:#d9dde3;--up:#1a7f37;--down:#cf222e;--warn:#9a6700;--info:#0969da;--off:#6e7781}
@media (prefers-color-scheme:dark){:root{--bg:#0d1117;--fg:#e6edf3;--muted:#8d96a0;
--card:#161b22;--line:#30363d;--up:#3fb950;--down:#f85149;--warn:#d29922;--info:#58a6ff}}
*{box-sizing:border-box}
html{-webkit-text-size-adjust:100%;text-size-adjust:100%}
body{margin:0;padding:12px;background:var(--bg);color:var(--fg);
font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,"Noto Sans",sans-serif}
header{display:flex;flex-wrap:wrap;align-items:baseline;gap:4px 16px;margin-bottom:8px}
h1{font-size:20px;margin:0}h2{font-size:15px;margin:0 0 6px}
.muted{color:var(--muted)}
.banner{background:var(--down);color:#fff;padding:8px 12px;border-radius:6px;margin:8px 0;
overflow-wrap:anywhere}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(160px,1fr));gap:8px;margin-bottom:12px}
.card,section.panel{background:var(--card);border:1px solid var(--line);border-radius:8px;
padding:10px 12px}
.card h2{font-size:12px;text-transform:uppercase;letter-spacing:.04em;color:var(--muted)}
.big{font-size:24px;font-weight:600;margin:0}
.card p{margin:2px 0;overflow-wrap:anywhere}
.card[data-state=bad]{border-color:var(--down)}
.card[data-state=bad] .big{color:var(--down)}
section.panel{margin-bottom:12px}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:5px 8px;border-bottom:1px solid var(--line);vertical-align:top}
th{font-size:12px;color:var(--muted);font-weight:600;white-space:nowrap}
td{overflow-wrap:anywhere}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.c-address,td.c-load,td.c-rtt,td.c-status{white-space:nowrap}
meter{width:80px;height:10px;vertical-align:middle}
.pill{display:inline-block;white-space:nowrap;padding:0 8px;border-radius:10px;font-weight:600;
font-size:12px;text-transform:uppercase;color:#fff;background:var(--off)}
.pill[data-status=up]{background:var(--up)}
.pill[data-status=down],.pill[data-status=maint],.pill[data-status=ejected]{background:var(--down)}
.pill[data-status=drain],.pill[data-status=full]{background:var(--warn)}
tr[data-status=deleted] td{opacity:.6}
.geo{display:grid;grid-template-columns:repeat(auto-fit,minmax(260px,1fr));gap:12px}
footer{font-size:12px;color:var(--muted)}
@media (max-width:720px){
body{padding:8px}
#backends thead{position:absolute;width:1px;height:1px;overflow:hidden;clip:rect(0 0 0 0)}
#backends,#backends tbody{display:block;width:100%}
#backends tr{display:grid;grid-template-columns:1fr 1fr;gap:4px 12px;border:1px solid var(--line);
border-radius:8px;margin-bottom:8px;padding:6px 10px}
#backends td{display:block;border:0;padding:0;min-width:0;white-space:normal}
#backends td::before{content:attr(data-label);display:block;font-size:11px;color:var(--muted);
font-weight:600;text-transform:uppercase;letter-spacing:.03em}
#backends td.c-id{grid-column:1/-1;font-weight:600;font-size:15px}
#backends td.c-id::before{content:none}
}
@media (max-width:480px){.bar{display:none}}
""".strip()

_SCRIPT = r"""
(function () {
  "use strict";
  var root = document.getElementById("status");
  var source = root.getAttribute("data-source");
  var interval = parseInt(root.getAttribute("data-interval"), 10) || 2000;
  var KEY = "edgeproxy-status-token";
  var token = null;
  var m = /(?:^#|&)token=([^&]*)/.exec(location.hash);
  if (m) {
    token = decodeURIComponent(m[1]);
    try { sessionStorage.setItem(KEY, token); } catch (e) { /* no storage: keep it here */ }
    history.replaceState(null, "", location.pathname + location.search);
  } else {
    try { token = sessionStorage.getItem(KEY); } catch (e) { token = null; }
  }
  var state = window.edgeproxyStatus = {polls: 0, ok: 0, failures: 0, lastOk: null, data: null};

  function byId(id) { return document.getElementById(id); }
  function put(el, value) {
    var s = value === null || value === undefined || value === "" ? "\u2013" : String(value);
    if (el.textContent !== s) { el.textContent = s; }
  }
  function age(s) {
    if (s === null || s === undefined) { return null; }
    if (s < 1) { return "<1 s"; }
    if (s < 90) { return Math.round(s) + " s"; }
    if (s < 5400) { return Math.round(s / 60) + " min"; }
    if (s < 172800) { return (s / 3600).toFixed(1) + " h"; }
    return Math.round(s / 86400) + " d";
  }
  function pct(x) {
    if (x === null || x === undefined) { return null; }
    return (x * 100).toFixed(x > 0 && x < 0.1 ? 1 : 0) + " %";
  }
  function limit(n) { return n > 0 ? String(n) : "\u221e"; }
  function meter(el, value, max, low, high) {
    el.max = Math.max(max, 1); el.low = low; el.high = high; el.optimum = 0; el.value = value;
  }
  function clear(el) { while (el.firstChild) { el.removeChild(el.firstChild); } }
  function cell(tr, label, cls) {
    var td = document.createElement("td");
    td.setAttribute("data-label", label);
    if (cls) { td.className = cls; }
    tr.appendChild(td);
    return td;
  }

  var COLUMNS = [
    ["id", "Backend"], ["app", "App"], ["region", "Region"], ["country", "Country"],
    ["address", "Address"], ["status", "Status"], ["health", "Health check"],
    ["breaker", "Breaker"], ["admin", "Admin"], ["load", "Load"], ["rtt", "RTT"],
    ["routable", "Routable"]
  ];
  var rows = new Map();

  function makeRow() {
    var tr = document.createElement("tr");
    var cells = {};
    COLUMNS.forEach(function (c) { cells[c[0]] = cell(tr, c[1], "c-" + c[0]); });
    var pill = document.createElement("span");
    pill.className = "pill";
    cells.status.appendChild(pill);
    var loadText = document.createElement("span");
    var loadMeter = document.createElement("meter");
    cells.load.appendChild(loadText);
    cells.load.appendChild(document.createTextNode(" "));
    cells.load.appendChild(loadMeter);
    return {tr: tr, cells: cells, pill: pill, loadText: loadText, loadMeter: loadMeter};
  }

  function healthText(h) {
    if (!h) { return null; }
    var text = h.state;
    if (h.since_age !== null && h.since_age !== undefined) { text += " for " + age(h.since_age); }
    if (h.reason && h.reason !== "connected") { text += " (" + h.reason + ")"; }
    if (h.state === "up" && h.rtt_ms !== null && h.rtt_ms !== undefined) {
      text += ", " + h.rtt_ms.toFixed(1) + " ms";
    }
    return text;
  }
  function adminText(a) {
    if (!a) { return null; }
    var parts = [a.state];
    if (a.deadline_in !== null && a.deadline_in !== undefined) {
      parts.push("deadline in " + age(Math.max(0, a.deadline_in)));
    }
    if (a.reason) { parts.push("\u2013 " + a.reason); }
    return parts.join(" ");
  }

  function updateRow(row, b) {
    row.tr.setAttribute("data-id", b.id);
    row.tr.setAttribute("data-status", b.status);
    row.pill.setAttribute("data-status", b.status);
    put(row.cells.id, b.id);
    put(row.cells.app, b.app);
    put(row.cells.region, b.region);
    put(row.cells.country, b.country);
    put(row.cells.address, b.address);
    put(row.pill, b.status);
    put(row.cells.health, healthText(b.health));
    put(row.cells.breaker, b.breaker);
    put(row.cells.admin, adminText(b.admin));
    put(row.loadText, b.connections + " / " + b.soft_limit + " / " + limit(b.hard_limit));
    var top = b.hard_limit > 0 ? b.hard_limit : Math.max(2 * b.soft_limit, b.connections);
    meter(row.loadMeter, b.connections, top, b.soft_limit,
          b.hard_limit > 0 ? Math.max(b.soft_limit, 0.9 * b.hard_limit) : top);
    row.loadMeter.title = b.connections + " connections, soft limit " + b.soft_limit +
      ", hard limit " + limit(b.hard_limit);
    put(row.cells.rtt, rttText(b));
    put(row.cells.routable, b.routable ? "yes" : "no");
  }
  function rttText(b) {
    if (b.rtt_ms === null || b.rtt_ms === undefined) { return "\u2013"; }
    var text = b.rtt_ms + " ms";
    if (b.rtt_term !== null && b.rtt_term !== undefined) {
      text += " (+" + b.rtt_term.toFixed(3) + ")";
    }
    return text;
  }

  function renderBackends(list) {
    var tbody = byId("backend-rows");
    var seen = new Set();
    list.forEach(function (b, i) {
      var row = rows.get(b.id);
      if (!row) { row = makeRow(); rows.set(b.id, row); }
      updateRow(row, b);
      seen.add(b.id);
      var at = tbody.children[i];
      if (at !== row.tr) { tbody.insertBefore(row.tr, at || null); }
    });
    rows.forEach(function (row, id) {
      if (!seen.has(id)) { tbody.removeChild(row.tr); rows.delete(id); }
    });
    byId("no-backends").hidden = list.length > 0;
  }

  function renderGeo(g) {
    byId("geo").hidden = !g;
    if (!g) { return; }
    put(byId("geo-window"), "last " + age(g.window) + ", " + g.decisions + " decisions");
    var tiers = byId("tier-rows");
    clear(tiers);
    g.tiers.forEach(function (t) {
      var tr = document.createElement("tr");
      put(cell(tr, "Tier"), t.tier + " \u2013 " + t.name);
      put(cell(tr, "Connections", "num"), t.count);
      put(cell(tr, "Share", "num"), pct(t.share));
      var m = document.createElement("meter");
      meter(m, t.share || 0, 1, 1, 1);
      cell(tr, "", "bar").appendChild(m);
      tiers.appendChild(tr);
    });
    var countries = byId("country-rows");
    clear(countries);
    var list = g.countries.slice();
    if (g.other_countries) { list.push({country: "other", count: g.other_countries, share: null}); }
    if (g.no_geo) { list.push({country: "no geo", count: g.no_geo, share: null}); }
    list.forEach(function (c) {
      var tr = document.createElement("tr");
      put(cell(tr, "Country"), c.country);
      put(cell(tr, "Connections", "num"), c.count);
      var share = c.share === null && g.clients ? c.count / g.clients : c.share;
      put(cell(tr, "Share", "num"), pct(share));
      countries.appendChild(tr);
    });
    byId("no-countries").hidden = list.length > 0;
  }

  function render(d) {
    state.data = d;
    put(byId("region"), d.region ? "region " + d.region : null);
    put(byId("version"), "version " + d.version);
    var s = d.summary;
    var up = s.statuses.up || 0;
    put(byId("backends-up"), up + " / " + s.backends + " up");
    var detail = [];
    Object.keys(s.statuses).forEach(function (k) {
      if (k !== "up" && s.statuses[k]) { detail.push(s.statuses[k] + " " + k); }
    });
    put(byId("backends-detail"),
        s.routable + " routable" + (detail.length ? ", " + detail.join(", ") : ""));
    byId("backends-card").setAttribute("data-state", s.routable ? "ok" : "bad");
    var c = d.connections;
    put(byId("conn-open"), c ? c.open : null);
    put(byId("conn-detail"), c ? (c.max ? "of " + c.max + " allowed" : "no cap") : "not known");
    if (c && c.max) { meter(byId("conn-meter"), c.open, c.max, 0.8 * c.max, 0.95 * c.max); }
    byId("conn-meter").hidden = !c || !c.max;
    put(byId("bindings"), d.bindings);
    var t = d.table, r = d.reload;
    put(byId("table-age"), t ? age(t.age) : null);
    var reload = [];
    if (r) {
      if (r.last_error) { reload.push("reload failing: " + r.last_error); }
      else if (r.ok) { reload.push("reloads ok"); }
      if (r.skipped) { reload.push(r.skipped + " rows skipped"); }
    }
    if (t && t.changed_age !== null) { reload.push("changed " + age(t.changed_age) + " ago"); }
    put(byId("reload"), reload.join(", "));
    byId("table-card").setAttribute("data-state", r && r.last_error ? "bad" : "ok");
    renderBackends(d.backends);
    var cut = byId("truncated");
    cut.hidden = s.listed >= s.backends;
    put(cut, "Showing " + s.listed + " of " + s.backends + " backends: the worst first.");
    renderGeo(d.geo);
    renderGeoDatabase(d.geo_database);
  }

  function renderGeoDatabase(g) {
    byId("geodb-card").hidden = !g;
    if (!g) { return; }
    put(byId("geodb-built"), g.built || "none");
    var detail = [];
    if (g.type) { detail.push(g.type + (g.shipped ? " (shipped)" : "")); }
    if (g.stale) {
      detail.push("STALE: " + g.age_days + " days old, over the " + g.max_age_days +
                  "-day limit; refresh it");
    } else if (g.age_days !== null) { detail.push(g.age_days + " days old"); }
    if (g.error) { detail.push(g.error); }
    if (g.last_reload_error) { detail.push("reload failed: " + g.last_reload_error); }
    if (g.reloads) { detail.push(g.reloads + " reloads"); }
    put(byId("geodb-detail"), detail.join("; "));
    byId("geodb-card").setAttribute("data-state",
        g.stale || !g.type || g.last_reload_error ? "bad" : "ok");
  }

  function showError(message) {
    var el = byId("error");
    var when = state.lastOk ?
      " Showing the data of " + new Date(state.lastOk).toLocaleTimeString() + "." : "";
    put(el, "Cannot update: " + message + "." + when);
    el.hidden = false;
  }

  function tickClock() {
    put(byId("updated"), state.lastOk ?
        "updated " + age((Date.now() - state.lastOk) / 1000) + " ago" : "connecting\u2026");
  }

  var inFlight = false, timer = null;
  function schedule() {
    if (timer !== null) { clearTimeout(timer); }
    timer = setTimeout(function () {
      timer = null;
      if (!document.hidden) { poll(); }
    }, interval);
  }
  function poll() {
    inFlight = true;
    state.polls += 1;
    var ctl = typeof AbortController === "function" ? new AbortController() : null;
    var guard = ctl ? setTimeout(function () { ctl.abort(); }, Math.max(2 * interval, 5000)) : null;
    var headers = {"Accept": "application/json"};
    if (token) { headers.Authorization = "Bearer " + token; }
    fetch(source, {cache: "no-store", credentials: "same-origin", headers: headers,
                   signal: ctl ? ctl.signal : undefined})
      .then(function (response) {
        if (response.status === 401 || response.status === 403) {
          throw new Error("HTTP " + response.status + " (open this page as /#token=TOKEN)");
        }
        if (!response.ok) { throw new Error("HTTP " + response.status); }
        return response.json();
      })
      .then(function (d) {
        try {
          render(d);
        } catch (e) {
          console.error("status page: cannot show the data", e);
          throw e;
        }
        state.ok += 1;
        state.lastOk = Date.now();
        byId("error").hidden = true;
      })
      .catch(function (e) {
        state.failures += 1;
        showError(e && e.name === "AbortError" ? "no answer in time" :
                  (e && e.message) || String(e));
      })
      .then(function () {
        if (guard !== null) { clearTimeout(guard); }
        inFlight = false;
        tickClock();
        schedule();
      });
  }
  document.addEventListener("visibilitychange", function () {
    if (!document.hidden && !inFlight && timer === null) { poll(); }
  });
  setInterval(tickClock, 1000);
  poll();
})();
""".strip()

_BODY = """
<header>
<h1>edgeproxy</h1>
<span id="region" class="muted"></span>
<span id="version" class="muted"></span>
<span id="updated" class="muted">connecting\u2026</span>
</header>
<div id="error" class="banner" role="alert" hidden></div>
<main id="status" data-source="{source}" data-interval="{interval}">
<div class="cards">
<div class="card" id="backends-card"><h2>Backends</h2><p class="big" id="backends-up">\u2013</p>
<p id="backends-detail" class="muted"></p></div>
<div class="card"><h2>Connections</h2><p class="big" id="conn-open">\u2013</p>
<p><meter id="conn-meter" hidden></meter> <span id="conn-detail" class="muted"></span></p></div>
<div class="card"><h2>Bindings</h2><p class="big" id="bindings">\u2013</p>
<p class="muted">clients kept on their backend</p></div>
<div class="card" id="table-card"><h2>Routing table age</h2><p class="big" id="table-age">\u2013</p>
<p id="reload" class="muted"></p></div>
<div class="card" id="geodb-card" hidden><h2>GeoIP database built</h2>
<p class="big" id="geodb-built">\u2013</p><p id="geodb-detail" class="muted"></p></div>
</div>
<section class="panel"><h2>Backends</h2>
<div class="scroll"><table id="backends">
<thead><tr><th>Backend</th><th>App</th><th>Region</th><th>Country</th><th>Address</th>
<th>Status</th><th>Health check</th><th>Breaker</th><th>Admin</th>
<th>Load (now / soft / hard)</th><th>RTT (score term)</th><th>Routable</th></tr></thead>
<tbody id="backend-rows"></tbody></table></div>
<p id="no-backends" class="muted" hidden>No backend in the routing table.</p>
<p id="truncated" class="muted" hidden></p>
</section>
<section class="panel geo" id="geo" hidden>
<div><h2>Geo tiers <span id="geo-window" class="muted"></span></h2>
<div class="scroll"><table><thead><tr><th>Tier</th><th class="num">Connections</th>
<th class="num">Share</th><th class="bar"></th></tr></thead>
<tbody id="tier-rows"></tbody></table></div></div>
<div><h2>Top client countries</h2>
<div class="scroll"><table><thead><tr><th>Country</th><th class="num">Connections</th>
<th class="num">Share</th></tr></thead><tbody id="country-rows"></tbody></table></div>
<p id="no-countries" class="muted">No connection yet.</p></div>
</section>
</main>
<footer>Updates every {seconds} s without reloading; the data is at
<a id="source-link" href="{source}">{source}</a>.</footer>
""".strip()


def status_page(source: str = STATUS_PATH, interval: float = 2.0) -> Tuple[bytes, str]:
    """
    The status page polling C{source} every C{interval} seconds, and its
    C{Content-Security-Policy}: C{(html, policy)}.
    """
    if not interval > 0:
        raise ValueError(f"interval must be > 0, got {interval!r}")
    quoted = html.escape(source, quote=True)
    body = _BODY.format(
        source=quoted,
        interval=math.ceil(interval * 1000),
        seconds=html.escape(f"{interval:g}"),
    )
    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta name="color-scheme" content="light dark">\n'
        '<link rel="icon" href="data:,">\n'
        "<title>edgeproxy status</title>\n"
        f"<style>{_CSS}</style>\n</head>\n<body>\n{body}\n<script>{_SCRIPT}</script>\n"
        "</body>\n</html>\n"
    )
    policy = "; ".join(
        (
            "default-src 'none'",
            f"script-src {_sha256(_SCRIPT)}",
            f"style-src {_sha256(_CSS)}",
            "connect-src 'self'",
            "img-src 'self' data:",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        )
    )
    return page.encode("utf-8"), policy


class StatusResource(JSONResource):
    """
    C{GET /}: the status page (L{status_page}), with its security headers.
    Any path below it is a JSON 404.

    @param source: The path of the L{StatusJSONResource} (same origin).
    @param interval: Seconds between two polls.
    """

    isLeaf = True

    #: The page holds no data (its script fetches the JSON, which checks
    #: access): it is served to anyone who can reach the listener, so that a
    #: browser (which cannot send a bearer token on a page load) can open it
    #: as /#token=TOKEN on a listener whose reads need a token.
    checksAccess = True

    def __init__(self, source: str = STATUS_PATH, interval: float = 2.0) -> None:
        Resource.__init__(self)
        self.page, self.policy = status_page(source, interval)

    def render_GET(self, request: Any) -> bytes:
        if request.postpath and request.postpath != [b""]:
            return json_error(request, 404, "not found")
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Content-Security-Policy", self.policy.encode("ascii"))
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.setHeader(b"X-Frame-Options", b"DENY")
        request.setHeader(b"Referrer-Policy", b"no-referrer")
        request.setHeader(b"Cache-Control", b"no-cache")
        return self.page


def _child(parent: Resource, name: bytes) -> Resource:
    children: Dict[bytes, Resource] = parent.children
    child = children.get(name)
    if child is None:
        child = JSONResource()
        parent.putChild(name, child)
    return child


def mount_status(
    root: Resource,
    data: StatusData,
    *,
    interval: float = 2.0,
    maxAge: float = 1.0,
) -> Tuple[StatusResource, StatusJSONResource]:
    """
    Put the status page at C{/} of C{root} (an
    L{edgeproxy.control.admin.AdminRoot}) and its JSON at
    C{/api/v1/status}, reusing the C{api} and C{v1} resources that are
    already there (creating plain L{JSONResource}s where none are).

    @return: The page and the JSON resource.
    """
    page = StatusResource(STATUS_PATH, interval)
    api = StatusJSONResource(data, maxAge=maxAge)
    root.putChild(b"", page)
    _child(_child(root, b"api"), b"v1").putChild(b"status", api)
    return page, api


def mount_guarded(root: Resource, api_root: Resource, data: StatusData, auth: Any) -> None:
    """
    Mount the status page at C{/} of C{root} and its JSON at
    C{/api/v1/status} inside the API's tree C{api_root} (whose C{v1} child
    must exist), the JSON behind C{auth}'s read rule
    (L{edgeproxy.control.auth.ReadGuarded}).
    """
    from edgeproxy.control.auth import ReadGuarded

    root.putChild(b"", StatusResource(STATUS_PATH))
    api_root.children[b"v1"].putChild(  # type: ignore[attr-defined]
        b"status", ReadGuarded(StatusJSONResource(data), auth)
    )
