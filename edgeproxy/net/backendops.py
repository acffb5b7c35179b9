"""
What the operator's admin states do to open connections and bindings.

L{BackendOperations} listens to L{edgeproxy.routing.admin.AdminStates}:

  - C{maint}: every session to the backend is closed at once (cause
    C{maint}); its bindings go with the overlay's L{UNAVAILABLE} verdict.
  - C{drain}: no new clients (the overlay does that); a client bound to it
    keeps reaching it while it has a connection open there, and its binding
    is dropped when its last connection there closes, so that the drain
    converges however often clients reconnect.  With a deadline, the
    sessions still open then are closed (cause C{drain-deadline}).
  - back to C{ready}: nothing is undone (closed is closed); bindings form
    again as clients come.

It watches only draining backends' sessions: the per-connection cost is a
membership test on a set that is empty when nothing drains.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, Optional

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from edgeproxy.interfaces import IBindingRepository
from edgeproxy.model import BindingKey
from edgeproxy.routing.admin import DRAIN, MAINT, AdminState
from edgeproxy.routing.bindings import client_key

__all__ = ["BackendOperations"]

_log = Logger()


class BackendOperations:
    """
    @param live: The sessions (an L{edgeproxy.net.proxy.ConnectionTable}).
    @param bindings: The binding table.
    @param watched: The set the proxy factories test (C{factory.watched}).
    @param ipv6_prefix: How bindings key IPv6 clients (the router's).
    @param wallclock: Epoch seconds (drain deadlines are wall-clock times,
        so that they survive a restart through the state file).
    """

    def __init__(
        self,
        clock: IReactorTime,
        live: Any,
        bindings: IBindingRepository,
        watched: set[str],
        ipv6_prefix: int = 64,
        wallclock: Callable[[], float] = time.time,
    ) -> None:
        self.clock = clock
        self.live = live
        self.bindings = bindings
        self.watched = watched
        self.ipv6_prefix = ipv6_prefix
        self.wallclock = wallclock
        #: Per draining backend: binding key -> sessions open to it.
        self._open: Dict[str, Dict[BindingKey, int]] = {}
        self._deadlines: Dict[str, IDelayedCall] = {}

    # -- the AdminStates listener ---------------------------------------------

    def changed(self, backend_id: str, old: AdminState, new: AdminState) -> None:
        """
        L{edgeproxy.routing.admin.AdminStates} listener.  Never raises.
        """
        try:
            self._changed(backend_id, old, new)
        except Exception:
            _log.failure("applying the admin state of {backend} failed", backend=backend_id)

    def _changed(self, backend_id: str, old: AdminState, new: AdminState) -> None:
        if new.state != DRAIN:
            self._stopWatching(backend_id)
        if new.state == MAINT:
            cut = self.closeSessions(backend_id, "maint")
            if cut:
                _log.info(
                    "backend {backend} in maintenance: closed {cut} connections",
                    backend=backend_id,
                    cut=cut,
                )
        elif new.state == DRAIN:
            if old.state != DRAIN:
                self._watch(backend_id)
            self._schedule(backend_id, new.deadline)

    # -- drain ---------------------------------------------------------------------

    def _key(self, session: Any) -> BindingKey:
        return (client_key(session.clientHost, self.ipv6_prefix), session.factory.app)

    def _watch(self, backend_id: str) -> None:
        counts: Dict[BindingKey, int] = {}
        for session in self._sessionsOf(backend_id):
            if session._backendSide is not None and not session._watched:
                session._watched = True
                key = self._key(session)
                counts[key] = counts.get(key, 0) + 1
        self._open[backend_id] = counts
        self.watched.add(backend_id)
        dropped = 0
        for key in self.bindings.keysFor(backend_id):
            if key not in counts:
                self.bindings.remove(key)
                dropped += 1
        _log.info(
            "backend {backend} draining: {sessions} connections from {clients} clients"
            " stay, {dropped} idle bindings dropped",
            backend=backend_id,
            sessions=sum(counts.values()),
            clients=len(counts),
            dropped=dropped,
        )

    def _stopWatching(self, backend_id: str) -> None:
        call = self._deadlines.pop(backend_id, None)
        if call is not None and call.active():
            call.cancel()
        if self._open.pop(backend_id, None) is not None:
            self.watched.discard(backend_id)
            for session in self._sessionsOf(backend_id):
                session._watched = False

    def started(self, session: Any) -> None:
        """
        A session joined a draining backend (a bound client came back).
        """
        counts = self._open.get(session.backend.id)
        if counts is not None:
            key = self._key(session)
            counts[key] = counts.get(key, 0) + 1

    def ended(self, session: Any) -> None:
        """
        A session to a draining backend ended: its client's binding goes
        with its last connection there.
        """
        backend_id = session.backend.id
        counts = self._open.get(backend_id)
        if counts is None:
            return
        key = self._key(session)
        left = counts.get(key, 0) - 1
        if left > 0:
            counts[key] = left
            return
        counts.pop(key, None)
        binding = self.bindings.lookup(key, self.clock.seconds())
        if binding is not None and binding.backend_id == backend_id:
            self.bindings.remove(key)

    def _schedule(self, backend_id: str, deadline: Optional[float]) -> None:
        call = self._deadlines.pop(backend_id, None)
        if call is not None and call.active():
            call.cancel()
        if deadline is None:
            return
        delay = max(0.0, deadline - self.wallclock())
        self._deadlines[backend_id] = self.clock.callLater(delay, self._deadline, backend_id)

    def _deadline(self, backend_id: str) -> None:
        self._deadlines.pop(backend_id, None)
        cut = self.closeSessions(backend_id, "drain-deadline")
        _log.info(
            "drain deadline of backend {backend}: closed {cut} connections",
            backend=backend_id,
            cut=cut,
        )

    # -- closing -----------------------------------------------------------------

    def _sessionsOf(self, backend_id: str) -> list[Any]:
        return [
            s
            for s in list(self.live)
            if s.backend is not None and s.backend.id == backend_id and not s._done
        ]

    def closeSessions(self, backend_id: str, cause: str) -> int:
        """
        Close every session to C{backend_id} (connected or connecting) with
        C{cause}; return how many.  A scan of the sessions: for rare
        operator actions, never per connection.
        """
        sessions = self._sessionsOf(backend_id)
        for session in sessions:
            try:
                session._abortBoth(cause)
            except Exception:
                _log.failure("closing a connection to {backend} failed", backend=backend_id)
        return len(sessions)

    def stop(self) -> None:
        """
        Cancel pending drain deadlines.
        """
        for call in self._deadlines.values():
            if call.active():
                call.cancel()
        self._deadlines.clear()
