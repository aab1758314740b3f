"""What every line-based table (users, aliases, gateway.dat) shares: reading and error reporting.

A missing file is an empty table (SPEC §2); a bad line is reported as
`path:line: problem` so the operator can go straight to it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

# One line with its ending, as bytes.splitlines() splits: LF, CR or CRLF; the last may have none.
_LINE = re.compile(rb"[^\r\n]*(?:\r\n|[\r\n])|[^\r\n]+\Z")


class TableError(ValueError):
    """A bad table line; str() is the one line shown to the operator."""

    def __init__(self, path: Path | str, line: int, problem: str) -> None:
        super().__init__(path, line, problem)
        self.path = path
        self.line = line
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.problem}"


def read_table_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, stripped text) of every line that is neither blank nor a `#` comment.

    A missing file gives []. Undecodable bytes are a TableError on their line
    rather than a crash, so check-config can name them.
    """
    return list(iter_table_lines(path))


def iter_table_lines(path: Path) -> Iterator[tuple[int, str]]:
    """As `read_table_lines`, one line at a time.

    A loader that consumes lines as they come keeps only the file's bytes
    and its own entries alive, not a list of every line beside them: a
    smaller peak, and its entries packed together in memory, so a replaced
    table's memory can go back to the system (docs/routing.md, "Memory").
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    for number, match in enumerate(_LINE.finditer(data), start=1):
        raw = match.group().rstrip(b"\r\n")
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise TableError(path, number, "not valid UTF-8") from None
        if text and not text.startswith("#"):
            yield number, text

