"""A real headless Chromium clicking through the web interface: the index (stop, start, scale a
service) and a service's page (live log, filters, charts)."""
import threading
import time

import pytest

from speedysvc import ServiceUnavailable, connect
import web_helpers
from services import Chatty, EchoServer
from web_helpers import shot

manager, browser = web_helpers.manager, web_helpers.browser


def test_browser_index_stop_and_start_a_service(manager, browser):
    page = browser.new_page(viewport={"width": 1300, "height": 800})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(manager.url + "/")
    row = page.locator('tr[data-service="Chatty"]')
    row.locator(".state .pill").filter(has_text="running").wait_for()
    assert row.locator("a").inner_text() == "Chatty"
    row.locator('button[data-action="stop"]').click()
    row.locator('button[data-action="stop"]').filter(has_text="Confirm stop").click()   # (it asks first)
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
    row.locator(".msg").filter(has_text="1 to 2").wait_for()
    page.locator("#log").filter(has_text="web interface on").wait_for()
    shot(page, "web_index.png")
    assert not errors


def test_browser_restart_button_is_a_rolling_restart(manager, browser):
    """The Restart button replaces the workers while a client calls without pause: no call fails."""
    page = browser.new_page(viewport={"width": 1300, "height": 800})
    errors, failures, pids = [], [], set()
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(manager.url + "/")
    row = page.locator('tr[data-service="Chatty"]')
    row.locator(".state .pill").filter(has_text="running").wait_for()
    before = {w["pid"] for w in manager.service("Chatty")["worker_list"]}
    stop = threading.Event()

    def calls():
        with connect(Chatty, timeout=30) as c:
            while not stop.is_set():
                try:
                    pids.add(c.whoami())
                except Exception as e:
                    failures.append(repr(e))

    th = threading.Thread(target=calls)
    th.start()
    try:
        row.locator('button[data-action="restart"]').click()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (
                manager.get("/api/services/Chatty/logs?q=rolling%20restart%20done")["records"]):
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        stop.set()
        th.join(30)
    after = {w["pid"] for w in manager.service("Chatty")["worker_list"]}
    assert after and not after & before
    assert failures == []
    assert pids & after, "calls were served by the new workers"
    assert manager.service("Chatty")["state"] == "running"
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
            "() => Number(document.querySelector('figure[data-chart=\"calls\"]').dataset.points) >= 2",
            timeout=20000)
        assert page.locator('figure[data-chart="calls"] canvas').count() == 1
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
