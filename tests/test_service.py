"""How make_service wires the daemon's parts together."""

from __future__ import annotations

from twisted.application import service
from twisted.cred.credentials import IUsernamePassword
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock

from epost.config import Config, ServerConfig
from epost.service import EpostService, make_service
from epost.smtp.factory import ConnectionLimits


def test_password_checks_have_threads_of_their_own(tmp_path):
    """A burst of AUTH or Mail Control logins (scrypt) must not hold up the queue's file work."""
    config = Config(server=ServerConfig(
        hostname="mx.example.test", spool=tmp_path / "spool", relay=("tcp:0:interface=127.0.0.1",), submission=(),
        admin=("tcp:0:interface=127.0.0.1",),
    ))
    top = make_service(config, reactor=MemoryReactorClock())
    smtp_pool = top.portal.checkers[IUsernamePassword]._threadpool
    web_pool = top.admin_site.context.auth_threadpool
    assert smtp_pool is web_pool
    assert smtp_pool.name == "epost-auth" and smtp_pool.max == 2
    assert smtp_pool is not top.spool._threadpool and smtp_pool is not top.admin_site.context.threadpool


def test_the_dashboards_dns_checks_have_threads_of_their_own(tmp_path):
    """A slow resolver must not hold up the queue's file work (issue 15: check-dns on the dashboard)."""
    config = Config(server=ServerConfig(
        hostname="mx.example.test", spool=tmp_path / "spool", relay=(), submission=(), admin=("tcp:0:interface=127.0.0.1",),
    ))
    top = make_service(config, reactor=MemoryReactorClock())
    pool = top.admin_site.context.dns_checks._threadpool
    assert pool.name == "epost-dnscheck" and pool is not top.admin_site.context.threadpool
    assert pool in [s.pool for s in top if hasattr(s, "pool")]  # started and stopped with the daemon


def test_the_password_check_threads_stop_after_the_listeners(tmp_path):
    """A stopped pool drops work without a word: a login on a connection still
    open while the daemon stops would never be answered."""
    config = Config(server=ServerConfig(hostname="mx.example.test", spool=tmp_path / "spool", relay=(), submission=()))
    top = make_service(config, reactor=MemoryReactorClock())
    auth_pool = top.portal.checkers[IUsernamePassword]._threadpool
    assert [s.pool for s in top.stop_last if hasattr(s, "pool")][-1] is auth_pool


class _Part(service.Service):
    def __init__(self, name: str, events: list, result=None):
        self.name, self.events, self.result = name, events, result

    def stopService(self):
        super().stopService()
        self.events.append(f"stop {self.name}")
        return self.result


class _Session:
    def __init__(self, events: list):
        self.events, self.closed, self.ended = events, False, defer.Deferred()

    def shut_down(self, grace):
        self.events.append(f"shut_down {grace}")
        return self.ended


def _daemon(events, listener_stopped=None):
    top = EpostService()
    top.reactor = Clock()
    listener = _Part("listener", events, listener_stopped)
    runner = _Part("runner", events)
    worker = _Part("worker", events)
    for part in (worker, runner, listener):
        part.setServiceParent(top)
    top.listeners, top.stop_last = [listener], [worker]
    top.limits = ConnectionLimits(10, 10)
    session = _Session(events)
    top.limits.sessions.add(session)
    top.startService()
    return top, session


def test_stopping_closes_the_listeners_then_the_sessions_then_the_rest_then_the_workers():
    events: list[str] = []
    listener_stopped = defer.Deferred()
    top, session = _daemon(events, listener_stopped)
    done = top.stopService()
    assert events == ["stop listener"]  # no session is asked to end while new ones may still arrive
    listener_stopped.callback(None)
    assert events == ["stop listener", f"shut_down {top.session_grace}"]
    top.reactor.advance(top.session_bound - 1)
    assert events[-1] == f"shut_down {top.session_grace}"  # a commit in flight keeps the workers up
    session.ended.callback(None)
    assert events[2:] == ["stop runner", "stop worker"] and done.called


def test_stopping_waits_for_the_sessions_only_so_long():
    events: list[str] = []
    top, _ = _daemon(events)
    done = top.stopService()
    top.reactor.advance(top.session_bound)
    assert events[-2:] == ["stop runner", "stop worker"] and done.called


def test_a_control_socket_that_cannot_be_served_stops_start_up_with_one_line_naming_its_path():
    import pytest
    from twisted.internet.error import CannotListenError

    class Unservable(service.Service):
        def privilegedStartService(self):
            raise CannotListenError(None, b"/var/spool/epost/control.sock", OSError(98, "Address already in use"))

    top = EpostService()
    Unservable().setServiceParent(top)
    with pytest.raises(SystemExit) as stopped:
        top.privilegedStartService()
    assert str(stopped.value) == "epost: cannot listen on /var/spool/epost/control.sock: [Errno 98] Address already in use"


def test_a_sighup_or_sigusr2_between_binding_and_starting_does_not_end_the_daemon():
    """The handlers come with startService; before that, the default action
    of both signals would end the process (seen with a SIGHUP at start-up)."""
    import signal

    numbers = (signal.SIGHUP, signal.SIGUSR2)
    before = {number: signal.signal(number, signal.SIG_DFL) for number in numbers}
    try:
        EpostService().privilegedStartService()
        assert [signal.getsignal(number) for number in numbers] == [signal.SIG_IGN, signal.SIG_IGN]
    finally:
        for number, handler in before.items():
            signal.signal(number, handler)

def test_every_listener_gets_the_default_backlog_unless_its_endpoint_sets_one(tmp_path):
    """Twisted's backlog of 50 drops bursts of connections (issue 18)."""
    from epost.listening import default_backlog
    from epost.service import listener_settings

    config = Config(server=ServerConfig(
        hostname="mx.example.test", spool=tmp_path / "spool", relay=("tcp:0:interface=127.0.0.1",),
        submission=("tcp:0:interface=127.0.0.1:backlog=7",), smtps=("tcp:0:interface=127.0.0.1",),
        admin=("tcp:0:interface=127.0.0.1",), session_deadline=42,
    ))
    reactor = MemoryReactorClock()
    top = make_service(config, reactor=reactor)
    top.privilegedStartService()
    backlogs = sorted(backlog for _port, _factory, backlog, _interface in reactor.tcpServers)
    assert backlogs == sorted([default_backlog()] * 3 + [7])
    assert listener_settings(config, "relay").session_deadline == 42


def test_no_queue_store_connection_outlives_make_service(tmp_path):
    """twistd forks and switches user after make_service: an SQLite connection must cross neither."""
    config = Config(server=ServerConfig(hostname="mx.example.test", spool=tmp_path / "spool", relay=(), submission=()))
    top = make_service(config, reactor=MemoryReactorClock())
    assert top.spool.store._connections == []
    assert top.spool.queued_ids("incoming") == []  # still open: a connection is made again on first use
    top.spool.close()
