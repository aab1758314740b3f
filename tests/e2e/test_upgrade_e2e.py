"""Upgrade (issue 16): a real daemon started on a spool written by the file-spool release imports it once, then delivers."""

from __future__ import annotations

import time

from e2e_support import maildir_messages, queued, restart, wait_for
from epost.store.envelope import Envelope, Recipient


ALICE = {"kind": "local", "rule": "local", "mailbox": "example.test/alice"}


def old_message(folder, queue_id: str) -> None:
    """`<ID>.msg` + `<ID>.env`, as the file spool wrote them."""
    folder.mkdir(parents=True, exist_ok=True)
    envelope = Envelope(queue_id, "a@b.test", (Recipient("alice@example.test", ALICE),), time.time(), 27)
    (folder / f"{queue_id}.msg").write_bytes(b"Subject: old\r\n\r\nold spool\r\n")
    (folder / f"{queue_id}.env").write_bytes(envelope.to_bytes())


def test_a_file_spool_is_imported_with_its_states_at_start_and_its_mail_delivered(daemon):
    d = daemon(start=False)
    old_message(d.spool / "incoming", "0190000000000A000")
    old_message(d.spool / "hold", "0190000000000B000")

    d.start()

    wait_for(lambda: maildir_messages(d.spool, "example.test/alice"), 10, message="the imported message delivered")
    assert queued(d.spool, "hold") == ["0190000000000B000"]  # held stays held
    assert d.log.read_text().count("imported 2 messages from the file spool") == 1
    assert not (d.spool / "incoming").exists() and not (d.spool / "hold").exists()  # the old layout is gone
    restart(d)
    assert queued(d.spool, "hold") == ["0190000000000B000"]
    assert d.log.read_text().count("imported 2 messages from the file spool") == 1  # once
    assert len(maildir_messages(d.spool, "example.test/alice")) == 1
