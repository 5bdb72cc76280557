"""The shared-memory side: segments and channels (``segment``, ``channels``), the
caller's transports (``transport``, ``aio``), and the worker process that serves
calls (``worker``, with ``dispatch``).  The hot path of each is in the C extension
``speedysvc._shmcore``; the byte layout is in docs/shm-protocol.md.

The names below are the ones other parts of the package and the tests use.
"""
from .segment import (DEFAULT_MAX_CHANNELS, DEFAULT_MAX_PAYLOAD, NAMESPACE_ENV, PREFIX, SHM_DIR, STATE_NAMES, USER,
                      DataSegment, ServiceSegment, create_segment, open_segment, process_alive, process_is_zombie,
                      process_start_time, remove_service_segments, replace_data_segment, unlink_segment)
from .transport import ShmTransport

__all__ = ["ServiceSegment", "DataSegment", "ShmTransport", "process_alive", "process_is_zombie", "process_start_time",
           "remove_service_segments", "create_segment", "open_segment", "unlink_segment", "replace_data_segment", "PREFIX", "USER", "SHM_DIR", "NAMESPACE_ENV", "STATE_NAMES",
           "DEFAULT_MAX_CHANNELS", "DEFAULT_MAX_PAYLOAD"]
