"""Relay-throughput benchmark: smtp-source -> epost -> smtp-sink beside the same through Postfix.

    .venv/bin/python bench/relay.py [--messages 2000] [--sizes 4096,102400]
                                    [--sessions 10] [--rounds 1] [--no-postfix] [--signing]

epost relays every non-local recipient to its own smtp-sink through a
gateway.dat catch-all (`*,127.0.0.1,PORT`); Postfix (../shared/tools/postfix-peer)
relays to another smtp-sink through its relayhost. For each size, smtp-source
sends N messages with `-s SESSIONS` to each server in turn (epost first,
then Postfix, in the same run) and the clock stops when that server's sink has
counted all N (smtp-sink -c). Printed per server: messages/s end to end, wall
seconds, CPU milliseconds per message (all processes of that MTA: epost's
daemon, spool workers and courier; every Postfix process, measured once its queue
is empty again), epost's rate and CPU as ratios of Postfix's (medians over
the rounds, and with two rounds or more the lowest and highest rate ratio of
one round), the disk's write requests and cache flushes per message (from
the first accept until the queue is empty again; the disk that holds each
server's spool, everything on it counts, as in accept.py) and how many SMTP
sessions each opened to its sink per message (connection reuse). A second
line splits epost's CPU per message by process: the daemon, the spool
workers together and the courier process (medians, then each round's
daemon/workers/courier). Needs root.

--signing adds a second epost that DKIM-signs every message (an RSA-2048 and
an Ed25519 key for smtp-source's From: domain, client.test; the client is in
relay_networks): it is measured right after the unsigned one in each round,
and the line shows its CPU-ms per message, what signing added to the
unsigned epost's, its rate and its rate as a ratio of Postfix's. The signer's
own cost for one message (bench/dkim_sign.py, the two signatures, no I/O) is
printed first.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import dkim_sign
from common import DiskCounters, Epost, Postfix, Sink, disk_columns, smtp_source


def measure(server, sink: Sink, messages: int, size: int, sessions: int, to: str) -> dict:
    server.wait_until_drained()
    base, opened = sink.received(), sink.sessions()
    disk = DiskCounters(server.spool)
    cpu_before, disk_before = server.cpu(), disk.read()
    parts_before = server.cpu_by_process() if hasattr(server, "cpu_by_process") else None
    start = time.monotonic()
    accept_seconds = smtp_source(server.port, messages, size, sessions, to)
    arrived = sink.wait_for(base + messages)
    server.wait_until_drained()
    cpu = server.cpu() - cpu_before
    parts = {}
    if parts_before is not None:  # epost: CPU-ms per message of each kind of process
        parts = {f"cpu_ms_{role}": 1000 * (spent - parts_before[role]) / messages
                 for role, spent in server.cpu_by_process().items()}
    writes, flushes = disk.per_message(disk_before, messages)
    seconds = arrived - start
    return {
        "rate": messages / seconds,
        "seconds": seconds,
        "accept_rate": messages / accept_seconds,
        "cpu_ms": 1000 * cpu / messages,
        "sessions": (sink.sessions() - opened) / messages,  # outbound SMTP sessions per message
        "writes": writes,  # disk write requests per message, accepted until drained
        "flushes": flushes,  # disk cache flushes per message
        **parts,
    }


class RelayingEpost(Epost):
    """epost whose every relayed recipient goes to `sink` (delivered there, nothing local)."""

    def __init__(self, sink: Sink, tail_toml: str = ""):
        super().__init__(gateway=f"*,127.0.0.1,{sink.port}\n", tail_toml=tail_toml)

    def queued(self, queues=("incoming", "deferred")) -> int:
        return super().queued(queues)


SIGNED_DOMAIN = "client.test"  # smtp-source writes From: <bench@client.test>


def signing_keys(folder: Path) -> tuple[str, tuple]:
    """An RSA-2048 and an Ed25519 key for SIGNED_DOMAIN: [[dkim.keys]] entries, and the keys."""
    from epost.delivery import signing

    entries, keys = [], []
    for selector, kind in (("r1", "rsa"), ("e1", "ed25519")):
        path, key = signing.keygen(SIGNED_DOMAIN, folder, selector, kind)
        entries.append(f'[[dkim.keys]]\ndomain = "{SIGNED_DOMAIN}"\nselector = "{selector}"\nkey = "{path}"\n')
        keys.append(key)
    return "".join(entries), tuple(keys)


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # a kill still runs the clean-up
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--sizes", default="4096,102400")
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=1, help="repeat each size; medians are printed")
    parser.add_argument("--no-postfix", action="store_true")
    parser.add_argument("--signing", action="store_true", help="also an epost DKIM-signing every message (RSA-2048 + Ed25519)")
    args = parser.parse_args()

    epost_sink = Sink()
    epost = RelayingEpost(epost_sink)
    postfix = signed = signed_sink = keys_folder = None
    try:
        if args.signing:
            keys_folder = Path(tempfile.mkdtemp(prefix="epost-bench-dkim-"))
            dkim_toml, keys = signing_keys(keys_folder)
            alone = dkim_sign.cpu_ms(keys, 300, dkim_sign.MESSAGE.replace(b"example.test", SIGNED_DOMAIN.encode()))
            print(f"signer alone (bench/dkim_sign.py's message): {alone:.3f} CPU-ms/msg, RSA-2048 + Ed25519")
            signed_sink = Sink()
            signed = RelayingEpost(signed_sink, tail_toml=dkim_toml)
        postfix = None if args.no_postfix else Postfix()
        # warm-up: imports, first connections, page cache
        measure(epost, epost_sink, 200, 4096, args.sessions, "sink@remote.test")
        if signed:
            measure(signed, signed_sink, 200, 4096, args.sessions, "sink@remote.test")
        if postfix:
            measure(postfix, postfix.sink, 200, 4096, args.sessions, "sink@remote.test")
        print(f"{args.messages} messages, smtp-source -s {args.sessions}; end to end = until the sink counted all")
        print(f"{'size':>7}  {'epost msg/s':>11} {'accept/s':>8} {'CPU-ms/msg':>10} {'wr/msg':>6} {'fl/msg':>6}  "
              f"{'postfix msg/s':>13} {'accept/s':>8} {'CPU-ms/msg':>10} {'wr/msg':>6} {'fl/msg':>6}"
              f"  {'rate ratio':>10} {'CPU ratio':>9}  sessions/msg e/p"
              f"  {'rounds':>9}")
        for size in (int(s) for s in args.sizes.split(",")):
            ours, theirs, signs = [], [], []
            for _ in range(args.rounds):
                ours.append(measure(epost, epost_sink, args.messages, size, args.sessions, "sink@remote.test"))
                if signed:
                    signs.append(measure(signed, signed_sink, args.messages, size, args.sessions, "sink@remote.test"))
                if postfix:
                    theirs.append(measure(postfix, postfix.sink, args.messages, size, args.sessions, "sink@remote.test"))
            o = {k: statistics.median(r[k] for r in ours) for k in ours[0]}
            line = (f"{size:>7}  {o['rate']:>11.0f} {o['accept_rate']:>8.0f} {o['cpu_ms']:>10.2f}"
                    f" {disk_columns(o['writes'], o['flushes'])}")
            if postfix:
                t = {k: statistics.median(r[k] for r in theirs) for k in theirs[0]}
                line += (f"  {t['rate']:>13.0f} {t['accept_rate']:>8.0f} {t['cpu_ms']:>10.2f}"
                         f" {disk_columns(t['writes'], t['flushes'])}"
                         f"  {o['rate'] / t['rate']:>10.2f} {o['cpu_ms'] / t['cpu_ms']:>9.2f}  {o['sessions']:.2f}/{t['sessions']:.2f}")
                # each round's ratio (epost's round against Postfix's next to it): the spread of one run
                ratios = [a["rate"] / b["rate"] for a, b in zip(ours, theirs)]
                line += f"  {min(ratios):.2f}–{max(ratios):.2f}" if len(ratios) > 1 else ""
            print(line, flush=True)
            print(f"{'':>7}  epost CPU-ms/msg by process (medians): daemon {o['cpu_ms_daemon']:.2f}, "
                  f"spool workers {o['cpu_ms_workers']:.2f}, courier {o['cpu_ms_courier']:.2f}"
                  + (f", other {o['cpu_ms_other']:.2f}" if o["cpu_ms_other"] else "")
                  + "; per round: " + " | ".join(
                      f"{r['cpu_ms_daemon']:.2f}/{r['cpu_ms_workers']:.2f}/{r['cpu_ms_courier']:.2f}" for r in ours),
                  flush=True)
            if signed:
                g = {k: statistics.median(r[k] for r in signs) for k in signs[0]}
                line = (f"{'signing':>7}  {g['rate']:>11.0f} {g['accept_rate']:>8.0f} {g['cpu_ms']:>10.2f}"
                        f" {disk_columns(g['writes'], g['flushes'])}  (+{g['cpu_ms'] - o['cpu_ms']:.2f} CPU-ms/msg for signing")
                if postfix:
                    line += f"; rate ratio to Postfix {g['rate'] / t['rate']:.2f}, CPU ratio {g['cpu_ms'] / t['cpu_ms']:.2f}"
                print(line + ")", flush=True)
        print(f"epost resident memory after the run: {epost.rss_kib() / 1024:.0f} MiB (daemon)")
    finally:
        epost.stop()
        epost_sink.stop()
        if signed:
            signed.stop()
            signed_sink.stop()
        if keys_folder:
            shutil.rmtree(keys_folder, ignore_errors=True)
        if postfix:
            postfix.stop()


if __name__ == "__main__":
    main()
