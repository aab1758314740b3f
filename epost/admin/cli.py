"""The `epost` admin command (SPEC §8): works on the config, tables and queue store directly, without the daemon.

`--config` and `--spool` are accepted before or after the subcommand, as with
the daemon's own flags.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import stat
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from epost.admin.queue_listing import format_text, matches, read_queue, to_json
from epost.admin.surgery_commands import add_commands, run_action
from epost.config import Config, ConfigError, load_config
from epost.routing.aliases import check_loops, load_aliases
from epost.routing.gateway import load_gateway_table
from epost.routing.explain import route_lines
from epost.routing.relay_recipients import load_relay_recipients
from epost.routing.tables import TableError
from epost.routing.users import load_users, parse_user_line
from epost.address import parse_mailbox

# Config key under [routing] -> parser, or None while that table has no parser yet
# (its file is still checked for existence).
TABLES: dict[str, Callable[[Path], object]] = {
    "users": load_users,
    "aliases": load_aliases,
    "gateway_table": load_gateway_table,
    "relay_recipients": load_relay_recipients,
}


def main(argv: Sequence[str] | None = None, *, now: float | None = None) -> int:
    """Run one subcommand and return its exit status; `now` (Unix time) is for tests."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as stop:  # --help or a usage error, already printed by argparse
        return stop.code if isinstance(stop.code, int) else 2
    try:
        return args.run(args, time.time() if now is None else now)
    except BrokenPipeError:  # `epost queue | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _parser() -> argparse.ArgumentParser:
    # SUPPRESS keeps a subparser from resetting a value given before the subcommand.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS,
                        help="TOML config file (default: built-in defaults)")
    common.add_argument("--spool", metavar="DIR", default=argparse.SUPPRESS,
                        help="spool root (overrides the config file)")
    parser = argparse.ArgumentParser(prog="epost", parents=[common], description="epost mail server administration")
    commands = parser.add_subparsers(metavar="COMMAND", required=True)

    check = commands.add_parser("check-config", parents=[common], help="validate the config, tables and TLS files")
    check.set_defaults(run=check_config)

    route = commands.add_parser("route", parents=[common], help="show where mail for an address goes, and why")
    route.add_argument("address", help="an envelope address, e.g. bob@example.jp")
    route.add_argument("--no-dns", action="store_true", help="do not look up MX hosts")
    route.set_defaults(run=show_route)

    queue = commands.add_parser("queue", parents=[common], help="list queued messages")
    queue.add_argument("--json", action="store_true", help="machine-readable output")
    queue.add_argument("--domain", help="only messages with a recipient at this domain")
    queue.add_argument("--state", choices=["incoming", "deferred", "held", "delivered", "failed"],
                       help="only messages with a recipient in this state")
    queue.set_defaults(run=list_queue)

    show = commands.add_parser("show", parents=[common], help="print a queued message: envelope, then content")
    show.add_argument("id", metavar="ID", help="a queue ID, as `epost queue` shows it")
    show.set_defaults(run=show_message)

    add_commands(commands, common, operate_on_queue)

    passwd = commands.add_parser("passwd", parents=[common], help="set a user's password in the users file")
    passwd.add_argument("address", help="the account, e.g. alice@example.jp (added if new)")
    passwd.add_argument("--stdin", action="store_true", help="read the password from one line of standard input")
    passwd.set_defaults(run=set_password)

    verify = commands.add_parser("verify", parents=[common], help="ask an operated domain's next hop about an address now")
    verify.add_argument("address", help="an address of an operated domain, e.g. bob@example.jp")
    verify.set_defaults(run=verify_address)

    dovecot = commands.add_parser("dovecot-conf", parents=[common], help="print a Dovecot 2.3 config for IMAP/POP3/LMTP on the Maildirs")
    dovecot.add_argument("--imap", metavar="[ADDR:]PORT", default="143", help="IMAP (STARTTLS) listener; 'off' for none")
    dovecot.add_argument("--pop3", metavar="[ADDR:]PORT", default="110", help="POP3 (STARTTLS) listener; 'off' for none")
    dovecot.add_argument("--lmtp", metavar="ENDPOINT", help="LMTP listener for local_transport, unix:/PATH or tcp:[HOST:]PORT")
    dovecot.add_argument("--base-dir", metavar="DIR", help="Dovecot base_dir (and state_dir under it) for a private instance")
    dovecot.set_defaults(run=print_dovecot_conf)
    dkim = commands.add_parser("dkim", parents=[common], help="DKIM keys").add_subparsers(metavar="ACTION", required=True)
    keygen = dkim.add_parser("keygen", parents=[common], help="make a DKIM key under <config dir>/dkim/ and print the TXT record")
    keygen.add_argument("domain")
    keygen.add_argument("--selector", help="default: the month, e.g. e202612")
    keygen.add_argument("--type", choices=("rsa", "ed25519"), default="rsa", help="rsa (2048 bits, default) or ed25519")
    keygen.set_defaults(run=dkim_keygen)
    check_dns = commands.add_parser("check-dns", parents=[common], help="check the DNS records a domain needs: MX, SPF, DKIM, DMARC, reverse DNS")
    check_dns.add_argument("domain")
    check_dns.set_defaults(run=check_dns_records)
    return parser


def _load(args: argparse.Namespace) -> Config:
    config = getattr(args, "config", None)
    return load_config(Path(config) if config else None, {"spool": getattr(args, "spool", None)})


def check_config(args: argparse.Namespace, now: float) -> int:
    """Print every problem found, one per line (`file:key: ...`, `path:line: ...`); 1 if any, else `ok: SOURCE`."""
    try:
        config = _load(args)
    except ConfigError as error:  # table paths depend on the config: nothing more to check
        print(error)
        return 1
    problems = 0
    for is_problem, line in (*_check_tables(config), *_check_tls(config), *_check_dkim(config)):
        print(line)
        problems += is_problem
    if problems:
        return 1
    print(f"ok: {config.source or 'built-in defaults'}")
    return 0


def _check_tables(config: Config) -> Iterator[tuple[bool, str]]:
    """(is a problem, line) per table worth mentioning; a missing table is only a note (SPEC §2)."""
    for key, parse in TABLES.items():
        path: Path = getattr(config.routing, key)
        if not path.exists():
            if key != "relay_recipients":  # no file is its usual state: recipients are verified by probe
                yield False, f"{path}: not found (empty table)"
        else:
            try:
                table = parse(path)
            except TableError as error:
                yield True, str(error)
                continue
            except OSError as error:
                yield True, f"{path}: cannot read: {error.strerror or error}"
                continue
            if key == "aliases":
                for error in check_loops(table, frozenset(config.routing.local_domains)):
                    yield True, str(error)


def _check_tls(config: Config) -> Iterator[tuple[bool, str]]:
    """The configured certificate and key must load and match; a self-signed pair is made by the daemon."""
    from epost.tls import TLSConfigError, server_context  # pyOpenSSL: only when there is a certificate

    cert, key = config.server.tls_cert, config.server.tls_key
    if cert is not None and key is not None:
        try:
            server_context(cert, key)
        except TLSConfigError as error:
            yield True, str(error)


def show_route(args: argparse.Namespace, now: float) -> int:
    """SPEC §8: one line per alias step, then one per final recipient; 1 when all are rejected."""
    from epost.routing.dns import MXResolver
    from epost.routing_chain import build_routing  # the daemon's own chain; heavy imports, only here
    try:
        config = _load(args)
    except ConfigError as error:
        print(f"epost: {error}", file=sys.stderr)
        return 1
    answer = _route_from_daemon(config, args.address, not args.no_dns)
    if answer is not None:
        print("\n".join(answer["lines"]))
        for line in verification_lines(config, args.address, now):  # the daemon saves its cache every 5 s
            print(line)
        for note in answer["notes"]:  # stderr: the route lines on stdout keep SPEC §8's format
            print(note, file=sys.stderr)
        return answer["status"]
    try:
        resolver = build_routing(config).resolver
    except TableError as error:
        print(f"epost: {error}", file=sys.stderr)
        return 1
    dns = None if args.no_dns else MXResolver(None, None, config.routing.dns_servers, timeout=config.delivery.connect_timeout)
    lines, status = route_lines(resolver, args.address, dns)
    for line in lines:
        print(line)
    for line in verification_lines(config, args.address, now):
        print(line)
    return status


def _load_with_spool(args: argparse.Namespace) -> Config | None:
    """The config, when it loads and its spool folder exists; else None, the problem said on stderr."""
    try:
        config = _load(args)
    except ConfigError as error:
        print(f"epost: {error}", file=sys.stderr)
        return None
    if not config.server.spool.is_dir():
        print(f"epost: {config.server.spool}: no spool folder (give --spool or --config)", file=sys.stderr)
        return None
    return config


def list_queue(args: argparse.Namespace, now: float) -> int:
    """Print the queue as read from the queue store (text, or JSON with `--json`)."""
    config = _load_with_spool(args)
    if config is None:
        return 1
    from epost.admin.store import open_store
    from epost.store.database import StoreUnavailable
    from epost.store.upgrade import not_imported

    domain = args.domain.strip().rstrip(".").lower() if args.domain else None
    try:
        spool = open_store(config)
        queued = [] if spool is None else read_queue(spool)  # no queue store yet: an empty queue
        messages = [m for m in queued if matches(m, domain, args.state)]
    except (StoreUnavailable, OSError) as error:
        print(f"epost queue: {error}", file=sys.stderr)
        return 1
    if waiting := not_imported(config.server.spool):
        print(f"epost queue: {waiting} message(s) of the file spool in {config.server.spool}/incoming, deferred "
              "and hold are not in the queue store yet: the daemon imports them at its next start", file=sys.stderr)
    if args.json:
        print(json.dumps(to_json(messages, now), indent=1))
    else:
        print("\n".join(format_text(messages, now)))
    return 0


def show_message(args: argparse.Namespace, now: float) -> int:
    """SPEC §4: the envelope as `key: value` lines, a blank line, the content as stored; 1 when not queued.
    A queued message whose content is lost: its envelope alone, a line on stderr, and 1."""
    from epost.admin.show import envelope_lines, lost_content, open_queued
    from epost.logs import printable
    from epost.store.envelope import EnvelopeError
    from epost.store.database import QUEUE_ID, StoreUnavailable
    from epost.admin.store import open_store

    config = _load_with_spool(args)
    if config is None:
        return 1
    asked = args.id.strip()
    queue_id = asked.upper() if QUEUE_ID.fullmatch(asked.upper()) else asked  # `epost show 0190...a000` too
    try:
        spool = open_store(config)
        queue, envelope, content = open_queued(spool, queue_id)
    except LookupError as error:
        print(printable(f"epost show: {error}", join_lines=False), file=sys.stderr)
        return 1
    except (EnvelopeError, OSError, StoreUnavailable) as error:
        print(printable(f"epost show: {queue_id}: {error}", join_lines=False), file=sys.stderr)
        return 1
    sys.stdout.write("\n".join(envelope_lines(queue, envelope)) + ("\n" if content is None else "\n\n"))
    sys.stdout.flush()
    if content is None:  # queued, but its large file is missing: the envelope, and say so
        print(printable(f"epost show: {lost_content(spool, queue_id)}", join_lines=False), file=sys.stderr)
        return 1
    try:
        for chunk in content.chunks():
            sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()
    finally:
        content.close()
    return 0


def operate_on_queue(args: argparse.Namespace, now: float) -> int:
    """flush / hold / release / delete / reroute."""
    config = _load_with_spool(args)
    if config is None:
        return 1
    return run_action(config, args.action, args.ids, args.domain, now)


def set_password(args: argparse.Namespace, now: float) -> int:
    """SPEC §8: hash a new password into the users file, replacing the account's line or adding one."""
    from epost.auth import hash_password  # twisted.cred: only here
    from epost.users_file import replace_users_file, users_file_lock, with_hash

    try:
        user = parse_user_line(args.address.strip())
        if user.password_hash is not None:
            raise ValueError("give the address alone, without ':'")
    except ValueError as error:  # AddressError is a ValueError
        print(f"epost: {args.address}: {error}", file=sys.stderr)
        return 1
    try:
        path: Path = _load(args).routing.users
    except ConfigError as error:
        print(f"epost: {error}", file=sys.stderr)
        return 1
    try:
        load_users(path)  # a file with a bad line is refused, never rewritten
        try:
            old, mode = path.read_bytes(), stat.S_IMODE(path.stat().st_mode)
        except FileNotFoundError:
            old, mode = b"", 0o600
    except TableError as error:
        print(f"epost: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"epost: {path}: cannot read: {error.strerror or error}", file=sys.stderr)
        return 1
    password = _read_password(args.stdin)
    if password is None:
        return 1
    created = not path.exists()
    try:
        if created:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # a new users file's folder: private
        new_hash = hash_password(password)
        with users_file_lock(path):  # the daemon may have upgraded a hash since we read the file
            old = path.read_bytes() if path.exists() else old
            replace_users_file(path, with_hash(old, user.address, new_hash), mode)
    except OSError as error:
        print(f"epost: {path}: cannot write: {error.strerror or error}", file=sys.stderr)
        return 1
    if created:
        print(f"created {_shown(path)}")
    print(f"password set for {user.address}")
    return 0


def _read_password(from_stdin: bool) -> str | None:
    """One line of stdin (line ending removed), or the same password typed twice; None after saying why."""
    if from_stdin:
        password = sys.stdin.readline().removesuffix("\n").removesuffix("\r")
    elif not sys.stdin.isatty():
        print("epost: standard input is not a terminal (use --stdin)", file=sys.stderr)
        return None
    else:
        try:
            password = getpass.getpass("New password: ")
            if password and getpass.getpass("Retype new password: ") != password:
                print("epost: passwords do not match", file=sys.stderr)
                return None
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            print("epost: no password given", file=sys.stderr)
            return None
    if not password:
        print("epost: empty password refused", file=sys.stderr)
        return None
    return password


def _route_from_daemon(config: Config, address: str, dns: bool) -> dict | None:
    """The daemon's answer (the tables it has in force), or None after one line on stderr saying
    that the files on disk are used instead."""
    from epost.control import DaemonNotRunning, ask_route

    try:
        return ask_route(config.server.spool, address, dns)
    except DaemonNotRunning:
        why = "no daemon is running"
    except (OSError, RuntimeError) as error:  # timeout, connection dropped, an older daemon
        why = f"the daemon did not answer ({error})"
    print(f"epost: {why} (spool {config.server.spool}): routing from the files on disk", file=sys.stderr)
    return None


def _shown(path: Path) -> str:
    """`path` relative to the working folder when it is below it (`etc/users`), else as it is."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
def verification_lines(config: Config, address_text: str, now: float) -> list[str]:
    """`epost route`'s line about recipient verification (SPEC §3.5), for an
    address it applies to: the relay_recipients line, or the cached verdict;
    nothing when no verdict is cached (so the §8 lines stay as they were)."""
    from datetime import datetime, timezone

    from epost.delivery.verify import read_cached
    from epost.routing_chain import build_routing
    from epost.smtp.interfaces import Rejected, Session

    try:
        address = parse_mailbox(address_text)
        policy = build_routing(config).policy
        outsider = Session("relay", "192.0.2.0", 0, "", True, None, None)  # neither trusted nor authenticated
        facts = policy.verification_facts(outsider, address, policy.route_for(outsider, address))
    except (ValueError, TableError, Rejected):
        return []
    if facts is None or facts["local"]:
        return []
    if facts["listed"] is not None:
        line = policy.relay_recipients().lookup(address)
        if line is None:
            return [f"{address}: verify via relay_recipients -> 550 5.1.1 not listed"]
        return [f"{address}: verify via {config.routing.relay_recipients.name}:{line} -> listed"]
    verdict = read_cached(config.server.spool, str(address), now) if config.routing.verify_recipients else None
    if verdict is None:  # nothing known yet: the next RCPT, or `epost verify`, probes it
        return []
    until = datetime.fromtimestamp(verdict.expires, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    said = f" ({verdict.host} said: {verdict.text})" if verdict.host else f" ({verdict.text})"
    return [f"{address}: verify via cache -> {verdict.status} until {until}{said}"]


def verify_address(args: argparse.Namespace, now: float) -> int:
    """`epost verify ADDRESS`: probe now through the running daemon (which caches
    the verdict), or from here when no daemon runs. Exit 0 accepted, 1 refused
    or not verifiable, 2 temporary."""
    from epost.control import DaemonNotRunning, ask_verify

    config = _load_with_spool(args)
    if config is None:
        return 1
    try:
        answer = ask_verify(config.server.spool, args.address)
        note = ""
    except DaemonNotRunning:
        try:
            answer = _verify_here(config, args.address)
        except ValueError as error:
            print(f"epost: {error}", file=sys.stderr)
            return 1
        note = " (daemon not running: verdict not cached)"
    except (RuntimeError, OSError) as error:
        print(f"epost: {error}", file=sys.stderr)
        return 1
    said = f"{answer['host']} said: " if answer.get("host") else ""
    print(f"{args.address}: {answer['status']}: {said}{answer['text']}{note}")
    return {"accepted": 0, "refused": 1}.get(answer["status"], 2)


def _verify_here(config: Config, address_text: str) -> dict:
    """One probe from this process, with a reactor of its own; no cache."""
    from twisted.internet import reactor
    from twisted.python.failure import Failure
    from twisted.python.threadpool import ThreadPool

    from epost.delivery.verify import VerdictCache, make_verifier, verify_now
    from epost.routing_chain import build_routing

    resolver = build_routing(config).resolver
    pool = ThreadPool(minthreads=0, maxthreads=2, name="epost-verify")
    pool.start()
    verifier = make_verifier(config, reactor, pool)
    verifier.cache = VerdictCache(None, reactor.seconds)
    result: list = []
    try:
        d = verify_now(verifier, resolver.route_final, address_text)
    except ValueError:
        pool.stop()
        raise
    d.addBoth(result.append).addBoth(lambda _: reactor.stop())
    if not result:
        reactor.run(installSignalHandlers=False)
    pool.stop()
    verdict = result[0]
    if isinstance(verdict, Failure):
        verdict.raiseException()
    return {"status": verdict.status, "text": verdict.text, "host": verdict.host}


def print_dovecot_conf(args: argparse.Namespace, now: float) -> int:
    """Issue 17: a complete Dovecot configuration on stdout; 1 after saying why not."""
    from epost.admin.dovecot import DovecotConfError, dovecot_conf, parse_listener, parse_lmtp_endpoint
    from epost.tls import ensure_self_signed

    try:
        config = _load(args)
        imap = None if args.imap == "off" else parse_listener(args.imap, 143)
        pop3 = None if args.pop3 == "off" else parse_listener(args.pop3, 110)
        lmtp = parse_lmtp_endpoint(args.lmtp) if args.lmtp else None
        if config.server.tls_cert is not None and config.server.tls_key is not None:
            cert, key = config.server.tls_cert, config.server.tls_key
        else:  # the self-signed pair the daemon uses, made now if it is not yet
            cert, key = ensure_self_signed(config.server.spool / "tls", config.server.hostname)
        text = dovecot_conf(config, cert=cert, key=key, imap=imap, pop3=pop3, lmtp=lmtp,
                            base_dir=Path(args.base_dir) if args.base_dir else None)
    except (ConfigError, DovecotConfError, ValueError, OSError) as error:
        print(f"epost: {error}", file=sys.stderr)
        return 1
    sys.stdout.write(text)
    return 0



def dkim_keygen(args: argparse.Namespace, now: float) -> int:
    """Issue 15: write a 0600 key under <config dir>/dkim/ and print the record to publish and the config lines."""
    import datetime

    from epost.delivery.signing import default_selector, keygen, txt_record

    config = getattr(args, "config", None)
    directory = (Path(config).resolve().parent if config else Path.cwd()) / "dkim"
    selector = args.selector or default_selector(datetime.datetime.fromtimestamp(now, datetime.timezone.utc).date())
    try:
        path, key = keygen(args.domain, directory, selector, args.type)
    except (OSError, ValueError) as error:
        print(f"epost: {error}", file=sys.stderr)
        return 1
    print(f"# key: {path} (mode 0600); add to the config:")
    print(f'# [[dkim.keys]]\n# domain = "{key.domain}"\n# selector = "{key.selector}"\n# key = "{path}"')
    print("# publish:")
    print(txt_record(key))
    return 0


def _check_dkim(config: Config) -> Iterator[tuple[bool, str]]:
    """Issue 15: each [[dkim.keys]] file must be readable and a usable private key
    (the checks start-up makes: epost.delivery.signing.load_keys)."""
    from epost.delivery.signing import DkimKeyError, load_key, repeated_selectors

    for problem in repeated_selectors(config.dkim.keys):
        yield True, problem
    for spec in config.dkim.keys:
        try:
            load_key(spec.domain, spec.selector, spec.key)
        except DkimKeyError as error:
            yield True, str(error)


def check_dns_records(args: argparse.Namespace, now: float) -> int:
    """SPEC §9: MX, SPF per public address, DKIM, DMARC, reverse DNS, one `ok|warn|fail  check  detail`
    line each with the fix below it; 1 on any fail."""
    from epost.admin.dns_check import check_config_domain, format_finding

    try:
        config = _load(args)
    except ConfigError as error:
        print(f"epost: {error}", file=sys.stderr)
        return 1
    findings = check_config_domain(config, args.domain)
    for finding in findings:
        print(format_finding(finding))
    return 1 if any(f.status == "fail" for f in findings) else 0


if __name__ == "__main__":
    raise SystemExit(main())
