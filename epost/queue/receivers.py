"""Receiver-aware delivery as pure decisions (issue 14, SPEC §6): what a reply
says about the receiver, what the destination's state becomes, and when a
session or a retry may start. No I/O, no clock: every time is an argument.

A *destination* here is where mail really goes: the set of MX hosts (domains
whose MX host sets are the same share one state), or the domain itself until
its first attempt told us its hosts. Its state:

- ``normal``: only its configured limits apply.
- ``throttled``: a throttle rule matched a reply. ``pause``: no session before
  `resume_at`, then a ramp back up; ``slow``: a lowered rate (learned from what
  the receiver accepted in the last minute, or the rule's) and connections
  until `slow_until`, then the same ramp. A throttle is never a failed attempt.
- ``greylisting``: a 4xx at RCPT on first contact looked like greylisting.
  While the delay is being learned (`hold_until` in the future) new mail is
  held back; one greylisted message, the probe, is retried on a ladder
  (`greylist_retry_at`) until it passes, which teaches the delay and releases
  the rest. Whether the receiver auto-whitelists is then seen from the
  released mail (`auto_whitelist`): if it does not, each message's first
  attempt goes at once and its retry at first attempt + the learned delay.

Until a destination has answered once in this run, at most `SLOW_START`
sessions open to it, so a greylister or a throttler meets a few first
contacts, not a whole burst.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Iterable, Sequence

NORMAL, THROTTLED, GREYLISTING = "normal", "throttled", "greylisting"
SENT, THROTTLE, GREYLIST, OTHER = "sent", "throttle", "greylist", "other"

WINDOW = 60.0  # seconds over which messages_per_minute is counted
LEARN_FACTOR = 0.97  # of the rate the receiver took in the minute before it throttled
SPACING_SLACK = 0.9  # sessions under a rate start at least 0.9 x 60/rate s apart
RAMP_STEP = 60.0  # seconds per ramp step after a throttle ends
RAMP_FACTOR = 1.25  # the rate grows by this per step
RAMP_START = 10.0  # messages/minute after a pause when nothing was learned
RAMP_CEILING = 4.0  # ramp ends (limits off) at this multiple of where it started
SLOW_START = 2  # sessions at once to a destination that has not answered yet in this run
# Retries of the probe while the delay is unknown, in multiples of [retry] interval
# after its first attempt (interval 120 s: 40, 80, 120, 180, 240, 360 s; postgrey's
# 300 s passes at the last). Past the ladder, E-Post's own rule.
GREYLIST_LADDER = (1 / 3, 2 / 3, 1, 1.5, 2, 3)
GREYLIST_HOLD_MAX = 3600.0  # new mail is released after this even if nothing passed
_ENHANCED = re.compile(r"\b([245]\.\d{1,3}\.\d{1,3})\b")
_GREYLIST_TEXT = re.compile(r"gr[ea]ylist|try again later|please retry later|temporarily (deferred|rejected)", re.I)
_GREYLIST_CODES = ("4.7.1", "4.2.0", "4.7.0")


@dataclass(frozen=True)
class ThrottleRule:
    """A reply that means "too fast": every given field must match (code, enhanced
    code, text regex searched case-insensitively). `action`: pause, slow or ignore
    (an ordinary 4xx: lets a config rule override a shipped one)."""

    action: str = "pause"
    seconds: float = 300.0
    code: int | None = None
    enhanced: str | None = None
    text: str | None = None
    messages_per_minute: float | None = None  # slow: the lowered rate (None: learned)
    max_connections: int | None = None  # slow: the lowered connections (None: unchanged)

    def matches(self, code: int, enhanced: str | None, text: str) -> bool:
        if self.code is not None and code != self.code:
            return False
        if self.enhanced is not None and enhanced != self.enhanced:
            return False
        return self.text is None or re.search(self.text, text, re.I) is not None


# Shipped rules (docs/delivery.md); config rules are tried first.
DEFAULT_THROTTLE_RULES: tuple[ThrottleRule, ...] = (
    ThrottleRule("slow", 1800, code=421, enhanced="4.7.28", messages_per_minute=10),  # Gmail: unusual rate
    ThrottleRule("slow", 5400, enhanced="4.7.650", messages_per_minute=1, max_connections=1),  # Microsoft: IP reputation
    ThrottleRule("pause", 600, text=r"\bTS[SL]0[1-4]\b"),  # Yahoo: temporarily deferred, too much mail
    ThrottleRule("slow", 600, text=r"too many (connections|concurrent)", max_connections=1),
    ThrottleRule("slow", 600, text=r"too many (messages|mails|recipients)|too much mail|rate limit|sending rate|slow down"),
    ThrottleRule("slow", 600, code=450, enhanced="4.7.1", text=r"rate|limit"),
    ThrottleRule("slow", 600, code=421, enhanced="4.7.0"),
)


@dataclass(frozen=True)
class Limits:
    """Settings of a destination ([delivery.destinations."pattern"]); None: not limited here."""

    max_connections: int | None = None
    messages_per_connection: int | None = None
    messages_per_minute: float | None = None


def pattern_matches(pattern: str, name: str) -> bool:
    """`d` matches d only; `*.d` matches every name under d, never d itself."""
    pattern, name = pattern.lower().rstrip("."), name.lower().rstrip(".")
    if pattern.startswith("*."):
        return name.endswith(pattern[1:]) and len(name) > len(pattern) - 1
    return name == pattern


def limits_for(table: Sequence[tuple[str, Limits]], domain: str, mx_hosts: Iterable[str] = ()) -> Limits:
    """The most specific pattern naming the domain or one of its MX hosts wins:
    an exact name before any `*.`, a longer `*.` suffix before a shorter one,
    the domain before its MX hosts at equal specificity, then the first in the file."""
    names = [(0, domain)] + [(1, host) for host in mx_hosts]
    best: tuple[tuple, Limits] | None = None
    for order, (pattern, limits) in enumerate(table):
        for which, name in names:
            if pattern_matches(pattern, name):
                rank = (not pattern.startswith("*."), pattern.count("."), -which, -order)
                if best is None or rank > best[0]:
                    best = (rank, limits)
    return best[1] if best else Limits()


def enhanced_of(text: str) -> str | None:
    match = _ENHANCED.search(text[:40])
    return match.group(1) if match else None


def classify(code: int | None, text: str, stage: str, rules: Sequence[ThrottleRule]) -> tuple[str, ThrottleRule | None]:
    """What one recipient's reply says: SENT, THROTTLE (with its rule), GREYLIST or
    OTHER. Only 4xx replies can throttle or greylist; 5xx and no answer are OTHER,
    so E-Post's counts for real failures never change. A greylisting reply comes
    at RCPT (or DATA); whether it marks the destination depends on it being the
    recipient's first contact (`on_greylisted`)."""
    if code is not None and 200 <= code < 400:
        return SENT, None
    if code is None or not 400 <= code < 500:
        return OTHER, None
    enhanced = enhanced_of(text)
    for rule in rules:
        if rule.matches(code, enhanced, text):
            return (OTHER, None) if rule.action == "ignore" else (THROTTLE, rule)
    if stage in ("rcpt", "data") and (enhanced in _GREYLIST_CODES or _GREYLIST_TEXT.search(text)):
        return GREYLIST, None
    return OTHER, None


@dataclass(frozen=True)
class Receiver:
    """The learned state of one destination (see the module docstring)."""

    state: str = NORMAL
    resume_at: float = 0.0  # throttled: no session before
    slow_until: float = 0.0  # throttled: lowered limits hold until, then the ramp
    rate: float | None = None  # messages/minute while throttled and ramping (None: no lowered rate)
    connections: int | None = None  # lowered connections while throttled and ramping
    hold_until: float = 0.0  # greylisting: new mail beyond the seed is held until (0: not holding)
    greylist_delay: float | None = None  # learned: seconds a triplet waits before it passes
    auto_whitelist: bool | None = None  # learned: does the receiver whitelist us after a few passes


def settle(r: Receiver, now: float) -> Receiver:
    """The state once time has passed: a finished ramp returns to normal, an
    expired greylist hold releases."""
    if r.state == THROTTLED and now >= r.resume_at and now >= r.slow_until and ramp_done(r, now):
        return replace(r, state=NORMAL, rate=None, connections=None, resume_at=0.0, slow_until=0.0)
    if r.state == GREYLISTING and r.hold_until and now >= r.hold_until:
        return replace(r, hold_until=0.0)
    return r


def _steps(r: Receiver, now: float) -> int:
    start = max(r.resume_at, r.slow_until)
    return 0 if now <= start else int(min(64, (now - start) // RAMP_STEP))  # 64: the ramp is long done


def ramp_done(r: Receiver, now: float) -> bool:
    return RAMP_FACTOR ** _steps(r, now) >= RAMP_CEILING


def current_rate(r: Receiver, limits: Limits, now: float) -> float | None:
    """Messages/minute allowed now: the configured rate, lowered by a throttle and its ramp."""
    rate = limits.messages_per_minute
    if r.state == THROTTLED and r.rate is not None and not ramp_done(r, now):
        ramped = r.rate * RAMP_FACTOR ** _steps(r, now)
        rate = ramped if rate is None else min(rate, ramped)
    return rate


def current_connections(r: Receiver, limits: Limits, default: int, now: float) -> int:
    """Sessions allowed at once: configured (or the global per-destination default),
    lowered by a throttle, one more per ramp step."""
    connections = limits.max_connections or default
    if r.state == THROTTLED and r.connections is not None and not ramp_done(r, now):
        connections = min(connections, r.connections + _steps(r, now))
    return max(1, connections)


def on_throttle(r: Receiver, rule: ThrottleRule, now: float, accepted: int, running: int) -> Receiver:
    """A throttle reply: pause or slow the destination for `rule.seconds`.
    `accepted`: messages the destination accepted in the last WINDOW seconds (a
    slow-down without a rate of its own learns LEARN_FACTOR of it); `running`:
    sessions open to it. Limits only ever go down while throttled."""
    learned = max(1, math.floor(LEARN_FACTOR * accepted)) if accepted >= 2 else None
    if rule.action == "pause":
        # The receiver's window refills during the pause; after it one session at
        # a time, one more per ramp step, and the receiver says again when enough.
        resume_at = max(r.resume_at, now + rule.seconds)
        rate = None
        connections = 1
        slow_until = resume_at
    else:
        resume_at = r.resume_at if r.resume_at > now else 0.0
        rate = rule.messages_per_minute if rule.messages_per_minute is not None else (learned or RAMP_START)
        connections = rule.max_connections if rule.max_connections is not None else max(1, running)
        slow_until = max(r.slow_until, now + rule.seconds)
    if r.state == THROTTLED:
        if r.rate is not None:
            ramped = max(1.0, r.rate * RAMP_FACTOR ** _steps(r, now))
            rate = ramped if rate is None else min(rate, ramped)
        if r.connections is not None:
            connections = min(connections, r.connections + _steps(r, now))
    return replace(r, state=THROTTLED, resume_at=resume_at, slow_until=slow_until,
                   rate=None if rate is None else float(max(1, rate)), connections=max(1, connections),
                   hold_until=0.0 if r.state == GREYLISTING else r.hold_until)


def on_greylisted(r: Receiver, now: float, first_contact: bool) -> Receiver:
    """A recipient was greylisted. On a first contact with a destination not yet
    greylisting (or one that whitelisted us before), new mail is held back while the
    greylisted messages are retried; once it is known not to whitelist, it is not."""
    if r.state == THROTTLED or (not first_contact and r.state != GREYLISTING):
        return r
    if r.state != GREYLISTING:
        known_no_whitelist = r.auto_whitelist is False and r.greylist_delay is not None
        return replace(r, state=GREYLISTING, hold_until=0.0 if known_no_whitelist else now + GREYLIST_HOLD_MAX,
                       auto_whitelist=False if known_no_whitelist else None)
    if first_contact and r.greylist_delay is not None and r.hold_until == 0.0 and r.auto_whitelist is None:
        # mail released after a pass was greylisted again: no auto-whitelist
        return replace(r, auto_whitelist=False)
    return r


def on_greylist_passed(r: Receiver, waited: float) -> Receiver:
    """A greylisted recipient was accepted `waited` seconds after its first attempt:
    the delay is learned (the shortest pass seen) and held mail is released."""
    delay = waited if r.greylist_delay is None else min(r.greylist_delay, waited)
    if r.state != GREYLISTING:
        return replace(r, greylist_delay=delay)
    return replace(r, greylist_delay=delay, hold_until=0.0)


def on_first_contact_sent(r: Receiver) -> Receiver:
    """A first contact was accepted at once: after a pass, the receiver whitelists us."""
    if r.state == GREYLISTING and r.hold_until == 0.0 and r.greylist_delay is not None:
        return replace(r, state=NORMAL, auto_whitelist=True)
    return r


def greylist_margin(delay: float) -> float:
    return 1.0 + 0.1 * delay


def greylist_retry_at(
    first_failure: float, now: float, delay: float | None, policy_next: float | None, interval: float, probe: bool,
    others_waiting: bool = True,
) -> float | None:
    """When a greylisted recipient is tried again. With the delay learned: its first
    attempt + the delay and a margin. Unknown, and other mail waits for the
    destination, the probe takes the next rung of GREYLIST_LADDER and the others
    wait at the last rung (they are retimed when the probe passes); with nothing
    else waiting there is nothing to learn for, and E-Post's time applies. None
    (E-Post's rule bounces) stays None; a retry already past its due time, or
    past the ladder, goes by E-Post's own time."""
    if policy_next is None:
        return None
    if delay is not None:
        due = first_failure + delay + greylist_margin(delay)
        return due if due > now else policy_next
    if not others_waiting:
        return policy_next
    waited = now - first_failure
    rungs = [step * interval for step in GREYLIST_LADDER]
    for step in rungs if probe else rungs[-1:]:
        if step > waited + 0.5:
            return first_failure + step
    return policy_next


def admit(
    r: Receiver,
    limits: Limits,
    default_connections: int,
    now: float,
    running: int,
    window: Sequence[float],
    retry: bool,
    answered: bool = True,
) -> float | None:
    """May a session start now? None: yes; else the time to ask again.
    `window`: start times of the destination's sessions in the last WINDOW seconds,
    oldest first; `retry`: the job is a scheduled retry (greylisted messages are;
    they are never held back by the greylist hold); `answered`: the destination
    has answered an attempt in this run (else SLOW_START)."""
    r = settle(r, now)
    if r.state == THROTTLED and now < r.resume_at:
        return r.resume_at
    if r.state == GREYLISTING and r.hold_until > now and not retry:
        return r.hold_until
    connections = current_connections(r, limits, default_connections, now)
    if running >= (connections if answered else min(connections, SLOW_START)):
        return now + 1.0  # a finishing session wakes the queue sooner
    rate = current_rate(r, limits, now)
    if rate is not None and window:
        recent = [t for t in window if t > now - WINDOW]
        spacing = SPACING_SLACK * WINDOW / rate  # slack: a late timer does not lower the rate; the count caps it
        if len(recent) >= rate:
            return recent[len(recent) - max(1, int(rate))] + WINDOW
        if recent and now < recent[-1] + spacing:
            return recent[-1] + spacing
    return None


def free_slots(r: Receiver, limits: Limits, default_connections: int, now: float, running: int,
               answered: bool = True) -> int:
    """How many sessions may start now, once `admit` said one may: the free
    connections, or one under a rate (the next waits for its spacing)."""
    r = settle(r, now)
    connections = current_connections(r, limits, default_connections, now)
    free = (connections if answered else min(connections, SLOW_START)) - running
    if current_rate(r, limits, now) is not None:
        free = min(free, 1)
    return max(1, free)


# -- Domain.mri -------------------------------------------------------------


def to_fields(r: Receiver, now: float, key: str) -> dict[str, str]:
    """Domain.mri's extra keys (after E-Post's): only what differs from normal."""
    r = settle(r, now)
    fields: dict[str, str] = {}
    if r.state != NORMAL:
        fields["State"] = r.state
    if r.state == THROTTLED:
        fields["Resume-at"] = str(int(math.ceil(max(r.resume_at, now if r.resume_at else 0))))
        fields["Slow-until"] = str(int(math.ceil(r.slow_until)))
        if r.rate is not None:
            fields["Rate-limit"] = f"{r.rate:g}"
        if r.connections is not None:
            fields["Connection-limit"] = str(r.connections)
    if r.state == GREYLISTING and r.hold_until:
        fields["Hold-until"] = str(int(math.ceil(r.hold_until)))
    if r.greylist_delay is not None:
        fields["Greylist-delay"] = f"{r.greylist_delay:.0f}"
    if r.auto_whitelist is not None:
        fields["Auto-whitelist"] = "yes" if r.auto_whitelist else "no"
    if fields and key:
        fields["Destination"] = key
    return fields


def from_fields(fields: dict[str, str]) -> Receiver:
    """Back from Domain.mri (keys compared case-insensitively); anything unreadable
    is left at its default, to be learned again."""
    f = {k.lower(): v.strip() for k, v in fields.items()}

    def number(key: str) -> float | None:
        try:
            value = float(f[key])
        except (KeyError, ValueError):
            return None
        return value if math.isfinite(value) and value >= 0 else None

    state = f.get("state", NORMAL)
    whitelist = f.get("auto-whitelist")
    if state not in (NORMAL, THROTTLED, GREYLISTING) or (state == GREYLISTING and whitelist != "no"):
        # A greylisting episode still learning is started afresh at the next first
        # contact (its probe is not known after a restart); what was learned stays.
        state = NORMAL
    connections = number("connection-limit")
    return Receiver(
        state=state,
        resume_at=number("resume-at") or 0.0 if state == THROTTLED else 0.0,
        slow_until=number("slow-until") or 0.0 if state == THROTTLED else 0.0,
        rate=(number("rate-limit") or None) if state == THROTTLED else None,
        connections=max(1, int(connections)) if connections is not None and state == THROTTLED else None,
        hold_until=0.0,  # not restored: the probe is not known after a restart; relearned at first contact
        greylist_delay=number("greylist-delay"),
        auto_whitelist={"yes": True, "no": False}.get(whitelist or ""),
    )


@dataclass(frozen=True)
class Settings:
    """What receiver-aware delivery is configured with ([delivery])."""

    enabled: bool = True
    rules: tuple[ThrottleRule, ...] = DEFAULT_THROTTLE_RULES
    destinations: tuple[tuple[str, Limits], ...] = field(default_factory=tuple)
