"""The queue store keeps every committed message, refuses a database it cannot trust, and says disk full as 452."""

import dataclasses
import errno
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.logger import LogLevel, capturedLogs, formatEvent

import epost.store.database as database
from epost.store.envelope import Envelope, EnvelopeError
from epost.store.database import QUEUES, Change, QueueStore, SpoolError, StoreError, StoreUnavailable
from fakes import put_one, qid, record_write_levels
from fakes import relay_envelope as envelope_for


@pytest.fixture
def store(tmp_path):
    store = QueueStore(tmp_path)
    store.open()
    yield store
    store.close()


def large_file(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


def run_python(script: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args], capture_output=True, check=True, timeout=60, **kwargs
    )


# -- opening -----------------------------------------------------------------


def test_open_creates_folders_and_a_wal_database(tmp_path, store):
    assert (tmp_path / "queue" / "large").is_dir()
    conn = sqlite3.connect(tmp_path / "queue" / "queue.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA page_size").fetchone()[0] == 16384
    assert conn.execute("PRAGMA user_version").fetchone()[0] == database.SCHEMA_VERSION
    conn.close()
    assert store._conn().execute("PRAGMA temp_store").fetchone()[0] == 2  # statement journals in memory


def test_a_reopened_store_keeps_its_messages(tmp_path, store):
    store.put_batch([(envelope_for(qid(1)), b"body")])
    store.close()
    again = QueueStore(tmp_path)
    again.open(create=False)
    assert again.load(qid(1), "incoming") == envelope_for(qid(1))
    again.close()


def test_methods_before_open_say_so(tmp_path):
    with pytest.raises(RuntimeError, match="open"):
        QueueStore(tmp_path).ids("incoming")


def assert_refused(root: Path, *, create: bool = True) -> str:
    with pytest.raises(StoreUnavailable) as caught:
        QueueStore(root).open(create=create)
    message = str(caught.value)
    assert "\n" not in message
    assert str(root / "queue" / "queue.db") in message
    return message


def test_a_file_that_is_not_a_database_is_refused(tmp_path):
    (tmp_path / "queue").mkdir()
    (tmp_path / "queue" / "queue.db").write_bytes(b"From: not a database\r\n" * 500)
    assert "not an SQLite database" in assert_refused(tmp_path)


@pytest.mark.parametrize("statement, why", [
    ("PRAGMA user_version = 7", "newer epost (queue version 7"),  # from a newer epost
    ("CREATE TABLE other (x)", "not an epost queue"),  # a foreign database is never adopted
])
def test_a_database_epost_did_not_write_is_refused(tmp_path, statement, why):
    (tmp_path / "queue").mkdir()
    conn = sqlite3.connect(tmp_path / "queue" / "queue.db")
    conn.execute(statement)
    conn.close()
    assert why in assert_refused(tmp_path)


def test_a_database_that_cannot_be_opened_is_refused(tmp_path):
    (tmp_path / "queue" / "queue.db").mkdir(parents=True)
    assert "cannot open" in assert_refused(tmp_path)


def test_without_create_a_missing_database_is_refused_not_made(tmp_path):
    assert "no queue database" in assert_refused(tmp_path, create=False)
    assert not (tmp_path / "queue").exists()


def test_an_existing_database_in_another_journal_mode_is_switched_to_wal(tmp_path, store):
    """A restored copy in DELETE mode: NORMAL bookkeeping is only power-cut safe in WAL (docs/queue.md)."""
    store.put_batch([(envelope_for(qid(1)), b"kept")])
    store.close()
    conn = sqlite3.connect(tmp_path / "queue" / "queue.db")
    assert conn.execute("PRAGMA journal_mode = DELETE").fetchone()[0] == "delete"
    conn.close()
    for create in (True, False):
        again = QueueStore(tmp_path)
        again.open(create=create)
        assert again._conn().execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert again.content(qid(1)) == b"kept"
        again.close()
        conn = sqlite3.connect(tmp_path / "queue" / "queue.db")
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # stored in the file, not per connection
        conn.execute("PRAGMA journal_mode = DELETE")
        conn.close()


def owner(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_uid, st.st_gid


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give files away")
def test_opened_by_root_the_store_belongs_to_the_owner_of_the_spool(tmp_path):
    """twistd makes the store as root, then becomes its -u user: that user must be able to write it."""
    os.chown(tmp_path, 65534, 65534)
    store = QueueStore(tmp_path)
    store.open()
    queue = tmp_path / "queue"
    parts = [queue, queue / "large", queue / "queue.db", queue / "queue.db-wal", queue / "queue.db-shm"]
    assert {path.name: owner(path) for path in parts} == {path.name: (65534, 65534) for path in parts}
    put_one(store, envelope_for(qid(1)), large_file(tmp_path, "big", b"big"), "incoming")
    assert owner(queue / "large" / qid(1)) == (65534, 65534)  # an imported copy is root's until placed
    store.close()
    # An old store left root's by an earlier start is given back at the next.
    for path in parts[:3]:
        os.chown(path, 0, 0)
    store.open()
    assert {path.name: owner(path) for path in parts} == {path.name: (65534, 65534) for path in parts}
    store.close()


def test_drop_connections_closes_them_all_and_the_store_stays_usable(store):
    store.put_batch([(envelope_for(qid(1)), b"before")])
    seen = {"main": store._conn()}
    thread = threading.Thread(target=lambda: seen.update(thread=store._conn()))
    thread.start()
    thread.join()
    store.drop_connections()
    for conn in seen.values():
        with pytest.raises(sqlite3.ProgrammingError):
            conn.execute("SELECT 1")
    assert store._conn() is not seen["main"]  # a new one, on first use
    assert store.content(qid(1)) == b"before"
    store.put_batch([(envelope_for(qid(2)), b"after")])
    assert store.ids("incoming") == [qid(1), qid(2)]


# -- put ---------------------------------------------------------------------


def test_put_batch_round_trip(store):
    items = [(envelope_for(qid(n)), f"message {n}".encode()) for n in (3, 1, 2)]
    assert store.put_batch(items) == [None, None, None]
    for envelope, content in items:
        assert store.load(envelope.queue_id) == envelope
        assert store.load(envelope.queue_id, "incoming") == envelope
        assert store.content(envelope.queue_id) == content
        assert store.state_of(envelope.queue_id) == "incoming"
    assert store.ids("incoming") == [qid(1), qid(2), qid(3)]
    assert store.counts() == {"incoming": 3, "deferred": 0, "hold": 0}
    assert store.max_id() == qid(3)


def test_an_empty_store_has_no_max_id_and_zero_counts(store):
    assert store.max_id() is None
    assert store.counts() == dict.fromkeys(QUEUES, 0)
    assert store.state_of(qid(1)) is None


def test_put_batch_a_duplicate_fails_alone(store):
    store.put_batch([(envelope_for(qid(2)), b"first")])
    results = store.put_batch([(envelope_for(qid(1)), b"a"), (envelope_for(qid(2)), b"again"), (envelope_for(qid(3)), b"c")])
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], SpoolError) and results[1].errno == errno.EEXIST
    assert not results[1].disk_full
    assert store.content(qid(2)) == b"first"
    assert store.ids("incoming") == [qid(1), qid(2), qid(3)]


def test_an_item_failing_half_way_leaves_no_half_message(tmp_path, store):
    """The savepoint undoes the item's message row when its content row fails."""
    conn = sqlite3.connect(tmp_path / "queue" / "queue.db")
    conn.execute("INSERT INTO content (id, data) VALUES (?, ?)", (qid(2), b"stray"))
    conn.commit()
    conn.close()
    results = store.put_batch([(envelope_for(qid(1)), b"a"), (envelope_for(qid(2)), b"b")])
    assert results[0] is None and results[1].errno == errno.EEXIST
    assert store.ids("incoming") == [qid(1)]


def test_put_into_another_state_and_false_for_a_queued_id(store):
    assert put_one(store, envelope_for(qid(1)), b"bounce", "deferred") is True
    assert put_one(store, envelope_for(qid(1)), b"again", "hold") is False
    assert store.state_of(qid(1)) == "deferred"
    assert store.content(qid(1)) == b"bounce"


def test_large_content_is_a_file_and_leaves_with_the_message(tmp_path, store):
    (tmp_path / "tmp").mkdir()
    data = os.urandom(300 * 1024)
    source = large_file(tmp_path / "tmp", f"{qid(1)}.msg", data)
    assert store.put_batch([(envelope_for(qid(1)), source)]) == [None]
    assert not source.exists()
    path = store.content(qid(1))
    assert path == tmp_path / "queue" / "large" / qid(1)
    assert path.read_bytes() == data
    store.remove(qid(1), "incoming")
    assert not path.exists()
    with pytest.raises(FileNotFoundError):
        store.content(qid(1))


def test_a_large_file_already_in_place_is_taken_as_is(tmp_path, store):
    """What an import re-run finds after a crash between the rename and the commit."""
    path = large_file(tmp_path / "queue" / "large", qid(1), b"big")
    assert put_one(store, envelope_for(qid(1)), path, "hold") is True
    assert store.content(qid(1)) == path and path.read_bytes() == b"big"


def test_a_duplicate_large_item_keeps_both_files(tmp_path, store):
    (tmp_path / "tmp").mkdir()
    store.put_batch([(envelope_for(qid(1)), large_file(tmp_path / "tmp", "a", b"queued"))])
    second = large_file(tmp_path / "tmp", "b", b"newcomer")
    [error] = store.put_batch([(envelope_for(qid(1)), second)])
    assert error.errno == errno.EEXIST
    assert store.content(qid(1)).read_bytes() == b"queued"
    assert second.read_bytes() == b"newcomer"  # the caller's to delete or keep


def test_an_id_twice_in_one_batch_keeps_the_first_content(tmp_path, store):
    (tmp_path / "tmp").mkdir()
    second = large_file(tmp_path / "tmp", "b", b"second")
    results = store.put_batch([(envelope_for(qid(1)), large_file(tmp_path / "tmp", "a", b"first")), (envelope_for(qid(1)), second)])
    assert results[0] is None and results[1].errno == errno.EEXIST
    assert store.content(qid(1)).read_bytes() == b"first"
    assert second.read_bytes() == b"second"


def test_debris_in_large_is_replaced_by_a_new_message(tmp_path, store):
    large_file(tmp_path / "queue" / "large", qid(1), b"debris of a crash")
    (tmp_path / "tmp").mkdir()
    assert store.put_batch([(envelope_for(qid(1)), large_file(tmp_path / "tmp", "m", b"mail"))]) == [None]
    assert store.content(qid(1)).read_bytes() == b"mail"


def test_a_writer_waits_for_the_write_lock_in_short_polls_and_gets_it(tmp_path, store):
    """SQLite's busy handler would sleep 1 ms and more; ours polls from 0.1 ms (the
    worker's commit meets the daemon's tiny bookkeeping writes all the time)."""
    blocker = sqlite3.connect(tmp_path / "queue" / "queue.db", isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")
    threading.Timer(0.02, blocker.rollback).start()
    polls = []
    real_sleep = database.time.sleep
    with mock.patch.object(database.time, "sleep", lambda s: (polls.append(s), real_sleep(s))):
        assert store.put_batch([(envelope_for(qid(1)), b"after the lock")]) == [None]
    blocker.close()
    assert polls and polls[0] == 0.0001 and max(polls) <= 0.005, polls
    assert store.content(qid(1)) == b"after the lock"


def test_a_failed_transaction_fails_every_item_and_returns_the_files(tmp_path, store, monkeypatch):
    (tmp_path / "tmp").mkdir()
    source = large_file(tmp_path / "tmp", "m", b"mail")
    blocker = sqlite3.connect(tmp_path / "queue" / "queue.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    monkeypatch.setattr(database, "BUSY_TIMEOUT", 0.05)
    try:
        results = store.put_batch([(envelope_for(qid(1)), b"small"), (envelope_for(qid(2)), source)])
    finally:
        blocker.rollback()
        blocker.close()
    assert all(isinstance(r, StoreError) and r.errno == errno.EIO for r in results)
    assert source.read_bytes() == b"mail"
    assert os.listdir(tmp_path / "queue" / "large") == []
    assert store.ids("incoming") == []


def test_a_full_database_is_disk_full(store):
    """SQLITE_FULL must reach SMTP as 452 4.3.1 (errno ENOSPC), never as 451 or a 5xx."""
    store.put_batch([(envelope_for(qid(1)), b"fits")])
    conn = store._conn()
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages + 2}")
    results = store.put_batch([(envelope_for(qid(2)), b"small"), (envelope_for(qid(3)), os.urandom(256 * 1024))])
    assert results[1] is not None and results[1].errno == errno.ENOSPC and results[1].disk_full
    assert store.ids("incoming") == [qid(1)] + [qid(2)] * (results[0] is None)
    with pytest.raises(StoreError) as caught:
        put_one(store, envelope_for(qid(4)), os.urandom(256 * 1024), "deferred")
    assert caught.value.disk_full


def test_store_error_maps_os_disk_full_and_the_rest():
    assert database.store_error(OSError(errno.EDQUOT, "quota"), "x").errno == errno.ENOSPC
    assert database.store_error(OSError(errno.EACCES, "no"), "x").errno == errno.EIO
    assert database.store_error(sqlite3.OperationalError("locked"), "x").errno == errno.EIO


def test_bad_ids_and_states_are_refused(store):
    for call in (
        lambda: store.load("../../etc/passwd"),
        lambda: store.remove("0" * 16, "incoming"),
        lambda: store.content("abcdefabcdefabcde"),
        lambda: store.put_batch([(envelope_for("x"), b"")]),
        lambda: store.ids("active"),
        lambda: store.move(envelope_for(qid(1)), "incoming", "trash"),
        lambda: store.load_many("nowhere"),
    ):
        with pytest.raises(ValueError):
            call()


# -- update, move, remove ------------------------------------------------------


def test_update_rewrites_the_envelope_and_keeps_the_content(store):
    store.put_batch([(envelope_for(qid(1)), b"content")])
    changed = envelope_for(qid(1)).with_recipient(0, state="delivered", attempts=1)
    store.update(changed, "incoming", durable=False)
    assert store.load(qid(1), "incoming") == changed
    assert store.content(qid(1)) == b"content"
    with pytest.raises(FileNotFoundError, match=f"{qid(1)}: not in deferred"):
        store.update(changed, "deferred")
    with pytest.raises(FileNotFoundError):
        store.update(envelope_for(qid(2)), "incoming")


def test_move_changes_state_and_envelope_together(store):
    store.put_batch([(envelope_for(qid(1)), b"content")])
    later = envelope_for(qid(1), attempts=1)
    store.move(later, "incoming", "deferred")
    assert store.state_of(qid(1)) == "deferred"
    assert store.load(qid(1), "deferred") == later
    with pytest.raises(FileNotFoundError, match="not in incoming"):
        store.load(qid(1), "incoming")
    with pytest.raises(FileNotFoundError, match="not in incoming"):
        store.move(later, "incoming", "hold")
    assert store.ids("deferred") == [qid(1)] and store.ids("incoming") == []


def test_remove_takes_the_message_and_its_content(store):
    store.put_batch([(envelope_for(qid(1)), b"content")])
    with pytest.raises(FileNotFoundError, match="not in hold"):
        store.remove(qid(1), "hold")
    store.remove(qid(1), "incoming", durable=False)
    assert store.state_of(qid(1)) is None
    with pytest.raises(FileNotFoundError):
        store.content(qid(1))
    with pytest.raises(FileNotFoundError):
        store.remove(qid(1), "incoming")


def test_remove_of_a_large_message_whose_file_is_gone(tmp_path, store):
    path = large_file(tmp_path / "queue" / "large", qid(1), b"big")
    put_one(store, envelope_for(qid(1)), path, "incoming")
    path.unlink()
    store.remove(qid(1), "incoming")
    assert store.state_of(qid(1)) is None


def durables(levels) -> list[bool]:
    """The `durable` of each recorded write transaction (fakes.record_write_levels)."""
    return [durable for durable, _ in levels]


def test_a_bookkeeping_removal_of_a_large_message_is_flushed_anyway(tmp_path, store, monkeypatch):
    """After a NORMAL delete a power cut could bring the row back without its unlinked file:
    a delivered message retried and bounced. So it is FULL, decided before anything is written."""
    large = tmp_path / "queue" / "large"
    put_one(store, envelope_for(qid(1)), large_file(large, qid(1), b"big"), "incoming")
    put_one(store, envelope_for(qid(2)), b"inline", "incoming")
    levels = record_write_levels(store, monkeypatch)
    store.remove(qid(1), "incoming", durable=False)
    assert durables(levels) == [False, True]  # the NORMAL transaction found the file and wrote nothing
    assert store._conn().execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert store.state_of(qid(1)) is None and not (large / qid(1)).exists()
    store.remove(qid(2), "incoming", durable=False)
    assert durables(levels) == [False, True, False]  # inline content: NORMAL, as delivery bookkeeping is
    assert store._conn().execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert store.ids("incoming") == []


def test_removing_a_large_message_from_the_wrong_state_changes_nothing(tmp_path, store):
    path = large_file(tmp_path / "queue" / "large", qid(1), b"big")
    put_one(store, envelope_for(qid(1)), path, "incoming")
    with pytest.raises(FileNotFoundError, match="not in deferred"):
        store.remove(qid(1), "deferred", durable=False)
    assert store.content(qid(1)) == path and path.read_bytes() == b"big"


def test_apply_records_many_messages_in_one_transaction_and_a_missing_one_fails_alone(store, monkeypatch):
    store.put_batch([(envelope_for(qid(n)), f"content {n}".encode()) for n in (1, 2, 3)])
    levels = record_write_levels(store, monkeypatch)
    later = envelope_for(qid(2), attempts=1)
    results = store.apply([
        Change(qid(1), "incoming"),  # removed
        Change(qid(2), "incoming", later, "deferred"),  # moved
        Change(qid(9), "incoming"),  # not queued
        Change(qid(3), "deferred", envelope_for(qid(3), attempts=5)),  # in the wrong state
    ], durable=False)
    assert durables(levels) == [False]  # one NORMAL transaction for all four
    assert results[:2] == [None, None]
    assert isinstance(results[2], FileNotFoundError) and "not in incoming" in str(results[2])
    assert isinstance(results[3], FileNotFoundError) and "not in deferred" in str(results[3])
    assert store.state_of(qid(1)) is None
    assert store.load(qid(2), "deferred") == later and store.content(qid(2)) == b"content 2"
    assert store.load(qid(3), "incoming") == envelope_for(qid(3))  # untouched


def test_apply_leaves_a_large_removal_to_a_full_transaction_of_its_own(tmp_path, store, monkeypatch):
    large = tmp_path / "queue" / "large"
    put_one(store, envelope_for(qid(1)), large_file(large, qid(1), b"big"), "incoming")
    put_one(store, envelope_for(qid(2)), b"inline", "incoming")
    levels = record_write_levels(store, monkeypatch)
    assert store.apply([Change(qid(1), "incoming"), Change(qid(2), "incoming")], durable=False) == [None, None]
    assert durables(levels) == [False, True]
    assert store.ids("incoming") == [] and not (large / qid(1)).exists()


def test_a_bad_change_fails_alone_in_a_batch_and_raises_alone(store):
    store.put_batch([(envelope_for(qid(1)), b"x")])
    results = store.apply([Change("not-an-id", "incoming"), Change(qid(2), "nowhere"), Change(qid(1), "incoming")])
    assert [r.errno if r else None for r in results] == [errno.EINVAL, errno.EINVAL, None]
    assert store.state_of(qid(1)) is None
    with pytest.raises(ValueError):
        store.remove("not-an-id", "incoming")


def test_a_large_file_that_cannot_be_unlinked_after_the_commit_is_left_to_the_sweep(tmp_path, store, monkeypatch):
    large = tmp_path / "queue" / "large"
    put_one(store, envelope_for(qid(1)), large_file(large, qid(1), b"big"), "incoming")

    def refused(path):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(database, "unlink_if_present", refused)
    with capturedLogs() as events:
        assert store.apply([Change(qid(1), "incoming")], durable=False) == [None]
    assert store.state_of(qid(1)) is None and (large / qid(1)).exists()
    assert any("not its file" in formatEvent(e) for e in events)
    monkeypatch.undo()
    store.sweep()
    assert not (large / qid(1)).exists()


def test_a_store_error_fails_every_change_of_the_batch(store, monkeypatch):
    store.put_batch([(envelope_for(qid(n)), b"x") for n in (1, 2)])

    def broken(durable):
        error = sqlite3.OperationalError("database or disk is full")
        error.sqlite_errorcode = database.SQLITE_FULL
        raise error

    monkeypatch.setattr(store, "_write", broken)
    results = store.apply([Change(qid(1), "incoming"), Change(qid(2), "incoming")], durable=False)
    assert all(isinstance(r, StoreError) and r.disk_full for r in results), results
    monkeypatch.undo()
    assert store.ids("incoming") == [qid(1), qid(2)]


def test_sweep_logs_each_message_whose_large_file_is_missing_once(tmp_path, store):
    large = tmp_path / "queue" / "large"
    for n in (1, 2):
        put_one(store, envelope_for(qid(n)), large_file(large, qid(n), b"big"), "incoming")
    (large / qid(2)).unlink()
    with capturedLogs() as events:
        store.sweep()
    errors = [formatEvent(e) for e in events if e["log_level"] == LogLevel.error]
    assert errors == [f"{large / qid(2)}: missing: queued message {qid(2)} has lost its content"]
    assert store.ids("incoming") == [qid(1), qid(2)]  # the row stays, for the operator
    (large / qid(1)).unlink()
    shutil.rmtree(large)
    with capturedLogs() as events:
        store.sweep()  # large/ gone too: each still said
    assert len([e for e in events if e["log_level"] == LogLevel.error]) == 2


# -- listing -------------------------------------------------------------------


def test_load_many_pages_through_every_envelope_in_id_order(store, monkeypatch):
    monkeypatch.setattr(database, "PAGE", 3)
    store.put_batch([(envelope_for(qid(n)), b"") for n in range(10, 0, -1)])
    store.move(envelope_for(qid(5)), "incoming", "hold")
    assert [e.queue_id for e in store.load_many("incoming")] == [qid(n) for n in range(1, 11) if n != 5]
    assert [e.queue_id for e in store.load_many("hold")] == [qid(5)]
    assert list(store.load_many("deferred")) == []


def test_load_many_after_an_id_starts_past_it(store, monkeypatch):
    """A restart's load that failed on a page resumes past the last envelope it scheduled."""
    monkeypatch.setattr(database, "PAGE", 3)
    store.put_batch([(envelope_for(qid(n)), b"") for n in range(1, 11)])
    assert [e.queue_id for e in store.load_many("incoming", after=qid(4))] == [qid(n) for n in range(5, 11)]


def test_a_corrupt_envelope_is_skipped_by_load_many_and_refused_by_load(tmp_path, store):
    store.put_batch([(envelope_for(qid(n)), b"") for n in (1, 2, 3)])
    conn = sqlite3.connect(tmp_path / "queue" / "queue.db")
    conn.execute("UPDATE message SET envelope = ? WHERE id = ?", (b"{not json", qid(2)))
    conn.commit()
    conn.close()
    assert [e.queue_id for e in store.load_many("incoming")] == [qid(1), qid(3)]
    with pytest.raises(EnvelopeError, match=f"queue.db:{qid(2)}: corrupt envelope"):
        store.load(qid(2))


def test_an_envelope_json_cannot_say_fails_alone(store):
    odd = dataclasses.replace(envelope_for(qid(2)), retries={"example.jp": {"at": object()}})
    results = store.put_batch([(envelope_for(qid(1)), b""), (odd, b"")])
    assert results[0] is None and results[1].errno == errno.EIO
    assert store.ids("incoming") == [qid(1)]


def test_sweep_removes_only_unreferenced_large_files(tmp_path, store):
    large = tmp_path / "queue" / "large"
    put_one(store, envelope_for(qid(1)), large_file(large, qid(1), b"queued"), "incoming")
    put_one(store, envelope_for(qid(2)), b"inline", "incoming")
    large_file(large, qid(2), b"debris")
    large_file(large, qid(3), b"debris")
    large_file(large, "junk.tmp", b"debris")
    store.sweep()
    assert os.listdir(large) == [qid(1)]


# -- connections, processes, crashes ---------------------------------------------


def test_threads_each_get_a_connection_and_see_each_others_commits(store):
    seen = {}

    def writer():
        store.put_batch([(envelope_for(qid(1)), b"from a thread")])
        seen["writer"] = store._conn()

    def reader():
        seen["envelope"] = store.load(qid(1))
        seen["reader"] = store._conn()

    for target in (writer, reader):
        thread = threading.Thread(target=target)
        thread.start()
        thread.join()
    assert seen["envelope"] == envelope_for(qid(1))
    assert seen["writer"] is not seen["reader"]
    store.close()  # closes the threads' connections too
    with pytest.raises(sqlite3.ProgrammingError):
        seen["writer"].execute("SELECT 1")


def test_normal_writes_are_visible_to_another_connection(tmp_path, store):
    other = QueueStore(tmp_path)
    other.open()
    put_one(store, envelope_for(qid(1)), b"", "incoming")
    assert other.state_of(qid(1)) == "incoming"
    store.move(envelope_for(qid(1), attempts=2), "incoming", "deferred", durable=False)
    assert other.load(qid(1), "deferred") == envelope_for(qid(1), attempts=2)
    store.remove(qid(1), "deferred", durable=False)
    assert other.state_of(qid(1)) is None
    other.close()


def test_another_process_sees_committed_messages_and_we_see_its(tmp_path, store):
    store.put_batch([(envelope_for(qid(1)), b"from the parent")])
    script = """
        import sys
        from pathlib import Path
        from epost.store.database import QueueStore
        from epost.store.envelope import Envelope, Recipient
        store = QueueStore(Path(sys.argv[1]))
        store.open(create=False)
        print(store.content(sys.argv[2]).decode())
        store.put_batch([(Envelope(sys.argv[3], "x@example.org", (Recipient("y@example.jp"),), 2.0, 1), b"child")], "hold")
    """
    done = run_python(script, str(tmp_path), qid(1), qid(2))
    assert done.stdout == b"from the parent\n"
    assert store.state_of(qid(2)) == "hold"
    assert store.content(qid(2)) == b"child"


KILLED_WRITER = """
    import sys
    from pathlib import Path
    from epost.store.database import QueueStore
    from epost.store.envelope import Envelope, Recipient
    root = Path(sys.argv[1])
    (root / "tmp").mkdir(exist_ok=True)
    store = QueueStore(root)
    store.open()
    n = 0
    while True:
        items = []
        for _ in range(4):
            n += 1
            queue_id = f"{n:017X}"
            envelope = Envelope(queue_id, "x@example.org", (Recipient("y@example.jp"),), 1.0, n)
            if n % 4 == 0:
                content = root / "tmp" / f"{queue_id}.msg"
                content.write_bytes(queue_id.encode() * 1000)
            else:
                content = queue_id.encode()
            items.append((envelope, content))
        results = store.put_batch(items)
        assert results == [None] * 4, results
        sys.stdout.write(" ".join(e.queue_id for e, _ in items) + "\\n")
        sys.stdout.flush()
"""


def test_kill_9_in_a_put_batch_loop_loses_no_acknowledged_message(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(KILLED_WRITER), str(tmp_path)], stdout=subprocess.PIPE)
    try:
        lines = [child.stdout.readline() for _ in range(150)]
    finally:
        child.send_signal(signal.SIGKILL)
        lines.append(child.stdout.read())
        child.wait()
    acknowledged = [queue_id for line in b"".join(lines).splitlines(keepends=True) if line.endswith(b"\n") for queue_id in line.split()]
    assert len(acknowledged) >= 600
    store = QueueStore(tmp_path)
    store.open(create=False)
    for queue_id in map(bytes.decode, acknowledged):
        assert store.load(queue_id, "incoming").queue_id == queue_id
        content = store.content(queue_id)
        if isinstance(content, Path):
            content = content.read_bytes()
        assert content == queue_id.encode() * (1000 if int(queue_id, 16) % 4 == 0 else 1)
    store.sweep()  # the batch cut short leaves at most sweepable debris
    assert set(os.listdir(tmp_path / "queue" / "large")) <= set(store.ids("incoming"))
    store.close()


# -- the store agrees with a model ---------------------------------------------------

IDS = [qid(n) for n in range(1, 6)]
operations = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.sampled_from(IDS), st.sampled_from(QUEUES), st.booleans()),
        st.tuples(st.just("move"), st.sampled_from(IDS), st.sampled_from(QUEUES), st.sampled_from(QUEUES)),
        st.tuples(st.just("update"), st.sampled_from(IDS), st.sampled_from(QUEUES), st.integers(0, 9)),
        st.tuples(st.just("remove"), st.sampled_from(IDS), st.sampled_from(QUEUES), st.booleans()),
    ),
    max_size=30,
)


@settings(max_examples=60)
@given(operations)
def test_any_operation_sequence_agrees_with_a_dict_model(ops):
    model: dict[str, tuple[str, Envelope, bytes]] = {}
    with tempfile.TemporaryDirectory() as root:
        store = QueueStore(Path(root))
        store.open()
        try:
            for step, (op, queue_id, state, arg) in enumerate(ops):
                here = model.get(queue_id)
                present = here is not None and here[0] == state
                if op == "put":
                    content = f"{queue_id} {step}".encode()
                    if arg:  # large
                        content_path = Path(root) / f"{step}.tmp"
                        content_path.write_bytes(content)
                    assert put_one(store, envelope_for(queue_id), content_path if arg else content, state) is (here is None)
                    if here is None:
                        model[queue_id] = (state, envelope_for(queue_id), content)
                    continue
                if op == "move":
                    envelope = envelope_for(queue_id, attempts=step)
                    call = lambda: store.move(envelope, state, arg)  # noqa: E731
                    after = (arg, envelope, here[2]) if present else None
                elif op == "update":
                    envelope = envelope_for(queue_id, attempts=arg)
                    call = lambda: store.update(envelope, state)  # noqa: E731
                    after = (state, envelope, here[2]) if present else None
                else:
                    call = lambda: store.remove(queue_id, state, durable=arg)  # noqa: E731
                    after = None
                if present:
                    call()
                    if after is None:
                        del model[queue_id]
                    else:
                        model[queue_id] = after
                else:
                    with pytest.raises(FileNotFoundError):
                        call()
            for queue_id in IDS:
                if queue_id in model:
                    state, envelope, content = model[queue_id]
                    assert store.state_of(queue_id) == state
                    assert store.load(queue_id, state) == envelope
                    stored = store.content(queue_id)
                    assert (stored.read_bytes() if isinstance(stored, Path) else stored) == content
                else:
                    assert store.state_of(queue_id) is None
            for state in QUEUES:
                assert store.ids(state) == sorted(q for q, v in model.items() if v[0] == state)
                assert [e.queue_id for e in store.load_many(state)] == store.ids(state)
            assert store.counts() == {s: sum(v[0] == s for v in model.values()) for s in QUEUES}
            assert sorted(os.listdir(Path(root) / "queue" / "large")) == sorted(
                q for q in model if isinstance(store.content(q), Path)
            )
        finally:
            store.close()


def test_envelopes_are_stored_whole(store):
    rich = dataclasses.replace(
        envelope_for(qid(1)), retries={"example.jp": {"first": 1.5}}, dkim="DKIM-Signature: v=1\r\n", trusted=True, auth="bob"
    )
    put_one(store, rich, b"", "hold")
    assert store.load(qid(1), "hold") == rich


def test_a_lost_database_beside_large_contents_is_refused_not_made_anew(tmp_path):
    """Making a new one would sweep large/ and run on an empty queue."""
    first = QueueStore(tmp_path)
    first.open()
    big = tmp_path / "big"
    big.write_bytes(b"x" * 1000)
    assert first.put_batch([(envelope_for(qid(1)), big)]) == [None]
    first.close()
    for name in ("queue.db", "queue.db-wal", "queue.db-shm"):
        (tmp_path / "queue" / name).unlink(missing_ok=True)
    with pytest.raises(StoreUnavailable, match=r"queue\.db: missing or empty, but 1 message content\(s\) in .*large remain"):
        QueueStore(tmp_path).open()
    assert (tmp_path / "queue" / "large" / qid(1)).exists()
    assert not (tmp_path / "queue" / "queue.db").exists() or (tmp_path / "queue" / "queue.db").stat().st_size == 0


def test_a_command_reading_an_empty_database_leaves_the_wal_beside_it(tmp_path):
    """`epost queue` (open(create=False)) on an emptied queue.db must not let SQLite
    delete the WAL's committed mail before refusing: the daemon's next start would
    then find nothing to refuse and begin on an empty queue."""
    store = QueueStore(tmp_path)
    store.open()
    store._conn().execute("PRAGMA wal_autocheckpoint = 0")  # the message stays in the WAL
    assert put_one(store, envelope_for(qid(1)), b"committed, not checkpointed\r\n", "incoming")
    queue = tmp_path / "queue"
    wal = (queue / "queue.db-wal").read_bytes()
    store.close()
    (queue / "queue.db").write_bytes(b"")
    (queue / "queue.db-shm").unlink(missing_ok=True)
    (queue / "queue.db-wal").write_bytes(wal)

    with pytest.raises(StoreUnavailable, match="empty, no queue created in it yet"):
        QueueStore(tmp_path).open(create=False)

    assert (queue / "queue.db-wal").read_bytes() == wal
    with pytest.raises(StoreUnavailable, match="missing or empty, but a non-empty queue.db-wal remain"):
        QueueStore(tmp_path).open()  # so the daemon still refuses to start


@pytest.mark.parametrize("empty_db", [False, True], ids=["missing", "empty"])
def test_a_lost_database_beside_a_non_empty_wal_is_refused_not_made_anew(tmp_path, empty_db):
    """The WAL may hold committed messages not yet checkpointed: a new database would drop them."""
    first = QueueStore(tmp_path)
    first.open()
    first.close()
    queue = tmp_path / "queue"
    (queue / "queue.db").unlink()
    (queue / "queue.db-shm").unlink(missing_ok=True)
    if empty_db:
        (queue / "queue.db").write_bytes(b"")
    (queue / "queue.db-wal").write_bytes(b"w" * 4096)
    before = sorted(os.listdir(queue))
    with pytest.raises(StoreUnavailable) as refused:
        QueueStore(tmp_path).open()
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"{queue / 'queue.db'}: missing or empty, but a non-empty queue.db-wal remain")
    assert sorted(os.listdir(queue)) == before  # nothing created, nothing swept
    assert (queue / "queue.db-wal").read_bytes() == b"w" * 4096
    assert not (queue / "queue.db").exists() if not empty_db else (queue / "queue.db").stat().st_size == 0
