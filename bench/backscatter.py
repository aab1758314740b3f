"""Backscatter benchmark (issue 13): a gateway in front of an internal server that knows 10 users.

    .venv/bin/python bench/backscatter.py [--unknown 1000] [--valid 100] [--sessions 10]
                                          [--latency 2000] [--postfix]

The internal server is `UserSink` (tests/e2e/sinks.py) on loopback: RCPT to
one of its 10 users gets 250, anything else `550 5.1.1`, and it counts the
RCPTs it gets with `MAIL FROM:<>` (probes). epost is its gateway
(`gateway.dat: verify.test,127.0.0.1,PORT`, the client outside
relay_networks). The run sends `--unknown` messages from forged senders to
as many random addresses of verify.test and `--valid` messages to the 10
valid ones, over `--sessions` parallel sessions; a 4xx at RCPT is retried a
second later (as a sending MTA would), up to 10 times. Printed: RCPT
answers, messages accepted for unknown addresses (must be 0), bounces
generated (null-sender messages in the queue + `status=bounced` lines: must
be 0), probes per distinct address (must be <= 1), valid mail delivered, and
RCPT round-trip times on one session with a warm cache: cached verified
addresses against a local user (no verification) beside them, p50/p99.

With `--postfix` the same run goes through Debian's Postfix configured as
the same gateway with `reject_unverified_recipient`, in an instance of its
own (`postfix -c`, own queue and port; root needed), as the reference.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import smtplib
import statistics
import string
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import Epost, bench_base, free_port, wait_for_port

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "e2e"))
from sinks import UserSink  # noqa: E402

DOMAIN = "verify.test"
VALID = [f"user{n}@{DOMAIN}" for n in range(10)]
CONTENT = b"From: <x@forged.example>\r\nSubject: backscatter bench\r\n\r\nhello\r\n"


def forged_sender(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_lowercase, k=8)) + "@forged" + str(rng.randrange(1000)) + ".example"


def drive(port: int, messages: list[tuple[str, str]], sessions: int) -> dict:
    """Send every (sender, recipient) message; RCPT 4xx retried a second later, up to 10 times."""
    lock = threading.Lock()
    stats = {"250": 0, "550": 0, "450": 0, "other": 0, "accepted_unknown": 0, "delivered_valid": 0, "gave_up": 0}
    work = list(enumerate(messages))
    valid = set(VALID)

    def worker(part: list[tuple[int, tuple[str, str]]]) -> None:
        # A session carries up to 10 messages: servers hang up after about 20
        # refused commands (epost's bad-command limit, Postfix's hard error limit).
        pending = [(0, item) for item in part]
        client, used = None, 0
        while pending:
            tries, (index, (sender, recipient)) = pending.pop(0)
            if client is None or used == 10:
                if client is not None:
                    client.quit()
                client, used = smtplib.SMTP("127.0.0.1", port, local_hostname="bot.forged.example", timeout=60), 0
                client.ehlo()
            used += 1
            client.rset()
            client.mail(sender)
            code, _ = client.rcpt(recipient)
            key = str(code) if str(code) in stats else "other"
            with lock:
                stats[key] += 1
            if code == 250:
                assert client.data(CONTENT)[0] == 250
                with lock:
                    if recipient in valid:
                        stats["delivered_valid"] += 1
                    else:
                        stats["accepted_unknown"] += 1
            elif 400 <= code < 500:
                if tries < 10:
                    time.sleep(1.0 if not pending else 0)
                    pending.append((tries + 1, (index, (sender, recipient))))
                else:
                    with lock:
                        stats["gave_up"] += 1
        if client is not None:
            client.quit()

    threads = [threading.Thread(target=worker, args=(work[n::sessions],)) for n in range(sessions)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats["seconds"] = round(time.monotonic() - start, 2)
    return stats


def rcpt_latency(port: int, cached: list[str], baseline: str, count: int) -> dict:
    """RCPT round trips (ms) on one session: cached operated addresses and a local user, interleaved."""
    verified, local = [], []
    client = None
    for n in range(count):
        if n % 10 == 0:  # a fresh session before the refusals reach the error limit
            if client is not None:
                client.quit()
            client = smtplib.SMTP("127.0.0.1", port, local_hostname="bot.forged.example", timeout=60)
            client.ehlo()
            client.mail("x@forged.example")
        for address, bucket in ((cached[n % len(cached)], verified), (baseline, local)):
            start = time.perf_counter()
            client.rcpt(address)
            bucket.append((time.perf_counter() - start) * 1000)
    client.quit()
    def summary(values: list[float]) -> dict:
        values = sorted(values)
        return {"p50": round(statistics.median(values), 3), "p99": round(values[int(len(values) * 0.99) - 1], 3)}
    return {"verified_cached": summary(verified), "local_no_verification": summary(local)}


def plan(unknown: int, valid: int, rng: random.Random) -> list[tuple[str, str]]:
    messages = [(forged_sender(rng), f"{''.join(rng.choices(string.ascii_lowercase + string.digits, k=12))}@{DOMAIN}")
                for _ in range(unknown)]
    messages += [(forged_sender(rng), VALID[n % len(VALID)]) for n in range(valid)]
    rng.shuffle(messages)
    return messages


def epost_bounces(spool: Path) -> int:
    from epost.store.database import QUEUES
    from epost.store.spool import Spool

    count = 0
    reader = Spool(spool, reactor=None, threadpool=None)
    if reader.exists():
        reader.open(create=False)
        try:
            count += sum(1 for queue in QUEUES for envelope in reader.load_many(queue) if envelope.sender == "")
        finally:
            reader.close()
    log = spool / "log" / "senderlog"
    if log.exists():
        count += sum(1 for line in log.read_text().splitlines() if "status=bounced" in line)
    return count


def run_epost(args, messages) -> dict:
    with UserSink(set(VALID)) as sink:
        server = Epost('relay_networks = ["192.0.2.0/24"]', gateway=f"{DOMAIN},127.0.0.1,{sink.port}\n")
        try:
            result = drive(server.port, messages, args.sessions)
            deadline = time.monotonic() + 60
            while len(sink.messages) < result["delivered_valid"] and time.monotonic() < deadline:
                time.sleep(0.1)
            server.wait_until_drained(60)
            result["sink_received"] = len(sink.messages)
            result["bounces"] = epost_bounces(server.spool)
            result.update(probe_figures(sink, messages))
            cached = [r for _, r in messages][:200]
            result["latency_ms"] = rcpt_latency(server.port, cached, "sink@bench.test", args.latency)
            result["probes_after_latency_run"] = sum(sink.probe_rcpts.values())
        finally:
            server.stop()
    return result


def probe_figures(sink: UserSink, messages) -> dict:
    distinct = {r.lower() for _, r in messages}
    probes = dict(sink.probe_rcpts)
    return {
        "distinct_addresses": len(distinct),
        "probe_rcpts": sum(probes.values()),
        "most_probes_one_address": max(probes.values(), default=0),
        "most_probe_sessions_at_once": sink.most_probes_at_once,
        "most_connections_at_once": sink.most_at_once,
    }


# --- Postfix, the reference ----------------------------------------------------

POSTFIX_MAIN = """\
compatibility_level = 3.6
myhostname = verify-peer.test
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 192.0.2.0/24
queue_directory = {root}/queue
data_directory = {root}/data
relay_domains = {domain}
transport_maps = inline:{{ {domain}=smtp:[127.0.0.1]:{sink} }}
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_recipient_restrictions = reject_unverified_recipient
unverified_recipient_reject_code = 550
address_verify_map = btree:{root}/data/verify_cache
address_verify_sender = <>
smtp_tls_security_level = none
smtpd_tls_security_level = none
default_destination_concurrency_limit = 10
biff = no
"""


class PostfixGateway:
    """A Postfix instance of its own (config, queue, port), never the shared postfix-peer."""

    def __init__(self, sink_port: int) -> None:
        if shutil.which("postfix") is None:
            subprocess.run(["bash", str(Path(__file__).resolve().parents[2] / "shared" / "tools" / "postfix-peer"), "status"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            raise RuntimeError("postfix is not installed (run ../shared/tools/postfix-peer start once, as root)")
        self.root = Path(tempfile.mkdtemp(prefix="postfix-verify-", dir=bench_base()))
        self.root.chmod(0o755)  # Postfix's own user reaches data/ through it
        self.config = self.root / "etc"
        self.config.mkdir()
        (self.root / "queue").mkdir()
        (self.root / "data").mkdir()
        subprocess.run(["chown", "postfix", str(self.root / "data")], check=True)
        self.port = free_port()
        (self.config / "main.cf").write_text(POSTFIX_MAIN.format(root=self.root, domain=DOMAIN, sink=sink_port))
        shutil.copy("/etc/postfix/master.cf.proto", self.config / "master.cf")
        self.postconf("-M#", "smtp/inet")
        self.postconf("-M", f"127.0.0.1:{self.port}/inet=127.0.0.1:{self.port} inet n - n - - smtpd")
        self.postconf("-F", "*/*/chroot = n")
        # `postfix start` fails here without saying why (no syslog; its master -w
        # wait mode gives up), while the same master runs in the foreground.
        self.master = subprocess.Popen(["postfix", "-c", str(self.config), "start-fg"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port)

    def postconf(self, *args: str) -> None:
        subprocess.run(["postconf", "-c", str(self.config), *args], check=True)

    def queue(self) -> list[dict]:
        out = subprocess.run(["postqueue", "-c", str(self.config), "-j"], capture_output=True, text=True).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def stop(self) -> None:
        subprocess.run(["postfix", "-c", str(self.config), "stop"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            self.master.wait(30)
        except subprocess.TimeoutExpired:
            self.master.kill()
        shutil.rmtree(self.root, ignore_errors=True)


def run_postfix(args, messages) -> dict:
    with UserSink(set(VALID)) as sink:
        server = PostfixGateway(sink.port)
        try:
            result = drive(server.port, messages, args.sessions)
            deadline = time.monotonic() + 120
            while len(sink.messages) < result["delivered_valid"] and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(2)
            queue = server.queue()
            result["sink_received"] = len(sink.messages)
            result["bounces"] = sum(1 for m in queue if m.get("sender") in ("", "MAILER-DAEMON"))
            result.update(probe_figures(sink, messages))
            cached = [r for _, r in messages][:200]
            result["latency_ms"] = rcpt_latency(server.port, cached, VALID[0], args.latency)
        finally:
            server.stop()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--unknown", type=int, default=1000)
    parser.add_argument("--valid", type=int, default=100)
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--latency", type=int, default=2000, help="RCPTs of each kind in the warm-cache latency run")
    parser.add_argument("--postfix", action="store_true", help="run the same against Postfix with reject_unverified_recipient")
    parser.add_argument("--no-epost", action="store_true", help="only the Postfix side")
    parser.add_argument("--seed", type=int, default=13)
    args = parser.parse_args()
    messages = plan(args.unknown, args.valid, random.Random(args.seed))
    if not args.no_epost:
        print("epost:  ", json.dumps(run_epost(args, messages)), flush=True)
    if args.postfix:
        print("postfix:", json.dumps(run_postfix(args, messages)), flush=True)


if __name__ == "__main__":
    main()
