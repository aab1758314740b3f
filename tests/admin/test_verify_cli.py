"""`epost route` and `epost check-config` on recipient verification (SPEC §3.5, §8)."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet import task

from epost.admin.cli import main
from epost.delivery.verify import CACHE_FILE, Verdict, VerdictCache

NOW = 1_800_000_000.0


@pytest.fixture
def config(tmp_path: Path) -> Path:
    (tmp_path / "gateway.dat").write_text("op.test,10.0.0.1,25\n")
    path = tmp_path / "epost.toml"
    path.write_text('[server]\nhostname = "mx.example.test"\nspool = "spool"\n'
                    '[routing]\nlocal_domains = ["example.test"]\ngateway_table = "gateway.dat"\n'
                    'relay_recipients = "relay_recipients"\n')
    (tmp_path / "spool").mkdir()
    return path


def run(capsys, *argv: str) -> tuple[int, list[str]]:
    status = main(list(argv), now=NOW)
    return status, capsys.readouterr().out.splitlines()


def test_route_shows_the_relay_recipients_line(config: Path, capsys) -> None:
    (config.parent / "relay_recipients").write_text("# valid\nalice@op.test\n")
    assert run(capsys, "route", "--config", str(config), "alice@op.test")[1] == [
        "alice@op.test: relay via gateway.dat:1 -> 10.0.0.1:25",
        "alice@op.test: verify via relay_recipients:2 -> listed",
    ]
    assert run(capsys, "route", "--config", str(config), "bob@op.test")[1][1] == "bob@op.test: verify via relay_recipients -> 550 5.1.1 not listed"


def test_route_shows_a_cached_verdict_and_nothing_without_one(config: Path, capsys) -> None:
    clock = task.Clock()
    clock.advance(NOW - 10)
    cache = VerdictCache(config.parent / "spool" / CACHE_FILE, clock.seconds)
    cache.put("bob@op.test", Verdict("refused", "550 5.1.1 User unknown", "10.0.0.1[10.0.0.1]:25"))
    cache.save()
    assert run(capsys, "route", "--config", str(config), "bob@op.test")[1][1] == (
        "bob@op.test: verify via cache -> refused until 2027-01-15T08:59:50Z (10.0.0.1[10.0.0.1]:25 said: 550 5.1.1 User unknown)"
    )
    assert run(capsys, "route", "--config", str(config), "carol@op.test")[1] == ["carol@op.test: relay via gateway.dat:1 -> 10.0.0.1:25"]
    assert run(capsys, "route", "--config", str(config), "u@example.test")[1] == ["u@example.test: reject via local -> 550 5.1.1 User unknown in local recipient table"]


def test_check_config_names_a_bad_relay_recipients_line(config: Path, capsys) -> None:
    assert run(capsys, "check-config", "--config", str(config))[0] == 0  # no file: verification by probe, nothing to say
    (config.parent / "relay_recipients").write_text("alice@op.test\nbob at op.test\n")
    status, out = run(capsys, "check-config", "--config", str(config))
    assert status == 1 and any(line.startswith(f"{config.parent / 'relay_recipients'}:2: ") for line in out), out
