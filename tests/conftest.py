import os
import random
import socket
import time

import pytest

# Each run of the suite has segments of its own, apart from any other speedysvc of this user
# (the README's example under a manager, another run): set before speedysvc is imported, and
# inherited by every process the tests start.
os.environ.setdefault("SPEEDYSVC_NAMESPACE", f"test-{os.getpid()}")
PORT_BLOCK = 200      # ports per test process: the services' ports are offsets in it
MAX_WORKERS = 8       # pytest-xdist workers that get a part of the block checked at the start
# Under pytest-xdist (scripts/test.sh runs the suite in several processes) every worker inherits
# the controller's values: each takes a namespace, ports and a runtime folder of its own.
_XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if _XDIST_WORKER and os.environ.get("SPEEDYSVC_TEST_WORKER") != _XDIST_WORKER:
    os.environ["SPEEDYSVC_TEST_WORKER"] = _XDIST_WORKER
    os.environ["SPEEDYSVC_NAMESPACE"] = f"{os.environ['SPEEDYSVC_NAMESPACE']}-{_XDIST_WORKER}"[:32]
    # the controller checked a block of PORT_BLOCK * MAX_WORKERS ports: worker N takes the Nth part
    _n = int(_XDIST_WORKER[2:]) if _XDIST_WORKER[2:].isdigit() else MAX_WORKERS
    if _n < MAX_WORKERS and "SPEEDYSVC_TEST_PORT_BASE" in os.environ:
        os.environ["SPEEDYSVC_TEST_PORT_BASE"] = str(int(os.environ["SPEEDYSVC_TEST_PORT_BASE"]) + PORT_BLOCK * _n)
    else:
        os.environ.pop("SPEEDYSVC_TEST_PORT_BASE", None)
    os.environ.pop("SPEEDYSVC_TEST_RUNTIME_DIR", None)


def _free_port_block(size: int) -> int:
    """The first port of a block of ``size`` that nothing listens on now, picked at random below
    the kernel's ephemeral ports (those ``free_port()`` and every outgoing connection get, which
    another test process could otherwise hold inside our block): the test services' ports (their
    classes' ``port``) are offsets in it."""
    rnd = random.Random(os.getpid())
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768
    low, high = (10000, ephemeral) if ephemeral - 10000 >= 4 * size else (ephemeral, 65536)
    for _ in range(50):
        base = rnd.randrange(low, high - size, size)
        try:
            for p in range(base, base + size):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
    raise RuntimeError("no block of free ports for the test services")


# ...and ports of its own (read by tests/services.py and the other service modules, in every process)
os.environ.setdefault("SPEEDYSVC_TEST_PORT_BASE", str(_free_port_block(PORT_BLOCK * (1 if _XDIST_WORKER else MAX_WORKERS))))

# ...and a runtime folder of its own, where the managers it starts keep their web tokens (the
# user's own folder would collect the files of managers the tests kill), removed at the end
if "SPEEDYSVC_TEST_RUNTIME_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile
    os.environ["SPEEDYSVC_TEST_RUNTIME_DIR"] = os.environ["XDG_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="speedysvc-run-")
    atexit.register(shutil.rmtree, os.environ["XDG_RUNTIME_DIR"], True)

from speedysvc import LocalService, connect, shm  # noqa: E402
from speedysvc import _shmcore as core  # noqa: E402
from services import Kitchen  # noqa: E402

# The service manager runner's fixtures (``running``), for the manager's and the web interface's tests.
pytest_plugins = ["manager_fixture"]


def our_segments():
    prefix = f"{shm.PREFIX}.{shm.USER}."
    return sorted(n for n in os.listdir(shm.SHM_DIR) if n.startswith(prefix))


@pytest.fixture(autouse=True)
def no_leaked_segments():
    """Every test must leave /dev/shm as it found it (reaping may take a moment)."""
    before = set(our_segments())
    yield
    deadline = time.monotonic() + 3
    while set(our_segments()) - before and time.monotonic() < deadline:
        time.sleep(0.05)
    leaked = sorted(set(our_segments()) - before)
    assert not leaked, f"segments left in /dev/shm: {leaked}"


def pytest_sessionfinish(session, exitstatus):
    leftovers = our_segments()
    if leftovers:
        print(f"\nERROR: segments left in /dev/shm after the run: {leftovers}")
        session.exitstatus = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def channel_states(svc):
    """{slot: (owner pid, state code)} of a LocalService's channels that have an owner."""
    seg = svc.segment
    out = {}
    for slot in range(seg.max_channels):
        off = seg.channel_offset(slot)
        owner = seg.region.load32(off + core.C_OWNER_PID)
        if owner:
            out[slot] = (owner, seg.region.load32(off + core.C_STATE) & core.ST_CODE)
    return out


def wait_until(predicate, timeout=5.0, interval=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


@pytest.fixture(scope="module")
def kitchen():
    """The Kitchen service with two workers, for a module's tests (some modules use their own)."""
    with LocalService(Kitchen, workers=2) as svc:
        yield svc


@pytest.fixture
def client(kitchen):
    with connect(Kitchen) as c:
        yield c
