"""The receiver adds Authentication-Results for the relay port's untrusted clients only (SPEC §9)."""

from __future__ import annotations

import ipaddress
import time
from types import SimpleNamespace

import pytest
from twisted.internet import defer, task

from epost.address import parse_mailbox
from epost.smtp.authcheck import AuthChecker, budgeted, check_resolver, dkim_results, spf_results
from epost.smtp.authresults import MethodResult
from epost.smtp.interfaces import Session
from epost.smtp.policy import RecipientPolicy
from epost.smtp.receiver import HoldBudget, SpoolingReceiver

HOST = "mx.example.jp"
STRANGER = Session("relay", "192.0.2.7", 1025, "client.example", True, None, None)
RESULTS = [MethodResult("spf", "pass", (("smtp.mailfrom", "a@client.example"),)), MethodResult("dkim", "none"),
           MethodResult("dmarc", "none", (("header.from", "client.example"),))]
MESSAGE = (b"Authentication-Results: mx.example.jp; dkim=pass header.d=bank.example\r\n"
           b"Authentication-Results: other.example; spf=pass\r\n"
           b"From: a@client.example\r\n\r\nbody\r\n")
CLEANED = MESSAGE.split(b"\r\n", 1)[1]  # without the field claiming our name (RFC 8601 §5)


class Writer:
    queue_id = "0190000000000A000"

    def __init__(self):
        self.data, self.size = b"", 0

    def write(self, data: bytes) -> None:
        self.data += data
        self.size += len(data)

    def commit(self, envelope):
        self.envelope = envelope
        return defer.succeed(self.queue_id)

    def abort(self) -> None:
        self.aborted = True


class Store:
    def open_message(self):
        self.writer = Writer()
        return self.writer


class Checker:
    """AuthChecker's shape: begin() when DATA starts, finish() with the message."""

    def __init__(self):
        self.begun, self.calls = [], []

    def begin(self, client_ip, helo, sender):
        self.begun.append((client_ip, helo, sender))
        return SimpleNamespace(finish=lambda message, let_go: self._finish(client_ip, helo, sender, message, let_go))

    def _finish(self, client_ip, helo, sender, message, let_go):
        self.calls.append((client_ip, helo, sender, message))
        let_go()  # the job has ended
        return defer.succeed(RESULTS)


def policy(networks=("127.0.0.0/8",)) -> RecipientPolicy:
    """The real policy: its `trusted` decides who is checked."""
    return RecipientPolicy(None, local_domains=(), relay_domains=(), relay_networks=[ipaddress.ip_network(n) for n in networks],
                           gateway=lambda: None, aliases=lambda: None)


def receive(session: Session, checker, networks=("127.0.0.0/8",)):
    store = Store()
    receiver = SpoolingReceiver(store, policy(networks), HOST, now=lambda: 0.0, checker=checker)
    message = receiver.open_message(session, parse_mailbox("a@client.example"), [(parse_mailbox("b@example.jp"), [])], {})
    message.write(MESSAGE[:30])
    message.write(MESSAGE[30:])
    return message, store


def test_an_untrusted_client_gets_the_header_after_received_and_our_old_one_is_gone():
    checker = Checker()
    message, store = receive(STRANGER, checker)
    assert store.writer.data.startswith(b"Received:") and b"body" not in store.writer.data  # held until checked
    assert checker.begun == [("192.0.2.7", "client.example", "a@client.example")] and checker.calls == []  # SPF starts with DATA
    assert message.commit().result == "0190000000000A000"
    assert checker.calls == [("192.0.2.7", "client.example", "a@client.example", CLEANED)]  # checked without our old field
    received, rest = store.writer.data.split(b"\r\nAuthentication-Results: mx.example.jp;\r\n\tspf=pass", 1)
    assert received.startswith(b"Received:") and b"\r\n\t" in received
    assert rest.count(b"Authentication-Results: mx.example.jp") == 0
    assert b"Authentication-Results: other.example; spf=pass\r\nFrom: a@client.example\r\n\r\nbody\r\n" in rest
    assert store.writer.envelope.size == len(store.writer.data)


@pytest.mark.parametrize("session", [
    STRANGER.__class__("relay", "127.0.0.1", 1025, "client.example", True, None, None),  # relay_networks
    STRANGER.__class__("relay", "192.0.2.7", 1025, "client.example", True, "TLSv1.3", "alice@example.jp"),  # authenticated
    STRANGER.__class__("submission", "192.0.2.7", 1025, "client.example", True, None, None),  # not the relay port
    STRANGER.__class__("relay", "", 0, "client.example", True, None, None),  # no IP (a UNIX socket)
])
def test_trusted_authenticated_and_submission_clients_get_no_header_but_lose_forged_ones_of_ours(session):
    """RFC 8601 §5: a field claiming our name goes whoever sends it; a foreign one stays."""
    checker = Checker()
    message, store = receive(session, checker)
    assert store.writer.data.endswith(CLEANED) and b"bank.example" not in store.writer.data  # streamed, not held
    message.commit()
    assert checker.begun == checker.calls == [] and b"mx.example.jp;" not in store.writer.data
    assert store.writer.data.count(b"Authentication-Results") == 1


def test_without_a_checker_nothing_is_added_and_forged_fields_of_ours_still_go():
    message, store = receive(STRANGER, None)
    message.commit()
    assert store.writer.data.endswith(CLEANED) and store.writer.data.count(b"Authentication-Results") == 1


def test_an_ipv4_mapped_client_in_relay_networks_is_trusted():
    checker = Checker()
    message, _ = receive(Session("relay", "::ffff:127.0.0.1", 1, "h.example", True, None, None), checker)
    message.commit()
    assert checker.calls == []


class _Pool:
    """Runs nothing: a job stuck behind others in a full pool."""

    def callInThreadWithCallback(self, onResult, func, *args, **kwargs):
        pass


def test_a_check_that_does_not_finish_in_time_commits_with_temperror_not_a_refusal():
    clock = task.Clock()
    checker = AuthChecker(clock, _Pool(), budget=4, org_domain=lambda d: d)
    message, store = receive(STRANGER, checker)
    committed = message.commit()
    assert not committed.called
    clock.advance(4.9)
    assert not committed.called
    clock.advance(0.2)
    assert committed.result == "0190000000000A000"
    assert b"\tspf=temperror" in store.writer.data and b"\tdkim=temperror" in store.writer.data
    assert b"\tdmarc=temperror" in store.writer.data


def test_a_job_that_starts_after_its_deadline_looks_nothing_up(monkeypatch):
    from epost.smtp import authcheck

    def no_lookups(*args):
        raise AssertionError("a late job asked for a lookup")

    monkeypatch.setattr(authcheck, "budgeted", no_lookups)
    checker = AuthChecker(task.Clock(), _Pool(), budget=4, org_domain=lambda d: d)
    results = checker.results("192.0.2.7", "client.example", "a@client.example", MESSAGE, time.monotonic() - 1)
    assert [r.result for r in results] == ["temperror"] * 3


def test_spent_budget_means_temperror_for_every_identity_and_signature():
    spent = budgeted(check_resolver(), time.monotonic() - 1)  # asks nothing: no DNS server is touched
    spf, domain = spf_results(spent, "192.0.2.7", "a@client.example", "client.example")
    assert [r.result for r in spf] == ["temperror", "temperror"] and domain is None
    signed = b"DKIM-Signature: v=1; a=rsa-sha256; d=client.example; s=s; h=from; bh=AA==; b=AA==\r\n" + MESSAGE
    dkim, passed = dkim_results(spent, signed)
    assert [r.result for r in dkim] == ["temperror"] and passed == []
    assert ("header.d", "client.example") in dkim[0].properties


def test_a_message_over_the_hold_budget_streams_unchecked_with_forged_headers_still_removed():
    checker = Checker()
    store = Store()
    receiver = SpoolingReceiver(store, policy(()), HOST, now=lambda: 0.0, checker=checker)
    receiver.hold = HoldBudget(limit=40)  # the first write fits, the second does not
    message = receiver.open_message(STRANGER, parse_mailbox("a@client.example"), [(parse_mailbox("b@example.jp"), [])], {})
    message.write(b"Subject: s\r\n")
    assert receiver.hold.held == 12 and b"Subject" not in store.writer.data
    message.write(MESSAGE)
    assert receiver.hold.held == 0  # given back at once
    assert b"body" in store.writer.data  # streaming again, not waiting for the end
    assert message.commit().result == "0190000000000A000"
    assert checker.calls == []
    data = store.writer.data
    assert b"\r\nAuthentication-Results: mx.example.jp; none (not checked: too much mail waiting for its checks)\r\n" in data
    assert b"dkim=pass header.d=bank.example" not in data
    assert data.endswith(b"Authentication-Results: other.example; spf=pass\r\nFrom: a@client.example\r\n\r\nbody\r\n")


def test_held_bytes_are_given_back_after_the_commit_and_after_an_abort():
    receiver = SpoolingReceiver(Store(), policy(()), HOST, now=lambda: 0.0, checker=Checker())
    for end in ("commit", "abort"):
        message = receiver.open_message(STRANGER, None, [(parse_mailbox("b@example.jp"), [])], {})
        message.write(MESSAGE)
        assert receiver.hold.held == len(CLEANED)
        getattr(message, end)()
        assert receiver.hold.held == 0, end


class _LatePool:
    """Keeps the jobs; the test runs them when it likes (threads that answer late)."""

    def __init__(self):
        self.jobs = []

    def callInThreadWithCallback(self, onResult, func, *args, **kwargs):
        self.jobs.append(lambda: onResult(True, func(*args, **kwargs)))

    def run(self):
        for job in self.jobs:
            job()


class _ClockWithThreads(task.Clock):
    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


def _answered_check():
    """A check whose two parts wait in a _LatePool for the test to run them."""
    clock, pool = _ClockWithThreads(), _LatePool()
    checker = AuthChecker(clock, pool, budget=4, org_domain=lambda d: d)
    checker._spf_job = lambda *args: (RESULTS[:1], "client.example")
    checker._content_job = lambda *args: (RESULTS[1:2], [], RESULTS[2])
    return clock, pool, checker.check("192.0.2.7", "client.example", "a@client.example", MESSAGE)


def test_an_answer_after_the_timeout_is_dropped_quietly():
    clock, pool, done = _answered_check()
    clock.advance(5.1)
    assert [r.result for r in done.result] == ["temperror"] * 3
    pool.run()  # no AlreadyCalledError, nothing changes
    assert [r.result for r in done.result] == ["temperror"] * 3


def test_an_answer_in_time_is_used():
    clock, pool, done = _answered_check()
    clock.advance(3)
    pool.run()
    assert done.result == RESULTS
    clock.advance(10)  # the timeout was cancelled with the answer
    assert done.result == RESULTS


def test_held_bytes_stay_counted_until_a_late_job_really_ends_and_a_queued_one_drops_the_message():
    """The reactor gives up at budget + 1 s and commits with temperror; the
    thread job may still have the message: the hold budget is given back
    only when the job has ended. A job still queued then finds no message."""
    clock, pool = _ClockWithThreads(), _LatePool()
    checker = AuthChecker(clock, pool, budget=4, org_domain=lambda d: d)
    checked = []
    checker._spf_job = lambda *args: (RESULTS[:1], "client.example")
    checker._content_job = lambda message, deadline: checked.append(message) or (RESULTS[1:2], [], RESULTS[2])
    message, store = receive(STRANGER, checker)
    committed = message.commit()
    clock.advance(5.1)
    assert committed.result == "0190000000000A000" and b"\tdkim=temperror" in store.writer.data
    receiver_hold = message._hold
    assert receiver_hold.held == len(CLEANED)  # the queued job still has the message
    pool.run()
    assert receiver_hold.held == 0 and checked == []  # it ended at once, without the message


def test_held_bytes_are_given_back_when_a_job_in_time_has_ended_and_the_message_is_written():
    clock, pool = _ClockWithThreads(), _LatePool()
    checker = AuthChecker(clock, pool, budget=4, org_domain=lambda d: d)
    checker._spf_job = lambda *args: (RESULTS[:1], "client.example")
    checker._content_job = lambda message, deadline: (RESULTS[1:2], [], RESULTS[2])
    message, store = receive(STRANGER, checker)
    committed = message.commit()
    assert message._hold.held == len(CLEANED)
    pool.run()
    assert committed.result == "0190000000000A000" and message._hold.held == 0
    assert b"\tdkim=none" in store.writer.data
