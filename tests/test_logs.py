"""senderlog and faillog lines follow SPEC §4 exactly; LineLog appends flushed lines and follows rotation."""

import errno
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from epost.logs import (
    ELLIPSIS,
    REPLY_LIMIT,
    LineLog,
    faillog_line,
    parse_senderlog_line,
    printable,
    senderlog_line,
    single_line,
)

WHEN = datetime(2026, 11, 29, 8, 0, 0, tzinfo=timezone.utc).timestamp() + 0.123
JST = timezone(timedelta(hours=9))
FAIL_WHEN = datetime(2026, 11, 1, 10, 29, 51, tzinfo=JST).timestamp()

EXAMPLE = dict(
    when=WHEN,
    queue_id="QUEUEID",
    sender="a@b",
    recipient="c@d",
    relay="host[ip]:port",
    delay=1.23,
    attempt=2,
    status="sent",
    dsn="2.0.0",
    reply="250 2.0.0 Ok",
)
EXAMPLE_LINE = (
    '2026-11-29T08:00:00.123Z QUEUEID from=<a@b> to=<c@d> relay=host[ip]:port '
    'delay=1.23 attempt=2 status=sent dsn=2.0.0 reply="250 2.0.0 Ok"'
)


def test_a_tab_in_a_reply_is_written_backslash_t_on_the_one_senderlog_line():
    line = senderlog_line(**{**EXAMPLE, "reply": "451 4.7.1\tgreylisted"})
    assert line.endswith(r'reply="451 4.7.1\\tgreylisted"') and "\t" not in line
    assert parse_senderlog_line(line + "\n")["reply"] == "451 4.7.1\\tgreylisted"


def test_senderlog_spec_example():
    assert senderlog_line(**EXAMPLE) == EXAMPLE_LINE


def test_senderlog_example_parses_back():
    assert parse_senderlog_line(EXAMPLE_LINE + "\n") == EXAMPLE


def test_senderlog_null_sender_quotes_and_newlines():
    line = senderlog_line(**{**EXAMPLE, "sender": "", "reply": '550 5.1.1 "no"\r\nsuch \\ user', "relay": ""})
    assert ' from=<> ' in line
    assert ' relay="" ' in line
    assert line.endswith(r'reply="550 5.1.1 \"no\" | such \\ user"')
    assert "\n" not in line


def test_senderlog_time_is_utc_with_milliseconds():
    assert senderlog_line(**{**EXAMPLE, "when": 0.0}).startswith("1970-01-01T00:00:00.000Z ")
    assert senderlog_line(**{**EXAMPLE, "when": 59.9996}).startswith("1970-01-01T00:01:00.000Z ")


def test_bad_senderlog_line_raises_value_error():
    for bad in ("", "garbage", EXAMPLE_LINE.replace("to=", "xx="), EXAMPLE_LINE[:-1], EXAMPLE_LINE.replace("2026-", "20x6-")):
        with pytest.raises(ValueError):
            parse_senderlog_line(bad)


texts = st.text(st.characters(blacklist_categories=("Cs",)))


@given(
    when=st.integers(min_value=0, max_value=2**35).map(lambda ms: ms / 1000),
    sender=texts,
    recipient=texts,
    relay=texts,
    delay=st.floats(min_value=0, max_value=1e6),
    attempt=st.integers(min_value=0, max_value=10**6),
    status=st.sampled_from(["sent", "deferred", "bounced"]),
    dsn=texts,
    reply=texts,
)
def test_senderlog_parse_inverts_format(when, sender, recipient, relay, delay, attempt, status, dsn, reply):
    fields = dict(
        when=when, queue_id="0123456789ABCDEF0", sender=sender, recipient=recipient, relay=relay,
        delay=delay, attempt=attempt, status=status, dsn=dsn, reply=reply,
    )
    line = senderlog_line(**fields)
    assert single_line(line) == line
    expected = {key: printable(value) if isinstance(value, str) else value for key, value in fields.items()}
    expected["reply"] = printable(reply, REPLY_LIMIT)
    expected["delay"] = float(f"{delay:.2f}")
    assert parse_senderlog_line(line) == expected


def test_faillog_spec_example_in_local_time():
    line = faillog_line(FAIL_WHEN, "QUEUEID", "hostname", "a@b", "c@d", "550 5.1.1 User unknown", tz=JST)
    assert line == "<QUEUEID@hostname> send fail on [01/Nov/2026:10:29:51] from a@b to c@d [550 5.1.1 User unknown]"


def test_faillog_uses_the_given_zone():
    line = faillog_line(FAIL_WHEN, "Q", "h", "a@b", "c@d", "550 x", tz=timezone.utc)
    assert "[01/Nov/2026:01:29:51]" in line


def test_faillog_no_answer_and_null_sender():
    line = faillog_line(FAIL_WHEN, "Q", "mx.example.jp", "", "c@d", None, tz=JST)
    assert line == "<Q@mx.example.jp> send fail on [01/Nov/2026:10:29:51] from <> to c@d [Unable to deliver to destination domain]"


def test_faillog_flattens_multiline_reply():
    line = faillog_line(FAIL_WHEN, "Q", "h", "a@b", "c@d", "550-first\r\n550 second", tz=JST)
    assert line.endswith("[550-first | 550 second]")


def test_linelog_appends_and_flushes_each_line(tmp_path: Path):
    path = tmp_path / "senderlog"
    path.write_text("old\n")
    log = LineLog(path)
    log.write("one")
    assert path.read_text() == "old\none\n"  # readable before close
    log.write("two\nstill two")
    assert path.read_text() == "old\none\ntwo still two\n"
    log.close()


def test_linelog_follows_rotation_within_a_second(tmp_path: Path):
    now = [100.0]
    path = tmp_path / "faillog"
    log = LineLog(path, clock=lambda: now[0])
    log.write("before")
    os.rename(path, tmp_path / "faillog.1")
    log.write("still the old file")  # checked at most once a second
    now[0] += 1
    log.write("after")
    assert (tmp_path / "faillog.1").read_text() == "before\nstill the old file\n"
    assert path.read_text() == "after\n"
    path.unlink()
    now[0] += 1
    log.write("again")
    assert path.read_text() == "again\n"
    log.close()


def test_linelog_reopen(tmp_path: Path):
    path = tmp_path / "log"
    log = LineLog(path)
    log.write("a")
    log.reopen()
    log.write("b")
    assert path.read_text() == "a\nb\n"
    log.close()
    log.close()  # idempotent


# --- text from peers: printable, one line, capped (issue 18) -------------------


def test_printable_escapes_controls_and_joins_reply_lines_visibly():
    assert printable("250 ok\x1b[2J\x7f\x85\u202e") == "250 ok\\x1b[2J\\x7f\\x85\\u202e"
    assert printable("550-5.7.1 first\r\n550 5.7.1 second\n") == "550-5.7.1 first | 550 5.7.1 second | "
    assert printable("a\u2028b\x0bc\rd") == "a\\u2028b\\x0bc | d"
    assert printable("x" * 600, 512) == "x" * 511 + ELLIPSIS
    assert printable("x" * 512, 512) == "x" * 512


def test_printable_without_joining_lines_escapes_every_line_break_like_python():
    """For addresses and other values that are not replies (`epost queue`, `epost show`)."""
    assert printable("evil\r\n@x\tb\u2028\udcff", join_lines=False) == "evil\\r\\n@x\\tb\\u2028\\udcff"
    assert printable(" a\nb ", join_lines=False) == " a\\nb "


@given(st.text(), st.booleans())
def test_printable_is_idempotent_and_printable_either_way(text, join_lines):
    once = printable(text, 100, join_lines=join_lines)
    assert once.isprintable() and len(once) <= 100
    assert printable(once, 100, join_lines=join_lines) == once


# st.text() never draws surrogates and its texts rarely pass a limit: this one does both
# (lone surrogates as surrogateescape leaves them, line breaks, controls; limits the text outgrows).
_HOSTILE_TEXT = st.text(
    st.one_of(st.characters(codec=None, categories=["Cs", "Cc", "Cf", "Zl", "Zp"]), st.sampled_from("\r\n \tab")),
    max_size=80,
)


@given(_HOSTILE_TEXT, st.integers(min_value=2, max_value=40), st.booleans())
def test_printable_escapes_surrogates_and_controls_and_keeps_to_the_limit(text, limit, join_lines):
    once = printable(text, limit, join_lines=join_lines)
    assert once.isprintable(), ascii(once)
    assert len(once) <= limit
    assert printable(once, limit, join_lines=join_lines) == once
    unlimited = printable(text, join_lines=join_lines)
    if len(unlimited) > limit:
        assert once == unlimited[: limit - len(ELLIPSIS)] + ELLIPSIS
    else:
        assert once == unlimited


@given(st.text())
def test_printable_is_idempotent_and_printable(text):
    once = printable(text, 100)
    assert once.isprintable() and len(once) <= 100
    assert printable(once, 100) == once


def peer_text(data: bytes) -> str:
    """What the client makes of a reply's bytes (SMTPClient decodes with 'replace')."""
    return data.decode("utf-8", "replace")


@given(reply=st.binary(max_size=5000), code=st.sampled_from([None, 250, 451, 550]))
def test_any_bytes_from_a_peer_make_one_printable_senderlog_line_of_bounded_length(reply, code):
    text = peer_text(reply)
    shown = text if code is None else f"{code} {text}"
    line = senderlog_line(**{**EXAMPLE, "reply": shown})
    assert line.isprintable() and len(line.splitlines()) == 1
    head = senderlog_line(**{**EXAMPLE, "reply": ""})
    assert len(line) <= len(head) + 2 * REPLY_LIMIT  # each character at most doubled by quoting
    parsed = parse_senderlog_line(line)
    assert parsed["reply"] == printable(shown, REPLY_LIMIT)
    assert {k: v for k, v in parsed.items() if k != "reply"} == {
        k: v for k, v in parse_senderlog_line(head).items() if k != "reply"
    }


@given(reply=st.binary(max_size=5000))
def test_any_bytes_from_a_peer_make_one_printable_faillog_line_of_bounded_length(reply):
    line = faillog_line(FAIL_WHEN, "Q", "h", "a@b", "c@d", peer_text(reply), tz=JST)
    assert line.isprintable() and len(line.splitlines()) == 1
    assert line.startswith("<Q@h> send fail on [01/Nov/2026:10:29:51] from a@b to c@d [")
    assert line.endswith("]") and len(line) <= 80 + REPLY_LIMIT


def test_linelog_on_a_full_disk_raises_and_reopens_at_the_next_write(tmp_path: Path):
    log = LineLog(Path("/dev/full"))  # every write: ENOSPC
    with pytest.raises(OSError) as raised:
        log.write("lost")
    assert raised.value.errno == errno.ENOSPC
    assert log._file is None  # nothing of "lost" waits in a buffer for the next write
    log.path = tmp_path / "senderlog"
    log.write("next")
    assert log.path.read_text() == "next\n"


def test_linelog_keeps_a_line_cut_short_apart_from_the_next(tmp_path: Path):
    path = tmp_path / "senderlog"
    path.write_text("whole\ncut sh")
    LineLog(path).write("next")
    assert path.read_text() == "whole\ncut sh\nnext\n"
