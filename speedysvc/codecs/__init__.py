"""How arguments and return values are turned into bytes, one codec per method.

The codec interface and its registry are in ``codecs.base``; each built-in codec
is a module of its own (``json``, ``msgpack``, ``pickle``, ``raw``), registered
here.  docs/architecture.md says how to add one.
"""
from .base import (BY_ID, BY_NAME, CODEC_SHIFT, FLAG_KWARGS, MAX_CODEC_ID, Codec, by_id, codec_of, mask,
                   register)
from .json import JSONCodec
from .msgpack import MsgpackCodec
from .pickle import PickleCodec
from .raw import RawCodec

JSON = register(JSONCodec())
MSGPACK = register(MsgpackCodec())
PICKLE = register(PickleCodec())
RAW = register(RawCodec())

__all__ = ["Codec", "register", "by_id", "codec_of", "mask", "BY_ID", "BY_NAME", "FLAG_KWARGS", "CODEC_SHIFT",
           "MAX_CODEC_ID", "JSON", "MSGPACK", "PICKLE", "RAW", "JSONCodec", "MsgpackCodec", "PickleCodec",
           "RawCodec"]
