"""Queue surgery (SPEC §8): hold, release, delete, make due, reroute.

Blocking functions over a `Spool`, each change one durable transaction of
its queue store (an operator's action is flushed before it is reported). With the daemon down `epost` calls them
directly; with the daemon up they run inside the delivery manager, after it
has taken the message out of its schedule and under the message's lock, so
nothing races them. Each raises LookupError for a message that is not queued.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from epost.store.envelope import RELAY, Envelope, relay_groups
from epost.queue.outcomes import has_local_pending
from epost.store.spool import Spool
from epost.routing.resolver import Route
from epost.address import AddressError, parse_mailbox


def find(spool: Spool, queue_id: str) -> tuple[str, Envelope]:
    """The queue holding the message and its envelope, read together; LookupError when it is
    in none (or the ID is malformed)."""
    try:
        found = spool.find(queue_id)
    except ValueError:  # not a queue ID at all
        found = None
    if found is None:
        raise LookupError(f"{queue_id}: not queued")
    return found


def waiting_for(spool: Spool, domain: str, queues: tuple[str, ...]) -> list[str]:
    """IDs in `queues` with recipients still to deliver to `domain` (what `--domain` picks)."""
    return [e.queue_id for queue in queues for e in spool.load_many(queue) if domain in relay_groups(e)]


def hold(spool: Spool, queue_id: str) -> Envelope:
    """Move the message to hold, where nothing is tried until it is released."""
    queue, envelope = find(spool, queue_id)
    if queue != "hold":
        spool.move(envelope, queue, "hold")
    return envelope


def release(spool: Spool, queue_id: str, now: float) -> tuple[Envelope, str]:
    """Move a held message back, due now: to incoming when local recipients
    still wait (the local runner takes them first), else to deferred."""
    queue, envelope = find(spool, queue_id)
    if queue != "hold":
        raise LookupError(f"{queue_id}: not on hold")
    envelope = _due_now(envelope, now)
    target = "incoming" if has_local_pending(envelope) else "deferred"
    spool.move(envelope, "hold", target)
    return envelope, target


def delete(spool: Spool, queue_id: str) -> Envelope:
    """Remove the message for good: no delivery, no bounce."""
    queue, envelope = find(spool, queue_id)
    spool.remove(queue_id, queue)
    return envelope


def make_due(spool: Spool, queue_id: str, now: float) -> Envelope:
    """Every retry of a deferred message due now (what `epost flush` does with the daemon down)."""
    queue, envelope = find(spool, queue_id)
    if queue == "deferred" and envelope.retries:
        envelope = _due_now(envelope, now)
        spool.update(envelope, queue)
    return envelope


def reroute(spool: Spool, queue_id: str, route_final: Callable[[object], Route]) -> tuple[str, Envelope, list[str]]:
    """Recompute the routes of pending relay recipients after a table edit.

    A recipient whose new route is no longer SMTP (now local, or refused)
    keeps its route and is reported: moving it between delivery agents is
    a job for re-sending, not for surgery. Returns the message's queue, its envelope and the reports."""
    queue, envelope = find(spool, queue_id)
    problems = []
    for index in envelope.pending():
        recipient = envelope.recipients[index]
        if (recipient.route or {}).get("kind") != RELAY:
            continue
        try:
            route = route_final(parse_mailbox(recipient.address))
        except (AddressError, ValueError) as error:
            problems.append(f"{recipient.address}: {error}")
            continue
        if route.kind != RELAY:
            problems.append(f"{recipient.address}: now routes as {route.kind}; route kept")
            continue
        envelope = envelope.with_recipient(index, route=route.to_dict())
    spool.update(envelope, queue)
    return queue, envelope, problems


def _due_now(envelope: Envelope, now: float) -> Envelope:
    retries = {destination: {**state, "next_attempt": now} for destination, state in envelope.retries.items()}
    return dataclasses.replace(envelope, retries=retries)
