"""`epost hold|release|delete|flush|reroute` touch the queue store only when no daemon holds the spool's lock."""

from __future__ import annotations

import socket

from epost.admin.cli import main
from epost.store.lock import SpoolLock, lock_path
from test_surgery_offline import NOW, SLOW, deferred, queue_message, where


def run(capsys, *argv):
    status = main(list(argv), now=NOW)
    out, err = capsys.readouterr()
    return status, out.splitlines(), err.splitlines()


def test_with_the_lock_held_and_no_socket_nothing_is_touched(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spool = tmp_path / "spool"
    queue_message(spool, "deferred", deferred(SLOW, "x@slow.test"))
    daemon = SpoolLock.acquire(spool)  # a daemon starting, stopping or stuck: it holds the lock, no socket answers
    try:
        for action in ("hold", "delete", "flush", "reroute"):
            status, out, err = run(capsys, action, SLOW, "--spool", "spool")
            assert (status, out, len(err)) == (1, [], 1), err
            assert err[0].startswith(f"epost {action}: {lock_path(spool)} is held (a daemon, or another epost command)")
            assert err[0].endswith("nothing changed, try again in a moment")
    finally:
        daemon.release()
    assert where(spool)["deferred"] == [SLOW]


def test_with_the_lock_held_a_stale_socket_is_not_taken_for_a_dead_daemon(tmp_path, capsys, monkeypatch):
    """The attack report's case: a daemon running without its socket, a dead daemon's socket left behind."""
    monkeypatch.chdir(tmp_path)
    spool = tmp_path / "spool"
    queue_message(spool, "hold", deferred(SLOW, "x@slow.test"))
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(spool / "control.sock"))  # bound, never listening: connection refused
    stale.close()
    daemon = SpoolLock.acquire(spool)
    try:
        status, out, err = run(capsys, "release", SLOW, "--spool", "spool")
    finally:
        daemon.release()
    assert (status, out) == (1, []) and len(err) == 1 and "Connection refused" in err[0] and "nothing changed" in err[0]
    assert where(spool)["hold"] == [SLOW]


def test_with_no_daemon_the_queue_is_changed_under_the_lock_and_it_is_said(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spool = tmp_path / "spool"
    queue_message(spool, "deferred", deferred(SLOW, "x@slow.test"))
    status, out, err = run(capsys, "hold", SLOW, "--spool", "spool")
    assert (status, out, err) == (0, [f"{SLOW}: on hold"], [f"epost hold: no daemon is running on {spool}: working on the queue store"])
    assert where(spool)["hold"] == [SLOW]
    SpoolLock.acquire(spool).release()  # released afterwards
