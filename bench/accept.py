"""Accept-rate benchmark: epost (with local delivery running) beside Postfix.

    .venv/bin/python bench/accept.py [--messages 2000] [--sizes 4096,102400]
                                     [--concurrency 1,10,50] [--rounds 1] [--no-postfix]

For each message size and client concurrency, Postfix's smtp-source sends N
messages to each server in turn; prints messages/s, the server's CPU
milliseconds per message (epost: the daemon, receiving and delivering into
a Maildir; Postfix: all its processes, receiving and relaying into
smtp-sink), the disk's write requests and cache flushes per message (the
disk that holds each server's spool; everything on it counts, so keep the
machine quiet) and epost's rate as a ratio of Postfix's, measured in one run.
With --rounds N each size and concurrency is measured N times, epost and
Postfix in turn, and the medians are printed with the lowest and highest
rate ratio of one round: on a shared machine Postfix's own rate moves by
half from one run to the next.
"""

from __future__ import annotations

import argparse
import math
import statistics

from common import DiskCounters, Epost, Postfix, disk_columns, smtp_source, spread


def measure(server, name: str, messages: int, size: int, sessions: int, to: str, disk: DiskCounters | None = None) -> dict:
    """Accept rate (until smtp-source is done) and CPU per message (until the queue is empty again)."""
    server.wait_until_drained()
    cpu_before, disk_before = server.cpu(), disk and disk.read()
    seconds = smtp_source(server.port, messages, size, sessions, to)
    server.wait_until_drained()
    cpu = server.cpu() - cpu_before
    device = disk_columns(*disk.per_message(disk_before, messages)) if disk else disk_columns(math.nan, math.nan)
    return {"name": name, "rate": messages / seconds, "cpu_ms": 1000 * cpu / messages, "device": device}


def median_of(rounds: list[dict]) -> dict:
    """The middle round by rate, the lower of the two for an even count (its CPU and
    disk columns with it, which cannot be averaged); the ratio column is the
    median of the per-round ratios."""
    ordered = sorted(rounds, key=lambda r: r["rate"])
    return ordered[(len(ordered) - 1) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--sizes", default="4096,102400")
    parser.add_argument("--concurrency", default="1,10,50")
    parser.add_argument("--rounds", type=int, default=1, help="repeat each measurement; medians are printed")
    parser.add_argument("--no-postfix", action="store_true")
    args = parser.parse_args()

    epost = Epost()
    postfix = None if args.no_postfix else Postfix()
    ours_disk = DiskCounters(epost.spool)
    theirs_disk = DiskCounters(Postfix.spool) if postfix else None
    try:
        # warm-up: imports, first Maildir, page cache
        measure(epost, "epost", 200, 4096, 10, "sink@bench.test", ours_disk)
        print(f"{'size':>7} {'C':>3}  {'epost msg/s':>11} {'CPU-ms/msg':>10} {'wr/msg':>6} {'fl/msg':>6}"
              f"  {'postfix msg/s':>13} {'CPU-ms/msg':>10} {'wr/msg':>6} {'fl/msg':>6}  {'ratio':>5}")
        for size in (int(s) for s in args.sizes.split(",")):
            for sessions in (int(c) for c in args.concurrency.split(",")):
                ours, theirs = [], []
                for _ in range(args.rounds):  # each round: epost, then Postfix
                    ours.append(measure(epost, "epost", args.messages, size, sessions, "sink@bench.test", ours_disk))
                    if postfix:
                        theirs.append(measure(postfix, "postfix", args.messages, size, sessions, "sink@remote.test", theirs_disk))
                o = median_of(ours)
                line = f"{size:>7} {sessions:>3}  {o['rate']:>11.0f} {o['cpu_ms']:>10.2f} {o['device']}"
                if postfix:
                    t = median_of(theirs)
                    ratios = [a["rate"] / b["rate"] for a, b in zip(ours, theirs)]
                    line += (f"  {t['rate']:>13.0f} {t['cpu_ms']:>10.2f} {t['device']}"
                             f"  {statistics.median(ratios):>5.2f}")
                    line += spread(ratios)
                print(line, flush=True)
        print(f"epost resident memory after the run: {epost.rss_kib() / 1024:.0f} MiB")
    finally:
        epost.stop()
        if postfix:
            postfix.stop()


if __name__ == "__main__":
    main()
