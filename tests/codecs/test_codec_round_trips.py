"""Each codec's values through a real call (shared memory, the Kitchen service): what goes in
comes back, for the usual values, the odd ones, and any value hypothesis makes up."""
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from speedysvc import connect
from services import Kitchen


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
