"""The control channel: `epost flush|hold|release|delete|reroute` reach the running daemon (SPEC §8).

An AMP protocol on a UNIX socket in the spool (``control.sock``, mode 0600:
only the queue's owner may operate on it). The daemon carries the action
out in its delivery manager, which owns the queue, so the surgery never
races a delivery. With the daemon down, `epost` works on the files itself
(see `epost.queue.surgery`).
"""

from __future__ import annotations

import os
import socket
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


def operate(spool: Path, action: str, ids: list[str], domain: str | None, timeout: float = 60) -> dict:
    """Ask the daemon (blocking: the command line has no reactor to spare);
    raises DaemonNotRunning when nothing listens on the spool's socket."""
    path = socket_path(spool)
    if not path.exists():
        raise DaemonNotRunning(str(path))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(timeout)
        try:
            connection.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError) as error:  # left by a dead daemon
            raise DaemonNotRunning(f"{path}: {error}") from None
        arguments: dict[str, Any] = {"action": action, "ids": ids}
        if domain is not None:
            arguments["domain"] = domain
        box = Operate.makeArguments(arguments, None)
        box[b"_command"] = Operate.commandName
        box[b"_ask"] = b"1"
        connection.sendall(box.serialize())
        with connection.makefile("rb") as stream:
            answer = _read_box(stream)
    if b"_error" in answer:
        raise RuntimeError(answer.get(b"_error_description", b"the daemon refused").decode("utf-8", "replace"))
    return Operate.parseResponse(answer, None)


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


def ask_verify(spool: Path, address: str, timeout: float = 30) -> dict:
    """`epost verify` through the running daemon (blocking); DaemonNotRunning when none listens."""
    path = socket_path(spool)
    if not path.exists():
        raise DaemonNotRunning(str(path))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(timeout)
        try:
            connection.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError) as error:
            raise DaemonNotRunning(f"{path}: {error}") from None
        box = Verify.makeArguments({"address": address}, None)
        box[b"_command"] = Verify.commandName
        box[b"_ask"] = b"1"
        connection.sendall(box.serialize())
        with connection.makefile("rb") as stream:
            answer = _read_box(stream)
    if b"_error" in answer:
        raise RuntimeError(answer.get(b"_error_description", b"the daemon refused").decode("utf-8", "replace"))
    return Verify.parseResponse(answer, None)
