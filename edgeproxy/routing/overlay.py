"""
The state overlay (SPEC section 9, decided): the proxy's own word on each
backend, consulted by the router on top of the routing snapshot.

Several sources (active health checks, the circuit breaker, the operator's
admin state...) each give a verdict per backend; the worst is in force.  The
router reads two sets per decision, L{StateOverlay.closedToNew} and
L{StateOverlay.unavailable}, which are replaced (never mutated in place) when
a verdict changes: a flap costs a set copy of the few affected backends, not
a snapshot rebuild or a scan of the bindings.
"""

from __future__ import annotations

from typing import AbstractSet, Dict, FrozenSet, List, Mapping

from twisted.logger import Logger
from zope.interface import implementer

from edgeproxy.interfaces import (
    AVAILABLE,
    NO_NEW_CLIENTS,
    UNAVAILABLE,
    IStateOverlay,
    StateListener,
)

__all__ = [
    "AVAILABLE",
    "NO_NEW_CLIENTS",
    "UNAVAILABLE",
    "VERDICT_NAMES",
    "StateOverlay",
]

_log = Logger()

#: Human names of the verdicts, for logs and the API.
VERDICT_NAMES: Mapping[int, str] = {
    AVAILABLE: "available",
    NO_NEW_CLIENTS: "no-new-clients",
    UNAVAILABLE: "unavailable",
}

_EMPTY: FrozenSet[str] = frozenset()


@implementer(IStateOverlay)
class StateOverlay:
    """
    An in-memory L{IStateOverlay}.

    @ivar closedToNew: Ids that take no new client (verdict
        L{NO_NEW_CLIENTS} or L{UNAVAILABLE}).
    @ivar unavailable: Ids that take no connection at all.
    """

    def __init__(self) -> None:
        self.closedToNew: FrozenSet[str] = _EMPTY
        self.unavailable: FrozenSet[str] = _EMPTY
        self._verdicts: Dict[str, Dict[str, int]] = {}
        self._listeners: List[StateListener] = []
        self._ignoring: Dict[FrozenSet[str], FrozenSet[str]] = {}

    def __repr__(self) -> str:
        return (
            f"<StateOverlay closedToNew={len(self.closedToNew)} "
            f"unavailable={len(self.unavailable)}>"
        )

    def verdict(self, backend_id: str) -> int:
        """
        See L{IStateOverlay.verdict}.
        """
        by_source = self._verdicts.get(backend_id)
        return max(by_source.values()) if by_source else AVAILABLE

    def sources(self, backend_id: str) -> Mapping[str, int]:
        """
        See L{IStateOverlay.sources}.
        """
        return dict(self._verdicts.get(backend_id, {}))

    def setVerdict(self, backend_id: str, source: str, verdict: int) -> None:
        """
        See L{IStateOverlay.setVerdict}.

        @raise ValueError: C{verdict} is not one of the three verdicts.
        """
        if verdict not in VERDICT_NAMES:
            raise ValueError(f"unknown verdict {verdict!r}")
        old = self.verdict(backend_id)
        by_source = self._verdicts.get(backend_id)
        if verdict == AVAILABLE:
            if by_source is None or source not in by_source:
                return
            del by_source[source]
            if not by_source:
                del self._verdicts[backend_id]
        else:
            if by_source is None:
                by_source = self._verdicts[backend_id] = {}
            if by_source.get(source) == verdict:
                return
            by_source[source] = verdict
        self._changed(backend_id, old)

    def forget(self, backend_ids: AbstractSet[str], sources: AbstractSet[str]) -> None:
        """
        See L{IStateOverlay.forget}.
        """
        for backend_id in backend_ids:
            by_source = self._verdicts.get(backend_id)
            if not by_source:
                continue
            old = self.verdict(backend_id)
            for source in sources:
                by_source.pop(source, None)
            if not by_source:
                del self._verdicts[backend_id]
            self._changed(backend_id, old)

    def closedToNewIgnoring(self, sources: AbstractSet[str]) -> AbstractSet[str]:
        """
        See L{IStateOverlay.closedToNewIgnoring}.  Computed on demand (for
        panic routing) at a cost proportional to the backends that have
        verdicts, then kept until a verdict changes: during an outage every
        connection asks, and pays a dictionary lookup.
        """
        key = frozenset(sources)
        cached = self._ignoring.get(key)
        if cached is None:
            cached = self._ignoring[key] = frozenset(
                b
                for b, by_source in self._verdicts.items()
                if any(v >= NO_NEW_CLIENTS for s, v in by_source.items() if s not in key)
            )
        return cached

    def addListener(self, listener: StateListener) -> None:
        """
        See L{IStateOverlay.addListener}.
        """
        self._listeners.append(listener)

    def _changed(self, backend_id: str, old: int) -> None:
        self._ignoring.clear()
        new = self.verdict(backend_id)
        if new == old:
            return
        if (new >= NO_NEW_CLIENTS) != (backend_id in self.closedToNew):
            self.closedToNew = (
                self.closedToNew | {backend_id}
                if new >= NO_NEW_CLIENTS
                else self.closedToNew - {backend_id}
            )
        if (new == UNAVAILABLE) != (backend_id in self.unavailable):
            self.unavailable = (
                self.unavailable | {backend_id}
                if new == UNAVAILABLE
                else self.unavailable - {backend_id}
            )
        for listener in list(self._listeners):
            try:
                listener(backend_id, old, new)
            except Exception:
                _log.failure(
                    "state overlay listener {listener!r} failed for {backend_id}",
                    listener=listener,
                    backend_id=backend_id,
                )
