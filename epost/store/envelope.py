"""A queued message's envelope: who sent it, who gets it, and how far each recipient got.

The envelope is its own small row beside the content (epost.store.database),
so recording a recipient's progress never rewrites the message itself.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from epost.address import destination_of

FORMAT_VERSION = 1
RELAY = "relay"  # a recipient's route kind when it leaves by SMTP
RECIPIENT_STATES = ("pending", "delivered", "failed")


class EnvelopeError(ValueError):
    """An envelope file cannot be read; the message names the file so an operator can find it."""


@dataclass(frozen=True)
class Recipient:
    address: str
    route: dict[str, Any] | None = None
    state: str = "pending"
    attempts: int = 0
    last_reply: str = ""
    failures_5xx: int = 0  # 5xx replies in the current retry episode (SPEC §6 count_5xx)
    dsn_sent: bool = False  # a failed recipient's bounce is queued (never twice)


@dataclass(frozen=True)
class Envelope:
    queue_id: str
    sender: str
    recipients: tuple[Recipient, ...]
    arrival: float
    size: int
    client: str = ""
    listener: str = "relay"
    auth: str | None = None
    body: str = "7BIT"
    # Retry state per destination domain: the (message, destination) pair is
    # the unit of retry (SPEC §6); see epost.queue.outcomes.
    retries: dict[str, dict[str, Any]] = field(default_factory=dict)
    delay_warned: bool = False  # the "still trying" DSN went out (once per message)
    # DKIM (SPEC §9): the client was authenticated or in relay_networks (or epost
    # wrote the message itself); `dkim` holds the DKIM-Signature header lines made
    # once at commit, which only SMTP deliveries prepend (epost.delivery.signing).
    trusted: bool = False
    dkim: str = ""

    def with_recipient(self, index: int, **changes: Any) -> Envelope:
        """A copy with recipient ``index`` changed; envelopes are values, never edited in place."""
        recipients = list(self.recipients)
        recipients[index] = dataclasses.replace(recipients[index], **changes)
        return dataclasses.replace(self, recipients=tuple(recipients))

    def pending(self) -> list[int]:
        """Indexes of the recipients still waiting for delivery."""
        return [i for i, r in enumerate(self.recipients) if r.state == "pending"]

    def to_bytes(self) -> bytes:
        """JSON, ASCII-only so any address (even one holding surrogate escapes) round-trips."""
        # vars(), not dataclasses.asdict(): no deep copy, on the per-message path.
        data = {**vars(self), "recipients": [vars(r) for r in self.recipients], "version": FORMAT_VERSION}
        return json.dumps(data).encode("ascii") + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes, name_for_errors: str) -> Envelope:
        """Parse and check an envelope file; anything wrong raises EnvelopeError naming the file."""
        try:
            obj = json.loads(data)
            _check(isinstance(obj, dict), "not a JSON object")
            _check(obj.get("version") == FORMAT_VERSION, f"unknown version {obj.get('version')!r}")
            raw_recipients = _field(obj, "recipients", list)
            recipients = tuple(_recipient(r) for r in raw_recipients)
            return cls(
                queue_id=_field(obj, "queue_id", str),
                sender=_field(obj, "sender", str),
                recipients=recipients,
                arrival=float(_field(obj, "arrival", (int, float))),
                size=_field(obj, "size", int),
                client=_field(obj, "client", str),
                listener=_field(obj, "listener", str),
                auth=_field(obj, "auth", (str, type(None))),
                body=_field(obj, "body", str),
                retries=_optional(obj, "retries", dict, {}),
                delay_warned=bool(_optional(obj, "delay_warned", (bool, int), False)),
                trusted=bool(_optional(obj, "trusted", (bool, int), False)),
                dkim=_optional(obj, "dkim", str, ""),
            )
        except (ValueError, UnicodeDecodeError) as e:
            raise EnvelopeError(f"{name_for_errors}: corrupt envelope: {e}") from None


def relay_groups(envelope: Envelope) -> dict[str, list[int]]:
    """Pending recipients that leave by SMTP, by destination domain, in envelope order."""
    groups: dict[str, list[int]] = {}
    for index in envelope.pending():
        recipient = envelope.recipients[index]
        if (recipient.route or {}).get("kind") == RELAY:
            groups.setdefault(destination_of(recipient.address), []).append(index)
    return groups


def _recipient(obj: Any) -> Recipient:
    _check(isinstance(obj, dict), "recipient is not a JSON object")
    state = _field(obj, "state", str)
    _check(state in RECIPIENT_STATES, f"unknown recipient state {state!r}")
    return Recipient(
        address=_field(obj, "address", str),
        route=_field(obj, "route", (dict, type(None))),
        state=state,
        attempts=_field(obj, "attempts", int),
        last_reply=_field(obj, "last_reply", str),
        failures_5xx=_optional(obj, "failures_5xx", int, 0),
        dsn_sent=bool(_optional(obj, "dsn_sent", (bool, int), False)),
    )


def _field(obj: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    _check(key in obj, f"missing {key!r}")
    value = obj[key]
    # bool is an int to isinstance, but never a valid count or size here.
    _check(isinstance(value, kind) and not isinstance(value, bool), f"bad {key!r}: {value!r}")
    return value


def _optional(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any) -> Any:
    """A field added after version 1 was written: absent means `default`."""
    if key not in obj:
        return default
    value = obj[key]
    _check(isinstance(value, kind), f"bad {key!r}: {value!r}")
    return value


def _check(condition: bool, problem: str) -> None:
    if not condition:
        raise ValueError(problem)
