"""The store against what it meets in use: text SQLite refuses, other users, a second manager, a
large log (speedysvc/manager/store.py)."""
import os
import stat
import time

from speedysvc.manager.store import Store, StoreConfig


def rec(i, message):
    return {"t": time.time(), "seq": i, "pid": 1, "level": "WARNING", "logger": "listing", "message": message}


def test_a_lone_surrogate_does_not_end_the_writer(tmp_path):
    # what a worker's log record holds after the log pipe's JSON round trip when a method logs a
    # file name os.listdir gave it (not valid UTF-8: surrogateescape)
    s = Store(StoreConfig(state_dir=str(tmp_path / "logs.state")))
    assert s.open()
    try:
        s.record_log("svc", rec(1, "skipping " + os.fsdecode(b"caf\xe9.txt")))
        assert s.flush(timeout=10)
        s.record_log("svc", rec(2, "a later record"))
        assert s.flush(timeout=10), f"the writer is gone: {s.status()}"
        assert [r["seq"] for r in s.search_logs("svc", limit=0)][-1] == 2
    finally:
        s.close()


def test_the_state_dir_and_file_are_private(tmp_path):
    old = os.umask(0o022)   # the usual umask
    try:
        cfg = StoreConfig(state_dir=str(tmp_path / "logs.state"))
        s = Store(cfg)
        assert s.open()
        s.record_log("svc", rec(1, "token=secret"))
        s.flush(timeout=10)
        s.close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(cfg.state_dir).st_mode) & 0o077 == 0
    assert stat.S_IMODE(os.stat(cfg.path).st_mode) & 0o077 == 0


def test_search_reads_the_text_index_first(tmp_path, monkeypatch):
    # SQLite joins logs (by service) first and asks the FTS table once per row: a search, and the
    # manager's start (the "Last errors" read back, on the event loop), take time in proportion
    # to the service's whole log (22 s for 400,000 records here)
    import sqlite3
    from speedysvc.manager import store as store_mod
    s = Store(StoreConfig(state_dir=str(tmp_path / "logs.state")))
    assert s.open()
    s.record_log("svc", rec(1, "speedysvc.calls something"))
    s.flush(timeout=10)
    seen = []
    original = store_mod.connect_reader

    def tracing(path):
        db = original(path)
        db.set_trace_callback(seen.append)
        return db
    monkeypatch.setattr(store_mod, "connect_reader", tracing)
    try:
        s.search_logs("svc", "speedysvc.calls", limit=1000)
    finally:
        s.close()
    sql = next(q for q in seen if "MATCH" in q)
    db = sqlite3.connect(s.path)
    plan = [r[3] for r in db.execute("EXPLAIN QUERY PLAN " + sql)]
    assert plan[0].startswith("SCAN f"), plan


def test_a_state_dir_of_another_user_is_refused(tmp_path):
    """Another local user who made the folder first could read the logs kept there or replace
    the database: the store refuses it, and the manager runs without it."""
    folder = tmp_path / "logs.state"
    folder.mkdir()
    os.chown(folder, 65534, 65534) if os.getuid() == 0 else None
    if os.stat(folder).st_uid == os.getuid():
        import pytest
        pytest.skip("cannot give a folder to another user here (not root)")
    s = Store(StoreConfig(state_dir=str(folder)))
    assert not s.open()
    assert "belongs to uid 65534" in s.status()["error"]
    s.close()


def test_a_second_store_on_the_same_folder_is_refused_while_the_first_is_open(tmp_path):
    """Two managers with one log_dir: the second runs without a store rather than mixing its
    records with the first's; once the first is closed the folder can be used again."""
    cfg = StoreConfig(state_dir=str(tmp_path / "logs.state"))
    first = Store(cfg)
    assert first.open()
    second = Store(cfg)
    try:
        assert not second.open()
        assert "another manager uses this store" in second.status()["error"]
    finally:
        second.close()
        first.close()
    third = Store(cfg)
    assert third.open()
    third.close()
