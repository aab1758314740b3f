"""End to end (issue 17): real Dovecot IMAP and POP3 on epost's Maildirs, one password for all three.

The daemon (`twistd -n epost`) delivers into `<spool>/mailboxes`; a private
Dovecot (`dovecot -F -c`, config from `epost dovecot-conf`) serves the same
Maildirs on loopback ports. Passwords come from `epost passwd` only.
Needs root (Dovecot drops to the Maildirs' owner, `nobody` here) and
Debian's dovecot-imapd/pop3d (scripts/test.sh installs them).
"""

from __future__ import annotations

import imaplib
import os
import poplib
import pwd
import shutil
import smtplib
import subprocess
import tempfile
from pathlib import Path

import pytest

from e2e_support import daemons, free_port, maildir_messages, port_answers, submit, wait_for
from test_submission_e2e import auth, epost, set_password, submission

DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"
ALICE = "alice@example.test"
SENDER = "x@example.org"

pytestmark = [
    pytest.mark.skipif(not os.path.exists(DOVECOT), reason="dovecot not installed (scripts/test.sh installs it)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="Dovecot needs root to drop to the Maildirs' owner"),
]


class Dovecot:
    def __init__(self, folder: Path, config_text: str, imap: int, pop3: int):
        self.folder, self.imap, self.pop3 = folder, imap, pop3
        self.config = folder / "dovecot.conf"
        self.log = folder / "dovecot.log"
        self.config.write_text(config_text + f"log_path = {self.log}\n")
        self.proc = subprocess.Popen([DOVECOT, "-F", "-c", str(self.config)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_for(lambda: port_answers(imap) and port_answers(pop3) or self.proc.poll() is not None, 15,
                 message="dovecot listening")
        assert self.proc.poll() is None, self.log.read_text()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def world(request):
    """(daemon, dovecot): both on one spool in a folder `nobody` can traverse (tmp_path is root-only)."""
    folder = Path(tempfile.mkdtemp(prefix="epost-dovecot-"))
    os.chmod(folder, 0o711)
    nobody = pwd.getpwnam("nobody")
    make = daemons(folder, request.node)
    started = []
    try:
        d = next(make)(server="allow_plaintext_auth = true", start=False)
        (d.spool / "mailboxes").mkdir(parents=True)
        os.chmod(d.spool, 0o711)
        os.chown(d.spool / "mailboxes", nobody.pw_uid, nobody.pw_gid)
        d.start()
        set_password(d, ALICE, "first-pass")
        imap, pop3 = free_port(), free_port()
        result = epost("dovecot-conf", "--config", str(d.config), "--imap", f"127.0.0.1:{imap}",
                       "--pop3", f"127.0.0.1:{pop3}", "--base-dir", str(d.folder / "dovecot-run"))
        assert result.returncode == 0, result.stderr
        dovecot = Dovecot(d.folder, result.stdout, imap, pop3)
        started.append(dovecot)
        yield d, dovecot
    finally:
        for dovecot in started:
            dovecot.stop()
        next(make, None)  # stops the daemon
        shutil.rmtree(folder, ignore_errors=True)


def imap_login(dovecot: Dovecot, password: str) -> imaplib.IMAP4:
    client = imaplib.IMAP4("127.0.0.1", dovecot.imap, timeout=15)
    client.login(ALICE, password)
    return client


def pop3_count(dovecot: Dovecot, password: str) -> int:
    client = poplib.POP3("127.0.0.1", dovecot.pop3, timeout=15)
    try:
        client.user(ALICE)
        client.pass_(password)
        return client.stat()[0]
    finally:
        client.quit()


def deliver(d, subject: str, count: int) -> None:
    """Submit one message to alice and wait until her INBOX (new/ and cur/) holds `count` files."""
    submit(d.relay_port, SENDER, [ALICE], f"From: <{SENDER}>\r\nSubject: {subject}\r\n\r\nbody\r\n".encode())
    inbox = d.spool / "mailboxes" / "example.test" / "alice"
    wait_for(lambda: sum(len(os.listdir(inbox / sub)) for sub in ("new", "cur") if (inbox / sub).is_dir()) >= count,
             15, message=f"{subject} delivered")


def subjects(client: imaplib.IMAP4, folder: str) -> list[str]:
    typ, _ = client.select(folder)
    assert typ == "OK"
    typ, data = client.search(None, "ALL")
    found = []
    for number in data[0].split():
        typ, parts = client.fetch(number, "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        found.append(parts[0][1].decode().strip().removeprefix("Subject: "))
    return sorted(found)


def test_mail_delivered_by_epost_is_read_flagged_and_moved_over_imap_and_pop3(world):
    d, dovecot = world
    deliver(d, "first", 1)
    client = imap_login(dovecot, "first-pass")
    assert subjects(client, "INBOX") == ["first"]
    client.select("INBOX")
    typ, _ = client.store("1", "+FLAGS", "(\\Flagged)")
    assert typ == "OK"
    typ, _ = client._simple_command("MOVE", "1", "Sent")
    assert typ == "OK"
    assert subjects(client, "Sent") == ["first"]
    typ, data = client.fetch("1", "(FLAGS)")
    assert b"\\Flagged" in data[0]

    # epost keeps delivering beside Dovecot's index files, flags in names and subfolders.
    deliver(d, "second", 1)
    deliver(d, "third", 2)
    assert subjects(client, "INBOX") == ["second", "third"]
    client.logout()
    alice = d.spool / "mailboxes" / "example.test" / "alice"
    (moved,) = (alice / ".Sent" / "cur").iterdir()
    assert moved.name.endswith(":2,FS") or ":2,F" in moved.name, moved.name
    assert (alice / "dovecot.index.log").exists()
    assert all(p.stat().st_uid == pwd.getpwnam("nobody").pw_uid for p in alice.rglob("*")), "owner kept"
    assert pop3_count(dovecot, "first-pass") == 2


def test_epost_passwd_changes_the_password_for_smtp_imap_and_pop3_at_once(world):
    d, dovecot = world
    imap_login(dovecot, "first-pass").logout()
    set_password(d, ALICE, "second-pass")  # no restart of either daemon

    def imap_refuses_old() -> bool:
        try:
            imap_login(dovecot, "first-pass").logout()
            return False
        except imaplib.IMAP4.error:
            return True

    def pop3_refuses_old() -> bool:
        try:
            pop3_count(dovecot, "first-pass")
            return False
        except poplib.error_proto:
            return True

    def smtp_refuses_old() -> bool:
        with submission(d) as client:
            try:
                auth(client, "PLAIN", ALICE, "first-pass")
                return False
            except smtplib.SMTPAuthenticationError:
                return True

    # Each refusal costs Dovecot's auth_failure_delay (2 s); each is waited for on its own,
    # so a failure names the service that still took the old password.
    for service_name, refuses_old in (("IMAP", imap_refuses_old), ("POP3", pop3_refuses_old), ("SMTP", smtp_refuses_old)):
        wait_for(refuses_old, 45, interval=0.5, message=f"{service_name} to refuse the old password")
    imap_login(dovecot, "second-pass").logout()
    assert pop3_count(dovecot, "second-pass") == 0
    with submission(d) as client:
        assert auth(client, "PLAIN", ALICE, "second-pass")[0] == 235


def test_an_old_scrypt_hash_is_upgraded_at_the_next_smtp_login_and_then_imap_works(world):
    d, dovecot = world
    from epost.auth import hash_password_scrypt

    users = d.folder / "users"
    users.write_text(users.read_text().replace(
        users.read_text().split("\n")[0].partition(":")[2], hash_password_scrypt("old-pass")))
    wait_for(lambda: not _imap_works(dovecot, "first-pass"), 15, message="Dovecot re-read the users file")
    assert not _imap_works(dovecot, "old-pass")  # Dovecot cannot check scrypt
    # epost can (it picks the file up within 1.5 s), and then rewrites the hash as Argon2id.
    wait_for(lambda: _smtp_auth_works(d, "old-pass"), 15, message="SMTP AUTH with the scrypt hash")
    wait_for(lambda: "{ARGON2ID}" in users.read_text(), 15, message="hash upgraded")
    assert _imap_works(dovecot, "old-pass")
    assert pop3_count(dovecot, "old-pass") == 0


def _imap_works(dovecot: Dovecot, password: str) -> bool:
    try:
        imap_login(dovecot, password).logout()
        return True
    except imaplib.IMAP4.error:
        return False


def _smtp_auth_works(d, password: str) -> bool:
    with submission(d) as client:
        try:
            return auth(client, "PLAIN", ALICE, password)[0] == 235
        except smtplib.SMTPAuthenticationError:
            return False

def test_dovecot_conf_refuses_root_owned_maildirs(tmp_path):
    (tmp_path / "spool" / "mailboxes").mkdir(parents=True)
    config = tmp_path / "epost.toml"
    config.write_text(f'[server]\nhostname = "mx.example.test"\nspool = "{tmp_path / "spool"}"\n')
    result = epost("dovecot-conf", "--config", str(config))
    assert result.returncode == 1
    assert "owned by root" in result.stderr and "chown" in result.stderr
    assert result.stdout == ""



# --- LMTP as the local transport ------------------------------------------------

SIEVE = b'require ["fileinto", "mailbox"];\nif header :contains "subject" "invoice" { fileinto :create "Invoices"; }\n'


@pytest.fixture
def lmtp_world(request):
    """(daemon with local_transport = lmtp:tcp:..., a function starting Dovecot with LMTP on that port)."""
    folder = Path(tempfile.mkdtemp(prefix="epost-lmtp-e2e-"))
    os.chmod(folder, 0o711)
    nobody = pwd.getpwnam("nobody")
    lmtp = free_port()
    make = daemons(folder, request.node)
    started = []
    try:
        d = next(make)(toml=f'[delivery]\nlocal_transport = "lmtp:tcp:127.0.0.1:{lmtp}"\n', start=False)
        alice = d.spool / "mailboxes" / "example.test" / "alice"
        alice.mkdir(parents=True)
        (alice / ".dovecot.sieve").write_bytes(SIEVE)
        os.chmod(d.spool, 0o711)
        for path in (d.spool / "mailboxes", alice.parent, alice, alice / ".dovecot.sieve"):
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
        d.start()
        set_password(d, ALICE, "first-pass")
        imap = free_port()

        def start_dovecot(quota: str = "") -> Dovecot:
            result = epost("dovecot-conf", "--config", str(d.config), "--imap", f"127.0.0.1:{imap}", "--pop3", "off",
                           "--lmtp", f"tcp:127.0.0.1:{lmtp}", "--base-dir", str(d.folder / "dovecot-run"))
            assert result.returncode == 0, result.stderr
            text = result.stdout
            if quota:  # e.g. "20K" for everyone
                text = text.replace("mail_plugins = $mail_plugins sieve", "mail_plugins = $mail_plugins sieve quota")
                text += f"plugin {{\n  quota = maildir:User quota\n  quota_rule = *:storage={quota}\n}}\n"
            dovecot = Dovecot(d.folder, text, imap, lmtp)
            started.append(dovecot)
            return dovecot

        yield d, start_dovecot
    finally:
        for dovecot in started:
            dovecot.stop()
        next(make, None)
        shutil.rmtree(folder, ignore_errors=True)


def test_lmtp_transport_hands_mail_to_dovecot_where_sieve_files_it(lmtp_world):
    d, start_dovecot = lmtp_world
    dovecot = start_dovecot()
    submit(d.relay_port, SENDER, [ALICE], f"From: <{SENDER}>\r\nSubject: invoice 7\r\n\r\nbody\r\n".encode())
    submit(d.relay_port, SENDER, [ALICE], f"From: <{SENDER}>\r\nSubject: hello\r\n\r\nbody\r\n".encode())
    alice = d.spool / "mailboxes" / "example.test" / "alice"
    wait_for(lambda: (alice / ".Invoices").is_dir() and os.listdir(alice / ".Invoices" / "new"), 15,
             message="Sieve filed the invoice")
    client = imap_login(dovecot, "first-pass")
    wait_for(lambda: subjects(client, "INBOX") == ["hello"], 15, message="hello in INBOX")
    assert subjects(client, "Invoices") == ["invoice 7"]
    client.logout()


def test_lmtp_transport_with_dovecot_down_keeps_the_mail_queued(lmtp_world):
    d, start_dovecot = lmtp_world
    submit(d.relay_port, SENDER, [ALICE], f"From: <{SENDER}>\r\nSubject: later\r\n\r\nbody\r\n".encode())

    def deferred_in_queue() -> bool:
        result = epost("queue", "--json", "--config", str(d.config))
        messages = __import__("json").loads(result.stdout) if result.returncode == 0 else []
        return any(r["attempts"] >= 1 and "LMTP connection failed" in (r.get("last_reply") or "")
                   for m in messages for r in m["recipients"])

    wait_for(deferred_in_queue, 15, message="recipient deferred with the LMTP failure")
    assert maildir_messages(d.spool, "example.test/alice") == []


def test_lmtp_transport_bounces_mail_for_a_user_over_quota(lmtp_world):
    d, start_dovecot = lmtp_world
    start_dovecot(quota="20K")
    bob = "bob@example.test"
    big = f"From: <{bob}>\r\nSubject: too big\r\n\r\n".encode() + (b"x" * 70 + b"\r\n") * 450
    submit(d.relay_port, bob, [ALICE], big)
    inbox = d.spool / "mailboxes" / "example.test" / "bob"

    def bounce() -> bytes | None:
        files = [p for sub in ("new", "cur") if (inbox / sub).is_dir() for p in (inbox / sub).iterdir()]
        return files[0].read_bytes() if files else None

    wait_for(bounce, 20, message="bounce delivered to bob")
    assert b"5.2.2" in bounce()
    assert maildir_messages(d.spool, "example.test/alice") == []
