"""Authentication-Results (RFC 8601) for inbound mail: the pure part (SPEC §9).

No I/O here: the checks themselves (SPF, DKIM, DMARC lookups) run in
`epost/smtp/authcheck.py`; this module turns their results into the header,
removes earlier headers that claim to be ours, and decides DMARC alignment
(RFC 7489 §3.1) and the DMARC result from plain values.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from epost.headers import header_end

# RFC 2045 token: what a property value may be without quotes.
_TOKEN = re.compile(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+\Z")
# RFC 8601 pvalue's other bare form, [local-part] "@" domain-name, with a dot-atom local-part.
_ATEXT = r"[!#$%&'*+\-/=?^_`{|}~0-9A-Za-z]+"
_ADDR = re.compile(rf"(?:{_ATEXT}(?:\.{_ATEXT})*)?@[0-9A-Za-z](?:[0-9A-Za-z.-]*[0-9A-Za-z])?\Z")
_FIELD_NAME = b"authentication-results"
FOLD = "\r\n\t"
_NEXT_FIELD = re.compile(rb"\r\n(?![ \t])")  # a line break not followed by a continuation

# RFC 8601 §2.7.2 SPF result words (pyspf may answer others).
SPF_RESULTS = frozenset({"none", "neutral", "pass", "fail", "softfail", "temperror", "permerror"})


@dataclass(frozen=True)
class MethodResult:
    """One resinfo: `spf=pass smtp.mailfrom=a@example.com`."""

    method: str  # spf | dkim | dmarc
    result: str
    properties: tuple[tuple[str, str], ...] = ()  # (ptype.property, value), e.g. ("header.d", "example.com")
    reason: str | None = None
    comment: str | None = None  # e.g. the DMARC policy "p=reject"


def property_value(value: str) -> str:
    """A pvalue as RFC 8601 §2.2 allows it: a token or an address bare, anything else quoted."""
    if _TOKEN.match(value) or _ADDR.match(value):
        return value
    return quoted(value)


def quoted(text: str) -> str:
    """An RFC 5322 quoted-string (a reason is always one, as RFC 8601's examples write it)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment(text: str) -> str:
    return "(" + re.sub(r"([()\\])", r"\\\1", text) + ")"


# Header size caps: the client writes these values, our header must stay
# within RFC 5322's 998 octets a line however long they are.
MAX_TEXT = 200  # a reason or comment, in characters (quoting may double it)
MAX_VALUE = 254  # any other property value: the longest address SMTP allows (RFC 5321 §4.5.3.1.3)
MAX_LINE = 998  # octets in one physical line, CRLF not counted (RFC 5322 §2.1.1)
_DOMAIN_PROPERTIES = frozenset({"header.d", "header.from"})
_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)\Z")


def domain_syntax(value: str) -> bool:
    """At most 253 characters of dot-separated labels (LDH and `_`), each 1-63 long."""
    name = value[:-1] if value.endswith(".") else value
    return 0 < len(name) <= 253 and all(_LABEL.match(label) for label in name.split("."))


def _printable(text: str, limit: int | None = None) -> str:
    """Header text stays one line of printable ASCII: CR, LF and controls become
    spaces, anything else outside ASCII `?`; over `limit` characters it is cut, ending in `...`."""
    text = re.sub(r"[^\x20-\x7e]", lambda m: " " if m.group(0) <= "\x7f" else "?", text)
    if limit is not None and len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def _property(name: str, value: str) -> str | None:
    """`name=value`, or None when the value is too long or not a domain where one belongs (left out)."""
    if name in _DOMAIN_PROPERTIES and not domain_syntax(value):
        return None
    if len(value) > MAX_VALUE:
        return None
    return f"{name}={property_value(_printable(value))}"


def resinfo_parts(result: MethodResult) -> list[str]:
    """`method=result`, `reason="..."`, `(comment)`, `ptype.prop=value`...: each well under MAX_LINE."""
    parts = [f"{result.method}={result.result}"]
    if result.reason:
        parts.append(f"reason={quoted(_printable(result.reason, MAX_TEXT))}")
    if result.comment:
        parts.append(_comment(_printable(result.comment, MAX_TEXT)))
    parts.extend(part for name, value in result.properties if (part := _property(name, value)) is not None)
    return parts


def format_resinfo(result: MethodResult) -> str:
    """`method=result [reason="..."] [(comment)] ptype.prop=value ...`, folded only where a line would pass MAX_LINE."""
    lines = [""]
    for part in resinfo_parts(result):
        if lines[-1] and len(lines[-1]) + 1 + len(part) > MAX_LINE - 1:  # -1: the fold's tab
            lines.append(part)
        else:
            lines[-1] = f"{lines[-1]} {part}" if lines[-1] else part
    return FOLD.join(lines)


def authentication_results(authserv_id: str, results: Sequence[MethodResult], why_none: str | None = None) -> bytes:
    """The whole header field, one resinfo per folded line, ending in CRLF.

    With no results at all it says `none` (RFC 8601 §2.2: no method was
    applied), followed by `why_none` as a comment."""
    if not results:
        comment = f" {_comment(_printable(why_none, MAX_TEXT))}" if why_none else ""
        return f"Authentication-Results: {authserv_id}; none{comment}\r\n".encode()
    text = f"Authentication-Results: {authserv_id};" + ";".join(FOLD + format_resinfo(r) for r in results)
    return text.encode("ascii", "replace") + b"\r\n"


def authserv_id(field_value: bytes) -> str | None:
    """The authserv-id of an Authentication-Results value (lower case), or None if unreadable.

    Leading comments and whitespace are skipped (CFWS); the id ends at `;`,
    whitespace or a comment (a version number may follow it)."""
    text = re.sub(rb"\s+", b" ", field_value).decode("utf-8", "replace")
    position = _skip_cfws(text, 0)
    if position >= len(text):
        return None
    if text[position] == '"':  # authserv-id is a value: a quoted-string is allowed
        end = position + 1
        chars = []
        while end < len(text) and text[end] != '"':
            if text[end] == "\\" and end + 1 < len(text):
                end += 1
            chars.append(text[end])
            end += 1
        return "".join(chars).lower() or None
    match = re.match(r"[^\s;()]+", text[position:])
    return match.group(0).lower() if match else None


def _skip_cfws(text: str, position: int) -> int:
    depth = 0
    while position < len(text):
        char = text[position]
        if depth:
            if char == "\\":
                position += 1
            elif char == "(":
                depth += 1
            elif char == ")":
                depth -= 1
        elif char == "(":
            depth = 1
        elif not char.isspace():
            return position
        position += 1
    return position


class ResultsFilter:
    """A message, arriving in chunks, without the Authentication-Results fields
    whose authserv-id is ours (RFC 8601 §5: a forged claim of our own checks);
    everyone else's stay, and so does everything else, byte for byte. What
    `feed` returns may be passed on at once. It holds back at most one incomplete
    line and one Authentication-Results field (each up to LIMIT bytes); after
    the header section everything passes straight through."""

    LIMIT = 64 * 1024  # a field or line longer than this is no header a client may send

    def __init__(self, our_id: str):
        self._ours = our_id.lower()
        self._in_header = True
        self._partial = b""  # an incomplete line
        self._mode: str | None = None  # the current field: "pass", "hold" (an A-R field), "drop"
        self._field: list[bytes] = []
        self._field_size = 0

    def feed(self, data: bytes) -> bytes:
        if not self._in_header:
            return data
        buffer, out = self._partial + data, []
        # The buffer starts at a line's start: complete lines up to the empty
        # line that ends the header section, else up to the last line break.
        blank = header_end(buffer)
        if blank < len(buffer):  # the empty line is in the buffer
            start = self._fields(buffer, blank, out)
            out.append(self._line(b"\r\n"))  # the header section ends
            start += 2
        else:
            start = self._fields(buffer, buffer.rfind(b"\r\n") + 2 if b"\r\n" in buffer else 0, out)
        rest = buffer[start:]
        self._partial = b""
        if self._in_header and len(rest) > self.LIMIT:
            # A line over 1000 octets: the session refuses this message anyway; stop looking.
            out.append(self._end_field())
            self._in_header = False
        if self._in_header:
            self._partial = rest
        else:
            out.append(rest)
        return b"".join(out)

    def _fields(self, buffer: bytes, end: int, out: list) -> int:
        """Filters the complete lines in buffer[:end]; returns `end`.

        Only lines starting with our field name go through Python one by one
        (and the continuations of a field held or dropped): runs of other
        lines are found with bytes.find and passed on whole."""
        lowered = buffer[:end].lower()
        position = 0
        while position < end:
            if self._mode in (None, "pass"):
                if lowered.startswith(_FIELD_NAME, position):
                    found = position
                else:
                    found = lowered.find(b"\r\n" + _FIELD_NAME, position, end)
                    found = end if found < 0 else found + 2
                if found > position:
                    out.append(self._end_field() + buffer[position:found])
                    self._mode = "pass"
                    position = found
                    continue
            elif buffer[position:position + 1] not in (b" ", b"\t"):  # a field held or dropped ends here
                out.append(self._end_field())
                continue
            elif self._mode == "drop":  # the rest of an over-long field
                following = _NEXT_FIELD.search(buffer, position, end)
                position = end if following is None else following.start() + 2
                continue
            line_end = buffer.find(b"\r\n", position, end) + 2
            out.append(self._line(buffer[position:line_end]))
            position = line_end
        return end

    def flush(self) -> bytes:
        """The end of the message: whatever is still held."""
        out = (self._end_field() if self._in_header else b"") + self._partial
        self._partial, self._in_header = b"", False
        return out

    def _line(self, line: bytes) -> bytes:
        if line[:1] in (b" ", b"\t") and self._mode is not None:  # a continuation of the current field
            if self._mode == "hold":
                self._field.append(line)
                self._field_size += len(line)
                if self._field_size > self.LIMIT:
                    self._field, self._mode = [], "drop"
                return b""
            return line if self._mode == "pass" else b""
        done = self._end_field()
        if line == b"\r\n":
            self._in_header = False
            return done + line
        name, colon, _ = line.partition(b":")
        if colon and name.strip().lower() == _FIELD_NAME:
            self._mode, self._field, self._field_size = "hold", [line], len(line)
            return done
        self._mode = "pass"
        return done + line

    def _end_field(self) -> bytes:
        mode, self._mode = self._mode, None
        if mode != "hold":
            return b""
        field, self._field = b"".join(self._field), []
        return b"" if authserv_id(field.partition(b":")[2]) == self._ours else field


# --- DMARC (RFC 7489) ------------------------------------------------------


@dataclass(frozen=True)
class DmarcPolicy:
    """The tags of a DMARC record that decide alignment and what we report."""

    p: str = "none"
    sp: str | None = None
    adkim: str = "r"
    aspf: str = "r"
    extra: dict = field(default_factory=dict, compare=False)


POLICIES = ("none", "quarantine", "reject")  # RFC 7489 §6.3 p= and sp=


def tag_list(text: str) -> tuple[dict[str, str], list[str]]:
    """RFC 6376 3.2 / RFC 7489 6.4 `tag=value; ...` -> (tags, problems); whitespace around
    tags and values is dropped, an empty last element allowed; a repeated tag keeps its first value."""
    tags: dict[str, str] = {}
    problems: list[str] = []
    for part in text.split(";"):
        if not part.strip():
            continue
        name, equals, value = part.partition("=")
        name = name.strip()
        if not equals or not name:
            problems.append(f"{part.strip()!r} is not tag=value")
        elif name in tags:
            problems.append(f"{name}= given twice")
        else:
            tags[name] = value.strip()
    return tags, problems


def is_dmarc_record(text: str) -> bool:
    """RFC 7489 §6.3: a DMARC record's first tag is `v=DMARC1`, matched precisely
    (`v=DMARC10` and `v=dmarc1` are not DMARC records); whitespace around it is allowed."""
    name, equals, value = text.split(";", 1)[0].partition("=")
    return bool(equals) and name.strip().lower() == "v" and value.strip() == "DMARC1"


def dmarc_tags(text: str) -> tuple[dict[str, str], list[str]]:
    """tag_list with DMARC's tag names, and the keyword values of p, sp, adkim and aspf,
    in lower case (RFC 7489 §6.4: they are case-insensitive)."""
    tags, problems = tag_list(text)
    lowered: dict[str, str] = {}
    for name, value in tags.items():
        name = name.lower()
        lowered.setdefault(name, value.lower() if name in ("p", "sp", "adkim", "aspf") else value)
    return lowered, problems


def parse_dmarc_record(text: str) -> DmarcPolicy | None:
    """A `v=DMARC1; p=...` record, or None when it is not a usable DMARC record.

    RFC 7489 §6.6.3: an invalid or missing `p` counts as `p=none` when the
    record has an `rua` tag, otherwise the record is ignored."""
    if not is_dmarc_record(text):
        return None
    tags, _ = dmarc_tags(text)
    p = tags.get("p", "")
    if p not in POLICIES:
        if "rua" not in tags:
            return None
        p = "none"
    sp = tags.get("sp") or None
    if sp is not None and sp not in POLICIES:
        sp = None
    adkim = "s" if tags.get("adkim") == "s" else "r"
    aspf = "s" if tags.get("aspf") == "s" else "r"
    return DmarcPolicy(p, sp, adkim, aspf)


def aligned(identifier: str, from_domain: str, mode: str, org_domain: Callable[[str], str]) -> bool:
    """RFC 7489 §3.1: strict needs the same domain; relaxed the same organizational domain."""
    a, b = identifier.lower().rstrip("."), from_domain.lower().rstrip(".")
    if not a or not b:
        return False
    if a == b:
        return True
    return mode != "s" and org_domain(a) == org_domain(b)


def dmarc_verdict(
    policy: DmarcPolicy,
    from_domain: str,
    spf_domain: str | None,
    dkim_domains: Iterable[str],
    org_domain: Callable[[str], str],
) -> str:
    """`pass` when SPF passed for an aligned domain or any passing DKIM
    signature's d= is aligned, else `fail`. `spf_domain` is the domain SPF
    passed for (MAIL FROM's, or HELO's for the null sender), None if it did not pass."""
    if spf_domain and aligned(spf_domain, from_domain, policy.aspf, org_domain):
        return "pass"
    if any(aligned(domain, from_domain, policy.adkim, org_domain) for domain in dkim_domains):
        return "pass"
    return "fail"


def dmarc_comment(policy: DmarcPolicy) -> str:
    """The published policy, as a comment (epost reports it; it does not act on it)."""
    return f"p={policy.p}" + (f" sp={policy.sp}" if policy.sp else "")


def dkim_properties(domain: str, selector: str, signature_b: str, identity: str | None = None) -> tuple[tuple[str, str], ...]:
    """header.d, header.i, header.s and header.b (its first 8 characters, RFC 6008 §4)."""
    properties = [("header.d", domain)]
    if identity:
        properties.append(("header.i", identity))
    properties.append(("header.s", selector))
    b = re.sub(r"\s+", "", signature_b)[:8]
    if b:
        properties.append(("header.b", b))
    return tuple(properties)
