"""Bulk mail against real postgrey and a rate limiter at the issue's sizes (issue 14).

Short form (every run): 60 messages, postgrey delay 3 s, a limiter of 20 per 10 s.
Full form (STRESS=1): the issue's goals: 1,000 messages to 1,000 recipients
behind a 30 s postgrey with E-Post's 120 s interval; 2,000 messages to a
receiver taking 120 a minute, paused by the daemon's shipped throttle rules.
"""

from __future__ import annotations

import threading
from pathlib import Path

from bulk_peers import (
    GreylistReceiver, Postgrey, RateLimiter, Receiver, bounces, bulk_toml, percentile, send_bulk, sustained_rate,
)
from stress_support import FULL, scale

DELAY = scale(3, 30)
RETRY = scale("interval = 5\nfixed_interval = true\n", "interval = 120\n")
INTERVAL = scale(5, 120)


def recipients(count: int, domain: str) -> list[str]:
    return [f"user{i:05d}@{domain}" for i in range(count)]


def greylisted_bulk(daemon, tmp_path: Path, auto_whitelist: int):
    count = scale(60, 1000)
    with Postgrey(tmp_path / "postgrey", delay=DELAY, auto_whitelist=auto_whitelist) as grey, \
            GreylistReceiver(grey) as peer:
        d = daemon(toml=bulk_toml({"grey.test": peer.port}, tmp_path / "gateway.dat", True, retry=RETRY))
        send_bulk(d.relay_port, recipients(count, "grey.test"), connections=8)
        assert peer.wait_for_recipients(count, scale(60, 900)), (
            f"{len(peer.delivered_at())} of {count} delivered; postgrey: {grey.actions()}")
    counts = peer.rcpt_counts()
    first, delivered = peer.first_attempts(), peer.delivered_at()
    return d, sum(counts.values()) / count, first, delivered


def test_bulk_behind_postgrey_with_auto_whitelist(daemon, tmp_path):
    d, per_recipient, first, delivered = greylisted_bulk(daemon, tmp_path, auto_whitelist=1)
    assert per_recipient <= 1.3
    assert bounces(d.spool) == 0
    span = max(delivered.values()) - min(first.values())
    assert span <= 2 * DELAY + scale(INTERVAL, 0), f"last delivery {span:.1f} s after the first attempt"


def test_bulk_behind_postgrey_without_auto_whitelist(daemon, tmp_path):
    d, per_recipient, first, delivered = greylisted_bulk(daemon, tmp_path, auto_whitelist=0)
    assert per_recipient <= 2.1
    assert bounces(d.spool) == 0
    span = max(delivered.values()) - max(first.values())
    assert span <= DELAY + 2 * INTERVAL, f"last delivery {span:.1f} s after the last first attempt"


def test_bulk_to_a_rate_limiter_with_healthy_mail_beside_it(daemon, tmp_path):
    count, limit, window = scale(60, 2000), scale(20, 120), scale(10, 60)
    # The short form pauses by a rule of its own for one window; the full one by the shipped rules.
    rule = "" if FULL else (f'[[delivery.throttle_rules]]\ncode = 421\nenhanced = "4.7.0"\n'
                            f'text = "Too many messages"\naction = "pause"\nseconds = {window}\n')
    with RateLimiter(limit=limit, window=window) as peer, Receiver() as healthy:
        d = daemon(toml=bulk_toml({"rate.test": peer.port, "healthy.test": healthy.port}, tmp_path / "gateway.dat",
                                  True, retry=RETRY, tail=rule))
        accepted: dict[str, float] = {}
        side = threading.Thread(target=lambda: accepted.update(
            send_bulk(d.relay_port, recipients(scale(20, 100), "healthy.test"), subject="healthy", connections=2,
                      rate=2)))
        side.start()
        send_bulk(d.relay_port, recipients(count, "rate.test"), connections=8)
        side.join()
        assert peer.wait_for_recipients(count, scale(90, 1800)), f"{len(peer.delivered_at())} of {count}"
        assert healthy.wait_for_recipients(len(accepted), 30)
    assert bounces(d.spool) == 0
    assert peer.rcpt_attempts() / count <= scale(1.5, 1.2), peer.refusals()
    arrivals = healthy.arrivals()
    p99 = percentile([arrivals[s] - t for s, t in accepted.items()], 99)
    assert p99 < scale(2.0, 0.5), f"healthy p99 {p99:.3f} s"
    if FULL:
        sustained = sustained_rate(list(peer.delivered_at().values()))
        assert sustained >= 0.9 * limit, f"{sustained:.1f}/min of {limit}/min"
