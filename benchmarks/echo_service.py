"""The service the benchmarks call: one echo method per codec."""
from speedysvc import ServerMethodsBase, json_method, msgpack_method, pickle_method, raw_method


class BenchEcho(ServerMethodsBase):
    port = 5599
    name = "bench_echo"

    @msgpack_method
    def echo_msgpack(self, data):
        return data

    @raw_method
    def echo_raw(self, data):
        return data  # the argument's view: sent back without a copy

    @json_method
    def echo_json(self, data):
        return data

    @pickle_method
    def echo_pickle(self, data):
        return data


class BenchEchoEverywhere(BenchEcho):
    """The same service under a name of its own, for bench_tcp's client over several endpoints
    (it listens on every address, so 127.0.0.1, .2 and .3 all reach it)."""
    name = "bench_echo_everywhere"


class BenchEchoAgain(BenchEcho):
    """The same service under a name of its own, so that two can run at once (bench_tcp's
    many-callers part runs one per worker count)."""
    name = "bench_echo_again"
