"""`twistd epost` command line (SPEC §1) -> Config -> the service.

Options only collects strings; every check happens in epost.config.load_config
so a bad flag and a bad file value fail the same way: one line, exit 1.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from twisted.python import usage

from epost.config import FLAGS, Config, ConfigError, load_config

_REPEATABLE = ("relay", "submission", "smtps", "admin", "local_domain", "relay_network", "dns_server")


class Options(usage.Options):
    """Every flag of SPEC §1; defaults are None/[]/0 meaning "not given"."""

    synopsis = "[options]"
    longdesc = "epost mail transfer agent. Each flag overrides the config file."

    optFlags = [
        ["forward-all", None,
         "Forward all received mail to the SMTP gateway, skipping the local-domain check "
         "(default: off, or [routing] forward_all_to_gateway)."],
        ["retry-fixed", None,
         "Keep the retry interval fixed instead of growing (default: off, or [retry] fixed_interval)."],
    ]

    optParameters = [
        ["config", None, None, "TOML config file (default: none, built-in defaults)."],
        ["hostname", None, None,
         "Name used in the greeting, EHLO, Received: and bounces (default: the machine's FQDN)."],
        ["spool", None, None, "Spool root folder (default: ./var/spool, or [server] spool)."],
        ["gateway-table", None, None,
         "gateway.dat routing table (default: [routing] gateway_table, etc/gateway.dat)."],
        ["smtp-gateway", None, None, "The SMTP gateway (smarthost) as HOST[:PORT] (default: none)."],
        ["retry-interval", None, None, "First retry interval in SECONDS (default: 120)."],
        ["retry-count-5xx", None, None, "Retries after a 5xx reply before bouncing (default: 9)."],
        ["retry-period-4xx", None, None,
         "How long 4xx replies are retried, a DURATION: seconds or 30s, 15m, 8h, 2d (default: 8h)."],
        ["retry-period-noanswer", None, None,
         "How long no-answer failures are retried, a DURATION (default: 24h)."],
        ["connect-timeout", None, None, "Outbound TCP connect timeout in SECONDS (default: 30)."],
        ["greeting-timeout", None, None, "Outbound wait for the 220 greeting in SECONDS (default: 300)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        for name in _REPEATABLE:
            self[name] = []

    def opt_relay(self, endpoint: str) -> None:
        """SMTP relay listener, a Twisted server endpoint string; repeatable (default: tcp:25)."""
        self["relay"].append(endpoint)

    def opt_submission(self, endpoint: str) -> None:
        """Submission listener (AUTH required), an endpoint string; repeatable (default: tcp:587)."""
        self["submission"].append(endpoint)

    def opt_smtps(self, endpoint: str) -> None:
        """Implicit-TLS submission listener, an endpoint string; repeatable (default: none)."""
        self["smtps"].append(endpoint)

    def opt_admin(self, endpoint: str) -> None:
        """Admin web UI + metrics listener, an endpoint string; repeatable (default: none)."""
        self["admin"].append(endpoint)

    def opt_local_domain(self, domain: str) -> None:
        """A local domain; repeatable, replaces the file's list (default: none)."""
        self["local_domain"].append(domain)

    def opt_relay_network(self, cidr: str) -> None:
        """CIDR of clients allowed to relay anywhere; repeatable, replaces the default
        (default: 127.0.0.0/8 and ::1/128)."""
        self["relay_network"].append(cidr)

    def opt_dns_server(self, server: str) -> None:
        """Resolver IP[:PORT] used for MX/A lookups; repeatable (default: system resolver)."""
        self["dns_server"].append(server)


def config_from_options(options: usage.Options | dict[str, Any]) -> Config:
    """Config from parsed Options; raises ConfigError on any bad value."""
    flags = {name: options.get(name.replace("_", "-"), options.get(name)) for name in FLAGS}
    path = options.get("config")
    return load_config(Path(path) if path else None, flags)


def makeService(options: usage.Options):  # noqa: N802 - twistd's IServiceMaker hook
    """Build the epost service; a config, table, TLS or spool problem (a
    queue store that cannot be opened, or another daemon holding the
    spool's lock) ends
    twistd with one line on stderr and exit status 1, never a traceback."""
    from epost.store.lock import SpoolBusy
    from epost.routing.tables import TableError
    from epost.service import make_service
    from epost.tls import TLSConfigError
    from epost.delivery.signing import DkimKeyError
    from epost.store.database import StoreUnavailable

    try:
        return make_service(config_from_options(options))
    except (ConfigError, TableError, TLSConfigError, SpoolBusy, DkimKeyError, StoreUnavailable) as e:
        sys.stderr.write(f"epost: {e}\n")
    except OSError as e:
        sys.stderr.write(f"epost: {e.filename}: {e.strerror}\n" if e.filename else f"epost: {e.strerror or e}\n")
    raise SystemExit(1)
