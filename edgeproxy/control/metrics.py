"""
Prometheus exposition of the proxy's state, computed at scrape time.

The data plane never touches C{prometheus_client}: it counts into the cheap
in-memory L{edgeproxy.metrics.MetricsStore} (a dict of ints) and keeps its
own live tables (load, state overlay, routing snapshot, bindings,
admission).  L{EdgeproxyCollector} reads all of them when C{/metrics} is
scraped and turns them into metric families on a private
L{CollectorRegistry} (L{metrics_registry}); nothing is registered on
C{prometheus_client}'s global registry.

Per-backend series are built from the backends of the routing snapshot in
force, so a backend that leaves the table loses its series at the next
scrape; store counters labelled with a backend id are filtered the same
way, and L{backend_counter_pruner} frees them on reload.  No label ever
holds a client address: the label values are backend ids and the fixed
vocabularies below.

Counters (from the store: the I{store} column is the name given to
L{IMetricsStore.increment}; its label is the value of the last label
listed):

| Prometheus name | store counter | labels |
| --- | --- | --- |
| edgeproxy_connections_accepted_total | connections_accepted | |
| edgeproxy_connections_closed_total | connections_closed | cause |
| edgeproxy_connections_rejected_total | connections_rejected | reason |
| edgeproxy_client_limit_rejections_total | client_limit_rejected | reason |
| edgeproxy_proxied_bytes_total | bytes_to_backend | direction="to_backend" |
| edgeproxy_proxied_bytes_total | bytes_to_client | direction="to_client" |
| edgeproxy_routing_decisions_total | routing_decisions | tier |
| edgeproxy_routing_no_backend_total | routing_no_backend | |
| edgeproxy_backend_connect_failures_total | backend_connect_failures | backend |
| edgeproxy_connect_local_errors_total | connect_local_errors | |
| edgeproxy_connect_unresolved_total | connect_unresolved | backend |
| edgeproxy_routing_panic_total | routing_panic | |
| edgeproxy_dns_queries_total | dns_queries | rcode |
| edgeproxy_dns_dropped_total | dns_dropped | reason |
| edgeproxy_dns_malformed_total | dns_malformed | reason |
| edgeproxy_dns_truncated_total | dns_truncated | |
| edgeproxy_pops_reloads_total | pops_reload | result |
| edgeproxy_pops_rows_skipped_total | pops_rows_skipped | column |
| edgeproxy_routing_client_countries_total | routing_client_countries | country |
| edgeproxy_admission_underflow_total | admission_underflow | |
| edgeproxy_access_log_dropped_total | access_log_dropped | reason |
| edgeproxy_proxy_header_rejections_total | proxy_header_rejected | reason |
| edgeproxy_tls_handshake_failures_total | tls_handshake_failed | reason |
| edgeproxy_sni_rejections_total | sni_rejected | reason |
| edgeproxy_sni_routed_total | sni_routed | match |
| edgeproxy_routing_reloads_total | routing_reload | result |
| edgeproxy_routing_rows_skipped_total | routing_rows_skipped | column |
| edgeproxy_routing_notifications_total | routing_notify | event |
| edgeproxy_load_underflow_total | load_underflow | backend |
| edgeproxy_worker_handoffs_total | worker_handoffs | result |
| edgeproxy_health_probes_total | health_probes | result |
| edgeproxy_health_transitions_total | health_transitions | to |
| edgeproxy_breaker_transitions_total | breaker_transitions | to |
| edgeproxy_admin_connections_rejected_total | admin_connections_rejected | |
| edgeproxy_geoip_reloads_total | geoip_reload | result |

C{cause} is one of L{edgeproxy.net.proxy.CAUSES}; C{tier} the geo tier of
the chosen backend (C{0} same country, C{1} same region, C{2} the POP's
region, C{3} anything else); C{result} C{ok}/C{error} for reloads and
C{up}/C{down} for probes; C{to} the state entered.  These values, and both
directions, are exported at 0 before they are first counted, so that
C{rate()} sees the first increment.  Any other store counter is exported
as C{edgeproxy_<name>_total} with its label (if any) as C{label}, so that a
counter added to the data plane is never silently missing from
C{/metrics}; give it a row in L{COUNTERS} to name it properly.  A
label-less family sums whatever labels its store counter was given.

Histograms (from L{MetricsStore.observe}):

| Prometheus name | store histogram | buckets |
| --- | --- | --- |
| edgeproxy_backend_connect_seconds | backend_connect_seconds | CONNECT_SECONDS_BUCKETS |

Any other histogram is exported as C{edgeproxy_<name>}.

Gauges (read from the live parts at scrape time; each needs its part to be
given to L{EdgeproxyCollector}):

| Prometheus name | read from | labels |
| --- | --- | --- |
| edgeproxy_open_connections | admission.open | |
| edgeproxy_max_connections | admission.maxConnections (0: no cap) | |
| edgeproxy_routing_table_backends | len(snapshot.backends) | |
| edgeproxy_routing_table_routable_backends | len(snapshot.routable) | |
| edgeproxy_routing_table_age_seconds | clock() - repository.lastReloadOk | |
| edgeproxy_routing_last_reload_failed | repository.lastError is not None | |
| edgeproxy_bindings | len(bindings) | |
| edgeproxy_backend_info | every snapshot row (value 1) | backend, app, region, country |
| edgeproxy_backend_connections | load.connections | backend |
| edgeproxy_backend_routable | snapshot.routable (1/0) | backend |
| edgeproxy_backend_up | overlay source "health" (1/0) | backend |
| edgeproxy_backend_breaker_open | overlay source "breaker" (1/0) | backend |
| edgeproxy_backend_admin_state | overlay source "admin" (one-hot) | backend, state |
| edgeproxy_backend_rtt_seconds | rtt (the health checks' connect RTT) | backend |
| edgeproxy_resolver_hosts | resolver.stats()["hosts"] | |
| edgeproxy_resolver_unresolved_hosts | resolver.stats()["unresolved"] | |
| edgeproxy_resolver_failing_hosts | resolver.stats()["failing"] | |
| edgeproxy_resolver_lookups_in_flight | resolver.stats()["in_flight"] | |
| edgeproxy_resolver_lookups_total (counter) | resolver.stats()["lookups"] | |
| edgeproxy_resolver_lookup_failures_total (counter) | resolver.stats()["lookup_failures"] | |
| edgeproxy_geoip_database_loaded | geo.status()["type"] is not None | |
| edgeproxy_geoip_build_timestamp_seconds | geo.status()["build_epoch"] | |
| edgeproxy_geoip_age_seconds | wall clock - build_epoch | |
| edgeproxy_geoip_max_age_seconds | geo.status()["max_age_days"] | |
| edgeproxy_geoip_stale | geo.status()["stale"] (1/0) | |

C{edgeproxy_backend_connections} counts open connections plus connects in
flight (what the router weighs).  C{edgeproxy_backend_up} is 0 when the
health checks hold the backend down, C{edgeproxy_backend_breaker_open} 1
when the circuit breaker holds it out; the admin state C{drain} is the
C{admin} source's L{NO_NEW_CLIENTS} verdict, C{maint} its L{UNAVAILABLE}
one, C{ready} no verdict.  C{edgeproxy_backend_rtt_seconds} is the
connect RTT estimate the router weighs inside a geo tier (C{--rtt-weight}),
for the backends that have one (a backend not yet measured has no series).
The table age is the time since the last
successful load (a failing reload makes it grow), exported once a load has
succeeded.  The table's own word (its C{healthy}, C{deleted} and
C{draining} columns) is C{edgeproxy_backend_routable}.  Join the
per-backend series with C{edgeproxy_backend_info} for app, region and
country.  The C{geoip} gauges describe the GeoIP database in force (its
build time from the file's metadata; C{stale} is 1 past
C{--geoip-max-age}); C{edgeproxy_geoip_reloads_total} counts reloads of a
changed file, C{error} once per broken version (the old database stays).
L{metrics_registry} also adds C{prometheus_client}'s process
collector (C{process_*}: CPU, memory, open file descriptors).
"""

from __future__ import annotations

import re
import time
from typing import (
    AbstractSet,
    Any,
    Callable,
    Container,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Protocol,
    Sequence,
    Sized,
    Tuple,
    Union,
)

import attrs
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry
from prometheus_client.utils import floatToGoString
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from edgeproxy.interfaces import (
    AVAILABLE,
    NO_NEW_CLIENTS,
    UNAVAILABLE,
    IBackendRepository,
    IHostResolver,
    IMetricsStore,
    IStateOverlay,
    SnapshotListener,
)
from edgeproxy.metrics import HistogramSnapshot
from edgeproxy.model import Backend, RoutingSnapshot
from edgeproxy.net.proxy import CAUSES

__all__ = [
    "ADMIN_STATES",
    "CONNECT_SECONDS",
    "COUNTERS",
    "PER_BACKEND_COUNTERS",
    "PREFIX",
    "CounterSpec",
    "EdgeproxyCollector",
    "Exposition",
    "ExtraGauge",
    "MetricsState",
    "backend_counter_pruner",
    "metrics_registry",
    "prune_backend_counters",
]

_log = Logger()

#: The prefix of every metric this module names.
PREFIX = "edgeproxy_"

#: The store name of the backend connect latency histogram (seconds).
CONNECT_SECONDS = "backend_connect_seconds"

#: The overlay's C{admin} verdicts as admin state names (HAProxy's words).
ADMIN_STATES: Tuple[Tuple[str, int], ...] = (
    ("ready", AVAILABLE),
    ("drain", NO_NEW_CLIENTS),
    ("maint", UNAVAILABLE),
)


@attrs.frozen
class CounterSpec:
    """
    How one store counter is exported.

    @ivar family: The Prometheus name, without C{_total}.
    @ivar doc: Its help text.
    @ivar label: The name of the label that carries the store label, or
        C{None} for a label-less family.
    @ivar fixed: Labels set to a constant for this store counter (several
        store counters can feed one family, told apart by these).
    @ivar known: Values of C{label} exported at 0 before they are counted.
    @ivar perBackend: The store label is a backend id: only ids in the
        routing table are exported.
    """

    family: str
    doc: str
    label: Optional[str] = None
    fixed: Tuple[Tuple[str, str], ...] = ()
    known: Tuple[str, ...] = ()
    perBackend: bool = False

    def labelnames(self) -> List[str]:
        names = [name for name, _ in self.fixed]
        if self.label is not None:
            names.append(self.label)
        return names


def _spec(family: str, doc: str, **kw: Any) -> CounterSpec:
    return CounterSpec(PREFIX + family, doc, **kw)


_BYTES_DOC = "Bytes relayed by closed sessions, by direction."

#: Store counter name -> how it is exported (the module docstring's table).
COUNTERS: Mapping[str, CounterSpec] = {
    "connections_accepted": _spec(
        "connections_accepted", "Client connections accepted (after admission)."
    ),
    "connections_closed": _spec(
        "connections_closed", "Client connections closed, by cause.", label="cause", known=CAUSES
    ),
    "connections_rejected": _spec(
        "connections_rejected",
        "Connections refused at accept time, by reason (limit: the global cap).",
        label="reason",
        known=("limit",),
    ),
    "client_limit_rejected": _spec(
        "client_limit_rejections",
        "Connections refused by the per-client limiter, by reason.",
        label="reason",
    ),
    "bytes_to_backend": _spec("proxied_bytes", _BYTES_DOC, fixed=(("direction", "to_backend"),)),
    "bytes_to_client": _spec("proxied_bytes", _BYTES_DOC, fixed=(("direction", "to_client"),)),
    "routing_decisions": _spec(
        "routing_decisions",
        "Backends chosen for new connections, by geo tier (0 country, 1 region, "
        "2 local POP region, 3 anything else).",
        label="tier",
        known=("0", "1", "2", "3"),
    ),
    "routing_no_backend": _spec(
        "routing_no_backend", "Connect attempts for which no backend was available."
    ),
    "backend_connect_failures": _spec(
        "backend_connect_failures",
        "Failed connects to a backend.",
        label="backend",
        perBackend=True,
    ),
    "connect_unresolved": _spec(
        "connect_unresolved",
        "Connect attempts skipped because the backend's host name had no address yet.",
        label="backend",
        perBackend=True,
    ),
    "routing_client_countries": _spec(
        "routing_client_countries",
        "Backends chosen for new connections, by the client's country (ISO code; empty: no geo).",
        label="country",
    ),
    "routing_panic": _spec(
        "routing_panic",
        "Clients routed to a backend ejected by health checks or the breaker, because"
        " every candidate was (panic routing).",
    ),
    "admission_underflow": _spec(
        "admission_underflow",
        "Admission slots given back more often than taken (a bookkeeping bug).",
    ),
    "access_log_dropped": _spec(
        "access_log_dropped",
        "Access-log records dropped, by reason (overflow: the disk stalled; error; closed).",
        label="reason",
    ),
    "dns_queries": _spec("dns_queries", "DNS queries answered, by response code.", label="rcode"),
    "dns_dropped": _spec(
        "dns_dropped",
        "DNS packets dropped unanswered, by reason (short, response, oversize, rate,"
        " tcp_limit, send_error).",
        label="reason",
    ),
    "dns_malformed": _spec(
        "dns_malformed", "DNS queries answered FORMERR, by what was wrong.", label="reason"
    ),
    "dns_truncated": _spec("dns_truncated", "DNS answers sent truncated (TC=1) over UDP."),
    "pops_reload": _spec(
        "pops_reloads", "POPs table loads, by result.", label="result", known=("ok", "error")
    ),
    "pops_rows_skipped": _spec(
        "pops_rows_skipped", "POPs table rows skipped as invalid, by column.", label="column"
    ),
    "connect_local_errors": _spec(
        "connect_local_errors", "Connects that failed on this host (e.g. no file descriptor)."
    ),
    "proxy_header_rejected": _spec(
        "proxy_header_rejections",
        "Connections refused for their PROXY protocol header, by reason.",
        label="reason",
    ),
    "tls_handshake_failed": _spec(
        "tls_handshake_failures", "TLS handshakes that failed, by reason.", label="reason"
    ),
    "sni_rejected": _spec(
        "sni_rejections",
        "Connections to sni: listeners closed before any backend for their TLS"
        " ClientHello, by reason.",
        label="reason",
    ),
    "sni_routed": _spec(
        "sni_routed",
        "TLS ClientHellos routed by sni: listeners, by match (name, wildcard, default).",
        label="match",
        known=("name", "wildcard", "default"),
    ),
    "routing_reload": _spec(
        "routing_reloads",
        "Routing table loads, by result.",
        label="result",
        known=("ok", "error"),
    ),
    "routing_rows_skipped": _spec(
        "routing_rows_skipped",
        "Routing table rows skipped as invalid, by offending column.",
        label="column",
    ),
    "routing_notify": _spec(
        "routing_notifications",
        "Change notifications from a shared store (PostgreSQL NOTIFY), and the"
        " listening connection lost and made again, by event.",
        label="event",
    ),
    "worker_handoffs": _spec(
        "worker_handoffs",
        "PROXY-listener connections passed between workers to the one owning the client,"
        " by result (sent, received, failed: served where accepted, dropped).",
        label="result",
        known=("sent", "received", "failed", "dropped"),
    ),
    "load_underflow": _spec(
        "load_underflow",
        "Backend slots released more often than taken (a bookkeeping bug).",
        label="backend",
        perBackend=True,
    ),
    "health_probes": _spec(
        "health_probes", "Active health probes, by result.", label="result", known=("up", "down")
    ),
    "health_transitions": _spec(
        "health_transitions", "Health state changes of backends, by state entered.", label="to"
    ),
    "breaker_transitions": _spec(
        "breaker_transitions", "Circuit breaker state changes, by state entered.", label="to"
    ),
    "admin_connections_rejected": _spec(
        "admin_connections_rejected",
        "Admin listener connections closed at once because too many were open.",
    ),
    "geoip_reload": _spec(
        "geoip_reloads",
        "Reloads of a changed GeoIP database file, by result (error: the file was"
        " broken and the old database stayed in force; once per version of the file).",
        label="result",
        known=("ok", "error"),
    ),
}

#: Store counters labelled with a backend id.
PER_BACKEND_COUNTERS: Tuple[str, ...] = tuple(
    name for name, spec in COUNTERS.items() if spec.perBackend
)

_HISTOGRAM_DOCS: Mapping[str, str] = {
    CONNECT_SECONDS: "Time from the start of a backend connect attempt to its success.",
}

_UNSAFE = re.compile(r"[^a-zA-Z0-9_]")


def _generic_name(name: str, taken: AbstractSet[str]) -> str:
    base = PREFIX + _UNSAFE.sub("_", name)
    if base.endswith("_total"):
        base = base[: -len("_total")]
    while base in taken:
        base += "_unmapped"
    return base


class _Admission(Protocol):
    open: int
    maxConnections: int


@attrs.frozen
class ExtraGauge:
    """
    A label-less gauge read from a callable at scrape time.

    @ivar name: The full Prometheus name (with its prefix and unit).
    @ivar doc: Its help text.
    @ivar read: Returns the value; an exception leaves the gauge out of
        that scrape.
    """

    name: str
    doc: str
    read: Callable[[], float]


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, doc, value=value)


_FAMILY_NAMES = frozenset(spec.family for spec in COUNTERS.values())


@attrs.frozen
class MetricsState:
    """
    Copies of everything the exposition reads, taken at one instant on the
    reactor thread by L{EdgeproxyCollector.freeze}.  Nothing in it is
    mutated afterwards (the routing snapshot is immutable, the rest are
    copies), so L{collect} may run in any thread.

    A field is C{None} when its part was not given to the collector.
    """

    counters: Mapping[Tuple[str, str], int]
    histograms: Mapping[str, HistogramSnapshot]
    snapshot: Optional[RoutingSnapshot] = None
    connections: Optional[Mapping[str, int]] = None
    #: Backend id -> the overlay's non-AVAILABLE verdicts by source, for the
    #: ids that have any.
    verdicts: Optional[Mapping[str, Mapping[str, int]]] = None
    admission: Optional[Tuple[int, int]] = None
    tableAge: Optional[float] = None
    lastReloadFailed: Optional[bool] = None
    bindings: Optional[int] = None
    resolver: Optional[Mapping[str, int]] = None
    #: L{edgeproxy.geo.GeoIPResolver.status} and the wall clock then.
    geo: Optional[Tuple[Mapping[str, Any], float]] = None
    extra: Tuple[Tuple[str, str, float], ...] = ()
    #: Backend id -> connect RTT estimate in seconds (measured ones only).
    rtts: Optional[Mapping[str, float]] = None

    def collect(self) -> Iterator[Metric]:
        """
        Every metric family (see the module docstring).
        """
        yield from self._counters()
        yield from self._histograms()
        yield from self._gauges()
        if self.snapshot is not None:
            yield from self._backends(self.snapshot)
        yield from self._resolver()
        yield from self._geo()
        for name, doc, value in self.extra:
            yield GaugeMetricFamily(name, doc, value=value)

    def _counters(self) -> Iterator[Metric]:
        in_table: Optional[Container[str]] = (
            self.snapshot.by_id if self.snapshot is not None else None
        )
        # family name -> (labelnames, doc, {label values: value})
        families: Dict[str, Tuple[List[str], str, Dict[Tuple[str, ...], float]]] = {}
        for spec in COUNTERS.values():
            entry = families.get(spec.family)
            if entry is None:
                entry = families[spec.family] = (spec.labelnames(), spec.doc, {})
            fixed = tuple(value for _, value in spec.fixed)
            samples = entry[2]
            if spec.label is None:
                samples.setdefault(fixed, 0)
            for known in spec.known:
                samples.setdefault((*fixed, known), 0)
        generic: Dict[str, Dict[str, float]] = {}
        for (name, label), value in self.counters.items():
            source = COUNTERS.get(name)
            if source is None:
                generic.setdefault(name, {})[label] = value
                continue
            if source.perBackend and in_table is not None and label not in in_table:
                continue
            key = tuple(v for _, v in source.fixed)
            if source.label is not None:
                key = (*key, label)
            samples = families[source.family][2]
            samples[key] = samples.get(key, 0) + value
        for family, (labelnames, doc, samples) in families.items():
            if not samples:
                continue
            metric = CounterMetricFamily(family, doc, labels=labelnames)
            for key, total in samples.items():
                metric.add_metric(key, total)
            yield metric
        for name, by_label in generic.items():
            labelled = any(by_label)
            metric = CounterMetricFamily(
                _generic_name(name, _FAMILY_NAMES),
                f"The {name} counter.",
                labels=["label"] if labelled else [],
            )
            for label, total in by_label.items():
                metric.add_metric([label] if labelled else [], total)
            yield metric

    def _histograms(self) -> Iterator[Metric]:
        for name, histogram in self.histograms.items():
            buckets: List[Tuple[str, float]] = []
            cumulative = 0.0
            for bound, count in zip(histogram.bounds, histogram.counts):
                cumulative += count
                buckets.append((floatToGoString(bound), cumulative))
            buckets.append(("+Inf", histogram.count))
            yield HistogramMetricFamily(
                PREFIX + _UNSAFE.sub("_", name),
                _HISTOGRAM_DOCS.get(name, f"The {name} histogram."),
                buckets=buckets,
                sum_value=histogram.sum,
            )

    def _gauges(self) -> Iterator[Metric]:
        if self.admission is not None:
            open_, cap = self.admission
            yield _gauge(
                "open_connections",
                "Connections holding an admission slot (accepted and not closed, at any stage).",
                open_,
            )
            yield _gauge("max_connections", "The global connection cap (0: unlimited).", cap)
        snapshot = self.snapshot
        if snapshot is not None:
            yield _gauge(
                "routing_table_backends",
                "Valid rows in the routing table in force.",
                len(snapshot.backends),
            )
            yield _gauge(
                "routing_table_routable_backends",
                "Rows of the routing table that may take new clients (healthy, not deleted, "
                "not draining).",
                len(snapshot.routable),
            )
        if self.tableAge is not None:
            yield _gauge(
                "routing_table_age_seconds",
                "Seconds since the routing table was last loaded successfully.",
                self.tableAge,
            )
        if self.lastReloadFailed is not None:
            yield _gauge(
                "routing_last_reload_failed",
                "1 if the last routing table load failed (the last good table stays in force).",
                1 if self.lastReloadFailed else 0,
            )
        if self.bindings is not None:
            yield _gauge("bindings", "Client bindings held.", self.bindings)

    def _backends(self, snapshot: RoutingSnapshot) -> Iterator[Metric]:
        # One family at a time, each yielded (and encoded, and freed) before
        # the next is built: with many backends this keeps the live samples,
        # and so the garbage collector's pauses, small.
        backends = snapshot.backends
        info = GaugeMetricFamily(
            PREFIX + "backend_info",
            "Backends of the routing table (always 1), with their app, region and country.",
            labels=["backend", "app", "region", "country"],
        )
        add = info.add_metric
        for b in backends:
            add((b.id, b.app or "", b.region, b.country or ""), 1)
        yield info
        in_routable = snapshot.routable
        yield self._perBackend(
            "backend_routable",
            "1 if the routing table lets the backend take new clients.",
            backends,
            lambda bid: 1 if bid in in_routable else 0,
        )
        if self.connections is not None:
            get = self.connections.get
            yield self._perBackend(
                "backend_connections",
                "Open connections plus connects in flight to the backend.",
                backends,
                lambda bid: get(bid, 0),
            )
        if self.rtts is not None:
            rtts = self.rtts
            rtt = GaugeMetricFamily(
                PREFIX + "backend_rtt_seconds",
                "The backend's connect RTT from this POP (a moving average of the median of"
                " the last three passed health checks), weighed inside a geo tier.",
                labels=["backend"],
            )
            add = rtt.add_metric
            for b in backends:
                value = rtts.get(b.id)
                if value is not None:
                    add((b.id,), value)
            yield rtt
        if self.verdicts is None:
            return
        verdicts = self.verdicts
        empty: Mapping[str, int] = {}

        def verdict(bid: str, source: str) -> int:
            return verdicts.get(bid, empty).get(source, AVAILABLE)

        yield self._perBackend(
            "backend_up",
            "1 unless the health checks hold the backend down.",
            backends,
            lambda bid: 1 if verdict(bid, "health") == AVAILABLE else 0,
        )
        yield self._perBackend(
            "backend_breaker_open",
            "1 if the circuit breaker holds the backend out.",
            backends,
            lambda bid: 0 if verdict(bid, "breaker") == AVAILABLE else 1,
        )
        admin = GaugeMetricFamily(
            PREFIX + "backend_admin_state",
            "The operator's admin state of the backend (one-hot: ready, drain, maint).",
            labels=["backend", "state"],
        )
        add = admin.add_metric
        for b in backends:
            bid = b.id
            in_force = verdict(bid, "admin")
            for state, value in ADMIN_STATES:
                add((bid, state), 1 if in_force == value else 0)
        yield admin

    @staticmethod
    def _perBackend(
        name: str, doc: str, backends: Iterable[Backend], read: Callable[[str], float]
    ) -> GaugeMetricFamily:
        gauge = GaugeMetricFamily(PREFIX + name, doc, labels=["backend"])
        add = gauge.add_metric
        for b in backends:
            add((b.id,), read(b.id))
        return gauge

    def _geo(self) -> Iterator[Metric]:
        if self.geo is None:
            return
        status, now = self.geo
        built = status.get("build_epoch")
        yield _gauge(
            "geoip_database_loaded",
            "1 if a GeoIP database is in force (0: clients have no geo but overrides).",
            0 if built is None else 1,
        )
        if built is not None:
            yield _gauge(
                "geoip_build_timestamp_seconds",
                "Build time of the GeoIP database in force (its metadata's build_epoch).",
                built,
            )
            yield _gauge(
                "geoip_age_seconds",
                "Seconds since the GeoIP database in force was built.",
                max(0.0, now - built),
            )
        yield _gauge(
            "geoip_max_age_seconds",
            "Age from which the GeoIP database is reported as stale (--geoip-max-age).",
            float(status.get("max_age_days") or 0) * 86400,
        )
        yield _gauge(
            "geoip_stale",
            "1 if the GeoIP database is older than --geoip-max-age.",
            1 if status.get("stale") else 0,
        )

    def _resolver(self) -> Iterator[Metric]:
        stats = self.resolver
        if stats is None:
            return
        for key, name, doc in (
            ("hosts", "resolver_hosts", "Backend hosts kept by the resolver."),
            ("unresolved", "resolver_unresolved_hosts", "Host names with no address yet."),
            ("failing", "resolver_failing_hosts", "Host names whose last lookup failed."),
            ("in_flight", "resolver_lookups_in_flight", "Host name lookups in flight."),
        ):
            if key in stats:
                yield _gauge(name, doc, stats[key])
        for key, name, doc in (
            ("lookups", "resolver_lookups", "Host name lookups started."),
            ("lookup_failures", "resolver_lookup_failures", "Host name lookups that failed."),
        ):
            if key in stats:
                yield CounterMetricFamily(PREFIX + name, doc, value=stats[key])


class EdgeproxyCollector:
    """
    A C{prometheus_client} collector (it has C{collect()}) over the proxy's
    in-memory parts; see the module docstring for what each part gives.

    Every part but C{metrics} is optional: a missing part leaves its
    series out.  The parts live on the reactor thread: call L{collect} or
    L{freeze} there (L{freeze} only copies, which is cheap; building the
    families from its result may then happen in another thread).

    @param metrics: The counters and histograms (histograms are read if it
        has C{histograms()}, as L{edgeproxy.metrics.MetricsStore} does).
    @param repository: The routing table; C{lastReloadOk} and C{lastError}
        are read if it has them (L{edgeproxy.stores.sqlite}).
    @param load: Anything with a C{connections} mapping (backend id ->
        open plus connecting), e.g. L{edgeproxy.routing.load.LoadTable}.
    @param overlay: The state overlay (health, breaker and admin verdicts).
    @param bindings: The binding table (only its length is read).
    @param admission: The global connection cap (its C{open} and
        C{maxConnections}).
    @param resolver: The backend host resolver (its C{stats()}).
    @param clock: Seconds on the clock of the repository's C{lastReloadOk}
        (the reactor's C{seconds}); without it, no table age.
    @param geo: The geo resolver; its C{status(now)} is read if it has one
        (L{edgeproxy.geo.GeoIPResolver}) for the C{geoip} gauges.
    @param wallClock: Epoch seconds, for the database's age.
    @param extra: More gauges.
    @param rtt: Backend id -> connect RTT in seconds (the health checker's
        C{rtts}).
    """

    def __init__(
        self,
        metrics: IMetricsStore,
        *,
        repository: IBackendRepository | None = None,
        load: Any = None,
        overlay: IStateOverlay | None = None,
        bindings: Sized | None = None,
        admission: _Admission | None = None,
        resolver: IHostResolver | None = None,
        clock: Callable[[], float] | None = None,
        geo: Any = None,
        wallClock: Callable[[], float] = time.time,
        extra: Sequence[ExtraGauge] = (),
        rtt: Mapping[str, float] | None = None,
    ) -> None:
        self.metrics = metrics
        self.geo = geo
        self.wallClock = wallClock
        self.rtt = rtt
        self.repository = repository
        self.load = load
        self.overlay = overlay
        self.bindings = bindings
        self.admission = admission
        self.resolver = resolver
        self.clock = clock
        self.extra = tuple(extra)

    def __repr__(self) -> str:
        return f"<EdgeproxyCollector metrics={self.metrics!r}>"

    def freeze(self) -> MetricsState:
        """
        Copy what the exposition needs, now (on the reactor thread).  Costs
        dictionary copies of the counters and of the load table, plus the
        overlay's sources of the few backends that have a verdict.
        """
        read_histograms = getattr(self.metrics, "histograms", None)
        repository = self.repository
        snapshot = repository.current() if repository is not None else None
        verdicts: Optional[Dict[str, Mapping[str, int]]] = None
        overlay = self.overlay
        if overlay is not None:
            # Any verdict other than AVAILABLE puts an id in closedToNew:
            # only those few have sources to read.
            verdicts = {bid: overlay.sources(bid) for bid in overlay.closedToNew}
        last_ok = getattr(repository, "lastReloadOk", None)
        table_age = None
        if last_ok is not None and self.clock is not None:
            table_age = max(0.0, self.clock() - last_ok)
        geo: Optional[Tuple[Mapping[str, Any], float]] = None
        status = getattr(self.geo, "status", None)
        if callable(status):
            now = self.wallClock()
            try:
                geo = (status(now), now)
            except Exception:
                _log.failure("GeoIP status for the metrics failed")
        extra: List[Tuple[str, str, float]] = []
        for gauge in self.extra:
            try:
                extra.append((gauge.name, gauge.doc, float(gauge.read())))
            except Exception:
                _log.failure("metrics gauge {name} failed", name=gauge.name)
        return MetricsState(
            counters=self.metrics.counters(),
            histograms=read_histograms() if read_histograms is not None else {},
            snapshot=snapshot,
            connections=dict(self.load.connections) if self.load is not None else None,
            verdicts=verdicts,
            admission=(
                (self.admission.open, self.admission.maxConnections)
                if self.admission is not None
                else None
            ),
            tableAge=table_age,
            lastReloadFailed=(
                getattr(repository, "lastError", None) is not None
                if hasattr(repository, "lastError")
                else None
            ),
            bindings=len(self.bindings) if self.bindings is not None else None,
            resolver=dict(self.resolver.stats()) if self.resolver is not None else None,
            geo=geo,
            extra=tuple(extra),
            rtts=dict(self.rtt) if self.rtt is not None else None,
        )

    def collect(self) -> Iterator[Metric]:
        """
        Every metric family, built from the parts' current state.
        """
        return self.freeze().collect()


class _Collectors:
    """
    Something C{prometheus_client}'s encoders accept: C{collect()} over
    several collectors in turn.
    """

    def __init__(self, *collectors: Any) -> None:
        self.collectors = collectors

    def collect(self) -> Iterator[Metric]:
        for collector in self.collectors:
            yield from collector.collect()


def _process_collector() -> Any:
    from prometheus_client.process_collector import ProcessCollector

    return ProcessCollector(registry=None)


def metrics_registry(collector: EdgeproxyCollector, process: bool = True) -> CollectorRegistry:
    """
    A private registry (never C{prometheus_client}'s global one) holding
    C{collector} and, with C{process}, C{prometheus_client}'s process
    collector (C{process_*}, read from C{/proc} where there is one).  To be
    collected on the reactor thread.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    if process:
        registry.register(_process_collector())
    return registry


class Exposition:
    """
    What C{/metrics} serves: L{EdgeproxyCollector}'s state (plus the
    process collector) encoded for one C{Accept} header.

    The state is frozen on the reactor thread (cheap copies); building the
    families and encoding them, the costly part (about half a second for
    10,000 backends), happens in the reactor's thread pool when
    C{threaded}, so that the data plane keeps running meanwhile (it shares
    the interpreter with that thread, in slices of a few milliseconds,
    instead of waiting for the whole scrape).  Without C{threaded} it all
    happens on the reactor thread.

    Scrapes that arrive while one is being generated share its result, and
    a result younger than C{maxAge} seconds is served again, so a flood of
    requests costs at most one generation per C{maxAge}.

    @param reactor: For its thread pool and clock (the global one when
        C{None}, looked up at the first scrape).
    """

    def __init__(
        self,
        collector: EdgeproxyCollector,
        *,
        process: bool = True,
        reactor: Any = None,
        threaded: bool = True,
        maxAge: float = 1.0,
    ) -> None:
        self.collector = collector
        self.reactor = reactor
        self.threaded = threaded
        self.maxAge = maxAge
        self._process = _process_collector() if process else None
        self._cache: Dict[str, Tuple[float, bytes]] = {}
        self._waiting: Dict[str, List[Deferred[Tuple[bytes, str]]]] = {}
        #: Generations started (for tests and the curious).
        self.generations = 0

    def __repr__(self) -> str:
        return f"<Exposition threaded={self.threaded} generations={self.generations}>"

    def _getReactor(self) -> Any:
        if self.reactor is None:
            from twisted.internet import reactor

            self.reactor = reactor
        return self.reactor

    def render(self, accept: str) -> "Deferred[Tuple[bytes, str]]":
        """
        The exposition for a scraper that sent C{accept} (C{""}: none), as
        C{(body, content type)}.  Fails only if the encoder raised (a bug).
        """
        encoder, content_type = choose_encoder(accept)
        reactor = self._getReactor()
        now = reactor.seconds()
        cached = self._cache.get(content_type)
        if cached is not None and now - cached[0] < self.maxAge:
            return succeed((cached[1], content_type))
        result: Deferred[Tuple[bytes, str]] = Deferred()
        waiting = self._waiting.get(content_type)
        if waiting is not None:
            waiting.append(result)
            return result
        waiting = self._waiting[content_type] = [result]
        self.generations += 1
        try:
            state = self.collector.freeze()
        except Exception:
            body: Deferred[bytes] = fail()
        else:
            target = _Collectors(state, self._process) if self._process is not None else state
            if self.threaded:
                body = deferToThreadPool(reactor, reactor.getThreadPool(), encoder, target)
            else:
                body = maybeDeferred(encoder, target)

        def done(outcome: Union[bytes, Failure]) -> None:
            del self._waiting[content_type]
            if isinstance(outcome, Failure):
                _log.failure("metrics exposition failed", outcome)
                for d in waiting:
                    d.errback(outcome)
                return
            self._cache[content_type] = (reactor.seconds(), outcome)
            for d in waiting:
                d.callback((outcome, content_type))

        body.addBoth(done)
        return result


def prune_backend_counters(
    metrics: IMetricsStore,
    backend_ids: Container[str],
    names: Iterable[str] = PER_BACKEND_COUNTERS,
) -> int:
    """
    Forget the store counters labelled with a backend id that is not in
    C{backend_ids} (the routing table's ids), for each counter in C{names}.
    A store without C{retain} (not a L{edgeproxy.metrics.MetricsStore}) is
    left alone; the collector filters those series anyway.

    @return: How many counters were dropped.
    """
    retain = getattr(metrics, "retain", None)
    if retain is None:
        return 0
    return sum(int(retain(name, backend_ids)) for name in names)


def backend_counter_pruner(metrics: IMetricsStore) -> SnapshotListener:
    """
    A L{SnapshotListener} (for L{IBackendRepository.addListener}) that
    calls L{prune_backend_counters} with the new table's ids after every
    reload that changes the table.
    """

    def prune(old: RoutingSnapshot, new: RoutingSnapshot) -> None:
        prune_backend_counters(metrics, new.by_id)

    return prune
