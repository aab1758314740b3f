"""Decides which delivery jobs start and when (SPEC §6); the caller delivers.

A job is one (message, destination) pair. New mail and due retries sit in
two separate lanes, as Postfix's incoming/deferred split does, so new mail
never waits behind retries. All timing goes through one `IReactorTime`
timer armed for the earliest entry of a single heap.

Rules:

- Capacity: at most `max_connections` jobs run in total and at most
  `max_per_destination` per destination. Deferred (retry) jobs may hold at
  most `deferred_limit = max(1, max_connections - ceil(new_mail_share *
  max_connections))` slots; the rest is reserved for new mail (new mail may
  also use idle deferred slots). With max_connections=1 the reserve is empty
  so that retries still make progress.
- Preference: a free slot goes to the oldest startable new job; a
  deferred-ready job gets one only when no new job can start.
- A job whose destination has no free slot leaves its lane and waits on that
  destination; it goes back to the front of its lane when a slot frees.
- Dead destinations: an outcome ``("retry_noanswer", when)`` marks the
  destination dead with its next probe at `when`. While dead, a job for it
  starts only if no job for it is running and the probe time has come: that
  job is the probe. Every other job for it that comes up is handed to
  `suspend(job)` instead (no connection, no slot): the caller records a
  deferral and answers with the job's next time, as Postfix defers mail
  for a dead site without trying it. Without `suspend` such jobs wait on
  the destination. Any other outcome (``"done"``, ``("retry", when)``)
  makes it alive again and releases its waiting jobs. Jobs already running
  when it died are not interrupted.
- Outcomes: ``("retry_error", when)`` (our own trouble, e.g. a file
  problem) reschedules without touching the destination's state;
  ``"done"`` forgets the job; ``"done_noanswer"`` forgets it too
  but keeps the destination dead for `probe_gap` more seconds (its
  recipients expired unanswered; the next probe waits like a retry); ``("retry", when)`` and
  ``("retry_noanswer", when)`` schedule it again at `when`. A failed Deferred
  (a bug in the caller) is logged and treated as ``("retry", now + 60)``.
- `flush()` makes every scheduled job due now and every dead destination
  probe-able now (one probe each), like Postfix's flush of dead sites.
- Receivers (issue 14), only with a `gate`: a job that may start by the rules
  above is first offered to `gate.admit(job, retry, now)`; a time instead of
  None *parks* it, in order, with the other parked jobs of its gate group
  (`gate.group(destination)`: domains sharing MX hosts) until that time, or
  until `wake(group)` or a session of the group ends; then as many as
  `gate.room(group)` allows are offered again, from the front. The outcome
  ``("park", when)`` parks a job that met a throttle (its place kept, no retry
  time of its own). `flush()` also clears the group's pauses (`gate.flush`).
  Without a gate nothing of this applies.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple, Protocol, Union

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

NEW = "new"
DEFERRED = "deferred"

Outcome = Union[str, tuple[str, float]]


class Job(NamedTuple):
    """One delivery unit: a queued message and one destination (domain or route key)."""

    queue_id: str
    destination: str


class Gate(Protocol):
    """Receiver-aware admission (epost.queue.destinations.Destinations)."""

    def group(self, destination: str) -> str: ...

    def admit(self, job: Job, retry: bool, now: float) -> float | None: ...  # None: start (counted)

    def finished(self, job: Job) -> None: ...

    def flush(self, groups: set[str] | None, now: float) -> None: ...

    def room(self, group: str, retry: bool, now: float) -> tuple[int, float | None]: ...


class Scheduler:
    """Starts jobs through `start(job)` within the limits in the module docstring."""

    retry_after_error = 60.0
    max_suspending = 64  # suspensions in progress at once: a flush of a dead site's backlog stays gentle

    def __init__(
        self,
        clock: IReactorTime,
        start: Callable[[Job], Deferred[Outcome]],
        max_connections: int = 100,
        max_per_destination: int = 10,
        new_mail_share: float = 0.5,
        suspend: Callable[[Job], Deferred[Outcome]] | None = None,
        probe_gap: float = 120.0,
        gate: Gate | None = None,
    ) -> None:
        if max_connections < 1 or max_per_destination < 1:
            raise ValueError("connection limits must be at least 1")
        if not 0.0 <= new_mail_share <= 1.0:
            raise ValueError(f"new_mail_share must be in [0, 1], not {new_mail_share!r}")
        self._clock = clock
        self._start = start
        self._suspend = suspend
        self.probe_gap = probe_gap
        self._suspending: set[Job] = set()
        self._suspend_queue: deque[Job] = deque()  # over max_suspending, in order
        self.max_connections = max_connections
        self.max_per_destination = max_per_destination
        self.deferred_limit = max(1, max_connections - math.ceil(new_mail_share * max_connections))
        self._heap: list[tuple[float, int, Job]] = []
        self._seq = itertools.count()
        self._timer: IDelayedCall | None = None
        self._lanes: dict[str, deque[Job]] = {NEW: deque(), DEFERRED: deque()}
        self._waiting: dict[str, deque[tuple[str, Job]]] = {}
        self._running: dict[Job, str] = {}  # job -> lane it started from
        self._per_destination: dict[str, int] = {}
        self._running_deferred = 0
        self._dead: dict[str, float] = {}  # destination -> earliest next probe
        self._known: set[Job] = set()
        self._by_queue_id: dict[str, set[Job]] = {}
        self._by_destination: dict[str, set[Job]] = {}
        self._pumping = False
        self._pump_again = False
        self._stopped = False
        self.gate = gate
        self._parked: dict[str, deque[tuple[str, Job]]] = {}  # gate group -> parked jobs, in order
        self._released: set[Job] = set()  # let out of parking and not yet offered again
        self._park_timers: dict[str, IDelayedCall] = {}

    # -- input -----------------------------------------------------------

    def add_new(self, job: Job) -> None:
        """Queue new mail; it starts at once when capacity allows."""
        self._admit(job)
        self._lanes[NEW].append(job)
        self._pump()

    def add_deferred(self, job: Job, due: float) -> None:
        """Schedule a retry for `due` (clock seconds)."""
        self._admit(job)
        self._schedule(job, due)

    def flush(self, match: Callable[[Job], bool] | None = None) -> int:
        """Make scheduled jobs due now (all, or those `match` picks) and allow
        one probe of each of their dead destinations now. Returns how many."""
        now = self._clock.seconds()
        chosen = [entry for entry in self._heap if match is None or match(entry[2])]
        if match is None:
            self._heap.clear()
        else:
            self._heap[:] = [entry for entry in self._heap if not match(entry[2])]
            heapq.heapify(self._heap)
        destinations = set(self._dead) if match is None else {job.destination for _, _, job in chosen}
        for destination in destinations & set(self._dead):
            self._dead[destination] = min(self._dead[destination], now)
        if self.gate is not None:
            groups = None if match is None else {self.gate.group(d) for d in destinations | {
                job.destination for lane in self._parked.values() for _, job in lane if match(job)}}
            self.gate.flush(groups, now)
            for group in list(self._parked) if groups is None else groups & set(self._parked):
                self._unpark(group)
        self._lanes[DEFERRED].extend(job for _, _, job in sorted(chosen))
        self._arm()
        self._pump()
        return len(chosen)

    def forget(self, job: Job) -> bool:
        """Drop a job that is not running (held or deleted mail); False if it is running or unknown."""
        return bool(self.forget_many([job]))

    def forget_many(self, jobs: Iterable[Job]) -> list[Job]:
        """Drop these jobs (those not running or being suspended) in one pass; returns the ones dropped."""
        gone = {j for j in jobs if j in self._known and j not in self._running and j not in self._suspending}
        if not gone:
            return []
        for job in gone:
            self._drop(job)
        before = len(self._heap)
        self._heap[:] = [entry for entry in self._heap if entry[2] not in gone]
        if len(self._heap) != before:
            heapq.heapify(self._heap)
            self._arm()
        for name, lane in self._lanes.items():
            if any(job in gone for job in lane):
                self._lanes[name] = deque(job for job in lane if job not in gone)
        if any(job in gone for job in self._suspend_queue):
            self._suspend_queue = deque(job for job in self._suspend_queue if job not in gone)
        for group, parked in list(self._parked.items()):
            if any(entry[1] in gone for entry in parked):
                kept = deque(entry for entry in parked if entry[1] not in gone)
                if kept:
                    self._parked[group] = kept
                else:
                    self._forget_group(group)
        self._released -= gone
        for destination in {job.destination for job in gone} & set(self._waiting):
            kept = deque(entry for entry in self._waiting[destination] if entry[1] not in gone)
            if kept:
                self._waiting[destination] = kept
            else:
                del self._waiting[destination]
        return list(gone)

    def stop(self) -> None:
        """Start nothing more (shutdown); running jobs still report back."""
        self._stopped = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        for timer in self._park_timers.values():
            if timer.active():
                timer.cancel()
        self._park_timers.clear()

    def knows(self, job: Job) -> bool:
        return job in self._known

    def jobs_of(self, queue_id: str) -> frozenset[Job]:
        """The jobs of one message."""
        return frozenset(self._by_queue_id.get(queue_id, ()))

    def jobs_for(self, destination: str) -> frozenset[Job]:
        """The jobs for one destination."""
        return frozenset(self._by_destination.get(destination, ()))

    # -- introspection ---------------------------------------------------

    def running(self) -> frozenset[Job]:
        return frozenset(self._running)

    def ready_counts(self) -> Mapping[str, int]:
        """Jobs ready in each lane, and jobs ready but waiting on their destination."""
        return {
            NEW: len(self._lanes[NEW]),
            DEFERRED: len(self._lanes[DEFERRED]),
            "waiting": sum(len(q) for q in self._waiting.values()),
            "parked": sum(len(q) for q in self._parked.values()),
        }

    def next_due(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def is_dead(self, destination: str) -> bool:
        return destination in self._dead

    def regroup(self, destination: str, old: str, new: str) -> None:
        """`destination` moved from gate group `old` to `new` (its MX hosts became
        known): its parked jobs follow, behind the new group's, and are offered now."""
        parked = self._parked.get(old)
        if not parked:
            return
        moving = [entry for entry in parked if entry[1].destination == destination]
        if not moving:
            return
        kept = deque(entry for entry in parked if entry[1].destination != destination)
        if kept:
            self._parked[old] = kept
        else:
            self._forget_group(old)
        self._parked.setdefault(new, deque()).extend(moving)
        self._set_park_timer(new, self._clock.seconds())

    def retime(self, due: Mapping[Job, float]) -> None:
        """Scheduled jobs in `due` go at their new time (the greylist delay was learned)."""
        changed = False
        for index, (when, seq, job) in enumerate(self._heap):
            if job in due and due[job] != when:
                self._heap[index] = (due[job], seq, job)
                changed = True
        if changed:
            heapq.heapify(self._heap)
            self._arm()

    def parked(self, group: str) -> int:
        """Jobs parked by the gate for one group."""
        return len(self._parked.get(group, ()))

    def wake(self, group: str) -> None:
        """The gate's state for `group` changed: its parked jobs are offered again."""
        if group in self._parked:
            self._unpark(group)
            self._pump()

    # -- internals -------------------------------------------------------

    def _admit(self, job: Job) -> None:
        if job in self._known:
            raise ValueError(f"job {job!r} is already scheduled")
        self._known.add(job)
        self._by_queue_id.setdefault(job.queue_id, set()).add(job)
        self._by_destination.setdefault(job.destination, set()).add(job)

    def _drop(self, job: Job) -> None:
        """Forget a job for good; a destination nobody waits for any more is forgotten too."""
        self._known.discard(job)
        for index, key in ((self._by_queue_id, job.queue_id), (self._by_destination, job.destination)):
            jobs = index.get(key)
            if jobs is not None:
                jobs.discard(job)
                if not jobs:
                    del index[key]
        if job.destination not in self._by_destination:
            self._dead.pop(job.destination, None)

    def _schedule(self, job: Job, due: float) -> None:
        heapq.heappush(self._heap, (due, next(self._seq), job))
        if self._heap[0][2] is job:
            self._arm()

    def _arm(self) -> None:
        """Point the single timer at the earliest heap entry."""
        if not self._heap or self._stopped:
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._timer = None
            return
        delay = max(0.0, self._heap[0][0] - self._clock.seconds())
        if self._timer is not None and self._timer.active():
            self._timer.reset(delay)
        else:
            self._timer = self._clock.callLater(delay, self._due)

    def _due(self) -> None:
        self._timer = None
        now = self._clock.seconds()
        while self._heap and self._heap[0][0] <= now:
            self._lanes[DEFERRED].append(heapq.heappop(self._heap)[2])
        self._arm()
        self._pump()

    def _can_start(self, destination: str) -> bool:
        running = self._per_destination.get(destination, 0)
        if destination in self._dead:
            return running == 0 and self._clock.seconds() >= self._dead[destination]
        return running < self.max_per_destination

    def _pump(self) -> None:
        """Start every job the rules allow; re-entrant calls just ask for another pass."""
        if self._stopped:
            return
        if self._pumping:
            self._pump_again = True
            return
        self._pumping = True
        try:
            self._pump_again = True
            while self._pump_again:
                self._pump_again = False
                self._fill(NEW)
                self._fill(DEFERRED)
        finally:
            self._pumping = False

    def _fill(self, lane_name: str) -> None:
        lane = self._lanes[lane_name]
        while lane and len(self._running) < self.max_connections:
            if lane_name == DEFERRED:
                if self._running_deferred >= self.deferred_limit or self._lanes[NEW]:
                    return
            job = lane.popleft()
            released = job in self._released
            if released:
                self._released.discard(job)
            if self._can_start(job.destination):
                if self.gate is not None:
                    hold = self.gate.admit(job, lane_name == DEFERRED, self._clock.seconds())
                    if hold is not None:
                        self._park(job, lane_name, hold, front=released)
                        continue
                self._launch(job, lane_name)
            elif self._suspend is not None and job.destination in self._dead and not self._per_destination.get(job.destination):
                self._suspend_job(job)  # (while a probe runs, jobs wait for its verdict instead)
            else:
                self._waiting.setdefault(job.destination, deque()).append((lane_name, job))

    def _launch(self, job: Job, lane_name: str) -> None:
        self._running[job] = lane_name
        self._per_destination[job.destination] = self._per_destination.get(job.destination, 0) + 1
        if lane_name == DEFERRED:
            self._running_deferred += 1
        d = maybeDeferred(self._start, job)
        d.addBoth(self._finished, job)

    def _park(self, job: Job, lane_name: str, until: float, front: bool = False) -> None:
        """Wait for the gate: in order behind the group's other parked jobs (`front`:
        a job just let out and refused again goes back to the front)."""
        group = self.gate.group(job.destination)
        parked = self._parked.setdefault(group, deque())
        if front:
            parked.appendleft((lane_name, job))
        else:
            parked.append((lane_name, job))
        self._set_park_timer(group, until)

    def _set_park_timer(self, group: str, until: float) -> None:
        """The group's timer fires at `until` or earlier."""
        timer = self._park_timers.get(group)
        delay = max(0.0, until - self._clock.seconds())
        if timer is not None and timer.active():
            if timer.getTime() > until:
                timer.reset(delay)
        else:
            self._park_timers[group] = self._clock.callLater(delay, self._park_due, group)

    def _park_due(self, group: str) -> None:
        self._park_timers.pop(group, None)
        self._unpark(group)
        self._pump()

    def _unpark(self, group: str) -> None:
        """As many parked jobs of `group` as the gate has room for back to the
        front of their lanes, in order (a job the gate still refuses is parked
        again at the front); with no room, the timer is set for when it says."""
        parked = self._parked.get(group)
        if not parked:
            return
        now = self._clock.seconds()
        count, until = self.gate.room(group, parked[0][0] == DEFERRED, now)
        if count <= 0:
            self._set_park_timer(group, until if until is not None else now + 1.0)
            return
        back = [parked.popleft() for _ in range(min(count, len(parked)))]
        if not parked:
            self._forget_group(group)
        else:  # a finishing session asks again; this is the safety net
            self._set_park_timer(group, now + 1.0)
        self._released.update(job for _, job in back)
        for lane_name, job in reversed(back):
            self._lanes[lane_name].appendleft(job)

    def _forget_group(self, group: str) -> None:
        self._parked.pop(group, None)
        timer = self._park_timers.pop(group, None)
        if timer is not None and timer.active():
            timer.cancel()

    def _suspend_job(self, job: Job) -> None:
        if len(self._suspending) >= self.max_suspending:
            self._suspend_queue.append(job)
            return
        self._suspending.add(job)
        maybeDeferred(self._suspend, job).addBoth(self._suspended, job)

    def _suspended(self, outcome: Outcome | Failure, job: Job) -> None:
        """A suspended job's next time; it never changes the destination's state."""
        self._suspending.discard(job)
        if isinstance(outcome, Failure) or not _valid(outcome):
            log.error("suspending {job} gave {outcome!r}", job=job, outcome=outcome)
            outcome = ("retry", self._clock.seconds() + self.retry_after_error)
        if outcome in ("done", "done_noanswer"):
            self._drop(job)
        elif not self._stopped:
            self._schedule(job, outcome[1])
        while self._suspend_queue and len(self._suspending) < self.max_suspending and not self._stopped:
            self._suspend_job(self._suspend_queue.popleft())

    def _finished(self, outcome: Outcome | Failure, job: Job) -> None:
        lane_name = self._running.pop(job)
        destination = job.destination
        self._per_destination[destination] -= 1
        if not self._per_destination[destination]:
            del self._per_destination[destination]
        if lane_name == DEFERRED:
            self._running_deferred -= 1
        now = self._clock.seconds()
        if self.gate is not None:
            self.gate.finished(job)

        if isinstance(outcome, Failure):
            log.failure("delivery of {job} failed", outcome, job=job)
            outcome = ("retry_error", now + self.retry_after_error)
        elif not _valid(outcome):
            log.error("delivery of {job} gave unknown outcome {outcome!r}", job=job, outcome=outcome)
            outcome = ("retry_error", now + self.retry_after_error)

        if outcome == "done":
            self._revive(destination)
            self._drop(job)
        elif outcome == "done_noanswer":
            if destination in self._dead or len(self._by_destination.get(destination, ())) > 1:
                self._dead[destination] = now + self.probe_gap
            self._drop(job)
        elif outcome[0] == "park" and self.gate is not None and not self._stopped:
            self._revive(destination)
            self._park(job, lane_name, max(now, outcome[1]))
        else:
            kind, when = outcome
            if kind == "park":  # no gate (or stopping): a plain retry at that time
                kind = "retry"
            if kind == "retry_noanswer":
                self._dead[destination] = when
            elif kind == "retry":
                self._revive(destination)
            # retry_error: our own trouble says nothing about the destination
            self._schedule(job, when)
        self._release(destination)
        if self.gate is not None:
            group = self.gate.group(destination)
            if group in self._parked:
                self._unpark(group)  # a session of the group ended: room for a parked job
        self._pump()

    def _revive(self, destination: str) -> None:
        self._dead.pop(destination, None)

    def _release(self, destination: str) -> None:
        """Return waiting jobs for `destination` to the front of their lanes, as many as may start."""
        waiting = self._waiting.get(destination)
        if not waiting:
            return
        if destination in self._dead and self._suspend is not None:
            free = len(waiting)  # back to their lanes, where each is suspended (or is the probe)
        elif destination in self._dead:
            free = 1 if self._can_start(destination) else 0
        else:
            free = self.max_per_destination - self._per_destination.get(destination, 0)
        back: list[tuple[str, Job]] = []
        while waiting and len(back) < free:
            back.append(waiting.popleft())
        if not waiting:
            del self._waiting[destination]
        for lane_name, job in reversed(back):
            self._lanes[lane_name].appendleft(job)


def _valid(outcome: object) -> bool:
    if outcome in ("done", "done_noanswer"):
        return True
    return (
        isinstance(outcome, tuple)
        and len(outcome) == 2
        and outcome[0] in ("retry", "retry_noanswer", "retry_error", "park")
        and isinstance(outcome[1], (int, float))
    )
