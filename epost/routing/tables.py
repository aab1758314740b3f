"""What every line-based table (users, aliases, gateway.dat) shares: reading and error reporting.

A missing file is an empty table (SPEC §2); a bad line is reported as
`path:line: problem` so the operator can go straight to it.
"""

from __future__ import annotations

from pathlib import Path


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
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    lines = []
    for number, raw in enumerate(data.splitlines(), start=1):
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise TableError(path, number, "not valid UTF-8") from None
        if text and not text.startswith("#"):
            lines.append((number, text))
    return lines
