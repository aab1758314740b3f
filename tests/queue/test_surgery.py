"""Queue surgery over a real spool."""

from epost.queue.surgery import waiting_for
from fakes import put_one, qid
from fakes import relay_envelope as envelope_for


def test_waiting_for_picks_pending_relay_recipients(spool):
    store = spool.store
    store.put_batch([(envelope_for(qid(1), "example.com"), b""), (envelope_for(qid(2), "example.net"), b"")])
    put_one(store, envelope_for(qid(3), "example.com"), b"", "deferred")
    put_one(store, envelope_for(qid(4), "example.com").with_recipient(0, state="delivered"), b"", "deferred")
    assert waiting_for(spool, "example.com", ("incoming", "deferred")) == [qid(1), qid(3)]
    assert waiting_for(spool, "example.com", ("hold",)) == []
