#!/usr/bin/env python3
"""
The proxy's own per-connection work, without the kernel and Twisted's I/O:
accept, route, connect, a request and a response, FIN from the backend,
close, end-of-connection bookkeeping -- on a memory reactor and string
transports, with the real router, binding table, counters and geo resolver.

It isolates what edgeproxy's code costs per connection (what a feature adds
to the hot path) from what the kernel and the reactor cost, which
dominate bench/run.py's new-connections figure and make it noisy on a
shared machine.  Run it against two checkouts to compare them:

    PYTHONPATH=. python bench/bench_session.py
    PYTHONPATH=/path/to/old/checkout python bench/bench_session.py

Prints microseconds per connection (best of --repeat runs of --count).
"""

from __future__ import annotations

import argparse
import inspect
import random
import time
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogBeginner, globalLogPublisher
from twisted.python.failure import Failure


class FakeTCP(StringTransport):
    """
    A string transport with the TCP methods the proxy calls.
    """

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass

    def setTcpKeepAlive(self, enabled: bool) -> None:
        pass

    def loseWriteConnection(self) -> None:
        pass


def build(variant: str) -> tuple[Any, Any]:
    from edgeproxy.config import ProxySettings
    from edgeproxy.testing import (
        BindingTable,
        InMemoryBackendRepository,
        MetricsStore,
        StaticGeoResolver,
        backend,
    )

    try:
        from edgeproxy.net.proxy import ProxyFactory
        from edgeproxy.routing.router import Router
    except ImportError:  # the layout before the move into subpackages
        from edgeproxy.proxy import ProxyFactory  # type: ignore[no-redef]
        from edgeproxy.router import Router  # type: ignore[no-redef]
    from edgeproxy.model import GeoInfo

    rows = [
        backend("web-gru-1", app="web", region="sa", country="BR", host="10.0.0.1", port=80),
        backend("web-gru-2", app="web", region="sa", country="BR", host="10.0.0.2", port=80),
        backend("web-gig-1", app="web", region="sa", country="BR", host="10.0.0.3", port=80),
        backend("web-scl-1", app="web", region="sa", country="CL", host="10.0.0.4", port=80),
        backend("web-cdg-1", app="web", region="eu", country="FR", host="10.0.0.5", port=80),
    ]
    reactor = MemoryReactorClock()
    metrics = MetricsStore()
    geo = StaticGeoResolver({f"198.51.100.{i}": GeoInfo("BR", "sa") for i in range(256)})
    router = Router(
        InMemoryBackendRepository(rows),
        BindingTable(ttl=600.0),
        geo,
        metrics,
        "sa",
        reactor,
        random.Random(1),
    )
    if variant == "rtt":
        # The RTT term on (--rtt-weight 0.01, the default) with the health
        # checker's kind of table where the checkout has one (a plain dict,
        # so the plain walk, before the index followed RTTs).
        import edgeproxy.routing.load as load_module

        table = getattr(load_module, "RttTable", dict)
        router.rtt = table({b.id: 0.001 * (1 + i % 3) for i, b in enumerate(rows[:-1])})
        router.rtt_weight = 0.01
    factory = ProxyFactory(router, reactor, ProxySettings(), metrics, app="web")
    if variant == "ops":
        # Everything issue 8 puts on the path: breaker, per-client limits,
        # the access log (its record(); flushes are off the reactor thread).
        from edgeproxy.net.accesslog import AccessLog
        from edgeproxy.net.admission import Admission
        from edgeproxy.net.limits import ClientLimiter
        from edgeproxy.routing.breaker import CircuitBreaker

        router.breaker = CircuitBreaker(router.overlay, reactor)
        router._halfOpen = router.breaker.halfOpen
        limiter = ClientLimiter(100_000, 1_000_000.0, clock=reactor)
        factory.admission = Admission(10_000, metrics, limiter)
        factory.accessLog = AccessLog("/dev/null", reactor, metrics, batchSize=10**9)
    return reactor, factory


def one(reactor: Any, factory: Any, i: int) -> None:
    peer = IPv4Address("TCP", f"198.51.100.{i & 255}", 10000 + (i & 0x7FFF))
    proto = factory.buildProtocol(peer)
    client = FakeTCP(hostAddress=IPv4Address("TCP", "10.1.0.1", 8080), peerAddress=peer)
    proto.makeConnection(client)
    host, port, attempt = reactor.tcpClients.pop()[:3]
    side = attempt.buildProtocol(IPv4Address("TCP", host, port))
    server = FakeTCP()
    side.makeConnection(server)
    proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    side.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
    side.readConnectionLost()
    side.connectionLost(Failure(ConnectionDone()))
    proto.connectionLost(Failure(ConnectionDone()))
    reactor.connectors.clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--variant", choices=["default", "ops", "rtt"], default="default")
    args = parser.parse_args()
    # No log observer (as in production the file observer would add its own
    # cost to both versions alike): events go nowhere.
    globalLogBeginner.beginLoggingTo([], discardBuffer=True, redirectStandardIO=False)
    del globalLogPublisher._observers[:]  # type: ignore[attr-defined]
    reactor, factory = build(args.variant)
    for i in range(2000):
        one(reactor, factory, i)
    best = float("inf")
    for _ in range(args.repeat):
        start = time.perf_counter()
        for i in range(args.count):
            one(reactor, factory, i)
        best = min(best, (time.perf_counter() - start) / args.count)
    import edgeproxy

    where = inspect.getsourcefile(edgeproxy)
    print(f"{best * 1e6:.2f} us per connection ({args.variant}; {where})")


if __name__ == "__main__":
    main()
