"""Service logs as the manager keeps them.

A worker's ``logging`` records reach the manager as JSON lines on a pipe of their
own (``speedysvc.shm.logpipe``); its stdout and stderr are captured line by line
too.  The manager is the only writer of each service's log file, so rotation by
size is safe, and it keeps the latest records in memory for the web interface.
Every line of a log file reads ``time [pid N] LEVEL logger: message``.
"""
from __future__ import annotations

import collections
import json
import logging
import logging.handlers
import os
import time

RECENT = 2000
# The characters of a message that the manager keeps beyond the log file (its ring of recent
# records, the store's index, the live views): a worker can write lines of up to a mebibyte
# (LineSplitter), and 2,000 of those would hold gigabytes; the file keeps every line whole.
RECORD_MAX = 16 * 1024
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class LogRecord(dict):
    """One line of a service's log: t (epoch seconds), pid, level, logger, message."""

    def format(self) -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self["t"])) + f",{int(self['t'] % 1 * 1000):03d}"
        head = f"{stamp} [pid {self['pid']}] {self['level']} {self['logger']}: "
        return head + self["message"].replace("\n", "\n" + " " * 4)


class ServiceLog:
    """A rotating log file, the latest records in memory, and live subscribers."""

    def __init__(self, path: str, max_bytes: int, backups: int):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.path = path
        self.handler = logging.handlers.RotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups,
                                                            encoding="utf-8")
        self.handler.setFormatter(logging.Formatter("%(message)s"))
        self.recent: collections.deque[LogRecord] = collections.deque(maxlen=RECENT)
        self.subscribers: set = set()   # callables taking a LogRecord
        self.seq = 0
        self.index = None   # a callable taking each LogRecord: the store's index (manager.py)

    def write(self, pid: int, level: str, logger: str, message: str, t: float | None = None) -> LogRecord:
        self.seq += 1
        rec = LogRecord(seq=self.seq, t=time.time() if t is None else t, pid=pid,
                        level=level if level in LEVELS else "INFO", logger=logger, message=message)
        self.handler.emit(logging.makeLogRecord({"msg": rec.format(), "levelno": logging.INFO,
                                                 "levelname": "INFO"}))
        if len(message) > RECORD_MAX:
            rec["message"] = (f"{message[:RECORD_MAX]} … [{len(message) - RECORD_MAX} more characters "
                              f"in {os.path.basename(self.path)}]")
        self.recent.append(rec)
        if self.index is not None:
            self.index(rec)
        for notify in list(self.subscribers):
            notify(rec)
        return rec

    def write_json_line(self, pid: int, line: str) -> None:
        try:
            d = json.loads(line)
            t = float(d["t"])
            time.localtime(t)   # in range
            level, logger, message = str(d.get("l", "INFO")), str(d.get("n", "")), str(d.get("m", ""))
        except Exception:   # not a record of ours (or cut by the length limit): keep it as text
            self.write(pid, "INFO", "log", line)
            return
        self.write(pid, level, logger, message, t)

    def tail(self, lines: int = 200, level: str | None = None, text: str | None = None) -> list[LogRecord]:
        out = [r for r in self.recent if matches(r, level, text)]
        return out[-lines:] if lines else out

    def close(self) -> None:
        self.handler.close()


def matches(rec: LogRecord, level: str | None = None, text: str | None = None) -> bool:
    """At least as severe as ``level``, and containing ``text`` (any case)."""
    if level and level.upper() in LEVELS and LEVELS.index(rec["level"]) < LEVELS.index(level.upper()):
        return False
    return not text or text.lower() in rec["message"].lower() or text.lower() in rec["logger"].lower()


class LineSplitter:
    """Bytes read from a pipe in, complete lines out."""

    def __init__(self, limit: int = 1 << 20):
        self.buf = b""
        self.limit = limit

    def feed(self, data: bytes) -> list[str]:
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        if len(self.buf) > self.limit:  # a line without end: cut it
            lines.append(self.buf)
            self.buf = b""
        return [line.decode("utf-8", errors="replace").rstrip("\r") for line in lines]

    def rest(self) -> list[str]:
        rest, self.buf = self.buf, b""
        return [rest.decode("utf-8", errors="replace").rstrip("\r")] if rest else []
