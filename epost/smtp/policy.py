"""Which recipients a listener accepts, and the route each one gets.

The decision is a pure function of the recipient and the tables; the
`RecipientPolicy` object only fetches the current tables, which a reload
may swap at any time.
"""

from __future__ import annotations

from typing import Callable

from epost.smtp.address import Address
from epost.smtp.interfaces import Rejected, Reply, Session

RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
UNKNOWN_USER = Reply(550, "5.1.1", "User unknown in local recipient table")


def decide_recipient(
    recipient: Address,
    *,
    local_domains: frozenset[str],
    mailbox_of: Callable[[Address], str | None],
) -> dict:
    """The route for an accepted recipient; raises Rejected otherwise.

    Only local mailboxes are accepted until relaying lands; an address
    literal is never local, whatever IP it names.
    """
    if recipient.domain in local_domains:
        mailbox = mailbox_of(recipient)
        if mailbox is None:
            raise Rejected(UNKNOWN_USER)
        return {"kind": "local", "mailbox": mailbox}
    raise Rejected(RELAY_DENIED)


class RecipientPolicy:
    def __init__(self, local_domains: tuple[str, ...], users: Callable[[], object]):
        self.local_domains = frozenset(local_domains)
        self.users = users  # returns the current Users table

    def route_for(self, session: Session, recipient: Address) -> dict:
        return decide_recipient(recipient, local_domains=self.local_domains, mailbox_of=self.users().mailbox)
