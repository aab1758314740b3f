"""Split benchmark: one epost daemon against two that share the same load, beside Postfix.

    .venv/bin/python bench/split.py [--messages 3000] [--sizes 4096,102400]
                                    [--concurrency 10,50] [--rounds 3] [--relay] [--no-postfix]

What N receiving processes could at most give on this machine: two whole
`twistd -n epost` daemons (each its own spool, spool worker and Maildir, as
in accept.py), with smtp-source sending half the messages at half the
concurrency to each at the same time, against one daemon taking all of
them at the full concurrency. Two independent daemons share nothing, so
no coordination cost is counted: a receiving side split into processes
that share one queue can only do worse. Prints, per size and concurrency,
the median msg/s of one daemon, of the two together and of Postfix
(relaying into smtp-sink, as in accept.py, measured once both daemons
are idle), the two-daemon rate as a ratio of one and each as a ratio of
Postfix (medians of the per-round ratios), and the lowest and highest
two/one ratio of a round. With --relay every daemon relays to an
smtp-sink of its own instead (relay.py's set-up), and a rate runs until
the sinks have counted every message.
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from common import Epost, Postfix, Sink, smtp_source, spread
from relay import RelayingEpost


def rate(servers: list, messages: int, size: int, sessions: int, to: str, end_to_end: bool) -> float:
    """msg/s of `servers` taking an equal share of `messages` and `sessions` at the same time:
    until each has accepted its share, or with `end_to_end` until each one's sink has it.
    A sender that fails raises here (nothing is measured)."""
    share, each = messages // len(servers), sessions // len(servers)
    if each < 1:
        raise SystemExit(f"{sessions} sessions cannot be shared by {len(servers)} servers")
    bases = [server.sink.received() for server in servers] if end_to_end else []
    with ThreadPoolExecutor(len(servers)) as senders:
        start = time.monotonic()
        for sent in [senders.submit(smtp_source, server.port, share, size, each, to) for server in servers]:
            sent.result()
    end = max([server.sink.wait_for(base + share) for server, base in zip(servers, bases)], default=time.monotonic())
    return share * len(servers) / (end - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--sizes", default="4096,102400")
    parser.add_argument("--concurrency", default="10,50", help="even numbers, 2 or more: each daemon takes half")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--relay", action="store_true", help="relay to smtp-sink instead of delivering into a Maildir")
    parser.add_argument("--no-postfix", action="store_true")
    args = parser.parse_args()

    to = "sink@remote.test" if args.relay else "sink@bench.test"
    daemons: list[Epost] = []
    postfix = None
    try:
        for _ in range(2):
            daemons.append(RelayingEpost(Sink()) if args.relay else Epost())
        postfix = None if args.no_postfix else Postfix()
        for d in daemons:  # warm-up: imports, first Maildir, page cache
            smtp_source(d.port, 200, 4096, 10, to)
        if postfix:
            smtp_source(postfix.port, 200, 4096, 10, "sink@remote.test")
        print(f"{'size':>7} {'C':>3}  {'one msg/s':>9} {'two msg/s':>9} {'two/one':>7}"
              f"  {'postfix msg/s':>13} {'one/pf':>6} {'two/pf':>6}")
        for size in (int(s) for s in args.sizes.split(",")):
            for sessions in (int(c) for c in args.concurrency.split(",")):
                one, two, theirs = [], [], []
                for _ in range(args.rounds):  # each round: one daemon, both, then Postfix, each on a quiet machine
                    for d in daemons:
                        d.wait_until_drained()
                    one.append(rate(daemons[:1], args.messages, size, sessions, to, args.relay))
                    daemons[0].wait_until_drained()
                    two.append(rate(daemons, args.messages, size, sessions, to, args.relay))
                    if postfix:
                        for d in daemons:
                            d.wait_until_drained()
                        postfix.wait_until_drained()
                        theirs.append(rate([postfix], args.messages, size, sessions, "sink@remote.test", args.relay))
                split = [b / a for a, b in zip(one, two)]
                line = (f"{size:>7} {sessions:>3}  {statistics.median(one):>9.0f} {statistics.median(two):>9.0f}"
                        f" {statistics.median(split):>7.2f}")
                if postfix:  # every ratio column is the median of the per-round ratios
                    line += (f"  {statistics.median(theirs):>13.0f}"
                             f" {statistics.median(a / p for a, p in zip(one, theirs)):>6.2f}"
                             f" {statistics.median(b / p for b, p in zip(two, theirs)):>6.2f}")
                print(line + spread(split), flush=True)
    finally:
        for d in daemons:
            try:
                d.stop()
            finally:
                if args.relay:
                    d.sink.stop()
        if postfix:
            postfix.stop()


if __name__ == "__main__":
    main()
