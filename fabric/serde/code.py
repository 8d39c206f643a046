"""Code blobs: functions and classes shipped by value, once per worker.

A driver cloudpickles each function or class once and keys it by the content hash of the
blob, so the broker can cache it and a worker unpickles it once, however many calls use it.
It is its own module because code travels on its own path (``code_hash`` in the call header,
``CODE`` messages), apart from the arguments and results of ``fabric.serde.pickling``.
"""
from __future__ import annotations

import collections
import hashlib
import io
import types

import cloudpickle

from ..errors import SerializationError


def _code_reduce_keeping_file(code):
    """cloudpickle's reduction of a code object, with the real file name kept.

    cloudpickle 3 writes ``<dynamic-code>`` for every function's file (to make pickles
    independent of where the code was defined); remote tracebacks then lose the user's file and
    source lines. fabric keys code by its content hash per driver, so keeping the name costs
    nothing and the worker's traceback shows ``File "train.py", line 25 ... raise Custom(msg)``."""
    rebuild, args = _cloudpickle_code_reduce(code)
    return rebuild, tuple(code.co_filename if a == "<dynamic-code>" else a for a in args)


try:  # cloudpickle >= 3 moved the reducers into cloudpickle.cloudpickle; 2.x keeps the file name anyway
    from cloudpickle.cloudpickle import _code_reduce as _cloudpickle_code_reduce
    _CODE_DISPATCH = {types.CodeType: _code_reduce_keeping_file}
except ImportError:  # pragma: no cover - cloudpickle 2.x
    _CODE_DISPATCH = {}


class CodePickler(cloudpickle.Pickler):
    """cloudpickle that keeps code objects' file names (see ``_code_reduce_keeping_file``)."""

    dispatch_table = collections.ChainMap(_CODE_DISPATCH, cloudpickle.Pickler.dispatch_table)


def _dumps(obj, **kw) -> bytes:
    f = io.BytesIO()
    CodePickler(f, protocol=5, **kw).dump(obj)
    return f.getvalue()


def _unpicklable_global(obj) -> str | None:
    """The name of a global that ``obj`` (a function, or a class's methods) uses and that cannot
    be pickled: the actionable part of cloudpickle's bare ``cannot pickle '_thread.lock'``."""
    funcs = [obj] if isinstance(obj, types.FunctionType) else \
        [v for v in vars(obj).values() if isinstance(v, types.FunctionType)] if isinstance(obj, type) else []
    for f in funcs:
        g = getattr(f, "__globals__", {})
        for n in f.__code__.co_names:
            if n in g and not isinstance(g[n], (types.ModuleType, type, types.FunctionType)):
                try:
                    _dumps(g[n])
                except Exception as e:  # noqa: BLE001 - any failure to pickle is the answer we want
                    return (f"global {n!r} (of type {type(g[n]).__module__}.{type(g[n]).__qualname__}, "
                            f"used by {f.__qualname__}) cannot be pickled: {e}")
    return None


def code_blob(obj) -> tuple[bytes, bytes]:
    """(code frame, its 16-byte content hash). The frame is the function's or class's qualified
    name, a NUL byte, then its cloudpickle: the name lets the broker say which function a
    queue, a cap or a warm container is for (``fabric status``) without unpickling anything.

    Code that cannot be pickled raises ``SerializationError`` naming the function and, where it
    can be found, the global that is at fault (a lock, a socket, an open file)."""
    qual = getattr(obj, '__qualname__', type(obj).__name__)
    name = f"{getattr(obj, '__module__', None) or '?'}.{qual}"
    try:
        pickled = _dumps(obj)
    except Exception as e:  # noqa: BLE001 - whatever cloudpickle raised, say what to change
        why = _unpicklable_global(obj) or str(e)
        raise SerializationError(
            f"{qual} cannot be shipped to the cluster: {why}. Create such objects inside the function "
            f"(or in an @fabric.enter method of a @fabric.cls), not at module level") from e
    blob = name.encode("utf-8", "replace")[:200].replace(b"\0", b"?") + b"\0" + pickled
    return blob, hashlib.blake2b(blob, digest_size=16).digest()


def load_code(blob) -> object:
    i = blob.index(b"\0", 0, 201)
    return cloudpickle.loads(memoryview(blob)[i + 1:])
