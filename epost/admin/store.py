"""The queue store as the `epost` command reads it while the daemon may run."""

from __future__ import annotations

from epost.config import Config
from epost.store.spool import Spool


def open_store(config: Config) -> Spool:
    """The configured spool, its queue store opened for the command (never created):
    a spool with no queue store yet is returned unopened (`exists()` is false) and
    reads as an empty queue. Raises StoreUnavailable or OSError when it cannot be opened."""
    spool = Spool(config.server.spool, reactor=None, threadpool=None)
    if spool.exists():
        spool.open(create=False)
    return spool
