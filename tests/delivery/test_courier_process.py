"""The courier process's request loop, in-process (tests/e2e/test_courier_process_e2e.py runs the real child)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from twisted.internet import defer
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs
from twisted.trial import unittest

from epost.delivery.courier import Attempt
from epost.delivery.courier_process import CourierServer
from epost.delivery.smtp_client import Outcome
from epost.store.envelope import Envelope, Recipient
from epost.store.spool import Spool
from fakes import put_one

CONTENT = b"Subject: over there\r\n\r\n.leading dot\r\nbody\r\n"


def queued_spool(queue_id: str = "0190000000000A000") -> Spool:
    root = Path(tempfile.mkdtemp(prefix="epost-courier-test-"))
    spool = Spool(root, reactor=None, threadpool=None)
    spool.open()
    envelope = Envelope(queue_id, "a@here.test", (Recipient("b@there.test"), Recipient("c@there.test")), 1.0, len(CONTENT))
    assert put_one(spool.store, envelope, CONTENT, "incoming")
    return spool


class FakeCourier:
    def __init__(self):
        self.calls: list[tuple] = []
        self.closed_idle = 0
        self.answer = defer.Deferred()

    def deliver(self, route, sender, recipients, content, size, body_8bit):
        self.calls.append((route, sender, list(recipients), content, size, body_8bit, b"".join(content())))
        return self.answer

    def close_idle(self):
        self.closed_idle += 1


REQUEST = {
    "id": 7,
    "route": {"kind": "relay", "rule": "gateway.dat:1", "hosts": [["127.0.0.1", 2525]]},
    "sender": "a@here.test",
    "recipients": ["b@there.test", "c@there.test"],
    "queue_id": "0190000000000A000",
    "queue": "deferred",  # the message was moved meanwhile: its content is found by ID whatever the state
    "size": len(CONTENT),
    "body_8bit": False,
}


class CourierServerTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.spool = queued_spool()
        self.addCleanup(shutil.rmtree, self.spool.root)
        self.courier = FakeCourier()
        self.ended = []
        self.server = CourierServer(self.courier, self.spool, on_done=lambda: self.ended.append(True))
        self.transport = StringTransport()
        self.server.makeConnection(self.transport)

    def test_a_request_runs_the_courier_and_its_attempt_comes_back_as_one_line(self):
        self.server.dataReceived(json.dumps(REQUEST).encode() + b"\n")
        [(route, sender, recipients, content, size, body_8bit, body)] = self.courier.calls
        assert (route, sender, recipients, size, body_8bit) == (
            REQUEST["route"], "a@here.test", ["b@there.test", "c@there.test"], len(CONTENT), False)
        assert body == CONTENT
        assert self.transport.value() == b""
        self.courier.answer.callback(Attempt(
            {"b@there.test": Outcome(250, "2.0.0 Ok", "data"), "c@there.test": Outcome(550, "5.1.1 no", "rcpt")},
            "mx[127.0.0.1]:2525", True))
        reply = json.loads(self.transport.value())
        assert reply == {"id": 7, "outcomes": {"b@there.test": [250, "2.0.0 Ok", "data"],
                                               "c@there.test": [550, "5.1.1 no", "rcpt"]},
                         "host": "mx[127.0.0.1]:2525", "tls": True}
        assert content._handle is None  # the content was closed

    def test_close_idle_is_passed_on(self):
        self.server.dataReceived(b'{"close_idle": true}\n')
        assert self.courier.closed_idle == 1

    def test_when_stdin_closes_it_ends_at_once_even_with_an_attempt_in_progress(self):
        """Only a daemon that died closes stdin with attempts in flight: an orphan
        finishing them would send mail the next daemon sends again."""
        self.server.dataReceived(json.dumps(REQUEST).encode() + b"\n")
        self.server.readConnectionLost()
        assert self.transport.disconnecting and self.courier.closed_idle == 1

    def test_junk_is_logged_and_the_loop_goes_on(self):
        with capturedLogs() as events:
            self.server.dataReceived(b"{not json\n")
        assert any(e.get("log_level") == LogLevel.error for e in events)
        assert self.transport.value() == b""  # no id to answer to
        self.server.dataReceived(json.dumps(REQUEST).encode() + b"\n")
        assert len(self.courier.calls) == 1

    def test_a_request_it_cannot_read_is_answered_with_an_error(self):
        self.server.dataReceived(json.dumps({"id": 3, "sender": "a@here.test"}).encode() + b"\n")
        reply = json.loads(self.transport.value())
        assert reply["id"] == 3 and "unreadable request" in reply["error"]
        assert self.courier.calls == []

    def test_content_that_cannot_be_opened_is_an_error_not_an_attempt(self):
        """A file problem must not reach the destination as a dropped connection."""
        gone = dict(REQUEST, queue_id="0190000000000B000")
        self.server.dataReceived(json.dumps(gone).encode() + b"\n")
        reply = json.loads(self.transport.value())
        assert reply["id"] == 7 and "0190000000000B000" in reply["error"]
        assert self.courier.calls == []

    def test_a_large_message_is_read_from_its_own_file_in_chunks(self):
        large = b"Subject: big\r\n\r\n" + b"z" * (300 * 1024)
        spilled = self.spool.root / "tmp" / "big.msg"
        spilled.write_bytes(large)
        envelope = Envelope("0190000000000C000", "a@here.test", (Recipient("b@there.test"),), 1.0, len(large))
        assert put_one(self.spool.store, envelope, spilled, "deferred")
        self.server.dataReceived(json.dumps(dict(REQUEST, queue_id="0190000000000C000", size=len(large))).encode() + b"\n")
        [call] = self.courier.calls
        content = call[3]
        assert call[6] == large and max(len(chunk) for chunk in content()) <= content.chunk_size
