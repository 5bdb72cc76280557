"""What the web interface's tests share: a manager running two services with the web interface
on a free port, HTTP requests, and a headless Chromium."""
import json
import os
import shutil
import urllib.error
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


NOBODY = 65534


def fetch_as(uid, url, headers=None, method="GET", data=None):
    """``(status, headers, body)`` of a request made from a process of another user (``uid``): a
    fork of this one that drops to that uid before connecting (every module it needs is loaded
    beforehand: the other user may not read this Python's files).  Needs root."""
    if os.getuid() != 0:
        pytest.skip("making a request as another user needs root")
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:   # the child: another user from here on
        code = 1
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    status, head, body = r.status, dict(r.headers), r.read()
            except urllib.error.HTTPError as e:
                status, head, body = e.code, dict(e.headers), e.read()
            os.write(write, json.dumps([status, head, body.decode(errors="replace")]).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        out = f.read()
    _, code = os.waitpid(pid, 0)
    assert code == 0, "the request as another user failed in its process"
    status, head, body = json.loads(out)
    return status, head, body


def watch(page, network_errors_ok=False, statuses_ok=()):
    """The JavaScript errors of ``page`` from now on: uncaught exceptions, and the console's
    errors (a failed request among them, unless ``network_errors_ok``: a test that stops the
    manager expects those; or it answered with one of ``statuses_ok``, that a test provokes)."""
    errors = []

    def console(msg):
        text = msg.text
        if msg.type != "error" or network_errors_ok and ("Failed to load resource" in text or "net::ERR_" in text):
            return
        if any(f"status of {code} " in text for code in statuses_ok):
            return
        errors.append(f"console: {text}")

    page.on("console", console)
    page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    return errors
