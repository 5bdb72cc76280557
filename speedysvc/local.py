"""Run a service's workers from Python, without the service manager (for tests and scripts).

    with LocalService(EchoServer, workers=4):
        client = connect(EchoServer)
        client.echo_json("hi")

The workers are separate processes (``python -m speedysvc.shm.worker``) that import
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
from .shm.worker import FILE_MODULE, worker_argv, worker_env
from .tcp.options import SECRET_ENV, ServeOptions, inflight_for


def target_of(server_cls) -> str:
    """How a worker process finds the class: ``module:Qualname`` or ``file.py:Qualname``."""
    module = sys.modules.get(server_cls.__module__)
    if server_cls.__module__ in ("__main__", "__mp_main__", FILE_MODULE) or module is None:
        path = getattr(module, "__file__", None)
        if not path:
            raise ValueError(f"{server_cls.__qualname__} is defined where a worker cannot import it "
                             f"(an interactive session?); define it in a module")
        return f"{os.path.abspath(path)}:{server_cls.__qualname__}"
    return f"{server_cls.__module__}:{server_cls.__qualname__}"


TCP_IN_WORKERS_ENV = "SPEEDYSVC_TCP_IN_WORKERS"


class LocalService:
    def __init__(self, server_cls, workers: int = 1, *, max_channels: int = shm.DEFAULT_MAX_CHANNELS,
                 max_payload: int = shm.DEFAULT_MAX_PAYLOAD, start_timeout: float = 30.0,
                 stop_timeout: float = 10.0, env: dict | None = None, tcp: str | None = None,
                 tcp_secret=None, tcp_tls: tuple[str, str] | None = None, tcp_allow_pickle: bool = False,
                 tcp_handshake_timeout: float = ServeOptions.handshake_timeout,
                 tcp_stall_timeout: float = ServeOptions.stall_timeout, tcp_in_workers: bool | None = None,
                 tcp_max_connections: int = ServeOptions.max_connections,
                 tcp_max_handshakes: int = ServeOptions.max_handshakes):
        """``tcp='HOST[:PORT]'`` also serves TCP clients (PORT defaults to the class's
        ``port``; 0 picks a free one, see ``tcp_address``), in a gateway process of its own,
        or, with ``tcp_in_workers``, in the workers themselves (``speedysvc.tcp.inworker``:
        each listens on the port with SO_REUSEPORT; this process holds the port), which is the
        default; ``tcp_in_workers=False`` runs the gateway.  Without the argument,
        ``SPEEDYSVC_TCP_IN_WORKERS=0`` in the environment chooses the gateway (so a test suite
        can run either way).  ``tcp_max_connections`` and ``tcp_max_handshakes`` are the
        service.ini keys of the same names (held across the workers when they serve TCP)."""
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
        self.tcp = tcp
        self.tcp_secret = tcp_secret
        self.tcp_tls = tcp_tls
        self.tcp_allow_pickle = tcp_allow_pickle
        self.tcp_timeouts = (tcp_handshake_timeout, tcp_stall_timeout)
        self.tcp_limits = (tcp_max_connections, tcp_max_handshakes)
        self.tcp_process: subprocess.Popen | None = None
        self.tcp_address: str | None = None     # tcp://host:port once serving
        self.tcp_in_workers = (os.environ.get(TCP_IN_WORKERS_ENV) != "0") if tcp_in_workers is None \
            else tcp_in_workers
        self.tcp_reservation = None             # (tcp_in_workers) the socket that holds the port
        self.tcp_env: dict = {}                 # (tcp_in_workers) the options the workers serve with

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes if p.poll() is None]

    def _env(self) -> dict:
        return worker_env([p for p in sys.path if p] + [os.getcwd()], self.env)

    def _spawn(self) -> subprocess.Popen:
        proc = subprocess.Popen(worker_argv(self.target, self.service), env={**self._env(), **self.tcp_env},
                                stdin=subprocess.DEVNULL)
        self.processes.append(proc)
        return proc

    def start(self) -> "LocalService":
        self.segment = shm.ServiceSegment.create(self.service, max_channels=self.max_channels,
                                                 max_payload=self.max_payload)
        self.segment.set_state(core.SVC_SERVING)  # calls may queue while workers start
        try:
            if self.tcp and self.tcp_in_workers:
                self._reserve_tcp()
            for _ in range(self.n_workers):
                self._spawn()
            self.wait_for_workers(self.n_workers, self.start_timeout)
            self.segment.mark_workers_started()
            if self.tcp and not self.tcp_in_workers:
                self._start_tcp()
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

    def _tcp_options(self) -> ServeOptions:
        if self.tcp.startswith("["):          # [v6] or [v6]:port
            host, _, port = self.tcp[1:].partition("]")
            port = port.lstrip(":")
        elif self.tcp.count(":") == 1:       # host:port
            host, _, port = self.tcp.partition(":")
        else:                                # host, or a bare IPv6 address
            host, port = self.tcp, ""
        try:
            port = int(port) if port else self.server_cls.port
        except ValueError:
            raise ValueError(f"tcp={self.tcp!r}: the port must be a number") from None
        if not isinstance(port, int):
            raise ValueError(f"tcp={self.tcp!r} names no port and {self.server_cls.__qualname__}.port is {port!r}")
        # the secret given, else the one the gateway's environment holds (as it would read it itself)
        secret = self.tcp_secret or self._env().get(SECRET_ENV) or None
        secret = secret.decode() if isinstance(secret, bytes) else secret
        try:
            options = ServeOptions(host=host, port=port, secret=secret,
                                   tls_cert=self.tcp_tls[0] if self.tcp_tls else None,
                                   tls_key=self.tcp_tls[1] if self.tcp_tls else None,
                                   allow_pickle=self.tcp_allow_pickle, max_payload=self.max_payload,
                                   max_inflight=inflight_for(self.max_channels),
                                   handshake_timeout=self.tcp_timeouts[0], stall_timeout=self.tcp_timeouts[1],
                                   max_connections=self.tcp_limits[0], max_handshakes=self.tcp_limits[1],
                                   stop_timeout=self.stop_timeout)
        except ValueError as e:
            raise RuntimeError(f"the TCP server of {self.service!r} cannot start: {e}") from None
        return options

    def _set_address(self, bound_host: str, bound_port) -> None:
        self.tcp_address = f"tcp://[{bound_host}]:{bound_port}" if ":" in bound_host else f"tcp://{bound_host}:{bound_port}"

    def _reserve_tcp(self) -> None:
        """TCP served by the workers: hold the port (port 0 resolves here, once), and give the
        workers the options (the secret in their environment, as the gateway gets it)."""
        from .tcp.inworker import reserve_port
        options = self._tcp_options()
        try:
            self.tcp_reservation = reserve_port(options.host, options.port)
        except OSError as e:
            raise RuntimeError(f"the TCP server of {self.service!r} cannot bind {options.host}:{options.port}: "
                               f"{e}") from None
        port = self.tcp_reservation.getsockname()[1]
        self.tcp_env = options.replace(port=port).to_env()
        self._set_address(options.host, port)

    def _start_tcp(self) -> None:
        options = self._tcp_options()
        secret = options.secret
        env = self._env()
        if secret is not None:
            env[SECRET_ENV] = secret.decode("utf-8", "surrogateescape")
        argv = ([sys.executable, "-m", "speedysvc.tcp.serve", self.service] + options.to_argv()
                + ["--exit-with-parent", str(os.getpid())])
        proc = self.tcp_process = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                                   stdout=subprocess.PIPE, text=True)
        line = proc.stdout.readline()
        if not line.startswith("listening on "):
            proc.wait()
            raise RuntimeError(f"the TCP server of {self.service!r} did not start (exit code {proc.returncode}; "
                               f"see its stderr)")
        bound_host, _, bound_port = line.split()[-1].rpartition(":")
        self._set_address(bound_host, bound_port)

    def stop(self) -> None:
        """Refuse new calls, let queued and running calls finish (up to stop_timeout),
        then stop the workers and remove the segments."""
        seg = self.segment
        if seg is None:
            return
        if self.tcp_process is not None:
            self.tcp_process.terminate()
            try:
                self.tcp_process.wait(self.stop_timeout + 5)
            except subprocess.TimeoutExpired:
                self.tcp_process.kill()
                self.tcp_process.wait()
            self.tcp_process.stdout.close()
            self.tcp_process = None
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
        if self.tcp_reservation is not None:
            self.tcp_reservation.close()
            self.tcp_reservation = None

    def __enter__(self) -> "LocalService":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv=None) -> int:
    """``python -m speedysvc.local module:Class [--workers N]``: serve until Ctrl-C or SIGTERM."""
    import argparse

    from .shm.worker import load_target

    parser = argparse.ArgumentParser(prog="python -m speedysvc.local",
                                     description="Run one service's workers until Ctrl-C (no manager).")
    parser.add_argument("target", help="module:Class or path/file.py:Class")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--tcp", metavar="HOST[:PORT]", help="also serve TCP clients (secret: SPEEDYSVC_TCP_SECRET)")
    args = parser.parse_args(argv)
    sys.path.insert(0, os.getcwd())
    server_cls = load_target(args.target)
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    with LocalService(server_cls, workers=args.workers, tcp=args.tcp, tcp_secret=os.environ.get(SECRET_ENV)) as svc:
        print(f"serving {svc.service!r} with {len(svc.pids)} workers (pids {svc.pids})"
              + (f" and on {svc.tcp_address}" if svc.tcp_address else "") + "; Ctrl-C stops", flush=True)
        try:
            while not stop:
                time.sleep(0.2)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
