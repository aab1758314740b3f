"""End to end: DKIM signing on the way out through the real `twistd -n epost` (SPEC §9).

The daemon trusts only 127.0.0.2 (`relay_networks`); a client on 127.0.0.1
is a stranger whose mail to an operated domain (gateway.dat) is forwarded.
What the SMTP sink receives is judged by OpenDKIM, not by dkimpy, which made
the signatures.
"""

from __future__ import annotations

import smtplib
import sys
from pathlib import Path

import pytest

from e2e_support import QUEUED, maildir_messages, queued, wait_for
from epost.delivery import signing
from sinks import Sink

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "delivery"))
from opendkim_check import OPENDKIM, opendkim_verify, passing_selectors  # noqa: E402

TRUSTED, STRANGER = "127.0.0.2", "127.0.0.1"


def content(recipient: str, subject: str = "signed by epost") -> bytes:
    return (
        f"From: Alice <alice@example.test>\r\nTo: <{recipient}>\r\nSubject: {subject}\r\n"
        f"Date: Sun, 06 Dec 2026 15:00:00 +0000\r\nMessage-ID: <{subject.replace(' ', '-')}@example.test>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\nHello,  relaxed   world.\r\n"
    ).encode()


def send(port: int, source: str, recipients: list[str], data: bytes) -> str:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example.org", timeout=30,
                      source_address=(source, 0)) as client:
        client.ehlo()
        assert client.mail("alice@example.test")[0] == 250
        for recipient in recipients:
            code, text = client.rcpt(recipient)
            assert code == 250, (recipient, code, text)
        code, text = client.data(data)
    assert code == 250, (code, text)
    return QUEUED.search(text.decode()).group(1)


@pytest.fixture
def keys(tmp_path):
    folder = tmp_path / "dkim"
    return (signing.keygen("example.test", folder, "r1", "rsa")[1],
            signing.keygen("example.test", folder, "e1", "ed25519")[1])


@pytest.fixture
def signing_daemon(daemon, tmp_path, keys):
    def make(sink_port: int, start: bool = True):
        gateway = tmp_path / "gateway.dat"
        gateway.write_text(f"*.sink.test,127.0.0.1,{sink_port}\n")
        entries = "".join(
            f'[[dkim.keys]]\ndomain = "{k.domain}"\nselector = "{k.selector}"\n'
            f'key = "{tmp_path / "dkim" / f"{k.domain}.{k.selector}.{k.algorithm}.pem"}"\n'
            for k in keys)
        toml = f'gateway_table = "{gateway}"\n\n[retry]\ninterval = 2\nfixed_interval = true\n\n{entries}'
        return daemon(server=f'relay_networks = ["{TRUSTED}/32"]', toml=toml, start=start)
    return make


def dkim_headers(data: bytes) -> list[bytes]:
    """The DKIM-Signature fields at the top of a message, unfolded as sent."""
    head = data.split(b"\r\n\r\n", 1)[0].replace(b"\r\n\t", b"\t").replace(b"\r\n ", b" ")
    return [line for line in head.split(b"\r\n") if line.lower().startswith(b"dkim-signature:")]


@pytest.mark.skipif(OPENDKIM is None, reason="opendkim not installed (Debian: opendkim)")
def test_relay_network_mail_is_signed_once_and_opendkim_passes_every_copy(signing_daemon, keys, tmp_path):
    # b.sink.test greylists once: its copy goes out on a retry, a.sink.test's at once
    with Sink(greylist=1, only={"bob@b.sink.test"}) as sink:
        d = signing_daemon(sink.port)
        send(d.relay_port, TRUSTED, ["ann@a.sink.test", "bob@b.sink.test"], content("ann@a.sink.test"))
        first, retried = sink.wait_for_messages(2, timeout=20)
    assert (first.recipients, retried.recipients) == (("ann@a.sink.test",), ("bob@b.sink.test",))
    assert sink.rcpt_count("bob@b.sink.test") == 2  # it really was retried
    for got in (first, retried):
        assert got.data.startswith(b"DKIM-Signature:"), got.data[:200]  # above our Received:
        assert passing_selectors(opendkim_verify(got.data, keys, tmp_path)) == {"r1", "e1"}
    signatures = dkim_headers(first.data)
    assert len(signatures) == 2
    assert dkim_headers(retried.data) == signatures  # byte-identical: signed once, at commit


@pytest.mark.skipif(OPENDKIM is None, reason="opendkim not installed (Debian: opendkim)")
def test_mail_from_an_authenticated_client_outside_relay_networks_is_signed(signing_daemon, keys, tmp_path):
    from test_submission_e2e import ALICE, PASSWORD, set_password, submission

    with Sink() as sink:
        d = signing_daemon(sink.port, start=False)
        set_password(d, ALICE, PASSWORD)
        d.start()
        with submission(d, source=STRANGER) as client:  # STARTTLS, then AUTH
            client.login(ALICE, PASSWORD)
            client.sendmail(ALICE, ["ann@a.sink.test"], content("ann@a.sink.test", "submitted"))
        (got,) = sink.wait_for_messages(1, timeout=20)
    assert passing_selectors(opendkim_verify(got.data, keys, tmp_path)) == {"r1", "e1"}


@pytest.mark.skipif(OPENDKIM is None, reason="opendkim not installed (Debian: opendkim)")
def test_forwarded_mail_from_a_stranger_arrives_unsigned(signing_daemon, keys, tmp_path):
    with Sink() as sink:
        d = signing_daemon(sink.port)
        send(d.relay_port, STRANGER, ["ann@a.sink.test"], content("ann@a.sink.test", "forwarded"))
        (got,) = sink.wait_for_messages(1, timeout=20)
    assert dkim_headers(got.data) == []
    assert passing_selectors(opendkim_verify(got.data, keys, tmp_path)) == set()


def test_a_local_delivery_is_unsigned_while_its_remote_copy_is_signed(signing_daemon):
    with Sink() as sink:
        d = signing_daemon(sink.port)
        send(d.relay_port, TRUSTED, ["bob@example.test", "ann@a.sink.test"], content("bob@example.test", "mixed"))
        (got,) = sink.wait_for_messages(1, timeout=20)
        (local,) = wait_for(lambda: maildir_messages(d.spool, "example.test/bob"), message="the Maildir copy")
    assert len(dkim_headers(got.data)) == 2
    assert b"DKIM-Signature" not in local.read_bytes()
    wait_for(lambda: not queued(d.spool), message="the queue to empty")
