"""Helpers shared by the benchmarks: start epost / Postfix, count CPU, drive smtp-source."""

from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")
POSTFIX_PROCESSES = {
    "master", "smtpd", "cleanup", "qmgr", "smtp", "trivial-rewrite", "anvil",
    "tlsmgr", "scache", "pickup", "proxymap", "bounce", "postdrop", "showq",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.recv(100)
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing answers on 127.0.0.1:{port}")


def process_cpu(pid: int) -> float:
    """User+system CPU seconds of one process (its exited children included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime + cutime + cstime) / TICKS


def children(pid: int) -> list[int]:
    pids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        pids += [int(p) for p in (task / "children").read_text().split()]
    return pids


def postfix_cpu() -> float:
    """CPU seconds of every live Postfix process, plus what master reaped."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
            if comm in POSTFIX_PROCESSES:
                total += process_cpu(int(entry.name))
        except (OSError, IndexError):
            continue
    return total


class DiskCounters:
    """Write requests and cache flushes completed by the disk that holds `path`
    (/proc/diskstats): what a message costs the device, beside its CPU.

    Counts everything on that disk in the meantime, so keep it otherwise quiet.
    `read()` is None where the file system has no block device of its own
    (tmpfs, overlay); flushes read 0 on kernels before 5.5."""

    def __init__(self, path: Path):
        device = os.stat(path).st_dev
        self.device = (os.major(device), os.minor(device))

    def read(self) -> tuple[int, int] | None:
        for line in Path("/proc/diskstats").read_text().splitlines():
            fields = line.split()
            if (int(fields[0]), int(fields[1])) == self.device:
                return int(fields[7]), int(fields[18]) if len(fields) > 18 else 0
        return None

    def per_message(self, before: tuple[int, int] | None, messages: int) -> tuple[float, float]:
        """(write requests, cache flushes) per message since `before` (an earlier `read()`);
        NaN for both when the disk cannot be counted."""
        after = self.read()
        if before is None or after is None:
            return math.nan, math.nan
        writes, flushes = ((a - b) / messages for b, a in zip(before, after))
        return writes, flushes


def spread(ratios: list[float]) -> str:
    """` (rounds LOW–HIGH)`: the lowest and highest one-round ratio of a run; empty for one round."""
    return f" (rounds {min(ratios):.2f}–{max(ratios):.2f})" if len(ratios) > 1 else ""


def disk_columns(writes: float, flushes: float) -> str:
    """The `wr/msg fl/msg` columns of a benchmark line; `-` where the disk was not counted."""
    return " ".join(f"{'-':>6}" if math.isnan(v) else f"{v:>6.1f}" for v in (writes, flushes))


def bench_base() -> Path:
    """Where benchmark spools go: a folder flagged as a top of hierarchy (chattr +T).

    ext4 then places each run's folder in a block group of its own, away from
    the thousands of files the previous run deleted: on ext4 without a journal
    every new inode skips the free inodes of its group deleted in the last one
    to six minutes, and that made a run that followed another pay up to 1 ms
    of CPU per Maildir file. Where the flag cannot be set, nothing changes."""
    base = Path(tempfile.gettempdir()) / "epost-bench"
    base.mkdir(exist_ok=True)
    subprocess.run(["chattr", "+T", str(base)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return base


class Epost:
    """A real `twistd -n epost` on loopback with local delivery to one Maildir."""

    def __init__(
        self,
        extra_toml: str = "",
        *,
        gateway: str | None = None,
        tail_toml: str = "",
        root: Path | None = None,
        wait: bool = True,
    ):
        """`extra_toml` goes into [server]; `gateway` is the gateway.dat text;
        `tail_toml` adds whole sections ([delivery], [retry]); `root` reuses a
        prepared folder (its spool/ is kept); `wait=False` returns at once."""
        self.root = root or Path(tempfile.mkdtemp(prefix="epost-bench-", dir=bench_base()))
        self.port = free_port()
        (self.root / "users").write_text("sink@bench.test\n")
        if gateway is not None:
            (self.root / "gateway.dat").write_text(gateway)
        (self.root / "epost.toml").write_text(
            f'[server]\nhostname = "epost.bench.test"\n'
            f'relay = ["tcp:{self.port}:interface=127.0.0.1"]\nsubmission = []\n'
            f'spool = "spool"\nmax_connections_per_client = 1000\n{extra_toml}\n'
            f'[routing]\nlocal_domains = ["bench.test"]\nusers = "users"\n'
            f'gateway_table = "gateway.dat"\n'
            f'dns_servers = ["127.0.0.1:9"]\n'  # loopback only: no real DNS, ever
            f"{tail_toml}\n"
        )
        self.log = open(self.root / "epost.log", "ab")
        twistd = Path(sys.executable).parent / "twistd"
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [str(twistd), "-n", "--pidfile=", "epost", "--config", str(self.root / "epost.toml")],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=self.root,
        )
        if wait:
            wait_for_port(self.port)

    @property
    def spool(self) -> Path:
        return self.root / "spool"

    def cpu(self) -> float:
        """The daemon and its child processes (spool workers, courier) together."""
        return process_cpu(self.process.pid) + sum(process_cpu(pid) for pid in children(self.process.pid))

    def cpu_by_process(self) -> dict[str, float]:
        """CPU seconds of the daemon, its spool workers together and its courier
        process: the parts of `cpu()` (a child restarted in between loses its count)."""
        parts = {"daemon": process_cpu(self.process.pid), "workers": 0.0, "courier": 0.0, "other": 0.0}
        for pid in children(self.process.pid):
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                cpu = process_cpu(pid)
            except OSError:  # ended in between
                continue
            role = ("workers" if b"epost.queue.worker" in command else
                    "courier" if b"epost.delivery.courier_process" in command else "other")
            parts[role] += cpu
        return parts

    def rss_kib(self) -> int:
        return rss_kib(self.process.pid)

    def queued(self, queues: tuple[str, ...] = ("incoming",)) -> int:
        counts = queue_counts(self.spool)
        return sum(counts[q] for q in queues)

    def rss_tree_kib(self) -> dict[int, int]:
        """VmRSS of the daemon and of each child (the spool workers), by pid."""
        return {pid: rss_kib(pid) for pid in [self.process.pid, *children(self.process.pid)]}

    def wait_until_drained(self, timeout: float = 600) -> float:
        return wait_until_empty(self.queued, timeout)

    def stop(self, keep: bool = False) -> None:
        end_process(self.process, 30)
        self.log.close()
        if not keep:
            shutil.rmtree(self.root, ignore_errors=True)


class Postfix:
    """Debian's Postfix via ../shared/tools/postfix-peer, relaying into smtp-sink."""

    spool = Path("/var/spool/postfix")

    def __init__(self, port: int = 2525, sink_port: int = 2526):
        self.port = port
        tool = ROOT.parent / "shared" / "tools" / "postfix-peer"
        subprocess.run(["bash", str(tool), "start", str(port), str(sink_port)], check=True, stdout=subprocess.DEVNULL)
        self.sink = Sink(sink_port)
        wait_for_port(port)

    def cpu(self) -> float:
        return postfix_cpu()

    def queued(self) -> int:
        out = subprocess.run(["postqueue", "-j"], capture_output=True, text=True).stdout
        return len([line for line in out.splitlines() if line.strip()])

    def wait_until_drained(self, timeout: float = 600) -> float:
        return wait_until_empty(self.queued, timeout)

    def stop(self) -> None:
        self.sink.stop()
        subprocess.run(["postfix", "stop"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def queue_counts(spool: Path) -> dict[str, int]:
    """Messages per state in epost's queue store, read on a connection of our own (zeros before it exists)."""
    from epost.store.database import QUEUES
    from epost.store.spool import Spool

    reader = Spool(spool, reactor=None, threadpool=None)
    if not reader.exists():
        return dict.fromkeys(QUEUES, 0)
    reader.open(create=False)
    try:
        return reader.counts()
    finally:
        reader.close()


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class Sink:
    """Postfix's smtp-sink on 127.0.0.1:port; `received()` counts the messages it took
    (its -c counters go to a file). `options` e.g. ["-r", "RCPT", "-b", "451 4.7.1 later"]."""

    def __init__(self, port: int | None = None, options: tuple[str, ...] = ()):
        self.port = port or free_port()
        self._out = tempfile.NamedTemporaryFile(prefix="smtp-sink-", suffix=".out")
        self.process = subprocess.Popen(
            ["smtp-sink", "-u", "postfix", "-c", *options, f"127.0.0.1:{self.port}", "1000"],
            stdout=self._out, stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)

    def _counter(self, name: str) -> int:
        tail = Path(self._out.name).read_bytes()[-200:].decode("ascii", "replace")
        records = [r for r in tail.split("\r") if f"{name}=" in r]
        for record in reversed(records):
            for field in record.split():
                key, _, value = field.partition("=")
                if key == name and value.isdigit():
                    return int(value)
        return 0

    def received(self) -> int:
        return self._counter("mesg")

    def sessions(self) -> int:
        return self._counter("sess")

    def wait_for(self, count: int, timeout: float = 600) -> float:
        """Monotonic time when `received()` first reached `count` (polled every 10 ms)."""
        deadline = time.monotonic() + timeout
        while self.received() < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the sink got {self.received()} of {count} messages")
            time.sleep(0.01)
        return time.monotonic()

    def stop(self) -> None:
        end_process(self.process, 5)
        self._out.close()


def end_process(process: subprocess.Popen, timeout: float) -> None:
    """SIGTERM, then SIGKILL after `timeout` seconds; reaped either way."""
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_until_empty(queued, timeout: float) -> float:
    """Seconds until `queued()` is 0 (the server has delivered everything)."""
    start = time.monotonic()
    while queued():
        if time.monotonic() - start > timeout:
            raise RuntimeError("the queue did not drain")
        time.sleep(0.05)
    return time.monotonic() - start


def smtp_source(port: int, messages: int, size: int, sessions: int, to: str) -> float:
    """Wall seconds for Postfix's smtp-source to have every message accepted."""
    start = time.monotonic()
    subprocess.run(
        ["smtp-source", "-s", str(sessions), "-m", str(messages), "-l", str(size),
         "-f", "bench@client.test", "-t", to, "-M", "client.test", f"127.0.0.1:{port}"],
        check=True,
    )
    return time.monotonic() - start


OPENDKIM = shutil.which("opendkim", path="/usr/sbin:/usr/local/sbin")


def ensure_opendkim() -> str:
    """Debian's opendkim, installed if missing (as postfix-peer installs Postfix);
    the system service that installing starts is stopped and disabled at once:
    benchmarks run private instances only."""
    global OPENDKIM
    if OPENDKIM is None:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if subprocess.run(["apt-get", "install", "-y", "-q", "opendkim"], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode:
            subprocess.run(["apt-get", "update", "-q"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            subprocess.run(["apt-get", "install", "-y", "-q", "opendkim"], env=env, check=True,
                           stdout=subprocess.DEVNULL)
        for command in (["service", "opendkim", "stop"], ["update-rc.d", "opendkim", "disable"],
                        ["systemctl", "disable", "opendkim"]):
            subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        OPENDKIM = shutil.which("opendkim", path="/usr/sbin:/usr/local/sbin")
    if OPENDKIM is None:
        raise RuntimeError("opendkim is not installed and could not be (Debian: apt-get install opendkim)")
    return OPENDKIM
# epost's signed header set (epost.delivery.signing.SIGNED_HEADERS), From oversigned as epost does.
OPENDKIM_SIGN_HEADERS = ("from,to,cc,subject,date,message-id,reply-to,mime-version,content-type,"
                         "content-transfer-encoding,list-unsubscribe,list-unsubscribe-post")


class OpenDkim:
    """A private OpenDKIM signer (Debian's `opendkim` in the foreground, never the
    system service): its own config, pid file and key under `folder`, a milter
    socket on 127.0.0.1. One key per instance: OpenDKIM 2.11 signs every message
    with one SignatureAlgorithm, so RSA + Ed25519 takes two instances in a row
    (smtpd_milters = both), as operators run it."""

    def __init__(self, folder: Path, name: str, domain: str, selector: str, key: Path, algorithm: str,
                 unix: bool = True):
        """`unix`: the milter socket is `folder`/NAME.sock (folder must let Postfix's
        smtpd, user postfix, reach it), else 127.0.0.1 on a free TCP port."""
        self.socket = folder / f"opendkim-{name}.sock" if unix else None
        self.port = None if unix else free_port()
        self.pid_file = folder / f"opendkim-{name}.pid"
        conf = folder / f"opendkim-{name}.conf"
        conf.write_text(
            f"Mode s\nSocket {self.spec('local:', '@127.0.0.1')}\nUMask 000\nPidFile {self.pid_file}\nSyslog no\n"
            f"Domain {domain}\nSelector {selector}\nKeyFile {key}\nRequireSafeKeys false\n"
            f"SignatureAlgorithm {algorithm}\nCanonicalization relaxed/relaxed\n"
            f"SignHeaders {OPENDKIM_SIGN_HEADERS}\nOversignHeaders From\n"
        )
        log = folder / f"opendkim-{name}.log"
        self.log = open(log, "ab")
        self.process = subprocess.Popen([ensure_opendkim(), "-f", "-x", str(conf)],
                                        stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while True:  # a milter says nothing on connect: wait until it accepts
            try:
                if unix:
                    with socket.socket(socket.AF_UNIX) as s:
                        s.connect(str(self.socket))
                else:
                    socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"opendkim ({conf}) did not start: {log.read_text()}")
                time.sleep(0.05)

    def spec(self, unix_prefix: str, inet_suffix: str = "") -> str:
        if self.socket:
            return f"{unix_prefix}{self.socket}"
        return f"inet:{self.port}{inet_suffix}"

    @property
    def milter(self) -> str:
        """Postfix's name for the socket (smtpd_milters)."""
        return f"unix:{self.socket}" if self.socket else f"inet:127.0.0.1:{self.port}"

    def cpu(self) -> float:
        return process_cpu(self.process.pid)  # every thread of the one process

    def stop(self) -> None:
        end_process(self.process, 10)
        self.log.close()
