"""Queued messages in SQLite (WAL): the only code that knows SQL.

A message exists once its ``message`` row is committed. Content lives in the
``content`` table, or, when big, in ``queue/large/<ID>``, a file fsynced and
renamed into place before the commit that references it; so a crash leaves
at worst a large file with no row, which ``sweep()`` removes.
"""

from __future__ import annotations

import errno
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from twisted.logger import Logger

from epost.fsutil import fsync_dir, take_owner_of, unlink_if_present
from epost.store.envelope import Envelope, EnvelopeError

SCHEMA_VERSION = 1
SCHEMA = (
    "CREATE TABLE message (id TEXT PRIMARY KEY, state TEXT NOT NULL, envelope BLOB NOT NULL)",
    "CREATE INDEX message_by_state ON message (state, id)",
    # data NULL: the content is the file large/<id>
    "CREATE TABLE content (id TEXT PRIMARY KEY, data BLOB)",
)
TABLES = frozenset({"message", "content"})
SQLITE_BUSY = 5
SQLITE_CORRUPT = 11
SQLITE_FULL = 13
SQLITE_NOTADB = 26
PAGE = 1000  # envelopes per query in load_many
BUSY_TIMEOUT = 10.0  # seconds a writer waits for the write lock
PAGE_SIZE = 16384  # bytes; fixed when the database is created

QUEUES = ("incoming", "deferred", "hold")  # a message's state
QUEUE_ID = re.compile(r"[0-9A-F]{17}")  # microseconds then a counter, in hex: sorts by arrival
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})

log = Logger()
T = TypeVar("T")


class SpoolError(OSError):
    """The spool could not store a message; ``disk_full`` tells SMTP to say 452 4.3.1 rather than 451.

    An OSError (``.errno``, ``.strerror`` = message), so callers catching OSError catch it too.
    """

    def __init__(self, errno_code: int, message: str) -> None:
        super().__init__(errno_code, message)

    @property
    def disk_full(self) -> bool:
        return self.errno in DISK_FULL_ERRNOS


class StoreError(SpoolError):
    """The store could not do a write or read; ``disk_full`` (ENOSPC) makes SMTP say 452 4.3.1, else 451 4.3.0."""


@dataclass(frozen=True)
class Change:
    """One message's bookkeeping for ``QueueStore.apply``: its new `envelope`,
    in `target` if it moves, or its removal when `envelope` is None. The
    envelope may come already serialised (the spool worker passes on the
    daemon's bytes, checked but not encoded twice)."""

    queue_id: str
    source: str  # the state it must be in
    envelope: Envelope | bytes | None = None
    target: str | None = None

    @property
    def leaves_source(self) -> bool:
        """A move or a removal: once written, the message is no longer in `source`."""
        return self.envelope is None or self.target is not None

    @property
    def doing(self) -> str:
        return "remove" if self.envelope is None else f"move to {self.target}" if self.target else "update"


def envelope_bytes(envelope: Envelope | bytes) -> bytes:
    """The stored form of an envelope; StoreError (EIO) when it cannot be said in JSON."""
    if isinstance(envelope, bytes):
        return envelope
    try:
        return envelope.to_bytes()
    except (TypeError, ValueError) as e:  # a route holding something JSON cannot say
        raise StoreError(errno.EIO, f"cannot serialise the envelope of {envelope.queue_id}: {e}") from None


class StoreUnavailable(Exception):
    """The database cannot be opened; the message is one line naming the file and why, for the log and exit."""


def store_error(error: Exception, doing: str) -> StoreError:
    """Map an sqlite3 or OS error to ENOSPC (disk full) or EIO: the only two answers SMTP needs.

    A quota met by SQLite's own write is SQLITE_IOERR_WRITE with no errno: EIO (docs/queue.md)."""
    code = getattr(error, "sqlite_errorcode", None)
    full = (code is not None and code & 0xFF == SQLITE_FULL) or (
        isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS
    )
    return StoreError(errno.ENOSPC if full else errno.EIO, f"{doing}: {error}")


class QueueStore:
    """``<root>/queue/queue.db`` plus ``<root>/queue/large/``; blocking, one connection per thread.

    Writes use ``BEGIN IMMEDIATE`` so two writers wait on the lock (polled,
    up to BUSY_TIMEOUT) instead of failing half-way with SQLITE_BUSY; every
    other statement that meets a lock is retried the same way (``_retry``).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.folder = self.root / "queue"
        self.path = self.folder / "queue.db"
        self.large = self.folder / "large"
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._open = False

    # -- opening -------------------------------------------------------------

    def open(self, create: bool = True) -> None:
        """Check the database (header and schema, no full scan: start-up stays fast with a big queue).

        ``create``: make the folders and a new database if there is none;
        without it a missing or empty database is refused too. Raises
        StoreUnavailable rather than ever starting on a silently new queue.
        """
        try:
            if create:
                self.large.mkdir(parents=True, exist_ok=True)
                if not self.path.exists() or self.path.stat().st_size == 0:
                    # Before any connection: SQLite's first read deletes a WAL
                    # beside a missing or empty database, committed mail with it.
                    self._refuse_if_it_was_lost()
            elif not self.path.exists():
                raise StoreUnavailable(f"{self.path}: no queue database here")
            elif self.path.stat().st_size == 0:  # refused before connecting, for the same reason
                raise StoreUnavailable(f"{self.path}: empty, no queue created in it yet")
        except OSError as e:
            raise StoreUnavailable(f"{self.path}: cannot create its folder: {e}") from None
        self._open = True
        try:
            conn = self._conn()
            version = _retry(lambda: conn.execute("PRAGMA user_version").fetchone()[0])
            tables = {row[0] for row in _retry(lambda: conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall())}
            if version > SCHEMA_VERSION:
                raise StoreUnavailable(
                    f"{self.path}: written by a newer epost (queue version {version}, this one reads up to {SCHEMA_VERSION})"
                )
            if version == 0 and not tables:
                if not create:
                    raise StoreUnavailable(f"{self.path}: empty, no queue created in it yet")
                self._refuse_if_it_was_lost()
                self._create_schema(conn)
            elif version != SCHEMA_VERSION or not TABLES <= tables:
                raise StoreUnavailable(
                    f"{self.path}: not an epost queue (version {version}, tables {', '.join(sorted(tables)) or 'none'})"
                )
            else:
                self._use_wal(conn)
                if create:  # this process will write: a read-only file must stop start-up, not every commit
                    _begin_immediate(conn)
                    conn.execute("ROLLBACK")
            if create and os.geteuid() == 0:
                self._give_to_spool_owner()
        except OSError as e:
            self.close()
            raise StoreUnavailable(f"{self.path}: cannot create: {e}") from None
        except sqlite3.Error as e:
            self.close()
            code = getattr(e, "sqlite_errorcode", 0) & 0xFF
            why = "corrupt or not an SQLite database" if code in (SQLITE_NOTADB, SQLITE_CORRUPT) else "cannot open"
            raise StoreUnavailable(f"{self.path}: {why} ({e})") from None
        except StoreUnavailable:
            self.close()
            raise

    def _refuse_if_it_was_lost(self) -> None:
        """A new database beside large contents or a WAL means the old one was moved or
        deleted: starting would sweep those contents away and run on an empty queue."""
        left = os.listdir(self.large)
        wal = self.path.with_name(self.path.name + "-wal")
        if left or (wal.exists() and wal.stat().st_size):
            what = f"{len(left)} message content(s) in {self.large}" if left else f"a non-empty {wal.name}"
            raise StoreUnavailable(
                f"{self.path}: missing or empty, but {what} remain: the queue database was moved or deleted; "
                f"restore it, or move {self.folder} away to start on an empty queue"
            )

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        """WAL first (it cannot change inside a transaction), then the schema in one transaction.

        Another process may be creating it at the same moment: the check
        inside the transaction lets the second one find it done.
        """
        # 16 KiB pages: a message's content takes a quarter of the WAL frames and
        # checkpoint writes it would at 4 KiB (bench/relay.py, 100 KiB messages:
        # 3.3 disk write requests a message instead of 4.9; Postfix 4.6).
        conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
        _retry(lambda: conn.execute("PRAGMA journal_mode = WAL").fetchall())
        _begin_immediate(conn)
        try:
            if conn.execute("PRAGMA user_version").fetchone()[0] == 0:
                for statement in SCHEMA:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.rollback()
            raise
        fsync_dir(self.folder)  # the new database's name is durable before any mail is acknowledged

    def _use_wal(self, conn: sqlite3.Connection) -> None:
        """An existing database in another journal mode (a restored copy) is switched to WAL:
        NORMAL bookkeeping is only safe against a power cut in WAL mode (docs/queue.md)."""
        if _retry(lambda: conn.execute("PRAGMA journal_mode").fetchone()[0]) == "wal":
            return
        mode = _retry(lambda: conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
        if mode != "wal":
            raise StoreUnavailable(f"{self.path}: cannot switch to WAL mode (still {mode})")
        log.info("{path}: switched to WAL mode", path=self.path)

    def _give_to_spool_owner(self) -> None:
        """Run as root (twistd before -u/-g, or a root `epost`): the store belongs to the owner of the spool.

        The daemon makes the store before it switches user: a root-owned
        queue.db, -wal or -shm, or folder, would refuse every commit after
        the switch ("attempt to write a readonly database"). SQLite itself
        gives a -wal or -shm it creates as root the owner of queue.db.
        """
        for path in (self.folder, self.large, self.path, *(self.path.with_name(self.path.name + s) for s in ("-wal", "-shm"))):
            try:
                take_owner_of(self.root, path)
            except FileNotFoundError:
                pass  # no -wal or -shm (yet)
            except OSError as e:
                raise StoreUnavailable(f"{path}: cannot give it the owner of {self.root}: {e}") from None

    def drop_connections(self) -> None:
        """Close every thread's connection but stay open: each thread's next call opens a new one.

        For the daemon's start-up: twistd forks and switches user after
        make_service, and an SQLite connection must not cross a fork
        (sqlite.org/howtocorrupt.html 2.6) nor serve another user. Call it only
        while no other thread uses the store.
        """
        with self._lock:
            connections, self._connections = self._connections, []
            self._local = threading.local()
        for conn in connections:
            conn.close()

    def close(self) -> None:
        """Close every thread's connection (they are idle by now: the daemon is stopping)."""
        self._open = False
        self.drop_connections()

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection; an sqlite3 connection must not be shared while in use."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        if not self._open:
            raise RuntimeError(f"{self.path}: QueueStore.open() was not called")
        # check_same_thread off only so close() may close other threads' idle connections.
        # timeout=0: no SQLite busy handler; a statement meeting a lock is retried by _retry.
        conn = sqlite3.connect(self.path, timeout=0, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_size_limit = 67108864")
            conn.execute("PRAGMA synchronous = FULL")
            # The savepoint per message needs a statement journal: in memory, not a
            # temporary file opened, written, unlinked and closed at every commit.
            conn.execute("PRAGMA temp_store = MEMORY")
        except BaseException:
            conn.close()
            raise
        with self._lock:
            self._connections.append(conn)
            self._local.conn = conn
            self._local.durable = True
        return conn

    @contextmanager
    def _write(self, durable: bool) -> Iterator[sqlite3.Connection]:
        """One write transaction; FULL fsyncs the WAL at commit, NORMAL leaves it to the next FULL commit."""
        conn = self._conn()
        if self._local.durable != durable:
            conn.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
            self._local.durable = durable
        _begin_immediate(conn)
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.rollback()
            raise

    # -- writing -------------------------------------------------------------

    def put_batch(
        self, items: list[tuple[Envelope, bytes | Path]], state: str = "incoming"
    ) -> list[SpoolError | None]:
        """Queue messages in one FULL transaction: None for each stored one, else its error.

        Bytes are stored inline; a Path (a finished file on this file system)
        is fsynced and renamed to ``large/<ID>`` first (``large/`` fsynced
        once), so the commit never references content that is not durable.
        Each item has its savepoint: a duplicate ID (errno EEXIST) fails alone.
        A failed item's file is renamed back to its path, for the caller to
        delete or keep (an import keeps it).
        """
        _check_state(state)
        for envelope, _ in items:
            _check_id(envelope.queue_id)
        results: list[SpoolError | None] = [None] * len(items)
        envelopes: list[bytes] = []
        for i, (envelope, _) in enumerate(items):
            try:
                envelopes.append(envelope_bytes(envelope))
            except StoreError as e:
                envelopes.append(b"")
                results[i] = e
        moved = self._place_large_files(items, results)
        if any(result is None for result in results):
            try:
                with self._write(True) as conn:  # serialised and files placed already: the lock is held briefly
                    for i, (envelope, content) in enumerate(items):
                        if results[i] is None:
                            results[i] = self._insert(conn, envelope.queue_id, envelopes[i], content, state)
            except (sqlite3.Error, OSError) as e:
                error = store_error(e, f"cannot commit {len(items)} message(s) to {self.path}")
                results = [result or error for result in results]
        self._return_large_files(items, moved, results)
        return results

    def _insert(
        self, conn: sqlite3.Connection, queue_id: str, data: bytes, content: bytes | Path, state: str
    ) -> StoreError | None:
        """One message under its own savepoint; an error that ended the whole transaction propagates."""
        conn.execute("SAVEPOINT item")
        try:
            conn.execute("INSERT INTO message (id, state, envelope) VALUES (?, ?, ?)", (queue_id, state, data))
            inline = None if isinstance(content, Path) else content
            conn.execute("INSERT INTO content (id, data) VALUES (?, ?)", (queue_id, inline))
        except sqlite3.Error as e:
            if not conn.in_transaction:  # SQLite rolled back the whole transaction (disk full, I/O error)
                raise
            conn.execute("ROLLBACK TO item")
            conn.execute("RELEASE item")
            if isinstance(e, sqlite3.IntegrityError):
                return StoreError(errno.EEXIST, f"{queue_id}: already queued")
            return store_error(e, f"cannot queue {queue_id}")
        conn.execute("RELEASE item")
        return None

    def _place_large_files(
        self, items: list[tuple[Envelope, bytes | Path]], results: list[SpoolError | None]
    ) -> dict[int, Path]:
        """Fsync and rename each Path item's file to large/<ID>, then fsync large/ once.

        Returns {item index: the path it came from}. A large/<ID> with a
        committed row is never replaced (that item fails as a duplicate); one
        without a row is debris of a failed commit and is.
        """
        moved: dict[int, Path] = {}
        wanted = [i for i, (_, content) in enumerate(items) if isinstance(content, Path)]
        if not wanted:
            return moved
        try:
            taken = self._with_content({items[i][0].queue_id for i in wanted if (self.large / items[i][0].queue_id).exists()})
        except (sqlite3.Error, OSError) as e:
            error = store_error(e, f"cannot check {self.large}")
            for i in wanted:
                results[i] = error
            return moved
        for i in wanted:
            envelope, source = items[i]
            queue_id = envelope.queue_id
            target = self.large / queue_id
            if queue_id in taken:  # queued already, or twice in this batch: never replace its file
                results[i] = StoreError(errno.EEXIST, f"{queue_id}: already queued")
                continue
            taken.add(queue_id)
            try:
                fd = os.open(source, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                if Path(source) != target:
                    os.replace(source, target)
                if os.geteuid() == 0:  # the import, before twistd's -u: a copied file must not stay root's
                    take_owner_of(self.large, target)
                moved[i] = Path(source)
            except OSError as e:
                results[i] = store_error(e, f"cannot place {queue_id} in {self.large}")
        if moved:
            try:
                fsync_dir(self.large)
            except OSError as e:
                error = store_error(e, f"cannot fsync {self.large}")
                for i in moved:
                    results[i] = error
        return moved

    def _with_content(self, queue_ids: set[str]) -> set[str]:
        if not queue_ids:
            return set()
        marks = ",".join("?" * len(queue_ids))
        conn = self._conn()
        rows = _retry(lambda: conn.execute(f"SELECT id FROM content WHERE id IN ({marks})", sorted(queue_ids)).fetchall())
        return {row[0] for row in rows}

    def _return_large_files(
        self, items: list[tuple[Envelope, bytes | Path]], moved: dict[int, Path], results: list[SpoolError | None]
    ) -> None:
        """Undo the rename of every failed item's file: the content is the caller's again."""
        folders = set()
        for i, source in moved.items():
            target = self.large / items[i][0].queue_id
            if results[i] is None or source == target:
                continue
            try:
                os.replace(target, source)
                folders.add(source.parent)
            except OSError:
                unlink_if_present(target)
        for folder in (*folders, self.large) if folders else ():
            try:
                fsync_dir(folder)
            except OSError:
                pass  # the file is back either way; at worst a crash leaves it as sweepable debris

    def update(self, envelope: Envelope, state: str, *, durable: bool = True) -> None:
        """Replace the envelope only, never the content; FileNotFoundError when not in `state`."""
        self._apply_one(Change(envelope.queue_id, state, envelope), durable)

    def move(self, envelope: Envelope, source: str, target: str, *, durable: bool = True) -> None:
        """Move to `target` with `envelope` as the new envelope, in one statement; FileNotFoundError when not in `source`."""
        self._apply_one(Change(envelope.queue_id, source, envelope, target), durable)

    def remove(self, queue_id: str, state: str, *, durable: bool = True) -> None:
        """Delete the row and its content in one transaction, then the large file (a crash between: sweep's debris)."""
        self._apply_one(Change(queue_id, state), durable)

    def _apply_one(self, change: Change, durable: bool) -> None:
        _check_change(change)  # a bad ID or state is the caller's ValueError, as everywhere in the store
        error = self.apply([change], durable=durable)[0]
        if error is not None:
            raise error

    def apply(self, changes: list[Change], *, durable: bool = True) -> list[OSError | None]:
        """Many messages' updates, moves and removals in one transaction: None for each done, else its error.

        The delivery manager's group commit: one write lock and one commit for
        every message settled meanwhile, not one each. A change whose message
        is not in its `source` state fails alone (FileNotFoundError); an error
        of the store fails them all. The removal of a message whose content
        is a large file is always FULL: after a NORMAL one a power cut could
        bring the row back without its file, and a delivered message would be
        retried and bounced; so a NORMAL batch leaves it to a FULL one of its own.
        """
        results: list[OSError | None] = [None] * len(changes)
        envelopes: list[bytes | None] = []
        for i, change in enumerate(changes):
            envelopes.append(None)
            try:
                _check_change(change)
            except ValueError as e:
                results[i] = StoreError(errno.EINVAL, str(e))
                continue
            try:
                envelopes[i] = None if change.envelope is None else envelope_bytes(change.envelope)
            except StoreError as e:
                results[i] = e
        removed_large: list[str] = []
        left_for_full: list[int] = []
        try:
            with self._write(durable) as conn:
                for i, change in enumerate(changes):
                    if results[i] is not None:
                        continue
                    if change.envelope is None:
                        row = conn.execute("SELECT data IS NULL FROM content WHERE id = ?", (change.queue_id,)).fetchone()
                        large = bool(row and row[0])
                        if large and not durable:
                            left_for_full.append(i)
                            continue
                        cursor = conn.execute("DELETE FROM message WHERE id = ? AND state = ?", (change.queue_id, change.source))
                        if cursor.rowcount:
                            conn.execute("DELETE FROM content WHERE id = ?", (change.queue_id,))
                            if large:
                                removed_large.append(change.queue_id)
                    else:
                        cursor = conn.execute(
                            "UPDATE message SET state = ?, envelope = ? WHERE id = ? AND state = ?",
                            (change.target or change.source, envelopes[i], change.queue_id, change.source),
                        )
                    if cursor.rowcount == 0:
                        results[i] = FileNotFoundError(f"{change.queue_id}: not in {change.source}")
        except sqlite3.Error as e:
            doing = f"cannot {changes[0].doing} {changes[0].queue_id}" if len(changes) == 1 else f"cannot record {len(changes)} changes"
            error = store_error(e, doing)
            return [result or error for result in results]
        for queue_id in removed_large:
            try:
                unlink_if_present(self.large / queue_id)
            except OSError as e:  # the removal is committed: what is left is sweep()'s debris
                log.warn("{queue_id}: removed, but not its file ({error}); the next start removes it",
                         queue_id=queue_id, error=e)
        if left_for_full:
            for i, result in zip(left_for_full, self.apply([changes[i] for i in left_for_full], durable=True)):
                results[i] = result
        return results

    # -- reading -------------------------------------------------------------

    def load(self, queue_id: str, state: str | None = None) -> Envelope:
        """The envelope; FileNotFoundError when not queued (in `state`, if given)."""
        if state is not None:
            _check_state(state)
        found = self.find(queue_id)
        if found is None or (state is not None and found[0] != state):
            raise FileNotFoundError(f"{queue_id}: not in {state}" if state else f"{queue_id}: not queued")
        return found[1]

    def find(self, queue_id: str) -> tuple[str, Envelope] | None:
        """The state holding the message and its envelope, read by one query; None when not queued.
        EnvelopeError when its envelope is damaged."""
        _check_id(queue_id)
        [row] = self._read("SELECT state, envelope FROM message WHERE id = ?", (queue_id,)) or [None]
        return None if row is None else (row[0], Envelope.from_bytes(row[1], f"{self.path}:{queue_id}"))

    def load_many(
        self, state: str, after: str = "", on_damaged: Callable[[str, EnvelopeError], None] | None = None
    ) -> Iterator[Envelope]:
        """Every envelope in `state` (with an ID past `after`), ID order, fetched a page at a time:
        bounded memory and no read transaction held open while the caller works (a restart with
        100,000 messages).

        A corrupt envelope is skipped, so one bad row cannot stop a restart, and
        told to ``on_damaged(queue_id, error)`` (by default: logged, left for the
        operator); ``load`` still raises EnvelopeError for it."""
        _check_state(state)
        return self._pages(state, after, on_damaged or _log_damaged)

    def _pages(self, state: str, after: str, on_damaged: Callable[[str, EnvelopeError], None]) -> Iterator[Envelope]:
        while True:
            rows = self._read(
                "SELECT id, envelope FROM message WHERE state = ? AND id > ? ORDER BY id LIMIT ?", (state, after, PAGE)
            )
            for queue_id, data in rows:
                try:
                    envelope = Envelope.from_bytes(data, f"{self.path}:{queue_id}")
                except EnvelopeError as e:
                    on_damaged(queue_id, e)
                    continue
                yield envelope
            if len(rows) < PAGE:
                return
            after = rows[-1][0]

    def state_of(self, queue_id: str) -> str | None:
        _check_id(queue_id)
        rows = self._read("SELECT state FROM message WHERE id = ?", (queue_id,))
        return rows[0][0] if rows else None

    def ids(self, state: str) -> list[str]:
        """IDs in `state`; ID order is arrival order."""
        _check_state(state)
        return [row[0] for row in self._read("SELECT id FROM message WHERE state = ? ORDER BY id", (state,))]

    def counts(self) -> dict[str, int]:
        """Messages per state, every state present (metrics, dashboard)."""
        counts = dict.fromkeys(QUEUES, 0)
        counts.update(self._read("SELECT state, count(*) FROM message GROUP BY state", ()))
        return counts

    def max_id(self) -> str | None:
        """The highest queued ID: new IDs start past it, so a restart never reuses one."""
        return self._read("SELECT max(id) FROM message", ())[0][0]

    def content(self, queue_id: str) -> bytes | Path:
        """The inline content, or the path of its large file; FileNotFoundError when not queued."""
        _check_id(queue_id)
        rows = self._read("SELECT data FROM content WHERE id = ?", (queue_id,))
        if not rows:
            raise FileNotFoundError(f"{queue_id}: not queued")
        return self.large / queue_id if rows[0][0] is None else rows[0][0]

    def _read(self, sql: str, parameters: tuple) -> list[tuple]:
        """All rows at once, so an error while stepping is a StoreError too."""
        try:
            conn = self._conn()
            return _retry(lambda: conn.execute(sql, parameters).fetchall())
        except sqlite3.Error as e:
            raise store_error(e, f"cannot read {self.path}") from e

    # -- start-up ------------------------------------------------------------

    def sweep(self) -> None:
        """Remove large/ files no row references (a crash between rename and commit, or after a removal),
        and log each row whose large file is missing.

        Only at start-up, before any writer runs: a put in flight has its
        file in place before its row is committed.
        """
        try:
            names = set(os.listdir(self.large))
        except FileNotFoundError:
            names = set()
        referenced = {row[0] for row in self._read("SELECT id FROM content WHERE data IS NULL", ())}
        for name in names - referenced:
            unlink_if_present(self.large / name)
        for queue_id in sorted(referenced - names):  # said now, once, rather than at each attempt
            log.error("{path}: missing: queued message {queue_id} has lost its content",
                      path=self.large / queue_id, queue_id=queue_id)


def _log_damaged(queue_id: str, error: EnvelopeError) -> None:
    log.error("{error}; left for the operator", error=error)


def _check_id(queue_id: str) -> str:
    """An ID from the command line must be a queue ID before it reaches a path or a query."""
    if not isinstance(queue_id, str) or not QUEUE_ID.fullmatch(queue_id):
        raise ValueError(f"bad queue id {queue_id!r}")
    return queue_id


def _check_change(change: Change) -> None:
    _check_id(change.queue_id)
    _check_state(change.source)
    if change.target is not None:
        _check_state(change.target)


def _check_state(state: str) -> None:
    if state not in QUEUES:
        raise ValueError(f"unknown queue {state!r}")


def _retry(statement: Callable[[], T]) -> T:
    """Run `statement`, again while it meets SQLITE_BUSY: every 0.1 ms, then doubling to 5 ms, for up
    to BUSY_TIMEOUT. Connections have no busy handler (timeout=0): SQLite's sleeps 1, 2, 5, 10 ms and
    more between tries, and the spool worker's commit, meeting a bookkeeping write of the daemon that
    holds the lock for tens of microseconds, slept a whole millisecond or more before its 250 could go out."""
    delay, deadline = 0.0001, None
    while True:
        try:
            return statement()
        except sqlite3.OperationalError as e:
            if getattr(e, "sqlite_errorcode", 0) & 0xFF != SQLITE_BUSY:
                raise
            now = time.monotonic()
            deadline = deadline or now + BUSY_TIMEOUT
            if now >= deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.005)


def _begin_immediate(conn: sqlite3.Connection) -> None:
    """Take the write lock, polling (``_retry``) rather than through SQLite's busy handler."""
    _retry(lambda: conn.execute("BEGIN IMMEDIATE"))
