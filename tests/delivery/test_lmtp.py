"""LMTP delivery of queued mail (deliver_lmtp_batch) against a small LMTP server on loopback:
what reaches the server, and what the daemon holds while it goes out."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.protocols.basic import LineReceiver
from twisted.trial import unittest

from epost.delivery import lmtp
from epost.store.envelope import Envelope, Recipient
from epost.store.spool import MessageWriter, Spool
from fakes import SynchronousThreadPool


class _LMTPServer(LineReceiver):
    """Just enough LMTP (RFC 2033): one 250 per recipient after the final dot."""

    delimiter = b"\r\n"
    MAX_LENGTH = 1 << 20

    def connectionMade(self):
        self.data: list[bytes] | None = None
        self.recipients: list[bytes] = []
        self.sendLine(b"220 lmtp.test LMTP ready")

    def lineReceived(self, line: bytes) -> None:
        if self.data is not None:
            if line == b".":
                self.factory.messages.append(b"".join(self.data))
                self.data = None
                for _ in self.recipients:
                    self.sendLine(b"250 2.0.0 delivered")
                self.recipients = []
            else:
                self.data.append((line[1:] if line.startswith(b".") else line) + b"\r\n")
            return
        verb = line[:4].upper()
        if verb == b"LHLO":
            self.sendLine(b"250-lmtp.test")
            self.sendLine(b"250 8BITMIME")
        elif verb == b"MAIL":
            self.sendLine(b"250 2.1.0 ok")
        elif verb == b"RCPT":
            self.recipients.append(line)
            self.sendLine(b"250 2.1.5 ok")
        elif verb == b"DATA":
            self.data = []
            self.sendLine(b"354 go ahead")
        elif verb == b"QUIT":
            self.sendLine(b"221 2.0.0 bye")
            self.transport.loseConnection()
        else:
            self.sendLine(b"500 5.5.1 what?")

    def connectionLost(self, reason):
        self.factory.closed.callback(None)


class LMTPBatchTests(unittest.TestCase):
    def setUp(self):
        self.root = Path(tempfile.mkdtemp(prefix="epost-lmtp-batch-"))
        self.addCleanup(shutil.rmtree, self.root, True)
        self.spool = Spool(self.root, reactor=reactor, threadpool=SynchronousThreadPool())
        self.spool.open()
        self.addCleanup(self.spool.close)
        factory = Factory.forProtocol(_LMTPServer)
        factory.messages = []
        factory.closed = self.closed = defer.Deferred()  # the one connection ended (after QUIT)
        self.messages = factory.messages
        return TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory).addCallback(self._listening)

    def _listening(self, port):
        self.addCleanup(port.stopListening)
        self.endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)

    def queue(self, content: bytes) -> str:
        writer = MessageWriter(self.spool, self.spool.new_queue_id())
        writer.write(content)
        recipient = Recipient("alice@example.test", {"kind": "local", "mailbox": "example.test/alice"})
        envelope = Envelope(writer.queue_id, "x@example.org", (recipient,), time.time(), len(content))
        assert self.spool.commit_batch([(writer, envelope)]) == [None]
        return writer.queue_id

    @defer.inlineCallbacks
    def test_a_large_queued_message_is_streamed_in_chunks_and_arrives_byte_for_byte(self):
        lines = [b"Subject: big\r\n", b"\r\n", b".a line that needs a dot stuffed\r\n"]
        lines += [b"%06d %s\r\n" % (n, b"y" * 70) for n in range(8000)]  # ~600 KiB
        content = b"".join(lines)
        queue_id = self.queue(content)
        large = self.spool.content(queue_id)
        assert isinstance(large, Path)  # over 256 KiB: a file in queue/large/

        def never(*args, **kwargs):
            raise AssertionError("the whole message was read into the daemon")

        self.patch(Path, "read_bytes", never)
        chunk_sizes: list[int] = []

        class Recording(lmtp.LMTPClient):
            def __init__(self, hostname, sender, recipients, content, size, *args, **kwargs):
                def recorded():
                    for chunk in content():
                        chunk_sizes.append(len(chunk))
                        yield chunk
                assert size == len(content_bytes)
                super().__init__(hostname, sender, recipients, recorded, size, *args, **kwargs)

        content_bytes = content
        self.patch(lmtp, "LMTPClient", Recording)
        verdicts = yield lmtp.deliver_lmtp_batch(self.spool, [queue_id], reactor=reactor,
                                                 threadpool=SynchronousThreadPool(), endpoint=self.endpoint,
                                                 hostname="mx.example.test")
        yield self.closed
        yield deferLater(reactor, 0.01, lambda: None)  # the client saw the close too
        assert verdicts == {queue_id: "D"}
        assert self.messages == [content]
        assert sum(chunk_sizes) == len(content) and max(chunk_sizes) <= 64 * 1024
        assert self.spool.state_of(queue_id) is None
        # The handle on its large file is closed once the attempt is over.
        assert not [fd for fd in os.listdir("/proc/self/fd") if str(large) in _link(fd)]

    @defer.inlineCallbacks
    def test_a_content_that_cannot_be_read_waits_and_the_batch_before_it_is_still_recorded(self):
        from epost.store.database import StoreError

        delivered, unreadable = self.queue(b"Subject: one\r\n\r\nfirst\r\n"), self.queue(b"Subject: two\r\n\r\nsecond\r\n")
        open_content = self.spool.open_content

        def failing(queue_id):
            if queue_id == unreadable:
                raise StoreError(5, "disk I/O error")
            return open_content(queue_id)

        self.patch(self.spool, "open_content", failing)
        verdicts = yield lmtp.deliver_lmtp_batch(self.spool, [delivered, unreadable], reactor=reactor,
                                                 threadpool=SynchronousThreadPool(), endpoint=self.endpoint,
                                                 hostname="mx.example.test")
        yield self.closed
        self.flushLoggedErrors(StoreError)
        assert verdicts == {delivered: "D", unreadable: "R"}
        assert self.messages == [b"Subject: one\r\n\r\nfirst\r\n"]
        assert self.spool.state_of(delivered) is None  # its delivery is recorded: never sent twice
        assert self.spool.state_of(unreadable) == "incoming"


def _link(fd: str) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""
