"""
The C{edgeepoll} reactor: C{twistd --reactor=edgeepoll edgeproxy ...}.

Imports nothing heavy: the reactor module loads only when chosen.
"""

from twisted.application.reactors import Reactor

edgeepoll = Reactor(
    "edgeepoll",
    "edgeproxy.net.reactor",
    "epoll without the legacy per-event log context (Linux; edgeproxy's fast path)",
)
