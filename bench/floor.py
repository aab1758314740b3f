"""Floor benchmark: what a minimal SMTP server on Twisted does on this machine.

    .venv/bin/python bench/floor.py [--messages 2000] [--concurrency 1,10,50]
                                    [--size 4096] [--no-postfix]

Starts two bare servers on stock twisted.mail.smtp.ESMTP, each in a process
of its own on 127.0.0.1 (this file run with --serve), that accept any sender
and recipient:

  twisted-minimal  writes each message to tmp/, fsyncs it, renames it into
                   queue/ and fsyncs queue/ (in a thread, deferToThread),
                   and only then answers 250;
  twisted-nofsync  answers 250 at once without writing anything: the cost
                   of the protocol alone.
  twisted-raw      not twisted.mail.smtp but a bare Protocol: a canned reply
                   per command line and, in DATA, only a search for CRLF.CRLF
                   across chunks; nothing parsed, checked or stored. What the
                   reactor and Python cost per message at the least: a target
                   ratio above it is out of reach of any server on Twisted.
  twisted-raw-fsync
                   twisted-raw that appends each message to one file and
                   fdatasyncs it before its 250, on the reactor thread: the
                   least one flush per message can cost (SPEC 4: durable
                   before 250; at C=1 there is nothing to commit with).

For each client concurrency, Postfix's smtp-source sends N messages to each;
prints messages/s and the server process's CPU milliseconds per message (all
its threads), and beside them Postfix (../shared/tools/postfix-peer, relaying
into smtp-sink) with each server's rate as a ratio of Postfix's in the same
run. epost does more per message, so this is a reference floor for it, not a
target to match: where even twisted-minimal stays under a target ratio, no
epost that fsyncs as SPEC §4 asks can reach it on this machine. Postfix's
CPU figure includes relaying into smtp-sink (measured once its queue is
empty); the bare servers' only accepting. Needs root, unless --no-postfix.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from accept import measure
from common import Postfix, bench_base, end_process, free_port, process_cpu, smtp_source, wait_for_port

from epost.fsutil import write_atomically

SERVERS = {"twisted-minimal": True, "twisted-nofsync": False, "twisted-raw": False, "twisted-raw-fsync": False}  # name: writes tmp/ and queue/ files


def store(folder: Path, name: str, data: bytes) -> None:
    """Write `data` durably as queue/`name`: tmp/ file, fsync, rename, fsync queue/."""
    write_atomically(folder / "queue" / name, data, temp_dir=folder / "tmp")


def serve(name: str, port: str, folder: str) -> None:
    """Run one server (in the subprocess) until terminated."""
    from twisted.internet import defer, protocol, reactor, threads
    from twisted.mail import smtp
    from zope.interface import implementer

    names = (f"{os.getpid()}.{n}" for n in itertools.count())
    writes = SERVERS[name]
    folder = Path(folder)

    class RawSMTP(protocol.Protocol):
        """Just enough SMTP for smtp-source: one canned reply per command."""

        REPLIES = {b"EHLO": b"250 floor.bench.test\r\n", b"HELO": b"250 floor.bench.test\r\n",
                   b"DATA": b"354 go ahead\r\n", b"QUIT": b"221 bye\r\n"}

        def connectionMade(self):
            self.buffer, self.in_data, self.message = b"", False, []
            self.transport.write(b"220 floor.bench.test ESMTP\r\n")

        def keep(self, content):
            if journal is not None:
                self.message.append(content)

        def dataReceived(self, data):
            self.buffer += data
            while self.buffer:
                if self.in_data:
                    end = self.buffer.find(b"\r\n.\r\n")
                    if end < 0:
                        self.keep(self.buffer[:-4])
                        self.buffer = self.buffer[-4:]
                        return
                    self.keep(self.buffer[:end + 2])
                    if journal is not None:
                        os.write(journal, b"".join(self.message))
                        os.fdatasync(journal)
                    self.message = []
                    self.buffer, self.in_data = self.buffer[end + 5:], False
                    self.transport.write(b"250 queued\r\n")
                    continue
                line, found, rest = self.buffer.partition(b"\r\n")
                if not found:
                    return
                self.buffer = rest
                verb = line[:4].upper()
                self.transport.write(self.REPLIES.get(verb, b"250 ok\r\n"))
                if verb == b"DATA":
                    self.buffer, self.in_data = b"\r\n" + self.buffer, True
                elif verb == b"QUIT":
                    self.transport.loseConnection()
                    return

    @implementer(smtp.IMessage)
    class Message:
        def __init__(self):
            self.lines = []

        def lineReceived(self, line):
            self.lines.append(line)

        def eomReceived(self):
            if not writes:
                return defer.succeed(None)
            data = b"\n".join(self.lines) + b"\n"
            return threads.deferToThread(store, folder, next(names), data)

        def connectionLost(self):
            self.lines = []

    @implementer(smtp.IMessageDelivery)
    class Delivery:
        def receivedHeader(self, helo, origin, recipients):
            return b"Received: from %s by floor.bench.test" % helo[0]

        def validateFrom(self, helo, origin):
            return origin

        def validateTo(self, user):
            return Message

    class Factory(smtp.SMTPFactory):
        protocol = smtp.ESMTP
        domain = b"floor.bench.test"

        def buildProtocol(self, addr):
            p = super().buildProtocol(addr)
            p.delivery = Delivery()
            return p

    if writes:
        (folder / "tmp").mkdir()
        (folder / "queue").mkdir()
    factory = Factory() if not name.startswith("twisted-raw") else protocol.Factory.forProtocol(RawSMTP)
    journal = os.open(folder / "journal", os.O_WRONLY | os.O_CREAT | os.O_APPEND) if name.endswith("-fsync") else None
    reactor.listenTCP(int(port), factory, backlog=128, interface="127.0.0.1")
    reactor.run()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--concurrency", default="1,10,50")
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--no-postfix", action="store_true")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="floor-", dir=bench_base()))
    servers = {}
    postfix = None
    try:
        if not args.no_postfix:
            postfix = Postfix()
            smtp_source(postfix.port, min(200, args.messages), args.size, 10, "sink@remote.test")
        for name in SERVERS:
            folder = root / name
            folder.mkdir()
            port = free_port()
            servers[name] = port, subprocess.Popen(
                [sys.executable, __file__, "--serve", name, str(port), str(folder)])
            wait_for_port(port)
            smtp_source(port, min(200, args.messages), args.size, 10, "sink@bench.test")  # warm-up

        print(f"{args.messages} messages of {args.size} bytes")
        print(f"{'server':<18} {'C':>4} {'msg/s':>8} {'CPU-ms/msg':>11} {'ratio':>6}")
        for sessions in (int(c) for c in args.concurrency.split(",")):
            theirs = None
            if postfix:
                measured = measure(postfix, "postfix", args.messages, args.size, sessions, "sink@remote.test")
                theirs = measured["rate"]
                print(f"{'postfix':<18} {sessions:>4} {theirs:>8.0f} {measured['cpu_ms']:>11.3f} {1:>6.2f}", flush=True)
            for name, (port, process) in servers.items():
                cpu_before = process_cpu(process.pid)
                rate = args.messages / smtp_source(port, args.messages, args.size, sessions, "sink@bench.test")
                cpu = process_cpu(process.pid) - cpu_before
                ratio = f"{rate / theirs:>6.2f}" if theirs else f"{'-':>6}"
                print(f"{name:<18} {sessions:>4} {rate:>8.0f} {1000 * cpu / args.messages:>11.3f} {ratio}", flush=True)
    finally:
        for _, process in servers.values():
            end_process(process, 10)
        if postfix:
            postfix.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        serve(*sys.argv[2:])
    else:
        main()
