"""A worker's housekeeping (reaping dead callers' channels, dropping the mappings of channels that
were freed, checking on the service and its parent) runs at least once a second whatever the
traffic, including traffic that the C loop hands back to Python on every call."""
import subprocess
import threading
import time

import pytest

from speedysvc import LocalService, MethodNotFound, connect, shm
from conftest import channel_states, wait_until
from services import Kitchen, KitchenNewer
from shm_helpers import python_child

# docs/shm-protocol.md, "Reclaiming": a dead caller's channels are reclaimed within this long
RECLAIM_BOUND = 2.0


class Traffic:
    """Calls that the worker's C loop hands back to Python each time (a method the service does
    not have), back to back from a thread, until stopped."""

    def __init__(self):
        self.calls = 0
        self.errors = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self):
        try:
            with connect(KitchenNewer, timeout=20) as c:
                while not self._stop.is_set():
                    try:
                        c.added_later()
                    except MethodNotFound:
                        self.calls += 1
        except BaseException as e:
            self.errors.append(e)

    def __enter__(self):
        self._thread.start()
        assert wait_until(lambda: self.calls > 100 or self.errors, timeout=10), "no traffic"
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(30)
        assert not self.errors, self.errors


def test_a_dead_callers_channel_is_reclaimed_under_steady_traffic():
    victim_code = """
        import time
        from speedysvc import connect
        from services import Kitchen
        c = connect(Kitchen)
        c.echo_msgpack(1)
        print("ready", flush=True)
        time.sleep(120)
    """
    with LocalService(Kitchen, workers=1) as svc, Traffic() as traffic:
        victim = python_child(victim_code, stdout=subprocess.PIPE)
        try:
            assert victim.stdout.readline().strip() == b"ready"
            assert any(owner == victim.pid for owner, _ in channel_states(svc).values())
        finally:
            victim.kill()
            victim.wait()
            victim.stdout.close()
        before = traffic.calls
        t = time.monotonic()
        reclaimed = wait_until(lambda: all(owner != victim.pid for owner, _ in channel_states(svc).values()),
                               timeout=RECLAIM_BOUND)
        elapsed = time.monotonic() - t
        assert traffic.calls > before, "the traffic stopped"
        assert reclaimed, f"the dead caller's channel was still held {elapsed:.1f} s after it died"


def _mapped(pid: int, prefix: str) -> tuple[int, int]:
    """(channels' data segments of the service that ``pid`` maps, the shared memory in its RSS,
    bytes: what the mappings hold, whatever its allocator does with its heap)."""
    with open(f"/proc/{pid}/maps") as f:
        segments = {line.split(None, 5)[5].split()[0] for line in f if prefix in line}
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssShmem:"))
    return len(segments), rss


@pytest.mark.parametrize("ending", ["close", "killed"])
def test_worker_memory_stays_bounded_under_a_stream_of_short_lived_clients(ending):
    """Short-lived clients, one after another, each making one 2 MiB call.  Each one's channel is
    a first call on a new channel for the worker (handed back to Python); when the client goes,
    the worker must drop its mapping soon, or its memory stays mapped."""
    duration, interval, size = 6.0, 0.05, 2 << 20
    end_client = "c.close()" if ending == "close" else "os.kill(os.getpid(), signal.SIGKILL)"
    spawner_code = f"""
        import os, signal, time
        from speedysvc import connect
        from services import Kitchen
        payload = b"x" * {size}
        end = time.monotonic() + {duration}
        n = 0
        while time.monotonic() < end:
            t = time.monotonic()
            pid = os.fork()
            if pid == 0:
                try:
                    c = connect(Kitchen, timeout=20)
                    assert c.size_of(payload) == {size}
                    {end_client}
                finally:
                    os._exit(0)
            os.waitpid(pid, 0)
            n += 1
            time.sleep(max(0.0, {interval} - (time.monotonic() - t)))
        print(n, flush=True)
    """
    prefix = f"/dev/shm/{shm.PREFIX}.{shm.USER}.kitchen."
    with LocalService(Kitchen, workers=1) as svc:
        worker = svc.pids[0]
        _, rss_before = _mapped(worker, prefix)
        spawner = python_child(spawner_code, stdout=subprocess.PIPE, text=True)
        samples = []
        try:
            while spawner.poll() is None:
                samples.append(_mapped(worker, prefix))
                time.sleep(0.1)
            clients = int(spawner.stdout.read())
        finally:
            spawner.kill()
            spawner.wait()
            spawner.stdout.close()
        assert spawner.returncode == 0 and clients >= 10, clients
        rate = clients / duration
        # every departed client's mapping is dropped within ~1 s (the housekeeping interval) and
        # its channel reclaimed within 2 s; allow what 2.5 s of clients could leave, and more
        bound = rate * 2.5 + 5
        held = max(n for n, _ in samples)
        grown = max(r for _, r in samples) - rss_before
        assert held <= bound, (f"the worker mapped the channels of {held} clients at once "
                               f"(of {clients} in {duration} s)")
        assert grown <= bound * size + (16 << 20), f"the shared memory in the worker's RSS grew by {grown >> 20} MiB"
        assert wait_until(lambda: _mapped(worker, prefix)[0] == 0 and not channel_states(svc),
                          timeout=RECLAIM_BOUND + 1)
