"""RemoteCourier and the real courier child process, delivering to SMTP sinks on loopback."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import time
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.logger import capturedLogs
from twisted.trial import unittest

from epost.config import HostPort
from epost.delivery.courier import CourierError
from epost.delivery.courier_process import NICENESS
from epost.delivery.remote_courier import RemoteCourier
from epost.store.envelope import Envelope, Recipient
from epost.store.spool import Spool, SpooledContent
from epost.routing.resolver import Route
from fakes import put_one
from sinks import Sink

CONTENT = b"Subject: over there\r\n\r\n.leading dot\r\nbody\r\n"
QUEUE_ID = "0190000000000A000"


class FlakyReactor:
    """The reactor, except that its first `failures` process starts fail (out of processes)."""

    def __init__(self, real, failures: int):
        self.real, self.failures = real, failures

    def spawnProcess(self, *args, **kwargs):
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
        return self.real.spawnProcess(*args, **kwargs)

    def callLater(self, *args, **kwargs):
        return self.real.callLater(*args, **kwargs)


class RemoteCourierTests(unittest.TestCase):
    """The child is spawned as the daemon does; its attempts go to sinks on 127.0.0.1."""

    def setUp(self):
        root = Path(tempfile.mkdtemp(prefix="epost-courier-test-"))
        self.addCleanup(shutil.rmtree, root)
        self.spool = Spool(root, reactor=None, threadpool=None)
        self.spool.open()
        envelope = Envelope(QUEUE_ID, "a@here.test", (Recipient("b@there.test"), Recipient("c@there.test")), 1.0, len(CONTENT))
        assert put_one(self.spool.store, envelope, CONTENT, "incoming")
        self.service = RemoteCourier(reactor, {
            "spool": str(root), "hostname": "mx.here.test", "dns_servers": [["127.0.0.1", 9]],
            "connect_timeout": 5, "timeouts": {"greeting": 5}})
        self.service.restart_delay = 0.1
        self.service.startService()
        self.addCleanup(lambda: self.service.stopService() if self.service.running else None)

    def deliver(self, sink: Sink, recipients=("b@there.test",)):
        route = Route("relay", "gateway.dat:1", hosts=(HostPort("127.0.0.1", sink.port),))
        content = SpooledContent(self.spool, QUEUE_ID)
        return self.service.deliver(route, "a@here.test", recipients, content, len(CONTENT), False)

    @defer.inlineCallbacks
    def test_the_child_delivers_and_reports_each_recipient(self):
        with Sink(reject=False) as sink:
            attempt = yield self.deliver(sink, ("b@there.test", "c@there.test"))
            assert {r: o.code for r, o in attempt.outcomes.items()} == {"b@there.test": 250, "c@there.test": 250}
            assert attempt.host == f"127.0.0.1[127.0.0.1]:{sink.port}"
            [message] = sink.messages
            assert message.data == CONTENT
            assert message.recipients == ("b@there.test", "c@there.test")

    @defer.inlineCallbacks
    def test_the_child_runs_nicer_than_the_daemon(self):
        with Sink() as sink:
            yield self.deliver(sink)  # it is up and serving
        pid = self.service._protocol.transport.pid
        expected = min(19, os.getpriority(os.PRIO_PROCESS, 0) + NICENESS)
        threads = [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]  # Linux sets niceness per thread
        assert len(threads) >= 2  # the reactor's and the DNS pool's at least
        assert {tid: os.getpriority(os.PRIO_PROCESS, tid) for tid in threads} == dict.fromkeys(threads, expected)

    @defer.inlineCallbacks
    def test_a_dying_child_fails_its_attempts_with_courier_error_and_comes_back(self):
        with Sink(greeting=None) as silent:  # the attempt hangs until the child dies
            pending = self.deliver(silent)
            yield deferLater(reactor, 0.5, lambda: None)
            self.service._protocol.transport.signalProcess("KILL")
            error = yield self.assertFailure(pending, CourierError)
            assert "ended during the attempt" in str(error)
        yield self.wait_for_child()
        with Sink() as sink:
            attempt = yield self.deliver(sink)
            assert attempt.outcomes["b@there.test"].code == 250

    @defer.inlineCallbacks
    def test_a_failed_start_is_tried_again(self):
        self.service.stopService()
        yield deferLater(reactor, 0.3, lambda: None)
        self.service = RemoteCourier(FlakyReactor(reactor, failures=2), self.service.settings)
        self.service.restart_delay = 0.1
        self.service.startService()
        with Sink() as sink:
            yield self.assertFailure(self.deliver(sink), CourierError)  # not running yet
            yield self.wait_for_child()
            attempt = yield self.deliver(sink)
            assert attempt.outcomes["b@there.test"].code == 250

    @defer.inlineCallbacks
    def test_stopping_cuts_short_an_attempt_the_manager_gave_up_on(self):
        with Sink(greeting=None) as silent:
            pending = self.deliver(silent)
            yield deferLater(reactor, 0.3, lambda: None)
            pending.cancel()  # the manager's stop grace ran out
            yield self.assertFailure(pending, defer.CancelledError)
            started = time.monotonic()
            yield self.service.stopService()
            assert time.monotonic() - started < 2  # killed, not left to finish its session

    @defer.inlineCallbacks
    def wait_for_child(self):
        started = time.monotonic()
        while self.service._protocol is None and time.monotonic() - started < 5:
            yield deferLater(reactor, 0.05, lambda: None)
        assert self.service._protocol is not None

    @defer.inlineCallbacks
    def test_with_nothing_in_progress_the_child_ends_by_itself_when_stopped(self):
        with Sink() as sink:
            attempt = yield self.deliver(sink)
            assert attempt.outcomes["b@there.test"].code == 250
            protocol = self.service._protocol
            with capturedLogs() as events:
                started = time.monotonic()
                yield self.service.stopService()
            assert time.monotonic() - started < self.service.stop_timeout
            assert protocol.transport.pid is None  # it ended
            assert not [e for e in events if "killing" in e.get("log_format", "")]
