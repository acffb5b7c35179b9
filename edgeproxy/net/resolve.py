"""
Backend host names resolved off the connect path: an L{IHostResolver} adapter.

A backend's C{wg_ip} may be a host name.  Handing that name to C{connectTCP}
costs one uncached, IPv4-only lookup per connection on the reactor's shared
thread pool.  L{HostResolver} instead keeps the addresses of every host name
the routing table uses:

  - L{HostResolver.addresses} is what the connect path calls: a dictionary
    lookup, answered for IP literals at once and for names from the cache;
  - names are resolved with C{getaddrinfo(AF_UNSPEC, SOCK_STREAM)} in the
    reactor's thread pool, a few at a time, at most one lookup in flight per
    name, when the routing table starts using them (L{routingTableChanged})
    and again once their addresses are older than a TTL (L{refresh}, the
    periodic job);
  - a failed lookup is logged once per change of state and keeps the last
    good addresses (optionally only up to a stale limit); a name never
    resolved has no addresses, so its backends fail over;
  - names no backend uses any more are forgotten.

Wiring::

    resolver = HostResolver(reactor)
    resolver.resolveBlocking(backend_hosts(repository.current()))  # startup
    repository.addListener(resolver.routingTableChanged)
    TimerService(resolver.retry, resolver.refresh)                  # TTL refresh
    ...
    addresses = resolver.addresses(backend.host)    # per connect attempt
    if addresses is None: ...                       # fail over to another backend
    else: reactor.connectTCP(addresses[0], backend.port, ...)
"""

from __future__ import annotations

import ipaddress
import socket
from typing import (
    Any,
    Callable,
    Dict,
    FrozenSet,
    Iterable,
    List,
    Mapping,
    Optional,
    Sequence,
    Set,
    Tuple,
)

import attrs
from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from edgeproxy.interfaces import IHostResolver
from edgeproxy.model import RoutingSnapshot, is_forbidden_target

__all__ = [
    "GetAddrInfo",
    "HostResolver",
    "NoAddressError",
    "backend_hosts",
    "is_ip_literal",
]

_log = Logger()

GetAddrInfo = Callable[[str, None, int, int], Sequence[Tuple[Any, ...]]]
"""
The signature of C{socket.getaddrinfo} as L{HostResolver} calls it:
C{(host, None, AF_UNSPEC, SOCK_STREAM)} -> C{[(family, type, proto,
canonname, sockaddr), ...]}.
"""


class NoAddressError(OSError):
    """
    C{getaddrinfo} answered, but with no IPv4 or IPv6 address.
    """


def is_ip_literal(host: str) -> bool:
    """
    Whether C{host} is an IPv4 or IPv6 address in text form (no brackets; an
    IPv6 scope such as C{fe80::1%eth0} is allowed).
    """
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def backend_hosts(snapshot: RoutingSnapshot) -> FrozenSet[str]:
    """
    The hosts of every backend of C{snapshot} that is not deleted (unhealthy
    and draining ones included: they may take connections again after the
    next reload or health check).
    """
    return frozenset(b.host for b in snapshot.backends if not b.deleted)


def _lookup(getaddrinfo: GetAddrInfo, host: str) -> Tuple[str, ...]:
    """
    Resolve C{host}: blocking, call it in a thread (or before the reactor
    runs).

    @return: The IPv4 and IPv6 addresses in C{getaddrinfo}'s order, without
        duplicates; never empty.
    @raise Exception: Whatever C{getaddrinfo} raises (C{socket.gaierror},
        C{UnicodeError} for a name IDNA refuses...), or L{NoAddressError}.
    """
    found: Dict[str, None] = {}
    for info in getaddrinfo(host, None, socket.AF_UNSPEC, socket.SOCK_STREAM):
        family, sockaddr = info[0], info[4]
        if family in (socket.AF_INET, socket.AF_INET6) and sockaddr:
            address = sockaddr[0]
            if isinstance(address, str):
                found[address] = None
    if not found:
        raise NoAddressError(f"no IPv4 or IPv6 address for {host!r}")
    # A name must not lead the proxy to a metadata service or a link-local
    # address (a registration by name, or DNS rebinding, would otherwise).
    usable = tuple(a for a in found if not is_forbidden_target(a))
    if not usable:
        raise NoAddressError(
            f"{host!r} resolves only to link-local or cloud metadata addresses"
            f" ({', '.join(found)}): refused"
        )
    return usable


def _reason(error: Optional[BaseException]) -> str:
    """
    A failed lookup's reason for the log (and to tell one failure from
    another).
    """
    if isinstance(error, OSError):
        return str(error)
    return f"{type(error).__name__}: {error}"


@attrs.define(slots=True)
class _Name:
    """
    What is known about one host name.

    @ivar addresses: The last good addresses, or C{None}.
    @ivar resolvedAt: When they were resolved (reactor seconds), or C{None}.
    @ivar due: When the name should next be looked up (C{-inf}: at once).
    @ivar error: Why the last lookup failed, or C{None} if it succeeded (or
        none has finished).
    """

    addresses: Optional[Tuple[str, ...]] = None
    resolvedAt: Optional[float] = None
    due: float = float("-inf")
    error: Optional[str] = None


def _positive(instance: object, attribute: "attrs.Attribute[Any]", value: Optional[float]) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"{attribute.name} must be positive, not {value!r}")


@implementer(IHostResolver)
@attrs.define(eq=False)
class HostResolver:
    """
    An L{IHostResolver} that caches C{getaddrinfo} answers.

    Every method runs on the reactor thread; only C{getaddrinfo} runs in the
    reactor's thread pool (L{resolveBlocking} apart, which is for startup).

    @ivar reactor: Provides C{seconds} (L{IReactorTime}), C{getThreadPool}
        and C{callFromThread} (L{IReactorThreads}).
    @ivar getaddrinfo: Called as C{getaddrinfo(host, None, AF_UNSPEC,
        SOCK_STREAM)}; C{socket.getaddrinfo} by default.
    @ivar ttl: Seconds after which a resolved name is looked up again
        (C{getaddrinfo} gives no TTL); its addresses keep serving meanwhile.
    @ivar retry: Seconds after a failed lookup before the name is tried
        again (by L{refresh}, or by L{addresses} for a name with no
        addresses).  Also a sensible interval for the timer that calls
        L{refresh}.
    @ivar stale: When not C{None}: seconds after their resolution beyond
        which the last good addresses of a name whose lookups fail are
        dropped.  C{None} (the default) keeps them for as long as the name
        is in use: a connect to an address that went away fails over, a
        DNS outage does not take every named backend down.
    @ivar concurrency: Lookups in the thread pool at once, at most.
    """

    reactor: Any
    getaddrinfo: GetAddrInfo = attrs.field(default=socket.getaddrinfo, repr=False)
    ttl: float = attrs.field(default=30.0, validator=_positive)
    retry: float = attrs.field(default=5.0, validator=_positive)
    stale: Optional[float] = attrs.field(default=None, validator=_positive)
    concurrency: int = attrs.field(default=4, validator=attrs.validators.ge(1))
    # host -> addresses: what addresses() answers from (literals and
    # resolved names alike).
    _table: Dict[str, Tuple[str, ...]] = attrs.field(init=False, factory=dict, repr=False)
    _literals: Set[str] = attrs.field(init=False, factory=set, repr=False)
    _names: Dict[str, _Name] = attrs.field(init=False, factory=dict, repr=False)
    # name -> Deferreds to fire when its lookup in flight ends.
    _inFlight: Dict[str, List["Deferred[None]"]] = attrs.field(init=False, factory=dict, repr=False)
    _semaphore: DeferredSemaphore = attrs.field(init=False, repr=False)
    _lookups: int = attrs.field(init=False, default=0, repr=False)
    _lookupFailures: int = attrs.field(init=False, default=0, repr=False)

    @_semaphore.default
    def _makeSemaphore(self) -> DeferredSemaphore:
        return DeferredSemaphore(self.concurrency)

    # IHostResolver

    def addresses(self, host: str) -> Optional[Tuple[str, ...]]:
        """
        See L{IHostResolver.addresses}.
        """
        found = self._table.get(host)
        if found is not None:
            return found
        return self._miss(host)

    def resolve(self, hosts: Iterable[str]) -> "Deferred[None]":
        """
        See L{IHostResolver.resolve}.
        """
        waiters: List[Deferred[None]] = []
        try:
            for host in dict.fromkeys(hosts):
                if self._keep(host) is None:
                    continue
                waiter: Deferred[None] = Deferred()
                waiters.append(waiter)
                pending = self._inFlight.get(host)
                if pending is None:
                    self._inFlight[host] = [waiter]
                    self._start(host)
                else:
                    pending.append(waiter)
        except Exception:
            _log.failure("starting host name lookups failed")
        if not waiters:
            return succeed(None)
        return DeferredList(waiters).addCallback(lambda _: None)

    def refresh(self) -> None:
        """
        See L{IHostResolver.refresh}.
        """
        try:
            now = self.reactor.seconds()
            for host, entry in list(self._names.items()):
                if entry.due <= now:
                    self._startInBackground(host)
        except Exception:
            _log.failure("refreshing host names failed; will try again")

    def watch(self, hosts: Iterable[str]) -> None:
        """
        See L{IHostResolver.watch}.
        """
        try:
            wanted = set(hosts)
            gone = [h for h in self._names if h not in wanted]
            for host in gone:
                del self._names[host]
                self._table.pop(host, None)
            for host in [h for h in self._literals if h not in wanted]:
                self._literals.discard(host)
                self._table.pop(host, None)
            if gone:
                _log.debug(
                    "forgot {count} host names no backend uses any more: {hosts}",
                    count=len(gone),
                    hosts=", ".join(sorted(gone)),
                )
            now = self.reactor.seconds()
            for host in wanted:
                entry = self._keep(host)
                if entry is not None and entry.due <= now:
                    self._startInBackground(host)
        except Exception:
            _log.failure("updating the host names to resolve failed")

    def routingTableChanged(self, old: RoutingSnapshot, new: RoutingSnapshot) -> None:
        """
        See L{IHostResolver.routingTableChanged}.
        """
        try:
            hosts = backend_hosts(new)
        except Exception:
            _log.failure("reading the hosts of a new routing table failed")
            return
        self.watch(hosts)

    def stats(self) -> Mapping[str, int]:
        """
        See L{IHostResolver.stats}.
        """
        resolved = sum(1 for e in self._names.values() if e.addresses is not None)
        return {
            "hosts": len(self),
            "literals": len(self._literals),
            "names": len(self._names),
            "resolved": resolved,
            "unresolved": len(self._names) - resolved,
            "failing": sum(1 for e in self._names.values() if e.error is not None),
            "in_flight": len(self._inFlight),
            "lookups": self._lookups,
            "lookup_failures": self._lookupFailures,
        }

    def __len__(self) -> int:
        """
        See L{IHostResolver.__len__}.
        """
        return len(self._literals) + len(self._names)

    # startup

    def resolveBlocking(self, hosts: Iterable[str], budget: float = 10.0) -> int:
        """
        Resolve the host names among C{hosts} one after the other on this
        thread, and keep them; for startup, B{before the reactor runs} only.

        C{getaddrinfo} cannot be given a time limit, so the limit is on
        starting lookups: once C{budget} seconds have gone, the names left
        are resolved in the background instead (in the thread pool, once the
        reactor runs).  Startup therefore takes at most C{budget} plus one
        system resolver timeout.  Failures are logged as in the background.

        @return: How many of the names now have addresses.
        """
        start = self.reactor.seconds()
        names: List[str] = []
        for host in dict.fromkeys(hosts):
            if self._keep(host) is None:
                continue
            names.append(host)
            if host in self._inFlight:
                continue
            if self.reactor.seconds() - start >= budget:
                self._startInBackground(host)
                continue
            self._lookups += 1
            try:
                found = _lookup(self.getaddrinfo, host)
            except Exception:
                self._failed(Failure(), host)
            else:
                self._resolved(found, host)
        return sum(1 for host in names if host in self._table)

    # internals

    def _keep(self, host: str) -> Optional[_Name]:
        """
        Keep C{host}: an IP literal goes into the table as itself (and
        C{None} is returned), a name gets its entry (returned).
        """
        entry = self._names.get(host)
        if entry is not None:
            return entry
        if host in self._literals:
            return None
        if is_ip_literal(host):
            self._literals.add(host)
            self._table[host] = (host,)
            return None
        entry = self._names[host] = _Name()
        return entry

    def _miss(self, host: str) -> Optional[Tuple[str, ...]]:
        """
        L{addresses} for a host not in the table: a literal not kept yet, or
        a name without addresses.
        """
        try:
            entry = self._keep(host)
            if entry is None:
                return self._table.get(host)
            if entry.due <= self.reactor.seconds():
                self._startInBackground(host)
        except Exception:
            _log.failure("looking up host {host} failed", host=host)
        return None

    def _startInBackground(self, host: str) -> None:
        """
        Start a lookup of C{host} unless one is in flight.
        """
        if host not in self._inFlight:
            self._inFlight[host] = []
            self._start(host)

    def _start(self, host: str) -> None:
        """
        Look C{host} up in the thread pool (once the semaphore lets it);
        C{self._inFlight[host]} must already exist.
        """
        self._lookups += 1
        try:
            reactor = self.reactor
            d: Deferred[Any] = self._semaphore.run(
                deferToThreadPool,
                reactor,
                reactor.getThreadPool(),
                _lookup,
                self.getaddrinfo,
                host,
            )
        except Exception:
            d = fail()
        d.addCallbacks(self._resolved, self._failed, callbackArgs=(host,), errbackArgs=(host,))
        d.addErrback(self._bug, host)
        d.addCallback(self._finished, host)

    def _resolved(self, found: Tuple[str, ...], host: str) -> None:
        entry = self._names.get(host)
        if entry is None:
            return  # forgotten while the lookup ran
        now = self.reactor.seconds()
        previous, error = entry.addresses, entry.error
        entry.addresses, entry.resolvedAt, entry.error = found, now, None
        entry.due = now + self.ttl
        self._table[host] = found
        if error is not None:
            _log.info(
                "host {host} resolves again, to {addresses}",
                host=host,
                addresses=", ".join(found),
            )
        elif found != previous:
            _log.info(
                "host {host} resolves to {addresses}",
                host=host,
                addresses=", ".join(found),
            )

    def _failed(self, failure: Failure, host: str) -> None:
        self._lookupFailures += 1
        entry = self._names.get(host)
        if entry is None:
            return
        now = self.reactor.seconds()
        entry.due = now + self.retry
        reason = _reason(failure.value)
        dropped: Optional[Tuple[str, ...]] = None
        if (
            entry.addresses is not None
            and entry.resolvedAt is not None
            and self.stale is not None
            and now - entry.resolvedAt > self.stale
        ):
            dropped, entry.addresses = entry.addresses, None
            self._table.pop(host, None)
        if dropped is not None:
            _log.warn(
                "cannot resolve host {host} ({error}); its last good addresses {addresses} "
                "are older than {stale} s and are dropped: its backends get no connections "
                "until it resolves",
                host=host,
                error=reason,
                addresses=", ".join(dropped),
                stale=self.stale,
            )
        elif reason != entry.error:
            if entry.addresses is not None and entry.resolvedAt is not None:
                _log.warn(
                    "cannot resolve host {host} ({error}); keeping its last good addresses "
                    "{addresses}, resolved {age:.0f} s ago",
                    host=host,
                    error=reason,
                    addresses=", ".join(entry.addresses),
                    age=now - entry.resolvedAt,
                )
            else:
                _log.warn(
                    "cannot resolve host {host} ({error}); it has no addresses: its "
                    "backends get no connections until it resolves",
                    host=host,
                    error=reason,
                )
        entry.error = reason

    def _bug(self, failure: Failure, host: str) -> None:
        _log.failure("handling the lookup of host {host} failed", failure, host=host)

    def _finished(self, _: object, host: str) -> None:
        for waiter in self._inFlight.pop(host, []):
            waiter.callback(None)
