"""Outbound dot-stuffing round-trips through our own DATA reader, whatever the chunking."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from epost.delivery.stuffing import DotStuffer, failure_kind
from epost.smtp.data import DataReader

# Lines that start with dots in every way, including the first line.
line = st.one_of(st.just(b""), st.just(b"."), st.just(b".."), st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")))
lines = st.lists(st.one_of(line, line.map(lambda b: b"." + b)), min_size=0, max_size=20)


def chunks_of(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]


def stuff(chunks: list[bytes]) -> bytes:
    stuffer = DotStuffer()
    return b"".join(stuffer.feed(c) for c in chunks) + stuffer.end()


@given(lines, st.lists(st.integers(min_value=0), max_size=12), st.lists(st.integers(min_value=0), max_size=12))
def test_stuffed_content_reads_back_unchanged_through_any_chunking(content_lines, cuts_out, cuts_in):
    content = b"".join(l + b"\r\n" for l in content_lines)
    wire = stuff(chunks_of(content, cuts_out))
    reader = DataReader(max_size=10**6)
    received = b""
    done = False
    for piece in [p for p in chunks_of(wire, cuts_in) if p]:
        assert not done, "bytes after the end of data"
        result = reader.feed(piece)
        received += result.content
        done = result.done
        if done:
            assert result.rest == b""
    assert done
    assert received == content
    assert not reader.bare_newline


@pytest.mark.parametrize("content", [b".first\r\n", b"a\r\n.\r\nb\r\n", b"..\r\n"])
def test_dots_at_line_start_are_doubled_including_the_first_line(content):
    wire = stuff([content])
    assert b"\r\n.\r\n" not in wire[:-3]  # only the real terminator ends it
    assert wire.endswith(b"\r\n.\r\n")


def test_a_dot_right_after_a_chunk_boundary_is_doubled():
    assert stuff([b"a\r\n", b".b\r\n"]) == b"a\r\n..b\r\n.\r\n"
    assert stuff([b"a\r", b"\n.b\r\n"]) == b"a\r\n..b\r\n.\r\n"


@pytest.mark.parametrize("bare", [b"x\n.\ny", b"x\r.\ry", b"x\r\n.\ny", b"x\n.\r\ny"])
def test_bare_line_ends_never_leave_and_cannot_end_the_message(bare):
    wire = stuff([bare])
    body = wire[: -len(b".\r\n")]
    assert body.count(b"\r") == body.count(b"\n") == body.count(b"\r\n")
    assert b"\r\n.\r\n" not in body


def test_missing_final_line_end_is_added():
    assert stuff([b"no newline"]) == b"no newline\r\n.\r\n"
    assert stuff([]) == b".\r\n"


def test_failure_kinds_follow_the_reply_class():
    assert [failure_kind(c) for c in (None, 421, 451, 550, 554)] == ["noanswer", "4xx", "4xx", "5xx", "5xx"]
    with pytest.raises(ValueError):
        failure_kind(250)
