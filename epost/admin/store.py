"""The queue store as the `epost` command reads it while the daemon may run."""

from __future__ import annotations

from epost.config import Config
from epost.store.spool import Spool


def open_store(config: Config) -> Spool | None:
    """The configured spool, its queue store opened for the command (never created);
    None when the spool has no queue store yet (each command says what that means to it:
    an empty queue, a message not queued). Raises StoreUnavailable or OSError when it
    cannot be opened."""
    spool = Spool(config.server.spool, reactor=None, threadpool=None)
    if not spool.exists():
        return None
    spool.open(create=False)
    return spool
