"""A spool written by the file-based release moves into the queue store once, whole, whatever crash interrupts it."""

import errno
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.logger import LogLevel, capturedLogs, formatEvent

from epost.store.envelope import Envelope, Recipient
from epost.store import upgrade
from epost.store.database import QueueStore, StoreError
from epost.store.upgrade import import_file_spool
from fakes import put_one

LARGE = b"X" * (300 * 1024) + b"\r\nend\r\n"  # over the 256 KiB kept inline
ZERO = {"incoming": 0, "deferred": 0, "hold": 0}


def envelope(queue_id: str, **changes) -> Envelope:
    route = {"kind": "relay", "hosts": ["mx.example.jp:25"]}
    fields = dict(sender="bob@example.org", recipients=(Recipient("alice@example.jp", route),), arrival=1.0, size=10)
    return Envelope(queue_id, **{**fields, **changes})


def write_old(root: Path, state: str, env: Envelope | None, content: bytes | None, queue_id: str = "") -> None:
    """The files today's release leaves: `<state>/<ID>.env` and `<state>/<ID>.msg`."""
    folder = root / state
    folder.mkdir(parents=True, exist_ok=True)
    queue_id = queue_id or env.queue_id
    if env is not None:
        (folder / f"{queue_id}.env").write_bytes(env.to_bytes())
    if content is not None:
        (folder / f"{queue_id}.msg").write_bytes(content)


def stored_content(store: QueueStore, queue_id: str) -> bytes:
    content = store.content(queue_id)
    return content if isinstance(content, bytes) else content.read_bytes()


def old_files(root: Path) -> list[str]:
    return sorted(f"{state}/{name}" for state in ("incoming", "deferred", "hold", "free") if (root / state).is_dir() for name in os.listdir(root / state))


def run(root: Path, store) -> tuple[dict[str, int], list[tuple[LogLevel, str]]]:
    with capturedLogs() as events:
        counts = import_file_spool(root, store)
    return counts, [(e["log_level"], formatEvent(e)) for e in events]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture
def store(root: Path):
    store = QueueStore(root)
    store.open()
    yield store
    store.close()


def test_every_message_moves_into_the_store_with_its_state_envelope_and_exact_content(root, store):
    retries = {"example.jp": {"first_failure": 100.0, "failures": 3, "next_attempt": 900.0}}
    deferred = envelope("00000000000000002", retries=retries).with_recipient(0, attempts=3, last_reply="451 4.7.1 later")
    messages = {
        "incoming": [(envelope("00000000000000001"), b"Subject: small\r\n\r\nbody\r\n"), (envelope("00000000000000004"), LARGE)],
        "deferred": [(deferred, b"Subject: again\r\n\r\n\x00\xff binary\r\n")],
        "hold": [(envelope("00000000000000003", sender=""), b"")],
    }
    for state, pairs in messages.items():
        for env, content in pairs:
            write_old(root, state, env, content)
    (root / "free").mkdir()
    for n in range(3):
        (root / "free" / f"pool{n}").write_bytes(b"an old message's bytes")

    counts, logged = run(root, store)

    assert counts == {"incoming": 2, "deferred": 1, "hold": 1}
    for state, pairs in messages.items():
        for env, content in pairs:
            assert store.state_of(env.queue_id) == state
            assert store.load(env.queue_id, state) == env
            assert stored_content(store, env.queue_id) == content
    assert isinstance(store.content("00000000000000004"), Path)  # the large one is a file of its own
    assert old_files(root) == []
    assert not any((root / folder).exists() for folder in ("incoming", "deferred", "hold", "free"))  # gone once empty
    assert not (root / "tmp").exists() or os.listdir(root / "tmp") == []
    assert logged == [(LogLevel.info, "imported 4 messages from the file spool (incoming 2, deferred 1, hold 1)")]


def test_a_second_run_imports_nothing_and_logs_nothing(root, store):
    write_old(root, "deferred", envelope("00000000000000001"), b"hello\r\n")
    run(root, store)

    assert run(root, store) == (ZERO, [])
    assert store.ids("deferred") == ["00000000000000001"]


def test_nothing_to_import_touches_no_store():
    """A spool with no old folders, or empty ones: a few listdir calls and no query."""
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        assert import_file_spool(root, store=object()) == ZERO
        for state in ("incoming", "deferred", "hold", "free"):
            (root / state).mkdir()
        assert import_file_spool(root, store=object()) == ZERO


def test_crash_debris_is_resolved_as_the_file_spool_recovered_it(root, store):
    # A content with no envelope anywhere: debris of an interrupted commit or removal.
    write_old(root, "incoming", None, b"debris", queue_id="00000000000000001")
    # A move stopped after its content went over: the envelope left behind belongs to it.
    moved = envelope("00000000000000002", retries={"example.jp": {"failures": 1}})
    write_old(root, "incoming", moved, None)
    write_old(root, "deferred", None, b"moved\r\n", queue_id=moved.queue_id)
    # A move stopped after writing the new envelope only: the message is still where its content is.
    stays = envelope("00000000000000003")
    write_old(root, "deferred", stays, b"stays\r\n")
    write_old(root, "hold", envelope(stays.queue_id, sender="newer@example.org"), None)
    # An envelope whose content is nowhere: the operator's to look at.
    write_old(root, "hold", envelope("00000000000000005"), None)

    counts, logged = run(root, store)

    assert counts == {"incoming": 0, "deferred": 2, "hold": 0}
    assert store.state_of("00000000000000001") is None
    assert store.load(moved.queue_id, "deferred") == moved
    assert stored_content(store, moved.queue_id) == b"moved\r\n"
    assert store.load(stays.queue_id, "deferred") == stays
    assert stored_content(store, stays.queue_id) == b"stays\r\n"
    assert old_files(root) == ["hold/00000000000000005.env"]
    assert [folder for folder in ("incoming", "deferred", "hold") if (root / folder).exists()] == ["hold"]  # kept while not empty
    assert (LogLevel.error, f"{root}/hold/00000000000000005.env has no content; left for the operator") in logged


def test_an_unreadable_envelope_or_content_stays_in_place_and_the_import_goes_on(root, store):
    write_old(root, "incoming", None, b"kept\r\n", queue_id="00000000000000001")
    (root / "incoming" / "00000000000000001.env").write_bytes(b'{"version": 1, "queue_id": ')
    write_old(root, "deferred", envelope("0000000000000000A"), b"kept too\r\n", queue_id="00000000000000002")
    write_old(root, "hold", envelope("00000000000000003"), b"fine\r\n")
    write_old(root, "hold", envelope("00000000000000004"), None)
    (root / "hold" / "00000000000000004.msg").mkdir()  # a content that cannot be read, even by root

    counts, logged = run(root, store)

    assert counts == {"incoming": 0, "deferred": 0, "hold": 1}
    assert store.state_of("00000000000000001") is None and store.state_of("0000000000000000A") is None
    assert old_files(root) == [
        "deferred/00000000000000002.env", "deferred/00000000000000002.msg",
        "hold/00000000000000004.env", "hold/00000000000000004.msg",
        "incoming/00000000000000001.env", "incoming/00000000000000001.msg",
    ]
    errors = [text for level, text in logged if level == LogLevel.error]
    assert len(errors) == 3
    assert errors[2].startswith(f"{root}/hold/00000000000000004.env: not imported, left in place: ")
    assert errors[0].startswith(f"{root}/incoming/00000000000000001.env: not imported, left in place: ")
    assert "corrupt envelope" in errors[0]
    assert errors[1].startswith(f"{root}/deferred/00000000000000002.env: not imported, left in place: ")
    assert "0000000000000000A" in errors[1]
    assert (LogLevel.info, "imported 1 messages from the file spool (incoming 0, deferred 0, hold 1)") in logged


def test_a_run_stopped_after_the_commit_imports_nothing_twice_and_removes_the_files(root, store):
    small, large, half_removed = envelope("00000000000000001"), envelope("00000000000000002"), envelope("00000000000000003")
    write_old(root, "deferred", small, b"small\r\n")
    write_old(root, "incoming", large, LARGE)
    write_old(root, "hold", None, b"its .env went, its .msg not yet", queue_id=half_removed.queue_id)
    write_old(root, "deferred", envelope("00000000000000004"), None)  # a power cut undid the removal of its .env only
    (root / "tmp").mkdir()
    (root / "tmp" / "large copy").write_bytes(LARGE)
    for env, content, state in ((small, b"small\r\n", "deferred"), (large, root / "tmp" / "large copy", "incoming"), (half_removed, b"whole", "hold")):
        assert put_one(store, env, content, state)  # what the interrupted run committed
    assert put_one(store, envelope("00000000000000004"), b"four", "deferred")

    assert run(root, store) == (ZERO, [])
    assert old_files(root) == []
    assert store.counts() == {"incoming": 1, "deferred": 2, "hold": 1}
    assert stored_content(store, "00000000000000002") == LARGE
    assert stored_content(store, "00000000000000003") == b"whole"


class CrashBeforeCommit:
    """A store that dies inside put_batch after moving the large contents it was given, before its transaction."""

    def __init__(self, store: QueueStore, root: Path) -> None:
        self.store, self.root = store, root

    def state_of(self, queue_id):
        return self.store.state_of(queue_id)

    def put_batch(self, items, state="incoming"):
        for env, content in items:
            if isinstance(content, Path):
                os.rename(content, self.root / "queue" / "large" / env.queue_id)
        raise KeyboardInterrupt("kill -9")


def test_a_crash_before_the_commit_loses_nothing(root, store):
    write_old(root, "incoming", envelope("00000000000000001"), LARGE)
    write_old(root, "incoming", envelope("00000000000000002"), b"small\r\n")

    with pytest.raises(KeyboardInterrupt):
        import_file_spool(root, CrashBeforeCommit(store, root))
    store.sweep()  # start-up after the crash
    counts, _ = run(root, store)

    assert counts == {"incoming": 2, "deferred": 0, "hold": 0}
    assert stored_content(store, "00000000000000001") == LARGE
    assert stored_content(store, "00000000000000002") == b"small\r\n"
    assert old_files(root) == []


class FullAfterFirst:
    """A store whose disk fills up after the first message of a batch; counts its transactions."""

    def __init__(self, store: QueueStore, fail: bool = True) -> None:
        self.store, self.fail, self.batches = store, fail, []

    def state_of(self, queue_id):
        return self.store.state_of(queue_id)

    def put_batch(self, items, state="incoming"):
        self.batches.append(len(items))
        if not self.fail:
            return self.store.put_batch(items, state=state)
        return self.store.put_batch(items[:1], state=state) + [StoreError(errno.ENOSPC, "disk full")] * (len(items) - 1)


def test_a_store_error_stops_the_import_and_keeps_the_files_of_what_was_not_committed(root, store):
    write_old(root, "incoming", envelope("00000000000000001"), b"one\r\n")
    write_old(root, "incoming", envelope("00000000000000002"), b"two\r\n")

    with pytest.raises(StoreError) as raised:
        import_file_spool(root, FullAfterFirst(store))

    assert raised.value.errno == errno.ENOSPC
    assert store.ids("incoming") == ["00000000000000001"]
    assert old_files(root) == ["incoming/00000000000000002.env", "incoming/00000000000000002.msg"]
    assert run(root, store)[0] == {"incoming": 1, "deferred": 0, "hold": 0}


def test_messages_are_committed_in_transactions_of_500(root, store):
    for n in range(1001):
        write_old(root, "deferred", envelope(f"{n + 1:017X}"), b"m\r\n")
    counting = FullAfterFirst(store, fail=False)

    assert import_file_spool(root, counting) == {"incoming": 0, "deferred": 1001, "hold": 0}
    assert counting.batches == [500, 500, 1]
    assert len(store.ids("deferred")) == 1001


def test_a_transaction_also_ends_at_batch_bytes_of_inline_content(root, store, monkeypatch):
    """BATCH_BYTES bounds the inline content held in memory per transaction; a large content (a file) does not count."""
    monkeypatch.setattr(upgrade, "BATCH_BYTES", 1000)
    for n in range(11):
        content = LARGE if n == 2 else b"m" * 298 + b"\r\n"  # 300 bytes inline
        write_old(root, "deferred", envelope(f"{n + 1:017X}"), content)
    counting = FullAfterFirst(store, fail=False)

    assert import_file_spool(root, counting) == {"incoming": 0, "deferred": 11, "hold": 0}
    assert counting.batches == [5, 4, 2]  # 300+300+(file)+300+300 >= 1000, then 4 x 300, then the rest
    assert len(store.ids("deferred")) == 11
    assert stored_content(store, f"{3:017X}") == LARGE


queue_ids = st.integers(1, 2**68 - 1).map(lambda n: f"{n:017X}")
old_messages = st.dictionaries(queue_ids, st.tuples(st.sampled_from(["incoming", "deferred", "hold"]), st.binary(max_size=300) | st.just(LARGE), st.text(max_size=20)), max_size=20)


@settings(max_examples=40)
@given(old_messages)
def test_any_set_of_messages_over_the_three_states_round_trips(messages):
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        for queue_id, (state, content, sender) in messages.items():
            write_old(root, state, envelope(queue_id, sender=sender, size=len(content)), content)
        store = QueueStore(root)
        store.open()
        try:
            counts = import_file_spool(root, store)
            assert counts == {s: sum(1 for state, _, _ in messages.values() if state == s) for s in ZERO}
            for queue_id, (state, content, sender) in messages.items():
                assert store.load(queue_id, state) == envelope(queue_id, sender=sender, size=len(content))
                assert stored_content(store, queue_id) == content
            assert old_files(root) == []
        finally:
            store.close()


def test_the_removal_of_each_batch_s_old_files_is_made_durable_by_a_folder_fsync(root, store, monkeypatch):
    """Else a power cut could bring back the files of messages imported (and since delivered): imported again."""
    for n in range(3):
        write_old(root, "hold" if n else "incoming", envelope(f"{n + 1:017X}"), b"m\r\n")
    synced = []
    monkeypatch.setattr(upgrade, "fsync_dir", lambda folder: synced.append(Path(folder)))
    import_file_spool(root, store)
    assert set(synced) == {root / "incoming", root / "hold"}


def test_an_old_folder_that_cannot_be_removed_is_logged_and_the_start_goes_on(root, store, monkeypatch):
    write_old(root, "deferred", envelope("00000000000000001"), b"hello\r\n")
    real_rmdir = os.rmdir

    def refuse(path):
        if Path(path).name == "deferred":
            raise PermissionError(errno.EACCES, "Permission denied")
        real_rmdir(path)

    monkeypatch.setattr(os, "rmdir", refuse)
    counts, logged = run(root, store)

    assert counts == {"incoming": 0, "deferred": 1, "hold": 0}
    assert (root / "deferred").is_dir() and old_files(root) == []
    assert (LogLevel.warn, f"{root}/deferred: old spool folder not removed: Permission denied") in logged
