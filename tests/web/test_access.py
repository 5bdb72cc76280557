"""Who may use the manager's HTTP API and pages: its own user (and root) over loopback with
nothing to type, any other user of the host only with the access token, which the manager
keeps in a file only its user can read; /healthz and /readyz are open to all."""
import json
import os
import stat
import subprocess
import sys

import web_helpers
from manager_fixture import RunningManager, chatty_ini, manager_env
from speedysvc.manager.web import access
from web_helpers import INI, NOBODY, fetch, fetch_as

manager = web_helpers.manager
CSRF = {"X-Speedysvc-Request": "1", "Content-Type": "application/json"}


def test_the_managers_own_user_needs_no_token(manager):
    assert fetch(manager.url + "/")[0] == 200
    assert fetch(manager.url + "/api/status")[0] == 200
    assert manager.post("/api/services/Chatty/restart")[0] == 200
    out = manager.cli("status")
    assert out.returncode == 0 and "Chatty" in out.stdout


def test_another_user_can_neither_read_nor_change_anything_without_the_token(manager):
    for path in ("/", "/api/status", "/api/services/Chatty", "/api/services/Chatty/logs", "/metrics",
                 "/services/Chatty"):
        status, _, body = fetch_as(NOBODY, manager.url + path)
        assert status == 403, path
        assert f"uid {NOBODY}" in body and "access token" in body, body
    status, _, _ = fetch_as(NOBODY, manager.url + "/api/services/Chatty/stop", CSRF, "POST", b"{}")
    assert status == 403
    assert manager.service("Chatty")["state"] == "running"
    # health and readiness are for probes, whoever runs them; static files hold nothing
    assert fetch_as(NOBODY, manager.url + "/healthz")[0] == 200
    assert fetch_as(NOBODY, manager.url + "/readyz")[0] == 200
    assert fetch_as(NOBODY, manager.url + "/static/app.js")[0] == 200


def test_the_token_file_lets_another_user_in_and_is_the_managers_users_alone(manager):
    path = access.token_path(manager.port)
    token = access.read_token(manager.port)
    assert token and len(token) >= 40
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and os.stat(path).st_uid == os.getuid()
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    status, _, body = fetch_as(NOBODY, manager.url + "/api/status", {"Authorization": f"Bearer {token}"})
    assert status == 200 and json.loads(body)["services"]
    status, _, _ = fetch_as(NOBODY, manager.url + "/api/services/Chatty/stop",
                            dict(CSRF, Authorization=f"Bearer {token}"), "POST", b"{}")
    assert status == 200 and manager.service("Chatty")["state"] == "stopped"
    # a browser: the URL `speedysvc web` prints, opened once; a cookie carries the token after
    out = manager.cli("web")
    assert out.returncode == 0 and out.stdout.strip() == f"{manager.url}/?token={token}"
    status, headers, _ = fetch_as(NOBODY, out.stdout.strip())
    cookie = headers["Set-Cookie"]
    assert status == 200 and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert fetch_as(NOBODY, manager.url + "/api/status", {"Cookie": cookie.split(";")[0]})[0] == 200
    assert fetch_as(NOBODY, manager.url + "/api/status", {"Cookie": "speedysvc_token=wrong"})[0] == 403


def test_the_token_file_goes_with_the_manager(tmp_path):
    m = RunningManager(tmp_path, INI)
    path = access.token_path(m.port)
    assert os.path.exists(path)
    m.stop()
    assert not os.path.exists(path)
    out = subprocess.run([sys.executable, "-m", "speedysvc.cli", "--url", m.url, "web"], capture_output=True,
                         text=True, timeout=60, env=manager_env())
    assert out.returncode == 1 and "no access token" in out.stderr


def test_a_configured_token_is_the_one_kept_and_asked_for(running):
    m = running(chatty_ini(), env={"SPEEDYSVC_WEB_TOKEN": "s3cret-token"})
    assert access.read_token(m.port) == "s3cret-token"
    assert fetch_as(NOBODY, m.url + "/api/status", {"Authorization": "Bearer s3cret-token"})[0] == 200
    assert fetch_as(NOBODY, m.url + "/api/status", {"Authorization": "Bearer guess"})[0] == 403
    assert fetch(m.url + "/api/status")[0] == 200   # its own user still needs none


def test_the_peer_of_a_loopback_connection_is_found_by_its_socket(manager):
    """The lookup itself: a socket of ours, connected to the manager, is found with our uid, and
    one of another user with its uid; an address of no socket with None."""
    import socket
    with socket.create_connection(("127.0.0.1", manager.port)) as s:
        assert access.peer_uid(s.getsockname(), s.getpeername()) == os.getuid()
    assert access.peer_uid(("127.0.0.1", 1), ("127.0.0.1", manager.port)) is None
    assert access.peer_uid(("10.0.0.1", 40000), ("10.0.0.2", manager.port)) is None   # not this host's
