"""
Tests for L{edgeproxy.control.auth}: the token file, the constant-time
check, the access rules and the refusal of a public admin listener without
tokens (issue 9, FAULTS F24).  The same rules over real sockets are in
C{test_api.py}.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path
from typing import List

import pytest
from faultkit import EventCollector
from hypothesis import given
from hypothesis import strategies as st
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web.test.requesthelper import DummyRequest

from edgeproxy.control import auth as edgeauth
from edgeproxy.control.auth import (
    ADMIN,
    READ,
    REFUSED,
    REGISTER,
    ApiAuth,
    TokenFileError,
    Tokens,
    check_admin_security,
    is_loopback_description,
    load_tokens,
    parse_tokens,
)
from edgeproxy.metrics import MetricsStore

FULL = "f" * 8 + "0123456789abcdef"
ONLY_REGISTER = "r" * 8 + "0123456789abcdef"
OTHER = "o" * 8 + "0123456789abcdef"


def tokens() -> Tokens:
    return parse_tokens(f"{FULL}\n{ONLY_REGISTER} register\n{OTHER}\n")


def request(authorization: bytes | List[bytes] | None = None) -> DummyRequest:
    r = DummyRequest([b""])
    if authorization is not None:
        values = authorization if isinstance(authorization, list) else [authorization]
        r.requestHeaders.setRawHeaders(b"authorization", values)
    return r


# --- the token file ------------------------------------------------------------


def test_parse_tokens_lines_scopes_and_comments() -> None:
    """
    One token per line, optionally followed by C{register}; blank lines and
    C{#} comments are ignored; a token without a scope is a full one.
    """
    parsed = parse_tokens(
        f"# operators\n\n  {FULL}  \n# backends\n{ONLY_REGISTER} register\n{OTHER} REGISTER\n"
    )
    assert len(parsed) == 3
    assert parsed.scope(FULL.encode()) == ADMIN
    assert parsed.scope(ONLY_REGISTER.encode()) == REGISTER
    assert parsed.scope(OTHER.encode()) == REGISTER
    assert parsed.scope(b"x" * 32) is None
    assert parsed.scope(b"") is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("# nothing\n\n", "has no tokens"),
        ("", "has no tokens"),
        ("short-token-15ch\n"[:15] + "\n", "line 1: the token is shorter than 16 characters"),
        (f"# a\n{FULL}\nabc\n", "line 3: the token is shorter than 16 characters"),
        (f"{FULL} admin extra\n", "line 1: expected TOKEN or TOKEN register"),
        (f"{FULL} read\n", "line 1: unknown scope 'read' (expected register)"),
        (f"{FULL}\n{FULL} register\n", "line 2: the same token as line 1"),
        ("bad\u00e9token-long-enough\n", "line 1: the token is not a bearer token"),
        ('quote"token-long-enough\n', "line 1: the token is not a bearer token"),
    ],
)
def test_parse_tokens_refuses_bad_files(text: str, message: str) -> None:
    """
    A file without tokens, a token shorter than 16 characters, a token
    outside the bearer-token alphabet, an unknown scope, extra words or a
    token given twice are refused with the line number, and never with the
    token itself.
    """
    with pytest.raises(TokenFileError) as caught:
        parse_tokens(text, "tokens.txt")
    assert message in str(caught.value)
    assert str(caught.value).startswith("tokens.txt")
    assert FULL not in str(caught.value)


def test_admin_is_an_explicit_scope_too() -> None:
    """
    C{TOKEN admin} is the same as C{TOKEN}.
    """
    assert parse_tokens(f"{FULL} admin\n").scope(FULL.encode()) == ADMIN


@given(st.text(max_size=200))
def test_parse_tokens_only_raises_its_own_error(text: str) -> None:
    """
    Whatever the text, parsing gives tokens or a TokenFileError.
    """
    try:
        parsed = parse_tokens(text)
    except TokenFileError:
        return
    assert len(parsed) >= 1


def test_load_tokens(tmp_path: Path) -> None:
    """
    The file is read as UTF-8; a missing or non-UTF-8 file is a
    TokenFileError naming it; a file anyone can read is used with a warning.
    """
    path = tmp_path / "tokens"
    with pytest.raises(TokenFileError) as caught:
        load_tokens(str(path))
    assert str(path) in str(caught.value)
    path.write_bytes(b"\xff\xfe" + FULL.encode())
    with pytest.raises(TokenFileError, match="not UTF-8"):
        load_tokens(str(path))
    path.write_text(f"{FULL}\n")
    os.chmod(path, 0o600)
    collector = EventCollector("edgeproxy.control.auth")
    globalLogPublisher.addObserver(collector)
    try:
        assert load_tokens(str(path)).scope(FULL.encode()) == ADMIN
        assert collector.events == []
        os.chmod(path, 0o644)
        load_tokens(str(path))
        assert any("can be read by anyone" in formatEvent(e) for e in collector.events)
    finally:
        globalLogPublisher.removeObserver(collector)


def test_scope_compares_every_token_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    The check uses C{hmac.compare_digest} on equal-length digests, once per
    configured token whichever token (first, last, none) is presented: no
    early exit tells a prober which token matched or how much of one.
    """
    parsed = tokens()
    calls: List[tuple[int, int]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(edgeauth.hmac, "compare_digest", counting)
    for presented in (FULL, OTHER, "nope-" * 8, ""):
        calls.clear()
        parsed.scope(presented.encode())
        assert len(calls) == len(parsed) == 3
        assert set(calls) == {(32, 32)}


def test_tokens_constructor_checks_too() -> None:
    """
    L{Tokens} itself refuses no tokens, short tokens, unknown scopes and
    repeats (for code that builds one without a file).
    """
    with pytest.raises(TokenFileError):
        Tokens([])
    with pytest.raises(TokenFileError, match="shorter"):
        Tokens([("abc", ADMIN)])
    with pytest.raises(TokenFileError, match="unknown scope"):
        Tokens([(FULL, "read")])
    with pytest.raises(TokenFileError, match="twice"):
        Tokens([(FULL, ADMIN), (FULL, REGISTER)])


# --- where the listener is -----------------------------------------------------------


@pytest.mark.parametrize(
    ("description", "loopback"),
    [
        ("tcp:8090:interface=127.0.0.1", True),
        ("tcp:port=8090:interface=127.0.0.5", True),
        ("tcp:8090:interface=localhost", True),
        ("tcp6:8090:interface=\\:\\:1", True),
        ("tcp6:8090:interface=\\:\\:ffff\\:127.0.0.1", True),
        ("ssl:8443:privateKey=k.pem:interface=127.0.0.1", True),
        ("unix:/run/edgeproxy/admin.sock", True),
        ("haproxy:tcp:8090:interface=127.0.0.1", True),
        ("txsni:/etc/certs:tcp:8443:interface=127.0.0.1", True),
        ("tcp:8090", False),
        ("tcp:8090:interface=0.0.0.0", False),
        ("tcp:8090:interface=10.0.0.1", False),
        ("tcp6:8090", False),
        ("tcp6:8090:interface=\\:\\:", False),
        ("ssl:8443:privateKey=k.pem", False),
        ("systemd:domain=INET:index=0", False),
        ("haproxy:tcp:8090", False),
        ("txsni:/etc/certs:tcp:8443", False),
        ("", False),
    ],
)
def test_is_loopback_description(description: str, loopback: bool) -> None:
    """
    Only a listener bound to a loopback interface (or a UNIX socket) is
    loopback; no interface means every address; wrappers are looked
    through; anything unknown is not loopback.
    """
    assert is_loopback_description(description) is loopback


def test_check_admin_security() -> None:
    """
    A public admin listener without tokens refuses to start, with a
    message naming --api-token-file; with tokens, or on loopback, or with
    no admin listener, it may.
    """
    with pytest.raises(ValueError) as caught:
        check_admin_security("tcp:8090", None)
    assert "--api-token-file" in str(caught.value) and "tcp:8090" in str(caught.value)
    with pytest.raises(ValueError):
        check_admin_security("tcp:8090:interface=0.0.0.0", None)
    check_admin_security("tcp:8090", tokens())
    check_admin_security("tcp:8090:interface=127.0.0.1", None)
    check_admin_security("none", None)
    check_admin_security(None, None)


# --- the rules -----------------------------------------------------------------------


def _auth(openReads: bool = True, with_tokens: bool = True) -> tuple[ApiAuth, MetricsStore]:
    metrics = MetricsStore()
    return ApiAuth(tokens() if with_tokens else None, openReads=openReads, metrics=metrics), metrics


def test_writes_always_need_a_token() -> None:
    """
    A registration write needs any valid token, an admin write a full one:
    none is a 401, a wrong one (or another scheme, or two headers) a 401
    with error="invalid_token", a register-only token on an admin write a
    403 with error="insufficient_scope".  Each refusal is counted.
    """
    auth, metrics = _auth()
    bearer = b"Bearer "
    assert auth.check(request(bearer + FULL.encode()), ADMIN) is None
    assert auth.check(request(bearer + ONLY_REGISTER.encode()), REGISTER) is None
    assert auth.check(request(b"bearer  " + FULL.encode() + b" "), REGISTER) is None
    missing = auth.check(request(), REGISTER)
    assert missing is not None and missing.code == 401 and missing.reason == "missing"
    for header in (
        bearer + b"x" * 40,
        b"Basic " + FULL.encode(),
        b"Bearer",
        FULL.encode(),
        [bearer + FULL.encode(), bearer + FULL.encode()],
    ):
        refusal = auth.check(request(header), REGISTER)
        assert refusal is not None and refusal.code == 401, header
        assert b'error="invalid_token"' in refusal.challenge
    scope = auth.check(request(bearer + ONLY_REGISTER.encode()), ADMIN)
    assert scope is not None and scope.code == 403
    assert b'error="insufficient_scope"' in scope.challenge
    assert metrics.counter(REFUSED, "missing") == 1
    assert metrics.counter(REFUSED, "invalid") == 5
    assert metrics.counter(REFUSED, "scope") == 1


def test_no_token_file_refuses_every_write() -> None:
    """
    Without a token file every write is a 401 whose detail says to
    configure --api-token-file, whatever the request carries.
    """
    auth, _ = _auth(with_tokens=False)
    for need in (REGISTER, ADMIN):
        refusal = auth.check(request(b"Bearer " + FULL.encode()), need)
        assert refusal is not None and refusal.code == 401
        assert "--api-token-file" in (refusal.detail or "")


def test_reads_open_only_on_loopback() -> None:
    """
    On a loopback listener reads need no token; on another one they need a
    valid token (either scope).
    """
    open_auth, _ = _auth(openReads=True)
    assert open_auth.check(request(), READ) is None
    closed, _ = _auth(openReads=False)
    refusal = closed.check(request(), READ)
    assert refusal is not None and refusal.code == 401
    assert closed.check(request(b"Bearer " + ONLY_REGISTER.encode()), READ) is None
    assert closed.check(request(b"Bearer " + b"y" * 20), READ) is not None
    assert ApiAuth.forListener("tcp:8090:interface=127.0.0.1", None).openReads is True
    assert ApiAuth.forListener("tcp:8090", tokens()).openReads is False


def test_refuse_and_guard_answer_json() -> None:
    """
    A refusal is a JSON error with its status and C{WWW-Authenticate}; the
    guard lets reads through on loopback and answers others with the
    refusal.
    """
    import json

    closed, _ = _auth(openReads=False)
    r = request()
    refused = closed.guard(r)
    assert refused is not None
    body = json.loads(refused.render(r))
    assert r.responseCode == 401
    assert body == {
        "error": "a bearer token is required",
        "detail": "send Authorization: Bearer TOKEN",
        "status": 401,
    }
    assert r.responseHeaders.getRawHeaders(b"www-authenticate") == [b'Bearer realm="edgeproxy"']
    open_auth, _ = _auth(openReads=True)
    assert open_auth.guard(request()) is None


@pytest.mark.parametrize(
    "description, loopback",
    [
        ("tcp:8090:interface=127.0.0.1:interface=0.0.0.0", False),
        ("tcp:8090:interface=0.0.0.0:interface=127.0.0.1", True),
        ("tcp:8090:127.0.0.1", True),
        ("tcp:8090:0.0.0.0", False),
    ],
)
def test_loopback_is_read_as_twisted_reads_the_description(description, loopback):
    """
    The loopback test reads a description as Twisted does: the last
    interface= wins (so a second one cannot sneak a public address past the
    token rule), and tcp's second positional argument is the interface.
    """
    from edgeproxy.control.auth import is_loopback_description

    assert is_loopback_description(description) is loopback
