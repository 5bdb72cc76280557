"""The service bench_arrays.py calls: numpy arrays through @pickle_method."""
from speedysvc import ServerMethodsBase, pickle_method


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class BenchArrays(ServerMethodsBase):
    port = 5598
    name = "bench_arrays"

    @pickle_method
    def total(self, a):
        return float(a.sum())

    @pickle_method
    def echo(self, a):
        return a

    @pickle_method
    def rss_during(self, a):
        """The worker's anonymous memory while it holds the argument (after reading it all)."""
        a.sum()
        return rss_anon()
