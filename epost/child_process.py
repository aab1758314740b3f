"""The daemon's end of its child processes (the spool workers, the courier): lines both ways."""

from __future__ import annotations

import re
from collections.abc import Callable

from twisted.internet.protocol import ProcessProtocol
from twisted.logger import InvalidLogLevelError, Logger, LogLevel

log = Logger()


_LEVEL = re.compile(r"^\S+ \[[^\]#]*#(\w+)\]")  # twisted.logger's text format: "time [namespace#level] ..."


def level_of(line: str) -> LogLevel:
    """The level a child logged `line` at, so its errors stay errors in our log; info when unknown."""
    match = _LEVEL.match(line)
    try:
        return LogLevel.levelWithName(match.group(1)) if match else LogLevel.info
    except InvalidLogLevelError:
        return LogLevel.info


class LineChild(ProcessProtocol):
    """Hands every line the child writes on stdout to `on_line` (bytes, no
    newline), relays its stderr lines into the daemon's log under `name`
    (at the level the child logged them),
    and tells `on_ended` when the child is gone."""

    def __init__(self, name: str, on_line: Callable[[bytes], None], on_ended: Callable[[object], None]):
        self.name = name
        self.on_line = on_line
        self.on_ended = on_ended
        self._out = b""
        self._err = b""

    def outReceived(self, data: bytes) -> None:
        self._out += data
        *lines, self._out = self._out.split(b"\n")
        for line in lines:
            self.on_line(line)

    def errReceived(self, data: bytes) -> None:
        self._err += data
        *lines, self._err = self._err.split(b"\n")
        for line in lines:
            text = line.decode("utf-8", "replace")
            log.emit(level_of(text), "{name}: {line}", name=self.name, line=text)

    def processEnded(self, reason) -> None:
        self.on_ended(reason)
