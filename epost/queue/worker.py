"""The spool worker process: every blocking spool write, off the reactor's process.

    python -m epost.queue.worker SPOOL_ROOT HOSTNAME [GIVE_UP_AFTER_SECONDS]

Why a process and not threads: a worker thread doing file I/O releases and
re-takes the GIL around every system call, and at a few hundred messages a
second that hand-off (futex storms) cost more CPU than the work itself. A
child process shares nothing, uses the second core and keeps the reactor's
process doing only SMTP. It is Postfix's cleanup/local split inside epost.

One such process is the default: its commits go into the queue store
(SQLite, WAL) as one transaction per batch, and a second writer would only
wait on the store's write lock; the group commit already covers every SMTP
session's messages.

Requests arrive on stdin as frames `op(1) queue-id(17) length(4) payload`:
  W  append payload to the message's content
  C  commit: payload is the envelope (JSON); group-committed with the others
  A  abort: forget the message
  L  deliver the queued message's local recipients into their Maildirs
  B  delivery bookkeeping (change_frame): the daemon's updates, moves and
     removals, one NORMAL transaction for all that gathered
  K  the DKIM keys (JSON, epost.delivery.signing.keys_to_json), sent first
Replies go to stdout, one line each:
  C ID [SIG]        committed (durable in the queue store, state incoming); SIG: base64 of the
                    DKIM-Signature lines stored in its envelope, if signed
  F ID ERRNO TEXT   commit failed, nothing of it is queued
  D ID              local delivery done, nothing left of the message
  R ID              local delivery must be retried later
  P ID              local delivery done, the rest is the delivery manager's
  S ID              bookkeeping written
  E ID ERRNO TEXT   bookkeeping not written (ERRNO 2: the message is not in that state)
Commits always go before bookkeeping and deliveries, so new mail is never held up by them.
"""

from __future__ import annotations

import base64
import dataclasses
import errno
import json
import os
import select
import signal
import struct
import sys
from pathlib import Path

from twisted.logger import Logger, globalLogBeginner, textFileLogObserver

from epost.delivery import signing
from epost.headers import from_domain

from epost.store.database import QUEUE_ID, QUEUES, Change, envelope_bytes
from epost.store.envelope import RELAY, Envelope
from epost.queue.outcomes import has_local_pending
from epost.queue.runner import deliver_local_batch
from epost.store.spool import MessageWriter, Spool

FRAME = struct.Struct(">c17sI")
DELIVERY_BATCH = 8
RECENT_BYTES = 32 * 1024 * 1024  # content kept for delivery from memory, at most
SIGN_APART_BYTES = 1024 * 1024  # larger messages are signed between batches, not inside one

log = Logger()


def change_frame(change: Change) -> bytes:
    """A `B` frame's payload: "SOURCE TARGET" (`-`: it stays), a newline, the new envelope (none: removed)."""
    head = f"{change.source} {change.target or '-'}\n".encode("ascii")
    return head + (envelope_bytes(change.envelope) if change.envelope is not None else b"")


def change_from_frame(queue_id: str, payload: bytes) -> Change:
    """ValueError for anything that is not a change of a queued message's state."""
    head, _, data = payload.partition(b"\n")
    source, target = head.decode("ascii").split(" ")
    if source not in QUEUES or target not in (*QUEUES, "-") or not QUEUE_ID.fullmatch(queue_id):
        raise ValueError(f"not a change: {head!r} for {queue_id!r}")
    if data and not _names(data, queue_id):
        raise ValueError(f"not an envelope of {queue_id}")
    return Change(queue_id, source, data or None, None if target == "-" else target)


def _names(data: bytes, queue_id: str) -> bool:
    """Whether `data` is JSON naming `queue_id`: the daemon's own Envelope.to_bytes, stored as
    it wrote it; a whole Envelope.from_bytes here cost 23 us a change on the one writer."""
    try:
        fields = json.loads(data)
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        return False
    return isinstance(fields, dict) and fields.get("queue_id") == queue_id


class Worker:
    def __init__(self, root: Path, hostname: str, reply=None, give_up_after: float = 8 * 3600):
        self.spool = Spool(root, reactor=None, threadpool=None)
        self.spool.open(create=False)  # the daemon made it (and stops if it cannot open it)
        self.hostname = hostname
        self.give_up_after = give_up_after  # seconds a failing local delivery is retried
        self.mailbox_root = Path(root) / "mailboxes"
        self.reply = reply or (lambda line: _write_all(1, line))
        self.writers: dict[str, MessageWriter] = {}
        self.commits: list[tuple[MessageWriter, Envelope]] = []
        self.deliveries: dict[str, None] = {}
        self.changes: list[Change] = []
        # Envelope and content of small messages just committed, for their
        # local delivery without reading them back; bounded, oldest dropped.
        self.recent: dict[str, tuple[Envelope, bytes]] = {}
        self.recent_bytes = 0
        self.dkim_keys: tuple = ()  # set by the daemon's first frame (K)
        # Large messages to sign before their commit, after the batch they came with.
        self.to_sign: list[tuple[MessageWriter, Envelope, tuple]] = []

    def handle(self, op: bytes, queue_id: str, payload: bytes) -> None:
        if op == b"W":
            writer = self.writers.get(queue_id)
            if writer is None:
                writer = self.writers[queue_id] = MessageWriter(self.spool, queue_id)
            writer.write(payload)
        elif op == b"C":
            writer = self.writers.pop(queue_id, None) or MessageWriter(self.spool, queue_id)
            try:
                envelope = Envelope.from_bytes(payload, queue_id)
            except ValueError as error:
                writer.abort()
                self.reply(error_line("F", queue_id, errno.EINVAL, str(error)).encode())
                return
            chosen = self._signing_keys(writer, envelope)
            if chosen and writer.size > SIGN_APART_BYTES:
                # Signing it takes long (~45 ms a MiB for RSA + Ed25519): not in
                # this batch, whose 250s would wait for it; see work().
                self.to_sign.append((writer, envelope, chosen))
                return
            self._queue_commit(writer, self._signed(writer, envelope, chosen))
        elif op == b"A":
            writer = self.writers.pop(queue_id, None)
            if writer is not None:
                writer.abort()
        elif op == b"L":
            self.deliveries[queue_id] = None
        elif op == b"B":
            try:
                self.changes.append(change_from_frame(queue_id, payload))
            except ValueError as error:
                self.reply(error_line("E", queue_id, errno.EINVAL, str(error)).encode())
        elif op == b"K":
            self.dkim_keys = signing.keys_from_json(payload)

    def _signing_keys(self, writer: MessageWriter, envelope: Envelope) -> tuple:
        """The keys that sign this message; signing.signing_keys decides (SPEC §9)."""
        if writer.error is not None:  # its commit fails anyway
            return ()
        leaves = any((r.route or {}).get("kind") == RELAY for r in envelope.recipients)
        if not signing.may_sign(trusted=envelope.trusted, leaves_over_smtp=leaves, keys=self.dkim_keys):
            return ()  # From: is not parsed (~60 us a message)
        return signing.signing_keys(trusted=envelope.trusted, leaves_over_smtp=leaves,
                                    from_domain=from_domain(writer.head()), keys=self.dkim_keys)

    def _signed(self, writer: MessageWriter, envelope: Envelope, chosen: tuple) -> Envelope:
        """DKIM-sign before the commit (SPEC §9): here the content is final, and
        this process is not the reactor's. The signature goes into the
        envelope, so every attempt and destination sends the same bytes, local
        deliveries never see it, and the message is never queued in incoming (where
        the delivery manager could start it) without its signature."""
        if not chosen:
            return envelope
        try:
            header = signing.commit_signature(writer.read_all(), chosen)
        except Exception as error:  # a message dkimpy cannot parse goes out unsigned, never lost
            log.warn("{queue_id}: not DKIM-signed: {error}", queue_id=writer.queue_id, error=error)
            return envelope
        return dataclasses.replace(envelope, dkim=header.decode("ascii")) if header else envelope

    def _queue_commit(self, writer: MessageWriter, envelope: Envelope) -> None:
        self.commits.append((writer, envelope))
        if writer.in_memory and has_local_pending(envelope):  # the others never come back for delivery here
            self._remember(writer.queue_id, envelope, writer.content())

    def work(self) -> None:
        """One step: every pending commit as one batch and then all the
        bookkeeping that gathered as one transaction, else sign one large
        message (its commit is the next batch), else some deliveries.

        A large message is signed only once the commits that came with it are
        on disk and answered, and one at a time, so no message waits for more
        than one large signature; it is committed only once signed."""
        if self.commits or self.changes:
            if self.commits:
                self._commit()
            if self.changes:  # never held off by new commits: each message's bookkeeping waits for it
                batch, self.changes = self.changes, []
                results = self.spool.store.apply(batch, durable=False)
                self.reply("".join(_change_reply(c.queue_id, e) for c, e in zip(batch, results)).encode())
        elif self.to_sign:
            writer, envelope, chosen = self.to_sign.pop(0)
            self._queue_commit(writer, self._signed(writer, envelope, chosen))
        elif self.deliveries:
            batch = list(self.deliveries)[:DELIVERY_BATCH]
            for queue_id in batch:
                del self.deliveries[queue_id]
            verdicts = deliver_local_batch(
                self.spool, batch, self.hostname, self.mailbox_root, self.recent, give_up_after=self.give_up_after
            )
            for queue_id in batch:
                self._forget(queue_id)
            self.reply("".join(f"{verdicts[q]} {q}\n" for q in batch).encode())

    def _commit(self) -> None:
        batch, self.commits = self.commits, []
        results = self.spool.commit_batch(batch)
        lines = []
        for (writer, envelope), error in zip(batch, results):
            if error is None:
                signature = f" {base64.b64encode(envelope.dkim.encode('ascii')).decode()}" if envelope.dkim else ""
                lines.append(f"C {writer.queue_id}{signature}\n")
            else:
                self._forget(writer.queue_id)
                lines.append(error_line("F", writer.queue_id, error.errno, str(error.strerror)))
        self.reply("".join(lines).encode())

    def _remember(self, queue_id: str, envelope: Envelope, content: bytes) -> None:
        """Keep a small message for its delivery; the oldest go when over RECENT_BYTES
        (they are then read back from the spool)."""
        self._forget(queue_id)
        self.recent[queue_id] = (envelope, content)
        self.recent_bytes += len(content)
        while self.recent_bytes > RECENT_BYTES:
            self._forget(next(iter(self.recent)))

    def _forget(self, queue_id: str) -> None:
        entry = self.recent.pop(queue_id, None)
        if entry is not None:
            self.recent_bytes -= len(entry[1])

    @property
    def busy(self) -> bool:
        return bool(self.commits or self.changes or self.to_sign or self.deliveries)


def _change_reply(queue_id: str, error: OSError | None) -> str:
    if error is None:
        return f"S {queue_id}\n"
    code = errno.ENOENT if isinstance(error, FileNotFoundError) else error.errno or errno.EIO
    return error_line("E", queue_id, code, str(error.strerror or error))


def error_line(kind: str, queue_id: str, code: int, text: str) -> str:
    """A failure reply, `KIND ID ERRNO TEXT` on one line (`read_error` reads it back)."""
    return f"{kind} {queue_id} {code} {' '.join(text.split())}\n"


def read_error(detail: str) -> tuple[int, str]:
    """The errno and text of a failure reply's `ERRNO TEXT` (EIO when the number is missing)."""
    code, _, text = detail.partition(" ")
    return (int(code) if code.isdigit() else errno.EIO), text


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def run(root: Path, hostname: str, give_up_after: float = 8 * 3600) -> None:
    # The daemon decides when we stop: it closes our stdin (and it closes if
    # the daemon dies), and we finish the commits we were sent first. A
    # Ctrl-C or SIGTERM sent to the whole process group (systemd's default)
    # must not cut a commit short that the daemon will still answer 250.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Our log events go to stderr; the daemon relays each line into its own log.
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    worker = Worker(root, hostname, give_up_after=give_up_after)
    buffer = b""
    while True:
        ready, _, _ = select.select([0], [], [], 0 if worker.busy else None)
        if ready:
            data = os.read(0, 1 << 20)
            if not data:
                break  # the daemon closed our stdin: it is stopping or gone
            buffer += data
            position = 0
            while len(buffer) - position >= FRAME.size:
                op, raw_id, length = FRAME.unpack_from(buffer, position)
                end = position + FRAME.size + length
                if end > len(buffer):
                    break
                worker.handle(op, raw_id.decode("ascii"), buffer[position + FRAME.size : end])
                position = end
            buffer = buffer[position:]
        worker.work()
    while worker.commits or worker.changes or worker.to_sign:  # finish what was asked; deliveries wait for the next start
        worker.work()


if __name__ == "__main__":
    try:
        run(Path(sys.argv[1]), sys.argv[2], *(float(a) for a in sys.argv[3:4]))
    except KeyboardInterrupt:
        pass
