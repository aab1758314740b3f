"""End to end: outbound delivery and retries through the real `twistd -n epost` (SPEC §4, §6).

The daemon relays to SMTP sinks on loopback (`sinks.py`): through a
gateway.dat rule to a sink on a free port, or by MX (dnsmasq on loopback)
to sinks on 127.0.0.x:25. Every check is on what a user or operator sees:
what the sink received, the spool folders, senderlog, faillog, Domain.mri
and the DSN in the sender's Maildir.
"""

from __future__ import annotations

import email
import email.policy
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from e2e_support import HOSTNAME, kill9, maildir_messages, queued, submit, wait_for
from epost.logs import parse_senderlog_line
from epost.queue.domain_state import DomainState, parse_mri
from sinks import HostileSink, Sink, closed_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "routing"))
from dnsmasq import DNSMASQ, Dnsmasq  # noqa: E402

ALICE = "alice@example.test"
SENDER = "x@example.org"
FAILLOG = re.compile(
    r"<(?P<id>[0-9A-F]+)@(?P<host>\S+)> send fail on \[\d\d/[A-Z][a-z]{2}/\d{4}:\d\d:\d\d:\d\d\] "
    r"from (?P<sender>\S+) to (?P<recipient>\S+) \[(?P<reason>.*)\]\Z"
)
FAST_RETRY = "interval = 1\nfixed_interval = true\n"


# --- helpers -----------------------------------------------------------------


def relay_daemon(daemon, tmp_path: Path, port: int, retry: str = FAST_RETRY, delivery: str = ""):
    """A daemon whose gateway.dat sends every `*.sink.test` domain to 127.0.0.1:`port`."""
    gateway = tmp_path / "gateway.dat"
    gateway.write_text(f"*.sink.test,127.0.0.1,{port}\n")
    toml = f'gateway_table = "{gateway}"\n\n[retry]\n{retry}\n[delivery]\n{delivery}\n'
    return daemon(toml=toml)


def message(subject: str = "delivery e2e", body: str = "hello") -> bytes:
    return f"From: <{SENDER}>\r\nTo: <someone@a.sink.test>\r\nSubject: {subject}\r\n\r\n{body}\r\n".encode()


def send(d, recipients: list[str], content: bytes, sender: str = SENDER) -> str:
    """One message over the relay port; the queue ID from the 250 to DATA."""
    return submit(d.relay_port, sender, recipients, content)


def senderlog(d) -> list[dict]:
    path = d.spool / "log" / "senderlog"
    return [parse_senderlog_line(line) for line in path.read_text().splitlines()] if path.exists() else []


def attempts(d, recipient: str) -> list[tuple[int, str]]:
    """(attempt, status) of every senderlog line for `recipient`, in file order."""
    return [(r["attempt"], r["status"]) for r in senderlog(d) if r["recipient"] == recipient]


def faillog(d) -> list[str]:
    path = d.spool / "log" / "faillog"
    return path.read_text().splitlines() if path.exists() else []


def mri(d, domain: str) -> DomainState | None:
    path = d.spool / "domains" / domain / "Domain.mri"
    try:
        return parse_mri(path.read_text(), path)
    except FileNotFoundError:
        return None


def queue_is_empty(d) -> bool:
    return not queued(d.spool, "incoming") and not queued(d.spool, "deferred")


def deferred_ids(d) -> set[str]:
    return set(queued(d.spool, "deferred"))


def wait_until_deferred(d, queue_id: str, timeout: float = 10) -> None:
    """Until the message is in deferred/ and gone from incoming/ (a move shows it in both for a moment)."""
    wait_for(lambda: queue_id in deferred_ids(d) and not queued(d.spool, "incoming"), timeout,
             message=f"{queue_id} to move from incoming/ to deferred/")


def deferred_state(d, queue_id: str, domain: str = "a.sink.test"):
    """Once the message is in deferred/: its destination's Domain.mri."""
    wait_until_deferred(d, queue_id)
    return wait_for(lambda: mri(d, domain), message="Domain.mri")


def all_maildir_files(d) -> list[Path]:
    root = d.spool / "mailboxes"
    return sorted(root.glob("*/*/new/*")) if root.is_dir() else []


def received_header_and_rest(data: bytes) -> tuple[bytes, bytes]:
    """Split the daemon's prepended `Received:` field (with its folded lines) from the rest."""
    assert data.startswith(b"Received: "), data[:200]
    end = 0
    while True:
        end = data.index(b"\r\n", end) + 2
        if data[end : end + 1] not in (b" ", b"\t"):
            return data[:end], data[end:]


def dsn(d, mailbox: str = "example.test/alice", timeout: float = 15) -> email.message.EmailMessage:
    (path,) = wait_for(lambda: maildir_messages(d.spool, mailbox), timeout, message=f"a DSN in {mailbox}")
    return email.message_from_bytes(path.read_bytes(), policy=email.policy.default)


def dsn_parts(report: email.message.EmailMessage):
    """(text part, per-message block, per-recipient blocks, headers part) of a multipart/report DSN."""
    assert report.get_content_type() == "multipart/report", report.get_content_type()
    assert report.get_param("report-type") == "delivery-status"
    text, status, headers = report.get_payload()
    assert text.get_content_type() == "text/plain"
    assert status.get_content_type() == "message/delivery-status"
    assert headers.get_content_type() == "text/rfc822-headers"
    per_message, *per_recipient = status.get_payload()
    return text, per_message, per_recipient, headers


def check_dsn_envelope(report: email.message.EmailMessage) -> None:
    assert report["Return-Path"] == "<>", report["Return-Path"]
    assert report["From"].addresses[0].addr_spec == f"MAILER-DAEMON@{HOSTNAME}", report["From"]
    assert report["Auto-Submitted"] == "auto-replied"
    assert report["To"] == ALICE


# --- 1. plain relay --------------------------------------------------------------


def test_relay_through_gateway_dat_delivers_to_the_sink_and_logs_sent(daemon, tmp_path):
    with Sink() as sink:
        d = relay_daemon(daemon, tmp_path, sink.port)
        content = message("plain relay")
        queue_id = send(d, ["bob@a.sink.test"], content)
        (got,) = sink.wait_for_messages(1)
        assert (got.sender, got.recipients) == (SENDER, ("bob@a.sink.test",))
        received, rest = received_header_and_rest(got.data)
        assert rest == content
        assert f"id {queue_id}".encode() in received, received
        wait_for(lambda: queue_is_empty(d), message="incoming/ and deferred/ to empty")
        wait_for(lambda: senderlog(d), message="a senderlog line")
        (line,) = senderlog(d)
        assert line["queue_id"] == queue_id
        assert (line["sender"], line["recipient"], line["status"], line["attempt"]) == (SENDER, "bob@a.sink.test", "sent", 1)
        assert line["relay"] == f"127.0.0.1[127.0.0.1]:{sink.port}", line
        assert line["dsn"] == "2.0.0" and line["reply"].startswith("250 2.0.0"), line
        assert not (d.spool / "domains" / "a.sink.test").exists()
        assert faillog(d) == []
        assert sink.connections == 1


# --- 2. greylisting ----------------------------------------------------------------


def test_greylisted_message_waits_in_deferred_with_domain_mri_then_is_delivered(daemon, tmp_path):
    with Sink(greylist=1) as sink:
        d = relay_daemon(daemon, tmp_path, sink.port, retry="interval = 2\nfixed_interval = true\n")
        queue_id = send(d, ["bob@a.sink.test"], message("greylisted"))
        state = deferred_state(d, queue_id)
        assert sink.messages == []
        assert state.domain == "a.sink.test"
        assert (state.try_number, state.err_code, state.messages) == (1, 451, 1), state
        assert state.err_text.startswith("4.7.1"), state
        assert state.next_try - state.last_tried == 2, state
        assert state.first_failure == state.last_tried
        assert state.last_host == f"127.0.0.1[127.0.0.1]:{sink.port}"

        (got,) = sink.wait_for_messages(1, timeout=10)
        assert got.recipients == ("bob@a.sink.test",)
        wait_for(lambda: queue_is_empty(d), message="the queue to empty")
        wait_for(lambda: not (d.spool / "domains" / "a.sink.test").exists(), message="domains/a.sink.test to go")
        assert attempts(d, "bob@a.sink.test") == [(1, "deferred"), (2, "sent")]
        deferred_line = senderlog(d)[0]
        assert deferred_line["dsn"] == "4.7.1" and deferred_line["reply"].startswith("451 4.7.1"), deferred_line
        assert sink.rcpt_count("bob@a.sink.test") == 2
        assert len(sink.messages) == 1


# --- 3. count_5xx exhaustion and the DSN ------------------------------------------------


def test_550_is_retried_count_5xx_times_then_bounced_with_a_dsn(daemon, tmp_path):
    with Sink(reject=True) as sink:
        d = relay_daemon(daemon, tmp_path, sink.port, retry=FAST_RETRY + "count_5xx = 2\n")
        content = message("the original subject 550")
        queue_id = send(d, ["nobody@a.sink.test"], content, sender=ALICE)
        report = dsn(d)
        wait_for(lambda: queue_is_empty(d) and not (d.spool / "domains" / "a.sink.test").exists(),
                 message="the queue and domains/ to empty")
        time.sleep(1.5)  # a fourth attempt would come 1 s after the third
        assert sink.rcpt_count("nobody@a.sink.test") == 3
        assert attempts(d, "nobody@a.sink.test") == [(1, "deferred"), (2, "deferred"), (3, "bounced")]
        assert all(r["dsn"] == "5.1.1" for r in senderlog(d))

        (line,) = faillog(d)
        match = FAILLOG.match(line)
        assert match, line
        assert match.group("id", "host", "sender", "recipient") == (queue_id, HOSTNAME, ALICE, "nobody@a.sink.test")
        assert match["reason"].startswith("550 5.1.1"), line

        check_dsn_envelope(report)
        text, per_message, (block,), headers = dsn_parts(report)
        assert per_message["Reporting-MTA"] == f"dns; {HOSTNAME}"
        assert block["Status"] == "5.1.1"
        assert block["Action"] == "failed"
        assert block["Final-Recipient"] == "rfc822; nobody@a.sink.test"
        assert block["Remote-MTA"] == f"dns; 127.0.0.1[127.0.0.1]:{sink.port}", block["Remote-MTA"]
        assert block["Diagnostic-Code"].startswith("smtp; 550 5.1.1"), block["Diagnostic-Code"]
        returned = headers.get_content()
        assert "Subject: the original subject 550" in returned
        assert f"id {queue_id}" in returned  # our own Received: field is part of the original headers
        assert "hello" not in returned  # headers only, never the body
        assert "nobody@a.sink.test" in text.get_content()
        assert sink.messages == []


# --- 4. no answer ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["silent", "refused"])
def test_no_answer_is_retried_for_period_noanswer_then_bounced(daemon, tmp_path, kind):
    with Sink(greeting=None) as sink:
        port = sink.port if kind == "silent" else closed_port()
        d = relay_daemon(
            daemon, tmp_path, port,
            retry=FAST_RETRY + "period_noanswer = 3\n",
            delivery="connect_timeout = 2\ngreeting_timeout = 1\n",
        )
        queue_id = send(d, ["bob@a.sink.test"], message("never answered"), sender=ALICE)
        started = time.monotonic()
        state = wait_for(lambda: mri(d, "a.sink.test"), message="Domain.mri")
        assert (state.err_code, state.messages) == (0, 1), state
        assert state.try_number >= 1 and state.first_failure <= state.last_tried, state
        assert state.last_host == f"127.0.0.1[127.0.0.1]:{port}", state
        report = dsn(d, timeout=20)
        elapsed = time.monotonic() - started
        wait_for(lambda: queue_is_empty(d) and not (d.spool / "domains" / "a.sink.test").exists(),
                 message="the queue and domains/ to empty")

        lines = [r for r in senderlog(d) if r["recipient"] == "bob@a.sink.test"]
        statuses = [r["status"] for r in lines]
        assert len(lines) >= 3 and set(statuses[:-1]) == {"deferred"} and statuses[-1] == "bounced", statuses
        assert [r["attempt"] for r in lines] == list(range(1, len(lines) + 1))
        assert lines[-1]["delay"] >= 2.99, lines[-1]
        assert elapsed >= 3
        if kind == "silent":
            assert sink.connections == len(lines)

        (line,) = faillog(d)
        match = FAILLOG.match(line)
        assert match, line
        assert match.group("id", "sender", "recipient") == (queue_id, ALICE, "bob@a.sink.test")
        assert match["reason"] == "Unable to deliver to destination domain", line

        check_dsn_envelope(report)
        _, _, (block,), headers = dsn_parts(report)
        assert block["Action"] == "failed"
        assert block["Final-Recipient"] == "rfc822; bob@a.sink.test"
        assert re.fullmatch(r"[45]\.4\.\d+", block["Status"]), block["Status"]
        assert "Subject: never answered" in headers.get_content()


# --- 5. null sender ---------------------------------------------------------------------


def test_null_sender_failure_is_logged_from_empty_and_never_bounced(daemon, tmp_path):
    with Sink(reject=True) as sink:
        d = relay_daemon(daemon, tmp_path, sink.port, retry=FAST_RETRY + "count_5xx = 0\n")
        queue_id = send(d, ["nobody@a.sink.test"], message("a bounce that bounces"), sender="")
        wait_for(lambda: faillog(d), message="a faillog line")
        wait_for(lambda: queue_is_empty(d), message="the queue to empty")
        time.sleep(1.5)  # room for a wrongly queued bounce to be delivered
        (line,) = faillog(d)
        match = FAILLOG.match(line)
        assert match, line
        assert match.group("id", "sender", "recipient") == (queue_id, "<>", "nobody@a.sink.test")
        assert match["reason"].startswith("550 5.1.1"), line
        assert attempts(d, "nobody@a.sink.test") == [(1, "bounced")]
        assert senderlog(d)[0]["sender"] == ""
        assert all_maildir_files(d) == []
        assert queue_is_empty(d)
        assert sink.rcpt_count() == 1


# --- 6. several MX hosts ----------------------------------------------------------------


@pytest.fixture
def dnsmasq():
    if DNSMASQ is None:
        pytest.skip("dnsmasq is not installed")
    servers = []

    def start(records: list[str]) -> Dnsmasq:
        server = Dnsmasq(records)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.cleanup()


@pytest.mark.parametrize("first", ["refused", "421"])
def test_second_mx_takes_the_mail_when_the_first_refuses(daemon, dnsmasq, first):
    # Each variant its own addresses, so a TIME_WAIT on one cannot touch the other.
    one, two = ("127.0.0.2", "127.0.0.3") if first == "refused" else ("127.0.0.4", "127.0.0.5")
    dns = dnsmasq([
        "--mx-host=multi.test,mx1.multi.test,10",
        "--mx-host=multi.test,mx2.multi.test,20",
        f"--host-record=mx1.multi.test,{one}",
        f"--host-record=mx2.multi.test,{two}",
    ])
    busy = Sink(host=one, port=25, greeting="421 4.3.2 Service not available, try later") if first == "421" else None
    with Sink(host=two, port=25) as sink:
        if busy:
            busy.start()
        try:
            d = daemon(toml=f'dns_servers = ["127.0.0.1:{dns.port}"]\n\n[retry]\n{FAST_RETRY}')
            queue_id = send(d, ["carol@multi.test"], message("via the second mx"))
            (got,) = sink.wait_for_messages(1, timeout=15)
            assert got.recipients == ("carol@multi.test",)
            wait_for(lambda: queue_is_empty(d), message="the queue to empty")
            wait_for(lambda: senderlog(d), message="a senderlog line")
            (line,) = senderlog(d)
            assert (line["queue_id"], line["status"], line["attempt"]) == (queue_id, "sent", 1), line
            assert line["relay"] == f"mx2.multi.test[{two}]:25", line
            if busy:
                assert busy.connections == 1
        finally:
            if busy:
                busy.stop()


# --- 7. dot-stuffing ----------------------------------------------------------------------


def dotted_body() -> tuple[bytes, list[tuple[int, int]]]:
    """A 300 KiB body full of lines starting with dots; the body-offset ranges made only of `.` lines."""
    lines: list[bytes] = []
    size = 0

    def add(line: bytes) -> None:
        nonlocal size
        lines.append(line)
        size += len(line) + 2

    for line in (b".the very first body line", b".", b"..", b"...", b".x", b"x.", b" ."):
        add(line)
    regions, n = [], 0
    for boundary in (64 * 1024, 128 * 1024, 192 * 1024):
        # Body offsets boundary-3000 .. boundary+1500 hold only `.` CRLF lines, so the content
        # file's chunk boundary (body offset + the header block) falls inside one of them. Each
        # region starts at a multiple of 3 and the boundaries are 1, 2 and 0 mod 3: whatever the
        # header block's length, one chunk starts with `.`, one with CRLF and one with LF.
        while size < boundary - 3000:
            n += 1
            add(b"filler %07d " % n + b"abcdefghij" * (n % 7) + (b"." if n % 5 == 0 else b""))
            if n % 11 == 0:
                add(b"..dot dot line %d" % n)
        add(b"x" * (3 + (-size - 5) % 3))  # the region starts at a multiple of 3
        start = size
        while size < boundary + 1500:
            add(b".")
        regions.append((start, size))
    while size < 300 * 1024:
        n += 1
        add(b".." if n % 3 == 0 else b"tail %07d ." % n)
    add(b".last line")
    return b"\r\n".join(lines) + b"\r\n", regions


def test_dot_lines_and_chunk_boundaries_arrive_byte_identical(daemon, tmp_path):
    body, regions = dotted_body()
    header = f"From: <{SENDER}>\r\nTo: <dots@a.sink.test>\r\nSubject: dots\r\n\r\n".encode()
    content = header + body
    assert len(content) > 200 * 1024
    with Sink() as sink:
        d = relay_daemon(daemon, tmp_path, sink.port)
        send(d, ["dots@a.sink.test"], content)
        (got,) = sink.wait_for_messages(1, timeout=15)
        received, rest = received_header_and_rest(got.data)
        assert len(rest) == len(content)
        if rest != content:
            at = next(i for i, (a, b) in enumerate(zip(rest, content)) if a != b)
            pytest.fail(f"first difference at byte {at}: got {rest[at - 40 : at + 40]!r}, sent {content[at - 40 : at + 40]!r}")
        # The test's own premise: each 64 KiB read of the spooled content starts inside a `.` line.
        prefix = len(received) + len(header)
        phases = set()
        for boundary, (start, end) in zip((64 * 1024, 128 * 1024, 192 * 1024), regions):
            assert start <= boundary - prefix < end, (boundary, prefix, start, end)
            phases.add(rest[boundary - len(received) : boundary - len(received) + 1])
        assert phases == {b".", b"\r", b"\n"}, phases
        wait_for(lambda: queue_is_empty(d), message="the queue to empty")


# --- 8. restart keeps the schedule ---------------------------------------------------------


def test_kill_9_during_retries_keeps_attempt_numbers_and_first_failure(daemon, tmp_path):
    with Sink(greylist=2) as sink:
        d = relay_daemon(daemon, tmp_path, sink.port, retry="interval = 3\nfixed_interval = true\n")
        queue_id = send(d, ["bob@a.sink.test"], message("survives kill -9"))
        before = deferred_state(d, queue_id)
        assert before.try_number == 1
        assert attempts(d, "bob@a.sink.test") == [(1, "deferred")]
        kill9(d)
        d.start()

        after = wait_for(lambda: (s := mri(d, "a.sink.test")) and s.try_number == 2 and s, timeout=15,
                         message="Domain.mri after the second attempt")
        assert after.first_failure == before.first_failure, (before, after)
        assert after.err_code == 451
        assert attempts(d, "bob@a.sink.test") == [(1, "deferred"), (2, "deferred")]

        (got,) = sink.wait_for_messages(1, timeout=15)
        assert got.recipients == ("bob@a.sink.test",)
        wait_for(lambda: queue_is_empty(d), message="the queue to empty")
        wait_for(lambda: not (d.spool / "domains" / "a.sink.test").exists(), message="domains/a.sink.test to go")
        time.sleep(1)
        assert attempts(d, "bob@a.sink.test") == [(1, "deferred"), (2, "deferred"), (3, "sent")]
        assert len(sink.messages) == 1
        assert sink.rcpt_count("bob@a.sink.test") == 3


def test_kill_9_after_a_partial_delivery_does_not_deliver_the_accepted_recipient_again(daemon, tmp_path):
    with Sink(greylist=1, only={"grey@a.sink.test"}) as sink:
        d = relay_daemon(daemon, tmp_path, sink.port, retry="interval = 3\nfixed_interval = true\n")
        queue_id = send(d, ["ok@a.sink.test", "grey@a.sink.test"], message("half now, half later"))
        (first,) = sink.wait_for_messages(1)
        assert first.recipients == ("ok@a.sink.test",)
        deferred_state(d, queue_id)
        assert sorted(attempts(d, "ok@a.sink.test") + attempts(d, "grey@a.sink.test")) == [(1, "deferred"), (1, "sent")]
        kill9(d)
        d.start()

        messages = sink.wait_for_messages(2, timeout=15)
        assert messages[1].recipients == ("grey@a.sink.test",)
        assert messages[1].data == first.data
        wait_for(lambda: queue_is_empty(d), message="the queue to empty")
        time.sleep(1)
        assert len(sink.messages) == 2
        assert sink.rcpt_count("ok@a.sink.test") == 1
        assert attempts(d, "ok@a.sink.test") == [(1, "sent")]
        assert attempts(d, "grey@a.sink.test") == [(1, "deferred"), (2, "sent")]


# --- 9. SIGUSR2 -------------------------------------------------------------------------------


def test_sigusr2_makes_a_deferred_message_due_at_once(daemon, tmp_path):
    with Sink(greylist=1) as sink:
        d = relay_daemon(daemon, tmp_path, sink.port, retry="interval = 3600\n")
        queue_id = send(d, ["bob@a.sink.test"], message("flushed"))
        state = deferred_state(d, queue_id)
        assert state.next_try - state.last_tried == 3600, state
        time.sleep(1)
        assert sink.messages == []
        signalled = time.monotonic()
        os.kill(d.pid, signal.SIGUSR2)
        (got,) = sink.wait_for_messages(1, timeout=5)
        assert time.monotonic() - signalled < 3
        assert got.recipients == ("bob@a.sink.test",)
        wait_for(lambda: queue_is_empty(d), message="the queue to empty")
        assert attempts(d, "bob@a.sink.test") == [(1, "deferred"), (2, "sent")]


# --- 10. the delay warning (issue 6) -----------------------------------------------------


def test_a_delay_warning_reaches_the_sender_once_and_the_mail_is_still_delivered(daemon, tmp_path):
    with Sink(greylist=4) as sink:
        d = relay_daemon(daemon, tmp_path, sink.port, delivery='delay_warning = "2s"\n')
        content = message("slow but sure")
        send(d, ["bob@a.sink.test"], content, sender=ALICE)
        report = dsn(d, timeout=20)
        check_dsn_envelope(report)
        assert "Delayed" in report["Subject"], report["Subject"]
        _, _, (recipient,), headers = dsn_parts(report)
        assert recipient["Action"] == "delayed" and recipient["Status"] == "4.7.1", recipient
        assert "Subject: slow but sure" in headers.get_content()
        (got,) = sink.wait_for_messages(1, timeout=20)
        assert got.recipients == ("bob@a.sink.test",)
        wait_for(lambda: queue_is_empty(d), message="the queue to empty")
        assert len(maildir_messages(d.spool, "example.test/alice")) == 1  # one warning, never two


# --- 11. hostile peers (issue 18) ---------------------------------------------------------


@pytest.mark.parametrize("mode, line_length, megabytes, text", [
    ("greeting", 100, 0, "peer sent an over-long reply (more than 100 lines)"),
    ("ehlo", 1000, 10, "peer sent an over-long reply (more than 65536 bytes)"),
])
def test_a_peer_whose_reply_never_ends_leaves_the_mail_deferred_with_a_clear_senderlog_line(
    daemon, tmp_path, mode, line_length, megabytes, text
):
    """Endless `220-` lines, or 10 MB of `250-` lines to EHLO: the attempt ends
    at the reply caps as no answer, the mail waits for its retry (not bounced,
    not lost), and the operator reads why in senderlog, Domain.mri and one
    warning line of the daemon's log."""
    with HostileSink(mode, line_length=line_length, megabytes=megabytes) as peer:
        d = relay_daemon(daemon, tmp_path, peer.port, retry="interval = 600\n")
        queue_id = send(d, ["bob@a.sink.test"], message("hostile"), sender=ALICE)
        state = deferred_state(d, queue_id)
        (line,) = wait_for(lambda: senderlog(d), message="a senderlog line")
    assert (line["queue_id"], line["status"], line["attempt"], line["dsn"]) == (queue_id, "deferred", 1, "4.4.1"), line
    assert line["reply"] == text and line["relay"] == f"127.0.0.1[127.0.0.1]:{peer.port}", line
    raw = (d.spool / "log" / "senderlog").read_text()
    assert raw.count("\n") == 1 and f'reply="{text}"' in raw
    assert (state.err_code, state.err_text, state.try_number) == (0, text, 1), state
    assert faillog(d) == [] and maildir_messages(d.spool, "example.test/alice") == []
    log = d.log.read_text()
    assert log.count(f"SMTP peer [127.0.0.1]:{peer.port}: {text}; connection aborted") == 1, log
    assert "Traceback" not in log
