"""The seam between the SMTP protocol and the rest of the MTA.

Why not `twisted.mail.interfaces.IMessageDelivery`: it hands out one
`IMessage` per recipient and feeds each one line by line, the two costs the
bulk DATA path exists to avoid, and it cannot answer per-reply enhanced
codes or 4xx on storage failure. `IReceiver` keeps its shape (validate the
sender, validate each recipient, then receive one message) with one message
object per transaction. Authentication still goes through `twisted.cred`.
"""

from __future__ import annotations

from dataclasses import dataclass

from zope.interface import Attribute, Interface

from epost.address import Address
from epost.reply import Reply


class Rejected(Exception):
    """Raised (or errbacked) by an IReceiver check to refuse with `reply`."""

    def __init__(self, reply: Reply):
        super().__init__(reply.text)
        self.reply = reply


@dataclass(frozen=True)
class Session:
    """What the receiver may know about the client when it decides."""

    listener: str  # "relay" | "submission" | "smtps"
    client_ip: str
    client_port: int
    client_name: str  # the HELO/EHLO argument
    esmtp: bool
    tls: str | None  # e.g. "TLSv1.3" when encrypted
    user: str | None  # authenticated account
    # False when client_ip is not the client's: a PROXY header that names no
    # client (v2 LOCAL, v1 UNKNOWN, other families) leaves the balancer's own
    # address, which relay_networks must not vouch for (docs/scaling.md).
    client_known: bool = True


class IAccount(Interface):
    """What a successful AUTH yields through twisted.cred: the avatar is the
    account's canonical address (e.g. "alice@example.jp")."""


class IMessageWriter(Interface):
    """One message being received; content arrives in chunks."""

    queue_id = Attribute("The queue ID the 250 reply will name.")

    def write(data: bytes) -> None:
        """Store the next content bytes (already unstuffed). Never raises."""

    def commit() -> object:
        """Make the message durable; a Deferred firing with the queue ID.

        Errbacks with `Rejected` carrying a 4xx reply on storage failure."""

    def abort() -> None:
        """Forget the message; nothing of it may stay in the queue."""

    def registerProducer(producer, streaming: bool) -> None:
        """The session's transport, to pause while storage falls behind."""

    def unregisterProducer() -> None:
        """Storage no longer needs to pause the session."""


class IReceiver(Interface):
    """Decides what a listener accepts and stores what it accepted."""

    def check_sender(session: Session, sender: Address | None, params: dict) -> object:
        """None, or a Deferred; raise/errback `Rejected` to refuse."""

    def check_recipient(session: Session, sender: Address | None, recipient: Address) -> object:
        """A result to keep for the recipient (e.g. its route), or a Deferred
        of it; raise/errback `Rejected` to refuse."""

    def open_message(session: Session, sender: Address | None, recipients: list, params: dict) -> IMessageWriter:
        """Start storing a message; `recipients` pairs each Address with the
        value `check_recipient` returned for it."""
