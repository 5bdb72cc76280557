"""The msgpack codec's C encoder and decoder (``_shmcore.msgpack_dumps``/``msgpack_loads``)
against msgpack itself: the same bytes for every value, the same value (or the same kind
of error) for every input, garbage included."""
import collections
import functools
import math
import threading
import time

import msgpack
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from speedysvc import _shmcore as core
from speedysvc import codecs

PACK = msgpack.Packer(use_bin_type=True).pack

scalars = (st.none() | st.booleans() | st.integers() | st.integers(-2**64, 2**64) | st.floats()
           | st.text() | st.binary() | st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, 2**64, -2**63, -2**63 - 1,
                                                        127, 128, 255, 256, -32, -33, -128, -129, 65535, 65536,
                                                        -32768, -32769, 2**32 - 1, 2**32, -2**31, -2**31 - 1]))
keys = st.text() | st.binary() | st.integers(-5, 5)
values = st.recursive(scalars, lambda inner: st.lists(inner) | st.lists(inner).map(tuple)
                      | st.dictionaries(keys, inner), max_leaves=40)
odd_values = st.sampled_from([bytearray(b"ab"), memoryview(b"cd"), collections.OrderedDict(a=1),
                              collections.namedtuple("P", "x y")(1, 2), object(), "\ud800", 2**70, -2**70,
                              [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]], 1j, {1, 2}])


def outcome(fn, arg):
    try:
        return "ok", fn(arg)
    except Exception as e:
        return "error", type(e)


def same(a, b):
    """Equal values, NaN equal to NaN (msgpack's bytes compare them exactly)."""
    return PACK(a) == PACK(b) if not isinstance(a, float) or not math.isnan(a) else math.isnan(b)


@settings(max_examples=200, deadline=None)
@given(value=values | odd_values)
def test_encoding_is_msgpacks_byte_for_byte(value):
    assert outcome(core.msgpack_dumps, value) == outcome(PACK, value)


@settings(max_examples=200, deadline=None)
@given(value=values)
def test_decoding_what_msgpack_encodes_gives_msgpacks_value(value):
    try:
        data = PACK(value)
    except (OverflowError, ValueError):   # an int beyond 64 bits
        assume(False)
    mine, theirs = outcome(core.msgpack_loads, data), outcome(msgpack.unpackb, data)
    assert mine[0] == theirs[0]
    if mine[0] == "ok":   # (an error: a map with keys other than str and bytes, as unpackb's default)
        assert same(mine[1], theirs[1])
        assert PACK(mine[1]) == PACK(theirs[1])   # same types all the way down (lists, not tuples)
    else:
        assert mine[1] is theirs[1]


def packed(value):
    try:
        return PACK(value)
    except (OverflowError, ValueError):
        return b"\xcf"


garbage = st.binary(max_size=60) | values.map(packed).flatmap(
    lambda b: st.sampled_from([b[:-1], b + b"\x00", b[1:], b"\xc1" + b, b[: len(b) // 2]]) if b else st.just(b))


@settings(max_examples=300, deadline=None)
@given(data=garbage)
def test_decoding_garbage_agrees_with_msgpack(data):
    mine, theirs = outcome(core.msgpack_loads, data), outcome(msgpack.unpackb, data)
    assert mine[0] == theirs[0]
    if mine[0] == "ok":
        assert same(mine[1], theirs[1])
    else:
        assert mine[1] is theirs[1]


def test_the_codec_uses_them_and_keeps_msgpacks_fallbacks():
    assert codecs.MSGPACK.dumps is core.msgpack_dumps and codecs.MSGPACK.loads_fast is core.msgpack_loads
    assert codecs.MSGPACK.loads(PACK({1: "a"})) == {1: "a"}        # non-string keys: the slow retry
    with pytest.raises(ValueError):
        codecs.MSGPACK.loads_fast(PACK({1: "a"}))                   # ...which loads_fast leaves to its caller
    with pytest.raises(TypeError):
        core.msgpack_dumps(object())                                # msgpack's own error
    ext = msgpack.packb(msgpack.ExtType(5, b"x"))
    assert core.msgpack_loads(ext) == msgpack.unpackb(ext)          # (ext types: msgpack's)
    assert core.msgpack_loads(memoryview(PACK([1, b"x"]))) == [1, b"x"]
    big = b"z" * (1 << 20)
    assert core.msgpack_dumps([big]) == PACK([big]) and core.msgpack_loads(PACK([big])) == [big]


class _SlowItems(dict):
    """A dict subclass: msgpack packs it through items(), Python code that can switch threads."""

    def items(self):
        time.sleep(0.001)
        return super().items()


def test_values_left_to_msgpack_are_packed_apart_in_each_thread():
    """What the C encoder leaves to msgpack can run Python code while it is packed (and so
    let another thread in): each is packed on its own, never interleaved with another's."""
    want = {"slow": PACK({"a": [1, 2, 3], "b": "x"}), "odd": PACK([bytearray(b"zz")] * 3)}
    wrong = []

    def pack(kind, value, n):
        for _ in range(n):
            got = core.msgpack_dumps(value)
            if got != want[kind]:
                wrong.append(kind)

    threads = [threading.Thread(target=pack, args=("slow", _SlowItems(a=[1, 2, 3], b="x"), 60)),
               threading.Thread(target=pack, args=("odd", [bytearray(b"zz")] * 3, 20000))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


def test_replacing_the_fallback_while_it_runs_is_safe():
    """set_msgpack while the fallback packs a value (here from inside it) leaves the running
    call its own reference: the value still comes out whole."""
    fallback = functools.partial(msgpack.packb, use_bin_type=True)

    class Replacing(dict):
        def items(self):
            core.set_msgpack(functools.partial(msgpack.packb, use_bin_type=True), msgpack.unpackb, msgpack.ExtraData)
            return [("k", b"v" * 1000)]

    try:
        core.set_msgpack(functools.partial(msgpack.packb, use_bin_type=True), msgpack.unpackb, msgpack.ExtraData)
        assert core.msgpack_dumps(Replacing(a=1)) == PACK({"k": b"v" * 1000})
    finally:
        core.set_msgpack(fallback, msgpack.unpackb, msgpack.ExtraData)


def test_what_only_msgpack_decides_is_left_to_it():
    """Int subclasses (msgpack compares them with 0, running their code), buffers of
    multi-byte items (which msgpack refuses), and str map keys (which msgpack interns)."""
    import array

    class Gt(int):
        def __gt__(self, other):
            raise RuntimeError("compared")

    assert outcome(core.msgpack_dumps, Gt(2**63)) == outcome(PACK, Gt(2**63)) == ("error", RuntimeError)
    multi = array.array("i", [0x01020304])
    assert outcome(core.msgpack_loads, multi) == outcome(msgpack.unpackb, multi) == ("error", BufferError)
    a, b = core.msgpack_loads(PACK({"some key": 1})), core.msgpack_loads(PACK({"some key": 2}))
    assert next(iter(a)) is next(iter(b))


def test_the_limits_agree_with_msgpack_or_are_left_to_it():
    """Deep nesting (the decoder's depth limit), a value whose encoding would pass the size
    cap (left to the fallback, unencoded by C), input that is no buffer, invalid UTF-8."""
    deep = [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]
    assert core.msgpack_loads(PACK(deep)) == msgpack.unpackb(PACK(deep))
    deep_map = {"a": None}
    for _ in range(40):
        deep_map = {"a": deep_map}
    assert core.msgpack_loads(PACK(deep_map)) == msgpack.unpackb(PACK(deep_map))
    for bad in ("abc", None, 12):
        assert outcome(core.msgpack_loads, bad) == outcome(msgpack.unpackb, bad)
    assert outcome(core.msgpack_loads, b"\xa1\xff") == outcome(msgpack.unpackb, b"\xa1\xff")

    fallback = functools.partial(msgpack.packb, use_bin_type=True)
    chunk = b"x" * (1 << 20)
    huge = [chunk] * ((1 << 20) + 1)   # states just over 2**40 bytes; shares one chunk, so costs ~8 MB
    try:
        core.set_msgpack(lambda value: b"FALLBACK", msgpack.unpackb, msgpack.ExtraData)
        assert core.msgpack_dumps(huge) == b"FALLBACK"
        assert core.msgpack_dumps({"k": huge}) == b"FALLBACK"
        assert core.msgpack_dumps([chunk] * 3) == PACK([chunk] * 3)   # (small: still C's)
    finally:
        core.set_msgpack(fallback, msgpack.unpackb, msgpack.ExtraData)


def test_large_inputs_are_not_copied_whole_with_the_interpreter_lock_held():
    """What a worker serving TCP shares its interpreter with: a whole value and bytes after it
    raise ``ExtraData``, as msgpack does, without the copy of the rest msgpack puts in it; a
    large value C does not take is read in slices, to msgpack's value; a large binary is
    decoded exactly (copied without the lock)."""
    junk = PACK(0) + bytes(8 << 20)
    with pytest.raises(msgpack.ExtraData):
        msgpack.unpackb(junk)                                       # what msgpack says
    for loads in (core.msgpack_loads, codecs.MSGPACK.loads):
        with pytest.raises(msgpack.ExtraData) as e:
            loads(junk)
        assert e.value.unpacked == 0 and e.value.extra == b""
    other = PACK({1: b"y" * (3 << 20), "k": [msgpack.ExtType(2, b"e")]})
    with pytest.raises(ValueError):
        core.msgpack_loads(other)                                   # left to the codec...
    assert codecs.MSGPACK.loads(other) == msgpack.unpackb(other, strict_map_key=False)   # ...which reads it
    assert codecs.MSGPACK.loads(memoryview(other)) == msgpack.unpackb(other, strict_map_key=False)
    ext_then_junk = PACK(msgpack.ExtType(3, b"zz")) + bytes(4 << 20)
    with pytest.raises(msgpack.ExtraData) as e:
        codecs.MSGPACK.loads(ext_then_junk)
    assert e.value.unpacked == msgpack.ExtType(3, b"zz")
    with pytest.raises(ValueError):
        codecs.MSGPACK.loads(other[:-5])                            # cut short
    big = bytes(range(256)) * (24 << 12)                            # 24 MiB
    assert core.msgpack_loads(PACK([big, "s"])) == [big, "s"]


def test_a_list_being_decoded_is_not_seen_half_made_while_a_binary_is_copied():
    """A large binary is copied without the interpreter lock; the list around it, still missing
    items then, must not be reachable from another thread (``gc.get_objects()`` found it and
    read a NULL item: a crash).  Run in a process of its own, which must exit cleanly."""
    import subprocess
    import sys
    script = (
        "import gc, threading, msgpack\n"
        "from speedysvc import _shmcore, codecs\n"
        "data = msgpack.packb([b'\\0' * (64 << 20), 12345, 67890])\n"
        "stop = False\n"
        "def spy():\n"
        "    while not stop:\n"
        "        for o in gc.get_objects():\n"
        "            if type(o) is list and len(o) == 3:\n"
        "                type(o[0]), type(o[1]), type(o[2])\n"
        "t = threading.Thread(target=spy)\n"
        "t.start()\n"
        "for _ in range(20):\n"
        "    assert _shmcore.msgpack_loads(data)[1:] == [12345, 67890]\n"
        "stop = True\n"
        "t.join()\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
