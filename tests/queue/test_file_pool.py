"""Reused spool files: never two owners, never a stale byte, never hoarded."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epost.queue.file_pool import FilePool


@pytest.fixture
def root():
    path = Path(tempfile.mkdtemp(prefix="epost-test-"))
    for sub in ("free", "queue"):
        (path / sub).mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def inodes_in(folder: Path) -> set[int]:
    """The files in `folder`, by inode: pool names are the pool's own."""
    return {entry.stat().st_ino for entry in folder.iterdir()}


def write(pool: FilePool, path: Path, data: bytes) -> None:
    fd = pool.create(path)
    try:
        os.write(fd, data)
        pool.finish(fd)
    finally:
        os.close(fd)


def test_a_released_file_is_reused_and_holds_only_the_new_bytes(root):
    pool = FilePool(root / "free", [root / "queue"], relist_every=0)
    write(pool, root / "queue" / "a.msg", b"x" * 5000)
    inode = os.stat(root / "queue" / "a.msg").st_ino
    pool.release(root / "queue" / "a.msg")
    assert not (root / "queue" / "a.msg").exists()
    write(pool, root / "queue" / "b.msg", b"short")
    assert os.stat(root / "queue" / "b.msg").st_ino == inode
    assert (root / "queue" / "b.msg").read_bytes() == b"short"
    assert os.listdir(root / "free") == []


def test_a_file_is_reused_only_after_its_old_folder_was_fsynced(root, monkeypatch):
    """Else a crash could bring back the old queue name on an inode that now holds another message."""
    synced = []
    monkeypatch.setattr("epost.queue.file_pool.fsync_dir", lambda folder: synced.append(Path(folder).name))
    pool = FilePool(root / "free", [root / "queue"], relist_every=3600)
    write(pool, root / "queue" / "a.msg", b"old")  # first listing: the pool is empty
    synced.clear()
    released = os.stat(root / "queue" / "a.msg").st_ino
    pool.release(root / "queue" / "a.msg")
    write(pool, root / "queue" / "b.msg", b"new")  # no listing allowed yet: a new file
    assert os.stat(root / "queue" / "b.msg").st_ino != released and inodes_in(root / "free") == {released}
    assert synced == []
    pool._listed_at = float("-inf")  # a second later
    write(pool, root / "queue" / "c.msg", b"new")
    assert synced == ["queue", "free"]
    assert os.listdir(root / "free") == []

def test_an_empty_pool_creates_a_new_file_exclusively(root):
    pool = FilePool(root / "free")
    write(pool, root / "queue" / "a.msg", b"one")
    with pytest.raises(FileExistsError):
        pool.create(root / "queue" / "a.msg")


def test_two_processes_never_get_the_same_file(root):
    """Each pool lists the folder; a name one of them took is skipped by the other (ENOENT)."""
    first, second = FilePool(root / "free", relist_every=0), FilePool(root / "free", relist_every=0)
    for i in range(4):
        write(first, root / "queue" / f"{i}.msg", b"old")
    for i in range(4):
        first.release(root / "queue" / f"{i}.msg")
    inodes = []
    for i in range(4):  # both list the pool; whichever renames a name first has it
        for name, pool in ((f"a{i}", first), (f"b{i}", second)):
            write(pool, root / "queue" / name, name.encode())
            inodes.append(os.stat(root / "queue" / name).st_ino)
    assert len(set(inodes)) == 8  # no file has two names
    assert all((root / "queue" / n).read_bytes() == n.encode() for n in os.listdir(root / "queue"))

def test_big_files_and_files_beyond_the_limit_are_deleted(root):
    pool = FilePool(root / "free", limit=2, max_size=100, relist_every=3600)
    write(pool, root / "queue" / "big", b"x" * 101)
    pool.release(root / "queue" / "big")
    assert os.listdir(root / "free") == []
    for name in ("a", "b", "c"):
        write(pool, root / "queue" / name, b"small")
    kept = {os.stat(root / "queue" / name).st_ino for name in ("a", "b")}
    for name in ("a", "b", "c"):
        pool.release(root / "queue" / name)
    assert inodes_in(root / "free") == kept
    assert os.listdir(root / "queue") == []


def test_a_full_pool_looks_again_when_another_process_took_files(root):
    releaser = FilePool(root / "free", limit=2, relist_every=0)
    taker = FilePool(root / "free", relist_every=0)
    for name in ("a", "b", "c"):
        write(releaser, root / "queue" / name, b"1")
    releaser.release(root / "queue" / "a")
    releaser.release(root / "queue" / "b")  # full, by its own count
    write(taker, root / "queue" / "d", b"2")  # takes one of them
    c = os.stat(root / "queue" / "c").st_ino
    releaser.release(root / "queue" / "c")  # full? it looks again: there is room
    assert c in inodes_in(root / "free")

def test_releasing_a_missing_file_is_not_an_error(root):
    FilePool(root / "free").release(root / "queue" / "gone")


def test_without_a_pool_folder_released_files_are_deleted(root):
    """Offline commands may work on a spool made before the pool existed."""
    pool = FilePool(root / "no-such-folder")
    write(pool, root / "queue" / "a", b"data")
    pool.release(root / "queue" / "a")
    assert os.listdir(root / "queue") == []


@settings(max_examples=50, deadline=None)
@given(st.lists(st.binary(max_size=3000), min_size=1, max_size=12))
def test_whatever_the_sizes_each_file_holds_exactly_what_was_written_last(sizes):
    path = Path(tempfile.mkdtemp(prefix="epost-test-"))
    try:
        (path / "free").mkdir()
        pool = FilePool(path / "free", relist_every=0)
        for i, data in enumerate(sizes):
            write(pool, path / f"m{i}", data)
            assert (path / f"m{i}").read_bytes() == data
            pool.release(path / f"m{i}")
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_two_pools_over_one_folder_take_its_names_in_different_orders(root):
    """Each pool shuffles its listing: taken in one order, every claim of one
    worker would race the other's for the same file."""
    for i in range(64):
        (root / "free" / f"f{i:02d}").write_bytes(b"")
    first, second = FilePool(root / "free"), FilePool(root / "free")
    order = [[pool._take_name() for _ in range(64)] for pool in (first, second)]
    assert sorted(order[0]) == sorted(order[1]) == sorted(os.listdir(root / "free"))
    assert order[0] != order[1]  # equal by chance once in 64! runs


def test_an_envelope_reuses_an_envelope_and_content_reuses_content(root):
    """Same-suffix reuse keeps a file's block count, so its fsync writes no bitmaps."""
    pool = FilePool(root / "free", [root / "queue"], relist_every=0)
    inodes: dict[str, set[int]] = {".env": set(), ".msg": set()}
    names = [(f"a{i}{suffix}", suffix, size) for i in range(8) for suffix, size in ((".env", 400), (".msg", 9000))]
    for name, suffix, size in names:  # eight of each: a pool blind to suffixes pairs them all by chance once in 12,870
        write(pool, root / "queue" / name, b"x" * size)
        inodes[suffix].add(os.stat(root / "queue" / name).st_ino)
    for name, _, _ in names:
        pool.release(root / "queue" / name)
    for i in range(8):
        for suffix, size in ((".msg", 8000), (".env", 300)):
            write(pool, root / "queue" / f"b{i}{suffix}", b"y" * size)
    for suffix in (".env", ".msg"):
        assert {os.stat(root / "queue" / f"b{i}{suffix}").st_ino for i in range(8)} == inodes[suffix]
    write(pool, root / "queue" / "c.msg", b"new")  # pool empty: a new file
    assert os.stat(root / "queue" / "c.msg").st_ino not in inodes[".env"] | inodes[".msg"]


def test_with_no_file_of_its_suffix_left_any_released_file_serves(root):
    pool = FilePool(root / "free", [root / "queue"], relist_every=0)
    write(pool, root / "queue" / "a.env", b"envelope")
    inode = os.stat(root / "queue" / "a.env").st_ino
    pool.release(root / "queue" / "a.env")
    write(pool, root / "queue" / "b.msg", b"content, longer than the envelope was")
    assert os.stat(root / "queue" / "b.msg").st_ino == inode
    assert (root / "queue" / "b.msg").read_bytes() == b"content, longer than the envelope was"


def test_a_file_is_cut_only_when_it_was_longer(root, monkeypatch):
    """A needless truncate makes the inode dirty: one more write at its fsync."""
    pool = FilePool(root / "free", [root / "queue"], relist_every=0)
    write(pool, root / "queue" / "a.msg", b"x" * 100)
    pool.release(root / "queue" / "a.msg")
    cuts = []
    real = os.ftruncate
    monkeypatch.setattr(os, "ftruncate", lambda fd, length: (cuts.append(length), real(fd, length)))
    write(pool, root / "queue" / "b.msg", b"y" * 200)  # longer: overwritten, nothing to cut
    assert cuts == []
    pool.release(root / "queue" / "b.msg")
    write(pool, root / "queue" / "c.msg", b"z" * 50)
    assert cuts == [50] and (root / "queue" / "c.msg").read_bytes() == b"z" * 50


def test_an_envelope_released_twice_under_one_queue_name_is_not_reused_before_its_folder_is_fsynced(root, monkeypatch):
    """A message's envelope leaves incoming/ when it is deferred and deferred/ when it is
    done: one pool name for both would let a listing taken between them hand out the
    second file, whose old folder has not been fsynced."""
    synced = []
    monkeypatch.setattr("epost.queue.file_pool.fsync_dir", lambda folder: synced.append(Path(folder).name))
    (root / "deferred").mkdir()
    pool = FilePool(root / "free", [root / "queue", root / "deferred"], relist_every=3600)
    write(pool, root / "queue" / "Q.env", b"first")
    write(pool, root / "deferred" / "Q.env", b"second")  # a move writes the new copy first
    first, second = (os.stat(root / q / "Q.env").st_ino for q in ("queue", "deferred"))
    pool.release(root / "queue" / "Q.env")  # ... then releases the old one
    pool._listed_at = float("-inf")
    pool._relist()  # a listing: it holds the first release
    synced.clear()
    pool.release(root / "deferred" / "Q.env")  # the message is done
    assert inodes_in(root / "free") >= {second}
    write(pool, root / "queue" / "next.env", b"y")
    assert os.stat(root / "queue" / "next.env").st_ino == first  # the second waits for deferred/'s fsync
    assert synced == []


def test_a_spare_file_still_queued_under_another_name_is_never_written(root):
    """After a crash on a file system without a journal, a claim's rename out of free/
    may be lost while the queued name survives: fsck then counts two links."""
    pool = FilePool(root / "free", [root / "queue"], relist_every=0)
    write(pool, root / "queue" / "Q.msg", b"acknowledged")
    queued = os.stat(root / "queue" / "Q.msg").st_ino
    os.link(root / "queue" / "Q.msg", root / "free" / "stale.msg")  # the state after such a crash
    write(pool, root / "queue" / "R.msg", b"new message")
    assert os.stat(root / "queue" / "R.msg").st_ino != queued
    assert (root / "queue" / "Q.msg").read_bytes() == b"acknowledged"
    assert os.stat(root / "queue" / "Q.msg").st_nlink == 1 and not (root / "free" / "stale.msg").exists()


def test_a_pool_that_only_releases_counts_the_folder_without_fsyncing_it(root, monkeypatch):
    """The daemon only releases, on the reactor: looking for room must not fsync folders."""
    synced = []
    monkeypatch.setattr("epost.queue.file_pool.fsync_dir", lambda folder: synced.append(folder))
    releaser = FilePool(root / "free", [root / "queue"], limit=1, relist_every=0)
    for name in ("a", "b"):
        (root / "queue" / name).write_bytes(b"1")
    releaser.release(root / "queue" / "a")
    os.unlink(next((root / "free").iterdir()))  # another process took it
    b = os.stat(root / "queue" / "b").st_ino
    releaser.release(root / "queue" / "b")  # full by its own count: it counts again
    assert inodes_in(root / "free") == {b} and synced == []
