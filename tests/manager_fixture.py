"""Running a real service manager (python3 -m speedysvc.service) from a temporary folder, with
tests/services.py beside its ini file.  A pytest plugin (see conftest.py): its ``running``
fixture is there for every test."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request

import pytest

from conftest import free_port

HERE = os.path.dirname(os.path.abspath(__file__))


def manager_env() -> dict:
    """The environment a manager (or a CLI) runs in: the tests' PYTHONPATH is not inherited, so
    the services are imported from the ini file's folder, as a user's would be."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def prepare_folder(folder, ini_text: str) -> str:
    """Copy services.py into ``folder`` and write its service.ini; returns the ini's path."""
    shutil.copy(os.path.join(HERE, "services.py"), str(folder))
    ini = os.path.join(str(folder), "service.ini")
    with open(ini, "w") as f:
        f.write(textwrap.dedent(ini_text))
    return ini


def run_seed_script(folder, script: str, timeout=240) -> subprocess.CompletedProcess:
    """Run ``script`` in ``folder`` beside the seed README's files (examples/echo), whose manager
    needs port 5155: in a network namespace of its own when root; otherwise the test is skipped
    while that port is taken (the README's example running, say)."""
    example = os.path.join(HERE, "..", "examples", "echo")
    for name in ("echoserver.py", "echoclient.py", "service.ini"):
        shutil.copy(os.path.join(example, name), str(folder))
    with open(os.path.join(str(folder), "run.py"), "w") as f:
        f.write(script)
    run = [sys.executable, "run.py"]
    if os.getuid() == 0 and shutil.which("unshare") and shutil.which("ip"):
        run = ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"] + run
    else:
        import socket
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", 5155)) == 0:
                pytest.skip("port 5155 is taken (the README's example runs?) and a network namespace needs root")
    return subprocess.run(run, cwd=str(folder), env=manager_env(), capture_output=True, text=True, timeout=timeout)


def run_manager(folder, ini_text: str, timeout=120) -> subprocess.CompletedProcess:
    """Run a manager in ``folder`` to its end (one that refuses to start): its exit code and output."""
    prepare_folder(folder, ini_text)
    return subprocess.run([sys.executable, "-m", "speedysvc.service", "service.ini"], cwd=str(folder),
                          capture_output=True, text=True, timeout=timeout, env=manager_env())


# The Chatty service alone, with the web interface on the manager's free port.
CHATTY = """
    [defaults]
    log_dir=logs

    [Chatty]
    import_from=services
    min_proc_num={min}
    max_proc_num={max}
    {extra}

    [web monitor]
    port={{port}}
"""


def chatty_ini(min=1, max=1, extra=""):
    return CHATTY.format(min=min, max=max, extra=textwrap.dedent(extra).replace("\n", "\n    "))


class RunningManager:
    def __init__(self, folder, ini_text, port=None, wait_ready=True, env=None, args=None):
        """``args``: the manager's command line after the interpreter (default
        ``-m speedysvc.service service.ini``)."""
        self.folder = str(folder)
        self.port = port or free_port()
        self.ini = prepare_folder(self.folder, textwrap.dedent(ini_text).replace("{port}", str(self.port)))
        self.url = f"http://127.0.0.1:{self.port}"
        self.out = open(os.path.join(self.folder, "manager.out"), "w+")
        clean_env = manager_env()
        clean_env.update(env or {})
        args = args or ["-m", "speedysvc.service", "service.ini"]
        self.proc = subprocess.Popen([sys.executable, *args], cwd=self.folder,
                                     stdout=self.out, stderr=subprocess.STDOUT, env=clean_env)
        if wait_ready:
            try:
                self.wait(lambda: self.get("/readyz", ok_only=False) == 200, 60, "the manager to be ready")
            except BaseException:   # (no test holds it yet to stop it: it would outlive the run)
                self.stop(timeout=30)
                raise

    def wait(self, predicate, timeout=20, what="a condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"manager exited with {self.proc.returncode}: {self.output()}")
            try:
                if predicate():
                    return
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; manager said: {self.output()[-3000:]}")

    def output(self):
        self.out.flush()
        self.out.seek(0)
        return self.out.read()

    def get(self, path, ok_only=True):
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as r:
                return json.loads(r.read()) if ok_only else r.status
        except urllib.error.HTTPError as e:
            if ok_only:
                raise
            return e.code

    def post(self, path, body=None, headers=None):
        h = {"X-Speedysvc-Request": "1", "Content-Type": "application/json"}
        h.update(headers or {})
        req = urllib.request.Request(self.url + path, data=json.dumps(body or {}).encode(), headers=h, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def service(self, name):
        return self.get(f"/api/services/{name}")

    def cli(self, *args, timeout=60):
        return subprocess.run([sys.executable, "-m", "speedysvc.cli", "--url", self.url, *args],
                              capture_output=True, text=True, timeout=timeout, env=manager_env())

    def stop(self, sig=signal.SIGTERM, timeout=30):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout)
        self.out.close()
        return self.proc.returncode


@pytest.fixture
def running(tmp_path):
    """running(ini_text, **RunningManager options) starts a manager in tmp_path; all are stopped after the test."""
    managers = []

    def start(ini, **kw):
        m = RunningManager(tmp_path, ini, **kw)
        managers.append(m)
        return m

    yield start
    for m in managers:
        try:
            m.stop(timeout=30)
        except subprocess.TimeoutExpired:
            m.proc.kill()
            m.proc.wait()
            raise
