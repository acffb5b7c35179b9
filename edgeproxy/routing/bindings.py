"""
Client affinity in memory: (client key, app) -> backend id, with a sliding
TTL and a bounded size (SPEC section 4).  L{client_key} gives the client
part of the key: the IPv4 address, or the IPv6 address's /64.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from collections import OrderedDict
from typing import AbstractSet, Dict

from zope.interface import implementer

from edgeproxy.interfaces import IBindingRepository
from edgeproxy.model import Binding, BindingKey

__all__ = ["BindingTable", "client_key"]


@implementer(IBindingRepository)
class BindingTable:
    """
    An in-memory L{IBindingRepository}: an LRU-ordered dict.

    The least recently used binding sits at the front.  Every L{lookup} and
    L{bind} that finds a live binding slides its TTL and moves it to the
    back, so with a clock that does not go backwards the front also holds
    the bindings seen longest ago: L{collect} frees expired bindings from
    the front and stops at the first live one, so its cost is proportional
    to what it frees, not to the size of the table.  Expiry is also checked
    on every read, so an expired binding is never returned even before it
    is collected.

    A binding expires when C{now - last_seen >= ttl}.

    An index from backend id to the keys bound to it is kept in step with
    the table on every insertion and removal, so L{removeBackends} costs
    what it removes, not the size of the table.  The index relies on a
    binding's C{backend_id} never changing while it is in the table.

    @ivar ttl: Sliding time-to-live in seconds.
    @ivar max_size: Most bindings held; the least recently used goes first.
    """

    def __init__(self, ttl: float = 600.0, max_size: int = 1_000_000) -> None:
        if not ttl > 0:
            raise ValueError(f"binding ttl must be > 0, got {ttl!r}")
        if max_size < 1:
            raise ValueError(f"binding max_size must be >= 1, got {max_size!r}")
        self.ttl = float(ttl)
        self.max_size = max_size
        self._bindings: OrderedDict[BindingKey, Binding] = OrderedDict()
        # backend id -> its keys (a dict used as an ordered set: measured
        # cheaper than a set); no entry for a backend without bindings.
        self._by_backend: Dict[str, Dict[BindingKey, None]] = {}

    def __repr__(self) -> str:
        return f"<BindingTable ttl={self.ttl} size={len(self._bindings)}/{self.max_size}>"

    def lookup(self, key: BindingKey, now: float) -> Binding | None:
        """
        See L{IBindingRepository.lookup}.
        """
        bindings = self._bindings
        binding = bindings.get(key)
        if binding is None:
            return None
        if now - binding.last_seen >= self.ttl:
            del bindings[key]
            self._unindex(key, binding.backend_id)
            return None
        binding.last_seen = now
        bindings.move_to_end(key)
        return binding

    def peek(self, key: BindingKey, now: float) -> Binding | None:
        """
        The live binding for C{key}, without refreshing or removing
        anything (for diagnostics), or C{None}.
        """
        binding = self._bindings.get(key)
        if binding is None or now - binding.last_seen >= self.ttl:
            return None
        return binding

    def bind(self, key: BindingKey, backend_id: str, now: float) -> Binding:
        """
        See L{IBindingRepository.bind}.
        """
        binding = self.lookup(key, now)
        if binding is not None:
            return binding
        bindings = self._bindings
        if len(bindings) >= self.max_size:
            old_key, old = bindings.popitem(last=False)
            self._unindex(old_key, old.backend_id)
        binding = Binding(backend_id=backend_id, created=now, last_seen=now)
        bindings[key] = binding
        keys = self._by_backend.get(backend_id)
        if keys is None:
            self._by_backend[backend_id] = {key: None}
        else:
            keys[key] = None
        return binding

    def _unindex(self, key: BindingKey, backend_id: str) -> None:
        """
        Drop C{key} from the index of C{backend_id}, and the backend's
        entry when it was its last key.
        """
        keys = self._by_backend[backend_id]
        del keys[key]
        if not keys:
            del self._by_backend[backend_id]

    def remove(self, key: BindingKey) -> None:
        """
        See L{IBindingRepository.remove}.
        """
        binding = self._bindings.pop(key, None)
        if binding is not None:
            self._unindex(key, binding.backend_id)

    def removeBackend(self, backend_id: str) -> int:
        """
        See L{IBindingRepository.removeBackend}.  Costs what it removes.
        """
        return self.removeBackends({backend_id}).get(backend_id, 0)

    def keysFor(self, backend_id: str) -> frozenset[BindingKey]:
        """
        See L{IBindingRepository.keysFor}: read from the index.
        """
        return frozenset(self._by_backend.get(backend_id, ()))

    def removeBackends(self, backend_ids: AbstractSet[str]) -> dict[str, int]:
        """
        See L{IBindingRepository.removeBackends}.  Costs what it removes
        (plus one index probe per id): no scan of the table.
        """
        bindings = self._bindings
        by_backend = self._by_backend
        freed: dict[str, int] = {}
        for backend_id in backend_ids:
            keys = by_backend.pop(backend_id, None)
            if keys is None:
                continue
            for key in keys:
                del bindings[key]
            freed[backend_id] = len(keys)
        return freed

    def collect(self, now: float) -> int:
        """
        See L{IBindingRepository.collect}.

        Frees expired bindings from the least recently used end and stops at
        the first live one.  If the clock went backwards an expired binding
        may sit behind a live one; it is then freed by a later collect or on
        its next read (never returned either way).
        """
        bindings = self._bindings
        ttl = self.ttl
        freed = 0
        while bindings:
            key = next(iter(bindings))
            binding = bindings[key]
            if now - binding.last_seen < ttl:
                break
            del bindings[key]
            self._unindex(key, binding.backend_id)
            freed += 1
        return freed

    def __len__(self) -> int:
        return len(self._bindings)

    def _check_invariants(self) -> None:
        """
        Raise C{AssertionError} unless the index holds exactly the table's
        keys, each under its binding's backend id, with no empty entry, and
        the table is within its size.  For tests; scans everything.
        """
        bindings = self._bindings
        if len(bindings) > self.max_size:
            raise AssertionError(f"{len(bindings)} bindings > max_size {self.max_size}")
        indexed = 0
        for backend_id, keys in self._by_backend.items():
            if not keys:
                raise AssertionError(f"empty index entry for {backend_id!r}")
            for key in keys:
                binding = bindings.get(key)
                if binding is None or binding.backend_id != backend_id:
                    raise AssertionError(
                        f"index has {key!r} under {backend_id!r}, table {binding!r}"
                    )
            indexed += len(keys)
        if indexed != len(bindings):
            raise AssertionError(f"index holds {indexed} keys, table {len(bindings)}")


def client_key(ip: str, ipv6_prefix: int = 64) -> str:
    """
    The client part of a binding key (SPEC section 4): what a client at
    C{ip} is bound by, so that one IPv6 host, whose privacy addresses rotate
    inside its /64, holds one binding per app and cannot fill the table.

      - An IPv4 address is returned unchanged (no parsing: the fast path).
      - An IPv4-mapped IPv6 address (C{::ffff:1.2.3.4}) gives the IPv4
        address it carries, whatever C{ipv6_prefix}.
      - Another IPv6 address is masked to C{ipv6_prefix} bits and written
        as a network (C{"2001:db8:1:2::/64"}); with 128 it is the whole
        address in its compressed form (C{"2001:db8::1"}), without any
        scope id.
      - Text that is not an IP address is returned unchanged.

    @param ip: A client address as the transport gives it.
    @param ipv6_prefix: Leading bits of an IPv6 address that make the key.
    @raise ValueError: If C{ipv6_prefix} is not within 0..128.
    """
    if not 0 <= ipv6_prefix <= 128:
        raise ValueError(f"client key IPv6 prefix must be within 0..128, got {ipv6_prefix!r}")
    if ":" not in ip:
        return ip
    return _ipv6_key(ip, ipv6_prefix)


_MAPPED = bytes(10) + b"\xff\xff"
_ZERO80 = bytes(10)


@functools.lru_cache(maxsize=4096)
def _ipv6_key(ip: str, prefix: int) -> str:
    """
    L{client_key} for text holding a colon, in a bounded cache (the same
    clients reconnect).  Parses and prints with C{inet_pton}/C{inet_ntop},
    about ten times faster than C{ipaddress}; the tests hold the result to
    what C{ipaddress} gives, unparsable text included.
    """
    # ipaddress's rules for a scope id: none, or non-empty without "%";
    # and no "/" anywhere.  No NUL either: PyPy's inet_pton stops at one
    # ("::\x00junk" is "::" there), CPython's refuses it.
    address, sep, scope = ip.partition("%")
    if (sep and (not scope or "%" in scope)) or "/" in ip or "\x00" in address:
        return ip
    try:
        packed = socket.inet_pton(socket.AF_INET6, address)
    except (OSError, ValueError):
        return ip
    if packed[:12] == _MAPPED:
        return socket.inet_ntop(socket.AF_INET, packed[12:])
    if prefix < 128:
        shift = 128 - prefix
        packed = (int.from_bytes(packed, "big") >> shift << shift).to_bytes(16, "big")
    if packed[:10] == _ZERO80:
        # inet_ntop may write these (::/80) with a dotted IPv4 tail.
        text = str(ipaddress.IPv6Address(packed))
    else:
        text = socket.inet_ntop(socket.AF_INET6, packed)
    return text if prefix == 128 else f"{text}/{prefix}"
