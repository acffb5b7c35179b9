"""
The admin HTTP listener (C{--admin DESC}): C{/metrics} and C{/health} now,
the control API and the status page later, on one C{twisted.web} site.

It shares the reactor with the data plane, so it is built not to slow it
down (FAULTS F24):

  - Every request must arrive whole (request line, headers and body)
    within C{requestTimeout} seconds of the connection opening or of the
    previous response: a client that trickles its headers (a slowloris) is
    cut then, however steadily it sends.  Twisted's own idle timeout alone
    would not do it, as it restarts at every byte.  An idle keep-alive
    connection is closed after the same time.
  - A body over C{maxBodySize} bytes (64 KiB) is refused while it arrives:
    a C{Content-Length} over it as soon as the headers are complete, a
    chunked body as soon as its chunks add up to more; the answer is a JSON
    413, and the rest of the body is read and thrown away (nothing
    buffered) for a moment so that the client sees the answer, then the
    connection is closed.  A request whose body is still arriving at the
    deadline gets a JSON 408 the same way (an idle connection is just
    closed).
  - At most C{maxConnections} connections are open at once; one over the
    cap is closed at once (counted as C{admin_connections_rejected}).
  - No access log line per request and no session.  C{/health} is
    rendered on the reactor thread; C{/metrics} freezes the state there
    (dictionary copies) and encodes it in the reactor's thread pool, at
    most once per second however many scrapes come (see
    L{edgeproxy.control.metrics.Exposition}).

Every error is JSON: C{404} for an unknown path, C{405} (with C{Allow})
for a method a resource does not serve.  The tree is plain
L{twisted.web.resource.Resource}s, so the integrator adds pages with
C{putChild} on L{AdminRoot} (C{root.putChild(b"api", api)}); subclass
L{JSONResource} for the same error behaviour.  L{AdminRoot.guard} checks
access to every page that does not check it itself (see
L{edgeproxy.control.auth.ApiAuth.guard}).

    from twisted.application.internet import StreamServerEndpointService

    collector = EdgeproxyCollector(metrics, repository=..., load=..., ...)
    exposition = Exposition(collector, reactor=reactor)
    site = admin_site(exposition, reactor=reactor, metrics=metrics)
    endpoint = admin_endpoint(reactor, options["admin"])   # None for "none"
    if endpoint is not None:
        StreamServerEndpointService(endpoint, site).setServiceParent(top)
"""

from __future__ import annotations

import json
from io import BytesIO
from typing import Any, Callable, List, Mapping, Optional, Tuple

from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    INegotiated,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES, HTTPChannel, Request
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site, UnsupportedMethod
from twisted.web.server import Request as SiteRequest

from edgeproxy import __version__
from edgeproxy.control.metrics import Exposition
from edgeproxy.interfaces import IMetricsStore

__all__ = [
    "ADMIN_REJECTED",
    "DEFAULT_ADMIN",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_MAX_BODY_SIZE",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_REQUEST_TIMEOUT",
    "AdminChannel",
    "AdminRequest",
    "AdminRoot",
    "AdminSite",
    "HealthResource",
    "JSONResource",
    "MetricsResource",
    "NotFound",
    "admin_endpoint",
    "admin_resource",
    "admin_site",
    "json_body",
    "json_error",
]

_log = Logger()

#: The default C{--admin}: loopback only.
DEFAULT_ADMIN = "tcp:8090:interface=127.0.0.1"

#: Concurrent admin connections allowed by default.
#: Connections one (non-loopback) source address may hold at once.
DEFAULT_MAX_PER_SOURCE = 8

DEFAULT_MAX_CONNECTIONS = 64

#: Seconds a whole request may take to arrive, by default.
DEFAULT_REQUEST_TIMEOUT = 10.0

#: Seconds without a byte from the client, by default (Twisted's own
#: timeout; a response stuck behind a client that does not read ends then).
DEFAULT_IDLE_TIMEOUT = 60.0

#: The largest request body accepted by default (bytes).
DEFAULT_MAX_BODY_SIZE = 64 * 1024

#: Counter (no label) of admin connections closed at once over the cap.
ADMIN_REJECTED = "admin_connections_rejected"

_JSON = b"application/json"

#: After a refusal written before the request was whole (413, 408): how
#: long, and how many more bytes, the rest of the request is read and thrown
#: away so that closing does not reset the connection before the client
#: read the answer.
_LINGER_SECONDS = 2.0
_LINGER_BYTES = 1 << 20

_NO_DETAIL: Any = object()


def json_body(request: Request, code: int, body: Mapping[str, Any]) -> bytes:
    """
    Set C{code} and a JSON content type on C{request}; return C{body} as
    compact JSON (UTF-8, newline-terminated).
    """
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", _JSON)
    request.setHeader(b"Cache-Control", b"no-store")
    return json.dumps(body, separators=(",", ":"), sort_keys=True).encode("utf-8") + b"\n"


def json_error(request: Request, code: int, message: str, detail: Any = _NO_DETAIL) -> bytes:
    """
    A JSON error response: C{{"error": message, "status": code}}, plus
    C{"detail": detail} when C{detail} is given (any JSON value, C{None}
    included).
    """
    body: dict[str, Any] = {"error": message, "status": code}
    if detail is not _NO_DETAIL:
        body["detail"] = detail
    return json_body(request, code, body)


def _allowed_methods(resource: Resource) -> List[bytes]:
    methods = [
        name[len("render_") :].encode("ascii")
        for name in dir(resource)
        if name.startswith("render_") and name[len("render_") :].isupper()
    ]
    if b"GET" in methods and b"HEAD" not in methods:
        methods.append(b"HEAD")
    return sorted(methods)


class JSONResource(Resource):
    """
    A resource whose errors are JSON: an unknown child is L{NotFound}, a
    method without a C{render_METHOD} is a 405 with C{Allow} (C{HEAD} is
    served by C{render_GET}, as twisted.web does).
    """

    def getChild(self, path: bytes, request: Any) -> Resource:
        return NotFound()

    def servedMethods(self) -> List[bytes]:
        """
        The methods served (for C{Allow}): one per C{render_METHOD}, and
        C{HEAD} with C{GET}.
        """
        return _allowed_methods(self)

    def render(self, request: Any) -> bytes:
        method = request.method
        handler = getattr(self, "render_" + method.decode("ascii", "replace"), None)
        if handler is not None:
            result: bytes = handler(request)
            return result
        allowed = self.servedMethods()
        if method == b"HEAD" and b"GET" in allowed:
            # twisted.web answers HEAD by rendering GET without the body.
            raise UnsupportedMethod(allowed)
        request.setHeader(b"Allow", b", ".join(allowed))
        return json_error(request, 405, "method not allowed")


class NotFound(JSONResource):
    """
    A JSON 404 for every method and every path below it.
    """

    isLeaf = True

    def render(self, request: Any) -> bytes:
        return json_error(request, 404, "not found")


class MetricsResource(JSONResource):
    """
    C{/metrics}: the Prometheus exposition from C{exposition} (an
    L{edgeproxy.control.metrics.Exposition}), in the text format
    (C{text/plain; version=0.0.4}) or, when the scraper's C{Accept} asks
    for it, OpenMetrics.  (C{prometheus_client.twisted.MetricsResource}
    would collect in a thread, racing the data plane's dictionaries; the
    exposition freezes them on the reactor thread first.)  A failed
    generation is a JSON 500.
    """

    def __init__(self, exposition: Exposition) -> None:
        Resource.__init__(self)
        self.exposition = exposition

    def render_GET(self, request: Any) -> Any:
        accept = request.getHeader(b"accept")
        d = self.exposition.render(accept.decode("latin-1") if accept is not None else "")
        gone: List[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def write(result: Tuple[bytes, str]) -> None:
            if gone:
                return
            body, content_type = result
            request.setHeader(b"Content-Type", content_type.encode("ascii"))
            request.setHeader(b"Cache-Control", b"no-store")
            request.setHeader(b"Content-Length", b"%d" % (len(body),))
            request.write(body)
            request.finish()

        def failed(failure: Failure) -> None:
            if gone:
                return
            request.write(json_error(request, 500, "metrics exposition failed"))
            request.finish()

        d.addCallbacks(write, failed)
        return NOT_DONE_YET

    #: HEAD: the same headers (Content-Length included), no body.
    render_HEAD = render_GET


class HealthResource(JSONResource):
    """
    C{/health}: 200 and C{{"status": "ok", "version": ...}} while the
    process serves, plus whatever C{details} returns (JSON-serialisable
    values, e.g. the number of backends or the routing table's age).  If
    C{details} raises, the answer is a 500 with C{"status": "error"}.
    """

    def __init__(self, details: Optional[Callable[[], Mapping[str, Any]]] = None) -> None:
        Resource.__init__(self)
        self.details = details

    def render_GET(self, request: Any) -> bytes:
        body: dict[str, Any] = {}
        if self.details is not None:
            try:
                body.update(self.details())
            except Exception:
                _log.failure("admin /health details failed")
                return json_body(request, 500, {"status": "error", "version": __version__})
        body["status"] = "ok"
        body["version"] = __version__
        return json_body(request, 200, body)


class AdminRoot(JSONResource):
    """
    The root of the admin site: C{GET /} lists the paths served (until the
    status page takes C{/} with C{putChild(b"", page)}); anything unknown
    is a JSON 404.

    @ivar guard: When set, called with every request for a page below the
        root (the root's own listing included) whose resource has no true
        C{checksAccess} attribute; it returns C{None} to let the request
        through, or the resource that answers it instead (a refusal).  The
        API checks access itself, per method (C{checksAccess = True}).
    """

    guard: Optional[Callable[[Any], Optional[Resource]]] = None

    def getChildWithDefault(self, path: bytes, request: Any) -> Resource:
        child: Resource = JSONResource.getChildWithDefault(self, path, request)
        guard = self.guard
        if guard is not None and not getattr(child, "checksAccess", False):
            refused = guard(request)
            if refused is not None:
                return refused
        return child

    def getChild(self, path: bytes, request: Any) -> Resource:
        if path == b"":
            return self
        return NotFound()

    def render_GET(self, request: Any) -> bytes:
        paths = sorted("/" + name.decode("utf-8", "replace") for name in self.children if name)
        return json_body(request, 200, {"service": "edgeproxy", "paths": paths})


def admin_resource(
    exposition: Exposition,
    health: Optional[Callable[[], Mapping[str, Any]]] = None,
) -> AdminRoot:
    """
    An L{AdminRoot} with C{/metrics} (L{MetricsResource} of C{exposition}) and
    C{/health} (L{HealthResource} with C{health} as its details).
    """
    root = AdminRoot()
    root.putChild(b"metrics", MetricsResource(exposition))
    root.putChild(b"health", HealthResource(health))
    return root


class _Refused(Protocol):
    """
    Stands in for a connection over the cap: closes it at once.
    """

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.abortConnection()  # type: ignore[attr-defined]


class AdminRequest(SiteRequest):
    """
    A request of the admin site: its body is kept in memory (it is at most
    the channel's C{maxBodySize}), and a chunked body that grows past that
    is refused as it arrives (see L{AdminChannel}).
    """

    _bodySize = 0

    def gotLength(self, length: Optional[int]) -> None:
        self.content = BytesIO()
        self._bodySize = 0

    def handleContentChunk(self, data: bytes) -> None:
        channel = self.channel
        if not isinstance(channel, AdminChannel):
            assert self.content is not None
            self.content.write(data)
            return
        if channel._refused:
            return
        self._bodySize += len(data)
        limit = channel.maxBodySize
        if limit is not None and self._bodySize > limit:
            channel._refuse(
                413, "request body too large", f"the limit is {limit} bytes (chunked body)"
            )
            return
        assert self.content is not None
        self.content.write(data)


class AdminChannel(HTTPChannel):
    """
    An L{HTTPChannel} with a deadline for each whole request and a cap on
    the body, both enforced while the request arrives (see the module
    docstring), and that gives its L{AdminSite} slot back.

    @ivar requestTimeout: Seconds for a whole request; C{None}: no deadline.
    @ivar maxBodySize: The largest body accepted, in bytes; C{None}: any.
    """

    requestTimeout: Optional[float] = None
    maxBodySize: Optional[int] = DEFAULT_MAX_BODY_SIZE
    _deadline: Optional[IDelayedCall] = None
    _adminSite: Optional["AdminSite"] = None
    _adminSource: Optional[str] = None
    #: Bytes of a request that is not whole yet have come.
    _receiving = False
    #: A refusal was written before the request was whole: everything read
    #: from now on is thrown away until the connection closes.
    _refused = False
    _discarded = 0
    _linger: Optional[IDelayedCall] = None

    def connectionMade(self) -> None:
        HTTPChannel.connectionMade(self)
        self._startDeadline()

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            self._discarded += len(data)
            if self._discarded > _LINGER_BYTES:
                self._abort()
            return
        if data:
            self._receiving = True
        HTTPChannel.dataReceived(self, data)

    def rawDataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        HTTPChannel.rawDataReceived(self, data)

    def allHeadersReceived(self) -> None:
        limit = self.maxBodySize
        length = self.length
        if limit is not None and length is not None and length > limit:
            # Before the base class makes a body file (a temporary file for
            # a large one) or answers "Expect: 100-continue".
            self._refuse(413, "request body too large", f"the limit is {limit} bytes, got {length}")
            return
        HTTPChannel.allHeadersReceived(self)

    def allContentReceived(self) -> None:
        if self._refused:
            return
        # The request is whole: no deadline while it is answered.
        self._receiving = False
        self._stopDeadline()
        HTTPChannel.allContentReceived(self)

    def requestDone(self, request: Any) -> None:
        # Armed before the base class parses any pipelined data, which may
        # complete (and disarm it for) the next request at once.
        if self.persistent:
            self._startDeadline()
        HTTPChannel.requestDone(self, request)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._stopDeadline()
        linger, self._linger = self._linger, None
        if linger is not None and linger.active():
            linger.cancel()
        site, self._adminSite = self._adminSite, None
        if site is not None:
            site._channelLost(self._adminSource)
        HTTPChannel.connectionLost(self, reason)

    def _startDeadline(self) -> None:
        self._stopDeadline()
        if self.requestTimeout is not None:
            self._deadline = self.callLater(self.requestTimeout, self._requestTimedOut)

    def _stopDeadline(self) -> None:
        deadline, self._deadline = self._deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()

    def _requestTimedOut(self) -> None:
        self._deadline = None
        if self._receiving and not self._refused:
            # A request has begun: tell the client why it is cut.
            self._refuse(
                408,
                "request timeout",
                f"the whole request must arrive within {self.requestTimeout:g} s",
            )
            return
        # Idle: close (and abort after abortTimeout if the close cannot
        # finish).
        self.timeoutConnection()

    def _refuse(self, code: int, message: str, detail: Any) -> None:
        """
        Answer C{code} with a JSON error before the request is whole, then
        stop: shut the write side (the answer is sent, then a FIN), throw
        away whatever else comes for at most L{_LINGER_SECONDS} (or
        L{_LINGER_BYTES}), then close.
        """
        transport = self.transport
        if self._refused or transport is None:
            return
        self._refused = True
        self._stopDeadline()
        self.setTimeout(None)
        self.persistent = False
        body = (
            json.dumps(
                {"error": message, "detail": detail, "status": code},
                separators=(",", ":"),
                sort_keys=True,
            ).encode("utf-8")
            + b"\n"
        )
        head = b"HTTP/1.1 %d %s\r\n" % (code, RESPONSES.get(code, b"Error"))
        transport.write(
            head
            + b"Content-Type: application/json\r\n"
            + b"Cache-Control: no-store\r\n"
            + b"Connection: close\r\n"
            + b"Content-Length: %d\r\n\r\n" % (len(body),)
            + body
        )
        half_close = getattr(transport, "loseWriteConnection", None)
        if half_close is None or INegotiated.providedBy(transport):
            # TLS (which reaches the socket's half-close through its
            # wrapper, skipping close_notify) or no half-close: close.
            self.loseConnection()
            return
        half_close()
        self._linger = self.callLater(_LINGER_SECONDS, self._abort)

    def _abort(self) -> None:
        linger, self._linger = self._linger, None
        if linger is not None and linger.active():
            linger.cancel()
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]


class AdminSite(Site):
    """
    The admin listener's factory: a L{Site} of L{AdminChannel}s, capped.

    @param resource: The root resource (see L{admin_resource}).
    @param reactor: Its reactor (timeouts); the global one when C{None}.
    @param requestTimeout: Seconds for a whole request (C{None}: none).
    @param idleTimeout: Twisted's idle timeout (seconds without a byte).
    @param maxConnections: Concurrent connections allowed (0: unlimited).
    @param metrics: Where connections over the cap are counted
        (L{ADMIN_REJECTED}), if given.
    @param accessLog: Log one line per request (off: a flood of requests
        would flood the log too).
    @param maxBodySize: The largest request body accepted (bytes; C{None}:
        any); a larger one is refused with a 413 as it arrives.

    @ivar openConnections: Connections open now.
    """

    protocol = AdminChannel  # type: ignore[assignment]
    requestFactory = AdminRequest
    displayTracebacks = False

    def __init__(
        self,
        resource: Resource,
        *,
        reactor: Any = None,
        requestTimeout: Optional[float] = DEFAULT_REQUEST_TIMEOUT,
        idleTimeout: Optional[float] = DEFAULT_IDLE_TIMEOUT,
        maxConnections: int = DEFAULT_MAX_CONNECTIONS,
        metrics: Optional[IMetricsStore] = None,
        accessLog: bool = False,
        maxBodySize: Optional[int] = DEFAULT_MAX_BODY_SIZE,
        maxPerSource: int = DEFAULT_MAX_PER_SOURCE,
    ) -> None:
        if maxConnections < 0:
            raise ValueError(f"maxConnections must be >= 0, got {maxConnections!r}")
        if maxBodySize is not None and maxBodySize < 0:
            raise ValueError(f"maxBodySize must be >= 0, got {maxBodySize!r}")
        Site.__init__(self, resource, timeout=idleTimeout, reactor=reactor)
        self.requestTimeout = requestTimeout
        self.maxBodySize = maxBodySize
        self.maxConnections = maxConnections
        self.metrics = metrics
        self.accessLog = accessLog
        self.openConnections = 0
        self._refusing = False
        #: Connections one source address may hold at once (0: no limit),
        #: so that one client cannot take every slot (and starve the
        #: backends' heartbeats); loopback is not limited.
        self.maxPerSource = maxPerSource
        self._bySource: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"<AdminSite open={self.openConnections}/{self.maxConnections or 'unlimited'}>"

    def buildProtocol(self, addr: IAddress | None) -> Any:
        cap = self.maxConnections
        source = getattr(addr, "host", None)
        if source is not None and (source.startswith("127.") or source == "::1"):
            source = None
        if source is not None and self.maxPerSource:
            if self._bySource.get(source, 0) >= self.maxPerSource:
                if self.metrics is not None:
                    self.metrics.increment(ADMIN_REJECTED, "per-source")
                return _Refused()
        if cap and self.openConnections >= cap:
            if self.metrics is not None:
                self.metrics.increment(ADMIN_REJECTED)
            if not self._refusing:
                self._refusing = True
                _log.warn(
                    "admin listener: {cap} connections open, closing new ones until one ends",
                    cap=cap,
                )
            return _Refused()
        channel = Site.buildProtocol(self, addr)
        if isinstance(channel, AdminChannel):
            channel.requestTimeout = self.requestTimeout
            channel.maxBodySize = self.maxBodySize
            channel._adminSite = self
            channel._adminSource = source
        if source is not None:
            self._bySource[source] = self._bySource.get(source, 0) + 1
        self.openConnections += 1
        self._refusing = False
        return channel

    def _channelLost(self, source: Optional[str] = None) -> None:
        if self.openConnections > 0:
            self.openConnections -= 1
        if source is not None:
            left = self._bySource.get(source, 0) - 1
            if left > 0:
                self._bySource[source] = left
            else:
                self._bySource.pop(source, None)

    def startFactory(self) -> None:
        # Without an access log there is nothing to set up (and no
        # once-a-second timer for the log's date).
        if self.accessLog:
            Site.startFactory(self)

    def log(self, request: Any) -> None:
        if self.accessLog:
            Site.log(self, request)


def admin_site(
    exposition: Exposition,
    *,
    health: Optional[Callable[[], Mapping[str, Any]]] = None,
    reactor: Any = None,
    requestTimeout: Optional[float] = DEFAULT_REQUEST_TIMEOUT,
    idleTimeout: Optional[float] = DEFAULT_IDLE_TIMEOUT,
    maxConnections: int = DEFAULT_MAX_CONNECTIONS,
    metrics: Optional[IMetricsStore] = None,
    maxBodySize: Optional[int] = DEFAULT_MAX_BODY_SIZE,
) -> AdminSite:
    """
    The admin site: an L{AdminSite} over L{admin_resource}C{(exposition,
    health)}.  Its root is C{site.resource} (an L{AdminRoot}) for
    C{putChild}.
    """
    return AdminSite(
        admin_resource(exposition, health),
        reactor=reactor,
        requestTimeout=requestTimeout,
        idleTimeout=idleTimeout,
        maxConnections=maxConnections,
        metrics=metrics,
        maxBodySize=maxBodySize,
    )


def admin_endpoint(reactor: Any, description: str) -> IStreamServerEndpoint | None:
    """
    The endpoint of C{--admin DESC}: C{None} for C{none} (no admin
    listener), else C{serverFromString(reactor, description)}.

    @raise ValueError: A malformed description.
    """
    if description.strip().lower() == "none":
        return None
    return serverFromString(reactor, description)
