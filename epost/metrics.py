"""Prometheus metrics (SPEC §8), served at /metrics on the --admin listener.

Module-level metrics in epost's own registry, the prometheus-client idiom:
the code that sees an event counts it in one line. Queue sizes and open
connections are read when scraped, so they can never drift from the truth.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

if TYPE_CHECKING:
    from epost.store.spool import Spool

REGISTRY = CollectorRegistry(auto_describe=True)

received = Counter(
    "epost_messages_received", "Messages accepted (250 after DATA)", ["listener", "tls"], registry=REGISTRY
)
deliveries = Counter(
    "epost_deliveries",
    "Recipient delivery attempts by outcome (sent, deferred, bounced) and destination domain",
    ["status", "destination"],
    registry=REGISTRY,
)
local_deliveries = Counter("epost_local_deliveries", "Messages whose local recipients were all delivered", registry=REGISTRY)
outbound_sessions = Counter(
    "epost_outbound_sessions", "Outbound SMTP attempts that reached a server, by TLS use", ["tls"], registry=REGISTRY
)
delivery_latency = Histogram(
    "epost_delivery_latency_seconds",
    "Arrival to successful relay, per recipient",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 24 * 3600),
    registry=REGISTRY,
)
auth_failures = Counter("epost_auth_failures", "Failed SMTP AUTH attempts and Mail Control logins", registry=REGISTRY)
dnsbl_lookups = Counter(
    "epost_dnsbl_lookups",
    "DNSBL queries of the relay port's screening by zone and result (listed, clean, error); cached answers not counted",
    ["zone", "result"],
    registry=REGISTRY,
)
table_reloads = Counter("epost_table_reloads", "Table reloads by table file and result", ["table", "result"], registry=REGISTRY)
connections_refused = Counter(
    "epost_smtp_connections_refused",
    "Inbound SMTP connections refused before any session: 421 at once (too_many_connections, per_client_limit) or closed without a greeting (proxy_untrusted, proxy_bad_header, proxy_timeout)",
    ["listener", "reason"],
    registry=REGISTRY,
)
sessions_ended = Counter(
    "epost_smtp_sessions_ended",
    "Inbound SMTP sessions the server ended, by listener and reason (timeouts, deadline, errors, stuck output, AUTH cutoff)",
    ["listener", "reason"],
    registry=REGISTRY,
)


class LiveState:
    """Collects what is measured at scrape time: messages per queue, open SMTP connections."""

    def __init__(self, spool: Spool, open_connections: Callable[[], int]) -> None:
        self.spool = spool  # epost.store.spool.Spool: its queue store counts the messages
        self.open_connections = open_connections

    def describe(self) -> list[Any]:
        return []

    def collect(self):
        queues = GaugeMetricFamily("epost_queue_messages", "Messages in each queue", labels=["queue"])
        for queue, count in self.spool.counts().items():
            queues.add_metric([queue], count)
        yield queues
        yield GaugeMetricFamily("epost_smtp_connections_open", "Inbound SMTP connections open now", value=self.open_connections())


_live: LiveState | None = None


def watch(spool: Spool, open_connections: Callable[[], int]) -> None:
    """Point the scrape-time gauges at this daemon's spool and connection count (replacing any earlier one)."""
    global _live
    if _live is not None:
        REGISTRY.unregister(_live)
    _live = LiveState(spool, open_connections)
    REGISTRY.register(_live)


def metrics_resource():
    """The twisted.web resource for /metrics."""
    from prometheus_client.twisted import MetricsResource

    return MetricsResource(registry=REGISTRY)


# Recipient verification (SPEC §3.5, docs/routing.md "Recipient verification").
verify_verdicts = Counter(
    "epost_verify_verdicts",
    "RCPT answers decided by recipient verification, by verdict (accepted, refused, temporary) and source (cache, probe, table)",
    ["verdict", "source"],
    registry=REGISTRY,
)
verify_cache = Counter("epost_verify_cache_lookups", "Verification cache lookups by result (hit, miss)", ["result"], registry=REGISTRY)
verify_probe_seconds = Histogram(
    "epost_verify_probe_seconds",
    "Time of one verification probe session, start to verdict",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16),
    registry=REGISTRY,
)
