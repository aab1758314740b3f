"""The spool worker process: its request loop in-process, and the real child."""

from __future__ import annotations

import errno
import os
import tempfile
import time
import shutil
from pathlib import Path

from dataclasses import replace

from twisted.internet import defer, reactor
from twisted.internet.error import ProcessTerminated
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial import unittest

from epost.store.envelope import Envelope, Recipient
from epost.store.database import Change, SpoolError
from epost.store.group_commit import GroupCommit
from epost.store.spool import MessageWriter, Spool
from epost.queue.worker import Worker
from epost.queue.worker_client import RemoteMessageWriter, SpoolWorkerService
from fakes import ClockReactor, HeldThreadPool, SynchronousThreadPool


def envelope(queue_id: str, *mailboxes: str) -> Envelope:
    recipients = tuple(Recipient(f"{m.split('/')[1]}@{m.split('/')[0]}", {"kind": "local", "mailbox": m}) for m in mailboxes)
    return Envelope(queue_id, "a@example.org", recipients, arrival=time.time(), size=0)


def make_spool(reactor=None, threadpool=None) -> Spool:
    root = Path(tempfile.mkdtemp(prefix="epost-worker-test-"))
    spool = Spool(root, reactor=reactor, threadpool=threadpool)
    spool.open()
    return spool


def new_mail(root: Path, mailbox: str) -> list[bytes]:
    folder = root / "mailboxes" / mailbox / "new"
    return [p.read_bytes() for p in folder.iterdir()] if folder.exists() else []


class WorkerLoopTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.spool = make_spool()
        self.addCleanup(shutil.rmtree, self.spool.root)
        self.replies: list[bytes] = []
        self.worker = Worker(self.spool.root, "mx.test", reply=self.replies.append)

    def test_streamed_content_is_committed_then_delivered_from_memory(self):
        queue_id = self.spool.new_queue_id()
        self.worker.handle(b"W", queue_id, b"Subject: a\r\n\r\n")
        self.worker.handle(b"W", queue_id, b"body\r\n")
        self.worker.handle(b"C", queue_id, envelope(queue_id, "example.test/alice").to_bytes())
        self.worker.work()
        assert self.replies == [f"C {queue_id}\n".encode()]
        assert self.spool.state_of(queue_id) == "incoming"
        assert queue_id in self.worker.recent
        self.worker.handle(b"L", queue_id, b"")
        self.worker.work()
        assert self.replies[-1] == f"D {queue_id}\n".encode()
        [mail] = new_mail(self.spool.root, "example.test/alice")
        assert mail.endswith(b"Subject: a\n\nbody\n") and b"Delivered-To: alice@example.test" in mail
        assert self.spool.queued_ids("incoming") == []
        assert self.worker.recent == {}

    def test_a_message_with_no_local_recipient_is_not_kept_in_memory(self):
        """Only local delivery reads it back here; relayed mail would fill RECENT_BYTES for nothing."""
        queue_id = self.spool.new_queue_id()
        relayed = Envelope(queue_id, "a@example.org", (Recipient("b@far.test", {"kind": "relay"}),), time.time(), 0)
        self.worker.handle(b"W", queue_id, b"Subject: a\r\n\r\nbody\r\n")
        self.worker.handle(b"C", queue_id, relayed.to_bytes())
        self.worker.work()
        assert self.replies == [f"C {queue_id}\n".encode()]
        assert self.worker.recent == {} and self.worker.recent_bytes == 0

    def test_content_kept_in_memory_is_bounded_by_bytes(self):
        import epost.queue.worker as worker_module

        self.patch(worker_module, "RECENT_BYTES", 10)
        first, second = self.spool.new_queue_id(), self.spool.new_queue_id()
        for queue_id in (first, second):
            self.worker.handle(b"W", queue_id, b"123456\r\n")
            self.worker.handle(b"C", queue_id, envelope(queue_id, "example.test/erin").to_bytes())
        assert list(self.worker.recent) == [second] and self.worker.recent_bytes == 8
        self.worker.work()
        self.worker.handle(b"L", first, b"")  # read back from the spool instead
        self.worker.work()
        assert self.replies[-1] == f"D {first}\n".encode()
        assert len(new_mail(self.spool.root, "example.test/erin")) == 1

    def test_commits_go_before_waiting_deliveries(self):
        first, second = self.spool.new_queue_id(), self.spool.new_queue_id()
        for queue_id in (first,):
            self.worker.handle(b"C", queue_id, envelope(queue_id, "example.test/bob").to_bytes())
        self.worker.work()
        self.worker.handle(b"L", first, b"")
        self.worker.handle(b"C", second, envelope(second, "example.test/bob").to_bytes())
        self.worker.work()
        assert self.replies[-1] == f"C {second}\n".encode()

    def test_abort_leaves_nothing(self):
        queue_id = self.spool.new_queue_id()
        self.worker.handle(b"W", queue_id, b"x" * (600 * 1024))  # spills to tmp/
        assert os.listdir(self.spool.root / "tmp") == [f"{queue_id}.msg"]
        self.worker.handle(b"A", queue_id, b"")
        assert os.listdir(self.spool.root / "tmp") == []

    def test_corrupt_envelope_fails_the_commit_cleanly(self):
        queue_id = self.spool.new_queue_id()
        self.worker.handle(b"W", queue_id, b"data")
        self.worker.handle(b"C", queue_id, b"{not json")
        assert self.replies[0].startswith(f"F {queue_id} 22 ".encode())
        assert self.spool.queued_ids("incoming") == []


    def test_bookkeeping_that_gathered_is_one_transaction_after_the_commits(self):
        from epost.queue.worker import change_frame

        ids = [self.spool.new_queue_id() for _ in range(4)]
        for queue_id in ids[:2]:
            self.worker.handle(b"C", queue_id, envelope(queue_id, "example.test/bob").to_bytes())
        self.worker.work()
        later = envelope(ids[1], "example.test/bob").with_recipient(0, attempts=1)
        self.worker.handle(b"B", ids[0], change_frame(Change(ids[0], "incoming")))
        self.worker.handle(b"B", ids[1], change_frame(Change(ids[1], "incoming", later, "deferred")))
        self.worker.handle(b"B", ids[2], change_frame(Change(ids[2], "incoming")))  # never queued
        self.worker.handle(b"C", ids[3], envelope(ids[3], "example.test/bob").to_bytes())
        transactions = []
        store = self.worker.spool.store
        apply = store.apply
        self.patch(store, "apply", lambda changes, **kw: (transactions.append((len(changes), kw)), apply(changes, **kw))[1])
        self.worker.work()  # one step: the commit first, then the bookkeeping
        assert self.replies[-2] == f"C {ids[3]}\n".encode()
        assert transactions == [(3, {"durable": False})]
        assert self.replies[-1].decode().splitlines() == [
            f"S {ids[0]}", f"S {ids[1]}", f"E {ids[2]} {errno.ENOENT} {ids[2]}: not in incoming"]
        assert self.spool.state_of(ids[0]) is None
        assert self.spool.load(ids[1], "deferred") == later
        assert not self.worker.busy

    def test_bookkeeping_is_not_held_off_by_commits_that_keep_coming(self):
        from epost.queue.worker import change_frame

        first = self.spool.new_queue_id()
        self.worker.handle(b"C", first, envelope(first, "example.test/bob").to_bytes())
        self.worker.work()
        self.worker.handle(b"B", first, change_frame(Change(first, "incoming")))
        for _ in range(3):
            queue_id = self.spool.new_queue_id()
            self.worker.handle(b"C", queue_id, envelope(queue_id, "example.test/bob").to_bytes())
            self.worker.work()
        assert f"S {first}\n".encode() in self.replies and self.spool.state_of(first) is None

    def test_a_bookkeeping_frame_that_cannot_be_read_is_answered_with_an_error(self):
        queue_id = self.spool.new_queue_id()
        for bad in (b"incoming -\n{not json", b"bogus -\n", b"incoming nowhere\n", b"incoming\n"):
            self.worker.handle(b"B", queue_id, bad)
        assert all(r.startswith(f"E {queue_id} {errno.EINVAL} ".encode()) for r in self.replies), self.replies
        assert len(self.replies) == 4 and not self.worker.busy
        self.worker.handle(b"B", "not-an-id", b"incoming -\n")
        assert self.replies[-1].startswith(f"E not-an-id {errno.EINVAL} ".encode()) and not self.worker.busy
        other = self.spool.new_queue_id()  # another message's envelope is not this one's
        self.worker.handle(b"B", queue_id, b"incoming -\n" + envelope(other, "example.test/bob").to_bytes())
        assert self.replies[-1].startswith(f"E {queue_id} {errno.EINVAL} ".encode()) and not self.worker.busy


class RecordingService:
    """Stands in for SpoolWorkerService: records the frames a writer sends."""

    def __init__(self):
        self.frames: list[tuple[bytes, bytes]] = []

    def generation(self, queue_id):
        return 1

    def send(self, op, queue_id, payload):
        self.frames.append((op, payload))

    def commit(self, queue_id, envelope):
        self.frames.append((b"C", b""))
        return defer.succeed(queue_id)


class RemoteWriterTests(unittest.SynchronousTestCase):
    QUEUE_ID = "00000000000010000"

    def setUp(self):
        self.service = RecordingService()
        self.writer = RemoteMessageWriter(self.service, self.QUEUE_ID)

    def test_a_small_message_reaches_the_worker_in_one_frame_with_its_commit(self):
        for piece in (b"Received: x\r\n", b"Subject: hi\r\n", b"\r\nbody\r\n"):
            self.writer.write(piece)
        assert self.service.frames == []
        self.writer.commit(envelope(self.QUEUE_ID, "example.test/carol"))
        assert self.service.frames == [(b"W", b"Received: x\r\nSubject: hi\r\n\r\nbody\r\n"), (b"C", b"")]
        assert self.writer.size == 34

    def test_big_content_is_streamed_once_enough_gathers(self):
        chunk = b"x" * (RemoteMessageWriter.HOLD // 2)
        self.writer.write(chunk)
        assert self.service.frames == []
        self.writer.write(chunk)
        assert self.service.frames == [(b"W", chunk + chunk)]  # memory held per session stays under HOLD
        self.writer.write(b"tail")
        self.writer.commit(envelope(self.QUEUE_ID, "example.test/carol"))
        assert self.service.frames[1:] == [(b"W", b"tail"), (b"C", b"")]

    def test_abort_drops_what_was_held(self):
        self.writer.write(b"held")
        self.writer.abort()
        assert self.service.frames == [(b"A", b"")]


class _Pipe:
    def __init__(self):
        self.frames: list[bytes] = []

    def writeSequence(self, data):
        self.frames.append(b"".join(data))


class _Child:
    """Stands in for the LineChild of a spawned worker: frames go nowhere."""

    def __init__(self):
        self.transport = _Pipe()


class DeadWorkerTests(unittest.SynchronousTestCase):
    """A worker killed (kill -9, OOM) between its batch's durable COMMIT and its `C ID` lines."""

    def setUp(self):
        self.clock = ClockReactor()
        self.spool = make_spool(self.clock, SynchronousThreadPool())  # its pool writes what the dead worker left
        self.addCleanup(shutil.rmtree, self.spool.root)
        self.addCleanup(self.spool.close)
        self.service = SpoolWorkerService(self.spool, "mx.test", self.clock, threadpool=SynchronousThreadPool())
        self.service.running = True  # started, without spawning a child
        self.service._protocols = [_Child()]
        self.handed_on: list[tuple[str, Envelope]] = []
        self.spool.on_commit.append(lambda queue_id, envelope: self.handed_on.append((queue_id, envelope)))

    def send(self, content: bytes) -> tuple[str, Envelope, defer.Deferred]:
        writer = self.service.open_message()
        writer.write(content)
        sent = envelope(writer.queue_id, "example.test/carol")
        return writer.queue_id, sent, writer.commit(sent)

    def died(self) -> None:
        self.service.worker_ended(0, Failure(ProcessTerminated(signal=9)))

    def test_a_commit_durable_before_the_worker_died_is_answered_and_handed_on_with_its_signature(self):
        queue_id, sent, answered = self.send(b"Subject: hi\r\n\r\nhello\r\n")
        # What the child did before it died: its batch is in the store, signed, its `C` line never written.
        signed = replace(sent, dkim="DKIM-Signature: v=1; d=example.org; b=abc\r\n")
        content = MessageWriter(self.spool, queue_id)
        content.write(b"Subject: hi\r\n\r\nhello\r\n")
        assert self.spool.commit_batch([(content, signed)]) == [None]
        self.died()
        assert self.successResultOf(answered) == queue_id  # the client's 250: it does not send it again
        assert self.handed_on == [(queue_id, signed)]  # the runner has it now, with the signature made at commit
        assert [call.getTime() for call in self.clock.getDelayedCalls()] == [self.service.restart_delay]

    def test_a_commit_not_in_the_store_when_the_worker_died_fails_with_a_spool_error(self):
        queue_id, _, answered = self.send(b"x\r\n")
        self.died()
        error = self.failureResultOf(answered, SpoolError).value
        assert error.errno == errno.EIO and not error.disk_full  # 451: the client sends it again
        assert self.handed_on == []
        assert self.spool.state_of(queue_id) is None

    def test_a_store_that_cannot_be_read_after_the_death_answers_4xx(self):
        from epost.store.database import StoreError

        def unreadable(queue_id):
            raise StoreError(errno.EIO, "cannot read queue.db")

        self.spool.state_of = unreadable
        _, _, answered = self.send(b"x\r\n")
        self.died()
        assert self.failureResultOf(answered, SpoolError).value.errno == errno.EIO
        assert self.handed_on == []

    def test_the_commits_of_other_workers_wait_for_their_own_answer(self):
        self.service = SpoolWorkerService(self.spool, "mx.test", self.clock, processes=2,
                                          threadpool=SynchronousThreadPool())
        self.service.running = True
        self.service._protocols = [_Child(), _Child()]
        answers: dict[int, list[defer.Deferred]] = {0: [], 1: []}
        while not (answers[0] and answers[1]):
            queue_id, _, answered = self.send(b"x\r\n")
            answers[self.service._index(queue_id)].append(answered)
        self.died()
        for answered in answers[0]:
            self.failureResultOf(answered, SpoolError)
        for answered in answers[1]:
            self.assertNoResult(answered)


    def record(self, change: Change) -> defer.Deferred:
        answered = self.service.record(change)
        assert self.service._protocols[0].transport.frames[-1][:1] == b"B"  # sent to the child
        return answered

    def test_bookkeeping_answers_become_the_deferreds_results(self):
        ids = [self.spool.new_queue_id() for _ in range(3)]
        saved, missing, failed = (self.record(Change(q, "incoming")) for q in ids)
        self.service.reply_received(f"S {ids[0]}")
        self.service.reply_received(f"E {ids[1]} {errno.ENOENT} {ids[1]}: not in incoming")
        self.service.reply_received(f"E {ids[2]} {errno.ENOSPC} database or disk is full")
        assert self.successResultOf(saved) is None
        assert str(self.failureResultOf(missing, FileNotFoundError).value) == f"{ids[1]}: not in incoming"
        assert self.failureResultOf(failed, SpoolError).value.disk_full
        assert self.service._changes == {}

    def test_bookkeeping_the_dead_worker_never_answered_is_written_by_the_daemon(self):
        done, pending = self.spool.new_queue_id(), self.spool.new_queue_id()
        for queue_id in (done, pending):
            self.committed(queue_id)
        first, second = self.record(Change(done, "incoming")), self.record(Change(pending, "incoming"))
        self.spool.store.remove(done, "incoming", durable=False)  # the child wrote this one, then died
        self.died()
        assert self.successResultOf(first) is None and self.successResultOf(second) is None
        assert self.spool.state_of(done) is None and self.spool.state_of(pending) is None

    def committed(self, queue_id: str) -> None:
        content = MessageWriter(self.spool, queue_id)
        content.write(b"x\r\n")
        assert self.spool.commit_batch([(content, envelope(queue_id, "example.test/carol"))]) == [None]

    def test_a_change_that_cannot_be_sent_fails_alone_and_the_next_gets_its_own_answer(self):
        queue_id = self.spool.new_queue_id()
        unsayable = replace(envelope(queue_id, "example.test/carol"), retries={"x": {"when": object()}})
        failed = self.service.record(Change(queue_id, "incoming", unsayable))
        assert self.failureResultOf(failed, SpoolError).value.errno == errno.EIO
        assert self.service._changes == {}
        answered = self.record(Change(queue_id, "incoming"))
        self.service.reply_received(f"S {queue_id}")
        assert self.successResultOf(answered) is None

    def test_a_dead_worker_s_update_that_finds_no_message_is_an_error_not_written_already(self):
        queue_id = self.spool.new_queue_id()  # never queued: someone else took it
        updated = self.record(Change(queue_id, "incoming", envelope(queue_id, "example.test/carol")))
        moved = self.record(Change(queue_id, "incoming", envelope(queue_id, "example.test/carol"), "deferred"))
        self.died()
        self.failureResultOf(updated, FileNotFoundError)
        assert self.successResultOf(moved) is None  # a move the child made before it died

    def test_the_stop_waits_for_the_bookkeeping_a_dead_worker_left(self):
        queue_id = self.spool.new_queue_id()
        self.committed(queue_id)
        pool = HeldThreadPool()
        self.spool._changes = GroupCommit(self.clock, pool, self.spool._changes._run_batch)  # its writes wait
        saved = self.record(Change(queue_id, "incoming"))
        stopped = defer.Deferred()
        self.service._stopping.append(stopped)
        self.service.running = False
        self.service.worker_ended(0, Failure(ProcessTerminated(signal=9)))
        self.assertNoResult(stopped)  # the pool (stopped next) still has the change to write
        pool.run_all()
        assert self.successResultOf(saved) is None and self.spool.state_of(queue_id) is None
        assert self.successResultOf(stopped) is None

    def test_without_a_running_worker_bookkeeping_is_written_in_the_pool(self):
        queue_id = self.spool.new_queue_id()
        self.committed(queue_id)
        self.service._protocols = [None]
        assert self.successResultOf(self.service.record(Change(queue_id, "incoming"))) is None
        assert self.spool.state_of(queue_id) is None


class WorkerProcessTests(unittest.TestCase):
    """The real child process, spawned by the service as the daemon does."""

    def setUp(self):
        self.spool = make_spool()
        self.addCleanup(shutil.rmtree, self.spool.root)
        self.service = SpoolWorkerService(self.spool, "mx.test", reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)

    @defer.inlineCallbacks
    def test_message_is_committed_and_delivered_by_the_child(self):
        committed = []
        self.spool.on_commit.append(lambda queue_id, envelope: committed.append(queue_id))
        writer = self.service.open_message()
        writer.write(b"Subject: hi\r\n\r\nhello\r\n")
        queue_id = yield writer.commit(envelope(writer.queue_id, "example.test/carol"))
        assert committed == [queue_id]
        assert self.spool.content(queue_id) == b"Subject: hi\r\n\r\nhello\r\n"
        verdicts = yield self.service.deliver([queue_id])
        assert verdicts == {queue_id: "D"}
        [mail] = new_mail(self.spool.root, "example.test/carol")
        assert mail.endswith(b"hello\n")

    @defer.inlineCallbacks
    def test_the_child_writes_the_bookkeeping(self):
        writer = self.service.open_message()
        writer.write(b"x\r\n")
        queue_id = yield writer.commit(envelope(writer.queue_id, "example.test/carol"))
        later = envelope(queue_id, "example.test/carol").with_recipient(0, attempts=1)
        yield self.service.record(Change(queue_id, "incoming", later, "deferred"))
        assert self.spool.load(queue_id, "deferred") == later
        yield self.service.record(Change(queue_id, "deferred"))
        assert self.spool.state_of(queue_id) is None
        yield self.assertFailure(self.service.record(Change(queue_id, "deferred")), FileNotFoundError)

    @defer.inlineCallbacks
    def test_bad_mailbox_fails_and_is_passed_on_for_the_bounce(self):
        writer = self.service.open_message()
        writer.write(b"x\r\n")
        queue_id = yield writer.commit(envelope(writer.queue_id, "example.test/.."))
        verdicts = yield self.service.deliver([queue_id])
        assert verdicts == {queue_id: "P"}

    @defer.inlineCallbacks
    def test_a_dying_worker_fails_pending_commits_with_a_spool_error_and_is_restarted(self):
        self.service.restart_delay = 0.1
        writer = self.service.open_message()
        writer.write(b"x\r\n")
        protocol = self.service._protocols[self.service._index(writer.queue_id)]
        protocol.transport.signalProcess("KILL")
        yield deferLater(reactor, 0.5, lambda: None)  # it died and came back
        # its content died with the old child: the commit must fail, never queue an empty message
        yield self.assertFailure(writer.commit(envelope(writer.queue_id, "example.test/dave")), SpoolError)
        assert self.spool.state_of(writer.queue_id) is None
        assert self.service._protocols[self.service._index(writer.queue_id)] is not None
        second = self.service.open_message()
        second.write(b"y\r\n")
        queue_id = yield second.commit(envelope(second.queue_id, "example.test/dave"))
        assert self.spool.state_of(queue_id) == "incoming"

    @defer.inlineCallbacks
    def test_a_commit_sent_before_the_stop_is_answered_and_one_after_it_is_spool_stopping(self):
        """The daemon's stop closes the workers' stdin: what they were sent is still committed."""
        from epost.store.spool import SpoolStopping

        writer = self.service.open_message()
        writer.write(b"Subject: in flight\r\n\r\nx\r\n")
        committed = writer.commit(envelope(writer.queue_id, "example.test/dave"))
        late = self.service.open_message()
        late.write(b"y\r\n")
        stopped = self.service.stopService()
        queue_id = yield committed
        assert self.spool.state_of(queue_id) == "incoming"
        yield self.assertFailure(late.commit(envelope(late.queue_id, "example.test/dave")), SpoolStopping)
        yield stopped

    @defer.inlineCallbacks
    def test_a_sigterm_to_the_process_group_does_not_end_a_worker(self):
        """systemd's KillMode=control-group signals the workers too; the daemon decides when they end."""
        answered: set[int] = set()
        while len(answered) < len(self.service._protocols):  # every worker is up and past its imports
            writer = self.service.open_message()
            writer.write(b"x\r\n")
            yield writer.commit(envelope(writer.queue_id, "example.test/dave"))
            answered.add(self.service._index(writer.queue_id))
        for protocol in self.service._protocols:
            protocol.transport.signalProcess("TERM")
        yield deferLater(reactor, 0.3, lambda: None)
        assert all(protocol is not None for protocol in self.service._protocols)
        for _ in range(4):
            writer = self.service.open_message()
            writer.write(b"x\r\n")
            queue_id = yield writer.commit(envelope(writer.queue_id, "example.test/dave"))
            assert self.spool.state_of(queue_id) == "incoming"


def test_one_worker_process_by_default_and_more_on_request():
    """The queue store serialises writers: one process's group commit is the default."""
    spool = Spool(Path("/nonexistent"), reactor=None, threadpool=None)
    assert len(SpoolWorkerService(spool, "mx.test", reactor)._protocols) == 1
    assert len(SpoolWorkerService(spool, "mx.test", reactor, processes=3)._protocols) == 3
