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

# RFC 2045 token: what a property value may be without quotes.
_TOKEN = re.compile(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+\Z")
# RFC 8601 pvalue's other bare form, [local-part] "@" domain-name, with a dot-atom local-part.
_ATEXT = r"[!#$%&'*+\-/=?^_`{|}~0-9A-Za-z]+"
_ADDR = re.compile(rf"(?:{_ATEXT}(?:\.{_ATEXT})*)?@[0-9A-Za-z](?:[0-9A-Za-z.-]*[0-9A-Za-z])?\Z")
_FIELD_NAME = b"authentication-results"
FOLD = "\r\n\t"

# RFC 8601 §2.7 result words, per method.
SPF_RESULTS = frozenset({"none", "neutral", "pass", "fail", "softfail", "temperror", "permerror"})
DKIM_RESULTS = frozenset({"none", "pass", "fail", "policy", "neutral", "temperror", "permerror"})
DMARC_RESULTS = frozenset({"none", "pass", "fail", "temperror", "permerror"})


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
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment(text: str) -> str:
    return "(" + re.sub(r"([()\\])", r"\\\1", text) + ")"


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_resinfo(result: MethodResult) -> str:
    """`method=result [reason="..."] [(comment)] ptype.prop=value ...` on one line."""
    parts = [f"{result.method}={result.result}"]
    if result.reason:
        parts.append(f"reason={_quoted(_printable(result.reason))}")
    if result.comment:
        parts.append(_comment(_printable(result.comment)))
    parts.extend(f"{name}={property_value(_printable(value))}" for name, value in result.properties)
    return " ".join(parts)


def _printable(text: str) -> str:
    """Header text stays one line of printable characters: CR, LF and controls become spaces."""
    return re.sub(r"[\x00-\x1f\x7f]", " ", text)


def authentication_results(authserv_id: str, results: Sequence[MethodResult]) -> bytes:
    """The whole header field, one resinfo per folded line, ending in CRLF.

    With no results at all it says `none` (RFC 8601 §2.2: no method was applied)."""
    if not results:
        return f"Authentication-Results: {authserv_id}; none\r\n".encode()
    text = f"Authentication-Results: {authserv_id};" + ";".join(FOLD + format_resinfo(r) for r in results)
    return text.encode("utf-8", "replace") + b"\r\n"


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


def header_end(message: bytes) -> int:
    """Offset just past the header section's last field (before the empty line), or len(message)."""
    if message.startswith(b"\r\n"):
        return 0
    end = message.find(b"\r\n\r\n")
    return len(message) if end < 0 else end + 2


def remove_our_results(message: bytes, our_id: str) -> bytes:
    """The message without the Authentication-Results fields whose authserv-id
    is ours (RFC 8601 §5: a forged claim of our own checks); everyone else's
    stay, and so does everything else, byte for byte."""
    end = header_end(message)
    head = message[:end]
    if _FIELD_NAME not in head.lower():
        return message
    ours = our_id.lower()
    kept: list[bytes] = []
    for field_bytes in _fields(head):
        name, colon, value = field_bytes.partition(b":")
        if colon and name.strip().lower() == _FIELD_NAME and authserv_id(value) == ours:
            continue
        kept.append(field_bytes)
    return b"".join(kept) + message[end:]


def _fields(head: bytes) -> list[bytes]:
    """Split a header section into whole fields, each with its continuation lines and CRLFs."""
    fields: list[bytes] = []
    for line in head.splitlines(keepends=True):
        if fields and line[:1] in (b" ", b"\t"):
            fields[-1] += line
        else:
            fields.append(line)
    return fields


# --- DMARC (RFC 7489) ------------------------------------------------------


@dataclass(frozen=True)
class DmarcPolicy:
    """The tags of a DMARC record that decide alignment and what we report."""

    p: str = "none"
    sp: str | None = None
    adkim: str = "r"
    aspf: str = "r"
    extra: dict = field(default_factory=dict, compare=False)


_POLICIES = ("none", "quarantine", "reject")


def parse_dmarc_record(text: str) -> DmarcPolicy | None:
    """A `v=DMARC1; p=...` record, or None when it is not a usable DMARC record.

    RFC 7489 §6.6.3: an invalid or missing `p` counts as `p=none` when the
    record has an `rua` tag, otherwise the record is ignored."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        name, equals, value = part.partition("=")
        if equals:
            tags.setdefault(name.strip().lower(), value.strip())
    parts = [part.strip() for part in text.split(";")]
    if not parts or parts[0].replace(" ", "") != "v=DMARC1":
        return None
    p = tags.get("p", "").lower()
    if p not in _POLICIES:
        if "rua" not in tags:
            return None
        p = "none"
    sp = tags.get("sp", "").lower() or None
    if sp is not None and sp not in _POLICIES:
        sp = None
    adkim = "s" if tags.get("adkim", "r").lower() == "s" else "r"
    aspf = "s" if tags.get("aspf", "r").lower() == "s" else "r"
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


def header_from_domains(head: bytes) -> list[str]:
    """The domains of the RFC 5322 From addresses (DMARC's identifier), lower case, in order."""
    from email.parser import BytesHeaderParser
    from email.policy import compat32
    from email.utils import getaddresses

    fields = BytesHeaderParser(policy=compat32).parsebytes(head + b"\r\n").get_all("From") or []
    domains = []
    for _name, address in getaddresses([str(value) for value in fields]):
        local, at, domain = address.rpartition("@")
        domains.append(domain.strip().rstrip(".").lower() if at and local and domain.strip() else "")
    return domains
