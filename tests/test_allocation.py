"""A process that opens a transport keeps large buffers in the heap (speedysvc.allocation): a
16 MiB pickle echo costs the client no page faults per call once its heap holds the buffers.
Counted in a fresh client process with getrusage's minor faults: ~4,000 per call (a 16 MiB
buffer mapped and unmapped by glibc each call) without the policy, none with it."""
import os
import subprocess
import sys

PROBE = r"""
import os, resource
from services import Kitchen
from speedysvc import LocalService, connect
with LocalService(Kitchen, workers=1), connect(Kitchen) as c:
    data = os.urandom(16 << 20)
    for _ in range(3):
        assert c.echo_pickle(data) == data
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        c.echo_pickle(data)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 5)
"""


def faults_per_call(**env):
    here = os.path.dirname(os.path.abspath(__file__))
    e = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    e.update(env)
    e["PYTHONPATH"] = here + os.pathsep + e.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=e, timeout=120)
    assert out.returncode == 0, out.stderr
    return int(out.stdout)


def test_a_client_keeps_large_buffers_in_the_heap_unless_told_not_to():
    pages = (16 << 20) // 4096
    assert faults_per_call() < pages // 8                                   # ~0
    assert faults_per_call(SPEEDYSVC_KEEP_LARGE_ALLOCATIONS="0") > pages   # every page of each buffer
