"""Table memory: daemon-like RSS while 10 MB users and aliases tables are loaded, replaced and shrunk.

    .venv/bin/python bench/tables_memory.py [--mb 10] [--rounds 3]

Runs the daemon's own reload path in this process: `build_routing`'s
LiveTables and a TableWatcher on a real reactor, parsing in an `epost-io`
thread pool (4 threads, as the daemon's). Prints VmRSS (and the peak,
VmHWM) after: start with small tables, each full reload of the two big
files, and finally after both files are cut back to one line each. The
figure that matters is the last one: memory a big table used must come
back once that table is gone.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet import defer, reactor, task  # noqa: E402
from twisted.python.threadpool import ThreadPool  # noqa: E402

from epost.config import load_config  # noqa: E402
from epost.routing.live import TableWatcher  # noqa: E402
from epost.routing_chain import build_routing  # noqa: E402

HASH = "$scrypt$ln=15,r=8,p=1$c2FsdHNhbHRzYWx0c2FsdA$a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2U"


def status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def write_big(folder: Path, megabytes: int, salt: int) -> None:
    """Users `uN@example.test:HASH` and aliases `aN: uN@example.test, x@remote.example` to about `megabytes` each.

    Run in a child process by `prepare`, so that making the text does not
    count in (or fragment) the memory measured here."""
    target = megabytes * 1024 * 1024
    for name, line in (
        ("users", lambda n: f"u{n}-{salt}@example.test:{HASH}\n"),
        ("aliases", lambda n: f"a{n}-{salt}: u{n}-{salt}@example.test, list{n}@remote.example\n"),
    ):
        parts, size, n = [], 0, 0
        while size < target:
            text = line(n)
            parts.append(text)
            size += len(text)
            n += 1
        temporary = folder / f".{name}.tmp"
        temporary.write_text("".join(parts))
        os.replace(temporary, folder / name)


def prepare(folder: Path, megabytes: int, salt: int) -> Path:
    """A folder holding the big `users` and `aliases`, written by a child process."""
    ready = folder / f"ready-{salt}"
    ready.mkdir()
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import tables_memory as t; t.write_big(t.Path({str(ready)!r}), {megabytes}, {salt})"
    subprocess.run([sys.executable, "-c", code], check=True)
    return ready


def move_in(ready: Path, folder: Path) -> None:
    for name in ("users", "aliases"):
        os.replace(ready / name, folder / name)


def write_small(folder: Path) -> None:
    for name, text in (("users", "alice@example.test\n"), ("aliases", "info: alice@example.test\n")):
        temporary = folder / f".{name}.tmp"
        temporary.write_text(text)
        os.replace(temporary, folder / name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="epost-tables-"))
    atexit.register(shutil.rmtree, folder, True)
    (folder / "epost.toml").write_text(
        '[server]\nhostname = "mx.example.test"\n[routing]\nlocal_domains = ["example.test"]\n'
        'users = "users"\naliases = "aliases"\n'
    )
    write_small(folder)
    ready = [prepare(folder, args.mb, n) for n in range(args.rounds)]
    config = load_config(folder / "epost.toml", {})
    routing = build_routing(config)
    pool = ThreadPool(minthreads=2, maxthreads=4, name="epost-io")
    pool.start()
    watcher = TableWatcher(routing.tables, reactor, pool, handle_sighup=False)
    watcher.startService()
    steps = [("start (small tables)", None)]
    steps += [(f"after reload {n + 1} of {args.mb} MB users + aliases", n) for n in range(args.rounds)]
    steps += [("after both cut to one line", "small")]

    @defer.inlineCallbacks
    def settle(want_users: int):
        deadline = time.monotonic() + 60
        while len(routing.users()) != want_users:
            if time.monotonic() > deadline:
                raise SystemExit("tables were not reloaded in 60 s")
            yield task.deferLater(reactor, 0.2, lambda: None)
        yield task.deferLater(reactor, 3, lambda: None)  # later polls, the other table, any trim

    @defer.inlineCallbacks
    def go():
        try:
            for label, step in steps:
                if step is None:
                    yield task.deferLater(reactor, 2, lambda: None)
                elif step == "small":
                    write_small(folder)
                    yield settle(1)
                else:
                    move_in(ready[step], folder)
                    with open(folder / "users") as users:
                        yield settle(sum(1 for _ in users))
                print(f"{label:45} VmRSS {status('VmRSS') / 1024:7.1f} MiB   VmHWM {status('VmHWM') / 1024:7.1f} MiB", flush=True)
        finally:
            watcher.stopService()
            pool.stop()
            reactor.stop()

    reactor.callWhenRunning(go)
    reactor.run()


if __name__ == "__main__":
    main()
