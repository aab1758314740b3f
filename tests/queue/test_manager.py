"""The delivery manager driven by task.Clock: exact attempt times, the files it
keeps (envelopes, deferred/, Domain.mri, logs), bounces, and restart."""

from __future__ import annotations

import errno
import sqlite3
from contextlib import contextmanager
from pathlib import Path

import pytest
from twisted.internet import defer
from twisted.logger import LogLevel, globalLogPublisher

from epost.config import RetryConfig
from epost.delivery.courier import Attempt, CourierError
from epost.delivery.smtp_client import Outcome
from epost.logs import parse_senderlog_line
from epost.queue.domain_state import parse_mri
from epost.store.envelope import Envelope, Recipient
from epost.queue.manager import DeliveryManager
from epost.store.spool import Spool
from epost.routing.resolver import Route
from fakes import ClockReactor, SynchronousThreadPool, put_one

T0 = 1_800_000_000.0
CONTENT = b"Subject: hello\r\nMessage-ID: <m1@example.org>\r\n\r\nbody\r\n"
HOST = "mx.far.test[127.0.0.2]:25"


def relay(address: str) -> Recipient:
    domain = address.rpartition("@")[2]
    return Recipient(address, {"kind": "relay", "rule": "mx", "mx_domain": domain})


class ScriptedCourier:
    """Answers each attempt from a script: address -> list of (code, text) per attempt; None = no answer."""

    def __init__(self, script: dict[str, list]):
        self.script = {k: list(v) for k, v in script.items()}
        self.calls: list[tuple[float, list[str], bytes]] = []
        self.clock: ClockReactor | None = None
        self.hold: defer.Deferred | None = None  # when set, attempts wait on it
        self.unavailable = 0  # this many attempts fail with CourierError (no attempt made)

    def deliver(self, route, sender, recipients, content, size, body_8bit):
        if self.unavailable:
            self.unavailable -= 1
            return defer.fail(CourierError("the courier process ended during the attempt"))
        body = b"".join(content())
        self.calls.append((self.clock.seconds(), list(recipients), body))
        outcomes = {}
        for r in recipients:
            answer = self.script[r].pop(0) if len(self.script[r]) > 1 else self.script[r][0]
            if answer is None:
                outcomes[r] = Outcome(None, "cannot connect to mx.far.test[127.0.0.2]:25", "connect")
            else:
                outcomes[r] = Outcome(answer[0], answer[1], "rcpt")
        attempt = Attempt(outcomes, HOST, False)
        if self.hold is not None:
            return self.hold.addCallback(lambda _: attempt)
        return defer.succeed(attempt)

    def close_idle(self):
        """No connections to close."""


class RecordingBounces:
    def __init__(self):
        self.sent: list[tuple[Envelope, bytes, list]] = []

    def send(self, original, headers, failed):
        self.sent.append((original, headers, failed))
        return defer.succeed("BOUNCE")


class Harness:
    def __init__(self, root: Path, script: dict, retry: RetryConfig = RetryConfig(), **limits):
        self.root = root
        self.clock = ClockReactor()
        self.clock.advance(T0)
        self.spool = Spool(root, reactor=self.clock, threadpool=SynchronousThreadPool())
        self.spool.open()
        self.courier = ScriptedCourier(script)
        self.courier.clock = self.clock
        self.bounces = RecordingBounces()
        self.manager = DeliveryManager(
            self.spool,
            self.clock,
            SynchronousThreadPool(),
            self.courier,
            self.bounces,
            route_final=lambda address: Route("relay", "mx", mx_domain=address.domain),
            hostname="mx.example.jp",
            retry=retry,
            **limits,
        )

    def start(self):
        self.manager.startService()
        self.clock.advance(0)  # the deferred queue is loaded after start-up

    def queue(self, *recipients: Recipient, sender: str = "bob@example.org") -> Envelope:
        """Commit a message into incoming/ and pass it on, as the local runner does."""
        writer = self.spool.open_message()
        writer.write(CONTENT)
        envelope = Envelope(writer.queue_id, sender, recipients, self.clock.seconds(), len(CONTENT))
        self.spool.commit_batch([(writer, envelope)])
        self.manager.enqueue(writer.queue_id, envelope)
        return envelope

    def queued(self, queue: str) -> list[str]:
        """The IDs the queue store holds in `queue`."""
        return self.spool.queued_ids(queue)

    def attempt_times(self) -> list[float]:
        return [t - T0 for t, _, _ in self.courier.calls]

    def senderlog(self) -> list[dict]:
        path = self.root / "log" / "senderlog"
        return [parse_senderlog_line(line) for line in path.read_text().splitlines()] if path.exists() else []

    def faillog(self) -> list[str]:
        path = self.root / "log" / "faillog"
        return path.read_text().splitlines() if path.exists() else []

    def mri(self, domain: str):
        path = self.root / "domains" / domain / "Domain.mri"
        return parse_mri(path.read_text(), path) if path.exists() else None

    def run_until(self, seconds: float, step: float = 1.0):
        while self.clock.seconds() < T0 + seconds:
            self.clock.advance(step)


def test_accepted_mail_leaves_the_queue_with_one_sent_line_per_recipient(tmp_path):
    h = Harness(tmp_path, {"a@far.test": [(250, "2.0.0 ok")], "b@far.test": [(250, "2.0.0 ok")]})
    h.start()
    envelope = h.queue(relay("a@far.test"), relay("b@far.test"))
    assert h.queued("incoming") == [] and h.queued("deferred") == []
    (call,) = h.courier.calls
    assert call[1] == ["a@far.test", "b@far.test"]  # one transaction for the domain
    assert call[2] == CONTENT
    lines = h.senderlog()
    assert [(l["recipient"], l["status"], l["attempt"]) for l in lines] == [("a@far.test", "sent", 1), ("b@far.test", "sent", 1)]
    assert all(l["queue_id"] == envelope.queue_id and l["relay"] == HOST for l in lines)
    assert h.faillog() == [] and h.bounces.sent == []
    assert not (tmp_path / "domains" / "far.test").exists()


def test_an_attempt_the_courier_could_not_make_is_retried_without_blaming_the_destination(tmp_path):
    h = Harness(tmp_path, {"a@far.test": [(250, "2.0.0 ok")], "b@far.test": [(250, "2.0.0 ok")]})
    h.courier.unavailable = 1
    h.start()
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        first = h.queue(relay("a@far.test"))
    finally:
        globalLogPublisher.removeObserver(events.append)
    # one warning, not a traceback: the courier being away is not a bug
    assert [e["log_level"] for e in events if "no attempt" in e.get("log_format", "")] == [LogLevel.warn]
    assert not [e for e in events if "log_failure" in e]
    assert h.courier.calls == [] and h.senderlog() == []
    assert h.mri("far.test") is None  # no episode begins: nothing was tried
    assert h.queued("incoming") == [first.queue_id]
    h.queue(relay("b@far.test"))  # the destination is not taken for dead: tried at once
    assert [c[1] for c in h.courier.calls] == [["b@far.test"]]
    h.clock.advance(h.manager.error_retry)
    assert [c[1] for c in h.courier.calls] == [["b@far.test"], ["a@far.test"]]
    assert [(l["recipient"], l["status"], l["attempt"]) for l in h.senderlog()] == [
        ("b@far.test", "sent", 1), ("a@far.test", "sent", 1)]
    assert h.queued("incoming") == []


def test_each_destination_gets_its_own_transaction(tmp_path):
    h = Harness(tmp_path, {"a@one.test": [(250, "ok")], "b@two.test": [(250, "ok")]})
    h.start()
    h.queue(relay("a@one.test"), relay("b@two.test"))
    assert sorted(tuple(c[1]) for c in h.courier.calls) == [("a@one.test",), ("b@two.test",)]
    assert h.queued("incoming") == []


def test_greylisted_mail_moves_to_deferred_keeps_domain_state_and_is_delivered_on_retry(tmp_path):
    h = Harness(tmp_path, {"a@far.test": [(451, "4.7.1 greylisted"), (250, "2.0.0 ok")]})
    h.start()
    envelope = h.queue(relay("a@far.test"))
    assert h.queued("incoming") == []
    assert h.queued("deferred") == [envelope.queue_id]
    stored = h.spool.load(envelope.queue_id, "deferred")
    assert stored.retries["far.test"]["next_attempt"] == T0 + 120
    assert stored.recipients[0].attempts == 1 and stored.recipients[0].last_reply == "451 4.7.1 greylisted"
    state = h.mri("far.test")
    assert (state.try_number, state.err_code, state.err_text) == (1, 451, "4.7.1 greylisted")
    assert (state.first_failure, state.next_try, state.messages, state.last_host) == (T0, T0 + 120, 1, HOST)

    h.clock.advance(119)
    assert len(h.courier.calls) == 1
    h.clock.advance(1)
    assert h.attempt_times() == [0, 120]
    assert h.queued("deferred") == []
    assert h.mri("far.test") is None and not (tmp_path / "domains" / "far.test").exists()
    assert [l["status"] for l in h.senderlog()] == ["deferred", "sent"]
    assert [l["attempt"] for l in h.senderlog()] == [1, 2]


def test_5xx_is_retried_count_5xx_times_at_growing_gaps_then_bounced(tmp_path):
    h = Harness(tmp_path, {"a@far.test": [(550, "5.1.1 unknown user")]}, RetryConfig(count_5xx=3))
    h.start()
    envelope = h.queue(relay("a@far.test"))
    h.run_until(3600)
    assert h.attempt_times() == [0, 120, 360, 720]  # 1 + count_5xx attempts: 2, 6, 12 min
    assert [l["status"] for l in h.senderlog()] == ["deferred"] * 3 + ["bounced"]
    assert h.senderlog()[-1]["dsn"] == "5.1.1"
    (line,) = h.faillog()
    assert line.startswith(f"<{envelope.queue_id}@mx.example.jp> send fail on [")
    assert line.endswith("from bob@example.org to a@far.test [550 5.1.1 unknown user]")
    ((original, headers, failed),) = h.bounces.sent
    assert original.queue_id == envelope.queue_id
    assert headers.startswith(b"Subject: hello\r\n") and b"body" not in headers
    assert [(f.address, f.status, f.remote_mta) for f in failed] == [("a@far.test", "5.1.1", HOST)]
    assert h.queued("deferred") == [] and h.queued("incoming") == []
    assert h.mri("far.test") is None


def test_count_5xx_zero_bounces_at_once(tmp_path):
    h = Harness(tmp_path, {"a@far.test": [(550, "5.1.1 no")]}, RetryConfig(count_5xx=0))
    h.start()
    h.queue(relay("a@far.test"))
    assert h.attempt_times() == [0]
    assert len(h.bounces.sent) == 1 and h.queued("deferred") == []


def test_4xx_is_retried_until_period_4xx_with_fixed_gaps(tmp_path):
    policy = RetryConfig(interval=600, fixed_interval=True, period_4xx=3600)
    h = Harness(tmp_path, {"a@far.test": [(450, "4.2.0 mailbox busy")]}, policy)
    h.start()
    h.queue(relay("a@far.test"))
    h.run_until(5 * 3600, step=60)
    assert h.attempt_times() == [0, 600, 1200, 1800, 2400, 3000, 3600]
    assert [l["status"] for l in h.senderlog()][-1] == "bounced"
    (failed,) = h.bounces.sent[0][2]
    assert failed.status == "4.2.0"


def test_no_answer_is_retried_until_period_noanswer_and_the_faillog_says_so(tmp_path):
    policy = RetryConfig(interval=1800, max_interval=1800, period_noanswer=7200)
    h = Harness(tmp_path, {"a@far.test": [None]}, policy)
    h.start()
    h.queue(relay("a@far.test"))
    h.run_until(5 * 3600, step=60)
    assert h.attempt_times() == [0, 1800, 3600, 5400, 7200]
    state_lines = h.senderlog()
    assert [l["status"] for l in state_lines] == ["deferred"] * 4 + ["bounced"]
    assert state_lines[0]["dsn"] == "4.4.1"
    assert h.faillog()[0].endswith("[Unable to deliver to destination domain]")


def test_null_sender_failure_is_logged_but_never_bounced(tmp_path):
    h = Harness(tmp_path, {"a@far.test": [(550, "5.1.1 no")]}, RetryConfig(count_5xx=0))
    h.start()
    h.queue(relay("a@far.test"), sender="")
    assert h.bounces.sent == []
    assert " from <> to a@far.test " in h.faillog()[0]
    assert h.queued("incoming") == []


def test_recipients_refused_at_receipt_are_bounced_once(tmp_path):
    h = Harness(tmp_path, {"a@far.test": [(250, "ok")]})
    h.start()
    failed = Recipient("x@nowhere.test", {"kind": "reject"}, "failed", 0, "550 5.1.2 No route to destination")
    h.queue(relay("a@far.test"), failed)
    ((_, _, recipients),) = h.bounces.sent
    assert [(r.address, r.status) for r in recipients] == [("x@nowhere.test", "5.1.2")]
    assert h.queued("incoming") == []


def test_mixed_outcomes_in_one_transaction_are_kept_per_recipient(tmp_path):
    h = Harness(
        tmp_path,
        {"ok@far.test": [(250, "ok")], "grey@far.test": [(451, "4.7.1 later"), (250, "ok")], "bad@far.test": [(550, "5.1.1 no")]},
        RetryConfig(count_5xx=0),
    )
    h.start()
    envelope = h.queue(relay("ok@far.test"), relay("grey@far.test"), relay("bad@far.test"))
    stored = h.spool.load(envelope.queue_id, "deferred")
    assert [r.state for r in stored.recipients] == ["delivered", "pending", "failed"]
    assert stored.recipients[2].dsn_sent
    assert len(h.bounces.sent) == 1
    h.clock.advance(120)
    assert h.courier.calls[1][1] == ["grey@far.test"]  # the delivered one is not sent again
    assert h.queued("deferred") == []


def test_a_dead_destination_is_probed_by_one_message_at_a_time(tmp_path):
    script = {f"u{i}@dead.test": [None] for i in range(5)}
    h = Harness(tmp_path, script, RetryConfig(interval=60, fixed_interval=True))
    h.start()
    h.courier.hold = defer.Deferred()  # the first attempt hangs while the others arrive
    for i in range(5):
        h.queue(relay(f"u{i}@dead.test"))
    assert len(h.courier.calls) == 5  # new mail is tried at once (max_per_destination 10)
    hold, h.courier.hold = h.courier.hold, None
    hold.callback(None)
    assert len(h.queued("deferred")) == 5
    h.courier.calls.clear()
    h.clock.advance(60)
    assert len(h.courier.calls) == 1  # one probe, the rest wait in deferred/
    h.clock.advance(60)
    assert len(h.courier.calls) == 2


def test_new_mail_is_not_delayed_by_a_due_backlog(tmp_path):
    script = {f"u{i}@slow.test": [(451, "4.7.1 later")] for i in range(20)}
    script["new@fast.test"] = [(250, "ok")]
    h = Harness(tmp_path, script, RetryConfig(interval=60, fixed_interval=True), max_connections=4)
    h.start()
    for i in range(20):
        h.queue(relay(f"u{i}@slow.test"))
    h.courier.hold = defer.Deferred()  # every retry hangs and holds its slot
    h.clock.advance(60)
    assert len(h.courier.calls) == 20 + 2  # retries take only their share of the 4 slots
    h.queue(relay("new@fast.test"))
    assert h.courier.calls[-1][1] == ["new@fast.test"]


def test_restart_resumes_the_schedule_and_attempt_count(tmp_path):
    h = Harness(tmp_path, {"a@far.test": [(451, "4.7.1 later")]})
    h.start()
    envelope = h.queue(relay("a@far.test"))
    h.clock.advance(120)
    assert h.attempt_times() == [0, 120]
    before = h.mri("far.test")
    assert before.try_number == 2

    # A new process: same spool, a clock a little later.
    again = Harness(tmp_path, {"a@far.test": [(250, "ok")]})
    again.clock.advance(100)
    again.start()
    assert again.courier.calls == []
    assert again.mri("far.test").first_failure == before.first_failure
    again.run_until(120 + 240 + 1)
    assert again.attempt_times() == [360]  # 2nd failure at 120 + gap 2 x 120
    assert again.senderlog()[-1]["attempt"] == 3
    assert again.queued("deferred") == [] and again.mri("far.test") is None
    assert envelope.queue_id == again.senderlog()[-1]["queue_id"]


def test_restart_reads_the_deferred_queue_by_pages_not_one_load_per_message(tmp_path, monkeypatch):
    """100,000 queued messages must not cost 100,000 queries; the reactor still gets
    them LOAD_BATCH at a time, one thread hop each, so a 220 goes out between batches."""
    from epost.queue import manager as manager_module

    h = Harness(tmp_path, {})
    ids = []
    for i in range(1100):
        queue_id = h.spool.new_queue_id()
        retries = {f"d{i % 7}.test": {"first_failure": T0, "failures": 1, "next_attempt": T0 + 3600}}
        envelope = Envelope(queue_id, "bob@example.org", (relay(f"u{i}@d{i % 7}.test"),), T0, 10, retries=retries)
        assert put_one(h.spool.store, envelope, b"x", "deferred")
        ids.append(queue_id)
    monkeypatch.setattr(h.spool, "load", lambda *args: pytest.fail("one load per message"))
    hops = []
    real_defer = manager_module.deferToThreadPool
    monkeypatch.setattr(manager_module, "deferToThreadPool",
                        lambda *args, **kwargs: (hops.append(args[2]), real_defer(*args, **kwargs))[1])
    h.start()
    assert h.manager.loaded.called
    assert len(hops) == 4  # 500 + 500 + 100, then an empty batch says the end
    assert sorted(job.queue_id for d in range(7) for job in h.manager.scheduler.jobs_for(f"d{d}.test")) == ids


def test_flush_makes_every_deferred_message_due_now(tmp_path):
    h = Harness(tmp_path, {"a@far.test": [(451, "4.7.1 later"), (250, "ok")]}, RetryConfig(interval=3600))
    h.start()
    h.queue(relay("a@far.test"))
    h.clock.advance(10)
    h.manager.flush()
    assert h.attempt_times() == [0, 10]
    assert h.queued("deferred") == []


@pytest.mark.parametrize("crash_point", ["before_commit", "after_commit"])
def test_a_move_is_one_transaction_whatever_the_crash_point(tmp_path, crash_point):
    """The file spool moved envelope and content one after the other, and recovery
    finished an interrupted move; in the store a move is one transaction, so a
    crash leaves the message whole in its old queue, or in its new one."""
    h = Harness(tmp_path, {"a@far.test": [(250, "ok")]})
    writer = h.spool.open_message()
    writer.write(CONTENT)
    envelope = Envelope(writer.queue_id, "bob@example.org", (relay("a@far.test"),), T0, len(CONTENT))
    h.spool.commit_batch([(writer, envelope)])
    queue_id = envelope.queue_id
    deferred = envelope.with_recipient(0, attempts=1)
    real_write = h.spool.store._write
    transactions = []

    @contextmanager
    def counted(durable):
        transactions.append(durable)
        with real_write(durable) as conn:
            yield conn
            if crash_point == "before_commit":
                raise sqlite3.OperationalError("disk I/O error")  # the process dies here

    h.spool.store._write = counted
    if crash_point == "before_commit":
        with pytest.raises(OSError):
            h.spool.move(deferred, "incoming", "deferred", durable=False)
    else:
        h.spool.move(deferred, "incoming", "deferred", durable=False)
    h.spool.store._write = real_write
    assert transactions == [False]  # one write transaction: no point between two to crash at
    incoming = h.spool.recover()
    if crash_point == "before_commit":  # nothing of the move happened: the incoming message stands
        assert incoming == [queue_id] and h.queued("deferred") == []
        assert h.spool.load(queue_id, "incoming").recipients[0].attempts == 0
    else:  # the move happened whole: the newer envelope stands
        assert incoming == [] and h.queued("incoming") == []
        assert h.spool.queued_ids("deferred") == [queue_id]
        assert h.spool.load(queue_id, "deferred").recipients[0].attempts == 1
    assert h.spool.content(queue_id) == CONTENT


def test_delivery_bookkeeping_is_written_without_a_flush_of_its_own(tmp_path):
    """Recipient updates, the move to deferred and the final removal pass durable=False (docs/queue.md)."""
    h = Harness(tmp_path, {"a@far.test": [(451, "4.7.1 later"), (250, "ok")], "b@far.test": [(451, "4.7.1 later"), (451, "4.7.1 later"), (250, "ok")]},
                RetryConfig(interval=60, fixed_interval=True))
    writes = []
    real_apply = h.spool.store.apply

    def apply(changes, *, durable=True):
        writes.extend((change.doing, durable) for change in changes)
        return real_apply(changes, durable=durable)

    h.spool.store.apply = apply
    h.start()
    h.queue(relay("a@far.test"), relay("b@far.test"))
    h.run_until(400, step=10)
    assert h.queued("incoming") == [] and h.queued("deferred") == []
    assert {name for name, _ in writes} == {"update", "move to deferred", "remove"}
    assert all(durable is False for _, durable in writes), writes


# --- operator actions ---------------------------------------------------------


def test_hold_takes_a_message_out_of_the_schedule_and_release_makes_it_due_now(tmp_path):
    h = Harness(tmp_path, {"a@far.test": [(451, "4.7.1 later"), (250, "ok")]})
    h.start()
    envelope = h.queue(relay("a@far.test"))
    d = defer.ensureDeferred(h.manager.hold([envelope.queue_id]))
    assert d.result.done == [envelope.queue_id]
    assert h.queued("hold") == [envelope.queue_id]
    assert h.queued("deferred") == [] and h.mri("far.test") is None
    h.clock.advance(3600)
    assert len(h.courier.calls) == 1  # nothing is tried while held

    d = defer.ensureDeferred(h.manager.release(domain="far.test"))
    assert d.result.done == [envelope.queue_id]
    h.clock.advance(0)
    assert len(h.courier.calls) == 2 and h.queued("deferred") == [] and h.queued("hold") == []


def test_delete_refuses_a_message_being_delivered_and_removes_a_waiting_one(tmp_path):
    h = Harness(tmp_path, {"a@far.test": [(451, "4.7.1 later")]})
    h.start()
    h.courier.hold = defer.Deferred()
    envelope = h.queue(relay("a@far.test"))
    busy = defer.ensureDeferred(h.manager.delete([envelope.queue_id])).result
    assert busy.done == [] and "being delivered" in busy.errors[0]
    hold, h.courier.hold = h.courier.hold, None
    hold.callback(None)
    gone = defer.ensureDeferred(h.manager.delete([envelope.queue_id, "0000000000000000F"])).result
    assert gone.done == [envelope.queue_id] and gone.errors == ["0000000000000000F: not queued"]
    assert h.queued("deferred") == [] and h.mri("far.test") is None
    h.clock.advance(3600)
    assert len(h.courier.calls) == 1 and h.bounces.sent == []


def test_flush_of_one_domain_leaves_the_others_waiting(tmp_path):
    h = Harness(tmp_path, {"a@one.test": [(451, "later")], "b@two.test": [(451, "later")]}, RetryConfig(interval=3600))
    h.start()
    h.queue(relay("a@one.test"))
    h.queue(relay("b@two.test"))
    result = h.manager.flush_some(domain="two.test")
    assert len(result.done) == 1 and result.errors == []
    assert [c[1] for c in h.courier.calls[2:]] == [["b@two.test"]]
    assert h.manager.flush_some(["0000000000000000F"]).errors == ["0000000000000000F: not waiting for a retry"]


def test_reroute_follows_a_table_edit(tmp_path):
    h = Harness(tmp_path, {"a@far.test": [(451, "later")]}, RetryConfig(interval=3600))
    h.start()
    envelope = h.queue(relay("a@far.test"))
    h.manager.route_final = lambda address: Route("relay", "gateway.dat:7", hosts=())
    result = defer.ensureDeferred(h.manager.reroute([envelope.queue_id])).result
    assert result.done == [envelope.queue_id]
    assert h.spool.load(envelope.queue_id, "deferred").recipients[0].route["rule"] == "gateway.dat:7"


def test_a_delay_warning_goes_out_once_after_delay_warning(tmp_path):
    h = Harness(tmp_path, {"a@far.test": [(451, "4.7.1 later")]}, RetryConfig(interval=600, fixed_interval=True))
    h.manager.delay_warning = 1800
    h.start()
    envelope = h.queue(relay("a@far.test"))
    h.run_until(1200, step=60)
    assert h.bounces.sent == []  # 0, 600 and 1200 s: not yet
    h.run_until(3600, step=60)
    ((original, _, delayed),) = h.bounces.sent  # at 1800 s, and never again
    assert original.queue_id == envelope.queue_id
    assert [(r.address, r.action, r.status) for r in delayed] == [("a@far.test", "delayed", "4.7.1")]
    assert h.spool.load(envelope.queue_id, "deferred").delay_warned


def test_no_delay_warning_for_the_null_sender_or_when_turned_off(tmp_path):
    h = Harness(tmp_path, {"a@far.test": [(451, "4.7.1 later")]}, RetryConfig(interval=600, fixed_interval=True))
    h.manager.delay_warning = 600
    h.start()
    h.queue(relay("a@far.test"), sender="")
    h.run_until(3600, step=60)
    assert h.bounces.sent == []
    h.manager.delay_warning = 0
    h.queue(relay("a@far.test"))
    h.run_until(7200, step=60)
    assert h.bounces.sent == []


def test_new_mail_for_a_dead_destination_is_deferred_at_once_without_a_connection(tmp_path):
    script = {f"u{i}@dead.test": [None] for i in range(50)}
    h = Harness(tmp_path, script, RetryConfig(interval=600, fixed_interval=True, period_noanswer=1800))
    h.start()
    h.queue(relay("u0@dead.test"))  # its attempt gets no answer: dead.test is dead
    for i in range(1, 50):
        h.queue(relay(f"u{i}@dead.test"))
    assert len(h.courier.calls) == 1
    assert h.queued("incoming") == [] and len(h.queued("deferred")) == 50
    suspended = [l for l in h.senderlog() if l["relay"] == "none"]
    assert len(suspended) == 49 and all(l["reply"].startswith("delivery temporarily suspended: ") for l in suspended)
    assert h.mri("dead.test").messages == 50 and h.mri("dead.test").try_number == 1

    h.run_until(3 * 3600, step=60)
    assert len(h.bounces.sent) == 50 and h.queued("deferred") == []  # every one expired on its own clock
    assert len(h.courier.calls) <= 4  # one probe per retry time, never one per message


def test_two_destinations_failing_together_bounce_each_recipient_once(tmp_path):
    h = Harness(tmp_path, {"a@x.test": [(550, "5.1.1 no")], "b@y.test": [(550, "5.1.1 no")]}, RetryConfig(count_5xx=0))
    slow = []
    h.bounces.send = lambda original, headers, failed: slow.append((failed, defer.Deferred())) or slow[-1][1]
    h.start()
    h.queue(relay("a@x.test"), relay("b@y.test"))
    assert [[f.address for f in failed] for failed, _ in slow] == [["a@x.test"], ["b@y.test"]]
    for _, d in slow:
        d.callback("BOUNCE")
    assert h.queued("incoming") == [] and h.queued("deferred") == []


def test_a_bounce_that_cannot_be_queued_now_is_tried_again(tmp_path):
    from epost.store.database import SpoolError

    h = Harness(tmp_path, {"a@far.test": [(550, "5.1.1 no")]}, RetryConfig(count_5xx=0))
    calls = []

    def send(original, headers, failed):
        calls.append(failed)
        return defer.fail(SpoolError(28, "No space left on device")) if len(calls) == 1 else defer.succeed("B")

    h.bounces.send = send
    h.start()
    envelope = h.queue(relay("a@far.test"))
    stored = h.spool.load(envelope.queue_id, "incoming")
    assert stored.recipients[0].state == "failed" and not stored.recipients[0].dsn_sent  # kept for the retry
    h.clock.advance(60)
    assert len(calls) == 2 and h.queued("incoming") == [] and h.queued("deferred") == []


# --- a full disk while recording is an expected condition (issue 18) ----------------


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


class Captured:
    """Every log event while in the `with` block."""

    def __enter__(self):
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        return self

    def __exit__(self, *exc):
        globalLogPublisher.removeObserver(self.events.append)

    def at_least(self, level: LogLevel) -> list[dict]:
        return [e for e in self.events if e["log_level"] >= level]

    def text(self, event: dict) -> str:
        from twisted.logger import formatEvent

        return formatEvent(event)


def test_a_full_disk_under_senderlog_is_one_warning_with_the_line_and_the_mail_is_still_recorded(tmp_path):
    h = Harness(tmp_path, {"a@far.test": [(451, "4.7.1 greylisted"), (250, "2.0.0 ok")]},
                RetryConfig(interval=60, fixed_interval=True))
    h.start()
    h.manager.senderlog.write = full_disk
    with Captured() as log:
        envelope = h.queue(relay("a@far.test"))
    (warning,) = log.at_least(LogLevel.warn)
    assert warning["log_level"] == LogLevel.warn and "log_failure" not in warning
    text = log.text(warning)
    assert "senderlog" in text and "No space left on device" in text
    assert f"{envelope.queue_id} from=<bob@example.org> to=<a@far.test>" in text  # the line is not lost
    assert "status=deferred" in text and "\n" not in text
    # The attempt is recorded all the same: deferred/, the envelope, Domain.mri.
    assert h.queued("deferred") == [envelope.queue_id]
    assert h.spool.load(envelope.queue_id, "deferred").recipients[0].attempts == 1
    assert h.mri("far.test").err_code == 451
    del h.manager.senderlog.write  # space again
    h.clock.advance(60)
    assert [(l["attempt"], l["status"]) for l in h.senderlog()] == [(2, "sent")]
    assert h.queued("deferred") == []


def test_a_full_disk_under_faillog_is_one_warning_with_the_line(tmp_path):
    h = Harness(tmp_path, {"a@far.test": [(550, "5.1.1 no such user")]}, RetryConfig(count_5xx=0))
    h.start()
    h.manager.faillog.write = full_disk
    with Captured() as log:
        envelope = h.queue(relay("a@far.test"))
    (warning,) = log.at_least(LogLevel.warn)
    assert warning["log_level"] == LogLevel.warn and "log_failure" not in warning
    assert f"<{envelope.queue_id}@mx.example.jp> send fail on" in log.text(warning)
    assert len(h.bounces.sent) == 1 and h.queued("incoming") == []


def test_a_full_disk_when_saving_the_envelope_is_one_warning_and_what_was_settled_is_not_done_twice(tmp_path):
    h = Harness(tmp_path, {"a@far.test": [(250, "2.0.0 ok")], "b@far.test": [(451, "4.7.1 greylisted"), (250, "2.0.0 ok")]},
                RetryConfig(interval=600, fixed_interval=True))
    h.start()
    apply = h.spool.store.apply
    h.spool.store.apply = lambda changes, **_: [OSError(errno.ENOSPC, "No space left on device") for _ in changes]
    with Captured() as log:
        envelope = h.queue(relay("a@far.test"), relay("b@far.test"))
    (warning,) = log.at_least(LogLevel.warn)
    assert warning["log_level"] == LogLevel.warn and "log_failure" not in warning
    text = log.text(warning)
    assert envelope.queue_id in text and "No space left on device" in text and "far.test" in text
    # Nothing lost: the message stays in incoming/ as it was queued...
    assert h.queued("incoming") == [envelope.queue_id]
    assert h.spool.load(envelope.queue_id, "incoming").recipients[0].state == "pending"
    h.spool.store.apply = apply
    h.clock.advance(h.manager.error_retry)
    # ... and a minute later only b@ is tried again: a@'s 250 was kept in memory.
    assert [c[1] for c in h.courier.calls] == [["a@far.test", "b@far.test"], ["b@far.test"]]
    assert [(l["recipient"], l["attempt"], l["status"]) for l in h.senderlog()] == [
        ("a@far.test", 1, "sent"), ("b@far.test", 1, "deferred"), ("b@far.test", 2, "sent")]
    assert h.queued("incoming") == [] and h.queued("deferred") == []


def test_after_a_full_disk_a_settled_destination_is_saved_at_its_retry_without_a_new_attempt(tmp_path):
    h = Harness(tmp_path, {"a@far.test": [(250, "2.0.0 ok")], "c@near.test": [(250, "2.0.0 ok")]})
    h.start()
    apply = h.spool.store.apply
    h.spool.store.apply = full_disk  # the whole group commit fails
    h.manager.scheduler.add_new = lambda job, add=h.manager.scheduler.add_new: add(job) if job.destination == "far.test" else None
    envelope = h.queue(relay("a@far.test"), relay("c@near.test"))  # near.test's job is left out for now
    assert h.spool.load(envelope.queue_id, "incoming").recipients[0].state == "pending"
    h.spool.store.apply = apply
    h.clock.advance(h.manager.error_retry)
    assert [c[1] for c in h.courier.calls] == [["a@far.test"]]  # saved, not sent again
    assert h.spool.load(envelope.queue_id, "incoming").recipients[0].state == "delivered"


def test_a_full_disk_under_domain_mri_is_one_warning_and_the_file_is_written_later(tmp_path):
    h = Harness(tmp_path, {"a@far.test": [(451, "4.7.1 greylisted")]}, RetryConfig(interval=600, fixed_interval=True))
    h.start()
    write = h.manager.domains.store.write
    h.manager.domains.store.write = full_disk
    with Captured() as log:
        h.queue(relay("a@far.test"))
    (warning,) = log.at_least(LogLevel.warn)
    assert warning["log_level"] == LogLevel.warn and "log_failure" not in warning
    assert "far.test" in log.text(warning) and "Domain.mri" in log.text(warning)
    assert h.mri("far.test") is None
    h.manager.domains.store.write = write
    h.clock.advance(h.manager.error_retry)
    assert h.mri("far.test").err_code == 451


def _deferred_everywhere(tmp_path, count: int) -> list[Envelope]:
    """A first run leaves `count` messages deferred, one per destination, each with its Domain.mri."""
    first = Harness(tmp_path, {f"a@d{i}.test": [(451, "4.7.1 later")] for i in range(count)})
    first.start()
    envelopes = [first.queue(relay(f"a@d{i}.test")) for i in range(count)]
    first.clock.advance(1)
    assert len(first.queued("deferred")) == count and all(first.mri(f"d{i}.test") for i in range(count))
    first.manager.stopService()
    return envelopes


def test_a_failed_page_at_restart_keeps_domain_files_and_the_load_resumes_after_a_backoff(tmp_path, monkeypatch):
    from twisted.logger import LogLevel, capturedLogs

    from epost.store import database
    from epost.store.database import StoreError

    envelopes = _deferred_everywhere(tmp_path, 6)
    monkeypatch.setattr(database, "PAGE", 2)
    again = Harness(tmp_path, {})
    real_read = again.spool.store._read
    pages: list[str] = []  # the `after` of each page read
    failures = [2, 3]  # the 2nd page fails, then the retry's first page fails too

    def read(sql, parameters):
        if "LIMIT" in sql:
            pages.append(parameters[1])
            if len(pages) in failures:
                raise StoreError(errno.EIO, "disk I/O error")
        return real_read(sql, parameters)

    monkeypatch.setattr(again.spool.store, "_read", read)
    with capturedLogs() as events:
        again.start()
        ids = [e.queue_id for e in envelopes]
        assert pages == ["", ids[1]]
        assert not again.manager.loaded.called
        # Not read yet, but still waiting: their Domain.mri must not go.
        assert all(again.mri(f"d{i}.test") is not None for i in range(6))
        again.clock.advance(4.9)
        assert pages == ["", ids[1]]
        again.clock.advance(0.1)  # 5 s
        assert pages == ["", ids[1], ids[1]]  # resumed past the last ID scheduled; failed again
        again.clock.advance(9.9)
        assert len(pages) == 3
        again.clock.advance(0.1)  # then 10 s
        assert pages == ["", ids[1], ids[1], ids[1], ids[3], ids[5]]
    assert again.manager.loaded.called
    errors = [e for e in events if e["log_level"] == LogLevel.error]
    assert len(errors) == 2 and all("loading the deferred queue failed" in e["log_format"] for e in errors)
    scheduled = sorted(job.queue_id for i in range(6) for job in again.manager.scheduler.jobs_for(f"d{i}.test"))
    assert scheduled == ids
    assert [again.mri(f"d{i}.test").messages for i in range(6)] == [1] * 6


def test_the_load_retry_waits_at_most_a_minute(tmp_path, monkeypatch):
    from epost.store.database import StoreError

    _deferred_everywhere(tmp_path, 1)
    again = Harness(tmp_path, {})
    calls: list[float] = []

    def broken(*args, **kwargs):
        calls.append(again.clock.seconds())
        raise StoreError(errno.EIO, "disk I/O error")

    monkeypatch.setattr(again.spool.store, "_read", broken)
    again.start()
    again.clock.pump([1.0] * 400)
    gaps = [round(b - a) for a, b in zip(calls, calls[1:])]
    assert gaps[:6] == [5, 10, 20, 40, 60, 60]
    assert again.mri("d0.test") is not None and not again.manager.loaded.called


def test_a_message_in_hand_is_not_scheduled_again_by_a_later_page_of_the_restart_load(tmp_path):
    """New mail deferred during the load lands in the deferred queue ahead of the pages still to read."""
    h = Harness(tmp_path, {"a@near.test": [(250, "ok")]})
    h.courier.hold = defer.Deferred()  # its attempt is under way
    h.manager.startService()  # the load is due, not run yet
    envelope = h.queue(relay("a@near.test"))
    h.clock.advance(0)
    in_hand = h.manager._messages[envelope.queue_id]
    # Its envelope as a page would read it: already settled (no relay group left), a stale copy.
    h.spool.move(envelope.with_recipient(0, state="delivered"), "incoming", "deferred")
    h.manager._schedule_loaded([h.spool.load(envelope.queue_id, "deferred")])
    assert h.manager._messages.get(envelope.queue_id) is in_hand  # not replaced by the page's copy
