"""Ten hostile peers at once against the real daemon: the courier's memory stays bounded (issue 18, finding 5).

Each peer streams `220-` continuation lines of 1,000 bytes and never ends its
reply. On the code before the reply caps the courier kept every line and grew
by hundreds of MB a second; now each attempt ends after MAX_REPLY_LINES lines
and the courier stays within a few MB of where it started.

    .venv/bin/python -m pytest -q -p no:cacheprovider tests/stress/test_hostile_peers_stress.py -s
prints the figures (baseline, peak, after, connections); STRESS=1 runs it 45 s.
"""

from __future__ import annotations

import time
from pathlib import Path

from stress_support import scale
from e2e_support import children, queued, submit, wait_for
from epost.logs import parse_senderlog_line
from sinks import HostileSink

PEERS = 10
SENDER = "x@example.org"
MB = 1024  # kB


def courier_pid(daemon_pid: int) -> int | None:
    """The daemon's courier process (`python -m epost.delivery.courier_process`)."""
    return next((pid for pid, command in children(daemon_pid).items() if "epost.delivery.courier_process" in command), None)


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def test_ten_hostile_peers_at_once_leave_the_courier_near_its_baseline(daemon, tmp_path):
    duration = scale(4, 45)  # seconds of hostile attempts
    with HostileSink("greeting", hold=0.3) as hostile:
        gateway = tmp_path / "gateway.dat"
        gateway.write_text(f"*.sink.test,127.0.0.1,{hostile.port}\n")
        d = daemon(toml=f'gateway_table = "{gateway}"\n\n[retry]\ninterval = 1\nfixed_interval = true\n')
        pid = wait_for(lambda: courier_pid(d.pid), message="the courier process")
        time.sleep(0.5)
        baseline = rss_kb(pid)
        recipients = [f"bob@d{i}.sink.test" for i in range(PEERS)]
        queue_id = submit(d.relay_port, SENDER, recipients, b"Subject: hostile\r\n\r\nhello\r\n")
        peak, end = baseline, time.monotonic() + duration
        while time.monotonic() < end:
            peak = max(peak, rss_kb(pid))
            if peak > baseline + 50 * MB:
                break  # failing: stop feeding it before it eats the machine
            time.sleep(0.05)
        connections, at_once = hostile.connections, hostile.most_at_once
    time.sleep(1)
    after = rss_kb(pid)
    print(f"\ncourier RSS: baseline {baseline / MB:.1f} MB, peak {peak / MB:.1f} MB, "
          f"after {after / MB:.1f} MB; {connections} hostile connections in {duration} s, {at_once} at once")
    assert connections >= 2 * PEERS and at_once >= PEERS // 2  # attempts end and come again
    assert peak < baseline + 50 * MB, (baseline, peak)
    assert after < baseline + 10 * MB, (baseline, after)
    # Nothing bounced, nothing lost: every recipient waits in deferred/ for a retry.
    assert queue_id in queued(d.spool, "deferred")
    lines = [parse_senderlog_line(line) for line in (d.spool / "log" / "senderlog").read_text().splitlines()]
    assert {line["recipient"] for line in lines} == set(recipients)
    assert {line["status"] for line in lines} == {"deferred"}
    assert not (d.spool / "log" / "faillog").exists()
