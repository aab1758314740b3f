"""E-Post's retry rules as a pure function (SPEC §6).

A delivery episode of one (message, destination) pair is the run of failed
attempts since its first failure. After each failure the policy says when to
try again, or None to give up (bounce):

- "5xx"       a permanent reply: retried `count_5xx` times, then bounced
              (0 = bounce at once); E-Post's default 9.
- "4xx"       a temporary reply: retried until `period_4xx` after the first
              failure (8 h).
- "noanswer"  refused, timed out, dropped, DNS temporary failure: retried
              until `period_noanswer` after the first failure (24 h).
- "permanent" NXDOMAIN or null MX: bounced at once.

The gap before retry n is n x `interval` (120 s gives retries 2, 6, 12, 20 …
minutes after the first failure, as E-Post's "retry interval" check does),
capped at `max_interval`; with `fixed_interval` every gap is `interval`.
A period has run out when the failure that would be retried happened at or
after first failure + period.
"""

from __future__ import annotations

from dataclasses import dataclass

from epost.config import RetryConfig

KINDS = ("5xx", "4xx", "noanswer", "permanent")


@dataclass(frozen=True)
class Episode:
    """What the policy needs to remember about one destination's failures."""

    first_failure: float
    failures: int = 0  # failed attempts so far
    failures_5xx: int = 0
    last_failure: float = 0.0

    def after(self, kind: str, now: float) -> Episode:
        """The episode once a failure of `kind` at `now` is added."""
        if kind not in KINDS:
            raise ValueError(f"unknown failure kind {kind!r}")
        return Episode(
            first_failure=self.first_failure,
            failures=self.failures + 1,
            failures_5xx=self.failures_5xx + (kind == "5xx"),
            last_failure=now,
        )


def start_episode(kind: str, now: float) -> Episode:
    return Episode(first_failure=now).after(kind, now)


def gap(retry_number: int, policy: RetryConfig) -> float:
    """Seconds between a failure and retry number `retry_number` (1-based)."""
    if policy.fixed_interval:
        return float(policy.interval)
    return float(min(retry_number * policy.interval, policy.max_interval))


def next_attempt(kind: str, episode: Episode, policy: RetryConfig) -> float | None:
    """When to try again after the episode's latest failure (of `kind`), or None to bounce."""
    if kind == "permanent":
        return None
    if kind == "5xx" and episode.failures_5xx > policy.count_5xx:
        return None
    elapsed = episode.last_failure - episode.first_failure
    if kind == "4xx" and elapsed >= policy.period_4xx:
        return None
    if kind == "noanswer" and elapsed >= policy.period_noanswer:
        return None
    return episode.last_failure + gap(episode.failures, policy)
