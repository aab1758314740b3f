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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from twisted.python.failure import Failure

from epost.fsutil import fsync_dir, unlink_if_present, write_atomically

from epost.queue import file_pool
from epost.queue.envelope import Envelope

QUEUES = ("incoming", "deferred", "hold")
FOLDERS = (*QUEUES, "tmp", file_pool.FOLDER, "domains", "mailboxes", "log")
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
QUEUE_ID = re.compile(r"[0-9A-F]{17}")

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


class SpoolStopping(SpoolError):
    """The spool workers stopped (the daemon is stopping) before this commit reached them: SMTP says 421."""


class MessageWriter:
    """Receives one message's content; ``write`` never raises so SMTP can finish reading DATA.

    Content stays in memory until it passes ``spill_size``; only bigger
    messages get their ``tmp/`` file on the reactor thread. Small ones (most
    mail) are written by the commit thread, so the reactor does no file I/O.
    """

    spill_size = 256 * 1024

    def __init__(self, spool: Spool, queue_id: str) -> None:
        self.queue_id = queue_id
        self.temp_path = f"{spool.tmp}/{queue_id}.msg"
        self.size = 0
        self.error: OSError | None = None
        self._spool = spool
        self._chunks: list[bytes] = []
        self._fd: int | None = None
        self._finished = False  # set by commit() or abort()

    def write(self, data: bytes) -> None:
        """Buffer or append to the page cache; the first error is kept for ``commit`` to report."""
        if self.error is not None or self._finished:
            return
        self.size += len(data)
        self._chunks.append(data)
        if self._fd is not None or self.size > self.spill_size:
            try:
                self._flush()
            except OSError as e:
                self.error = e

    @property
    def in_memory(self) -> bool:
        """True while the whole content is still in the buffer."""
        return self._fd is None and self.error is None

    def content(self) -> bytes:
        return b"".join(self._chunks)

    def read_all(self) -> bytes:
        """The whole content so far, also once it spilled to its tmp/ file (to sign it)."""
        if self._fd is None:
            return self.content()
        end = os.lseek(self._fd, 0, os.SEEK_CUR)  # a reused file may be longer than what we wrote
        fd = os.open(self.temp_path, os.O_RDONLY)  # ours is open for writing only
        try:
            written = bytearray()
            while len(written) < end and (chunk := os.pread(fd, end - len(written), len(written))):
                written += chunk
        finally:
            os.close(fd)
        return bytes(written) + self.content()

    def _flush(self) -> None:
        """Write buffered chunks to the ``tmp/`` file, creating it on first use."""
        if self._fd is None:
            self._fd = self._spool.pool.create(self.temp_path)
        chunks, self._chunks = self._chunks, []
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                view = view[os.write(self._fd, view) :]

    def registerProducer(self, producer, streaming: bool) -> None:
        """Writes go straight to the page cache here: nothing to throttle."""

    def unregisterProducer(self) -> None:
        pass

    def abort(self) -> None:
        """Forget the message: close and delete the temp file.  Idempotent; a no-op once commit() began."""
        if self._finished:
            return
        self._finished = True
        self._chunks = []
        if self._fd is not None:
            self._close()
            self._spool.pool.release(self.temp_path)

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
    """The spool folder (SPEC §4).  Its blocking methods run in the spool worker processes (or a thread)."""

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
        self.pool = file_pool.FilePool(self.root / file_pool.FOLDER, [self.root / q for q in (*QUEUES, "tmp")])
        self._queue_dirs = {queue: self.root / queue for queue in QUEUES}
        self.on_commit: list[Callable[[str, Envelope], None]] = []  # (queue id, its envelope)
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
            ids.update(n[:17] for n in names if QUEUE_ID.fullmatch(n[:17]))
        return ids

    # -- receiving -----------------------------------------------------------

    def open_message(self) -> MessageWriter:
        """Start a new message; its ``tmp/`` file is made (or reused, see file_pool) only when needed."""
        return MessageWriter(self, self.new_queue_id())

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
        done = deferToThreadPool(self._reactor, self._threadpool, self.commit_batch, items)
        done.addBoth(self._batch_done, batch)

    def _batch_done(self, results: list[SpoolError | None] | Failure, batch: list[Any]) -> None:
        self._committing = False
        self._start_batch()
        for i, (writer, envelope, d) in enumerate(batch):
            outcome = results if isinstance(results, Failure) else results[i]
            if outcome is None:
                self.notify_committed(writer.queue_id, envelope)
                d.callback(writer.queue_id)
            else:
                d.errback(outcome)

    def notify_committed(self, queue_id: str, envelope: Envelope) -> None:
        for hook in list(self.on_commit):
            try:
                hook(queue_id, envelope)
            except Exception:
                log.failure("on_commit hook {hook!r} failed for {queue_id}", hook=hook, queue_id=queue_id)

    def commit_batch(self, items: list[tuple[MessageWriter, Envelope]]) -> list[SpoolError | None]:
        """Runs in a thread. Writes every file of the batch, then fsyncs them,
        then renames them into ``incoming/`` and fsyncs that folder once: the
        file system can make the whole batch durable in one journal commit."""
        results: list[SpoolError | None] = [None] * len(items)
        envelope_fds: dict[int, int] = {}

        def fail(i: int, error: OSError, doing: str) -> None:
            results[i] = SpoolError.from_oserror(error, f"{doing} {items[i][0].queue_id}")

        for i, (writer, envelope) in enumerate(items):
            try:
                if writer.error is not None:
                    raise writer.error
                writer._flush()
                file_pool.FilePool.finish(writer._fd)
                envelope_fds[i] = self._write_file(f"{self.tmp}/{writer.queue_id}.env", envelope.to_bytes())
            except OSError as e:
                fail(i, e, "cannot write")
        for i, (writer, _) in enumerate(items):
            try:
                if results[i] is None:
                    os.fsync(writer._fd)
                    os.fsync(envelope_fds[i])
            except OSError as e:
                fail(i, e, "cannot fsync")
            finally:
                writer._close()
                if i in envelope_fds:
                    os.close(envelope_fds[i])
        incoming = self.root / "incoming"
        for i, (writer, _) in enumerate(items):
            if results[i] is None:
                queue_id = writer.queue_id
                try:
                    os.rename(writer.temp_path, f"{incoming}/{queue_id}.msg")
                    os.rename(f"{self.tmp}/{queue_id}.env", f"{incoming}/{queue_id}.env")
                except OSError as e:
                    fail(i, e, "cannot queue")
        if any(r is None for r in results):
            try:
                fsync_dir(incoming)
            except OSError as e:
                results = [r or SpoolError.from_oserror(e, "cannot fsync incoming/") for r in results]
        for i, (writer, _) in enumerate(items):
            if results[i] is not None:
                self._discard(writer.queue_id)
        return results

    def _discard(self, queue_id: str) -> None:
        """Remove every trace of a failed commit, envelope first, so no half message stays queued."""
        for folder in ("incoming", "tmp"):
            for suffix in (".env", ".msg"):
                try:
                    unlink_if_present(self.root / folder / f"{queue_id}{suffix}")
                except OSError:
                    log.failure("cannot remove debris of {queue_id}", queue_id=queue_id)

    # -- start-up ------------------------------------------------------------

    def recover(self) -> list[str]:
        """Sweep crash debris and finish half-done moves; return the IDs in
        ``incoming/`` in arrival order (``queued_ids()`` lists the other queues).

        A message's ``.msg`` says which queue it is in. An envelope beside it
        wins; an envelope left in another queue by an interrupted `move`
        is brought over; a ``.msg`` with no envelope anywhere is debris.
        """
        for name in os.listdir(self.tmp):
            unlink_if_present(self.tmp / name)
        names = {queue: set(os.listdir(self.root / queue)) for queue in QUEUES}
        for queue in QUEUES:
            here = self.root / queue
            for name in sorted(names[queue]):
                stem, _, suffix = name.partition(".")
                if not QUEUE_ID.fullmatch(stem):
                    continue
                env, msg = f"{stem}.env", f"{stem}.msg"
                others = [other for other in QUEUES if other != queue]
                if suffix == "msg" and env not in names[queue]:
                    donor = next((o for o in others if env in names[o] and msg not in names[o]), None)
                    if donor is None:
                        unlink_if_present(here / name)
                    else:
                        os.rename(self.root / donor / env, here / env)
                        names[donor].discard(env)
                        names[queue].add(env)
                elif suffix == "env" and msg not in names[queue]:
                    home = next((o for o in others if msg in names[o]), None)
                    if home is None:
                        log.error("{path} has no content; left for the operator", path=here / name)
                    elif env in names[home]:
                        unlink_if_present(here / name)  # the copy beside the content is newer
                        names[queue].discard(env)
                    # else: the pass over `home` brings this envelope over
        return self.queued_ids("incoming")

    def queued_ids(self, queue: str) -> list[str]:
        """IDs with both files in `queue`, in arrival order."""
        names = set(os.listdir(self.root / queue))
        return sorted(n[:17] for n in names if n.endswith(".env") and QUEUE_ID.fullmatch(n[:17]) and f"{n[:17]}.msg" in names)

    # -- queued messages -----------------------------------------------------

    def content_path(self, queue_id: str, queue: str = "incoming") -> Path:
        return self._folder(queue_id, queue) / f"{queue_id}.msg"

    def load(self, queue_id: str, queue: str = "incoming") -> Envelope:
        path = self._folder(queue_id, queue) / f"{queue_id}.env"
        return Envelope.from_bytes(path.read_bytes(), str(path))

    def update(self, envelope: Envelope, queue: str = "incoming") -> None:
        """Atomically replace a queued envelope (blocking: call it in a thread)."""
        folder = self._folder(envelope.queue_id, queue)
        if not (folder / f"{envelope.queue_id}.msg").exists():  # deleted or moved meanwhile: no lone envelope
            raise FileNotFoundError(f"{envelope.queue_id}: no longer in {queue}/")
        try:
            write_atomically(folder / f"{envelope.queue_id}.env", envelope.to_bytes(), temp_dir=self.tmp)
        except OSError as e:
            raise SpoolError.from_oserror(e, f"cannot update {envelope.queue_id}") from e

    def move(self, envelope: Envelope, source: str, target: str) -> None:
        """Move a message to another queue, with `envelope` as its new envelope (blocking).

        Order: the new envelope appears in `target`, then the content follows,
        then the old envelope goes. Whatever the crash point, `recover()` finds
        the message in one queue with an envelope at least as old as the one
        it had (a duplicate delivery is possible, a loss is not)."""
        queue_id = envelope.queue_id
        here, there = self._folder(queue_id, source), self._folder(queue_id, target)
        try:
            write_atomically(there / f"{queue_id}.env", envelope.to_bytes(), temp_dir=self.tmp)
            os.rename(here / f"{queue_id}.msg", there / f"{queue_id}.msg")
            fsync_dir(there)
            self.pool.release(here / f"{queue_id}.env")
        except OSError as e:
            raise SpoolError.from_oserror(e, f"cannot move {queue_id} to {target}/") from e

    def open_content(self, queue_id: str, queue: str) -> int:
        """A read-only descriptor of the content, following the message if a
        move (in another thread) just took it to the other queue."""
        others = [other for other in QUEUES if other != queue]
        for folder in (queue, *others, queue):
            try:
                return os.open(self.content_path(queue_id, folder), os.O_RDONLY)
            except FileNotFoundError:
                continue
        raise FileNotFoundError(f"{queue_id}: content is gone")

    def remove(self, queue_id: str, queue: str = "incoming") -> None:
        """Take a message out of the queue (its files go to the pool), envelope
        first so a crash half-way leaves only sweepable content.

        No folder fsync, as in Postfix: if a power cut undoes the removal, the
        message is delivered again (a duplicate), never lost; the pool reuses
        a file only once its removal is durable."""
        folder = self._folder(queue_id, queue)
        self.pool.release(f"{folder}/{queue_id}.env")
        self.pool.release(f"{folder}/{queue_id}.msg")

    def _folder(self, queue_id: str, queue: str) -> Path:
        """Checks both names, so an ID from the command line can never reach outside the spool."""
        if queue not in QUEUES:
            raise ValueError(f"unknown queue {queue!r}")
        if not QUEUE_ID.fullmatch(queue_id):
            raise ValueError(f"bad queue id {queue_id!r}")
        return self._queue_dirs[queue]

    def _write_file(self, path: str, data: bytes) -> int:
        """Create ``path`` holding ``data``; returns the open descriptor for a later fsync."""
        fd = self.pool.create(path)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            file_pool.FilePool.finish(fd)
        except BaseException:
            os.close(fd)
            unlink_if_present(path)
            raise
        return fd


class SpooledContent:
    """A queued message's content as the courier takes it: callable for its
    chunks (a fresh pass each time, one per SMTP session), and naming where
    it is queued, so a courier in another process can open it itself.

    The file is opened at the first pass, following the message if a move
    took it to another queue meanwhile; `close` releases it."""

    chunk_size = 64 * 1024

    def __init__(self, spool: Spool, queue_id: str, queue: str, prefix: bytes = b"") -> None:
        self.spool = spool
        self.queue_id = queue_id
        self.queue = queue
        self.prefix = prefix  # header lines sent before the stored content: the DKIM signature
        self._fd: int | None = None

    def open(self) -> None:
        """Open the file now (idempotent): raises OSError or ValueError when it cannot be."""
        if self._fd is None:
            self._fd = self.spool.open_content(self.queue_id, self.queue)

    def __call__(self) -> Iterator[bytes]:
        self.open()
        return self._chunks(self._fd)

    def _chunks(self, fd: int) -> Iterator[bytes]:
        if self.prefix:
            yield self.prefix
        offset = 0
        while chunk := os.pread(fd, self.chunk_size, offset):
            offset += len(chunk)
            yield chunk

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
