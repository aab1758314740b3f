"""Where each recipient's mail goes: aliases first, then a chain of routers.

SPEC §3: aliases are always expanded first; each resulting address then goes
through the routers in order (local domains, gateway.dat, the SMTP gateway,
DNS) and the first router that claims it decides. Every decision names the
rule that made it, for `epost route`, the logs and the envelope.

A router is one small object providing `IRouter`; the chain is assembled
from the config by `build_routers`. A third party adds a router by putting
its own `IRouter` into the list (docs/routing.md shows one).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

from zope.interface import Attribute, Interface, implementer

from epost.config import HostPort
from epost.routing.aliases import expand
from epost.address import Address
from epost.reply import Reply

UNKNOWN_USER = Reply(550, "5.1.1", "User unknown in local recipient table")


@dataclass(frozen=True)
class Route:
    """One final recipient's decision.

    kind "local": `mailbox` is "domain/user". kind "relay": `hosts` in the
    order to try, or empty with `mx_domain` set when DNS decides at delivery
    time. kind "reject": `reply` says why.
    """

    kind: str
    rule: str  # "aliases:3", "local", "gateway.dat:2", "smtp_gateway", "mx"
    mailbox: str | None = None
    hosts: tuple[HostPort, ...] = ()
    mx_domain: str | None = None
    reply: Reply | None = None

    def to_dict(self) -> dict:
        """JSON-ready form stored in the envelope."""
        data = {"kind": self.kind, "rule": self.rule}
        if self.mailbox is not None:
            data["mailbox"] = self.mailbox
        if self.hosts:
            data["hosts"] = [[h.host, h.port] for h in self.hosts]
        if self.mx_domain is not None:
            data["mx_domain"] = self.mx_domain
        if self.reply is not None:
            data["reply"] = asdict(self.reply)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Route:
        """The inverse of `to_dict`, for routes read back from an envelope."""
        reply = data.get("reply")
        return cls(
            kind=data["kind"],
            rule=data["rule"],
            mailbox=data.get("mailbox"),
            hosts=tuple(HostPort(str(host), int(port)) for host, port in data.get("hosts", ())),
            mx_domain=data.get("mx_domain"),
            reply=Reply(**reply) if reply else None,
        )


class IRouter(Interface):
    """One step of the routing chain."""

    name = Attribute("Short name, e.g. 'local' or 'gateway.dat'.")

    def route(address: Address) -> Route | None:
        """The route for `address`, or None to let the next router decide."""


@dataclass(frozen=True)
class AliasStep:
    source: Address
    rule: str  # "aliases:N"
    targets: tuple[Address, ...]


@dataclass(frozen=True)
class Resolution:
    steps: tuple[AliasStep, ...] = ()
    finals: tuple[tuple[Address, Route], ...] = field(default_factory=tuple)

    @property
    def rejected(self) -> bool:
        """True when every final recipient is refused."""
        return all(route.kind == "reject" for _, route in self.finals)


@implementer(IRouter)
class LocalRouter:
    name = "local"

    def __init__(self, local_domains: frozenset[str], users: Callable[[], object]):
        self.local_domains = local_domains
        self.users = users  # the current Users table

    def route(self, address: Address) -> Route | None:
        if address.domain not in self.local_domains:
            return None
        mailbox = self.users().mailbox(address)
        if mailbox is None:
            return Route("reject", "local", reply=UNKNOWN_USER)
        return Route("local", "local", mailbox=mailbox)


@implementer(IRouter)
class GatewayRouter:
    name = "gateway.dat"

    def __init__(self, table: Callable[[], object]):
        self.table = table  # the current GatewayTable

    def route(self, address: Address) -> Route | None:
        rule = self.table().lookup(address.domain)
        if rule is None:
            return None
        name = f"gateway.dat:{rule.line}"
        if rule.gateway is None:  # the keyword `mx`: resolve normally
            return mx_route(address, name)
        return Route("relay", name, hosts=(HostPort(rule.gateway, rule.port),))


@implementer(IRouter)
class SmartHostRouter:
    name = "smtp_gateway"

    def __init__(self, gateway: HostPort):
        self.gateway = gateway

    def route(self, address: Address) -> Route | None:
        return Route("relay", "smtp_gateway", hosts=(self.gateway,))


@implementer(IRouter)
class MXRouter:
    name = "mx"

    def route(self, address: Address) -> Route | None:
        return mx_route(address, "mx")


def mx_route(address: Address, rule: str) -> Route:
    """Plain DNS delivery; an address literal names its host directly."""
    if address.is_literal:
        return Route("relay", rule, hosts=(HostPort(address.literal_ip, 25),))
    return Route("relay", rule, mx_domain=address.domain)


class Resolver:
    """Aliases, then the first router that claims each final address."""

    max_alias_depth = 10

    def __init__(self, routers: Sequence[IRouter], aliases: Callable[[], object], local_domains: frozenset[str]):
        self.routers = list(routers)
        self.aliases = aliases  # the current Aliases table
        self.local_domains = local_domains

    def resolve(self, address: Address) -> Resolution:
        """Raises the alias module's AliasError for a loop or excessive depth."""
        expansion = expand(address, self.aliases(), self.local_domains, max_depth=self.max_alias_depth)
        steps = tuple(AliasStep(s.source, f"aliases:{s.line}", s.targets) for s in expansion.steps)
        return Resolution(steps, tuple((final, self.route_final(final)) for final in expansion.finals))

    def route_final(self, address: Address) -> Route:
        for router in self.routers:
            route = router.route(address)
            if route is not None:
                return route
        return Route("reject", "none", reply=Reply(550, "5.1.2", "No route to destination"))
