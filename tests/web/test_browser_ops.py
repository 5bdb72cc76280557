"""The web interface as an operator uses it, in a headless Chromium: what methods raise, with
their tracebacks; charts that can be read (coloured legends, increments of history); numbers of
a stopped service; controls that fit the window, follow the state and say what went wrong once;
a manager that goes away, and a new one in its place.  No page throws a JavaScript error."""
import re
import threading
import time

import pytest

from speedysvc import connect
import web_helpers
from services import Chatty, Kitchen
from web_helpers import watch

browser = web_helpers.browser

OPS = """
    [defaults]
    log_dir=logs

    [Kitchen]
    import_from=services

    [Chatty]
    import_from=services
    min_proc_num=1
    max_proc_num=3
    autoscale=fixed

    [CrashOnStart]
    import_from=services
    crash_limit=1

    [web monitor]
    port={port}
"""


class Load:
    """Calls to Chatty (and a failing method of Kitchen now and then) from a thread, until stopped."""

    def __init__(self, failing_every=0):
        self.stop, self.failing_every = threading.Event(), failing_every
        self.thread = threading.Thread(target=self.run)

    def run(self):
        with connect(Chatty, timeout=30) as c, connect(Kitchen, timeout=30) as k:
            i = 0
            while not self.stop.is_set():
                i += 1
                try:
                    c.burn(0.001)
                    if self.failing_every and i % self.failing_every == 0:
                        k.fail_value(f"the input {i} is not valid")
                except Exception:   # (a stopped service, a raised error: the load goes on)
                    time.sleep(0.01)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(30)


@pytest.fixture
def ops(running):
    m = running(OPS, wait_ready=False)
    m.wait(lambda: all(m.service(s)["state"] == "running" for s in ("Kitchen", "Chatty")), 60, "the services")
    m.wait(lambda: m.service("CrashOnStart")["state"] == "failed", 60, "CrashOnStart to fail")
    return m


def test_a_raised_exception_is_shown_with_its_traceback(ops, browser):
    page = browser.new_page(viewport={"width": 1440, "height": 1000})
    errors = watch(page)
    page.goto(ops.url + "/services/Kitchen")
    page.locator("#state").filter(has_text="running").wait_for()
    assert page.locator("#errors details").count() == 0
    with connect(Kitchen) as c:
        with pytest.raises(ValueError):
            c.fail_value("the answer is not 41")
    block = page.locator('#errors details[data-method="fail_value"]')
    block.wait_for(timeout=20000)
    summary = block.locator("summary").inner_text()
    assert "fail_value()" in summary and "ValueError" in summary and "the answer is not 41" in summary
    block.locator("summary").click()
    tb = block.locator("pre.tb").first
    tb.wait_for()
    text = tb.inner_text()
    assert text.startswith("Traceback (most recent call last):")
    assert "raise ValueError(message)" in text and "services.py" in text
    # a second one comes first, and the block stays open
    with connect(Kitchen) as c:
        with pytest.raises(ValueError):
            c.fail_value("nor 43")
    block.locator("summary").filter(has_text="nor 43").wait_for(timeout=20000)
    assert block.evaluate("d => d.open")
    assert "nor 43" in block.locator(".one").first.inner_text()
    assert "the answer is not 41" in block.locator(".one").nth(1).inner_text()
    assert not errors


def rgb(css):
    return tuple(int(x) for x in re.findall(r"\d+", css)[:3])


def test_charts_coloured_legends_hover_values_and_incremental_history(ops, browser):
    page = browser.new_page(viewport={"width": 1440, "height": 1200})
    errors = watch(page)
    history_urls = []
    page.on("request", lambda r: history_urls.append(r.url) if "/history" in r.url else None)
    with Load(failing_every=20):
        page.goto(ops.url + "/services/Chatty")
        page.wait_for_function(
            "() => Number((document.querySelector('figure[data-chart=\"calls\"]') || {dataset: {}}).dataset.points) >= 3",
            timeout=30000)
    latency = page.locator('figure[data-chart="latency"]')
    labels = latency.locator(".u-legend .u-series .u-label")
    names = labels.all_inner_texts()
    assert names[:2] == ["time", "median (p50)"] or "median (p50)" in names, names
    assert "p99" in names and not any("_ms" in n for n in names)   # human names, not fields
    colours = {}
    for i, name in enumerate(names):
        if name == "time":
            continue
        colour = rgb(labels.nth(i).evaluate("e => getComputedStyle(e).color"))
        marker = rgb(latency.locator(".u-legend .u-series").nth(i).locator(".u-marker")
                     .evaluate("e => getComputedStyle(e).borderColor"))
        assert colour == marker, (name, colour, marker)         # the label has its line's colour
        assert len(set(colour)) > 1, (name, colour)             # not a grey (r = g = b)
        colours[name] = colour
    assert colours["median (p50)"] != colours["p99"]
    # latency on a logarithmic scale, the rest linear
    assert latency.get_attribute("data-scale") == "log"
    assert page.locator('figure[data-chart="calls"]').get_attribute("data-scale") == "linear"
    # hovering over a chart shows that moment's values in its legend
    box = page.locator('figure[data-chart="calls"] .u-over').bounding_box()
    page.mouse.move(box["x"] + box["width"] - 3, box["y"] + box["height"] / 2)
    value = page.locator('figure[data-chart="calls"] .u-legend .u-series').nth(1).locator(".u-value").inner_text()
    assert re.fullmatch(r"[\d.]+k?/s", value), value
    # the page asks for the points after the last it has, not the whole history every time
    sinces = [float(re.search(r"since=([\d.]+)", u).group(1)) for u in history_urls if "since=" in u]
    assert len(sinces) >= 3 and len(sinces) == len(history_urls), history_urls
    assert sinces == sorted(sinces) and sinces[-1] > sinces[0]
    assert not errors


def test_a_stopped_service_shows_zeros_not_its_last_figures(ops, browser):
    page = browser.new_page(viewport={"width": 1440, "height": 900})
    errors = watch(page)
    page.goto(ops.url + "/")
    row = page.locator('tr[data-service="Chatty"]')
    with Load():
        page.wait_for_function(
            "() => parseFloat(document.querySelector('tr[data-service=\"Chatty\"] td.rate').textContent) > 0",
            timeout=20000)
        row.locator('button[data-action="stop"]').click()
        row.locator('button[data-action="stop"]').filter(has_text="Confirm stop").click()
        row.locator(".state .pill").filter(has_text="stopped").wait_for(timeout=30000)
        time.sleep(4.5)   # two points of history later
    assert row.locator("td.rate").inner_text() in ("0.0", "–")
    assert row.locator("td.p50").inner_text() in ("–", "0 ms")
    assert row.locator("td.p99").inner_text() in ("–", "0 ms")
    assert not errors


def boxes_fit(page, width):
    """Every control of every row, and each row's message, inside the window; no page wider
    than the window."""
    assert page.evaluate("() => document.documentElement.scrollWidth") <= width
    for row in page.locator("tr[data-service]").all():
        for b in row.locator(".ctl button, .ctl input").all():
            box = b.bounding_box()
            assert box and box["x"] >= 0 and box["x"] + box["width"] <= width, (row.get_attribute("data-service"), box)
        reason = row.locator(".reason").bounding_box()
        cell = row.locator("td.state").bounding_box()
        assert reason["x"] + reason["width"] <= cell["x"] + cell["width"] + 1


@pytest.mark.parametrize("width", [1440, 800])
def test_controls_after_a_failure_fit_the_window_and_follow_the_state(ops, browser, width):
    page = browser.new_page(viewport={"width": width, "height": 900})
    errors = watch(page, statuses_ok=(409,))   # (the start that fails)
    page.goto(ops.url + "/")
    failed = page.locator('tr[data-service="CrashOnStart"]')
    failed.locator(".state .pill").filter(has_text="failed").wait_for()
    assert "died while starting" in failed.locator(".reason").inner_text()
    boxes_fit(page, width)
    # buttons as the state allows
    enabled = {a: failed.locator(f'button[data-action="{a}"]').is_enabled() for a in ("start", "stop", "restart", "scale")}
    assert enabled == {"start": True, "stop": False, "restart": True, "scale": False}
    running = page.locator('tr[data-service="Chatty"]')
    enabled = {a: running.locator(f'button[data-action="{a}"]').is_enabled() for a in ("start", "stop", "restart", "scale")}
    assert enabled == {"start": False, "stop": True, "restart": True, "scale": True}
    # a failed action: one line, in words, in its own row, that goes away by itself
    failed.locator('button[data-action="start"]').click()
    msg = failed.locator(".msg")
    msg.filter(has_text="Could not start").wait_for(timeout=60000)
    text = msg.inner_text()
    assert text.count("failed:") == 0 and "Could not start: " in text and '{"' not in text, text
    assert page.locator(".msg").filter(has_text="Could not").count() == 1
    boxes_fit(page, width)
    failed.locator(".state .pill").filter(has_text="failed").wait_for(timeout=60000)
    msg.filter(has_text=re.compile(r"^$")).wait_for(state="attached", timeout=30000)
    # a number out of bounds is refused in words, before any request
    running.locator(".scale-n").fill("9")
    running.locator(".scale-n").press("Enter")
    running.locator(".msg").filter(has_text="enter a whole number of workers from 1 to 3").wait_for()
    assert not errors


def test_stop_asks_first_enter_scales_and_the_box_follows_the_target(ops, browser):
    page = browser.new_page(viewport={"width": 1440, "height": 900})
    errors = watch(page)
    page.goto(ops.url + "/")
    row = page.locator('tr[data-service="Chatty"]')
    box = row.locator(".scale-n")
    # the box follows the target when another (the command line, the autoscaler) moves it
    assert ops.post("/api/services/Chatty/scale", {"workers": 2})[0] == 200
    page.wait_for_function("() => document.querySelector('tr[data-service=\"Chatty\"] .scale-n').value === '2'",
                           timeout=10000)
    # ... but not while the user types in it
    box.fill("3")
    assert ops.post("/api/services/Chatty/scale", {"workers": 1})[0] == 200
    time.sleep(4.5)
    assert box.input_value() == "3"
    box.press("Enter")
    row.locator(".workers").filter(has_text="3 / 1–3").wait_for(timeout=30000)
    assert ops.service("Chatty")["target_workers"] == 3
    # Stop asks first; unconfirmed, it forgets
    stop = row.locator('button[data-action="stop"]')
    stop.click()
    assert stop.inner_text() == "Confirm stop"
    time.sleep(2.5)
    assert ops.service("Chatty")["state"] == "running"
    stop.filter(has_text=re.compile("^Stop$")).wait_for(timeout=10000)
    stop.click()
    stop.click()
    row.locator(".state .pill").filter(has_text="stopped").wait_for(timeout=30000)
    assert not errors


def test_restart_all_and_stop_all(ops, browser):
    page = browser.new_page(viewport={"width": 1440, "height": 900})
    errors = watch(page)
    page.goto(ops.url + "/")
    before = {w["pid"] for w in ops.service("Kitchen")["worker_list"]}
    page.locator('button[data-all="restart"]').click()
    # one at a time: while it runs (across the page's refreshes) its buttons wait
    seen = page.evaluate('''() => new Promise((done) => {
        const states = [];
        const look = () => {
          const text = document.getElementById("all-msg").textContent;
          if (text.startsWith("Restarting")) states.push(document.querySelector('button[data-all="restart"]').disabled);
          if (text.startsWith("Restarted") || states.length > 2000) done(states); else setTimeout(look, 20);
        };
        look();
      })''')
    assert seen and all(seen), seen
    page.locator("#all-msg").filter(has_text="Restarted: Kitchen, Chatty").wait_for(timeout=60000)
    assert not before & {w["pid"] for w in ops.service("Kitchen")["worker_list"]}
    page.locator('button[data-all="stop"]').click()
    page.locator('button[data-all="stop"]').filter(has_text="Confirm stop all").click()
    page.locator("#all-msg").filter(has_text="Stopped: Kitchen, Chatty").wait_for(timeout=60000)
    for name in ("Kitchen", "Chatty"):
        page.locator(f'tr[data-service="{name}"] .state .pill').filter(has_text="stopped").wait_for(timeout=10000)
    assert not errors


def test_tables_update_in_place_and_keep_a_selection(ops, browser):
    page = browser.new_page(viewport={"width": 1440, "height": 1200})
    errors = watch(page)
    with Load():
        page.goto(ops.url + "/services/Chatty")
        cell = page.locator("#methods tbody tr", has_text="burn").locator("td").first
        cell.wait_for(timeout=10000)
        cell.evaluate("td => { const r = document.createRange(); r.selectNodeContents(td);"
                      " getSelection().removeAllRanges(); getSelection().addRange(r); window.kept = td; }")
        calls_before = page.locator("#methods tbody tr", has_text="burn").locator("td").nth(1).inner_text()
        page.wait_for_function(
            f"() => document.querySelector('#methods tbody tr[data-key=\"burn\"] td:nth-child(2)').textContent !== '{calls_before}'",
            timeout=20000)   # the figures changed ...
    assert page.evaluate("() => getSelection().toString()") == "burn"   # ... and the selection stayed
    assert page.evaluate("() => window.kept.isConnected")
    assert not errors


def test_manager_unreachable_then_a_new_manager(running, browser, tmp_path):
    m = running(OPS.replace("[CrashOnStart]\n    import_from=services\n    crash_limit=1\n", ""))
    page = browser.new_page(viewport={"width": 1440, "height": 900})
    errors = watch(page, network_errors_ok=True)
    page.goto(m.url + "/")
    page.locator('tr[data-service="Chatty"] .state .pill').filter(has_text="running").wait_for()
    old_pid = m.proc.pid
    assert page.locator("#manager-pid").inner_text() == str(old_pid)
    m.stop()
    page.locator("#conn").filter(has_text="manager unreachable").wait_for(timeout=20000)
    assert page.evaluate("() => document.body.classList.contains('unreachable')")
    for row in page.locator("tr[data-service]").all():
        assert row.locator(".state .pill").inner_text() == "unknown"   # not "running"
        assert row.evaluate("r => getComputedStyle(r).opacity") != "1"
        assert all(not b.is_enabled() for b in row.locator("button").all())
    assert page.locator("#banner").is_visible()
    # a new manager on the same address: the page says so and reloads what it shows
    m2 = running(OPS.replace("[CrashOnStart]\n    import_from=services\n    crash_limit=1\n", ""), port=m.port)
    page.locator("#conn").filter(has_text="live").wait_for(timeout=30000)
    page.locator("#manager-pid").filter(has_text=str(m2.proc.pid)).wait_for(timeout=10000)
    assert page.locator("#notice").filter(has_text=f"new manager (pid {m2.proc.pid})").is_visible()
    page.locator('tr[data-service="Chatty"] .state .pill').filter(has_text="running").wait_for(timeout=30000)
    assert not page.evaluate("() => document.body.classList.contains('unreachable')")
    page.locator("#log").filter(has_text=f"[pid {m2.proc.pid}]").wait_for(timeout=20000)
    assert page.locator('tr[data-service="Chatty"] button[data-action="stop"]').is_enabled()
    assert not errors


CHATTY_ONLY = """
    [defaults]
    log_dir=logs

    [Chatty]
    import_from=services

    [web monitor]
    port={port}
"""


def test_history_events_and_log_search_after_a_manager_restart(running, browser):
    """An open service page across a restart of the manager: it reloads its data from the new
    one, whose store still has the charts' points, the events and the log of the old one."""
    m = running(CHATTY_ONLY)
    page = browser.new_page(viewport={"width": 1440, "height": 1200})
    errors = watch(page, network_errors_ok=True)
    page.goto(m.url + "/services/Chatty")
    with connect(Chatty) as c:
        c.log("WARNING", "a line from before the restart, 8731")
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            c.burn(0.001)
    assert m.post("/api/services/Chatty/restart")[0] == 200
    m.wait(lambda: len(m.get("/api/services/Chatty/history")["points"]) >= 3, 30, "points of history")
    time.sleep(2.5)   # (the store writes within about a second)
    m.stop()
    page.locator("#conn").filter(has_text="manager unreachable").wait_for(timeout=20000)
    time.sleep(6)   # (no manager for a while: the charts have a gap there)
    restarted_at = time.time()
    m2 = running(CHATTY_ONLY, port=m.port)
    page.locator("#notice").filter(has_text=f"new manager (pid {m2.proc.pid})").wait_for(timeout=30000)
    calls = page.locator('figure[data-chart="calls"]')
    page.wait_for_function(
        f"() => Number(document.querySelector('figure[data-chart=\"calls\"]').dataset.first) < {restarted_at - 3}",
        timeout=20000)   # the old manager's points, from the store
    # no line across the time no manager recorded: a gap
    page.wait_for_function(
        "() => Number(document.querySelector('figure[data-chart=\"calls\"]').dataset.gaps) >= 1", timeout=20000)
    # the events are marked: the old manager's restart, the new one's start
    page.wait_for_function(
        "() => Number(document.querySelector('figure[data-chart=\"calls\"]').dataset.markers) >= 2", timeout=20000)
    assert int(calls.get_attribute("data-markers")) >= 2
    # the log search covers the old manager's lines
    page.fill("#search", "before the restart, 8731")
    page.locator("#log").filter(has_text="a line from before the restart, 8731").wait_for(timeout=20000)
    # and the full log can be downloaded
    href = page.locator("a[download]").get_attribute("href")
    body = page.request.get(m2.url + href).text()
    assert "a line from before the restart, 8731" in body
    assert not errors


def test_charts_span_days_from_the_stores_minute_points(running, browser, tmp_path):
    """The span buttons: 30 days asks for the store's 1-minute points (made here by a store that
    a previous manager left: an hour of 2 s points each of the last three days, merged into
    minutes), the axis then names days, and the choice outlives a reload of the page; 30 min
    goes back to the 2 s points."""
    from speedysvc.manager.store import Store, StoreConfig
    store = Store(StoreConfig(state_dir=str(tmp_path / "logs.state")))
    assert store.open()
    now = time.time()
    hours = [now - d * 86400 - 7200 for d in (3, 2, 1)]
    for start in hours:
        for i in range(1800):
            store.record_point("Chatty", {"t": start + 2 * i, "calls_per_s": 100.0 + i % 7, "errors_per_s": 0.0,
                                          "p50_ms": 0.2, "p99_ms": 1.5, "workers": 1, "pending": 0})
    assert store.flush(maintain=True)
    store.close()
    m = running(CHATTY_ONLY)
    minutes = m.get(f"/api/services/Chatty/history?resolution=60&since={now - 30 * 86400}")["points"]
    assert 3 * 60 <= len(minutes) <= 3 * 61, len(minutes)     # (from the store; an hour spans 61 minutes)
    page = browser.new_page(viewport={"width": 1440, "height": 1200})
    errors = watch(page)
    urls = []
    page.on("request", lambda r: urls.append(r.url) if "/history" in r.url else None)
    page.goto(m.url + "/services/Chatty")
    page.locator('#ranges button[aria-pressed="true"]').filter(has_text="30 min").wait_for()
    page.locator("#ranges button", has_text="30 days").click()
    page.wait_for_function(
        "() => Number(document.querySelector('figure[data-chart=\"calls\"]').dataset.points) >= 180", timeout=20000)
    calls = page.locator('figure[data-chart="calls"]')
    assert page.locator("#charts").get_attribute("data-range") == "30d"
    assert float(calls.get_attribute("data-first")) < hours[0] + 60     # three days back
    assert int(calls.get_attribute("data-gaps")) >= 2                   # nothing between the hours
    assert any("resolution=60" in u for u in urls), urls
    ticks = calls.get_attribute("data-xticks")
    assert re.search(r"[A-Za-z]{3}", ticks), ticks                      # days, not clock times
    # the choice is kept across a reload of the page
    page.reload()
    page.locator('#ranges button[aria-pressed="true"]').filter(has_text="30 days").wait_for()
    page.wait_for_function(
        "() => Number(document.querySelector('figure[data-chart=\"calls\"]').dataset.points) >= 180", timeout=20000)
    # and 30 minutes back to the 2 s points: none of the old hours
    urls.clear()
    page.locator("#ranges button", has_text="30 min").click()
    page.wait_for_function("() => document.querySelector('#charts').dataset.range === '30m'", timeout=20000)
    page.wait_for_function(
        f"() => Number(document.querySelector('figure[data-chart=\"calls\"]').dataset.first || 0) > {now - 3600}"
        " || document.querySelector('figure[data-chart=\"calls\"]').dataset.points === '0'", timeout=20000)
    page.wait_for_timeout(2500)
    assert urls and all("resolution=2" in u for u in urls), urls
    assert not errors


def test_charts_say_why_there_are_no_days_without_a_store(running, browser):
    """Without a store the minute points are not kept: the page says so, and 30 min still works."""
    m = running(CHATTY_ONLY + "\n    [store]\n    enabled=false\n")
    page = browser.new_page(viewport={"width": 1440, "height": 1000})
    errors = watch(page, network_errors_ok=True)   # (the 503 that says why is the point)
    page.goto(m.url + "/services/Chatty")
    page.locator("#ranges button", has_text="7 days").click()
    page.locator("#range-note").filter(has_text="needs the store").wait_for(timeout=20000)
    page.locator("#ranges button", has_text="30 min").click()
    page.locator("#range-note").wait_for(state="hidden", timeout=20000)
    assert not errors
