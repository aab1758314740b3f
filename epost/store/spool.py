"""The durable spool: the queue store (SQLite, WAL) behind the shape the daemon always used.

Messages live in ``<spool>/queue/queue.db`` (`epost.store.database.QueueStore`,
the only code that knows SQL); contents over ``MessageWriter.spill_size``
live in ``<spool>/queue/large/<ID>``. A message is queued exactly when its
row is committed: a content file without a row is debris that ``recover()``
sweeps, as are the writers' temporary files in ``tmp/``.

Durability (docs/queue.md): what acknowledges mail (commits, bounces,
operator surgery) is flushed before it returns; delivery bookkeeping
(``durable=False``) is not, so a power cut may undo it: a duplicate
delivery, never a loss.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger


from epost.fsutil import take_owner_of, unlink_if_present
from epost.store.database import Change, QueueStore, SpoolError, store_error
from epost.store.envelope import Envelope, EnvelopeError
from epost.store.group_commit import GroupCommit

FOLDERS = ("tmp", "domains", "mailboxes", "log")  # beside queue/, which the store makes

log = Logger()


class SpoolStopping(SpoolError):
    """The spool workers stopped (the daemon is stopping) before this commit reached them: SMTP says 421."""


class MessageWriter:
    """Receives one message's content; ``write`` never raises so SMTP can finish reading DATA.

    Content stays in memory until it passes ``spill_size`` and is then stored
    inline in the database; a bigger message spills to its own ``tmp/<ID>.msg``
    (created O_EXCL), which the commit makes the message's large file, so
    memory stays bounded for any message size.
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
        self._spilled = False  # a tmp/ file exists (until commit hands it to the store, or abort)
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
        return not self._spilled and self.error is None

    def content(self) -> bytes:
        """The buffered content, collapsed into one chunk: a second call joins nothing again."""
        if len(self._chunks) != 1:
            self._chunks = [b"".join(self._chunks)]
        return self._chunks[0]

    def read_all(self) -> bytes:
        """The whole content so far, also once it spilled to its tmp/ file (to sign it)."""
        if not self._spilled:
            return self.content()
        with open(self.temp_path, "rb") as spilled:  # ours is open for writing only
            return spilled.read() + self.content()

    def head(self, limit: int = 64 * 1024) -> bytes:
        """The first `limit` bytes of the content: its header, for the signing
        decision, without reading a large message back whole."""
        if not self._spilled:
            data = bytearray()
            for chunk in self._chunks:
                data += chunk[: limit - len(data)]
                if len(data) >= limit:
                    break
            return bytes(data)
        with open(self.temp_path, "rb") as spilled:
            written = spilled.read(limit)
        return written + self.content()[: limit - len(written)]

    def _flush(self) -> None:
        """Write buffered chunks to the ``tmp/`` file, creating it on first use."""
        if self._fd is None:
            self._fd = os.open(self.temp_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            self._spilled = True
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
        self._discard()

    def commit(self, envelope: Envelope) -> Deferred[str]:
        """Make the message durable in the queue (state incoming); fires with the queue id only once it is on disk."""
        if self._finished:
            raise RuntimeError(f"message {self.queue_id} already committed or aborted")
        if envelope.queue_id != self.queue_id:
            raise ValueError(f"envelope {envelope.queue_id} does not belong to {self.queue_id}")
        self._finished = True
        return self._spool._request_commit(self, envelope)

    def _stored_form(self) -> bytes | Path:
        """What the store takes (runs in the commit thread): the bytes, or the finished tmp/ file."""
        if self.error is not None:
            raise self.error
        if not self._spilled:
            return self.content()
        self._flush()
        self._close()
        return Path(self.temp_path)

    def _close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def _discard(self) -> None:
        """Close and delete the tmp/ file, if there is one and the store did not take it."""
        self._close()
        if self._spilled:
            try:
                unlink_if_present(self.temp_path)
            except OSError:
                log.failure("cannot remove {path}", path=self.temp_path)


class Spool:
    """The spool folder (SPEC §4) and its queue store.  Its blocking methods run in
    the spool worker process, a thread of the daemon's pool, the courier
    process or an `epost` command: each thread has its own database connection."""

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
        self.store = QueueStore(self.root)
        self.on_commit: list[Callable[[str, Envelope], None]] = []  # (queue id, its envelope)
        self._reactor = reactor
        self._threadpool = threadpool
        self._clock = clock
        self._last_id: int | None = None  # seeded from the store on first use
        self._commits: GroupCommit[tuple[MessageWriter, Envelope]] = GroupCommit(reactor, threadpool, self.commit_batch)
        self._changes: GroupCommit[Change] = GroupCommit(
            reactor, threadpool, lambda changes: self.store.apply(changes, durable=False)
        )

    def open(self, create: bool = True) -> None:
        """Open the queue store; `create` (the daemon) also makes it and the spool's
        other folders. Raises StoreUnavailable (one line) when it cannot be opened:
        never a silently new, empty queue."""
        if create:
            for name in FOLDERS:
                folder = self.root / name
                if folder.is_dir():
                    continue  # the operator's (mailboxes/ may belong to Dovecot's user): left as it is
                folder.mkdir(parents=True, exist_ok=True)
                if os.geteuid() == 0:  # twistd switches to its -u user after this: the spool's owner
                    take_owner_of(self.root, folder)
        self.store.open(create=create)

    def drop_connections(self) -> None:
        """The daemon's start-up is done: no connection may cross twistd's fork and user switch."""
        self.store.drop_connections()

    def exists(self) -> bool:
        """Whether this spool has a queue store yet (a reader finds an empty queue when not)."""
        return self.store.path.exists()

    def close(self) -> None:
        self.store.close()

    # -- queue ids ---------------------------------------------------------

    def new_queue_id(self) -> str:
        """13 hex digits of microseconds + 4 of a counter: unique, and sorted by arrival as strings.

        Strictly increasing within the process even when the clock steps back,
        and seeded past every ID already queued so a restart never reuses one.
        """
        if self._last_id is None:
            highest = self.store.max_id()
            self._last_id = int(highest, 16) if highest else 0
        self._last_id = max((self._clock() // 1000) << 16, self._last_id + 1)
        return f"{self._last_id:017X}"

    # -- receiving -----------------------------------------------------------

    def open_message(self) -> MessageWriter:
        """Start a new message; its ``tmp/`` file is made only if it grows past ``spill_size``."""
        return MessageWriter(self, self.new_queue_id())

    def _request_commit(self, writer: MessageWriter, envelope: Envelope) -> Deferred[str]:
        d = self._commits.submit((writer, envelope))
        return d.addCallback(self._committed, writer.queue_id, envelope)

    def _committed(self, _: None, queue_id: str, envelope: Envelope) -> str:
        self.notify_committed(queue_id, envelope)
        return queue_id

    def notify_committed(self, queue_id: str, envelope: Envelope) -> None:
        for hook in list(self.on_commit):
            try:
                hook(queue_id, envelope)
            except Exception:
                log.failure("on_commit hook {hook!r} failed for {queue_id}", hook=hook, queue_id=queue_id)

    def commit_batch(self, items: list[tuple[MessageWriter, Envelope]]) -> list[SpoolError | None]:
        """Runs in a thread (or the worker process): the whole batch in one
        durable transaction (`QueueStore.put_batch`); small contents inline,
        spilled ones as their large file. A message that fails leaves nothing."""
        results: list[SpoolError | None] = [None] * len(items)
        stored: list[tuple[Envelope, bytes | Path]] = []
        positions: list[int] = []
        for i, (writer, envelope) in enumerate(items):
            try:
                stored.append((envelope, writer._stored_form()))
                positions.append(i)
            except OSError as e:
                results[i] = store_error(e, f"cannot write {writer.queue_id}")
        if stored:
            for i, outcome in zip(positions, self.store.put_batch(stored)):
                results[i] = outcome
        for i, (writer, _) in enumerate(items):
            if results[i] is not None:
                writer._discard()
        return results

    # -- start-up ------------------------------------------------------------

    def recover(self) -> list[str]:
        """Sweep crash debris (large files no row names, tmp/ files of
        messages never committed); return the IDs in incoming, in arrival
        order (``queued_ids()`` lists the other states)."""
        self.store.sweep()
        for name in os.listdir(self.tmp):
            unlink_if_present(self.tmp / name)
        return self.queued_ids("incoming")

    # -- queued messages -----------------------------------------------------

    def queued_ids(self, queue: str) -> list[str]:
        """IDs in `queue`, in arrival order."""
        return self.store.ids(queue)

    def state_of(self, queue_id: str) -> str | None:
        """The queue holding the message, None when it is in none."""
        return self.store.state_of(queue_id)

    def find(self, queue_id: str) -> tuple[str, Envelope] | None:
        """The queue holding the message and its envelope (one query); None when it is in none."""
        return self.store.find(queue_id)

    def counts(self) -> dict[str, int]:
        """Messages in each queue, every queue named."""
        return self.store.counts()

    def load(self, queue_id: str, queue: str = "incoming") -> Envelope:
        """The envelope; FileNotFoundError when the message is not in `queue`."""
        return self.store.load(queue_id, queue)

    def load_many(
        self, queue: str, on_damaged: Callable[[str, EnvelopeError], None] | None = None, after: str = ""
    ) -> Iterator[Envelope]:
        """Every envelope in `queue`, in ID order, read a page per query (the
        restart, `epost queue`); any thread may take the next one. `after`:
        only IDs past it (a restart's load resuming after a failed page).

        A damaged envelope is skipped and told to `on_damaged(queue_id, error)`
        (by default the store logs it, left for the operator)."""
        return self.store.load_many(queue, after, on_damaged)

    def update(self, envelope: Envelope, queue: str = "incoming", *, durable: bool = True) -> None:
        """Replace a queued envelope (blocking); `durable=False` for delivery bookkeeping."""
        self.store.update(envelope, queue, durable=durable)

    def move(self, envelope: Envelope, source: str, target: str, *, durable: bool = True) -> None:
        """Move a message to another queue, with `envelope` as its new envelope (blocking, one transaction)."""
        self.store.move(envelope, source, target, durable=durable)

    def remove(self, queue_id: str, queue: str = "incoming", *, durable: bool = True) -> None:
        """Take a message out of the queue, envelope and content in one transaction (operator surgery).

        Delivery's removals go through `record`, not flushed on their own, as
        Postfix does not fsync a removal: a power cut may bring the message
        back (delivered again), never lose one."""
        self.store.remove(queue_id, queue, durable=durable)

    def record(self, change: Change) -> Deferred[None]:
        """Delivery bookkeeping (durable=False, see `remove`), in a thread and in one
        transaction with every change recorded meanwhile; fails with that change's error."""
        return self._changes.submit(change)

    def content(self, queue_id: str) -> bytes | Path:
        """The stored content: its bytes, or the Path of its large file; FileNotFoundError when not queued."""
        return self.store.content(queue_id)

    def open_content(self, queue_id: str) -> ContentHandle:
        """The content, open for reading: a large file stays readable even if the
        message leaves the queue meanwhile (its file is unlinked, not reused)."""
        for _ in range(2):
            stored = self.content(queue_id)
            if isinstance(stored, bytes):
                return ContentHandle(stored)
            try:
                return ContentHandle(fd=os.open(stored, os.O_RDONLY))
            except FileNotFoundError:
                continue  # removed between the query and the open: asked again, the store says so
        raise FileNotFoundError(f"{queue_id}: content is gone")


class ContentHandle:
    """A queued message's content open for reading: inline bytes, or a
    descriptor of its large file (read with pread, so any number of passes)."""

    def __init__(self, data: bytes | None = None, fd: int | None = None) -> None:
        self._data = data
        self._fd = fd

    def read(self, size: int, offset: int) -> bytes:
        if self._fd is not None:
            return os.pread(self._fd, size, offset)
        if self._data is None:
            raise ValueError("content handle is closed")
        return self._data[offset : offset + size]

    def chunks(self, size: int = 64 * 1024) -> Iterator[bytes]:
        offset = 0
        while chunk := self.read(size, offset):
            offset += len(chunk)
            yield chunk

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
        self._data = None


class SpooledContent:
    """A queued message's content as the courier takes it: callable for its
    chunks (a fresh pass each time, one per SMTP session), and naming its
    queue ID, so a courier in another process can open it itself.

    The content is opened at the first pass; `close` releases it."""

    chunk_size = 64 * 1024

    def __init__(self, spool: Spool, queue_id: str, prefix: bytes = b"") -> None:
        self.spool = spool
        self.queue_id = queue_id
        self.prefix = prefix  # header lines sent before the stored content: the DKIM signature
        self._handle: ContentHandle | None = None

    def open(self) -> None:
        """Open the content now (idempotent): raises OSError or ValueError when it cannot be."""
        if self._handle is None:
            self._handle = self.spool.open_content(self.queue_id)

    def __call__(self) -> Iterator[bytes]:
        self.open()
        return self._chunks(self._handle)

    def _chunks(self, handle: ContentHandle) -> Iterator[bytes]:
        if self.prefix:
            yield self.prefix
        yield from handle.chunks(self.chunk_size)

    def close(self) -> None:
        if self._handle is not None:
            handle, self._handle = self._handle, None
            handle.close()
