"""The web interface's pages over HTTP: every service rendered, nothing from elsewhere, and the
access token given once then carried by a cookie."""
import re
import urllib.error

import pytest

import web_helpers
from manager_fixture import RunningManager
from web_helpers import INI, NOBODY, fetch, fetch_as

manager = web_helpers.manager


def test_pages_render_every_service(manager):
    status, headers, html = fetch(manager.url + "/")
    assert status == 200 and 'data-service="Chatty"' in html and 'data-service="EchoServer"' in html
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    assert "https://" not in html   # nothing from a CDN: works offline
    status, _, html = fetch(manager.url + "/services/Chatty")
    assert status == 200 and "services:Chatty" in html and 'id="charts"' in html
    assert "https://" not in html
    # every script and style the page names is served by the manager: the charting library too
    assets = re.findall(r'(?:src|href)="(/static/[^"]+)"', html)
    assert any("vendor/uplot/uPlot.iife.min.js" in a for a in assets) and any("uPlot.min.css" in a for a in assets)
    for path in assets + ["/static/vendor/uplot/LICENSE"]:
        assert fetch(manager.url + path)[0] == 200, path
    with pytest.raises(urllib.error.HTTPError) as info:
        fetch(manager.url + "/services/Nope")
    assert info.value.code == 404


def test_token_opens_the_pages_once_then_a_cookie_carries_it(tmp_path):
    """For a user other than the manager's (its own needs no token)."""
    m = RunningManager(tmp_path, INI, env={"SPEEDYSVC_WEB_TOKEN": "t0ken"})
    try:
        assert fetch_as(NOBODY, m.url + "/")[0] == 403
        status, headers, _ = fetch_as(NOBODY, m.url + "/?token=t0ken")
        cookie = headers["Set-Cookie"]
        assert status == 200 and "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert fetch_as(NOBODY, m.url + "/api/status", {"Cookie": cookie.split(";")[0]})[0] == 200
        assert fetch_as(NOBODY, m.url + "/api/status", {"Cookie": "speedysvc_token=wrong"})[0] == 403
    finally:
        m.stop()
