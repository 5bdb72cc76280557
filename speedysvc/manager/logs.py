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
import os
import threading
import time

RECENT = 2000
# The characters of a message that the manager keeps beyond the log file (its ring of recent
# records, the store's index, the live views): a worker can write lines of up to a mebibyte
# (LineSplitter), and 2,000 of those would hold gigabytes; the file keeps every line whole.
RECORD_MAX = 16 * 1024
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


_stamp_cache: tuple[int, str] = (-1, "")   # (whole second, its local time as text): records come in bursts


def _stamp(t: float) -> str:
    """``t`` as ``YYYY-mm-dd HH:MM:SS,mmm`` in local time (the text of the second is kept: a
    log writes many records within one)."""
    global _stamp_cache
    second = int(t // 1)
    cached, text = _stamp_cache
    if cached != second:
        text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        _stamp_cache = (second, text)
    return f"{text},{int(t % 1 * 1000):03d}"


class LogRecord(dict):
    """One line of a service's log: t (epoch seconds), pid, level, logger, message."""

    def format(self) -> str:
        head = f"{_stamp(self['t'])} [pid {self['pid']}] {self['level']} {self['logger']}: "
        return head + self["message"].replace("\n", "\n" + " " * 4)


class RotatingFile:
    """A log file rotated by size as ``logging.handlers.RotatingFileHandler`` does it (at
    ``max_bytes``, keeping ``backups`` files ``path.1`` .. ``path.N``, the newest ``.1``; with
    either 0, never), written directly: one ``write`` per record, its size counted here rather
    than asked of the file system for every record, and no ``logging.LogRecord`` made for it.
    The manager writes a record for every line its workers log, so this is on its busiest path."""

    def __init__(self, path: str, max_bytes: int, backups: int):
        self.path, self.max_bytes, self.backups = path, max_bytes, backups
        self._lock = threading.Lock()   # (the loop writes; a thread that logs may too)
        self._file = open(path, "ab", buffering=0)
        self.size = os.fstat(self._file.fileno()).st_size

    def write(self, text: str) -> None:
        data = text.encode("utf-8", "backslashreplace")
        with self._lock:
            if self._file is None:   # (written after close: opened again, as logging's handlers do)
                self._file = open(self.path, "ab", buffering=0)
                self.size = os.fstat(self._file.fileno()).st_size
            if self.max_bytes > 0 and self.backups > 0 and self.size and self.size + len(data) >= self.max_bytes:
                self._rotate()
            self._file.write(data)
            self.size += len(data)

    def _rotate(self) -> None:
        self._file.close()
        for i in range(self.backups - 1, 0, -1):
            older = f"{self.path}.{i}"
            if os.path.exists(older):
                os.replace(older, f"{self.path}.{i + 1}")
        os.replace(self.path, self.path + ".1")
        self._file = open(self.path, "ab", buffering=0)
        self.size = 0

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


class ServiceLog:
    """A rotating log file, the latest records in memory, and live subscribers."""

    def __init__(self, path: str, max_bytes: int, backups: int):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.path = path
        self.file = RotatingFile(path, max_bytes, backups)
        self.recent: collections.deque[LogRecord] = collections.deque(maxlen=RECENT)
        self.subscribers: set = set()   # callables taking a LogRecord
        self.seq = 0
        self.index = None   # a callable taking each LogRecord: the store's index (manager.py)

    def write(self, pid: int, level: str, logger: str, message: str, t: float | None = None) -> LogRecord:
        self.seq += 1
        rec = LogRecord(seq=self.seq, t=time.time() if t is None else t, pid=pid,
                        level=level if level in LEVELS else "INFO", logger=logger, message=message)
        self.file.write(rec.format() + "\n")
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
        self.file.close()


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
