"""Arguments, results and errors: the pickles inside a call's payload frames.

Data uses pickle protocol 5 with out-of-band buffers: numpy/arrow buffers become separate
frames that ZeroMQ sends without copying. cloudpickle is the pickler, so lambdas and classes
defined in ``__main__`` travel by value; plain pickle is the fast path for simple arguments.
Futures among the arguments go to the driver's ``on_ref`` hook (``Client._ref``/``_nested``):
a top-level one becomes a reference (``_dep``) that the worker resolves from the results the
broker attached to the call, one inside a value a Future the worker reads. The pickler's other hook hands big numpy arrays to
``fabric.serde.shm``, and a large payload goes on to ``fabric.serde.transfer``.
"""
from __future__ import annotations

import io
import pickle
import threading
import traceback

import cloudpickle

from ..errors import RemoteError, RemoteTraceback, SerializationError
from .code import CodePickler
from .shm import SHM_THRESHOLD, to_shm, track_mappings
from .transfer import _maybe_spill, spill

_SIMPLE = (int, float, str, bytes, bool, type(None))

# --- worker-side resolution of references ------------------------------------------------
_deps = threading.local()


def _dep(call_id: bytes):
    """Unpickled on the worker in place of a Future: the dependency's value."""
    try:
        return _deps.values[call_id]
    except (AttributeError, KeyError):
        raise SerializationError("a Future argument was not resolved on the cluster") from None


def _dep_part(call_id: bytes, index: int, n: int):
    """In place of one value of a ``num_returns=n`` call: that element of its result."""
    v = _dep(call_id)
    if not isinstance(v, (tuple, list)) or len(v) != n:
        what = f"{len(v)} values" if isinstance(v, (tuple, list)) else f"a {type(v).__name__}"
        raise ValueError(f"a Future argument comes from a call with num_returns={n} that returned {what}")
    return v[index]


class ArgPickler(CodePickler):
    """cloudpickle with two hooks: Futures become references, big arrays go to shared memory."""

    def __init__(self, file, buffers, ref_type=None, on_ref=None, shm_pool=None, shm_used=None):
        super().__init__(file, protocol=5, buffer_callback=buffers.append)
        self.ref_type, self.on_ref = ref_type, on_ref
        self.shm_pool, self.shm_used = shm_pool, shm_used

    def reducer_override(self, obj):
        if self.ref_type is not None and isinstance(obj, self.ref_type):
            return self.on_ref(obj)
        t = type(obj)
        if self.shm_pool is not None and t.__name__ == "ndarray" and t.__module__ == "numpy":
            if obj.nbytes >= SHM_THRESHOLD and not obj.dtype.hasobject:
                return self._to_shm(obj)
        return super().reducer_override(obj)

    def _to_shm(self, arr):
        return to_shm(arr, self.shm_pool, self.shm_used)


class PassThrough(Exception):
    """Raised inside pickling to surface an error that is not about pickling (a failed Future
    passed as an argument: the call fails with that Future's own error)."""

    def __init__(self, exc):
        super().__init__(exc)
        self.exc = exc


def _offender(values):
    """Name the first value that cannot be pickled, for an error message a user can act on."""
    for label, v in values:
        try:
            cloudpickle.dumps(v, protocol=5)
        except Exception as e:  # noqa: BLE001 - any failure to pickle is the answer we want
            return f"{label} of type {type(v).__module__}.{type(v).__qualname__} cannot be pickled: {e}"
    return None


def dumps_args(args: tuple, kwargs: dict, *, ref_type=None, on_ref=None, shm_pool=None, shm_used=None,
               transfer=None):
    """(payload, [buffers]) for a call's arguments; SerializationError names the bad argument.
    With ``transfer`` (a ``Transfer``), large ones go through the object store."""
    if all(type(a) in _SIMPLE for a in args) and all(type(v) in _SIMPLE for v in kwargs.values()):
        payload = pickle.dumps((args, kwargs), protocol=5)
        if transfer is not None and len(payload) >= transfer.threshold and transfer.wanted():
            return spill(payload, [], transfer.threshold)
        return payload, []
    buffers: list = []
    f = io.BytesIO()
    try:
        ArgPickler(f, buffers, ref_type, on_ref, shm_pool, shm_used).dump((args, kwargs))
    except SerializationError:
        raise
    except PassThrough as p:
        raise p.exc from None
    except Exception as e:  # noqa: BLE001 - pickling can raise nearly anything
        where = _offender([(f"argument {i}", a) for i, a in enumerate(args)]
                          + [(f"argument {k!r}", v) for k, v in kwargs.items()])
        raise SerializationError(where or f"arguments cannot be pickled: {e}") from e
    return _maybe_spill(f.getvalue(), [b.raw() for b in buffers], transfer)


def loads_args(payload, buffers, deps: dict | None = None):
    _deps.values = deps or {}
    track_mappings()
    try:
        return pickle.loads(payload, buffers=buffers)
    finally:
        _deps.values = None


def dumps_value(value, transfer=None, asked: bool = False) -> tuple[bytes, list]:
    """A result (or a put object): pickle 5 with out-of-band buffers. With ``transfer``, a
    large one goes through the object store (``asked``: the call's driver wants that)."""
    if type(value) in _SIMPLE:
        payload = pickle.dumps(value, protocol=5)
        if transfer is not None and len(payload) >= transfer.threshold and transfer.wanted(asked):
            return spill(payload, [], transfer.threshold)
        return payload, []
    buffers: list = []
    try:
        payload = cloudpickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    except Exception as e:  # noqa: BLE001
        t = type(value)
        raise SerializationError(f"value of type {t.__module__}.{t.__qualname__} cannot be pickled: {e}") from e
    return _maybe_spill(payload, [b.raw() for b in buffers], transfer, asked)


def loads_value(payload, buffers):
    return pickle.loads(payload, buffers=buffers)


def dumps_error(exc: BaseException) -> bytes:
    """A user exception, with its traceback text; the exception object itself when it pickles."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        blob = cloudpickle.dumps(exc, protocol=5)
        pickle.loads(blob)  # an exception whose __init__ cannot take its args fails here, not there
    except Exception:  # noqa: BLE001
        blob = None
    t = type(exc)
    return pickle.dumps((blob, f"{t.__module__}.{t.__qualname__}", str(exc), tb), protocol=5)


def loads_error(payload) -> BaseException:
    """The exception to raise on the driver: the user's own type, remote traceback as cause."""
    blob, type_name, message, tb = pickle.loads(payload)
    exc = None
    if blob is not None:
        try:
            exc = pickle.loads(blob)
        except Exception:  # noqa: BLE001 - e.g. the exception's module is not importable here
            exc = None
    if not isinstance(exc, BaseException):
        exc = RemoteError(type_name, message, tb)
    exc.__cause__ = RemoteTraceback(tb)
    return exc
