"""What the tables share: line reading (as bytes.splitlines splits) and PackedMap (a compact dict)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from epost.routing.tables import PackedMap, TableError, read_table_lines


@given(st.lists(st.sampled_from([b"a", b"\r", b"\n", b" ", b"#", b"\xc3\xa9", b"x@y"]), max_size=40).map(b"".join))
def test_lines_are_numbered_and_split_as_splitlines_does(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("t") / "table"
    path.write_bytes(data)
    texts = [(n, raw.decode().strip()) for n, raw in enumerate(data.splitlines(), start=1)]
    assert read_table_lines(path) == [(n, t) for n, t in texts if t and not t.startswith("#")]


def test_undecodable_bytes_are_named_by_line(tmp_path):
    path = tmp_path / "users"
    path.write_bytes(b"a@b\r\n\r\nc\xff@d\n")
    with pytest.raises(TableError) as caught:
        read_table_lines(path)
    assert str(caught.value) == f"{path}:3: not valid UTF-8"


@given(st.dictionaries(st.text(), st.text(), max_size=30), st.lists(st.text(), max_size=10))
def test_packed_map_answers_as_the_dict_it_was_made_from(items, probes):
    packed = PackedMap(items)
    assert len(packed) == len(items)
    assert dict(packed.items()) == items
    for key in [*items, *probes]:
        assert packed.get(key) == items.get(key)
        assert (key in packed) == (key in items)


def test_packed_map_keeps_empty_values_apart_from_missing_keys():
    packed = PackedMap({"a": "", "ab": "x", "": "empty key"})
    assert (packed.get("a"), packed.get("ab"), packed.get(""), packed.get("b")) == ("", "x", "empty key", None)
