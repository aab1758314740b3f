"""The delivery manager with receiver-aware delivery (issue 14) over task.Clock:
a throttle parks the destination without a failed attempt, greylisting holds
new mail and learns the delay, state survives a restart, the switch turns it off."""

from __future__ import annotations

from pathlib import Path

from twisted.internet import defer

from epost.config import RetryConfig
from epost.delivery.courier import Attempt
from epost.delivery.smtp_client import Outcome
from epost.logs import parse_senderlog_line
from epost.queue import receivers as rx
from epost.queue.domain_state import parse_mri
from epost.store.envelope import Envelope, Recipient
from epost.queue.manager import DeliveryManager
from epost.store.spool import Spool
from epost.routing.resolver import Route
from fakes import ClockReactor, SynchronousThreadPool

T0 = 1_800_000_000.0
CONTENT = b"Subject: bulk\r\n\r\nbody\r\n"
MX = ("mx.far.test:25",)


class Receiving:
    """A courier whose receiver decides each recipient's reply by `answer(address, now)`."""

    def __init__(self, clock, answer):
        self.clock, self.answer = clock, answer
        self.calls: list[tuple[float, str]] = []

    def deliver(self, route, sender, recipients, content, size, body_8bit):
        now = self.clock.seconds()
        outcomes = {}
        for r in recipients:
            self.calls.append((now - T0, r))
            code, text = self.answer(r, now)
            outcomes[r] = Outcome(code, text, "rcpt")
        return defer.succeed(Attempt(outcomes, "mx.far.test[192.0.2.1]:25", False, MX))

    def close_idle(self):
        """No connections to close."""


class NoBounces:
    def send(self, original, headers, failed):
        raise AssertionError(f"a bounce for {[f.address for f in failed]}")


class Harness:
    def __init__(self, root: Path, answer, aware=True, retry=RetryConfig(), settings=None, clock=None):
        self.root = root
        self.clock = clock or ClockReactor()
        if clock is None:
            self.clock.advance(T0)
        self.spool = Spool(root, reactor=self.clock, threadpool=SynchronousThreadPool())
        self.spool.open()
        self.courier = Receiving(self.clock, answer)
        settings = settings or rx.Settings(enabled=aware)
        self.manager = DeliveryManager(
            self.spool, self.clock, SynchronousThreadPool(), self.courier, NoBounces(),
            route_final=lambda address: Route("relay", "mx", mx_domain=address.domain),
            hostname="mx.example.jp", retry=retry, max_per_destination=10, receivers=settings,
        )
        self.manager.startService()
        self.clock.advance(0)

    def queue(self, address: str) -> str:
        writer = self.spool.open_message()
        writer.write(CONTENT)
        recipient = Recipient(address, {"kind": "relay", "rule": "mx", "mx_domain": address.rpartition("@")[2]})
        envelope = Envelope(writer.queue_id, "bob@example.org", (recipient,), self.clock.seconds(), len(CONTENT))
        self.spool.commit_batch([(writer, envelope)])
        self.manager.enqueue(writer.queue_id, envelope)
        return writer.queue_id

    def mri(self, domain="far.test"):
        path = self.root / "domains" / domain / "Domain.mri"
        return parse_mri(path.read_text(), path) if path.exists() else None

    def senderlog(self):
        path = self.root / "log" / "senderlog"
        return [parse_senderlog_line(line) for line in path.read_text().splitlines()] if path.exists() else []

    def attempts(self, address):
        return [t for t, r in self.courier.calls if r == address]


def test_a_throttle_pauses_the_destination_without_a_failed_attempt(tmp_path):
    refused_until = T0 + 5

    def answer(address, now):
        return (421, "4.7.28 unusual rate of mail") if now < refused_until else (250, "2.0.0 ok")

    rule = rx.ThrottleRule("pause", 600, code=421, enhanced="4.7.28")
    h = Harness(tmp_path, answer, settings=rx.Settings(rules=(rule,)), retry=RetryConfig(period_4xx=60))
    h.queue("a@far.test")
    h.clock.advance(1)
    for i in range(3):
        h.queue(f"n{i}@far.test")  # new mail for the paused destination waits
    h.clock.advance(1)
    assert [r for _, r in h.courier.calls] == ["a@far.test"]
    state = h.mri()
    extra = dict(state.extra)
    assert (state.try_number, state.err_code, state.first_failure) == (0, 0, 0)  # E-Post's counts untouched
    assert extra["State"] == "throttled" and int(extra["Resume-at"]) == int(T0 + 600)
    assert extra["Destination"] == "mx:mx.far.test:25"
    assert [r["status"] for r in h.senderlog()] == ["deferred"]
    h.clock.advance(597)
    assert len(h.courier.calls) == 1  # period_4xx (60 s) has long passed: still no bounce, no attempt
    h.clock.advance(1)
    assert h.attempts("a@far.test") == [0.0, 600.0]
    for _ in range(5):
        h.clock.advance(1)
    assert sorted(r for _, r in h.courier.calls) == ["a@far.test", "a@far.test", "n0@far.test", "n1@far.test", "n2@far.test"]
    assert h.mri() is None  # nothing waits: the file is gone
    assert [r["status"] for r in h.senderlog()].count("sent") == 4


def test_greylisting_is_learned_from_a_probe_and_the_rest_goes_once(tmp_path):
    delay = 30.0
    first_seen: dict[str, float] = {}
    whitelisted = []

    def answer(address, now):  # postgrey with auto-whitelist after one pass
        if whitelisted:
            return 250, "2.0.0 ok"
        first = first_seen.setdefault(address, now)
        if now - first >= delay:
            whitelisted.append(address)
            return 250, "2.0.0 ok"
        return 450, f"4.2.0 <{address}>: Recipient address rejected: Greylisted, see http://postgrey/"

    h = Harness(tmp_path, answer)
    for i in range(20):
        h.queue(f"u{i}@far.test")
    h.clock.advance(0)
    assert len(h.courier.calls) <= rx.SLOW_START  # the first contacts, then the hold
    for _ in range(120):
        h.clock.advance(1)
    assert len({r for _, r in h.courier.calls}) == 20
    assert len(h.courier.calls) <= 20 + 4
    assert dict(h.mri().extra if h.mri() else ()).get("State") in (None,)  # delivered: no file left
    assert all(r["status"] != "bounced" for r in h.senderlog())
    assert max(t for t, _ in h.courier.calls) <= 2 * delay + 10


def test_without_auto_whitelist_each_message_needs_two_attempts_at_the_learned_delay(tmp_path):
    delay = 30.0
    first_seen: dict[str, float] = {}

    def answer(address, now):
        first = first_seen.setdefault(address, now)
        if now - first >= delay:
            return 250, "2.0.0 ok"
        return 450, "4.2.0 Greylisted, see http://postgrey/"

    h = Harness(tmp_path, answer)
    for i in range(20):
        h.queue(f"u{i}@far.test")
    for _ in range(300):
        h.clock.advance(1)
    assert len({r for _, r in h.courier.calls}) == 20
    assert all(len(h.attempts(f"u{i}@far.test")) >= 2 for i in range(20))
    assert len(h.courier.calls) <= 2.1 * 20
    assert h.mri() is None


def test_the_switch_off_is_e_post_alone(tmp_path):
    def answer(address, now):
        return 450, "4.2.0 Greylisted"

    h = Harness(tmp_path, answer, aware=False)
    for i in range(5):
        h.queue(f"u{i}@far.test")
    h.clock.advance(0)
    assert len(h.courier.calls) == 5  # no slow start, no hold
    h.clock.advance(120)
    assert len(h.courier.calls) == 10  # E-Post's gap: 1 × interval
    assert "State" not in dict(h.mri().extra)


def test_a_pause_survives_a_restart(tmp_path):
    rule = rx.ThrottleRule("pause", 600, code=421)
    settings = rx.Settings(rules=(rule,))
    h = Harness(tmp_path, lambda a, now: (421, "4.7.0 slow down"), settings=settings)
    h.queue("a@far.test")
    h.clock.advance(1)
    h.manager.stopService()
    assert dict(h.mri().extra)["State"] == "throttled"

    clock = ClockReactor()
    clock.advance(T0 + 100)
    again = Harness(tmp_path, lambda a, now: (250, "2.0.0 ok"), settings=settings, clock=clock)
    again.queue("b@far.test")  # new mail after the restart
    clock.advance(1)
    assert again.courier.calls == []  # still paused: Resume-at from Domain.mri
    clock.advance(500)
    assert [r for _, r in again.courier.calls] == ["b@far.test"]
