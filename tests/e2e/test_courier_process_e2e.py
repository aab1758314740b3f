"""RemoteCourier and the real courier child process, delivering to SMTP sinks on loopback."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial import unittest

from epost.config import HostPort
from epost.delivery.remote_courier import RemoteCourier
from epost.queue.spool import Spool, SpooledContent
from epost.routing.resolver import Route
from sinks import Sink

CONTENT = b"Subject: over there\r\n\r\n.leading dot\r\nbody\r\n"
QUEUE_ID = "0190000000000A000"


class RemoteCourierTests(unittest.TestCase):
    """The child is spawned as the daemon does; its attempts go to sinks on 127.0.0.1."""

    def setUp(self):
        root = Path(tempfile.mkdtemp(prefix="epost-courier-test-"))
        self.addCleanup(shutil.rmtree, root)
        self.spool = Spool(root, reactor=None, threadpool=None)
        self.spool.create_folders()
        (root / "incoming" / f"{QUEUE_ID}.msg").write_bytes(CONTENT)
        self.service = RemoteCourier(reactor, {
            "spool": str(root), "hostname": "mx.here.test", "dns_servers": [["127.0.0.1", 9]],
            "dns_timeout": 2, "connect_timeout": 5, "timeouts": {"greeting": 5}})
        self.service.restart_delay = 0.1
        self.service.startService()
        self.addCleanup(lambda: self.service.stopService() if self.service.running else None)

    def deliver(self, sink: Sink, recipients=("b@there.test",)):
        route = Route("relay", "gateway.dat:1", hosts=(HostPort("127.0.0.1", sink.port),))
        content = SpooledContent(self.spool, QUEUE_ID, "incoming")
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
    def test_a_dying_child_leaves_its_attempts_unanswered_and_comes_back(self):
        with Sink(greeting=None) as silent:  # the attempt hangs until the child dies
            pending = self.deliver(silent)
            yield deferLater(reactor, 0.5, lambda: None)
            self.service._protocol.transport.signalProcess("KILL")
            attempt = yield pending
            assert attempt.host is None
            assert {o.code for o in attempt.outcomes.values()} == {None}
            assert "courier process ended" in attempt.outcomes["b@there.test"].text
        started = time.monotonic()
        while self.service._protocol is None and time.monotonic() - started < 5:
            yield deferLater(reactor, 0.05, lambda: None)
        with Sink() as sink:
            attempt = yield self.deliver(sink)
            assert attempt.outcomes["b@there.test"].code == 250

    @defer.inlineCallbacks
    def test_stopping_waits_for_the_attempt_in_progress(self):
        with Sink() as sink:
            pending = self.deliver(sink)
            yield self.service.stopService()
            assert pending.called
            assert pending.result.outcomes["b@there.test"].code == 250
            assert len(sink.messages) == 1
