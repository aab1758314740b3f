"""End to end: bulk mail against receivers that greylist or throttle (issue 14, SPEC §6).

The real daemon relays through gateway.dat to the peers of `bulk_peers.py`:
a greylisting receiver that asks a private postgrey (a short delay) per
RCPT, and a rate-limiting receiver that answers `421 4.7.0 Too many
messages` past N messages per window. The figures are what the peers
counted: RCPT attempts per recipient, deliveries, refusals.

`receiver_aware = true` is what these tests are about; the baseline test
runs E-Post's rule alone (`receiver_aware = false`, or a daemon without the
switch) to show that the storm these tests bound is real.
"""

from __future__ import annotations

import shutil
import smtplib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bulk_peers import (
    GreylistReceiver, Postgrey, RateLimiter, Receiver, bounces, bulk_toml, mri_fields, send_bulk, senderlog_records,
)
from e2e_support import wait_for

EPOST = shutil.which("epost", path=str(Path(sys.executable).parent))
DELAY = 3  # postgrey's delay, seconds
# E-Post's rule with a gap a little over the delay: a retry after one gap passes the greylist.
RETRY = "interval = 5\nfixed_interval = true\n"
THROTTLE_TEXT = "Too many messages"


def recipients(count: int, domain: str) -> list[str]:
    return [f"user{i:04d}@{domain}" for i in range(count)]


def greylisting(tmp_path: Path, auto_whitelist: int) -> tuple[Postgrey, GreylistReceiver]:
    grey = Postgrey(tmp_path / "postgrey", delay=DELAY, auto_whitelist=auto_whitelist).start()
    return grey, GreylistReceiver(grey).start()


def bulk_through_postgrey(daemon, tmp_path: Path, aware: bool, auto_whitelist: int, count: int = 30):
    """`count` messages, one recipient each, to grey.test; the receiver once every one is delivered."""
    grey, peer = greylisting(tmp_path, auto_whitelist)
    try:
        d = daemon(toml=bulk_toml({"grey.test": peer.port}, tmp_path / "gateway.dat", aware, retry=RETRY))
        send_bulk(d.relay_port, recipients(count, "grey.test"))
        assert peer.wait_for_recipients(count, 45), (
            f"{len(peer.delivered_at())} of {count} delivered; postgrey: {grey.actions()}")
        return d, peer
    finally:
        peer.stop()
        grey.stop()


def attempts_per_recipient(peer: Receiver) -> float:
    counts = peer.rcpt_counts()
    return sum(counts.values()) / len(counts)


def test_baseline_e_post_rule_greylists_every_recipient_of_a_bulk_at_least_twice(daemon, tmp_path):
    d, peer = bulk_through_postgrey(daemon, tmp_path, aware=False, auto_whitelist=1)
    assert min(peer.rcpt_counts().values()) >= 2, peer.rcpt_counts()
    assert attempts_per_recipient(peer) >= 2
    assert bounces(d.spool) == 0


def test_bulk_to_postgrey_with_auto_whitelist_costs_at_most_1_3_attempts_per_recipient(daemon, tmp_path):
    d, peer = bulk_through_postgrey(daemon, tmp_path, aware=True, auto_whitelist=1)
    assert attempts_per_recipient(peer) <= 1.3, peer.rcpt_counts()
    assert bounces(d.spool) == 0
    assert not [r for r in senderlog_records(d.spool) if r["status"] == "bounced"]


def test_bulk_to_postgrey_without_auto_whitelist_costs_at_most_2_1_attempts_per_recipient(daemon, tmp_path):
    d, peer = bulk_through_postgrey(daemon, tmp_path, aware=True, auto_whitelist=0)
    assert attempts_per_recipient(peer) <= 2.1, peer.rcpt_counts()
    assert bounces(d.spool) == 0


def throttle_rule(seconds: int) -> str:
    return (f'[[delivery.throttle_rules]]\ncode = 421\nenhanced = "4.7.0"\ntext = "{THROTTLE_TEXT}"\n'
            f'action = "pause"\nseconds = {seconds}\n')


def test_rate_limited_bulk_is_paused_not_bounced_and_healthy_mail_goes_on_meanwhile(daemon, tmp_path):
    count = 30
    with RateLimiter(limit=10, window=8) as peer, Receiver() as healthy:
        d = daemon(toml=bulk_toml({"rate.test": peer.port, "healthy.test": healthy.port}, tmp_path / "gateway.dat",
                                  True, retry=RETRY, tail=throttle_rule(8)))
        send_bulk(d.relay_port, recipients(count, "rate.test"))
        mri = d.spool / "domains" / "rate.test" / "Domain.mri"
        wait_for(lambda: mri_fields(mri).get("State") == "throttled", 20,
                 message=f"State: throttled in {mri} ({mri_fields(mri)})")
        assert "Resume-at" in mri_fields(mri), mri_fields(mri)
        # the storm's pause: mail for a healthy destination is not held up by it
        accepted = send_bulk(d.relay_port, recipients(10, "healthy.test"), subject="healthy", connections=2, rate=5)
        assert healthy.wait_for_recipients(10, 15)
        arrivals = healthy.arrivals()
        latencies = sorted(arrivals[s] - t for s, t in accepted.items())
        assert latencies[-1] < 2.0, latencies
        assert peer.wait_for_recipients(count, 50), f"{len(peer.delivered_at())} of {count}; {peer.refusals()}"
    assert bounces(d.spool) == 0
    assert peer.rcpt_attempts() / count <= 1.5, (peer.rcpt_attempts(), peer.refusals())


def test_epost_flush_forces_an_attempt_at_a_throttled_destination(daemon, tmp_path):
    with RateLimiter(limit=3, window=600) as peer:
        d = daemon(toml=bulk_toml({"rate.test": peer.port}, tmp_path / "gateway.dat", True, retry=RETRY,
                                  tail=throttle_rule(600)))
        send_bulk(d.relay_port, recipients(6, "rate.test"), connections=1)
        mri = d.spool / "domains" / "rate.test" / "Domain.mri"
        wait_for(lambda: mri_fields(mri).get("State") == "throttled", 20, message="State: throttled")
        time.sleep(1)  # attempts under way when the pause began have ended
        paused = peer.rcpt_attempts()
        time.sleep(7)  # longer than the retry interval: the pause holds the destination past it
        assert peer.rcpt_attempts() == paused, "an attempt during the pause"
        flushed = subprocess.run([EPOST, "flush", "--config", str(d.config)], capture_output=True, text=True,
                                 timeout=60)
        assert flushed.returncode == 0, flushed.stderr
        wait_for(lambda: peer.rcpt_attempts() > paused, 10, message="an attempt after epost flush")
    assert bounces(d.spool) == 0


@pytest.mark.parametrize("reply", ["gmail", "microsoft", "yahoo"])
def test_shipped_throttle_rules_know_the_big_receivers_replies(daemon, tmp_path, reply):
    """No rule in the config: Gmail's 421 4.7.28, Microsoft's 451 4.7.650 and Yahoo's
    TSS04 texts throttle the destination by the shipped rules, and nothing bounces."""
    with RateLimiter(limit=3, window=600, reply=reply) as peer:
        d = daemon(toml=bulk_toml({"rate.test": peer.port}, tmp_path / "gateway.dat", True, retry=RETRY))
        send_bulk(d.relay_port, recipients(6, "rate.test"), connections=1)
        mri = d.spool / "domains" / "rate.test" / "Domain.mri"
        wait_for(lambda: mri_fields(mri).get("State") == "throttled", 20,
                 message=f"State: throttled in {mri} ({mri_fields(mri)})")
        refused = sum(peer.refusals().values())
        time.sleep(6)  # a retry gap and more: a throttled destination is not retried at E-Post's interval
        assert sum(peer.refusals().values()) <= refused + 1, peer.refusals()
    assert len(peer.deliveries) == 3
    assert bounces(d.spool) == 0


def test_destination_max_connections_caps_the_sessions_a_bulk_opens(daemon, tmp_path):
    with Receiver() as peer:
        tail = '[delivery.destinations."bulk.test"]\nmax_connections = 2\n'
        d = daemon(toml=bulk_toml({"bulk.test": peer.port}, tmp_path / "gateway.dat", True, retry=RETRY, tail=tail))
        send_bulk(d.relay_port, recipients(40, "bulk.test"), connections=8)
        assert peer.wait_for_recipients(40, 30)
    assert peer.most_at_once <= 2, peer.most_at_once
    assert bounces(d.spool) == 0


@pytest.mark.parametrize("aware", [False, True], ids=["baseline", "receiver-aware"])
def test_bulk_to_an_accepting_receiver_is_delivered_once_per_recipient(daemon, tmp_path, aware):
    """The control: no greylisting, no throttling, no extra attempts either way."""
    with Receiver() as peer:
        d = daemon(toml=bulk_toml({"bulk.test": peer.port}, tmp_path / "gateway.dat", aware, retry=RETRY))
        send_bulk(d.relay_port, recipients(30, "bulk.test"))
        assert peer.wait_for_recipients(30, 30), f"{len(peer.delivered_at())} of 30 delivered"
    assert set(peer.rcpt_counts().values()) == {1}


# --- the peers themselves, without the daemon ---------------------------------------


def rcpt_once(port: int, recipient: str, sender: str = "peer@sender.example.org") -> tuple[int, str]:
    """One SMTP transaction to one recipient: the RCPT reply (the message follows a 250)."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=10) as client:
        client.ehlo()
        client.mail(sender)
        code, text = client.rcpt(recipient)
        if code == 250:
            client.data(b"Subject: peer check\r\n\r\nhi\r\n")
        return code, text.decode()


def test_greylisting_receiver_defers_a_new_triplet_as_postfix_would_and_takes_it_after_the_delay(tmp_path):
    grey, peer = greylisting(tmp_path, auto_whitelist=1)
    try:
        code, text = rcpt_once(peer.port, "a@grey.test")
        assert (code, text.split(":")[0]) == (450, "4.2.0 <a@grey.test>")
        assert "Recipient address rejected: Greylisted" in text
        assert rcpt_once(peer.port, "a@grey.test")[0] == 450  # too early
        time.sleep(DELAY + 0.5)
        assert rcpt_once(peer.port, "a@grey.test")[0] == 250
        assert rcpt_once(peer.port, "b@grey.test")[0] == 250  # the client is whitelisted now (N = 1)
        assert peer.rcpt_counts() == {"a@grey.test": 3, "b@grey.test": 1}
        assert set(peer.delivered_at()) == {"a@grey.test", "b@grey.test"}
        assert grey.actions()["pass/client AWL"] == 1
    finally:
        peer.stop()
        grey.stop()


def test_greylisting_receiver_without_auto_whitelist_greylists_every_new_recipient(tmp_path):
    grey, peer = greylisting(tmp_path, auto_whitelist=0)
    try:
        assert rcpt_once(peer.port, "a@grey.test")[0] == 450
        time.sleep(DELAY + 0.5)
        assert rcpt_once(peer.port, "a@grey.test")[0] == 250
        assert rcpt_once(peer.port, "b@grey.test")[0] == 450
    finally:
        peer.stop()
        grey.stop()


def test_rate_limiter_answers_421_past_its_limit_per_window_and_closes(tmp_path):
    with RateLimiter(limit=2, window=2) as peer:
        assert rcpt_once(peer.port, "a@rate.test")[0] == 250
        assert rcpt_once(peer.port, "b@rate.test")[0] == 250
        assert rcpt_once(peer.port, "c@rate.test") == (421, "4.7.0 Too many messages, slow down")
        time.sleep(2.1)
        assert rcpt_once(peer.port, "c@rate.test")[0] == 250
    assert peer.refusals() == {"421 4.7.0": 1}
    assert peer.rcpt_counts()["c@rate.test"] == 2
    assert len(peer.deliveries) == 3
