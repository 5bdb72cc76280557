"""Running a real service manager (python3 -m speedysvc.service) from a temporary folder."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningManager:
    def __init__(self, folder, ini_text, port=None, wait_ready=True, env=None):
        self.folder = str(folder)
        self.port = port or free_port()
        shutil.copy(os.path.join(HERE, "services.py"), self.folder)
        self.ini = os.path.join(self.folder, "service.ini")
        with open(self.ini, "w") as f:
            f.write(textwrap.dedent(ini_text).replace("{port}", str(self.port)))
        self.url = f"http://127.0.0.1:{self.port}"
        self.out = open(os.path.join(self.folder, "manager.out"), "w+")
        clean_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        clean_env.update(env or {})
        self.proc = subprocess.Popen([sys.executable, "-m", "speedysvc.service", "service.ini"], cwd=self.folder,
                                     stdout=self.out, stderr=subprocess.STDOUT, env=clean_env)
        if wait_ready:
            self.wait(lambda: self.get("/readyz", ok_only=False) == 200, 60, "the manager to be ready")

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
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        return subprocess.run([sys.executable, "-m", "speedysvc.cli", "--url", self.url, *args],
                              capture_output=True, text=True, timeout=timeout, env=env)

    def stop(self, sig=signal.SIGTERM, timeout=30):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout)
        self.out.close()
        return self.proc.returncode
