"""Services for the shared-memory tests of the worker's robustness: methods that end the
interpreter, calls that never return, a count of the calls that ran.  Worker processes import
them by module name (this folder is on the tests' import path, which LocalService passes on)."""
import os
import sys
import time

from speedysvc import ServerMethodsBase, msgpack_method, pickle_method, raw_method

# each run of the tests has a block of ports of its own (tests/conftest.py)
PORTS = int(os.environ.get("SPEEDYSVC_TEST_PORT_BASE", "45000"))


class Quitter(ServerMethodsBase):
    """Methods that raise what is not an ``Exception``: SystemExit, KeyboardInterrupt."""
    port = PORTS + 120
    name = "quitter"

    @msgpack_method
    def sys_exit(self, code=3):
        sys.exit(code)

    @pickle_method
    def pickled_exit(self, code=4):
        raise SystemExit(code)

    @raw_method
    def raw_exit(self, data):
        sys.exit(bytes(data).decode())

    @msgpack_method
    def interrupt(self):
        raise KeyboardInterrupt("interrupted in the method")

    @msgpack_method
    def whoami(self):
        return os.getpid()


class Counter(ServerMethodsBase):
    """Counts the slow calls that ran in this worker (one worker: the service's count)."""
    port = PORTS + 121
    name = "counter"

    def __init__(self):
        self.ran = 0

    @msgpack_method
    def slow(self, seconds):
        self.ran += 1
        time.sleep(seconds)
        return self.ran

    @msgpack_method
    def hold(self, seconds):
        """Keeps the worker busy without counting."""
        time.sleep(seconds)
        return os.getpid()

    @msgpack_method
    def count(self):
        return self.ran

    @msgpack_method
    def whoami(self):
        return os.getpid()


class Stuck(ServerMethodsBase):
    """A call that never returns, for owners that die while it runs."""
    port = PORTS + 122
    name = "stuck"

    @msgpack_method
    def forever(self):
        while True:
            time.sleep(3600)

    @msgpack_method
    def whoami(self):
        return os.getpid()

    @msgpack_method
    def size_of(self, data):
        return len(data)

    @raw_method
    def echo(self, data):
        return bytes(data)


class Bulky(ServerMethodsBase):
    """Large msgpack values both ways, and the worker's own view of what it allocated."""
    port = PORTS + 123
    name = "bulky"

    @msgpack_method
    def echo(self, value):
        return value

    @msgpack_method
    def make(self, n):
        return b"x" * n

    @msgpack_method
    def pause(self, seconds):
        import time
        time.sleep(seconds)

    @msgpack_method
    def make_odd(self, n):
        return {frozenset([1]): b"x" * n}   # not msgpack-encodable: the error path, even large

    @msgpack_method
    def traced(self, start):
        """tracemalloc in the worker: start (and reset) it, or say the peak since, in bytes."""
        import tracemalloc
        if start:
            tracemalloc.start()
            tracemalloc.reset_peak()
            return 0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak


class BulkyAlone(Bulky):
    """Bulky under a name of its own, for a service of one worker beside Bulky's."""
    port = PORTS + 124
    name = "bulky_alone"


def rss_anon() -> int:
    """This process's anonymous resident memory in bytes (shared memory it reads is not in it)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class Arrays(ServerMethodsBase):
    """numpy arrays through @pickle_method: read in place, kept, returned, and a worker that dies
    with a large result in hand."""
    port = PORTS + 125
    name = "arrays"

    def __init__(self):
        self.kept = None

    @pickle_method
    def total(self, a):
        return float(a.sum())

    @pickle_method
    def echo(self, a):
        return a

    @pickle_method
    def doubled(self, a):
        return a * 2

    @pickle_method
    def how(self, a):
        """What the method got: (type, writeable, owns its data, address modulo a page)."""
        import numpy as np
        if isinstance(a, np.ndarray):
            return type(a).__name__, bool(a.flags.writeable), bool(a.flags.owndata), a.ctypes.data % 4096
        return type(a).__name__, not memoryview(a).readonly, None, None

    @pickle_method
    def keep(self, a):
        self.kept = a
        return float(a.sum())

    @pickle_method
    def kept_total(self):
        return float(self.kept.sum())

    @pickle_method
    def keep_view(self, buf):
        self.kept = buf            # a PickleBuffer's view: released when the call ends
        return len(buf)

    @pickle_method
    def keep_slice(self, buf):
        self.kept = buf[:]         # made from the view, not exported by it
        return len(buf)

    @pickle_method
    def use_kept_view(self):
        return bytes(self.kept[:4])

    @pickle_method
    def rss_during(self, a):
        """RssAnon while the argument is in hand, and the sum (so the array is read)."""
        return rss_anon(), float(a.sum())

    @pickle_method
    def die_with(self, n):
        import numpy as np
        big = np.ones(n)
        os._exit(9) if big.sum() else None


class ArraysAlone(Arrays):
    """Arrays under a name of its own, for services started beside Arrays's."""
    port = PORTS + 126
    name = "arrays_alone"
