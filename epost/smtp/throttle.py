"""AUTH failure throttling: slow a guessing client down, then shut it out.

Each failed AUTH from a client within `window` seconds makes the next `535`
reply wait one second more (capped at `max_delay`); the `cutoff`-th failure
gets `421 4.7.0` and the connection is closed, and every AUTH from that
client gets the same until the window has passed. A client is what
`client_key` makes of its IP address. Time comes from an injected
IReactorTime, so tests are exact.

A client's password checks run one at a time (`in_turn`), each failure
counted before the next check starts: a client with many connections cannot
have more guesses in flight than the cutoff allows, and its checks queue
behind each other instead of filling the password-check threads.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict, deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from epost import metrics
from epost.smtp.policy import client_address


def client_key(ip: str) -> str:
    """Who a failed login counts against: loopback as one (any local user can
    pick a source address in 127.0.0.0/8), IPv6 by /64 (one host holds a
    whole /64), IPv4 by address (also when a dual-stack listener shows it as
    ::ffff:a.b.c.d)."""
    address = client_address(ip)
    if address is None:
        return ip
    if address.is_loopback:
        return "loopback"
    if address.version == 6:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


class AuthThrottle:
    def __init__(self, clock: IReactorTime, cutoff: int = 5, window: float = 300.0, max_delay: float = 5.0):
        self.clock = clock
        self.cutoff = cutoff
        self.window = window
        self.max_delay = max_delay
        self._failures: dict[str, deque[float]] = defaultdict(deque)
        self._turns: dict[str, deque[tuple[Callable[[], Any], Deferred]]] = {}  # clients with checks running or waiting

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

    def in_turn(self, ip: str, check: Callable[[], Any]) -> Deferred:
        """Run `check` (which may return a Deferred) once every earlier check of
        this client has finished, with what it recorded; fires with its result."""
        done = Deferred()
        waiting = self._turns.setdefault(ip, deque())
        waiting.append((check, done))
        if len(waiting) == 1:  # no turn of this client's is running: this one starts
            self._take_turns(ip, waiting)
        return done

    def _take_turns(self, ip: str, waiting: deque) -> None:
        """Run the client's checks in order until none waits. A loop, not a chain
        of callbacks: the checks of a client already shut out end at once, and
        hundreds of them must not deepen the stack."""
        while waiting:
            check, done = waiting[0]
            state = {"in_loop": True, "ended": False}

            def ended(result, done=done, state=state):
                state["ended"] = True
                # Answered while still first in line: a check the answer starts
                # for this client queues behind, and does not start a second loop.
                if isinstance(result, Failure):
                    done.errback(result)
                else:
                    done.callback(result)
                waiting.popleft()
                if not state["in_loop"]:
                    self._take_turns(ip, waiting)  # a fresh stack: the check ended later

            maybeDeferred(check).addBoth(ended)
            if not state["ended"]:
                state["in_loop"] = False
                return
        if self._turns.get(ip) is waiting:
            del self._turns[ip]
