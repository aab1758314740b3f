"""Mail Control: the admin web pages on `--admin` (docs/mail-control.md).

Plain server-rendered HTML over twisted.web, no JavaScript. One module per job:

| module | job |
|---|---|
| `site.py` | `make_admin_site()` builds the resource tree; `attach_admin()` listens on the `admin` endpoints |
| `sessions.py` | session cookie, CSRF tokens, the login form's token |
| `base.py` | the login check and CSRF check for every page, answering with Deferreds |
| `login.py` | log in (admin_users, scrypt in the password-check threads, throttled) and out |
| `html.py` | escaping, the page frame, inline CSS, security headers |
| `dashboard.py`, `logtail.py` | queue sizes, Domain.mri of the domains in retry, senderlog/faillog tails |
| `queue_page.py` | the queue with flush / hold / release / delete per message and per domain |
| `gateway_edit.py`, `gateway_page.py` | check with the daemon's parser, then write gateway.dat atomically |
| `route_page.py` | `epost route` for one address |
"""

from epost.web.site import attach_admin, make_admin_site

__all__ = ["attach_admin", "make_admin_site"]
