"""Services for tests/test_tcp_hostile.py (workers import them by module name)."""
import os
import time

from speedysvc import ServerMethodsBase, json_method, msgpack_method, raw_method


class HostileEcho(ServerMethodsBase):
    """The service every hostile-client test talks to."""
    port = 5871
    name = "tcph_echo"

    @msgpack_method
    def echo(self, data):
        return data

    @raw_method
    def echo_raw(self, data):
        return bytes(data)

    @json_method
    def echo_json(self, data):
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


class HostileSecret(ServerMethodsBase):
    """Served with a shared secret."""
    port = 5872
    name = "tcph_secret"

    @msgpack_method
    def echo(self, data):
        return data

    @msgpack_method
    def mark(self, path):
        with open(path, "a") as f:
            f.write(f"{os.getpid()}\n")
        return True
