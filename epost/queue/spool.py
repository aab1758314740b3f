"""The durable spool: message content and envelope files, written so a crash never loses mail we took.

A message exists once ``incoming/<ID>.env`` exists.  Content is renamed into
place before its envelope, and the envelope is removed before its content, so
an envelope never points at nothing; a lone ``.msg`` is crash debris that
``recover()`` sweeps away.
"""

from __future__ import annotations

import errno
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from epost.fsutil import fsync_dir, write_atomically
from twisted.python.failure import Failure

from epost.queue.envelope import Envelope

QUEUES = ("incoming", "deferred", "hold")
FOLDERS = (*QUEUES, "tmp", "domains", "mailboxes", "log")
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_QUEUE_ID = re.compile(r"[0-9A-F]{17}")

log = Logger()


class SpoolError(OSError):
    """The spool could not store a message; ``disk_full`` tells SMTP to say 452 4.3.1 rather than 451.

    An OSError (``.errno``, ``.strerror`` = message), so callers catching OSError catch it too.
    """

    def __init__(self, errno_code: int, message: str) -> None:
        super().__init__(errno_code, message)

    @property
    def disk_full(self) -> bool:
        return self.errno in DISK_FULL_ERRNOS

    @classmethod
    def from_oserror(cls, error: OSError, doing: str) -> SpoolError:
        return cls(error.errno or errno.EIO, f"{doing}: {error}")


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


class MessageWriter:
    """Receives one message's content into ``tmp/``; ``write`` never raises so SMTP can finish reading DATA."""

    def __init__(self, spool: Spool, queue_id: str, fd: int) -> None:
        self.queue_id = queue_id
        self.size = 0
        self.error: OSError | None = None
        self._spool = spool
        self._fd: int | None = fd
        self._finished = False  # set by commit() or abort()

    def write(self, data: bytes) -> None:
        """Append to the page cache; the first error is kept for ``commit`` to report."""
        if self.error is not None or self._finished:
            return
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                self.size += written
                view = view[written:]
        except OSError as e:
            self.error = e

    def abort(self) -> None:
        """Forget the message: close and delete the temp file.  Idempotent; a no-op once commit() began."""
        if self._finished:
            return
        self._finished = True
        self._close()
        _unlink(self._spool.tmp / f"{self.queue_id}.msg")

    def commit(self, envelope: Envelope) -> Deferred[str]:
        """Make the message durable in ``incoming/``; fires with the queue id only once it is on disk."""
        if self._finished:
            raise RuntimeError(f"message {self.queue_id} already committed or aborted")
        if envelope.queue_id != self.queue_id:
            raise ValueError(f"envelope {envelope.queue_id} does not belong to {self.queue_id}")
        self._finished = True
        return self._spool._request_commit(self, envelope)

    def _close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


class Spool:
    """The spool folder (SPEC §4).  Blocking methods are meant for a thread; ``*_async`` ones use the pool."""

    def __init__(
        self,
        root: Path,
        *,
        reactor: Any,
        threadpool: Any,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.on_commit: list[Callable[[str], None]] = []
        self._reactor = reactor
        self._threadpool = threadpool
        self._clock = clock
        self._last_id: int | None = None  # seeded from the queue folders on first use
        self._waiting: list[tuple[MessageWriter, Envelope, Deferred[str]]] = []
        self._committing = False

    def create_folders(self) -> None:
        for name in FOLDERS:
            (self.root / name).mkdir(parents=True, exist_ok=True)

    # -- queue ids ---------------------------------------------------------

    def new_queue_id(self) -> str:
        """13 hex digits of microseconds + 4 of a counter: unique, and sorted by arrival as strings.

        Strictly increasing within the process even when the clock steps back,
        and seeded past every ID already queued so a restart never reuses one.
        """
        if self._last_id is None:
            self._last_id = max((int(q, 16) for q in self._all_queue_ids()), default=0)
        self._last_id = max((self._clock() // 1000) << 16, self._last_id + 1)
        return f"{self._last_id:017X}"

    def _all_queue_ids(self) -> set[str]:
        ids: set[str] = set()
        for folder in (*QUEUES, "tmp"):
            try:
                names = os.listdir(self.root / folder)
            except FileNotFoundError:
                continue
            ids.update(n[:17] for n in names if _QUEUE_ID.fullmatch(n[:17]))
        return ids

    # -- receiving -----------------------------------------------------------

    def open_message(self) -> MessageWriter:
        """Start a new message in ``tmp/``; O_EXCL guards against another process choosing the same ID."""
        while True:
            queue_id = self.new_queue_id()
            path = self.tmp / f"{queue_id}.msg"
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            except FileExistsError:
                continue
            except OSError as e:
                raise SpoolError.from_oserror(e, f"cannot create {path}") from e
            return MessageWriter(self, queue_id, fd)

    def _request_commit(self, writer: MessageWriter, envelope: Envelope) -> Deferred[str]:
        d: Deferred[str] = Deferred()
        self._waiting.append((writer, envelope, d))
        self._start_batch()
        return d

    def _start_batch(self) -> None:
        """Group commit: while one batch is on disk the next ones gather, so one folder fsync serves many."""
        if self._committing or not self._waiting:
            return
        batch, self._waiting = self._waiting, []
        self._committing = True
        items = [(w, e) for w, e, _ in batch]
        done = deferToThreadPool(self._reactor, self._threadpool, self._commit_batch, items)
        done.addBoth(self._batch_done, batch)

    def _batch_done(self, results: list[SpoolError | None] | Failure, batch: list[Any]) -> None:
        self._committing = False
        self._start_batch()
        for i, (writer, _, d) in enumerate(batch):
            outcome = results if isinstance(results, Failure) else results[i]
            if outcome is None:
                self._tell_subscribers(writer.queue_id)
                d.callback(writer.queue_id)
            else:
                d.errback(outcome)

    def _tell_subscribers(self, queue_id: str) -> None:
        for hook in list(self.on_commit):
            try:
                hook(queue_id)
            except Exception:
                log.failure("on_commit hook {hook!r} failed for {queue_id}", hook=hook, queue_id=queue_id)

    def _commit_batch(self, items: list[tuple[MessageWriter, Envelope]]) -> list[SpoolError | None]:
        """Runs in a thread: put each message in place, then one fsync of ``incoming/`` for them all."""
        results: list[SpoolError | None] = []
        for writer, envelope in items:
            try:
                self._place(writer, envelope)
                results.append(None)
            except OSError as e:
                self._discard(writer.queue_id)
                results.append(SpoolError.from_oserror(e, f"cannot queue {writer.queue_id}"))
        if any(r is None for r in results):
            try:
                fsync_dir(self.root / "incoming")
            except OSError as e:
                error = SpoolError.from_oserror(e, "cannot fsync incoming/")
                for i, (writer, _) in enumerate(items):
                    if results[i] is None:
                        self._discard(writer.queue_id)
                        results[i] = error
        return results

    def _place(self, writer: MessageWriter, envelope: Envelope) -> None:
        queue_id = writer.queue_id
        try:
            if writer.error is not None:
                raise writer.error
            assert writer._fd is not None
            os.fsync(writer._fd)
        finally:
            writer._close()
        env_tmp = self.tmp / f"{queue_id}.env"
        _write_synced(env_tmp, envelope.to_bytes())
        incoming = self.root / "incoming"
        os.rename(self.tmp / f"{queue_id}.msg", incoming / f"{queue_id}.msg")
        os.rename(env_tmp, incoming / f"{queue_id}.env")

    def _discard(self, queue_id: str) -> None:
        """Remove every trace of a failed commit, envelope first, so no half message stays queued."""
        for folder in ("incoming", "tmp"):
            for suffix in (".env", ".msg"):
                try:
                    _unlink(self.root / folder / f"{queue_id}{suffix}")
                except OSError:
                    log.failure("cannot remove debris of {queue_id}", queue_id=queue_id)

    # -- start-up ------------------------------------------------------------

    def recover(self) -> list[str]:
        """Sweep crash debris (``tmp/``, content without envelope); return queued IDs in arrival order."""
        for name in os.listdir(self.tmp):
            _unlink(self.tmp / name)
        incoming = self.root / "incoming"
        names = set(os.listdir(incoming))
        queued = []
        for name in names:
            stem, _, suffix = name.partition(".")
            if not _QUEUE_ID.fullmatch(stem):
                continue
            if suffix == "msg" and f"{stem}.env" not in names:
                _unlink(incoming / name)
            elif suffix == "env":
                if f"{stem}.msg" in names:
                    queued.append(stem)
                else:
                    log.error("{path} has no content; left for the operator", path=incoming / name)
        return sorted(queued)

    # -- queued messages -----------------------------------------------------

    def content_path(self, queue_id: str, queue: str = "incoming") -> Path:
        return self._folder(queue_id, queue) / f"{queue_id}.msg"

    def load(self, queue_id: str, queue: str = "incoming") -> Envelope:
        path = self._folder(queue_id, queue) / f"{queue_id}.env"
        return Envelope.from_bytes(path.read_bytes(), str(path))

    def update(self, envelope: Envelope, queue: str = "incoming") -> None:
        """Atomically replace a queued envelope (blocking: call it in a thread)."""
        folder = self._folder(envelope.queue_id, queue)
        try:
            write_atomically(folder / f"{envelope.queue_id}.env", envelope.to_bytes(), temp_dir=self.tmp)
        except OSError as e:
            raise SpoolError.from_oserror(e, f"cannot update {envelope.queue_id}") from e

    def update_async(self, envelope: Envelope, queue: str = "incoming") -> Deferred[None]:
        return deferToThreadPool(self._reactor, self._threadpool, self.update, envelope, queue)

    def remove(self, queue_id: str, queue: str = "incoming") -> None:
        """Delete a message, envelope first so a crash half-way leaves only sweepable content."""
        folder = self._folder(queue_id, queue)
        _unlink(folder / f"{queue_id}.env")
        _unlink(folder / f"{queue_id}.msg")
        fsync_dir(folder)

    def _folder(self, queue_id: str, queue: str) -> Path:
        """Checks both names, so an ID from the command line can never reach outside the spool."""
        if queue not in QUEUES:
            raise ValueError(f"unknown queue {queue!r}")
        if not _QUEUE_ID.fullmatch(queue_id):
            raise ValueError(f"bad queue id {queue_id!r}")
        return self.root / queue


def _write_synced(path: Path, data: bytes) -> None:
    """Create ``path`` with ``data`` on disk (not just in the page cache); remove it on failure."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink(path)
        raise
    os.close(fd)
