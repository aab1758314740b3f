"""/metrics on the --admin listener, scraped and parsed after a known workload."""

from __future__ import annotations

import smtplib
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from e2e_support import free_port, maildir_messages, wait_for


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_count_a_known_workload(daemon, tmp_path):
    admin = free_port()
    gateway = tmp_path / "gateway.dat"
    gateway.write_text(f"*.dead.test,127.0.0.1,{free_port()}\n")  # refused: deferred
    d = daemon(
        server=f'admin = ["tcp:{admin}:interface=127.0.0.1"]',
        toml=f'gateway_table = "{gateway}"\n[retry]\ninterval = 3600\n',
    )
    with smtplib.SMTP("127.0.0.1", d.relay_port, timeout=10) as client:
        for recipient in ("alice@example.test", "bob@example.test", "x@a.dead.test"):
            assert client.sendmail("carol@example.org", [recipient], b"Subject: m\r\n\r\nhi\r\n") == {}
    wait_for(lambda: maildir_messages(d.spool, "example.test/alice") and maildir_messages(d.spool, "example.test/bob"), 10)

    def settled():
        m = scrape(admin)
        deferred = m.get(("epost_deliveries_total", (("destination", "a.dead.test"), ("status", "deferred"))))
        moved = m[("epost_queue_messages", (("queue", "incoming"),))] == 0
        return m if deferred and moved else None

    m = wait_for(settled, 10, message="the deferral counted")
    assert m[("epost_messages_received_total", (("listener", "relay"), ("tls", "no")))] == 3
    assert m[("epost_local_deliveries_total", ())] == 2
    assert m[("epost_queue_messages", (("queue", "deferred"),))] == 1
    assert m[("epost_queue_messages", (("queue", "incoming"),))] == 0
    assert ("epost_deliveries_total", (("destination", "a.dead.test"), ("status", "sent"))) not in m
    assert m[("epost_delivery_latency_seconds_count", ())] == 0

    with smtplib.SMTP("127.0.0.1", d.relay_port, timeout=10) as client:
        client.ehlo("held.open.example")
        assert scrape(admin)[("epost_smtp_connections_open", ())] == 1

    gateway.write_text("this is not a rule\n")
    wait_for(lambda: scrape(admin).get(("epost_table_reloads_total", (("result", "error"), ("table", "gateway.dat")))) == 1,
             5, message="the failed reload counted")
