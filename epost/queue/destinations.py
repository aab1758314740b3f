"""Destinations as receivers see them (issue 14): the scheduler's gate and the
memory of how each destination behaves. The decisions are the pure functions
of `epost.queue.receivers`; this class keeps their inputs (which domains share
MX hosts, sessions running, recent starts and deliveries) and asks the clock.

A destination's *group* is ``mx:`` and its sorted MX hosts (``name:port``)
once an attempt reported them, the domain until then; the group holds one `Receiver`
state and one set of limits for all its domains.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from twisted.internet.interfaces import IReactorTime

from epost.queue import receivers as rx
from epost.queue.scheduler import Job


@dataclass(frozen=True)
class Judged:
    """What one attempt's replies say, per recipient address."""

    throttled: dict[str, rx.ThrottleRule]
    greylisted: frozenset[str]
    greylisting: bool  # the destination is greylisting (greylisted retries get greylist timing)


PRUNE_EVERY = 10_000  # admissions between two prunings
_FRESH = rx.Receiver()  # a group nothing was learned of (frozen: one instance serves every lookup)
LIMITS_MEMO = 10_000  # groups whose limits are remembered at most
FORGET_ANSWERED = 3600.0  # seconds after its last answer a destination gets slow start again


class Destinations:
    def __init__(self, clock: IReactorTime, settings: rx.Settings, default_connections: int) -> None:
        self.clock = clock
        self.settings = settings
        self.default_connections = default_connections
        self.wake: Callable[[str], None] = lambda group: None  # the scheduler's wake
        self._group: dict[str, str] = {}  # domain -> group
        self._hosts: dict[str, tuple[str, ...]] = {}  # group -> MX host names
        self._domains: dict[str, set[str]] = {}  # group -> its domains seen
        # group -> (the settings' table it was found in, its limits): limits() is
        # asked twice per attempt; a group's entry goes when its domains or hosts change.
        self._limits: dict[str, tuple[object, rx.Limits]] = {}
        self._state: dict[str, rx.Receiver] = {}
        self._starts: dict[str, deque[float]] = {}  # group -> session starts in the last WINDOW
        self._sent: dict[str, deque[float]] = {}  # group -> deliveries in the last WINDOW
        self._running: dict[str, int] = {}
        self._job_group: dict[Job, str] = {}
        self.retry_interval = 120.0  # [retry] interval: the greylist probe's ladder is scaled by it
        self._laddered: set[str] = set()  # groups whose probe was brought to its ladder
        self._forced: set[str] = set()  # groups flushed by the operator: one session each, whatever the state
        self._answered: dict[str, float] = {}  # group -> when it last answered an attempt (slow start before)
        self._admitted = 0  # admissions since the last pruning
        self._grey_jobs: dict[str, dict[Job, float]] = {}  # group -> greylisted job -> its first attempt
        self.retime: Callable[[dict[Job, float]], None] = lambda due: None  # the scheduler's retime
        self.regroup: Callable[[str, str, str], None] = lambda destination, old, new: None  # the scheduler's
        self.parked: Callable[[str], int] = lambda group: 0  # the scheduler's count of a group's parked jobs

    # -- groups ------------------------------------------------------------

    def group(self, destination: str) -> str:
        return self._group.get(destination, destination)

    def saw_hosts(self, destination: str, hosts: Iterable[str]) -> None:
        """An attempt named the destination's hosts: it joins the group of that host set."""
        names = tuple(sorted({_host_key(h) for h in hosts if h}))
        if not names:
            return
        group = "mx:" + ",".join(names)
        old = self.group(destination)
        if old == group:
            return
        self._group[destination] = group
        self._hosts[group] = names
        self._domains.setdefault(group, set()).add(destination)
        self._limits.pop(group, None)  # only this group's domains or hosts changed
        if old in self._state and group not in self._state:
            self._state[group] = self._state[old]  # what was learned under the domain's name carries over
        if old in self._answered:
            self._answered[group] = self._answered[old]
        for job, first in self._grey_jobs.pop(old, {}).items():
            self._grey_jobs.setdefault(group, {})[job] = first
        self.regroup(destination, old, group)

    def limits(self, group: str) -> rx.Limits:
        table = self.settings.destinations
        cached = self._limits.get(group)
        if cached is not None and cached[0] is table:
            return cached[1]
        domain = min(self._domains.get(group, ()), default=group)
        hosts = [host.rpartition(":")[0] or host for host in self._hosts.get(group, ())]
        limits = rx.limits_for(table, domain, hosts)
        if len(self._limits) >= LIMITS_MEMO:  # bounded: groups come and go
            self._limits.clear()
        self._limits[group] = (table, limits)
        return limits

    def state(self, group: str) -> rx.Receiver:
        return rx.settle(self._state.get(group, _FRESH), self.clock.seconds())

    def messages_per_connection(self, destination: str) -> int | None:
        return self.limits(self.group(destination)).messages_per_connection

    # -- the scheduler's gate ------------------------------------------------

    def room(self, group: str, retry: bool, now: float) -> tuple[int, float | None]:
        """How many of the group's parked jobs may be offered now, or when to ask
        again (receivers.admit and free_slots)."""
        if group in self._forced:
            return 1, None
        r, limits, running, answered = (self._state.get(group, _FRESH), self.limits(group),
                                        self._running.get(group, 0), group in self._answered)
        hold = rx.admit(r, limits, self.default_connections, now, running, self._window(group, now), retry, answered)
        if hold is not None:
            return 0, hold
        return rx.free_slots(r, limits, self.default_connections, now, running, answered), None

    def _window(self, group: str, now: float) -> deque[float]:
        starts = self._starts.setdefault(group, deque())
        while starts and starts[0] <= now - rx.WINDOW:
            starts.popleft()
        return starts

    def admit(self, job: Job, retry: bool, now: float) -> float | None:
        group = self.group(job.destination)
        starts = self._window(group, now)
        if group in self._forced:
            self._forced.discard(group)
            hold = None
        else:
            hold = rx.admit(
            self._state.get(group, _FRESH), self.limits(group), self.default_connections,
                now, self._running.get(group, 0), starts, retry, group in self._answered,
            )
        if hold is not None:
            if not retry and self._state.get(group, _FRESH).state == rx.GREYLISTING:
                self._hurry_probe(group, now)
            return hold
        starts.append(now)
        self._running[group] = self._running.get(group, 0) + 1
        self._admitted += 1
        if self._admitted >= PRUNE_EVERY:
            self._prune(now)
        self._job_group[job] = group
        return None

    def _prune(self, now: float) -> None:
        """Forget the counts of groups idle for a while, so memory follows the
        destinations in use, not every destination ever seen."""
        self._admitted = 0
        for table in (self._starts, self._sent):
            for group in [g for g, times in table.items() if not times or times[-1] <= now - rx.WINDOW]:
                del table[group]
        for group in [g for g, t in self._answered.items() if t <= now - FORGET_ANSWERED and g not in self._running]:
            del self._answered[group]
        # A group nothing is known of any more (no session, count, lesson or parked
        # job) lets its domains go: the next attempt that names their hosts
        # groups them again. Without this every domain ever seen stayed.
        busy = (self._running, self._state, self._answered, self._grey_jobs, self._starts, self._sent,
                self._forced, self._laddered)
        for group in [g for g in self._domains if not any(g in table for table in busy) and not self.parked(g)]:
            for domain in self._domains.pop(group):
                if self._group.get(domain) == group:
                    del self._group[domain]
            self._hosts.pop(group, None)
            self._limits.pop(group, None)

    def finished(self, job: Job) -> None:
        group = self._job_group.pop(job, None)
        if group is not None:
            self._running[group] -= 1
            if not self._running[group]:
                del self._running[group]

    def flush(self, groups: set[str] | None, now: float) -> None:
        """The operator's flush: pauses and holds end now and one session each may
        start whatever the limits say (the ramp still applies after it)."""
        for group in list(self._state) if groups is None else groups & set(self._state):
            self._forced.add(group)
            r = self._state[group]
            if r.resume_at > now or r.hold_until > now:
                self._state[group] = replace(r, resume_at=min(r.resume_at, now), hold_until=0.0)

    # -- what replies teach ----------------------------------------------------

    def judge(
        self,
        destination: str,
        replies: dict[str, tuple[int | None, str, str, bool, float | None]],
        now: float,
    ) -> Judged:
        """Learn from one attempt. `replies`: address -> (code, text, stage,
        first_contact, greylist_waited), the last being the seconds since the first
        attempt of a recipient that had been greylisted and is now accepted."""
        group = self.group(destination)
        before = self._state.get(group, _FRESH)
        r = rx.settle(before, now)
        sent = self._sent.setdefault(group, deque())
        while sent and sent[0] <= now - rx.WINDOW:
            sent.popleft()
        throttled: dict[str, rx.ThrottleRule] = {}
        greylisted: set[str] = set()
        first_rule: rx.ThrottleRule | None = None
        delivered = False  # the message was taken (for one recipient or more): one in the rate's count
        for address, (code, text, stage, first_contact, waited) in replies.items():
            if code is not None:
                self._answered[group] = now
            kind, rule = rx.classify(code, text, stage, self.settings.rules)
            if kind == rx.SENT:
                delivered = True
                if waited is not None:
                    r = rx.on_greylist_passed(r, waited)
                elif first_contact:
                    r = rx.on_first_contact_sent(r)
            elif kind == rx.THROTTLE:
                throttled[address] = rule
                first_rule = first_rule or rule
            elif kind == rx.GREYLIST:
                r = rx.on_greylisted(r, now, first_contact)
                if first_contact or r.state == rx.GREYLISTING:
                    greylisted.add(address)
        if delivered:
            sent.append(now)
        if first_rule is not None:
            r = rx.on_throttle(r, first_rule, now, len(sent), self._running.get(group, 0))
        if r != self._state.get(group, _FRESH):
            if r == _FRESH:
                self._state.pop(group, None)
            else:
                self._state[group] = r
            if _opens(before, r, now):
                self.clock.callLater(0, self.wake, group)
            if r.greylist_delay is not None and r.greylist_delay != before.greylist_delay:
                self._retime_greylisted(group, r.greylist_delay)
        return Judged(throttled, frozenset(greylisted), r.state == rx.GREYLISTING)

    def greylist_delay(self, destination: str) -> float | None:
        return self.state(self.group(destination)).greylist_delay

    def greylist_retry(
        self, job: Job, first: float, now: float, policy_next: float | None, interval: float, others_waiting: bool = True
    ) -> float | None:
        """The retry time of a greylisted job (receivers.greylist_retry_at); the
        group's first greylisted job still waiting is the probe."""
        group = self.group(job.destination)
        jobs = self._grey_jobs.setdefault(group, {})
        jobs.setdefault(job, first)
        probe = next(iter(jobs)) == job
        return rx.greylist_retry_at(
            first, now, self.greylist_delay(job.destination), policy_next, interval, probe, others_waiting
        )

    def _hurry_probe(self, group: str, now: float) -> None:
        """Mail is held behind the greylisted probe: if its retry was put at E-Post's
        time (nothing waited then), bring it to its ladder rung, once."""
        jobs = self._grey_jobs.get(group)
        if not jobs or group in self._laddered or self.greylist_delay(next(iter(jobs)).destination) is not None:
            return
        self._laddered.add(group)
        probe = next(iter(jobs))
        first = jobs[probe]
        due = rx.greylist_retry_at(first, now, None, float("inf"), self.retry_interval, probe=True)
        if due is not None and due != float("inf"):
            self.clock.callLater(0, self.retime, {probe: due})

    def not_greylisted(self, job: Job) -> None:
        """The job's last attempt was not a greylisting (it passed, or failed otherwise)."""
        group = self.group(job.destination)
        jobs = self._grey_jobs.get(group)
        if jobs is not None and jobs.pop(job, None) is not None and not jobs:
            del self._grey_jobs[group]
            self._laddered.discard(group)

    def _retime_greylisted(self, group: str, delay: float) -> None:
        """The delay was learned: the greylisted jobs waiting go at their first attempt + delay."""
        jobs = self._grey_jobs.get(group)
        if jobs:
            due = {job: first + delay + rx.greylist_margin(delay) for job, first in jobs.items()}
            self.clock.callLater(0, self.retime, due)

    # -- Domain.mri --------------------------------------------------------------

    def fields(self, destination: str) -> dict[str, str]:
        group = self.group(destination)
        r = self._state.get(group)
        return {} if r is None else rx.to_fields(r, self.clock.seconds(), group if group != destination else "")

    def restore(self, destination: str, fields: dict[str, str]) -> None:
        """From a Domain.mri of the previous run: pauses, lowered limits and what was learned."""
        r = rx.settle(rx.from_fields(fields), self.clock.seconds())
        if r == _FRESH:
            return
        group = fields.get("Destination") or destination
        if group.startswith("mx:"):
            self._group[destination] = group
            self._hosts[group] = tuple(group[3:].split(","))
            self._domains.setdefault(group, set()).add(destination)
            self._limits.pop(group, None)
        self._state.setdefault(group, r)


def replies_of(envelope, destination: str, indexes: Iterable[int], outcomes: dict, rules, now: float) -> dict:
    """The inputs of `Destinations.judge` for one attempt (pure): per recipient its
    reply, whether it was the recipient's first contact, and, for a recipient that
    was greylisted before and is accepted now, how long after its first attempt."""
    state = envelope.retries.get(destination) or {}
    first_failure = state.get("first_failure")
    replies = {}
    for index in indexes:
        recipient = envelope.recipients[index]
        outcome = outcomes.get(recipient.address)
        if outcome is None:
            continue
        waited = None
        if outcome.code is not None and outcome.code < 400 and recipient.attempts and first_failure is not None:
            last = recipient.last_reply
            code = int(last[:3]) if last[:3].isdigit() else None
            if rx.classify(code, last[4:], "rcpt", rules)[0] == rx.GREYLIST:
                waited = max(0.0, now - float(first_failure))
        replies[recipient.address] = (outcome.code, outcome.text, outcome.stage, recipient.attempts == 0, waited)
    return replies


def _host_key(host: str) -> str:
    """`MX1.Example.` and `mx1.example:25` alike: lower case, no final dot, the port kept."""
    name, colon, port = host.rpartition(":")
    if not colon or not port.isdigit():
        name, port = host, ""
    name = name.lower().rstrip(".")
    return f"{name}:{port}" if port else name


def _opens(before: rx.Receiver, after: rx.Receiver, now: float) -> bool:
    """Parked mail may go sooner than it was told: a hold or pause ended."""
    return (before.hold_until > now and after.hold_until <= now) or (before.resume_at > now and after.resume_at <= now)
