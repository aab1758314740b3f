"""Outbound DATA encoding (toward issue 4): dot-stuffing and line ends.

Twisted's client stuffs wrongly at the first line and at 16 KiB chunk
boundaries (research notes §2); this one keeps the one bit of state that
matters, "the next byte starts a line", across chunks. It also turns any
bare CR or LF into CRLF, so a bare line end never leaves epost and cannot
end the message early at the next hop (SMTP smuggling).
"""

from __future__ import annotations

import re

_BARE = re.compile(rb"\r\n|\r|\n")


class DotStuffer:
    def __init__(self) -> None:
        self._line_start = True
        self._pending_cr = False  # a chunk ended in CR: its LF may open the next one

    def feed(self, chunk: bytes) -> bytes:
        if self._pending_cr:
            chunk = b"\r" + chunk
            self._pending_cr = False
        if chunk.endswith(b"\r"):
            chunk, self._pending_cr = chunk[:-1], True
        if not chunk:
            return b""
        pairs = chunk.count(b"\r\n")
        if chunk.count(b"\r") != pairs or chunk.count(b"\n") != pairs:
            chunk = _BARE.sub(b"\r\n", chunk)  # rare: only content we did not receive ourselves
        out = chunk.replace(b"\n.", b"\n..")
        if self._line_start and out.startswith(b"."):
            out = b"." + out
        self._line_start = out.endswith(b"\n")
        return out

    def end(self) -> bytes:
        """The bytes that close the message: a final CRLF if missing, then `.` CRLF."""
        tail = b""
        if self._pending_cr:
            self._pending_cr = False
            tail, self._line_start = b"\r\n", True
        if not self._line_start:
            tail += b"\r\n"
        return tail + b".\r\n"


def failure_kind(code: int | None) -> str:
    """The retry policy's kind for an SMTP outcome; None means no answer
    (refused, timed out, dropped before the final reply)."""
    if code is None:
        return "noanswer"
    if 400 <= code < 500:
        return "4xx"
    if 500 <= code < 600:
        return "5xx"
    raise ValueError(f"{code} is not a failure")
