"""Group commit: one transaction for every item that arrived while the previous one was on disk."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure

T = TypeVar("T")


class GroupCommit(Generic[T]):
    """Feeds `run_batch` (blocking, in the thread pool) one batch at a time.

    Nothing waits on a timer: an item arriving while no batch is running goes
    at once, alone; the ones arriving during that batch go together in the
    next. So a quiet queue pays no latency and a busy one pays one lock and
    one commit for many items. `run_batch` returns one result per item: an
    exception fails that item's Deferred, anything else is its result.
    """

    def __init__(self, reactor: Any, threadpool: Any, run_batch: Callable[[list[T]], list[Any]]) -> None:
        self._reactor = reactor
        self._threadpool = threadpool
        self._run_batch = run_batch
        self._waiting: list[tuple[T, Deferred[Any]]] = []
        self._running = False

    def submit(self, item: T) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self._waiting.append((item, d))
        self._start()
        return d

    def _start(self) -> None:
        if self._running or not self._waiting:
            return
        batch, self._waiting = self._waiting, []
        self._running = True
        done = deferToThreadPool(self._reactor, self._threadpool, self._run_batch, [item for item, _ in batch])
        done.addBoth(self._done, batch)

    def _done(self, results: list[Any] | Failure, batch: list[tuple[T, Deferred[Any]]]) -> None:
        self._running = False
        self._start()
        for i, (_, d) in enumerate(batch):
            outcome = results if isinstance(results, Failure) else results[i]
            if isinstance(outcome, (BaseException, Failure)):
                d.errback(outcome)
            else:
                d.callback(outcome)
