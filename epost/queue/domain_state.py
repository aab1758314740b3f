"""Domain.mri: the retry state of one destination domain (SPEC §4), in E-Post's `Key: value` format.

The store's methods block (file I/O plus fsync): call them from a worker thread.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from epost.fsutil import fsync_dir, write_atomically
from epost.logs import REPLY_LIMIT, printable, single_line

FILE_NAME = "Domain.mri"


@dataclass(frozen=True)
class DomainState:
    """Retry state of a domain; times are Unix seconds, `err_code` 0 means there was no answer."""

    domain: str
    last_tried: int = 0
    try_number: int = 0
    err_code: int = 0
    err_text: str = ""
    next_try: int = 0
    first_failure: int = 0
    last_host: str = ""
    messages: int = 0
    # Receiver-aware delivery's keys (issue 14), written after all the others:
    # (key, value) pairs such as ("State", "throttled"), ("Resume-at", "1796025960").
    extra: tuple[tuple[str, str], ...] = ()


# SPEC order: E-Post's own four keys first, so its tooling keeps working.
_KEYS = (
    ("Domain-name", "domain"),
    ("Last-tried", "last_tried"),
    ("Try-number", "try_number"),
    ("Err-code", "err_code"),
    ("Err-text", "err_text"),
    ("Next-try", "next_try"),
    ("First-failure", "first_failure"),
    ("Last-host", "last_host"),
    ("Messages", "messages"),
)
_FIELD_BY_KEY = {key.lower(): field for key, field in _KEYS}
EXTRA_KEYS = ("State", "Resume-at", "Slow-until", "Rate-limit", "Connection-limit", "Hold-until",
              "Greylist-delay", "Auto-whitelist", "Destination")
_EXTRA_BY_KEY = {key.lower(): key for key in EXTRA_KEYS}
_INT_FIELDS = frozenset(f.name for f in dataclasses.fields(DomainState) if f.type in ("int", int))


def format_mri(state: DomainState) -> str:
    """The file text: one `Key: value` line per field, in SPEC order, every value
    printable on one line (`epost.logs.printable`), the peer's Err-text cut at REPLY_LIMIT."""
    text = "".join(f"{key}: {_value(field, getattr(state, field))}\n" for key, field in _KEYS)
    return text + "".join(f"{key}: {printable(str(value))}\n" for key, value in state.extra if key in _EXTRA_BY_KEY.values())


def _value(field: str, value: object) -> str:
    return printable(str(value), REPLY_LIMIT if field == "err_text" else None)


def parse_mri(text: str, path: Path | str) -> DomainState:
    """Read a Domain.mri; unknown keys and blank lines are ignored, missing keys (but Domain-name) default.

    Raises ValueError naming `path` and the line for a malformed line.
    """
    values: dict[str, object] = {}
    extra: list[tuple[str, str]] = []
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep or not key.strip():
            raise ValueError(f"{path}:{number}: expected 'Key: value', got {line!r}")
        field = _FIELD_BY_KEY.get(key.strip().lower())
        if field is None:
            if key.strip().lower() in _EXTRA_BY_KEY:
                extra.append((_EXTRA_BY_KEY[key.strip().lower()], value.strip()))
            continue
        value = value[1:] if value.startswith(" ") else value
        if field in _INT_FIELDS:
            try:
                values[field] = int(value.strip())
            except ValueError:
                raise ValueError(f"{path}:{number}: {key.strip()} is not a whole number: {value!r}") from None
        else:
            values[field] = value
    if not values.get("domain"):
        raise ValueError(f"{path}: no Domain-name line")
    return DomainState(**values, extra=tuple(extra))  # type: ignore[arg-type]


def domain_folder(domain: str) -> str:
    """The folder name for `domain`: lower-case; refuses anything that could leave `root`."""
    name = domain.strip().lower()
    if not name or "/" in name or "\0" in name or name.startswith(".") or single_line(name) != name:
        raise ValueError(f"not a usable domain name for the spool: {domain!r}")
    return name


class DomainStateStore:
    """Domain.mri files under `root` (spool/domains), one folder per domain that has mail waiting for retry."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _path(self, domain: str) -> Path:
        return self.root / domain_folder(domain) / FILE_NAME

    def write(self, state: DomainState) -> None:
        """Atomically replace the domain's Domain.mri (creating its folder); the domain is stored lower-case."""
        name = domain_folder(state.domain)
        path = self.root / name / FILE_NAME
        if not path.parent.is_dir():
            path.parent.mkdir(parents=True, exist_ok=True)
            fsync_dir(self.root)
        text = format_mri(dataclasses.replace(state, domain=name))
        write_atomically(path, text.encode("utf-8", "backslashreplace"), mode=0o644)

    def read(self, domain: str) -> DomainState | None:
        """The stored state, or None when the domain has no Domain.mri."""
        path = self._path(domain)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        return parse_mri(data.decode("utf-8", "replace"), path)

    def remove(self, domain: str) -> None:
        """Forget the domain once nothing waits for it: its Domain.mri, crash-left temp files, and the folder."""
        folder = self._path(domain).parent
        if not folder.is_dir():
            return
        (folder / FILE_NAME).unlink(missing_ok=True)
        for leftover in folder.glob(f".{FILE_NAME}.*"):
            leftover.unlink(missing_ok=True)
        try:
            folder.rmdir()
        except FileNotFoundError:
            return
        fsync_dir(self.root)

    def domains(self) -> list[str]:
        """Domains that have a Domain.mri, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(
            entry.name
            for entry in self.root.iterdir()
            if not entry.name.startswith(".") and (entry / FILE_NAME).is_file()
        )
