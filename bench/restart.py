"""Restart benchmark: start-up time and memory with a large queue (SPEC §6: restart resumes everything).

    .venv/bin/python bench/restart.py [--messages 100000] [--domains 100] [--watch 20]
                                      [--incoming 0]

Builds a spool through epost's own QueueStore (`put_batch`, 5,000 messages a
transaction): deferred messages (Envelope JSON, one relay recipient routed by
MX, `retries[domain]` with `next_attempt` a month ahead, so nothing is
attempted), IDs as Spool.new_queue_id makes them. Then starts `twistd -n epost` and measures
the seconds until it greets with 220 on its relay port and, sampling every
0.5 s for `--watch` seconds, the resident memory (VmRSS) of the daemon and of
its worker children, and the daemon's CPU use (when it falls to ~0 the queue
is loaded). With `--incoming N` a second run queues N messages in incoming
instead, routed to an smtp-sink, and also times until all are delivered.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import Epost, Sink, bench_base, children, process_cpu, rss_kib  # noqa: E402
from epost.store.envelope import Envelope, Recipient  # noqa: E402
from epost.store.spool import Spool  # noqa: E402

BODY = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.\r\n" * 20).encode()


TRANSACTION = 5000  # messages per store transaction while building


def build_spool(root: Path, messages: int, domains: int, queue: str, sink_port: int | None = None) -> float:
    """Queue `messages` messages in `queue` of `root/spool`'s queue store; returns the seconds it took."""
    start = time.monotonic()
    spool = Spool(root / "spool", reactor=None, threadpool=None)
    spool.open()
    batch: list = []
    now = time.time()
    first_us = int((now - 86400) * 1_000_000)
    for i in range(messages):
        arrival_us = first_us + i * 500
        queue_id = f"{(arrival_us << 16) + (i & 0xFFFF):017X}"
        domain = f"d{i % domains}.some.test"
        content = (
            f"Received: from client.test ([127.0.0.1]) by epost.bench.test with ESMTP id {queue_id}\r\n"
            f"From: bench@client.test\r\nTo: user{i}@{domain}\r\nSubject: restart {i}\r\n"
            f"Message-ID: <{queue_id}@client.test>\r\n\r\n"
        ).encode() + BODY
        if queue == "deferred":
            route = {"kind": "relay", "rule": "mx", "mx_domain": domain}
            retries = {domain: {
                "first_failure": now - 3600, "failures": 3, "last_failure": now - 600,
                "next_attempt": now + 30 * 86400, "last_host": f"mx.{domain}[127.0.0.1]:25",
            }}
            recipient = Recipient(f"user{i}@{domain}", route=route, attempts=3, last_reply="451 4.7.1 Try again later")
        else:
            route = {"kind": "relay", "rule": "gateway.dat:1", "hosts": [["127.0.0.1", sink_port]]}
            retries = {}
            recipient = Recipient(f"user{i}@{domain}", route=route)
        envelope = Envelope(
            queue_id=queue_id, sender="bench@client.test", recipients=(recipient,),
            arrival=arrival_us / 1_000_000, size=len(content), client="localhost [127.0.0.1]", retries=retries,
        )
        batch.append((envelope, content))
        if len(batch) == TRANSACTION or i == messages - 1:
            failed = [error for error in spool.store.put_batch(batch, queue) if error is not None]
            if failed:
                raise SystemExit(f"cannot build the spool: {failed[0]}")
            batch = []
    spool.close()
    os.sync()
    return time.monotonic() - start


def drop_caches() -> bool:
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def time_to_greeting(port: int, started: float, process, timeout: float = 300) -> float:
    """Seconds from `started` until a connection gets a line starting with 220."""
    deadline = started + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("the daemon exited during start-up")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.settimeout(30)
                if s.recv(100).startswith(b"220"):
                    return time.monotonic() - started
        except OSError:
            pass
        time.sleep(0.02)
    raise RuntimeError("no 220 greeting")


def watch(epost: Epost, seconds: float) -> list[tuple[float, int, dict[int, int], float]]:
    """(t since launch, daemon RSS KiB, {child pid: RSS KiB}, daemon CPU s) every 0.5 s."""
    samples = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pid = epost.process.pid
        samples.append((time.monotonic() - epost.started, rss_kib(pid),
                        {c: rss_kib(c) for c in children(pid)}, process_cpu(pid)))
        time.sleep(0.5)
    return samples


def loaded_at(samples) -> float | None:
    """The first sample after which the daemon's CPU grows by < 2% of a core per interval."""
    for i in range(1, len(samples)):
        rest = samples[i:]
        if all(b[3] - a[3] < 0.01 for a, b in zip(rest, rest[1:])) and len(rest) > 2:
            return samples[i][0]
    return None


def report(label: str, greeting: float, samples) -> None:
    print(f"  {label}: 220 greeting after {greeting:.2f} s")
    print(f"  {'t(s)':>6} {'daemon RSS':>10} {'children RSS (MiB)':>20} {'daemon CPU s':>12}")
    for i, (t, rss, kids, cpu) in enumerate(samples):
        if i % 4 == 0 or i == len(samples) - 1:
            kid_text = " ".join(f"{v / 1024:.0f}" for v in kids.values())
            print(f"  {t:>6.1f} {rss / 1024:>8.0f} M {kid_text:>20} {cpu:>12.2f}")
    peak = max(s[1] for s in samples)
    final = samples[-1]
    at = loaded_at(samples)
    print(f"  daemon VmRSS peak {peak / 1024:.0f} MiB, settled {final[1] / 1024:.0f} MiB; workers "
          f"{', '.join(f'{v / 1024:.0f}' for v in final[2].values())} MiB each; "
          f"daemon+workers {(final[1] + sum(final[2].values())) / 1024:.0f} MiB; "
          f"CPU settled {'at %.1f s' % at if at else 'not within the watch'} ({final[3]:.1f} CPU-s)", flush=True)


def run_deferred(args) -> None:
    root = Path(tempfile.mkdtemp(prefix="epost-restart-", dir=bench_base()))
    try:
        built = build_spool(root, args.messages, args.domains, "deferred")
        on_disk = sum(f.stat().st_size for f in (root / "spool" / "queue").iterdir() if f.is_file())
        print(f"built {args.messages} deferred messages over {args.domains} domains in {built:.1f} s "
              f"({on_disk / 2**20:.0f} MiB on disk)")
        for cache in ("warm", "cold") if args.cold else ("warm",):
            if cache == "cold" and not drop_caches():
                print("  (cannot drop the page cache; cold start skipped)")
                continue
            epost = Epost(root=root, wait=False, tail_toml="[retry]\ninterval = 3600\n")
            try:
                greeting = time_to_greeting(epost.port, epost.started, epost.process)
                samples = watch(epost, args.watch)
                report(f"{cache} page cache, {args.messages} deferred", greeting, samples)
                still = epost.queued(("deferred",))
                print(f"  deferred still holds {still}; domains/ has {len(list((root / 'spool' / 'domains').iterdir()))} entries")
            finally:
                epost.stop(keep=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run_incoming(args) -> None:
    root = Path(tempfile.mkdtemp(prefix="epost-restart-in-", dir=bench_base()))
    sink = Sink()
    try:
        built = build_spool(root, args.incoming, args.domains, "incoming", sink.port)
        print(f"built {args.incoming} incoming messages in {built:.1f} s")
        epost = Epost(root=root, wait=False, gateway=f"*,127.0.0.1,{sink.port}\n")
        try:
            greeting = time_to_greeting(epost.port, epost.started, epost.process)
            samples = watch(epost, args.watch)
            report(f"{args.incoming} in incoming, relaying to smtp-sink", greeting, samples)
            done = sink.wait_for(args.incoming, timeout=args.incoming / 20 + 120)
            print(f"  all {args.incoming} delivered {done - epost.started:.1f} s after launch "
                  f"({args.incoming / (done - epost.started):.0f} msg/s)")
        finally:
            epost.stop()
    finally:
        sink.stop()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # a kill still runs the clean-up
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--domains", type=int, default=100)
    parser.add_argument("--watch", type=float, default=20, help="seconds of RSS sampling after the greeting")
    parser.add_argument("--cold", action="store_true", help="also start once after dropping the page cache")
    parser.add_argument("--incoming", type=int, default=0, help="also: N messages in incoming to deliver")
    args = parser.parse_args()
    if args.messages:
        run_deferred(args)
    if args.incoming:
        run_incoming(args)


if __name__ == "__main__":
    main()
