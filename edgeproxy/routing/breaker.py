"""
The passive circuit breaker: the proxy's own connect results per backend
(HAProxy's C{observe layer4}, Envoy's consecutive-failure outlier
ejection), fed to routing through the state overlay.

    CLOSED --(N consecutive connect failures)--> OPEN
    OPEN --(cooldown)--> HALF_OPEN
    HALF_OPEN --(the next connection chosen for it: one trial)--> TRIAL
    TRIAL --(connect succeeds)--> CLOSED
    TRIAL --(connect fails)--> OPEN (another cooldown)
    TRIAL --(no result within the trial timeout: the client gave up, the
             session was cut, a local error)--> HALF_OPEN (another trial)

While OPEN and during the trial the backend's C{"breaker"} verdict is
L{UNAVAILABLE}: it takes no client, bound or new, so exactly one connection
tries it when the cooldown is over.  A success in any state resets the
failure count.  State changes are logged once each.
"""

from __future__ import annotations

from typing import AbstractSet, Any, Dict, Optional, Set

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from edgeproxy.interfaces import AVAILABLE, UNAVAILABLE, IMetricsStore, IStateOverlay

__all__ = ["CLOSED", "HALF_OPEN", "OPEN", "SOURCE", "TRIAL", "CircuitBreaker"]

_log = Logger()

#: The overlay source the breaker speaks as.
SOURCE = "breaker"

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half-open"
TRIAL = "trial"


class _State:
    __slots__ = ("call", "failures", "state")

    def __init__(self) -> None:
        self.failures = 0
        self.state = CLOSED
        self.call: Optional[IDelayedCall] = None


class CircuitBreaker:
    """
    Consecutive-failure ejection per backend.

    @ivar halfOpen: Ids whose cooldown is over and whose trial has not been
        chosen yet; the router tells L{trialStarted} when it picks one (a
        set membership test on the per-connection path, usually on an empty
        set).
    @ivar failures: Consecutive failures that open the breaker (0: never).
    @ivar cooldown: Seconds it stays open before one trial.
    """

    def __init__(
        self,
        overlay: IStateOverlay,
        clock: IReactorTime,
        failures: int = 5,
        cooldown: float = 30.0,
        metrics: Optional[IMetricsStore] = None,
        trial_timeout: float = 10.0,
    ) -> None:
        if failures < 0:
            raise ValueError(f"failures must be >= 0, got {failures!r}")
        if not cooldown > 0:
            raise ValueError(f"cooldown must be > 0, got {cooldown!r}")
        self.overlay = overlay
        self.clock = clock
        self.failures = failures
        self.cooldown = cooldown
        self.metrics = metrics
        self.trialTimeout = trial_timeout
        self.halfOpen: Set[str] = set()
        self._states: Dict[str, _State] = {}

    def __repr__(self) -> str:
        opened = sum(1 for s in self._states.values() if s.state != CLOSED)
        return f"<CircuitBreaker tracked={len(self._states)} not-closed={opened}>"

    def state(self, backend_id: str) -> str:
        """
        L{CLOSED}, L{OPEN}, L{HALF_OPEN} or L{TRIAL}.
        """
        s = self._states.get(backend_id)
        return CLOSED if s is None else s.state

    def states(self) -> Dict[str, str]:
        """
        Every backend whose breaker is not closed, with its state.
        """
        return {b: s.state for b, s in self._states.items() if s.state != CLOSED}

    # -- events -----------------------------------------------------------

    def connectSucceeded(self, backend_id: str) -> None:
        """
        A connect to C{backend_id} succeeded: reset; a trial closes it.
        """
        s = self._states.get(backend_id)
        if s is None:
            return
        if s.state == CLOSED:
            del self._states[backend_id]
            return
        if s.state in (TRIAL, HALF_OPEN):
            self._transition(backend_id, s, CLOSED, "a trial connection succeeded")
            self._cancel(s)
            self.halfOpen.discard(backend_id)
            del self._states[backend_id]
            self.overlay.setVerdict(backend_id, SOURCE, AVAILABLE)
        # OPEN: a connection that started before it opened; stay open.

    def connectFailed(self, backend_id: str) -> None:
        """
        A connect to C{backend_id} failed (refused, timed out, reset before
        any byte).
        """
        if not self.failures:
            return
        s = self._states.get(backend_id)
        if s is None:
            s = self._states[backend_id] = _State()
        if s.state == CLOSED:
            s.failures += 1
            if s.failures >= self.failures:
                self._open(backend_id, s, f"{s.failures} consecutive connect failures")
        elif s.state in (TRIAL, HALF_OPEN):
            self.halfOpen.discard(backend_id)
            self._open(backend_id, s, "the trial connection failed")

    def trialStarted(self, backend_id: str) -> None:
        """
        The router chose C{backend_id} while half-open: this connection is
        the trial; no other may go there until it ends.
        """
        s = self._states.get(backend_id)
        self.halfOpen.discard(backend_id)
        if s is None or s.state != HALF_OPEN:
            return
        self._transition(backend_id, s, TRIAL, "one trial connection")
        self._cancel(s)
        s.call = self.clock.callLater(self.trialTimeout, self._trialLost, backend_id)
        self.overlay.setVerdict(backend_id, SOURCE, UNAVAILABLE)

    def _trialLost(self, backend_id: str) -> None:
        """
        The trial gave no result in time (its client went away, it was cut,
        a local error): let another connection try.
        """
        s = self._states.get(backend_id)
        if s is None:
            return
        s.call = None
        if s.state == TRIAL:
            self._cooled(backend_id, force=True)

    def forget(self, backend_ids: AbstractSet[str]) -> None:
        """
        Backends that left the routing table: drop their state and verdicts.
        """
        for backend_id in backend_ids:
            s = self._states.pop(backend_id, None)
            if s is not None:
                self._cancel(s)
            self.halfOpen.discard(backend_id)
        self.overlay.forget(backend_ids, {SOURCE})

    def routingTableChanged(self, old: Any, new: Any) -> None:
        """
        Repository listener: backends that left the table are forgotten.
        """
        gone = {b for b in self._states if b not in new.by_id}
        if gone:
            self.forget(gone)

    def stop(self) -> None:
        """
        Cancel every pending cooldown (for shutdown and tests).
        """
        for s in self._states.values():
            self._cancel(s)

    # -- internals ----------------------------------------------------------

    def _open(self, backend_id: str, s: _State, why: str) -> None:
        self._transition(backend_id, s, OPEN, why)
        self._cancel(s)
        s.call = self.clock.callLater(self.cooldown, self._cooled, backend_id)
        self.overlay.setVerdict(backend_id, SOURCE, UNAVAILABLE)

    def _cooled(self, backend_id: str, force: bool = False) -> None:
        s = self._states.get(backend_id)
        if s is None:
            return
        s.call = None
        if s.state != OPEN and not force:
            return
        why = "the trial gave no result" if force else f"{self.cooldown:g}s cooldown over"
        self._transition(backend_id, s, HALF_OPEN, why)
        self.halfOpen.add(backend_id)
        # The next connection chosen for it is the trial (see trialStarted).
        self.overlay.setVerdict(backend_id, SOURCE, AVAILABLE)

    def _transition(self, backend_id: str, s: _State, to: str, why: str) -> None:
        if s.state == to:
            return
        _log.info(
            "circuit breaker of {backend} {old} -> {new}: {reason}",
            backend=backend_id,
            old=s.state,
            new=to,
            reason=why,
        )
        s.state = to
        if self.metrics is not None:
            self.metrics.increment("breaker_transitions", to)

    @staticmethod
    def _cancel(s: _State) -> None:
        call, s.call = s.call, None
        if call is not None and call.active():
            call.cancel()
