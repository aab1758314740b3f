"""End to end: Authentication-Results on inbound mail (SPEC §9) through the real
`twistd -n epost`, with messages signed by OpenDKIM (its own key, made by
opendkim-genkey) and SPF, DKIM and DMARC records served by a real dnsmasq on
loopback. Nothing here is signed or checked by dkimpy on the test's side.

Clients pick their source in 127.0.0.0/8: 127.0.0.1 is a stranger (SPF
records name it), 127.0.0.5 is in `relay_networks`.
"""

from __future__ import annotations

import email
import re
import shutil
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from e2e_support import HOSTNAME, maildir_messages, wait_for

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "routing"))
from dnsmasq import DNSMASQ, Dnsmasq  # noqa: E402

OPENDKIM = shutil.which("opendkim", path="/usr/sbin:/usr/local/sbin")
GENKEY = shutil.which("opendkim-genkey", path="/usr/sbin:/usr/local/sbin")
STRANGER, TRUSTED = "127.0.0.1", "127.0.0.5"
SELECTOR = "od1"

pytestmark = pytest.mark.skipif(DNSMASQ is None or OPENDKIM is None or GENKEY is None,
                                reason="needs dnsmasq and opendkim (Debian: dnsmasq-base, opendkim, opendkim-tools)")


@pytest.fixture(scope="module")
def opendkim_key(tmp_path_factory):
    """An RSA-2048 key made by opendkim-genkey: (private key path, the TXT record's text)."""
    folder = tmp_path_factory.mktemp("opendkim")
    subprocess.run([GENKEY, "-b", "2048", "-d", "sender.test", "-s", SELECTOR, "-D", str(folder)], check=True, timeout=60)
    published = (folder / f"{SELECTOR}.txt").read_text()
    record = "".join(re.findall(r'"([^"]*)"', published))
    assert "p=" in record, published
    return folder / f"{SELECTOR}.private", record


@pytest.fixture(scope="module")
def dns_records(opendkim_key):
    """dnsmasq answering for .test: SPF, the OpenDKIM key (in 200-character strings, as
    long keys are published) and DMARC; any other .test name is NXDOMAIN."""
    _, record = opendkim_key
    chunks = ",".join(record[i:i + 200] for i in range(0, len(record), 200))  # on the command line: no quotes
    assert "," not in record
    server = Dnsmasq([
        "--txt-record=sender.test,v=spf1 ip4:127.0.0.1 -all",
        "--txt-record=soft.test,v=spf1 ~all",
        "--txt-record=fail.test,v=spf1 -all",
        "--txt-record=client.test,v=spf1 ip4:127.0.0.1 -all",
        f"--txt-record={SELECTOR}._domainkey.sender.test,{chunks}",
        "--txt-record=_dmarc.sender.test,v=DMARC1; p=reject",
    ], zone="test")
    server.start()
    yield server
    server.cleanup()


def opendkim_sign(message: bytes, key: Path, workdir: Path) -> bytes:
    """`message` with the DKIM-Signature OpenDKIM (test mode, relaxed/relaxed, rsa-sha256) makes for it."""
    conf = workdir / "sign.conf"
    conf.write_text(
        f"Mode s\nDomain sender.test\nSelector {SELECTOR}\nKeyFile {key}\nRequireSafeKeys false\n"
        f"SignatureAlgorithm rsa-sha256\nCanonicalization relaxed/relaxed\nPidFile {workdir}/opendkim.pid\nSyslog no\n"
    )
    source = workdir / "unsigned.eml"
    source.write_bytes(message)
    out = subprocess.run([OPENDKIM, "-x", str(conf), "-t", str(source)], capture_output=True, timeout=30, check=True)
    # Test mode prints "opendkim: FILE:", then the header field it would add.
    header = out.stdout.split(b"\n", 1)[1].strip().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    assert header.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=sender.test; s=od1;"), out
    return header + b"\r\n" + message


def message(subject: str, sender: str = "alice@sender.test", extra: bytes = b"") -> bytes:
    return extra + (f"From: Alice <{sender}>\r\nTo: bob@example.test\r\nSubject: {subject}\r\n"
                    f"Date: Sun, 06 Dec 2026 15:00:00 +0000\r\nMessage-ID: <{subject}@sender.test>\r\n\r\n"
                    "Hello from sender.test.\r\n").encode()


def send(port: int, mail_from: str, content: bytes, source: str = STRANGER, helo: str = "client.test") -> str:
    with smtplib.SMTP("127.0.0.1", port, local_hostname=helo, timeout=30, source_address=(source, 0)) as client:
        assert client.ehlo()[0] == 250
        assert client.mail(mail_from)[0] == 250
        assert client.rcpt("bob@example.test")[0] == 250
        code, text = client.data(content)
    assert code == 250, (code, text)
    return text.decode()


def delivered(spool: Path, subject: str) -> email.message.Message:
    def find():
        for path in maildir_messages(spool, "example.test/bob"):
            parsed = email.message_from_bytes(path.read_bytes())
            if parsed["Subject"] == subject:
                return parsed
        return None

    return wait_for(find, 15, message=f"{subject!r} delivered")


def ours(parsed: email.message.Message) -> str:
    """Our one Authentication-Results header, unfolded."""
    mine = [v for v in parsed.get_all("Authentication-Results", []) if v.split(";")[0].strip().lower() == HOSTNAME]
    assert len(mine) == 1, parsed.get_all("Authentication-Results")
    return re.sub(r"\s+", " ", mine[0])


@pytest.fixture
def epost(daemon, dns_records):
    d = daemon(server=f'relay_networks = ["{TRUSTED}/32"]', toml=f'dns_servers = ["127.0.0.1:{dns_records.port}"]')
    return d


def test_spf_pass_fail_softfail_none_and_helo(epost):
    send(epost.relay_port, "alice@sender.test", message("spf-pass"))
    send(epost.relay_port, "bounce@fail.test", message("spf-fail"))
    send(epost.relay_port, "bounce@soft.test", message("spf-soft"))
    send(epost.relay_port, "bounce@nothing.test", message("spf-none"), helo="unlisted.test")
    assert "spf=pass smtp.mailfrom=alice@sender.test" in ours(delivered(epost.spool, "spf-pass"))
    assert "spf=pass smtp.helo=client.test" in ours(delivered(epost.spool, "spf-pass"))
    assert "spf=fail smtp.mailfrom=bounce@fail.test" in ours(delivered(epost.spool, "spf-fail"))
    assert "spf=softfail smtp.mailfrom=bounce@soft.test" in ours(delivered(epost.spool, "spf-soft"))
    none = ours(delivered(epost.spool, "spf-none"))
    assert "spf=none smtp.mailfrom=bounce@nothing.test" in none and "spf=none smtp.helo=unlisted.test" in none


def test_opendkim_signature_passes_and_an_altered_body_fails(epost, opendkim_key, tmp_path):
    key, _ = opendkim_key
    signed = opendkim_sign(message("dkim-pass"), key, tmp_path)
    send(epost.relay_port, "bounce@soft.test", signed)  # SPF softfail: DMARC passes by DKIM alone
    result = ours(delivered(epost.spool, "dkim-pass"))
    assert re.search(r"dkim=pass header\.d=sender\.test header\.s=od1 header\.b=\S{8}", result), result
    assert "dmarc=pass (p=reject) header.from=sender.test" in result

    altered = opendkim_sign(message("dkim-fail"), key, tmp_path).replace(b"Hello from", b"Hello FROM")
    send(epost.relay_port, "bounce@soft.test", altered)
    result = ours(delivered(epost.spool, "dkim-fail"))
    assert 'dkim=fail reason="body hash did not verify" header.d=sender.test' in result, result
    assert "dmarc=fail (p=reject) header.from=sender.test" in result


def test_dmarc_passes_by_aligned_spf_and_fails_without_alignment(epost):
    send(epost.relay_port, "alice@sender.test", message("dmarc-spf"))
    assert "dmarc=pass (p=reject) header.from=sender.test" in ours(delivered(epost.spool, "dmarc-spf"))
    send(epost.relay_port, "bounce@fail.test", message("dmarc-fail"))
    result = ours(delivered(epost.spool, "dmarc-fail"))
    assert "dkim=none" in result and "dmarc=fail (p=reject) header.from=sender.test" in result, result
    send(epost.relay_port, "bounce@soft.test", message("dmarc-none", sender="carol@nothing.test"))
    assert "dmarc=none header.from=nothing.test" in ours(delivered(epost.spool, "dmarc-none"))


def test_a_client_in_relay_networks_gets_no_header_and_keeps_its_own(epost):
    forged = b"Authentication-Results: " + HOSTNAME.encode() + b"; dkim=pass header.d=bank.test\r\n"
    send(epost.relay_port, "alice@sender.test", message("trusted", extra=forged), source=TRUSTED)
    parsed = delivered(epost.spool, "trusted")
    assert parsed.get_all("Authentication-Results") == [f"{HOSTNAME}; dkim=pass header.d=bank.test"]


def test_an_old_header_with_our_id_is_removed_and_a_foreign_one_stays(epost):
    old = (b"Authentication-Results: " + HOSTNAME.upper().encode() + b";\r\n\tdkim=pass header.d=bank.test\r\n"
           b"Authentication-Results: mx.other.test; spf=pass smtp.mailfrom=x@other.test\r\n")
    send(epost.relay_port, "bounce@fail.test", message("forged", extra=old))
    parsed = delivered(epost.spool, "forged")
    result = ours(parsed)
    assert "bank.test" not in result and "spf=fail" in result
    assert "mx.other.test; spf=pass smtp.mailfrom=x@other.test" in parsed.get_all("Authentication-Results")
    headers = [name.lower() for name in parsed.keys()]
    assert headers[:4] == ["return-path", "delivered-to", "received", "authentication-results"], headers  # ours under our Received:


@pytest.fixture
def silent_dns():
    """A UDP "DNS server" on loopback that reads queries and never answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    yield sock.getsockname()[1]
    sock.close()


def test_a_dns_server_that_does_not_answer_gives_temperror_within_the_budget(daemon, silent_dns, opendkim_key, tmp_path):
    d = daemon(server=f'relay_networks = ["{TRUSTED}/32"]\nauthentication_results_timeout = 2',
               toml=f'dns_servers = ["127.0.0.1:{silent_dns}"]')
    key, _ = opendkim_key
    started = time.monotonic()
    reply = send(d.relay_port, "alice@sender.test", opendkim_sign(message("slow-dns"), key, tmp_path))
    elapsed = time.monotonic() - started
    assert reply.startswith("2.0.0 Ok: queued as"), reply
    assert 1.5 < elapsed < 5, elapsed  # waited for DNS, within the budget (+1 s the reactor allows a full pool)
    result = ours(delivered(d.spool, "slow-dns"))
    assert "spf=temperror" in result and "dkim=temperror" in result and "dmarc=temperror" in result, result
    assert "header.d=sender.test" in result


def test_switched_off_no_header(daemon, dns_records):
    d = daemon(server=f'relay_networks = ["{TRUSTED}/32"]\nauthentication_results = false',
               toml=f'dns_servers = ["127.0.0.1:{dns_records.port}"]')
    send(d.relay_port, "alice@sender.test", message("off"))
    assert delivered(d.spool, "off").get_all("Authentication-Results") is None
