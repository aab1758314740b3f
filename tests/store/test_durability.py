"""SPEC §4: `250` only once the message is on the disk. A kill -9 cannot show a
missing flush (the page cache survives it), so these check the level each
write transaction runs at: FULL for what acknowledges mail or the operator's
word, NORMAL only for delivery bookkeeping (docs/queue.md)."""

from __future__ import annotations

import pytest

from epost.queue import surgery
from epost.store.envelope import Envelope, Recipient
from epost.store.spool import MessageWriter, Spool
from fakes import qid, record_write_levels

QUEUE_ID = qid(1)


@pytest.fixture
def levels(spool, monkeypatch):
    """(durable, PRAGMA synchronous at commit) of each write transaction, in order."""
    return record_write_levels(spool.store, monkeypatch)


def queue_one(spool: Spool) -> Envelope:
    writer = MessageWriter(spool, QUEUE_ID)
    writer.write(b"Subject: kept\r\n\r\nbody\r\n")
    envelope = Envelope(QUEUE_ID, "a@b.test", (Recipient("c@d.test", {"kind": "relay"}),), 1.0, 24)
    assert spool.commit_batch([(writer, envelope)]) == [None]
    return envelope


FULL, NORMAL = 2, 1


def test_the_commit_that_a_250_waits_for_is_flushed(spool, levels):
    queue_one(spool)
    assert levels == [(True, FULL)]


@pytest.mark.parametrize("operation", [
    lambda spool: surgery.hold(spool, QUEUE_ID),
    lambda spool: surgery.delete(spool, QUEUE_ID),
    lambda spool: (surgery.hold(spool, QUEUE_ID), surgery.release(spool, QUEUE_ID, 2.0)),
])
def test_operator_surgery_is_flushed(spool, levels, operation):
    queue_one(spool)
    operation(spool)
    assert levels[1:] and all(level == (True, FULL) for level in levels[1:]), levels


def test_delivery_bookkeeping_alone_is_not(spool, levels):
    envelope = queue_one(spool)
    spool.move(envelope.with_recipient(0, attempts=1), "incoming", "deferred", durable=False)
    spool.remove(QUEUE_ID, "deferred", durable=False)
    assert levels == [(True, FULL), (False, NORMAL), (False, NORMAL)]
