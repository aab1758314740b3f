"""Relay-throughput benchmark: smtp-source -> epost -> smtp-sink beside the same through Postfix.

    .venv/bin/python bench/relay.py [--messages 2000] [--sizes 4096,102400]
                                    [--sessions 10] [--rounds 1] [--no-postfix]
                                    [--signing [--no-postfix-dkim] [--milter-tcp]]

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
relay_networks) and, beside Postfix, Postfix signing the same way as operators
run it: Postfix + the OpenDKIM milter (Debian's opendkim; two private
instances, one per key, since OpenDKIM 2.11 signs with one algorithm per
instance; their own config, pid file and unix socket under a temporary
folder, never the system service) with the same keys and epost's header set
(From oversigned), on a second smtpd listener of the same Postfix
(`-o smtpd_milters=`), so the unsigned Postfix is untouched. Once, before the
warm-up, one message through each of the four is caught at its sink
(smtp-sink -d) and OpenDKIM must find exactly the expected signatures valid
(none unsigned; r1 and e1 signed), or the run stops. Each round measures
epost, epost signing, Postfix and Postfix+OpenDKIM in turn; a table then
shows each side's msg/s, CPU-ms per message (Postfix+OpenDKIM: every
Postfix process plus both OpenDKIMs, also shown apart), what signing added,
and the rate and CPU ratios: epost / Postfix, epost signing / Postfix
unsigned and epost signing / Postfix+OpenDKIM. The signer's own cost for
one message (bench/dkim_sign.py, the two signatures, no I/O) is printed
first. --no-postfix-dkim leaves Postfix+OpenDKIM out; --milter-tcp puts its
milter sockets on loopback TCP (in one probe 74 msg/s against 508 over unix
sockets, for about the same CPU: waiting, likely the milter's small writes
meeting delayed ACKs; not looked into further).

    .venv/bin/python bench/relay.py --messages 1000 --sizes 4096 --signing --rounds 3
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dkim_sign
from common import (DiskCounters, Epost, OpenDkim, Postfix, Sink, disk_columns, postfix_cpu,
                    smtp_source, spread, wait_for_port)


def measure(server, messages: int, size: int, sessions: int, to: str) -> dict:
    sink = server.sink
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
        self.sink = sink
        super().__init__(gateway=f"*,127.0.0.1,{sink.port}\n", tail_toml=tail_toml)

    def queued(self, queues=("incoming", "deferred")) -> int:
        return super().queued(queues)


SIGNED_DOMAIN = "client.test"  # smtp-source writes From: <bench@client.test>


def signing_keys(folder: Path) -> tuple[str, tuple, tuple]:
    """An RSA-2048 and an Ed25519 key for SIGNED_DOMAIN: [[dkim.keys]] entries, the keys, their files."""
    from epost.delivery import signing

    entries, keys, paths = [], [], []
    for selector, kind in (("r1", "rsa"), ("e1", "ed25519")):
        path, key = signing.keygen(SIGNED_DOMAIN, folder, selector, kind)
        entries.append(f'[[dkim.keys]]\ndomain = "{SIGNED_DOMAIN}"\nselector = "{selector}"\nkey = "{path}"\n')
        keys.append(key)
        paths.append(path)
    return "".join(entries), tuple(keys), tuple(paths)


class SigningPostfix:
    """The bench's Postfix signing as operators set it up: Postfix + the OpenDKIM
    milter, with epost's two keys and header set. A second smtpd listener of the
    same Postfix (127.0.0.1:PORT, `-o smtpd_milters=` two private OpenDKIM
    instances, RSA-2048 then Ed25519: OpenDKIM 2.11 signs with one algorithm
    per instance) beside the unsigned one, same queue, relayhost and sink; the
    system's opendkim service is never used. Its CPU is every Postfix process's
    plus both OpenDKIMs'."""

    def __init__(self, postfix: Postfix, keys: tuple, paths: tuple, port: int = 2527, unix: bool = True):
        self.postfix, self.port = postfix, port
        self.folder = Path(tempfile.mkdtemp(prefix="epost-bench-opendkim-"))
        self.folder.chmod(0o755)  # Postfix's smtpd (user postfix) reaches the milter sockets here
        self.service = f"127.0.0.1:{port}/inet"
        self.signers = []
        try:
            for key, path in zip(keys, paths):
                self.signers.append(OpenDkim(
                    self.folder, key.algorithm, key.domain, key.selector, path,
                    "ed25519-sha256" if key.algorithm == "ed25519" else "rsa-sha256", unix=unix))
            milters = ",".join(s.milter for s in self.signers)
            subprocess.run(["postconf", "-M", f"{self.service}=127.0.0.1:{port} inet n - n - - smtpd"
                            f" -o smtpd_milters={milters} -o milter_default_action=tempfail"], check=True)
            subprocess.run(["postfix", "reload"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_for_port(port)
        except BaseException:
            self.stop()
            raise

    @property
    def sink(self) -> Sink:
        return self.postfix.sink

    @sink.setter
    def sink(self, sink: Sink) -> None:
        self.postfix.sink = sink

    @property
    def spool(self) -> Path:
        return self.postfix.spool

    def cpu(self) -> float:
        return postfix_cpu() + sum(s.cpu() for s in self.signers)

    def cpu_by_process(self) -> dict[str, float]:
        return {"postfix": postfix_cpu(), "opendkim": sum(s.cpu() for s in self.signers)}

    def wait_until_drained(self, timeout: float = 600) -> float:
        return self.postfix.wait_until_drained(timeout)

    def stop(self) -> None:
        subprocess.run(["postconf", "-MX", self.service], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run(["postfix", "reload"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for signer in self.signers:
            signer.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


def dkim_signatures(message: bytes) -> list[bytes]:
    """The DKIM-Signature fields of a message's header block, unfolded."""
    head = message.split(b"\r\n\r\n", 1)[0].replace(b"\r\n\t", b" ").replace(b"\r\n ", b" ")
    return [line for line in head.split(b"\r\n") if line.lower().startswith(b"dkim-signature:")]


SINK_RECORD = (b"X-Client-Addr:", b"X-Client-Proto:", b"X-Helo-Args:", b"X-Mail-Args:", b"X-Rcpt-Args:")


def check_signed(sides: list, keys: tuple) -> None:
    """Once, before the warm-up: one message through each side; its sink's copy
    (smtp-sink -d) must carry the signatures that side is meant to add, and
    OpenDKIM (not dkimpy) must find every one valid. `sides`: (name, server,
    selectors expected). Each sink is swapped for a dumping one on the same
    port and back, after the 2 s epost and Postfix keep an idle connection."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "delivery"))
    from opendkim_check import opendkim_verify, passing_selectors

    by_port: dict[int, list] = {}
    for side in sides:
        by_port.setdefault(side[1].sink.port, []).append(side)
    for port, group in by_port.items():
        dumps = Path(tempfile.mkdtemp(prefix="epost-bench-dump-"))
        dumps.chmod(0o777)  # smtp-sink writes as postfix
        group[0][1].sink.stop()
        dumping = Sink(port, options=("-d", f"{dumps}/%H%M%S."))
        try:
            for name, server, expected in group:
                before = set(dumps.iterdir())
                smtp_source(server.port, 1, 4096, 1, "sink@remote.test")
                deadline = time.monotonic() + 60
                while not (set(dumps.iterdir()) - before) and time.monotonic() < deadline:
                    time.sleep(0.05)
                got = sorted(set(dumps.iterdir()) - before)
                if not got:
                    raise RuntimeError(f"{name}: nothing reached the sink")
                time.sleep(0.2)  # the dump file is complete
                lines = got[0].read_bytes().replace(b"\r\n", b"\n").split(b"\n")
                while lines and lines[0].startswith(SINK_RECORD):  # smtp-sink's record of the transaction
                    lines.pop(0)
                message = b"\r\n".join(lines)  # under the sink's own Received: (not signed by anyone)
                signatures = dkim_signatures(message)
                work = Path(tempfile.mkdtemp(prefix="epost-bench-verify-"))
                passed = passing_selectors(opendkim_verify(message, keys, work)) if signatures else set()
                shutil.rmtree(work, ignore_errors=True)
                algorithms = sorted(re.search(rb"\ba=([\w-]+)", s).group(1).decode() for s in signatures)
                print(f"check: {name}: {len(signatures)} DKIM-Signature at the sink"
                      + (f" ({', '.join(algorithms)}; OpenDKIM finds valid: {', '.join(sorted(passed)) or 'none'})"
                         if signatures else ""), flush=True)
                if passed != set(expected) or len(signatures) != len(expected):
                    raise RuntimeError(f"{name}: expected valid signatures by {sorted(expected)}, got {sorted(passed)}")
            time.sleep(3)  # both QUIT an idle connection to the sink after 2 s
        finally:
            dumping.stop()
            shutil.rmtree(dumps, ignore_errors=True)
        fresh = Sink(port)
        for _, server, _ in group:
            server.sink = fresh


def medians(rounds: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}


def rate_spread(ours: list[dict], theirs: list[dict]) -> str:
    """Each round's rate ratio (a round against the other side's next to it): the spread of one run."""
    return spread([a["rate"] / b["rate"] for a, b in zip(ours, theirs)])


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # a kill still runs the clean-up
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--sizes", default="4096,102400")
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=1, help="repeat each size; medians are printed")
    parser.add_argument("--no-postfix", action="store_true")
    parser.add_argument("--signing", action="store_true",
                        help="also an epost DKIM-signing every message (RSA-2048 + Ed25519), and Postfix signing "
                             "the same way through OpenDKIM")
    parser.add_argument("--no-postfix-dkim", action="store_true",
                        help="with --signing, leave out Postfix + OpenDKIM (compare with unsigned Postfix only)")
    parser.add_argument("--milter-tcp", action="store_true",
                        help="OpenDKIM's milter sockets on loopback TCP instead of unix sockets")
    args = parser.parse_args()

    epost = RelayingEpost(Sink())
    postfix = signed = keys_folder = postfix_dkim = None
    try:
        if args.signing:
            keys_folder = Path(tempfile.mkdtemp(prefix="epost-bench-dkim-"))
            dkim_toml, keys, key_paths = signing_keys(keys_folder)
            alone = dkim_sign.cpu_ms(keys, 300, dkim_sign.MESSAGE.replace(b"example.test", SIGNED_DOMAIN.encode()))
            print(f"signer alone (bench/dkim_sign.py's message): {alone:.3f} CPU-ms/msg, RSA-2048 + Ed25519")
            signed = RelayingEpost(Sink(), tail_toml=dkim_toml)
        postfix = None if args.no_postfix else Postfix()
        if signed and postfix and not args.no_postfix_dkim:
            postfix_dkim = SigningPostfix(postfix, keys, key_paths, unix=not args.milter_tcp)
        if signed:
            check_signed([("epost", epost, ()), ("epost signing", signed, ("r1", "e1"))]
                         + ([("Postfix", postfix, ())] if postfix else [])
                         + ([("Postfix+OpenDKIM", postfix_dkim, ("r1", "e1"))] if postfix_dkim else []), keys)
        sides = [("epost", epost), ("epost signing", signed), ("Postfix", postfix), ("Postfix+OpenDKIM", postfix_dkim)]
        sides = [(name, server) for name, server in sides if server is not None]
        for _, server in sides:  # warm-up: imports, first connections, page cache
            measure(server, 200, 4096, args.sessions, "sink@remote.test")
        print(f"{args.messages} messages, smtp-source -s {args.sessions}; end to end = until the sink counted all")
        print(f"{'size':>7}  {'epost msg/s':>11} {'accept/s':>8} {'CPU-ms/msg':>10} {'wr/msg':>6} {'fl/msg':>6}  "
              f"{'postfix msg/s':>13} {'accept/s':>8} {'CPU-ms/msg':>10} {'wr/msg':>6} {'fl/msg':>6}"
              f"  {'rate ratio':>10} {'CPU ratio':>9}  sessions/msg e/p"
              f"  {'rounds':>9}")
        for size in (int(s) for s in args.sizes.split(",")):
            runs: dict[str, list[dict]] = {name: [] for name, _ in sides}
            for _ in range(args.rounds):  # each round: every side in turn
                for name, server in sides:
                    runs[name].append(measure(server, args.messages, size, args.sessions, "sink@remote.test"))
            ours, theirs = runs["epost"], runs.get("Postfix")
            o = medians(ours)
            line = (f"{size:>7}  {o['rate']:>11.0f} {o['accept_rate']:>8.0f} {o['cpu_ms']:>10.2f}"
                    f" {disk_columns(o['writes'], o['flushes'])}")
            if postfix:
                t = medians(theirs)
                line += (f"  {t['rate']:>13.0f} {t['accept_rate']:>8.0f} {t['cpu_ms']:>10.2f}"
                         f" {disk_columns(t['writes'], t['flushes'])}"
                         f"  {o['rate'] / t['rate']:>10.2f} {o['cpu_ms'] / t['cpu_ms']:>9.2f}  {o['sessions']:.2f}/{t['sessions']:.2f}")
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
                g = medians(runs["epost signing"])
                d = medians(runs["Postfix+OpenDKIM"]) if postfix_dkim else None
                print(f"{'':>7}  {'side':<17} {'msg/s':>6} {'CPU-ms/msg':>10} {'wr/msg':>6} {'fl/msg':>6}"
                      f"  {'signing adds':>12}  each round's msg/s", flush=True)
                for name, m, plain in (("epost", o, None), ("epost signing", g, o), ("Postfix", t if postfix else None, None),
                                       ("Postfix+OpenDKIM", d, t if postfix else None)):
                    if m is None:
                        continue
                    added = f"{m['cpu_ms'] - plain['cpu_ms']:+.2f} CPU-ms" if plain else ""
                    split = (f"  (Postfix {m['cpu_ms_postfix']:.2f} + OpenDKIM {m['cpu_ms_opendkim']:.2f} CPU-ms)"
                             if "cpu_ms_opendkim" in m else "")
                    print(f"{'':>7}  {name:<17} {m['rate']:>6.0f} {m['cpu_ms']:>10.2f}"
                          f" {disk_columns(m['writes'], m['flushes'])}  {added:>12}  "
                          + " ".join(f"{r['rate']:.0f}" for r in runs[name]) + split, flush=True)
                if postfix:
                    print(f"{'':>7}  ratios (msg/s; CPU-ms/msg): epost / Postfix {o['rate'] / t['rate']:.2f}; "
                          f"{o['cpu_ms'] / t['cpu_ms']:.2f}{rate_spread(ours, theirs)}; "
                          f"epost signing / Postfix unsigned {g['rate'] / t['rate']:.2f}; {g['cpu_ms'] / t['cpu_ms']:.2f}"
                          f"{rate_spread(runs['epost signing'], theirs)}"
                          + (f"; epost signing / Postfix+OpenDKIM {g['rate'] / d['rate']:.2f}; {g['cpu_ms'] / d['cpu_ms']:.2f}"
                             f"{rate_spread(runs['epost signing'], runs['Postfix+OpenDKIM'])}" if d else ""), flush=True)
        print(f"epost resident memory after the run: {epost.rss_kib() / 1024:.0f} MiB (daemon)")
    finally:
        for server in (epost, signed):
            if server:
                server.stop()
                server.sink.stop()
        if postfix_dkim:
            postfix_dkim.stop()
        if postfix:
            postfix.stop()
        if keys_folder:
            shutil.rmtree(keys_folder, ignore_errors=True)


if __name__ == "__main__":
    main()
