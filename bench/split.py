"""Split benchmark: one epost daemon against two that share the same load, beside Postfix.

    .venv/bin/python bench/split.py [--messages 3000] [--sizes 4096,102400]
                                    [--concurrency 10,50] [--rounds 3] [--no-postfix]

What N receiving processes could at most give on this machine: two whole
`twistd -n epost` daemons (each its own spool, spool worker and Maildir, as
in accept.py), with smtp-source sending half the messages at half the
concurrency to each at the same time, against one daemon taking all of
them at the full concurrency. Two independent daemons share nothing, so
no coordination cost is counted: a receiving side split into processes
that share one queue can only do worse. Prints, per size and concurrency,
the median msg/s of one daemon, of the two together and of Postfix
(relaying into smtp-sink, as in accept.py), the two-daemon rate as a
ratio of one and each as a ratio of Postfix, and the lowest and highest
two/one ratio of a round.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

from common import Epost, Postfix, smtp_source

LOCAL = "sink@bench.test"


def together(daemons: list[Epost], messages: int, size: int, sessions: int) -> float:
    """msg/s of the daemons taking an equal share of `messages` and `sessions` at the same time."""
    threads = [
        threading.Thread(target=smtp_source, args=(d.port, messages // len(daemons), size, max(1, sessions // len(daemons)), LOCAL))
        for d in daemons
    ]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return messages // len(daemons) * len(daemons) / (time.monotonic() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--sizes", default="4096,102400")
    parser.add_argument("--concurrency", default="10,50")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-postfix", action="store_true")
    args = parser.parse_args()

    daemons = [Epost(), Epost()]
    postfix = None if args.no_postfix else Postfix()
    try:
        for d in daemons:  # warm-up: imports, first Maildir, page cache
            smtp_source(d.port, 200, 4096, 10, LOCAL)
        if postfix:
            smtp_source(postfix.port, 200, 4096, 10, "sink@remote.test")
        print(f"{'size':>7} {'C':>3}  {'one msg/s':>9} {'two msg/s':>9} {'two/one':>7}"
              f"  {'postfix msg/s':>13} {'one/pf':>6} {'two/pf':>6}")
        for size in (int(s) for s in args.sizes.split(",")):
            for sessions in (int(c) for c in args.concurrency.split(",")):
                one, two, theirs = [], [], []
                for _ in range(args.rounds):  # each round: one daemon, both, then Postfix
                    for d in daemons:
                        d.wait_until_drained()
                    one.append(args.messages / smtp_source(daemons[0].port, args.messages, size, sessions, LOCAL))
                    daemons[0].wait_until_drained()
                    two.append(together(daemons, args.messages, size, sessions))
                    if postfix:
                        postfix.wait_until_drained()
                        theirs.append(args.messages / smtp_source(postfix.port, args.messages, size, sessions, "sink@remote.test"))
                split = [b / a for a, b in zip(one, two)]
                line = (f"{size:>7} {sessions:>3}  {statistics.median(one):>9.0f} {statistics.median(two):>9.0f}"
                        f" {statistics.median(split):>7.2f}")
                if postfix:
                    pf = statistics.median(theirs)
                    line += f"  {pf:>13.0f} {statistics.median(one) / pf:>6.2f} {statistics.median(two) / pf:>6.2f}"
                print(line + f"  (two/one rounds {min(split):.2f}–{max(split):.2f})", flush=True)
    finally:
        for d in daemons:
            d.stop()
        if postfix:
            postfix.stop()


if __name__ == "__main__":
    main()
