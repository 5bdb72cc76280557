"""Large compressed calls: inflated and posted in a thread, within a budget of memory.

A compressed call that states 1 MiB or more, or more than 64 KiB and over
``INFLATE_RATIO`` times the bytes it came in, is not inflated on the event loop
(every other client would wait for it): a thread inflates it (zlib a slice at a
time, so it never holds the interpreter lock for long) and posts it on a channel
reserved beforehand, while the sizes such calls state add up to at most the
budget (one is always allowed).  The rest wait for room, their connections not
read.  The budget is freed as soon as each call is posted.
"""
from __future__ import annotations

from . import compression
from .compression import LARGE_PAYLOAD
from .framing import SMALL_FRAME

INFLATE_RATIO = 32        # a call above SMALL_FRAME that grows more than this is inflated in a thread too


class InflateBudget:
    def __init__(self, budget: int):
        self.budget = budget
        self.inflating = 0   # bytes stated by the calls being inflated now

    @staticmethod
    def needs_thread(size: int, arrived: int) -> bool:
        """Whether a call stating ``size`` bytes, which came in ``arrived``, is inflated in a thread."""
        return size >= LARGE_PAYLOAD or size > SMALL_FRAME and size > INFLATE_RATIO * arrived

    def fits(self, size: int) -> bool:
        return not self.inflating or self.inflating + size <= self.budget

    def take(self, size: int) -> None:
        self.inflating += size

    def free(self, size: int) -> None:
        self.inflating -= size


def inflate_post_and_wait(shm, channel, frame, algo: str, limit: int, timeout, posted, codec):
    """In a thread: inflate ``frame``'s payload, post it on ``channel`` (reserved beforehand)
    and wait for its answer: ``ShmTransport.begin``'s ``(done, result)``, the answer waiting
    in the channel when not done.  ``posted()`` is called once the call is in shared memory,
    or failed to get there."""
    try:
        try:
            payload = compression.decompress(algo, frame.payload, limit, lazy=True)
        except BaseException:
            shm.unreserve(channel)
            raise
        done, result = shm.begin(frame.name, payload, frame.arg, codec, timeout, channel)
        del payload
    finally:
        posted()
    if not done:
        result.wait()
    return done, result
