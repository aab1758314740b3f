"""The routing chain built from the Config: the live tables, the resolver and
the recipient policy.

Shared by the daemon (`service.py`) and the `epost` command (`admin/`), so
both decide the same way and the command never imports the daemon's wiring
(which imports the web UI, which imports `admin/`).
"""

from __future__ import annotations

from typing import NamedTuple

from epost.config import Config
from epost.routing.aliases import load_aliases
from epost.routing.gateway import load_gateway_table
from epost.routing.live import LiveTable
from epost.routing.relay_recipients import load_relay_recipients
from epost.routing.resolver import GatewayRouter, LocalRouter, MXRouter, Resolver, SmartHostRouter
from epost.routing.users import load_users
from epost.smtp.policy import RecipientPolicy


class Routing(NamedTuple):
    users: LiveTable
    aliases: LiveTable
    gateway: LiveTable
    resolver: Resolver
    policy: RecipientPolicy
    relay_recipients: LiveTable

    @property
    def tables(self) -> list[LiveTable]:
        return [self.users, self.aliases, self.gateway, self.relay_recipients]


def build_routing(config: Config) -> Routing:
    """The live tables, the resolver chain and the recipient policy, from the config.

    Shared by the daemon and `epost route`, so both decide the same way.
    """
    routing = config.routing
    refuse_empty = not routing.allow_empty_tables  # an emptied table waits for SIGHUP (docs/routing.md)
    users = LiveTable(routing.users, load_users, refuse_empty)
    aliases = LiveTable(routing.aliases, load_aliases, refuse_empty)
    gateway = LiveTable(routing.gateway_table, load_gateway_table, refuse_empty)
    local_domains = frozenset(routing.local_domains)
    routers = [] if routing.forward_all_to_gateway else [LocalRouter(local_domains, users)]
    routers.append(GatewayRouter(gateway))
    if routing.smtp_gateway is not None:
        routers.append(SmartHostRouter(routing.smtp_gateway))
    routers.append(MXRouter())
    resolver = Resolver(routers, aliases, local_domains)
    policy = RecipientPolicy(
        resolver,
        local_domains=local_domains,
        relay_domains=routing.relay_domains,
        relay_networks=config.server.relay_networks,
        gateway=gateway,
        aliases=aliases,
        check_sender_ownership=config.server.check_sender_ownership,
    )
    relay_recipients = LiveTable(routing.relay_recipients, load_relay_recipients, refuse_empty)
    policy.relay_recipients, policy.users = relay_recipients, users
    policy.verify_recipients = routing.verify_recipients  # probes need a verifier: make_service sets it
    return Routing(users, aliases, gateway, resolver, policy, relay_recipients)
