"""The last lines of a log file, read from its end (the logs grow without bound between rotations)."""

from __future__ import annotations

import os
from pathlib import Path


def last_lines(path: Path, count: int = 20, window: int = 64 * 1024) -> list[str]:
    """Up to `count` last complete lines of `path`, oldest first; [] for a missing file.

    Reads at most `window` bytes from the end; undecodable bytes are replaced.
    """
    try:
        with open(path, "rb") as log:
            size = os.fstat(log.fileno()).st_size
            start = max(0, size - window)
            log.seek(start)
            data = log.read(window)
    except FileNotFoundError:
        return []
    lines = data.split(b"\n")
    if start > 0:
        lines = lines[1:]  # the first line is probably cut
    if lines and lines[-1] == b"":
        lines.pop()
    return [line.decode("utf-8", "replace").rstrip("\r") for line in lines[-count:]]
