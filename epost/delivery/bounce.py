"""Delivery status notifications (SPEC §6, RFC 3464): the bounce sent on final failure.

Built with the `email` package: a multipart/report of a human-readable text,
a message/delivery-status part and the original headers (never the body),
rendered SMTP-ready: CRLF line ends, 7-bit, no line over 998 octets.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from email.headerregistry import Address
from email.message import EmailMessage, Message, MIMEPart
from email.policy import SMTP
from email.utils import formatdate, make_msgid

# 7-bit output: a bounce must pass any next hop, 8BITMIME or not. Fields are
# not folded below 998 octets: DSN readers take Diagnostic-Code on one line.
_POLICY = SMTP.clone(cte_type="7bit", max_line_length=998)
# For quoted-printable, whose encoded lines RFC 2045 limits to 76 characters.
_QP_POLICY = SMTP.clone(cte_type="7bit")
_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_WHITESPACE = re.compile(r"\s+")
_NOT_PRINTABLE = re.compile(r"[^\x20-\x7e]")
# Field values are capped so that field name and value fit in one 998-octet line.
FIELD_LIMIT = 900
ACTIONS = ("failed", "delayed")


@dataclass(frozen=True)
class FailedRecipient:
    """One recipient's outcome for the DSN: `status` is the enhanced code
    (the remote's when it gave one), `diagnostic` its reply text."""

    address: str
    status: str
    action: str = "failed"
    remote_mta: str | None = None
    diagnostic: str | None = None
    last_attempt: float | None = None

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"DSN action must be one of {ACTIONS}, not {self.action!r}")
        if not _STATUS.fullmatch(self.status):
            raise ValueError(f"DSN status must be an enhanced code like 5.1.1, not {self.status!r}")


def should_bounce(sender: str) -> bool:
    """Whether a final failure earns a DSN: never for the null sender `<>`
    (bounces themselves travel with it, so bounces never loop)."""
    return sender != ""


def build_dsn(
    *,
    hostname: str,
    queue_id: str,
    sender: str,
    arrival: float,
    original_headers: bytes,
    recipients: list[FailedRecipient],
    now: float,
) -> bytes:
    """The DSN for `recipients` of the message `queue_id`, addressed to `sender`,
    as SMTP-ready bytes (CRLF, 7-bit, lines ≤ 998 octets)."""
    if not should_bounce(sender):
        raise ValueError("no DSN for the null sender")
    if not recipients:
        raise ValueError("a DSN needs at least one recipient")
    delayed = all(r.action == "delayed" for r in recipients)

    msg = EmailMessage(policy=_POLICY)
    msg["From"] = Address("Mail Delivery System", "MAILER-DAEMON", hostname)
    msg["To"] = sender
    msg["Subject"] = "Delayed Mail (still being retried)" if delayed else "Undelivered Mail Returned to Sender"
    msg["Date"] = formatdate(now, localtime=True)
    msg["Message-ID"] = make_msgid(idstring=_printable(queue_id), domain=hostname)
    msg["Auto-Submitted"] = "auto-replied"
    msg["MIME-Version"] = "1.0"
    msg["Content-Type"] = "multipart/report"
    msg.set_param("report-type", "delivery-status")
    msg.attach(_explanation(hostname, recipients, delayed))
    msg.attach(_delivery_status(hostname, queue_id, arrival, recipients))
    msg.attach(_returned_headers(original_headers))
    return msg.as_bytes(policy=_POLICY)


def _explanation(hostname: str, recipients: list[FailedRecipient], delayed: bool) -> MIMEPart:
    """The text/plain part: what happened, one paragraph per recipient."""
    if delayed:
        intro = (
            "This is the mail system at host {host}.\n\n"
            "#### THIS IS A WARNING ONLY. YOU DO NOT NEED TO RESEND YOUR MESSAGE. ####\n\n"
            "Your message could not be delivered yet to the recipients below.\n"
            "The mail system will keep trying; the headers of your message are attached."
        )
    else:
        intro = (
            "This is the mail system at host {host}.\n\n"
            "I'm sorry to have to inform you that your message could not\n"
            "be delivered to one or more recipients. Its headers are attached below.\n\n"
            "For further assistance, please send mail to postmaster."
        )
    paragraphs = [intro.format(host=_printable(hostname)), "                   The mail system"]
    for r in recipients:
        if r.diagnostic and r.remote_mta:
            reason = f"host {_printable(r.remote_mta)} said: {_printable(r.diagnostic)}"
        elif r.diagnostic:
            reason = _printable(r.diagnostic)
        elif r.remote_mta:
            reason = f"no answer from host {_printable(r.remote_mta)} (status {r.status})"
        else:
            reason = f"delivery {r.action} (status {r.status})"
        line = f"<{_printable(r.address)}>: {reason}"
        paragraphs.append(textwrap.fill(line, width=76, subsequent_indent="    ", break_on_hyphens=False))
    part = MIMEPart(policy=_POLICY)
    part.set_content("\n\n".join(paragraphs) + "\n", charset="us-ascii")
    return part


def _delivery_status(hostname: str, queue_id: str, arrival: float, recipients: list[FailedRecipient]) -> MIMEPart:
    """The message/delivery-status part: one per-message block, then one block per recipient."""
    head = Message(policy=_POLICY)
    head["Reporting-MTA"] = f"dns; {_printable(hostname)}"
    head["X-Epost-Queue-ID"] = _printable(queue_id)
    head["Arrival-Date"] = formatdate(arrival, localtime=True)
    blocks = [head]
    for r in recipients:
        block = Message(policy=_POLICY)
        block["Final-Recipient"] = f"rfc822; {_printable(r.address)}"
        block["Action"] = r.action
        block["Status"] = r.status
        if r.remote_mta:
            block["Remote-MTA"] = f"dns; {_printable(r.remote_mta)}"
        if r.diagnostic:
            block["Diagnostic-Code"] = f"smtp; {_printable(r.diagnostic)}"
        if r.last_attempt is not None:
            block["Last-Attempt-Date"] = formatdate(r.last_attempt, localtime=True)
        blocks.append(block)
    part = MIMEPart(policy=_POLICY)
    part["Content-Type"] = "message/delivery-status"
    part.set_payload(blocks)
    return part


def _returned_headers(original_headers: bytes) -> MIMEPart:
    """The text/rfc822-headers part: the header section only, cut at the first
    empty line so a body passed by mistake is never returned."""
    lines = []
    for line in original_headers.splitlines():
        if not line.strip():
            break
        lines.append(line)
    verbatim = all(line.isascii() and len(line) <= 998 for line in lines)
    text = b"\n".join(lines).decode("utf-8", errors="replace") + "\n"
    part = MIMEPart(policy=_QP_POLICY)
    part.set_content(text, subtype="rfc822-headers", cte="7bit" if verbatim else "quoted-printable")
    return part


def _printable(text: str) -> str:
    """`text` safe for one field line: printable ASCII (whitespace runs become
    one space, anything else unprintable a `?`), at most FIELD_LIMIT characters."""
    text = _NOT_PRINTABLE.sub("?", _WHITESPACE.sub(" ", text).strip())
    return text if len(text) <= FIELD_LIMIT else text[: FIELD_LIMIT - 3] + "..."
