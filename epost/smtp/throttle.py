"""AUTH failure throttling: slow a guessing client down, then shut it out.

Each failed AUTH from an IP within `window` seconds makes the next `535`
reply wait one second more (capped at `max_delay`); the `cutoff`-th failure
gets `421 4.7.0` and the connection is closed, and every AUTH from that IP
gets the same until the window has passed. Time comes from an injected
IReactorTime, so tests are exact.
"""

from __future__ import annotations

from collections import defaultdict, deque

from twisted.internet.interfaces import IReactorTime

from epost import metrics


class AuthThrottle:
    def __init__(self, clock: IReactorTime, cutoff: int = 5, window: float = 300.0, max_delay: float = 5.0):
        self.clock = clock
        self.cutoff = cutoff
        self.window = window
        self.max_delay = max_delay
        self._failures: dict[str, deque[float]] = defaultdict(deque)

    def _recent(self, ip: str) -> deque[float]:
        failures = self._failures[ip]
        now = self.clock.seconds()
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        if not failures:
            del self._failures[ip]
            return deque()
        return failures

    def blocked(self, ip: str) -> bool:
        return len(self._recent(ip)) >= self.cutoff

    def failed(self, ip: str) -> float:
        """Record a failure; the seconds to wait before answering it."""
        metrics.auth_failures.inc()
        failures = self._recent(ip)
        failures.append(self.clock.seconds())
        self._failures[ip] = failures
        return min(float(len(failures)), self.max_delay)
