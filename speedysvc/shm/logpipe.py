"""How a worker's ``logging`` records reach its supervisor: JSON lines on a pipe.

The supervisor (the manager) passes the pipe's write end as ``SPEEDYSVC_LOG_FD``
and the least severe level to record as ``SPEEDYSVC_LOG_LEVEL``; each record is
one line ``{"t": epoch seconds, "l": level, "n": logger, "m": message}``.  The
manager's side is ``speedysvc.manager.logs.ServiceLog.write_json_line``.
"""
from __future__ import annotations

import json
import logging
import os

LOG_FD_ENV = "SPEEDYSVC_LOG_FD"
LOG_LEVEL_ENV = "SPEEDYSVC_LOG_LEVEL"


class _JSONLineHandler(logging.Handler):
    def __init__(self, fd: int):
        super().__init__()
        self.stream = os.fdopen(fd, "w", buffering=1, encoding="utf-8", errors="replace")

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + logging.Formatter().formatException(record.exc_info)
            self.stream.write(json.dumps({"t": record.created, "l": record.levelname, "n": record.name,
                                          "m": message}) + "\n")
        except Exception:  # the manager is gone: nothing left to tell
            pass


_installed = False


def setup_worker_logging() -> None:
    """Send this worker's logging records to the manager, if one listens (once: the pipe's
    descriptor gets one file object)."""
    global _installed
    fd = os.environ.get(LOG_FD_ENV)
    if not fd or _installed:
        return
    _installed = True
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(_JSONLineHandler(int(fd)))
    root.setLevel(os.environ.get(LOG_LEVEL_ENV, "INFO"))
    logging.captureWarnings(True)
