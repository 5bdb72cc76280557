"""A service's life under its clients: started (from a thread, while clients already call),
stopped with calls running, restarted, owned twice, or its owner killed."""
import subprocess
import threading
import time

import pytest

from speedysvc import LocalService, ServiceUnavailable, connect, shm
from conftest import our_segments, wait_until
from services import Other
from shm_helpers import python_child


def test_stop_lets_running_calls_finish_and_refuses_new_ones():
    svc = LocalService(Other, workers=1).start()
    c = connect(Other, wait=0)   # (a stopped LocalService leaves no segment: a client would wait)
    result = {}
    th = threading.Thread(target=lambda: result.setdefault("v", c.sleep(0.5, "done")))
    th.start()
    time.sleep(0.2)
    svc.stop()
    th.join(5)
    assert result.get("v") == "done"
    with pytest.raises(ServiceUnavailable):
        c.whoami()
    c.close()


def test_restarted_service_is_picked_up_by_a_connected_client():
    with connect(Other, wait=0) as c:
        with LocalService(Other, workers=1) as first:
            assert c.whoami() in first.pids
        with pytest.raises(ServiceUnavailable):
            c.whoami()
        with LocalService(Other, workers=1) as second:
            assert c.whoami() in second.pids


def test_service_owner_killed_clients_get_unavailable_and_next_start_cleans_up():
    code = """
        import time
        from speedysvc import LocalService
        from services import Other
        svc = LocalService(Other, workers=1).start()
        print("up", flush=True)
        time.sleep(60)
    """
    owner = python_child(code, stdout=subprocess.PIPE)
    try:
        assert owner.stdout.readline().strip() == b"up"
        seg = shm.ServiceSegment.attach("other")
        worker_pids = [w["pid"] for w in seg.workers()]
        with connect(Other, timeout=10, wait=0) as c:   # (wait=0: no waiting for a new owner)
            assert c.whoami() in worker_pids
            owner.kill()
            owner.wait()
            # workers notice their parent died and exit
            assert wait_until(lambda: not any(shm.process_alive(p) for p in worker_pids), timeout=5)
            t = time.monotonic()
            with pytest.raises(ServiceUnavailable):
                c.whoami()
            assert time.monotonic() - t < 3
        # stale segments are there now; a new owner removes them and serves
        assert any(n.endswith(".other") for n in our_segments())
        with LocalService(Other, workers=1) as svc, connect(Other) as c:
            assert c.whoami() in svc.pids
    finally:
        owner.kill()


def test_second_owner_of_a_running_service_is_refused():
    from speedysvc import ServiceAlreadyRunning
    with LocalService(Other, workers=1):
        with pytest.raises(ServiceAlreadyRunning):
            LocalService(Other, workers=1).start()


def test_calls_made_while_local_service_starts_wait_for_the_workers():
    svc = LocalService(Other, workers=1)
    starter = threading.Thread(target=svc.start)
    starter.start()
    errors = []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with connect(Other) as c:
                    assert c.sleep(0, "ok") == "ok"
                break
            except ServiceUnavailable as e:
                errors.append(str(e))
                time.sleep(0.005)
        assert not [e for e in errors if "not running" not in e and "not a speedysvc" not in e], errors
    finally:
        starter.join()
        svc.stop()


def test_local_service_started_from_a_thread_that_ends_keeps_its_workers():
    holder = []
    th = threading.Thread(target=lambda: holder.append(LocalService(Other, workers=1).start()))
    th.start()
    th.join()
    svc = holder[0]
    try:
        time.sleep(1.5)
        assert all(p.poll() is None for p in svc.processes)
        with connect(Other) as c:
            assert c.whoami() in svc.pids
    finally:
        svc.stop()


def test_python_m_speedysvc_local_serves_a_class_from_a_file(tmp_path):
    """``python -m speedysvc.local path/file.py:Class``, as the README has it."""
    import os
    import signal
    import sys
    import textwrap
    from speedysvc import ServerMethodsBase, msgpack_method
    (tmp_path / "fileservice.py").write_text(textwrap.dedent("""\
        import os
        from speedysvc import ServerMethodsBase, msgpack_method

        class FromFile(ServerMethodsBase):
            port, name = 5791, "from_file"

            @msgpack_method
            def pid(self):
                return os.getpid()
    """))

    class FromFile(ServerMethodsBase):   # the client's side of it
        port, name = 5791, "from_file"

        @msgpack_method
        def pid(self):
            pass

    proc = subprocess.Popen([sys.executable, "-m", "speedysvc.local", f"{tmp_path}/fileservice.py:FromFile",
                             "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path, env=dict(os.environ))
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving 'from_file' with 2 workers"), (line, proc.stderr.read() if not line else "")
        with connect(FromFile, timeout=10) as c:
            assert c.pid() != os.getpid()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        proc.stdout.close()
        proc.stderr.close()


def test_the_worker_table_names_the_method_of_the_call_in_hand():
    """A worker writes the method it starts into its entry (W_METHOD, index + 1), on its Python
    path (a channel's first call) and in its C loop; the entry names it while the call runs, and
    the last one once idle."""
    from speedysvc import _shmcore as core
    with LocalService(Other, workers=1) as svc, connect(Other) as c:
        seg = svc.segment
        assert seg.workers()[0]["method"] is None and seg.workers()[0]["last_method"] is None
        for _ in range(2):
            th = threading.Thread(target=c.sleep, args=(0.3,))
            th.start()
            assert wait_until(lambda: any(w["busy"] for w in seg.workers()))
            (w,) = seg.workers()
            assert seg.method_name(w["method"]) == "sleep"
            assert seg.region.load32(seg.worker_offset(w["index"]) + core.W_METHOD) == \
                seg.method_names().index("sleep") + 1
            th.join()
            # (the worker marks itself idle just after the answer is out)
            assert wait_until(lambda: not seg.workers()[0]["busy"])
            (w,) = seg.workers()
            assert not w["busy"] and w["method"] is None and seg.method_name(w["last_method"]) == "sleep"
        c.whoami()
        assert seg.method_name(seg.workers()[0]["last_method"]) == "whoami"
        assert seg.worker_entry(svc.pids[0])["index"] == w["index"] and seg.worker_entry(1 << 30) is None


@pytest.mark.parametrize("supervised", [True, False])
def test_a_supervised_workers_entry_waits_for_its_parent_to_read_it(supervised):
    """Reaping leaves the entry of a supervised worker that is a zombie (dead, not yet waited
    for): its supervisor reads it first, to tell a start crash from a call that killed it."""
    import os
    seg = shm.ServiceSegment.create("zombie_entry", supervised=supervised)
    try:
        pid = os.fork()
        if pid == 0:
            seg.register_worker(os.getpid())
            os._exit(0)
        assert wait_until(lambda: shm.process_is_zombie(pid))
        seg.reap()
        assert (seg.worker_entry(pid) is not None) == supervised
        os.waitpid(pid, 0)
        seg.reap()
        assert seg.worker_entry(pid) is None
    finally:
        seg.destroy()
