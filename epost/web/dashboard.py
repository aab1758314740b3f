"""The dashboard: queue sizes, the domains in retry with their Domain.mri fields, the last log lines."""

from __future__ import annotations

from urllib.parse import urlencode

from epost.queue.domain_state import format_mri
from epost.store.spool import Spool
from epost.web import dns_panel
from epost.web.base import Page, Redirect, field
from epost.web.html import esc, when
from epost.web.logtail import last_lines

LOG_LINES = 20
_TIME_KEYS = frozenset({"Last-tried", "Next-try", "First-failure"})


def read_dashboard(spool: Spool) -> tuple[dict[str, int], list[str], list[str]]:
    """Blocking: messages in each queue (from the queue store), senderlog tail, faillog tail."""
    log = spool.root / "log"
    return spool.counts(), last_lines(log / "senderlog", LOG_LINES), last_lines(log / "faillog", LOG_LINES)


def mri_fields(state) -> list[tuple[str, str]]:
    """(key, value) in Domain.mri's own order and names; times also shown readable."""
    fields = []
    for line in format_mri(state).splitlines():
        key, _, value = line.partition(": ")
        if key in _TIME_KEYS and value.isdigit() and int(value):
            value = f"{value} ({when(int(value))})"
        fields.append((key, value))
    return fields


def render_domains(states) -> str:
    if not states:
        return '<p class="muted">No domain is waiting for a retry.</p>'
    cards = []
    for state in states:
        rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in mri_fields(state))
        cards.append(
            f'<div class="card domain" id="domain-{esc(state.domain)}"><div class="row"><strong>{esc(state.domain)}</strong>'
            f'<a href="{esc("/queue?" + urlencode({"domain": state.domain}))}">its messages</a></div><table>{rows}</table></div>'
        )
    return "".join(cards)


def render_log(name: str, lines: list[str]) -> str:
    if not lines:
        return f'<h2>{esc(name)}</h2><p class="muted">empty</p>'
    return f'<h2>{esc(name)} (last {len(lines)})</h2><pre id="{esc(name)}">' + esc("\n".join(lines)) + "</pre>"


class Dashboard(Page):
    title = "Dashboard"
    path = "/"

    async def get(self, request, session):
        sizes, senderlog, faillog = await self.context.in_thread(read_dashboard, self.context.manager.spool)
        domains = await self._dns_domains()
        cells = "".join(
            f'<tr><th>{esc(q)}</th><td id="size-{esc(q)}">{n}</td></tr>' for q, n in sizes.items()
        )
        states = self.context.manager.domain_states()
        return (
            f'<h2>Queues</h2><table class="sizes">{cells}</table>'
            '<p><a href="/queue">Open the queue</a></p>'
            f"<h2>Domains in retry ({len(states)})</h2>{render_domains(states)}"
            f"{dns_panel.render(self.context.dns_checks, domains, session.csrf)}"
            f"{render_log('senderlog', senderlog)}{render_log('faillog', faillog)}"
        )

    async def post(self, request, session, fields):
        if field(fields, "action") != "dns-refresh":
            session.flash.append(("error", "unknown action"))
            return Redirect("/")
        await self._dns_domains(force=True)
        session.flash.append(("ok", "DNS checks started: reload the page in a few seconds"))
        return Redirect("/")

    async def _dns_domains(self, force: bool = False) -> list[str]:
        """The local domains, their DNS checks started when missing or stale (or all, with `force`)."""
        context = self.context
        domains = await context.in_thread(dns_panel.dashboard_domains, context.config.routing.local_domains,
                                          context.routing.users())
        context.dns_checks.start(domains, force=force)
        return domains
