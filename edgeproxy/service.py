"""
The edgeproxy service tree, built from ready parts.

L{build_service} is what C{twistd edgeproxy} runs (through
L{edgeproxy.tap.makeService}), and what another Twisted application calls to
embed the proxy with its own repository, geo resolver or metrics::

    from twisted.application.service import Application
    from edgeproxy.service import build_service

    application = Application("my-edge")
    build_service(reactor=reactor, ...).setServiceParent(application)

The tree is one L{StreamServerEndpointService} per listener plus two
L{TimerService}s (routing table reload, binding GC) whose callables never
raise, so one failure never stops a periodic job.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

import edgeproxy
from edgeproxy.config import ListenerSpec, ProxySettings
from edgeproxy.interfaces import (
    UNAVAILABLE,
    IBackendRepository,
    IBackendWriter,
    IBindingRepository,
    IGeoResolver,
    IHostResolver,
    IMetricsStore,
    IRouter,
)
from edgeproxy.model import RoutingSnapshot
from edgeproxy.net.backendops import BackendOperations
from edgeproxy.net.lean import LeanEndpoint
from edgeproxy.routing.admin import AdminState, AdminStates
from edgeproxy.routing.router import Router
from edgeproxy.stores.statefile import StateFile

if TYPE_CHECKING:
    from edgeproxy.net.endpoints import TrustedSender

_log = Logger()


#: Names of the children of an L{EdgeProxyService}, for C{getServiceNamed}.
RELOAD_SERVICE = "routing-reload"
GC_SERVICE = "binding-gc"
RESOLVE_SERVICE = "resolve-hosts"
STATE_SERVICE = "state-file"
HEALTH_SERVICE = "health-checks"
LIMITER_SERVICE = "client-limits"
ADMIN_SERVICE = "admin"
DNS_SERVICE = "dns"
STATUS_SERVICE = "status-samples"
HEARTBEAT_SERVICE = "heartbeats"
GEO_SERVICE = "geoip-reload"


def listener_service_name(index: int) -> str:
    """
    The service name of the C{index}-th listener (0-based).
    """
    return f"listener-{index}"


class EdgeProxyService(MultiService):
    """
    The running proxy: listeners plus the periodic jobs.

    @ivar factories: One L{edgeproxy.net.proxy.ProxyFactory} per listener, in
        listener order.
    @ivar listeners: The L{ListenerSpec}s, in the same order.
    @ivar metrics: The metrics store every factory counts into.
    @ivar repository: The routing table.
    @ivar bindings: The client bindings.
    @ivar router: The router every factory asks.
    @ivar admission: The admission every listener goes through (set by
        L{build_service}).
    """

    def __init__(
        self,
        *,
        clock: IReactorTime,
        repository: IBackendRepository,
        bindings: IBindingRepository,
        geo: Optional[IGeoResolver],
        metrics: IMetricsStore,
        router: IRouter,
        region: Optional[str] = None,
        geo_description: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.clock = clock
        self.repository = repository
        self.bindings = bindings
        self.geo = geo
        self.metrics = metrics
        self.router = router
        self.region = region
        self.geo_description = geo_description
        self.factories: List[Any] = []
        self.admission: Any = None
        self.resolver: Any = None
        self.live: Any = None
        self.admin: Any = None
        self.operations: Any = None
        self.stateFile: Any = None
        self.health: Any = None
        self.accessLog: Any = None
        self.adminSite: Any = None
        self.pops: Any = None
        self.status: Any = None
        self.collector: Any = None
        self.supervisor: Any = None
        self.api: Any = None
        self.adminDescription: Optional[str] = None
        #: The L{edgeproxy.geo.GeoDatabaseWatcher}, if the geo file is watched.
        self.geoWatcher: Any = None
        #: Seconds a graceful shutdown waits for open connections.
        self.shutdownTimeout = 30.0
        self.listeners: List[ListenerSpec] = []
        self._summaryLogged = False

    def privilegedStartService(self) -> None:
        """
        Log the startup summary, then bind the listeners.

        @raise SystemExit: with a one-line reason if a listener cannot be
            bound (the port is taken, the address is not local...).
        """
        self._logSummary()
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            raise SystemExit(f"edgeproxy: {e}") from None

    def startService(self) -> None:
        self._logSummary()
        super().startService()
        admin = self.namedServices.get(ADMIN_SERVICE)
        waiting = getattr(admin, "_waitingForPort", None)
        if isinstance(waiting, Deferred):

            def listening(port: Any) -> Any:
                address = port.getHost()
                _log.info(
                    "admin listener on {host}:{port} (/metrics, /health)",
                    host=getattr(address, "host", address),
                    port=getattr(address, "port", ""),
                )
                return port

            waiting.addCallback(listening)

    def stopService(self) -> "Deferred[None]":
        """
        The graceful shutdown (FAULTS F15): stop accepting at once (every
        listener stops listening first), let open connections finish for
        up to C{shutdownTimeout} seconds, then close the rest (cause
        C{shutdown}, how many logged), then stop the periodic jobs.  The
        returned L{Deferred} holds the reactor's shutdown until then.
        """
        Service.stopService(self)
        # The data-plane listeners stop at once; the admin listener stays up
        # (for /metrics and /health) until the connections are drained.
        listeners = [
            s
            for s in self
            if isinstance(s, StreamServerEndpointService) and s.name != ADMIN_SERVICE
        ]
        others = [s for s in reversed(list(self)) if s not in listeners]
        stopping: Deferred[Any] = gatherResults(
            [maybeDeferred(s.stopService) for s in listeners], consumeErrors=True
        )
        stopping.addErrback(lambda f: _log.failure("stopping a listener failed", f))
        stopping.addCallback(lambda _: self._drain())
        stopping.addErrback(lambda f: _log.failure("draining connections failed", f))

        def rest(_: object) -> "Deferred[Any]":
            return gatherResults([maybeDeferred(s.stopService) for s in others], consumeErrors=True)

        stopping.addCallback(rest)
        stopping.addErrback(lambda f: _log.failure("stopping a periodic job failed", f))
        stopping.addCallback(lambda _: None)
        return stopping

    def _drain(self) -> "Deferred[None]":
        live = self.live
        if live is None or not live:
            return succeed(None)
        timeout = self.shutdownTimeout
        _log.info(
            "stopped accepting; waiting up to {timeout}s for {count} open connections",
            timeout=timeout,
            count=len(live),
        )
        done: Deferred[None] = Deferred()
        started = self.clock.seconds()

        def finished(_: object) -> None:
            if not call.active():
                return  # the deadline came first and does the rest
            call.cancel()
            if not done.called:
                _log.info(
                    "all connections finished after {elapsed}s",
                    elapsed=round(self.clock.seconds() - started, 3),
                )
                done.callback(None)

        def deadline() -> None:
            cut = live.abortAll("shutdown")
            _log.warn(
                "shutdown deadline of {timeout}s reached: closed {cut} connections",
                timeout=timeout,
                cut=cut,
            )
            # The aborted connections end in the next reactor turns: give
            # them a moment, so that their log lines (and access-log
            # records) are written before the periodic jobs stop.
            settle = self.clock.callLater(2.0, lambda: None if done.called else done.callback(None))

            def settled(_: object) -> None:
                if settle.active():
                    settle.cancel()
                if not done.called:
                    done.callback(None)

            live.whenEmpty().addCallback(settled)

        call = self.clock.callLater(timeout, deadline)
        live.whenEmpty().addCallback(finished)
        return done

    def _logSummary(self) -> None:
        if self._summaryLogged:
            return
        self._summaryLogged = True
        snapshot = self.repository.current()
        _log.info(
            "edgeproxy {version} starting: region {region}, {backends} backends "
            "({routable} routable) in the routing table, geo database {geo}, "
            "listeners {listeners}, admin {admin}",
            version=edgeproxy.__version__,
            region=self.region if self.region is not None else "(not given)",
            backends=len(snapshot.backends),
            routable=len(snapshot.routable),
            geo=self.geo_description
            if self.geo_description is not None
            else ("none" if self.geo is None else "(not described)"),
            listeners=", ".join(
                s.description if s.app is None else f"{s.app}={s.description}"
                for s in self.listeners
            ),
            admin=self.adminDescription or "none",
        )

    def reloadRoutingTable(self) -> "Deferred[None]":
        """
        Reload the routing table; the periodic job.  Never fails: a failure
        (which the repository should already absorb) is logged and the last
        good table stays in force.
        """
        d: Deferred[Any] = maybeDeferred(self.repository.reload)

        def failed(failure: Failure) -> None:
            _log.failure("routing table reload failed; keeping the last good table", failure)

        d.addCallbacks(lambda _: None, failed)
        pops = self.pops
        if pops is not None:
            # The POPs table (for the geo DNS) lives in the same database.
            both: Deferred[Any] = gatherResults([d, maybeDeferred(pops.reload)], consumeErrors=True)
            both.addErrback(lambda f: _log.failure("POPs table reload failed", f))
            both.addCallback(lambda _: None)
            return both
        return d

    def collectBindings(self) -> None:
        """
        Free expired bindings; the periodic job.  Never raises.
        """
        try:
            freed = self.bindings.collect(self.clock.seconds())
        except Exception:
            _log.failure("binding GC failed; will try again")
            return
        if freed:
            _log.debug(
                "binding GC freed {freed} expired bindings, {left} left",
                freed=freed,
                left=len(self.bindings),
            )

    def routingTableChanged(self, old: RoutingSnapshot, new: RoutingSnapshot) -> None:
        """
        Repository listener: forget the bindings of every backend that was
        routable and no longer is (removed, deleted, unhealthy, draining).
        Open connections to it are not touched.  Never raises.
        """
        try:
            gone = [bid for bid in old.routable if bid not in new.routable]
            if not gone:
                return
            freed = self.bindings.removeBackends(frozenset(gone))
            for backend_id in gone:
                _log.info(
                    "backend {backend} no longer routable: {freed} bindings cleared",
                    backend=backend_id,
                    freed=freed.get(backend_id, 0),
                )
        except Exception:
            _log.failure("clearing bindings after a routing table change failed")

    def backendStateChanged(self, backend_id: str, old: int, new: int) -> None:
        """
        State overlay listener: a backend that became unavailable (health
        down, breaker open, maintenance) loses its bindings, at a cost
        proportional to how many it had; one closed to new clients only
        (drain) keeps them.  Never raises.
        """
        if new != UNAVAILABLE or old == UNAVAILABLE:
            return
        try:
            freed = self.bindings.removeBackend(backend_id)
        except Exception:
            _log.failure("clearing bindings of {backend} failed", backend=backend_id)
            return
        if freed:
            _log.info(
                "backend {backend} unavailable: {freed} bindings cleared",
                backend=backend_id,
                freed=freed,
            )


def build_service(
    *,
    reactor: Any,
    repository: IBackendRepository,
    bindings: IBindingRepository,
    geo: Optional[IGeoResolver],
    metrics: IMetricsStore,
    router: IRouter,
    listeners: Sequence[ListenerSpec],
    settings: ProxySettings,
    trusted: Sequence[TrustedSender],
    header_timeout: float,
    tls_handshake_timeout: float,
    db_reload: float,
    binding_gc: float,
    region: Optional[str] = None,
    geo_description: Optional[str] = None,
    resolver: Optional[IHostResolver] = None,
    shutdown_timeout: float = 30.0,
    admin_states: Optional[AdminStates] = None,
    state_file: Optional[StateFile] = None,
    state_poll: float = 1.0,
    health_checker: Optional[Any] = None,
    access_log: Optional[Any] = None,
    client_limiter: Optional[Any] = None,
    admin: Optional[str] = None,
    dns: Optional[Any] = None,
    pops: Optional[Any] = None,
    api_tokens: Optional[Any] = None,
    heartbeat_ttl: float = 30.0,
    regions: Optional[Any] = None,
    writer: Optional[Any] = None,
    store_services: Sequence[IService] = (),
    geo_poll: Optional[float] = 5.0,
    socket_endpoints: Optional[Sequence[Any]] = None,
    steerings: Optional[Sequence[Any]] = None,
) -> EdgeProxyService:
    """
    Assemble the proxy from ready parts.  Nothing starts until the returned
    service does; the repository should already hold its first table
    (C{loadInitial} for SQLite).

    @param reactor: Used for listening, connecting and as the clock of the
        periodic jobs.
    @param listeners: One listener per spec, each with its own
        L{edgeproxy.net.proxy.ProxyFactory}; the factories share one
        L{edgeproxy.net.proxy.ConnectionTable} of live sessions (one idle
        sweep covers them all) and one L{edgeproxy.net.admission.Admission}
        that every listener's socket-level factory goes through, so
        C{settings.max_connections} is a global cap across every listener,
        enforced at accept time before any TLS or PROXY header work.
    @param trusted: Senders allowed to send PROXY headers on C{haproxy:}
        listeners.
    @param db_reload: Seconds between routing table reloads.
    @param binding_gc: Seconds between sweeps of expired bindings.
    @param region: This POP's region, for the startup log line only
        (default: the router's C{local_region}, if it has one).
    @param geo_description: What geo database is in use, for the startup
        log line only (default: C{geo.describe()}, if it has that).
    @param admin_states: The operator's admin states (ready / drain /
        maint per backend); default an empty set on the router's overlay.
        Their effects on open connections and bindings are wired here
        (L{edgeproxy.net.backendops}).
    @param state_file: Where the admin states are kept (already loaded);
        polled every C{state_poll} seconds for changes made by another
        process (C{edgeproxy-ctl state}).
    @param admin: The endpoint description of the admin HTTP listener
        (C{/metrics}, C{/health}; see L{edgeproxy.control.admin}), e.g.
        C{tcp:8090:interface=127.0.0.1}; C{None} or C{"none"} for none.
    @param api_tokens: The admin API's bearer tokens
        (L{edgeproxy.control.auth.load_tokens}), or C{None}: every write is
        refused, reads are open only on a loopback admin listener.
    @param heartbeat_ttl: Seconds after its last heartbeat a registered
        backend stops taking new connections.
    @param regions: The country -> region table (its region names are the
        regions a registration may name), default the built-in one.
    @param writer: The store's write port (L{IBackendWriter}) for the
        registration API; default the repository itself if it provides it,
        or a L{edgeproxy.stores.sqlite.SqliteBackendWriter} on a SQLite
        repository.
    @param geo_poll: Seconds between checks of the geo database file, when
        C{geo} is an L{edgeproxy.geo.GeoIPResolver} with a C{path}: a
        L{edgeproxy.geo.GeoDatabaseWatcher} reloads it when it changes
        (C{geoip-reload} service; C{top.geoWatcher}); C{None} for no
        reloads.
    @param store_services: Services the store needs running with the proxy
        (L{edgeproxy.stores.open.Store.services}: a change listener, a
        watch); children of the returned service.
    @param dns: The internal geo DNS service (L{edgeproxy.control.dns.dns_service}),
        or C{None}; it runs with the proxy.
    @param pops: The POPs table (L{edgeproxy.stores.pops.SqlitePopRepository}),
        reloaded with the routing table.
    @param client_limiter: An L{edgeproxy.net.limits.ClientLimiter} (per
        client concurrent connections and connection rate) consulted by the
        admission for every client, or C{None}; swept every 10 seconds.
    @param access_log: An L{edgeproxy.net.accesslog.AccessLog} given one
        JSON record per finished connection, flushed every second and
        reopened on SIGUSR1 while the service runs; C{None} for none.
    @param health_checker: An L{edgeproxy.net.health.HealthChecker} feeding
        the router's overlay, or C{None} for no active checks; it follows
        the repository and runs while the service runs.  Its RTT table
        becomes the router's C{rtt} input when the router has none.
    @param shutdown_timeout: Seconds a graceful shutdown (stopping the
        service) lets open connections finish before closing them.
    @param resolver: Where backend host names get their addresses; default
        a L{edgeproxy.net.resolve.HostResolver} on C{reactor} that follows the
        repository (names resolved in the background when they appear,
        refreshed every few seconds past their TTL).  Call its
        C{resolveBlocking} before starting for names present at startup.
    @param socket_endpoints: Per listener, the endpoint that listens instead
        of the one its description names (a worker's inherited socket,
        L{edgeproxy.net.workers.AdoptedPortEndpoint}); C{None}: as described.
    @param steerings: Per listener, what passes a PROXY-header connection to
        the worker that owns its client (L{edgeproxy.net.workers.ListenerSteering}).
    """
    from edgeproxy.net.admission import Admission
    from edgeproxy.net.endpoints import server_endpoint
    from edgeproxy.net.proxy import ConnectionTable, ProxyFactory
    from edgeproxy.net.resolve import HostResolver

    if region is None:
        region = getattr(router, "local_region", None)
    if geo_description is None and geo is not None:
        describe = getattr(geo, "describe", None)
        geo_description = describe() if callable(describe) else None
    top = EdgeProxyService(
        clock=reactor,
        repository=repository,
        bindings=bindings,
        geo=geo,
        metrics=metrics,
        router=router,
        region=region,
        geo_description=geo_description,
    )
    if resolver is None:
        resolver = HostResolver(reactor)
    top.resolver = resolver
    if access_log is not None:
        from edgeproxy.net.accesslog import AccessLogService

        # Before the listeners: it stops after them (and after the graceful
        # shutdown), so the connections they close are logged.
        AccessLogService(access_log).setServiceParent(top)
        top.accessLog = access_log
    live = ConnectionTable()
    top.live = live
    watched: set[str] = set()
    top.shutdownTimeout = shutdown_timeout
    admission = Admission(
        settings.max_connections,
        metrics,
        client_limiter,
        getattr(router, "ipv6_prefix", 64),
    )
    if admission.limiter is not None:
        sweep = TimerService(10.0, admission.limiter.sweep)
        sweep.clock = reactor
        sweep.setName(LIMITER_SERVICE)
        sweep.setServiceParent(top)
    top.admission = admission
    for index, spec in enumerate(listeners):
        endpoint = server_endpoint(
            reactor,
            spec.description,
            metrics=metrics,
            trusted=trusted,
            header_timeout=header_timeout,
            tls_handshake_timeout=tls_handshake_timeout,
            admission=admission,
            socket_endpoint=socket_endpoints[index] if socket_endpoints else None,
            steering=steerings[index] if steerings else None,
        )
        if settings.lean and not any(layer in spec.description for layer in ("haproxy:", "txsni:")):
            # A plain TCP listener: its clients are lean transports.
            endpoint = LeanEndpoint(endpoint, settings.keepalive)
        factory_class: Any = ProxyFactory
        factory_args: Dict[str, Any] = {}
        if spec.passthrough:
            from edgeproxy.net.sni import SniProxyFactory

            factory_class = SniProxyFactory
            factory_args = {"repository": repository, "helloTimeout": tls_handshake_timeout}
        factory = factory_class(
            router,
            reactor,
            settings,
            metrics,
            app=spec.app,
            connections=live,
            admission=admission,
            admitsPeers=False,
            resolver=resolver,
            **factory_args,
        )
        factory.accessLog = access_log
        # Without a PROXY header the socket peer is the client: its limits
        # were applied at accept, by the listener's admission.
        factory.clientsAdmittedAtAccept = "haproxy:" not in spec.description
        listener = StreamServerEndpointService(endpoint, factory)
        # As twisted.application.strports.service does: a port that cannot
        # be bound fails startup instead of leaving a proxy that listens on
        # nothing.
        listener._raiseSynchronously = True
        listener.setName(listener_service_name(index))
        listener.setServiceParent(top)
        top.factories.append(factory)
        top.listeners.append(spec)

    if any(spec.passthrough for spec in listeners):
        from edgeproxy.model import RoutingSnapshot
        from edgeproxy.net.sni import log_sni_conflicts

        log_sni_conflicts(RoutingSnapshot.empty(), repository.current())
        repository.addListener(log_sni_conflicts)

    reload = TimerService(db_reload, top.reloadRoutingTable)
    reload.clock = reactor
    reload.setName(RELOAD_SERVICE)
    reload.setServiceParent(top)

    gc = TimerService(binding_gc, top.collectBindings)
    gc.clock = reactor
    gc.setName(GC_SERVICE)
    gc.setServiceParent(top)

    refresh = getattr(resolver, "refresh", None)
    if callable(refresh):
        refreshing = TimerService(getattr(resolver, "retry", 5.0), refresh)
        refreshing.clock = reactor
        refreshing.setName(RESOLVE_SERVICE)
        refreshing.setServiceParent(top)

    repository.addListener(top.routingTableChanged)
    repository.addListener(resolver.routingTableChanged)
    breaker = getattr(router, "breaker", None)
    if breaker is not None:
        repository.addListener(breaker.routingTableChanged)
    overlay = getattr(router, "overlay", None)
    if overlay is not None:
        overlay.addListener(top.backendStateChanged)
        if admin_states is None:
            admin_states = AdminStates(overlay)
    if admin_states is not None:
        operations = BackendOperations(
            reactor, live, bindings, watched, getattr(router, "ipv6_prefix", 64)
        )
        for factory in top.factories:
            factory.watched = watched
            factory.watcher = operations
        admin_states.addListener(operations.changed)
        for backend_id, state in admin_states.all().items():
            operations.changed(backend_id, AdminState(), state)
        top.admin = admin_states
        top.operations = operations
    if health_checker is not None:
        if isinstance(router, Router) and router.rtt is None:
            # The checks' connect RTTs are the router's RTT input (issue 13).
            router.rtt = health_checker.rtts
        health_checker.update(repository.current())
        repository.addListener(health_checker.routingTableChanged)
        health_checker.setName(HEALTH_SERVICE)
        health_checker.setServiceParent(top)
        top.health = health_checker
    if dns is not None:
        dns.setName(DNS_SERVICE)
        dns.setServiceParent(top)
    top.pops = pops
    top.stateFile = state_file
    for extra in store_services:
        extra.setServiceParent(top)
    if admin is not None and admin.strip().lower() != "none":
        _addAdmin(
            top,
            reactor,
            admin,
            repository,
            router,
            bindings,
            metrics,
            resolver,
            api_tokens,
            heartbeat_ttl,
            regions,
            writer,
        )
    repository.addListener(_pruner(metrics))
    from edgeproxy.geo import GeoDatabaseWatcher, GeoIPResolver

    if geo_poll is not None and isinstance(geo, GeoIPResolver) and geo.path:
        watcher = GeoDatabaseWatcher(geo, reactor, metrics)
        watching = TimerService(geo_poll, watcher.check)
        watching.clock = reactor
        watching.setName(GEO_SERVICE)
        watching.setServiceParent(top)
        top.geoWatcher = watcher
    if state_file is not None:
        poll = TimerService(state_poll, state_file.poll)
        poll.clock = reactor
        poll.setName(STATE_SERVICE)
        poll.setServiceParent(top)
        top.stateFile = state_file
    return top


def _pruner(metrics: IMetricsStore) -> Any:
    from edgeproxy.control.metrics import backend_counter_pruner

    return backend_counter_pruner(metrics)


def _addAdmin(
    top: EdgeProxyService,
    reactor: Any,
    description: str,
    repository: IBackendRepository,
    router: IRouter,
    bindings: IBindingRepository,
    metrics: IMetricsStore,
    resolver: Any,
    tokens: Any,
    heartbeat_ttl: float,
    regions: Any,
    writer: Any = None,
) -> None:
    """
    The admin HTTP listener: Prometheus metrics of every part, a health
    page, the registration and admin API, and the live status page.
    """
    from edgeproxy.control.admin import admin_endpoint, admin_site
    from edgeproxy.control.metrics import EdgeproxyCollector, Exposition

    collector = EdgeproxyCollector(
        metrics,
        repository=repository,
        load=getattr(router, "load", None),
        overlay=getattr(router, "overlay", None),
        bindings=bindings,
        admission=top.admission,
        resolver=resolver,
        clock=reactor.seconds,
        geo=top.geo,
        rtt=getattr(top.health, "rtts", None),
    )

    def health() -> dict[str, Any]:
        snapshot = repository.current()
        return {
            "region": top.region,
            "backends": len(snapshot.backends),
            "routable": len(snapshot.routable),
            "open_connections": top.admission.open if top.admission is not None else None,
            "routing_table_error": getattr(repository, "lastError", None),
            **({"workers": top.supervisor.describe()} if top.supervisor is not None else {}),
        }

    top.collector = collector
    site = admin_site(
        Exposition(collector, reactor=reactor), health=health, reactor=reactor, metrics=metrics
    )
    from edgeproxy.control.api import Api, install_api, known_regions
    from edgeproxy.control.auth import ApiAuth
    from edgeproxy.control.status import SAMPLE_INTERVAL, StatusData, mount_guarded
    from edgeproxy.routing.heartbeats import HeartbeatExpiry

    overlay = getattr(router, "overlay", None)
    expiry = None
    if overlay is not None:
        expiry = HeartbeatExpiry(repository, overlay, reactor, ttl=heartbeat_ttl)
        repository.addListener(expiry.routingTableChanged)
        checking = TimerService(1.0, expiry.check)
        checking.clock = reactor
        checking.setName(HEARTBEAT_SERVICE)
        checking.setServiceParent(top)
    from edgeproxy.stores.sqlite import SqliteBackendRepository, SqliteBackendWriter

    if writer is not None:
        pass
    elif IBackendWriter.providedBy(repository):
        writer = repository
    elif isinstance(repository, SqliteBackendRepository):
        writer = SqliteBackendWriter(repository)
    if regions is None:
        from edgeproxy.geo import DEFAULT_REGIONS

        regions = DEFAULT_REGIONS
    auth = ApiAuth.forListener(description, tokens, metrics)
    api = Api(
        auth=auth,
        repository=repository,
        clock=reactor,
        writer=writer,
        router=router,
        admin=top.stateFile if top.stateFile is not None else top.admin,
        overlay=overlay,
        health=top.health,
        breaker=getattr(router, "breaker", None),
        load=getattr(router, "load", None),
        expiry=expiry,
        regions=known_regions(regions),
        local_region=top.region,
        metrics=metrics,
    )

    status = StatusData(
        repository=repository,
        load=getattr(router, "load", None),
        overlay=getattr(router, "overlay", None),
        checker=top.health,
        breaker=getattr(router, "breaker", None),
        admin=top.admin,
        bindings=bindings,
        admission=top.admission,
        metrics=metrics,
        region=top.region,
        clock=reactor.seconds,
        geo=top.geo,
        rttWeight=getattr(router, "rtt_weight", 0.0),
    )
    repository.addListener(status.routingTableChanged)
    sampling = TimerService(SAMPLE_INTERVAL, status.sample)
    sampling.clock = reactor
    sampling.setName(STATUS_SERVICE)
    sampling.setServiceParent(top)
    mount_guarded(site.resource, install_api(site.resource, api), status, auth)
    top.status = status
    top.api = api
    endpoint = admin_endpoint(reactor, description)
    listener = StreamServerEndpointService(endpoint, site)  # type: ignore[arg-type]
    listener._raiseSynchronously = True
    listener.setName(ADMIN_SERVICE)
    listener.setServiceParent(top)
    top.adminSite = site
    top.adminDescription = description


__all__ = [
    "ADMIN_SERVICE",
    "GC_SERVICE",
    "GEO_SERVICE",
    "HEALTH_SERVICE",
    "RELOAD_SERVICE",
    "RESOLVE_SERVICE",
    "STATE_SERVICE",
    "EdgeProxyService",
    "build_service",
    "listener_service_name",
]
