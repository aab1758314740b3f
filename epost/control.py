"""The control channel: `epost flush|hold|release|delete|reroute` reach the running daemon (SPEC §8).

An AMP protocol on a UNIX socket in the spool (``control.sock``, mode 0600:
only the queue's owner may operate on it). The daemon carries the action
out in its delivery manager, which owns the queue, so the surgery never
races a delivery. With the daemon down, `epost` works on the files itself
(see `epost.queue.surgery`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from twisted.application import internet
from twisted.internet import defer
from twisted.internet.endpoints import UNIXClientEndpoint, UNIXServerEndpoint, connectProtocol
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


def socket_path(spool: Path) -> Path:
    return Path(spool) / SOCKET_NAME


def control_service(spool: Path, manager: Any, reactor: Any) -> internet.StreamServerEndpointService:
    """Listens on the spool's control socket; a socket left by a dead daemon is replaced."""
    path = socket_path(spool)
    if len(os.fsencode(path)) > 100:
        log.warn("control socket path {path} is long; UNIX sockets allow about 107 bytes", path=path)
    endpoint = UNIXServerEndpoint(reactor, str(path), mode=0o600, wantPID=True)
    factory = Factory.forProtocol(lambda: ControlProtocol(manager))
    factory.noisy = False
    return internet.StreamServerEndpointService(endpoint, factory)


class DaemonNotRunning(Exception):
    """Nothing listens on the control socket: the caller may work on the files directly."""


async def operate(reactor: Any, spool: Path, action: str, ids: list[str], domain: str | None) -> dict:
    """Ask the daemon; raises DaemonNotRunning when no daemon listens on the spool's socket."""
    path = socket_path(spool)
    if not path.exists():
        raise DaemonNotRunning(str(path))
    endpoint = UNIXClientEndpoint(reactor, str(path), timeout=10)
    try:
        protocol = await connectProtocol(endpoint, amp.AMP())
    except Exception as error:  # ConnectionRefused: a socket file left by a dead daemon
        raise DaemonNotRunning(f"{path}: {error}") from None
    try:
        arguments: dict[str, Any] = {"action": action, "ids": ids}
        if domain is not None:
            arguments["domain"] = domain
        return await protocol.callRemote(Operate, **arguments)
    finally:
        protocol.transport.loseConnection()
