"""Verdicts, their cache and the one-probe-per-address rule, over task.Clock."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from twisted.internet import defer, task
from twisted.logger import capturedLogs

from epost.config import HostPort
from epost.delivery.courier import Attempt
from epost.delivery.smtp_client import Outcome
from epost.delivery.verify import (
    ACCEPTED,
    REFUSED,
    TEMPORARY,
    Verdict,
    VerdictCache,
    Verifier,
    read_cached,
    verdict_for,
)
from epost.routing.resolver import Route

ROUTE = Route("relay", "gateway.dat:1", hosts=(HostPort("10.0.0.1", 25),))
OTHER = Route("relay", "gateway.dat:2", hosts=(HostPort("10.0.0.2", 25),))
HOST = "10.0.0.1[10.0.0.1]:25"


class FakeProbes:
    """Records each probe session; the test answers it."""

    def __init__(self) -> None:
        self.sessions: list[tuple[Route, list[str], defer.Deferred]] = []

    def __call__(self, route, addresses):
        d = defer.Deferred()
        self.sessions.append((route, list(addresses), d))
        return d

    def answer(self, index: int, codes: dict[str, int | None]) -> None:
        outcomes = {a: Outcome(c, f"{c} text", "rcpt" if c else "connect") for a, c in codes.items()}
        self.sessions[index][2].callback(Attempt(outcomes, HOST, False))


def make(clock=None, path=None, **kwargs):
    clock = clock or task.Clock()
    clock.advance(1_800_000_000)
    probes = FakeProbes()
    verifier = Verifier(clock, VerdictCache(path, clock.seconds), probes, **kwargs)
    return clock, probes, verifier


def results(d) -> list:
    out: list = []
    d.addBoth(out.append)
    return out


@pytest.mark.parametrize(
    "outcome,status",
    [
        (Outcome(250, "2.1.5 ok", "rcpt"), ACCEPTED),
        (Outcome(550, "5.1.1 unknown", "rcpt"), REFUSED),
        (Outcome(553, "5.1.3 bad", "rcpt"), REFUSED),
        (Outcome(450, "4.2.0 greylisted", "rcpt"), TEMPORARY),
        (Outcome(None, "timed out", "rcpt"), TEMPORARY),
        (Outcome(None, "connection lost", "greeting"), TEMPORARY),
        (Outcome(550, "5.7.1 no bounces", "mail"), TEMPORARY),  # refuses the probe, not the address
        (Outcome(554, "5.3.2 go away", "greeting"), TEMPORARY),
        (Outcome(550, "5.1.2 domain not found", "dns"), REFUSED),
    ],
)
def test_verdict_mapping(outcome: Outcome, status: str) -> None:
    assert verdict_for(outcome, HOST).status == status


def test_verdict_text_is_one_printable_line_of_bounded_length() -> None:
    verdict = verdict_for(Outcome(550, "5.1.1 no\nsuch\x1b[31m user" + "x" * 1000, "rcpt"), HOST)
    assert "\n" not in verdict.text and "\x1b" not in verdict.text and len(verdict.text) <= 300


def test_accepted_verdict_is_cached_for_one_day() -> None:
    clock, probes, verifier = make()
    got = results(verifier.verdict("a@op.test", ROUTE))
    probes.answer(0, {"a@op.test": 250})
    assert got[0].status == ACCEPTED
    clock.advance(24 * 3600 - 1)
    assert verifier.verdict("a@OP.test", ROUTE).status == ACCEPTED  # at once, the domain in any case
    clock.advance(1)
    assert isinstance(verifier.verdict("a@op.test", ROUTE), defer.Deferred)
    assert len(probes.sessions) == 2


def test_refused_verdict_is_cached_for_one_hour() -> None:
    clock, probes, verifier = make()
    verifier.verdict("a@op.test", ROUTE)
    probes.answer(0, {"a@op.test": 550})
    clock.advance(3599)
    assert verifier.verdict("a@op.test", ROUTE).status == REFUSED
    clock.advance(1)
    assert isinstance(verifier.verdict("a@op.test", ROUTE), defer.Deferred)


def test_temporary_verdict_is_not_cached() -> None:
    clock, probes, verifier = make()
    got = results(verifier.verdict("a@op.test", ROUTE))
    probes.answer(0, {"a@op.test": 451})
    assert got[0].status == TEMPORARY
    assert isinstance(verifier.verdict("a@op.test", ROUTE), defer.Deferred)
    assert len(probes.sessions) == 2


def test_one_probe_per_address_in_flight_and_every_session_gets_its_verdict() -> None:
    clock, probes, verifier = make()
    waiting = [results(verifier.verdict("a@op.test", ROUTE)) for _ in range(5)]
    assert len(probes.sessions) == 1
    probes.answer(0, {"a@op.test": 550})
    assert [w[0].status for w in waiting] == [REFUSED] * 5


def test_the_probe_asks_for_the_address_as_the_client_gave_it() -> None:
    clock, probes, verifier = make()
    got = results(verifier.verdict("Bob.Smith@op.test", ROUTE))
    assert probes.sessions[0][1] == ["Bob.Smith@op.test"]
    probes.answer(0, {"Bob.Smith@op.test": 250})
    assert got[0].status == ACCEPTED


def test_verdicts_are_kept_per_local_part_as_given_and_per_domain_in_any_case() -> None:
    """RFC 5321 §2.4: the next hop decides whether `Bob` is `bob`; a domain is the same in any case."""
    clock, probes, verifier = make()
    first = results(verifier.verdict("Bob@op.test", ROUTE))
    same = results(verifier.verdict("Bob@OP.Test", ROUTE))
    other = results(verifier.verdict("bob@op.test", ROUTE))
    assert [s[1] for s in probes.sessions] == [["Bob@op.test"], ["bob@op.test"]]
    probes.answer(0, {"Bob@op.test": 550})
    probes.answer(1, {"bob@op.test": 250})
    assert [first[0].status, same[0].status, other[0].status] == [REFUSED, REFUSED, ACCEPTED]
    assert verifier.verdict("Bob@Op.test", ROUTE).status == REFUSED
    assert verifier.verdict("bob@OP.TEST", ROUTE).status == ACCEPTED


def test_no_verdict_within_the_budget_is_temporary_and_the_late_answer_is_cached() -> None:
    clock, probes, verifier = make(budget=8.0)
    got = results(verifier.verdict("a@op.test", ROUTE))
    clock.advance(7.9)
    assert got == []
    clock.advance(0.1)
    assert got[0].status == TEMPORARY
    probes.answer(0, {"a@op.test": 250})
    assert verifier.verdict("a@op.test", ROUTE).status == ACCEPTED


def test_probe_sessions_per_next_hop_never_exceed_the_limit_and_waiting_addresses_share_one() -> None:
    clock, probes, verifier = make(max_per_destination=2, max_batch=20)
    for n in range(30):
        verifier.verdict(f"u{n}@op.test", ROUTE)
    verifier.verdict("x@other.test", OTHER)  # another next hop is not held up
    assert [len(s[1]) for s in probes.sessions] == [1, 1, 1]
    probes.answer(0, {"u0@op.test": 550})
    assert [len(s[1]) for s in probes.sessions] == [1, 1, 1, 20]  # the next 20 waiting addresses together
    probes.answer(1, {"u1@op.test": 550})
    assert len(probes.sessions[4][1]) == 8
    assert verifier.probed == 31  # each distinct address asked once


def test_a_failed_probe_is_temporary_for_its_addresses() -> None:
    clock, probes, verifier = make()
    got = results(verifier.verdict("a@op.test", ROUTE))
    probes.sessions[0][2].errback(RuntimeError("boom"))
    assert got[0].status == TEMPORARY


def test_cache_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "verify.cache"
    clock, probes, verifier = make(path=path)
    verifier.verdict("a@op.test", ROUTE)
    verifier.verdict("b@op.test", ROUTE)
    verifier.verdict("c@op.test", ROUTE)
    probes.answer(0, {"a@op.test": 250})
    probes.answer(1, {"b@op.test": 550})
    probes.answer(2, {"c@op.test": 451})
    verifier.stop()
    again = VerdictCache(path, clock.seconds)
    again.load()
    assert again.get("a@op.test").status == ACCEPTED
    assert again.get("b@op.test").status == REFUSED
    assert again.get("c@op.test") is None
    assert read_cached(tmp_path, "a@op.test", clock.seconds()).status == ACCEPTED


def test_expired_entries_are_not_loaded(tmp_path: Path) -> None:
    path = tmp_path / "verify.cache"
    clock = task.Clock()
    cache = VerdictCache(path, clock.seconds)
    cache.put("a@op.test", Verdict(REFUSED, "550 no", HOST))
    cache.save()
    clock.advance(3600)
    again = VerdictCache(path, clock.seconds)
    again.load()
    assert len(again) == 0


@pytest.mark.parametrize("content", [b"{not json", b'{"version": 1, "entries": {"a@b": ["accepted"]}}', b"[]", b"\xff\xfe"])
def test_damaged_cache_file_is_set_aside_with_a_log_line_and_verification_goes_on(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "verify.cache"
    path.write_bytes(content)
    clock, probes, verifier = make(path=path)
    with capturedLogs() as events:
        verifier.start()
    verifier.stop()
    assert (tmp_path / "verify.cache.damaged").read_bytes() == content
    assert any("damaged verification cache" in e["log_format"] for e in events)
    assert len(verifier.cache) == 0
    assert isinstance(verifier.verdict("a@op.test", ROUTE), defer.Deferred)


def test_cache_is_saved_periodically_when_changed(tmp_path: Path) -> None:
    path = tmp_path / "verify.cache"
    clock, probes, verifier = make(path=path)
    verifier.start()
    verifier.verdict("a@op.test", ROUTE)
    probes.answer(0, {"a@op.test": 250})
    assert not path.exists()
    clock.advance(5)
    assert json.loads(path.read_bytes())["entries"]["a@op.test"][0] == ACCEPTED
    verifier.stop()


def test_cache_size_is_bounded_oldest_first() -> None:
    clock = task.Clock()
    cache = VerdictCache(None, clock.seconds, max_entries=3)
    for n in range(5):
        cache.put(f"u{n}@op.test", Verdict(REFUSED, "550", HOST))
    assert len(cache) == 3 and cache.get("u0@op.test") is None and cache.get("u4@op.test") is not None


def test_a_probe_holds_its_connection_slot_until_its_connections_are_gone() -> None:
    clock = task.Clock()
    sessions: list = []

    def probe(route, addresses):
        d = defer.Deferred()
        d.closed = defer.Deferred()
        sessions.append((addresses, d))
        return d

    verifier = Verifier(clock, VerdictCache(None, clock.seconds), probe, max_per_destination=1)
    first = results(verifier.verdict("a@op.test", ROUTE))
    verifier.verdict("b@op.test", ROUTE)
    sessions[0][1].callback(Attempt({"a@op.test": Outcome(250, "ok", "rcpt")}, HOST, False))
    assert first[0].status == ACCEPTED  # the verdict does not wait for QUIT
    assert len(sessions) == 1  # but the next session waits for the connection to go
    sessions[0][1].closed.callback(None)
    assert len(sessions) == 2


def test_cache_hits_and_misses_and_probe_time_are_counted() -> None:
    from epost import metrics

    hits, misses = metrics.verify_cache.labels("hit"), metrics.verify_cache.labels("miss")
    before = (hits._value.get(), misses._value.get(), metrics.verify_probe_seconds._sum.get())
    clock, probes, verifier = make()
    verifier.verdict("a@op.test", ROUTE)
    clock.advance(0.5)
    probes.answer(0, {"a@op.test": 250})
    verifier.verdict("a@op.test", ROUTE)
    after = (hits._value.get(), misses._value.get(), metrics.verify_probe_seconds._sum.get())
    assert (after[0] - before[0], after[1] - before[1]) == (1, 1)
    assert after[2] - before[2] == pytest.approx(0.5)


def test_addresses_waiting_for_a_busy_next_hop_are_bounded_and_past_it_answered_temporary(monkeypatch) -> None:
    from epost.delivery import verify

    monkeypatch.setattr(verify, "MAX_QUEUED", 5)
    clock, probes, verifier = make(max_per_destination=1)
    for n in range(6):  # one in the running session, five waiting
        verifier.verdict(f"u{n}@op.test", ROUTE)
    past = verifier.verdict("u6@op.test", ROUTE)
    assert isinstance(past, Verdict) and past.status == TEMPORARY
    again = verifier.verdict("u1@op.test", ROUTE)  # already waiting: joins its probe
    assert not isinstance(again, Verdict)
    assert [len(s[1]) for s in probes.sessions] == [1]
