"""Building the Mail Control site and its listeners.

    site = make_admin_site(config, manager, routing, reactor, threadpool, auth_threadpool, extra={b"metrics": resource})

Pages: `/` dashboard, `/queue`, `/gateway`, `/route`, `/login`, `/logout`.
`/metrics` is left free: pass it in `extra`, or later
`site.resource.putChild(b"metrics", resource)`. Resources given in `extra`
are mounted as they are, without the login check (they decide themselves).
"""

from __future__ import annotations

from functools import partial

from twisted.application import service, strports
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.protocols.policies import WrappingFactory
from twisted.web.server import Request, Site

from epost.admin.dns_check import DnsRun
from epost.listening import default_backlog, with_backlog
from epost.smtp.throttle import AuthThrottle
from epost.web.base import Context
from epost.web.dashboard import Dashboard
from epost.web.dns_panel import DnsChecks
from epost.web.gateway_page import GatewayPage
from epost.web.login import Login, Logout
from epost.web.queue_page import QueuePage
from epost.web.route_page import RoutePage
from epost.web.sessions import SessionStore

log = Logger()

RESERVED = (b"", b"queue", b"gateway", b"route", b"login", b"logout")


IPV6_LOOPBACK = r"\:\:1"  # colons escaped: endpoint strings split on ":"
MAX_BODY = 2 * 1024 * 1024  # bytes: the largest form is the gateway.dat editor
MAX_CONNECTIONS = 64
# twisted.web's HTTPChannel already stops reading while its replies are unread
# (tests/web/test_admin_hostile.py); only its idle timeout ends such a
# connection: it closes, and aborts 15 s later (HTTPChannel.abortTimeout).
# Set here rather than trusting the default, which has been 12 hours in some
# Twisted releases: 64 stuck clients would hold every slot for half a day.
IDLE_TIMEOUT = 60


class _BoundedRequest(Request):
    """Refuses a request body over MAX_BODY before reading it (twisted.web has
    no limit and parses the whole body before any page, login included, runs)."""

    def gotLength(self, length) -> None:
        if length is not None and length > MAX_BODY:
            self._too_large()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        self._received = getattr(self, "_received", 0) + len(data)
        if self._received > MAX_BODY:  # chunked bodies carry no length up front
            self._too_large()
            return
        super().handleContentChunk(data)

    def _too_large(self) -> None:
        transport = self.channel.transport
        transport.write(b"HTTP/1.1 413 Payload Too Large\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
        transport.loseConnection()


class BoundedFactory(WrappingFactory):
    """At most MAX_CONNECTIONS open connections; more are closed at once."""

    def buildProtocol(self, addr):
        if len(self.protocols) >= MAX_CONNECTIONS:
            return None
        return super().buildProtocol(addr)


class _Quiet(Site):
    """No access log: it would be one daemon log line per page view (and per /metrics scrape)."""

    requestFactory = _BoundedRequest

    def log(self, request) -> None:
        pass


def make_admin_site(
    config, manager, routing, reactor, threadpool, auth_threadpool, extra: dict[bytes, Resource] | None = None,
    dns_threadpool=None, dns_check=None,
) -> Site:
    """The Mail Control site; file reads run in `threadpool`, password checks in
    `auth_threadpool`, the dashboard's DNS checks (`dns_check()` a new run, `run(domain)` its
    checks; default: `epost check-dns` with this config, DnsRun.of_config) in `dns_threadpool`
    (default: `threadpool`); `extra` maps more top-level path segments to resources (e.g. b"metrics")."""
    context = Context(
        config=config,
        manager=manager,
        routing=routing,
        reactor=reactor,
        threadpool=threadpool,
        auth_threadpool=auth_threadpool,
        sessions=SessionStore(reactor),
        throttle=AuthThrottle(reactor, cutoff=config.server.auth_failures_before_cutoff),
        dns_checks=DnsChecks(reactor, dns_threadpool or threadpool, dns_check or partial(DnsRun.of_config, config)),
    )
    root = Resource()
    root.putChild(b"", Dashboard(context))
    root.putChild(b"queue", QueuePage(context))
    root.putChild(b"gateway", GatewayPage(context))
    root.putChild(b"route", RoutePage(context))
    root.putChild(b"login", Login(context))
    root.putChild(b"logout", Logout(context))
    for name, resource in (extra or {}).items():
        if name in RESERVED:
            raise ValueError(f"/{name.decode()} is a Mail Control page")
        root.putChild(name, resource)
    site = _Quiet(root, reactor=reactor, timeout=IDLE_TIMEOUT)
    site.displayTracebacks = False
    site.context = context
    return site


def loopback_by_default(description: str) -> str:
    """`tcp:8025` -> `tcp:8025:interface=127.0.0.1` (`::1` for tcp6 and tls); an explicit interface is kept.

    Every listening kind that takes an interface gets one; `unix:` and
    `systemd:` sockets have none to set."""
    kind, _, rest = description.partition(":")
    if kind in ("tcp", "tcp6", "ssl", "tls") and "interface=" not in rest:
        loopback = IPV6_LOOPBACK if kind in ("tcp6", "tls") else "127.0.0.1"  # tls: listens with TCP6
        return f"{description}:interface={loopback}"
    return description


def attach_admin(
    parent, config, manager, routing, reactor, threadpool, auth_threadpool, extra: dict[bytes, Resource] | None = None,
    dns_threadpool=None,
):
    """Listen with Mail Control on every `[server] admin` endpoint, as children of `parent`.

    Returns the Site (its `.resource` takes more children), or None when no
    admin endpoint is configured.
    """
    if not config.server.admin:
        return None
    site = make_admin_site(config, manager, routing, reactor, threadpool, auth_threadpool, extra, dns_threadpool)
    if not config.server.admin_users:
        log.warn("Mail Control: no admin_users in [server]: nobody can log in")
    listeners = service.MultiService()
    bounded = BoundedFactory(site)
    for description in config.server.admin:
        description = with_backlog(loopback_by_default(description), default_backlog())
        strports.service(description, bounded, reactor=reactor).setServiceParent(listeners)
    listeners.setServiceParent(parent)
    return site
