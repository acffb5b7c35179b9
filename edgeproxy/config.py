"""
Settings shared by the proxy protocols and the service builder.

Plain frozen values: L{edgeproxy.tap} builds them from options and the
environment; other applications build them directly.
"""

from __future__ import annotations

from typing import Optional

import attrs


@attrs.frozen(slots=True)
class ProxySettings:
    """
    Per-connection behaviour of a L{edgeproxy.net.proxy.ProxyFactory}.

    @ivar connect_timeout: Seconds for one backend connect attempt.
    @ivar connect_budget: Seconds for all connect attempts of one client
        together (failover included).
    @ivar max_attempts: Connect attempts per client connection (1 = no
        failover).
    @ivar idle_timeout: Seconds without a byte in either direction before
        both sides are closed.
    @ivar half_closed_timeout: Seconds a connection may stay half-closed
        (one direction finished) before both sides are closed.
    @ivar max_connections: Concurrent client connections of the factory;
        beyond it new connections are closed at once.  0 = unlimited.
    @ivar keepalive: Enable TCP keepalive on both legs.
    @ivar lean: Carry plain TCP legs on the lean path (L{edgeproxy.net.lean}):
        backends at IP literals connected with a socket of the proxy's own,
        clients of plain C{tcp:} listeners accepted as lean transports.
        C{False}: Twisted's C{connectTCP} and C{tcp.Server} for every leg.
    @ivar splice: Relay bulk streams between two lean legs with
        C{splice(2)} through a pipe (L{edgeproxy.net.splice}; Linux,
        Python 3.10+) instead of copying them through Python.
    @ivar splice_pipes: A bulk direction gets its pipe (two descriptors)
        only while fewer than this many are open in the process.
    """

    connect_timeout: float = 5.0
    connect_budget: float = 10.0
    max_attempts: int = 3
    idle_timeout: float = 600.0
    half_closed_timeout: float = 30.0
    max_connections: int = 10000
    keepalive: bool = True
    lean: bool = True
    splice: bool = True
    splice_pipes: int = 1024


@attrs.frozen(slots=True)
class ListenerSpec:
    """
    One C{--listen} value: an endpoint description, optionally bound to an app.

    @ivar description: Twisted endpoint description (C{tcp:8080},
        C{haproxy:tcp:8080}, C{txsni:certs:tcp:8443}), or an SNI passthrough
        one (C{sni:tcp:443}).
    @ivar app: Only route to this app's backends; C{None} routes to all.
        On an SNI passthrough listener: the default app, for hellos whose
        server name is missing or claimed by no app (C{None}: close them).
    """

    description: str
    app: Optional[str] = None

    @property
    def passthrough(self) -> bool:
        """
        Whether this is an SNI passthrough listener (C{sni:...}).
        """
        return self.description.startswith("sni:")
