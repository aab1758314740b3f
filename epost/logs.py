"""senderlog and faillog: the line formats of SPEC §4 and an append-only writer that survives rotation."""

from __future__ import annotations

import functools
import os
import re
import time
from datetime import datetime, timezone, tzinfo
from pathlib import Path
from typing import IO, Any, Callable

# Every character str.splitlines() breaks on, so no reader ever sees half a record.
_LINE_BREAKS = re.compile("[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_SENDERLOG_TIME = "%Y-%m-%dT%H:%M:%S"
NO_ANSWER = "Unable to deliver to destination domain"
_NEEDS_QUOTES = re.compile(r'["\s]')  # str.isspace()'s characters are exactly \s for str patterns


def single_line(text: str) -> str:
    """`text` with every line break (CR, LF, and the Unicode ones) replaced by a space."""
    return _LINE_BREAKS.sub(" ", text)


REPLY_LIMIT = 512  # characters of a peer's reply kept in a senderlog, faillog or Domain.mri line
LINE_JOINER = " | "  # between the lines of a multi-line reply, where the reply had CR LF
ELLIPSIS = "…"  # ends a text cut at its limit


_SHORT_ESCAPES = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape(char: str) -> str:
    """`char` as Python writes it in a string literal: `\\n`, `\\x1b`, `\\u202e`, `\\udcff`."""
    if char in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def printable(text: str, limit: int | None = None, *, join_lines: bool = True) -> str:
    """Text from a peer made safe for a one-line log record: line breaks
    (CR LF, LF, a lone CR) become LINE_JOINER, every other character
    `str.isprintable()` refuses (controls such as ESC, DEL, C1, bidi
    overrides, unassigned code points, surrogate escapes) becomes `\\t`,
    `\\xNN`, `\\uNNNN`..., and past `limit` characters the text is cut and
    ends with ELLIPSIS.

    `join_lines=False` escapes line breaks too (`\\r\\n`), for values that are
    not replies, such as addresses: every character stays visible.

    Idempotent (its output passes through unchanged), so every writer may
    apply it again; quoting for key=value stays the writer's business."""
    if join_lines:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        if "\n" in text:
            text = LINE_JOINER.join(part.strip(" \t") for part in text.split("\n"))
    if not text.isprintable():
        text = "".join(c if c.isprintable() else _escape(c) for c in text)
    if limit is not None and len(text) > limit:
        text = text[: limit - len(ELLIPSIS)] + ELLIPSIS
    return text


def quote_value(value: str) -> str:
    """A senderlog value: bare, or double-quoted with `\\"` and `\\\\` when empty or holding space or quotes."""
    value = printable(value)
    if value and not _NEEDS_QUOTES.search(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@functools.lru_cache(maxsize=4)  # lines come in bursts within the same second
def _utc_stamp(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime(_SENDERLOG_TIME)


def senderlog_line(
    when: float,
    queue_id: str,
    sender: str,
    recipient: str,
    relay: str,
    delay: float,
    attempt: int,
    status: str,
    dsn: str,
    reply: str,
) -> str:
    """One senderlog line (no newline): UTC time with milliseconds, queue ID, then key=value fields.

    Always one line of printable characters: every value goes through
    `printable`, the peer's `reply` cut at REPLY_LIMIT characters too."""
    millis = round(when * 1000)
    stamp = _utc_stamp(millis // 1000)
    fields = (
        ("from", f"<{sender}>"),
        ("to", f"<{recipient}>"),
        ("relay", relay),
        ("delay", f"{delay:.2f}"),
        ("attempt", str(attempt)),
        ("status", status),
        ("dsn", dsn),
        ("reply", printable(reply, REPLY_LIMIT)),
    )
    pairs = " ".join(f"{key}={quote_value(value)}" for key, value in fields)
    return f"{stamp}.{millis % 1000:03d}Z {printable(queue_id)} {pairs}"


def _split_pairs(text: str) -> dict[str, str]:
    """`key=value key="quoted \\" value"` -> {key: value}."""
    pairs: dict[str, str] = {}
    i, n = 0, len(text)
    while i < n:
        eq = text.find("=", i)
        if eq < 0:
            raise ValueError(f"no key=value at column {i}")
        key = text[i:eq]
        i = eq + 1
        if i < n and text[i] == '"':
            chars: list[str] = []
            i += 1
            while i < n and text[i] != '"':
                if text[i] == "\\" and i + 1 < n:
                    i += 1
                chars.append(text[i])
                i += 1
            if i >= n:
                raise ValueError("unclosed quote")
            value = "".join(chars)
            i += 1
        else:
            end = text.find(" ", i)
            end = n if end < 0 else end
            value, i = text[i:end], end
        pairs[key] = value
        if i < n:
            if text[i] != " ":
                raise ValueError(f"junk after {key}=")
            i += 1
    return pairs


def _unbracket(value: str) -> str:
    if not (value.startswith("<") and value.endswith(">")):
        raise ValueError(f"address not in <>: {value!r}")
    return value[1:-1]


def parse_senderlog_line(line: str) -> dict[str, Any]:
    """Invert senderlog_line(): returns its keyword arguments (`when` to the millisecond, `delay` to 1/100 s)."""
    line = line.rstrip("\n")
    parts = line.split(" ", 2)
    if len(parts) != 3 or not parts[0].endswith("Z"):
        raise ValueError(f"not a senderlog line: {line!r}")
    stamp, queue_id, rest = parts
    try:
        seconds, _, millis = stamp[:-1].partition(".")
        moment = datetime.strptime(seconds, _SENDERLOG_TIME).replace(tzinfo=timezone.utc)
        when = (int(moment.timestamp()) * 1000 + int(millis)) / 1000
        fields = _split_pairs(rest)
        return {
            "when": when,
            "queue_id": queue_id,
            "sender": _unbracket(fields["from"]),
            "recipient": _unbracket(fields["to"]),
            "relay": fields["relay"],
            "delay": float(fields["delay"]),
            "attempt": int(fields["attempt"]),
            "status": fields["status"],
            "dsn": fields["dsn"],
            "reply": fields["reply"],
        }
    except KeyError as missing:
        raise ValueError(f"senderlog line without {missing}=: {line!r}") from None
    except ValueError as error:
        raise ValueError(f"bad senderlog line ({error}): {line!r}") from None


def faillog_line(
    when: float,
    queue_id: str,
    hostname: str,
    sender: str,
    recipient: str,
    reply: str | None,
    tz: tzinfo | None = None,
) -> str:
    """One faillog line (no newline) in E-Post's format, local time (or `tz`), English month names;
    printable, the bracketed reply cut at REPLY_LIMIT characters."""
    moment = datetime.fromtimestamp(when, tz)
    stamp = f"{moment.day:02d}/{_MONTHS[moment.month - 1]}/{moment.year:04d}:{moment:%H:%M:%S}"
    text = NO_ANSWER if reply is None else printable(reply, REPLY_LIMIT)
    return printable(
        f"<{queue_id}@{hostname}> send fail on [{stamp}] from {sender or '<>'} to {recipient} [{text}]"
    )


class LineLog:
    """An append-only log file, one flushed line per write, reopened when rotated away (renamed or deleted).

    Blocking but cheap: rotation is noticed by a stat at most once a second
    (`reopen()` also fits a SIGUSR1 hook).
    """

    check_every = 1.0  # seconds between rotation checks

    def __init__(self, path: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(path)
        self._file: IO[str] | None = None
        self._identity: tuple[int, int] | None = None
        self._clock = clock
        self._checked = 0.0

    def _open(self) -> IO[str]:
        self._file = open(self.path, "a+", buffering=1, encoding="utf-8", errors="backslashreplace")
        st = os.fstat(self._file.fileno())
        self._identity = (st.st_dev, st.st_ino)
        self._checked = self._clock()
        if st.st_size and os.pread(self._file.fileno(), 1, st.st_size - 1) != b"\n":
            self._file.write("\n")  # a line cut short (a full disk, a crash) stays apart from the next
        return self._file

    def _current(self) -> IO[str]:
        if self._file is None:
            return self._open()
        now = self._clock()
        if now - self._checked < self.check_every:
            return self._file
        self._checked = now
        try:
            st = os.stat(self.path)
            rotated = (st.st_dev, st.st_ino) != self._identity
        except FileNotFoundError:
            rotated = True
        if rotated:
            self.reopen()
            assert self._file is not None
        return self._file

    def write(self, line: str) -> None:
        """Append `line` (line breaks inside it flattened) and flush it.

        Raises OSError (a full disk): the line is not written, and the file is
        reopened at the next write, so no buffered remnant of it follows."""
        try:
            self._current().write(single_line(line) + "\n")
        except OSError:
            self._drop()
            raise

    def _drop(self) -> None:
        if self._file is not None:
            try:
                self._file.close()  # flushes what is buffered: fails again, and the descriptor closes
            except OSError:
                pass
            self._file = None

    def reopen(self) -> None:
        """Close and reopen the path, e.g. after logrotate moved the file."""
        self.close()
        self._open()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
