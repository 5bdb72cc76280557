"""Calls over shared memory with every codec, the generated client and ClientMethodsBase."""
import inspect
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from speedysvc import ClientMethodsBase, LocalService, connect
from services import EchoServer, Kitchen


VALUES = [None, True, 0, -1, 2**62, 1.5, "", "héllo ✓", [1, [2, [3]]], {"a": {"b": [1, 2]}}, [None, "x", 3.25]]


@pytest.mark.parametrize("value", VALUES)
def test_json_round_trip(client, value):
    assert client.echo_json(value) == value


@pytest.mark.parametrize("value", VALUES + [b"\x00\xffbytes", {1: "int key"}, {"nested": [b"a", {2: b"b"}]}])
def test_msgpack_round_trip(client, value):
    assert client.echo_msgpack(value) == value


@pytest.mark.parametrize("value", VALUES + [{1, 2}, (1, (2, 3)), complex(1, 2), frozenset({"a"}), b"x" * 1000])
def test_pickle_round_trip(client, value):
    assert client.echo_pickle(value) == value


@pytest.mark.parametrize("value", [b"", b"x", bytes(range(256)) * 10, bytearray(b"mutable"), memoryview(b"view")])
def test_raw_round_trip(client, value):
    result = client.echo_raw(value)
    assert type(result) is bytes
    assert result == bytes(value)


def test_raw_accepts_any_contiguous_buffer(client):
    import array
    a = array.array("i", [1, 2, 3])
    assert client.echo_raw(a) == a.tobytes()


def test_raw_slice_of_argument_comes_back(client):
    assert client.raw_tail(b"abcdef") == b"bcdef"
    assert client.raw_upper(b"abc") == b"ABC"


def test_json_float_edge_cases(client):
    assert client.echo_json(1e308) == 1e308
    assert math.isnan(client.echo_msgpack(float("nan")))


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


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20)
msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats(allow_nan=False) | st.text(max_size=50)
    | st.binary(max_size=100),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=10) | st.integers(-100, 100), children, max_size=5),
    max_leaves=20)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=json_values)
def test_json_property(kitchen, value):
    with connect(Kitchen) as c:
        assert c.echo_json(value) == value


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=msgpack_values)
def test_msgpack_property(kitchen, value):
    with connect(Kitchen) as c:
        assert c.echo_msgpack(value) == value


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=st.binary(max_size=5000))
def test_raw_property(kitchen, value):
    with connect(Kitchen) as c:
        assert c.echo_raw(value) == value
        assert c.raw_tail(value) == value[1:]


def test_json_codec_edges():
    from speedysvc import codecs
    from speedysvc.errors import EncodeError
    J = codecs.JSON
    assert J.loads(b' [1, 2] ') == [1, 2]            # what another sender might add around it
    assert J.loads(memoryview(b'{"a":1}')) == {"a": 1}
    assert J.dumps(["é", 1.5, None]) == '["é",1.5,null]'.encode()
    for bad in (b"", b"[1,", b"[1] x", b"\xff"):
        with pytest.raises(ValueError):
            J.loads(bad)
    cyclic = []
    cyclic.append(cyclic)
    with pytest.raises(EncodeError):
        J.encode_result("m", cyclic)
    with pytest.raises(EncodeError, match="not JSON serializable"):
        J.encode_result("m", {1, 2})
