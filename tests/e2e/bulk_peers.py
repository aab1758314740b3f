"""Real peers for bulk delivery (issue 14): a private postgrey, a greylisting
SMTP receiver that asks it per RCPT, a rate-limiting receiver, and an
accepting receiver that notes when each message arrived.

    with Postgrey(folder, delay=5, auto_whitelist=1) as grey, GreylistReceiver(grey) as peer: ...
    with RateLimiter(limit=120, window=60) as peer: ...      # 421 4.7.0 past 120 messages a minute per client
    with RateLimiter(limit=10, reply="gmail") as peer: ...   # Gmail's 421 4.7.28 text
    with Receiver() as healthy: ...                          # 250 to everything

The receivers are asyncio servers on a thread of their own, so a test or a
benchmark can drive the daemon and read the counts at the same time. Each
counts RCPT attempts per recipient, the time of each recipient's first
attempt and first delivery, every delivered message (with its Subject), the
replies it refused with, and the connections. Used by tests/e2e/test_bulk_e2e.py,
tests/stress/test_bulk_stress.py and bench/bulk.py.

Why a receiver of our own and not Postfix with `check_policy_service`:
Postfix is one system-wide instance (`/etc/postfix`, the benches' peer on
2525), and from outside it we could count RCPT attempts and delivery times
only by parsing its log. Our receiver speaks the same policy delegation
protocol to the same postgrey, answers as Postfix does (`450 4.2.0 <rcpt>:
Recipient address rejected: Greylisted, …`), runs as many private instances
as a test wants, and counts exactly.
"""

from __future__ import annotations

import asyncio
import collections
import getpass
import grp
import os
import shutil
import signal
import smtplib
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from e2e_support import free_port, port_answers
from sinks import _address

POSTGREY = shutil.which("postgrey") or "/usr/sbin/postgrey"
SENDER = "bulk@sender.example.org"


# --- postgrey --------------------------------------------------------------------


class Postgrey:
    """Debian's postgrey as a private instance on 127.0.0.1:`port` (a free port when 0),
    with its own database folder, pid file and empty whitelists under `folder`;
    never the system service. It stays in the foreground as our child.

    `auto_whitelist`: postgrey's `--auto-whitelist-clients=N` (0: off). postgrey
    counts at most one greylisting success per client per hour toward N, so
    within a test or a benchmark only N=1 can ever whitelist a client: the
    first message that passes greylisting whitelists the client's address."""

    def __init__(self, folder: Path, delay: int = 300, auto_whitelist: int = 1, port: int = 0,
                 hostname: str = "grey.test") -> None:
        if delay < 1:
            raise ValueError("postgrey takes a delay of 0 as its default, 300 s")
        self.folder = Path(folder)
        self.delay, self.auto_whitelist, self.host = delay, auto_whitelist, "127.0.0.1"
        self.port = port or free_port()
        self.hostname = hostname
        self.process: subprocess.Popen | None = None

    @property
    def log(self) -> Path:
        return self.folder / "postgrey.log"

    def argv(self) -> list[str]:
        db = self.folder / "db"
        return [
            POSTGREY, f"--inet={self.host}:{self.port}", f"--delay={self.delay}",
            f"--auto-whitelist-clients={self.auto_whitelist}",
            f"--dbdir={db}", f"--pidfile={self.folder / 'postgrey.pid'}",
            f"--whitelist-clients={self.folder / 'whitelist_clients'}",
            f"--whitelist-recipients={self.folder / 'whitelist_recipients'}",
            f"--user={getpass.getuser()}", f"--group={grp.getgrgid(os.getgid()).gr_name}",
            f"--hostname={self.hostname}", "--max-age=1", "--retry-window=2",
        ]

    def start(self, timeout: float = 15.0) -> Postgrey:
        (self.folder / "db").mkdir(parents=True, exist_ok=True)
        for name in ("whitelist_clients", "whitelist_recipients"):
            (self.folder / name).write_text("")  # not Debian's lists: nothing is whitelisted but by postgrey itself
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            cwd=self.folder, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not port_answers(self.port, self.host):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"postgrey did not start (exit {self.process.returncode}):\n{self.log.read_text()}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def actions(self) -> collections.Counter:
        """postgrey's own verdicts from its log: greylist/new, greylist/early-retry, pass/triplet found, pass/client AWL."""
        counts: collections.Counter = collections.Counter()
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("action="):
                fields = dict(f.split("=", 1) for f in line.split(", ") if "=" in f)
                reason = fields.get("reason", "").split(" (")[0]
                counts[f"{fields['action']}/{reason}"] += 1
        return counts

    def __enter__(self) -> Postgrey:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def postfix_reply(action: str, recipient: str) -> str:
    """The reply Postfix's smtpd gives at RCPT for a policy server's `action=` text
    (access(5)): DEFER_IF_PERMIT/DEFER -> 450, REJECT -> 550, a numeric code as
    given, anything else (DUNNO, OK, PREPEND …) -> 250."""
    verb, _, text = action.strip().partition(" ")
    upper = verb.upper()
    if upper[:1] in ("4", "5") and upper.isdigit():
        return f"{verb} {text}".strip()
    if upper in ("DEFER_IF_PERMIT", "DEFER", "DEFER_IF_REJECT", "REJECT"):
        code, default = ("550", "5.7.1") if upper == "REJECT" else ("450", "4.7.1")
        first, _, rest = text.partition(" ")
        enhanced, text = (first, rest) if first[:1] in "45" and first.count(".") == 2 else (default, text)
        return f"{code} {enhanced} <{recipient}>: Recipient address rejected: {text or 'Access denied'}"
    return "250 2.1.5 Ok"


# --- the SMTP receivers ------------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    sender: str
    recipients: tuple[str, ...]
    subject: str
    client: str
    arrived: float  # time.time() once the final dot was read


class _Transaction:
    def __init__(self, sender: str) -> None:
        self.sender = sender
        self.recipients: list[str] = []
        self.reserved = False  # RateLimiter: this transaction holds a slot of its window
        self.instance = ""  # GreylistReceiver: the policy protocol's `instance`, one per transaction


class Receiver:
    """An SMTP receiver on 127.0.0.1:`port` (a free port when 0) that accepts everything (the hooks say otherwise
    in the subclasses) and counts; a context manager. Replies starting with 421 close
    the connection, as a real server does."""

    banner = "receiver.test"

    def __init__(self, port: int = 0) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self._lock = threading.Lock()
        self._rcpts: collections.Counter = collections.Counter()  # recipient -> RCPT commands
        self._first_attempt: dict[str, float] = {}
        self._delivered_at: dict[str, float] = {}  # recipient -> first delivery
        self._deliveries: list[Delivery] = []
        self._refusals: collections.Counter = collections.Counter()  # reply (code + enhanced code) -> count
        self._refusal_times: list[float] = []
        self._transactions = 0
        self._connections = 0
        self._open = 0
        self.most_at_once = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> Receiver:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = self._loop = asyncio.new_event_loop()
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._session, self.host, self.port, backlog=1000, reuse_address=True))
            except BaseException as error:  # noqa: BLE001 - handed to the starting thread
                failure.append(error)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            self._server.close()
            loop.run_until_complete(self._server.wait_closed())
            for task in asyncio.all_tasks(loop):
                task.cancel()
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()

        self._thread = threading.Thread(target=run, name=f"{type(self).__name__}:{self.port}", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        if self._loop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- hooks -------------------------------------------------------------------------

    async def rcpt_reply(self, client: str, transaction: _Transaction, recipient: str) -> str:
        return "250 2.1.5 Ok"

    async def data_reply(self, client: str, transaction: _Transaction) -> str:
        return "250 2.0.0 Ok: queued"

    async def close(self) -> None:
        """The receiver's own connections (the policy client) are closed here."""

    # -- the session -------------------------------------------------------------------

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = writer.get_extra_info("peername")[0]
        with self._lock:
            self._connections += 1
            self._open += 1
            self.most_at_once = max(self.most_at_once, self._open)

        async def reply(text: str) -> bool:
            """Send `text`; False when the session is over (a 421)."""
            writer.write(text.encode() + b"\r\n")
            await writer.drain()
            return not text.startswith("421")

        transaction: _Transaction | None = None
        try:
            await reply(f"220 {self.banner} ESMTP")
            while line := await reader.readline():
                verb, _, argument = line.rstrip(b"\r\n").partition(b" ")
                verb = verb.upper()
                if verb == b"EHLO":
                    await reply(f"250-{self.banner}\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n"
                                "250 SIZE 100000000")
                elif verb == b"HELO":
                    await reply(f"250 {self.banner}")
                elif verb == b"MAIL":
                    transaction = _Transaction(_address(argument))
                    with self._lock:
                        self._transactions += 1
                    await reply("250 2.1.0 Ok")
                elif verb == b"RCPT":
                    if transaction is None:
                        await reply("503 5.5.1 Error: need MAIL command")
                        continue
                    recipient = _address(argument).lower()
                    now = time.time()
                    with self._lock:
                        self._rcpts[recipient] += 1
                        self._first_attempt.setdefault(recipient, now)
                    text = await self.rcpt_reply(client, transaction, recipient)
                    if text.startswith("2"):
                        transaction.recipients.append(recipient)
                    else:
                        self._refused(text)
                    if not await reply(text):
                        return
                elif verb == b"DATA":
                    if transaction is None or not transaction.recipients:
                        await reply("554 5.5.1 Error: no valid recipients")
                        continue
                    await reply("354 End data with <CR><LF>.<CR><LF>")
                    subject = await _read_data(reader)
                    if subject is None:
                        return
                    text = await self.data_reply(client, transaction)
                    if text.startswith("2"):
                        self._delivered(Delivery(transaction.sender, tuple(transaction.recipients), subject,
                                                 client, time.time()))
                    else:
                        self._refused(text)
                    transaction = None
                    if not await reply(text):
                        return
                elif verb == b"RSET":
                    transaction = None
                    await reply("250 2.0.0 Ok")
                elif verb == b"NOOP":
                    await reply("250 2.0.0 Ok")
                elif verb == b"QUIT":
                    await reply("221 2.0.0 Bye")
                    return
                else:
                    await reply("502 5.5.2 Error: command not recognized")
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            with self._lock:
                self._open -= 1
            writer.close()

    def _refused(self, text: str) -> None:
        key = " ".join(text.split()[:2])
        with self._lock:
            self._refusals[key] += 1
            self._refusal_times.append(time.time())

    def _delivered(self, delivery: Delivery) -> None:
        with self._lock:
            self._deliveries.append(delivery)
            for recipient in delivery.recipients:
                self._delivered_at.setdefault(recipient, delivery.arrived)

    # -- what the tests read -----------------------------------------------------------

    @property
    def deliveries(self) -> list[Delivery]:
        with self._lock:
            return list(self._deliveries)

    @property
    def connections(self) -> int:
        with self._lock:
            return self._connections

    @property
    def transactions(self) -> int:
        with self._lock:
            return self._transactions

    def rcpt_counts(self) -> dict[str, int]:
        """RCPT commands per recipient (attempts, whatever the answer)."""
        with self._lock:
            return dict(self._rcpts)

    def rcpt_attempts(self) -> int:
        with self._lock:
            return sum(self._rcpts.values())

    def first_attempts(self) -> dict[str, float]:
        with self._lock:
            return dict(self._first_attempt)

    def delivered_at(self) -> dict[str, float]:
        """Recipient -> time of its first delivery."""
        with self._lock:
            return dict(self._delivered_at)

    def refusals(self) -> dict[str, int]:
        """Refusing replies by their first two words (`450 4.2.0`, `421 4.7.0`) -> count."""
        with self._lock:
            return dict(self._refusals)

    def refusal_times(self) -> list[float]:
        with self._lock:
            return list(self._refusal_times)

    def arrivals(self) -> dict[str, float]:
        """Subject -> arrival time, for latency measures."""
        with self._lock:
            return {d.subject: d.arrived for d in self._deliveries}

    def wait_for_recipients(self, count: int, timeout: float) -> bool:
        """True once `count` distinct recipients have been delivered, False after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while len(self.delivered_at()) < count:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True


async def _read_data(reader: asyncio.StreamReader) -> str | None:
    """Reads the message up to the final dot; its Subject ('' when none), None when the peer left."""
    subject, in_header = "", True
    while True:
        line = await reader.readline()
        if not line:
            return None
        if line == b".\r\n":
            return subject
        if in_header:
            if line in (b"\r\n", b"\n"):
                in_header = False
            elif not subject and line[:9].lower() == b"subject: ":
                subject = line[9:].strip().decode("ascii", "replace")


class GreylistReceiver(Receiver):
    """Asks `postgrey` per RCPT over the Postfix policy delegation protocol and
    answers as Postfix does: `450 4.2.0 <rcpt>: Recipient address rejected:
    Greylisted, …` for DEFER_IF_PERMIT, 250 otherwise. One policy connection,
    queries in turn (Postfix's smtpd, too, asks over one connection per process)."""

    banner = "grey.test"

    def __init__(self, postgrey: Postgrey, port: int = 0) -> None:
        super().__init__(port)
        self.postgrey = postgrey
        self._policy: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._policy_lock: asyncio.Lock | None = None
        self._instance = 0

    async def rcpt_reply(self, client: str, transaction: _Transaction, recipient: str) -> str:
        if not transaction.instance:
            self._instance += 1
            transaction.instance = f"{os.getpid():x}.{self._instance:x}"
        request = {
            "request": "smtpd_access_policy", "protocol_state": "RCPT", "protocol_name": "ESMTP",
            "client_address": client, "client_name": "unknown", "reverse_client_name": "unknown",
            "helo_name": "epost", "sender": transaction.sender, "recipient": recipient,
            "recipient_count": str(len(transaction.recipients)), "queue_id": "",
            "instance": transaction.instance, "size": "0", "etrn_domain": "", "stress": "",
        }
        try:
            action = await self._ask(request)
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            return "451 4.3.5 Server configuration problem"  # Postfix's answer when the policy server fails
        return postfix_reply(action, recipient)

    async def _ask(self, request: dict[str, str]) -> str:
        if self._policy_lock is None:
            self._policy_lock = asyncio.Lock()
        async with self._policy_lock:
            for attempt in (1, 2):  # postgrey may have closed an idle connection
                if self._policy is None:
                    self._policy = await asyncio.open_connection(self.postgrey.host, self.postgrey.port)
                reader, writer = self._policy
                try:
                    writer.write("".join(f"{k}={v}\n" for k, v in request.items()).encode() + b"\n")
                    await writer.drain()
                    action = ""
                    while True:
                        line = await asyncio.wait_for(reader.readline(), 30)
                        if not line:
                            raise ConnectionError("postgrey closed the policy connection")
                        if line == b"\n":
                            return action
                        if line.startswith(b"action="):
                            action = line[7:].decode("utf-8", "replace").rstrip("\n")
                except (OSError, asyncio.IncompleteReadError):
                    writer.close()
                    self._policy = None
                    if attempt == 2:
                        raise
        raise AssertionError("unreachable")


RATE_TEXTS = {
    "plain": "421 4.7.0 Too many messages, slow down",
    "gmail": ("421 4.7.28 Our system has detected an unusual rate of unsolicited mail originating from your "
              "IP address. To protect our users from spam, mail sent from your IP address has been "
              "temporarily rate limited."),
    "microsoft": "451 4.7.650 The mail server has been temporarily rate limited due to IP reputation.",
    "yahoo": "421 4.7.0 [TSS04] Messages temporarily deferred due to unexpected volume or user complaints",
}


class RateLimiter(Receiver):
    """Takes at most `limit` messages per `window` seconds (a sliding window) from
    each client address; past that it answers `reply` (a key of RATE_TEXTS or a
    whole reply line) at RCPT, or after the message's final dot with
    `stage="data"`. A 421 closes the connection."""

    banner = "rate.test"

    def __init__(self, limit: int, window: float = 60.0, reply: str = "plain", stage: str = "rcpt",
                 port: int = 0) -> None:
        if stage not in ("rcpt", "data"):
            raise ValueError(stage)
        super().__init__(port)
        self.limit, self.window, self.stage = limit, window, stage
        self.reply = RATE_TEXTS.get(reply, reply)
        self._taken: dict[str, collections.deque] = collections.defaultdict(collections.deque)

    def _take(self, client: str, transaction: _Transaction) -> bool:
        """Reserve one of the window's slots for this transaction; False when none is free."""
        if transaction.reserved:
            return True
        now = time.monotonic()
        taken = self._taken[client]
        while taken and now - taken[0] >= self.window:
            taken.popleft()
        if len(taken) >= self.limit:
            return False
        taken.append(now)
        transaction.reserved = True
        return True

    async def rcpt_reply(self, client: str, transaction: _Transaction, recipient: str) -> str:
        if self.stage == "rcpt" and not self._take(client, transaction):
            return self.reply
        return "250 2.1.5 Ok"

    async def data_reply(self, client: str, transaction: _Transaction) -> str:
        if self.stage == "data" and not self._take(client, transaction):
            return self.reply
        return "250 2.0.0 Ok: queued"


# --- the sending side and the daemon's settings -------------------------------------------


def send_bulk(port: int, recipients: list[str], subject: str = "bulk", sender: str = SENDER,
              connections: int = 4, rate: float | None = None) -> dict[str, float]:
    """One message per recipient to the daemon's relay port on 127.0.0.1, over
    `connections` SMTP sessions (at most `rate` messages a second when given);
    returns {Subject: time of the 250 to DATA}. Subjects are `subject-<i>`."""
    accepted: dict[str, float] = {}
    lock = threading.Lock()
    errors: list[BaseException] = []
    start = time.time()

    def worker(k: int) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", port, local_hostname="bulk.sender.example.org", timeout=120) as client:
                for i in range(k, len(recipients), connections):
                    if rate:
                        pause = start + i / rate - time.time()
                        if pause > 0:
                            time.sleep(pause)
                    name = f"{subject}-{i}"
                    content = (f"From: <{sender}>\r\nTo: <{recipients[i]}>\r\nSubject: {name}\r\n\r\n"
                               + "bulk mail line\r\n" * 20)
                    refused = client.sendmail(sender, [recipients[i]], content)
                    assert not refused, refused
                    with lock:
                        accepted[name] = time.time()
        except BaseException as error:  # noqa: BLE001 - raised in the caller's thread
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(min(connections, len(recipients)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return accepted


def daemon_knows_receiver_aware() -> bool:
    """True once the daemon has `[delivery] receiver_aware` (issue 14)."""
    from epost.config import DeliveryConfig

    return "receiver_aware" in getattr(DeliveryConfig, "__dataclass_fields__", {})


def receiver_aware_line(aware: bool) -> str:
    """The `[delivery]` line that switches the behaviour. `receiver_aware = false` is
    E-Post's baseline, which is what a daemon without the key does: for such a
    daemon the baseline is written as nothing, so a baseline still runs on it,
    while `true` is always written (a daemon without the feature refuses it)."""
    if not aware and not daemon_knows_receiver_aware():
        return ""
    return f"receiver_aware = {'true' if aware else 'false'}\n"


def mri_fields(path: Path) -> dict[str, str]:
    """Every `Key: value` line of a Domain.mri (ours after E-Post's four included); {} when there is none."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in text.splitlines()) if k.strip()}


def sustained_rate(times: list[float]) -> float:
    """Deliveries a minute, over the whole minutes (counted from the first delivery) after
    the first and before the last: a sliding-window limiter lets its first minute's
    allowance through at once, and the last minute is cut short. NaN for under 3 minutes."""
    if not times:
        return float("nan")
    start = min(times)
    minutes = collections.Counter(int((t - start) // 60) for t in times)
    full = range(1, max(minutes))
    return sum(minutes[m] for m in full) / len(full) if len(full) else float("nan")


def percentile(values: list[float], p: float) -> float:
    """The nearest-rank percentile (NaN for no values)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))
    return ordered[int(min(rank, len(ordered))) - 1]


def bulk_toml(routes: dict[str, int], gateway: Path, aware: bool, retry: str = "", delivery: str = "",
              tail: str = "") -> str:
    """The daemon's settings after `[routing]`: a gateway.dat at `gateway` sending each
    domain of `routes` to 127.0.0.1:port, `[retry]`, `[delivery]` with the
    receiver_aware switch, then `tail` (whole tables: destinations, throttle rules)."""
    gateway.write_text("".join(f"{domain},127.0.0.1,{port}\n" for domain, port in routes.items()))
    return (f'gateway_table = "{gateway}"\n\n[retry]\n{retry}\n'
            f"[delivery]\n{receiver_aware_line(aware)}{delivery}\n{tail}\n")


def senderlog_records(spool: Path) -> list[dict]:
    """The daemon's senderlog, parsed."""
    from epost.logs import parse_senderlog_line

    path = Path(spool) / "log" / "senderlog"
    return [parse_senderlog_line(line) for line in path.read_text().splitlines()] if path.exists() else []


def bounces(spool: Path) -> int:
    """Final failures: faillog lines (one per failed recipient, null sender included)."""
    path = Path(spool) / "log" / "faillog"
    return len(path.read_text().splitlines()) if path.exists() else 0
