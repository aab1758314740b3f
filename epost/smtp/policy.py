"""Which recipients a listener accepts (SPEC §3.4), and their routes.

`may_relay` is a pure function of plain values: it is the open-relay guard,
property-tested against every address form. `RecipientPolicy` only fetches
the current tables (a reload may swap them at any time) and asks the
resolver for the routes of what it accepts.
"""

from __future__ import annotations

import functools
import ipaddress
from typing import Callable, Iterable

from epost.smtp.address import Address
from epost.smtp.interfaces import Rejected, Reply, Session

RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
ALIAS_LOOP = Reply(550, "5.4.6", "Alias expansion loop")


@functools.lru_cache(maxsize=1024)  # parsed once per client, not once per RCPT
def client_address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The client's IP, with IPv4-mapped IPv6 (dual-stack listeners) unwrapped."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def may_relay(
    recipient: Address,
    *,
    client_ip: str,
    authenticated: bool,
    relay_networks: Iterable,
    open_destination: Callable[[Address], bool],
) -> bool:
    """True when this client may send to this recipient.

    Anyone may send to an open destination (a local, alias, operated or
    relay domain); trusted networks and authenticated clients may send
    anywhere. `open_destination` sees only the canonical domain, so no
    address form (%, !, source route, quoting, literal, trailing dot, case)
    can make a foreign domain look local.
    """
    if authenticated or open_destination(recipient):
        return True
    ip = client_address(client_ip)
    return ip is not None and any(ip in network for network in relay_networks)


SENDER_NOT_OWNED = Reply(553, "5.7.1", "Sender address rejected: not owned by user")


def sender_owned(sender: Address, user: str, aliases, local_domains: frozenset[str]) -> bool:
    """May the account `user` send as `sender`? Its own address, or an alias
    that delivers to it (Postfix's smtpd_sender_login_maps, from the tables
    we already have)."""
    if str(sender).lower() == user.lower():
        return True
    entry = aliases.lookup(sender, local_domains)
    return entry is not None and any(str(target).lower() == user.lower() for target in entry.targets)


class RecipientPolicy:
    def __init__(
        self,
        resolver,
        *,
        local_domains: Iterable[str],
        relay_domains: Iterable[str],
        relay_networks: Iterable,
        gateway: Callable[[], object],
        aliases: Callable[[], object],
        check_sender_ownership: bool = True,
    ):
        self.resolver = resolver
        self.local_domains = frozenset(local_domains)
        self.relay_domains = frozenset(relay_domains)
        self.relay_networks = tuple(relay_networks)
        self.gateway = gateway  # the current GatewayTable
        self.aliases = aliases  # the current Aliases
        self.check_sender_ownership = check_sender_ownership

    def check_sender(self, session: Session, sender: Address | None) -> None:
        """Raises Rejected when an authenticated user sends as someone else."""
        if session.user is not None and sender is not None and self.check_sender_ownership:
            if not sender_owned(sender, session.user, self.aliases(), self.local_domains):
                raise Rejected(SENDER_NOT_OWNED)

    def open_destination(self, recipient: Address) -> bool:
        domain = recipient.domain
        return (
            domain in self.local_domains
            or domain in self.relay_domains
            or self.gateway().is_operated(domain)
            or self.aliases().lookup(recipient, self.local_domains) is not None
        )

    def route_for(self, session: Session, recipient: Address) -> list[dict]:
        """The final recipients with their routes (stored in the envelope);
        raises Rejected when the client may not relay or nothing can be
        delivered."""
        if not may_relay(
            recipient,
            client_ip=session.client_ip,
            authenticated=session.user is not None,
            relay_networks=self.relay_networks,
            open_destination=self.open_destination,
        ):
            raise Rejected(RELAY_DENIED)
        try:
            resolution = self.resolver.resolve(recipient)
        except ValueError as error:  # AliasError: a loop or too deep
            raise Rejected(Reply(ALIAS_LOOP.code, ALIAS_LOOP.enhanced, str(error))) from None
        if resolution.rejected:
            raise Rejected(resolution.finals[0][1].reply)
        return [{"address": str(final), "route": route.to_dict()} for final, route in resolution.finals]
