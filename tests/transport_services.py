"""A service of tests/test_transports.py's own (its workers import it by module name)."""
import time

from speedysvc import ServerMethodsBase, msgpack_method


class Sleeper(ServerMethodsBase):
    port = 5711
    name = "transports_sleeper"

    @msgpack_method
    def sleep(self, seconds):
        time.sleep(seconds)

    @msgpack_method
    def echo_msgpack(self, data):
        return data
