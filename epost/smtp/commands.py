"""Pure parsing of SMTP command lines (no I/O, no state)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from epost.address import Address, AddressError, parse_path

_PATH = r'<(?:"(?:[^"\\]|\\.)*"|[^<>"])*>'
_MAIL = re.compile(rf"FROM:\s*({_PATH})(.*)\Z", re.IGNORECASE | re.DOTALL)
_RCPT = re.compile(rf"TO:\s*({_PATH})(.*)\Z", re.IGNORECASE | re.DOTALL)
_PARAM = re.compile(r"([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e]+))?\Z")


class CommandSyntaxError(ValueError):
    """Carries the enhanced status code and text for a 501/555 reply."""

    def __init__(self, code: int, enhanced: str, text: str):
        super().__init__(text)
        self.code, self.enhanced, self.text = code, enhanced, text


@dataclass(frozen=True)
class PathCommand:
    address: Address | None  # None is the null reverse-path <>
    params: dict[str, str | None] = field(default_factory=dict)


def split_command(line: str) -> tuple[str, str]:
    """`"mail FROM:<a@b>"` -> `("MAIL", "FROM:<a@b>")`."""
    verb, _, argument = line.partition(" ")
    return verb.upper(), argument.strip(" ")


def _parse_params(text: str) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    for word in text.split():
        match = _PARAM.match(word)
        if not match:
            raise CommandSyntaxError(501, "5.5.4", f"Syntax error in parameter {word!r}")
        params[match.group(1).upper()] = match.group(2)
    return params


def _parse(pattern: re.Pattern, argument: str, usage: str, allow_null: bool) -> PathCommand:
    match = pattern.match(argument)
    if not match:
        raise CommandSyntaxError(501, "5.5.4", f"Syntax: {usage}")
    rest = match.group(2)
    if rest and not rest[0].isspace():
        raise CommandSyntaxError(501, "5.5.4", f"Syntax: {usage}")
    try:
        address = parse_path(match.group(1), allow_null=allow_null)
    except AddressError as error:
        enhanced = "5.1.7" if allow_null else "5.1.3"  # bad sender / bad recipient syntax
        raise CommandSyntaxError(501, enhanced, f"Bad address syntax: {error}") from None
    return PathCommand(address, _parse_params(rest))


def parse_mail(argument: str) -> PathCommand:
    return _parse(_MAIL, argument, "MAIL FROM:<address>", allow_null=True)


def parse_rcpt(argument: str) -> PathCommand:
    return _parse(_RCPT, argument, "RCPT TO:<address>", allow_null=False)
