"""Every transport honours the Transport interface (speedysvc/transport.py) the same way:
shared memory and TCP, blocking and asyncio, and a transport registered from outside the
package (an in-process one, defined here as docs/architecture.md's recipe says)."""
import asyncio

import pytest

from speedysvc import (CallTimeout, ClientMethodsBase, LocalService, MethodNotFound, SpeedysvcError, codecs,
                       connect, connect_async)
from speedysvc import transport as tr
from speedysvc.shm.dispatch import Dispatcher
from services import Custom, Kitchen
from transport_services import Sleeper


class InProcess:
    """A transport that calls the service in this very process (no timeouts, no isolation)."""

    scheme = "inproc"
    servers: dict = {}

    def __init__(self, service: str):
        self.dispatcher = self.servers[service]
        self.closed = False

    def call(self, name, payload, flags, codec, timeout):
        if self.closed:
            raise SpeedysvcError("this connection is closed")
        status, out = self.dispatcher.handle(name, flags, memoryview(bytes(payload)))
        out = bytes(out)
        return codec.remote_error(out) if status else codec.decode_result(name, out)

    def close(self):
        self.closed = True


class AsyncInProcess:
    scheme = "inproc"

    def __init__(self, service: str):
        self.inner = InProcess(service)

    async def call(self, name, payload, flags, codec, timeout):
        return self.inner.call(name, payload, flags, codec, timeout)

    async def aclose(self):
        self.inner.close()


def open_inproc(address, options):
    tr.no_options(address, options)
    return InProcess(address.service)


def open_inproc_async(address, options):
    tr.no_options(address, options)
    return AsyncInProcess(address.service)


tr.register_scheme("inproc", blocking=open_inproc, asyncio=open_inproc_async, parse=tr.parse_local)


def addresses(svc):
    return {"shm": "shm://", "tcp": svc.tcp_address, "inproc": "inproc://"}


@pytest.fixture(scope="module")
def served():
    InProcess.servers[Kitchen.name] = Dispatcher(Kitchen())
    # (a gateway: its channel is made and grown here, before any test; workers that serve TCP
    # would each make theirs at their first call posted to the pool, within some test, which
    # the check for segments left behind would take for a leak)
    with LocalService(Kitchen, workers=2, tcp="127.0.0.1:0", tcp_in_workers=False) as svc:
        with connect(Kitchen, svc.tcp_address) as warm:   # the gateway's channel, grown: before any test
            assert warm.size_of(b"z" * 100_000) == 100_000
        yield addresses(svc)
    del InProcess.servers[Kitchen.name]


KINDS = [("shm", False), ("shm", True), ("tcp", False), ("tcp", True), ("inproc", False), ("inproc", True)]


class Caller:
    """One client of Kitchen over one transport, called the same way whether blocking or asyncio."""

    def __init__(self, address, asynchronous, timeout=10.0, server_cls=Kitchen):
        self.asynchronous = asynchronous
        self.client = (connect_async if asynchronous else connect)(server_cls, address, timeout=timeout)
        self.loop = asyncio.new_event_loop() if asynchronous else None

    def __getattr__(self, name):
        method = getattr(self.client, name)
        if not self.asynchronous:
            return method
        return lambda *a, **k: self.loop.run_until_complete(method(*a, **k))

    def raw(self, name: bytes, payload, codec, timeout=10.0):
        """A call straight through the transport (a method the class does not declare, say)."""
        result = self.client._transport.call(name, payload, codec.flags, codec, timeout)
        return self.loop.run_until_complete(result) if self.asynchronous else result

    def close(self):
        if self.asynchronous:
            self.loop.run_until_complete(self.client.aclose())
            self.loop.close()
        else:
            self.client.close()


@pytest.fixture(params=KINDS, ids=[f"{k}-{'asyncio' if a else 'blocking'}" for k, a in KINDS])
def caller(request, served):
    kind, asynchronous = request.param
    c = Caller(served[kind], asynchronous)
    c.kind = kind
    yield c
    c.close()


def test_a_transport_is_what_the_interface_says(caller):
    protocol = tr.AsyncTransport if caller.asynchronous else tr.Transport
    assert isinstance(caller.client._transport, protocol)
    assert caller.client._transport.scheme == caller.kind


def test_each_codec_round_trips(caller):
    assert caller.echo_json({"a": [1, "x"]}) == {"a": [1, "x"]}
    assert caller.echo_msgpack({b"k": [1.5, None, True]}) == {b"k": [1.5, None, True]}
    assert caller.echo_raw(b"\x00raw\xff") == b"\x00raw\xff"
    assert caller.size_of(b"z" * 100_000) == 100_000


def test_keyword_arguments_travel(caller):
    assert caller.add(1, b=2, scale=3) == 9
    assert caller.add(4) == 14


def test_the_service_errors_are_raised_in_the_caller(caller):
    with pytest.raises(ValueError, match="boom"):
        caller.fail_value("boom")
    with pytest.raises(Custom) as e:
        caller.fail_custom(7)
    assert (e.value.code, e.value.detail) == (7, "custom detail")


def test_a_method_the_service_lacks_is_method_not_found(caller):
    payload, _ = codecs.MSGPACK.encode_args("nope", (1,), None)
    with pytest.raises(MethodNotFound, match="nope"):
        caller.raw(b"nope", payload, codecs.MSGPACK)


@pytest.mark.parametrize("kind, asynchronous", KINDS[:4], ids=[f"{k}-{'asyncio' if a else 'blocking'}"
                                                                for k, a in KINDS[:4]])
def test_a_call_over_its_timeout_raises_call_timeout(kind, asynchronous):
    # (a service of its own: the call left running makes the gateway take another channel, kept)
    with LocalService(Sleeper, workers=1, tcp="127.0.0.1:0") as svc:
        caller = Caller(addresses(svc)[kind], asynchronous, server_cls=Sleeper)
        try:
            with pytest.raises(CallTimeout):
                caller.raw(b"sleep", codecs.MSGPACK.dumps([0.5]), codecs.MSGPACK, timeout=0.1)
            assert caller.echo_msgpack("after") == "after"
        finally:
            caller.close()


def test_a_closed_transport_refuses_calls(served, caller):
    assert caller.echo_msgpack(1) == 1
    closed = Caller(served[caller.kind], caller.asynchronous)
    closed.close()
    closed.loop = asyncio.new_event_loop() if caller.asynchronous else None
    with pytest.raises(SpeedysvcError):
        closed.echo_msgpack(1)
    if closed.loop:
        closed.loop.close()


def test_the_seed_style_client_goes_through_any_scheme(served):
    class KitchenClient(ClientMethodsBase):
        def add(self, a, b):
            return self.send(Kitchen.add, [a, b])

    for address in served.values():
        with KitchenClient(connect(Kitchen, address)) as k:
            assert k.add(2, 3) == 5


def test_the_seed_style_client_takes_the_generated_methods_path_and_keeps_send_s_meaning(served):
    """send() with positional arguments and the client's timeout goes through the client's
    generated method (learned once per method); every other form keeps Client.send's meaning."""
    class KitchenClient(ClientMethodsBase):
        def add(self, *args, **kwargs):
            return self.send(Kitchen.add, args, kwargs or None)

    for address in served.values():
        client = connect(Kitchen, address)
        k = KitchenClient(client)
        assert k.add(2, 3) == 5
        assert k._fast[Kitchen.add] == client.add      # the generated method, as the client has it
        assert k.add(2, b=4, scale=2) == 12             # keywords: the general path
        assert k.send("add", (1, 2)) == 3               # by name, learned under the name
        assert k.send(Kitchen.add, [1, 2], timeout=5) == 3
        with pytest.raises(MethodNotFound):
            k.send("nope", [])
        with pytest.raises(TypeError, match="not a service method"):
            k.send(len, [1])
        with pytest.raises(Custom):
            k.send(Kitchen.fail_custom, [7])
        other = connect(Kitchen, address)
        k.client = other                                # a new client: nothing learned from the old one is kept
        assert k._fast == {}
        client.close()
        assert k.add(2, 3) == 5
        k.close()


def test_a_seed_style_client_that_skips_base_init_still_works(served):
    class Bare(ClientMethodsBase):
        def __init__(self, client):
            self._client = client     # no super().__init__()

        def add(self, a, b):
            return self.send(Kitchen.add, [a, b])

    with Bare(connect(Kitchen, next(iter(served.values())))) as k:
        assert k.add(1, 1) == 2 and k.add(2, 2) == 4
        assert Kitchen.add in k._fast and ClientMethodsBase._fast == {}


def test_registering_a_scheme_checks_what_it_is_given():
    with pytest.raises(ValueError, match="needs a blocking or an asyncio"):
        tr.register_scheme("empty")
    with pytest.raises(ValueError, match="a scheme is a name"):
        tr.register_scheme("no way", blocking=open_inproc)
    with pytest.raises(ValueError, match="unsupported address .*'inproc://'"):
        connect(Kitchen, "nope://x")
    with pytest.raises(ValueError, match="do not apply to inproc"):
        connect(Kitchen, "inproc://", secret="s")
