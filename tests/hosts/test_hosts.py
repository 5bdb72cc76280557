"""Several hosts without a cluster: three "hosts" and a client, each a Linux network namespace
this test creates (a bridge in a fifth one, a veth pair from it to each; nothing is added to
the root namespace, and the addresses are on those links only), a manager of ``Spread`` in
each host bound to its address with a secret, and the client (hosts_client.py) in the fourth.
The figures of README, "Running on several hosts": the spread over the hosts, a manager
killed with SIGKILL under a steady load, a host's cable pulled and put back, a host added to
the resolver's answer.  Skipped, with the reason, where network namespaces cannot be made."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from spread_hosts import Host

HERE = os.path.dirname(os.path.abspath(__file__))
SECRET = "hosts-secret"
SUBNET = "10.77.0"
CONNECT_TIMEOUT = 1.0
RESOLVE_EVERY = 1.0


def ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


class Network:
    """The namespaces and links of one test: ``prefix`` makes their names this run's own."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.bridge = f"{prefix}-br"
        self.made: list[str] = []

    def ns(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def add(self, name: str) -> str:
        ns = self.ns(name)
        ip("netns", "add", ns)
        self.made.append(ns)
        ip("-n", ns, "link", "set", "lo", "up")
        return ns

    def build(self, nodes: list) -> dict:
        """The bridge's namespace, and one namespace per node linked to it: {node: (ns, address, veth)}."""
        self.add("br")
        ip("-n", self.bridge, "link", "add", "br0", "type", "bridge")
        ip("-n", self.bridge, "link", "set", "br0", "up")
        out = {}
        for i, node in enumerate(nodes, 1):
            ns = self.add(node)
            veth = f"v{node}"
            ip("-n", self.bridge, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            ip("-n", self.bridge, "link", "set", veth, "master", "br0", "up")
            ip("-n", ns, "addr", "add", f"{SUBNET}.{i}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            out[node] = (ns, f"{SUBNET}.{i}", veth)
        return out

    def remove(self) -> None:
        for ns in reversed(self.made):
            ip("netns", "del", ns, check=False)
        self.made = []


@pytest.fixture
def network():
    if os.getuid() != 0:
        pytest.skip("network namespaces need root")
    if not shutil.which("ip"):
        pytest.skip("no 'ip' command (iproute2) to make network namespaces with")
    net = Network(f"ss{os.environ['SPEEDYSVC_NAMESPACE'][-10:]}")
    try:
        ip("netns", "add", net.ns("probe"))
    except subprocess.CalledProcessError as e:
        pytest.skip(f"cannot create a network namespace: {e.stderr.strip()}")
    net.made.append(net.ns("probe"))
    try:
        yield net
    finally:
        net.remove()


def start(tmp_path, links, name):
    ns, address, _ = links[name]
    return Host(tmp_path / name, name, address, prefix=("ip", "netns", "exec", ns),
                extra=f"tcp_secret={SECRET}")


def run_client(tmp_path, net, links, hosts, phase) -> dict:
    config = {"secret": SECRET, "bridge_ns": net.bridge, "connect_timeout": CONNECT_TIMEOUT,
              "resolve_every": RESOLVE_EVERY,
              "hosts": {h.name: {"address": links[h.name][1], "pid": h.proc.pid, "veth": links[h.name][2]}
                        for h in hosts}}
    shutil.copy(os.path.join(HERE, "..", "services.py"), str(tmp_path))
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    done = subprocess.run(["ip", "netns", "exec", links["client"][0], sys.executable,
                           os.path.join(HERE, "hosts_client.py"), json.dumps(config), phase],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    if done.returncode:
        outputs = "\n".join(f"--- {h.name}:\n{h.output()[-2000:]}" for h in hosts)
        raise AssertionError(f"the client failed ({done.returncode}):\n{done.stderr[-4000:]}\n{outputs}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_three_hosts_in_network_namespaces(tmp_path, network):
    links = network.build(["h1", "h2", "h3", "client"])
    hosts = []
    try:
        hosts = [start(tmp_path, links, name) for name in ("h1", "h2", "h3")]
        got = run_client(tmp_path, network, links, hosts, "kill")
        print("kill phase:", json.dumps({k: v for k, v in got.items() if k != "endpoints"}))

        # the spread over three hosts: within 15 % of a third each
        assert set(got["spread"]) == {"h1", "h2", "h3"}
        for share in got["spread"].values():
            assert abs(share - 1 / 3) <= 0.15 / 3, got["spread"]

        # kill -9 under a steady load: no idempotent call fails...
        idem = got["idempotent"]
        assert idem["failures"] == [] and idem["victim_after"] == 0
        # ...and the killed host's share moved to the others within a second: answers never
        # stopped for longer, and the first second after it brought answers from both others
        assert idem["max_gap_after_kill"] < 1.0, idem
        assert set(idem["first_second"]) == {"h2", "h3"}, idem
        # a non-idempotent one: failures only among the calls in flight there (ConnectionLost)
        once = got["not_idempotent"]
        assert len(once["failures"]) <= max(once["in_flight_at_kill"], 1), once
        assert all(kind == "ConnectionLost" for _, kind, _ in once["failures"]), once
        assert once["max_gap_after_kill"] < 1.0 and set(once["first_second"]) == {"h3"}, once

        for h in hosts[:2]:   # (killed: up again for the next phase)
            h.stop()
        hosts[:2] = [start(tmp_path, links, name) for name in ("h1", "h2")]
        got = run_client(tmp_path, network, links, hosts, "link")
        print("link phase:", json.dumps({k: v for k, v in got.items() if k != "endpoints"}))

        # a host cut off is ejected within its connect timeout, taken back once its link is up
        assert got["ejected_after"] <= CONNECT_TIMEOUT + 1.0, got
        assert got["back_after"] <= got["eject_max"] + CONNECT_TIMEOUT + 2.0, got
        assert got["failures"] == [], got   # (idempotent calls: those cut off went elsewhere)
        # a host added to the resolver's answer gets calls within one re-resolution interval
        # (and the time of the call that finds the interval over)
        assert got["new_host_after"] <= RESOLVE_EVERY + 1.0, got
    finally:
        for h in hosts:
            h.stop()
