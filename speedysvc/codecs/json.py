"""The ``json`` codec: portable, and the slowest."""
from __future__ import annotations

import json

from .base import Codec


def _make_json_dumps():
    # JSONEncoder.encode builds a C encoder on every call, most of a small call's cost; build
    # it once.  Without its `markers` dict (a shared one would keep stale entries after an
    # error) a cycle ends in RecursionError instead of ValueError: an EncodeError either way.
    encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:   # no C accelerator
        return lambda obj: encoder.encode(obj).encode()
    chunks = make(None, encoder.default, json.encoder.encode_basestring, None, ":", ",", False, False, True)
    join = "".join

    def dumps(obj) -> bytes:
        return join(chunks(obj, 0)).encode()
    return dumps


_json_dumps = _make_json_dumps()
_json_decoder = json.JSONDecoder()
_json_scan = _json_decoder.scan_once


def _json_loads(data):
    # Always UTF-8 on the wire, and what our side encodes has no whitespace around it: the
    # scanner alone reads it.  Anything else goes through decode(), which also words the errors.
    text = str(data, "utf-8")
    try:
        value, end = _json_scan(text, 0)
        if end == len(text):
            return value
    except StopIteration:
        pass
    return _json_decoder.decode(text)


class JSONCodec(Codec):
    name, id = "json", 1
    positional = True
    dumps = staticmethod(_json_dumps)
    loads = loads_fast = staticmethod(_json_loads)
