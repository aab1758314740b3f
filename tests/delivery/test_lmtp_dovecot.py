"""LMTPClient against the real Dovecot LMTP (issue 17): per-recipient replies after DATA,
a Sieve rule filing into a folder, an over-quota user (552 5.2.2), an unknown one, Dovecot down.

Dovecot runs from `epost dovecot-conf --lmtp tcp:...` output (plus a quota rule) on a loopback
port; needs root and Debian's dovecot-lmtpd/dovecot-sieve (scripts/test.sh installs them).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial import unittest

from epost.delivery.lmtp import deliver_lmtp, lmtp_endpoint

DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"
EPOST = str(Path(sys.executable).parent / "epost")
HASH = "{ARGON2ID}$argon2id$v=19$m=64,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA"  # logins are not tested here
SIEVE = b'require ["fileinto", "mailbox"];\nif header :contains "subject" "invoice" { fileinto :create "Invoices"; }\n'
QUOTA = "\nplugin {\n  quota = maildir:User quota\n  quota_rule = *:storage=20K\n}\n"

pytestmark = [
    pytest.mark.skipif(not os.path.exists(DOVECOT), reason="dovecot not installed (scripts/test.sh installs it)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="Dovecot needs root to drop to the Maildirs' owner"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def message(subject: str, size: int = 0) -> tuple:
    """A small message as deliver_lmtp takes content: its chunks and its size."""
    data = f"From: <x@example.org>\r\nSubject: {subject}\r\n\r\nhello\r\n{'x' * size}\r\n".encode()
    return lambda: [data], len(data)


class LMTPToDovecotTests(unittest.TestCase):
    def setUp(self):
        self.folder = Path(tempfile.mkdtemp(prefix="epost-lmtp-"))
        self.addCleanup(shutil.rmtree, self.folder, True)
        os.chmod(self.folder, 0o711)
        nobody = pwd.getpwnam("nobody")
        mailboxes = self.folder / "spool" / "mailboxes"
        mailboxes.mkdir(parents=True)
        os.chmod(mailboxes.parent, 0o711)
        os.chown(mailboxes, nobody.pw_uid, nobody.pw_gid)
        alice = mailboxes / "example.test" / "alice"
        alice.mkdir(parents=True)
        (alice / ".dovecot.sieve").write_bytes(SIEVE)
        for path in (alice.parent, alice, alice / ".dovecot.sieve"):
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
        self.alice = alice
        (self.folder / "users").write_text(f"alice@example.test:{HASH}\ncarol@example.test:{HASH}\n")
        config = self.folder / "epost.toml"
        config.write_text(f'[server]\nhostname = "mx.example.test"\nspool = "{self.folder / "spool"}"\n'
                          f'[routing]\nusers = "{self.folder / "users"}"\n')
        self.port = free_port()
        result = subprocess.run([EPOST, "dovecot-conf", "--config", str(config), "--imap", "off", "--pop3", "off",
                                 "--lmtp", f"tcp:127.0.0.1:{self.port}", "--base-dir", str(self.folder / "run")],
                                capture_output=True, text=True)
        self.assertEqual(result.returncode, 0, result.stderr)
        text = result.stdout.replace("mail_plugins = $mail_plugins sieve", "mail_plugins = $mail_plugins sieve quota")
        self.log = self.folder / "dovecot.log"
        (self.folder / "dovecot.conf").write_text(text + QUOTA + f"log_path = {self.log}\n")
        self.proc = subprocess.Popen([DOVECOT, "-F", "-c", str(self.folder / "dovecot.conf")],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.addCleanup(self._stop)
        deadline = time.monotonic() + 15
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.fail(f"dovecot did not start: {self.log.read_text() if self.log.exists() else ''}")
            time.sleep(0.05)

    def _stop(self):
        self.proc.terminate()
        self.proc.wait(10)

    def endpoint(self):
        return TCP4ClientEndpoint(reactor, "127.0.0.1", self.port)

    def folder_files(self, *parts: str) -> list[Path]:
        base = self.alice.joinpath(*parts)
        return [p for sub in ("new", "cur") if (base / sub).is_dir() for p in (base / sub).iterdir()]

    @defer.inlineCallbacks
    def test_each_recipient_gets_its_own_reply_after_data_and_sieve_files_into_a_folder(self):
        result = yield deliver_lmtp(reactor, self.endpoint(), "mx.example.test", "x@example.org",
                                    ["alice@example.test", "dave@example.test", "carol@example.test"],
                                    *message("invoice 42"))
        outcomes = result.recipients
        self.assertEqual((outcomes["alice@example.test"].code, outcomes["alice@example.test"].stage), (250, "data"))
        self.assertEqual((outcomes["carol@example.test"].code, outcomes["carol@example.test"].stage), (250, "data"))
        self.assertEqual(outcomes["dave@example.test"].code, 550)  # unknown: refused at RCPT
        self.assertEqual(len(self.folder_files(".Invoices")), 1)  # Sieve ran
        self.assertEqual(self.folder_files(), [])
        carol = self.alice.parent / "carol"
        self.assertEqual(len([p for sub in ("new", "cur") for p in (carol / sub).iterdir()]), 1)

    @defer.inlineCallbacks
    def test_over_quota_recipient_gets_552_while_the_other_is_delivered(self):
        yield deliver_lmtp(reactor, self.endpoint(), "mx.example.test", "x@example.org",
                           ["carol@example.test"], *message("filler", 15000))
        result = yield deliver_lmtp(reactor, self.endpoint(), "mx.example.test", "x@example.org",
                                    ["carol@example.test", "alice@example.test"], *message("big", 10000))
        carol, alice = result.recipients["carol@example.test"], result.recipients["alice@example.test"]
        self.assertEqual(alice.code, 250)
        self.assertEqual(carol.code // 100, 5, carol)
        self.assertIn("5.2.2", carol.text)

    @defer.inlineCallbacks
    def test_dovecot_down_is_no_answer_for_everyone_so_it_is_deferred(self):
        self._stop()
        self.proc.wait()
        result = yield deliver_lmtp(reactor, self.endpoint(), "mx.example.test", "x@example.org",
                                    ["alice@example.test"], *message("later"))
        self.assertIsNone(result.recipients["alice@example.test"].code)
        self.proc = subprocess.Popen(["true"])  # for the cleanup


def test_local_transport_strings():
    assert lmtp_endpoint(reactor, "lmtp:unix:/run/dovecot/lmtp") is not None
    with pytest.raises(ValueError):
        lmtp_endpoint(reactor, "smtp:tcp:localhost:25")
