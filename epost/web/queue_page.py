"""The queue: every queued message with flush / hold / release / delete, and the same actions for a whole domain.

The listing is read from the queue store (as `epost queue` does); the
actions go to the running delivery manager, the same calls the `epost`
command makes over the control socket.
"""

from __future__ import annotations

import time
from urllib.parse import urlencode

from epost.admin.queue_listing import QueuedMessage, format_age, read_queue, recipient_details
from epost.address import destination_of
from epost.store.database import QUEUE_ID
from epost.web.base import Page, Redirect, field
from epost.web.html import csrf_field, esc, post_button, when

ACTIONS = ("flush", "hold", "release", "delete", "reroute")
_PAST = {"flush": "due now", "hold": "on hold", "release": "released", "delete": "deleted", "reroute": "rerouted"}
MESSAGE_BUTTONS = {
    "incoming": ("hold", "delete"),
    "deferred": ("flush", "hold", "delete"),
    "hold": ("release", "delete"),
}
SHOWN = 500  # messages listed at most on one page


def wanted(message: QueuedMessage, domain: str | None) -> bool:
    if domain is None:
        return True
    envelope = message.envelope
    return envelope is not None and any(destination_of(r.address) == domain for r in envelope.recipients)


def clean_domain(text: str) -> str | None:
    text = text.strip().rstrip(".").lower()
    return text or None


def queue_url(domain: str | None) -> str:
    return "/queue" + ("?" + urlencode({"domain": domain}) if domain else "")


def render_message(message: QueuedMessage, token: str, now: float, shown_domain: str | None) -> str:
    qid = message.queue_id
    envelope = message.envelope
    buttons = "".join(
        post_button("/queue", action, token, {"action": action, "id": qid, "filter": shown_domain or ""},
                    "danger" if action == "delete" else "")
        for action in MESSAGE_BUTTONS.get(message.queue, ())
    )
    if envelope is None:
        return (
            f'<div class="card message" id="msg-{esc(qid)}"><div class="row"><code>{esc(qid)}</code>'
            f'<span class="state-failed">unreadable envelope</span></div>'
            f'<p class="muted">{esc(message.error)}</p>{buttons}</div>'
        )
    recipients = []
    for recipient in envelope.recipients:
        state = message.recipient_state(recipient.state)
        found = recipient_details(message, recipient)
        reply = found.pop("reply", "")
        details = [f"{key} {when(value) if key == 'next' else value}" for key, value in found.items()]
        recipients.append(
            f'<li><span class="rcpt">{esc(recipient.address)}</span> '
            f'<span class="state-{esc(state)}">{esc(state)}</span> '
            f'<span class="muted">{esc(", ".join(details))}</span>'
            + (f'<br><span class="muted reply">{esc(reply)}</span>' if reply else "")
            + "</li>"
        )
    return (
        f'<div class="card message" id="msg-{esc(qid)}">'
        f'<div class="row"><code class="qid">{esc(qid)}</code><span>{esc(message.queue)}</span>'
        f'<span class="muted">age {esc(format_age(now - envelope.arrival))}, {envelope.size} bytes</span></div>'
        f'<div class="sender">from &lt;{esc(envelope.sender)}&gt;</div>'
        f'<ul>{"".join(recipients)}</ul>{buttons}</div>'
    )


def domain_form(token: str, domain: str | None) -> str:
    options = "".join(f'<option value="{a}">{a}</option>' for a in ACTIONS)
    return (
        '<form method="post" action="/queue" class="card row" id="domain-form">'
        f"{csrf_field(token)}"
        '<label>Domain <input type="text" name="domain" id="domain" required '
        f'value="{esc(domain or "")}" placeholder="example.jp"></label>'
        f'<label>Action <select name="action" id="domain-action">{options}</select></label>'
        '<button type="submit">Apply to every message for this domain</button></form>'
    )


class QueuePage(Page):
    title = "Queue"
    path = "/queue"

    async def get(self, request, session):
        domain = clean_domain(request.args.get(b"domain", [b""])[0].decode("utf-8", "replace"))
        messages = await self.context.in_thread(read_queue, self.context.manager.spool)
        shown = [m for m in messages if wanted(m, domain)]
        now = time.time()
        cards = "".join(render_message(m, session.csrf, now, domain) for m in shown[:SHOWN])
        heading = f"{len(shown)} message{'s' if len(shown) != 1 else ''}"
        if domain:
            heading += f' for {esc(domain)} (<a href="/queue">show all</a>)'
        if len(shown) > SHOWN:
            heading += f", the first {SHOWN} shown"
        flush_all = post_button("/queue", "Flush every deferred message", session.csrf, {"action": "flush", "all": "1"})
        return (
            f"{domain_form(session.csrf, domain)}<p>{flush_all}</p>"
            f'<h2 id="count">{heading}</h2>'
            + (cards or '<p class="muted">The queue is empty.</p>')
        )

    async def post(self, request, session, fields):
        action = field(fields, "action")
        ids = fields.get("id", [])
        domain = clean_domain(field(fields, "domain"))
        back = queue_url(clean_domain(field(fields, "filter")) or domain)
        if action not in ACTIONS:
            session.flash.append(("error", f"unknown action {action!r}"))
            return Redirect(back)
        bad = [i for i in ids if not QUEUE_ID.fullmatch(i)]
        if bad:
            session.flash.append(("error", f"not a queue ID: {bad[0]!r}"))
            return Redirect(back)
        if not ids and domain is None and not (action == "flush" and field(fields, "all") == "1"):
            session.flash.append(("error", f"{action}: give a message or a domain"))
            return Redirect(back)
        manager = self.context.manager
        if action == "flush":
            result = manager.flush_some(ids, domain)
        else:
            result = await getattr(manager, action)(ids, domain)
        for queue_id in result.done:
            text = "every deferred message is due now" if queue_id == "*" else f"{queue_id}: {_PAST[action]}"
            session.flash.append(("ok", text))
        for problem in result.errors:
            session.flash.append(("error", f"{action}: {problem}"))
        if not result.done and not result.errors:
            session.flash.append(("ok", f"nothing to {action}" + (f" for {domain}" if domain else "")))
        return Redirect(back)
