"""
Admin states per backend (issue 8 item 4): ready, drain (with an optional
deadline) and maint, what they do to routing, open connections and
bindings, the state file that keeps them across reloads and restarts, and
C{edgeproxy-ctl state}.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from faultkit import Echo, ProxyHarness, listen, wait_until
from twisted.internet import reactor

from edgeproxy import ctl
from edgeproxy.config import ProxySettings
from edgeproxy.interfaces import AVAILABLE, NO_NEW_CLIENTS, UNAVAILABLE
from edgeproxy.net.backendops import BackendOperations
from edgeproxy.routing.admin import DRAIN, MAINT, READY, AdminState, AdminStates
from edgeproxy.stores.statefile import StateFile, StateFileError, load_states, save_states
from edgeproxy.testing import StateOverlay, backend


def test_states_set_overlay_verdicts():
    """
    ready / drain / maint are the overlay verdicts AVAILABLE /
    NO_NEW_CLIENTS / UNAVAILABLE under the source "admin"; listeners hear
    each change once.
    """
    overlay = StateOverlay()
    states = AdminStates(overlay)
    seen: list[tuple[str, str, str]] = []
    states.addListener(lambda b, old, new: seen.append((b, old.state, new.state)))
    assert states.set("a", AdminState(DRAIN))
    assert overlay.verdict("a") == NO_NEW_CLIENTS
    assert not states.set("a", AdminState(DRAIN))
    states.set("a", AdminState(MAINT))
    assert overlay.verdict("a") == UNAVAILABLE
    states.set("a", AdminState(READY))
    assert overlay.verdict("a") == AVAILABLE and states.all() == {}
    assert seen == [("a", READY, DRAIN), ("a", DRAIN, MAINT), ("a", MAINT, READY)]
    with pytest.raises(ValueError):
        AdminState("broken")
    with pytest.raises(ValueError):
        AdminState(MAINT, deadline=1.0)


def test_replace_makes_the_given_set_whole():
    """
    C{replace} (a state file read again) sets every listed state and puts
    every unlisted backend back to ready.
    """
    states = AdminStates(StateOverlay())
    states.set("a", AdminState(MAINT))
    states.set("b", AdminState(DRAIN))
    changes = states.replace({"b": AdminState(DRAIN), "c": AdminState(MAINT)})
    assert sorted((b, o.state, n.state) for b, o, n in changes) == [
        ("a", MAINT, READY),
        ("c", READY, MAINT),
    ]
    assert sorted(states.all()) == ["b", "c"]


def test_state_file_round_trip_and_errors(tmp_path: Path):
    """
    The file round-trips every field; a missing or empty file means no
    states; garbage, a bad state, unknown fields or a wrong version are
    refused with the path in the message.
    """
    path = str(tmp_path / "state.json")
    assert load_states(path) == {}
    states = {
        "a": AdminState(DRAIN, deadline=1_800_000_000.0, since=1_700_000_000.0, reason="x"),
        "b": AdminState(MAINT),
    }
    save_states(path, states)
    assert load_states(path) == states
    assert (tmp_path / "state.json").stat().st_mode & 0o777 == 0o640
    for text in (
        "{nope",
        '{"version": 2, "backends": {}}',
        '{"version": 1, "backends": {"a": {"state": "off"}}}',
        '{"version": 1, "backends": {"a": {"state": "drain", "colour": 1}}}',
        '{"version": 1, "backends": {"a": {"state": "maint", "deadline": 5}}}',
        '{"version": 1, "backends": []}',
    ):
        (tmp_path / "state.json").write_text(text)
        with pytest.raises(StateFileError, match=r"state\.json"):
            load_states(path)
    (tmp_path / "state.json").write_text("")
    assert load_states(path) == {}


@pytest_twisted.inlineCallbacks
def test_state_file_follows_changes_both_ways(tmp_path: Path):
    """
    The proxy's own changes are written to the file; a change another
    process writes (edgeproxy-ctl) is applied at the next poll; a broken
    file keeps the states in force and is logged once.
    """
    path = str(tmp_path / "state.json")
    save_states(path, {"a": AdminState(MAINT)})
    overlay = StateOverlay()
    states = AdminStates(overlay)
    sf = StateFile(path, states, reactor)
    assert sf.loadInitial() == 1
    assert overlay.verdict("a") == UNAVAILABLE
    yield sf.set("b", AdminState(DRAIN, reason="upgrade"))
    assert sorted(load_states(path)) == ["a", "b"]
    assert ctl.main(["--state-file", path, "state", "set", "a", "ready"], io.StringIO()) == 0
    yield sf.poll()
    assert overlay.verdict("a") == AVAILABLE and states.get("b").state == DRAIN
    (tmp_path / "state.json").write_text("{broken")
    yield sf.poll()
    yield sf.poll()
    assert states.get("b").state == DRAIN
    assert sf.lastError is not None and "not JSON" in sf.lastError


def test_ctl_state_commands(tmp_path: Path, capsys: Any):
    """
    edgeproxy-ctl state set/list, with --json, a drain deadline, and a
    non-zero exit with a one-line reason on a bad request.
    """
    path = str(tmp_path / "s.json")
    out = io.StringIO()
    assert ctl.main(["--state-file", path, "state", "list"], out) == 0
    assert "every backend is ready" in out.getvalue()
    before = time.time()
    assert ctl.main(["--state-file", path, "state", "set", "gru-1", "drain", "--deadline", "60",
                     "--reason", "kernel"], io.StringIO()) == 0  # fmt: skip
    out = io.StringIO()
    assert ctl.main(["--state-file", path, "--json", "state", "list"], out) == 0
    rows = json.loads(out.getvalue())
    assert rows["gru-1"]["state"] == "drain" and rows["gru-1"]["reason"] == "kernel"
    assert before + 60 <= rows["gru-1"]["deadline"] <= time.time() + 60
    code = ctl.main(["--state-file", path, "state", "set", "x", "maint", "--deadline", "5"])
    assert code == 1
    assert "drain only" in capsys.readouterr().err
    (tmp_path / "s.json").write_text("{")
    assert ctl.main(["--state-file", path, "state", "list"], io.StringIO()) == 1


# -- on real sockets --------------------------------------------------------------


def _wire(h: ProxyHarness) -> tuple[AdminStates, BackendOperations]:
    states = AdminStates(h.router.overlay)
    ops = BackendOperations(reactor, h.factory.connections, h.bindings, h.factory.watched)
    h.factory.watcher = ops
    states.addListener(ops.changed)
    return states, ops


@pytest.mark.slow
@pytest_twisted.inlineCallbacks
def test_drain_keeps_open_connections_refuses_new_and_survives_a_reload():
    """
    A draining backend keeps its open connection (it still relays), the
    same client may open more while it has one open, new clients go to the
    other backend, a routing table reload does not undo the drain, and
    once the client's last connection closes its binding is gone so its
    next connection goes elsewhere.
    """
    one, two = listen(reactor, Echo), listen(reactor, Echo)
    rows = [backend("one", port=one.port), backend("two", port=two.port, region="eu")]
    h = ProxyHarness(reactor, rows, ProxySettings(connect_timeout=1.0))
    states, ops = _wire(h)
    try:
        first = yield h.connect()
        first.send(b"a")
        yield first.wait_for(1)
        assert h.sessions()[0].backend.id == "one"
        states.set("one", AdminState(DRAIN))
        h.repository.set([*rows])  # a reload with the same content...
        h.repository.set([rows[0], backend("two", port=two.port, region="eu", weight=2)])
        assert h.router.overlay.verdict("one") == NO_NEW_CLIENTS
        first.send(b"b")
        yield first.wait_for(2)
        # The same client (127.0.0.1, bound to "one") while it has one open:
        again = yield h.connect()
        again.send(b"c")
        yield again.wait_for(1)
        assert sorted(s.backend.id for s in h.sessions()) == ["one", "one"]
        # ...but when all of its connections to "one" are closed:
        for c in (first, again):
            c.transport.loseConnection()
            yield c.wait_closed()
        yield wait_until(reactor, lambda: not h.sessions())
        later = yield h.connect()
        later.send(b"d")
        yield later.wait_for(1)
        assert [s.backend.id for s in h.sessions()] == ["two"]
        later.transport.loseConnection()
        yield later.wait_closed()
    finally:
        ops.stop()
        yield h.stop([one, two])


@pytest.mark.slow
@pytest_twisted.inlineCallbacks
def test_maint_closes_and_drain_deadline_closes():
    """
    maint closes the backend's open connections at once (cause maint) and
    takes no new ones; a drain with a deadline closes what is still open
    when it passes (cause drain-deadline).
    """
    one, two = listen(reactor, Echo), listen(reactor, Echo)
    rows = [backend("one", port=one.port), backend("two", port=two.port, region="eu")]
    h = ProxyHarness(reactor, rows, ProxySettings(connect_timeout=1.0))
    states, ops = _wire(h)
    try:
        c = yield h.connect()
        c.send(b"a")
        yield c.wait_for(1)
        states.set("one", AdminState(MAINT))
        yield c.wait_closed()
        assert h.logs.causes() == ["maint"]
        fresh = yield h.connect()
        fresh.send(b"b")
        yield fresh.wait_for(1)
        assert [s.backend.id for s in h.sessions()] == ["two"]
        states.set("two", AdminState(DRAIN, deadline=time.time() + 0.5))
        yield fresh.wait_closed()
        assert h.logs.causes() == ["maint", "drain-deadline"]
    finally:
        ops.stop()
        yield h.stop([one, two])
