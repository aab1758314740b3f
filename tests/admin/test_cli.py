"""The `epost` admin command: check-config and queue, run through main() and the installed console script."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from epost.admin import queue_listing
from epost.admin.cli import main
from epost.store.envelope import Envelope, Recipient
from epost.store.database import QueueStore
from epost.tls import ensure_self_signed
from fakes import damage_envelope, queue_message

NOW = 1_800_000_000.0
FIRST = "0190000000000A000"
SECOND = "0190000000000B000"
THIRD = "0190000000000C100"


def write_config(path: Path, text: str = "") -> Path:
    path.write_text('[server]\nhostname = "mx.example.test"\n' + text)
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str], str]:
    status = main(list(argv), now=NOW)
    out, err = capsys.readouterr()
    return status, out.splitlines(), err


# --- check-config -------------------------------------------------------------


def test_check_config_good_config_prints_only_ok(tmp_path, capsys):
    cert, key = ensure_self_signed(tmp_path / "tls", "mx.example.test")
    for table in ("users", "aliases", "gateway.dat"):
        (tmp_path / table).write_text("")
    (tmp_path / "users").write_text("alice@example.test\n")
    config = write_config(tmp_path / "epost.toml", (
        f'tls_cert = "{cert}"\ntls_key = "{key}"\n'
        '[routing]\nusers = "users"\naliases = "aliases"\ngateway_table = "gateway.dat"\n'
    ))

    assert run(capsys, "check-config", "--config", str(config)) == (0, [f"ok: {config}"], "")


def test_check_config_bad_value_names_file_and_key(tmp_path, capsys):
    config = write_config(tmp_path / "epost.toml", "[retry]\ninterval = -5\n")

    status, out, _ = run(capsys, "--config", str(config), "check-config")

    assert status == 1
    assert out == [f"{config}:retry.interval: must be a positive integer, got -5"]


def test_check_config_reports_bad_users_line_and_keeps_going(tmp_path, capsys):
    (tmp_path / "users").write_text("alice@example.test\nnot an address\n")
    config = write_config(tmp_path / "epost.toml", (
        'tls_cert = "missing.pem"\ntls_key = "missing.key"\n[routing]\nusers = "users"\n'
    ))

    status, out, _ = run(capsys, "check-config", "--config", str(config))

    assert status == 1
    assert any(line.startswith(f"{tmp_path / 'users'}:2: bad address") for line in out)
    assert f"{tmp_path / 'missing.pem'}: cannot read certificate: No such file or directory" in out
    assert not any(line.startswith("ok:") for line in out)


def test_check_config_mentions_missing_users_file_without_failing(tmp_path, capsys):
    config = write_config(tmp_path / "epost.toml")

    status, out, _ = run(capsys, "check-config", "--config", str(config))

    assert status == 0
    assert f"{tmp_path / 'etc' / 'users'}: not found (empty table)" in out
    assert out[-1] == f"ok: {config}"


def test_check_config_without_config_uses_built_in_defaults(capsys):
    status, out, _ = run(capsys, "check-config")
    assert (status, out[-1]) == (0, "ok: built-in defaults")


def test_unknown_subcommand_is_a_usage_error(capsys):
    assert main(["frobnicate"]) == 2
    assert "invalid choice" in capsys.readouterr().err


# --- queue ----------------------------------------------------------------------


def test_queue_on_an_empty_spool(tmp_path, capsys):
    (tmp_path / "spool").mkdir()  # no queue store yet: nothing queued, and none is created by a reader
    assert run(capsys, "queue", "--spool", "spool") == (0, ["queue is empty"], "")
    assert not (tmp_path / "spool" / "queue").exists()
    store = QueueStore(tmp_path / "spool")
    store.open()
    store.close()
    assert run(capsys, "queue", "--spool", "spool") == (0, ["queue is empty"], "")


def test_queue_on_a_file_spool_not_imported_yet_says_so_instead_of_seeming_empty(tmp_path, capsys):
    """Before the new release's first start its queue store is empty; the old files still hold the mail."""
    for state, queue_id in (("incoming", "0" * 16 + "1"), ("hold", "0" * 16 + "2")):
        (tmp_path / "spool" / state).mkdir(parents=True)
        (tmp_path / "spool" / state / f"{queue_id}.env").write_text("{}")
        (tmp_path / "spool" / state / f"{queue_id}.msg").write_text("x")
    status, out, err = run(capsys, "queue", "--spool", "spool")
    assert (status, out) == (0, ["queue is empty"])
    assert err == (f"epost queue: 2 message(s) of the file spool in {tmp_path / 'spool'}/incoming, deferred and hold "
                   "are not in the queue store yet: the daemon imports them at its next start\n")


def test_queue_on_a_damaged_store_says_so_in_one_line(tmp_path, capsys):
    (tmp_path / "spool" / "queue").mkdir(parents=True)
    (tmp_path / "spool" / "queue" / "queue.db").write_bytes(b"not a database at all" * 100)
    status, out, err = run(capsys, "queue", "--spool", "spool")
    assert (status, out) == (1, [])
    assert err.startswith(f"epost queue: {tmp_path / 'spool' / 'queue' / 'queue.db'}: ") and err.count("\n") == 1


def test_queue_without_a_spool_folder_says_so(tmp_path, capsys):
    status, out, err = run(capsys, "--spool", "nowhere", "queue")
    assert (status, out) == (1, [])
    assert err == f"epost: {tmp_path / 'nowhere'}: no spool folder (give --spool or --config)\n"


def make_spool(spool: Path) -> None:
    queue_message(spool, "hold", Envelope(
        SECOND, "", (Recipient("carol@example.org"),), arrival=NOW - 2 * 3600 - 59, size=2048,
    ))
    queue_message(spool, "incoming", Envelope(
        FIRST, "alice@example.test",
        (
            Recipient("bob@example.org", route={"kind": "relay"}, attempts=1, last_reply="451 4.7.1 later"),
            Recipient("dave@example.test", state="delivered", attempts=1, last_reply="250 ok"),
        ),
        arrival=NOW - 3 * 60 - 5, size=1234,
    ))


def test_queue_lists_each_message_with_recipient_states_and_age(tmp_path, capsys):
    make_spool(tmp_path / "spool")

    status, out, _ = run(capsys, "queue", "--spool", "spool")

    assert status == 0
    assert [line.split() for line in out] == [
        [FIRST, "3m", "1234", "<alice@example.test>", "bob@example.org(incoming", "attempts=1", 'reply="451', "4.7.1",
         'later")', "dave@example.test(delivered", "attempts=1)"],
        [SECOND, "2h", "2048", "<>", "carol@example.org(held)"],
        ["2", "messages"],
    ]


def test_queue_json_is_machine_readable(tmp_path, capsys):
    config = write_config(tmp_path / "epost.toml", 'spool = "spool"\n')
    make_spool(tmp_path / "spool")

    status, out, _ = run(capsys, "queue", "--json", "--config", str(config))

    listing = json.loads("\n".join(out))
    assert status == 0
    assert [(m["id"], m["queue"], m["age_seconds"], m["size"], m["sender"]) for m in listing] == [
        (FIRST, "incoming", 185, 1234, "alice@example.test"),
        (SECOND, "hold", 7259, 2048, ""),
    ]
    assert listing[0]["recipients"][0] == {
        "address": "bob@example.org", "state": "incoming", "attempts": 1, "next_attempt": None,
        "last_reply": "451 4.7.1 later", "route": {"kind": "relay"},
    }
    assert listing[1]["recipients"][0]["state"] == "held"


def test_queue_reports_a_corrupt_envelope_and_lists_the_rest(tmp_path, capsys):
    spool = tmp_path / "spool"
    make_spool(spool)
    queue_message(spool, "deferred", Envelope("0190000000000C000", "a@b.test", (Recipient("c@d.test"),), NOW, 1))
    damage_envelope(spool, "0190000000000C000")

    status, out, _ = run(capsys, "queue", "--spool", "spool")

    assert status == 0
    assert out[2].startswith("0190000000000C000: unreadable envelope (")
    assert "corrupt envelope" in out[2]
    assert out[-1] == "3 messages"


def test_queue_skips_a_message_that_vanishes_while_listing(tmp_path, capsys, monkeypatch):
    """The listing reads each state a page per query (`load_many`); a message the daemon finishes
    between two pages is simply not listed (a damaged one before it still is)."""
    from epost.store import database
    from epost.store.spool import Spool

    spool = tmp_path / "spool"
    make_spool(spool)
    queue_message(spool, "deferred", Envelope("0190000000000C000", "a@b.test", (Recipient("c@d.test"),), NOW, 1))
    queue_message(spool, "deferred", Envelope("0190000000000D000", "a@b.test", (Recipient("c@d.test"),), NOW, 1))
    damage_envelope(spool, "0190000000000C000")
    monkeypatch.setattr(database, "PAGE", 1)  # one envelope a page: C, then D
    real_read, delivered = QueueStore._read, []

    def read_then_deliver(self, sql, parameters):
        rows = real_read(self, sql, parameters)
        if not delivered and parameters[:1] == ("deferred",) and [row[0] for row in rows] == ["0190000000000C000"]:
            delivered.append("0190000000000D000")  # the daemon, between the two pages
            daemon = Spool(spool, reactor=None, threadpool=None)
            daemon.open(create=False)
            try:
                daemon.remove("0190000000000D000", "deferred")
            finally:
                daemon.close()
        return rows

    monkeypatch.setattr(QueueStore, "_read", read_then_deliver)

    status, out, _ = run(capsys, "queue", "--spool", "spool")

    assert delivered == ["0190000000000D000"]  # it was queued when the listing began
    assert status == 0
    assert [line.split()[0] for line in out] == [FIRST, SECOND, "0190000000000C000:", "3"]


def test_queue_escapes_control_characters_in_addresses(tmp_path, capsys):
    queue_message(tmp_path / "spool", "deferred", Envelope(
        FIRST, "evil\n@example.test", (Recipient("x\udcff@example.org"),), arrival=NOW, size=1,
    ))

    status, out, _ = run(capsys, "queue", "--spool", "spool")

    assert out == [f"{FIRST}   0s         1 <evil\\n@example.test> x\\udcff@example.org(deferred)", "1 message"]


def test_queue_shows_next_attempt_route_and_reply_and_filters_by_domain_and_state(tmp_path, capsys):
    spool = tmp_path / "spool"
    make_spool(spool)
    queue_message(spool, "deferred", Envelope(
        THIRD, "alice@example.test",
        (Recipient("eve@slow.example", route={"kind": "relay", "rule": "gateway.dat:2"}, attempts=2,
                   last_reply="451 4.7.1 greylisted"),),
        arrival=NOW - 600, size=10,
        retries={"slow.example": {"first_failure": NOW - 500, "failures": 2, "next_attempt": NOW + 120}},
    ))
    next_time = time.strftime("%H:%M:%S", time.localtime(NOW + 120))

    status, out, _ = run(capsys, "queue", "--spool", "spool", "--domain", "SLOW.example.")
    assert (status, out[-1]) == (0, "1 message")
    assert out[0] == (f'{THIRD}  10m        10 <alice@example.test> eve@slow.example(deferred attempts=2 '
                      f'next={next_time} via=gateway.dat:2 reply="451 4.7.1 greylisted")')

    status, out, _ = run(capsys, "queue", "--spool", "spool", "--state", "held")
    assert [line.split()[0] for line in out] == [SECOND, "1"]

    status, out, _ = run(capsys, "queue", "--spool", "spool", "--json", "--state", "deferred")
    (listing,) = json.loads("\n".join(out))
    assert listing["recipients"][0]["next_attempt"] == NOW + 120


@pytest.mark.parametrize(("seconds", "shown"), [(-5, "0s"), (59, "59s"), (60, "1m"), (7199, "1h"), (86400 * 3, "3d")])
def test_age_is_shown_in_its_largest_whole_unit(seconds, shown):
    assert queue_listing.format_age(seconds) == shown


# --- the installed console script -----------------------------------------------


def test_installed_console_script_runs_check_config(tmp_path):
    config = write_config(tmp_path / "epost.toml")
    script = Path(sys.executable).parent / "epost"

    result = subprocess.run(
        [str(script), "check-config", "--config", str(config)],
        capture_output=True, text=True, timeout=60, check=False,
    )

    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.splitlines()[-1] == f"ok: {config}"
