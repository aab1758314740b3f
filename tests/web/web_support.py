"""An in-memory HTTP client for the Mail Control site: real twisted.web requests, a Clock, no sockets."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from epost import auth
from epost.admin.dns_check import Finding
from epost.config import load_config
from epost.queue.domain_state import DomainState
from epost.queue.manager import OperationResult
from epost.store.spool import Spool
from epost.routing_chain import build_routing
from epost.web import make_admin_site
from fakes import ClockReactor, SynchronousThreadPool

ADMIN = "admin@example.test"
PASSWORD = "correct horse"


@dataclass
class Reply:
    code: int
    headers: dict[str, list[str]]
    body: str

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None

    def csrf(self) -> str:
        match = re.search(r'name="csrf" value="([^"]+)"', self.body)
        assert match, self.body
        return match.group(1)


class Client:
    """Keeps cookies like a browser; every request is HTTP/1.0 on a fresh in-memory connection."""

    def __init__(self, site, clock) -> None:
        self.site = site
        self.clock = clock
        self.cookies: dict[str, str] = {}

    def get(self, path: str, **kw) -> Reply:
        return self.request("GET", path, **kw)

    def post(self, path: str, fields: dict | list | None = None, **kw) -> Reply:
        return self.request("POST", path, fields=fields, **kw)

    def request(self, method: str, path: str, fields=None, headers: dict[str, str] | None = None) -> Reply:
        body = urlencode(fields or {}, doseq=True).encode()
        lines = [f"{method} {path} HTTP/1.0", "Host: 127.0.0.1:8025"]
        if self.cookies:
            lines.append("Cookie: " + "; ".join(f"{k}={v}" for k, v in self.cookies.items()))
        if method == "POST":
            lines += ["Content-Type: application/x-www-form-urlencoded", f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode() + (body if method == "POST" else b"")
        transport = StringTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 8025), peerAddress=IPv4Address("TCP", "127.0.0.1", 40000)
        )
        channel = self.site.buildProtocol(transport.getPeer())
        channel.makeConnection(transport)
        channel.dataReceived(raw)
        for _ in range(20):  # HTTP/1.0: the answer is complete when the server closes; throttled ones wait on the clock
            if transport.disconnecting:
                break
            self.clock.advance(1)
        reply = _parse(transport.value())
        channel.connectionLost(None)
        for cookie in reply.headers.get("set-cookie", []):
            pair = cookie.split(";")[0]
            name, _, value = pair.partition("=")
            if "max-age=0" in cookie.lower() or not value:
                self.cookies.pop(name, None)
            else:
                self.cookies[name] = value
        return reply

    def login(self, user: str = ADMIN, password: str = PASSWORD) -> Reply:
        form = self.get("/login")
        return self.post("/login", {"csrf": form.csrf(), "user": user, "password": password})


def _parse(data: bytes) -> Reply:
    head, _, body = data.partition(b"\r\n\r\n")
    status, *header_lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, list[str]] = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return Reply(int(status.split()[1]), headers, body.decode("utf-8"))


class FakeManager:
    """The delivery manager's operator face: records each action, answers done for every ID."""

    def __init__(self, spool: Path) -> None:
        self.spool = Spool(spool, reactor=None, threadpool=None)  # the pages read the queue store through it
        self.spool.open()
        self.calls: list[tuple[str, list[str], str | None]] = []
        self.states: list[DomainState] = []

    def flush_some(self, ids=(), domain=None):
        self.calls.append(("flush", list(ids), domain))
        return OperationResult(list(ids) or ["*"], [])

    def domain_states(self):
        return self.states

    def _record(name):
        async def action(self, ids=(), domain=None):
            self.calls.append((name, list(ids), domain))
            return OperationResult(list(ids), [])

        return action

    hold, release, delete, reroute = _record("hold"), _record("release"), _record("delete"), _record("reroute")


@dataclass
class World:
    folder: Path
    config: object
    manager: FakeManager
    routing: object
    clock: ClockReactor
    site: object
    gateway: Path = field(init=False)

    def __post_init__(self) -> None:
        self.gateway = self.config.routing.gateway_table

    def client(self) -> Client:
        return Client(self.site, self.clock)


def make_world(folder: Path, gateway: str = "*.partner.test,127.0.0.1,2525\n") -> World:
    """A site over a real config, users file and gateway.dat, with a fake manager and a Clock."""
    auth.SCRYPT_LOG2_N = 4  # fast hashes for tests
    spool = folder / "spool"
    (spool / "log").mkdir(parents=True, exist_ok=True)
    (folder / "users").write_text(
        f"{ADMIN}:{auth.hash_password(PASSWORD)}\nbob@example.test:{auth.hash_password(PASSWORD)}\n"
    )
    (folder / "gateway.dat").write_text(gateway)
    toml = folder / "epost.toml"
    toml.write_text(
        '[server]\nhostname = "mx.example.test"\nspool = "spool"\n'
        f'admin = ["tcp:0:interface=127.0.0.1"]\nadmin_users = ["{ADMIN}"]\n'
        '[routing]\nlocal_domains = ["example.test"]\nusers = "users"\ngateway_table = "gateway.dat"\n'
        'dns_servers = ["127.0.0.1:9"]\n'  # DNS stays on loopback (the tests' checks never ask it anyway)
    )
    config = load_config(toml, {})
    clock = ClockReactor()
    manager = FakeManager(config.server.spool)
    routing = build_routing(config)
    site = make_admin_site(config, manager, routing, clock, SynchronousThreadPool(), SynchronousThreadPool(),
                           dns_check=CountingDnsCheck())
    return World(folder, config, manager, routing, clock, site)


class CountingDnsCheck:
    """The dashboard's DNS check without a DNS: one ok line per domain, and a count of the runs
    (`runs`: each domain checked); calling it starts a run (`check`)."""

    def __init__(self) -> None:
        self.runs: list[str] = []

    def __call__(self):
        return self.check

    def check(self, domain: str) -> list[Finding]:
        self.runs.append(domain)
        return [Finding("ok", "mx", f"{domain}: checked by the test")]
