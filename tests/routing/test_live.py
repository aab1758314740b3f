"""Live tables: edits apply once the file has stopped changing, within 2 s; bad or emptied files never do."""

from __future__ import annotations

import os

from fakes import ClockReactor, HeldThreadPool, SynchronousThreadPool
from twisted.logger import globalLogPublisher

from epost.routing import live
from epost.routing.gateway import load_gateway_table
from epost.routing.live import LiveTable, TableWatcher
from epost.routing.users import load_users
from epost.address import Address

ALICE, BOB, CAROL = Address("alice", "example.test"), Address("bob", "example.test"), Address("carol", "example.test")


def watcher_for(path, loader=load_gateway_table, refuse_empty=False):
    table = LiveTable(path, loader, refuse_empty=refuse_empty)
    clock = ClockReactor()
    watcher = TableWatcher([table], clock, SynchronousThreadPool(), handle_sighup=False)
    watcher.startService()
    return table, clock, watcher


def write(path, text, bump: int):
    path.write_text(text)
    os.utime(path, ns=(bump * 10**9, bump * 10**9))  # a distinct mtime even within one clock tick


def polls(clock, count: int):
    for _ in range(count):
        clock.advance(live.POLL_INTERVAL)


class Logged:
    def __enter__(self):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        return self

    def __exit__(self, *exc):
        globalLogPublisher.removeObserver(self.events.append)

    def problems(self):
        return [str(e["problem"]) for e in self.events if "problem" in e]


def test_an_edit_is_in_force_after_settling_and_within_two_seconds(tmp_path):
    path = tmp_path / "gateway.dat"
    write(path, "*,first.example,25\n", 1)
    table, clock, watcher = watcher_for(path)
    assert table().lookup("x.test").gateway == "first.example"
    write(path, "*,second.example,25\n", 2)
    polls(clock, 2)  # 1.0 s: seen twice, but not yet still for a second
    assert table().lookup("x.test").gateway == "first.example"
    polls(clock, 1)  # 1.5 s
    assert table().lookup("x.test").gateway == "second.example"
    assert table.reloads == 1
    assert live.SETTLE_TIME + live.POLL_INTERVAL <= 1.5  # SPEC §3.3: 2 s, leaving 0.5 s for the parse
    watcher.stopService()


def test_a_file_written_in_pieces_is_loaded_only_whole(tmp_path):
    path = tmp_path / "users"
    write(path, "alice@example.test\nbob@example.test\n", 1)
    table, clock, watcher = watcher_for(path, load_users)
    text = "alice@example.test\nbob@example.test\ncarol@example.test\n"
    for n, end in enumerate(range(4, len(text) + 1, 4)):  # a piece every half second: never still for 1 s
        write(path, text[:end], 2 + n)
        polls(clock, 1)
        assert table.reloads == 0, f"loaded {text[:end]!r}"
        assert ALICE in table() and BOB in table()
    write(path, text, 100)  # the last piece
    polls(clock, 3)
    assert table.reloads == 1 and CAROL in table() and len(table()) == 3
    watcher.stopService()


def test_a_file_that_changes_while_it_is_read_is_thrown_away_and_read_again(tmp_path):
    path = tmp_path / "users"
    write(path, "alice@example.test\n", 1)
    writes, armed = [], []

    def slow_reader(p):
        table = load_users(p)
        if armed and not writes:  # the writer appends while we read
            writes.append(1)
            write(path, "alice@example.test\nbob@example.test\ncarol@example.test\n", 3)
        return table

    table, clock, watcher = watcher_for(path, slow_reader)
    armed.append(1)
    write(path, "alice@example.test\nbob@example.test\n", 2)
    with Logged() as logged:
        polls(clock, 3)
    assert writes and table.reloads == 0 and len(table()) == 1  # the torn read was not used
    assert any("changed while being read" in str(e.get("log_format", "")) for e in logged.events)
    polls(clock, 3)
    assert table.reloads == 1 and len(table()) == 3
    watcher.stopService()


def test_a_bad_line_keeps_the_previous_table_and_logs_file_and_line(tmp_path):
    path = tmp_path / "gateway.dat"
    write(path, "*,first.example,25\n", 1)
    table, clock, watcher = watcher_for(path)
    with Logged() as logged:
        write(path, "# ok\n*,second.example,99999\n", 2)
        polls(clock, 3)
    assert table().lookup("x.test").gateway == "first.example"
    assert table.failures == 1
    assert any(f"{path}:2:" in text for text in logged.problems()), logged.problems()
    note = table.disk_note()
    assert note.startswith(f"note: {path} on disk differs from the table in use (loaded ")
    assert f"the file on disk is refused: {path}:2: bad port" in note
    write(path, "*,third.example,25\n", 3)  # fixing the file is picked up
    polls(clock, 3)
    assert table().lookup("x.test").gateway == "third.example"
    assert table.disk_note() is None
    watcher.stopService()


def test_an_emptied_users_file_is_refused_until_sighup(tmp_path):
    path = tmp_path / "users"
    write(path, "alice@example.test\nbob@example.test\n", 1)
    table, clock, watcher = watcher_for(path, load_users, refuse_empty=True)
    with Logged() as logged:
        write(path, "# all gone\n\n", 2)  # comments only counts as empty
        polls(clock, 4)
    assert ALICE in table() and table.failures == 1 and table.reloads == 0
    assert any("no entries, while the table in force has 2" in p and "SIGHUP" in p for p in logged.problems()), logged.problems()
    assert "no entries" in table.disk_note()
    polls(clock, 4)
    assert table.failures == 1  # said once, not at every poll
    watcher.reload_all()  # the operator means it
    assert len(table()) == 0 and table.reloads == 1 and table.disk_note() is None
    watcher.stopService()


def test_a_deleted_users_file_is_refused_like_an_empty_one(tmp_path):
    path = tmp_path / "users"
    write(path, "alice@example.test\n", 1)
    table, clock, watcher = watcher_for(path, load_users, refuse_empty=True)
    path.unlink()
    polls(clock, 4)
    assert ALICE in table() and table.failures == 1


def test_an_emptied_table_applies_when_empty_tables_are_allowed(tmp_path):
    path = tmp_path / "users"
    write(path, "alice@example.test\n", 1)
    table, clock, watcher = watcher_for(path, load_users, refuse_empty=False)
    write(path, "", 2)
    polls(clock, 3)
    assert len(table()) == 0 and table.reloads == 1


def test_a_table_may_shrink_to_one_entry_and_grow_from_none(tmp_path):
    path = tmp_path / "users"
    write(path, "", 1)
    table, clock, watcher = watcher_for(path, load_users, refuse_empty=True)
    write(path, "alice@example.test\nbob@example.test\n", 2)
    polls(clock, 3)
    write(path, "bob@example.test\n", 3)
    polls(clock, 3)
    assert table.reloads == 2 and list(map(table().__contains__, (ALICE, BOB))) == [False, True]


def test_reload_all_rereads_unchanged_files_too(tmp_path):
    path = tmp_path / "gateway.dat"
    write(path, "*,first.example,25\n", 1)
    table, clock, watcher = watcher_for(path)
    watcher.reload_all()
    assert table.reloads == 1
    watcher.stopService()


def test_a_reload_gives_freed_memory_back(tmp_path, monkeypatch):
    released = []
    monkeypatch.setattr(live, "release_memory", lambda: released.append(1))
    path = tmp_path / "users"
    write(path, "alice@example.test\n", 1)
    table, clock, watcher = watcher_for(path, load_users)
    write(path, "bob@example.test\n", 2)
    polls(clock, 3)
    assert table.reloads == 1 and released == [1]


def test_release_memory_runs_here():
    live.release_memory()  # glibc: malloc_trim; elsewhere nothing, and no error


def test_sighup_during_a_read_reads_the_file_again_and_applies_it(tmp_path):
    path = tmp_path / "users"
    write(path, "alice@example.test\n", 1)
    table = LiveTable(path, load_users, refuse_empty=True)
    clock, pool = ClockReactor(), HeldThreadPool()
    watcher = TableWatcher([table], clock, pool, handle_sighup=False)
    watcher.startService()
    write(path, "bob@example.test\n", 2)
    polls(clock, 3)  # the read starts, and is held
    assert len(pool.calls) == 1
    write(path, "", 3)  # emptied meanwhile, then SIGHUP: the operator means it
    watcher.reload_all()
    pool.run_all()  # the held read saw the file change under it; the forced one applies the empty file
    assert len(table()) == 0 and table.failures == 0
    watcher.stopService()


def test_at_start_up_a_file_changing_during_the_read_is_read_again(tmp_path):
    path = tmp_path / "users"
    write(path, "alice@example.test\n", 1)
    reads = []

    def reader(p):
        reads.append(1)
        if len(reads) == 1:
            write(path, "alice@example.test\nbob@example.test\n", 2)
        return load_users(p)

    table = LiveTable(path, reader)
    assert len(reads) == 2 and len(table()) == 2 and table.stamp == live.file_stamp(path)
