"""End to end: submission with AUTH through the real `twistd -n epost` and real clients (SPEC §3.2, §3.4, §5, §8).

Accounts are made with the real `epost passwd ADDRESS --stdin`; clients are
Python's smtplib and swaks, on loopback. Relay mail stays queued (there is no
outbound delivery yet), so `epost queue --json` and the queue store's
incoming messages show what was accepted.
"""

from __future__ import annotations

import base64
import json
import re
import smtplib
import socket
import ssl
import subprocess
import time

import pytest

from e2e_support import QUEUED, VENV_BIN, free_port, port_answers, wait_for
from epost.store.spool import Spool

EPOST = str(VENV_BIN / "epost")
ALICE = "alice@example.test"
BOB = "bob@example.test"
REMOTE = "friend@far.example"
PASSWORD = "c0rrect horse: battery staple"  # a space and a colon: the users file must not split on them
WRONG = "not-the-password"
UNTRUSTED = 'relay_networks = ["192.0.2.0/24"]'  # 127.0.0.1 may not relay without AUTH


# --- helpers -----------------------------------------------------------------


def epost(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([EPOST, *args], input=stdin, capture_output=True, text=True, timeout=30)


def set_password(d, address: str, password: str) -> None:
    result = epost("passwd", address, "--stdin", "--config", str(d.config), stdin=password + "\n")
    assert result.returncode == 0, result
    assert password not in (d.folder / "users").read_text()  # a hash, never the password


def queue_json(d) -> list[dict]:
    result = epost("queue", "--json", "--config", str(d.config))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def unverified() -> ssl.SSLContext:
    """The daemon's certificate is self-signed: no verification."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def submission(d, port: int | None = None, tls: bool = True, source: str = "127.0.0.1") -> smtplib.SMTP:
    """A client on the submission port (or `port`), after EHLO (and STARTTLS + EHLO when `tls`)."""
    client = smtplib.SMTP("127.0.0.1", port or d.submission_port, timeout=15, source_address=(source, 0))
    client.ehlo("client.example.org")
    if tls:
        code, text = client.starttls(context=unverified())
        assert code == 220, text
        client.ehlo("client.example.org")
    return client


def auth(client: smtplib.SMTP, mechanism: str, user: str, password: str, initial: bool = True) -> tuple[int, bytes]:
    """smtplib's AUTH with one forced mechanism; (235, text) on success, SMTPAuthenticationError otherwise."""
    client.user, client.password = user, password
    method = {"PLAIN": client.auth_plain, "LOGIN": client.auth_login}[mechanism]
    return client.auth(mechanism, method, initial_response_ok=initial)


def message(sender: str, recipient: str, subject: str) -> bytes:
    return f"From: <{sender}>\r\nTo: <{recipient}>\r\nSubject: {subject}\r\n\r\nhello from {sender}\r\n".encode()


def send(client: smtplib.SMTP, sender: str, recipient: str, subject: str = "submission e2e") -> str:
    """MAIL, RCPT, DATA, each asserted 250; the queue ID from the DATA reply."""
    code, text = client.mail(sender)
    assert code == 250, (code, text)
    code, text = client.rcpt(recipient)
    assert code == 250, (code, text)
    code, text = client.data(message(sender, recipient, subject))
    assert code == 250, (code, text)
    match = QUEUED.search(text.decode())
    assert match, text
    return match.group(1)


def queued_relay(d, queue_id: str, recipient: str = REMOTE) -> dict:
    """The queued message `queue_id`; asserts its one recipient waits in incoming/ with a relay route."""
    (found,) = [m for m in queue_json(d) if m["id"] == queue_id]
    (r,) = found["recipients"]
    assert r["address"] == recipient
    assert r["state"] == "incoming"
    assert r["route"]["kind"] == "relay", r["route"]
    return found


def content(d, queue_id: str) -> bytes:
    """The stored message, from the queue store (relay mail is not delivered yet, so it stays in incoming)."""
    spool = Spool(d.spool, reactor=None, threadpool=None)
    spool.open(create=False)
    try:
        assert spool.state_of(queue_id) == "incoming"
        stored = spool.content(queue_id)
        return stored if isinstance(stored, bytes) else stored.read_bytes()
    finally:
        spool.close()


def received_header(data: bytes) -> str:
    """The first (our) Received: header, unfolded."""
    headers = data.split(b"\r\n\r\n", 1)[0].decode()
    match = re.match(r"Received:(.*?)\r\n(?![ \t])", headers, re.S)
    assert match, headers[:500]
    return re.sub(r"\r\n[ \t]+", " ", match.group(1))


def plain_b64(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def started_with_alice(daemon, **kwargs):
    """A daemon whose users file already holds alice's password when it starts."""
    d = daemon(start=False, **kwargs)
    set_password(d, ALICE, PASSWORD)
    return d.start()


def swaks(port: int, password: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{port}", "--tls", "--auth", "PLAIN",
         "--auth-user", ALICE, "--auth-password", password,
         "--from", ALICE, "--to", REMOTE, "--helo", "client.example.org",
         "--timeout", "20", *extra],
        capture_output=True, text=True, timeout=40,
    )


# --- 1. a password set while the daemon runs; PLAIN and LOGIN; remote mail queued -----------


def test_passwd_on_a_running_daemon_then_plain_and_login_submit_remote_mail(daemon):
    d = daemon()  # alice's users line has no hash yet: a mailbox that cannot log in

    with submission(d) as client:
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            auth(client, "PLAIN", ALICE, PASSWORD)
        assert refused.value.smtp_code == 535

    set_password(d, ALICE, PASSWORD)  # no restart
    changed = time.monotonic()
    users = d.folder / "users"
    wait_for(lambda: f"{users}: reloaded" in d.log.read_text(), 5, message="the users file to be re-read")

    with submission(d) as client:  # PLAIN, initial response on the AUTH line
        assert "auth" in client.esmtp_features and "PLAIN" in client.esmtp_features["auth"].upper()
        code, text = auth(client, "PLAIN", ALICE, PASSWORD)
        assert code == 235, text
        assert time.monotonic() - changed < 5, "the new password took too long to be usable"
        plain_id = send(client, ALICE, REMOTE, "via PLAIN")

    with submission(d) as client:  # LOGIN, username and password each answering a 334
        code, text = auth(client, "LOGIN", ALICE, PASSWORD, initial=False)
        assert code == 235, text
        login_id = send(client, ALICE, REMOTE, "via LOGIN")

    for queue_id in (plain_id, login_id):
        found = queued_relay(d, queue_id)
        assert found["sender"] == ALICE
        data = content(d, queue_id)
        received = received_header(data)
        assert f"(authenticated as {ALICE})" in received, received
        assert "ESMTPSA" in received, received  # RFC 3848: TLS and AUTH
        assert PASSWORD.encode() not in data
        assert plain_b64(ALICE, PASSWORD).encode() not in data
    assert b"Subject: via LOGIN" in content(d, login_id)

    # A password change while running: the new one works, the old one no longer does.
    set_password(d, ALICE, "second " + PASSWORD)
    wait_for(lambda: d.log.read_text().count(f"{users}: reloaded") >= 2, 5, message="the second re-read")
    with submission(d) as client:
        assert auth(client, "PLAIN", ALICE, "second " + PASSWORD)[0] == 235
    with submission(d) as client:
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            auth(client, "LOGIN", ALICE, PASSWORD)
        assert refused.value.smtp_code == 535

    log = d.log.read_text()
    assert PASSWORD not in log and plain_b64(ALICE, PASSWORD) not in log


# --- 2. wrong credentials -> 535 5.7.8 --------------------------------------------


def test_wrong_password_and_a_mailbox_without_password_get_535(daemon):
    d = started_with_alice(daemon)  # bob's line has no hash

    with submission(d) as client:
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            auth(client, "PLAIN", ALICE, WRONG)
        assert refused.value.smtp_code == 535
        assert refused.value.smtp_error.startswith(b"5.7.8"), refused.value.smtp_error
        # Still not logged in: submission wants AUTH before MAIL.
        assert client.mail(ALICE)[0] == 530

    with submission(d) as client:  # LOGIN, and a mailbox without a password
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            auth(client, "LOGIN", BOB, "", initial=False)
        assert (refused.value.smtp_code, refused.value.smtp_error[:5]) == (535, b"5.7.8")

    # Two failures are below the cutoff: the right password still works.
    with submission(d) as client:
        assert auth(client, "PLAIN", ALICE, PASSWORD)[0] == 235


# --- 3. no AUTH before TLS; no MAIL without AUTH ---------------------------------------


def test_before_starttls_auth_is_538_and_not_advertised_and_mail_needs_auth(daemon):
    d = started_with_alice(daemon)

    with submission(d, tls=False) as client:
        assert "starttls" in client.esmtp_features
        assert "auth" not in client.esmtp_features, client.esmtp_features
        code, text = client.docmd("AUTH", "PLAIN " + plain_b64(ALICE, PASSWORD))
        assert (code, text[:6]) == (538, b"5.7.11"), (code, text)
        code, text = client.mail(ALICE)
        assert (code, text[:5]) == (530, b"5.7.0"), (code, text)

    with submission(d) as client:  # after STARTTLS: advertised, and MAIL still needs AUTH
        assert client.esmtp_features.get("auth", "").upper().split() == ["PLAIN", "LOGIN"]
        code, text = client.mail(ALICE)
        assert (code, text[:5]) == (530, b"5.7.0"), (code, text)

    assert PASSWORD not in d.log.read_text()


# --- 4. implicit TLS (smtps) --------------------------------------------------------


def test_smtps_listener_logs_in_and_submits(daemon):
    smtps = free_port()
    d = started_with_alice(daemon, args=["--smtps", f"tcp:{smtps}:interface=127.0.0.1"])
    wait_for(lambda: port_answers(smtps), 5, message="the smtps listener")

    with smtplib.SMTP_SSL("127.0.0.1", smtps, timeout=15, context=unverified()) as client:
        client.ehlo("client.example.org")
        assert "starttls" not in client.esmtp_features  # already TLS
        assert "auth" in client.esmtp_features
        assert client.mail(ALICE)[0] == 530  # smtps needs AUTH too
        client.rset()
        client.login(ALICE, PASSWORD)
        queue_id = send(client, ALICE, REMOTE, "via smtps")

    queued_relay(d, queue_id)
    received = received_header(content(d, queue_id))
    assert f"(authenticated as {ALICE})" in received and "ESMTPSA" in received, received

    # The same port spoken to in clear text is not an SMTP server.
    with socket.create_connection(("127.0.0.1", smtps), timeout=5) as raw:
        raw.sendall(b"EHLO client.example.org\r\n")
        raw.settimeout(5)
        try:
            answer = raw.recv(1024)
        except (ConnectionResetError, socket.timeout):
            answer = b""
        assert not answer.startswith(b"220"), answer


# --- 5. relay port: AUTH lifts the relay restriction ----------------------------------


def test_relay_port_denies_remote_rcpt_until_authenticated(daemon):
    d = started_with_alice(daemon, server=UNTRUSTED)

    with submission(d, port=d.relay_port, tls=False) as client:
        assert "auth" not in client.esmtp_features
        assert client.mail(ALICE)[0] == 250  # the relay port takes MAIL without AUTH
        code, text = client.rcpt(REMOTE)
        assert (code, text[:5]) == (554, b"5.7.1"), (code, text)
        assert client.rcpt(ALICE)[0] == 250  # local mail is still welcome

    with submission(d, port=d.relay_port) as client:
        assert client.mail(ALICE)[0] == 250
        assert client.rcpt(REMOTE)[0] == 554  # TLS alone is not enough
        client.rset()
        assert auth(client, "PLAIN", ALICE, PASSWORD)[0] == 235
        queue_id = send(client, ALICE, REMOTE, "relay port with AUTH")

    queued_relay(d, queue_id)
    assert f"(authenticated as {ALICE})" in received_header(content(d, queue_id))


# --- 6. sender ownership ----------------------------------------------------------


def test_authenticated_user_may_send_only_as_own_address_or_alias(daemon, tmp_path):
    aliases = tmp_path / "aliases"
    aliases.write_text("sales: alice@example.test\nteam: bob@example.test\n")
    d = started_with_alice(daemon, toml=f'aliases = "{aliases}"')

    with submission(d) as client:
        assert auth(client, "PLAIN", ALICE, PASSWORD)[0] == 235
        code, text = client.mail(BOB)
        assert (code, text[:5]) == (553, b"5.7.1"), (code, text)
        code, text = client.mail("team@example.test")  # an alias, but not one of alice's
        assert (code, text[:5]) == (553, b"5.7.1"), (code, text)
        code, text = client.mail("ALICE@Example.Test")  # her own address in any case
        assert code == 250, (code, text)
        client.rset()
        assert client.mail("sales@example.test")[0] == 250  # an alias delivering to her
        client.rset()
        queue_id = send(client, ALICE, REMOTE, "own address")
    assert queued_relay(d, queue_id)["sender"] == ALICE


def test_check_sender_ownership_false_lets_any_sender_through(daemon):
    d = started_with_alice(daemon, server="check_sender_ownership = false")
    with submission(d) as client:
        assert auth(client, "PLAIN", ALICE, PASSWORD)[0] == 235
        queue_id = send(client, BOB, REMOTE, "not mine")
    assert queued_relay(d, queue_id)["sender"] == BOB
    assert f"(authenticated as {ALICE})" in received_header(content(d, queue_id))


# --- 7. swaks --------------------------------------------------------------------


def test_swaks_submits_with_starttls_and_auth_plain(daemon):
    d = started_with_alice(daemon)

    good = swaks(d.submission_port, PASSWORD)
    assert good.returncode == 0, good.stdout + good.stderr
    assert "235 2.7.0" in good.stdout, good.stdout
    (queue_id,) = re.findall(r"queued as ([0-9A-F]+)", good.stdout)
    queued_relay(d, queue_id)

    bad = swaks(d.submission_port, WRONG)
    assert bad.returncode != 0, bad.stdout
    assert "535 5.7.8" in bad.stdout, bad.stdout
    assert len(queue_json(d)) == 1  # nothing more queued


# --- 8. AUTH failure throttling -----------------------------------------------------


def test_parallel_guesses_from_one_client_are_checked_in_turn_and_none_passes_the_cutoff(daemon):
    """Three connections send AUTH at once, the right password last: checked
    side by side, the third would pass after two failures had reached the
    cut-off; checked in turn, it is shut out without a check."""
    d = started_with_alice(daemon, server="auth_failures_before_cutoff = 2")
    clients = [submission(d) for _ in range(3)]
    try:
        for client, password in zip(clients, (WRONG, WRONG, PASSWORD)):
            client.putcmd("AUTH", "PLAIN " + plain_b64(ALICE, password))
            time.sleep(0.01)  # read in this order, all within the first check (scrypt, ~0.1 s)
        replies = [client.getreply() for client in clients]
    finally:
        for client in clients:
            client.close()
    assert [(code, text[:5]) for code, text in replies] == [(535, b"5.7.8"), (421, b"4.7.0"), (421, b"4.7.0")], replies


def test_repeated_auth_failures_cut_the_client_off_with_421(daemon):
    d = started_with_alice(daemon, server="auth_failures_before_cutoff = 3")

    with submission(d) as client:
        timings = []
        for _ in range(2):
            started = time.monotonic()
            code, text = client.docmd("AUTH", "PLAIN " + plain_b64(ALICE, WRONG))
            timings.append(time.monotonic() - started)
            assert (code, text[:5]) == (535, b"5.7.8"), (code, text)
        # Each failure is answered more slowly: the n-th after at least n seconds
        # (lower bounds only: a loaded machine makes the password check itself slow).
        assert timings[0] >= 1.0 and timings[1] >= 2.0, timings
        code, text = client.docmd("AUTH", "PLAIN " + plain_b64(ALICE, WRONG))  # the 3rd: cut off
        assert (code, text[:5]) == (421, b"4.7.0"), (code, text)
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.noop()

    # The IP stays blocked, even with the right password, on a new connection.
    with submission(d) as client:
        code, text = client.docmd("AUTH", "PLAIN " + plain_b64(ALICE, PASSWORD))
        assert (code, text[:5]) == (421, b"4.7.0"), (code, text)

    # All of loopback is one client (any local user could pick another
    # 127.0.0.0/8 source address): 127.0.0.2 is shut out too. Other clients
    # stay unaffected: tests/smtp/test_auth_protocol.py.
    with submission(d, source="127.0.0.2") as client:
        code, text = client.docmd("AUTH", "PLAIN " + plain_b64(ALICE, PASSWORD))
        assert (code, text[:5]) == (421, b"4.7.0"), (code, text)
