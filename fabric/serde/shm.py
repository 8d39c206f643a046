"""Big numpy arguments through shared memory, on one host.

A driver whose broker is on its host copies each numpy argument of ``FABRIC_SHM_THRESHOLD``
bytes or more into a file under ``/dev/shm`` instead of sending it over the sockets; the worker
maps it privately (copy-on-write). This module is the whole allocator of those files: their
names (``fabric-<driver pid>-<random>``), the driver's pool that reuses them, the worker's side
that maps them and reports whether it let go, and the clean-up of a dead driver's files.
It imports no pickler (``fabric.serde.pickling`` decides which arrays come here); the broker's
part of the clean-up, ``remove_shm``, lives in ``fabric.config`` so the broker imports no serde
(tests/test_layering.py).
"""
from __future__ import annotations

import mmap
import os
import re
import socket
import stat
import sys
import threading
import time

from .. import config, settings
from ..errors import SerializationError

SHM_THRESHOLD = settings.get().shm_threshold
SHM_ARENA = settings.get().shm_arena  # pre-faulted shared memory per driver
HOST = socket.gethostname()

# --- the worker's side: map, and after the call say whether the files can be reused -------
_mapped = threading.local()
# The files this worker mapped before and may be sent again (the driver reuses its arena and
# pooled files): a kept mapping's pages stay in its page tables, so reading the next array the
# driver wrote into the same file takes no page faults (~8 ms of a 100 MB argument's ~25).
# Kept only while no page of it was written (those would be this process's private copies, no
# longer the file), at most KEEP_MAPPINGS of them, and dropped once the driver removed the file.
_kept: dict[str, mmap.mmap] = {}
_settling: list[tuple[str, mmap.mmap, int]] = []  # let go of by a call, not yet checked (settle)
_kept_lock = threading.Lock()
_kept_checked = 0.0
KEEP_MAPPINGS = config.KEEP_MAPPINGS


def track_mappings() -> None:
    """Before unpickling a call's arguments: start the list ``release_mappings`` empties."""
    _mapped.maps = []


def _shm_ndarray(host: str, path: str, dtype: str, shape: tuple, fortran: bool, nbytes: int):
    import numpy as np

    if host != HOST:
        raise SerializationError(f"array in shared memory on host {host!r} cannot be read on {HOST!r}")
    if _settling:  # a call let go of it, and its check has not run yet
        settle()
    with _kept_lock:
        mm = _kept.pop(path, None)
    if mm is None or len(mm) < nbytes:
        if mm is not None:
            _close(mm)
        with open(path, "rb") as f:  # the whole file, so a later, larger array in it fits too
            mm = _map_private(f.fileno())
    # every array the call makes of it has ``root`` as its numpy base (numpy collapses views
    # of views to it): so release_mappings can tell from root's references whether one is left
    root = np.frombuffer(mm, dtype=np.uint8, count=nbytes)
    maps = getattr(_mapped, "maps", None)
    if maps is not None:
        maps.append((path, mm, root, nbytes))
    return root.view(np.dtype(dtype)).reshape(shape, order="F" if fortran else "C")


def _map_private(fd: int) -> mmap.mmap:
    """The whole file, privately: the file's own pages are read, and a page user code writes
    becomes this process's copy (release_mappings then stops keeping the mapping)."""
    return mmap.mmap(fd, 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)


def release_mappings() -> bool:
    """After a call: let go of its shared-memory arguments, keeping the mappings that are
    still the files' own. False if user code still holds an array of one (then the driver must
    not reuse the file)."""
    maps = getattr(_mapped, "maps", None)
    if not maps:
        return False
    free = True
    while maps:
        path, mm, root, nbytes = maps.pop()
        # who refers to ``root`` now: this frame, and getrefcount's argument; any more is an
        # array (or a view of one) that outlived the call: kept in an instance, returned, ...
        if sys.getrefcount(root) > 2:
            free = False
            continue  # unmapped when its last array goes
        del root  # (its export of the mapping with it)
        with _kept_lock:
            _settling.append((path, mm, nbytes))
    return free


# How long a worker waits, idle, after a call let go of mappings before it settles them. Right
# after the DONE, the walk (~2-3 ms of CPU per 100 MB) competes on a small host with the broker
# and the driver that pass the DONE on: measured on 2 cores, a 100 MB call's result reached the
# driver 0.8-4.5 ms after its function returned with the walk there, 0.9-1.1 ms without it.
SETTLE_IDLE_MS = 2


def unsettled() -> bool:
    return bool(_settling)


def settle() -> None:
    """Keep, or unmap, the mappings the last calls let go of. The worker runs it once it has
    been idle SETTLE_IDLE_MS after a call, so neither the page-table walk of ``_written`` (~2 ms
    per 100 MB) nor an unmap (as long) is on the call's path, nor on its DONE's; a call whose
    arguments come sooner runs it first."""
    if not _settling:
        return
    with _kept_lock:
        todo = _settling[:]
        _settling.clear()
    for path, mm, nbytes in todo:
        if _written(mm, nbytes):
            _close(mm)
        else:
            _keep(path, mm)


def _keep(path: str, mm) -> None:
    """Keep ``mm`` as the mapping of ``path``, the newest of at most KEEP_MAPPINGS."""
    with _kept_lock:
        old = _kept.pop(path, None)
        _kept[path] = mm
        drop = [_kept.pop(next(iter(_kept))) for _ in range(len(_kept) - KEEP_MAPPINGS)]
    for m in [old, *drop]:
        if m is not None and m is not mm:
            _close(m)


ARENA_DIR = "/dev/shm"
MAX_ARENA = 1 << 33  # a MAP_ARENA larger than this is not mapped ahead
_SHM_NAME = re.compile(r"fabric-[0-9]+-[0-9a-f]+")


def map_arena(path, nbytes) -> bool:
    """MAP_ARENA: map a driver's arena while this worker is idle, and keep the mapping, so that
    the first large argument the driver writes into it reads with no page faults (on a VM,
    ~15-20 ms of a first 100 MB argument's ~40). Only a whole ``fabric-*`` file of this user
    under /dev/shm, of the size said, is mapped; anything else is ignored (False)."""
    if not (isinstance(path, str) and isinstance(nbytes, int) and 0 < nbytes <= MAX_ARENA
            and os.path.dirname(path) == ARENA_DIR and _SHM_NAME.fullmatch(os.path.basename(path))):
        return False
    with _kept_lock:
        if path in _kept:
            return True
    try:  # no FIFO may block us, no link lead elsewhere
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_size != nbytes:
            return False
        mm = _map_private(fd)
    except (OSError, ValueError):
        return False
    finally:
        os.close(fd)
    _populate(mm, nbytes, _MADV_POPULATE_READ)
    _keep(path, mm)
    return True


def forget_removed(every: float = 1.0) -> None:
    """Unmap kept files the driver has removed (so their memory goes back to the host); does
    the check at most once per ``every`` seconds, which makes it cheap to call often."""
    global _kept_checked
    if not _kept:
        return
    now = time.monotonic()
    if now - _kept_checked < every:
        return
    _kept_checked = now
    with _kept_lock:
        gone = [p for p in _kept if not os.path.exists(p)]
        maps = [_kept.pop(p) for p in gone]
    for mm in maps:
        _close(mm)


def _close(mm) -> None:
    try:
        mm.close()
    except BufferError:  # still viewed: it unmaps when the last view goes
        pass


_PAGE = mmap.PAGESIZE
_pagemap: dict[int, int | None] = {}  # pid -> its open /proc/self/pagemap (None: cannot be read)


def _pagemap_fd() -> int | None:
    """This process's /proc/self/pagemap, opened once per pid (a forked child must not read its
    parent's) and trusted only after it reports a page just written as this process's own."""
    pid = os.getpid()
    if pid in _pagemap:
        return _pagemap[pid]
    fd = None
    try:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        probe = mmap.mmap(-1, _PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        probe[0] = 1  # a private page this process wrote: present, not file-backed
        entry = int.from_bytes(os.pread(fd, 8, _address(probe) // _PAGE * 8), "little")
        probe.close()
        if entry >> 61 != 4:
            raise OSError("pagemap does not show page states here")
    except (OSError, ImportError, ValueError, TypeError, BufferError):
        if fd is not None:
            os.close(fd)
        fd = None
    _pagemap[pid] = fd
    return fd


def _written(mm, nbytes: int) -> bool:
    """Whether this process wrote to a page of its private mapping ``mm`` in the first
    ``nbytes``: such a page is now its own copy, no longer the file's, so the mapping would
    show stale bytes once the driver writes the next array. /proc/self/pagemap says it per page
    (present but not file-backed, or swapped out); True where it cannot tell."""
    import numpy as np

    fd = _pagemap_fd()
    if fd is None:
        return True
    try:
        first = _address(mm) // _PAGE
        n = (nbytes + _PAGE - 1) // _PAGE
        raw = os.pread(fd, n * 8, first * 8)
    except (OSError, TypeError, ValueError, BufferError):
        return True
    if len(raw) != n * 8:
        return True
    top = np.frombuffer(raw, dtype=np.uint64) >> np.uint64(61)  # bit 2: present, 1: swapped, 0: file page
    return bool(np.any((top & np.uint64(2)) | ((top & np.uint64(5)) == np.uint64(4))))


# --- the driver's side ---------------------------------------------------------------------
def to_shm(arr, pool, used: list):
    """The reduction of a numpy array through ``pool``: copied into a file, which ``used``
    records for the driver to give back when the call is done."""
    import numpy as np

    fortran = arr.flags.f_contiguous and not arr.flags.c_contiguous
    if not (arr.flags.c_contiguous or fortran):
        arr = np.ascontiguousarray(arr)
    seg = pool.take(arr.nbytes)
    used.append(seg)
    flat = arr.reshape(-1, order="F" if fortran else "C").view(np.uint8)
    np.copyto(np.frombuffer(seg[2], dtype=np.uint8, count=arr.nbytes), flat)
    return _shm_ndarray, (HOST, seg[1], arr.dtype.str, arr.shape, fortran, arr.nbytes)


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
        self.arena_path: str | None = None
        self.arena_ready = 0  # its size once it is made: the driver then tells the broker (ARENA)
        self.arena_thread: threading.Thread | None = None
        if arena is None:  # a worker making nested calls is a driver too, but a short-lived one
            arena = 0 if settings.get().executor_pid else SHM_ARENA
        sweep_shm(directory)
        if arena > 0:
            self.arena_path = path = self._path()
            self.arena_thread = threading.Thread(target=self._make_arena, args=(arena, path), name="fabric-shm-arena",
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

    def _make_arena(self, nbytes: int, path: str):
        # made under another name and renamed when whole, so a worker told of it (MAP_ARENA)
        # finds the file complete or not at all
        tmp, mm = self._path(), None
        try:
            _, _, mm = self._new(nbytes, tmp, prefault=True)
            os.rename(tmp, path)
        except OSError:  # no room in /dev/shm: go without
            if mm is not None:
                _close(mm)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            return
        with self.lock:
            if not self.closed:
                self.free.append((nbytes, path, mm))
                self.arena_ready = nbytes
                return
        _discard(path, mm)

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


remove_shm = config.remove_shm  # in config: the broker calls it without importing serde


def sweep_shm(directory: str = "/dev/shm") -> int:
    """Remove shared-memory files of drivers that died without cleaning up (SIGKILL): files are
    named ``fabric-<pid>-<random>``, so a dead pid's are nobody's. Returns how many went."""
    from ..config import pid_alive

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


_MADV_POPULATE_READ, _MADV_POPULATE_WRITE = 22, 23  # Linux 5.14+


def _address(buf) -> int:
    """Where the writable buffer ``buf`` (an mmap) starts in this process's memory."""
    import ctypes

    ref = ctypes.c_char.from_buffer(buf)
    try:
        return ctypes.addressof(ref)
    finally:
        del ref  # (its export of ``buf``: the mapping can be closed again)


def _populate(mm, nbytes: int, advice: int = _MADV_POPULATE_WRITE) -> None:
    """Map the first ``nbytes`` of ``mm`` now (POPULATE_READ: map the file's pages without
    copying them, as a private mapping's read faults would). Through ctypes, which releases
    the GIL (mmap's own MAP_POPULATE holds it, and on a private writable mapping copies every
    page); an older kernel just skips it."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.madvise(_address(mm), nbytes, advice)
    except (OSError, AttributeError, TypeError, ValueError):
        pass


def _discard(path, mm):
    _close(mm)
    try:
        os.unlink(path)
    except OSError:
        pass
