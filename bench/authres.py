"""Cost of inbound Authentication-Results (SPEC §9): accept rate and daemon CPU for untrusted clients.

    .venv/bin/python bench/authres.py [--messages 2000] [--size 4096] [--concurrency 10] [--checks 300]

Part 1 runs the checks themselves in this process (`AuthChecker.results`,
SPF for MAIL FROM and HELO, DKIM, DMARC) against dnsmasq on loopback and
prints their CPU per message (thread CPU time), for an unsigned message and
one with an RSA-2048 DKIM signature. dnsmasq answers with `--ttl` (default
0: every message does its lookups again, a cold cache, the worst case).

Part 2 sends the same smtp-source load to the real daemon three times: a
client in relay_networks (no checks), an untrusted client with
`authentication_results = false`, and with it on; it prints messages/s and
the daemon's CPU-ms per message (receiving and delivering into a Maildir).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests/e2e"), str(REPO / "tests/routing")]

from common import children, process_cpu, smtp_source  # noqa: E402
from dnsmasq import Dnsmasq  # noqa: E402
from e2e_support import daemons  # noqa: E402

from epost.delivery import signing  # noqa: E402
from epost.smtp.authcheck import AuthChecker  # noqa: E402


def records(txt_record: str, ttl: int) -> list[str]:
    name, _, value = txt_record.partition(". IN TXT ")
    text = "".join(part.strip('"') for part in value.split('" "'))
    chunks = ",".join(text[i:i + 200] for i in range(0, len(text), 200))
    return [
        "--txt-record=client.test,v=spf1 ip4:127.0.0.1 -all",
        "--txt-record=_dmarc.client.test,v=DMARC1; p=none",
        f"--txt-record={name},{chunks}",
        f"--local-ttl={ttl}",
    ]


def check_cost(dns_port: int, key, count: int) -> None:
    from types import SimpleNamespace

    body = b"".join(b"line %d of a benchmark message, some words to fill it\r\n" % i for i in range(70))
    message = (b"From: Bench <bench@client.test>\r\nTo: alice@example.test\r\nSubject: bench\r\n"
               b"Date: Sun, 06 Dec 2026 15:00:00 +0000\r\nMessage-ID: <b@client.test>\r\n\r\n" + body)
    signed = signing.sign(message, [key]) + message
    checker = AuthChecker(None, None, [SimpleNamespace(host="127.0.0.1", port=dns_port)], budget=4)
    for name, content in (("unsigned", message), ("DKIM RSA-2048", signed)):
        cpu, wall = [], []
        for _ in range(count):
            c0, w0 = time.thread_time(), time.perf_counter()
            results = checker.results("127.0.0.1", "client.test", "bench@client.test", content, time.monotonic() + 4)
            cpu.append(time.thread_time() - c0)
            wall.append(time.perf_counter() - w0)
        summary = " ".join(f"{r.method}={r.result}" for r in results)
        print(f"checks, {name:>14} {len(content):>5} B: CPU {statistics.median(cpu) * 1000:.2f} ms/msg (median),"
              f" wall {statistics.median(wall) * 1000:.2f} ms  [{summary}]")


def tree_cpu(pid: int) -> float:
    return process_cpu(pid) + sum(process_cpu(child) for child in children(pid))


def delivered(spool: Path) -> int:
    new = spool / "mailboxes" / "example.test" / "alice" / "new"
    return sum(1 for _ in new.iterdir()) if new.is_dir() else 0


def accept_cost(dns_port: int, messages: int, size: int, sessions: int) -> None:
    make = daemons(Path(tempfile.mkdtemp(prefix="epost-authres-")))
    start = next(make)
    untrusted = 'relay_networks = ["192.0.2.0/24"]'
    print(f"{'':>34} {'msg/s':>7} {'CPU-ms/msg':>10}")
    try:
        for name, server in (("trusted client (no checks)", ""),
                             ("untrusted, authentication_results off", f"{untrusted}\nauthentication_results = false"),
                             ("untrusted, authentication_results on", untrusted)):
            d = start(server=server + "\nmax_connections_per_client = 1000", toml=f'dns_servers = ["127.0.0.1:{dns_port}"]')
            for rounds, count in (("warm-up", 200), ("measured", messages)):
                before_cpu, before = tree_cpu(d.pid), delivered(d.spool)
                seconds = smtp_source(d.relay_port, count, size, sessions, "alice@example.test")
                deadline = time.monotonic() + 300
                while delivered(d.spool) < before + count and time.monotonic() < deadline:
                    time.sleep(0.05)
                cpu = tree_cpu(d.pid) - before_cpu
            print(f"{name:>38} {count / seconds:>7.0f} {cpu * 1000 / count:>10.2f}")
            d.stop()
    finally:
        for _ in make:
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--checks", type=int, default=300)
    parser.add_argument("--ttl", type=int, default=0, help="TTL of dnsmasq's answers: 0 = every message asks again")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="epost-authres-keys-"))
    _, key = signing.keygen("client.test", folder, "b1", "rsa")
    dns = Dnsmasq(records(signing.txt_record(key), args.ttl), zone="test")
    dns.start()
    try:
        check_cost(dns.port, key, args.checks)
        accept_cost(dns.port, args.messages, args.size, args.concurrency)
    finally:
        dns.cleanup()


if __name__ == "__main__":
    main()
