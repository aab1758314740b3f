"""The probe session over StringTransport and task.Clock: we play the next hop."""

from __future__ import annotations

from twisted.internet import task
from twisted.internet.testing import StringTransport

from epost.delivery.probe import ProbeClient
from epost.delivery.smtp_client import TransactionResult

EHLO_PIPE = b"250-mx.remote\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
EHLO_PLAIN = b"250 mx.remote\r\n"


class Probe:
    def __init__(self, recipients=("a@x", "b@x"), deadline: float = 8.0) -> None:
        self.clock = task.Clock()
        self.client = ProbeClient("mx.local", "", list(recipients), lambda: (), 0, False, self.clock, None, deadline=deadline)
        self.transport = StringTransport()
        self.client.makeConnection(self.transport)
        self.results: list[TransactionResult] = []
        self.client.done.addCallback(self.results.append)

    def server(self, data: bytes) -> bytes:
        self.transport.clear()
        self.client.dataReceived(data)
        return self.transport.value()


def test_pipelined_probe_asks_null_sender_and_every_rcpt_then_quits_without_data() -> None:
    p = Probe()
    assert p.server(b"220 mx.remote ESMTP\r\n") == b"EHLO mx.local\r\n"
    assert p.server(EHLO_PIPE) == b"MAIL FROM:<>\r\nRCPT TO:<a@x>\r\nRCPT TO:<b@x>\r\n"
    assert p.server(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n550 5.1.1 no such user\r\n") == b"QUIT\r\n"
    outcomes = p.results[0].recipients
    assert (outcomes["a@x"].code, outcomes["a@x"].stage) == (250, "rcpt")
    assert (outcomes["b@x"].code, outcomes["b@x"].text) == (550, "5.1.1 no such user")


def test_probe_without_pipelining_sends_one_rcpt_at_a_time_and_never_data() -> None:
    p = Probe()
    p.server(b"220 mx.remote\r\n")
    assert p.server(EHLO_PLAIN) == b"MAIL FROM:<>\r\n"
    assert p.server(b"250 ok\r\n") == b"RCPT TO:<a@x>\r\n"
    assert p.server(b"250 ok\r\n") == b"RCPT TO:<b@x>\r\n"
    assert p.server(b"250 ok\r\n") == b"QUIT\r\n"
    assert {r: o.code for r, o in p.results[0].recipients.items()} == {"a@x": 250, "b@x": 250}


def test_next_hop_mute_after_greeting_gives_no_answer_at_the_deadline_not_later() -> None:
    p = Probe(deadline=8.0)
    p.server(b"220 mx.remote\r\n")
    p.server(EHLO_PIPE)
    p.clock.advance(7.9)
    assert p.results == []
    p.clock.advance(0.1)
    assert [o.code for o in p.results[0].recipients.values()] == [None, None]
    assert p.transport.disconnecting or p.transport.disconnected or p.client._closed


def test_garbage_reply_is_no_answer_and_the_connection_is_dropped() -> None:
    p = Probe()
    p.server(b"220 mx.remote\r\n")
    p.server(EHLO_PIPE)
    p.server(b"250 ok\r\nHELLO THERE\r\n")
    assert all(o.code is None for o in p.results[0].recipients.values())
    assert p.client._closed


def test_connection_closed_mid_probe_is_no_answer() -> None:
    p = Probe()
    p.server(b"220 mx.remote\r\n")
    p.server(EHLO_PIPE)
    p.client.connectionLost()
    assert all(o.code is None for o in p.results[0].recipients.values())


def test_refused_null_sender_answers_every_address_at_mail_stage() -> None:
    p = Probe()
    p.server(b"220 mx.remote\r\n")
    p.server(EHLO_PIPE)
    p.server(b"550 5.7.1 no bounces here\r\n503 5.5.1 need MAIL\r\n503 5.5.1 need MAIL\r\n")
    assert {o.stage for o in p.results[0].recipients.values()} == {"mail"}
