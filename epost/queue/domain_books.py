"""The retry books of destination domains: what Domain.mri says (SPEC §4).

The delivery manager tells it about each attempt and about messages that
start or stop waiting for a domain; it keeps one DomainState per domain
with mail waiting and writes it, in the thread pool, serialised per domain,
whenever it changes. The file goes when nothing waits any more.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from epost.delivery.courier import Attempt
from epost.queue.domain_state import DomainState, DomainStateStore
from epost.queue.outcomes import Applied
from epost.store.database import DISK_FULL_ERRNOS

log = Logger()


class DomainBooks:
    retry_after = 60.0  # seconds before a Domain.mri that met a full disk is written again

    def __init__(self, store: DomainStateStore, reactor: Any, pool: Any) -> None:
        self.store = store
        self.reactor = reactor
        self.pool = pool
        self._states: dict[str, DomainState] = {}
        self._waiting: dict[str, set[str]] = {}  # destination -> IDs with a retry scheduled
        self._locks: dict[str, defer.DeferredLock] = {}
        self._retrying: set[str] = set()  # a save failed on a full disk: another is due
        # Receiver-aware delivery's extra Domain.mri keys of a destination (issue 14).
        self.extra_fields: Callable[[str], dict[str, str]] | None = None

    def read(self) -> None:
        """Start from the files a previous run left (blocking, at start-up: a few small files)."""
        for domain in self.store.domains():
            try:
                state = self.store.read(domain)
            except ValueError as error:
                log.error("{error}; starting that domain afresh", error=error)
                continue
            if state is not None:
                self._states[domain] = state

    def waiting(self, destination: str, queue_id: str) -> None:
        """A message waits for `destination` (counted in Messages:); call `save_all` or `save` after."""
        self._waiting.setdefault(destination, set()).add(queue_id)

    def not_waiting(self, destination: str, queue_id: str, save: bool = True) -> None:
        waiting = self._waiting.get(destination)
        if waiting is not None and queue_id in waiting:
            waiting.discard(queue_id)
            if save:
                self.save(destination)

    def attempted(
        self, destination: str, queue_id: str, applied: Applied, attempt: Attempt, now: float, suspended: bool,
        throttled: frozenset[str] = frozenset(),
    ) -> None:
        """Book one attempt (or a suspension: no connection, only the message count changes).
        Recipients in `throttled` met a throttle: not a failure, E-Post's keys stay as they were."""
        waiting = self._waiting.setdefault(destination, set())
        had_file = bool(waiting) or destination in self._states
        if any(r.status == "deferred" for r in applied.results):
            waiting.add(queue_id)
        else:
            waiting.discard(queue_id)
        state = self._states.get(destination)
        failures = [r for r in applied.results if r.status != "sent" and r.address not in throttled]
        if suspended:
            pass
        elif failures:
            worst = failures[0].outcome
            previous = state if state is not None and state.try_number else None
            state = DomainState(
                domain=destination,
                last_tried=int(now),
                try_number=(previous.try_number if previous else 0) + 1,
                err_code=worst.code or 0,
                err_text=worst.text,
                next_try=int(applied.verdict[1]) if isinstance(applied.verdict, tuple) else int(now),
                first_failure=previous.first_failure if previous else int(now),
                last_host=attempt.host or "",
            )
        elif state is not None and not (throttled and len(throttled) >= len(applied.results)):
            # A success ends the domain's failure episode; others may still wait.
            state = replace(state, last_tried=int(now), try_number=0, err_code=0, err_text="", last_host=attempt.host or "")
        if state is not None:
            self._states[destination] = state
        if waiting or had_file:  # a healthy domain never had a file: nothing to write or remove
            self.save(destination)
        elif not waiting:
            self._waiting.pop(destination, None)

    def save_all(self) -> None:
        """Bring every file in line with what waits (after loading the queue at start-up)."""
        for destination in set(self._states) | set(self._waiting):
            self.save(destination)

    def save(self, destination: str) -> None:
        waiting = self._waiting.get(destination)
        lock = self._locks.setdefault(destination, defer.DeferredLock())
        if waiting:
            state = self._states.get(destination) or DomainState(destination)
            extra = tuple(self.extra_fields(destination).items()) if self.extra_fields is not None else state.extra
            self._states[destination] = state = replace(state, messages=len(waiting), extra=extra)
            work = (self.store.write, state)
        else:
            self._waiting.pop(destination, None)
            self._states.pop(destination, None)
            work = (self.store.remove, destination)
        d = lock.run(deferToThreadPool, self.reactor, self.pool, *work)
        d.addErrback(self._save_failed, destination)
        d.addBoth(lambda _: self._forget_lock(destination, lock))

    def _save_failed(self, failure, destination: str) -> None:
        """A full disk is one warning, and the file is brought in line again later
        (the state is in memory); anything else is a bug, with its traceback."""
        if not (failure.check(OSError) and failure.value.errno in DISK_FULL_ERRNOS):
            log.failure("{domain}: cannot update Domain.mri", failure, domain=destination)
            return
        log.warn("{domain}: cannot update Domain.mri ({error}); trying again in {retry:.0f} s",
                 domain=destination, error=failure.value, retry=self.retry_after)
        if destination not in self._retrying:
            self._retrying.add(destination)
            self.reactor.callLater(self.retry_after, self._save_again, destination)

    def _save_again(self, destination: str) -> None:
        self._retrying.discard(destination)
        self.save(destination)

    def _forget_lock(self, destination: str, lock: defer.DeferredLock) -> None:
        if not lock.locked and destination not in self._states and self._locks.get(destination) is lock:
            del self._locks[destination]

    def state(self, destination: str) -> DomainState | None:
        return self._states.get(destination)

    def states(self) -> list[DomainState]:
        return [self._states[d] for d in sorted(self._states)]
