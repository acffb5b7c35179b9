"""
The admin states in a local JSON file, so that they survive table reloads
and restarts (HAProxy's C{server-state-file}).

The file::

    {"version": 1,
     "backends": {"gru-1": {"state": "drain", "deadline": 1764640000.0,
                            "since": 1764639000.0, "reason": "kernel update"}}}

It is written atomically (a temporary file renamed over it) by the proxy
and by C{edgeproxy-ctl state}; the proxy notices a change made by another
process within one poll interval (a stat in the thread pool, the file read
only when it changed).  A file that cannot be read or parsed is refused
with one log line per change of the problem, and the states in force stay.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any, Dict, Mapping, Optional, Tuple

from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from edgeproxy.routing.admin import STATES, AdminState, AdminStates

__all__ = ["StateFile", "StateFileError", "dump_states", "load_states", "save_states"]

_log = Logger()

_MAX_SIZE = 4 << 20
_Signature = Tuple[int, int, int]


class StateFileError(Exception):
    """
    The state file cannot be used; the message says why.
    """


def load_states(path: str) -> Dict[str, AdminState]:
    """
    Read the admin states from C{path}; a missing file means none.
    Blocking.

    @raise StateFileError: Unreadable, too big, not JSON, or a bad entry.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_SIZE + 1)
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise StateFileError(f"cannot read {path}: {e.strerror or e}") from None
    if len(data) > _MAX_SIZE:
        raise StateFileError(f"{path} is larger than {_MAX_SIZE} bytes")
    if not data.strip():
        return {}
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise StateFileError(f"{path} is not JSON: {e}") from None
    return _parse(document, path)


def _parse(document: Any, path: str) -> Dict[str, AdminState]:
    if not isinstance(document, dict) or document.get("version") != 1:
        raise StateFileError(f'{path}: expected an object with "version": 1')
    backends = document.get("backends", {})
    if not isinstance(backends, dict):
        raise StateFileError(f'{path}: "backends" must be an object')
    states: Dict[str, AdminState] = {}
    for backend_id, entry in backends.items():
        if not isinstance(entry, dict):
            raise StateFileError(f"{path}: backend {backend_id!r}: expected an object")
        unknown = set(entry) - {"state", "deadline", "since", "reason"}
        if unknown:
            raise StateFileError(
                f"{path}: backend {backend_id!r}: unknown field(s) {', '.join(sorted(unknown))}"
            )
        state = entry.get("state")
        if not isinstance(state, str) or state not in STATES:
            raise StateFileError(f"{path}: backend {backend_id!r}: bad state {state!r}")
        try:
            states[backend_id] = AdminState(
                state=state,
                deadline=_number(entry.get("deadline"), "deadline"),
                since=_number(entry.get("since"), "since"),
                reason=_text(entry.get("reason", "")),
            )
        except (TypeError, ValueError) as e:
            raise StateFileError(f"{path}: backend {backend_id!r}: {e}") from None
    return states


def _number(value: Any, name: str) -> Optional[float]:
    if value is None:
        return None
    if type(value) not in (int, float):
        raise ValueError(f"{name} must be a number")
    return float(value)


def _text(value: Any) -> str:
    if type(value) is not str:
        raise ValueError("reason must be text")
    return value


def dump_states(states: Mapping[str, AdminState]) -> bytes:
    """
    The file's bytes for C{states} (sorted, one backend per line).
    """
    backends: Dict[str, Dict[str, Any]] = {}
    for backend_id in sorted(states):
        s = states[backend_id]
        entry: Dict[str, Any] = {"state": s.state}
        if s.deadline is not None:
            entry["deadline"] = s.deadline
        if s.since is not None:
            entry["since"] = s.since
        if s.reason:
            entry["reason"] = s.reason
        backends[backend_id] = entry
    return (json.dumps({"version": 1, "backends": backends}, indent=1) + "\n").encode()


def save_states(path: str, states: Mapping[str, AdminState]) -> None:
    """
    Write C{states} to C{path} atomically (mode 0640).  Blocking.

    @raise StateFileError: The file cannot be written.
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".edgeproxy-state.", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(dump_states(states))
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o640)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
    except OSError as e:
        raise StateFileError(f"cannot write {path}: {e.strerror or e}") from None


def _signature(path: str) -> Optional[_Signature]:
    """
    (mtime, size, inode) of C{path}; C{None} when it does not exist.

    @raise StateFileError: It cannot be looked at (permissions, a stale
        NFS handle...): never taken for "no states", which would put every
        backend in maintenance back into service.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StateFileError(f"cannot look at {path}: {e.strerror or e}") from None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _readIfChanged(
    path: str, known: Optional[_Signature]
) -> Tuple[Optional[_Signature], Optional[Dict[str, AdminState]]]:
    signature = _signature(path)
    if signature == known:
        return signature, None
    if signature is None:
        return None, {}
    return signature, load_states(path)


class StateFile:
    """
    Keeps an L{AdminStates} and a file in step: loads it at startup, writes
    it (in the thread pool) on every change made in this process, and
    applies the changes another process makes to the file (L{poll}, the
    periodic job).

    @ivar path: The file.
    @ivar lastError: Why the last read or write failed, or C{None}.
    """

    def __init__(self, path: str, states: AdminStates, reactor: Any) -> None:
        self.path = path
        self.states = states
        self.reactor = reactor
        self.lastError: Optional[str] = None
        self._signature: Optional[_Signature] = None
        self._polling: Optional[Deferred[None]] = None
        self._applying = False

    def loadInitial(self) -> int:
        """
        Read the file before the reactor runs and apply it; return how many
        states it held.

        @raise StateFileError: It cannot be read or parsed (a clear startup
            error: better than starting with maintenance forgotten).
        """
        self._signature = _signature(self.path)
        loaded = load_states(self.path)
        self._apply(loaded)
        self.states.addListener(self._changedHere)
        return len(loaded)

    def set(self, backend_id: str, state: AdminState) -> "Deferred[None]":
        """
        Set a state here (the admin API): applied at once, then written.
        """
        if state.since is None:
            state = AdminState(state.state, state.deadline, time.time(), state.reason)
        self.states.set(backend_id, state)
        return self._write()

    def _apply(self, states: Mapping[str, AdminState]) -> None:
        self._applying = True
        try:
            self.states.replace(states)
        finally:
            self._applying = False

    def _changedHere(self, backend_id: str, old: AdminState, new: AdminState) -> None:
        if not self._applying:
            self._write()

    def _write(self) -> "Deferred[None]":
        snapshot = self.states.all()
        d: Deferred[Any] = deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), self._writeBlocking, snapshot
        )
        d.addCallbacks(self._written, self._failed)
        return d

    def _writeBlocking(self, snapshot: Mapping[str, AdminState]) -> Optional[_Signature]:
        save_states(self.path, snapshot)
        return _signature(self.path)

    def _written(self, signature: Optional[_Signature]) -> None:
        self._signature = signature
        self._ok()

    def poll(self) -> "Deferred[None]":
        """
        Apply the file if another process changed it.  Never fails.
        """
        if self._polling is not None:
            return self._polling
        d: Deferred[Any] = deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), _readIfChanged, self.path, self._signature
        )

        def read(result: Tuple[Optional[_Signature], Optional[Dict[str, AdminState]]]) -> None:
            signature, states = result
            self._signature = signature
            if states is not None:
                _log.info("admin states re-read from {path}", path=self.path)
                self._apply(states)
            self._ok()

        def done(_: object) -> None:
            self._polling = None

        d.addCallbacks(read, self._failed)
        d.addBoth(done)
        if not d.called:
            self._polling = d
            return d
        return succeed(None)

    def _ok(self) -> None:
        if self.lastError is not None:
            _log.info("state file {path} usable again", path=self.path)
            self.lastError = None

    def _failed(self, failure: Failure) -> None:
        error = failure.value
        message = str(error) if isinstance(error, StateFileError) else repr(error)
        if message != self.lastError:
            self.lastError = message
            if isinstance(error, StateFileError):
                _log.error(
                    "state file trouble, keeping the admin states in force: {error}",
                    error=message,
                )
            else:
                _log.failure("state file trouble", failure)
