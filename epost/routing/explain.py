"""Route explanation: the lines `epost route`, Mail Control's route box and the
control channel's Route command show for one address (SPEC §8).

Here, beside the resolver whose decisions it spells out, so the web pages and
the daemon need not import the `epost` command to show a route.
"""

from __future__ import annotations

from epost.address import parse_mailbox


def route_lines(resolver, address_text: str, dns=None) -> tuple[list[str], int]:
    """The `epost route` lines for `address_text` and the exit status (1 when every final recipient is rejected).

    `dns` (blocking MX lookups) or None for `--no-dns`: an MX route is then
    shown as `MX of DOMAIN`. Mail Control's route box calls this too.
    """
    try:
        address = parse_mailbox(address_text)
        resolution = resolver.resolve(address)
    except ValueError as error:  # bad syntax, or an alias loop
        return [f"{address_text}: reject via aliases -> {error}"], 1
    lines = [f"{step.source}: alias via {step.rule} -> {', '.join(map(str, step.targets))}" for step in resolution.steps]
    rejected = 0
    for final, route in resolution.finals:
        kind, text = _describe(route, dns)
        rejected += kind == "reject"
        lines.append(f"{final}: {kind} via {route.rule} -> {text}")
    return lines, 1 if rejected == len(resolution.finals) else 0


def _describe(route, dns) -> tuple[str, str]:
    """The route's kind and target; a domain DNS says cannot take mail is a reject."""
    from epost.routing.dns import DNSError

    try:
        return route.kind, _target(route, dns)
    except DNSError as error:
        if error.permanent:
            return "reject", f"550 {error.enhanced} {error}"
        return route.kind, f"MX of {route.mx_domain} (temporary failure: {error})"


def _target(route, dns) -> str:
    if route.kind == "local":
        return f"mailbox {route.mailbox}"
    if route.kind == "reject":
        return f"{route.reply.code} {route.reply.enhanced} {route.reply.text}"
    if route.hosts:
        return ", ".join(map(str, route.hosts))
    if dns is None:
        return f"MX of {route.mx_domain}"
    return ", ".join(f"{host}:25" for host in dns.lookup_mx(route.mx_domain))
