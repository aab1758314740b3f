"""Mail Control over in-memory HTTP: login, CSRF, escaping, the queue actions, the gateway.dat editor, the route box."""

from __future__ import annotations

import os
import time

from urllib.parse import urlencode

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from epost.queue.domain_state import DomainState
from epost.store.envelope import Envelope, Recipient
from epost.web.gateway_edit import check
from epost.smtp.throttle import client_key
from epost.web.logtail import last_lines
from epost.web.site import loopback_by_default
from fakes import HeldThreadPool, queue_message
from web_support import ADMIN, PASSWORD, make_world

QID = "0190000000000A000"


# --- login ------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/queue", "/gateway", "/route"])
def test_pages_redirect_to_login_without_a_session(world, path):
    reply = world.client().get(path)
    assert reply.code == 303 and reply.header("location") == "/login"
    assert "Dashboard" not in reply.body


def test_login_sets_an_httponly_samesite_cookie_and_shows_the_dashboard(world):
    client = world.client()
    form = client.get("/login")
    assert form.code == 200 and 'name="password"' in form.body
    reply = client.post("/login", {"csrf": form.csrf(), "user": ADMIN, "password": PASSWORD})
    assert reply.code == 303 and reply.header("location") == "/"
    session_cookie = [c for c in reply.headers["set-cookie"] if c.startswith("epost_session=")][0]
    assert "HttpOnly" in session_cookie and "SameSite=strict" in session_cookie
    page = client.get("/")
    assert page.code == 200 and "<h1>Dashboard</h1>" in page.body and ADMIN in page.body


def test_no_secret_in_any_url(admin):
    page = admin.get("/queue")
    token = page.csrf()
    assert admin.cookies["epost_session"] not in page.body
    for url in [*page.body.split('href="')[1:], *page.body.split('action="')[1:]]:
        assert token not in url.split('"')[0]


def test_wrong_password_shows_the_login_page_with_an_error(world):
    client = world.client()
    reply = client.login(password="wrong")
    assert reply.code == 200
    assert "Wrong address or password" in reply.body and 'name="password"' in reply.body
    assert "epost_session" not in client.cookies
    assert client.get("/").code == 303


def test_a_user_who_is_not_an_admin_cannot_log_in(world):
    client = world.client()
    reply = client.login(user="bob@example.test")  # right password, but not in admin_users
    assert "Wrong address or password" in reply.body and "epost_session" not in client.cookies


def test_repeated_failures_shut_the_ip_out(world):
    client = world.client()
    for _ in range(5):
        client.login(password="wrong")
    reply = client.login()  # even the right password, for a while
    assert reply.code == 429 and "Too many failed logins" in reply.body


def test_login_without_its_csrf_token_is_refused(world):
    client = world.client()
    client.get("/login")
    reply = client.post("/login", {"user": ADMIN, "password": PASSWORD})
    assert reply.code == 403 and "epost_session" not in client.cookies
    other = world.client()  # a token from another browser's form does not fit this browser's cookie
    token = other.get("/login").csrf()
    assert client.post("/login", {"csrf": token, "user": ADMIN, "password": PASSWORD}).code == 403


def test_post_without_or_with_a_wrong_csrf_token_is_403(world, admin):
    assert admin.post("/queue", {"action": "delete", "id": QID}).code == 403
    assert admin.post("/queue", {"action": "delete", "id": QID, "csrf": "x" * 43}).code == 403
    assert admin.post("/gateway", {"text": "*,mx\n", "csrf": "nope"}).code == 403
    assert world.manager.calls == []
    assert world.gateway.read_text() == "*.partner.test,127.0.0.1,2525\n"


def test_post_from_another_origin_is_403_even_with_the_token(world, admin):
    token = admin.get("/queue").csrf()
    reply = admin.post("/queue", {"action": "delete", "id": QID, "csrf": token}, headers={"Origin": "http://evil.test"})
    assert reply.code == 403 and world.manager.calls == []


def test_post_without_a_session_is_403(world):
    assert world.client().post("/queue", {"action": "delete", "id": QID, "csrf": "x"}).code == 403
    assert world.manager.calls == []


def test_logout_ends_the_session(world, admin):
    token = admin.get("/").csrf()
    old_cookie = admin.cookies["epost_session"]
    reply = admin.post("/logout", {"csrf": token})
    assert reply.code == 303 and reply.header("location") == "/login"
    assert admin.get("/").code == 303
    admin.cookies["epost_session"] = old_cookie  # the old token is dead on the server too
    assert admin.get("/").code == 303


def test_sessions_end_when_idle(world, admin):
    world.clock.advance(31 * 60)
    assert admin.get("/").code == 303


def test_security_headers(admin):
    reply = admin.get("/")
    assert "default-src 'none'" in reply.header("content-security-policy")
    assert reply.header("x-frame-options") == "DENY"
    assert reply.header("cache-control") == "no-store"
    assert '<meta name="viewport"' in reply.body


# --- dashboard and queue ----------------------------------------------------------------


def test_dashboard_shows_sizes_domains_in_retry_and_log_tails(world, admin):
    spool = world.config.server.spool
    queue_message(spool, "deferred", Envelope(QID, "a@example.org", (Recipient("x@slow.test"),), time.time(), 10))
    (spool / "log" / "senderlog").write_text("".join(f"senderlog line {i}\n" for i in range(30)))
    (spool / "log" / "faillog").write_text("<b>fail</b>\n")
    world.manager.states = [DomainState("slow.test", last_tried=1_800_000_000, try_number=3, err_code=451, err_text="try later", next_try=1_800_000_120, last_host="mx.slow.test", messages=1)]
    body = admin.get("/").body
    assert 'id="size-deferred">1<' in body and 'id="size-incoming">0<' in body
    for text in ("Domain-name", "slow.test", "Try-number", "Err-code", "451", "try later", "Next-try", "1800000120", "mx.slow.test"):
        assert text in body
    assert "senderlog line 29" in body and "senderlog line 10" in body and "senderlog line 9\n" not in body
    assert "&lt;b&gt;fail&lt;/b&gt;" in body and "<b>fail</b>" not in body


def test_queue_escapes_addresses(world, admin):
    evil = '"<script>alert(1)</script>"@evil.test'
    queue_message(
        world.config.server.spool, "deferred",
        Envelope(QID, evil, (Recipient(evil, last_reply="451 <img src=x onerror=alert(1)>", attempts=1),), time.time(), 10),
    )
    body = admin.get("/queue").body
    assert "<script>" not in body and "<img" not in body
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in body and "&lt;img src=x onerror=alert(1)&gt;" in body


def test_queue_lists_messages_with_their_buttons(world, admin):
    spool = world.config.server.spool
    queue_message(spool, "deferred", Envelope(QID, "a@example.org", (Recipient("x@slow.test", attempts=2),), time.time() - 300, 10))
    queue_message(spool, "hold", Envelope("0190000000000B000", "a@example.org", (Recipient("y@other.test"),), time.time(), 10))
    body = admin.get("/queue").body
    assert "2 messages" in body and "x@slow.test" in body and "y@other.test" in body
    deferred = body[body.index(f'id="msg-{QID}"'):body.index('id="msg-0190000000000B000"')]
    assert 'value="flush"' in deferred and 'value="hold"' in deferred and 'value="delete"' in deferred
    held = body[body.index('id="msg-0190000000000B000"'):]
    assert 'value="release"' in held
    only = admin.get("/queue?domain=other.test").body
    assert "1 message for other.test" in only and "x@slow.test" not in only


@pytest.mark.parametrize("action", ["flush", "hold", "release", "delete"])
def test_message_actions_go_to_the_manager(world, admin, action):
    token = admin.get("/queue").csrf()
    reply = admin.post("/queue", {"csrf": token, "action": action, "id": QID})
    assert reply.code == 303 and reply.header("location") == "/queue"
    assert world.manager.calls == [(action, [QID], None)]
    assert QID in admin.get("/queue").body  # the flash note


def test_domain_actions_go_to_the_manager(world, admin):
    token = admin.get("/queue").csrf()
    reply = admin.post("/queue", {"csrf": token, "action": "hold", "domain": "Slow.Test."})
    assert reply.header("location") == "/queue?domain=slow.test"
    assert world.manager.calls == [("hold", [], "slow.test")]


def test_bad_queue_actions_are_refused(world, admin):
    token = admin.get("/queue").csrf()
    admin.post("/queue", {"csrf": token, "action": "explode", "id": QID})
    admin.post("/queue", {"csrf": token, "action": "delete", "id": "../../etc"})
    admin.post("/queue", {"csrf": token, "action": "delete"})
    assert world.manager.calls == []
    body = admin.get("/queue").body
    assert "unknown action" in body and "not a queue ID" in body and "give a message or a domain" in body


# --- gateway.dat editor -------------------------------------------------------------


def test_gateway_editor_shows_the_file_and_the_rules_in_force(admin):
    body = admin.get("/gateway").body
    assert '>\n*.partner.test,127.0.0.1,2525\n</textarea>' in body
    assert "Rules in force (1)" in body


def test_bad_line_is_shown_with_its_number_and_the_file_is_unchanged(world, admin):
    page = admin.get("/gateway")
    before = world.gateway.stat()
    text = "# comment\n*.partner.test,127.0.0.1,2525\nbroken.test,127.0.0.1,99999\n*.ok.test,mx\nalso bad\n"
    reply = admin.post("/gateway", {"csrf": page.csrf(), "text": text, "version": _version(page.body)})
    assert reply.code == 422
    assert "line 3: bad port &#x27;99999&#x27;" in reply.body
    assert "line 5: expected pattern,gateway[,port]" in reply.body
    assert 'id="line-3"' in reply.body and "not saved" in reply.body
    assert world.gateway.read_text() == "*.partner.test,127.0.0.1,2525\n"
    assert world.gateway.stat().st_ino == before.st_ino and world.gateway.stat().st_mtime_ns == before.st_mtime_ns
    assert "broken.test,127.0.0.1,99999" in reply.body  # the operator's text is kept for fixing


def test_good_table_is_written_atomically(world, admin, monkeypatch):
    from epost.web import gateway_edit

    written = []
    real = gateway_edit.write_atomically
    monkeypatch.setattr(gateway_edit, "write_atomically", lambda path, data, **kw: (written.append(path), real(path, data, **kw)))
    os.chmod(world.gateway, 0o640)
    page = admin.get("/gateway")
    inode = world.gateway.stat().st_ino
    reply = admin.post("/gateway", {"csrf": page.csrf(), "text": "*.partner.test,127.0.0.1,2626\r\n*,mx", "version": _version(page.body)})
    assert reply.code == 303 and reply.header("location") == "/gateway"
    assert written == [world.gateway]
    assert world.gateway.read_bytes() == b"*.partner.test,127.0.0.1,2626\n*,mx\n"
    assert world.gateway.stat().st_ino != inode  # renamed into place, not rewritten
    assert oct(world.gateway.stat().st_mode & 0o777) == oct(0o640)
    assert [p.name for p in world.gateway.parent.iterdir() if p.name.startswith(".gateway.dat.")] == []
    assert "saved 2 rules" in admin.get("/gateway").body


def test_edit_over_someone_elses_change_is_refused(world, admin):
    page = admin.get("/gateway")
    world.gateway.write_text("*.other.test,127.0.0.1,25\n")
    reply = admin.post("/gateway", {"csrf": page.csrf(), "text": "*,mx\n", "version": _version(page.body)})
    assert reply.code == 409 and "changed by someone else" in reply.body
    assert world.gateway.read_text() == "*.other.test,127.0.0.1,25\n"


def test_check_uses_the_daemons_parser_and_reports_every_bad_line():
    table, problems = check(b"a.test,mx,26\n\n# x\n*,[::1],25\n\xff\n")
    assert table is None and [p.line for p in problems] == [5]  # undecodable: the reader's own error
    table, problems = check(b"a.test,mx,26\nb.test,,\n*,[::1],25\n")
    assert table is None and [p.line for p in problems] == [1, 2]
    table, problems = check(b"a.test,mx\n*,[::1],25\n")
    assert problems == [] and len(table) == 2


def _version(body: str) -> str:
    return body.split('name="version" value="')[1].split('"')[0]


# --- route box ---------------------------------------------------------------------


def test_route_box_uses_the_epost_route_lines(world, admin):
    token = admin.get("/route").csrf()
    body = admin.post("/route", {"csrf": token, "address": "x@a.partner.test"}).body
    assert "x@a.partner.test: relay via gateway.dat:1 -&gt; 127.0.0.1:2525" in body
    body = admin.post("/route", {"csrf": token, "address": "nobody@example.test"}).body
    assert "nobody@example.test: reject via local -&gt; 550 5.1.1" in body
    body = admin.post("/route", {"csrf": token, "address": "<script>"}).body
    assert "<script>" not in body and "&lt;script&gt;: reject" in body


# --- small parts -----------------------------------------------------------------------


def test_last_lines_reads_only_the_end(tmp_path):
    log = tmp_path / "log"
    assert last_lines(log) == []
    log.write_text("".join(f"line {i}\n" for i in range(100000)))
    assert last_lines(log, 3) == ["line 99997", "line 99998", "line 99999"]


@pytest.mark.parametrize(
    "given, interface",
    [
        ("tcp:8025", "127.0.0.1"),
        ("tcp6:8025", "::1"),
        ("tcp:8025:interface=0.0.0.0", "0.0.0.0"),
    ],
)
def test_admin_listens_on_loopback_unless_told_otherwise(given, interface):
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    assert serverFromString(reactor, loopback_by_default(given))._interface == interface


def test_every_listening_kind_with_an_interface_gets_loopback():
    assert loopback_by_default("tls:/etc/epost/certs:port=8443").endswith(r":interface=\:\:1")  # TCP6 inside
    assert loopback_by_default("ssl:8443:privateKey=k.pem").endswith(":interface=127.0.0.1")
    assert loopback_by_default("unix:/run/epost-admin.sock") == "unix:/run/epost-admin.sock"


def test_a_token_in_the_query_string_does_not_count(admin):
    token = admin.get("/queue").csrf()
    assert admin.post(f"/queue?csrf={token}", {"action": "flush"}).code == 403
    assert admin.post("/queue", {"csrf": token, "action": "flush"}).code != 403  # the same token, in the body


def raw_connection(world, data: bytes, peer: str = "127.0.0.1"):
    transport = StringTransport(
        hostAddress=IPv4Address("TCP", "127.0.0.1", 8025), peerAddress=IPv4Address("TCP", peer, 40000)
    )
    channel = world.site.buildProtocol(transport.getPeer())
    channel.makeConnection(transport)
    channel.dataReceived(data)
    transport.channel = channel
    return transport


def test_a_request_body_over_the_limit_is_refused_before_it_is_read(world):
    from epost.web.site import MAX_BODY

    head = b"POST /login HTTP/1.1\r\nHost: 127.0.0.1:8025\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1)
    transport = raw_connection(world, head + b"x" * 1000)
    assert transport.value().startswith(b"HTTP/1.1 413 ") and transport.disconnecting

    # A chunked body says no length up front: it is cut off once it passes the limit.
    chunked = raw_connection(world, b"POST /login HTTP/1.1\r\nHost: 127.0.0.1:8025\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"x" * 65536
    sent = 0
    while not chunked.disconnecting and sent <= 2 * MAX_BODY:
        chunked.channel.dataReceived(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        sent += len(chunk)
    assert chunked.value().startswith(b"HTTP/1.1 413 ") and MAX_BODY < sent <= MAX_BODY + len(chunk)


def test_parallel_login_guesses_cannot_pass_the_cutoff_nor_hide_behind_other_loopback_addresses(tmp_path):
    from epost.web import make_admin_site

    world = make_world(tmp_path)
    pool = HeldThreadPool()
    world.site = make_admin_site(world.config, world.manager, world.routing, world.clock, pool, pool)
    form = world.client().get("/login")
    cookie = "; ".join(h.split(";")[0] for h in form.headers.get("set-cookie", []))
    transports = []
    for i, password in enumerate(["wrong"] * 9 + [PASSWORD]):  # all at once, the right one last
        body = urlencode({"csrf": form.csrf(), "user": ADMIN, "password": password}).encode()
        request = (
            b"POST /login HTTP/1.0\r\nHost: 127.0.0.1:8025\r\nCookie: %s\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: %d\r\n\r\n%s"
            % (cookie.encode(), len(body), body)
        )
        transports.append(raw_connection(world, request, peer=f"127.0.0.{i + 1}"))
    pool.run_all()
    world.clock.advance(10)
    codes = [int(t.value().split(b" ", 2)[1]) for t in transports if t.value()]
    assert len(codes) == 10, codes  # every request answered
    assert codes.count(429) >= 9 and 303 not in codes, codes  # one check ran; the rest, the right one too, refused


def test_the_admin_listener_takes_a_bounded_number_of_connections(world):
    from epost.web.site import MAX_CONNECTIONS, BoundedFactory

    factory = BoundedFactory(world.site)
    peer = IPv4Address("TCP", "127.0.0.1", 40000)
    for _ in range(MAX_CONNECTIONS):
        factory.buildProtocol(peer).makeConnection(StringTransport())
    assert factory.buildProtocol(peer) is None


def test_saving_a_symlinked_gateway_dat_keeps_the_link(tmp_path):
    from epost.web.gateway_edit import save

    real = tmp_path / "tables" / "gateway.dat"
    real.parent.mkdir()
    real.write_text("*.old.test,127.0.0.1,2525\n")
    link = tmp_path / "gateway.dat"
    link.symlink_to(real)
    table, problems, _ = save(link, b"*.new.test,127.0.0.1,2526\n", None)
    assert problems == [] and link.is_symlink()
    assert real.read_text() == "*.new.test,127.0.0.1,2526\n"


@pytest.mark.parametrize("ip, key", [
    ("192.0.2.7", "192.0.2.7"),
    ("::ffff:192.0.2.7", "192.0.2.7"),  # an IPv4 client on a dual-stack listener is still itself
    ("::ffff:192.0.2.8", "192.0.2.8"),
    ("127.0.0.5", "loopback"),
    ("::ffff:127.0.0.1", "loopback"),
    ("::1", "loopback"),
    ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff::9", "2001:db8:1:2::/64"),
    ("not an ip", "not an ip"),
])
def test_failed_logins_count_against_the_address_its_64_or_loopback(ip, key):
    assert client_key(ip) == key


def test_two_saves_from_one_opened_version_at_once_save_one_and_refuse_the_other(tmp_path, monkeypatch):
    """Two admins save at the same moment: the second must see the first's file, not overwrite it unseen."""
    import threading

    from epost.web import gateway_edit

    path = tmp_path / "gateway.dat"
    path.write_bytes(b"*,mx.old.test\n")
    opened = gateway_edit.version(path.read_bytes())
    writing, go_on = threading.Event(), threading.Event()
    real_write = gateway_edit.write_atomically

    def held_write(*args, **kwargs):  # the first save pauses in the middle of writing
        writing.set()
        go_on.wait(10)
        real_write(*args, **kwargs)

    results = {}
    monkeypatch.setattr(gateway_edit, "write_atomically", held_write)
    first = threading.Thread(target=lambda: results.setdefault("first", gateway_edit.save(path, b"*,mx.a.test\n", opened)))
    first.start()
    assert writing.wait(10)
    monkeypatch.setattr(gateway_edit, "write_atomically", real_write)
    second = threading.Thread(target=lambda: results.setdefault("second", gateway_edit.save(path, b"*,mx.b.test\n", opened)))
    second.start()
    second.join(0.3)  # it waits for the first rather than reading the old file
    go_on.set()
    first.join(10)
    second.join(10)
    assert results["first"][2].startswith("saved 1 rule")
    assert results["second"][2].startswith("not saved: gateway.dat was changed by someone else")
    assert path.read_bytes() == b"*,mx.a.test\n"


def test_saving_an_empty_gateway_dat_says_it_waits_for_sighup_and_the_page_says_why(world, admin):
    from fakes import SynchronousThreadPool

    from epost.routing.live import TableWatcher

    watcher = TableWatcher([world.routing.gateway], world.clock, SynchronousThreadPool(), handle_sighup=False)
    watcher.startService()
    page = admin.get("/gateway")
    reply = admin.post("/gateway", {"csrf": page.csrf(), "text": "# no rules\n", "version": _version(page.body)})
    assert reply.code == 303
    for _ in range(4):
        world.clock.advance(0.5)
    body = admin.get("/gateway").body
    assert "saved 0 rules" in body and "with no rules it is refused, the 1 in force stay until SIGHUP" in body
    assert "Rules in force (1)" in body
    assert "the file on disk is not in force:" in body and "no entries, while the table in force has 1" in body
    watcher.stopService()
