"""The local delivery runner: one copy per local recipient, other routes left pending, retries after failure."""

import os
import time
import shutil
import tempfile
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest

import epost.queue.runner as runner_module
from fakes import ClockReactor, SynchronousThreadPool, put_one

from epost.delivery.maildir import MaildirBatch
from epost.store.database import Change
from epost.store.envelope import Envelope, Recipient
from epost.queue.runner import LocalDeliveryRunner
from epost.store.spool import Spool

CONTENT = b"Subject: hi\r\n\r\nbody\r\n"


def local(address: str) -> Recipient:
    user, domain = address.split("@")
    return Recipient(address, {"kind": "local", "mailbox": f"{domain}/{user}"})


class RunnerTestCase(unittest.TestCase):
    def setUp(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="epost-test-"))  # not mktemp(): under pytest it writes into the checkout
        self.addCleanup(shutil.rmtree, self.root, ignore_errors=True)
        self.use(*self.reactor_and_pool())

    def reactor_and_pool(self):
        """Real reactor and real threads; FailureTests swaps in synchronous fakes driven by a Clock."""
        pool = ThreadPool(minthreads=1, maxthreads=4)
        pool.start()
        self.addCleanup(pool.stop)
        return reactor, pool

    def use(self, a_reactor, pool) -> None:
        self.spool = Spool(self.root, reactor=a_reactor, threadpool=pool)
        self.spool.open()
        self.runner = LocalDeliveryRunner(
            self.spool, a_reactor, pool, "mx.example.jp", self.root / "mailboxes"
        )

    def start(self) -> None:
        self.runner.startService()
        self.addCleanup(self.runner.stopService)

    def queue(self, *recipients: Recipient):
        """Commit a message the normal way; fires with its queue id."""
        writer = self.spool.open_message()
        writer.write(CONTENT)
        envelope = Envelope(writer.queue_id, "bob@example.org", recipients, time.time(), len(CONTENT))
        return writer.commit(envelope)

    def mailbox(self, mailbox: str) -> list[bytes]:
        new = self.root / "mailboxes" / mailbox / "new"
        if not new.exists():
            return []
        return [(new / name).read_bytes() for name in os.listdir(new)]

    def queued(self) -> list[str]:
        """The IDs the queue store holds in incoming."""
        return self.spool.queued_ids("incoming")


class DeliveryTests(RunnerTestCase):
    @inlineCallbacks
    def test_two_local_recipients_get_one_copy_each_and_the_message_leaves_the_queue(self):
        self.start()
        yield self.queue(local("alice@example.jp"), local("carol@example.jp"))
        yield self.runner.idle()
        assert self.mailbox("example.jp/alice") == [
            b"Return-Path: <bob@example.org>\nDelivered-To: alice@example.jp\nSubject: hi\n\nbody\n"
        ]
        assert len(self.mailbox("example.jp/carol")) == 1
        assert self.queued() == []

    @inlineCallbacks
    def test_message_left_from_a_previous_run_is_delivered_on_start(self):
        yield self.queue(local("alice@example.jp"))
        (self.root / "queue" / "large" / "0000000000001FFFF").write_bytes(b"debris: a file no row names")
        (self.root / "tmp" / "0000000000002FFFF.msg").write_bytes(b"debris: a message never committed")
        self.start()
        yield self.runner.idle()
        assert len(self.mailbox("example.jp/alice")) == 1
        assert self.queued() == []
        assert os.listdir(self.root / "queue" / "large") == [] and os.listdir(self.root / "tmp") == []

    @inlineCallbacks
    def test_relay_recipient_stays_pending_and_keeps_the_message_queued(self):
        self.start()
        relay = Recipient("dave@else.jp", {"kind": "relay", "hosts": ["mx.else.jp:25"]})
        queue_id = yield self.queue(relay, local("alice@example.jp"))
        yield self.runner.idle()
        envelope = self.spool.load(queue_id)
        assert [r.state for r in envelope.recipients] == ["pending", "delivered"]
        assert envelope.recipients[1].last_reply == "delivered to maildir"
        assert envelope.recipients[1].attempts == 1
        assert self.queued() == [queue_id]
        assert len(self.mailbox("example.jp/alice")) == 1

    @inlineCallbacks
    def test_a_large_message_is_delivered_from_its_own_file(self):
        self.start()
        writer = self.spool.open_message()
        body = b"Subject: big\r\n\r\n" + b"y" * (400 * 1024) + b"\r\n"
        writer.write(body)
        queue_id = yield writer.commit(Envelope(writer.queue_id, "bob@example.org", (local("alice@example.jp"),),
                                                time.time(), len(body)))
        assert isinstance(self.spool.content(queue_id), Path)
        yield self.runner.idle()
        [mail] = self.mailbox("example.jp/alice")
        assert mail.endswith(b"Subject: big\n\n" + b"y" * (400 * 1024) + b"\n")
        assert self.queued() == [] and os.listdir(self.root / "queue" / "large") == []

    @inlineCallbacks
    def test_many_messages_are_all_delivered(self):
        self.start()
        for i in range(20):
            yield self.queue(local(f"u{i % 3}@example.jp"))
        yield self.runner.idle()
        assert sum(len(self.mailbox(f"example.jp/u{i}")) for i in range(3)) == 20
        assert self.queued() == []


class FailureTests(RunnerTestCase):
    def reactor_and_pool(self):
        self.clock = ClockReactor()
        return self.clock, SynchronousThreadPool()

    def test_failed_maildir_write_leaves_the_recipient_pending_and_is_retried_after_a_minute(self):
        self.patch(runner_module, "MaildirBatch", self.broken_for("alice"))
        self.start()
        queue_id = self.successResultOf(self.queue(local("alice@example.jp"), local("carol@example.jp")))
        self.successResultOf(self.runner.idle())

        envelope = self.spool.load(queue_id)
        assert [r.state for r in envelope.recipients] == ["pending", "delivered"]
        assert envelope.recipients[0].attempts == 1
        assert "disk on fire" in envelope.recipients[0].last_reply
        assert self.mailbox("example.jp/alice") == []

        self.patch(runner_module, "MaildirBatch", MaildirBatch)
        self.clock.advance(59)
        assert self.mailbox("example.jp/alice") == []
        self.clock.advance(1)
        assert len(self.mailbox("example.jp/alice")) == 1
        assert len(self.mailbox("example.jp/carol")) == 1
        assert self.queued() == []

    def test_stopping_cancels_pending_retries(self):
        self.patch(runner_module, "MaildirBatch", self.broken_for("alice"))
        self.runner.startService()
        self.successResultOf(self.queue(local("alice@example.jp")))
        assert len(self.clock.getDelayedCalls()) == 1
        self.successResultOf(self.runner.stopService())
        assert self.clock.getDelayedCalls() == []
        assert self.spool.on_commit == []

    def test_a_mailbox_route_cannot_climb_out_of_the_mailbox_root(self):
        self.start()
        bad = Recipient("x@example.jp", {"kind": "local", "mailbox": "../../etc"})
        passed = []
        self.runner.on_passed = lambda queue_id, envelope: passed.append(queue_id)
        queue_id = self.successResultOf(self.queue(bad))
        recipient = self.spool.load(queue_id).recipients[0]
        # Permanent: failed at once and passed on to the manager, which bounces it.
        assert recipient.state == "failed" and recipient.last_reply.startswith("550 5.3.0 maildir: bad mailbox")
        assert passed == [queue_id]
        assert not (self.root.parent / "etc").exists()

    def test_a_local_failure_is_retried_until_period_4xx_then_failed_and_passed_on(self):
        self.patch(runner_module, "MaildirBatch", self.broken_for("alice"))
        passed = []
        self.runner.on_passed = lambda queue_id, envelope: passed.append(queue_id)
        self.start()
        writer = self.spool.open_message()
        writer.write(CONTENT)
        old = Envelope(writer.queue_id, "bob@example.org", (local("alice@example.jp"),), time.time() - 8 * 3600, len(CONTENT))
        queue_id = self.successResultOf(writer.commit(old))
        recipient = self.spool.load(queue_id).recipients[0]
        assert recipient.state == "failed" and recipient.last_reply == "451 4.3.0 maildir: [Errno 5] disk on fire"
        assert passed == [queue_id] and self.clock.getDelayedCalls() == []

    @staticmethod
    def broken_for(user: str):
        """A MaildirBatch whose writes to `user`'s Maildir fail."""

        class BrokenBatch(MaildirBatch):
            def add(self, maildir, content_path, prefix=b""):
                if maildir.name == user:
                    raise OSError(5, "disk on fire")
                return super().add(maildir, content_path, prefix)

        return BrokenBatch


class BatchBookkeepingTests(unittest.SynchronousTestCase):
    """deliver_local_batch writes what its pass did to all its messages in one transaction."""

    def setUp(self):
        self.root = Path(tempfile.mkdtemp(prefix="epost-test-"))
        self.addCleanup(shutil.rmtree, self.root, ignore_errors=True)
        self.spool = Spool(self.root, reactor=None, threadpool=None)
        self.spool.open()
        self.addCleanup(self.spool.close)

    def put(self, *recipients: Recipient) -> str:
        queue_id = self.spool.new_queue_id()
        put_one(self.spool.store, Envelope(queue_id, "bob@example.org", recipients, time.time(), len(CONTENT)), CONTENT, "incoming")
        return queue_id

    def test_one_transaction_for_the_batch_and_a_failed_write_is_retried(self):
        from epost.queue.runner import DONE, PASSED, RETRY, deliver_local_batch

        done = self.put(local("alice@example.jp"))
        passed = self.put(local("carol@example.jp"), Recipient("x@far.test", {"kind": "relay"}))
        gone = self.put(local("dave@example.jp"))
        transactions = []
        apply = self.spool.store.apply

        def counted(changes, *, durable=True):
            transactions.append(([c.doing for c in changes], durable))
            assert apply([Change(gone, "incoming")]) == [None]  # the operator deletes it meanwhile
            return apply(changes, durable=durable)

        self.patch(self.spool.store, "apply", counted)
        verdicts = deliver_local_batch(self.spool, [done, passed, gone], "mx.example.jp", self.root / "mailboxes")
        assert transactions == [(["remove", "update", "remove"], False)]
        assert verdicts == {done: DONE, passed: PASSED, gone: RETRY}
        assert self.spool.queued_ids("incoming") == [passed]
        assert self.spool.load(passed).recipients[0].state == "delivered"


    def test_a_store_that_cannot_write_the_batch_makes_every_verdict_retry(self):
        from epost.queue.runner import RETRY, deliver_local_batch

        ids = [self.put(local("alice@example.jp")), self.put(local("carol@example.jp"))]

        def broken(changes, *, durable=True):  # as apply answers a store error: one for every change
            return [OSError(5, "Input/output error") for _ in changes]

        self.patch(self.spool.store, "apply", broken)
        verdicts = deliver_local_batch(self.spool, ids, "mx.example.jp", self.root / "mailboxes")
        assert verdicts == dict.fromkeys(ids, RETRY)
        assert self.spool.queued_ids("incoming") == ids
