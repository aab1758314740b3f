"""DataReader: end of data, unstuffing and limits across any chunking."""

from hypothesis import given, strategies as st

from epost.smtp.data import DataReader

line = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
lines = st.lists(st.one_of(line, line.map(lambda b: b"." + b)), max_size=30)


def stuff(content_lines):
    """What a correct client sends for these lines."""
    wire = b"".join((b"." + l if l.startswith(b".") else l) + b"\r\n" for l in content_lines)
    return wire + b".\r\n"


def feed_in_pieces(reader, data, cuts):
    """Feed `data` cut at `cuts`; return (content, rest after CRLF.CRLF or None)."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]
    content = b""
    for index, piece in enumerate(pieces):
        result = reader.feed(piece)
        content += result.content
        if result.done:
            return content, result.rest + b"".join(pieces[index + 1 :])
    return content, None


@given(lines, st.lists(st.integers(min_value=0), max_size=10), st.binary(max_size=20))
def test_any_chunking_gives_the_unstuffed_content_and_the_rest(content_lines, cuts, after):
    reader = DataReader(max_size=10**6)
    content, rest = feed_in_pieces(reader, stuff(content_lines) + after, cuts)
    assert content == b"".join(l + b"\r\n" for l in content_lines)
    assert rest == after
    assert not reader.bare_newline and not reader.line_too_long


def test_empty_message():
    result = DataReader(100).feed(b".\r\nNOOP\r\n")
    assert result.done and result.content == b"" and result.rest == b"NOOP\r\n"


def test_first_line_dot_is_unstuffed():
    result = DataReader(100).feed(b"..hidden\r\n.\r\n")
    assert result.content == b".hidden\r\n"


def test_stuffed_dot_split_across_chunks():
    reader = DataReader(100)
    a = reader.feed(b"x\r\n.")
    b = reader.feed(b".y\r\n.\r\n")
    assert a.content + b.content == b"x\r\n.y\r\n" and b.done


def test_terminator_split_in_every_place():
    data = b"body\r\n.\r\n"
    for cut in range(len(data) + 1):
        reader = DataReader(100)
        first, second = reader.feed(data[:cut]), reader.feed(data[cut:])
        assert first.content + second.content == b"body\r\n"
        assert second.done or first.done


def test_smuggling_endings_do_not_end_data_and_are_flagged():
    for ending in (b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r\n.\r"):
        reader = DataReader(1000)
        result = reader.feed(b"body" + ending + b"MAIL FROM:<x@y>\r\n")
        assert not result.done, ending
        assert reader.bare_newline, ending


def test_bare_lf_split_from_its_cr_is_not_flagged():
    reader = DataReader(1000)
    reader.feed(b"a\r")
    reader.feed(b"\nb\r\n")
    assert not reader.bare_newline


def test_bare_cr_at_chunk_end_is_flagged():
    reader = DataReader(1000)
    reader.feed(b"a\r")
    reader.feed(b"b\r\n.\r\n")
    assert reader.bare_newline


def test_line_of_exactly_1000_octets_is_allowed_and_1001_is_not():
    ok = DataReader(10**6)
    ok.feed(b"x" * 998 + b"\r\n.\r\n")
    assert not ok.line_too_long
    long = DataReader(10**6)
    long.feed(b"x" * 999 + b"\r\n.\r\n")
    assert long.line_too_long


def test_long_line_across_many_chunks_is_flagged():
    reader = DataReader(10**6)
    for _ in range(20):
        reader.feed(b"y" * 100)
    result = reader.feed(b"\r\n.\r\n")
    assert reader.line_too_long and result.done


def test_oversize_message_keeps_reading_but_stores_nothing_more():
    reader = DataReader(max_size=10)
    first = reader.feed(b"0123456789ABCDEF\r\n")
    last = reader.feed(b"more\r\n.\r\n")
    assert reader.too_big and last.done
    assert first.content == b"" and last.content == b""


@given(st.lists(st.integers(min_value=0, max_value=60), max_size=40), st.integers(min_value=2, max_value=50))
def test_the_windowed_line_check_agrees_with_splitting_into_lines(lengths, limit):
    from epost.smtp.data import _has_line_over

    data = b"\n".join(b"x" * n for n in lengths)
    assert _has_line_over(data, limit) == (max(map(len, data.split(b"\n"))) + 1 > limit)
