"""Payload (de)serialisation: what goes *inside* the frames that ``protocol`` lays out.

- Code (functions, classes) is cloudpickled once and keyed by its content hash.
- Data uses pickle protocol 5 with out-of-band buffers: numpy/arrow buffers become separate
  frames that ZeroMQ sends without copying. cloudpickle is the pickler, so lambdas and classes
  defined in ``__main__`` travel by value; plain pickle is the fast path for simple arguments.
- On one host, numpy arrays above ``SHM_THRESHOLD`` go through a shared-memory file instead of
  the sockets: one copy in, a private (copy-on-write) mapping out. The driver owns the files in
  a small pool: a worker that kept no reference to the mapping says so in its result
  (``SHM_FREE``), and the file is reused (its pages are already allocated, which is most of the
  cost of a fresh one); otherwise the driver unlinks it and the worker's mapping lives on.
- Futures inside arguments become references (``_dep``) that the worker resolves from the
  results the broker attached to the call; the broker itself never unpickles anything.
- Across hosts (``Transfer``), a payload whose frames total ``FABRIC_STORE_THRESHOLD`` bytes
  or more travels through the cluster's object store instead of the broker: every frame of at
  least that size, and the rest packed together if they still reach it, is uploaded once under
  its content hash (``fabric.storage.objects``), and the message carries a small pickle of
  ``_unspill`` with the references. The receiver fetches each object once per host into a
  local cache and maps it, so buffers come back zero-copy. The same goes for results and for
  ``fabric.put`` objects.
"""
from __future__ import annotations

import collections
import hashlib
import io
import mmap
import os
import pickle
import socket
import sys
import threading
import traceback
import types

import cloudpickle

from . import config
from . import settings
from .errors import RemoteError, RemoteTraceback, SerializationError
from .protocol import STORE_RESULT

SHM_THRESHOLD = settings.get().shm_threshold
SHM_ARENA = settings.get().shm_arena  # pre-faulted shared memory per driver
STORE_THRESHOLD = 8 << 20  # default of FABRIC_STORE_THRESHOLD
TRANSFER_MODES = ("auto", "store", "broker")
HOST = socket.gethostname()
_SIMPLE = (int, float, str, bytes, bool, type(None))


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


def _shm_ndarray(host: str, path: str, dtype: str, shape: tuple, fortran: bool, nbytes: int):
    import numpy as np

    if host != HOST:
        raise SerializationError(f"array in shared memory on host {host!r} cannot be read on {HOST!r}")
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), nbytes, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    maps = getattr(_deps, "maps", None)
    if maps is not None:
        maps.append(mm)
    arr = np.frombuffer(mm, dtype=np.dtype(dtype))
    return arr.reshape(shape, order="F" if fortran else "C")


def release_mappings() -> bool:
    """After a call: unmap its shared-memory arguments. False if user code still holds one
    (then the driver must not reuse the file)."""
    maps = getattr(_deps, "maps", None)
    if not maps:
        return False
    free = True
    for mm in maps:
        try:
            mm.close()
        except BufferError:  # an array still views it (kept in an instance, returned, ...)
            free = False
    maps.clear()
    return free


class ShmPool:
    """The driver's shared-memory files, reused when the worker is done with them.

    Fresh tmpfs pages are slow to get (on a VM, ~70 ms per 100 MB to allocate and map, several
    times the copy itself), so the pool starts with one arena of ``FABRIC_SHM_ARENA`` bytes
    (default 128 MiB, 0 for none) allocated and mapped in a background thread, with the GIL
    released: the first large argument finds its pages ready, as later ones find reused ones."""

    def __init__(self, directory: str, keep_bytes: int = settings.get().shm_pool,
                 arena: int | None = None):
        self.dir, self.keep = directory, keep_bytes
        self.free: list[tuple[int, str, mmap.mmap]] = []
        self.lock = threading.Lock()
        self.closed = False
        self.arena_path = None
        self.arena_thread = None
        if arena is None:  # a worker making nested calls is a driver too, but a short-lived one
            arena = 0 if settings.get().executor_pid else SHM_ARENA
        sweep_shm(directory)
        if arena > 0:
            self.arena_path = self._path()
            self.arena_thread = threading.Thread(target=self._make_arena, args=(arena,), name="fabric-shm-arena",
                                                 daemon=True)
            self.arena_thread.start()

    def _path(self):
        return os.path.join(self.dir, f"fabric-{os.getpid()}-{os.urandom(6).hex()}")

    def _new(self, nbytes: int, path: str, prefault: bool = False):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            if prefault:
                os.posix_fallocate(fd, 0, nbytes)  # the pages now (the GIL is released meanwhile)
            else:
                os.ftruncate(fd, nbytes)
            mm = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        if prefault:
            _populate(mm, nbytes)
        return nbytes, path, mm

    def _make_arena(self, nbytes: int):
        try:
            seg = self._new(nbytes, self.arena_path, prefault=True)
        except OSError:  # no room in /dev/shm: go without
            try:
                os.unlink(self.arena_path)
            except OSError:
                pass
            return
        with self.lock:
            if not self.closed:
                self.free.append(seg)
                return
        _discard(seg[1], seg[2])

    def take(self, nbytes: int):
        with self.lock:
            for i, (size, path, mm) in enumerate(self.free):
                if nbytes <= size and (size <= 2 * nbytes + (1 << 20) or path == self.arena_path):
                    return self.free.pop(i)
        t = self.arena_thread
        if t is not None and t.is_alive() and nbytes <= SHM_ARENA:  # nearly ready: cheaper than fresh pages
            t.join()
            return self.take(nbytes)
        return self._new(nbytes, self._path())

    def give_back(self, segments, reuse: bool):
        drop = [] if reuse else list(segments)
        if reuse:
            with self.lock:
                self.free.extend(segments)
                while sum(s for s, _, _ in self.free) > self.keep:
                    drop.append(self.free.pop(0))
        for _, path, mm in drop:
            _discard(path, mm)

    def close(self):
        if self.arena_thread is not None:
            self.arena_thread.join(5)
        with self.lock:
            self.closed = True
            free, self.free = self.free, []
        for _, path, mm in free:
            _discard(path, mm)


def sweep_shm(directory: str = "/dev/shm") -> int:
    """Remove shared-memory files of drivers that died without cleaning up (SIGKILL): files are
    named ``fabric-<pid>-<random>``, so a dead pid's are nobody's. Returns how many went."""
    from .config import pid_alive

    n = 0
    try:
        names = os.listdir(directory)
    except OSError:
        return 0
    me = os.getuid()
    for name in names:
        parts = name.split("-")
        if len(parts) != 3 or parts[0] != "fabric" or not parts[1].isdigit():
            continue
        path = os.path.join(directory, name)
        try:
            if os.stat(path).st_uid != me or pid_alive(int(parts[1])):
                continue
            os.unlink(path)
            n += 1
        except OSError:
            pass
    return n


_MADV_POPULATE_WRITE = 23  # Linux 5.14+


def _populate(mm, nbytes: int) -> None:
    """Map every page of ``mm`` now. Through ctypes, which releases the GIL (mmap's own
    MAP_POPULATE holds it for the whole time); an older kernel just skips it."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        buf = (ctypes.c_char * nbytes).from_buffer(mm)
        try:
            libc.madvise(ctypes.addressof(buf), nbytes, _MADV_POPULATE_WRITE)
        finally:
            del buf
    except (OSError, AttributeError, TypeError, ValueError):
        pass


def _discard(path, mm):
    try:
        mm.close()
    except BufferError:
        pass
    try:
        os.unlink(path)
    except OSError:
        pass


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
        import numpy as np

        fortran = arr.flags.f_contiguous and not arr.flags.c_contiguous
        if not (arr.flags.c_contiguous or fortran):
            arr = np.ascontiguousarray(arr)
        seg = self.shm_pool.take(arr.nbytes)
        self.shm_used.append(seg)
        flat = arr.reshape(-1, order="F" if fortran else "C").view(np.uint8)
        np.copyto(np.frombuffer(seg[2], dtype=np.uint8, count=arr.nbytes), flat)
        return _shm_ndarray, (HOST, seg[1], arr.dtype.str, arr.shape, fortran, arr.nbytes)


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
    _deps.maps = []
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


# --- large objects through the object store ---------------------------------------------
def transfer_mode() -> str:
    """``FABRIC_TRANSFER``: ``auto`` (default), ``store`` or ``broker``."""
    mode = (settings.get().transfer or "auto").strip().lower()
    if mode not in TRANSFER_MODES:
        raise ValueError(f"FABRIC_TRANSFER must be one of {', '.join(TRANSFER_MODES)}, got {mode!r}")
    return mode


def store_threshold() -> int:
    """``FABRIC_STORE_THRESHOLD``: bytes (or a size like ``'8MiB'``) from which a payload
    travels through the object store; at least 1."""
    raw = settings.get().store_threshold
    if not raw:
        return STORE_THRESHOLD
    from .resources import parse_memory

    try:
        return max(1, parse_memory(raw))
    except ValueError:
        raise ValueError(f"FABRIC_STORE_THRESHOLD must be a size like '8MiB' or a number of bytes, got {raw!r}"
                         ) from None


def store_configured() -> bool:
    """Whether this process was given a cluster store (``FABRIC_STORE`` or
    ``fabric.init(store=...)``), rather than falling back to a folder of its own."""
    if settings.get().store:
        return True
    st = sys.modules.get("fabric.storage")
    return st is not None and getattr(st, "_default", None) is not None


class Transfer:
    """Whether large payloads of one connection to a broker go through the object store.

    ``FABRIC_TRANSFER=store``: always (shared memory is then off, even on one host: how tests,
    and clusters whose hosts share a store but not a network address, force the path);
    ``broker``: never; ``auto`` (default): when a store is configured and the broker is not on
    this host (``tcp://`` to a non-loopback address), or, for results, when the call's driver
    asked for it (``STORE_RESULT``). A worker with a bad ``FABRIC_TRANSFER`` acts as ``auto``.
    """

    __slots__ = ("local", "threshold", "_mode", "_bit")

    def __init__(self, address: str, strict: bool = True):
        self.local = config.is_local_address(address)
        try:
            self._mode = transfer_mode()
            self.threshold = store_threshold()
        except ValueError:
            if strict:
                raise
            self._mode, self.threshold = "auto", STORE_THRESHOLD
        self._bit = None

    def wanted(self, asked: bool = False) -> bool:
        if self._mode != "auto":
            return self._mode == "store"
        return (asked or not self.local) and store_configured()

    def allowed(self) -> bool:
        """False under ``FABRIC_TRANSFER=broker``: nothing goes through the store."""
        return self._mode != "broker"

    def result_opts(self) -> int:
        """The call-header opts bit a driver sets: ``STORE_RESULT`` when it wants large
        results through the store. Decided at the first call."""
        bit = self._bit
        if bit is None:
            bit = self._bit = STORE_RESULT if self.wanted() else 0
        return bit


_transfers: dict = {}


def transfer_for(address: str) -> Transfer:
    """The ``Transfer`` of a worker's broker address (made once per process)."""
    t = _transfers.get(address)
    if t is None:
        t = _transfers[address] = Transfer(address, strict=False)
    return t


def _maybe_spill(payload, bufs, transfer, asked=False):
    if transfer is None:
        return payload, bufs
    limit = transfer.threshold
    total = len(payload)
    for b in bufs:
        total += b.nbytes
    if total < limit or not transfer.wanted(asked):
        return payload, bufs
    return spill(payload, bufs, limit)


class _Spilled:
    """Pickles as a call of ``_unspill``: the message that replaces a spilled payload."""

    __slots__ = ("args",)

    def __init__(self, *args):
        self.args = args

    def __reduce__(self):
        return _unspill, self.args


def spill(payload, bufs: list, threshold: int, store=None, keys_out: list | None = None) -> tuple[bytes, list]:
    """Upload the large frames of ``(payload, bufs)`` to the object store; returns the small
    ``(payload, bufs)`` that travel instead: a pickle of ``_unspill(refs, payload, items)``
    whose out-of-band buffers are the frames that stayed small.

    Each frame of at least ``threshold`` bytes becomes an object of its own; if the other
    frames still total ``threshold`` or more they are packed into one more object (64-byte
    aligned). ``refs`` lists the objects (``storage.objects.upload``'s references); the
    payload is inline bytes or ``(ref index, offset, length)``, and each item is a frame
    (out-of-band) or such a triple."""
    from .storage import objects

    if store is None:
        from . import storage

        store = storage.default()
    parts = [memoryview(payload).cast("B"), *(memoryview(b).cast("B") for b in bufs)]
    sizes = [p.nbytes for p in parts]
    where: list = [None] * len(parts)
    refs = []
    try:
        for i, n in enumerate(sizes):
            if n >= threshold:
                where[i] = (len(refs), 0, n)
                refs.append(objects.upload(store, parts[i]))
        rest = [i for i in range(len(parts)) if where[i] is None]
        if rest and sum(sizes[i] for i in rest) >= threshold:
            offsets, end = [], 0
            for i in rest:
                offsets.append(end)
                end += (sizes[i] + 63) & ~63
            pack = bytearray(end)
            for i, off in zip(rest, offsets):
                pack[off:off + sizes[i]] = parts[i]
                where[i] = (len(refs), off, sizes[i])
            refs.append(objects.upload(store, pack))
    except Exception as e:  # noqa: BLE001 - e.g. the store refused our credentials
        raise SerializationError(f"a large object ({sum(sizes)} bytes) could not be sent through the object "
                                 f"store {store}: {type(e).__name__}: {e}") from e
    if keys_out is not None:
        keys_out.extend(r[0] for r in refs)
    head = where[0] if where[0] is not None else bytes(parts[0])
    items = [where[i] if where[i] is not None else pickle.PickleBuffer(parts[i]) for i in range(1, len(parts))]
    out: list = []
    blob = pickle.dumps(_Spilled(refs, head, items), protocol=5, buffer_callback=out.append)
    return blob, [b.raw() for b in out]


def _unspill(refs, head, items):
    """Run where a spilled payload is unpickled: fetch its objects (once per host, mapped
    from the host's cache) and unpickle the original payload over them."""
    from . import storage
    from .storage import objects

    maps = [objects.fetch(r, storage.default) for r in refs]

    def view(w):
        k, off, n = w
        return memoryview(maps[k])[off:off + n]

    payload = view(head) if isinstance(head, tuple) else head
    bufs = [view(x) if isinstance(x, tuple) else x for x in items]
    return pickle.loads(payload, buffers=bufs)


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
