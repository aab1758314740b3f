"""Imports a spool written by the file-based release into the queue store, once.

That release kept each queued message as two files in ``incoming/``,
``deferred/`` or ``hold/``: ``<ID>.env`` (the envelope) and ``<ID>.msg``
(the content). Each message is put into the store with its state and only
then are its files removed, envelope first, so a crash at any point loses
nothing and the next start finishes the job. The little of the file format
this needs (names, pairing, the crash-debris rules of the old ``recover()``)
lives here, so the file spool's code can go.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from twisted.logger import Logger

from epost.fsutil import fsync_dir, unlink_if_present
from epost.store.database import QUEUES
from epost.store.envelope import Envelope, EnvelopeError
from epost.store.spool import MessageWriter  # its spill_size: bigger content becomes a file in queue/large/, as new mail does

if TYPE_CHECKING:
    from epost.store.database import QueueStore

OLD_FILE = re.compile(r"([0-9A-F]{17})\.(env|msg)")  # a queue ID (17 upper-case hex digits) and a suffix
BATCH_MESSAGES = 500  # per transaction
BATCH_BYTES = 32 * 1024 * 1024  # inline content held in memory for one transaction

log = Logger()


def import_file_spool(root: Path, store: QueueStore) -> dict[str, int]:
    """Put the file spool's messages into `store`; returns how many this call imported per state.

    With nothing to import it costs four listdir and four rmdir calls and no
    store query (an old folder goes once the import has emptied it). An
    ID the store already holds (an earlier run stopped before removing its
    files) only has its files removed. A message whose envelope or content
    cannot be read stays in place, logged. A store error (disk full) is raised: what was committed stays,
    the rest stays in files for the next start.
    """
    root = Path(root)
    _empty_pool(root / "free")
    found: dict[str, tuple[list[str], list[str]]] = {}  # ID -> (states holding its .env, states holding its .msg)
    for state in QUEUES:
        try:
            names = os.listdir(root / state)
        except FileNotFoundError:
            continue
        for name in names:
            if match := OLD_FILE.fullmatch(name):
                found.setdefault(match[1], ([], []))[match[2] == "msg"].append(state)
    plan: dict[str, list[tuple[str, Path, list[Path]]]] = {state: [] for state in QUEUES}
    for queue_id, (env_in, msg_in) in sorted(found.items()):
        files = [root / s / f"{queue_id}.env" for s in env_in] + [root / s / f"{queue_id}.msg" for s in msg_in]
        state, env_state = _locate(env_in, msg_in)
        if state is not None:
            plan[state].append((queue_id, root / env_state / f"{queue_id}.env", files))
        elif not env_in or store.state_of(queue_id) is not None:
            _remove(files)  # a lone .msg is crash debris; a lone .env of a stored message, a left-over
        else:
            log.error("{path} has no content; left for the operator", path=files[0])
    counts = {state: _import_state(root, store, state, plan[state]) for state in QUEUES}
    _remove_empty_folders(root)
    if total := sum(counts.values()):
        log.info(
            "imported {total} messages from the file spool (incoming {incoming}, deferred {deferred}, hold {hold})",
            total=total,
            **counts,
        )
    return counts


def not_imported(root: Path) -> int:
    """Envelopes of the file spool still in its folders: what the daemon's next start imports."""
    count = 0
    for state in QUEUES:
        try:
            count += sum(1 for name in os.listdir(Path(root) / state) if name.endswith(".env") and OLD_FILE.fullmatch(name))
        except FileNotFoundError:
            continue
    return count


def _locate(env_in: list[str], msg_in: list[str]) -> tuple[str | None, str | None]:
    """(state, state of the envelope to use), or (None, None) for a message with no content or no envelope.

    The old ``recover()``'s rules: the content says where the message is; the
    envelope beside it wins; else an envelope left in another queue by an
    interrupted move (one with no content beside it) belongs to it.
    """
    for state in msg_in:
        if state in env_in:
            return state, state
    donors = [s for s in env_in if s not in msg_in]
    if msg_in and donors:
        return msg_in[0], donors[0]
    return None, None


def _import_state(root: Path, store: QueueStore, state: str, plan: list[tuple[str, Path, list[Path]]]) -> int:
    """Import one state's messages in transactions of up to BATCH_MESSAGES or BATCH_BYTES."""
    imported = 0
    batch: list[tuple[Envelope, bytes | Path, list[Path]]] = []
    inline = 0
    for queue_id, env_path, files in plan:
        try:
            envelope = Envelope.from_bytes(env_path.read_bytes(), str(env_path))
            if envelope.queue_id != queue_id:
                raise EnvelopeError(f"{env_path}: holds the envelope of {envelope.queue_id}")
            content = _content(root, root / state / f"{queue_id}.msg", queue_id)
        except (OSError, EnvelopeError) as e:
            log.error("{path}: not imported, left in place: {error}", path=env_path, error=e)
            continue
        batch.append((envelope, content, files))
        inline += len(content) if isinstance(content, bytes) else 0
        if len(batch) >= BATCH_MESSAGES or inline >= BATCH_BYTES:
            imported += _commit(store, state, batch)
            batch, inline = [], 0
    return imported + _commit(store, state, batch)


def _content(root: Path, path: Path, queue_id: str) -> bytes | Path:
    """The bytes of a small content; for a large one, a second link to it in ``tmp/``.

    The store renames a Path it is given into ``queue/large/`` before its
    commit: were it the ``.msg`` itself, a crash in between would leave the
    envelope without content here and the store's sweep would delete the
    orphan there. The link goes instead; the ``.msg`` stays until the commit.
    """
    with open(path, "rb") as f:
        data = f.read(MessageWriter.spill_size + 1)
    if len(data) <= MessageWriter.spill_size:
        return data
    link = root / "tmp" / f"{queue_id}.import"
    link.parent.mkdir(exist_ok=True)
    unlink_if_present(link)  # from a run that stopped before its commit
    try:
        os.link(path, link)
    except OSError:  # a file system without hard links
        shutil.copyfile(path, link)
    return link


def _commit(store: QueueStore, state: str, batch: list[tuple[Envelope, bytes | Path, list[Path]]]) -> int:
    """One transaction; then the old files of every message the store holds go. Raises the first store error.

    An ID already stored (EEXIST: a run stopped before removing its files) is
    not imported again, and not counted.
    """
    if not batch:
        return 0
    results = store.put_batch([(envelope, content) for envelope, content, _ in batch], state=state)
    for (_, content, files), error in zip(batch, results):
        if isinstance(content, Path):
            unlink_if_present(content)  # still there only if the store did not take it
        if error is None or error.errno == errno.EEXIST:
            _remove(files)
    # The removals made durable once per batch: after a power cut, files of
    # messages imported (and maybe delivered since) must not come back.
    for folder in {path.parent for _, _, files in batch for path in files}:
        fsync_dir(folder)
    errors = [error for error in results if error is not None and error.errno != errno.EEXIST]
    if errors:
        raise errors[0]
    return results.count(None)


def _remove(files: list[Path]) -> None:
    """Envelopes before contents (`files` lists them so): a crash half-way leaves only a lone .msg."""
    for path in files:
        unlink_if_present(path)


def _remove_empty_folders(root: Path) -> None:
    """The old layout's folders go once empty, so the spool shows only what is in use;
    one still holding a file the import left (logged) stays for the operator."""
    for name in (*QUEUES, "free"):
        try:
            os.rmdir(root / name)
        except FileNotFoundError:
            pass
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                log.warn("{path}: old spool folder not removed: {error}", path=root / name, error=e.strerror)


def _empty_pool(folder: Path) -> None:
    """The old file pool's spare files hold no mail; the store has no use for them."""
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.is_file(follow_symlinks=False):
            unlink_if_present(entry.path)
