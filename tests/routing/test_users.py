"""The users table names every local mailbox once, case-insensitively, and points at bad lines."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from epost.routing.tables import TableError, read_table_lines
from epost.routing.users import Users, load_users
from epost.address import Address, parse_mailbox

HASH = "$scrypt$ln=15,r=8,p=1$c2FsdA$aGFzaA"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "users"
    path.write_text(text)
    return path


def test_good_file_gives_mailboxes_and_hashes(tmp_path: Path) -> None:
    users = load_users(write(tmp_path, f"alice@example.jp:{HASH}\nbob@example.jp\n"))
    assert len(users) == 2
    assert users.mailbox(parse_mailbox("alice@example.jp")) == "example.jp/alice"
    assert users.password_hash(parse_mailbox("alice@example.jp")) == HASH
    assert users.mailbox(parse_mailbox("bob@example.jp")) == "example.jp/bob"
    assert users.password_hash(parse_mailbox("bob@example.jp")) is None  # mailbox that cannot log in
    assert users.mailbox(parse_mailbox("carol@example.jp")) is None
    assert users.password_hash(parse_mailbox("carol@example.jp")) is None


def test_comments_blank_lines_and_spaces_are_ignored(tmp_path: Path) -> None:
    text = f"# the users\n\n   \n  alice@example.jp : {HASH}  \n\t# indented comment\n bob@example.jp \n"
    users = load_users(write(tmp_path, text))
    assert len(users) == 2
    assert users.password_hash(parse_mailbox("alice@example.jp")) == HASH
    assert users.mailbox(parse_mailbox("bob@example.jp")) == "example.jp/bob"


def test_missing_file_is_an_empty_table(tmp_path: Path) -> None:
    users = load_users(tmp_path / "nope")
    assert len(users) == 0
    assert users.mailbox(parse_mailbox("alice@example.jp")) is None
    assert read_table_lines(tmp_path / "nope") == []


def test_lookup_ignores_case_in_local_part_and_domain(tmp_path: Path) -> None:
    users = load_users(write(tmp_path, f"Alice@EXAMPLE.jp:{HASH}\n"))
    assert users.mailbox(parse_mailbox("Alice@Example.JP")) == "example.jp/alice"
    assert users.mailbox(parse_mailbox("alice@example.jp")) == "example.jp/alice"
    assert users.password_hash(parse_mailbox("ALICE@example.JP")) == HASH


def test_international_domain_is_stored_as_a_label(tmp_path: Path) -> None:
    users = load_users(write(tmp_path, "user@Bücher.example\n"))
    assert users.mailbox(parse_mailbox("user@xn--bcher-kva.example")) == "xn--bcher-kva.example/user"


def test_hash_may_contain_colons_and_quoted_local_part_too(tmp_path: Path) -> None:
    users = load_users(write(tmp_path, 'alice@example.jp:a:b:c\n"x:y"@example.jp:h:1\n"p:q"@example.jp\n'))
    assert users.password_hash(parse_mailbox("alice@example.jp")) == "a:b:c"
    assert users.password_hash(Address("x:y", "example.jp")) == "h:1"
    assert users.mailbox(Address("P:Q", "example.jp")) == "example.jp/p:q"
    assert users.password_hash(Address("p:q", "example.jp")) is None


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("not-an-address", "bad address"),
        ("alice@", "bad address"),
        ("alice@exa mple.jp:hash", "bad address"),
        ("alice@bad_domain-.jp", "bad address"),
        ("alice@example.jp:", "empty password hash"),
        ("alice@example.jp:   ", "empty password hash"),
        ("alice@[192.0.2.1]", "must be a name"),
        ('"../etc"@example.jp', "folder name"),
        ('"a/b"@example.jp', "folder name"),
        ("a/b@example.jp", "folder name"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path: Path, line: str, problem: str) -> None:
    path = write(tmp_path, f"# users\nalice2@example.jp\n{line}\n")
    with pytest.raises(TableError) as caught:
        load_users(path)
    assert (caught.value.path, caught.value.line) == (path, 3)
    assert str(caught.value).startswith(f"{path}:3: ")
    assert problem in caught.value.problem


def test_bad_line_error_does_not_echo_the_hash(tmp_path: Path) -> None:
    with pytest.raises(TableError) as caught:
        load_users(write(tmp_path, "nobody:secrethash\n"))
    assert "secrethash" not in str(caught.value)


def test_duplicate_address_in_any_case_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, f"alice@example.jp:{HASH}\n\nALICE@Example.JP\n")
    with pytest.raises(TableError) as caught:
        load_users(path)
    assert caught.value.line == 3
    assert "duplicate" in str(caught.value)


def test_undecodable_line_is_a_table_error(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_bytes(b"alice@example.jp\n\xff@example.jp\n")
    with pytest.raises(TableError, match=r":2: not valid UTF-8"):
        load_users(path)


# --- property: whatever valid table we write, we read the same mailboxes back ---

_ATEXT = string.ascii_letters + string.digits + "!#$%&'*+=?^_`{|}~-"  # no "/": a folder name
_atom = st.text(_ATEXT, min_size=1, max_size=8)
_dot_string = st.lists(_atom, min_size=1, max_size=3).map(".".join)
_quoted = st.text(string.printable[:95].replace("/", ""), min_size=1, max_size=10).filter(
    lambda s: not s.startswith(".")
)
_label = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9-]{0,10}[A-Za-z0-9])?", fullmatch=True)
_domain = st.builds(
    lambda labels, tld: ".".join([*labels, tld]),
    st.lists(_label, min_size=1, max_size=3),
    st.from_regex(r"[A-Za-z]{2,6}", fullmatch=True),
)
# A line starting with "#" is a comment: such a local part must be written quoted ("#x"@...).
_address = st.builds(Address, st.one_of(_dot_string, _quoted), _domain).filter(
    lambda address: not str(address).startswith("#")
)
_printable_hash = st.text(string.printable[:94], min_size=1, max_size=40).map(str.strip).filter(bool)
_hash = st.one_of(st.none(), _printable_hash)


@given(
    st.lists(
        st.tuples(_address, _hash),
        unique_by=lambda entry: (entry[0].local.lower(), entry[0].domain.lower()),
        max_size=20,
    )
)
def test_written_table_reads_back_the_same_mailboxes(tmp_path_factory, entries) -> None:
    path = tmp_path_factory.mktemp("users") / "users"
    path.write_text("".join(f"{address}\n" if h is None else f"{address}:{h}\n" for address, h in entries))
    users = load_users(path)
    assert len(users) == len(entries)
    for address, password_hash in entries:
        looked_up = parse_mailbox(str(address))
        assert users.mailbox(looked_up) == f"{address.domain.lower()}/{address.local.lower()}"
        assert users.password_hash(looked_up) == password_hash


def test_domains_are_walked_once_per_table():
    """Mail Control asks on every dashboard view; the table never changes, so one walk serves them all."""
    users = Users({"a@one.test": "", "b@two.test": "x", "c@one.test": None})
    assert users.domains() == {"one.test", "two.test"}
    assert users.domains() is users.domains()
