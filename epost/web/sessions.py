"""Mail Control sessions: a random token in an HttpOnly, SameSite=Strict cookie, and a CSRF token per session.

Nothing secret ever goes into a URL. The session lives only in the daemon's
memory: a restart logs everybody out. Before login there is no server-side
session at all: the login form's CSRF token is an HMAC of a random pre-login
cookie under a key made at start-up (double submit), so anonymous visitors
cost no memory.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field

SESSION_COOKIE = b"epost_session"
LOGIN_COOKIE = b"epost_login"


@dataclass
class Session:
    user: str  # the admin account's address
    csrf: str  # sent back in every form, checked on every POST
    created: float
    seen: float
    flash: list[tuple[str, str]] = field(default_factory=list)  # (ok|error, text) for the next page shown

    def take_flash(self) -> list[tuple[str, str]]:
        notes, self.flash = self.flash, []
        return notes


def _cookie(request, name: bytes, value: str, max_age: int | None = None) -> None:
    request.addCookie(
        name,
        value.encode("ascii"),
        path=b"/",
        httpOnly=True,
        secure=bool(request.isSecure()),
        sameSite="strict",
        max_age=None if max_age is None else str(max_age).encode(),
    )


def token_ok(expected: str, given: str | None) -> bool:
    return given is not None and hmac.compare_digest(expected.encode(), given.encode("utf-8", "replace"))


class SessionStore:
    """Logged-in sessions by token; idle ones end after `idle` seconds, every one after `lifetime`."""

    def __init__(self, clock, idle: float = 30 * 60, lifetime: float = 12 * 3600) -> None:
        self.clock = clock
        self.idle = idle
        self.lifetime = lifetime
        self._sessions: dict[str, Session] = {}
        self._login_key = secrets.token_bytes(32)

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, request) -> Session | None:
        """The request's live session, or None (no cookie, unknown, or expired)."""
        token = request.getCookie(SESSION_COOKIE)
        if not token:
            return None
        token_text = token.decode("ascii", "replace")
        session = self._sessions.get(token_text)
        if session is None:
            return None
        now = self.clock.seconds()
        if now - session.seen > self.idle or now - session.created > self.lifetime:
            del self._sessions[token_text]
            return None
        session.seen = now
        return session

    def start(self, request, user: str) -> Session:
        """A fresh session (new token: a token set before login is never reused) with its cookie."""
        self.end(request)
        self._expire()
        now = self.clock.seconds()
        token = secrets.token_urlsafe(32)
        session = Session(user=user, csrf=secrets.token_urlsafe(32), created=now, seen=now)
        self._sessions[token] = session
        _cookie(request, SESSION_COOKIE, token)
        _cookie(request, LOGIN_COOKIE, "", max_age=0)
        return session

    def end(self, request) -> None:
        token = request.getCookie(SESSION_COOKIE)
        if token:
            self._sessions.pop(token.decode("ascii", "replace"), None)
            _cookie(request, SESSION_COOKIE, "", max_age=0)

    def end_all(self, user: str) -> None:
        for token in [t for t, s in self._sessions.items() if s.user == user]:
            del self._sessions[token]

    def _expire(self) -> None:
        now = self.clock.seconds()
        for token in [
            t for t, s in self._sessions.items() if now - s.seen > self.idle or now - s.created > self.lifetime
        ]:
            del self._sessions[token]

    # -- the login form's CSRF token, before there is a session -------------------

    def login_token(self, request) -> str:
        """The token for the login form, from the pre-login cookie (set now if missing)."""
        nonce = request.getCookie(LOGIN_COOKIE)
        nonce_text = nonce.decode("ascii", "replace") if nonce else ""
        if len(nonce_text) < 20:
            nonce_text = secrets.token_urlsafe(24)
            _cookie(request, LOGIN_COOKIE, nonce_text)
        return self._sign(nonce_text)

    def login_token_ok(self, request, given: str | None) -> bool:
        nonce = request.getCookie(LOGIN_COOKIE)
        if not nonce or len(nonce) < 20:
            return False
        return token_ok(self._sign(nonce.decode("ascii", "replace")), given)

    def _sign(self, nonce: str) -> str:
        return hmac.new(self._login_key, nonce.encode(), hashlib.sha256).hexdigest()
