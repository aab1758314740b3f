"""The scheduler with receiver-aware admission (issue 14) over task.Clock: parked
jobs keep their order, a paused group starts nothing before its resume time,
healthy destinations are not held up, flush forces a session."""

from __future__ import annotations

from twisted.internet import defer, task

from epost.queue import receivers as rx
from epost.queue.destinations import Destinations
from epost.queue.scheduler import Job, Scheduler

PAUSE = rx.ThrottleRule("pause", 100, code=421)


class Recorder:
    def __init__(self, clock):
        self.clock = clock
        self.started: list[tuple[float, Job]] = []
        self.pending: dict[Job, defer.Deferred] = {}

    def start(self, job):
        self.started.append((self.clock.seconds(), job))
        d = self.pending[job] = defer.Deferred()
        return d

    def finish(self, job, outcome="done"):
        self.pending.pop(job).callback(outcome)


def make(settings=rx.Settings(), **kw):
    clock = task.Clock()
    clock.advance(1000)
    gate = Destinations(clock, settings, default_connections=10)
    rec = Recorder(clock)
    scheduler = Scheduler(clock, rec.start, max_connections=20, max_per_destination=10, gate=gate, **kw)
    gate.wake = scheduler.wake
    gate.retime = scheduler.retime
    gate.regroup = scheduler.regroup
    gate.parked = scheduler.parked
    return clock, gate, rec, scheduler


def throttle(gate, destination, now):
    gate.judge(destination, {"a@x": (421, "4.7.0 slow", "rcpt", True, None)}, now)


def paused():
    """A scheduler whose slow.test met a pause of 100 s in its first job, Q0 (parked)."""
    clock, gate, rec, scheduler = make(rx.Settings(rules=(PAUSE,)))
    first = Job("Q0", "slow.test")
    scheduler.add_new(first)
    throttle(gate, "slow.test", clock.seconds())
    rec.finish(first, ("park", clock.seconds()))
    return clock, gate, rec, scheduler, first


def test_parked_jobs_start_in_order_after_the_pause_and_healthy_mail_goes_meanwhile():
    clock, gate, rec, scheduler, first = paused()
    jobs = [Job(f"Q{i}", "slow.test") for i in range(1, 5)]
    for job in jobs:
        scheduler.add_new(job)
    scheduler.add_new(Job("H1", "healthy.test"))
    clock.advance(0)
    assert [job for _, job in rec.started] == [first, Job("H1", "healthy.test")]
    assert scheduler.ready_counts()["parked"] == 5
    clock.advance(99)
    assert len(rec.started) == 2  # nothing before the resume time
    clock.advance(1)
    # one session at a time after a pause, in the order they came
    assert rec.started[2] == (1100.0, first)
    for job in jobs:
        rec.finish(rec.started[-1][1])
        clock.advance(0)
        assert rec.started[-1][1] == job


def test_a_paused_destination_never_starts_before_resume_whatever_comes_due():
    clock, gate, rec, scheduler, first = paused()
    for i in range(20):
        scheduler.add_deferred(Job(f"R{i}", "slow.test"), clock.seconds() + i * 5)
    for _ in range(99):
        clock.advance(1)
        assert len(rec.started) == 1
    clock.advance(1)
    assert len(rec.started) == 2


def test_flush_forces_one_session_at_a_paused_destination():
    clock, gate, rec, scheduler, first = paused()
    clock.advance(10)
    assert len(rec.started) == 1
    scheduler.flush()
    assert rec.started[-1] == (1010.0, first)


def test_forget_takes_a_parked_job_out():
    clock, gate, rec, scheduler = make(rx.Settings(rules=(PAUSE,)))
    first, second = Job("Q0", "slow.test"), Job("Q1", "slow.test")
    scheduler.add_new(first)
    throttle(gate, "slow.test", clock.seconds())
    scheduler.add_new(second)
    rec.finish(first, ("park", clock.seconds()))
    assert scheduler.forget(second)
    assert not scheduler.knows(second)
    clock.advance(100)
    assert [job for _, job in rec.started] == [first, first]


def test_domains_with_the_same_mx_hosts_share_one_pause():
    clock, gate, rec, scheduler = make(rx.Settings(rules=(PAUSE,)))
    gate.saw_hosts("a.test", ["mx1.host.test:25", "mx2.host.test:25"])
    gate.saw_hosts("b.test", ["mx2.host.test:25", "MX1.host.test.:25"])
    assert gate.group("a.test") == gate.group("b.test") == "mx:mx1.host.test:25,mx2.host.test:25"
    throttle(gate, "a.test", clock.seconds())
    scheduler.add_new(Job("Q1", "b.test"))
    assert rec.started == []
    clock.advance(100)
    assert [job for _, job in rec.started] == [Job("Q1", "b.test")]


def test_destination_limits_cap_sessions_and_rate():
    settings = rx.Settings(destinations=(("*.host.test", rx.Limits(max_connections=2, messages_per_minute=60)),))
    clock, gate, rec, scheduler = make(settings)
    gate.saw_hosts("a.test", ["mx.host.test:25"])
    gate.judge("a.test", {"x@a.test": (250, "ok", "data", True, None)}, clock.seconds())
    for i in range(6):
        scheduler.add_new(Job(f"Q{i}", "a.test"))
    assert len(rec.started) == 1  # 60 a minute: one a second (0.9 s, with the slack)
    clock.advance(0.9)
    assert len(rec.started) == 2
    clock.advance(0.9)
    assert len(rec.started) == 2  # two sessions at once at most
    rec.finish(rec.started[0][1])
    clock.advance(0)
    assert len(rec.started) == 3


def test_learned_greylist_delay_retimes_the_other_greylisted_jobs():
    clock, gate, rec, scheduler = make()
    probe, other = Job("Q0", "grey.test"), Job("Q1", "grey.test")
    t0 = clock.seconds()
    scheduler.add_deferred(probe, t0 + 40)
    scheduler.add_deferred(other, t0 + 361)
    gate.judge("grey.test", {"a@grey.test": (450, "4.2.0 Greylisted", "rcpt", True, None)}, t0)
    assert gate.greylist_retry(probe, t0, t0, t0 + 120, 120) == t0 + 40
    assert gate.greylist_retry(other, t0 + 1, t0 + 1, t0 + 120, 120) == t0 + 1 + 360
    clock.advance(40)
    assert rec.started[-1][1] == probe
    gate.judge("grey.test", {"a@grey.test": (250, "ok", "data", False, 40.0)}, clock.seconds())
    gate.not_greylisted(probe)
    rec.finish(probe)
    clock.advance(0)
    assert scheduler.next_due() == t0 + 1 + 40 + rx.greylist_margin(40)


def test_parked_jobs_follow_their_domain_into_its_mx_group():
    clock, gate, rec, scheduler = make()
    jobs = [Job(f"Q{i}", "bulk.test") for i in range(6)]
    for job in jobs:
        scheduler.add_new(job)
    assert len(rec.started) == rx.SLOW_START  # the rest parked under the domain's own name
    gate.saw_hosts("bulk.test", ["mx.bulk.test:25"])
    gate.judge("bulk.test", {"a@bulk.test": (250, "ok", "data", True, None)}, clock.seconds())
    rec.finish(jobs[0])
    clock.advance(0)
    assert [job for _, job in rec.started] == jobs  # answered: the full limit, all of them at once


def test_a_bulk_to_a_rate_limiter_keeps_under_its_rate_with_few_refusals():
    """2,000 jobs to a model receiver taking 120 a minute (sliding window), the
    shipped rules: about one attempt per message, most of the allowed rate."""
    clock, gate, rec, scheduler = make()
    taken: list[float] = []
    delivered: list[float] = []
    refusals: list[float] = []

    def start(job):
        d = defer.Deferred()

        def answer():
            now = clock.seconds()
            if sum(1 for t in taken if now - t < 60) < 120:
                taken.append(now)
                delivered.append(now)
                gate.judge("rate.test", {"a": (250, "ok", "data", True, None)}, now)
                d.callback("done")
            else:
                refusals.append(now)
                gate.judge("rate.test", {"a": (421, "4.7.0 Too many messages, slow down", "rcpt", True, None)}, now)
                d.callback(("park", now))

        clock.callLater(0.03, answer)
        return d

    scheduler._start = start
    gate.saw_hosts("rate.test", ["mx.rate.test:25"])
    for i in range(2000):
        scheduler.add_new(Job(f"Q{i}", "rate.test"))
    while len(delivered) < 2000 and clock.seconds() < 5000:
        clock.advance(0.05)
    assert len(delivered) == 2000
    assert (2000 + len(refusals)) / 2000 <= 1.02
    sustained = 60 * (2000 - 120) / (delivered[-1] - delivered[0])
    assert 0.9 * 120 <= sustained <= 120


def test_idle_groups_let_their_domains_go_so_memory_follows_the_destinations_in_use():
    from epost.queue import destinations
    clock, gate, rec, scheduler = make()
    for i in range(3):
        job = Job(f"Q{i}", f"d{i}.test")
        scheduler.add_new(job)
        gate.saw_hosts(f"d{i}.test", [f"mx{i}.host.test:25"])
        rec.finish(job)
    gate.saw_hosts("held.test", ["mx.held.test:25"])
    gate.parked = lambda group: 1 if group == gate.group("held.test") else 0
    assert gate.group("d0.test") == "mx:mx0.host.test:25"
    clock.advance(destinations.FORGET_ANSWERED + 1)
    gate._prune(clock.seconds())
    assert gate.group("d0.test") == "d0.test"  # forgotten: grouped again at its next attempt
    assert not any(g.startswith("mx:mx0") for g in gate._domains)
    assert gate.group("held.test") == "mx:mx.held.test:25"  # a group with a parked job keeps its domains
