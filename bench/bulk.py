"""Bulk mail against receivers that greylist or throttle (issue 14): E-Post's rule beside receiver-aware delivery.

    .venv/bin/python bench/bulk.py [--scenarios awl,noawl,rate] [--modes baseline,aware]
        [--messages 1000] [--delay 30] [--rate-messages 2000] [--rate 120] [--interval 120]
        [--healthy 100] [--healthy-rate 2] [--timeout 1800]

Scenarios (each run once with `[delivery] receiver_aware = false`, E-Post's
baseline, and once with `true`, side by side):
  awl    --messages messages, one recipient each, to a greylisting receiver that asks a
         private postgrey (--delay seconds, auto-whitelist on: postgrey's
         --auto-whitelist-clients=1, since postgrey counts one success per client per hour);
  noawl  the same, postgrey without auto-whitelist;
  rate   --rate-messages messages to a receiver taking --rate messages a minute per client
         address and answering `421 4.7.0 Too many messages, slow down` past that.
During each, --healthy messages go to a healthy destination at --healthy-rate a second:
their latency is from the 250 to DATA to their arrival at that receiver.

The peers are tests/e2e/bulk_peers.py (asyncio receivers on threads of this
process, postgrey as a child); the daemon is bench/common.Epost, routing by
gateway.dat to 127.0.0.1 ports; `[retry] interval` is E-Post's rule
(n × interval). A run that has not delivered everything after --timeout seconds
is reported as it stands. Needs postgrey (scripts/test.sh installs it); loopback only.
A daemon without the `receiver_aware` switch runs the baseline alone.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import Epost

sys.path[:0] = [str(Path(__file__).resolve().parent.parent / "tests" / sub) for sub in ("", "e2e")]
from bulk_peers import (  # noqa: E402
    GreylistReceiver, Postgrey, RateLimiter, Receiver, bounces, daemon_knows_receiver_aware, percentile,
    receiver_aware_line, send_bulk, sustained_rate,
)


@dataclass
class Result:
    scenario: str
    mode: str
    lines: list[str] = field(default_factory=list)


def attempts_line(peer: Receiver, count: int) -> str:
    counts = peer.rcpt_counts()
    spread = collections.Counter(min(n, 4) for n in counts.values())
    total = sum(counts.values())
    return (f"RCPT attempts {total} for {len(counts)} of {count} recipients: {total / max(1, len(counts)):.2f} per "
            f"recipient (1: {spread[1]}, 2: {spread[2]}, 3: {spread[3]}, 4+: {spread[4]})")


def healthy_line(accepted: dict[str, float], healthy: Receiver) -> str:
    arrivals = healthy.arrivals()
    ms = [1000 * (arrivals[s] - t) for s, t in accepted.items() if s in arrivals]
    missing = len(accepted) - len(ms)
    return (f"healthy destination: n={len(ms)} p50={percentile(ms, 50):.0f} p99={percentile(ms, 99):.0f} "
            f"max={max(ms or [float('nan')]):.0f} ms" + (f" ({missing} not delivered)" if missing else ""))


def run(scenario: str, aware: bool, args: argparse.Namespace) -> Result:
    mode = "receiver-aware" if aware else "baseline"
    result = Result(scenario, mode)
    folder = Path(tempfile.mkdtemp(prefix=f"bulk-{scenario}-"))
    grey = None
    if scenario == "rate":
        count = args.rate_messages
        peer = RateLimiter(limit=args.rate, window=60.0).start()
    else:
        count = args.messages
        grey = Postgrey(folder / "postgrey", delay=args.delay, auto_whitelist=1 if scenario == "awl" else 0).start()
        peer = GreylistReceiver(grey).start()
    healthy = Receiver().start()
    domain = "rate.test" if scenario == "rate" else "grey.test"
    epost = Epost(
        gateway=f"{domain},127.0.0.1,{peer.port}\nhealthy.test,127.0.0.1,{healthy.port}\n",
        tail_toml=f"[retry]\ninterval = {args.interval}\n[delivery]\n{receiver_aware_line(aware)}",
    )
    try:
        recipients = [f"user{i:05d}@{domain}" for i in range(count)]
        accepted_healthy: dict[str, float] = {}

        def healthy_traffic() -> None:
            accepted_healthy.update(send_bulk(epost.port, [f"h{i}@healthy.test" for i in range(args.healthy)],
                                              subject="healthy", connections=2, rate=args.healthy_rate))

        started = time.time()
        side = threading.Thread(target=healthy_traffic)
        side.start()
        send_bulk(epost.port, recipients, subject="bulk", connections=8)
        submitted = time.time() - started
        done = peer.wait_for_recipients(count, args.timeout)
        side.join()
        healthy.wait_for_recipients(args.healthy, 30)
        wall = time.time() - started
        delivered = peer.delivered_at()
        first = peer.first_attempts()
        result.lines.append(f"{len(delivered)} of {count} delivered in {wall:.0f} s"
                            f"{'' if done else f' (gave up after --timeout {args.timeout} s)'}; "
                            f"submitted in {submitted:.1f} s; bounces (faillog) {bounces(epost.spool)}")
        result.lines.append(attempts_line(peer, count))
        if delivered and first:
            last = max(delivered.values())
            if scenario == "awl":
                span = last - min(first.values())
                result.lines.append(f"last delivery {span:.0f} s after the first attempt = {span / args.delay:.2f} × delay "
                                    f"(goal ≤ 2 × delay)")
            elif scenario == "noawl":
                span = last - max(first.values())
                bound = args.delay + 2 * args.interval
                result.lines.append(f"last delivery {span:.0f} s after the last first attempt "
                                    f"(goal ≤ delay + 2 × interval = {bound} s)")
            else:
                times = sorted(delivered.values())
                span = times[-1] - times[0]
                per_minute = collections.Counter(int((t - times[0]) // 60) for t in times)
                sustained = sustained_rate(times)
                fastest = 60 * (-(-count // args.rate) - 1)
                result.lines.append(f"sustained delivery {sustained:.1f}/min = {100 * sustained / args.rate:.0f}% of the "
                                    f"allowed {args.rate}/min (goal ≥ 90%); first to last delivery {span:.0f} s "
                                    f"(the limiter allows {fastest} s); {peer.rcpt_attempts() / count:.2f} attempts "
                                    f"per message (goal ≤ 1.2)")
                result.lines.append("delivered per minute: " + ", ".join(str(per_minute[m]) for m in range(max(per_minute) + 1)))
            result.lines.append(f"refusals: {dict(peer.refusals())}" + (f"; postgrey: {dict(grey.actions())}" if grey else ""))
        result.lines.append(healthy_line(accepted_healthy, healthy))
    finally:
        epost.stop(keep=args.keep)
        peer.stop()
        healthy.stop()
        if grey:
            grey.stop()
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            print(f"  kept {epost.root} and {folder}")
    return result


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # a kill still runs the clean-up
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", default="awl,noawl,rate")
    parser.add_argument("--modes", default="baseline,aware")
    parser.add_argument("--messages", type=int, default=1000, help="messages (one recipient each) to the greylister")
    parser.add_argument("--delay", type=int, default=30, help="postgrey's --delay, seconds")
    parser.add_argument("--rate-messages", type=int, default=2000, help="messages to the rate-limiting receiver")
    parser.add_argument("--rate", type=int, default=120, help="messages a minute the rate limiter takes per client")
    parser.add_argument("--interval", type=int, default=120, help="[retry] interval (E-Post's n × interval)")
    parser.add_argument("--healthy", type=int, default=100, help="messages to the healthy destination per run")
    parser.add_argument("--healthy-rate", type=float, default=2.0, help="... per second")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds a run may take to deliver everything")
    parser.add_argument("--keep", action="store_true", help="keep the spools and postgrey's folder")
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",")]
    if "aware" in modes and not daemon_knows_receiver_aware():
        print("this daemon has no [delivery] receiver_aware: the baseline runs alone")
        modes = [m for m in modes if m != "aware"]
    for scenario in [s.strip() for s in args.scenarios.split(",")]:
        for mode in modes:
            print(f"\n== {scenario}, {mode} ==", flush=True)
            result = run(scenario, mode == "aware", args)
            for line in result.lines:
                print(f"  {line}", flush=True)


if __name__ == "__main__":
    main()
