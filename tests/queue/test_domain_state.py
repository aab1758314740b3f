"""Domain.mri keeps E-Post's format, round-trips, and is written atomically inside spool/domains only."""

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from epost.logs import REPLY_LIMIT, printable
from epost.queue.domain_state import DomainState, DomainStateStore, format_mri, parse_mri

SPEC_EXAMPLE = (
    "Domain-name: slow.example.jp\n"
    "Last-tried: 1796025600\n"
    "Try-number: 3\n"
    "Err-code: 451\n"
    "Err-text: 4.7.1 greylisted, try again later\n"
    "Next-try: 1796025960\n"
    "First-failure: 1796025000\n"
    "Last-host: mx1.slow.example.jp[192.0.2.10]:25\n"
    "Messages: 12\n"
)
SPEC_STATE = DomainState(
    domain="slow.example.jp",
    last_tried=1796025600,
    try_number=3,
    err_code=451,
    err_text="4.7.1 greylisted, try again later",
    next_try=1796025960,
    first_failure=1796025000,
    last_host="mx1.slow.example.jp[192.0.2.10]:25",
    messages=12,
)

texts = st.text(st.characters(blacklist_categories=("Cs",)))
ints = st.integers(min_value=0, max_value=2**40)


def test_spec_example_is_written_exactly():
    assert format_mri(SPEC_STATE) == SPEC_EXAMPLE


def test_spec_example_parses():
    assert parse_mri(SPEC_EXAMPLE, "x") == SPEC_STATE


@given(texts, texts, st.lists(ints, min_size=6, max_size=6))
def test_round_trip_flattens_line_breaks(err_text, last_host, numbers):
    def state(err: str, host: str) -> DomainState:
        return DomainState("example.jp", *numbers[:3], err, *numbers[3:5], host, numbers[5])

    text = format_mri(state(err_text, last_host))
    assert text.count("\n") == 9 and "\r" not in text
    assert parse_mri(text, "x") == state(printable(err_text, REPLY_LIMIT), printable(last_host))


def test_newlines_in_err_text_become_a_visible_separator():
    state = DomainState("a.jp", err_text="451 first\r\nsecond\nthird")
    assert "Err-text: 451 first | second | third\n" in format_mri(state)


@given(st.binary(max_size=5000))
def test_any_bytes_from_a_peer_make_one_printable_capped_err_text_line(reply):
    text = format_mri(DomainState("a.jp", err_code=550, err_text=reply.decode("utf-8", "replace")))
    lines = text.split("\n")
    assert len(lines) == 10 and lines[-1] == ""
    (err,) = [line for line in lines if line.startswith("Err-text: ")]
    assert err.isprintable() and len(err) <= len("Err-text: ") + REPLY_LIMIT


def test_unknown_keys_ignored_and_missing_keys_default():
    assert parse_mri("Domain-name: a.jp\nX-Future: 1\n\nErr-code: 0\n", "x") == DomainState("a.jp")


def test_bad_line_names_path_and_line():
    with pytest.raises(ValueError, match=r"spool/domains/a.jp/Domain.mri:2:"):
        parse_mri("Domain-name: a.jp\nno colon here\n", "spool/domains/a.jp/Domain.mri")
    with pytest.raises(ValueError, match=r"f:3: Try-number"):
        parse_mri("Domain-name: a.jp\n\nTry-number: three\n", "f")


def test_missing_domain_name_is_an_error():
    with pytest.raises(ValueError, match="Domain-name"):
        parse_mri("Try-number: 1\n", "f")


def test_store_writes_lowercase_folder_and_reads_back(tmp_path: Path):
    store = DomainStateStore(tmp_path / "domains")
    store.write(DomainState("Slow.Example.JP", try_number=1))
    path = tmp_path / "domains" / "slow.example.jp" / "Domain.mri"
    assert path.read_text().startswith("Domain-name: slow.example.jp\n")
    assert store.read("SLOW.example.jp") == DomainState("slow.example.jp", try_number=1)
    assert store.domains() == ["slow.example.jp"]


def test_read_of_unknown_domain_is_none(tmp_path: Path):
    assert DomainStateStore(tmp_path).read("nowhere.jp") is None


def test_atomic_write_leaves_no_temp_files(tmp_path: Path):
    store = DomainStateStore(tmp_path)
    for n in range(3):
        store.write(DomainState("a.jp", try_number=n))
    assert [p.name for p in (tmp_path / "a.jp").iterdir()] == ["Domain.mri"]
    assert store.read("a.jp").try_number == 2


def test_remove_deletes_file_and_folder(tmp_path: Path):
    store = DomainStateStore(tmp_path)
    store.write(DomainState("a.jp"))
    (tmp_path / "a.jp" / ".Domain.mri.crashleft").write_text("x")
    store.remove("a.jp")
    assert list(tmp_path.iterdir()) == []
    assert store.domains() == [] and store.read("a.jp") is None
    store.remove("a.jp")  # nothing there: no error


@pytest.mark.parametrize("name", ["../evil", "a/b", ".", "..", ".hidden", "", "a\nb"])
def test_path_traversal_refused(tmp_path: Path, name: str):
    store = DomainStateStore(tmp_path / "domains")
    for action in (lambda: store.write(DomainState(name)), lambda: store.read(name), lambda: store.remove(name)):
        with pytest.raises(ValueError):
            action()
    assert not any(tmp_path.rglob("*Domain.mri"))
