"""How make_service wires the daemon's parts together."""

from __future__ import annotations

from twisted.cred.credentials import IUsernamePassword
from twisted.internet.testing import MemoryReactorClock

from epost.config import Config, ServerConfig
from epost.service import make_service


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


def test_the_password_check_threads_stop_after_the_listeners(tmp_path):
    """A stopped pool drops work without a word: a login on a connection still
    open while the daemon stops would never be answered."""
    config = Config(server=ServerConfig(hostname="mx.example.test", spool=tmp_path / "spool", relay=(), submission=()))
    top = make_service(config, reactor=MemoryReactorClock())
    auth_pool = top.portal.checkers[IUsernamePassword]._threadpool
    assert [s.pool for s in top.stop_last if hasattr(s, "pool")][-1] is auth_pool


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
