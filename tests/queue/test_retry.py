"""E-Post's retry rules: exact schedules and properties of the pure policy."""

from __future__ import annotations

from hypothesis import given, strategies as st

from epost.config import RetryConfig
from epost.queue.retry import Episode, gap, next_attempt, start_episode

DEFAULT = RetryConfig()


def run(kind: str, policy: RetryConfig, limit: int = 10_000) -> list[float]:
    """Attempt times (s after the first attempt) when every attempt fails with `kind`."""
    times = [0.0]
    episode = start_episode(kind, 0.0)
    while (when := next_attempt(kind, episode, policy)) is not None and len(times) < limit:
        times.append(when)
        episode = episode.after(kind, when)
    return times


def test_growing_gaps_give_e_posts_2_6_12_20_minutes():
    assert [t / 60 for t in run("5xx", DEFAULT)[1:5]] == [2, 6, 12, 20]


def test_fixed_interval_retries_every_two_minutes():
    policy = RetryConfig(fixed_interval=True)
    assert [t / 60 for t in run("5xx", policy)[1:5]] == [2, 4, 6, 8]


def test_5xx_gives_exactly_count_plus_one_attempts():
    assert len(run("5xx", DEFAULT)) == 10
    assert len(run("5xx", RetryConfig(count_5xx=0))) == 1  # bounce at once
    assert len(run("5xx", RetryConfig(count_5xx=3))) == 4


def test_4xx_is_retried_for_eight_hours_then_bounced():
    times = run("4xx", DEFAULT)
    assert times[-2] < 8 * 3600 <= times[-1]  # the first failure past 8 h is not retried
    assert times[-1] - times[-2] <= DEFAULT.max_interval


def test_no_answer_is_retried_for_a_day():
    times = run("noanswer", DEFAULT)
    assert times[-2] < 24 * 3600 <= times[-1]


def test_permanent_dns_failure_bounces_at_once():
    assert run("permanent", DEFAULT) == [0.0]


def test_gaps_are_capped_at_max_interval():
    assert gap(100, DEFAULT) == 3600
    assert gap(3, DEFAULT) == 360


def test_mixed_failures_count_only_5xx_towards_the_5xx_limit():
    policy = RetryConfig(count_5xx=1)
    episode = start_episode("4xx", 0.0).after("4xx", 120.0).after("5xx", 360.0)
    assert next_attempt("5xx", episode, policy) is not None  # first 5xx: one retry left
    assert next_attempt("5xx", episode.after("5xx", 720.0), policy) is None


policies = st.builds(
    RetryConfig,
    interval=st.integers(10, 3600),
    fixed_interval=st.booleans(),
    max_interval=st.integers(1, 7200),
    count_5xx=st.integers(0, 20),
    period_4xx=st.integers(1, 86400),
    period_noanswer=st.integers(1, 86400),
)


@given(policies, st.sampled_from(["5xx", "4xx", "noanswer"]))
def test_attempts_are_strictly_later_and_gaps_follow_the_rule(policy, kind):
    times = run(kind, policy, limit=500)
    for n, (before, after) in enumerate(zip(times, times[1:]), start=1):
        assert after > before
        expected = policy.interval if policy.fixed_interval else min(n * policy.interval, policy.max_interval)
        assert after - before == expected


@given(policies)
def test_5xx_attempts_are_count_plus_one_whatever_the_policy(policy):
    assert len(run("5xx", policy)) == policy.count_5xx + 1


@given(policies, st.sampled_from(["4xx", "noanswer"]))
def test_periods_are_respected(policy, kind):
    period = policy.period_4xx if kind == "4xx" else policy.period_noanswer
    times = run(kind, policy, limit=100_000)
    assert all(t < period for t in times[:-1])  # every retried failure happened inside the period
    assert times[-1] >= period  # and the one that was not retried happened after it


@given(st.floats(0, 1e9), st.sampled_from(["5xx", "4xx", "noanswer"]))
def test_episode_counts_failures(now, kind):
    episode = start_episode(kind, now)
    assert (episode.failures, episode.first_failure, episode.last_failure) == (1, now, now)
    assert isinstance(episode, Episode)
