"""
Client affinity in memory: (client IP, app) -> backend id, with a sliding
TTL and a bounded size (SPEC section 4).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import AbstractSet

from zope.interface import implementer

from edgeproxy.interfaces import IBindingRepository
from edgeproxy.model import Binding, BindingKey

__all__ = ["BindingTable"]


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
            bindings.popitem(last=False)
        binding = Binding(backend_id=backend_id, created=now, last_seen=now)
        bindings[key] = binding
        return binding

    def remove(self, key: BindingKey) -> None:
        """
        See L{IBindingRepository.remove}.
        """
        self._bindings.pop(key, None)

    def removeBackend(self, backend_id: str) -> int:
        """
        See L{IBindingRepository.removeBackend}.  Scans the whole table.
        """
        return self.removeBackends({backend_id}).get(backend_id, 0)

    def removeBackends(self, backend_ids: AbstractSet[str]) -> dict[str, int]:
        """
        See L{IBindingRepository.removeBackends}.  One scan of the whole
        table, however many ids.
        """
        bindings = self._bindings
        doomed = [(k, b.backend_id) for k, b in bindings.items() if b.backend_id in backend_ids]
        freed: dict[str, int] = {}
        for k, backend_id in doomed:
            del bindings[k]
            freed[backend_id] = freed.get(backend_id, 0) + 1
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
            if now - bindings[key].last_seen < ttl:
                break
            del bindings[key]
            freed += 1
        return freed

    def __len__(self) -> int:
        return len(self._bindings)
