"""How a client waits for a service that is not up yet (``connect(..., wait=)``).

A call to a service that nothing serves yet (its manager is not running, or still
starting), that is starting or restarting, or whose manager is gone, waits for it
to serve instead of failing at once: up to the call's timeout, or, for a call
without one, up to ``DEFAULT_WAIT`` seconds.  ``wait=`` sets the bound per client
(0: fail at once, as before).  A service stopped on purpose or failed is not
waited for: the call fails at once with the reason.  The transports do the
looking; this module holds the bound and the pace, which grows from ``FIRST_POLL``
to ``LAST_POLL`` so that a long wait costs next to nothing.  Nothing here runs on a
call that finds its service up.
"""
from __future__ import annotations

import math
import time

from .errors import ServiceNotUp

DEFAULT_WAIT = 10.0    # seconds, for a call without a timeout
FIRST_POLL = 0.005     # the first pause between two looks, doubled up to...
LAST_POLL = 0.1        # ...this
MIN_ATTEMPT = 0.01     # a call that has less of its timeout left once its service is up is not made
UP_TOO_LATE = "it came up too late for the call's timeout"


def check_wait(wait):
    """``wait`` as the transports take it: None (the call's timeout, else DEFAULT_WAIT) or seconds >= 0."""
    if wait is None:
        return None
    if not isinstance(wait, (int, float)) or isinstance(wait, bool) or math.isnan(wait) or not 0 <= wait <= 86400:
        raise ValueError(f"wait must be None or a number of seconds from 0 to 86400, got {wait!r}")
    return float(wait)


def wait_bound(wait: float | None, timeout: float | None) -> float:
    """How long one call may wait for its service: its timeout (DEFAULT_WAIT without one),
    and no longer than the client's ``wait`` when that is set."""
    bound = DEFAULT_WAIT if timeout is None else timeout
    return bound if wait is None else min(wait, bound)


class Waiting:
    """One call's wait for its service: ``pause(reason)`` before each new look."""

    __slots__ = ("service", "timeout", "bound", "start", "interval")

    def __init__(self, service: str, wait: float | None, timeout: float | None):
        self.service, self.timeout = service, timeout
        self.bound = wait_bound(wait, timeout)
        self.start = time.monotonic()
        self.interval = FIRST_POLL

    def pause(self, reason: str) -> float:
        """How long to sleep before looking again; raises ServiceNotUp once the bound is over."""
        left = self.bound - (time.monotonic() - self.start)
        if left <= 0:
            raise self.expired(reason)
        pause, self.interval = min(self.interval, left), min(self.interval * 2, LAST_POLL)
        return pause

    def remaining(self, reason: str) -> float | None:
        """What is left of the call's timeout once it waited (None: no timeout), for the call
        now that the service is up; ServiceNotUp if too little is left to make it (it came up
        too late: a call with a few microseconds would only time out, saying less)."""
        if self.timeout is None:
            return None
        left = self.timeout - (time.monotonic() - self.start)
        if left < MIN_ATTEMPT:
            raise self.expired(reason)
        return left

    def expired(self, reason: str) -> ServiceNotUp:
        error = ServiceNotUp(f"service {self.service!r} did not come up within {self.bound:g} s: {reason}")
        error.waited = True   # (a caller further out does not wait again)
        return error
