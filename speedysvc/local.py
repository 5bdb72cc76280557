"""Run a service's workers from Python, without the service manager (for tests and scripts).

    with LocalService(EchoServer, workers=4):
        client = connect(EchoServer)
        client.echo_json("hi")

The workers are separate processes (``python -m speedysvc.worker``) that import
the service class by module name, or by file for a class defined in a script.
This owner process creates the service segment and removes it on exit.  It does
not restart crashed workers; the service manager does.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from . import _shmcore as core
from . import shm


def target_of(server_cls) -> str:
    """How a worker process finds the class: ``module:Qualname`` or ``file.py:Qualname``."""
    module = sys.modules.get(server_cls.__module__)
    if server_cls.__module__ in ("__main__", "__mp_main__") or module is None:
        path = getattr(module, "__file__", None)
        if not path:
            raise ValueError(f"{server_cls.__qualname__} is defined where a worker cannot import it "
                             f"(an interactive session?); define it in a module")
        return f"{os.path.abspath(path)}:{server_cls.__qualname__}"
    return f"{server_cls.__module__}:{server_cls.__qualname__}"


class LocalService:
    def __init__(self, server_cls, workers: int = 1, *, max_channels: int = shm.DEFAULT_MAX_CHANNELS,
                 max_payload: int = shm.DEFAULT_MAX_PAYLOAD, start_timeout: float = 30.0,
                 stop_timeout: float = 10.0, env: dict | None = None):
        if workers < 1 or workers > core.MAX_WORKERS:
            raise ValueError(f"workers must be 1..{core.MAX_WORKERS}, got {workers}")
        self.server_cls = server_cls
        self.service = server_cls.service_name()
        self.target = target_of(server_cls)
        self.n_workers = workers
        self.max_channels = max_channels
        self.max_payload = max_payload
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.env = env
        self.segment: shm.ServiceSegment | None = None
        self.processes: list[subprocess.Popen] = []

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes if p.poll() is None]

    def _spawn(self) -> subprocess.Popen:
        env = dict(os.environ if self.env is None else self.env)
        paths = [p for p in sys.path if p] + [os.getcwd()]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        proc = subprocess.Popen([sys.executable, "-m", "speedysvc.worker", self.target, self.service],
                                env=env, stdin=subprocess.DEVNULL)
        self.processes.append(proc)
        return proc

    def start(self) -> "LocalService":
        self.segment = shm.ServiceSegment.create(self.service, max_channels=self.max_channels,
                                                 max_payload=self.max_payload)
        self.segment.set_state(core.SVC_SERVING)  # calls may queue while workers start
        try:
            for _ in range(self.n_workers):
                self._spawn()
            self.wait_for_workers(self.n_workers, self.start_timeout)
            self.segment.mark_workers_started()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_for_workers(self, n: int, timeout: float, starting=None) -> None:
        """Wait until ``n`` workers serve; fail early if one of ``starting`` exits."""
        deadline = time.monotonic() + timeout
        starting = self.processes if starting is None else starting
        while len(self.segment.workers()) < n:
            dead = [p for p in starting if p.poll() is not None]
            if dead:
                raise RuntimeError(f"worker of {self.service!r} exited with code {dead[0].returncode} "
                                   f"while starting (see its stderr)")
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers of {self.service!r} did not start within {timeout} s")
            time.sleep(0.005)

    def add_worker(self) -> int:
        """Start one more worker and wait until it serves; returns its pid."""
        self.segment.reap()  # forget workers that died
        before = len(self.segment.workers())
        proc = self._spawn()
        self.wait_for_workers(before + 1, self.start_timeout, [proc])
        return proc.pid

    def stop(self) -> None:
        """Refuse new calls, let queued and running calls finish (up to stop_timeout),
        then stop the workers and remove the segments."""
        seg = self.segment
        if seg is None:
            return
        seg.set_state(core.SVC_STOPPING)
        seg.kick_workers()
        deadline = time.monotonic() + self.stop_timeout
        for p in self.processes:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in self.processes:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()
        seg.destroy()
        self.segment = None
        self.processes = []

    def __enter__(self) -> "LocalService":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv=None) -> int:
    """``python -m speedysvc.local module:Class [--workers N]``: serve until Ctrl-C or SIGTERM."""
    import argparse

    from .worker import load_target

    parser = argparse.ArgumentParser(prog="python -m speedysvc.local",
                                     description="Run one service's workers until Ctrl-C (no manager).")
    parser.add_argument("target", help="module:Class or path/file.py:Class")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    sys.path.insert(0, os.getcwd())
    server_cls = load_target(args.target)
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    with LocalService(server_cls, workers=args.workers) as svc:
        print(f"serving {svc.service!r} with {len(svc.pids)} workers (pids {svc.pids}); Ctrl-C stops",
              flush=True)
        try:
            while not stop:
                time.sleep(0.2)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
