"""Services the tests run in real worker processes (imported by the workers by module name)."""
import logging
import os
import signal
import time

from speedysvc import ServerMethodsBase, json_method, msgpack_method, pickle_method, raw_method

# each run of the tests has a block of ports of its own (tests/conftest.py)
PORTS = int(os.environ.get("SPEEDYSVC_TEST_PORT_BASE", "45000"))


class EchoServer(ServerMethodsBase):
    """The seed README's example service."""
    port = PORTS + 0
    name = 'echo_serv'

    @json_method
    def echo_json(self, data):
        return data


class Custom(Exception):
    """An exception type the caller can import."""

    def __init__(self, code, detail):
        super().__init__(code, detail)
        self.code = code
        self.detail = detail


class NeedsTwoArgs(Exception):
    def __init__(self, a, b):
        super().__init__(f"{a}/{b}")


class Kitchen(ServerMethodsBase):
    port = PORTS + 1
    name = 'kitchen'

    def __init__(self):
        self.calls = 0

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
    def raw_tail(self, data):
        return data[1:]  # a slice of the argument: sent back without a copy

    @raw_method
    def raw_copy(self, data):
        return bytes(data)

    @raw_method
    def raw_upper(self, data):
        return bytes(data).upper()

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
    def count(self):
        self.calls += 1
        return self.calls

    @msgpack_method
    def sleep(self, seconds, tag=None):
        time.sleep(seconds)
        return tag

    @msgpack_method
    def spin(self, seconds):
        end = time.monotonic() + seconds
        n = 0
        while time.monotonic() < end:
            n += 1
        return n

    @msgpack_method
    def fail_value(self, message):
        raise ValueError(message)

    @msgpack_method
    def fail_custom(self, code):
        raise Custom(code, "custom detail")

    @msgpack_method
    def fail_two_args(self):
        raise NeedsTwoArgs(1, 2)

    @msgpack_method
    def fail_local(self):
        class LocalOnly(Exception):
            pass
        raise LocalOnly("defined inside the method")

    @msgpack_method
    def fail_typeerror_inside(self):
        return len(5)

    @msgpack_method
    def unencodable(self):
        return {1, 2, 3}

    @json_method
    def json_unencodable(self):
        return object()

    @msgpack_method
    def die(self):
        os.kill(os.getpid(), signal.SIGKILL)

    @msgpack_method
    def exit(self):
        raise SystemExit(3)

    @msgpack_method
    def log(self, message):
        logging.getLogger("kitchen").warning(message)
        return True


class Other(ServerMethodsBase):
    """Same methods as Kitchen but another name, for tests that need a second service."""
    port = PORTS + 2
    name = 'other'

    @msgpack_method
    def whoami(self):
        return os.getpid()

    @msgpack_method
    def sleep(self, seconds, tag=None):
        time.sleep(seconds)
        return tag


class NoPort(ServerMethodsBase):
    """A service without a port: fine over shared memory, not over TCP."""
    name = 'noport'

    @msgpack_method
    def ping(self):
        return "pong"


class KitchenNewer(ServerMethodsBase):
    """A caller's newer view of 'kitchen': a method the running service does not have,
    and a method whose codec changed."""
    port = PORTS + 1
    name = 'kitchen'

    @msgpack_method
    def added_later(self):
        return 1

    @json_method
    def echo_msgpack(self, data):  # the service uses msgpack
        return data


class Limited(Kitchen):
    """Kitchen under another name, for a service with non-default limits."""
    name = 'limited'


class Chatty(ServerMethodsBase):
    """Logs, prints and burns CPU: for the manager's tests."""
    port = PORTS + 3
    name = 'chatty'

    @msgpack_method
    def log(self, level, message):
        logging.getLogger("chatty").log(getattr(logging, level), message)
        return os.getpid()

    @msgpack_method
    def shout(self, message):
        print(message, flush=True)
        return os.getpid()

    @msgpack_method
    def burn(self, seconds):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            pass
        return os.getpid()

    @msgpack_method
    def sleep(self, seconds, tag=None):
        time.sleep(seconds)
        return tag

    @msgpack_method
    def whoami(self):
        return os.getpid()


class CrashOnStart(ServerMethodsBase):
    port = PORTS + 4
    name = 'crash_on_start'

    def __init__(self):
        raise RuntimeError("cannot load the model")

    @msgpack_method
    def never(self):
        return None


class RawOdd(ServerMethodsBase):
    """Raw methods returning what is not bytes."""
    port = PORTS + 5
    name = 'raw_odd'

    @raw_method
    def to_bytearray(self, data):
        return bytearray(data)

    @raw_method
    def to_str(self, data):
        return "text"

    @raw_method
    def to_none(self, data):
        return None

    @raw_method
    def ok(self, data):
        return bytes(data)


class DiesWhileGrowing(ServerMethodsBase):
    """Its worker is SIGKILLed in the middle of growing a channel for a large response
    (as an out-of-memory kill would), at the step named by SPEEDYSVC_TEST_DIE."""
    port = PORTS + 6
    name = 'dies_growing'

    def __init__(self):
        from speedysvc.shm import segment as shm
        mode = os.environ.get("SPEEDYSVC_TEST_DIE")
        if mode == "after_grow":          # new generation published, response not yet written
            orig = shm.replace_data_segment

            def grow_then_die(*a, **k):
                orig(*a, **k)
                os.kill(os.getpid(), signal.SIGKILL)
            shm.replace_data_segment = grow_then_die
        elif mode == "after_create":      # new generation's file created, not yet published
            orig_create = shm.DataSegment.create.__func__

            def create_then_die(cls, *a, **k):
                orig_create(cls, *a, **k)
                os.kill(os.getpid(), signal.SIGKILL)
            shm.DataSegment.create = classmethod(create_then_die)

    @msgpack_method
    def big(self, n):
        return b"z" * n

    @msgpack_method
    def echo(self, x):
        return x

    @msgpack_method
    def size_of(self, data):
        return len(data)


class FdHog(ServerMethodsBase):
    """A service that uses up its file descriptors (RLIMIT_NOFILE reached) on request."""
    port = PORTS + 7
    name = 'fd_hog'

    @msgpack_method
    def use_up_fds(self):
        import resource
        n = len(os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (n - 1, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        return n - 1

    @msgpack_method
    def echo(self, x):
        return x


class Signaller(ServerMethodsBase):
    """Signals its caller while the caller waits for the answer."""
    port = PORTS + 3
    name = 'signaller'

    @msgpack_method
    def echo(self, value):
        return value

    @msgpack_method
    def signal_then_fail(self, pid, signum):
        os.kill(pid, signum)
        time.sleep(0.002)   # the caller is still spinning when the signal lands
        raise ValueError("answered after the signal")

    @json_method
    def signal_then_echo(self, pid, signum, value):
        os.kill(pid, signum)
        time.sleep(0.002)
        return value


class Fragile(ServerMethodsBase):
    """Calls that end the worker running them, in each way a process ends: for the manager's
    tests of workers killed by calls."""
    port = PORTS + 8
    name = 'fragile'

    @msgpack_method
    def whoami(self):
        return os.getpid()

    @msgpack_method
    def die(self):
        os.kill(os.getpid(), signal.SIGKILL)

    @msgpack_method
    def exit_now(self, code):
        os._exit(code)

    @msgpack_method
    def exit(self, code):
        raise SystemExit(code)   # answered, then the worker exits

    @msgpack_method
    def sleep(self, seconds):
        time.sleep(seconds)


class DiesIdle(ServerMethodsBase):
    """Its worker exits by itself right after it starts serving, before any call."""
    port = PORTS + 9
    name = 'dies_idle'

    def __init__(self):
        import threading
        threading.Timer(0.3, os._exit, (5,)).start()

    @msgpack_method
    def never(self):
        return None


class SlowStart(ServerMethodsBase):
    """Does not start serving until the file named by SPEEDYSVC_TEST_GATE exists (if set; at
    most 120 s): for the start order (depends_on) tests, which hold it starting."""
    port = PORTS + 20
    name = 'slow_start'

    def __init__(self):
        gate = os.environ.get("SPEEDYSVC_TEST_GATE")
        deadline = time.monotonic() + 120
        while gate and not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.02)

    @msgpack_method
    def whoami(self):
        return os.getpid()


class Second(ServerMethodsBase):
    """Another small service (depends_on and reload tests)."""
    port = PORTS + 21
    name = 'second'

    @msgpack_method
    def whoami(self):
        return os.getpid()


class Third(ServerMethodsBase):
    """And a third."""
    port = PORTS + 22
    name = 'third'

    @msgpack_method
    def whoami(self):
        return os.getpid()


class Faulty(ServerMethodsBase):
    """Methods that raise, for the log of what methods raise."""
    name = "faulty"
    port = PORTS + 23

    @msgpack_method
    def fail(self, message):
        raise ValueError(message)

    @pickle_method
    def fail_slowly(self, message):        # (pickle: the handler in Python, not the C fast path)
        raise KeyError(message)

    @msgpack_method
    def ok(self):
        return True


class Spread(ServerMethodsBase):
    """One service run by several managers at once, one per "host" (tests/tcp/test_tcp_balanced.py,
    tests/hosts/): each answer says which host gave it (SPREAD_HOST in the manager's environment)."""
    name = "spread"
    port = PORTS + 170

    @msgpack_method(idempotent=True)
    def where(self):
        return os.environ.get("SPREAD_HOST", "?")

    @msgpack_method(idempotent=True)
    def where_slowly(self, seconds):
        time.sleep(seconds)
        return os.environ.get("SPREAD_HOST", "?")

    @msgpack_method
    def once(self):
        return os.environ.get("SPREAD_HOST", "?")

    @msgpack_method
    def once_slowly(self, seconds):
        time.sleep(seconds)
        return os.environ.get("SPREAD_HOST", "?")
