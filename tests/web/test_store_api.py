"""The HTTP API over the manager's store: history increments (?since=), compressed answers,
events with who asked, log search over the whole retained log (grep=) and its download."""
import gzip
import json
import time
import urllib.request

from manager_fixture import chatty_ini
from services import Chatty
from speedysvc import connect


def get(m, path, headers=None):
    req = urllib.request.Request(m.url + path, headers=headers or {})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.status, r.headers, r.read()


def test_history_since_returns_only_the_newer_points_compressed(running):
    m = running(chatty_ini())
    m.wait(lambda: len(m.get("/api/services/Chatty/history")["points"]) >= 3, 30, "three history points")
    full = m.get("/api/services/Chatty/history")
    assert full["interval"] == 2.0
    ts = [p["t"] for p in full["points"]]
    assert ts == sorted(ts) and len(set(ts)) == len(ts)
    since = ts[-2]
    newer = m.get(f"/api/services/Chatty/history?since={since}")["points"]
    assert newer and all(p["t"] > since for p in newer)
    assert newer[0]["t"] == ts[-1]   # nothing after since is left out
    assert m.get(f"/api/services/Chatty/history?since={time.time() + 60}")["points"] == []
    # compressed for a client that accepts it, plain for one that does not
    status, headers, body = get(m, "/api/services/Chatty/history", {"Accept-Encoding": "gzip"})
    assert status == 200 and headers["Content-Encoding"] == "gzip"
    assert json.loads(gzip.decompress(body))["points"][0]["t"] == ts[0]
    status, headers, body = get(m, "/api/services/Chatty/history")
    assert headers.get("Content-Encoding") is None and json.loads(body)["points"][0]["t"] == ts[0]
    for bad in ("since=x", "resolution=5", "range=-1"):
        assert m.get(f"/api/services/Chatty/history?{bad}", ok_only=False) == 400, bad
    assert m.get("/api/services/Nope/history", ok_only=False) == 404


def test_events_say_what_happened_and_who_asked(running):
    m = running(chatty_ini(max=2))
    t0 = time.time()
    assert m.cli("restart", "Chatty").returncode == 0
    assert m.post("/api/services/Chatty/scale", {"workers": 2}, headers={"X-Speedysvc-Client": "web"})[0] == 200
    assert m.post("/api/services/Chatty/stop")[0] == 200
    events = m.get(f"/api/events?since={t0}&service=Chatty")["events"]
    assert [(e["kind"], e["by"]) for e in events] == [("restart", "cli"), ("scale", "web"), ("stop", "api")]
    assert all(e["service"] == "Chatty" and e["t"] > t0 for e in events)
    assert events[1]["detail"] == "1 -> 2 worker(s)"
    first = m.get("/api/events")["events"][0]
    assert (first["kind"], first["by"], first["service"]) == ("start", "manager", "Chatty")
    assert m.get(f"/api/events?since={events[-1]['t']}")["events"] == []
    assert m.get("/api/events?service=Nope", ok_only=False) == 404


def test_grep_searches_the_store_and_the_log_downloads_whole(running):
    m = running(chatty_ini())
    with connect(Chatty) as c:
        c.log("WARNING", "needle in the haystack")
        c.log("INFO", "Another NEEDLE, in capitals")
        c.log("INFO", "hay only")
    m.wait(lambda: len(m.get("/api/services/Chatty/logs?grep=needle")["records"]) == 2, 20, "the index")
    found = m.get("/api/services/Chatty/logs?grep=needle")
    assert found["source"] == "store"
    assert [r["message"] for r in found["records"]] == ["needle in the haystack", "Another NEEDLE, in capitals"]
    assert [r["message"] for r in m.get("/api/services/Chatty/logs?grep=needle&level=WARNING")["records"]] \
        == ["needle in the haystack"]
    assert len(m.get("/api/services/Chatty/logs?grep=needle&lines=1")["records"]) == 1
    # (under three characters the trigram index cannot help: a scan finds it)
    assert [r["message"] for r in m.get("/api/services/Chatty/logs?grep=CK")["records"]] == ["needle in the haystack"]
    # the in-memory parameters as before
    assert [r["message"] for r in m.get("/api/services/Chatty/logs?q=hay%20only")["records"]] == ["hay only"]
    status, headers, body = get(m, "/api/services/Chatty/logs/download", {"Accept-Encoding": "gzip"})
    assert headers["Content-Type"].startswith("text/plain") and "attachment" in headers["Content-Disposition"]
    text = gzip.decompress(body).decode()
    assert "WARNING chatty: needle in the haystack" in text and "manager: running with 1 worker(s)" in text
    assert text.index("needle in the haystack") < text.index("hay only")
    assert m.get("/api/services/Nope/logs/download", ok_only=False) == 404


def test_the_manager_reports_its_store(running, tmp_path):
    m = running(chatty_ini())
    store = m.get("/api/status")["manager"]["store"]
    assert store["ok"] is True and store["error"] is None
    assert store["path"] == str(tmp_path / "logs.state" / "store.sqlite3")
    assert store["write_lag_s"] >= 0


def test_history_beyond_the_hour_and_by_the_minute_come_from_the_store(running, tmp_path):
    """Points a previous manager kept (written here beforehand): 2 s ones of two hours ago, and
    merged minutes; the API serves them by ?range= and ?resolution=60."""
    from speedysvc.manager.store import Store, StoreConfig
    now = time.time()
    old = Store(StoreConfig(state_dir=str(tmp_path / "logs.state")))
    assert old.open()
    for i in range(5):
        old.record_point("Chatty", {"t": now - 7200 + 2 * i, "calls_per_s": float(i)})
    old.record_event("Chatty", "crash", "long ago", t=now - 7000)
    assert old.flush(maintain=True)   # (their minute is over: merged)
    old.close()

    m = running(chatty_ini())
    recent = m.get("/api/services/Chatty/history")["points"]
    assert all(p["t"] > now - 3600 for p in recent)   # the last hour only
    two_hours = m.get("/api/services/Chatty/history?range=7300")["points"]
    assert [p["calls_per_s"] for p in two_hours[:5]] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert [p["t"] for p in two_hours[5:]] == [p["t"] for p in m.get(
        f"/api/services/Chatty/history?since={two_hours[4]['t']}")["points"]][:len(two_hours) - 5]
    minutes = m.get("/api/services/Chatty/history?resolution=60&range=86400")
    assert minutes["interval"] == 60.0
    merged = [p for p in minutes["points"] if p["t"] < now - 3600]
    assert len(merged) in (1, 2) and sum(p["n"] for p in merged) == 5   # (a minute's edge may split them)
    assert [e["detail"] for e in m.get(f"/api/events?since={now - 7300}&service=Chatty")["events"]][0] \
        == "long ago"
