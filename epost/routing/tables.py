"""What every line-based table (users, aliases, gateway.dat) shares: reading and error reporting.

A missing file is an empty table (SPEC §2); a bad line is reported as
`path:line: problem` so the operator can go straight to it.
"""

from __future__ import annotations

import re
from array import array
from bisect import bisect_left
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



class PackedMap:
    """An immutable str -> str map kept in two buffers: the UTF-8 keys and values, sorted by
    key, end to end in one bytes, and an array of where each key and value ends.

    A dict of 100,000 short strings is 200,000 small objects that the
    allocator scatters among everything else the parse made; once such a
    table was replaced, its memory could not go back to the system and the
    daemon's RSS stayed high. Two large buffers are freed whole.
    A lookup is a binary search: about 17 probes for 100,000 keys, a few µs.
    """

    __slots__ = ("_blob", "_ends")

    def __init__(self, items: dict[str, str] | None = None) -> None:
        items = items or {}
        buffer = bytearray()
        ends = array("Q")
        for key in sorted(items):  # code point order is UTF-8 byte order
            buffer += key.encode("utf-8", "surrogateescape")
            ends.append(len(buffer))
            buffer += items[key].encode("utf-8", "surrogateescape")
            ends.append(len(buffer))
        self._blob = bytes(buffer)
        self._ends = ends

    def __len__(self) -> int:
        return len(self._ends) // 2

    def _key(self, index: int) -> bytes:
        start = self._ends[2 * index - 1] if index else 0
        return self._blob[start : self._ends[2 * index]]

    def _value(self, index: int) -> str:
        return self._blob[self._ends[2 * index] : self._ends[2 * index + 1]].decode("utf-8", "surrogateescape")

    def _find(self, key: str) -> int:
        wanted = key.encode("utf-8", "surrogateescape")
        index = bisect_left(_Keys(self), wanted)
        return index if index < len(self) and self._key(index) == wanted else -1

    def get(self, key: str, default: str | None = None) -> str | None:
        index = self._find(key)
        return self._value(index) if index != -1 else default

    def __contains__(self, key: str) -> bool:
        return self._find(key) != -1

    def keys(self) -> Iterator[str]:
        for index in range(len(self)):
            yield self._key(index).decode("utf-8", "surrogateescape")

    def items(self) -> Iterator[tuple[str, str]]:
        for index in range(len(self)):
            yield self._key(index).decode("utf-8", "surrogateescape"), self._value(index)


class _Keys:
    """The keys of a PackedMap as a sequence, for bisect."""

    __slots__ = ("_map",)

    def __init__(self, packed: PackedMap) -> None:
        self._map = packed

    def __len__(self) -> int:
        return len(self._map)

    def __getitem__(self, index: int) -> bytes:
        return self._map._key(index)
