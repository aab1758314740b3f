"""The spool lock (epost.store.lock): one daemon per spool, and nothing stale can block it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from epost.store.lock import SpoolBusy, SpoolLock, lock_path, try_lock

HOLD = "import sys, time; sys.stdout.write('held\\n'); sys.stdout.flush(); time.sleep(60)"


def test_a_second_taker_is_refused_with_the_holders_pid(tmp_path):
    first = SpoolLock.acquire(tmp_path / "spool", create_spool=True)
    with pytest.raises(SpoolBusy) as refused:
        SpoolLock.acquire(tmp_path / "spool")
    assert refused.value.holder == os.getpid()
    assert str(refused.value) == (
        f"{tmp_path}/spool/lock: locked by process {os.getpid()}: another epost daemon (or an `epost` command) is using this spool"
    )
    assert try_lock(tmp_path / "spool") is None
    first.release()
    try_lock(tmp_path / "spool").release()


def test_a_pid_left_in_the_file_does_not_block_when_nobody_holds_the_lock(tmp_path):
    """A dead daemon's PID, a zombie's or one reused by another process (here ours, and 1) is only text."""
    for pid in (os.getpid(), 1):
        lock_path(tmp_path).write_text(f"{pid}\n")
        lock = SpoolLock.acquire(tmp_path)
        assert lock_path(tmp_path).read_text() == f"{os.getpid()}\n"
        lock.release()


def test_the_lock_survives_the_taker_handing_it_to_a_child_and_exiting(tmp_path):
    """twistd's daemonizing fork: the lock is the open file's, so the parent closing
    its descriptor (or exiting) leaves it with the child, and the child's death frees it."""
    lock = SpoolLock.acquire(tmp_path)
    child = subprocess.Popen([sys.executable, "-c", HOLD], pass_fds=[lock.fd], stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline() == b"held\n"
        lock.release()
        assert try_lock(tmp_path) is None
    finally:
        child.kill()
        child.wait()
    try_lock(tmp_path).release()


def test_a_killed_holder_frees_the_lock(tmp_path):
    take = f"from epost.store.lock import SpoolLock; SpoolLock.acquire({str(tmp_path)!r}); {HOLD}"
    child = subprocess.Popen([sys.executable, "-c", take], stdout=subprocess.PIPE)
    assert child.stdout.readline() == b"held\n"
    with pytest.raises(SpoolBusy) as refused:
        SpoolLock.acquire(tmp_path)
    assert refused.value.holder == child.pid
    child.kill()
    child.wait()
    SpoolLock.acquire(tmp_path).release()
