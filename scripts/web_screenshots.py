"""Retake the README's screenshots of the web interface (docs/web_index_screenshot.png and
docs/web_service_screenshot.png): a manager with three services under a bounded load for about
a minute (a scale and a rolling restart among it, a method that raises now and then), pictured
by a headless Chromium.

    python scripts/web_screenshots.py [--chromium /usr/bin/chromium] [--seconds 70]
"""
import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
DOCS = os.path.join(HERE, "..", "docs")

SERVICES = '''
import random
import time

from speedysvc import ServerMethodsBase, json_method, msgpack_method


class Orders(ServerMethodsBase):
    port = 47310
    name = "orders"

    @msgpack_method
    def place(self, item, quantity):
        time.sleep(random.uniform(0.001, 0.004))
        if quantity > 95:
            raise ValueError(f"quantity {quantity} of {item!r} is over the limit of 95")
        return {"item": item, "quantity": quantity}

    @msgpack_method
    def lookup(self, order_id):
        return {"id": order_id, "state": "shipped"}


class Search(ServerMethodsBase):
    port = 47311
    name = "search"

    @json_method
    def query(self, text):
        end = time.monotonic() + random.uniform(0.002, 0.01)
        while time.monotonic() < end:
            pass
        return [text] * 3


class Thumbnails(ServerMethodsBase):
    port = 47312
    name = "thumbnails"

    def __init__(self):
        raise RuntimeError("cannot open the image library: libvips.so.42 not found")

    @msgpack_method
    def make(self, path):
        return path
'''

INI = """
[defaults]
log_dir=logs

[Orders]
import_from=services
min_proc_num=1
max_proc_num=4

[Search]
import_from=services
min_proc_num=2
max_proc_num=4

[Thumbnails]
import_from=services
crash_limit=2

[web monitor]
port={port}
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, body=None):
    req = urllib.request.Request(url, data=json.dumps(body or {}).encode(), method="POST",
                                 headers={"X-Speedysvc-Request": "1", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    ap.add_argument("--seconds", type=float, default=70.0)
    args = ap.parse_args()
    # (shared-memory names of their own, beside any other manager of this host)
    os.environ.setdefault("SPEEDYSVC_NAMESPACE", f"shots-{os.getpid()}")
    folder = tempfile.mkdtemp(prefix="speedysvc-shots-")
    port = free_port()
    with open(os.path.join(folder, "services.py"), "w") as f:
        f.write(textwrap.dedent(SERVICES))
    with open(os.path.join(folder, "service.ini"), "w") as f:
        f.write(INI.format(port=port))
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = open(os.path.join(folder, "manager.out"), "w")
    manager = subprocess.Popen([sys.executable, "-m", "speedysvc.service", "service.ini"], cwd=folder,
                               stdout=out, stderr=subprocess.STDOUT, env=env)
    stop = threading.Event()
    threads = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url + "/api/status", timeout=5) as r:
                    status = json.loads(r.read())
                if all(s["state"] in ("running", "failed") for s in status["services"]):
                    break
            except OSError:
                pass
            time.sleep(0.2)
        sys.path.insert(0, folder)
        from speedysvc import connect
        import services

        def orders():
            with connect(services.Orders, timeout=30) as c:
                while not stop.is_set():
                    try:
                        c.place("widget", random.randint(1, 100))
                        c.lookup(random.randint(1, 10 ** 6))
                    except ValueError:
                        pass
                    except Exception:
                        time.sleep(0.05)
                    time.sleep(0.002)

        def search():
            with connect(services.Search, timeout=30) as c:
                while not stop.is_set():
                    try:
                        c.query("blue shoes")
                    except Exception:
                        time.sleep(0.05)
                    time.sleep(0.004)

        threads = [threading.Thread(target=f) for f in (orders, orders, search)]
        for t in threads:
            t.start()
        time.sleep(args.seconds * 0.4)
        post(url + "/api/services/Orders/scale", {"workers": 3})
        time.sleep(args.seconds * 0.3)
        post(url + "/api/services/Search/restart")
        time.sleep(args.seconds * 0.3)

        from playwright.sync_api import sync_playwright
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1440, "height": 640})
            page.goto(url + "/")
            time.sleep(3)
            page.screenshot(path=os.path.join(DOCS, "web_index_screenshot.png"))
            page = browser.new_page(viewport={"width": 1440, "height": 1650})
            page.goto(url + "/services/Orders")
            page.wait_for_function("() => Number(document.querySelector('figure[data-chart=\"calls\"]')"
                                   ".dataset.points) > 10", timeout=30000)
            page.locator('#errors details[data-method="place"] summary').click()
            time.sleep(3)
            page.screenshot(path=os.path.join(DOCS, "web_service_screenshot.png"))
            browser.close()
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        manager.terminate()
        manager.wait(60)
        out.close()
        shutil.rmtree(folder, ignore_errors=True)
    print("docs/web_index_screenshot.png and docs/web_service_screenshot.png retaken")


if __name__ == "__main__":
    main()
