"""Queue surgery over a real spool."""

import pytest

from epost.queue.surgery import waiting_for
from epost.store.envelope import Envelope, Recipient
from epost.store.spool import Spool
from fakes import put_one


def envelope_for(queue_id: str, domain: str) -> Envelope:
    return Envelope(queue_id, "bob@example.org", (Recipient(f"alice@{domain}", {"kind": "relay"}),), 1.0, 10)


def qid(n: int) -> str:
    return f"{n:017X}"


@pytest.fixture
def spool(tmp_path):
    spool = Spool(tmp_path, reactor=None, threadpool=None)
    spool.open()
    yield spool
    spool.close()


def test_waiting_for_picks_pending_relay_recipients(spool):
    store = spool.store
    store.put_batch([(envelope_for(qid(1), "example.com"), b""), (envelope_for(qid(2), "example.net"), b"")])
    put_one(store, envelope_for(qid(3), "example.com"), b"", "deferred")
    put_one(store, envelope_for(qid(4), "example.com").with_recipient(0, state="delivered"), b"", "deferred")
    assert waiting_for(spool, "example.com", ("incoming", "deferred")) == [qid(1), qid(3)]
    assert waiting_for(spool, "example.com", ("hold",)) == []
