"""Logging in and out of Mail Control.

Only the accounts listed in `[server] admin_users` may log in, with their
password from the users file (the same scrypt hashes as SMTP AUTH, checked in
the daemon's password-check threads by `UsersChecker`, so an unknown address
costs the same time).
Failed logins are throttled per client with AUTH's delays: each one waits a second
longer, and after `auth_failures_before_cutoff` the client is refused for 5
minutes. A client is an IPv4 address or an IPv6 /64, and all of loopback is
one client (any local user can pick a source address in 127.0.0.0/8).
"""

from __future__ import annotations

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import task
from twisted.logger import Logger
from twisted.web.resource import Resource

from epost.auth import UsersChecker
from epost.smtp.throttle import client_key
from epost.web.base import Context, Page, Redirect, Response, answer, field, form, same_origin
from epost.web.html import esc, page

log = Logger()


def login_form(token: str, user: str = "", error: str = "") -> str:
    note = f'<p class="flash error" role="alert">{esc(error)}</p>' if error else ""
    return (
        f"{note}"
        '<form method="post" action="/login" class="card">'
        f'<input type="hidden" name="csrf" value="{esc(token)}">'
        '<p><label>Admin address<br><input type="email" name="user" id="user" autocomplete="username" '
        f'required value="{esc(user)}"></label></p>'
        '<p><label>Password<br><input type="password" name="password" id="password" '
        'autocomplete="current-password" required></label></p>'
        '<p><button type="submit" class="primary" id="login">Log in</button></p>'
        "</form>"
    )


def _login_page(title: str, body: str | None) -> bytes:
    return page(title or "Log in", body)


class Login(Resource):
    isLeaf = True

    def __init__(self, context: Context) -> None:
        super().__init__()
        self.context = context
        self.checker = UsersChecker(context.routing.users, context.reactor, context.auth_threadpool)
        self.admins = frozenset(context.config.server.admin_users)
        self._checking: set[str] = set()  # clients with a password check in progress

    def render_GET(self, request):
        if self.context.sessions.get(request) is not None:
            return answer(request, Redirect("/"), _login_page)
        return answer(request, login_form(self.context.sessions.login_token(request)), _login_page)

    def render_POST(self, request):
        fields = form(request)
        sessions = self.context.sessions
        if not same_origin(request) or not sessions.login_token_ok(request, field(fields, "csrf") or None):
            token = sessions.login_token(request)
            body = login_form(token, error="The login form had expired; please try again.")
            return answer(request, Response(403, "Log in", body), _login_page)
        return answer(request, self._log_in(request, field(fields, "user").strip(), field(fields, "password")), _login_page)

    async def _log_in(self, request, user: str, password: str):
        ip = getattr(request.getClientAddress(), "host", "local")
        client = client_key(ip)
        throttle = self.context.throttle
        if throttle.blocked(client) or client in self._checking:
            error = "Too many failed logins; try again in a few minutes."
            body = login_form(self.context.sessions.login_token(request), user, error)
            return Response(429, "Log in", body)
        # One check at a time per client (its failure counted before the next
        # may start): parallel guesses cannot pass the cutoff. Few run at once
        # overall: the checks have the daemon's password-check threads (two).
        self._checking.add(client)
        try:
            try:
                credentials = UsernamePassword(user.encode("utf-8"), password.encode("utf-8", "surrogateescape"))
                account = await self.checker.requestAvatarId(credentials)
            except UnauthorizedLogin:
                account = None
            if account is not None and account.lower() in self.admins:
                self.context.sessions.start(request, account.lower())
                log.info("Mail Control: {user} logged in from {ip}", user=account, ip=ip)
                return Redirect("/")
            delay = throttle.failed(client)
            log.info("Mail Control: failed login for {user!r} from {ip}", user=user[:100], ip=ip)
            await task.deferLater(self.context.reactor, delay, lambda: None)
        finally:
            self._checking.discard(client)  # after the delay: a client's guesses go one by one
        error = "Wrong address or password, or not an admin account."
        return Response(200, "Log in", login_form(self.context.sessions.login_token(request), user, error))


class Logout(Page):
    title = "Logged out"

    def post(self, request, session, fields):
        self.context.sessions.end(request)
        log.info("Mail Control: {user} logged out", user=session.user)
        return Redirect("/login")
