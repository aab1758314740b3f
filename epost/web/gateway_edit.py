"""Editing gateway.dat from the web: check with the daemon's own parser, then write atomically, or not at all.

`check()` runs the very code the daemon loads the table with
(`read_table_lines` + `parse_gateway_rule`, as `load_gateway_table` does)
on a private temporary copy of the new text, collecting every bad line
rather than stopping at the first; then `load_gateway_table` itself reads
the copy, so what passes here is what the live reload will accept.
`save()` writes with `write_atomically` (temp file, fsync, rename), so the
daemon's poll sees the old table or the whole new one.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from epost.fsutil import write_atomically
from epost.routing.gateway import GatewayTable, load_gateway_table, parse_gateway_rule
from epost.routing.tables import TableError, read_table_lines


@dataclass(frozen=True)
class Problem:
    line: int
    text: str


def normalize(text: str) -> bytes:
    """Form text -> file bytes: LF line ends, a final newline (a textarea sends CRLF)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if text and not text.endswith("\n"):
        text += "\n"
    return text.encode("utf-8", "surrogateescape")


def version(data: bytes) -> str:
    """A short fingerprint of the file's bytes, to notice an edit made by someone else meanwhile."""
    return hashlib.sha256(data).hexdigest()[:16]


def read_current(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


def check(data: bytes) -> tuple[GatewayTable | None, list[Problem]]:
    """(the table, []) when every line is good, else (None, every problem by line number). Blocking."""
    with tempfile.TemporaryDirectory(prefix="epost-gateway-") as folder:
        copy = Path(folder) / "gateway.dat"
        copy.write_bytes(data)
        try:
            lines = read_table_lines(copy)
        except TableError as error:  # undecodable bytes
            return None, [Problem(error.line, error.problem)]
        problems = []
        for number, text in lines:
            try:
                parse_gateway_rule(text, number)
            except ValueError as error:
                problems.append(Problem(number, str(error)))
        if problems:
            return None, problems
        try:
            return load_gateway_table(copy), []
        except TableError as error:  # cannot differ from the loop above, but the daemon's verdict is the one that counts
            return None, [Problem(error.line, error.problem)]


_saving = threading.Lock()


def save(path: Path, data: bytes, expected_version: str | None) -> tuple[GatewayTable | None, list[Problem], str]:
    """Check `data` and, only if it is good, write it over `path` atomically. Blocking.

    Returns (table or None, problems, note). Refuses (without writing) when
    the file changed since the editor was opened (`expected_version`).
    """
    table, problems = check(data)
    if problems:
        return None, problems, "not saved: the table in force is unchanged"
    with _saving:  # two saves at once: the second sees the first's version, not a lost update
        current = read_current(path)
        if expected_version is not None and version(current) != expected_version:
            return None, [], "not saved: gateway.dat was changed by someone else since you opened it; review the current file"
        if current == data:
            return table, [], "no change"
        target = Path(path).resolve()  # a symlinked gateway.dat stays a symlink
        try:
            mode = stat.S_IMODE(os.stat(target).st_mode)
        except FileNotFoundError:
            mode = 0o644
        write_atomically(target, data, mode=mode)
    return table, [], f"saved {len(table)} rule{'s' if len(table) != 1 else ''}; the daemon picks it up within 2 seconds"
