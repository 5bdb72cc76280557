"""The application of the same-pod example (deploy/kubernetes/same-pod-deployment.yaml): a small
HTTP server that calls Greeter over shared memory, the manager running in another container of
the pod.  Both containers share /dev/shm (an emptyDir of medium Memory), the PID namespace
(shareProcessNamespace: a caller checks that the worker serving its call is alive through /proc)
and the user (segments are the user's, mode 0600).

    GET /greet?name=Ada   ->  Hello, Ada!
    GET /healthz          ->  200 while this server runs
    GET /readyz           ->  200 once Greeter answers over shared memory, else 503
"""
import os
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from speedysvc import SpeedysvcError, connect

from greeter import Greeter

PORT = int(os.environ.get("APP_PORT", "8080"))
greeter = connect(Greeter, "shm://", timeout=5)   # thread-safe: one client for every request


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        url = urlparse(self.path)
        if url.path == "/healthz":
            return self.answer(200, "ok")
        if url.path == "/readyz":
            try:
                greeter.with_timeout(1).greet("readyz")
            except SpeedysvcError as e:
                return self.answer(503, f"Greeter does not answer: {e}")
            return self.answer(200, "ready")
        if url.path == "/greet":
            name = parse_qs(url.query).get("name", ["world"])[0]
            try:
                return self.answer(200, greeter.greet(name))
            except SpeedysvcError as e:
                return self.answer(503, str(e))
        return self.answer(404, "not found")

    def answer(self, status, text):
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = False   # server_close() waits for the requests in hand


def main():
    server = Server(("0.0.0.0", PORT), Handler)
    # SIGTERM (the pod stops): answer the requests in hand, then exit; the manager, a sidecar,
    # stops after this container has exited
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    try:
        server.serve_forever()
    finally:
        server.server_close()
        greeter.close()


if __name__ == "__main__":
    main()
