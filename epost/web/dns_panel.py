"""The dashboard's DNS checks: `epost check-dns` for each local domain (SPEC §9).

The checks are blocking (dnspython, key files): they run in a thread pool
of their own (`epost-dnscheck`, apart from the queue's file threads), never
on the reactor, and the page never waits for them. A result is kept for CACHE_SECONDS; the page shows what is
known and starts the checks that are missing or stale; **Check DNS now**
starts them all again. The checks started together are one run
(`epost.admin.dns_check.DnsRun`): they share its DNS answers, reverse DNS and
key files, and nothing of it is kept for the next run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from epost.admin.dns_check import Finding, shown
from epost.web.html import esc, post_button, when

log = Logger()

CACHE_SECONDS = 600
MAX_DOMAINS = 20  # a users table with hundreds of domains: the first 20, by name


@dataclass(frozen=True)
class Result:
    checked_at: float  # reactor time the check ended
    findings: tuple[Finding, ...]


class DnsChecks:
    """Results by domain, each checked once at a time in `threadpool`: each `start` asks
    `new_run()` for one run, `check(domain) -> [Finding]` for the domains it starts."""

    def __init__(self, reactor, threadpool, new_run: Callable[[], Callable[[str], list[Finding]]]) -> None:
        self._reactor = reactor
        self._threadpool = threadpool
        self._new_run = new_run
        self._results: dict[str, Result] = {}
        self._running: set[str] = set()

    def start(self, domains: Iterable[str], force: bool = False) -> None:
        """Check each domain whose result is missing or older than CACHE_SECONDS (every one with `force`),
        all of them in one new run: nothing is reused from an earlier call.

        Results of domains no longer asked for are dropped: the cache holds at
        most the domains of the last call (MAX_DOMAINS from the dashboard) and
        those still being checked, however the local domains change over time."""
        now = self._reactor.seconds()
        domains = list(domains)
        wanted = set(domains)
        self._results = {d: r for d, r in self._results.items() if d in wanted}
        check = None
        for domain in domains:
            result = self._results.get(domain)
            if domain in self._running or (not force and result and now - result.checked_at < CACHE_SECONDS):
                continue
            self._running.add(domain)
            check = check or self._new_run()
            d = deferToThreadPool(self._reactor, self._threadpool, check, domain)
            d.addErrback(self._failed, domain)
            d.addCallback(self._done, domain)

    def _failed(self, failure, domain: str) -> list[Finding]:
        log.failure("Mail Control: DNS check of {domain} failed", failure, domain=domain)
        return [Finding("fail", "dns", f"the check itself failed ({failure.getErrorMessage()}); the daemon log has the details")]

    def _done(self, findings: list[Finding], domain: str) -> None:
        self._running.discard(domain)
        self._results[domain] = Result(self._reactor.seconds(), tuple(findings))

    def result(self, domain: str) -> Result | None:
        return self._results.get(domain)

    def running(self, domain: str) -> bool:
        return domain in self._running


def dashboard_domains(local_domains: Iterable[str], users) -> list[str]:
    """Blocking (walks the users table): the local domains, by name, at most MAX_DOMAINS."""
    return sorted({*local_domains, *users.domains()})[:MAX_DOMAINS]


def _worst(findings: Iterable[Finding]) -> str:
    statuses = {f.status for f in findings}
    return next((s for s in ("fail", "warn") if s in statuses), "ok")


def render(checks: DnsChecks, domains: list[str], csrf: str) -> str:
    refresh = post_button("/", "Check DNS now", csrf, {"action": "dns-refresh"})
    if not domains:
        return '<h2>DNS checks</h2><p class="muted">No local domain: nothing to check.</p>'
    cards = []
    for domain in domains:
        result = checks.result(domain)
        if result is None:
            body = '<p class="muted">Checking; reload the page in a few seconds.</p>'
        else:
            rows = "".join(
                f'<tr class="dns-{esc(f.status)}"><td>{esc(f.status)}</td><td>{esc(f.check)}</td>'
                f"<td>{esc(detail)}{'<br><code>fix: ' + esc(fix) + '</code>' if fix else ''}</td></tr>"
                for f in result.findings
                for detail, fix in [shown(f)]
            )
            again = " (checking again)" if checks.running(domain) else ""
            body = f'<table class="dns">{rows}</table><p class="muted">checked {esc(when(result.checked_at))}{again}</p>'
        summary = "checking" if result is None else _worst(result.findings)
        cards.append(f'<div class="card dns-domain" id="dns-{esc(domain)}"><div class="row"><strong>{esc(domain)}</strong>'
                     f'<span class="dns-{summary}">{summary}</span></div>{body}</div>')
    return (f'<h2>DNS checks</h2><p class="muted">What the world sees for each local domain, as '
            f"<code>epost check-dns</code> shows it; kept for {CACHE_SECONDS // 60} minutes. {refresh}</p>"
            + "".join(cards))
