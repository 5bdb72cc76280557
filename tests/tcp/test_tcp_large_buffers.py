"""The buffer a large frame is received into (framing.lazy_buffer): a process keeps one private
mapping for it (allocation.large_buffer) and hands it out again only once no view of it is
alive.  In this process: what is reused and what is not.  In a worker that serves TCP: a 16 MiB
echo costs no page faults per call once the worker keeps the mapping, and a reply that is a view
of the buffer, which the kernel has not taken yet, is never written over."""
import os
import subprocess
import sys
import threading
import weakref
import time

import pytest

from speedysvc import allocation, connect
from speedysvc.tcp import framing as fr
from tcp_helpers import RAW, MiB, RawClient, tcp_service
from tcp_services import TcpLarge


@pytest.fixture
def nothing_kept():
    allocation._kept = None   # (a mapping kept by an earlier test goes with its last reference)
    yield
    allocation._kept = None


def mapping_of(buf):
    return buf.obj if isinstance(buf, memoryview) else buf


def ref(buf):
    """A weak reference to ``buf``'s mapping (the test's own reference stays out of the way)."""
    return weakref.ref(mapping_of(buf))


def test_a_large_buffer_nothing_refers_to_is_handed_out_again(nothing_kept):
    a = fr.lazy_buffer(3 * MiB, 5)
    m = ref(a)
    assert allocation.is_kept(m()) and len(a) == 3 * MiB
    a[:] = b"a" * len(a)
    fr.free_buffer(a)
    del a
    b = fr.lazy_buffer(3 * MiB - 100, 7)   # smaller, another lead: a view of exactly its length
    assert mapping_of(b) is m() and len(b) == 3 * MiB - 100
    fr.free_buffer(b)
    assert not m().closed   # (kept: free_buffer leaves it mapped)


def test_a_buffer_with_a_live_view_is_not_handed_out(nothing_kept):
    a = fr.lazy_buffer(MiB)
    m = ref(a)
    a[:] = b"k" * len(a)
    kept_view = a[:10]     # what a method that keeps its argument holds
    fr.free_buffer(a)
    del a
    c = fr.lazy_buffer(MiB)
    assert mapping_of(c) is not m()
    c[:] = b"c" * len(c)
    assert bytes(kept_view) == b"k" * 10
    fr.free_buffer(c)
    del c, kept_view
    d = fr.lazy_buffer(MiB)
    assert mapping_of(d) is m()   # free again once the view is gone


def test_a_buffer_a_write_still_reads_is_not_handed_out(nothing_kept):
    a = fr.lazy_buffer(MiB)
    m = ref(a)
    held = memoryview(a)   # a Py_buffer held elsewhere, as by a transport's write in progress
    fr.free_buffer(a)      # (its release fails while exported: the view stays usable)
    del a
    assert mapping_of(fr.lazy_buffer(MiB)) is not m()
    held.release()
    assert mapping_of(fr.lazy_buffer(MiB)) is m()


def test_a_larger_frame_replaces_a_free_kept_mapping_and_a_huge_one_is_not_kept(nothing_kept):
    a = fr.lazy_buffer(MiB)
    m = ref(a)
    del a
    b = fr.lazy_buffer(5 * MiB)
    assert mapping_of(b) is not m() and (m() is None or m().closed) and allocation.is_kept(mapping_of(b))
    huge = fr.lazy_buffer(allocation.KEPT_MAPPING + 1)
    assert not allocation.is_kept(mapping_of(huge))
    fr.free_buffer(huge)
    assert mapping_of(huge).closed   # unmapped at once, as before


def test_threads_taking_large_buffers_at_once_never_share_one(nothing_kept):
    """The event loop's thread and an inflating thread may both receive large payloads."""
    wrong = []

    def take(mark):
        for _ in range(100):
            buf = fr.lazy_buffer(MiB)
            buf[:] = mark * len(buf)
            time.sleep(0)   # (let the others run while this one holds it)
            if set(bytes(buf[::4096])) != {mark[0]}:
                wrong.append(mark)
            fr.free_buffer(buf)
    threads = [threading.Thread(target=take, args=(m,)) for m in (b"a", b"b", b"c", b"d")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not wrong


def test_nothing_is_kept_when_the_process_opts_out():
    probe = ("from speedysvc import allocation\n"
             "def mapping(b): return b.obj if isinstance(b, memoryview) else b\n"
             "first = mapping(allocation.large_buffer(1 << 20))\n"
             "print(allocation.is_kept(first) or mapping(allocation.large_buffer(1 << 20)) is first)\n")

    def kept(**env):
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                             env=dict(os.environ, **env), timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip() == "True"
    assert kept(SPEEDYSVC_KEEP_LARGE_ALLOCATIONS="1")
    assert not kept(SPEEDYSVC_KEEP_LARGE_ALLOCATIONS="0")


@pytest.fixture
def large():
    with tcp_service(TcpLarge, workers=1, tcp_in_workers=True, max_payload=64 * MiB) as svc:
        yield svc


def faults_per_call(c, data, calls=5):
    """The worker's minor page faults per echo of ``data`` (each echoed back whole)."""
    before = c.minor_faults()
    for _ in range(calls):
        assert c.echo_raw(data) == data
    return (c.minor_faults() - before) / calls


def test_a_worker_takes_no_page_faults_per_large_call_once_it_keeps_the_buffer(large):
    data = os.urandom(16 * MiB)
    with connect(TcpLarge, large.tcp_address, timeout=60) as c:
        for _ in range(3):
            assert c.echo_raw(data) == data
        per_call = faults_per_call(c, data)
    # a fresh mapping each call faulted in ~540 pages here (huge pages inside, small ones at
    # its unaligned ends), and zeroed every page
    assert per_call < 64, f"{per_call:.0f} page faults per 16 MiB call"


def test_a_reply_the_kernel_has_not_taken_is_never_written_over(large):
    """One client's 16 MiB echo whose reply it does not read yet (the worker's write of the
    call's own buffer is in progress); meanwhile another client's large calls go through the
    same worker: the first reply, read at last, is still its own bytes."""
    a, b = b"a" * (16 * MiB), b"b" * (16 * MiB)
    with connect(TcpLarge, large.tcp_address, timeout=60) as c:
        for _ in range(3):   # the worker runs them itself (it is idle), and keeps their buffer
            assert c.echo_raw(b) == b
        slow = RawClient(large, rcvbuf=4096, service=TcpLarge.name).welcome()
        sender = threading.Thread(target=slow.send, args=(fr.call_header(1, b"echo_raw", RAW.flags, 0, len(a)) + a,))
        sender.start()
        sender.join(60)   # the worker has the whole call (its socket buffers hold far less)
        time.sleep(0.5)   # and writes the reply from its buffer, backed up behind the small window
        for _ in range(3):
            assert c.echo_raw(b) == b
    frame, = slow.read_frames(1, timeout=60)
    slow.sock.close()
    assert frame.kind == fr.REPLY and frame.call_id == 1 and frame.arg == 0
    assert bytes(frame.payload) == a


KILLED_MID_FRAME = r"""
import sys, time
import tcp_helpers
from speedysvc.tcp import framing as fr
raw = tcp_helpers.RawClient(sys.argv[1], service=sys.argv[2]).welcome()
raw.send(fr.call_header(1, b"echo_raw", tcp_helpers.RAW.flags, 0, 16 << 20) + b"k" * (8 << 20))
print("half sent", flush=True)
time.sleep(60)
"""


def test_a_client_killed_mid_frame_leaves_the_kept_buffer_free(large):
    """A client killed -9 halfway through a 16 MiB call: the worker drops the frame, its buffer
    (the kept mapping, which the client's earlier call left there) is free again, and the next
    client's large calls take no page faults and get their own bytes back."""
    data = os.urandom(16 * MiB)
    with connect(TcpLarge, large.tcp_address, timeout=60) as c:
        for _ in range(3):
            assert c.echo_raw(data) == data
        here = os.path.dirname(os.path.abspath(__file__))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([here, os.path.dirname(here), os.environ.get("PYTHONPATH", "")]))
        killed = subprocess.Popen([sys.executable, "-c", KILLED_MID_FRAME, large.tcp_address, TcpLarge.name],
                                  stdout=subprocess.PIPE, text=True, env=env)
        try:
            assert killed.stdout.readline().strip() == "half sent"
            time.sleep(0.3)   # (the worker reads the half into its buffer)
        finally:
            killed.kill()
            killed.wait(10)
        time.sleep(0.3)       # (and sees the connection go)
        assert c.echo_raw(data) == data
        per_call = faults_per_call(c, data)
    assert per_call < 64, f"{per_call:.0f} page faults per 16 MiB call after a client died mid-frame"
