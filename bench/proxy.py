"""Accept rate direct vs through HAProxy (send-proxy-v2) to one and two epost nodes,
and through the same HAProxy relaying plain TCP to a node without PROXY (what the
extra TCP hop costs on its own, apart from epost's header handling).

    .venv/bin/python bench/proxy.py [--clients 10] [--seconds 5] [--rounds 1] [--baseline TREE] [--pin]
    .venv/bin/python bench/proxy.py --in-process [--baseline TREE]

`--baseline TREE` adds one more PROXY node running the epost of another source
tree (e.g. `git archive main | tar -x -C /tmp/base`), behind its own HAProxy,
so that a change to the PROXY path is measured against the old code in the
same rounds. `--pin` puts every node on CPU 0 and HAProxy and the clients
on CPU 1, as if the balancer had a core of its own.

Each of C client threads runs whole sessions (EHLO, MAIL, RCPT, DATA, QUIT)
in a loop for the given seconds; the figure is accepted messages per second.
Nodes deliver to local Maildirs. Needs Debian's haproxy; loopback only.
Beside the rate, each phase reports the CPU time its node(s) (with their
child processes) and its HAProxy used per message, counted until the node is
idle again (delivery included), and the CPU the client threads used: on a
shared machine the rate swings with whatever else runs, the CPU a message
costs much less.
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

sys.path[:0] = [str(Path(__file__).resolve().parent.parent / "tests" / sub) for sub in ("", "e2e")]
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


TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids) -> float:
    """CPU time (user + system) used so far by these processes and all their descendants."""
    total = 0.0
    for pid in descendants(pids):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / TICK
    return total


def descendants(pids) -> set[int]:
    """These processes and all their descendants."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    wanted = set(pids)
    grew = True
    while grew:
        grew = False
        for pid, ppid in parents.items():
            if ppid in wanted and pid not in wanted:
                wanted.add(pid)
                grew = True
    return wanted


def pin(pids, cpu: int) -> None:
    """Every thread of these processes and their descendants onto one CPU."""
    for pid in descendants(pids):
        subprocess.run(["taskset", "-a", "-p", "-c", str(cpu), str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def until_idle(pids, limit: float = 15.0) -> None:
    """Wait until these processes stop using CPU (the nodes deliver what they accepted after the load ends)."""
    deadline = time.monotonic() + limit
    last = cpu_seconds(pids)
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = cpu_seconds(pids)
        if now - last < 0.015:
            return
        last = now


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
    return sum(count), time.monotonic() - start


def in_process(baseline: Path | None, sessions: int = 3000, repeats: int = 5) -> None:
    """CPU per whole session (header, EHLO .. QUIT) over StringTransport, no network, no
    spool: what the PROXY path itself adds to a session, free of the machine's noise."""
    import importlib.util
    import ipaddress
    import struct

    from twisted.internet import task
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "smtp"))
    from test_server import FakeReceiver

    from epost.smtp import proxy
    from epost.smtp.events import SessionEvents
    from epost.smtp.factory import ConnectionLimits, SMTPFactory
    from epost.smtp.server import ServerSettings

    modules = {"this tree": proxy}
    if baseline is not None:
        spec = importlib.util.spec_from_file_location("baseline_proxy", baseline / "epost" / "smtp" / "proxy.py")
        modules["baseline"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(modules["baseline"])
    addresses = ipaddress.ip_address("198.51.100.7").packed + ipaddress.ip_address("127.0.0.1").packed + struct.pack("!HH", 40000, 25)
    header = b"\r\n\r\n\x00\r\nQUIT\n\x21\x11" + struct.pack("!H", len(addresses)) + addresses
    lines = [b"EHLO c.example\r\n", b"MAIL FROM:<a@example.test>\r\n", b"RCPT TO:<b@example.test>\r\n", b"DATA\r\n", b"Subject: x\r\n\r\nx\r\n.\r\n", b"QUIT\r\n"]

    def run(module) -> float:
        clock = task.Clock()
        events = SessionEvents(clock)
        factory = SMTPFactory(FakeReceiver(), ServerSettings(hostname="mx.example.test"), clock, ConnectionLimits(10**9, 10**9), events=events)
        if module is not None:
            factory = module.ProxyFactory(factory, (ipaddress.ip_network("127.0.0.1/32"),), clock, events, "relay")
        balancer = IPv4Address("TCP", "127.0.0.1", 50000)
        start = time.process_time()
        for _ in range(sessions):
            transport = StringTransport(peerAddress=balancer)
            transport.protocol = factory.buildProtocol(balancer)  # as a reactor: it delivers to .protocol
            transport.protocol.makeConnection(transport)
            for data in ([header] if module is not None else []) + lines:
                transport.protocol.dataReceived(data)
            transport.protocol.connectionLost(None)
        return (time.process_time() - start) / sessions * 1e6

    kinds = {"direct": None, **{f"PROXY, {name}": module for name, module in modules.items()}}
    results = {name: statistics.median(run(module) for _ in range(repeats)) for name, module in kinds.items()}
    for name, value in results.items():
        extra = "" if name == "direct" else f" (+{value - results['direct']:.1f})"
        print(f"in process, CPU per session: {name:20} {value:6.1f} us{extra}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--baseline", type=Path, help="a source tree whose epost runs one more PROXY node, for before/after")
    parser.add_argument("--pin", action="store_true", help="nodes on CPU 0, HAProxy and the clients on CPU 1 (a balancer with a core of its own)")
    parser.add_argument("--in-process", action="store_true", help="only the PROXY path's CPU per session, without network or nodes")
    args = parser.parse_args()
    if args.in_process:
        return in_process(args.baseline)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        nodes, proxies = [], []
        try:
            direct = node(tmp / "direct", proxied=False)
            nodes.append(direct)
            a, b = node(tmp / "a", True), node(tmp / "b", True)
            nodes += [a, b]
            ports, balancers = {}, {}
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
                ports[name], balancers[name] = port, proxies[-1].pid
            time.sleep(1)
            if args.pin:
                pin([n.pid for n in nodes], 0)
                pin([p.pid for p in proxies] + [os.getpid()], 1)
            # label, port, the nodes' pids, haproxy's pid
            phases = [
                ("direct", direct.relay_port, [direct.pid], None),
                ("haproxy, no PROXY", ports["plain"], [direct.pid], balancers["plain"]),
                ("haproxy->1 node", ports["one"], [a.pid], balancers["one"]),
                ("haproxy->2 nodes", ports["two"], [a.pid, b.pid], balancers["two"]),
            ]
            if args.baseline is not None:
                phases.append(("haproxy->1 baseline", ports["baseline"], [base.pid], balancers["baseline"]))
            for _, port, pids, _ in phases:  # warm up: each node's first sessions are slower
                load(port, args.clients, 0.5)
                until_idle(pids)
            ratios: dict[str, list[float]] = {}
            costs: dict[str, list[tuple[float, float]]] = {}
            for round_number in range(1, args.rounds + 1):
                rates = {}
                turn = (round_number - 1) % len(phases)
                for label, port, pids, balancer in phases[turn:] + phases[:turn]:
                    before = cpu_seconds(pids), cpu_seconds([balancer]) if balancer else 0.0
                    client_before = sum(os.times()[:2])
                    sent, elapsed = load(port, args.clients, args.seconds)
                    client_cpu = (sum(os.times()[:2]) - client_before) / sent
                    until_idle(pids)  # the node's CPU per message includes delivering it
                    node_cpu = (cpu_seconds(pids) - before[0]) / sent
                    balancer_cpu = ((cpu_seconds([balancer]) - before[1]) / sent) if balancer else 0.0
                    rates[label] = sent / elapsed
                    costs.setdefault(label, []).append((node_cpu, balancer_cpu, client_cpu))
                    print(
                        f"round {round_number} {label:20} C={args.clients}: {rates[label]:7.1f} msg/s, "
                        f"CPU per message: node(s) {1e3 * node_cpu:.2f} ms, haproxy {1e3 * balancer_cpu:.2f} ms, "
                        f"clients {1e3 * client_cpu:.2f} ms",
                        flush=True,
                    )
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
            print("median CPU per message (node(s) / haproxy / clients), ms:")
            for label, values in costs.items():
                node_ms, balancer_ms, client_ms = (1e3 * statistics.median(v[i] for v in values) for i in range(3))
                print(f"  {label:20} {node_ms:6.2f} / {balancer_ms:5.2f} / {client_ms:5.2f}")
            print("rates (median of the per-round ratios):")
            for name, values in ratios.items():
                print("  " + ratio_line(name, values))
        finally:
            for p in proxies:
                p.terminate()
                p.wait(5)
            for n in nodes:
                n.stop()


if __name__ == "__main__":
    main()
