"""The relay_recipients table (SPEC §3.5): parsing, bad lines, lookups, live reload."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, strategies as st
import os

from fakes import ClockReactor, SynchronousThreadPool

from epost.routing import live
from epost.routing.live import LiveTable, TableWatcher
from epost.routing.relay_recipients import load_relay_recipients, parse_relay_recipient
from epost.routing.tables import TableError
from epost.address import parse_mailbox


def test_missing_file_is_no_table_not_an_empty_one(tmp_path: Path) -> None:
    table = load_relay_recipients(tmp_path / "relay_recipients")
    assert not table.present


def test_addresses_and_domains_with_comments_case_insensitive(tmp_path: Path) -> None:
    path = tmp_path / "relay_recipients"
    path.write_text("# valid addresses\n\nAlice@Op.Test\n  @all.test  \n# bob@op.test\n")
    table = load_relay_recipients(path)
    assert table.present and len(table) == 2
    assert table.lookup(parse_mailbox("alice@op.test")) == 3
    assert table.lookup(parse_mailbox("ALICE@OP.TEST")) == 3
    assert table.lookup(parse_mailbox("anyone@all.test")) == 4
    assert table.lookup(parse_mailbox("bob@op.test")) is None
    assert table.lookup(parse_mailbox("x@sub.all.test")) is None  # `@domain` is that domain only


def test_empty_existing_file_lists_nobody(tmp_path: Path) -> None:
    path = tmp_path / "relay_recipients"
    path.write_text("# nobody yet\n")
    table = load_relay_recipients(path)
    assert table.present and table.lookup(parse_mailbox("a@op.test")) is None


@pytest.mark.parametrize(
    "line,problem",
    [
        ("alice@op.test OK", "one address a line"),
        ("alice", "bad address"),
        ("@", "bad domain"),
        ("@bad..domain", "bad domain"),
        ("u@[192.0.2.1]", "address literal"),
        ("a@b@c.test", "bad address"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path: Path, line: str, problem: str) -> None:
    path = tmp_path / "relay_recipients"
    path.write_text(f"ok@op.test\n{line}\n")
    with pytest.raises(TableError) as caught:
        load_relay_recipients(path)
    assert str(caught.value).startswith(f"{path}:2: ") and problem in str(caught.value)


_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
_local = st.from_regex(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]{1,12}", fullmatch=True)


@given(local=_local, labels=st.lists(_label, min_size=1, max_size=3), tld=st.from_regex(r"[a-z]{2,6}", fullmatch=True))
def test_any_listed_address_is_found_in_any_case(local: str, labels: list[str], tld: str) -> None:
    domain = ".".join([*labels, tld])
    kind, key = parse_relay_recipient(f"{local}@{domain}")
    assert kind == "address" and key == f"{local.lower()}@{domain}"
    assert parse_mailbox(f"{local.upper()}@{domain.upper()}").domain == domain


@given(st.text(max_size=40))
def test_parser_never_crashes_on_junk(text: str) -> None:
    try:
        parse_relay_recipient(text.strip() or "x")
    except ValueError:
        pass


def test_live_table_appears_with_its_file_and_keeps_the_previous_on_a_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "relay_recipients"
    live_table = LiveTable(path, load_relay_recipients, refuse_empty=True)
    assert not live_table().present
    clock = ClockReactor()
    watcher = TableWatcher([live_table], clock, SynchronousThreadPool(), handle_sighup=False)
    watcher.startService()

    def settle() -> None:  # an edit is read once its stamp has held for a second
        for _ in range(5):
            clock.advance(live.POLL_INTERVAL)

    path.write_text("a@op.test\n")
    os.utime(path, ns=(10**9, 10**9))
    settle()
    assert live_table().present and live_table().lookup(parse_mailbox("a@op.test")) == 1
    path.write_text("a@op.test\nnot an address\n")
    os.utime(path, ns=(2 * 10**9, 2 * 10**9))
    settle()
    assert live_table.failures == 1
    assert live_table().lookup(parse_mailbox("a@op.test")) == 1  # the previous table stays in force
    path.unlink()
    settle()
    assert live_table().present  # a table with entries is not dropped by deleting its file ...
    watcher.reload_all()
    assert not live_table().present  # ... until SIGHUP: then verification by probe again
    watcher.stopService()
