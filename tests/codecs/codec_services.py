"""A codec of the tests' own, registered on import, and a service whose methods use it (workers
import this module by name, so they register the codec too, as both sides of a call must)."""
import marshal

from speedysvc import ServerMethodsBase, codecs
from speedysvc.methods import codec_method


class MarshalCodec(codecs.Codec):
    """The standard library's marshal: keeps tuples, sets and complex numbers, which msgpack and
    json do not; decoding it is not safe on what a stranger sent."""
    name, id = "marshal", 42
    network_safe = False
    dumps = staticmethod(marshal.dumps)
    loads = loads_fast = staticmethod(lambda data: marshal.loads(bytes(data)))


MARSHAL = codecs.register(MarshalCodec())
marshal_method = codec_method(MARSHAL)


class Marshalled(ServerMethodsBase):
    name = "marshalled"

    @marshal_method
    def echo(self, value):
        return value

    @marshal_method
    def types(self, *values):
        """The type names of the values as the worker decoded them."""
        return tuple(type(v).__name__ for v in values)

    @marshal_method
    def add(self, a, b=1, *, scale=1):
        return (a + b) * scale

    @marshal_method
    def fail(self, message):
        raise ValueError(message)

    @marshal_method
    def unencodable(self):
        return object()
