"""Micro-bench: CPU-ms per message that DKIM signing adds (RSA-2048, Ed25519, and the pair).

Usage: .venv/bin/python bench/dkim_sign.py [N]   (single process, CPU time via process_time)
"""

from __future__ import annotations

import sys
import tempfile
import time

from epost.delivery import signing

BODY = b"".join(b"Line %d of a typical 4 kB message body, nothing special here.\r\n" % i for i in range(60))
MESSAGE = (
    b"From: Alice <alice@example.test>\r\nTo: bob@elsewhere.test\r\nSubject: bench\r\n"
    b"Date: Sun, 06 Dec 2026 15:00:00 +0000\r\nMessage-ID: <bench@example.test>\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n" + BODY
)


def cpu_ms(keys, n: int, message: bytes = MESSAGE) -> float:
    assert signing.sign(message, keys), "no key is for the message's From: domain"
    start = time.process_time()
    for _ in range(n):
        signing.sign(message, keys)
    return (time.process_time() - start) / n * 1000


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    with tempfile.TemporaryDirectory() as d:
        _, rsa_key = signing.keygen("example.test", d, "r", "rsa")
        _, ed_key = signing.keygen("example.test", d, "e", "ed25519")
        for name, keys in (("rsa-2048", (rsa_key,)), ("ed25519", (ed_key,)), ("pair", (rsa_key, ed_key))):
            print(f"{name:9} {cpu_ms(keys, n):6.3f} CPU-ms/message ({len(MESSAGE)} bytes, n={n})")


if __name__ == "__main__":
    main()
