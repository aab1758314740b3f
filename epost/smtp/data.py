"""Incremental DATA reader: finds CRLF.CRLF, unstuffs dots, checks limits.

Works on whole chunks with bytes operations (find, replace, one regex
search) instead of a callback per line: this is the receive hot path.

Correctness rests on one invariant: the reader only hands out bytes it can
fully judge. Every pattern it looks for (`\\r\\n.\\r\\n`, `\\r\\n.`, a bare CR)
starts with CR and is at most 5 bytes long, so the reader holds back the
tail from the first CR among the last four bytes; any pattern crossing a
chunk boundary is then seen whole in the next call. A virtual CRLF before
the first byte makes the first line behave like every other line.
"""

from __future__ import annotations

from dataclasses import dataclass

_END = b"\r\n.\r\n"
_LINE_START_DOT = b"\r\n."  # RFC 5321 §4.5.2: drop the first dot of any line
MAX_LINE = 1000  # octets including CRLF (RFC 5321 §4.5.3.1.6)


@dataclass
class DataResult:
    """What one `feed` produced."""

    content: bytes  # unstuffed message bytes to store (may be empty)
    done: bool = False  # CRLF.CRLF seen
    rest: bytes = b""  # bytes after the terminator: the next commands


class DataReader:
    """Feed raw DATA bytes; get content to store and the end of the message.

    The reader never stops reading because of a problem: a bare CR/LF, an
    over-long line or an oversized message only sets a flag, and the caller
    refuses the message once CRLF.CRLF has arrived. Leaving DATA mode early
    would let the rest of the body run as commands (long-line smuggling).
    """

    def __init__(self, max_size: int, max_line: int = MAX_LINE):
        self.max_size = max_size
        self.max_line = max_line
        self.size = 0  # unstuffed content bytes seen (also past max_size)
        self.bare_newline = False
        self.line_too_long = False
        self._carry = b"\r\n"  # the virtual CRLF before the first line
        self._started = False
        self._line_length = 0  # bytes of the current (unfinished) wire line, CRLF excluded

    @property
    def too_big(self) -> bool:
        return self.size > self.max_size

    def feed(self, chunk: bytes) -> DataResult:
        buffer = self._carry + chunk
        end = buffer.find(_END)
        if end >= 0:
            done, rest = True, buffer[end + len(_END) :]
            ready, self._carry = buffer[: end + 2], b""
        else:
            done, rest = False, b""
            hold = buffer.find(b"\r", max(0, len(buffer) - 4))
            if hold < 0:
                ready, self._carry = buffer, b""
            else:
                ready, self._carry = buffer[:hold], buffer[hold:]
        self._check(ready)
        content = ready.replace(_LINE_START_DOT, b"\r\n")
        if not self._started and content:
            content = content[2:]  # drop the virtual CRLF
            self._started = True
        self.size += len(content)
        if self.size > self.max_size:
            content = b""  # stop storing; keep counting and scanning
        return DataResult(content, done, rest)

    def _check(self, ready: bytes) -> None:
        if not self.bare_newline:
            # Every CR and every LF belongs to a CRLF pair exactly when the
            # three counts agree (CRLF occurrences cannot overlap).
            pairs = ready.count(b"\r\n")
            if ready.count(b"\r") != pairs or ready.count(b"\n") != pairs:
                self.bare_newline = True
        if self.line_too_long:
            return
        # Wire line lengths; the virtual leading CRLF starts the first line.
        last = ready.rfind(b"\n")
        if last < 0:
            self._line_length += len(ready)
        else:
            if self._line_length + ready.find(b"\n") + 1 > self.max_line:
                self.line_too_long = True
            elif len(ready) > self.max_line and _has_line_over(ready, self.max_line):
                self.line_too_long = True
            self._line_length = len(ready) - last - 1
        if self._line_length + 2 > self.max_line:
            self.line_too_long = True


def _has_line_over(data: bytes, limit: int) -> bool:
    """Whether some LF-separated piece of `data`, with its LF, is longer than `limit`.

    If every window of `limit // 2` bytes holds an LF, no two LFs are `limit`
    or more apart, so no piece is too long: one `find` per window instead of
    splitting a 64 KiB chunk into a thousand lines (a sixth of the reactor's
    time per 100 KiB message). Only a window without an LF needs the exact count.
    """
    half = max(1, limit // 2)
    last = data.rfind(b"\n")
    # Windows up to the last LF only: a chunk's short tail window rarely holds one,
    # and the piece after it is measured directly.
    for start in range(0, last + 1, half):
        if data.find(b"\n", start, start + half) < 0:
            return max(map(len, data.split(b"\n"))) + 1 > limit
    return len(data) - last > limit
