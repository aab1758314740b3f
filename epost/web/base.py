"""What every logged-in Mail Control page shares: the login check, the CSRF check, and answering with Deferreds.

A page subclasses `Page` and defines `get(request, session)` and/or
`post(request, session, form)`. Either returns the body HTML (str), a
`Redirect`, or a Deferred/coroutine of one; `Page` wraps the body in the page
frame. Every POST must carry the session's CSRF token (else 403), and a POST
whose Origin header names another site is refused too. Every state-changing
action is a POST; GETs only read.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from epost.web.html import SECURITY_HEADERS, esc, flashes, page
from epost.web.sessions import Session, SessionStore, token_ok

log = Logger()


@dataclass
class Context:
    """The daemon's parts the pages use."""

    config: Any  # epost.config.Config
    manager: Any  # epost.queue.manager.DeliveryManager
    routing: Any  # epost.routing_chain.Routing (live tables)
    reactor: Any
    threadpool: Any  # blocking file reads
    auth_threadpool: Any  # password checks (scrypt), apart from the file reads
    sessions: SessionStore
    throttle: Any  # epost.smtp.throttle.AuthThrottle for failed logins
    dns_checks: Any = None  # epost.web.dns_panel.DnsChecks (the dashboard's check-dns)

    def in_thread(self, function, *args, **kwargs) -> defer.Deferred:
        return deferToThreadPool(self.reactor, self.threadpool, function, *args, **kwargs)


@dataclass(frozen=True)
class Redirect:
    """303 See Other to a path on this site (after a POST, so reloading does not repeat it)."""

    location: str


@dataclass(frozen=True)
class Response:
    """A whole page with its own status, for answers outside the normal flow (403, 429, ...)."""

    code: int
    title: str
    body: str


def add_headers(request) -> None:
    for name, value in SECURITY_HEADERS.items():
        request.setHeader(name, value)


def form(request) -> dict[str, list[str]]:
    """The POSTed fields as text (undecodable bytes replaced), from the body only:
    twisted.web's `request.args` also holds the query string, and a token
    or an action in a URL must never count."""
    request.content.seek(0)
    fields = parse_qs(request.content.read().decode("utf-8", "replace"), keep_blank_values=True)
    request.content.seek(0)
    return fields


def field(fields: dict[str, list[str]], name: str, default: str = "") -> str:
    values = fields.get(name)
    return values[0] if values else default


def same_origin(request) -> bool:
    """False when the browser says the POST came from another site (Origin, or failing that Referer)."""
    source = request.getHeader(b"origin") or request.getHeader(b"referer")
    if source is None:
        return True  # neither header (old clients, privacy settings): the CSRF token still decides
    host = request.getHeader(b"host")
    try:
        return host is not None and urlsplit(source.decode("ascii")).netloc == host.decode("ascii")
    except (UnicodeDecodeError, ValueError):
        return False


def answer(request, result: Any, frame) -> Any:
    """Write `result` (str body, Redirect, Response, or a Deferred/coroutine of one) to `request`.

    `frame(title, body)` turns a body into the whole document for this user.
    Returns what a render_* method returns.
    """
    add_headers(request)
    if inspect.iscoroutine(result):
        result = defer.ensureDeferred(result)
    if not isinstance(result, defer.Deferred):
        return _bytes(request, result, frame)
    gone = []
    request.notifyFinish().addErrback(lambda _: gone.append(True))

    def done(value):
        if not gone:
            request.write(_bytes(request, value, frame))
            request.finish()

    def failed(failure: Failure):
        log.failure("Mail Control: {path} failed", failure, path=request.path)
        if not gone:
            request.setResponseCode(500)
            request.write(frame("Error", '<p class="error">Something went wrong; the daemon log has the details.</p>'))
            request.finish()

    result.addCallbacks(done, failed)
    return NOT_DONE_YET


def _bytes(request, value: Any, frame) -> bytes:
    if isinstance(value, Redirect):
        request.setResponseCode(303)
        request.setHeader(b"location", value.location.encode("ascii"))
        return b""
    request.setHeader(b"content-type", b"text/html; charset=utf-8")
    if isinstance(value, Response):
        request.setResponseCode(value.code)
        return frame(value.title, value.body)
    if isinstance(value, bytes):
        return value
    return frame(None, value)


def forbidden(text: str) -> Response:
    return Response(403, "Forbidden", f'<p class="error">{esc(text)}</p><p><a href="/">Back to Mail Control</a></p>')


class Page(Resource):
    """A page that needs a logged-in admin; `path` is its place in the navigation."""

    isLeaf = True
    title = ""
    path = "/"

    def __init__(self, context: Context) -> None:
        super().__init__()
        self.context = context

    def get(self, request, session: Session) -> Any:
        return Response(405, "Method not allowed", "<p>Use the buttons on the pages.</p>")

    def post(self, request, session: Session, fields: dict[str, list[str]]) -> Any:
        return Response(405, "Method not allowed", "<p>This page only reads.</p>")

    def _frame(self, request, session: Session):
        def frame(title: str | None, body: str) -> bytes:
            notes = flashes(session.take_flash())
            return page(title or self.title, notes + body, user=session.user, csrf=session.csrf, here=self.path)

        return frame

    def render_GET(self, request):
        session = self.context.sessions.get(request)
        if session is None:
            add_headers(request)
            return _bytes(request, Redirect("/login"), None)
        return answer(request, self.get(request, session), self._frame(request, session))

    def render_POST(self, request):
        session = self.context.sessions.get(request)
        fields = form(request)
        if session is None:
            return answer(request, forbidden("Not logged in, or the session has ended: log in again."), _anonymous_frame)
        if not same_origin(request):
            return answer(request, forbidden("Refused: this form was sent from another site."), _anonymous_frame)
        if not token_ok(session.csrf, field(fields, "csrf") or None):
            return answer(
                request, forbidden("Refused: the form's security token is missing or stale. Reload the page and try again."),
                self._frame(request, session),
            )
        return answer(request, self.post(request, session, fields), self._frame(request, session))


def _anonymous_frame(title: str | None, body: str) -> bytes:
    return page(title or "Mail Control", body)
