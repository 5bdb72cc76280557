"""How the manager reads its workers' pipes (``WorkerSet``): a worker that logs a little at a
time is read at most once per ``READ_PAUSE`` (not once per record), every line arrives, and a
burst is read without a pause."""
import asyncio
import json
import os
import threading
import time
import types

import pytest

from speedysvc.manager.logs import LineSplitter, ServiceLog
from speedysvc.manager.processes import READ_BURST, READ_PAUSE, WorkerSet, next_slot


@pytest.fixture
def pipe_worker(tmp_path):
    """A WorkerSet on a fresh loop, with one stand-in worker whose logging pipe is a real pipe
    the test writes (what ``spawn`` registers for a worker, without the process)."""
    loop = asyncio.new_event_loop()
    log = ServiceLog(str(tmp_path / "S.log"), 1 << 20, 1)
    ws = WorkerSet(loop, log, on_exit=lambda w, code: None)
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    w = types.SimpleNamespace(pid=4242, log_fd=read_end, fds={read_end: ("log", LineSplitter())})
    ws.workers[w.pid] = w
    loop.add_reader(read_end, ws._readable, w, read_end)
    reads = []
    output = ws._output

    def counted(worker, fd):   # (the reads that got something)
        n = output(worker, fd)
        if n > 0:
            reads.append(time.monotonic())
        return n
    ws._output = counted
    yield types.SimpleNamespace(loop=loop, ws=ws, w=w, log=log, fd=read_end, write_end=write_end, reads=reads)
    loop.remove_reader(read_end)
    if ws._resume_handle is not None:
        ws._resume_handle.cancel()
    loop.close()
    os.close(read_end)
    os.close(write_end)
    log.close()


def record(i: int, size: int = 0) -> bytes:
    return (json.dumps({"t": time.time(), "l": "INFO", "n": "svc", "m": f"record {i} " + "x" * size}) + "\n").encode()


def test_a_worker_that_logs_a_record_at_a_time_is_read_a_few_times_per_pause(pipe_worker):
    p = pipe_worker
    lines = 50

    def write():
        for i in range(lines):
            os.write(p.write_end, record(i))
            time.sleep(0.01)
    writer = threading.Thread(target=write)
    started = time.monotonic()
    writer.start()

    async def until_all_arrived():
        while len(p.log.recent) < lines:
            await asyncio.sleep(0.01)
    p.loop.run_until_complete(asyncio.wait_for(until_all_arrived(), 60))
    writer.join()
    elapsed = p.reads[-1] - started
    assert [r["message"] for r in p.log.recent] == [f"record {i} " for i in range(lines)]
    # one read per READ_PAUSE at most (and the first at once): far fewer than one per record,
    # however slowly the lines came
    assert len(p.reads) <= elapsed / READ_PAUSE + 2
    assert len(p.reads) < lines / 2
    # after the first, the reads come on the slots of READ_PAUSE (with the manager's ticks)
    slots = [int(t // READ_PAUSE) for t in p.reads[1:]]
    assert len(set(slots)) == len(slots)


def test_a_burst_is_read_without_a_pause_and_a_trickle_with_one(pipe_worker):
    p = pipe_worker
    burst = b"".join(record(i, 200) for i in range(READ_BURST // 200 + 10))
    assert READ_BURST <= len(burst) < 1 << 16   # (what the pipe holds and one read takes)
    os.write(p.write_end, burst)
    p.ws._readable(p.w, p.fd)
    assert p.ws._paused == [] and p.ws._resume_handle is None
    assert p.loop.remove_reader(p.fd)      # still watched: a chatty worker never waits on a full pipe
    p.loop.add_reader(p.fd, p.ws._readable, p.w, p.fd)

    os.write(p.write_end, record(0))
    p.ws._readable(p.w, p.fd)
    assert p.ws._paused == [(p.w, p.fd)] and p.ws._resume_handle is not None
    assert not p.loop.remove_reader(p.fd)  # paused: no longer watched until _resume
    p.ws._resume_handle.cancel()
    p.ws._resume()
    assert p.loop.remove_reader(p.fd)      # watched again
    p.loop.add_reader(p.fd, p.ws._readable, p.w, p.fd)


def test_a_pipe_paused_when_its_worker_goes_is_not_watched_again(pipe_worker):
    p = pipe_worker
    os.write(p.write_end, record(0))
    p.ws._readable(p.w, p.fd)
    assert p.ws._paused
    del p.ws.workers[p.w.pid]   # (as _forget does once the worker exited)
    p.ws._resume()
    assert not p.loop.remove_reader(p.fd)



def test_what_a_paused_pipe_holds_comes_before_a_later_line_of_another_pipe(pipe_worker):
    # worker 4242 logs a record (its pipe is then paused) and another record while paused; then
    # worker 4343 prints a line: the log has them in the order they were written
    p = pipe_worker
    out_read, out_write = os.pipe()
    os.set_blocking(out_read, False)
    other = types.SimpleNamespace(pid=4343, log_fd=-1, fds={out_read: ("stdout", LineSplitter())})
    p.ws.workers[other.pid] = other
    p.loop.add_reader(out_read, p.ws._readable, other, out_read)
    try:
        os.write(p.write_end, record(1))
        p.ws._readable(p.w, p.fd)
        assert p.ws._paused == [(p.w, p.fd)]
        p.ws._resume_handle.cancel()   # (it stays paused however slow this test runs)
        p.ws._resume_handle = None
        os.write(p.write_end, record(2))
        os.write(out_write, b"printed after the records\n")

        async def until_three():
            while len(p.log.recent) < 3:
                await asyncio.sleep(0.001)
        p.loop.run_until_complete(asyncio.wait_for(until_three(), 30))
        assert [r["message"] for r in p.log.recent] == ["record 1 ", "record 2 ", "printed after the records"]
    finally:
        p.loop.remove_reader(out_read)
        os.close(out_read)
        os.close(out_write)


@pytest.mark.parametrize("now, slot", [(0.25, 0.3), (0.3, 0.4), (0.2999999, 0.4), (0.2995, 0.4), (0.297, 0.3),
                                       (1234.5678, 1234.6), (0.0, 0.1)])
def test_pauses_and_ticks_end_on_the_next_slot(now, slot):
    # (a time just before a slot, as a timer that fired early or a clock rounded down gives, is on it)
    assert next_slot(now, 0.1) == pytest.approx(slot)
