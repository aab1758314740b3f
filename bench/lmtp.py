"""Local delivery through Dovecot LMTP beside epost's own Maildir delivery (issue 17).

    .venv/bin/python bench/lmtp.py [--messages 1000] [--size 4096] [--concurrency 10]

Runs as root (Dovecot drops to the Maildirs' owner, nobody). For each
local_transport, smtp-source sends N messages; prints the accept rate (250s,
until smtp-source is done) and the delivery rate (until the queue is empty).
LMTP runs after the 250, so the accept rates should match.
"""

from __future__ import annotations

import argparse
import os
import pwd
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import Epost, bench_base, free_port, smtp_source, wait_for_port


def run(transport: str, messages: int, size: int, sessions: int) -> tuple[float, float]:
    root = Path(tempfile.mkdtemp(prefix="epost-bench-lmtp-", dir=bench_base()))
    os.chmod(root, 0o711)
    (root / "spool" / "mailboxes").mkdir(parents=True)
    os.chmod(root / "spool", 0o711)
    nobody = pwd.getpwnam("nobody")
    os.chown(root / "spool" / "mailboxes", nobody.pw_uid, nobody.pw_gid)
    lmtp = free_port()
    tail = f'[delivery]\nlocal_transport = "lmtp:tcp:127.0.0.1:{lmtp}"\n' if transport == "lmtp" else ""
    dovecot = None
    epost = Epost(tail_toml=tail, root=root)
    try:
        if transport == "lmtp":
            conf = subprocess.run([str(Path(sys.executable).parent / "epost"), "dovecot-conf", "--config",
                                   str(root / "epost.toml"), "--imap", "off", "--pop3", "off",
                                   "--lmtp", f"tcp:127.0.0.1:{lmtp}", "--base-dir", str(root / "dovecot-run")],
                                  cwd=root, capture_output=True, text=True, check=True).stdout
            (root / "dovecot.conf").write_text(conf + f"log_path = {root / 'dovecot.log'}\n")
            dovecot = subprocess.Popen(["dovecot", "-F", "-c", str(root / "dovecot.conf")])
            wait_for_port(lmtp)
        smtp_source(epost.port, 50, size, sessions, "sink@bench.test")  # warm-up
        epost.wait_until_drained()
        start = time.monotonic()
        accepted = smtp_source(epost.port, messages, size, sessions, "sink@bench.test")
        epost.wait_until_drained()
        delivered = time.monotonic() - start
        inbox = root / "spool" / "mailboxes" / "bench.test" / "sink"
        count = sum(len(os.listdir(inbox / sub)) for sub in ("new", "cur") if (inbox / sub).is_dir())
        if count != messages + 50:
            raise RuntimeError(f"{transport}: {count} messages in the Maildir, expected {messages + 50}")
        return messages / accepted, messages / delivered
    finally:
        epost.stop()
        if dovecot:
            dovecot.terminate()
            dovecot.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--concurrency", type=int, default=10)
    args = parser.parse_args()
    print(f"{'transport':>9}  {'accepted msg/s':>14}  {'delivered msg/s':>15}")
    for transport in ("maildir", "lmtp"):
        accepted, delivered = run(transport, args.messages, args.size, args.concurrency)
        print(f"{transport:>9}  {accepted:>14.0f}  {delivered:>15.0f}", flush=True)


if __name__ == "__main__":
    main()
