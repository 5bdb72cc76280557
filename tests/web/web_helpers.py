"""What the web interface's tests share: a manager running two services with the web interface
on a free port, HTTP requests, and a headless Chromium."""
import os
import shutil
import urllib.request

import pytest

from manager_fixture import RunningManager


ARTIFACTS = os.path.join(os.path.dirname(__file__), "..", "..", "test-artifacts")


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
