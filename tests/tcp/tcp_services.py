"""Services the TCP tests run in real worker processes (imported by the workers by module name)."""
import os
import time

from speedysvc import ServerMethodsBase, json_method, msgpack_method, pickle_method, raw_method

# each run of the tests has a block of ports of its own (tests/conftest.py)
PORTS = int(os.environ.get("SPEEDYSVC_TEST_PORT_BASE", "45000"))


class TcpError(Exception):
    """A custom exception the caller can import (this module is imported by the tests)."""

    def __init__(self, code, detail):
        super().__init__(code, detail)
        self.code = code
        self.detail = detail


class TcpKitchen(ServerMethodsBase):
    port = PORTS + 100
    name = 'tcpt_kitchen'

    @json_method
    def echo_json(self, data):
        return data

    @msgpack_method
    def echo_msgpack(self, data):
        return data

    @pickle_method
    def echo_pickle(self, data):
        return data

    @raw_method
    def echo_raw(self, data):
        return data

    @raw_method
    def raw_upper(self, data):
        return bytes(data).upper()

    @raw_method
    def zeros(self, data):
        return bytes(int(bytes(data)))

    @msgpack_method
    def big(self, n):
        return b'z' * n

    @msgpack_method
    def size_of(self, data):
        return len(data)

    @msgpack_method
    def add(self, a, b=10, *, scale=1):
        """Add two numbers."""
        return (a + b) * scale

    @msgpack_method
    def whoami(self):
        return os.getpid()

    @msgpack_method
    def sleep(self, seconds, tag=None):
        time.sleep(seconds)
        return tag

    @msgpack_method
    def fail_value(self, message):
        raise ValueError(message)

    @msgpack_method
    def fail_custom(self, code):
        raise TcpError(code, "custom detail")


class TcpOther(ServerMethodsBase):
    """A second service, to connect to the wrong port."""
    port = PORTS + 101
    name = 'tcpt_other'

    @msgpack_method
    def whoami(self):
        return os.getpid()


class TcpRestart(ServerMethodsBase):
    """Started, stopped and started again on one port."""
    port = PORTS + 102
    name = 'tcpt_restart'

    @msgpack_method
    def whoami(self):
        return os.getpid()

    @msgpack_method
    def echo(self, x):
        return x

    @msgpack_method
    def sleep(self, seconds, tag=None):
        time.sleep(seconds)
        return tag


class TcpSecure(ServerMethodsBase):
    """Served with a secret (and pickle allowed) or with TLS."""
    port = PORTS + 103
    name = 'tcpt_secure'

    @msgpack_method
    def echo(self, x):
        return x

    @pickle_method
    def echo_pickle(self, data):
        return data

    @raw_method
    def echo_raw(self, data):
        return data


class TcpEcho(ServerMethodsBase):
    """The service the tests that speak the protocol by hand (tcp_helpers.RawClient) talk to."""
    port = PORTS + 110
    name = "tcpt_echo"

    @msgpack_method
    def echo(self, data):
        return data

    @raw_method
    def echo_raw(self, data):
        return bytes(data)

    @json_method
    def echo_json(self, data):
        return data

    @pickle_method
    def echo_pickle(self, data):
        return data

    @msgpack_method
    def size_of(self, data):
        return len(data)

    @msgpack_method
    def sleep(self, seconds, value=None):
        time.sleep(seconds)
        return value

    @msgpack_method
    def blob(self, n):
        return b"b" * n

    @msgpack_method
    def mark(self, path):
        """Leave a trace on disk: proves a call ran (whichever worker ran it)."""
        with open(path, "a") as f:
            f.write(f"{os.getpid()}\n")
        return True

    @msgpack_method
    def pid(self):
        return os.getpid()

    @msgpack_method
    def mark_and_sleep(self, path, seconds):
        """``mark``, then a nap: counts the calls that a worker started."""
        with open(path, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(seconds)
        return True


class TcpSecretEcho(ServerMethodsBase):
    """Served with a shared secret."""
    port = PORTS + 111
    name = "tcpt_secret_echo"

    @msgpack_method
    def echo(self, data):
        return data

    @msgpack_method
    def mark(self, path):
        with open(path, "a") as f:
            f.write(f"{os.getpid()}\n")
        return True


class TcpTurns(ServerMethodsBase):
    """Served over TCP by its workers: tells which process ran a call and whether two calls
    ever ran at once in one process (its TCP thread and its shared-memory loop take turns)."""
    port = PORTS + 110
    name = 'tcpt_turns'

    def __init__(self):
        import threading
        self.lock = threading.Lock()
        self.inside = 0
        self.most = 0   # the most calls seen running in this process at once

    def _enter(self):
        with self.lock:
            self.inside += 1
            self.most = max(self.most, self.inside)

    def _leave(self):
        with self.lock:
            self.inside -= 1

    @msgpack_method
    def whoami(self):
        self._enter()
        try:
            return os.getpid()
        finally:
            self._leave()

    @msgpack_method
    def hold(self, seconds, until_file=None):
        """Runs ``seconds`` (in slices, so that another thread of this process could run meanwhile),
        or until ``until_file`` exists."""
        self._enter()
        try:
            end = time.monotonic() + seconds
            while time.monotonic() < end and not (until_file and os.path.exists(until_file)):
                time.sleep(0.01)
            return os.getpid()
        finally:
            self._leave()

    @msgpack_method
    def most_at_once(self):
        return self.most

    @raw_method
    def echo_raw(self, data):
        return data


class TcpLarge(ServerMethodsBase):
    """Large raw calls run from the buffer a worker serving TCP received them into
    (tests/tcp/test_tcp_large_buffers.py)."""
    port = PORTS + 112
    name = "tcpt_large"

    @raw_method
    def echo_raw(self, data):
        return data   # the argument's view: written as it is, from the call's own buffer

    @msgpack_method
    def minor_faults(self):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
