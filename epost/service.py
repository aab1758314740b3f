"""make_service(): wires listeners -> receiver -> spool -> runner.

Nothing here decides anything; it only builds the parts from one Config
and starts and stops them in the right order.
"""

from __future__ import annotations

import os
import resource
import signal
from typing import Any, Callable

from twisted.application import service, strports
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.threadpool import ThreadPool

from epost.auth import UsersChecker, make_portal
from epost import metrics
from epost.config import Config
from epost.listening import default_backlog, with_backlog
from epost.smtp.proxy import ProxyFactory
from epost.control import RouteAnswers, control_service
from epost.delivery.remote_courier import RemoteCourier
from epost.queue.bounces import BounceSender
from epost.store.lock import SpoolLock
from epost.queue.manager import DeliveryManager
from epost.queue.receivers import DEFAULT_THROTTLE_RULES, Settings as ReceiverSettings
from epost.queue.runner import LocalDeliveryRunner
from epost.store.spool import Spool
from epost.queue.worker_client import SpoolWorkerService
from epost.store.upgrade import import_file_spool
from epost.routing.live import TableWatcher
from epost.routing_chain import Routing, build_routing
from epost.smtp.events import SessionEvents
from epost.smtp.screen import build_screening
from epost.smtp.factory import ConnectionLimits, SMTPFactory
from epost.smtp.receiver import SpoolingReceiver
from epost.smtp.server import ServerSettings
from epost.smtp.throttle import AuthThrottle
from epost.tls import context_for
from epost.web import attach_admin

log = Logger()


class ThreadPoolService(service.Service):
    """Runs a pool for the daemon's own blocking work: `epost-io` for table
    reloads and the queue's bookkeeping, `epost-auth` for password checks
    (spool writes and Maildirs are the workers' job)."""

    def __init__(self, pool: ThreadPool):
        self.pool = pool

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()


class EpostService(service.MultiService):
    """The daemon; a port that cannot be bound ends start-up with one line.

    Stopping closes the listeners first, then asks every open SMTP session
    to end (`SMTPServer.shut_down`: a transaction under way gets
    `session_grace` seconds, a commit in flight is always answered, the rest
    get `421 4.3.2`), waiting at most `session_bound` seconds for them. Then
    it waits for the runner and the delivery manager before `stop_last` (the
    courier process, the spool workers, then the thread pools): the
    manager's last attempts and the runner's last batch still need them, and
    so does a login on a connection still open (a stopped pool drops work
    without a word)."""

    session_grace = 5.0  # seconds a transaction under way may take to finish at stop
    session_bound = 30.0  # at most this long, then the workers stop anyway (a commit sent after is answered 421)

    def __init__(self):
        super().__init__()
        self.stop_last: list[service.Service] = []  # in this order, after all others
        self.listeners: list[service.Service] = []  # stopped first
        self.limits: ConnectionLimits | None = None  # its `sessions` are asked to end after the listeners stop
        self.spool_lock: SpoolLock | None = None
        self.reactor = None

    def startService(self) -> None:
        if self.spool_lock is not None:
            self.spool_lock.record_pid()  # twistd may have forked since make_service took it
        super().startService()

    def stopService(self):
        service.Service.stopService(self)
        listeners = [child for child in self if child in self.listeners]
        stopped = defer.DeferredList([defer.maybeDeferred(child.stopService) for child in listeners])
        stopped.addCallback(lambda _: self._shut_down_sessions())
        stopped.addCallback(lambda _: self._stop_the_others())
        return stopped

    def _stop_the_others(self):
        others = [
            child for child in reversed(list(self)) if child not in self.stop_last and child not in self.listeners
        ]
        stopped = defer.DeferredList([defer.maybeDeferred(child.stopService) for child in others])
        for child in self.stop_last:
            stopped.addCallback(lambda _, child=child: child.stopService())
        return stopped

    def _shut_down_sessions(self) -> defer.Deferred | None:
        """Every open SMTP session ends (see SMTPServer.shut_down), within `session_bound` seconds."""
        sessions = [s for s in (self.limits.sessions if self.limits is not None else ()) if not s.closed]
        if not sessions:
            return None
        log.info(
            "stopping: {count} SMTP session(s) open; a transaction under way gets {grace} s, then 421 4.3.2",
            count=len(sessions), grace=self.session_grace,
        )
        ended = defer.DeferredList([s.shut_down(self.session_grace) for s in sessions])
        return _within(ended, self.session_bound, self.reactor, lambda: log.warn(
            "stopping: {count} SMTP session(s) still open after {bound} s; stopping the spool workers anyway",
            count=sum(not s.closed for s in sessions), bound=self.session_bound,
        ))

    def privilegedStartService(self) -> None:
        # From here the ports are bound and the PID may be known, but the
        # handlers for SIGHUP (tables) and SIGUSR2 (flush) come with
        # startService: until then a signal must not end the daemon (the
        # default action of both).
        for number in (signal.SIGHUP, signal.SIGUSR2):
            if signal.getsignal(number) == signal.SIG_DFL:
                signal.signal(number, signal.SIG_IGN)
        try:
            super().privilegedStartService()
        except CannotListenError as error:
            if isinstance(error.port, bytes):  # a UNIX socket (the control socket): its path
                where = os.fsdecode(error.port)
            else:
                where = f"{error.interface or '*'}:{error.port}"
            raise SystemExit(f"epost: cannot listen on {where}: {error.socketError}") from None


def _within(d: defer.Deferred, seconds: float, clock, late) -> defer.Deferred:
    """Fires when `d` does or after `seconds` (calling `late()` then), whichever comes first; never fails."""
    result: defer.Deferred = defer.Deferred()

    def timed_out() -> None:
        if not result.called:
            late()
            result.callback(None)

    timer = clock.callLater(seconds, timed_out)

    def finished(outcome):
        if timer.active():
            timer.cancel()
        if not result.called:
            result.callback(None)
        return None  # a failure here is already logged by the session

    d.addBoth(finished)
    return result


def raise_file_limit() -> None:
    """Idle SMTP clients cost one descriptor each; use all the kernel allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else max(soft, 65536), hard))


def listener_settings(config: Config, listener: str) -> ServerSettings:
    server = config.server
    return ServerSettings(
        hostname=server.hostname,
        listener=listener,
        max_message_size=server.max_message_size,
        max_recipients=server.max_recipients,
        command_timeout=server.command_timeout,
        session_deadline=server.session_deadline,
        data_timeout=server.data_timeout,
        max_bad_commands=server.max_bad_commands,
        require_auth=listener != "relay",
        allow_plaintext_auth=server.allow_plaintext_auth,
    )


def make_service(config: Config, reactor=None) -> service.MultiService:
    if reactor is None:
        from twisted.internet import reactor
    raise_file_limit()
    from epost.delivery.signing import load_keys  # issue 15: a bad DKIM key stops start-up (DkimKeyError)

    dkim_keys = load_keys(config.dkim.keys)
    top = EpostService()
    top.dkim_keys = dkim_keys
    # One daemon per spool, decided before anything touches it (tmp/ is
    # cleared at start): SpoolBusy ends start-up with one line (epost/tap.py).
    top.spool_lock = SpoolLock.acquire(config.server.spool, create_spool=True)
    top.reactor = reactor

    pool = ThreadPool(minthreads=2, maxthreads=4, name="epost-io")
    pool_service = ThreadPoolService(pool)
    pool_service.setServiceParent(top)
    # Password checks (scrypt, tens of ms of CPU each) get threads of their
    # own: a burst of AUTH or logins never holds up the queue's file work.
    auth_pool = ThreadPool(minthreads=0, maxthreads=2, name="epost-auth")
    auth_pool_service = ThreadPoolService(auth_pool)
    auth_pool_service.setServiceParent(top)

    spool = Spool(config.server.spool, reactor=reactor, threadpool=pool)
    spool.open()  # the queue store: StoreUnavailable ends start-up with one line (epost/tap.py)
    # A spool of the release that queued in folders goes into the store once,
    # before the runner's recovery lists incoming (docs/operating.md).
    import_file_spool(spool.root, spool.store)
    worker = SpoolWorkerService(spool, config.server.hostname, reactor, give_up_after=config.retry.period_4xx,
                                dkim_keys=dkim_keys)  # the workers sign at commit (docs/authentication.md)
    worker.setServiceParent(top)
    top.stop_last = [worker, pool_service, auth_pool_service]  # the courier process goes first, below
    routing = build_routing(config)
    TableWatcher(routing.tables, reactor, pool).setServiceParent(top)
    add_verifier(top, config, reactor, routing)
    receiver = SpoolingReceiver(worker, routing.policy, config.server.hostname, now=reactor.seconds,
                                checker=auth_checker(top, config, reactor))
    limits = ConnectionLimits(config.server.max_connections, config.server.max_connections_per_client)
    tls = context_for(config)
    portal = make_portal(UsersChecker(routing.users, reactor, auth_pool,
                                      on_old_hash=hash_upgrader(config.routing.users, reactor, auth_pool)))
    throttle = AuthThrottle(reactor, cutoff=config.server.auth_failures_before_cutoff)
    events = SessionEvents(reactor)  # one log rate limit for all listeners
    screening = build_screening(config, reactor)  # the relay port's pregreet and DNSBL tests, or None
    reactor.addSystemEventTrigger("before", "shutdown", events.flush)  # say what was suppressed
    backlog = default_backlog()

    # Outbound SMTP (and its DNS lookups) runs in a process of its own: docs/delivery.md.
    courier = RemoteCourier(reactor, courier_settings(config))
    courier.setServiceParent(top)
    top.stop_last.insert(0, courier)  # after the manager: its attempts in progress finish first
    manager = make_delivery_manager(config, reactor, pool, courier, spool, worker, routing)
    manager.setServiceParent(top)
    # The runner goes before the listeners: its start-up recovery empties
    # tmp/, which must happen before any listener could be writing there.
    runner = LocalDeliveryRunner(
        spool,
        reactor,
        pool,
        hostname=config.server.hostname,
        mailbox_root=config.server.spool / "mailboxes",
        deliver=worker.deliver if config.delivery.local_transport == "maildir" else lmtp_deliver(config, spool, reactor, pool),
        on_passed=manager.enqueue,
    )
    runner.setServiceParent(top)
    manager.local_enqueue, manager.local_claim = runner.enqueue, runner.claim
    manager.verifier = getattr(top, "verifier", None)  # `epost verify` over the control socket
    control = control_service(config.server.spool, manager, reactor)
    control.factory.answer_route = RouteAnswers(routing, config.routing.dns_servers, reactor, pool)  # `epost route`
    control.setServiceParent(top)

    for listener, endpoints in (
        ("relay", config.server.relay),
        ("submission", config.server.submission),
        ("smtps", config.server.smtps),
    ):
        for description in endpoints:
            factory = SMTPFactory(
                receiver, listener_settings(config, listener), reactor, limits, tls_context=tls, portal=portal, throttle=throttle,
                events=events, screening=screening if listener == "relay" else None,
            )
            proxied = description.startswith("haproxy:")
            if proxied:  # PROXY protocol: our wrapper, not Twisted's haproxy: (epost/smtp/proxy.py)
                description = description[len("haproxy:"):]
            if listener == "smtps" and description.split(":", 1)[0] in ("tcp", "tcp6"):
                factory = TLSMemoryBIOFactory(tls, False, factory)  # implicit TLS with our certificate
            if proxied:
                factory = ProxyFactory(factory, config.server.proxy_networks, reactor, events, listener)
            port = strports.service(with_backlog(description, backlog), factory, reactor=reactor)
            port.setServiceParent(top)
            top.listeners.append(port)

    metrics.watch(spool, lambda: limits.total_open)
    # Mail Control and /metrics on --admin (docs/mail-control.md); nothing without admin endpoints.
    # The dashboard's DNS checks can wait seconds on a slow resolver: threads of their own, not the file threads.
    dns_check_pool = ThreadPool(minthreads=0, maxthreads=2, name="epost-dnscheck") if config.server.admin else None
    if dns_check_pool is not None:
        ThreadPoolService(dns_check_pool).setServiceParent(top)
    top.admin_site = attach_admin(top, config, manager, routing, reactor, pool, auth_pool, {b"metrics": metrics.metrics_resource()},
                                  dns_threadpool=dns_check_pool)
    top.portal = portal

    top.spool, top.runner, top.manager, top.routing, top.limits = spool, runner, manager, routing, limits
    # twistd forks and switches to its -u/-g user after this returns: no
    # SQLite connection may cross either (docs/queue.md); each thread opens its own later.
    spool.drop_connections()
    return top


def courier_settings(config: Config) -> dict:
    """What the courier process needs to know (epost/delivery/courier_process.py)."""
    delivery = config.delivery
    return {
        "spool": str(config.server.spool),
        "hostname": config.server.hostname,
        "dns_servers": [[server.host, server.port] for server in config.routing.dns_servers],
        "connect_timeout": delivery.connect_timeout,
        "timeouts": {"greeting": delivery.greeting_timeout},
    }


def make_delivery_manager(config: Config, reactor, pool, courier, spool: Spool, store, routing: Routing) -> DeliveryManager:
    """Outbound SMTP with its retry books; `courier` makes the attempts, `store` queues the bounces."""
    delivery = config.delivery
    bounces = BounceSender(store, routing.resolver.resolve, config.server.hostname, reactor.seconds)
    manager = DeliveryManager(
        spool,
        reactor,
        pool,
        courier,
        bounces,
        routing.resolver.route_final,
        config.server.hostname,
        config.retry,
        max_connections=delivery.max_connections,
        max_per_destination=delivery.max_per_destination,
        handle_signals=True,
        delay_warning=delivery.delay_warning,
        receivers=receiver_settings(delivery),
        record=store.record,  # bookkeeping in the spool worker's transactions, not the daemon's threads
    )
    return manager


def receiver_settings(delivery) -> ReceiverSettings:
    """Receiver-aware delivery as configured: the config's throttle rules before the shipped ones."""
    return ReceiverSettings(
        enabled=delivery.receiver_aware,
        rules=delivery.throttle_rules + DEFAULT_THROTTLE_RULES,
        destinations=delivery.destinations,
    )


def add_verifier(top: service.MultiService, config: Config, reactor, routing: Routing) -> None:
    """Recipient verification by probe (SPEC §3.5), when `verify_recipients` is on:
    the verifier with its cache, and a small pool for the MX lookups of probes."""
    if not config.routing.verify_recipients:
        return
    from epost.delivery.verify import VerifierService, make_verifier

    dns_pool = ThreadPool(minthreads=0, maxthreads=4, name="epost-verify")
    pool_service = ThreadPoolService(dns_pool)
    pool_service.setServiceParent(top)
    top.stop_last.insert(0, pool_service)  # with the other pools, after the verifier has stopped
    verifier = make_verifier(config, reactor, dns_pool)
    VerifierService(verifier, dns_pool).setServiceParent(top)
    routing.policy.verifier = verifier
    top.verifier = verifier


def auth_checker(top: service.MultiService, config: Config, reactor):
    """SPEC §9's inbound checks (epost/smtp/authcheck.py) with a pool of their
    own, mostly waiting on DNS; None when `authentication_results` is off."""
    if not config.server.authentication_results:
        return None
    from epost.smtp.authcheck import AuthChecker

    pool = ThreadPool(minthreads=0, maxthreads=8, name="epost-authres")
    pool_service = ThreadPoolService(pool)
    pool_service.setServiceParent(top)
    top.stop_last.insert(0, pool_service)  # after the sessions (a check in flight ends within its budget)
    return AuthChecker(reactor, pool, config.routing.dns_servers, budget=config.server.authentication_results_timeout)


def lmtp_deliver(config: Config, spool: Spool, reactor: Any, pool: Any) -> Callable[[list[str]], Any]:
    """The local runner's `deliver` for `[delivery] local_transport = "lmtp:..."` (docs/mailboxes.md)."""
    from epost.delivery.lmtp import deliver_lmtp_batch, lmtp_endpoint

    endpoint = lmtp_endpoint(reactor, config.delivery.local_transport)
    return lambda ids: deliver_lmtp_batch(spool, ids, reactor=reactor, threadpool=pool, endpoint=endpoint,
                                          hostname=config.server.hostname)


def hash_upgrader(path: Any, reactor: Any, pool: Any) -> Callable[[str, Any, str], Any]:
    """After a successful SMTP AUTH with an old scrypt hash: rewrite it as Argon2id, which Dovecot
    checks too (docs/mailboxes.md). In `pool`; a failure is logged, the login stands."""
    from twisted.internet.threads import deferToThreadPool

    from epost.address import parse_mailbox
    from epost.users_file import upgrade_hash

    def upgrade(address: str, password: Any, old_hash: str) -> Any:
        d = deferToThreadPool(reactor, pool, upgrade_hash, path, parse_mailbox(address), password, old_hash)
        d.addCallback(lambda done: done and log.info("{address}: password hash upgraded to Argon2id", address=address))
        d.addErrback(lambda failure: log.failure("{address}: cannot upgrade the password hash", failure, address=address))
        return d

    return upgrade
