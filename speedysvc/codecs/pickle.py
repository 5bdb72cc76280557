"""The ``pickle`` codec: any picklable value, between processes that trust each other."""
from __future__ import annotations

import functools
import pickle

from .base import Codec


class PickleCodec(Codec):
    """Any picklable value.  Unpickling runs code chosen by the sender: use it only
    between processes that trust each other (shared memory is same-user only; over
    TCP only from authenticated clients of a service that allows it)."""

    name, id = "pickle", 3
    network_safe = False
    dumps = staticmethod(functools.partial(pickle.dumps, protocol=pickle.HIGHEST_PROTOCOL))
    loads = loads_fast = staticmethod(pickle.loads)
