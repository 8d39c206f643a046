"""Where a Dataset's blocks live: Arrow IPC files in shared memory, mapped, never copied.

Call results always travel back to the caller, so a block that were a call's *result* would
pass through the driver. Instead a per-block call writes its output table as an uncompressed
Arrow IPC file under ``/dev/shm`` (owner-only) and returns a small :class:`BlockRef`; the next
call, or the driver when the user asks for data, maps the file and reads it without a copy.
This is Ray's plasma store made of files, one per block. The process that started the
operation owns the files: they are unlinked when its Datasets are garbage collected, at its
exit, or by the next process that finds their owner dead.

``FABRIC_ML_BLOCK_DIR`` moves the folder (default ``/dev/shm/fabric-ml-<uid>``, or the temp
folder where there is no ``/dev/shm``). Such blocks are read on the host that wrote them (the
embedded cluster, one ``fabric start`` host). For a cluster that spans hosts, set
``FABRIC_ML_BLOCKS=store`` in every process (drivers and executors): blocks are then objects
in the cluster's store (``fabric.storage.default()``, under ``ml-blocks/``), read by any host.
"""
from __future__ import annotations

import atexit
import os
import queue
import secrets
import socket
import threading

from fabric import config, settings

_HOST = socket.gethostname()
_swept = False
_lock = threading.Lock()


def block_dir() -> str:
    d = settings.get().ml_block_dir
    if not d:
        base = "/dev/shm" if os.path.isdir("/dev/shm") else __import__("tempfile").gettempdir()
        d = os.path.join(base, f"fabric-ml-{os.getuid()}")
    if d in _checked:
        return d
    os.makedirs(d, mode=0o700, exist_ok=True)
    st = os.stat(d)
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise PermissionError(f"fabric.ml block folder {d} must be owned by this user and private (mode 700): "
                              f"it is owned by uid {st.st_uid} with mode {oct(st.st_mode & 0o777)}")
    _checked.add(d)
    return d


_checked: set = set()
_STORE = "store:"


def _store_mode() -> bool:
    mode = settings.get().ml_blocks
    if mode not in ("shm", "store"):
        raise ValueError(f"FABRIC_ML_BLOCKS must be 'shm' or 'store', got {mode!r}")
    return mode == "store"


def _store():
    from fabric import storage
    return storage.default()


class BlockRef:
    """A block on the cluster: its file, its row count, its schema (serialised), its size.

    ``base``: columns the block shares with the block it was computed from, as
    ``(base BlockRef, [(column, base column), ...])``; its own file holds only the other
    columns (``order`` is the full column order). A step that adds one column to twenty writes
    one column; the base block is kept alive by the Dataset that owns the new one."""

    __slots__ = ("path", "num_rows", "nbytes", "schema_buf", "host", "base", "order")

    def __init__(self, path, num_rows, nbytes, schema_buf, host=_HOST, base=None, order=None):
        self.path, self.num_rows, self.nbytes, self.schema_buf, self.host = path, num_rows, nbytes, schema_buf, host
        self.base, self.order = base, order

    def __reduce__(self):
        return BlockRef, (self.path, self.num_rows, self.nbytes, self.schema_buf, self.host, self.base, self.order)

    def __repr__(self):
        return f"<BlockRef {self.num_rows} rows {self.nbytes} B{' +base' if self.base else ''}>"

    def __fabric_cache_key__(self) -> str:
        """What ``@fabric.fn(cache=True)`` keys a block by: the hash of its file's bytes (the file
        is named at random, so the path differs between runs of one flow), its row count and
        columns, and its base's key; a Dataset argument thereby hits on equal content."""
        import hashlib

        h = hashlib.blake2b(digest_size=16)
        if self.path:
            if self.path.startswith(_STORE):
                h.update(_store().get_bytes(self.path[len(_STORE):]))
            else:
                with open(self.path, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
        base = None if self.base is None else (self.base[0].__fabric_cache_key__(), self.base[1])
        return f"{h.hexdigest()}|{self.num_rows}|{self.order}|{base}"

    def schema(self):
        import pyarrow as pa

        return pa.ipc.read_schema(pa.py_buffer(self.schema_buf))


def _bufs(arr):
    return tuple(None if b is None else (b.address, b.size) for b in arr.buffers())


def _shared_columns(table, base):
    """Columns of ``table`` that are the very buffers of columns of ``base`` (a zero-copy
    pass-through of the step's input): ``{column: base column}``."""
    bref, bt = base
    if bref is None or bt.num_rows != table.num_rows or len(set(table.column_names)) != table.num_columns:
        return {}
    index = {}
    for name, col in zip(bt.column_names, bt.columns):
        if col.num_chunks == 1:
            c = col.chunk(0)
            index[(str(c.type), c.offset, len(c), _bufs(c))] = name
    out = {}
    for name, col in zip(table.column_names, table.columns):
        if col.num_chunks == 1:
            c = col.chunk(0)
            hit = index.get((str(c.type), c.offset, len(c), _bufs(c)))
            if hit is not None:
                out[name] = hit
    return out


def _write_file(table, owner):
    import pyarrow as pa

    if _store_mode():
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, table.schema) as w:
            w.write_table(table)
        buf = sink.getvalue()
        key = f"ml-blocks/{_HOST}-{owner}/{secrets.token_hex(8)}.arrow"
        _store().put_bytes(key, buf)
        return _STORE + key, buf.size
    path = os.path.join(block_dir(), f"{owner}-{secrets.token_hex(8)}.arrow")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    with pa.OSFile(path, "wb") as sink:
        with pa.ipc.new_file(sink, table.schema) as w:
            w.write_table(table)
        nbytes = sink.tell()
    return path, nbytes


def write(table, owner: int, base=None) -> BlockRef:
    """Write ``table`` as an IPC file owned by process ``owner``; returns its reference.
    ``base``: ``(BlockRef, table)`` of the step's input, whose unchanged columns are shared."""
    schema_buf = table.schema.serialize().to_pybytes()
    shared = _shared_columns(table, base) if base is not None else {}
    if not shared:
        path, nbytes = _write_file(table, owner)
        return BlockRef(path, table.num_rows, nbytes, schema_buf)
    own = [n for n in table.column_names if n not in shared]
    path, nbytes = _write_file(table.select(own), owner) if own else (None, 0)
    return BlockRef(path, table.num_rows, nbytes, schema_buf, base=(base[0], list(shared.items())),
                    order=list(table.column_names))


def _read_file(path, host):
    import pyarrow as pa

    if path.startswith(_STORE):
        return pa.ipc.open_file(pa.py_buffer(_store().get_bytes(path[len(_STORE):]))).read_all()
    try:
        src = pa.memory_map(path, "r")
    except FileNotFoundError:
        if host != _HOST:
            raise RuntimeError(f"this block lives in shared memory on host {host!r}, not on {_HOST!r}: "
                               f"fabric.ml blocks are read on the host that wrote them (docs/data.md)") from None
        raise RuntimeError(f"block file {path} is gone: the Dataset that owned it was garbage collected "
                           f"or its process exited; keep a reference to the Dataset while using it") from None
    return pa.ipc.open_file(src).read_all()


def read(ref: BlockRef):
    """The table behind ``ref``, mapped from its file(s) (zero copy)."""
    import pyarrow as pa

    if ref.base is None:
        return _read_file(ref.path, ref.host)
    bref, pairs = ref.base
    bt = read(bref)
    own = _read_file(ref.path, ref.host) if ref.path else None
    shared = dict(pairs)
    cols = [bt[shared[n]] if n in shared else own[n] for n in ref.order]
    return pa.Table.from_arrays(cols, schema=ref.schema())


def free(ref) -> None:
    """Unlink a block's file, in a background thread: unlinking a large tmpfs file returns its
    pages to the kernel (~3 ms for 8 MiB), which need not hold up the caller."""
    global _reaper
    path = getattr(ref, "path", None)
    if not isinstance(path, str):
        return
    if _reaper is None or not _reaper.is_alive():
        with _lock:
            if _reaper is None or not _reaper.is_alive():
                _reaper = threading.Thread(target=_reap, daemon=True, name="fabric-ml-free")
                _reaper.start()
    _doomed.put(path)


_doomed: "queue.SimpleQueue[str]" = queue.SimpleQueue()
_reaper = None


def _reap():
    while True:
        path = _doomed.get()
        try:
            if path.startswith(_STORE):
                _store().delete(path[len(_STORE):], missing_ok=True)
            else:
                os.unlink(path)
        except Exception:  # noqa: BLE001 - best effort; the sweep and the exit hook catch the rest
            pass


def owner_tag() -> int:
    """This process's owner id (its pid); the first call sweeps files of dead owners and
    registers removal of this process's files at exit."""
    global _swept
    if not _swept:
        with _lock:
            if not _swept:
                _swept = True
                _sweep()
                atexit.register(_remove_own, os.getpid())
    return os.getpid()


def _sweep() -> None:
    d = block_dir()
    try:
        names = os.listdir(d)
    except OSError:
        return
    dead = {}
    for n in names:
        pid = n.split("-", 1)[0]
        if not pid.isdigit():
            continue
        if pid not in dead:
            dead[pid] = not config.pid_alive(int(pid))
        if dead[pid]:
            try:
                os.unlink(os.path.join(d, n))
            except OSError:
                pass


def _remove_own(pid: int) -> None:
    if os.getpid() != pid:
        return
    if _store_mode():
        try:
            store = _store()
            for key in store.ls(f"ml-blocks/{_HOST}-{pid}"):
                store.delete(key, missing_ok=True)
        except Exception:  # noqa: BLE001 - best effort at exit
            pass
        return
    d = block_dir()
    try:
        for n in os.listdir(d):
            if n.startswith(f"{pid}-"):
                try:
                    os.unlink(os.path.join(d, n))
                except OSError:
                    pass
    except OSError:
        pass
