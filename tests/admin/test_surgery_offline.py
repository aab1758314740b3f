"""Queue surgery with the daemon down: `epost hold|release|delete|flush|reroute` work on the queue store."""

from __future__ import annotations

import socket
from pathlib import Path

from epost.admin.cli import main
from epost.store.envelope import Envelope, Recipient
from fakes import queue_message, queued_ids, stored_envelope

NOW = 1_800_000_000.0
SLOW = "0190000000000A000"
FAST = "0190000000000B000"


def deferred(queue_id: str, address: str) -> Envelope:
    domain = address.rpartition("@")[2]
    return Envelope(
        queue_id, "a@example.test",
        (Recipient(address, {"kind": "relay", "rule": "mx", "mx_domain": domain}, attempts=1, last_reply="451 later"),),
        arrival=NOW - 600, size=20,
        retries={domain: {"first_failure": NOW - 600, "failures": 1, "next_attempt": NOW + 3000}},
    )


def where(spool: Path) -> dict[str, list[str]]:
    """The queued IDs by state, from the queue store."""
    return queued_ids(spool)


ON_FILES = ": working on the queue store"


def run(capsys, *argv):
    """Exit status, stdout lines, stderr lines without the note that no daemon runs (tested in test_surgery_lock.py)."""
    status = main(list(argv), now=NOW)
    out, err = capsys.readouterr()
    err = err.splitlines()
    return status, out.splitlines(), err[1:] if err and err[0].endswith(ON_FILES) else err


def test_hold_release_flush_delete_on_the_queue_store(tmp_path, capsys):
    spool = tmp_path / "spool"
    queue_message(spool, "deferred", deferred(SLOW, "x@slow.test"))
    queue_message(spool, "deferred", deferred(FAST, "y@fast.test"))

    assert run(capsys, "hold", "--domain", "SLOW.test", "--spool", "spool") == (0, [f"{SLOW}: on hold"], [])
    assert where(spool)["hold"] == [SLOW]
    status, out, _ = run(capsys, "queue", "--spool", "spool", "--state", "held")
    assert out[0].startswith(SLOW)

    assert run(capsys, "release", SLOW, "--spool", "spool") == (0, [f"{SLOW}: released"], [])
    assert where(spool)["deferred"] == [SLOW, FAST]
    released = stored_envelope(spool, SLOW, "deferred")
    assert released.retries["slow.test"]["next_attempt"] == NOW  # due at once

    assert run(capsys, "flush", "--spool", "spool")[0] == 0
    flushed = stored_envelope(spool, FAST, "deferred")
    assert flushed.retries["fast.test"]["next_attempt"] == NOW

    status, out, err = run(capsys, "delete", FAST, "0190000000000FFFF", "--spool", "spool")
    assert (status, out, err) == (1, [f"{FAST}: deleted"], ["epost delete: 0190000000000FFFF: not queued"])
    assert where(spool) == {"incoming": [], "deferred": [SLOW], "hold": []}


def test_a_malformed_id_is_refused_and_nothing_outside_the_spool_is_touched(tmp_path, capsys):
    spool = tmp_path / "spool"
    queue_message(spool, "deferred", deferred(SLOW, "x@slow.test"))
    status, _, err = run(capsys, "delete", "../../etc/passwd", "--spool", "spool")
    assert status == 1 and err == ["epost delete: ../../etc/passwd: not queued"]
    assert where(spool)["deferred"] == [SLOW]


def test_a_stale_socket_from_a_dead_daemon_means_working_on_the_queue_store(tmp_path, capsys):
    spool = tmp_path / "spool"
    queue_message(spool, "deferred", deferred(SLOW, "x@slow.test"))
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(spool / "control.sock"))  # bound, never listening: connection refused
    stale.close()
    assert run(capsys, "hold", SLOW, "--spool", "spool") == (0, [f"{SLOW}: on hold"], [])


def test_an_action_needs_ids_or_a_domain(tmp_path, capsys):
    (tmp_path / "spool" / "deferred").mkdir(parents=True)
    status, _, err = run(capsys, "hold", "--spool", "spool")
    assert status == 2 and err == ["epost hold: give queue IDs or --domain"]


def test_on_a_spool_with_no_queue_store_yet_every_id_is_not_queued_and_no_store_is_made(tmp_path, capsys):
    (tmp_path / "spool").mkdir()

    status, out, err = run(capsys, "delete", SLOW, "--spool", "spool")

    assert (status, out, err) == (1, [], [f"epost delete: {SLOW}: not queued"])
    assert not (tmp_path / "spool" / "queue").exists()
