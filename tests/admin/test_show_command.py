"""`epost show ID`: a queued message's envelope, a blank line, then its content (SPEC §4)."""

from __future__ import annotations

from pathlib import Path

import pytest

from epost.admin import show
from epost.admin.cli import main
from epost.store.database import QueueStore
from epost.store.envelope import Envelope, Recipient
from epost.store.spool import ContentHandle, Spool
from fakes import damage_envelope, queue_message

NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z
QUEUE_ID = "0190000000000A000"
CONTENT = b"Subject: hi\r\n\r\nhello \xff\r\n"


def make_envelope(**changes) -> Envelope:
    values = dict(
        queue_id=QUEUE_ID,
        sender="alice@example.test",
        recipients=(
            Recipient("bob@remote.test", {"kind": "relay", "rule": "gateway.dat:2", "hosts": [["127.0.0.1", 2526]]},
                      attempts=2, last_reply="451 4.7.1 later"),
            Recipient("carol@example.test", {"kind": "local", "rule": "local", "mailbox": "example.test/carol"},
                      state="delivered", attempts=1, last_reply="delivered"),
        ),
        arrival=NOW - 3600,
        size=len(CONTENT),
        client="192.0.2.7",
        retries={"remote.test": {"first_failure": NOW - 3000, "failures": 2, "last_failure": NOW - 600,
                                 "next_attempt": NOW + 600, "last_host": "127.0.0.1[127.0.0.1]:2526"}},
    )
    values.update(changes)
    return Envelope(**values)


def queue(spool: Path, where: str, envelope: Envelope, content: bytes | Path = CONTENT) -> None:
    queue_message(spool, where, envelope, content)


def run(capsysbinary, spool: Path, *argv: str) -> tuple[int, bytes, str]:
    status = main(["show", *argv, "--spool", str(spool)], now=NOW)
    out, err = capsysbinary.readouterr()
    return status, out, err.decode()


def test_show_prints_every_envelope_field_then_a_blank_line_then_the_content_as_stored(tmp_path, capsysbinary):
    queue(tmp_path, "deferred", make_envelope())

    status, out, err = run(capsysbinary, tmp_path, QUEUE_ID)

    head, content = out.split(b"\n\n", 1)
    assert (status, err, content) == (0, "", CONTENT)
    assert head.decode().splitlines() == [
        f"queue-id: {QUEUE_ID}",
        "queue: deferred",
        "arrival: 2027-01-15T07:00:00Z",
        f"size: {len(CONTENT)}",
        "sender: <alice@example.test>",
        "client: 192.0.2.7",
        "listener: relay",
        "auth: ",
        "body: 7BIT",
        "delay-warned: no",
        "trusted: no",
        "recipient: <bob@remote.test>",
        "  state: deferred",
        "  attempts: 2",
        "  failures-5xx: 0",
        "  dsn-sent: no",
        "  last-reply: 451 4.7.1 later",
        '  route: {"kind":"relay","rule":"gateway.dat:2","hosts":[["127.0.0.1",2526]]}',
        "recipient: <carol@example.test>",
        "  state: delivered",
        "  attempts: 1",
        "  failures-5xx: 0",
        "  dsn-sent: no",
        "  last-reply: delivered",
        '  route: {"kind":"local","rule":"local","mailbox":"example.test/carol"}',
        "retry: remote.test",
        "  first-failure: 2027-01-15T07:10:00Z",
        "  failures: 2",
        "  last-failure: 2027-01-15T07:50:00Z",
        "  next-attempt: 2027-01-15T08:10:00Z",
        "  last-host: 127.0.0.1[127.0.0.1]:2526",
    ]


def test_a_signed_message_shows_each_dkim_signature_on_one_line(tmp_path, capsysbinary):
    signature = "DKIM-Signature: v=1; a=rsa-sha256;\r\n b=AAAA\r\n BBBB\r\nDKIM-Signature: v=1; a=ed25519-sha256; b=CC\r\n"
    queue(tmp_path, "incoming", make_envelope(trusted=True, dkim=signature))

    _, out, _ = run(capsysbinary, tmp_path, QUEUE_ID)

    lines = out.split(b"\n\n", 1)[0].decode().splitlines()
    assert "trusted: yes" in lines
    assert [line for line in lines if line.startswith("dkim: ")] == [
        "dkim: DKIM-Signature: v=1; a=rsa-sha256; b=AAAA BBBB",
        "dkim: DKIM-Signature: v=1; a=ed25519-sha256; b=CC",
    ]


@pytest.mark.parametrize("where, state", [("incoming", "incoming"), ("hold", "held")])
def test_a_pending_recipient_is_named_by_its_queue_as_in_epost_queue(tmp_path, capsysbinary, where, state):
    queue(tmp_path, where, make_envelope(retries={}))

    status, out, _ = run(capsysbinary, tmp_path, QUEUE_ID.lower())

    lines = out.split(b"\n\n", 1)[0].decode().splitlines()
    assert status == 0 and f"queue: {where}" in lines and lines[lines.index("recipient: <bob@remote.test>") + 1] == f"  state: {state}"


def test_control_characters_in_the_envelope_are_escaped_one_value_per_line(tmp_path, capsysbinary):
    queue(tmp_path, "incoming", make_envelope(sender="evil\r\n@x.test\x1b[2J",
                                             recipients=(Recipient("x\udcff\u202e@example.org"),)))

    _, out, _ = run(capsysbinary, tmp_path, QUEUE_ID)

    head = out.split(b"\n\n", 1)[0].decode("ascii")
    assert "sender: <evil\\r\\n@x.test\\x1b[2J>" in head.splitlines()
    assert "recipient: <x\\udcff\\u202e@example.org>" in head.splitlines()


@pytest.mark.parametrize("asked, said", [
    ("0190000000000B000", "epost show: 0190000000000B000: not queued (delivered, deleted, or never here)\n"),
    ("../../etc/passwd", "epost show: ../../etc/passwd: not a queue ID (17 hex digits, as `epost queue` shows)\n"),
])
def test_an_unknown_id_is_one_line_on_stderr_and_exit_1(tmp_path, capsysbinary, asked, said):
    queue(tmp_path, "deferred", make_envelope())

    assert run(capsysbinary, tmp_path, asked) == (1, b"", said)


def daemon_move(spool: Path, source: str, target: str) -> None:
    """What the daemon does meanwhile, on its own connection: move the message to `target`."""
    daemon = Spool(spool, reactor=None, threadpool=None)
    daemon.open(create=False)
    try:
        daemon.move(daemon.load(QUEUE_ID, source), source, target)
    finally:
        daemon.close()


def test_a_message_moved_just_before_show_s_one_query_is_found_in_its_new_queue(tmp_path, capsysbinary, monkeypatch):
    """hold -> incoming (a release) once `show` has begun its lookup: `find` reads the queue and the
    envelope in one statement, so nothing can happen in the middle of it; the move is made inside the
    real `find`, right before that statement, and the message is shown in incoming."""
    queue(tmp_path, "hold", make_envelope())
    real_read, looks = QueueStore._read, []

    def read_after_a_release(self, sql, parameters):
        if not looks and sql.startswith("SELECT state, envelope FROM message"):  # find's one query
            looks.append(real_read(self, "SELECT state FROM message WHERE id = ?", (QUEUE_ID,))[0][0])
            daemon_move(tmp_path, "hold", "incoming")
            rows = real_read(self, sql, parameters)
            looks.append(rows[0][0])
            return rows
        return real_read(self, sql, parameters)

    monkeypatch.setattr(QueueStore, "_read", read_after_a_release)
    status, out, err = run(capsysbinary, tmp_path, QUEUE_ID)

    assert (status, err, looks) == (0, "", ["hold", "incoming"])
    assert b"queue: incoming\n" in out and out.endswith(b"\n\n" + CONTENT)


def test_a_message_moved_between_its_envelope_and_its_content_is_shown_whole(tmp_path, capsysbinary, monkeypatch):
    """hold -> incoming after `find` read it in hold and before its content is opened: a move leaves
    the content as it is, so the message is shown whole, in the queue it was read from."""
    queue(tmp_path, "hold", make_envelope())
    real_find, moved = Spool.find, []

    def find_then_release(self, queue_id):
        found = real_find(self, queue_id)
        daemon_move(tmp_path, "hold", "incoming")
        moved.append(self.state_of(queue_id))
        return found

    monkeypatch.setattr(Spool, "find", find_then_release)
    status, out, err = run(capsysbinary, tmp_path, QUEUE_ID)

    assert (status, err, moved) == (0, "", ["incoming"])
    assert b"queue: hold\n" in out and out.endswith(b"\n\n" + CONTENT)


def test_content_that_leaves_the_queue_while_shown_is_still_shown_whole(tmp_path, capsysbinary, monkeypatch):
    """The file spool reused a finished message's files at once, so `show` had to report one
    that left while printed; the store never reuses a large file (it is unlinked, and stays
    readable while open), and inline content is read in one go: what is printed is the message's."""
    large = b"Subject: big\r\n\r\n" + bytes(range(256)) * 2048  # 512 KiB: several chunks of its own file
    (tmp_path / "spilled.msg").write_bytes(large)
    queue(tmp_path, "deferred", make_envelope(size=len(large)), tmp_path / "spilled.msg")
    chunks = ContentHandle.chunks

    def delivered_meanwhile(self, size=64 * 1024):
        for i, chunk in enumerate(chunks(self, size)):
            if i == 1:
                daemon = Spool(tmp_path, reactor=None, threadpool=None)
                daemon.open(create=False)
                daemon.remove(QUEUE_ID, "deferred")
                assert not (tmp_path / "queue" / "large" / QUEUE_ID).exists()
            yield chunk

    monkeypatch.setattr(ContentHandle, "chunks", delivered_meanwhile)
    status, out, err = run(capsysbinary, tmp_path, QUEUE_ID)

    assert (status, err) == (0, "")
    assert out.split(b"\n\n", 1)[1] == large


def test_a_queued_message_whose_large_file_is_missing_shows_its_envelope_and_says_its_content_is_lost(
        tmp_path, capsysbinary):
    """docs/queue.md: the row of a message whose content is lost stays for the operator to see with
    `epost show`: its envelope is printed as usual, stderr names the missing file, and the exit is 1
    (what is printed is not the message)."""
    (tmp_path / "spilled.msg").write_bytes(b"Subject: big\r\n\r\n" + b"x" * 300_000)
    queue(tmp_path, "deferred", make_envelope(), tmp_path / "spilled.msg")
    large = tmp_path / "queue" / "large" / QUEUE_ID
    large.unlink()

    status, out, err = run(capsysbinary, tmp_path, QUEUE_ID)

    assert status == 1
    assert out.decode() == "\n".join(show.envelope_lines("deferred", make_envelope())) + "\n"
    assert out.startswith(f"queue-id: {QUEUE_ID}\nqueue: deferred\n".encode()) and b"\n\n" not in out
    assert err == f"epost show: {QUEUE_ID}: content lost: {large} is missing (the envelope above is all that is left)\n"


def test_a_corrupt_envelope_is_named_and_nothing_is_printed(tmp_path, capsysbinary):
    queue(tmp_path, "deferred", make_envelope())
    damage_envelope(tmp_path, QUEUE_ID, b"{not json\n")

    status, out, err = run(capsysbinary, tmp_path, QUEUE_ID)

    assert (status, out) == (1, b"")
    assert err.startswith(f"epost show: {QUEUE_ID}: {tmp_path}/queue/queue.db:{QUEUE_ID}: corrupt envelope:")


def test_on_a_spool_with_no_queue_store_yet_nothing_is_queued_and_no_store_is_made(tmp_path, capsysbinary):
    assert run(capsysbinary, tmp_path, "0190000000000B000") == (
        1, b"", "epost show: 0190000000000B000: not queued (the spool has no queue yet)\n")
    assert run(capsysbinary, tmp_path, "../x") == (
        1, b"", "epost show: ../x: not a queue ID (17 hex digits, as `epost queue` shows)\n")
    assert not (tmp_path / "queue").exists()


def test_show_needs_a_spool_folder(tmp_path, capsysbinary):
    assert run(capsysbinary, tmp_path / "nowhere", QUEUE_ID) == (
        1, b"", f"epost: {tmp_path}/nowhere: no spool folder (give --spool or --config)\n")


def test_the_operating_guide_s_example_shows_every_envelope_field_show_prints():
    """docs/operating.md's `epost show` example lists the message-level keys in the order they are printed."""
    guide = (Path(__file__).parents[2] / "docs" / "operating.md").read_text()
    example = guide.split("$ epost show ", 1)[1].split("\nrecipient: ", 1)[0].splitlines()[1:]
    signed = make_envelope(trusted=True, dkim="DKIM-Signature: v=1; b=A\r\nDKIM-Signature: v=1; b=B\r\n")
    printed = [line.split(":", 1)[0] for line in show.envelope_lines("deferred", signed)]
    assert [line.split(":", 1)[0] for line in example] == printed[: printed.index("recipient")]
