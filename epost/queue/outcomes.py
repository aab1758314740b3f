"""What one delivery attempt does to a queued message: pure, no I/O (SPEC §6).

The unit of delivery and retry is the (message, destination domain) pair.
Its retry episode (first failure, failed attempts) lives in the envelope's
``retries[destination]``; each recipient keeps its own count of 5xx replies,
because one transaction can give one recipient 550 and another 451.
`apply_attempt` turns the courier's per-recipient outcomes into the next
envelope, one log record per recipient and the scheduler's verdict.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from epost.config import RetryConfig
from epost.delivery.smtp_client import Outcome
from epost.delivery.stuffing import failure_kind
from epost.store.envelope import Envelope, relay_groups
from epost.queue.retry import Episode, next_attempt

_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})\b")


def has_local_pending(envelope: Envelope) -> bool:
    return any((envelope.recipients[i].route or {}).get("kind") == "local" for i in envelope.pending())


def unreported_failures(envelope: Envelope) -> list[int]:
    """Failed recipients whose bounce is not queued yet."""
    return [i for i, r in enumerate(envelope.recipients) if r.state == "failed" and not r.dsn_sent]


def finished(envelope: Envelope) -> bool:
    """Nothing left to deliver or to bounce: the message can leave the queue."""
    return not envelope.pending() and not unreported_failures(envelope)


def needs_manager(envelope: Envelope) -> bool:
    """Work for the delivery manager: recipients that leave by SMTP, or failures to bounce."""
    return bool(unreported_failures(envelope)) or any(
        (envelope.recipients[i].route or {}).get("kind") != "local" for i in envelope.pending()
    )


def failure_class(outcome: Outcome) -> str:
    """The retry policy's kind: a DNS answer that the domain cannot get mail is permanent."""
    if outcome.stage == "dns" and outcome.code is not None and outcome.code >= 500:
        return "permanent"
    return failure_kind(outcome.code)


def reply_text(outcome: Outcome) -> str:
    """`550 5.1.1 User unknown`, or the local explanation when nothing answered."""
    return f"{outcome.code} {outcome.text}" if outcome.code is not None else outcome.text


def status_code(outcome: Outcome) -> str:
    """The enhanced status code: the remote's when its reply has one whose class
    matches the reply's, else the generic one for the class (4.4.1: no answer)."""
    if outcome.code is None:
        match = _ENHANCED.match(outcome.text)
        return match.group(0) if match and match.group(1) == "4" else "4.4.1"
    match = _ENHANCED.match(outcome.text)
    if match and match.group(1) == str(outcome.code // 100):
        return match.group(0)
    return f"{outcome.code // 100}.0.0"


@dataclass(frozen=True)
class RecipientResult:
    """One senderlog line's worth: what happened to one recipient in this attempt."""

    index: int
    address: str
    status: str  # sent, deferred or bounced
    outcome: Outcome
    attempt: int


@dataclass(frozen=True)
class Applied:
    envelope: Envelope
    results: tuple[RecipientResult, ...]
    verdict: Any  # the Scheduler outcome: "done", "done_noanswer", ("retry", t) or ("retry_noanswer", t)

    @property
    def bounced(self) -> list[RecipientResult]:
        return [r for r in self.results if r.status == "bounced"]


def _answered(envelope: Envelope, destination: str, outcomes: dict[str, Outcome]):
    """(index, recipient, outcome) of the destination's pending relay recipients that got an outcome."""
    for index in relay_groups(envelope).get(destination, []):
        recipient = envelope.recipients[index]
        outcome = outcomes.get(recipient.address)
        if outcome is not None:
            yield index, recipient, outcome


def apply_attempt(
    envelope: Envelope,
    destination: str,
    outcomes: dict[str, Outcome],
    host: str | None,
    now: float,
    policy: RetryConfig,
) -> Applied:
    """The envelope after one attempt for `destination`; recipients without an outcome are left alone."""
    state = dict(envelope.retries.get(destination) or {})
    first_failure = float(state.get("first_failure", now))
    failures = int(state.get("failures", 0))
    any_failure = any(o.code is None or o.code >= 400 for o in outcomes.values())
    if any_failure:
        failures += 1

    results: list[RecipientResult] = []
    retry_times: list[float] = []
    all_silent = True
    for index, recipient, outcome in _answered(envelope, destination, outcomes):
        attempt = recipient.attempts + 1
        changes: dict[str, Any] = {"attempts": attempt, "last_reply": reply_text(outcome)}
        if outcome.code is not None and outcome.code < 400:
            status = "sent"
            changes["state"] = "delivered"
            all_silent = False
        else:
            kind = failure_class(outcome)
            all_silent = all_silent and outcome.code is None
            failures_5xx = recipient.failures_5xx + (kind == "5xx")
            changes["failures_5xx"] = failures_5xx
            episode = Episode(first_failure, failures, failures_5xx, now)
            when = next_attempt(kind, episode, policy)
            if when is None:
                status = "bounced"
                changes["state"] = "failed"
            else:
                status = "deferred"
                retry_times.append(when)
        envelope = envelope.with_recipient(index, **changes)
        results.append(RecipientResult(index, recipient.address, status, outcome, attempt))

    retries = dict(envelope.retries)
    if retry_times:
        when = min(retry_times)
        retries[destination] = {
            "first_failure": first_failure,
            "failures": failures,
            "last_failure": now,
            "next_attempt": when,
            "last_host": host or "",
        }
        verdict: Any = ("retry_noanswer" if all_silent else "retry", when)
    else:
        retries.pop(destination, None)
        if destination in relay_groups(envelope):
            verdict = ("retry", now)
        else:  # nothing answered: the destination stays dead for the others
            verdict = "done_noanswer" if all_silent and outcomes else "done"
    return Applied(dataclasses.replace(envelope, retries=retries), tuple(results), verdict)


def next_due(envelope: Envelope, destination: str, now: float) -> float:
    """When a recovered (message, destination) pair is due: its saved time, or now."""
    state = envelope.retries.get(destination) or {}
    return float(state.get("next_attempt", now))


def apply_throttle(
    applied: Applied, destination: str, throttled: dict[str, Outcome], now: float, episode: dict | None = None
) -> Applied:
    """Add the recipients a throttle reply met (issue 14): each gets its attempt and
    reply recorded and a ``deferred`` log record, but the retry episode is left as it
    was (`episode`, the one before the attempt: a throttle is not a failed attempt
    against period_4xx, and never bounces), and the job is parked until the
    destination resumes: ``("park", now)``."""
    if not throttled:
        return applied
    envelope = applied.envelope
    if episode and destination not in envelope.retries:
        envelope = dataclasses.replace(envelope, retries={**envelope.retries, destination: episode})
    results = list(applied.results)
    for index, recipient, outcome in _answered(envelope, destination, throttled):
        attempt = recipient.attempts + 1
        envelope = envelope.with_recipient(index, attempts=attempt, last_reply=reply_text(outcome))
        results.append(RecipientResult(index, recipient.address, "deferred", outcome, attempt))
    return Applied(envelope, tuple(results), ("park", now))


def greylisted_only(applied: Applied, greylisted: frozenset[str]) -> bool:
    """Every recipient the attempt deferred was greylisted, and the job is to be retried."""
    deferred = [r for r in applied.results if r.status == "deferred"]
    verdict = applied.verdict
    return (bool(deferred) and isinstance(verdict, tuple) and verdict[0] == "retry"
            and all(r.address in greylisted for r in deferred))


def apply_greylist(applied: Applied, destination: str, when: float | None) -> Applied:
    """Greylisted recipients are retried at `when` (receivers.greylist_retry_at)
    instead of E-Post's next interval (call when `greylisted_only`); what bounces
    and the episode's counts are E-Post's."""
    if when is None:
        return applied
    retries = dict(applied.envelope.retries)
    if destination not in retries:
        return applied
    retries[destination] = {**retries[destination], "next_attempt": when}
    return Applied(dataclasses.replace(applied.envelope, retries=retries), applied.results, ("retry", when))
