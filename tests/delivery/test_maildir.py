"""Maildir delivery: complete files in new/ only, LF line endings, unique names."""

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import epost.delivery.maildir as maildir_module
from epost.delivery.maildir import CHUNK, crlf_to_lf, deliver_to_maildir


def spooled(tmp_path: Path, content: bytes) -> Path:
    path = tmp_path / "spooled.msg"
    path.write_bytes(content)
    return path


def test_delivery_lands_in_new_only_with_lf_endings_and_the_prefix(tmp_path):
    maildir = tmp_path / "mailboxes" / "example.jp" / "alice"
    content = spooled(tmp_path, b"Subject: hi\r\n\r\nbody\r\n")
    name = deliver_to_maildir(maildir, content, hostname="mx.example.jp", prefix=b"Delivered-To: alice@example.jp\n")
    assert os.listdir(maildir / "new") == [name]
    assert os.listdir(maildir / "tmp") == []
    assert os.listdir(maildir / "cur") == []
    data = (maildir / "new" / name).read_bytes()
    assert data == b"Delivered-To: alice@example.jp\nSubject: hi\n\nbody\n"
    assert name.endswith(f".mx.example.jp,S={len(data)}")


def test_crlf_split_across_a_chunk_boundary_becomes_one_lf(tmp_path):
    body = b"x" * (CHUNK - 1) + b"\r\n" + b"y\r\n"  # the CR ends the first chunk, the LF starts the second
    content = spooled(tmp_path, body)
    name = deliver_to_maildir(tmp_path / "md", content, hostname="h")
    assert (tmp_path / "md" / "new" / name).read_bytes() == b"x" * (CHUNK - 1) + b"\ny\n"


def test_bare_cr_is_kept_even_at_the_very_end():
    assert b"".join(crlf_to_lf([b"a\r", b"b\r", b"\n\r"])) == b"a\rb\n\r"


@given(st.lists(st.lists(st.sampled_from([b"a", b"\r", b"\n"]), max_size=8).map(b"".join)))
def test_chunking_never_changes_the_result(chunks):
    whole = b"".join(chunks)
    assert b"".join(crlf_to_lf(chunks)) == whole.replace(b"\r\n", b"\n")


def test_names_are_unique(tmp_path):
    content = spooled(tmp_path, b"m\r\n")
    names = {deliver_to_maildir(tmp_path / "md", content, hostname="h") for _ in range(200)}
    assert len(names) == 200
    assert len(os.listdir(tmp_path / "md" / "new")) == 200


def test_hostname_slash_and_colon_are_escaped(tmp_path):
    name = deliver_to_maildir(tmp_path / "md", spooled(tmp_path, b"m"), hostname="a/b:c")
    assert "/" not in name and ":" not in name


def test_failure_leaves_no_file_behind(tmp_path, monkeypatch):
    content = spooled(tmp_path, b"m\r\n")

    def broken(path):
        raise OSError(5, "I/O error")

    monkeypatch.setattr(maildir_module, "fsync_dir", broken)
    (tmp_path / "md" / "tmp").mkdir(parents=True)
    (tmp_path / "md" / "new").mkdir()
    (tmp_path / "md" / "cur").mkdir()
    with pytest.raises(OSError):
        deliver_to_maildir(tmp_path / "md", content, hostname="h")
    assert os.listdir(tmp_path / "md" / "tmp") == []
    assert os.listdir(tmp_path / "md" / "new") == []


def test_missing_content_raises_and_leaves_no_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        deliver_to_maildir(tmp_path / "md", tmp_path / "gone.msg", hostname="h")
    assert os.listdir(tmp_path / "md" / "tmp") == []
