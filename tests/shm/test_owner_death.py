"""The owner of a service (LocalService's process, the manager) killed with -9: every one of its
workers is gone within 2 s, an idle one, one inside a call that never returns, and under traffic."""
import os
import signal
import subprocess
import textwrap
import threading
import time

import pytest

from speedysvc import MethodNotFound, connect, shm
from speedysvc import _shmcore as core
from conftest import wait_until
from shm_helpers import python_child
from shm_services import Stuck

# README and docs/shm-protocol.md: every worker of a dead owner is gone within this long
OWNER_DEATH_BOUND = 2.0

OWNERS = {
    # LocalService in the owner's main thread
    "LocalService": """
        svc = LocalService(Stuck, workers=2).start()
    """,
    # started from a thread that ends: a parent-death signal would come when that thread ends
    "LocalService from a thread that ended": """
        holder = []
        th = threading.Thread(target=lambda: holder.append(LocalService(Stuck, workers=2).start()))
        th.start()
        th.join()
        svc = holder[0]
    """,
    # as the manager starts its workers: a supervised segment, workers in a session of their own
    # with a parent-death signal (SPEEDYSVC_PARENT_DEATH_SIGNAL)
    "supervisor like the manager": """
        from speedysvc import _shmcore as core
        from speedysvc.shm.worker import PARENT_DEATH_ENV, worker_argv, worker_env
        seg = shm.ServiceSegment.create("stuck", supervised=True)
        seg.set_state(core.SVC_SERVING)
        env = worker_env([p for p in sys.path if p])
        env[PARENT_DEATH_ENV] = "1"
        procs = [subprocess.Popen(worker_argv("shm_services:Stuck", "stuck"), env=env, stdin=subprocess.DEVNULL,
                                  start_new_session=True) for _ in range(2)]
        while len(seg.workers()) < 2:
            assert all(p.poll() is None for p in procs)
            time.sleep(0.01)
    """,
}

OWNER_CODE = """
    import subprocess, sys, threading, time
    from speedysvc import LocalService, shm
    from shm_services import Stuck
{start}
    print(" ".join(str(w["pid"]) for w in shm.ServiceSegment.attach("stuck").workers()), flush=True)
    time.sleep(300)
"""


class Owner:
    """An owner of the Stuck service in a process of its own, and its workers."""

    def __init__(self, kind):
        start = textwrap.indent(textwrap.dedent(OWNERS[kind]), "    ")
        self.proc = python_child(OWNER_CODE.format(start=start), stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line.strip(), f"the owner did not start (exit code {self.proc.wait()})"
        seg = shm.ServiceSegment.attach("stuck")
        self.workers = {w["pid"]: seg.region.load64(seg.worker_offset(w["index"]) + core.W_START_TICKS)
                        for w in seg.workers()}
        assert sorted(self.workers) == sorted(map(int, line.split()))
        self.segment = seg

    def alive(self):
        return [pid for pid, start in self.workers.items() if shm.process_alive(pid, start)]

    def kill(self):
        self.proc.kill()
        self.proc.wait()

    def close(self):
        self.kill()
        self.proc.stdout.close()
        for pid in self.alive():   # what the test found still running
            os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: not self.alive(), timeout=10)
        shm.remove_service_segments("stuck")


def call_in_thread(fn):
    outcome = []

    def run():
        try:
            outcome.append(fn())
        except BaseException as e:
            outcome.append(e)
    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th, outcome


@pytest.mark.parametrize("kind", sorted(OWNERS))
def test_every_worker_of_a_killed_owner_is_gone_even_inside_a_call(kind):
    owner = Owner(kind)
    try:
        with connect(Stuck, timeout=60) as c:
            th, outcome = call_in_thread(c.forever)
            assert wait_until(lambda: any(w["busy"] for w in owner.segment.workers()))
            assert len(owner.alive()) == 2   # one inside the call, one idle
            owner.kill()
            t = time.monotonic()
            gone = wait_until(lambda: not owner.alive(), timeout=OWNER_DEATH_BOUND)
            elapsed = time.monotonic() - t
            assert gone, f"{len(owner.alive())} worker(s) still running {elapsed:.1f} s after the owner died"
            th.join(10)
            # the caller learns its worker died (or that the service is gone), and does not hang
            assert outcome and isinstance(outcome[0], ConnectionError), outcome
    finally:
        owner.close()


def test_the_workers_of_a_killed_owner_go_under_steady_traffic():
    owner = Owner("LocalService")
    stop = threading.Event()

    def traffic():   # calls the C loop hands back to Python, back to back
        from services import KitchenNewer

        class StuckNewer(KitchenNewer):
            name = "stuck"
        n = 0
        try:
            with connect(StuckNewer, timeout=5) as c:
                while not stop.is_set():
                    try:
                        c.added_later()
                    except MethodNotFound:
                        n += 1
        except ConnectionError:   # the workers went
            pass
        return n

    try:
        th, outcome = call_in_thread(traffic)
        time.sleep(0.5)
        owner.kill()
        gone = wait_until(lambda: not owner.alive(), timeout=OWNER_DEATH_BOUND)
        stop.set()
        th.join(20)
        assert gone, f"{len(owner.alive())} worker(s) still serving after the owner died"
        assert outcome and outcome[0] > 100, outcome
    finally:
        stop.set()
        owner.close()
