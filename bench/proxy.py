"""Accept rate direct vs through HAProxy (send-proxy-v2) to one and two epost nodes,
and through the same HAProxy relaying plain TCP to a node without PROXY (what the
extra TCP hop costs on its own, apart from epost's header handling).

    .venv/bin/python bench/proxy.py [--clients 10] [--seconds 5] [--rounds 1]

Each of C client threads runs whole sessions (EHLO, MAIL, RCPT, DATA, QUIT)
in a loop for the given seconds; the figure is accepted messages per second.
Nodes deliver to local Maildirs. Needs Debian's haproxy; loopback only.
With several rounds the three set-ups take turns within each round and the
ratios are taken per round, then their median: this machine's rate drifts by
more between minutes than the PROXY hop costs.
"""

from __future__ import annotations

import argparse
import smtplib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "e2e"))
from e2e_support import Daemon, free_port, port_answers, wait_for, write_config  # noqa: E402
from test_haproxy_e2e import BEHIND, haproxy_config  # noqa: E402


def node(folder: Path, proxied: bool) -> Daemon:
    folder.mkdir()
    relay, submission = free_port(), free_port()
    config = write_config(folder, relay, submission, BEHIND)
    if proxied:
        config.write_text(config.read_text().replace('relay = ["tcp:', 'relay = ["haproxy:tcp:', 1))
    return Daemon(folder, config, relay, submission, []).start()


def load(port: int, clients: int, seconds: float) -> float:
    count = [0] * clients
    stop = time.monotonic() + seconds

    def run(i):
        while time.monotonic() < stop:
            with smtplib.SMTP("127.0.0.1", port, local_hostname="bench.example", timeout=30) as c:
                c.sendmail("bench@outside.example", ["alice@example.test"], b"Subject: bench\r\n\r\nx\r\n")
            count[i] += 1

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(count) / (time.monotonic() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        nodes, proxies = [], []
        try:
            direct = node(tmp / "direct", proxied=False)
            nodes.append(direct)
            a, b = node(tmp / "a", True), node(tmp / "b", True)
            nodes += [a, b]
            ports = {}
            for name, members, proxy in (("plain", [direct], False), ("one", [a], True), ("two", [a, b], True)):
                folder = tmp / f"haproxy-{name}"
                folder.mkdir()
                port = free_port()
                config = haproxy_config(folder, port, members, proxy=proxy)
                proxies.append(subprocess.Popen(["haproxy", "-db", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                wait_for(lambda: port_answers(port))
                ports[name] = port
            time.sleep(1)
            hops, plains, spreads = [], [], []
            for round_number in range(1, args.rounds + 1):
                rates = {}
                phases = (
                    ("direct", direct.relay_port),
                    ("haproxy, no PROXY", ports["plain"]),
                    ("haproxy->1 node", ports["one"]),
                    ("haproxy->2 nodes", ports["two"]),
                )
                for label, port in phases:
                    rates[label] = load(port, args.clients, args.seconds)
                    print(f"round {round_number} {label:18} C={args.clients}: {rates[label]:7.1f} msg/s", flush=True)
                hops.append(rates["haproxy->1 node"] / rates["direct"])
                plains.append(rates["haproxy->1 node"] / rates["haproxy, no PROXY"])
                spreads.append(rates["haproxy->2 nodes"] / rates["haproxy->1 node"])
            print(
                f"PROXY hop: {100 * (statistics.median(hops) - 1):+.1f}% vs direct (rounds {min(hops):.2f}-{max(hops):.2f}), "
                f"{100 * (statistics.median(plains) - 1):+.1f}% vs the same HAProxy relaying plain TCP "
                f"(rounds {min(plains):.2f}-{max(plains):.2f}); "
                f"two nodes: {statistics.median(spreads):.2f}x one (rounds {min(spreads):.2f}-{max(spreads):.2f})"
            )
        finally:
            for p in proxies:
                p.terminate()
                p.wait(5)
            for n in nodes:
                n.stop()


if __name__ == "__main__":
    main()
