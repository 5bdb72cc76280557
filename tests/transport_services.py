"""A service of tests/test_transports.py's own (its workers import it by module name)."""
import os
import time

from speedysvc import ServerMethodsBase, msgpack_method

# each run of the tests has a block of ports of its own (tests/conftest.py)
PORTS = int(os.environ.get("SPEEDYSVC_TEST_PORT_BASE", "45000"))


class Sleeper(ServerMethodsBase):
    port = PORTS + 190
    name = "transports_sleeper"

    @msgpack_method
    def sleep(self, seconds):
        time.sleep(seconds)

    @msgpack_method
    def echo_msgpack(self, data):
        return data
