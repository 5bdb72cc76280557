"""The asyncio client over shared memory (``connect_async`` without an address): calls side by
side, per-call timeouts, and calls cancelled before they run or abandoned by a timeout."""
import asyncio
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from speedysvc import CallTimeout, LocalService, connect_async
from services import Kitchen
from shm_helpers import child_env


def run(coro, timeout=30):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_async_client_over_shm():
    with LocalService(Kitchen, workers=4):
        async def main():
            ac = connect_async(Kitchen)
            assert ac._transport.scheme == "shm"
            try:
                async def one(i):
                    if i % 10 == 0:
                        return await ac.sleep(0.3, i)
                    return await ac.echo_msgpack([i, "x" * i])

                t = time.monotonic()
                results = await asyncio.gather(*(one(i) for i in range(100)))
                elapsed = time.monotonic() - t
                with pytest.raises(ValueError, match="shm error"):
                    await ac.fail_value("shm error")
                assert await ac.add(1, b=2, scale=3) == 9
                return results, elapsed
            finally:
                await ac.aclose()

        results, elapsed = run(main())
        assert results == [i if i % 10 == 0 else [i, "x" * i] for i in range(100)]
        # the sleeps overlapped: one after another they take 10 x 0.3 s of wall time on any
        # machine, so finishing sooner than that is the overlap itself, not a speed figure
        serial = 10 * 0.3
        assert elapsed < serial, f"10 calls of 0.3 s on 4 workers took {elapsed:.2f} s (serial: {serial} s)"


def test_async_client_over_shm_per_call_timeout():
    with LocalService(Kitchen, workers=1):
        async def main():
            ac = connect_async(Kitchen)
            try:
                times = {}
                for timeout in (0.05, 0.3):
                    t = time.monotonic()
                    with pytest.raises(CallTimeout):
                        await ac.send("sleep", [0.6], timeout=timeout)
                    times[timeout] = time.monotonic() - t
                await asyncio.sleep(0.6)
                assert await ac.echo_msgpack("after") == "after"
                return times
            finally:
                await ac.aclose()

        times = run(main())
        for timeout, elapsed in times.items():
            # (it fires at its timeout: not before, and not as late as the 0.6 s call's end plus
            # a loaded machine's slack)
            assert timeout * 0.95 <= elapsed < timeout + 2.0, \
                f"a call with a {timeout} s timeout raised CallTimeout after {elapsed:.3f} s"


def test_cancelled_async_shm_call_gives_its_channel_back():
    """``AsyncShmTransport.call`` hands ``finish`` to the default executor; a task cancelled
    before a thread picks it up still gives its channel back, settled, though ``finish``
    never runs."""
    with LocalService(Kitchen, workers=2, max_channels=8, start_timeout=20):
        async def main():
            asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(1))
            client = connect_async(Kitchen)
            try:
                busy = asyncio.ensure_future(client.sleep(1.0, "a"))     # takes the executor's thread
                await asyncio.sleep(0.1)
                victim = asyncio.ensure_future(client.sleep(0.2, "b"))   # queued behind it
                await asyncio.sleep(0.1)
                victim.cancel()
                assert await busy == "a"
                await asyncio.sleep(0.5)
                chans = client._transport.shm._channels
                return len(chans.owned), len(chans.free)
            finally:
                await client.aclose()

        owned, free = asyncio.run(main())
        assert owned == free, f"{owned - free} channel(s) owned but never given back"


def test_cancelled_async_shm_call_does_not_block_loop_shutdown(tmp_path):
    """``asyncio.wait_for(client.sleep(8), 0.3)`` times out; asyncio.run() then returns at once,
    without joining a default executor's thread that still waits for the worker (no call timeout)."""
    with LocalService(Kitchen, workers=2, start_timeout=20, stop_timeout=1.0):   # (a worker still sleeps at the end)
        script = tmp_path / "main.py"
        script.write_text(
            "import asyncio, sys, time\n"
            "from speedysvc import connect_async\n"
            "from services import Kitchen\n"
            "async def main():\n"
            "    c = connect_async(Kitchen)\n"
            "    try:\n"
            "        await asyncio.wait_for(c.sleep(8), 0.3)\n"
            "    except asyncio.TimeoutError:\n"
            "        pass\n"
            "    await c.aclose()\n"
            "t = time.monotonic()\n"
            "asyncio.run(main())\n"
            "print(round(time.monotonic() - t, 1))\n")
        out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=child_env())
        assert out.returncode == 0, out.stderr
        assert float(out.stdout) < 3, f"asyncio.run() took {out.stdout.strip()} s to return"
