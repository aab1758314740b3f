"""Live tables: edits apply within the poll interval, bad files never do."""

from __future__ import annotations

import os

from fakes import ClockReactor, SynchronousThreadPool

from epost.routing.gateway import load_gateway_table
from epost.routing.live import LiveTable, TableWatcher


def watcher_for(path):
    table = LiveTable(path, load_gateway_table)
    clock = ClockReactor()
    watcher = TableWatcher([table], clock, SynchronousThreadPool(), interval=1.0, handle_sighup=False)
    watcher.startService()
    return table, clock, watcher


def write(path, text, bump: int):
    path.write_text(text)
    os.utime(path, ns=(bump * 10**9, bump * 10**9))  # a distinct mtime even within one clock tick


def test_an_edit_is_used_within_one_poll(tmp_path):
    path = tmp_path / "gateway.dat"
    write(path, "*,first.example,25\n", 1)
    table, clock, watcher = watcher_for(path)
    assert table().lookup("x.test").gateway == "first.example"
    write(path, "*,second.example,25\n", 2)
    clock.advance(1)
    assert table().lookup("x.test").gateway == "second.example"
    assert table.reloads == 1
    watcher.stopService()


def test_a_bad_line_keeps_the_previous_table_and_logs_file_and_line(tmp_path):
    path = tmp_path / "gateway.dat"
    write(path, "*,first.example,25\n", 1)
    table, clock, watcher = watcher_for(path)
    messages = []
    from twisted.logger import globalLogPublisher

    globalLogPublisher.addObserver(messages.append)
    try:
        write(path, "# ok\n*,second.example,99999\n", 2)
        clock.advance(1)
    finally:
        globalLogPublisher.removeObserver(messages.append)
    assert table().lookup("x.test").gateway == "first.example"
    assert table.failures == 1
    logged = [str(m.get("problem")) for m in messages if "problem" in m]
    assert any(f"{path}:2:" in text for text in logged), logged
    write(path, "*,third.example,25\n", 3)  # fixing the file is picked up
    clock.advance(1)
    assert table().lookup("x.test").gateway == "third.example"
    watcher.stopService()


def test_a_deleted_file_becomes_an_empty_table(tmp_path):
    path = tmp_path / "gateway.dat"
    write(path, "*,first.example,25\n", 1)
    table, clock, watcher = watcher_for(path)
    path.unlink()
    clock.advance(1)
    assert table().lookup("x.test") is None
    watcher.stopService()


def test_reload_all_rereads_unchanged_files_too(tmp_path):
    path = tmp_path / "gateway.dat"
    write(path, "*,first.example,25\n", 1)
    table, clock, watcher = watcher_for(path)
    watcher.reload_all()
    assert table.reloads == 1
    watcher.stopService()
