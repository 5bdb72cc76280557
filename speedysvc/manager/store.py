"""The manager's store: what it keeps across its own restarts, in one SQLite file (WAL mode).

* metric history: the points ``History.record`` makes (one row per service, resolution and
  time, the point as JSON, so a point may gain fields without a change of schema), every
  2 s for ``points_keep``, and one point per minute (the minute's points merged: means, and the
  maximum of peaks such as p99) for ``minutes_keep``;
* events: start, stop, restart, scale, crash, failed, autoscale, reload, with the service,
  the time, who asked (cli, web, api, autoscaler, manager) and a detail;
* every log record of every service and of the manager, with a full-text index (FTS5) that
  search uses, for ``logs_keep`` and at most ``logs_max_records`` records.

Writes never wait: the event loop puts rows on a queue and one writer thread commits them in
batches (every ``FLUSH_INTERVAL``) and applies retention and downsampling (every
``MAINTAIN_INTERVAL``).  A database that cannot be opened or written (corrupt, locked by
another process, a read-only directory) is reported once (a log record, and ``status()``'s
``ok`` and ``error``) and the manager runs on without it: the in-memory history, log ring and
event ring still serve the web interface.  Reads open a connection of their own (in a thread
of the loop's executor: see web/api.py), which WAL lets run beside the writer.
"""
from __future__ import annotations

import collections
import contextvars
import fcntl
import json
import logging
import math
import os
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass

log = logging.getLogger("speedysvc.manager")

FILE_NAME = "store.sqlite3"
FLUSH_INTERVAL = 0.5       # seconds between two commits of the writer
MAINTAIN_INTERVAL = 30.0   # seconds between two passes of retention and downsampling
QUEUE_LIMIT = 200_000      # rows waiting for the writer beyond which new ones are dropped (and counted)
BUSY_TIMEOUT = 2.0         # seconds the writer waits for a lock held by another process
EVENTS_RECENT = 1000       # events kept in memory (the API's answer without a store)
MINUTE = 60.0
SCHEMA_VERSION = 1

EVENT_KINDS = ("start", "stop", "restart", "scale", "crash", "failed", "autoscale", "reload")
ACTORS = ("cli", "web", "api", "autoscaler", "manager")

# Who asked for what is being done: the HTTP API sets it for the task of a request (and the tasks
# that request starts inherit it); anything else was the manager's own doing.
ACTOR: contextvars.ContextVar[str] = contextvars.ContextVar("speedysvc_actor", default="manager")


class StoreUnavailable(Exception):
    """The store cannot answer (disabled, or its database could not be opened)."""


@dataclass
class StoreConfig:
    enabled: bool = True
    state_dir: str = ""
    points_keep: float = 86400.0            # 2 s points
    minutes_keep: float = 30 * 86400.0      # 1-minute points and events
    logs_keep: float = 30 * 86400.0
    logs_max_records: int = 2_000_000

    @property
    def path(self) -> str:
        return os.path.join(self.state_dir, FILE_NAME)


SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS points(service TEXT NOT NULL, res INTEGER NOT NULL, t REAL NOT NULL, data TEXT NOT NULL,
                                  PRIMARY KEY(service, res, t)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS points_age ON points(res, t);
CREATE TABLE IF NOT EXISTS events(id INTEGER PRIMARY KEY, t REAL NOT NULL, service TEXT NOT NULL, kind TEXT NOT NULL,
                                  by TEXT NOT NULL, detail TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_t ON events(t);
CREATE TABLE IF NOT EXISTS logs(id INTEGER PRIMARY KEY, service TEXT NOT NULL, seq INTEGER, t REAL NOT NULL,
                                pid INTEGER, level TEXT, logger TEXT, message TEXT);
CREATE INDEX IF NOT EXISTS logs_service ON logs(service, id);
CREATE INDEX IF NOT EXISTS logs_t ON logs(t);
DROP TRIGGER IF EXISTS logs_ai;
DROP TRIGGER IF EXISTS logs_ad;
"""
# The text index (logs_fts) is written by the writer itself, one statement per batch, not by
# triggers on ``logs`` (as the first stores were: those are dropped above).  A trigger runs
# its INSERT into the FTS5 table as a statement of its own for every row, and FTS5 writes its
# pending terms to disk at each statement's savepoint: a new index segment per record, merged
# again and again.  Indexing a batch in one statement costs a third of that (~13 instead of
# ~40 µs of CPU per record), the larger part of what the store cost the manager.
# trigram: any substring of three characters or more is found, in any case (as `grep -i`)
FTS = ("CREATE VIRTUAL TABLE IF NOT EXISTS logs_fts USING fts5(logger, message, content='logs', "
       "content_rowid='id', tokenize='trigram')")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``12h``, ``30d``: seconds (above 0)."""
    text = text.strip().lower()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    scale = units.get(text[-1:], None)
    try:
        value = float(text[:-1] if scale else text) * (scale or 1)
    except ValueError:
        raise ValueError("must be a duration such as 3600, 90s, 15m, 12h or 30d") from None
    if not value > 0 or math.isinf(value):
        raise ValueError("must be a duration above 0 such as 3600, 90s, 15m, 12h or 30d")
    return value


def _text(value):
    """``value`` as SQLite can store it: text with a lone surrogate (a file name that was not
    UTF-8, decoded by ``os.fsdecode``) is escaped, not refused."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


def merge_points(points: list[dict]) -> dict:
    """Points merged into one: numbers averaged (peaks, such as ``p99_ms`` and ``max_ms``,
    take the maximum), dicts merged key by key, anything else the last value."""
    out: dict = {}
    keys: dict = {}
    for p in points:
        for k in p:
            keys.setdefault(k, None)
    for k in keys:
        values = [p[k] for p in points if p.get(k) is not None]
        if not values:
            out[k] = None
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[k] = max(values) if ("p99" in k or "max" in k or "p999" in k) else sum(values) / len(values)
        elif all(isinstance(v, dict) for v in values):
            out[k] = merge_points(values)
        else:
            out[k] = values[-1]
    return out


def connect_reader(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT)
    db.row_factory = sqlite3.Row
    return db


class Store:
    """See the module's description.  ``record_*`` are called from the event loop and never
    wait; ``open``/``close`` from the manager; the readers (``points``, ``events``,
    ``search_logs``, ``log_lines``) from any thread."""

    def __init__(self, cfg: StoreConfig, clock=time.time, report=None):
        self.cfg = cfg
        self.clock = clock
        # report(level, message): how the store's trouble (and its end) is told; from the writer
        # thread too, so the manager's handler hands it to the event loop
        self.report = report or (lambda level, message: log.log(level, "%s", message))
        self.path = cfg.path if cfg.enabled else None
        self.ok = False
        self.error: str | None = None if cfg.enabled else "disabled ([store] enabled = false)"
        self.dropped = 0
        self.recent_events: collections.deque = collections.deque(maxlen=EVENTS_RECENT)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._queued = 0
        self._oldest: float | None = None   # when the oldest row not yet committed was queued
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._db: sqlite3.Connection | None = None
        self._reported = False
        self._last_maintain = 0.0
        self._lock_fd: int | None = None   # (see _take_folder)

    # -- lifetime ------------------------------------------------------------------------
    def open(self) -> bool:
        """Open (or create) the database and start the writer.  False, with ``error`` set and
        reported once, if that cannot be done: the manager then runs without a store."""
        if not self.cfg.enabled:
            return False
        try:
            self._take_folder()
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, check_same_thread=False, isolation_level=None)
            try:
                mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if mode.lower() != "wal":
                    raise sqlite3.OperationalError(f"cannot use WAL mode (journal_mode is {mode})")
                db.execute("PRAGMA synchronous=NORMAL")
                db.executescript("BEGIN;" + FTS + ";" + SCHEMA + "COMMIT;")
                db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            except BaseException:
                db.close()
                raise
        except (sqlite3.Error, OSError) as e:
            self._failed(f"cannot open {self.path}: {e}")
            return False
        self._db = db
        self.ok, self.error = True, None
        self._thread = threading.Thread(target=self._writer, name="speedysvc-store", daemon=True)
        self._thread.start()
        return True

    def _take_folder(self) -> None:
        """The state folder, this user's alone: made 0700, refused if another user owns it (it
        could read or replace what is kept: logs may hold secrets), its files made 0600; and a
        lock held for the manager's life, so that a second manager with the same log_dir runs
        without a store instead of mixing its records with this one's."""
        folder = self.cfg.state_dir
        os.makedirs(folder, mode=0o700, exist_ok=True)
        st = os.stat(folder)
        if st.st_uid != os.getuid():
            raise OSError(f"{folder} belongs to uid {st.st_uid}, not to this user")
        if st.st_mode & 0o077:   # (other users' bits only: a folder made read-only stays so)
            os.chmod(folder, st.st_mode & 0o700)
        for name in (FILE_NAME, FILE_NAME + "-wal", FILE_NAME + "-shm", "store.lock"):
            path = os.path.join(folder, name)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600) if name in (FILE_NAME, "store.lock") \
                else None
            try:
                if fd is not None:
                    os.fchmod(fd, 0o600)
                elif os.path.exists(path):
                    os.chmod(path, 0o600, follow_symlinks=False)
                if name == "store.lock":
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        raise OSError("another manager uses this store (same log_dir); this one runs "
                                      "without it") from None
                    self._lock_fd, fd = fd, None
            finally:
                if fd is not None:
                    os.close(fd)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop the writer."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            self._queue.put(None)
            thread.join(timeout)
            if thread.is_alive():   # (stuck on a lock: it dies with the process; its connection stays)
                return
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
            self._db = None
        lock_fd, self._lock_fd = self._lock_fd, None
        if lock_fd is not None:
            os.close(lock_fd)

    def _failed(self, message: str) -> None:
        self.ok, self.error = False, message
        if not self._reported:   # once: a failing store must not fill the log that it indexes
            self._reported = True
            self.report(logging.ERROR, f"store unavailable, the manager runs without it (history, events and log search "
                        f"are not kept across restarts): {message}")

    def status(self) -> dict:
        oldest = self._oldest
        return {"path": self.path, "ok": self.ok, "error": self.error, "queued": self._queued,
                "dropped": self.dropped,
                "write_lag_s": max(0.0, time.monotonic() - oldest) if oldest is not None else 0.0}

    # -- writing (from the event loop: never waits) ---------------------------------------
    def _put(self, item: tuple) -> None:
        if self._thread is None:
            return
        if self._queued >= QUEUE_LIMIT:
            self.dropped += 1
            return
        with self._lock:
            self._queued += 1
            if self._oldest is None:
                self._oldest = time.monotonic()
        self._queue.put(item)

    def record_point(self, service: str, point: dict) -> None:
        self._put(("p", service, point))

    def record_log(self, service: str, rec: dict) -> None:
        self._put(("l", service, rec))

    def record_event(self, service: str, kind: str, detail: str = "", by: str | None = None,
                     t: float | None = None) -> dict:
        event = {"t": self.clock() if t is None else t, "service": service, "kind": kind,
                 "by": by or ACTOR.get(), "detail": detail}
        self.recent_events.append(event)
        self._put(("e", event))
        return event

    # -- the writer thread ----------------------------------------------------------------
    def _writer(self) -> None:
        try:
            self._writes()
        except Exception as e:   # (a fault of ours: said, and the loop stops queueing for it)
            self._thread = None
            self._failed(f"the store's writer stopped: {type(e).__name__}: {e}")

    def _writes(self) -> None:
        self._maintain()
        while True:
            try:
                first = self._queue.get(timeout=FLUSH_INTERVAL)
            except queue.Empty:
                first = ()
            batch = [first] if first else []
            done = first is None
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    done = True
                else:
                    batch.append(item)
            flushes = [item for item in batch if item[0] == "f"]
            batch = [item for item in batch if item[0] != "f"]
            if batch:
                self._write(batch)
            if any(f[2] for f in flushes) or self.clock() - self._last_maintain >= MAINTAIN_INTERVAL:
                self._maintain()
            for f in flushes:
                f[1].set()
            if done or self._stop.is_set() and self._queue.empty():
                return
            if not done:
                self._stop.wait(FLUSH_INTERVAL)   # (batches: a commit per interval, not per row)

    def _write(self, batch: list[tuple]) -> None:
        try:
            self._write_batch(batch)
        except Exception as e:   # (never ends the writer: reported, the batch counted as lost)
            self._failed(f"cannot write {self.path}: {type(e).__name__}: {e} ({len(batch)} rows lost)")
        finally:
            with self._lock:
                self._queued -= len(batch)
                self._oldest = None if self._queued <= 0 else time.monotonic()

    def _write_batch(self, batch: list[tuple]) -> None:
        points, logs, events = [], [], []
        for item in batch:
            if item[0] == "p":
                points.append((item[1], 2, item[2].get("t", 0.0), json.dumps(item[2], default=str)))
            elif item[0] == "l":
                r = item[2]
                logs.append((item[1], r.get("seq"), r["t"], r.get("pid"), r.get("level"), _text(r.get("logger")),
                             _text(r.get("message"))))
            else:
                e = item[1]
                events.append((e["t"], e["service"], e["kind"], e["by"], _text(e["detail"])))
        try:
            db = self._db
            db.execute("BEGIN")
            try:
                db.executemany("INSERT OR REPLACE INTO points VALUES (?, ?, ?, ?)", points)
                if logs:
                    last = db.execute("SELECT coalesce(max(id), 0) FROM logs").fetchone()[0]
                    db.executemany("INSERT INTO logs(service, seq, t, pid, level, logger, message) "
                                   "VALUES (?, ?, ?, ?, ?, ?, ?)", logs)
                    # (the batch's rows into the text index, in one statement: see SCHEMA)
                    db.execute("INSERT INTO logs_fts(rowid, logger, message) "
                               "SELECT id, logger, message FROM logs WHERE id>?", (last,))
                db.executemany("INSERT INTO events(t, service, kind, by, detail) VALUES (?, ?, ?, ?, ?)", events)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK") if db.in_transaction else None
                raise
        except sqlite3.Error as e:
            self._failed(f"cannot write {self.path}: {e} ({len(batch)} rows lost)")
        else:
            if not self.ok:
                self.ok, self.error = True, None
                self._reported = False
                self.report(logging.INFO, f"store {self.path} written again")

    def _maintain(self) -> None:
        """Downsample the minutes that ended, then drop what is older than its retention."""
        now = self._last_maintain = self.clock()
        cfg, db = self.cfg, self._db
        try:
            row = db.execute("SELECT value FROM meta WHERE key='downsampled'").fetchone()
            start = float(row[0]) if row else None
            if start is None:
                first = db.execute("SELECT min(t) FROM points WHERE res=2").fetchone()[0]
                start = math.floor(first / MINUTE) * MINUTE if first is not None else None
            end = math.floor(now / MINUTE) * MINUTE
            db.execute("BEGIN")
            try:
                if start is not None and start < end:
                    rows = db.execute("SELECT service, t, data FROM points WHERE res=2 AND t>=? AND t<? "
                                      "ORDER BY service, t", (start, end)).fetchall()
                    groups: dict = {}
                    for service, t, data in rows:
                        groups.setdefault((service, math.floor(t / MINUTE) * MINUTE), []).append(json.loads(data))
                    merged = []
                    for (service, minute), pts in groups.items():
                        point = merge_points(pts)
                        point["t"], point["n"] = minute, len(pts)
                        merged.append((service, 60, minute, json.dumps(point)))
                    db.executemany("INSERT OR REPLACE INTO points VALUES (?, ?, ?, ?)", merged)
                if start is not None:   # (the minutes before ``end`` are merged, once)
                    db.execute("INSERT OR REPLACE INTO meta VALUES ('downsampled', ?)", (str(max(end, start)),))
                db.execute("DELETE FROM points WHERE res=2 AND t<?", (now - cfg.points_keep,))
                db.execute("DELETE FROM points WHERE res=60 AND t<?", (now - cfg.minutes_keep,))
                db.execute("DELETE FROM events WHERE t<?", (now - cfg.minutes_keep,))
                self._delete_logs("t<?", now - cfg.logs_keep)
                self._delete_logs("id <= (SELECT max(id) FROM logs) - ?", cfg.logs_max_records)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK") if db.in_transaction else None
                raise
        except (sqlite3.Error, ValueError, TypeError) as e:
            self._failed(f"cannot maintain {self.path}: {e}")

    def _delete_logs(self, where: str, arg) -> None:
        """Delete the log records ``where`` says, and their terms from the text index (which must
        be told the text it indexed: an external-content FTS5 table), each in one statement."""
        db = self._db
        db.execute(f"INSERT INTO logs_fts(logs_fts, rowid, logger, message) "
                   f"SELECT 'delete', id, logger, message FROM logs WHERE {where}", (arg,))
        db.execute(f"DELETE FROM logs WHERE {where}", (arg,))

    def flush(self, maintain: bool = False, timeout: float = 30.0) -> bool:
        """Wait until what was queued before is written (and, with ``maintain``, retention and
        downsampling applied).  False if the writer does not run or did not get there in time."""
        if self._thread is None:
            return False
        done = threading.Event()
        self._queue.put(("f", done, maintain))
        return done.wait(timeout)

    # -- reading (any thread; a connection of its own per call) ----------------------------
    def _reader(self) -> sqlite3.Connection:
        if not self.ok and self._db is None:
            raise StoreUnavailable(self.error or "no store")
        return connect_reader(self.path)

    def points(self, service: str, since: float | None = None, until: float | None = None,
               resolution: int = 2, limit: int = 50_000) -> list[dict]:
        """The points of ``service`` at ``resolution`` (2 or 60 s) with since < t <= until, oldest first."""
        with self._reader() as db:
            rows = db.execute("SELECT data FROM (SELECT t, data FROM points WHERE service=? AND res=? AND t>? AND t<=? "
                              "ORDER BY t DESC LIMIT ?) ORDER BY t",
                              (service, resolution, -math.inf if since is None else since,
                               math.inf if until is None else until, limit)).fetchall()
        return [json.loads(r[0]) for r in rows]

    def events(self, since: float | None = None, service: str | None = None, limit: int = 10_000) -> list[dict]:
        with self._reader() as db:
            rows = db.execute("SELECT t, service, kind, by, detail FROM (SELECT * FROM events WHERE t>? "
                              "AND (? IS NULL OR service=?) ORDER BY id DESC LIMIT ?) ORDER BY id",
                              (-math.inf if since is None else since, service, service, limit)).fetchall()
        return [dict(r) for r in rows]

    def search_logs(self, service: str, text: str | None = None, level: str | None = None,
                    limit: int = 200) -> list[dict]:
        """The latest ``limit`` records (0: all) of ``service`` containing ``text`` (any case, in
        the message or the logger's name) and at least as severe as ``level``, oldest first."""
        where, args = ["l.service=?"], [service]
        if level and level.upper() in LEVELS:
            levels = LEVELS[LEVELS.index(level.upper()):]
            where.append(f"l.level IN ({','.join('?' * len(levels))})")
            args += levels
        source = "logs l"
        if text:
            if len(text) >= 3:   # (the trigram index finds substrings of 3 characters or more)
                source = "logs_fts f CROSS JOIN logs l ON l.id=f.rowid"   # (the text index first)
                where.append("logs_fts MATCH ?")
                args.append('"' + text.replace('"', '""') + '"')
            else:
                where.append("(instr(lower(l.message), lower(?)) OR instr(lower(l.logger), lower(?)))")
                args += [text, text]
        sql = (f"SELECT l.seq, l.t, l.pid, l.level, l.logger, l.message FROM {source} WHERE {' AND '.join(where)} "
               f"ORDER BY l.id DESC" + (" LIMIT ?" if limit else ""))
        with self._reader() as db:
            rows = db.execute(sql, args + ([limit] if limit else [])).fetchall()
        return [dict(r) for r in reversed(rows)]

    def log_records(self, service: str, batch: int = 5000):
        """Every record of ``service`` kept, oldest first (a generator, read in batches)."""
        last = 0
        while True:
            with self._reader() as db:
                rows = db.execute("SELECT id, seq, t, pid, level, logger, message FROM logs WHERE service=? AND id>? "
                                  "ORDER BY id LIMIT ?", (service, last, batch)).fetchall()
            if not rows:
                return
            last = rows[-1]["id"]
            for r in rows:
                d = dict(r)
                del d["id"]
                yield d
