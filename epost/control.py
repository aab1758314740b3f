"""The control channel: `epost flush|hold|release|delete|reroute` reach the running daemon (SPEC §8).

An AMP protocol on a UNIX socket in the spool (``control.sock``, mode 0600:
only the queue's owner may operate on it). The daemon carries the action
out in its delivery manager, which owns the queue, so the surgery never
races a delivery. With the daemon down, `epost` works on the queue store itself
(see `epost.queue.surgery`).
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path
from typing import Any

from twisted.application import internet
from twisted.internet import defer
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp

log = Logger()

SOCKET_NAME = "control.sock"
ACTIONS = ("flush", "hold", "release", "delete", "reroute")


class Operate(amp.Command):
    """One operator action on some messages (`ids`), a destination domain, or (flush) everything."""

    arguments = [
        (b"action", amp.Unicode()),
        (b"ids", amp.ListOf(amp.Unicode())),
        (b"domain", amp.Unicode(optional=True)),
    ]
    response = [(b"done", amp.ListOf(amp.Unicode())), (b"errors", amp.ListOf(amp.Unicode()))]
    errors = {ValueError: b"BAD_REQUEST"}


class Route(amp.Command):
    """`epost route ADDRESS`: the route lines from the tables the daemon has in force (SPEC §8 format),
    the exit status, and a note per table whose file on disk is not the one in force."""

    arguments = [(b"address", amp.Unicode()), (b"dns", amp.Boolean())]
    response = [(b"lines", amp.ListOf(amp.Unicode())), (b"status", amp.Integer()), (b"notes", amp.ListOf(amp.Unicode()))]
    errors = {ValueError: b"BAD_REQUEST"}


class Verify(amp.Command):
    """`epost verify ADDRESS`: probe the address now (SPEC §3.5); the verdict is cached."""

    arguments = [(b"address", amp.Unicode())]
    response = [
        (b"status", amp.Unicode()),
        (b"text", amp.Unicode()),
        (b"host", amp.Unicode(optional=True)),
        (b"expires", amp.Float()),
    ]
    errors = {ValueError: b"BAD_REQUEST"}


class ControlProtocol(amp.AMP):
    def __init__(self, manager: Any) -> None:
        super().__init__()
        self.manager = manager

    @Operate.responder
    def operate(self, action: str, ids: list[str], domain: str | None = None):
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}")
        if action == "flush":
            result = self.manager.flush_some(ids, domain)
            return {"done": result.done, "errors": result.errors}
        method = getattr(self.manager, action)
        d = defer.ensureDeferred(method(ids, domain))
        return d.addCallback(lambda result: {"done": result.done, "errors": result.errors})

    @Route.responder
    def route(self, address: str, dns: bool):
        answer = getattr(self.factory, "answer_route", None)  # set by make_service
        if answer is None:
            raise ValueError("this daemon does not answer routes")
        return answer(address, dns)

    @Verify.responder
    def verify(self, address: str):
        from epost.delivery.verify import verify_now

        verifier = getattr(self.manager, "verifier", None)
        if verifier is None:
            raise ValueError("recipient verification is off ([routing] verify_recipients = false)")
        d = verify_now(verifier, self.manager.route_final, address)
        return d.addCallback(lambda v: {"status": v.status, "text": v.text, "host": v.host, "expires": v.expires})


def socket_path(spool: Path) -> Path:
    return Path(spool) / SOCKET_NAME


def control_service(spool: Path, manager: Any, reactor: Any) -> internet.StreamServerEndpointService:
    """Listens on the spool's control socket; a socket left by a dead daemon is replaced.

    No PID lock beside the socket (`wantPID`): a dead daemon's PID, still a
    zombie or reused after a reboot, kept the socket from being served. The
    daemon holds the spool's lock (epost.store.lock) before this starts, so
    whatever sits at the path is a leftover; and a socket that cannot be
    served stops start-up, so `epost` never meets a live daemon without one."""
    path = socket_path(spool)
    if len(os.fsencode(path)) > 100:
        log.warn("control socket path {path} is long; UNIX sockets allow about 107 bytes", path=path)
    endpoint = UNIXServerEndpoint(reactor, str(path), mode=0o600, wantPID=False)
    factory = Factory.forProtocol(lambda: ControlProtocol(manager))
    factory.noisy = False
    return _ControlService(endpoint, factory, path)


class DaemonNotRunning(Exception):
    """Nothing listens on the control socket: the caller may work on the queue store directly."""


def operate(spool: Path, action: str, ids: list[str], domain: str | None, timeout: float = 60) -> dict:
    """Ask the daemon (blocking: the command line has no reactor to spare);
    raises DaemonNotRunning when nothing listens on the spool's socket."""
    arguments: dict[str, Any] = {"action": action, "ids": ids}
    if domain is not None:
        arguments["domain"] = domain
    return ask(spool, Operate, arguments, timeout)


def _read_box(stream) -> amp.AmpBox:
    """One AMP box: 2-byte-length key and value pairs up to an empty key."""
    box = amp.AmpBox()
    while True:
        key = _read_sized(stream)
        if not key:
            return box
        box[key] = _read_sized(stream)


def _read_sized(stream) -> bytes:
    header = stream.read(2)
    if len(header) < 2:
        raise ConnectionError("the daemon closed the control connection")
    size = int.from_bytes(header, "big")
    data = stream.read(size)
    if len(data) < size:
        raise ConnectionError("the daemon closed the control connection")
    return data


class _ControlService(internet.StreamServerEndpointService):
    """Removes what a dead daemon left at the socket's path before listening; a listening failure is raised."""

    _raiseSynchronously = True

    def __init__(self, endpoint, factory, path: Path):
        super().__init__(endpoint, factory)
        self.path = Path(path)

    def privilegedStartService(self) -> None:
        remove_leftovers(self.path)
        super().privilegedStartService()


def remove_leftovers(path: Path) -> None:
    """The socket and the `.lock` link (Twisted's wantPID, older epost) a dead daemon left.

    Only call this while holding the spool's lock; anything else at the path is left for bind() to refuse."""
    for leftover, is_ours in ((path, stat.S_ISSOCK), (Path(f"{path}.lock"), stat.S_ISLNK)):
        try:
            if is_ours(os.lstat(leftover).st_mode):
                os.unlink(leftover)
        except FileNotFoundError:
            pass


class RouteAnswers:
    """Answers Route in the daemon with the resolver `build_routing` gave it; the work (MX
    lookups included) runs in `threadpool`, never on the reactor."""

    dns_timeout = 8.0  # seconds; one of the daemon's worker threads waits this long at most

    def __init__(self, routing: Any, dns_servers: tuple, reactor: Any, threadpool: Any) -> None:
        self.routing = routing
        self.dns_servers = dns_servers
        self.reactor = reactor
        self.threadpool = threadpool

    def __call__(self, address: str, dns: bool) -> defer.Deferred:
        from twisted.internet.threads import deferToThreadPool

        return deferToThreadPool(self.reactor, self.threadpool, self.answer, address, dns)

    def answer(self, address: str, dns: bool) -> dict:
        """Blocking: {"lines", "status", "notes"}."""
        from epost.routing.explain import route_lines  # the same lines as `epost route`
        from epost.routing.dns import MXResolver

        resolver = MXResolver(None, None, self.dns_servers, timeout=self.dns_timeout) if dns else None
        lines, status = route_lines(self.routing.resolver, address, resolver)
        notes = [note for table in self.routing.tables if (note := table.disk_note()) is not None]
        return {"lines": lines, "status": status, "notes": notes}


def ask_route(spool: Path, address: str, dns: bool, timeout: float = 60) -> dict:
    """Route through the running daemon (blocking); DaemonNotRunning when nothing listens,
    RuntimeError when it refuses (a daemon older than the Route command, say)."""
    return ask(spool, Route, {"address": address, "dns": dns}, timeout)


def ask(spool: Path, command: type[amp.Command], arguments: dict[str, Any], timeout: float = 60) -> dict:
    """Send one AMP `command` to the daemon on the spool's socket and return its parsed answer (blocking)."""
    path = socket_path(spool)
    if not path.exists():
        raise DaemonNotRunning(str(path))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(timeout)
        try:
            connection.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError) as error:  # left by a dead daemon
            raise DaemonNotRunning(f"{path}: {error}") from None
        box = command.makeArguments(arguments, None)
        box[b"_command"] = command.commandName
        box[b"_ask"] = b"1"
        connection.sendall(box.serialize())
        with connection.makefile("rb") as stream:
            answer = _read_box(stream)
    if b"_error" in answer:
        raise RuntimeError(answer.get(b"_error_description", b"the daemon refused").decode("utf-8", "replace"))
    return command.parseResponse(answer, None)


def ask_verify(spool: Path, address: str, timeout: float = 30) -> dict:
    """`epost verify` through the running daemon (blocking); DaemonNotRunning when none listens."""
    return ask(spool, Verify, {"address": address}, timeout)
