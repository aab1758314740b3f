"""The queue store under a real daemon (issue 16): kill -9 of any of its processes
loses nothing acknowledged, and a full disk is a 452 4.3.1, never a 5xx nor a loss."""

from __future__ import annotations

import errno
import os
import signal
import smtplib
import subprocess
from pathlib import Path

import pytest

from e2e_support import maildir_messages, queued, wait_for
from test_daemon import ALICE, SENDER, Senders, message, message_ids


def children(pid: int) -> dict[int, str]:
    """{pid: command line} of the daemon's child processes (spool worker, courier)."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            found[int(child)] = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    return found


def spool_worker(pid: int) -> int | None:
    """The spool worker's pid; None while there is none (it is restarted a second after it ended)."""
    workers = [child for child, command in children(pid).items() if "epost.queue.worker" in command]
    assert len(workers) <= 1, workers
    return workers[0] if workers else None


def all_delivered(d, acked: list[str], timeout: float = 60) -> None:
    """Every acknowledged Message-ID in alice's Maildir, the queue empty."""
    wait_for(lambda: not queued(d.spool, "incoming") and not set(acked) - set(message_ids(d.spool)), timeout,
             message="every acknowledged message delivered")
    missing = set(acked) - set(message_ids(d.spool))
    assert not missing, f"{len(acked)} acknowledged, {len(missing)} lost: {sorted(missing)[:5]}"


def test_kill_9_of_the_daemon_and_its_children_at_once_loses_nothing_acknowledged(daemon):
    """The whole process tree dies in one moment (a power cut, as far as processes go)."""
    d = daemon()
    with Senders(d.relay_port) as senders:
        wait_for(lambda: len(senders.acked) >= 60, timeout=30, message="60 acknowledged messages")
        tree = [d.pid, *children(d.pid)]
        for pid in tree:
            os.kill(pid, signal.SIGKILL)
        d.proc.wait()
    acked = list(senders.acked)
    assert len(tree) >= 3, f"expected the daemon, its spool worker and courier: {tree}"
    d.start()
    all_delivered(d, acked)


def test_kill_9_of_the_spool_worker_alone_loses_nothing_and_it_comes_back(daemon):
    """Sessions whose commit was in flight get a 4xx (the client retries); no 250 is ever lost."""
    d = daemon()
    with Senders(d.relay_port) as senders:
        wait_for(lambda: len(senders.acked) >= 30, timeout=30, message="30 acknowledged messages")
        first = spool_worker(d.pid)
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: spool_worker(d.pid) not in (first, None), timeout=10, message="a new spool worker")
        before = len(senders.acked)
        wait_for(lambda: len(senders.acked) >= before + 30, timeout=30, message="30 more acknowledged messages")
    assert "spool worker ended" in d.log.read_text()
    all_delivered(d, list(senders.acked))


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MiB tmpfs mounted where the daemon's spool goes (tests run as root, as CI does)."""
    spool = tmp_path / "spool"
    spool.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m,mode=0755", "tmpfs", str(spool)], check=True)
    yield spool
    subprocess.run(["umount", "-l", str(spool)], check=False)


def fill(folder: Path) -> Path:
    """Write a file until the file system is full; returns it (delete it to free the space)."""
    filler = folder / "filler"
    with open(filler, "wb") as out:
        try:
            while True:
                out.write(b"x" * 65536)
                out.flush()
        except OSError as error:
            assert error.errno == errno.ENOSPC, error
    return filler


def test_a_full_disk_answers_452_4_3_1_and_after_space_is_freed_mail_flows_again(small_disk, daemon):
    d = daemon()
    assert d.spool == small_disk
    with smtplib.SMTP("127.0.0.1", d.relay_port, timeout=10) as smtp:
        smtp.sendmail(SENDER, [ALICE], message("before", message_id="<before@e2e.test>"))
    wait_for(lambda: "<before@e2e.test>" in message_ids(d.spool), message="the first message delivered")

    filler = fill(small_disk)
    body = ("y" * 70 + "\r\n") * 3000  # 216 KB: more than any free page the store may still hold
    with smtplib.SMTP("127.0.0.1", d.relay_port, timeout=10) as smtp:
        with pytest.raises(smtplib.SMTPDataError) as refused:
            smtp.sendmail(SENDER, [ALICE], message(body, message_id="<full@e2e.test>"))
    assert refused.value.smtp_code == 452, refused.value
    assert refused.value.smtp_error.startswith(b"4.3.1"), refused.value
    wait_for(lambda: "No space left on device" in d.log.read_text() or "disk is full" in d.log.read_text(),
             message="a log line naming the full disk")

    filler.unlink()
    with smtplib.SMTP("127.0.0.1", d.relay_port, timeout=10) as smtp:
        smtp.sendmail(SENDER, [ALICE], message(body, message_id="<after@e2e.test>"))
    wait_for(lambda: "<after@e2e.test>" in message_ids(d.spool), message="mail flows again")
    assert "<full@e2e.test>" not in message_ids(d.spool)  # refused with a 4xx: the client keeps it
    assert len(maildir_messages(d.spool, "example.test/alice")) == 2
