"""Listen backlog for every listener: the kernel's limit unless the endpoint string sets one.

Twisted's endpoints listen with a backlog of 50, so a burst of connections
(1,000 at once in the attack report) overflows the accept queue and the
kernel drops SYNs: clients wait seconds for a retransmission or give up.
"""

from __future__ import annotations

import re
from pathlib import Path

FALLBACK_BACKLOG = 1024
# Where each endpoint type's backlog sits among its positional arguments
# (twisted.internet.endpoints: _parseTCP, _TCP6ServerParser, _parseSSL, _parseUNIX).
_POSITIONAL_SLOT = {"tcp": 3, "tcp6": 2, "ssl": 6, "unix": 3}
_UNESCAPED_COLON = re.compile(r"(?<!\\):")


def default_backlog(somaxconn: Path = Path("/proc/sys/net/core/somaxconn")) -> int:
    """The kernel's cap on any listen backlog (net.core.somaxconn), else 1024."""
    try:
        value = int(somaxconn.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return FALLBACK_BACKLOG
    return value if value > 0 else FALLBACK_BACKLOG


def with_backlog(description: str, backlog: int) -> str:
    """`tcp:25` -> `tcp:25:backlog=N`; a string that sets a backlog (by keyword
    or position) or whose type has none (systemd:, plugins) is returned as is.
    A `haproxy:` prefix is looked through."""
    prefix = ""
    while description.startswith("haproxy:"):
        prefix += "haproxy:"
        description = description[len("haproxy:") :]
    kind, _, rest = description.partition(":")
    slot = _POSITIONAL_SLOT.get(kind)
    if slot is None or not rest:
        return prefix + description
    arguments = _UNESCAPED_COLON.split(rest)
    if any(argument.startswith("backlog=") for argument in arguments):
        return prefix + description
    if sum(1 for argument in arguments if "=" not in argument) >= slot:
        return prefix + description
    return f"{prefix}{description}:backlog={backlog}"
