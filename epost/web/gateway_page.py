"""The gateway.dat editor page: the file in a textarea, the rules in force, errors next to their lines."""

from __future__ import annotations

from epost.routing.live import file_stamp
from epost.web.base import Page, Redirect, Response, field
from epost.web.gateway_edit import Problem, normalize, read_current, save, version
from epost.web.html import csrf_field, esc

HELP = (
    "One rule per line: <code>pattern,gateway[,port]</code>; <code>pattern</code> is <code>*</code>, "
    "<code>*.abc.jp</code> or <code>abc.jp</code>; <code>gateway</code> is a host, an IP address or "
    "<code>mx</code>. The first matching line wins; <code>#</code> starts a comment."
)


def numbered(text: str, problems: list[Problem]) -> str:
    """The text's lines numbered as the parser counts them, each bad one marked with its error."""
    by_line: dict[int, list[str]] = {}
    for problem in problems:
        by_line.setdefault(problem.line, []).append(problem.text)
    items = []
    for number, line in enumerate(normalize(text).decode("utf-8", "replace").splitlines(), start=1):
        why = by_line.get(number)
        klass = ' class="bad"' if why else ""
        note = f'<span class="why">line {number}: {esc("; ".join(why))}</span>' if why else ""
        items.append(
            f'<li{klass} id="line-{number}"><span class="n">{number}</span><span>{esc(line) or "&nbsp;"}</span>{note}</li>'
        )
    return f'<ol class="lines">{"".join(items)}</ol>'


class GatewayPage(Page):
    title = "gateway.dat"
    path = "/gateway"

    @property
    def file(self):
        return self.context.config.routing.gateway_table

    def in_force(self) -> str:
        live = self.context.routing.gateway
        rules = live.current.rules
        pending = file_stamp(live.path) != live.stamp
        state = "a change on disk is being loaded" if pending else "the file on disk is in force"
        if live.refused and not pending:
            state = f"the file on disk is not in force: {live.refused}"
        if live.failures:
            state += f"; {live.failures} reload{'s' if live.failures != 1 else ''} refused since start (see the daemon log)"
        listing = "".join(f"<li><code>{esc(rule)}</code> <span class=\"muted\">line {rule.line}</span></li>" for rule in rules)
        return (
            f'<h2>Rules in force ({len(rules)})</h2><p class="muted" id="in-force-state">{esc(state)}</p>'
            + (f'<ol id="in-force">{listing}</ol>' if rules else '<p class="muted" id="in-force">none: every domain goes by MX or smtp_gateway</p>')
        )

    def editor(self, token: str, text: str, file_version: str) -> str:
        return (
            f'<p class="muted">{HELP}</p><p>File: <code>{esc(self.file)}</code></p>'
            '<form method="post" action="/gateway" id="gateway-form">'
            f'{csrf_field(token)}<input type="hidden" name="version" value="{esc(file_version)}">'
            # The newline after <textarea> is dropped by the HTML parser, so a first blank line survives.
            '<textarea name="text" id="gateway-text" spellcheck="false" autocapitalize="off" autocomplete="off">'
            f"\n{esc(text)}</textarea>"
            '<p><button type="submit" class="primary" id="gateway-save">Check and save</button></p></form>'
        )

    async def get(self, request, session):
        data = await self.context.in_thread(read_current, self.file)
        text = data.decode("utf-8", "replace")
        return self.editor(session.csrf, text, version(data)) + self.in_force()

    async def post(self, request, session, fields):
        text = field(fields, "text")
        data = normalize(text)
        expected = field(fields, "version") or None
        table, problems, note = await self.context.in_thread(save, self.file, data, expected)
        if table is not None:
            live = self.context.routing.gateway
            if live.would_refuse(table):
                note += f"; with no rules it is refused, the {len(live.current)} in force stay until SIGHUP (docs/routing.md)"
            session.flash.append(("ok", f"gateway.dat: {note}"))
            return Redirect("/gateway")
        current = await self.context.in_thread(read_current, self.file)
        listing = ""
        if problems:
            items = "".join(
                f'<li class="error"><a href="#line-{p.line}">line {p.line}</a>: {esc(p.text)}</li>' for p in problems
            )
            listing = f'<ul class="problems" id="problems">{items}</ul>{numbered(text, problems)}'
        # After bad lines, a later save still checks against the version first opened;
        # after a conflict, the operator has been told and may save over the new file.
        next_version = (expected or version(current)) if problems else version(current)
        body = (
            f'<div class="flash error" role="alert" id="not-saved">{esc(note)}</div>{listing}'
            f"<h2>Your text</h2>{self.editor(session.csrf, text, next_version)}{self.in_force()}"
        )
        return Response(422 if problems else 409, self.title, body)
