"""`epost flush|hold|release|delete|reroute`: through the running daemon, or on the queue store when it is down.

"Down" means nobody holds the spool's lock (epost.store.lock): a daemon that
holds it but does not answer (starting, stopping, stuck) is never worked
around behind its back."""

from __future__ import annotations

import argparse
import sys

from epost.admin.store import open_store
from epost.config import Config
from epost.queue import surgery
from epost.store.envelope import EnvelopeError
from epost.store.lock import lock_path, try_lock
from epost.store.database import QUEUES, StoreUnavailable

HELP = {
    "flush": "retry deferred mail now (all, some IDs, or one --domain)",
    "hold": "put messages on hold: nothing is tried until released",
    "release": "release held messages; they are tried at once",
    "delete": "delete messages for good (no bounce)",
    "reroute": "recompute the routes of queued messages after a table edit",
}


def add_commands(commands, common: argparse.ArgumentParser, run) -> None:
    for action, text in HELP.items():
        parser = commands.add_parser(action, parents=[common], help=text)
        parser.add_argument("ids", nargs="*", metavar="ID", help="queue IDs")
        parser.add_argument("--domain", help="every message waiting for this destination domain")
        parser.set_defaults(run=run, action=action)


def run_action(config: Config, action: str, ids: list[str], domain: str | None, now: float) -> int:
    """Print one line per handled message and per problem; 1 when anything went wrong."""
    if action != "flush" and not ids and domain is None:
        print(f"epost {action}: give queue IDs or --domain", file=sys.stderr)
        return 2
    domain = domain.strip().rstrip(".").lower() if domain else None
    from epost.control import DaemonNotRunning, operate  # here: Twisted's AMP only for these commands

    try:
        result = operate(config.server.spool, action, ids, domain)
        how = "daemon"
    except DaemonNotRunning as unreachable:
        result = _on_the_store_if_no_daemon(config, action, ids, domain, now, unreachable)
        if result is None:
            return 1
        how = "queue store"
    for queue_id in result["done"]:
        print(f"{queue_id}: {_PAST[action]}" if queue_id != "*" else "every deferred message is due now")
    for problem in result["errors"]:
        print(f"epost {action}: {problem}", file=sys.stderr)
    if not result["done"] and not result["errors"]:
        print(f"nothing to {action} ({how})")
    return 1 if result["errors"] else 0


_PAST = {"flush": "due now", "hold": "on hold", "release": "released", "delete": "deleted", "reroute": "rerouted"}


def _on_the_store_if_no_daemon(config: Config, action: str, ids, domain, now: float, unreachable) -> dict | None:
    """`on_the_store` while holding the spool's lock, so no daemon runs meanwhile (and none can start);
    None, said in one line, when a daemon holds the lock but did not answer on its socket."""
    spool = config.server.spool
    try:
        lock = try_lock(spool)
    except OSError as error:
        print(f"epost {action}: {lock_path(spool)}: {error.strerror or error}; nothing changed", file=sys.stderr)
        return None
    if lock is None:
        print(
            f"epost {action}: {lock_path(spool)} is held (a daemon, or another epost command) but nothing"
            f" answers on the control socket ({unreachable}); nothing changed, try again in a moment",
            file=sys.stderr,
        )
        return None
    try:
        print(f"epost {action}: no daemon is running on {spool}: working on the queue store", file=sys.stderr)
        return on_the_store(config, action, ids, domain, now)
    except StoreUnavailable as error:
        print(f"epost {action}: {error}; nothing changed", file=sys.stderr)
        return None
    finally:
        lock.release()


def on_the_store(config: Config, action: str, ids: list[str], domain: str | None, now: float) -> dict:
    """The same actions with no daemon running: straight on the queue store (each change durable)."""
    spool = open_store(config)
    if spool is None:  # no queue store yet: nothing is queued
        return {"done": [], "errors": [f"{queue_id}: not queued" for queue_id in ids]}
    queues = ("hold",) if action == "release" else tuple(q for q in QUEUES if q != "hold")
    chosen = list(dict.fromkeys([*ids, *(surgery.waiting_for(spool, domain, queues) if domain else [])]))
    if action == "flush" and not chosen and domain is None:
        chosen = spool.queued_ids("deferred")
    route_final = None
    if action == "reroute":
        from epost.routing_chain import build_routing

        route_final = build_routing(config).resolver.route_final
    done, errors = [], []
    for queue_id in chosen:
        try:
            if action == "flush":
                surgery.make_due(spool, queue_id, now)
            elif action == "hold":
                surgery.hold(spool, queue_id)
            elif action == "release":
                surgery.release(spool, queue_id, now)
            elif action == "delete":
                surgery.delete(spool, queue_id)
            else:
                _, _, problems = surgery.reroute(spool, queue_id, route_final)
                errors.extend(problems)
        except (LookupError, ValueError) as error:
            errors.append(str(error).strip("'\""))
            continue
        except (OSError, EnvelopeError) as error:
            errors.append(f"{queue_id}: {error}")
            continue
        done.append(queue_id)
    return {"done": done, "errors": errors}
