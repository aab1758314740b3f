"""SpoolingReceiver: what happens after the spool has the message."""

from __future__ import annotations

from twisted.internet import defer

from epost import metrics
from epost.address import parse_mailbox
from epost.smtp.interfaces import Session
from epost.smtp.receiver import SpoolingReceiver

SESSION = Session("relay", "127.0.0.1", 1025, "client.example", True, None, None)


class Writer:
    queue_id = "0190000000000A000"
    size = 0

    def write(self, data: bytes) -> None:
        self.size += len(data)

    def commit(self, envelope):
        self.envelope = envelope
        return defer.succeed(self.queue_id)


class Store:
    def open_message(self):
        self.writer = Writer()
        return self.writer


def test_a_failure_after_the_commit_never_turns_a_stored_message_into_a_4xx(monkeypatch):
    class Broken:
        def labels(self, *args):
            raise RuntimeError("metrics broke")

    monkeypatch.setattr(metrics, "received", Broken())
    store = Store()
    receiver = SpoolingReceiver(store, policy=None, hostname="mx.example.jp", now=lambda: 0.0)
    recipient = parse_mailbox("a@example.jp")
    message = receiver.open_message(SESSION, None, [(recipient, [])], {})
    message.write(b"Subject: x\r\n\r\nbody\r\n")
    assert message.commit().result == "0190000000000A000"


def test_a_committed_message_is_counted_by_listener_and_tls():
    before = metrics.received.labels("relay", "no")._value.get()
    store = Store()
    receiver = SpoolingReceiver(store, policy=None, hostname="mx.example.jp", now=lambda: 0.0)
    message = receiver.open_message(SESSION, None, [(parse_mailbox("a@example.jp"), [])], {})
    message.commit()
    assert metrics.received.labels("relay", "no")._value.get() == before + 1


def _failing_commit(error):
    from twisted.logger import formatEvent, globalLogPublisher

    store = Store()
    receiver = SpoolingReceiver(store, policy=None, hostname="mx.example.jp", now=lambda: 0.0)
    message = receiver.open_message(SESSION, None, [(parse_mailbox("a@example.jp"), [])], {})
    store.writer.commit = lambda envelope: defer.fail(error)
    logged: list[str] = []
    observer = lambda event: logged.append(formatEvent(event))  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        failure = []
        message.commit().addErrback(failure.append)
    finally:
        globalLogPublisher.removeObserver(observer)
    return failure[0].value.reply, logged


def test_a_storage_failure_is_logged_before_its_451():
    import errno

    from epost.store.database import SpoolError

    reply, logged = _failing_commit(SpoolError(errno.EIO, "spool worker process ended"))
    assert (reply.code, reply.enhanced) == (451, "4.3.0")
    assert [line for line in logged if "0190000000000A000" in line and "spool worker process ended" in line]


def test_a_commit_after_the_spool_workers_stopped_is_421_not_451():
    import errno

    from epost.store.spool import SpoolStopping

    reply, logged = _failing_commit(SpoolStopping(errno.ESHUTDOWN, "spool workers stopped"))
    assert (reply.code, reply.enhanced) == (421, "4.3.2")
    assert [line for line in logged if "0190000000000A000" in line and "not queued" in line]


def test_the_received_header_dates_each_message_to_its_own_second():
    from email.utils import parsedate_to_datetime

    from epost.smtp.receiver import received_header

    session = SESSION
    dates = []
    for when in (1_700_000_000.2, 1_700_000_000.9, 1_700_000_001.0, 1_700_000_000.5):
        header = received_header(session, "mx.test", "0" * 17, [parse_mailbox("a@b.test")], when).decode()
        assert header.startswith("Received: from client.example ([127.0.0.1])") and header.endswith(" +0000\r\n")
        dates.append(parsedate_to_datetime(header.rsplit(";", 1)[1].strip()).timestamp())
    assert dates == [1_700_000_000, 1_700_000_000, 1_700_000_001, 1_700_000_000]
