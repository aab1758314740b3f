"""One log line and one metric per connection-level refusal or timeout, flood-proof.

An attack shows in the log (who, why) without filling the disk: each reason
gets at most `burst` lines per `interval` seconds; the rest are counted and
summed up in one "suppressed K similar lines" line when the interval ends.
Time comes from the reactor (`IReactorTime`), so a `task.Clock` drives it in
tests. Metrics are never rate-limited.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from epost import metrics

# Reasons, as they appear in the log and in the metrics' `reason` label.
REFUSED_TOO_MANY = "too_many_connections"  # all listeners together
REFUSED_PER_CLIENT = "per_client_limit"
COMMAND_TIMEOUT = "command_timeout"  # no complete command line in time
DEADLINE = "deadline"  # no MAIL within session_deadline
DATA_TIMEOUT = "data_timeout"
TOO_MANY_ERRORS = "too_many_errors"
OUTPUT_STUCK = "output_stuck"  # the client does not read its replies
AUTH_CUTOFF = "auth_cutoff"
REFUSALS = (REFUSED_TOO_MANY, REFUSED_PER_CLIENT)


class SessionEvents:
    """Where SMTP sessions report why a connection was refused or ended.

    Shared by every listener of a daemon, so the rate limit is per reason,
    not per listener."""

    def __init__(self, clock: IReactorTime, burst: int = 10, interval: float = 60.0, logger: Logger | None = None):
        self.clock = clock
        self.burst = burst
        self.interval = interval
        self.log = logger or Logger(namespace="epost.smtp")
        self._window: dict[str, tuple[float, int]] = {}  # reason -> (window start, lines logged)
        self._suppressed: dict[str, int] = {}
        self._summaries: dict[str, object] = {}  # reason -> pending DelayedCall

    def refused(self, listener: str, client: str, port: int, reason: str, reply: str) -> None:
        """A connection answered with a 421 greeting and closed (connection limits)."""
        metrics.connections_refused.labels(listener=listener, reason=reason).inc()
        self._line(reason, "refused", listener, client, port, reason, reply, "")

    def ended(self, listener: str, client: str, port: int, reason: str, reply: str, after: str = "") -> None:
        """A session ended by the server: a timeout, a deadline, a limit, stuck output."""
        metrics.sessions_ended.labels(listener=listener, reason=reason).inc()
        self._line(reason, "ended", listener, client, port, reason, reply, after)

    def _line(self, key, what, listener, client, port, reason, reply, after) -> None:
        if not self._admit(key):
            return
        self.log.info(
            "smtp {what}: client=[{client}]:{port} listener={listener} reason={reason}{after} reply=\"{reply}\"",
            what=what,
            client=client,
            port=port,
            listener=listener,
            reason=reason,
            after=f" after={after}" if after else "",
            reply=reply.replace('"', "'"),
        )

    def _admit(self, reason: str) -> bool:
        now = self.clock.seconds()
        start, logged = self._window.get(reason, (now, 0))
        if now - start >= self.interval:
            start, logged = now, 0
        if logged < self.burst:
            self._window[reason] = (start, logged + 1)
            return True
        self._window[reason] = (start, logged)
        self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
        if reason not in self._summaries:
            self._summaries[reason] = self.clock.callLater(start + self.interval - now, self._summarize, reason)
        return False

    def _summarize(self, reason: str) -> None:
        del self._summaries[reason]
        count = self._suppressed.pop(reason, 0)
        if count:
            self.log.info(
                "smtp: suppressed {count} similar lines (reason={reason}) in the last {interval:g} s",
                count=count,
                reason=reason,
                interval=self.interval,
            )

    def flush(self) -> None:
        """Say what is still suppressed now (at shutdown) and drop the pending timers."""
        for reason, call in list(self._summaries.items()):
            call.cancel()
            self._summarize(reason)
