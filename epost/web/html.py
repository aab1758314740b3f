"""The page frame shared by every Mail Control page: escaping, layout, inline CSS, security headers.

Every value that did not come from this module goes through `esc()` (html.escape
with quotes), so a queued address like `<script>@x` shows as text. The pages
have no JavaScript at all; the Content-Security-Policy allows none, and allows
the one inline style sheet by its hash.
"""

from __future__ import annotations

import base64
import hashlib
import html
import time
from collections.abc import Iterable

CSS = """
*{box-sizing:border-box}
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d232a;background:#f4f6f8}
header{background:#23364d;color:#fff;padding:.5em 1em;display:flex;flex-wrap:wrap;gap:.3em 1em;align-items:center}
header a{color:#fff;text-decoration:none;padding:.3em .2em}
header a.here{border-bottom:2px solid #fff}
header .who{margin-left:auto;font-size:.9em}
header form{display:inline;margin:0}
main{padding:.8em 1em;max-width:70em;overflow-wrap:anywhere}
h1{font-size:1.3em;margin:.3em 0 .6em}
h2{font-size:1.1em;margin:1.2em 0 .5em}
.card{background:#fff;border:1px solid #d6dbe1;border-radius:6px;padding:.6em .8em;margin:.5em 0;overflow-wrap:anywhere}
.row{display:flex;flex-wrap:wrap;gap:.3em 1em;align-items:baseline}
.muted{color:#5c6773;font-size:.9em}
.flash{padding:.5em .8em;border-radius:6px;margin:.5em 0;background:#e3f2e6;border:1px solid #9fcfa8}
.flash.error,.error{background:#fdeaea;border-color:#e6a3a3}
p.error,li.error{padding:.3em .5em;border-radius:4px}
pre,textarea,code{font:13px/1.4 ui-monospace,Menlo,Consolas,monospace}
pre{white-space:pre-wrap;overflow-wrap:anywhere;background:#fff;border:1px solid #d6dbe1;padding:.5em;margin:.3em 0}
textarea{width:100%;min-height:18em;padding:.4em}
input[type=text],input[type=password],input[type=email],select{font-size:16px;padding:.35em;max-width:100%}
button{font-size:15px;padding:.35em .8em;border-radius:5px;border:1px solid #8a96a3;background:#fff;cursor:pointer}
button.danger{border-color:#c0392b;color:#c0392b}
button.primary{background:#23364d;color:#fff;border-color:#23364d}
form.inline{display:inline-block;margin:.15em .2em .15em 0}
table{border-collapse:collapse;width:100%;background:#fff}
td,th{border:1px solid #d6dbe1;padding:.25em .45em;text-align:left;vertical-align:top;overflow-wrap:anywhere}
ol.lines{margin:0;padding:0;list-style:none;background:#fff;border:1px solid #d6dbe1}
ol.lines li{display:flex;gap:.6em;padding:.1em .4em;font:13px/1.4 ui-monospace,Menlo,Consolas,monospace}
ol.lines li .n{color:#5c6773;min-width:2.5em;text-align:right}
ol.lines li.bad{background:#fdeaea}
ol.lines li{flex-wrap:wrap}
ol.lines li .why{color:#a01d12;font-family:system-ui,sans-serif;flex-basis:100%;padding-left:3.1em}
.dns-ok{color:#1e7b34}.dns-warn{color:#9a5b00}.dns-fail{color:#a01d12}
table.dns td:first-child{font-weight:bold}
table.dns td:nth-child(-n+2){white-space:nowrap;width:1%;overflow-wrap:normal}
.state-deferred{color:#9a5b00}.state-held{color:#6a3d9a}.state-failed{color:#a01d12}.state-delivered{color:#1e7b34}
@media (max-width:40em){main{padding:.5em}td,th{font-size:.9em}}
""".strip()

_CSS_HASH = base64.b64encode(hashlib.sha256(CSS.encode()).digest()).decode()

SECURITY_HEADERS = {
    b"Content-Security-Policy": (
        f"default-src 'none'; style-src 'sha256-{_CSS_HASH}'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ).encode(),
    b"X-Frame-Options": b"DENY",
    b"X-Content-Type-Options": b"nosniff",
    b"Referrer-Policy": b"same-origin",  # "no-referrer" would make browsers send `Origin: null` with our own POSTs
    b"Cache-Control": b"no-store",
}

NAV = (("/", "Dashboard"), ("/queue", "Queue"), ("/gateway", "gateway.dat"), ("/route", "Route"))


def esc(value: object) -> str:
    """Text for HTML content or a quoted attribute value."""
    return html.escape(str(value), quote=True)


def when(seconds: float | None) -> str:
    """A Unix time as local `YYYY-MM-DD HH:MM:SS`; `-` for none."""
    if not seconds:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def csrf_field(token: str) -> str:
    return f'<input type="hidden" name="csrf" value="{esc(token)}">'


def post_button(action: str, label: str, token: str, fields: dict[str, str] | None = None, css: str = "") -> str:
    """A one-button form that POSTs `fields` (plus the CSRF token) to `action`."""
    hidden = "".join(f'<input type="hidden" name="{esc(k)}" value="{esc(v)}">' for k, v in (fields or {}).items())
    klass = f' class="{esc(css)}"' if css else ""
    return (
        f'<form class="inline" method="post" action="{esc(action)}">{csrf_field(token)}{hidden}'
        f'<button type="submit"{klass}>{esc(label)}</button></form>'
    )


def flashes(messages: Iterable[tuple[str, str]]) -> str:
    """(kind, text) notes from the last action; kind is `ok` or `error`."""
    return "".join(f'<div class="flash {esc(kind)}" role="status">{esc(text)}</div>' for kind, text in messages)


def page(title: str, body: str, *, user: str | None = None, csrf: str = "", here: str = "") -> bytes:
    """The whole document; `body` is already-escaped HTML."""
    if user is not None:
        current = ' class="here" aria-current="page"'
        links = "".join(
            f'<a href="{path}"{current if path == here else ""}>{esc(label)}</a>' for path, label in NAV
        )
        logout = (
            f'<form method="post" action="/logout">{csrf_field(csrf)}<button type="submit">Log out</button></form>'
        )
        header = f'<header><strong>Mail Control</strong>{links}<span class="who">{esc(user)} {logout}</span></header>'
    else:
        header = "<header><strong>Mail Control</strong></header>"
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)} - epost Mail Control</title><style>{CSS}</style></head>"
        f"<body>{header}<main><h1>{esc(title)}</h1>{body}</main></body></html>\n"
    ).encode("utf-8")
