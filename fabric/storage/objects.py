"""Large objects in the cluster's store: written once by content, fetched once per host.

fabric's runtime uses this for what is too big to travel through the broker (see
``fabric.serde``): large argument and result buffers of a cluster whose driver and executors
are on different hosts, and large ``fabric.put`` objects.

- ``upload(store, data)`` writes ``data`` under ``objects/<blake2b-160 hex of data>`` unless
  that key already exists (same bytes, same key: an object is uploaded once however often it
  is sent) and returns a small reference ``(key, nbytes, store, host)``; the last two say
  where it was written, for error messages only.
- ``fetch(ref, store)`` returns the object as a private (copy-on-write) memory map of a file in this
  host's cache folder (``FABRIC_CACHE_DIR``; else ``$FABRIC_HOME/cache/objects`` when
  ``FABRIC_HOME`` is set; else ``$XDG_CACHE_HOME/fabric/objects`` or ``~/.cache/fabric/objects``). Only the first process of a host that asks for an object
  downloads it: the others wait on a lock file (``flock``) and then map the same file. A
  download goes to a temporary file, is checked against the key's hash and size, and is
  renamed into place, so a reader never maps a partial or corrupt object.
- The cache is bounded: after each download, if its files total more than
  ``FABRIC_CACHE_BYTES`` (default 10 GiB) the least recently used ones (by access time,
  which every hit refreshes) are deleted. A process that still maps a deleted file keeps its
  mapping; the next process to ask downloads the object again.

This module sits on ``Store``'s public methods (``exists``, ``put_bytes``, ``get_file``,
``display``) and imports nothing of the runtime, nor the package's default store (the arrows
point from ``serde`` to ``storage``, and from the package to this module).
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import mmap
import os
import socket
import time
from contextlib import contextmanager

from .. import settings
from .store import KeyNotFound, StorageError

PREFIX = "objects/"
DIGEST_SIZE = 20
CHUNK = 8 << 20
DEFAULT_CACHE_BYTES = 10 << 30
STALE_TMP = 3600.0  # seconds after which an abandoned partial download is removed


class CorruptObject(StorageError):
    """A stored large object does not match its content hash (or its size)."""


def _size(value, default: int) -> int:
    if not value:
        return default
    from ..resources import parse_memory

    return parse_memory(value)


def cache_dir() -> str:
    """This host's cache folder of large objects."""
    s = settings.get()
    if s.cache_dir:
        return s.cache_dir
    if s.home:  # all of fabric's files in one place when that is asked for
        return os.path.join(s.home, "cache", "objects")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fabric", "objects")


def cache_bytes() -> int:
    """How many bytes the cache may hold before its least recently used objects go."""
    return _size(settings.get().cache_bytes, DEFAULT_CACHE_BYTES)


def key_of(data) -> str:
    """The content-addressed key of ``data`` (bytes or any buffer)."""
    return PREFIX + hashlib.blake2b(data, digest_size=DIGEST_SIZE).hexdigest()


def upload(store, data) -> tuple:
    """Write ``data`` (bytes or a buffer) under its content key unless it is there already;
    returns the reference ``(key, nbytes, store, host)`` that ``fetch`` resolves."""
    mv = memoryview(data).cast("B")
    key = key_of(mv)
    if not store.exists(key):
        store.put_bytes(key, mv)
    return key, mv.nbytes, store.display, socket.gethostname()


def _digest_of(key: str) -> str:
    digest = key[len(PREFIX):] if key.startswith(PREFIX) else ""
    if len(digest) != 2 * DIGEST_SIZE or any(c not in "0123456789abcdef" for c in digest):
        raise StorageError(f"{key!r} is not a large-object key (expected {PREFIX}<{2 * DIGEST_SIZE} hex digits>)")
    return digest


def fetch(ref, store) -> mmap.mmap:
    """The object ``ref`` names, mapped privately from this host's cache (downloaded from
    ``store`` by the first process that needs it). ``store`` is a ``Store``, or a function
    that returns one (``fabric.storage.default``), called only when the object must be
    downloaded."""
    key, nbytes = ref[0], int(ref[1])
    digest = _digest_of(key)
    d = cache_dir()
    path = os.path.join(d, digest)
    mm = _map(path, nbytes)
    if mm is not None:
        return mm
    os.makedirs(d, mode=0o700, exist_ok=True)
    fetched = False
    with _flock(path + ".lock"):
        mm = _map(path, nbytes)  # another process may have fetched it while we waited
        if mm is None:
            if callable(store):
                store = store()
            _download(store, ref, digest, path)
            fetched = True
            mm = _map(path, nbytes)
            if mm is None:
                raise StorageError(f"large object {key!r} vanished from the cache folder {d} just after its download")
    if fetched:
        trim(d, keep=path)
    return mm


def _map(path: str, nbytes: int):
    """A private, writable (copy-on-write) mapping of the cached file, or None if it is not
    there (or has the wrong size: then it is removed, to be fetched again)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        if st.st_size != nbytes:
            _unlink(path)
            return None
        mm = mmap.mmap(fd, nbytes, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    try:
        os.utime(path, (time.time(), st.st_mtime))  # the LRU clock, whatever the mount's atime policy
    except OSError:
        pass
    return mm


def _download(store, ref, digest: str, path: str) -> None:
    key, nbytes = ref[0], int(ref[1])
    origin = f"written by host {ref[3]} to store {ref[2]}" if len(ref) >= 4 else "written by fabric"
    tmp = os.path.join(os.path.dirname(path), f".tmp-{digest}-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        try:
            store.get_file(key, tmp)
        except KeyNotFound:
            raise KeyNotFound(key, store.display,
                              f"a large object {origin}; every driver and executor of a cluster must "
                              f"share one store: set FABRIC_STORE (and FABRIC_STORE_OPTIONS) to the "
                              f"same URL for all of them, and keep objects/ until its calls are done"
                              ) from None
        h = hashlib.blake2b(digest_size=DIGEST_SIZE)
        size = 0
        with open(tmp, "rb") as f:
            while True:
                chunk = f.read(CHUNK)
                if not chunk:
                    break
                h.update(chunk)
                size += len(chunk)
        if size != nbytes or h.hexdigest() != digest:
            raise CorruptObject(
                f"large object {key!r} in store {store.display} is corrupt: "
                f"{size} bytes with hash {h.hexdigest()[:16]}..., expected {nbytes} bytes with the "
                f"hash in its key ({origin}); delete it and send the object again")
        os.replace(tmp, path)
    finally:
        _unlink(tmp)


@contextmanager
def _flock(lock_path: str, blocking: bool = True):
    """An exclusive ``flock`` on ``lock_path`` (released if the process dies). Non-blocking:
    yields False when another process holds it."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except OSError as e:
            if blocking or e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing drops the lock


def trim(d: str | None = None, limit: int | None = None, keep: str | None = None) -> int:
    """Delete the least recently used cached objects until the cache holds at most ``limit``
    bytes (default ``FABRIC_CACHE_BYTES``), never ``keep``; returns the bytes freed. One
    process trims at a time; the others skip it."""
    d = d or cache_dir()
    limit = cache_bytes() if limit is None else limit
    freed = 0
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return 0
    with _flock(os.path.join(d, ".trim.lock"), blocking=False) as mine:
        if not mine:
            return 0
        now = time.time()
        entries, total = [], 0
        for name in names:
            p = os.path.join(d, name)
            try:
                st = os.stat(p)
            except FileNotFoundError:
                continue
            if name.startswith(".tmp-"):
                if now - st.st_mtime > STALE_TMP:
                    _unlink(p)
                continue
            if name.startswith(".") or name.endswith(".lock"):
                continue
            entries.append((st.st_atime, st.st_size, p))
            total += st.st_size
        for _atime, size, p in sorted(entries):
            if total <= limit:
                break
            if p == keep:
                continue
            _unlink(p)
            _unlink(p + ".lock")
            total -= size
            freed += size
    return freed


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
