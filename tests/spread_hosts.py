"""Managers of the ``Spread`` service (tests/services.py), one per "host": for the tests of
clients over several endpoints (tests/tcp/test_tcp_balanced.py on loopback addresses,
tests/hosts/ in network namespaces).  Each has a SPEEDYSVC_NAMESPACE of its own (one
service, several managers), says which host it is in its answers (SPREAD_HOST), and is
cleaned up after, segments included, even when a test killed it with SIGKILL."""
import os
import signal
import subprocess
import sys
import time

from manager_fixture import manager_env, prepare_folder

INI = """
[defaults]
log_dir=logs

[Spread]
import_from=services
min_proc_num=2
max_proc_num=2
bind_tcp={bind}
{extra}

[web monitor]
port=0
"""


class Host:
    """A manager serving Spread on ``bind`` (its TCP port: Spread.port), started at once;
    ``prefix``: the command line's start (``ip netns exec NAME`` for a namespace)."""

    def __init__(self, folder, name: str, bind: str, prefix=(), extra: str = "", env=None):
        os.makedirs(str(folder), exist_ok=True)
        self.name, self.bind = name, bind
        self.namespace = f"{os.environ['SPEEDYSVC_NAMESPACE']}{name}"[:32]
        prepare_folder(folder, INI.format(bind=bind, extra=extra))
        self.out = open(os.path.join(str(folder), "manager.out"), "w+")
        clean = manager_env()
        clean.update({"SPEEDYSVC_NAMESPACE": self.namespace, "SPREAD_HOST": name}, **(env or {}))
        self.proc = subprocess.Popen([*prefix, sys.executable, "-m", "speedysvc.service", "service.ini"],
                                     cwd=str(folder), stdout=self.out, stderr=subprocess.STDOUT, env=clean)

    def wait_ready(self, timeout: float = 60.0) -> "Host":
        """Until it answers over TCP (from this network namespace)."""
        from speedysvc import connect
        from services import Spread
        with connect(Spread, f"tcp://{self.bind}", timeout=timeout, wait=timeout) as c:
            try:
                assert c.where() == self.name
            except Exception:
                raise AssertionError(f"host {self.name} did not come up: {self.output()[-3000:]}")
        return self

    def output(self) -> str:
        self.out.flush()
        self.out.seek(0)
        return self.out.read()

    def kill(self) -> None:
        """SIGKILL of the manager (its workers, and their TCP listeners, follow it)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)

    def freeze(self, on: bool = True) -> None:
        """SIGSTOP (``on``) or SIGCONT to every process of this host, as a host cut off answers
        nothing: its manager and its workers (which serve TCP themselves by default)."""
        for pid in self.processes():
            try:
                os.kill(pid, signal.SIGSTOP if on else signal.SIGCONT)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        try:
            self.freeze(False)   # (a test may have stopped it)
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(30)
        finally:
            self.out.close()
            self.remove_segments()

    def processes(self) -> list:
        """The processes of this host (its manager and workers: they have its namespace)."""
        mark = f"SPEEDYSVC_NAMESPACE={self.namespace}\0".encode()
        found = []
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    with open(f"/proc/{pid}/environ", "rb") as f:
                        if mark in f.read() + b"\0":
                            found.append(int(pid))
                except OSError:
                    pass
        return found

    def remove_segments(self, timeout: float = 10.0) -> None:
        """Once its processes are gone (the workers of a manager killed with SIGKILL follow it),
        what it left in /dev/shm: its namespace is this test run's own."""
        deadline = time.monotonic() + timeout
        while (left := self.processes()) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        prefix = f"speedysvc-{self.namespace}."
        for n in os.listdir("/dev/shm"):
            if n.startswith(prefix):
                try:
                    os.unlink(os.path.join("/dev/shm", n))
                except FileNotFoundError:
                    pass
