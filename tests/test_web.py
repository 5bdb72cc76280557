"""The web interface: pages and /metrics over HTTP, then a real headless Chromium clicking through it."""
import os
import shutil
import threading
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from speedysvc import ServiceUnavailable, connect
from manager_fixture import RunningManager
from services import Chatty, EchoServer

ARTIFACTS = os.path.join(os.path.dirname(__file__), "..", "test-artifacts")
INI = """
    [defaults]
    log_dir=logs

    [Chatty]
    import_from=services
    min_proc_num=1
    max_proc_num=2

    [EchoServer]
    import_from=services

    [web monitor]
    port={port}
"""


@pytest.fixture
def manager(tmp_path):
    m = RunningManager(tmp_path, INI)
    yield m
    m.stop()


def fetch(url, headers=None):
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, r.headers, r.read().decode()


def test_pages_render_every_service(manager):
    status, headers, html = fetch(manager.url + "/")
    assert status == 200 and 'data-service="Chatty"' in html and 'data-service="EchoServer"' in html
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    assert "https://" not in html   # nothing from a CDN: works offline
    status, _, html = fetch(manager.url + "/services/Chatty")
    assert status == 200 and "services:Chatty" in html and 'class="chart"' in html
    for name in ("app.js", "style.css"):
        assert fetch(f"{manager.url}/static/{name}")[0] == 200
    with pytest.raises(urllib.error.HTTPError) as info:
        fetch(manager.url + "/services/Nope")
    assert info.value.code == 404


def test_metrics_in_prometheus_format(manager):
    with connect(Chatty) as c:
        for _ in range(5):
            c.whoami()
        with pytest.raises(AttributeError):
            c.log("NOT_A_LEVEL", "x")
    _, headers, text = fetch(manager.url + "/metrics")
    assert headers["Content-Type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    calls = {(s.labels["service"], s.labels["method"]): s.value for s in families["speedysvc_calls"].samples
             if s.name == "speedysvc_calls_total"}
    assert calls[("Chatty", "whoami")] == 5 and calls[("Chatty", "log")] == 1
    errors = {s.labels["method"]: s.value for s in families["speedysvc_errors"].samples
              if s.name == "speedysvc_errors_total" and s.labels["service"] == "Chatty"}
    assert errors["log"] == 1 and errors["whoami"] == 0
    buckets = [s for s in families["speedysvc_call_duration_seconds"].samples
               if s.name.endswith("_bucket") and s.labels["method"] == "whoami"]
    assert buckets[-1].labels["le"] == "+Inf" and buckets[-1].value == 5
    assert [b.value for b in buckets] == sorted(b.value for b in buckets)   # cumulative
    workers = {s.labels["service"]: s.value for s in families["speedysvc_workers"].samples}
    assert workers == {"Chatty": 1, "EchoServer": 1}
    assert any(s.labels["service"] == "Chatty" for s in families["speedysvc_worker_rss_bytes"].samples)
    assert "speedysvc_calls_in_flight" in families and "speedysvc_calls_waiting" in families


def test_health_and_readiness(manager):
    assert fetch(manager.url + "/healthz")[0] == 200
    assert fetch(manager.url + "/readyz")[0] == 200
    manager.post("/api/services/Chatty/stop")
    assert manager.get("/readyz", ok_only=False) == 503


def test_token_opens_the_pages_once_then_a_cookie_carries_it(tmp_path):
    m = RunningManager(tmp_path, INI, env={"SPEEDYSVC_WEB_TOKEN": "t0ken"})
    try:
        with pytest.raises(urllib.error.HTTPError) as info:
            fetch(m.url + "/")
        assert info.value.code == 401
        status, headers, _ = fetch(m.url + "/?token=t0ken")
        cookie = headers["Set-Cookie"]
        assert status == 200 and "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert fetch(m.url + "/api/status", {"Cookie": cookie.split(";")[0]})[0] == 200
        with pytest.raises(urllib.error.HTTPError):
            fetch(m.url + "/api/status", {"Cookie": "speedysvc_token=wrong"})
    finally:
        m.stop()


# ---- a real browser ---------------------------------------------------------------------------

def chromium_path():
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI"):
        pytest.fail("Chromium is required for the browser tests in CI (scripts/test.sh installs it)")
    pytest.skip("Chromium is not installed (apt-get install chromium)")


@pytest.fixture
def browser():
    path = chromium_path()
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


def shot(page, name):
    os.makedirs(ARTIFACTS, exist_ok=True)
    page.screenshot(path=os.path.join(ARTIFACTS, name), full_page=True)


def test_browser_index_stop_and_start_a_service(manager, browser):
    page = browser.new_page(viewport={"width": 1300, "height": 800})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(manager.url + "/")
    row = page.locator('tr[data-service="Chatty"]')
    row.locator(".state .pill").filter(has_text="running").wait_for()
    assert row.locator("a").inner_text() == "Chatty"
    row.locator('button[data-action="stop"]').click()
    row.locator(".state .pill").filter(has_text="stopped").wait_for(timeout=20000)
    with pytest.raises(ServiceUnavailable):
        connect(Chatty).whoami()
    with connect(EchoServer) as c:
        assert c.echo_json("other service") == "other service"
    row.locator('button[data-action="start"]').click()
    row.locator(".state .pill").filter(has_text="running").wait_for(timeout=30000)
    with connect(Chatty) as c:
        assert c.whoami() > 0
    row.locator(".scale-n").fill("2")
    row.locator('button[data-action="scale"]').click()
    row.locator(".workers").filter(has_text="2 / 1–2").wait_for(timeout=30000)
    row.locator(".scale-n").fill("5")
    row.locator('button[data-action="scale"]').click()
    page.locator("#message").filter(has_text="1 to 2").wait_for()
    page.locator("#log").filter(has_text="web interface on").wait_for()
    shot(page, "web_index.png")
    assert not errors


def test_browser_service_page_live_log_and_charts(manager, browser):
    page = browser.new_page(viewport={"width": 1300, "height": 1400})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(manager.url + "/services/Chatty")
    page.locator("#state").filter(has_text="running").wait_for()
    stop = threading.Event()

    def load():
        with connect(Chatty) as c:
            while not stop.is_set():
                c.burn(0.002)

    th = threading.Thread(target=load)
    th.start()
    try:
        time.sleep(1)   # the page is open and following the log
        with connect(Chatty) as c:
            c.log("WARNING", "a line written by a service method")
        page.locator("#log").filter(has_text="a line written by a service method").wait_for(timeout=10000)
        # the charts draw the points the manager records every 2 s
        page.wait_for_function(
            "() => Number(document.querySelector('svg.chart[data-series=\"calls_per_s\"]').dataset.points) >= 2",
            timeout=20000)
        assert page.locator('svg.chart[data-series="calls_per_s"] polyline').first.get_attribute("points")
        page.locator("#methods tbody tr").filter(has_text="burn").wait_for()
        assert page.locator("#workers tbody tr").count() >= 1
        # the level filter and the search narrow the live log
        page.select_option("#level", "ERROR")
        page.wait_for_function("() => !document.querySelector('#log').textContent.includes('service method')")
        page.select_option("#level", "")
        page.fill("#search", "service method")
        page.locator("#log").filter(has_text="a line written by a service method").wait_for()
        shot(page, "web_service.png")
    finally:
        stop.set()
        th.join()
    assert not errors
