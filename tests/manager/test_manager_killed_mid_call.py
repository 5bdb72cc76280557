"""A manager killed with -9 while one of its workers runs a call that never returns: that worker
is gone within 2 s like the idle ones (tests/shm/test_owner_death.py has the same for other
owners, without the manager)."""
import os
import shutil
import signal
import threading
import time

from speedysvc import ServerMethodsBase, connect, msgpack_method, shm
from conftest import wait_until
from services import PORTS

HERE = os.path.dirname(os.path.abspath(__file__))

# README and docs/shm-protocol.md: every worker of a dead owner is gone within this long
OWNER_DEATH_BOUND = 2.0

INI = """
    [Stuck]
    import_from=shm_services
    min_proc_num=2
    max_proc_num=2

    [web monitor]
    port={port}
"""


class Stuck(ServerMethodsBase):
    """The caller's side of tests/shm/shm_services.py's Stuck."""
    port = PORTS + 122
    name = "stuck"

    @msgpack_method
    def forever(self):
        pass


def test_workers_of_a_killed_manager_are_gone_even_inside_a_call(running, tmp_path):
    shutil.copy(os.path.join(HERE, "..", "shm", "shm_services.py"), str(tmp_path))
    m = running(INI)
    workers = {w["pid"] for w in m.service("Stuck")["worker_list"]}
    assert len(workers) == 2
    seg = shm.ServiceSegment.attach("stuck")
    try:
        outcome = []

        def call():
            try:
                with connect(Stuck, timeout=60) as c:
                    c.forever()
            except BaseException as e:
                outcome.append(e)
        th = threading.Thread(target=call, daemon=True)
        th.start()
        assert wait_until(lambda: any(w["busy"] for w in seg.workers()), timeout=10)
        m.stop(signal.SIGKILL)
        t = time.monotonic()
        gone = wait_until(lambda: not any(shm.process_alive(p) for p in workers), timeout=OWNER_DEATH_BOUND)
        assert gone, f"worker(s) still running {time.monotonic() - t:.1f} s after the manager died"
        th.join(10)
        assert outcome and isinstance(outcome[0], ConnectionError), outcome
    finally:
        for pid in workers:
            if shm.process_alive(pid):
                os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: not any(shm.process_alive(p) for p in workers), timeout=10)
        shm.remove_service_segments("stuck")
