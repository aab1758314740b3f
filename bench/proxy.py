"""Accept rate direct vs through HAProxy (send-proxy-v2) to one and two epost nodes,
and through the same HAProxy relaying plain TCP to a node without PROXY (what the
extra TCP hop costs on its own, apart from epost's header handling).

    .venv/bin/python bench/proxy.py [--clients 10] [--seconds 5] [--rounds 1] [--baseline TREE]

`--baseline TREE` adds one more PROXY node running the epost of another source
tree (e.g. `git archive main | tar -x -C /tmp/base`), behind its own HAProxy,
so that a change to the PROXY path is measured against the old code in the
same rounds.

Each of C client threads runs whole sessions (EHLO, MAIL, RCPT, DATA, QUIT)
in a loop for the given seconds; the figure is accepted messages per second.
Nodes deliver to local Maildirs. Needs Debian's haproxy; loopback only.
With several rounds the set-ups take turns within each round (in a rotated
order, so that none is always first) and the ratios are taken per round, then
their median: this machine's rate drifts by more between minutes than the
PROXY hop costs.
"""

from __future__ import annotations

import argparse
import os
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


def node(folder: Path, proxied: bool, tree: Path | None = None) -> Daemon:
    """A started node; `tree`: run that source tree's epost instead of this one."""
    folder.mkdir()
    relay, submission = free_port(), free_port()
    config = write_config(folder, relay, submission, BEHIND)
    if proxied:
        config.write_text(config.read_text().replace('relay = ["tcp:', 'relay = ["haproxy:tcp:', 1))
    env = None if tree is None else {**os.environ, "PYTHONPATH": str(tree.resolve())}
    return Daemon(folder, config, relay, submission, [], env=env).start()


def ratio_line(label: str, ratios: list[float]) -> str:
    return f"{label}: {100 * (statistics.median(ratios) - 1):+.1f}% (rounds {min(ratios):.2f}-{max(ratios):.2f})"


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
    parser.add_argument("--baseline", type=Path, help="a source tree whose epost runs one more PROXY node, for before/after")
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
            setups = [("plain", [direct], False), ("one", [a], True), ("two", [a, b], True)]
            if args.baseline is not None:
                base = node(tmp / "baseline", True, tree=args.baseline)
                nodes.append(base)
                setups.append(("baseline", [base], True))
            for name, members, proxy in setups:
                folder = tmp / f"haproxy-{name}"
                folder.mkdir()
                port = free_port()
                config = haproxy_config(folder, port, members, proxy=proxy)
                proxies.append(subprocess.Popen(["haproxy", "-db", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                wait_for(lambda: port_answers(port))
                ports[name] = port
            time.sleep(1)
            phases = [
                ("direct", direct.relay_port),
                ("haproxy, no PROXY", ports["plain"]),
                ("haproxy->1 node", ports["one"]),
                ("haproxy->2 nodes", ports["two"]),
            ]
            if args.baseline is not None:
                phases.append(("haproxy->1 baseline", ports["baseline"]))
            for _, port in phases:  # warm up: each node's first sessions are slower
                load(port, args.clients, 0.5)
            ratios: dict[str, list[float]] = {}
            for round_number in range(1, args.rounds + 1):
                rates = {}
                turn = (round_number - 1) % len(phases)
                for label, port in phases[turn:] + phases[:turn]:
                    rates[label] = load(port, args.clients, args.seconds)
                    print(f"round {round_number} {label:20} C={args.clients}: {rates[label]:7.1f} msg/s", flush=True)
                pairs = {
                    "PROXY hop vs direct": ("haproxy->1 node", "direct"),
                    "PROXY hop vs the same HAProxy relaying plain TCP": ("haproxy->1 node", "haproxy, no PROXY"),
                    "HAProxy plain TCP vs direct": ("haproxy, no PROXY", "direct"),
                    "two nodes vs one": ("haproxy->2 nodes", "haproxy->1 node"),
                }
                if args.baseline is not None:
                    pairs["baseline PROXY hop vs direct"] = ("haproxy->1 baseline", "direct")
                    pairs["this tree's PROXY node vs the baseline's"] = ("haproxy->1 node", "haproxy->1 baseline")
                for name, (top, bottom) in pairs.items():
                    ratios.setdefault(name, []).append(rates[top] / rates[bottom])
            for name, values in ratios.items():
                print(ratio_line(name, values))
        finally:
            for p in proxies:
                p.terminate()
                p.wait(5)
            for n in nodes:
                n.stop()


if __name__ == "__main__":
    main()
