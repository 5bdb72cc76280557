"""The event loop that the service manager and the TCP gateway run on.

uvloop (libuv, in C) where it is installed, which it is with speedysvc on Linux:
its wake-up and dispatch cost several times less than asyncio's own loop, and a
small TCP call crosses the gateway's loop twice.  ``SPEEDYSVC_EVENT_LOOP=asyncio``
chooses asyncio's own loop instead (to rule the loop out when debugging).
"""
from __future__ import annotations

import asyncio
import os

LOOP_ENV = "SPEEDYSVC_EVENT_LOOP"


def choice() -> str:
    """The loop asked for: 'uvloop' (the default) or 'asyncio'; ValueError for anything else."""
    value = os.environ.get(LOOP_ENV) or "uvloop"
    if value not in ("uvloop", "asyncio"):
        raise ValueError(f"{LOOP_ENV} must be 'uvloop' or 'asyncio', not {value!r}")
    return value


def run(main):
    """Run the coroutine ``main`` to completion on a new loop, like ``asyncio.run``."""
    if choice() == "uvloop":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(main)
    return asyncio.run(main)
