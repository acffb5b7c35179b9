"""
Active health checks (SPEC section 9): an adapter that probes every backend
and feeds the verdicts to the state overlay.

The routing table's C{healthy} column is the operator's word on a backend;
the checks are the proxy's own.  A backend takes new clients only when both
say yes: a backend the checks find down gets the verdict C{UNAVAILABLE}
from the source L{SOURCE} (C{"health"}) in the L{IStateOverlay}, and the
verdict is cleared when it comes back.  Nothing is written to the table and
no routing snapshot is rebuilt.

Checks (L{edgeproxy.model.parse_check}; C{--health-check} is the default, the
C{health_check} column overrides it per backend):

  - C{tcp}: a TCP connect, closed as soon as it succeeds;
  - C{http:/path}: C{GET /path} with treq; a status in 200-399 is up,
    anything else (or no answer) is down.  Redirects are never followed (a
    302 is an answer from the backend, and the host it points to gets no
    request).  The body is read and thrown away (64 KiB at most, then the
    connection is closed), and no connection is kept: each check connects
    afresh, as the proxy does;
  - C{off}: never checked; always up.

Rise and fall, as HAProxy counts them: each backend has a health counter
from 0 to C{rise + fall - 1}; a backend is up while it is at least C{rise}.
A passed check adds one, a failed check takes one away while the backend is
up, and sends the counter back to 0 while it is down.  So a backend that is
up goes down after C{fall} more failed checks than passed ones, and one that
is down comes back after C{rise} passed checks in a row.  A backend whose
checks flap (pass, fail, pass...) therefore keeps its state (FAULTS F17):
its clients' bindings, which the service drops when the overlay makes a
backend unavailable, are dropped once when it really goes down, never on a
single failed check.

A backend new to the checker (at startup, or when it enters the table) is
I{unknown}: routable at once, with a full counter, so that it goes down only
after C{fall} failed checks -- an operator adding a backend expects it to
take traffic, and a dead one costs at most C{fall} intervals of failed-over
connects.  (HAProxy starts a server up too, but one failed check away from
down.)  Its first passed check makes it I{up}.  Only the changes that change
routing (up or unknown to down, down to up) are logged, once each, with the
reason of the check that decided them ("connection refused", "timeout after
1s", "HTTP 503").

Connect RTT: every check that connects times its TCP connect, and the
checks that pass feed each backend's L{RttEstimate} (a moving average of
the median of the last three connect times, so that one slow probe does
not count).  L{HealthChecker.rtts} is the live table of estimates that the
router weighs inside a geo tier (C{--rtt-weight}, issue 13).

Scheduling: each backend's first check is at a random moment within the
first interval, and every later one an interval (give or take 10%, at
random) after the previous one ended, so that the checks spread out (as
HAProxy's C{spread-checks} does) and no two backends stay in step.  A check
that has not finished after C{timeout} is cancelled and counts as failed.

Wiring::

    checker = HealthChecker(
        reactor, router.overlay, default=parse_check("tcp"),
        interval=2.0, timeout=1.0, rise=2, fall=3,
        resolver=resolver, metrics=metrics,
    )
    checker.update(repository.current())        # the table at startup
    repository.addListener(checker.routingTableChanged)
    checker.setServiceParent(top)               # start() / stop() with it
"""

from __future__ import annotations

import errno
import os
import random
from collections import deque
from typing import Any, Callable, Deque, Dict, Mapping, Optional, Union

import attrs
from treq.client import HTTPClient
from twisted.application.service import Service
from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IDelayedCall, IProtocol, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IResponse
from zope.interface import implementer

import edgeproxy
from edgeproxy.interfaces import (
    AVAILABLE,
    UNAVAILABLE,
    IHostResolver,
    IMetricsStore,
    IStateOverlay,
)
from edgeproxy.model import (
    CHECK_HTTP,
    CHECK_OFF,
    CHECK_TCP,
    Backend,
    HealthCheckSpec,
    RoutingSnapshot,
    parse_check,
)
from edgeproxy.routing.load import RttTable

__all__ = [
    "BODY_LIMIT",
    "CHECK_HTTP",
    "CHECK_OFF",
    "CHECK_TCP",
    "DOWN",
    "JITTER",
    "OFF",
    "RTT_ALPHA",
    "RTT_WINDOW",
    "SOURCE",
    "TCP_CHECK",
    "UNKNOWN",
    "UP",
    "HealthCheckSpec",
    "HealthChecker",
    "HealthStatus",
    "Probe",
    "ProbeResult",
    "Prober",
    "RttEstimate",
    "parse_check",
]

_log = Logger()

#: The state overlay source of the health checks' verdicts.
SOURCE = "health"

#: States of a checked backend (see L{HealthChecker.state}).
UNKNOWN = "unknown"
UP = "up"
DOWN = "down"
OFF = "off"

#: The default check: a TCP connect.
TCP_CHECK = HealthCheckSpec(CHECK_TCP)

#: Weight of the newest (median-filtered) connect time in the RTT moving
#: average.
RTT_ALPHA = 0.3

#: Connect times kept per backend for the median filter of the RTT.
RTT_WINDOW = 3

#: Later checks come every interval times a factor drawn in 1 +- this.
JITTER = 0.1

#: At most this much of an HTTP check's response body is read; past it the
#: connection is closed.
BODY_LIMIT = 65536

_USER_AGENT = f"edgeproxy-health-check/{edgeproxy.__version__}"


@attrs.frozen(slots=True)
class ProbeResult:
    """
    What one check found.

    @ivar up: Whether the backend passed.
    @ivar reason: Why, in a few words for the log: C{"connected"},
        C{"HTTP 200"}, C{"connection refused"}, C{"HTTP 503"}...
    @ivar connect_time: Seconds the TCP connect took, when it succeeded
        (even if the check then failed, say on an HTTP 503), else C{None}.
    """

    up: bool
    reason: str
    connect_time: Optional[float] = None


Probe = Callable[[Backend, HealthCheckSpec], "Deferred[ProbeResult]"]
"""
How a backend is checked: C{probe(backend, spec)} fires with a
L{ProbeResult}.  It should not fail (a failure counts as a failed check and
is logged as a bug), and cancelling the L{Deferred} must abandon the check
and free its connection.  L{Prober} is the real one.
"""


@attrs.frozen(slots=True)
class HealthStatus:
    """
    Everything the checker knows about one backend (for a status page).

    @ivar state: L{UNKNOWN}, L{UP}, L{DOWN} or L{OFF}.
    @ivar check: The check in use, in text form (C{tcp}, C{http:/healthz}).
    @ivar reason: The reason of the last check's result, or C{None} before
        the first one.
    @ivar since: When the backend entered C{state} (for L{UNKNOWN} and
        L{OFF}: when the checker started following it), reactor seconds.
    @ivar last_check: When the last check ended, or C{None}.
    @ivar health: The rise/fall counter, 0 to C{rise + fall - 1}.
    @ivar rtt: The moving average of the TCP connect time, or C{None}.
    """

    state: str
    check: str
    reason: Optional[str]
    since: float
    last_check: Optional[float]
    health: int
    rtt: Optional[float]


# --- probing ------------------------------------------------------------------


class _QuietFactory(Factory):
    """
    Wraps the protocol factory of one connect attempt: notes when the
    connection is made (for the connect time) and logs nothing (the wrapped
    factory's start/stop, which Twisted logs for every connection, are not
    called; neither the HTTP client's factory nor L{_Hangup}'s needs them).
    """

    noisy = False

    def __init__(self, wrapped: Any, connected: Callable[[], None]) -> None:
        self.wrapped = wrapped
        self.connected = connected

    def buildProtocol(self, addr: Any) -> Optional[Protocol]:
        self.connected()
        protocol: Optional[Protocol] = self.wrapped.buildProtocol(addr)
        return protocol


@implementer(IStreamClientEndpoint, IAgentEndpointFactory)
class _TimedEndpoint:
    """
    A TCP client endpoint to one address that measures how long the connect
    took; also the endpoint factory of a one-request L{Agent} (whatever the
    URL says, it connects here).

    @ivar connectTime: Seconds the last connect took, or C{None}.
    """

    def __init__(self, reactor: Any, address: str, port: int, timeout: float) -> None:
        self.reactor = reactor
        self.address = address
        self.port = port
        self.timeout = timeout
        self.connectTime: Optional[float] = None

    def connect(self, protocolFactory: Any) -> "Deferred[IProtocol]":
        started = self.reactor.seconds()

        def connected() -> None:
            self.connectTime = max(0.0, self.reactor.seconds() - started)

        # connectTCP takes IPv4 and IPv6 literals (and names, which it
        # resolves itself): the address comes from the host resolver.
        endpoint = TCP4ClientEndpoint(self.reactor, self.address, self.port, timeout=self.timeout)
        return endpoint.connect(_QuietFactory(protocolFactory, connected))

    def endpointForURI(self, uri: Any) -> "_TimedEndpoint":
        return self


class _Hangup(Protocol):
    """
    The TCP check's protocol: hangs up as soon as it is connected.
    """

    def connectionMade(self) -> None:
        self.transport.abortConnection()  # type: ignore[union-attr]


class _Discard(Protocol):
    """
    Reads an HTTP response body and throws it away; past L{BODY_LIMIT}
    bytes it closes the connection.  C{done} fires when the body is over.
    """

    def __init__(self) -> None:
        self.size = 0
        self.done: Deferred[None] = Deferred(lambda _: self.stop())

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > BODY_LIMIT:
            self.stop()

    def stop(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.done.called:
            self.done.callback(None)


def _hostHeader(host: str, port: int) -> str:
    """
    The C{Host} header for a backend: its table host (an IPv6 literal in
    brackets, without a zone) and port.
    """
    if ":" in host:
        host = "[" + host.partition("%")[0] + "]"
    return f"{host}:{port}"


def _describe(error: Optional[BaseException], timeout: float) -> str:
    """
    Why a check failed, in a few words for the log.
    """
    if isinstance(error, ierror.TimeoutError):
        return f"timeout after {timeout:g}s"
    if isinstance(error, (CancelledError, ierror.ConnectingCancelledError)):
        return "cancelled"
    if isinstance(error, ierror.ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, ierror.DNSLookupError):
        return "cannot resolve the host"
    if isinstance(error, ierror.ConnectError):
        code = error.osError
        if isinstance(code, int) and code in errno.errorcode:
            return os.strerror(code).lower()
        return str(error)
    if isinstance(error, ResponseNeverReceived):
        return "connection closed before an HTTP response"
    if isinstance(error, ResponseFailed):
        causes = [r.value for r in error.reasons if isinstance(r, Failure)]
        cause = causes[0] if causes else None
        return "bad HTTP response" + (f" ({type(cause).__name__})" if cause is not None else "")
    return f"{type(error).__name__}: {error}"


@attrs.define(eq=False)
class Prober:
    """
    The real L{Probe}: TCP connects and HTTP requests over real sockets.

    @ivar reactor: Provides C{connectTCP} and C{seconds} (and C{callLater}
        for the HTTP client).
    @ivar timeout: Seconds a connect may take (the checker also cancels a
        whole check after its timeout).
    @ivar resolver: Where a host name's addresses come from (the first one
        is checked, as the proxy connects to it first); without one, names
        go to C{connectTCP} as they are.
    """

    reactor: Any
    timeout: float = 1.0
    resolver: Optional[IHostResolver] = None
    _pool: HTTPConnectionPool = attrs.field(init=False, repr=False)

    @_pool.default
    def _makePool(self) -> HTTPConnectionPool:
        return HTTPConnectionPool(self.reactor, persistent=False)

    def __call__(self, backend: Backend, spec: HealthCheckSpec) -> "Deferred[ProbeResult]":
        """
        Check C{backend} with C{spec}; never fails.
        """
        try:
            if spec.kind == CHECK_OFF:
                return succeed(ProbeResult(True, "not checked"))
            address = self._address(backend.host)
            if address is None:
                return succeed(ProbeResult(False, f"host {backend.host} has no address yet"))
            endpoint = _TimedEndpoint(self.reactor, address, backend.port, self.timeout)
            if spec.kind == CHECK_TCP:
                d = self._tcp(endpoint)
            elif spec.kind == CHECK_HTTP and spec.path is not None:
                d = self._http(endpoint, backend, spec.path)
            else:
                raise ValueError(f"unknown health check {spec!r}")
        except Exception:
            d = fail()
        return d.addErrback(self._failed)

    def _address(self, host: str) -> Optional[str]:
        if self.resolver is None:
            return host
        addresses = self.resolver.addresses(host)
        return addresses[0] if addresses else None

    def _tcp(self, endpoint: _TimedEndpoint) -> "Deferred[ProbeResult]":
        d = endpoint.connect(Factory.forProtocol(_Hangup))
        return d.addCallback(lambda _: ProbeResult(True, "connected", endpoint.connectTime))

    def _http(
        self, endpoint: _TimedEndpoint, backend: Backend, path: str
    ) -> "Deferred[ProbeResult]":
        agent = Agent.usingEndpointFactory(self.reactor, endpoint, pool=self._pool)
        # The URL only gives the path: the endpoint decides where to connect
        # and the Host header is set here.  (hyperlink cannot turn a URL with
        # an IPv6 literal into a URI: python-hyper/hyperlink#68.)
        host = "ipv6-literal.invalid" if ":" in backend.host else backend.host
        d: Deferred[Any] = HTTPClient(agent).get(
            f"http://{host}:{backend.port}{path}",
            headers=Headers(
                {
                    b"Host": [_hostHeader(backend.host, backend.port).encode("ascii")],
                    b"User-Agent": [_USER_AGENT.encode("ascii")],
                }
            ),
            allow_redirects=False,
            unbuffered=True,
            reactor=self.reactor,
        )
        return d.addCallback(self._gotResponse, endpoint)

    def _gotResponse(
        self, response: IResponse, endpoint: _TimedEndpoint
    ) -> "Deferred[ProbeResult]":
        code = response.code
        result = ProbeResult(200 <= code < 400, f"HTTP {code}", endpoint.connectTime)
        body = _Discard()
        response.deliverBody(body)
        # The status decides; the body only has to be out of the way.
        return body.done.addBoth(lambda _: result)

    def _failed(self, failure: Failure) -> ProbeResult:
        return ProbeResult(False, _describe(failure.value, self.timeout))


# --- the RTT estimate ---------------------------------------------------------


@attrs.define(eq=False)
class RttEstimate:
    """
    A backend's connect RTT: an exponentially weighted moving average
    (weight L{RTT_ALPHA} for the newest) of the median of the last
    L{RTT_WINDOW} (3) connect times.

    Why a median first: a connect time is the path's RTT plus delays that
    only ever add (a SYN lost and sent again after a second, a busy reactor
    noticing the connect late, a backlog full for a moment).  The noise is
    one-sided and comes in single spikes.  An EWMA alone lets one 1 s spike
    on a 10 ms path add 300 ms to the estimate and take a dozen checks to
    fade; the median of three ignores any one sample, however slow: the
    value fed to the average lies between the other two samples of the
    window.  A real change (the backend moved, a route changed) shows after
    two checks, and the average then smooths what the median lets through.
    Clipping each sample against the previous estimate would do too, but
    needs a clip factor to choose and still lets part of every spike in.

    Until the window is full the estimate I{is} the lower median of what
    there is (the only sample; the smaller of two), so that one slow first
    check is not carried into the average either.

    Only checks that passed are samples (see L{HealthChecker.rtt}).

    @ivar value: The estimate in seconds, or C{None} before a sample.
    @ivar count: Samples taken.
    """

    value: Optional[float] = None
    count: int = 0
    window: Deque[float] = attrs.field(factory=lambda: deque(maxlen=RTT_WINDOW))

    def add(self, sample: float) -> float:
        """
        Take one connect time (seconds, not negative); return the estimate.
        """
        window = self.window
        window.append(sample)
        ordered = sorted(window)
        middle = ordered[(len(ordered) - 1) // 2]
        self.count += 1
        if self.value is None or self.count < RTT_WINDOW:
            self.value = middle
        else:
            self.value = RTT_ALPHA * middle + (1.0 - RTT_ALPHA) * self.value
        return self.value


# --- the checker --------------------------------------------------------------


@attrs.define(eq=False)
class _Check:
    """
    The checker's record of one backend.
    """

    backend: Backend
    spec: HealthCheckSpec
    state: str
    health: int
    since: float
    reason: Optional[str] = None
    lastCheck: Optional[float] = None
    estimate: RttEstimate = attrs.Factory(RttEstimate)
    call: Optional[IDelayedCall] = None
    inFlight: Optional["Deferred[Any]"] = None
    timer: Optional[IDelayedCall] = None
    timedOut: bool = False


def _positive(name: str, value: float) -> float:
    if not value > 0:
        raise ValueError(f"{name} must be positive, not {value!r}")
    return float(value)


def _atLeastOne(name: str, value: int) -> int:
    if type(value) is not int or value < 1:
        raise ValueError(f"{name} must be an integer of at least 1, not {value!r}")
    return value


class HealthChecker(Service):
    """
    Checks every backend of the routing table that the table says is
    healthy and not deleted, and tells the state overlay which are down.

    A twisted L{Service}: L{start} and L{stop} run with it (or call them
    directly).  L{update} (or L{routingTableChanged}, a repository listener)
    says which backends there are; it may be called before L{start}.

    @ivar reactor: Provides C{callLater} and C{seconds} (L{IReactorTime}),
        and C{connectTCP} for the default prober.
    @ivar overlay: Where the verdicts go (source L{SOURCE}).
    @ivar default: The check of a backend whose C{health_check} is C{None}.
    @ivar interval: Seconds between the checks of one backend (jittered).
    @ivar timeout: Seconds a check may take before it counts as failed.
    @ivar rise: Passed checks in a row that bring a backend back up.
    @ivar fall: Failed checks (net of passed ones) that take it down.
    @ivar metrics: Counts C{health_probes} (label C{up} or C{down}: each
        check's result) and C{health_transitions} (label C{down} or C{up}:
        changes that changed routing); optional.
    @ivar rtts: Backend id -> its connect RTT estimate in seconds (see
        L{rtt}), for the backends that have one: a live table, updated in
        place after each passed check, that the router reads as the RTT
        input of the selection (L{edgeproxy.routing.router.Router.rtt}).  An
        L{RttTable}: it notes the ids it changes, which the router's
        selection index follows.
    """

    def __init__(
        self,
        reactor: Any,
        overlay: IStateOverlay,
        *,
        default: Union[HealthCheckSpec, str] = TCP_CHECK,
        interval: float = 2.0,
        timeout: float = 1.0,
        rise: int = 2,
        fall: int = 3,
        resolver: Optional[IHostResolver] = None,
        rng: Optional[random.Random] = None,
        metrics: Optional[IMetricsStore] = None,
        probe: Optional[Probe] = None,
    ) -> None:
        """
        @param default: A L{HealthCheckSpec} or its text (C{--health-check}).
        @param resolver: Gives the default prober the addresses of backends
            named by host name (see L{Prober}).
        @param rng: The randomness of the jitter; a fresh L{random.Random}
            by default.
        @param probe: How a backend is checked; a L{Prober} on C{reactor}
            with C{timeout} and C{resolver} by default.
        @raise ValueError: An invalid default check, a non-positive interval
            or timeout, or rise or fall below 1.
        """
        self.reactor = reactor
        self.overlay = overlay
        # Through the text form, so that a hand-built spec is validated too.
        self.default = parse_check(default if isinstance(default, str) else str(default))
        self.interval = _positive("interval", interval)
        self.timeout = _positive("timeout", timeout)
        self.rise = _atLeastOne("rise", rise)
        self.fall = _atLeastOne("fall", fall)
        self.resolver = resolver
        self.rng = rng if rng is not None else random.Random()
        self.metrics = metrics
        self.probe: Probe = probe if probe is not None else Prober(reactor, self.timeout, resolver)
        self._checks: Dict[str, _Check] = {}
        self._rtts = RttTable()
        self.rtts: Mapping[str, float] = self._rtts

    def __repr__(self) -> str:
        return (
            f"<HealthChecker {len(self._checks)} backends, default {self.default}, "
            f"every {self.interval:g}s, rise {self.rise} fall {self.fall}>"
        )

    # --- the table ---------------------------------------------------------

    def routingTableChanged(self, old: RoutingSnapshot, new: RoutingSnapshot) -> None:
        """
        A repository listener: L{update} to C{new}.  Never raises.
        """
        try:
            self.update(new)
        except Exception:
            _log.failure("updating the health checks to a new routing table failed")

    def update(self, snapshot: RoutingSnapshot) -> None:
        """
        Check exactly the backends of C{snapshot} that are healthy and not
        deleted (draining ones too), each with its own check or the default.

        A backend new to the checker starts L{UNKNOWN} (routable); one that
        left (or became unhealthy or deleted in the table) is no longer
        checked and its health verdict is forgotten; one whose host, port or
        check changed is checked afresh, as if new.  Others keep their state
        and schedule.
        """
        wanted: Dict[str, Backend] = {
            b.id: b for b in snapshot.backends if b.healthy and not b.deleted
        }
        forget = set()
        for backend_id in [i for i in self._checks if i not in wanted]:
            self._drop(self._checks.pop(backend_id))
            forget.add(backend_id)
            self._rtts.pop(backend_id, None)
        now = self.reactor.seconds()
        for backend_id, backend in wanted.items():
            spec = self._specFor(backend)
            check = self._checks.get(backend_id)
            if check is not None:
                old = check.backend
                if (old.host, old.port, check.spec) == (backend.host, backend.port, spec):
                    check.backend = backend
                    continue
                self._drop(check)
                forget.add(backend_id)
                self._rtts.pop(backend_id, None)
                if check.state == DOWN:
                    _log.info(
                        "backend {backend} was down; its address or health check changed "
                        "(now {check} on {host} port {port}): checking it afresh, it takes "
                        "new clients until proven down",
                        backend=backend_id,
                        check=str(spec),
                        host=backend.host,
                        port=backend.port,
                    )
            self._checks[backend_id] = check = _Check(
                backend=backend,
                spec=spec,
                state=OFF if spec.kind == CHECK_OFF else UNKNOWN,
                health=self.rise + self.fall - 1,
                since=now,
            )
            if self.running:
                self._scheduleFirst(check)
        if forget:
            self.overlay.forget(forget, {SOURCE})

    def _specFor(self, backend: Backend) -> HealthCheckSpec:
        if backend.health_check is None:
            return self.default
        try:
            return parse_check(backend.health_check)
        except ValueError as e:
            _log.warn(
                "backend {backend} has an invalid health check {text!r} ({error}); "
                "using the default {default}",
                backend=backend.id,
                text=backend.health_check,
                error=str(e),
                default=str(self.default),
            )
            return self.default

    # --- start and stop ----------------------------------------------------

    def start(self) -> None:
        """
        Start checking: each backend's first check at a random moment within
        the first interval.
        """
        if self.running:
            return
        Service.startService(self)
        for check in self._checks.values():
            self._scheduleFirst(check)

    def stop(self) -> None:
        """
        Stop checking: every pending check is cancelled and every check in
        flight abandoned (its connection closed), so that no timer of the
        checker is left in the reactor.  States and verdicts stay as they
        are; L{start} resumes.
        """
        if not self.running:
            return
        Service.stopService(self)
        for check in self._checks.values():
            self._drop(check)

    def startService(self) -> None:
        """
        See L{start}.
        """
        self.start()

    def stopService(self) -> None:
        """
        See L{stop}.
        """
        self.stop()

    # --- what is known -----------------------------------------------------

    def state(self, backend_id: str) -> Optional[str]:
        """
        L{UNKNOWN}, L{UP}, L{DOWN} or L{OFF} (never checked); C{None} for a
        backend the checker does not follow (not in the table, unhealthy or
        deleted there).
        """
        check = self._checks.get(backend_id)
        return None if check is None else check.state

    def states(self) -> Dict[str, str]:
        """
        The state of every backend followed, by id.
        """
        return {backend_id: check.state for backend_id, check in self._checks.items()}

    def status(self, backend_id: str) -> Optional[HealthStatus]:
        """
        All that is known of one backend, or C{None} if it is not followed.
        """
        c = self._checks.get(backend_id)
        if c is None:
            return None
        return HealthStatus(
            c.state, str(c.spec), c.reason, c.since, c.lastCheck, c.health, c.estimate.value
        )

    def rtt(self, backend_id: str) -> Optional[float]:
        """
        The backend's connect RTT in seconds: the L{RttEstimate} (a moving
        average of the median of the last three) of the TCP connect times of
        the checks that passed; C{None} before the first one, for unchecked
        backends and for backends not followed.  Starts afresh when the
        address or the check changes.

        A failed check is no sample, even one that connected (an HTTP 503,
        a response that timed out): a failing backend is often a host
        restarting or overloaded, whose connect times (a full accept
        backlog, SYNs sent again) tell of its trouble rather than its
        distance, and while it is down it takes no clients anyway.
        """
        check = self._checks.get(backend_id)
        return None if check is None else check.estimate.value

    # --- scheduling --------------------------------------------------------

    def _scheduleFirst(self, check: _Check) -> None:
        if check.spec.kind != CHECK_OFF:
            self._schedule(check, self.rng.random() * self.interval)

    def _scheduleNext(self, check: _Check) -> None:
        factor = 1.0 + JITTER * (2.0 * self.rng.random() - 1.0)
        self._schedule(check, self.interval * factor)

    def _schedule(self, check: _Check, delay: float) -> None:
        if check.call is not None and check.call.active():
            check.call.cancel()
        check.call = self.reactor.callLater(delay, self._run, check)

    def _current(self, check: _Check) -> bool:
        """
        Whether C{check} is still the one in force for its backend.
        """
        return bool(self.running) and self._checks.get(check.backend.id) is check

    def _drop(self, check: _Check) -> None:
        """
        Cancel C{check}'s pending call, its timeout and its check in flight.
        """
        call, check.call = check.call, None
        if call is not None and call.active():
            call.cancel()
        timer, check.timer = check.timer, None
        if timer is not None and timer.active():
            timer.cancel()
        d, check.inFlight = check.inFlight, None
        if d is not None:
            d.cancel()

    def _run(self, check: _Check) -> None:
        """
        The timer callback: start one check.  Never raises.
        """
        check.call = None
        try:
            if not self._current(check):
                return
            check.timedOut = False
            try:
                d: Deferred[Any] = self.probe(check.backend, check.spec)
            except Exception:
                d = fail()
            check.inFlight = d
            check.timer = self.reactor.callLater(self.timeout, self._timedOut, check, d)
            d.addBoth(self._finished, check, d)
        except Exception:
            _log.failure("starting the health check of {backend} failed", backend=check.backend.id)
            if self._current(check) and check.inFlight is None and check.call is None:
                self._scheduleNext(check)

    def _timedOut(self, check: _Check, d: "Deferred[Any]") -> None:
        check.timer = None
        if check.inFlight is d:
            check.timedOut = True
            d.cancel()

    def _finished(self, result: object, check: _Check, d: "Deferred[Any]") -> None:
        """
        A check ended (or was cancelled): count it, unless it was abandoned,
        and schedule the next.  Never raises, and consumes any failure.
        """
        if check.inFlight is not d:
            return  # abandoned: stop(), or the backend left or changed
        check.inFlight = None
        timer, check.timer = check.timer, None
        if timer is not None and timer.active():
            timer.cancel()
        try:
            if self._current(check):
                self._record(check, self._outcome(result, check))
        except Exception:
            _log.failure("recording the health check of {backend} failed", backend=check.backend.id)
        try:
            if self._current(check) and check.call is None:
                self._scheduleNext(check)
        except Exception:
            _log.failure(
                "scheduling the next health check of {backend} failed", backend=check.backend.id
            )

    def _outcome(self, result: object, check: _Check) -> ProbeResult:
        if check.timedOut:
            connect_time = result.connect_time if isinstance(result, ProbeResult) else None
            return ProbeResult(False, f"timeout after {self.timeout:g}s", connect_time)
        if isinstance(result, ProbeResult):
            return result
        if isinstance(result, Failure):
            _log.failure(
                "the health check of {backend} failed unexpectedly",
                result,
                backend=check.backend.id,
            )
            return ProbeResult(False, _describe(result.value, self.timeout))
        _log.error(
            "the health check of {backend} gave {result!r}, not a result",
            backend=check.backend.id,
            result=result,
        )
        return ProbeResult(False, "no result")

    # --- the state machine -------------------------------------------------

    def _record(self, check: _Check, result: ProbeResult) -> None:
        now = self.reactor.seconds()
        check.lastCheck = now
        check.reason = result.reason
        self._count("health_probes", "up" if result.up else "down")
        if result.up and result.connect_time is not None and result.connect_time >= 0.0:
            self._rtts[check.backend.id] = check.estimate.add(result.connect_time)
        top = self.rise + self.fall - 1
        if result.up:
            check.health = min(top, check.health + 1)
            if check.state == DOWN:
                if check.health >= self.rise:
                    self._goUp(check, result, now)
            elif check.state == UNKNOWN:
                check.state, check.since = UP, now
                _log.debug(
                    "backend {backend} is up: {reason} (health check {check})",
                    backend=check.backend.id,
                    reason=result.reason,
                    check=str(check.spec),
                )
            return
        if check.state == DOWN:
            check.health = 0
            return
        check.health -= 1
        if check.health < self.rise:
            self._goDown(check, result, now)
        else:
            _log.debug(
                "health check of backend {backend} failed: {reason} ({failures} of {fall} "
                "before it is marked down)",
                backend=check.backend.id,
                reason=result.reason,
                failures=top - check.health,
                fall=self.fall,
            )

    def _goDown(self, check: _Check, result: ProbeResult, now: float) -> None:
        previous = check.state
        check.state, check.since, check.health = DOWN, now, 0
        backend = check.backend
        _log.warn(
            "backend {backend} is down: {reason} (health check {check} on {host} port "
            "{port}, was {previous}); no new clients until {rise} checks in a row pass",
            backend=backend.id,
            reason=result.reason,
            check=str(check.spec),
            host=backend.host,
            port=backend.port,
            previous=previous,
            rise=self.rise,
        )
        self._count("health_transitions", "down")
        self.overlay.setVerdict(backend.id, SOURCE, UNAVAILABLE)

    def _goUp(self, check: _Check, result: ProbeResult, now: float) -> None:
        downtime = now - check.since
        check.state, check.since, check.health = UP, now, self.rise + self.fall - 1
        _log.info(
            "backend {backend} is up again: {reason} (health check {check}), after "
            "{downtime:.1f}s down",
            backend=check.backend.id,
            reason=result.reason,
            check=str(check.spec),
            downtime=downtime,
        )
        self._count("health_transitions", "up")
        self.overlay.setVerdict(check.backend.id, SOURCE, AVAILABLE)

    def _count(self, name: str, label: str) -> None:
        if self.metrics is not None:
            self.metrics.increment(name, label)
