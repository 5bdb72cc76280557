"""Calls over shared memory: arguments, the generated client, ClientMethodsBase, and clients and
services side by side."""
import inspect
import threading
import time

from speedysvc import ClientMethodsBase, LocalService, connect
from services import EchoServer, Kitchen, Other


def test_keyword_and_default_arguments(client):
    assert client.add(1) == 11
    assert client.add(1, 2) == 3
    assert client.add(1, b=5) == 6
    assert client.add(a=2, b=3, scale=10) == 50


def test_state_lives_in_the_worker(kitchen):
    with connect(Kitchen) as c:
        pids = {c.whoami() for _ in range(50)}
        assert pids <= set(kitchen.pids)


def test_generated_client_has_the_server_signatures():
    c = connect(Kitchen)
    sig = inspect.signature(c.add)
    assert list(sig.parameters) == ["a", "b", "scale"]
    assert sig.parameters["b"].default == 10
    assert sig.parameters["scale"].kind is inspect.Parameter.KEYWORD_ONLY
    assert c.add.__doc__ == "Add two numbers."
    assert c.echo_raw.__name__ == "echo_raw"
    c.close()


def test_send_with_method_or_name(client):
    assert client.send(Kitchen.echo_msgpack, ["x"]) == "x"
    assert client.send("add", [1], {"b": 1}) == 2


def test_seed_style_client_class(kitchen):
    class KitchenClient(ClientMethodsBase):
        def echo_json(self, data):
            return self.send(Kitchen.echo_json, [data])

    with KitchenClient(connect(Kitchen, "shm://")) as methods:
        assert methods.echo_json("Hello World!") == "Hello World!"


def test_many_sequential_calls_are_all_answered_in_order(client):
    for i in range(3000):
        assert client.echo_msgpack(i) == i


def test_two_services_side_by_side():
    from services import Other
    with LocalService(EchoServer, workers=1), LocalService(Other, workers=1) as other:
        with connect(EchoServer) as echo, connect(Other) as o:
            assert echo.echo_json("a") == "a"
            assert o.whoami() in other.pids


def test_a_slow_call_does_not_hold_up_another_client():
    with LocalService(Other, workers=2), connect(Other) as a, connect(Other) as b:
        th = threading.Thread(target=a.sleep, args=(2,))
        th.start()
        time.sleep(0.2)
        t = time.monotonic()
        assert b.whoami() > 0
        assert time.monotonic() - t < 1.0
        th.join()
