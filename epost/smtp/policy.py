"""Which recipients a listener accepts (SPEC §3.4), and their routes.

The open-relay guard is `RecipientPolicy.route_for`: a trusted client
(`trusted`) or an open destination (`open_destination`, on the canonical
domain only), property-tested against every address form. The policy
fetches the current tables (a reload may swap them at any time) and asks
the resolver for the routes of what it accepts.
"""

from __future__ import annotations

import functools
import ipaddress
from typing import Callable, Iterable

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from epost import metrics
from epost.logs import quote_value
from epost.address import Address
from epost.reply import Reply
from epost.smtp.interfaces import Rejected, Session

_log = Logger()

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


def in_networks(ip: str, networks: Iterable) -> bool:
    """Is the client `ip` (a string, IPv4-mapped IPv6 unwrapped) inside one of
    `networks`? False for a peer without an IP address (a UNIX socket)."""
    address = client_address(ip)
    return address is not None and any(address in network for network in networks)


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

    def trusted(self, session: Session) -> bool:
        """The client authenticated or is in relay_networks: its mail is our
        users' own (verification skipped, DKIM-signed when it leaves), and it
        may relay anywhere. relay_networks vouch for no client that is
        unknown (the balancer's own address, a PROXY header naming no client)."""
        if session.user is not None:
            return True
        return session.client_known and in_networks(session.client_ip, self.relay_networks)

    def open_destination(self, recipient: Address) -> bool:
        """Anyone may send here: a local, relay, operated or alias domain.
        It sees only the canonical domain, so no address form (%, !, source
        route, quoting, literal, trailing dot, case) can make a foreign
        domain look local."""
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
        if not (self.trusted(session) or self.open_destination(recipient)):
            raise Rejected(RELAY_DENIED)
        try:
            resolution = self.resolver.resolve(recipient)
        except ValueError as error:  # AliasError: a loop or too deep
            raise Rejected(Reply(ALIAS_LOOP.code, ALIAS_LOOP.enhanced, str(error))) from None
        if resolution.rejected:
            raise Rejected(resolution.finals[0][1].reply)
        return [{"address": str(final), "route": route.to_dict()} for final, route in resolution.finals]

    # Recipient verification (SPEC §3.5). Set by build_routing / make_service:
    # `relay_recipients` (the live table, or None), `verify_recipients`,
    # `verifier` (None: no probes, as in `epost route`), `users` (live table).
    relay_recipients: Callable[[], object] | None = None
    verify_recipients: bool = False
    verifier = None
    users: Callable[[], object] | None = None

    def check_recipient(self, session: Session, sender: Address | None, recipient: Address):
        """route_for, then SPEC §3.5: the finals, a Deferred of them, or Rejected."""
        finals = self.route_for(session, recipient)
        facts = self.verification_facts(session, recipient, finals)
        if facts is None:
            return finals
        answer = verification_answer(**facts)
        if answer is None:
            if facts["listed"] is not None and not (facts["trusted"] or facts["local"]):
                metrics_verdict("accepted", "table")
            return finals
        if isinstance(answer, Reply):
            self._refuse(session, sender, recipient, answer, "table")
        verdict = self.verifier.verdict(str(recipient), finals[0]["route"])
        if not isinstance(verdict, Deferred):
            return self._decide(verdict, facts, finals, session, sender, recipient, "cache")
        return verdict.addCallback(self._decide, facts, finals, session, sender, recipient, "probe")

    def _decide(self, verdict, facts, finals, session, sender, recipient, source):
        answer = verification_answer(**{**facts, "verdict": verdict})
        metrics_verdict(verdict.status, source)
        if answer is None:
            return finals
        self._refuse(session, sender, recipient, answer, source)

    def _refuse(self, session, sender, recipient, reply: Reply, source: str):
        if source == "table":
            metrics_verdict("refused", "table")
        _log.info("{line}", line=refusal_line(session, sender, recipient, reply, source))
        raise Rejected(reply)

    def verification_facts(self, session: Session, recipient: Address, finals: list[dict]) -> dict | None:
        """The facts verification_answer needs, or None when verification cannot apply at all."""
        domain = recipient.domain
        if (
            len(finals) != 1
            or finals[0]["route"]["kind"] != "relay"
            or finals[0]["address"] != str(recipient)
            or not (domain in self.relay_domains or self.gateway().is_operated(domain))
        ):
            return None
        table = self.relay_recipients() if self.relay_recipients is not None else None
        listed = table.lookup(recipient) is not None if table is not None and table.present else None
        return {
            "trusted": self.trusted(session),
            "local": domain in self.local_domains or (self.users is not None and recipient in self.users()),
            "operated": True,
            "listed": listed,
            "verify": self.verify_recipients and self.verifier is not None,
        }


# --- Recipient verification for operated domains (SPEC §3.5) ---------------

PROBE = "probe"  # verification_answer: ask the next hop, then decide again with its verdict
NOT_LISTED = Reply(550, "5.1.1", "Recipient address rejected: User unknown in relay recipient table")


def verdict_reply(verdict) -> Reply | None:
    """None (250) for an accepted verdict; 550 5.1.1 with the next hop's text
    for a refused one; 450 4.1.1 for anything else (the client retries)."""
    if verdict.status == "accepted":
        return None
    if verdict.status == "refused":
        said = f"{verdict.host} said: " if verdict.host else ""
        return Reply(550, "5.1.1", f"Recipient address rejected: {said}{verdict.text}")
    return Reply(450, "4.1.1", f"Recipient address not verified: {verdict.text}; try again later")


def verification_answer(
    *, trusted: bool, local: bool, operated: bool, listed: bool | None, verify: bool, verdict=None
) -> Reply | str | None:
    """What verification says about one recipient, from plain facts (pure).

    `trusted`: the client is in relay_networks or authenticated; `local`: a
    local domain or a users-table address; `operated`: an operated or
    relay_domains address routed onward as itself; `listed`: None without a
    relay_recipients file, else whether it lists the address; `verify`:
    verify_recipients; `verdict`: the next hop's, when known. Returns None
    (accept), a Reply (refuse), or PROBE (a verdict is needed first)."""
    if trusted or local or not operated:
        return None
    if listed is not None:
        return None if listed else NOT_LISTED
    if not verify:
        return None
    if verdict is None:
        return PROBE
    return verdict_reply(verdict)


def refusal_line(session: Session, sender: Address | None, recipient: Address, reply: Reply, source: str) -> str:
    """The daemon log's line for a recipient refused by verification, senderlog-style key=value."""
    fields = (
        ("from", f"<{sender or ''}>"),
        ("to", f"<{recipient}>"),
        ("client", f"{session.client_name or 'unknown'}[{session.client_ip}]"),
        ("status", "refused" if reply.code >= 500 else "deferred"),
        ("source", source),
        ("dsn", reply.enhanced),
        ("reply", f"{reply.code} {reply.enhanced} {reply.text}"),
    )
    return "verify: " + " ".join(f"{key}={quote_value(value)}" for key, value in fields)


def metrics_verdict(verdict: str, source: str) -> None:
    metrics.verify_verdicts.labels(verdict, source).inc()

