"""Fakes shared by the tests: a Clock that is also enough of a reactor, and a
thread pool that runs work at once, so Clock-driven tests stay synchronous."""

from twisted.internet.task import Clock
from twisted.python.failure import Failure


class SynchronousThreadPool:
    """Runs 'threaded' work at once, so a Clock can drive everything."""

    def callInThreadWithCallback(self, on_result, f, *args, **kwargs):
        try:
            result = f(*args, **kwargs)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)


class HeldThreadPool:
    """Runs 'threaded' work only when the test says so, to have work in progress."""

    def __init__(self):
        self.calls = []

    def callInThreadWithCallback(self, on_result, f, *args, **kwargs):
        self.calls.append((on_result, f, args, kwargs))

    def run_one(self):
        on_result, f, args, kwargs = self.calls.pop(0)
        SynchronousThreadPool().callInThreadWithCallback(on_result, f, *args, **kwargs)

    def run_all(self):
        while self.calls:
            self.run_one()


class ClockReactor(Clock):
    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


HELLO = b"Subject: hi\r\n\r\nhello\r\n"


def queue_message(spool, queue: str, envelope, content=HELLO) -> None:
    """Queue a message straight into the spool's queue store (what a daemon left there), for tests of readers."""
    from epost.store.database import QueueStore

    store = QueueStore(spool)
    store.open()
    try:
        assert put_one(store, envelope, content, queue), f"{envelope.queue_id} already queued"
    finally:
        store.close()


def put_one(store, envelope, content, state: str) -> bool:
    """Queue one message by the store's put_batch: False if its ID is already queued, its StoreError on failure."""
    import errno

    [error] = store.put_batch([(envelope, content)], state)
    if error is None:
        return True
    if error.errno == errno.EEXIST:
        return False
    raise error


def queued_ids(spool) -> dict[str, list[str]]:
    """Every queued ID by state, as the spool's queue store holds them (none without a store)."""
    from epost.store.database import QUEUES
    from epost.store.spool import Spool

    reader = Spool(spool, reactor=None, threadpool=None)
    if not reader.exists():
        return {queue: [] for queue in QUEUES}
    reader.open(create=False)
    try:
        return {queue: reader.queued_ids(queue) for queue in QUEUES}
    finally:
        reader.close()


def stored_envelope(spool, queue_id: str, queue: str):
    """The envelope the queue store holds for `queue_id` in `queue`."""
    from epost.store.spool import Spool

    reader = Spool(spool, reactor=None, threadpool=None)
    reader.open(create=False)
    try:
        return reader.load(queue_id, queue)
    finally:
        reader.close()


def damage_envelope(spool, queue_id: str, data: bytes = b"{not json") -> None:
    """Overwrite a queued envelope with bytes that do not parse (a damaged store row)."""
    import sqlite3

    with sqlite3.connect(spool / "queue" / "queue.db") as db:
        assert db.execute("UPDATE message SET envelope = ? WHERE id = ?", (data, queue_id)).rowcount == 1
    db.close()


def record_write_levels(store, monkeypatch) -> list[tuple[bool, int]]:
    """(durable, PRAGMA synchronous at commit) of each write transaction `store` begins, in order.

    An entry is made as the transaction begins (so one that writes nothing or fails
    counts too) and its level re-read at commit."""
    from contextlib import contextmanager

    seen = []
    write = store._write

    @contextmanager
    def recording(durable):
        with write(durable) as conn:
            seen.append((durable, conn.execute("PRAGMA synchronous").fetchone()[0]))
            at = len(seen) - 1
            yield conn
            seen[at] = (durable, conn.execute("PRAGMA synchronous").fetchone()[0])

    monkeypatch.setattr(store, "_write", recording)
    return seen


def qid(n: int) -> str:
    """The n-th queue ID (17 hex digits)."""
    return f"{n:017X}"


def relay_envelope(queue_id: str, domain: str = "example.jp", attempts: int = 0):
    """One pending relay recipient, alice@`domain`, from bob@example.org."""
    from epost.store.envelope import Envelope, Recipient

    route = {"kind": "relay"}
    return Envelope(queue_id, "bob@example.org", (Recipient(f"alice@{domain}", route, attempts=attempts),), 1.0, 10)
