"""DKIM signing at commit in the spool worker (SPEC §9): what is signed, where the signature is kept."""

from __future__ import annotations

import base64
import time

import dkim
import pytest

from epost.delivery import signing
from epost.store.envelope import Envelope, Recipient
from epost.store.spool import MessageWriter
from epost.queue.worker import Worker

CONTENT = (
    b"Received: from client (client [127.0.0.2])\r\n\tby mx.test (epost) with ESMTP id X; Sun, 6 Dec 2026 15:00:00 +0000\r\n"
    b"From: Alice <alice@example.test>\r\nTo: bob@far.test\r\nSubject: hello\r\n"
    b"Date: Sun, 06 Dec 2026 15:00:00 +0000\r\nMessage-ID: <w-1@example.test>\r\n\r\nHello.\r\n"
)
RELAY = {"kind": "relay", "rule": "mx", "hosts": []}
LOCAL = {"kind": "local", "rule": "local", "mailbox": "example.test/alice"}


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dkim")
    return (signing.keygen("example.test", folder, "r1", "rsa")[1],
            signing.keygen("example.test", folder, "e1", "ed25519")[1])


def make_worker(spool, keys):
    replies: list[bytes] = []
    worker = Worker(spool.root, "mx.test", reply=replies.append)
    worker.handle(b"K", "0" * 17, signing.keys_to_json(keys))
    return worker, replies


def commit(worker, spool, content: bytes, trusted: bool, *routes) -> tuple[str, Envelope]:
    queue_id = spool.new_queue_id()
    recipients = tuple(Recipient(f"r{i}@far.test", route) for i, route in enumerate(routes))
    worker.handle(b"W", queue_id, content)
    worker.handle(b"C", queue_id, Envelope(queue_id, "alice@example.test", recipients, time.time(), len(content),
                                           trusted=trusted).to_bytes())
    worker.work()
    stored = spool.load(queue_id, "incoming")
    return queue_id, stored


def dns_for(keys):
    records = {f"{k.selector}._domainkey.{k.domain}.".encode(): f"v=DKIM1; k={k.algorithm}; p={k.public_b64}".encode()
               for k in keys}
    return lambda name, timeout=5: records.get(name)


def verifies(signed: bytes, keys) -> bool:
    """Every signature in `signed` checks out (dkimpy here; OpenDKIM checks the daemon's in tests/e2e)."""
    count = signed.count(b"DKIM-Signature:")
    try:
        return count > 0 and all(dkim.DKIM(signed).verify(idx=i, dnsfunc=dns_for(keys)) for i in range(count))
    except dkim.ValidationError:
        return False


def test_trusted_mail_leaving_over_smtp_is_signed_once_into_its_envelope(spool, keys):
    worker, replies = make_worker(spool, keys)
    queue_id, stored = commit(worker, spool, CONTENT, True, RELAY)
    assert stored.dkim.count("DKIM-Signature:") == 2  # RSA and Ed25519
    assert "a=rsa-sha256" in stored.dkim and "a=ed25519-sha256" in stored.dkim
    # the content on disk is untouched: local copies and `epost show` never carry it
    assert spool.content(queue_id) == CONTENT
    # the daemon learns the signature with the commit (its envelope in memory is the one it sends from)
    kind, qid, b64 = replies[-1].decode().split()
    assert (kind, qid) == ("C", queue_id) and base64.b64decode(b64).decode() == stored.dkim
    assert verifies(stored.dkim.encode() + CONTENT, keys)


def test_untrusted_mail_is_forwarded_unsigned(spool, keys):
    worker, replies = make_worker(spool, keys)
    queue_id, stored = commit(worker, spool, CONTENT, False, RELAY)
    assert stored.dkim == "" and replies[-1] == f"C {queue_id}\n".encode()


def test_mail_with_only_local_recipients_is_not_signed(spool, keys):
    worker, _ = make_worker(spool, keys)
    _, stored = commit(worker, spool, CONTENT, True, LOCAL)
    assert stored.dkim == ""
    _, mixed = commit(worker, spool, CONTENT, True, LOCAL, RELAY)
    assert mixed.dkim.count("DKIM-Signature:") == 2


def test_foreign_from_domain_is_not_signed(spool, keys):
    worker, _ = make_worker(spool, keys)
    _, stored = commit(worker, spool, CONTENT.replace(b"alice@example.test", b"alice@example.test.evil"), True, RELAY)
    assert stored.dkim == ""


def test_a_message_spilled_to_its_tmp_file_is_signed_whole(spool, keys):
    worker, _ = make_worker(spool, keys)
    big = CONTENT + b"x" * 998 + b"\r\n"
    big = big + (b"y" * 998 + b"\r\n") * (MessageWriter.spill_size // 1000 + 50)
    queue_id = spool.new_queue_id()
    for start in range(0, len(big), 65536):  # as the daemon streams it
        worker.handle(b"W", queue_id, big[start:start + 65536])
    assert not worker.writers[queue_id].in_memory
    worker.handle(b"C", queue_id, Envelope(queue_id, "a@example.test", (Recipient("b@far.test", RELAY),),
                                           time.time(), len(big), trusted=True).to_bytes())
    worker.work()
    stored = spool.load(queue_id, "incoming")
    assert verifies(stored.dkim.encode() + big, keys)
    assert not verifies(stored.dkim.encode() + big[:-3] + b"z\r\n", keys)


def test_without_keys_nothing_is_signed(spool):
    worker = Worker(spool.root, "mx.test", reply=lambda line: None)
    _, stored = commit(worker, spool, CONTENT, True, RELAY)
    assert stored.dkim == ""


def test_a_message_that_fails_to_sign_is_still_queued_unsigned(spool, keys, monkeypatch):
    def broken(message, chosen):
        raise ValueError("dkimpy cannot parse this")

    monkeypatch.setattr(signing, "commit_signature", broken)
    worker, replies = make_worker(spool, keys)
    queue_id, stored = commit(worker, spool, CONTENT, True, RELAY)
    assert replies[-1] == f"C {queue_id}\n".encode()  # committed, no signature in the reply
    assert stored.queue_id == queue_id and stored.dkim == ""


def test_a_large_message_is_signed_after_the_batch_it_came_with_is_answered(spool, keys, monkeypatch):
    """Signing 25 MiB takes about a second: the small messages committed with it get their 250 first."""
    from epost.queue import worker as worker_module

    worker, replies = make_worker(spool, keys)
    big = CONTENT + (b"y" * 998 + b"\r\n") * (worker_module.SIGN_APART_BYTES // 1000 + 1)
    signed_after: list[list[bytes]] = []
    real = signing.commit_signature
    monkeypatch.setattr(signing, "commit_signature",
                        lambda message, chosen: signed_after.append(list(replies)) or real(message, chosen))
    large_id, small_id = spool.new_queue_id(), spool.new_queue_id()
    for queue_id, content in ((large_id, big), (small_id, CONTENT)):
        for start in range(0, len(content), 65536):
            worker.handle(b"W", queue_id, content[start:start + 65536])
        worker.handle(b"C", queue_id, Envelope(queue_id, "alice@example.test", (Recipient("b@far.test", RELAY),),
                                               time.time(), len(content), trusted=True).to_bytes())
    assert len(signed_after) == 1  # only the small one was signed in handle()
    worker.work()
    assert replies[-1].startswith(f"C {small_id} ".encode())
    assert spool.state_of(large_id) is None  # never queued unsigned
    while worker.busy:
        worker.work()
    assert [r.split()[1] for r in signed_after[1]] == [small_id.encode()]  # signed once the small one was answered
    kind, qid, b64 = replies[-1].decode().split()
    stored = spool.load(large_id, "incoming")
    assert (kind, qid) == ("C", large_id) and base64.b64decode(b64).decode() == stored.dkim
    assert verifies(stored.dkim.encode() + big, keys)


def test_a_large_untrusted_message_is_committed_with_its_batch(spool, keys):
    from epost.queue import worker as worker_module

    worker, replies = make_worker(spool, keys)
    big = CONTENT + (b"y" * 998 + b"\r\n") * (worker_module.SIGN_APART_BYTES // 1000 + 1)
    queue_id, stored = commit(worker, spool, big, False, RELAY)
    assert replies == [f"C {queue_id}\n".encode()] and stored.dkim == ""


def test_a_message_dkimpy_cannot_sign_is_still_queued_unsigned(spool, keys):
    worker, replies = make_worker(spool, keys)
    queue_id, stored = commit(worker, spool, b"From: a@example.test\r\nSubject: \x00\xff\r\n", True, RELAY)
    assert replies[-1].startswith(f"C {queue_id}".encode())
    assert stored.queue_id == queue_id


def test_an_envelope_queued_before_signing_existed_reads_as_untrusted_and_unsigned():
    old = Envelope("0" * 17, "a@b.test", (), 1.0, 1).to_bytes().replace(b', "trusted": false, "dkim": ""', b"")
    assert b"trusted" not in old
    parsed = Envelope.from_bytes(old, "old")
    assert (parsed.trusted, parsed.dkim) == (False, "")


def test_an_smtp_attempt_sends_the_stored_signature_before_the_content(spool):
    from epost.store.spool import SpooledContent

    queue_id, _ = commit(Worker(spool.root, "mx.test", reply=lambda line: None), spool, CONTENT, False, RELAY)
    content = SpooledContent(spool, queue_id, b"DKIM-Signature: v=1; x\r\n")
    try:
        for _ in range(2):  # every pass (one per session) starts with it
            assert b"".join(content()) == b"DKIM-Signature: v=1; x\r\n" + CONTENT
    finally:
        content.close()
    plain = SpooledContent(spool, queue_id)
    assert b"".join(plain()) == CONTENT
    plain.close()


def test_epost_s_own_bounces_count_as_a_trusted_origin_and_are_signed(spool, keys):
    """A DSN from MAILER-DAEMON@<hostname> under a key's domain leaves signed (docs/authentication.md)."""
    from epost.delivery.bounce import FailedRecipient
    from epost.queue.bounces import BounceSender
    from epost.routing.resolver import Route

    worker, _ = make_worker(spool, keys)

    class Store:  # the worker service's open_message/commit, run in-process
        def open_message(self):
            self.queue_id, self.chunks = spool.new_queue_id(), []
            return self

        def write(self, data):
            self.chunks.append(data)

        def commit(self, envelope):
            worker.handle(b"W", self.queue_id, b"".join(self.chunks))
            worker.handle(b"C", self.queue_id, envelope.to_bytes())
            worker.work()

    class Resolution:
        rejected = False
        finals = [("carol@far.test", Route("relay", "mx", hosts=()))]

    store = Store()
    original = Envelope("1" * 17, "carol@far.test", (), time.time(), 10)
    BounceSender(store, lambda address: Resolution, "mx.example.test", time.time).send(
        original, b"Subject: x\r\n\r\n", [FailedRecipient("dan@elsewhere.test", "5.1.1")])
    stored = spool.load(store.queue_id, "incoming")
    assert stored.trusted and stored.dkim.count("DKIM-Signature:") == 2
    assert verifies(stored.dkim.encode() + b"".join(store.chunks), keys)
