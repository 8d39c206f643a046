"""The driver's side of fabric, by its old name: kept so that ``from fabric.client import ...``
goes on working. The code lives in

- ``fabric.futures``: ``Future``, ``Part``, ``ReadyFuture``, ``Stream`` (what a call gives back);
- ``fabric.connection``: ``Client``, the driver's connection to the broker, and ``CallOptions``;
- ``fabric.spill``: the store copies of large ``fabric.put`` objects and their deletion;
- ``fabric.control``: one-shot control requests (``request``) and the typed STATUS schema.
"""
from __future__ import annotations

from .connection import (BATCH_MAX, BROKER_TIMEOUT, BURST_GAP, DEFAULT_OPTIONS, HEARTBEAT_EVERY, MAX_PENDING,
                         PUT_SPILL, USER_IDLE, CallOptions, Client, Submission, _env_seconds, _identity)
from .futures import (_DONE, _ERRORS, _PENDING, Future, Part, ReadyFuture, Stream, _borrowed, _borrowed_part,
                      _done_future, _Raise, _StreamState)
from .spill import delete_objects as _delete_objects

__all__ = ["BATCH_MAX", "BROKER_TIMEOUT", "BURST_GAP", "DEFAULT_OPTIONS", "HEARTBEAT_EVERY", "MAX_PENDING",
           "PUT_SPILL", "USER_IDLE", "CallOptions", "Client", "Submission", "Future", "Part",
           "ReadyFuture", "Stream", "_env_seconds", "_identity", "_DONE", "_ERRORS", "_PENDING", "_borrowed",
           "_borrowed_part", "_done_future", "_Raise", "_StreamState", "_delete_objects"]


def __getattr__(name):
    if name == "request":  # lazily: importing fabric.control (its STATUS schema) costs a driver ~15 ms
        from .control import request

        return request
    if name == "blocking":  # the worker's hook lives in fabric.futures (set there, read there)
        from . import futures

        return futures.blocking
    raise AttributeError(f"module 'fabric.client' has no attribute {name!r}")


# The functions a payload's pickle calls keep the names docs/protocol.md (section 4.6) gives
# them, ``fabric.client._borrowed`` and so on, whichever module defines them: the bytes on the
# wire are the same as before the split, and a worker resolves them through this module.
for _f in (_borrowed, _borrowed_part, _done_future):
    _f.__module__ = __name__
del _f
