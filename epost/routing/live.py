"""Tables that follow their files: edits apply within seconds, without a restart.

Each file is polled once a second (mtime, size, inode); a changed file is
parsed in a thread, so the reactor never waits, and swapped in whole only if
every line is good. A file with a bad line is not used: the table in force
stays, and the log names `file:line: problem`. SIGHUP re-reads every table.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet import task
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from epost import metrics
from epost.routing.tables import TableError

log = Logger()


def file_stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class LiveTable:
    """The current contents of one table file, loaded by `loader`."""

    def __init__(self, path: Path, loader: Callable[[Path], Any]):
        self.path = Path(path)
        self.loader = loader
        self.stamp = file_stamp(self.path)
        self.current = loader(self.path)  # a bad file at start-up stops the daemon
        self.reloads = 0
        self.failures = 0

    def __call__(self) -> Any:
        return self.current


class TableWatcher(Service):
    def __init__(self, tables: list[LiveTable], reactor, threadpool, interval: float = 1.0, handle_sighup: bool = True):
        self.tables = tables
        self.reactor = reactor
        self.threadpool = threadpool
        self.interval = interval
        self.handle_sighup = handle_sighup
        self._loop: task.LoopingCall | None = None
        self._loading: set[str] = set()

    def startService(self) -> None:
        super().startService()
        self._loop = task.LoopingCall(self.check)
        self._loop.clock = self.reactor
        self._loop.start(self.interval, now=False)
        if self.handle_sighup:
            signal.signal(signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.reload_all))

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def check(self) -> None:
        """Reload every table whose file changed since it was last read."""
        for table in self.tables:
            stamp = file_stamp(table.path)
            if stamp != table.stamp:
                self.reload(table, stamp)

    def reload_all(self):
        log.info("SIGHUP: reloading every table")
        for table in self.tables:
            self.reload(table, file_stamp(table.path))

    def reload(self, table: LiveTable, stamp):
        key = str(table.path)
        if key in self._loading:
            return None
        self._loading.add(key)
        table.stamp = stamp  # a bad file is reported once, and read again when it changes

        def loaded(new):
            table.current = new
            table.reloads += 1
            metrics.table_reloads.labels(table.path.name, "ok").inc()
            log.info("{path}: reloaded", path=table.path)

        def failed(failure):
            failure.trap(TableError, OSError, UnicodeDecodeError)
            table.failures += 1
            metrics.table_reloads.labels(table.path.name, "error").inc()
            log.error("{problem} (the previous table stays in force)", problem=failure.value)

        d = deferToThreadPool(self.reactor, self.threadpool, table.loader, table.path)
        d.addCallbacks(loaded, failed)
        d.addBoth(lambda _: self._loading.discard(key))
        return d
