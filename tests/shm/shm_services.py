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
