"""Isolation benchmark: new mail never waits behind retries (SPEC §4, §6).

    .venv/bin/python bench/isolation.py [--messages 10000] [--new 200] [--rate 20]
                                        [--bad 451|silent|both]

epost routes two destinations by gateway.dat: `bad.test` to a destination
that defers every message (smtp-sink answering `451 4.7.1` to every RCPT; or,
with `--bad silent`, one that accepts TCP and never greets) and `good.test`
to an accepting sink of our own that notes when each message arrives. Each
new message carries an id in its Subject; its latency is from the 250 reply
to DATA (seen by the client) to its arrival at the good sink.

Phases, in one daemon:
  (a) no backlog: `--new` messages to good.test, `--rate` per second over 4 connections;
  (b) after `--messages` messages to bad.test were submitted (smtp-source -s 10) and
      deferred (451: moved to deferred/; silent: waiting on the dead destination);
  (c) the same while a SIGUSR2 flush makes the whole backlog due at once (the storm).
Prints p50/p95/p99/max per phase, plus the storm's progress (attempts the bad
destination saw during the window and until it was over). Needs root (smtp-sink).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import Epost, Sink, children, end_process, free_port, process_cpu, smtp_source, wait_for_port

# --- the sinks (run as `isolation.py _sink MODE PORT FILE` in their own process) ---


async def _accepting(reader, writer, out) -> None:
    """A small SMTP server: answers in order (pipelining-safe), notes `Subject` + arrival time."""
    writer.write(b"220 good.test ESMTP latency sink\r\n")
    try:
        while True:
            line = await reader.readline()
            if not line:
                return
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                writer.write(b"250-good.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 100000000\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go ahead\r\n")
                await writer.drain()
                subject = b""
                while True:
                    data = await reader.readline()
                    if not data or data == b".\r\n":
                        break
                    if not subject and data[:9].lower() == b"subject: ":
                        subject = data[9:].strip()
                arrived = time.time()
                out.write(f"{subject.decode('ascii', 'replace')} {arrived:.6f}\n")
                out.flush()
                writer.write(b"250 2.0.0 Ok\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                await writer.drain()
                return
            else:  # MAIL, RCPT, RSET, NOOP
                writer.write(b"250 2.0.0 Ok\r\n")
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def _silent(reader, writer, out) -> None:
    """Accepts TCP and never says a word; holds the connection until the client goes."""
    out.write(f"connect {time.time():.6f}\n")
    out.flush()
    try:
        while await reader.read(4096):
            pass
    except ConnectionError:
        pass
    writer.close()


def run_sink(mode: str, port: int, path: str) -> None:
    handler = _accepting if mode == "accept" else _silent

    async def main() -> None:
        with open(path, "a") as out:
            server = await asyncio.start_server(
                lambda r, w: handler(r, w, out), "127.0.0.1", port, backlog=1000, reuse_address=True
            )
            async with server:
                await server.serve_forever()

    asyncio.run(main())


class PySink:
    def __init__(self, mode: str):
        self.port = free_port()
        self.file = Path(tempfile.mkstemp(prefix=f"sink-{mode}-")[1])
        self.process = subprocess.Popen([sys.executable, __file__, "_sink", mode, str(self.port), str(self.file)])
        if mode == "accept":
            wait_for_port(self.port)
        else:
            time.sleep(1)  # a silent sink cannot be probed by its greeting

    def arrivals(self) -> dict[str, float]:
        result = {}
        for line in self.file.read_text().splitlines():
            name, _, when = line.rpartition(" ")
            result[name] = float(when)
        return result

    def lines(self) -> int:
        return len(self.file.read_text().splitlines())

    def stop(self) -> None:
        end_process(self.process, 5)
        self.file.unlink(missing_ok=True)


# --- sending new mail ---------------------------------------------------------------


def send_new(port: int, phase: str, count: int, rate: float, connections: int = 4) -> dict[str, float]:
    """`count` messages to good.test, the i-th at start + i/rate; returns {subject: time of the 250}."""
    accepted: dict[str, float] = {}
    lock = threading.Lock()
    start = time.time() + 0.2
    body = "x" * 76 + "\r\n"

    def worker(k: int) -> None:
        client = smtplib.SMTP("127.0.0.1", port, timeout=120)
        client.ehlo("client.test")
        for i in range(k, count, connections):
            delay = start + i / rate - time.time()
            if delay > 0:
                time.sleep(delay)
            subject = f"{phase}-{i}"
            message = f"From: bench@client.test\r\nTo: user@good.test\r\nSubject: {subject}\r\n\r\n" + body * 12
            client.sendmail("bench@client.test", ["user@good.test"], message)
            done = time.time()
            with lock:
                accepted[subject] = done
        client.quit()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return accepted


def latencies(accepted: dict[str, float], sink: PySink, timeout: float = 300) -> list[float]:
    deadline = time.monotonic() + timeout
    while True:
        arrivals = sink.arrivals()
        if all(s in arrivals for s in accepted) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    missing = [s for s in accepted if s not in arrivals]
    if missing:
        print(f"  !! {len(missing)} of {len(accepted)} new messages did not arrive within {timeout:.0f} s")
    return sorted(1000 * (arrivals[s] - t) for s, t in accepted.items() if s in arrivals)


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    index = min(len(values) - 1, max(0, round(p / 100 * len(values) + 0.5) - 1))
    return sorted(values)[index]


def row(label: str, values: list[float], note: str = "") -> str:
    return (f"  {label:<34} n={len(values):>4}  p50={percentile(values, 50):>7.1f}  p95={percentile(values, 95):>7.1f}"
            f"  p99={percentile(values, 99):>7.1f}  max={max(values or [float('nan')]):>7.1f} ms  {note}")


# --- one run ---------------------------------------------------------------------


class BadDestination:
    def __init__(self, kind: str):
        self.kind = kind
        if kind == "451":
            self.sink = Sink(options=("-r", "RCPT", "-b", "451 4.7.1 Try again later"))
        else:
            self.sink = PySink("silent")
        self.port = self.sink.port

    def attempts(self) -> int:
        """Sessions the destination has seen (451: smtp-sink's counter; silent: connections)."""
        return self.sink.sessions() if self.kind == "451" else self.sink.lines()

    def stop(self) -> None:
        self.sink.stop()


def backlog_attempts(epost: Epost) -> int:
    """Attempts epost made for the backlog (its senderlog lines): sessions say little when connections are reused."""
    try:
        return (epost.spool / "log" / "senderlog").read_text().count("@bad.test>")
    except FileNotFoundError:
        return 0


def daemon_cpu(epost: Epost) -> float:
    return process_cpu(epost.process.pid) + sum(process_cpu(p) for p in children(epost.process.pid))


def run(kind: str, backlog: int, new: int, rate: float) -> None:
    print(f"\n== bad destination: {'451 to every RCPT' if kind == '451' else 'accepts TCP, never greets'}; "
          f"backlog {backlog}; {new} new messages at {rate:g}/s per phase ==", flush=True)
    good = PySink("accept")
    bad = BadDestination(kind)
    epost = Epost(
        gateway=f"good.test,127.0.0.1,{good.port}\nbad.test,127.0.0.1,{bad.port}\n",
        tail_toml=(
            "[delivery]\nconnect_timeout = 5\ngreeting_timeout = 5\n"
            "[retry]\ninterval = 3600\n"  # no retry on its own during the run: only the flush
        ),
    )
    try:
        send_new(epost.port, "warmup", 20, 50)
        latencies(send_new(epost.port, "warmup2", 20, 50), good)

        values = latencies(send_new(epost.port, "a", new, rate), good)
        print(row("(a) no backlog", values), flush=True)

        t0 = time.monotonic()
        smtp_source(epost.port, backlog, 1024, 10, "someone@bad.test")
        submit = time.monotonic() - t0
        # 451: every message is tried once and moves to deferred/. silent: they wait on the dead destination.
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            incoming, deferred = epost.queued(("incoming",)), epost.queued(("deferred",))
            if kind == "451" and deferred >= backlog and incoming == 0:
                break
            if kind == "silent" and time.monotonic() - t0 > submit + 12:
                break
            time.sleep(0.2)
        settle = time.monotonic() - t0
        print(f"  backlog: submitted in {submit:.1f} s; after {settle:.1f} s incoming={epost.queued(('incoming',))} "
              f"deferred={epost.queued(('deferred',))}; bad destination saw {bad.attempts()} sessions; "
              f"daemon RSS {epost.rss_kib() / 1024:.0f} MiB", flush=True)

        values = latencies(send_new(epost.port, "b", new, rate), good)
        print(row("(b) with the backlog", values), flush=True)

        before_attempts, before_cpu = backlog_attempts(epost), daemon_cpu(epost)
        flushed = time.monotonic()
        os.kill(epost.process.pid, signal.SIGUSR2)
        accepted = send_new(epost.port, "c", new, rate)
        window = time.monotonic() - flushed
        during = backlog_attempts(epost) - before_attempts
        cpu = daemon_cpu(epost) - before_cpu
        values = latencies(accepted, good)
        print(row("(c) backlog + SIGUSR2 flush storm", values,
                  f"[{during} backlog attempts (senderlog) in the {window:.1f} s window; epost CPU {100 * cpu / window:.0f}%]"),
              flush=True)
        if kind == "451":
            # how long the whole storm took
            last, stalled = backlog_attempts(epost), time.monotonic()
            while backlog_attempts(epost) - before_attempts < backlog and time.monotonic() - stalled < 20:
                time.sleep(0.2)
                if backlog_attempts(epost) != last:
                    last, stalled = backlog_attempts(epost), time.monotonic()
            total = backlog_attempts(epost) - before_attempts
            print(f"  storm: {total} of {backlog} retried {time.monotonic() - flushed:.1f} s after the flush "
                  f"({total / (time.monotonic() - flushed):.0f}/s)", flush=True)
        print(f"  daemon RSS at the end {epost.rss_kib() / 1024:.0f} MiB", flush=True)
    finally:
        epost.stop()
        bad.stop()
        good.stop()


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # a kill still runs the clean-up
    if len(sys.argv) > 1 and sys.argv[1] == "_sink":
        run_sink(sys.argv[2], int(sys.argv[3]), sys.argv[4])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10000, help="backlog size")
    parser.add_argument("--new", type=int, default=200, help="new messages per phase")
    parser.add_argument("--rate", type=float, default=20, help="new messages per second")
    parser.add_argument("--bad", choices=("451", "silent", "both"), default="both")
    args = parser.parse_args()
    for kind in ("451", "silent") if args.bad == "both" else (args.bad,):
        run(kind, args.messages, args.new, args.rate)


if __name__ == "__main__":
    main()
