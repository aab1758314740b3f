"""Fakes shared by the tests: a Clock that is also enough of a reactor, and a
thread pool that runs work at once, so Clock-driven tests stay synchronous."""

from twisted.internet.task import Clock
from twisted.python.failure import Failure


class SynchronousThreadPool:
    """Runs 'threaded' work at once, so a Clock can drive everything."""

    def callInThreadWithCallback(self, on_result, f, *args, **kwargs):
        try:
            result = f(*args, **kwargs)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)


class ClockReactor(Clock):
    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)
