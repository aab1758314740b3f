"""End to end: routing, live tables and relay policy through the real `twistd -n epost` (SPEC §3, §8).

Every check goes through the running daemon on loopback and the real admin
command (`epost queue --json`, `epost check-config`), never through internals.
Relay mail stays queued: outbound SMTP delivery does not exist yet, so a
queued relay recipient's stored route is what shows the routing decision.
"""

from __future__ import annotations

import json
import os
import signal
import smtplib
import subprocess
import time
from pathlib import Path

import pytest

from e2e_support import VENV_BIN, maildir_messages, queued, submit, wait_for

EPOST = str(VENV_BIN / "epost")
SENDER = "x@example.org"
UNTRUSTED = 'relay_networks = ["192.0.2.0/24"]'  # 127.0.0.1 may not relay


# --- helpers -----------------------------------------------------------------


def epost(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([EPOST, *args], capture_output=True, text=True, timeout=30)


def queue_json(d) -> list[dict]:
    result = epost("queue", "--json", "--config", str(d.config))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def send(d, recipient: str, subject: str = "routing e2e") -> str:
    """One message to `recipient` over the relay port; the queue ID from the DATA reply."""
    body = f"From: <{SENDER}>\r\nTo: <{recipient}>\r\nSubject: {subject}\r\n\r\nhello\r\n".encode()
    return submit(d.relay_port, SENDER, [recipient], body)


def routes_of(d, queue_id: str) -> list[dict]:
    """The stored route of each recipient of one queued message."""
    for message in queue_json(d):
        if message["id"] == queue_id:
            return [r["route"] for r in message["recipients"]]
    pytest.fail(f"{queue_id} is not in the queue")


def gateway_route(d, recipient: str) -> tuple[str, list]:
    (route,) = routes_of(d, send(d, recipient))
    return route["rule"], route.get("hosts")


def first_sent_with(d, recipient: str, expected: tuple, previous: tuple, since: float, within: float) -> float:
    """Send to `recipient` until its stored route is `expected` (anything else must be `previous`);
    the message that shows it must have been sent less than `within` s after `since`. Its delay."""
    while True:
        sent = time.monotonic()
        found = gateway_route(d, recipient)  # the route is decided at RCPT, so `sent` is what counts
        if found == expected:
            assert sent - since < within, f"first routed by the new table {sent - since:.2f}s after the change"
            return sent - since
        assert found == previous, found
        assert sent - since < within, f"the change was not used within {within}s"
        time.sleep(0.1)


def rewrite_keeping_stamp(path: Path, text: str) -> None:
    """New contents of the same size, same inode and same mtime: the 1 s poll cannot see the change."""
    before = os.stat(path)
    assert len(text.encode()) == before.st_size
    with open(path, "r+b") as f:  # in place: same inode
        f.write(text.encode())
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_mtime_ns, after.st_size, after.st_ino) == (before.st_mtime_ns, before.st_size, before.st_ino)


def rcpt_reply(port: int, recipient: bytes) -> tuple[int, str]:
    """A fresh session: EHLO, MAIL, `RCPT TO:<recipient bytes as given>`; if accepted, DATA too
    (so a wrongly accepted form would also show up in the queue)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.example.org")
        assert client.mail(SENDER)[0] == 250
        client.send(b"RCPT TO:" + recipient + b"\r\n")
        code, text = client.getreply()
        if code == 250:
            client.data(b"Subject: relay test\r\n\r\nrelayed?\r\n")
    return code, text.decode("ascii", "replace")


# --- 1. gateway.dat follows its file -------------------------------------------


def test_gateway_table_edits_apply_live_bad_file_is_ignored_and_sighup_reloads(daemon, tmp_path):
    gateway = tmp_path / "gateway.dat"
    gateway.write_text("partner.test,first.example,25\n")
    d = daemon(toml=f'gateway_table = "{gateway}"')  # default relay_networks: 127.0.0.1 is trusted

    first, second = ("gateway.dat:1", [["first.example", 25]]), ("gateway.dat:2", [["second.example", 2525]])
    assert gateway_route(d, "x@partner.test") == first

    # An edit is used within 3 s (SPEC: 2 s), no restart.
    gateway.write_text("# changed\npartner.test,second.example,2525\n")
    first_sent_with(d, "x@partner.test", second, first, since=time.monotonic(), within=3)

    # A bad line: the file is not used, the log names file:line and says the old table stays.
    bad = "partner.test,third.example,99999"
    gateway.write_text(bad)
    broken = time.monotonic()
    wait_for(lambda: "previous table stays in force" in d.log.read_text(), 3, message="the bad-file log line")
    log_line = next(line for line in d.log.read_text().splitlines() if "previous table stays in force" in line)
    assert f"{gateway}:1:" in log_line, log_line
    time.sleep(max(0.0, 2 - (time.monotonic() - broken)))
    assert gateway_route(d, "x@partner.test") == second

    # A good file the poll cannot notice (same size, inode and mtime): unused until SIGHUP.
    fixed = "partner.test,fourth.example,2626"
    assert len(fixed) == len(bad)
    rewrite_keeping_stamp(gateway, fixed)
    time.sleep(1.5)  # more than one poll interval
    assert gateway_route(d, "x@partner.test") == second

    os.kill(d.pid, signal.SIGHUP)
    fourth = ("gateway.dat:1", [["fourth.example", 2626]])
    first_sent_with(d, "x@partner.test", fourth, second, since=time.monotonic(), within=3)
    assert d.proc.poll() is None, "the daemon died on SIGHUP"
    assert "SIGHUP" in d.log.read_text()


# --- 2. no address form makes an open relay ----------------------------------------

# Local domain example.test (users alice, bob); the client 127.0.0.1 is untrusted.
FOREIGN_FORMS = [
    b"<u@ext.example>",
    b'<"u@ext.example">',
    b"<u%ext.example@example.test>",  # percent hack
    b"<u%ext.example@EXAMPLE.TEST.>",
    b"<alice%ext.example@example.test>",
    b"<u%ext.example@[127.0.0.1]>",
    b'<"u%ext.example"@example.test>',
    b'<"u@ext.example"@example.test>',  # quoted local parts holding @ % !
    b'<"alice@ext.example"@example.test>',
    b'<"ext.example!u"@example.test>',
    b"<u@ext.example@example.test>",  # double @
    b"<u@example.test@ext.example>",
    b"<@example.test:u@ext.example>",  # source routes
    b"<@[127.0.0.1]:u@ext.example>",
    b"<@example.test,@mx.example.test:u@ext.example>",
    b"<ext.example!u>",  # bang paths
    b"<ext.example!u@example.test>",
    b"<ext.example!u@[127.0.0.1]>",
    b"<u@[127.0.0.1]>",  # IP literals, our own address included
    b"<alice@[127.0.0.1]>",
    b"<u@[192.0.2.1]>",
    b"<u@[IPv6:::1]>",
    b"<u@ext.example.>",  # trailing dot
    b"<u@EXT.Example>",  # case
    b"<ALICE@Ext.Example.>",
    b"<u@example.test.ext.example>",
    b"<u@ext.example%example.test>",
    b"<u@mx.example.test>",  # the server's own host name is not a local domain
    b"<u@localhost>",
    b"<postmaster@ext.example>",  # postmaster tricks
    b"<postmaster%ext.example@example.test>",
    b"<postmaster@[127.0.0.1]>",
    b"<u@b\xc3\xbccher.example>",  # 8-bit without SMTPUTF8
]


def test_no_address_form_relays_for_an_untrusted_client(daemon):
    d = daemon(server=UNTRUSTED)
    accepted = []
    for form in FOREIGN_FORMS:
        code, text = rcpt_reply(d.relay_port, form)
        if not 400 <= code < 600:
            accepted.append((form, code, text))
        assert queued(d.spool) == [], (form, queued(d.spool))
    assert accepted == [], accepted

    # Not a server that refuses everything: a local user, in odd case and with a trailing dot.
    code, text = rcpt_reply(d.relay_port, b"<alice@EXAMPLE.TEST.>")
    assert code == 250, text
    wait_for(lambda: maildir_messages(d.spool, "example.test/alice"), 10, message="alice's message")
    wait_for(lambda: queued(d.spool) == [], 10, message="incoming/ to empty")

    assert queue_json(d) == []
    assert queued(d.spool, "incoming") == [] and queued(d.spool, "deferred") == []
    assert len(maildir_messages(d.spool, "example.test/alice")) == 1  # only the accepted local one


# --- 3. an alias is an open destination, delivered locally and queued for relay --------


def test_alias_with_local_and_remote_targets_from_an_untrusted_client(daemon, tmp_path):
    aliases = tmp_path / "aliases"
    aliases.write_text("# info goes to a local user and a remote one\ninfo: alice@example.test, bob@far.example\n")
    d = daemon(server=UNTRUSTED, toml=f'aliases = "{aliases}"')

    # Direct foreign mail is refused (the client really is untrusted), the alias is accepted.
    assert rcpt_reply(d.relay_port, b"<bob@far.example>")[0] == 554
    queue_id = send(d, "info@example.test")
    wait_for(lambda: maildir_messages(d.spool, "example.test/alice"), 10, message="alice's copy")

    def recipients():
        (message,) = queue_json(d)
        assert message["id"] == queue_id
        states = {r["address"]: r["state"] for r in message["recipients"]}
        return message["recipients"] if states.get("alice@example.test") == "delivered" else None

    final = {r["address"]: r for r in wait_for(recipients, 5, message="alice recorded as delivered")}
    assert set(final) == {"alice@example.test", "bob@far.example"}
    pending = [address for address, r in final.items() if r["state"] not in ("delivered", "failed")]
    assert pending == ["bob@far.example"]
    assert final["bob@far.example"]["state"] in ("incoming", "deferred")  # its DNS never answers
    assert final["bob@far.example"]["route"]["kind"] == "relay"
    assert final["bob@far.example"]["route"]["rule"] == "mx"
    assert final["alice@example.test"]["route"]["rule"] == "local"
    (copy,) = maildir_messages(d.spool, "example.test/alice")
    assert b"Delivered-To: alice@example.test" in copy.read_bytes()


# --- 4. check-config names the bad lines ------------------------------------------


def test_check_config_names_a_bad_gateway_line_and_an_alias_loop(daemon, tmp_path):
    gateway = tmp_path / "gateway.dat"
    gateway.write_text("# pattern,gateway,port\npartner.test,first.example,25\npartner2.test,second.example,99999\n")
    aliases = tmp_path / "aliases"
    aliases.write_text("info: alice@example.test\n# a loop\nloop-a: loop-b@example.test\nloop-b: loop-a@example.test\n")
    d = daemon(toml=f'gateway_table = "{gateway}"\naliases = "{aliases}"', start=False)

    result = epost("check-config", "--config", str(d.config))
    assert result.returncode == 1, result
    assert f"{gateway}:3:" in result.stdout, result.stdout
    assert f"{aliases}:3:" in result.stdout, result.stdout
    assert "ok:" not in result.stdout
