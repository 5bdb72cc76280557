"""The manager's store on real SQLite files, with the clock in the test's hands: retention of each
kind of row, downsampling to one point a minute, the log index, and a store that cannot work."""
import json
import os
import sqlite3

import pytest

from speedysvc.manager.store import ACTOR, Store, StoreConfig, merge_points, parse_duration

T = 1_800_000_000.0   # a whole minute: points and minutes line up


class Clock:
    def __init__(self, now=T):
        self.now = now

    def __call__(self):
        return self.now


@pytest.fixture
def make(tmp_path):
    stores = []

    def make(clock=None, **keep):
        reports = []
        s = Store(StoreConfig(state_dir=str(tmp_path / "state"), **keep), clock=clock or Clock(),
                  report=lambda level, message: reports.append(message))
        s.reports = reports
        stores.append(s)
        return s
    yield make
    for s in stores:
        s.close()


def point(t, calls, p99, **more):
    return {"t": t, "workers": 2, "calls_per_s": calls, "errors_per_s": 0.0, "p50_ms": 1.0, "p99_ms": p99,
            **more}


def test_points_are_kept_then_merged_into_minutes_then_dropped(make):
    clock = Clock(T + 300)
    s = make(clock, points_keep=100, minutes_keep=1000)
    assert s.open() and s.ok
    for i in range(150):   # T .. T+298, every 2 s: five whole minutes
        s.record_point("Svc", point(T + 2 * i, calls=i, p99=float(i % 7),
                                    methods={"echo": {"calls_per_s": i, "p99_ms": float(i % 5)}}))
    s.record_point("Other", point(T + 10, calls=5, p99=1.0))
    assert s.flush(maintain=True)

    twos = s.points("Svc")
    assert [p["t"] for p in twos] == [T + 2 * i for i in range(100, 150)]   # the last 100 s
    minutes = s.points("Svc", resolution=60)
    assert [p["t"] for p in minutes] == [T + 60 * m for m in range(5)]
    first = minutes[0]   # points 0..29
    assert first["n"] == 30
    assert first["calls_per_s"] == sum(range(30)) / 30   # a mean
    assert first["p99_ms"] == 6.0                         # a peak: the maximum
    assert first["methods"]["echo"] == {"calls_per_s": sum(range(30)) / 30, "p99_ms": 4.0}
    assert [p["calls_per_s"] for p in s.points("Other", resolution=60)] == [5]
    assert s.points("Svc", since=T + 296) == [twos[-1]]
    assert [p["t"] for p in s.points("Svc", resolution=60, since=T + 60, until=T + 120)] == [T + 120]

    # a minute is merged once: another pass changes nothing
    assert s.flush(maintain=True)
    assert s.points("Svc", resolution=60) == minutes
    # and after minutes_keep, the minutes go too
    clock.now = T + 1150
    assert s.flush(maintain=True)
    assert s.points("Svc") == []
    assert [p["t"] for p in s.points("Svc", resolution=60)] == [T + 180, T + 240]


def test_events_and_logs_are_kept_within_their_bounds(make):
    clock = Clock()
    s = make(clock, minutes_keep=1000, logs_keep=500, logs_max_records=5)
    assert s.open()
    token = ACTOR.set("web")
    try:
        s.record_event("Svc", "restart", "rolling restart")
    finally:
        ACTOR.reset(token)
    s.record_event("Svc", "autoscale", "1 -> 2 worker(s)", by="autoscaler")
    s.record_event("Other", "crash", "worker 12 died", t=T - 999)
    for i in range(8):
        s.record_log("Svc", {"seq": i + 1, "t": T - 600 + i, "pid": 7, "level": "INFO", "logger": "x",
                             "message": f"old record {i}"})
    s.record_log("Svc", {"seq": 9, "t": T, "pid": 7, "level": "ERROR", "logger": "x", "message": "recent Needle"})
    assert s.flush()
    assert [(e["service"], e["kind"], e["by"]) for e in s.events()] == \
        [("Svc", "restart", "web"), ("Svc", "autoscale", "autoscaler"), ("Other", "crash", "manager")]
    assert [e["kind"] for e in s.events(service="Svc", since=T - 1)] == ["restart", "autoscale"]
    assert len(s.search_logs("Svc", limit=0)) == 9   # (not yet maintained)
    assert [r["message"] for r in s.search_logs("Svc", "RECORD 1")] == ["old record 1"]

    assert s.flush(maintain=True)   # the 8 records older than logs_keep go; at most 5 stay anyway
    assert [r["message"] for r in s.search_logs("Svc", limit=0)] == ["recent Needle"]
    assert s.search_logs("Svc", "record") == []   # gone from the index too
    assert s.search_logs("Svc", "needle", level="WARNING")[0]["seq"] == 9
    assert s.search_logs("Svc", "needle", level="CRITICAL") == []

    clock.now = T + 2   # the crash event is older than minutes_keep now
    assert s.flush(maintain=True)
    assert [e["kind"] for e in s.events()] == ["restart", "autoscale"]


def test_the_log_count_is_bounded(make):
    s = make(logs_max_records=5)
    assert s.open()
    for i in range(12):
        s.record_log("Svc", {"seq": i, "t": T, "pid": 1, "level": "INFO", "logger": "x", "message": f"r{i:02d}"})
    assert s.flush(maintain=True)
    assert [r["message"] for r in s.search_logs("Svc", limit=0)] == [f"r{i:02d}" for i in range(7, 12)]
    assert [r["message"] for r in s.log_records("Svc", batch=2)] == [f"r{i:02d}" for i in range(7, 12)]


def test_what_was_kept_is_there_after_a_reopen(make):
    s = make()
    assert s.open()
    s.record_point("Svc", point(T, 1.0, 2.0))
    s.record_event("Svc", "start", "running")
    s.record_log("Svc", {"seq": 1, "t": T, "pid": 1, "level": "INFO", "logger": "x", "message": "persisted"})
    s.close()
    again = make()
    assert again.open()
    assert again.points("Svc") == [point(T, 1.0, 2.0)]
    assert [e["detail"] for e in again.events()] == ["running"]
    assert again.search_logs("Svc", "persist")[0]["message"] == "persisted"


def test_a_corrupt_file_is_reported_once_and_nothing_waits(make, tmp_path):
    os.makedirs(tmp_path / "state")
    with open(tmp_path / "state" / "store.sqlite3", "wb") as f:
        f.write(b"this is not a database" * 100)
    s = make()
    assert s.open() is False
    assert s.ok is False and "not a database" in s.error
    assert len(s.reports) == 1 and "runs without it" in s.reports[0]
    s.record_point("Svc", point(T, 1.0, 1.0))   # accepted and ignored
    s.record_event("Svc", "start", "running")
    assert [e["kind"] for e in s.recent_events] == ["start"]   # (still in memory)
    assert s.status()["ok"] is False and s.status()["write_lag_s"] == 0.0
    assert s.flush() is False


def test_a_disabled_store_opens_no_file(make, tmp_path):
    s = make(enabled=False)
    assert s.open() is False
    assert s.status()["path"] is None and "disabled" in s.error and s.reports == []
    assert not os.path.exists(tmp_path / "state")


def test_a_locked_database_is_reported_then_written_again(make, tmp_path):
    """Another process holding the write lock longer than the writer waits (2 s): the rows of
    that batch are lost and said so; once the lock is gone, writing goes on."""
    s = make()
    assert s.open()
    other = sqlite3.connect(str(tmp_path / "state" / "store.sqlite3"), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    s.record_event("Svc", "start", "lost")
    assert s.flush()
    assert s.ok is False and "locked" in s.error and "1 rows lost" in s.error
    assert len(s.reports) == 1
    other.execute("ROLLBACK")
    other.close()
    s.record_event("Svc", "stop", "kept")
    assert s.flush()
    assert s.ok is True and s.error is None
    assert len(s.reports) == 2 and "written again" in s.reports[1]
    assert [e["detail"] for e in s.events()] == ["kept"]


def test_merge_points_and_durations():
    assert merge_points([{"a": 1, "p99_ms": 3, "s": "x", "n": None}, {"a": 3, "p99_ms": 2, "s": "y"}]) == \
        {"a": 2, "p99_ms": 3, "s": "y", "n": None}
    assert merge_points([{"m": {"max_ms": 1}}, {"m": {"max_ms": 5}}]) == {"m": {"max_ms": 5}}
    assert [parse_duration(x) for x in ("90", "90s", "15m", "12h", "30d", "0.5")] == \
        [90, 90, 900, 43200, 2592000, 0.5]
    for bad in ("0", "-1", "x", "1w", "", "inf", "nan"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_points_keep_json_fields_it_does_not_know(make):
    s = make()
    assert s.open()
    s.record_point("Svc", {"t": T, "new_field": [1, 2], "nested": {"deep": {"x": 1}}})
    assert s.flush()
    assert s.points("Svc") == [{"t": T, "new_field": [1, 2], "nested": {"deep": {"x": 1}}}]
    assert json.loads(json.dumps(s.status()))["ok"] is True


def index_docs(path, term):
    """How many records the text index lists under ``term`` (one trigram, in lower case)."""
    db = sqlite3.connect(path)
    try:
        db.execute("CREATE VIRTUAL TABLE temp.vocab USING fts5vocab(main, logs_fts, row)")
        row = db.execute("SELECT doc FROM temp.vocab WHERE term=?", (term,)).fetchone()
        return row[0] if row else 0
    finally:
        db.close()


def test_the_text_index_holds_the_records_kept_and_no_others(make):
    clock = Clock()
    s = make(clock, logs_keep=500, logs_max_records=20)
    assert s.open()
    for batch in range(4):   # (each flush: a batch of its own, indexed in one statement)
        for i in range(10):
            n = batch * 10 + i
            s.record_log("Svc", {"seq": n, "t": T - 600 + n * 10, "pid": 1, "level": "INFO", "logger": "x",
                                 "message": f"line {n} word{n:02d}q"})
        assert s.flush()
    assert index_docs(s.path, "lin") == 40
    assert [r["seq"] for r in s.search_logs("Svc", "word17q")] == [17]

    assert s.flush(maintain=True)   # 20 at most (count), then those older than logs_keep (time)
    kept = [r["seq"] for r in s.search_logs("Svc", limit=0)]
    assert kept == list(range(20, 40)) and index_docs(s.path, "lin") == 20   # deleted from the index too
    clock.now = T + 195   # now records 20..29 (t up to T - 310) are older than logs_keep (500 s)
    assert s.flush(maintain=True)
    assert [r["seq"] for r in s.search_logs("Svc", "line")] == list(range(30, 40))
    assert index_docs(s.path, "lin") == 10
    for n in range(30, 40):
        assert [r["seq"] for r in s.search_logs("Svc", f"word{n:02d}q")] == [n]


def test_a_store_whose_index_was_kept_by_triggers_is_indexed_once(make, tmp_path):
    # the first stores kept their text index with triggers on the logs table: opened now, the
    # triggers go (the writer indexes each batch itself) and what they indexed is still found
    from speedysvc.manager.store import FTS, SCHEMA
    os.makedirs(tmp_path / "state", mode=0o700)
    path = str(tmp_path / "state" / "store.sqlite3")
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript("BEGIN;" + FTS + ";" + SCHEMA + """
        CREATE TRIGGER logs_ai AFTER INSERT ON logs BEGIN
          INSERT INTO logs_fts(rowid, logger, message) VALUES (new.id, new.logger, new.message); END;
        CREATE TRIGGER logs_ad AFTER DELETE ON logs BEGIN
          INSERT INTO logs_fts(logs_fts, rowid, logger, message) VALUES ('delete', old.id, old.logger, old.message);
        END;
        INSERT INTO logs(service, seq, t, pid, level, logger, message) VALUES
          ('Svc', 1, 1800000000.0, 1, 'INFO', 'x', 'older entry one'), ('Svc', 2, 1800000000.0, 1, 'INFO', 'x', 'older entry two');
        COMMIT;""")
    db.close()
    s = make(logs_max_records=3)
    assert s.open()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT name FROM sqlite_master WHERE type='trigger'").fetchall() == []
    for i in range(3, 5):
        s.record_log("Svc", {"seq": i, "t": T, "pid": 1, "level": "INFO", "logger": "x", "message": f"newer entry {i}"})
    assert s.flush()
    assert [r["seq"] for r in s.search_logs("Svc", "entry")] == [1, 2, 3, 4]
    assert index_docs(path, "ent") == 4
    assert s.flush(maintain=True)   # the oldest goes, from the index too
    assert [r["seq"] for r in s.search_logs("Svc", "entry")] == [2, 3, 4]
    assert index_docs(path, "ent") == 3
