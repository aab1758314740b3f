"""The scheduler: lanes, limits, one timer, dead destinations, driven by task.Clock."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from epost.queue.scheduler import Job, Scheduler


class FakeStart:
    """Records started jobs; the test fires their Deferreds."""

    def __init__(self, on_start: Callable[[Job], None] | None = None) -> None:
        self.on_start = on_start
        self.started: list[Job] = []
        self.pending: dict[Job, Deferred] = {}

    def __call__(self, job: Job) -> Deferred:
        if self.on_start is not None:
            self.on_start(job)
        self.started.append(job)
        d: Deferred = Deferred()
        self.pending[job] = d
        return d

    def finish(self, job: Job, outcome: object = "done") -> None:
        self.pending.pop(job).callback(outcome)


def make(**kwargs: object) -> tuple[Clock, FakeStart, Scheduler]:
    clock, start = Clock(), FakeStart()
    return clock, start, Scheduler(clock, start, **kwargs)  # type: ignore[arg-type]


def jobs(destination: str, n: int, prefix: str = "q") -> list[Job]:
    return [Job(f"{prefix}{i}", destination) for i in range(n)]


def test_new_job_starts_immediately() -> None:
    clock, start, scheduler = make()
    scheduler.add_new(Job("q1", "example.com"))
    assert start.started == [Job("q1", "example.com")]
    assert scheduler.running() == {Job("q1", "example.com")}


def test_per_destination_limit_holds_extra_jobs_until_a_slot_frees() -> None:
    clock, start, scheduler = make(max_per_destination=2)
    batch = jobs("a.example", 4)
    for job in batch:
        scheduler.add_new(job)
    scheduler.add_new(Job("other", "b.example"))
    assert start.started == batch[:2] + [Job("other", "b.example")]
    assert scheduler.ready_counts()["waiting"] == 2
    start.finish(batch[0])
    assert start.started[-1] == batch[2]
    assert len(scheduler.running()) == 3


def test_global_limit_then_fifo_order() -> None:
    clock, start, scheduler = make(max_connections=3)
    batch = [Job(f"q{i}", f"d{i}.example") for i in range(5)]
    for job in batch:
        scheduler.add_new(job)
    assert start.started == batch[:3]
    assert scheduler.ready_counts()["new"] == 2
    start.finish(batch[1])
    assert start.started == batch[:4]


def test_new_mail_never_waits_behind_flushed_retries() -> None:
    clock, start, scheduler = make(max_connections=10)
    for i in range(10_000):
        scheduler.add_deferred(Job(f"r{i}", f"d{i % 500}.example"), due=3600.0 + i)
    scheduler.flush()
    assert len(scheduler.running()) == scheduler.deferred_limit == 5
    assert scheduler.ready_counts()["deferred"] == 10_000 - 5
    scheduler.add_new(Job("fresh", "new.example"))
    assert start.started[-1] == Job("fresh", "new.example")


def test_new_mail_uses_idle_deferred_slots_and_is_preferred() -> None:
    clock, start, scheduler = make(max_connections=4)
    new = [Job(f"n{i}", f"n{i}.example") for i in range(6)]
    for job in new:
        scheduler.add_new(job)
    retry = Job("r", "r.example")
    scheduler.add_deferred(retry, due=0.0)
    clock.advance(0)
    assert start.started == new[:4]
    start.finish(new[0])
    assert start.started[-1] == new[4]  # new mail wins the freed slot
    start.finish(new[1])
    start.finish(new[2])
    assert start.started[-2:] == [new[5], retry]


def test_deferred_job_starts_exactly_at_its_due_time() -> None:
    clock, start, scheduler = make()
    job = Job("q1", "example.com")
    scheduler.add_deferred(job, due=120.0)
    assert scheduler.next_due() == 120.0
    clock.advance(119)
    assert start.started == []
    clock.advance(1)
    assert start.started == [job]
    assert scheduler.next_due() is None


def test_only_one_timer_at_a_time() -> None:
    clock, start, scheduler = make(max_connections=1000)
    for i in range(200):
        scheduler.add_deferred(Job(f"q{i}", "example.com"), due=float((i * 37) % 101))
        assert len(clock.getDelayedCalls()) <= 1
    for _ in range(120):
        clock.advance(1)
        assert len(clock.getDelayedCalls()) <= 1
    assert scheduler.next_due() is None
    assert clock.getDelayedCalls() == []


def test_retry_outcome_reschedules_the_job() -> None:
    clock, start, scheduler = make()
    job = Job("q1", "example.com")
    scheduler.add_new(job)
    start.finish(job, ("retry", 300.0))
    assert scheduler.next_due() == 300.0
    clock.advance(300)
    assert start.started == [job, job]


def test_dead_destination_is_probed_by_one_job_at_a_time() -> None:
    clock, start, scheduler = make()
    first = Job("q0", "dead.example")
    scheduler.add_new(first)
    start.finish(first, ("retry_noanswer", 600.0))
    assert scheduler.is_dead("dead.example")
    waiting = jobs("dead.example", 5, prefix="w")
    for job in waiting:
        scheduler.add_new(job)
    assert start.started == [first]  # nobody opens a failing connection before the probe time
    clock.advance(600)
    assert start.started == [first, first]  # the probe
    start.finish(first, ("retry_noanswer", 1200.0))
    for job in waiting:
        scheduler.add_deferred(Job(job.queue_id + "-later", "dead.example"), due=900.0)
    clock.advance(600)
    assert len(scheduler.running()) == 1
    probe = next(iter(scheduler.running()))
    start.finish(probe, ("retry_noanswer", 1800.0))
    clock.advance(600)
    assert len(scheduler.running()) == 1
    probe = next(iter(scheduler.running()))
    start.finish(probe, "done")
    assert not scheduler.is_dead("dead.example")
    assert len(scheduler.running()) == 10  # max_per_destination, everything else released


def test_non_noanswer_outcome_revives_destination() -> None:
    clock, start, scheduler = make()
    first = Job("q0", "d.example")
    scheduler.add_new(first)
    start.finish(first, ("retry_noanswer", 60.0))
    others = jobs("d.example", 3, prefix="o")
    for job in others:
        scheduler.add_new(job)
    clock.advance(60)
    assert scheduler.running() == {first}
    start.finish(first, ("retry", 600.0))
    assert scheduler.running() == set(others)


def test_flush_probes_dead_destination_once_and_respects_it() -> None:
    clock, start, scheduler = make()
    first = Job("q0", "d.example")
    scheduler.add_new(first)
    start.finish(first, ("retry_noanswer", 3600.0))
    for job in jobs("d.example", 4, prefix="o"):
        scheduler.add_deferred(job, due=1800.0)
    scheduler.flush()
    assert len(scheduler.running()) == 1
    assert scheduler.next_due() is None


def test_failed_deferred_is_retried_later() -> None:
    clock, start, scheduler = make()
    job = Job("q1", "example.com")
    scheduler.add_new(job)
    start.pending.pop(job).errback(RuntimeError("boom"))
    assert scheduler.next_due() == Scheduler.retry_after_error
    assert scheduler.running() == frozenset()


def test_duplicate_job_is_rejected() -> None:
    clock, start, scheduler = make()
    scheduler.add_new(Job("q1", "example.com"))
    with pytest.raises(ValueError):
        scheduler.add_deferred(Job("q1", "example.com"), due=5.0)


def test_synchronous_outcomes_do_not_recurse_out_of_limits() -> None:
    clock = Clock()
    seen: list[Job] = []

    def start(job: Job) -> Deferred:
        seen.append(job)
        d: Deferred = Deferred()
        d.callback("done")
        return d

    scheduler = Scheduler(clock, start, max_connections=2)
    for i in range(50):
        scheduler.add_new(Job(f"q{i}", "example.com"))
    assert len(seen) == 50
    assert scheduler.running() == frozenset()


DESTINATIONS = ["a.example", "b.example", "c.example"]

operations = st.lists(
    st.one_of(
        st.tuples(st.just("new"), st.sampled_from(DESTINATIONS)),
        st.tuples(st.just("deferred"), st.sampled_from(DESTINATIONS), st.integers(0, 500)),
        st.tuples(st.just("advance"), st.integers(0, 300)),
        st.tuples(
            st.just("finish"),
            st.integers(0, 50),
            st.sampled_from(["done", "retry", "retry_noanswer"]),
            st.integers(1, 400),
        ),
        st.tuples(st.just("flush")),
    ),
    max_size=80,
)


@settings(max_examples=200, deadline=None)
@given(
    ops=operations,
    max_connections=st.integers(1, 6),
    max_per_destination=st.integers(1, 3),
    share=st.sampled_from([0.0, 0.25, 0.5, 1.0]),
)
def test_limits_hold_and_every_job_eventually_starts(
    ops: list[tuple], max_connections: int, max_per_destination: int, share: float
) -> None:
    clock, start, scheduler = make(
        max_connections=max_connections,
        max_per_destination=max_per_destination,
        new_mail_share=share,
    )
    added: list[Job] = []

    def probe_is_alone(job: Job) -> None:
        if scheduler.is_dead(job.destination):
            assert not any(j.destination == job.destination for j in start.pending)

    start.on_start = probe_is_alone

    def check() -> None:
        running = scheduler.running()
        assert running == set(start.pending)
        assert len(running) <= max_connections
        per = Counter(job.destination for job in running)
        assert all(n <= max_per_destination for n in per.values())
        assert len(clock.getDelayedCalls()) <= 1

    for n, op in enumerate(ops):
        if op[0] == "new":
            job = Job(f"q{n}", op[1])
            added.append(job)
            scheduler.add_new(job)
        elif op[0] == "deferred":
            job = Job(f"q{n}", op[1])
            added.append(job)
            scheduler.add_deferred(job, clock.seconds() + op[2])
        elif op[0] == "advance":
            clock.advance(op[1])
        elif op[0] == "finish" and start.pending:
            job = list(start.pending)[op[1] % len(start.pending)]
            kind = op[2]
            start.finish(job, "done" if kind == "done" else (kind, clock.seconds() + op[3]))
        elif op[0] == "flush":
            scheduler.flush()
        check()

    for _ in range(10_000):
        if not start.pending and scheduler.next_due() is None and not any(scheduler.ready_counts().values()):
            break
        for job in list(start.pending):
            start.finish(job, "done")
            check()
        clock.advance(1000)
        check()
    else:
        raise AssertionError("scheduler did not drain")
    assert set(start.started) == set(added)
    assert scheduler.running() == frozenset()


def test_a_stopped_scheduler_starts_nothing_more():
    clock = Clock()
    started = []
    scheduler = Scheduler(clock, lambda job: started.append(job) or Deferred(), max_connections=1)
    scheduler.add_new(Job("A", "d"))
    scheduler.add_deferred(Job("B", "d"), 10)
    scheduler.stop()
    scheduler.add_new(Job("C", "e"))
    clock.advance(20)
    assert started == [Job("A", "d")] and clock.getDelayedCalls() == []


def test_jobs_for_a_dead_destination_are_suspended_not_parked_and_expiry_keeps_it_dead():
    clock, start, suspended = Clock(), FakeStart(), []

    def suspend(job):
        suspended.append(job)
        return ("retry", clock.seconds() + 100)

    scheduler = Scheduler(clock, start, suspend=suspend, probe_gap=50)
    scheduler.add_new(Job("A", "dead"))
    start.finish(Job("A", "dead"), ("retry_noanswer", 30))
    scheduler.add_new(Job("B", "dead"))  # dead, probe not due: suspended at once, no slot used
    assert (start.started, suspended) == ([Job("A", "dead")], [Job("B", "dead")])
    assert scheduler.ready_counts()["waiting"] == 0

    clock.advance(30)  # A is the probe; its recipients expire unanswered
    start.finish(Job("A", "dead"), "done_noanswer")
    assert scheduler.is_dead("dead")  # dead until 30 + probe_gap = 80
    scheduler.add_new(Job("C", "dead"))
    assert suspended[-1] == Job("C", "dead")
    clock.advance(70)  # B, suspended until 100, is due after 80: it is the next probe
    assert start.started[-1] == Job("B", "dead")


def suspend_later(clock: Clock, suspended: list[Job], gap: float):
    """A suspend callback that records the job and puts it off by `gap`."""
    return lambda job: suspended.append(job) or ("retry", clock.seconds() + gap)


def test_jobs_parked_on_a_busy_destination_are_suspended_when_it_dies():
    clock, start, suspended = Clock(), FakeStart(), []
    scheduler = Scheduler(clock, start, max_per_destination=2, suspend=suspend_later(clock, suspended, 100))
    for name in "ABCDE":
        scheduler.add_new(Job(name, "slow"))
    assert sorted(j.queue_id for j in start.pending) == ["A", "B"] and scheduler.ready_counts()["waiting"] == 3
    start.finish(Job("A", "slow"), ("retry_noanswer", 60))  # no answer: dead
    assert suspended == []  # B is still trying: they wait for its verdict
    start.finish(Job("B", "slow"), ("retry_noanswer", 60))
    assert sorted(j.queue_id for j in suspended) == ["C", "D", "E"]
    assert scheduler.ready_counts()["waiting"] == 0


def test_jobs_due_while_the_probe_runs_wait_for_its_verdict_and_start_if_it_revives():
    clock, start, suspended = Clock(), FakeStart(), []
    scheduler = Scheduler(clock, start, suspend=suspend_later(clock, suspended, 500))
    scheduler.add_new(Job("A", "site"))
    start.finish(Job("A", "site"), ("retry_noanswer", 60))
    scheduler.add_deferred(Job("B", "site"), 61)
    clock.advance(60)  # A probes
    clock.advance(1)  # B comes due while the probe runs
    assert suspended == [] and scheduler.ready_counts()["waiting"] == 1
    start.finish(Job("A", "site"), "done")  # the site answers
    assert Job("B", "site") in start.pending and suspended == []


def test_an_error_of_ours_does_not_revive_a_dead_destination_and_forgotten_ones_are_not_kept():
    clock, start, scheduler = make()
    scheduler.add_new(Job("A", "site"))
    scheduler.add_new(Job("B", "site"))
    start.finish(Job("A", "site"), ("retry_noanswer", 60))
    start.finish(Job("B", "site"), ("retry_error", 30))
    assert scheduler.is_dead("site")
    assert sorted(scheduler.forget_many([Job("A", "site"), Job("B", "site")])) == [Job("A", "site"), Job("B", "site")]
    assert not scheduler.is_dead("site") and scheduler.jobs_of("A") == frozenset()


def test_suspensions_run_a_few_at_a_time():
    clock, start, suspensions = Clock(), FakeStart(), []

    def suspend(job):
        suspensions.append(Deferred())
        return suspensions[-1]

    scheduler = Scheduler(clock, start, max_per_destination=1, suspend=suspend)
    scheduler.max_suspending = 2
    scheduler.add_new(Job("probe", "dead"))
    for i in range(5):
        scheduler.add_new(Job(f"m{i}", "dead"))
    start.finish(Job("probe", "dead"), ("retry_noanswer", 60))
    assert len(suspensions) == 2
    suspensions[0].callback(("retry", 100))
    assert len(suspensions) == 3
    while not all(d.called for d in suspensions):
        next(d for d in suspensions if not d.called).callback(("retry", 100))
        assert sum(not d.called for d in suspensions) <= 2
    assert len(suspensions) == 5
