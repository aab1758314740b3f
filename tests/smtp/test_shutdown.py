"""SMTPServer.shut_down(): how each session ends when the daemon stops (StringTransport, task.Clock)."""

from __future__ import annotations

from twisted.internet import defer
from twisted.logger import globalLogPublisher

from epost.reply import Reply
from epost.smtp.interfaces import Rejected
from test_server import ENVELOPE, HELLO, codes, connect, replies, send

SHUTTING = "421 4.3.2 mx.example.test Service shutting down"


class Logged:
    """Collects the text of the log events emitted while it is in a `with`."""

    def __enter__(self):
        from twisted.logger import formatEvent

        self.lines: list[str] = []
        self._observer = lambda event: self.lines.append(formatEvent(event))
        globalLogPublisher.addObserver(self._observer)
        return self.lines

    def __exit__(self, *exc):
        globalLogPublisher.removeObserver(self._observer)


def lose(server, transport):
    """What the reactor does after loseConnection()."""
    assert transport.disconnecting
    server.connectionLost(None)


def test_a_session_between_transactions_gets_421_at_once_and_a_log_line():
    server, transport, _, _ = connect()
    send(server, HELLO)
    with Logged() as log:
        ended = server.shut_down(5)
    assert replies(transport)[-1] == SHUTTING
    assert [line for line in log if "421 4.3.2" in line and "between transactions" in line]
    assert ended.called and server.closed  # once the 421 is written: a client that does not read holds up nothing
    lose(server, transport)


def test_a_session_in_data_that_finishes_within_the_grace_gets_250_then_421():
    server, transport, receiver, clock = connect()
    send(server, HELLO, ENVELOPE, b"DATA\r\n", b"Subject: hi\r\n\r\nfirst half\r\n")
    ended = server.shut_down(5)
    clock.advance(4)
    assert not transport.disconnecting and codes(transport)[-1] == "354" and not ended.called
    send(server, b"second half\r\n.\r\n")
    assert replies(transport)[-2:] == ["250 2.0.0 Ok: queued as Q1", SHUTTING]
    assert [w.content for w in receiver.committed] == [b"Subject: hi\r\n\r\nfirst half\r\nsecond half\r\n"]
    assert ended.called


def test_a_session_still_in_data_after_the_grace_gets_421_and_its_message_is_dropped():
    server, transport, receiver, clock = connect()
    send(server, HELLO, ENVELOPE, b"DATA\r\n", b"Subject: hi\r\n\r\nslow")
    server.shut_down(5)
    with Logged() as log:
        clock.advance(5)
    assert replies(transport)[-1] == SHUTTING and transport.disconnecting
    assert receiver.committed == [] and server._writer is None
    assert [line for line in log if "421 4.3.2" in line and "in DATA: message not queued" in line]
    send(server, b"\r\n.\r\n")  # too late: nothing more is read
    assert receiver.committed == [] and codes(transport).count("250") == 3  # EHLO, MAIL, RCPT


def test_a_transaction_before_data_gets_the_grace_too():
    server, transport, _, clock = connect()
    send(server, HELLO, ENVELOPE)
    server.shut_down(5)
    assert not transport.disconnecting
    send(server, b"RSET\r\n")  # the transaction is over: closed right after its answer
    assert replies(transport)[-2:] == ["250 2.0.0 Ok", SHUTTING] and transport.disconnecting


def test_a_commit_in_flight_is_answered_250_even_after_the_grace():
    server, transport, receiver, clock = connect()
    pending = defer.Deferred()
    receiver.open_message = lambda *a: type("W", (), {
        "queue_id": "Q9", "write": lambda s, d: None, "commit": lambda s: pending, "abort": lambda s: None,
        "registerProducer": lambda s, p, st: None, "unregisterProducer": lambda s: None,
    })()
    send(server, HELLO, ENVELOPE, b"DATA\r\n", b"hi\r\n.\r\n")
    ended = server.shut_down(5)
    clock.advance(60)
    assert codes(transport)[-1] == "354" and not transport.disconnecting and not ended.called
    pending.callback("Q9")
    assert replies(transport)[-2:] == ["250 2.0.0 Ok: queued as Q9", SHUTTING] and transport.disconnecting
    assert ended.called


def test_a_commit_refused_because_the_spool_stops_is_421_and_logged_never_451():
    server, transport, receiver, _ = connect()
    receiver.commit_error = Rejected(Reply(421, "4.3.2", "Service shutting down"))
    with Logged() as log:
        send(server, HELLO, ENVELOPE, b"DATA\r\n", b"hi\r\n.\r\n")
    assert replies(transport)[-1] == SHUTTING and transport.disconnecting
    assert "451" not in codes(transport)
    assert [line for line in log if "421 4.3.2" in line and "message not queued" in line]


def test_shut_down_of_a_closed_session_fires_at_once():
    server, transport, _, _ = connect()
    send(server, b"QUIT\r\n")
    lose(server, transport)
    assert server.shut_down(5).called


def test_a_session_that_closes_itself_meanwhile_ends_its_shut_down_when_the_connection_is_lost():
    server, transport, _, clock = connect()
    send(server, HELLO, ENVELOPE)
    ended = server.shut_down(5)
    send(server, b"QUIT\r\n")
    assert replies(transport)[-1] == "221 2.0.0 Bye" and not ended.called
    lose(server, transport)
    assert ended.called
    clock.advance(5)  # the grace timer was cancelled: no 421 after the 221
    assert replies(transport)[-1] == "221 2.0.0 Bye"
