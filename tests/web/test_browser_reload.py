"""The index page in a headless Chromium, live: a service waiting for its dependency (depends_on)
is shown so until it starts, and services added by a reload of service.ini appear."""
import textwrap

import web_helpers

browser = web_helpers.browser

INI = """
    [defaults]
    log_dir=logs

    [Second]
    import_from=services
    depends_on=SlowStart

    [SlowStart]
    import_from=services

    [web monitor]
    port={port}
"""


def test_browser_index_shows_waiting_then_running_and_services_a_reload_adds(running, browser, tmp_path):
    gate = tmp_path / "gate"
    m = running(INI, wait_ready=False, env={"SPEEDYSVC_TEST_GATE": str(gate)})
    m.wait(lambda: m.service("Second")["state"] == "waiting", 60, "Second to wait")
    page = browser.new_page(viewport={"width": 1300, "height": 800})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(m.url + "/")
    pill = page.locator('tr[data-service="Second"] .state .pill')
    pill.filter(has_text="waiting (for SlowStart)").wait_for(timeout=20000)
    assert "waiting" in pill.get_attribute("class")
    gate.touch()
    pill.filter(has_text="running").wait_for(timeout=60000)

    with open(m.ini, "w") as f:
        f.write(textwrap.dedent(INI + "\n[Third]\nimport_from=services\n").replace("{port}", str(m.port)))
    code, body = m.post("/api/reload")
    assert code == 200 and body["added"] == ["Third"], body
    page.locator('tr[data-service="Third"] .state .pill').filter(has_text="running").wait_for(timeout=20000)
    assert not errors
