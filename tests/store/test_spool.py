"""The spool keeps every committed message whole in its queue store and leaves nothing half-written behind."""

import errno
import os
import shutil
import sqlite3
import tempfile
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest

import epost.store.database as database_module
from epost.store.envelope import Envelope, Recipient
from epost.store.database import SpoolError
from epost.store.spool import Spool
from fakes import put_one, queued_ids

LARGE = b"Subject: large\r\n\r\n" + b"x" * (300 * 1024)  # past MessageWriter.spill_size: spilled to tmp/


def envelope_for(queue_id: str, size: int = 0) -> Envelope:
    route = {"kind": "local", "mailbox": "example.jp/alice"}
    return Envelope(queue_id, "bob@example.org", (Recipient("alice@example.jp", route),), 1.0, size)


class SpoolTestCase(unittest.TestCase):
    def setUp(self) -> None:
        self.pool = ThreadPool(minthreads=1, maxthreads=4)
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.root = Path(tempfile.mkdtemp(prefix="epost-test-"))  # not mktemp(): under pytest it writes into the checkout
        self.addCleanup(shutil.rmtree, self.root, ignore_errors=True)
        self.spool = self.make_spool()
        self.spool.open()
        self.addCleanup(self.spool.close)

    def make_spool(self, **kwargs) -> Spool:
        return Spool(self.root, reactor=reactor, threadpool=self.pool, **kwargs)

    def files(self, folder: str) -> list[str]:
        return sorted(os.listdir(self.root / folder))

    def write_and_commit(self, content: bytes = b"Subject: hi\r\n\r\nbody\r\n"):
        writer = self.spool.open_message()
        writer.write(content)
        return writer.commit(envelope_for(writer.queue_id, len(content)))


class QueueIdTests(SpoolTestCase):
    def test_ids_are_unique_and_sorted_in_issue_order(self):
        ids = [self.spool.new_queue_id() for _ in range(100_000)]
        assert ids == sorted(ids)
        assert len(set(ids)) == len(ids)
        assert all(len(i) == 17 and i == i.upper() for i in ids)

    def test_ids_keep_increasing_when_the_clock_steps_back(self):
        times = iter([5_000_000_000, 5_000_000_000, 4_000_000_000, 3_000_000_000, 5_000_001_000, 6_000_000_000])
        spool = self.make_spool(clock=lambda: next(times))
        spool.open()
        ids = [spool.new_queue_id() for _ in range(6)]
        assert ids == sorted(ids)
        assert len(set(ids)) == 6

    def test_counter_overflow_carries_into_the_time_digits(self):
        spool = self.make_spool(clock=lambda: 1_000_000_000)
        spool.open()
        ids = [spool.new_queue_id() for _ in range(0x10002)]
        assert ids == sorted(ids)
        assert len(set(ids)) == len(ids)

    def test_a_restart_never_reuses_an_id_even_if_the_clock_went_back(self):
        first = self.make_spool(clock=lambda: 9_000_000_000_000)
        first.open()
        queue_id = first.new_queue_id()
        assert put_one(first.store, envelope_for(queue_id), b"x", "deferred")
        restarted = self.make_spool(clock=lambda: 1_000_000_000)
        restarted.open()
        assert restarted.new_queue_id() > queue_id


class CommitTests(SpoolTestCase):
    @inlineCallbacks
    def test_commit_puts_content_and_envelope_in_incoming_and_nothing_in_tmp(self):
        queue_id = yield self.write_and_commit(b"Subject: hi\r\n\r\nbody\r\n")
        assert queued_ids(self.root) == {"incoming": [queue_id], "deferred": [], "hold": []}
        assert self.files("tmp") == []
        assert self.spool.content(queue_id) == b"Subject: hi\r\n\r\nbody\r\n"  # small: inline
        assert self.files("queue/large") == []
        assert self.spool.load(queue_id) == envelope_for(queue_id, 21)

    @inlineCallbacks
    def test_a_large_message_s_spilled_file_becomes_its_large_file(self):
        writer = self.spool.open_message()
        writer.write(LARGE[:1000])
        writer.write(LARGE[1000:])
        assert self.files("tmp") == [f"{writer.queue_id}.msg"]  # spilled as it arrived, not kept in memory
        queue_id = yield writer.commit(envelope_for(writer.queue_id, len(LARGE)))
        stored = self.spool.content(queue_id)
        assert stored == self.root / "queue" / "large" / queue_id
        assert stored.read_bytes() == LARGE
        assert self.files("tmp") == []
        assert queued_ids(self.root)["incoming"] == [queue_id]

    @inlineCallbacks
    def test_commit_tells_subscribers_after_the_message_is_stored(self):
        seen = []
        self.spool.on_commit.append(lambda q, envelope: seen.append((q, self.spool.state_of(q))))
        queue_id = yield self.write_and_commit()
        assert seen == [(queue_id, "incoming")]

    def test_abort_leaves_nothing_and_is_idempotent(self):
        writer = self.spool.open_message()
        writer.write(b"partial")
        writer.abort()
        writer.abort()
        large = self.spool.open_message()
        large.write(LARGE)
        assert self.files("tmp") == [f"{large.queue_id}.msg"]
        large.abort()
        assert self.files("tmp") == []
        assert queued_ids(self.root) == {"incoming": [], "deferred": [], "hold": []}

    @inlineCallbacks
    def test_group_commit_of_many_concurrent_messages(self):
        transactions = []
        real_put_batch = self.spool.store.put_batch
        self.patch(self.spool.store, "put_batch", lambda items: (transactions.append(len(items)), real_put_batch(items))[1])
        ids = yield gatherResults([self.write_and_commit(b"m%d\r\n" % i) for i in range(50)])
        assert len(set(ids)) == 50
        assert queued_ids(self.root)["incoming"] == sorted(ids)
        assert [self.spool.content(q) for q in sorted(ids)] == [b"m%d\r\n" % ids.index(q) for q in sorted(ids)]
        assert self.files("tmp") == []
        assert sum(transactions) == 50 and len(transactions) < 50


class CommitFailureTests(SpoolTestCase):
    @inlineCallbacks
    def assert_commit_fails(self, writer, disk_full: bool):
        d = writer.commit(envelope_for(writer.queue_id))
        error = yield self.assertFailure(d, SpoolError)
        assert error.disk_full is disk_full
        assert queued_ids(self.root) == {"incoming": [], "deferred": [], "hold": []}
        self.assertRaises(FileNotFoundError, self.spool.content, writer.queue_id)
        assert self.files("tmp") == []
        assert self.files("queue/large") == []

    def test_write_error_on_a_closed_file_fails_the_commit(self):
        writer = self.spool.open_message()
        writer.spill_size = 0  # large message: written to tmp/ as it arrives
        writer.write(b"first")
        os.close(writer._fd)
        writer.write(b"data")  # EBADF, remembered, not raised
        writer._fd = None
        return self.assert_commit_fails(writer, disk_full=False)

    def test_disk_full_while_spilling_a_large_message_is_reported_as_disk_full(self):
        writer = self.spool.open_message()
        writer.spill_size = 0
        real_write, full = os.write, failing(errno.ENOSPC)
        self.patch(os, "write", full)
        writer.write(b"data")
        writer.write(b"more")  # ignored after the first error
        self.patch(os, "write", real_write)
        assert full.calls == 1
        assert writer.error.errno == errno.ENOSPC
        return self.assert_commit_fails(writer, disk_full=True)

    @inlineCallbacks
    def test_small_message_touches_the_disk_only_at_commit(self):
        writer = self.spool.open_message()
        writer.write(b"small")
        assert self.files("tmp") == [] and queued_ids(self.root)["incoming"] == []
        queue_id = yield writer.commit(envelope_for(writer.queue_id, 5))
        assert self.spool.content(queue_id) == b"small" and self.files("tmp") == []

    def test_disk_full_in_the_store_is_reported_as_disk_full(self):
        writer = self.spool.open_message()
        writer.write(b"small")
        self.patch(self.spool.store, "_insert", failing_sqlite(13, "database or disk is full"))  # SQLITE_FULL
        return self.assert_commit_fails(writer, disk_full=True)

    def test_another_store_error_is_not_disk_full(self):
        writer = self.spool.open_message()
        writer.write(b"small")
        self.patch(self.spool.store, "_insert", failing_sqlite(10, "disk I/O error"))  # SQLITE_IOERR
        return self.assert_commit_fails(writer, disk_full=False)

    def test_disk_full_on_fsync_of_a_large_message_is_reported_as_disk_full(self):
        writer = self.spool.open_message()
        writer.write(LARGE)
        self.patch(os, "fsync", failing(errno.ENOSPC))
        return self.assert_commit_fails(writer, disk_full=True)

    def test_failed_folder_fsync_removes_the_renamed_file(self):
        writer = self.spool.open_message()
        writer.write(LARGE)
        self.patch(database_module, "fsync_dir", failing(errno.EIO))
        return self.assert_commit_fails(writer, disk_full=False)

    @inlineCallbacks
    def test_one_failing_message_does_not_fail_the_rest_of_its_batch(self):
        taken = yield self.write_and_commit()
        writer = self.spool.open_message()
        writer.queue_id = taken  # a duplicate ID: refused alone
        writer.write(b"other")
        good = self.spool.open_message()
        good.write(b"good")
        results = self.spool.commit_batch([(writer, envelope_for(taken)), (good, envelope_for(good.queue_id))])
        assert results[0] is not None and results[1] is None
        assert self.spool.content(taken) == b"Subject: hi\r\n\r\nbody\r\n"
        assert self.spool.content(good.queue_id) == b"good"


def failing(code: int):
    """A stand-in for an os call that fails with ``code``, counting its calls."""

    def fail(*args):
        fail.calls += 1
        raise OSError(code, os.strerror(code))

    fail.calls = 0
    return fail


def failing_sqlite(code: int, text: str):
    """A stand-in for a store write that SQLite fails with result `code`, ending the transaction."""

    def fail(conn, *args):
        conn.rollback()
        error = sqlite3.OperationalError(text)
        error.sqlite_errorcode = code
        raise error

    return fail


class RecoveryTests(SpoolTestCase):
    def test_recover_removes_debris_and_lists_incoming_ids_in_order(self):
        ids = [self.spool.new_queue_id() for _ in range(5)]
        for queue_id in (ids[2], ids[0], ids[3]):
            assert put_one(self.spool.store, envelope_for(queue_id), b"x", "incoming")
        assert put_one(self.spool.store, envelope_for(ids[4]), b"x", "deferred")
        (self.root / "queue" / "large" / ids[1]).write_bytes(b"placed, crashed before its commit")
        (self.root / "tmp" / f"{self.spool.new_queue_id()}.msg").write_bytes(b"half")

        assert self.spool.recover() == [ids[0], ids[2], ids[3]]
        assert self.files("tmp") == []
        assert self.files("queue/large") == []
        assert self.spool.queued_ids("deferred") == [ids[4]]

    @inlineCallbacks
    def test_a_message_is_queued_only_once_its_commit_returned(self):
        writer = self.spool.open_message()
        writer.write(LARGE)  # spilled: its tmp/ file exists, but it is not queued
        assert self.spool.state_of(writer.queue_id) is None
        restarted = self.make_spool()  # a crash here: the next start finds only debris
        restarted.open()
        assert restarted.recover() == []
        assert self.files("tmp") == [] and self.files("queue/large") == []
        # and a commit that returned survives a restart whole
        queue_id = yield self.write_and_commit(LARGE)
        again = self.make_spool()
        again.open()
        assert again.recover() == [queue_id]
        assert again.content(queue_id).read_bytes() == LARGE

    def test_a_large_file_of_a_queued_message_survives_recovery(self):
        queue_id = self.spool.new_queue_id()
        source = self.root / "tmp" / "import.msg"
        source.write_bytes(LARGE)
        assert put_one(self.spool.store, envelope_for(queue_id), source, "deferred")
        self.spool.recover()
        assert self.spool.content(queue_id).read_bytes() == LARGE


class QueuedMessageTests(SpoolTestCase):
    @inlineCallbacks
    def test_update_replaces_the_envelope_only(self):
        queue_id = yield self.write_and_commit()
        changed = self.spool.load(queue_id).with_recipient(0, state="delivered", attempts=1)
        self.spool.update(changed, durable=False)
        assert self.spool.load(queue_id) == changed
        assert self.spool.content(queue_id) == b"Subject: hi\r\n\r\nbody\r\n"
        assert self.files("tmp") == []

    @inlineCallbacks
    def test_move_takes_the_message_to_the_other_queue_with_its_new_envelope(self):
        queue_id = yield self.write_and_commit()
        moved = self.spool.load(queue_id).with_recipient(0, attempts=1)
        self.spool.move(moved, "incoming", "deferred", durable=False)
        assert queued_ids(self.root) == {"incoming": [], "deferred": [queue_id], "hold": []}
        assert self.spool.load(queue_id, "deferred") == moved
        self.assertRaises(FileNotFoundError, self.spool.load, queue_id, "incoming")
        self.assertRaises(FileNotFoundError, self.spool.move, moved, "incoming", "hold")

    @inlineCallbacks
    def test_remove_deletes_envelope_and_content(self):
        small = yield self.write_and_commit()
        large = yield self.write_and_commit(LARGE)
        self.spool.remove(small, durable=False)
        self.spool.remove(large)
        assert queued_ids(self.root)["incoming"] == []
        self.assertRaises(FileNotFoundError, self.spool.content, small)
        assert self.files("queue/large") == []

    @inlineCallbacks
    def test_content_open_before_a_removal_is_still_read_whole(self):
        queue_id = yield self.write_and_commit(LARGE)
        handle = self.spool.open_content(queue_id)
        self.addCleanup(handle.close)
        self.spool.remove(queue_id)
        assert b"".join(handle.chunks()) == LARGE
        self.assertRaises(FileNotFoundError, self.spool.open_content, queue_id)

    @inlineCallbacks
    def test_load_many_reads_a_state_in_id_order_and_skips_a_damaged_envelope(self):
        ids = []
        for i in range(3):
            ids.append((yield self.write_and_commit(b"m%d" % i)))
        with sqlite3.connect(self.root / "queue" / "queue.db") as db:
            db.execute("UPDATE message SET envelope = ? WHERE id = ?", (b"{not json", ids[1]))
        damaged = []
        loaded = [e.queue_id for e in self.spool.load_many("incoming", lambda q, error: damaged.append(q))]
        assert loaded == [ids[0], ids[2]]
        assert damaged == [ids[1]]

        damaged = []
        after = [e.queue_id for e in self.spool.load_many("incoming", lambda q, error: damaged.append(q), after=ids[1])]
        assert after == [ids[2]] and damaged == []

    def test_ids_and_queue_names_cannot_reach_outside_the_spool(self):
        self.assertRaises(ValueError, self.spool.content, "../../etc/passwd")
        self.assertRaises(ValueError, self.spool.state_of, "../../etc/passwd")
        self.assertRaises(ValueError, self.spool.remove, "../../etc/passwd")
        self.assertRaises(ValueError, self.spool.load, "0006123456789AB00", queue="../tmp")

    def test_opened_by_root_the_folders_it_makes_belong_to_the_owner_of_the_spool(self):
        """twistd opens the spool as root before -u/-g; the operator's own folders are left as they are."""
        if os.geteuid() != 0:
            raise unittest.SkipTest("only root can give files away")
        root = Path(tempfile.mkdtemp(prefix="epost-test-"))
        self.addCleanup(shutil.rmtree, root, ignore_errors=True)
        os.chown(root, 65534, 65534)
        (root / "mailboxes").mkdir()  # e.g. Dovecot's user's (docs/mailboxes.md)
        spool = Spool(root, reactor=reactor, threadpool=self.pool)
        spool.open()
        self.addCleanup(spool.close)
        owners = {name: (os.stat(root / name).st_uid, os.stat(root / name).st_gid)
                  for name in ("tmp", "domains", "log", "mailboxes", "queue", "queue/queue.db")}
        assert owners == {"tmp": (65534, 65534), "domains": (65534, 65534), "log": (65534, 65534),
                          "mailboxes": (0, 0), "queue": (65534, 65534), "queue/queue.db": (65534, 65534)}
