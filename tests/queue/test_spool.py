"""The spool keeps every committed message whole and leaves nothing half-written behind."""

import errno
import os
import shutil
import tempfile
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest

import epost.queue.spool as spool_module
from epost.queue.envelope import Envelope, Recipient
from epost.queue.spool import Spool, SpoolError


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
        self.spool.create_folders()

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
        ids = [spool.new_queue_id() for _ in range(6)]
        assert ids == sorted(ids)
        assert len(set(ids)) == 6

    def test_counter_overflow_carries_into_the_time_digits(self):
        spool = self.make_spool(clock=lambda: 1_000_000_000)
        ids = [spool.new_queue_id() for _ in range(0x10002)]
        assert ids == sorted(ids)
        assert len(set(ids)) == len(ids)

    def test_a_restart_never_reuses_an_id_even_if_the_clock_went_back(self):
        queue_id = self.make_spool(clock=lambda: 9_000_000_000_000).new_queue_id()
        (self.root / "deferred" / f"{queue_id}.env").write_bytes(b"")
        restarted = self.make_spool(clock=lambda: 1_000_000_000)
        assert restarted.new_queue_id() > queue_id


class CommitTests(SpoolTestCase):
    @inlineCallbacks
    def test_commit_puts_content_and_envelope_in_incoming_and_nothing_in_tmp(self):
        queue_id = yield self.write_and_commit(b"Subject: hi\r\n\r\nbody\r\n")
        assert self.files("incoming") == [f"{queue_id}.env", f"{queue_id}.msg"]
        assert self.files("tmp") == []
        assert self.spool.content_path(queue_id).read_bytes() == b"Subject: hi\r\n\r\nbody\r\n"
        assert self.spool.load(queue_id) == envelope_for(queue_id, 21)

    @inlineCallbacks
    def test_commit_tells_subscribers_after_the_message_is_stored(self):
        seen = []
        self.spool.on_commit.append(lambda q, envelope: seen.append((q, os.path.exists(self.spool.content_path(q)))))
        queue_id = yield self.write_and_commit()
        assert seen == [(queue_id, True)]

    def test_abort_leaves_nothing_and_is_idempotent(self):
        writer = self.spool.open_message()
        writer.write(b"partial")
        writer.abort()
        writer.abort()
        assert self.files("tmp") == []
        assert self.files("incoming") == []

    @inlineCallbacks
    def test_group_commit_of_many_concurrent_messages(self):
        dir_syncs = []
        real_fsync_dir = spool_module.fsync_dir
        self.patch(spool_module, "fsync_dir", lambda p: (dir_syncs.append(p), real_fsync_dir(p)))
        ids = yield gatherResults([self.write_and_commit(b"m%d\r\n" % i) for i in range(50)])
        assert len(set(ids)) == 50
        assert self.files("incoming") == sorted(f"{q}.{s}" for q in ids for s in ("env", "msg"))
        assert self.files("tmp") == []
        assert len(dir_syncs) < 50


class CommitFailureTests(SpoolTestCase):
    @inlineCallbacks
    def assert_commit_fails(self, writer, disk_full: bool):
        d = writer.commit(envelope_for(writer.queue_id))
        error = yield self.assertFailure(d, SpoolError)
        assert error.disk_full is disk_full
        assert self.files("incoming") == []
        assert self.files("tmp") == []

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

    def test_small_message_touches_the_disk_only_at_commit(self):
        writer = self.spool.open_message()
        writer.write(b"small")
        assert self.files("tmp") == []
        writer._flush = failing(errno.ENOSPC)  # the commit thread's write fails
        return self.assert_commit_fails(writer, disk_full=True)

    def test_disk_full_on_fsync_is_reported_as_disk_full(self):
        writer = self.spool.open_message()
        writer.write(b"data")
        self.patch(os, "fsync", failing(errno.ENOSPC))
        return self.assert_commit_fails(writer, disk_full=True)

    def test_failed_folder_fsync_removes_the_renamed_files(self):
        writer = self.spool.open_message()
        writer.write(b"data")
        self.patch(spool_module, "fsync_dir", failing(errno.EIO))
        return self.assert_commit_fails(writer, disk_full=False)


def failing(code: int):
    """A stand-in for an os call that fails with ``code``, counting its calls."""

    def fail(*args):
        fail.calls += 1
        raise OSError(code, os.strerror(code))

    fail.calls = 0
    return fail


class RecoveryTests(SpoolTestCase):
    def test_recover_removes_debris_and_lists_ids_in_order(self):
        incoming = self.root / "incoming"
        ids = [self.spool.new_queue_id() for _ in range(4)]
        for queue_id in (ids[2], ids[0], ids[3]):
            (incoming / f"{queue_id}.msg").write_bytes(b"x")
            (incoming / f"{queue_id}.env").write_bytes(envelope_for(queue_id).to_bytes())
        (incoming / f"{ids[1]}.msg").write_bytes(b"crashed before its envelope")
        (self.root / "tmp" / f"{self.spool.new_queue_id()}.msg").write_bytes(b"half")
        (self.root / "tmp" / f"{ids[0]}.env.0").write_bytes(b"half an update")

        assert self.spool.recover() == [ids[0], ids[2], ids[3]]
        assert self.files("tmp") == []
        assert f"{ids[1]}.msg" not in self.files("incoming")


class QueuedMessageTests(SpoolTestCase):
    @inlineCallbacks
    def test_update_replaces_the_envelope_and_leaves_no_temp_file(self):
        queue_id = yield self.write_and_commit()
        changed = self.spool.load(queue_id).with_recipient(0, state="delivered", attempts=1)
        self.spool.update(changed)
        assert self.spool.load(queue_id) == changed
        assert self.files("tmp") == []

    @inlineCallbacks
    def test_remove_deletes_both_files(self):
        queue_id = yield self.write_and_commit()
        self.spool.remove(queue_id)
        assert self.files("incoming") == []

    @inlineCallbacks
    def test_a_removed_message_s_files_are_reused_holding_only_the_next_message(self):
        long_body = b"Subject: long\r\n\r\n" + b"old text\r\n" * 500
        old_id = yield self.write_and_commit(long_body)
        inodes = {os.stat(self.spool.content_path(old_id)).st_ino,
                  os.stat(self.root / "incoming" / f"{old_id}.env").st_ino}
        self.spool.remove(old_id)
        assert self.files("incoming") == []
        self.spool.pool._listed_at = float("-inf")  # a second later: the pool is read again
        new_id = yield self.write_and_commit(b"Subject: short\r\n\r\nhi\r\n")
        assert {os.stat(self.spool.content_path(new_id)).st_ino,
                os.stat(self.root / "incoming" / f"{new_id}.env").st_ino} == inodes
        assert self.spool.content_path(new_id).read_bytes() == b"Subject: short\r\n\r\nhi\r\n"
        assert self.spool.load(new_id) == envelope_for(new_id, 22)
        assert self.files("free") == []

    def test_ids_and_queue_names_cannot_reach_outside_the_spool(self):
        self.assertRaises(ValueError, self.spool.content_path, "../../etc/passwd")
        self.assertRaises(ValueError, self.spool.load, "0006123456789AB00", queue="../tmp")
