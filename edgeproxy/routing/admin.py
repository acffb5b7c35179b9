"""
The operator's admin state per backend (HAProxy's C{set server state}):
C{ready}, C{drain} and C{maint}, fed to routing through the state overlay
as the C{"admin"} source.

  - C{ready}: normal.
  - C{drain}: no new clients (L{NO_NEW_CLIENTS}); clients bound to it keep
    reaching it while they have a connection open to it (the service drops a
    client's binding when its last connection there closes, so a drain
    converges); with a deadline, whatever is still open then is closed.
  - C{maint}: no traffic (L{UNAVAILABLE}); open connections are closed.

These states are the operator's word, kept apart from the routing table so
that a table reload never overwrites them (rancher/rancher#8627 is that
bug); L{edgeproxy.stores.statefile} keeps them in a local file so they also
survive restarts.  Nothing here does I/O.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Optional, Tuple

import attrs
from twisted.logger import Logger

from edgeproxy.interfaces import AVAILABLE, NO_NEW_CLIENTS, UNAVAILABLE, IStateOverlay

__all__ = ["DRAIN", "MAINT", "READY", "SOURCE", "STATES", "AdminState", "AdminStates"]

_log = Logger()

READY = "ready"
DRAIN = "drain"
MAINT = "maint"

#: Every admin state, and the overlay verdict it stands for.
STATES: Mapping[str, int] = {READY: AVAILABLE, DRAIN: NO_NEW_CLIENTS, MAINT: UNAVAILABLE}

#: The overlay source admin states speak as.
SOURCE = "admin"

AdminListener = Callable[[str, "AdminState", "AdminState"], None]
"""Called with (backend id, old, new) when a backend's admin state changes."""


@attrs.frozen(slots=True)
class AdminState:
    """
    One backend's admin state.

    @ivar state: L{READY}, L{DRAIN} or L{MAINT}.
    @ivar deadline: For a drain, the wall-clock time (epoch seconds) after
        which its remaining connections are closed; else C{None}.
    @ivar since: When it was set (epoch seconds), for operators.
    @ivar reason: Free text from the operator (at most 200 characters).
    """

    state: str = READY
    deadline: Optional[float] = None
    since: Optional[float] = None
    reason: str = ""

    def __attrs_post_init__(self) -> None:
        if self.state not in STATES:
            raise ValueError(f"unknown admin state {self.state!r} (ready, drain or maint)")
        if self.deadline is not None and self.state != DRAIN:
            raise ValueError("only a drain can have a deadline")
        if len(self.reason) > 200:
            raise ValueError("the reason is longer than 200 characters")


_READY = AdminState()


class AdminStates:
    """
    The admin state of every backend the operator has set one for.

    Backends not listed are C{ready}.  States are kept for ids that are not
    (or no longer) in the routing table: a backend put in maintenance and
    removed from the table is still in maintenance when it comes back.
    """

    def __init__(self, overlay: IStateOverlay) -> None:
        self.overlay = overlay
        self._states: Dict[str, AdminState] = {}
        self._listeners: List[AdminListener] = []

    def __repr__(self) -> str:
        return f"<AdminStates {len(self._states)} set>"

    def get(self, backend_id: str) -> AdminState:
        """
        The admin state of C{backend_id} (C{ready} when none was set).
        """
        return self._states.get(backend_id, _READY)

    def all(self) -> Mapping[str, AdminState]:
        """
        Every state that is not C{ready}, by backend id (a copy).
        """
        return dict(self._states)

    def set(self, backend_id: str, state: AdminState) -> bool:
        """
        Set C{backend_id}'s admin state; C{True} if it changed.
        """
        old = self.get(backend_id)
        if old == state:
            return False
        if state.state == READY:
            self._states.pop(backend_id, None)
        else:
            self._states[backend_id] = state
        self.overlay.setVerdict(backend_id, SOURCE, STATES[state.state])
        if old.state != state.state:
            _log.info(
                "backend {backend} admin state {old} -> {new}{why}",
                backend=backend_id,
                old=old.state,
                new=state.state,
                why=f" ({state.reason})" if state.reason else "",
            )
        for listener in list(self._listeners):
            try:
                listener(backend_id, old, state)
            except Exception:
                _log.failure("admin state listener {listener!r} failed", listener=listener)
        return True

    def replace(self, states: Mapping[str, AdminState]) -> List[Tuple[str, AdminState, AdminState]]:
        """
        Make C{states} the whole set (a state file read again): backends no
        longer listed become C{ready}.  Returns the changes made.
        """
        changes = []
        for backend_id in list(self._states):
            if backend_id not in states:
                old = self.get(backend_id)
                if self.set(backend_id, _READY):
                    changes.append((backend_id, old, _READY))
        for backend_id, state in states.items():
            old = self.get(backend_id)
            if self.set(backend_id, state):
                changes.append((backend_id, old, state))
        return changes

    def addListener(self, listener: AdminListener) -> None:
        """
        Call C{listener(backend_id, old, new)} after every change.
        """
        self._listeners.append(listener)
