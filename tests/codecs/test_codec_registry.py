"""The codec registry (``speedysvc.codecs.register``) and what the codecs say they are: ids and
names are checked and unique, ``codec_method`` takes registered codecs only, and a codec of the
tests' own (codec_services.py) works end to end through LocalService and connect."""
import pytest

from speedysvc import DecodeError, EncodeError, LocalService, codecs, connect
from speedysvc.methods import codec_method, json_method, method_spec
from codec_services import MARSHAL, Marshalled, MarshalCodec
from services import Kitchen


def make_codec(name="test-codec", id=50, base=codecs.Codec):
    """A codec instance (not registered) with the given name and id."""
    return type("TestCodec", (base,), {"name": name, "id": id})()


@pytest.fixture
def registry_unchanged():
    """The test leaves the registry as it found it."""
    before = dict(codecs.BY_ID), dict(codecs.BY_NAME)
    yield
    assert (codecs.BY_ID, codecs.BY_NAME) == before


@pytest.mark.parametrize("bad_id", [0, -1, codecs.MAX_CODEC_ID + 1, 255, 1 << 40, "5", 5.0, None])
def test_register_refuses_an_id_out_of_range(registry_unchanged, bad_id):
    with pytest.raises(ValueError, match=f"a codec's id is a number from 1 to {codecs.MAX_CODEC_ID}"):
        codecs.register(make_codec(id=bad_id))


@pytest.mark.parametrize("bad_name", ["", None, b"bytes", 7])
def test_register_refuses_a_codec_without_a_name(registry_unchanged, bad_name):
    with pytest.raises(ValueError, match="needs a name"):
        codecs.register(make_codec(name=bad_name))


@pytest.mark.parametrize("not_a_codec", [None, "json", codecs.JSONCodec, object()])
def test_register_takes_codec_instances_only(registry_unchanged, not_a_codec):
    with pytest.raises(TypeError, match="takes a Codec instance"):
        codecs.register(not_a_codec)


@pytest.mark.parametrize("name, id, taken", [
    ("another-json", codecs.JSON.id, codecs.JSON.id),           # the id of a built-in
    ("msgpack", 51, "msgpack"),                                 # the name of a built-in
    ("another-marshal", MARSHAL.id, MARSHAL.id),                # the id of one registered by a service module
    ("marshal", 52, "marshal"),
    ("pickle", codecs.RAW.id, codecs.RAW.id),                   # both taken: the id is named
])
def test_register_refuses_an_id_or_a_name_taken_by_another_codec(registry_unchanged, name, id, taken):
    with pytest.raises(ValueError, match=f"codec {taken!r} is registered already"):
        codecs.register(make_codec(name=name, id=id))


def test_register_refuses_another_instance_of_a_registered_class(registry_unchanged):
    with pytest.raises(ValueError, match="registered already"):
        codecs.register(codecs.MsgpackCodec())
    with pytest.raises(ValueError, match="registered already"):
        codecs.register(MarshalCodec())


def test_registering_the_same_codec_again_changes_nothing(registry_unchanged):
    assert codecs.register(MARSHAL) is MARSHAL
    assert codecs.register(codecs.JSON) is codecs.JSON


def test_codec_method_refuses_a_codec_that_is_not_registered(registry_unchanged):
    unregistered = make_codec(name="unregistered", id=53)
    with pytest.raises(ValueError, match="not a registered codec: codecs.register"):
        codec_method(unregistered)
    impostor = make_codec(name="json", id=codecs.JSON.id)   # json's name and id, another instance
    with pytest.raises(ValueError, match="not a registered codec"):
        codec_method(impostor)
    for not_a_codec in ("json", codecs.JSONCodec, None):
        with pytest.raises(ValueError, match="not a registered codec"):
            codec_method(not_a_codec)


def test_codec_method_decorates_functions_only():
    decorate = codec_method(MARSHAL)
    assert decorate.__name__ == "marshal_method"
    with pytest.raises(TypeError, match="decorates a function"):
        decorate("not a function")

    @json_method
    def f(x):
        return x

    assert method_spec(f).codec is codecs.JSON and method_spec(Marshalled.echo).codec is MARSHAL


@pytest.mark.parametrize("codec, name, id, network_safe, positional, raw, out_of_band", [
    (codecs.JSON, "json", 1, True, True, False, False),
    (codecs.MSGPACK, "msgpack", 2, True, True, False, False),
    (codecs.PICKLE, "pickle", 3, False, False, False, True),
    (codecs.RAW, "raw", 4, True, False, True, False),
    (MARSHAL, "marshal", 42, False, False, False, False),
])
def test_what_each_codec_says_it_is(codec, name, id, network_safe, positional, raw, out_of_band):
    assert (codec.name, codec.id, codec.network_safe, codec.positional, codec.raw, codec.out_of_band) == \
        (name, id, network_safe, positional, raw, out_of_band)
    assert codec.flags == id << codecs.CODEC_SHIFT
    assert codecs.by_id(id) is codecs.BY_ID[id] is codecs.BY_NAME[name] is codec
    assert codecs.codec_of(codec.flags) is codec
    assert codecs.codec_of(codec.flags | codecs.FLAG_KWARGS) is codec   # the other bits do not matter


def test_lookups_of_what_is_not_registered_give_none():
    assert codecs.by_id(60) is None and codecs.by_id(0) is None and codecs.by_id(None) is None
    assert codecs.codec_of(60 << codecs.CODEC_SHIFT) is None
    assert codecs.codec_of(0) is None


def test_masks_have_a_bit_per_registered_codec_that_qualifies():
    assert codecs.mask(lambda c: c.name == "pickle") == 1 << codecs.PICKLE.id
    unsafe = codecs.mask(lambda c: not c.network_safe)
    assert unsafe & (1 << codecs.PICKLE.id) and unsafe & (1 << MARSHAL.id)
    assert not unsafe & (1 << codecs.JSON.id | 1 << codecs.MSGPACK.id | 1 << codecs.RAW.id)
    assert codecs.mask(lambda c: c.positional) & 0b11110 == 1 << codecs.JSON.id | 1 << codecs.MSGPACK.id
    assert codecs.mask(lambda c: False) == 0
    assert codecs.mask(lambda c: True) < 1 << (codecs.MAX_CODEC_ID + 1)   # one 64-bit word


def test_a_codec_of_our_own_works_end_to_end():
    with LocalService(Marshalled, workers=1), connect(Marshalled, timeout=10) as c:
        value = (1, (2.5, "three"), frozenset({4}), {5: b"six"}, 7j, None)
        for _ in range(2):   # the first call sets the channel up, later ones take the C path
            assert c.echo(value) == value
            assert type(c.echo((1, 2))) is tuple                   # marshal keeps tuples: msgpack would not
        assert c.types((1,), {2}, 3j, b"4") == ("tuple", "set", "complex", "bytes")
        assert c.add(2) == 3 and c.add(2, 3) == 5 and c.add(2, b=3, scale=10) == 50   # keywords too
        assert c.send("echo", [[1, 2]]) == [1, 2]
        big = tuple(range(200_000))                                # beyond what a channel starts with
        assert c.echo(big) == big
        with pytest.raises(ValueError, match="raised in the worker") as info:
            c.fail("raised in the worker")
        assert "raise ValueError(message)" in info.value.remote_traceback
        with pytest.raises(EncodeError, match="cannot encode the arguments of echo\\(\\) with marshal"):
            c.echo(object())
        with pytest.raises(EncodeError, match="return value of unencodable\\(\\) with marshal"):
            c.unencodable()
        assert c.echo("still serving") == "still serving"


def test_a_worker_without_the_codec_names_the_id_it_was_sent(kitchen):
    """The codec's id travels with each call: a service that does not know it says which id came."""
    with connect(Kitchen) as c:
        with pytest.raises(DecodeError, match=f"expects msgpack but the caller sent {MARSHAL.id}"):
            c._transport.call(b"echo_msgpack", MARSHAL.dumps([1]), MARSHAL.flags, MARSHAL, 5)
        assert c.echo_msgpack("after") == "after"
