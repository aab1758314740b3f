"""CPU of removing Authentication-Results fields in our name (RFC 8601 §5), now run on every inbound message.

    .venv/bin/python bench/forged_filter.py [--old PATH_TO_OLD_authresults.py]

Times ResultsFilter.feed + flush per message on the reactor's path, for a
typical message handed over in one chunk (what DataReader passes on for a
small message), a 100 KiB one in 64 KiB chunks, and the worst cases: a
25 MiB message that is all header, without and with fields named
Authentication-Results. With --old, the same for another version of
epost/smtp/authresults.py (e.g. `git show main:epost/smtp/authresults.py`).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time

HOST = "mx.example.jp"
TYPICAL = (b"Received: from client.example ([192.0.2.7])\r\n\tby mx.example.jp (epost) with ESMTP id 0190000000000A000;\r\n"
           b"\tSun, 06 Dec 2026 15:00:00 +0000\r\nFrom: Alice <alice@example.org>\r\nTo: bob@example.jp\r\nSubject: hello\r\n"
           b"Date: Sun, 06 Dec 2026 15:00:00 +0000\r\nMessage-ID: <1@example.org>\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: text/plain\r\n\r\n") + b"x" * 72 + b"\r\n"


def sized(size: int) -> bytes:
    return TYPICAL + (b"y" * 76 + b"\r\n") * ((size - len(TYPICAL)) // 78)


def all_header(size: int, every: int | None, line: bytes = b"X-Filler: " + b"z" * 60 + b"\r\n") -> bytes:
    ours = b"Authentication-Results: mx.example.jp; dkim=pass\r\n"
    lines = [ours if every and i % every == 0 else line for i in range(size // len(line))]
    return b"".join(lines) + b"\r\nbody\r\n"


def per_message(module, message: bytes, chunk: int, repeat: int) -> float:
    started = time.process_time()
    for _ in range(repeat):
        stream = module.ResultsFilter(HOST)
        for start in range(0, len(message), chunk):
            stream.feed(message[start:start + chunk])
        stream.flush()
    return (time.process_time() - started) / repeat


def load(path: str):
    spec = importlib.util.spec_from_file_location("authresults_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", help="another authresults.py to compare")
    args = parser.parse_args()
    from epost.smtp import authresults

    versions = [("now", authresults)] + ([("old", load(args.old))] if args.old else [])
    cases = [("4 KiB, one chunk", sized(4096), 1 << 30, 20000), ("100 KiB, 64 KiB chunks", sized(102400), 65536, 2000),
             ("25 MiB all header", all_header(25 << 20, None), 65536, 3),
             ("25 MiB all header, short lines, one chunk", all_header(25 << 20, None, b"X: y\r\n\tz\r\n"), 1 << 30, 1),
             ("25 MiB all header, every 10th line ours", all_header(25 << 20, 10), 65536, 1)]
    for label, message, chunk, repeat in cases:
        cells = "  ".join(f"{name}: {1e6 * per_message(module, message, chunk, repeat):>12.1f} µs" for name, module in versions)
        print(f"{label:<42} {cells}")


if __name__ == "__main__":
    main()
