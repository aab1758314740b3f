"""'Route this address': the `epost route` lines for one address, from the daemon's live tables.

It calls the same function as `epost route --no-dns` (an MX route shows as
`MX of DOMAIN`: the web page never waits on DNS).
"""

from __future__ import annotations

from epost.routing.explain import route_lines
from epost.web.base import Page, field
from epost.web.html import csrf_field, esc


def route_form(token: str, address: str = "") -> str:
    return (
        '<form method="post" action="/route" class="card row" id="route-form">'
        f"{csrf_field(token)}"
        '<label>Address <input type="text" name="address" id="route-address" required autocapitalize="off" '
        f'value="{esc(address)}" placeholder="bob@example.jp"></label>'
        '<button type="submit" class="primary" id="route-go">Route</button></form>'
    )


class RoutePage(Page):
    title = "Route this address"
    path = "/route"

    def get(self, request, session):
        return route_form(session.csrf) + '<p class="muted">Shows where mail for an address goes and which rule decided it, as <code>epost route --no-dns</code> does.</p>'

    def post(self, request, session, fields):
        address = field(fields, "address").strip()[:1000]
        lines, status = route_lines(self.context.routing.resolver, address)
        verdict = "every final recipient is rejected" if status else "accepted"
        return (
            route_form(session.csrf, address)
            + f'<pre id="route-result">{esc(chr(10).join(lines))}</pre><p class="muted">{esc(verdict)}</p>'
        )
