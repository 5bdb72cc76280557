"""Services for tests/test_tcp_review.py (workers import them by module name)."""
import os
import time

from speedysvc import ServerMethodsBase, msgpack_method, pickle_method, raw_method


class ReviewEcho(ServerMethodsBase):
    port = 5901
    name = "tcpr_echo"

    @msgpack_method
    def echo(self, data):
        return data

    @raw_method
    def echo_raw(self, data):
        return bytes(data)

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

    @pickle_method
    def echo_pickle(self, data):
        return data

    @msgpack_method
    def pid(self):
        return os.getpid()
