"""A method that raises SystemExit (``sys.exit()``) or KeyboardInterrupt: the caller gets a
RemoteError naming it, with the server's traceback, and the worker keeps serving."""
import pytest

from speedysvc import LocalService, RemoteError, connect
from shm_helpers import python_child
from shm_services import Quitter


@pytest.fixture(scope="module")
def quitter():
    with LocalService(Quitter, workers=1) as svc:
        yield svc


# (how the method is called, the exception's type and message); the C loop's fast path runs
# positional msgpack calls, the method's Python handler the others
CASES = {
    "msgpack, positional": (lambda c: c.sys_exit(3), "builtins.SystemExit", "3"),
    "msgpack, keyword": (lambda c: c.sys_exit(code=5), "builtins.SystemExit", "5"),
    "pickle": (lambda c: c.pickled_exit(), "builtins.SystemExit", "4"),
    "raw": (lambda c: c.raw_exit(b"bye"), "builtins.SystemExit", "bye"),
    "KeyboardInterrupt": (lambda c: c.interrupt(), "builtins.KeyboardInterrupt", "interrupted in the method"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_caller_gets_a_remote_error_and_the_worker_keeps_serving(quitter, case):
    call, type_name, message = CASES[case]
    worker = quitter.pids[0]
    with connect(Quitter, timeout=20) as c:
        for _ in range(3):   # the first call on a channel is served in Python, later ones in C
            with pytest.raises(RemoteError) as info:
                call(c)
            assert info.value.type_name == type_name
            assert str(info.value) == f"{type_name}: {message}"
            assert type_name.split(".")[1] in info.value.remote_traceback
            assert "shm_services.py" in info.value.remote_traceback   # where the method raised it
            assert c.whoami() == worker
    assert quitter.processes[0].poll() is None and quitter.pids == [worker]


def test_a_client_process_does_not_exit_because_the_service_did(quitter):
    code = """
        from speedysvc import RemoteError, connect
        from shm_services import Quitter
        with connect(Quitter, timeout=20) as c:
            try:
                c.sys_exit(7)
            except RemoteError as e:
                print("caught", e.type_name, flush=True)
            print("still running", c.whoami(), flush=True)
    """
    import subprocess
    proc = python_child(code, stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert out.splitlines() == ["caught builtins.SystemExit", f"still running {quitter.pids[0]}"]
