"""The queue store under a real daemon (issue 16): kill -9 of any of its processes
loses nothing acknowledged, and a full disk is a 452 4.3.1, never a 5xx nor a loss."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import smtplib
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import pytest

from e2e_support import REPO, TWISTD, children, free_port, maildir_messages, port_answers, queued, wait_for, write_config
from test_daemon import _RUN_TWISTD, ALICE, SENDER, Senders, message, message_ids

NOBODY = 65534  # nobody / nogroup


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
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        while True:  # unbuffered: no flush at close to meet the full disk again
            os.write(fd, b"x" * 65536)
    except OSError as error:
        assert error.errno == errno.ENOSPC, error
    finally:
        os.close(fd)
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
    full = lambda: [line for line in d.log.read_text().splitlines()
                    if "No space left on device" in line or "disk is full" in line]
    wait_for(full, message="a log line naming the full disk")
    assert any("spool/queue/queue.db" in line for line in full()), full()

    filler.unlink()
    with smtplib.SMTP("127.0.0.1", d.relay_port, timeout=10) as smtp:
        smtp.sendmail(SENDER, [ALICE], message(body, message_id="<after@e2e.test>"))
    wait_for(lambda: "<after@e2e.test>" in message_ids(d.spool), message="mail flows again")
    assert "<full@e2e.test>" not in message_ids(d.spool)  # refused with a 4xx: the client keeps it
    assert len(maildir_messages(d.spool, "example.test/alice")) == 2


# -- started as root, daemonized, then -u nobody -g nogroup ------------------------


def runs_as(uid: int, command: list[str], env: dict | None = None) -> bool:
    """Whether `command` runs once the user is `uid` (a python under /root, mode 0700, does not)."""
    def become() -> None:
        os.setgid(uid)
        os.setuid(uid)

    try:
        return subprocess.run(command, env=env, cwd="/", preexec_fn=become, capture_output=True).returncode == 0
    except PermissionError:  # the exec itself
        return False


def twistd_for(uid: int) -> tuple[list[str], dict]:
    """A twistd the daemon can still run after switching to `uid`, and its environment.

    It is this venv's when `uid` may run its python; else (a python under a
    0700 /root) the system's python of the same version with this venv's
    packages and the work tree on PYTHONPATH. Both must be readable by `uid`."""
    env = dict(os.environ)
    if runs_as(uid, [sys.executable, "-c", "import epost, twisted"]):
        return [TWISTD], env
    env["PYTHONPATH"] = f"{REPO}:{sysconfig.get_paths()['purelib']}"
    python = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    if not os.path.exists(python) or not runs_as(uid, [python, "-c", "import epost, twisted, cryptography"], env):
        pytest.skip(f"no python that uid {uid} can run with epost's packages ({sys.executable} is not readable)")
    return [python, "-c", _RUN_TWISTD], env


def running(pid: int) -> bool:
    """Alive and not a zombie (the daemonized process is not our child: init reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(os.geteuid() != 0, reason="starts the daemon as root, as init does")
def test_started_as_root_daemonized_with_u_nobody_the_store_is_nobodys_and_mail_is_delivered():
    """The documented start (twistd --pidfile --logfile -u -g, no -n): twistd runs
    make_service as root, then forks and switches user. The queue store it made
    must be writable by that user, and no SQLite connection may cross the fork."""
    folder = Path(tempfile.mkdtemp(dir="/tmp", prefix="epost-root-"))  # pytest's tmp_path is 0700 root's
    pid = None
    try:
        os.chmod(folder, 0o755)
        relay, submission = free_port(), free_port()
        config = write_config(folder, relay, submission)
        for path in (config, folder / "users"):
            path.chmod(0o644)
        spool = folder / "spool"
        spool.mkdir()
        os.chown(spool, NOBODY, NOBODY)  # as the operator does (docs/operating.md)
        command, env = twistd_for(NOBODY)
        pidfile, logfile = folder / "epost.pid", folder / "epost.log"
        started = subprocess.run(
            [*command, "--pidfile", str(pidfile), "--logfile", str(logfile), "-u", "nobody", "-g", "nogroup",
             "epost", "--config", str(config)],
            cwd=folder, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
        )
        assert started.returncode == 0, started.stdout + started.stderr + (logfile.read_text() if logfile.exists() else "")
        pid = int(pidfile.read_text())
        wait_for(lambda: port_answers(relay), timeout=20, message="the relay port")
        assert os.stat(f"/proc/{pid}").st_uid == NOBODY

        large = "".join(f"{i:08d} ".ljust(78, "x") + "\r\n" for i in range(4000))  # 320 KB: queue/large/
        with smtplib.SMTP("127.0.0.1", relay, timeout=20) as smtp:
            smtp.sendmail(SENDER, [ALICE], message("small", message_id="<small@e2e.test>"))
            smtp.sendmail(SENDER, [ALICE], message(large, message_id="<large@e2e.test>"))
        wait_for(lambda: len(maildir_messages(spool, "example.test/alice")) == 2, timeout=30,
                 message="both messages in alice's Maildir:\n" + logfile.read_text())
        wait_for(lambda: not any(queued(spool, state) for state in ("incoming", "deferred", "hold")), timeout=30,
                 message="the queue to empty")
        assert sorted(message_ids(spool)) == ["<large@e2e.test>", "<small@e2e.test>"]
        queue = spool / "queue"
        for path in (queue, queue / "large", queue / "queue.db", spool / "tmp", spool / "mailboxes"):
            assert (os.stat(path).st_uid, os.stat(path).st_gid) == (NOBODY, NOBODY), path
        log = logfile.read_text()
        assert "readonly database" not in log and "Traceback" not in log, log

        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while running(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not running(pid), "the daemon did not stop within 30 s of SIGTERM"
        pid = None
    finally:
        if pid is not None and running(pid):
            for child in [*children(pid), pid]:
                try:
                    os.kill(child, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        shutil.rmtree(folder, ignore_errors=True)
