"""fabric.ml Dataset: a lazy list of Arrow blocks that live on the cluster.

A Dataset is a list of *blocks* plus a plan of pending per-block operations. Each block is a
list of row ranges of *sources*: a block file in shared memory (``_blocks.BlockRef``, or the
``fabric.Future`` of a call that returns one), a table the driver ``fabric.put`` on the cluster,
or a read that has not run yet (a Parquet/CSV file, a range). Operations are fused: a chain of
``map_batches``/``map``/``filter``/``select_columns`` (and the read before them) runs as one
fabric call per block, which reads its input without a copy, applies the chain and writes its
output block back to shared memory. The driver sees only small references, so its memory
stays flat however big the data; it holds tables only when the user asks (``to_pandas``,
``take``, ``iter_batches``), and then maps them from shared memory too.

Calls are streamed with a bounded number in flight (twice the cluster's CPUs by default). A
class given to ``map_batches`` runs in ``concurrency`` warm ``@fabric.cls`` instances, its
``__init__`` once in each. Row-count-dependent operations (``limit``, ``split``,
``train_test_split``, ``repartition``, ``random_shuffle``) run the plan before them when called,
then only re-slice block references (no data moves) except ``random_shuffle``, which moves
every row once in a two-phase shuffle on the cluster.
"""
from __future__ import annotations

import builtins
import math
import os
import queue
import secrets
import sys
import threading
import weakref
from collections import deque

import fabric

from . import _blocks
from ._blocks import BlockRef
from ._deps import need

__all__ = ["Dataset", "read_parquet", "read_csv", "from_pandas", "from_numpy", "from_arrow", "from_items",
           "range", "DataContext"]

_FORMATS = ("pandas", "numpy", "pyarrow")
_GLOB = set("*?[")


def _pa():
    return need("pyarrow", "ml", "fabric.ml datasets")


class DataContext:
    """Knobs of Dataset execution (class attributes; set them before running an operation)."""

    #: calls in flight per operation; None: twice the cluster's CPUs (at least 4)
    max_in_flight: int | None = None
    #: draw a progress bar for operations over at least this many blocks (when stderr is a TTY)
    progress_min_blocks: int = 8
    #: target size of blocks made from in-memory data (from_pandas etc.)
    target_block_bytes: int = 32 << 20
    #: where per-block steps run: "cluster" (fabric calls), "local" (in this process), or
    #: "auto": local inside a gang member (a trainer's worker), whose gang holds the CPUs that
    #: nested calls would wait for (fabric does not lend a blocked call's CPU), else cluster
    execution: str = "auto"


def _local() -> bool:
    mode = DataContext.execution
    if mode not in ("auto", "cluster", "local"):
        raise ValueError(f"DataContext.execution must be 'auto', 'cluster' or 'local', got {mode!r}")
    if mode != "auto":
        return mode == "local"
    try:
        fabric.gang_context()
    except fabric.FabricError:
        return False
    return True


# ---------------------------------------------------------------------- sources
class _Read:
    """A read that runs on the cluster, in the call of the block it feeds."""

    __slots__ = ("kind", "fs", "path", "options")

    def __init__(self, kind, fs, path, options):
        self.kind, self.fs, self.path, self.options = kind, fs, path, options

    def __reduce__(self):
        return _Read, (self.kind, self.fs, self.path, self.options)

    def run(self):
        pa = _pa()
        if self.kind == "range":
            import numpy as np
            lo, hi = self.path
            return pa.table({"id": np.arange(lo, hi, dtype=np.int64)})
        columns = self.options.get("columns")
        if self.kind == "parquet":
            import pyarrow.parquet as pq
            with self.fs.open(self.path, "rb") as f:
                pf = pq.ParquetFile(f)
                if columns is not None:
                    _check_columns("read_parquet(columns=...)", columns, pf.schema_arrow.names)
                groups = self.options.get("row_groups")
                if groups is not None:
                    return pf.read_row_groups(groups, columns=columns)
                return pf.read(columns=columns)
        import pyarrow.csv as pcsv
        with self.fs.open(self.path, "rb") as f:
            t = pcsv.read_csv(f, **self.options.get("arrow_options", {}))
        if columns is not None:
            _check_columns("read_csv(columns=...)", columns, t.column_names)
            t = t.select(columns)
        return t


class _Done:
    """The outcome of a per-block step run in this process (local execution), shaped like a Future."""

    __slots__ = ("value", "error")

    def __init__(self, value=None, error=None):
        self.value, self.error = value, error

    def __reduce__(self):
        return _Done, (self.value, self.error)

    def done(self):
        return True

    def exception(self):
        return self.error

    def result(self, timeout=None):
        if self.error is not None:
            raise self.error
        return self.value

    def add_done_callback(self, fn):
        fn(self)


_FUTURES = (fabric.Future, _Done)


def _src_rows(src):
    """Row count of a source known without running anything on the cluster (None: a read)."""
    if isinstance(src, _FUTURES):
        src = src.result()
    if isinstance(src, BlockRef):
        return src.num_rows
    return None


def _src_schema(src):
    pa = _pa()
    if isinstance(src, _FUTURES):
        src = src.result()
    return pa.ipc.read_schema(pa.py_buffer(src.schema_buf))


def _load_src(src):
    """In a worker (or the driver): the table behind a source."""
    pa = _pa()
    if isinstance(src, _FUTURES):  # the driver reading its own blocks
        src = src.result()
    if isinstance(src, BlockRef):
        return _blocks.read(src)
    if isinstance(src, _Read):
        return src.run()
    if isinstance(src, pa.Table):
        return src
    raise TypeError(f"not a block source: {type(src).__name__}")


def _load(parts):
    pa = _pa()
    tables = []
    for src, lo, hi in parts:
        t = _load_src(src)
        if lo or (hi is not None and hi < t.num_rows):
            t = t.slice(lo, (t.num_rows if hi is None else hi) - lo)
        tables.append(t)
    if len(tables) == 1:
        return tables[0]
    return pa.concat_tables(tables, promote_options="default")


# ---------------------------------------------------------------------- batches
def _check_columns(where, wanted, have):
    missing = [c for c in wanted if c not in have]
    if missing:
        raise ValueError(f"{where}: no column(s) {', '.join(map(repr, missing))}; the columns are "
                         f"{', '.join(map(repr, have)) or '(none)'}")


def _check_format(fmt):
    if fmt not in _FORMATS:
        raise ValueError(f"batch_format must be one of {', '.join(map(repr, _FORMATS))}, got {fmt!r}")


def _to_numpy(t):
    import numpy as np
    pa = _pa()
    out = {}
    for name, col in zip(t.column_names, t.columns):
        if col.num_chunks != 1:
            col = col.combine_chunks()
        else:
            col = col.chunk(0)
        if pa.types.is_fixed_size_list(col.type) and col.null_count == 0:
            flat = col.flatten().to_numpy(zero_copy_only=False)
            out[name] = flat.reshape(len(col), col.type.list_size)
        else:
            out[name] = col.to_numpy(zero_copy_only=False)
    return out


def to_batch(t, fmt, zero_copy: bool = True):
    """An Arrow table as a batch of ``fmt``: a pandas DataFrame, a dict of numpy arrays, or itself.

    ``zero_copy``: numpy arrays and DataFrame columns are read-only views of the block (mapped
    shared memory); else writable copies, as ``map_batches`` gives by default (Ray's
    ``zero_copy_batch=False``)."""
    if fmt == "pyarrow":
        return t
    if fmt == "numpy":
        b = _to_numpy(t)
        if not zero_copy:
            import numpy as np
            b = {k: v if v.flags.writeable else np.array(v) for k, v in b.items()}
        return b
    return t.to_pandas(split_blocks=True) if zero_copy else t.to_pandas()


def from_batch(out, where="map_batches"):
    """A batch a user function returned, as an Arrow table; a clear TypeError for anything else."""
    pa = _pa()
    if isinstance(out, pa.Table):
        return out
    if isinstance(out, pa.RecordBatch):
        return pa.Table.from_batches([out])
    mod = type(out).__module__.split(".")[0]
    if mod == "pandas" and hasattr(out, "columns") and hasattr(out, "iloc"):
        return _from_pandas(out)
    if isinstance(out, dict):
        import numpy as np
        cols = {}
        for k, v in out.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: the returned dict's keys must be column names (str), got "
                                f"{type(k).__name__} {k!r}")
            if isinstance(v, np.ndarray) and v.ndim > 1:
                v = np.ascontiguousarray(v)
                inner = pa.array(v.reshape(len(v), -1).ravel())
                cols[k] = pa.FixedSizeListArray.from_arrays(inner, int(np.prod(v.shape[1:])))
            elif isinstance(v, (pa.Array, pa.ChunkedArray)):
                cols[k] = v
            else:
                cols[k] = pa.array(v)
        lengths = {len(v) for v in cols.values()}
        if len(lengths) > 1:
            raise ValueError(f"{where}: the returned columns have different lengths "
                             f"({', '.join(f'{k}={len(v)}' for k, v in cols.items())})")
        return pa.table(cols)
    raise TypeError(f"{where}: the function must return a pandas.DataFrame, a dict of numpy arrays or a "
                    f"pyarrow.Table, but it returned {type(out).__module__}.{type(out).__qualname__}")


def _from_pandas(df):
    """A DataFrame as a table. Plain numeric numpy columns are taken as they are (NaN becomes
    null, as pyarrow's from_pandas does): ~50x faster than ``Table.from_pandas`` for a wide
    float frame, which converts column by column through its generic path."""
    pa = _pa()
    import numpy as np
    cols = {}
    try:
        for name, dt in zip(df.columns, df.dtypes):
            if not isinstance(name, str) or not isinstance(dt, np.dtype) or dt.kind not in "biuf" or name in cols:
                raise LookupError
            arr = df[name].to_numpy()
            # NaN -> null as from_pandas does; the scan for NaN is 70x cheaper than from_pandas=True's
            nan = dt.kind == "f" and bool(np.isnan(arr).any())
            cols[name] = pa.array(arr, from_pandas=True) if nan else pa.array(arr)
    except LookupError:
        return pa.Table.from_pandas(df, preserve_index=False)
    return pa.table(cols)


def _empty_like(t):
    return t.slice(0, 0)


# ---------------------------------------------------------------------- per-block operations
class _Op:
    cpus = 1.0
    gpus = 0.0


class _MapBatches(_Op):
    def __init__(self, fn, fmt, batch_size, fn_args, fn_kwargs, is_class, name, zero_copy=False):
        self.fn, self.fmt, self.batch_size = fn, fmt, batch_size
        self.fn_args, self.fn_kwargs, self.is_class, self.name = fn_args, fn_kwargs, is_class, name
        self.zero_copy = zero_copy

    def apply(self, t, inst):
        f = inst if self.is_class else self.fn
        if t.num_rows == 0:
            return t
        bs = self.batch_size
        where = f"map_batches({self.name})"
        if bs is None or bs >= t.num_rows:
            return from_batch(f(to_batch(t, self.fmt, self.zero_copy), *self.fn_args, **self.fn_kwargs), where)
        outs = [from_batch(f(to_batch(t.slice(o, bs), self.fmt, self.zero_copy), *self.fn_args, **self.fn_kwargs),
                           where)
                for o in builtins.range(0, t.num_rows, bs)]
        return _pa().concat_tables(outs, promote_options="default")


class _Map(_Op):
    def __init__(self, fn, flat=False):
        self.fn, self.flat = fn, flat

    def apply(self, t, inst):
        if t.num_rows == 0:
            return t
        out = []
        name = getattr(self.fn, "__name__", "fn")
        for row in t.to_pylist():
            r = self.fn(row)
            rows = r if self.flat else (r,)
            for x in rows:
                if not isinstance(x, dict):
                    raise TypeError(f"{'flat_map' if self.flat else 'map'}({name}): the function must return "
                                    f"{'a list of dicts' if self.flat else 'a dict'} (one row), got "
                                    f"{type(x).__name__}")
                out.append(x)
        if not out:
            return _empty_like(t)
        return _pa().Table.from_pylist(out)


class _Filter(_Op):
    def __init__(self, fn):
        self.fn = fn

    def apply(self, t, inst):
        if t.num_rows == 0:
            return t
        mask = [bool(self.fn(row)) for row in t.to_pylist()]
        return t.filter(_pa().array(mask, type=_pa().bool_()))


class _Select(_Op):
    def __init__(self, cols, drop=False):
        self.cols, self.drop = cols, drop

    def apply(self, t, inst):
        _check_columns("drop_columns" if self.drop else "select_columns", self.cols, t.column_names)
        return t.drop_columns(self.cols) if self.drop else t.select(self.cols)


class _Stage:
    """Operations fused into one call per block: a plain call, or a call to a warm instance."""

    def __init__(self, ops, cpus, gpus, actor=None, concurrency=None):
        self.ops, self.cpus, self.gpus, self.actor, self.concurrency = tuple(ops), cpus, gpus, actor, concurrency

    def __reduce__(self):
        return _Stage, (self.ops, self.cpus, self.gpus, self.actor, self.concurrency)


def _finish(t, term, owner, base=None):
    kind = term[0]
    if kind == "write":
        return _blocks.write(t, owner, base)
    if kind == "count":
        return t.num_rows
    if kind == "table":
        return t
    if kind == "schema":
        return t.schema.serialize().to_pybytes()
    if kind == "agg":
        return term[1](t)
    if kind == "parquet":
        import pyarrow.parquet as pq
        _, fs, path, local = term
        with fs.open(path, "wb") as f:
            pq.write_table(t, f)
        if local:
            os.chmod(path, 0o600)
        return t.num_rows
    if kind == "shuffle_map":
        import numpy as np
        _, n_out, seed = term
        rng = np.random.default_rng(seed)
        assign = rng.integers(0, n_out, size=t.num_rows)
        order = np.argsort(assign, kind="stable")
        counts = np.bincount(assign, minlength=n_out)
        offsets = [0] + np.cumsum(counts).tolist()
        return _blocks.write(t.take(order), owner), offsets
    if kind == "shuffle_reduce":
        import numpy as np
        rng = np.random.default_rng(term[1])
        return _blocks.write(t.take(rng.permutation(t.num_rows)), owner)
    raise ValueError(f"unknown terminal {kind!r}")


def _run_ops(t, ops, inst):
    for op in ops:
        t = op.apply(t, inst)
    return t


def _base_of(parts, t0, term):
    """``(BlockRef, table)`` of a step's input when its output may share the input's columns:
    a ``("write", "share")`` step over one whole block file."""
    if len(term) < 2 or term[1] != "share" or len(parts) != 1:
        return None
    src, lo, hi = parts[0]
    if isinstance(src, _FUTURES):
        src = src.result()
    if not isinstance(src, BlockRef) or lo or (hi is not None and hi < src.num_rows):
        return None
    return src, t0


def _run_block(parts, ops, term, owner, inst):
    t0 = _load(parts)
    t = _run_ops(t0, ops, inst)
    return _finish(t, term, owner, _base_of(parts, t0, term) if term[0] == "write" else None)


def _block_task(parts, ops, term, owner):
    return _run_block(parts, ops, term, owner, None)


class _BatchActor:
    """A warm instance running a user class's batches: ``__init__`` once, then one call per block."""

    def __init__(self, klass, args, kwargs):
        self.inst = klass(*args, **kwargs)

    def run(self, parts, ops, term, owner):
        return _run_block(parts, ops, term, owner, self.inst)


_task_fns: dict = {}
_actor_cls = None


def _task_fn(cpus, gpus):
    key = (cpus, gpus)
    f = _task_fns.get(key)
    if f is None:
        f = _task_fns[key] = fabric.fn(_block_task, cpus=cpus, gpus=gpus, name="ml.block")
    return f


def _actor_class(cpus, gpus):
    global _actor_cls
    if _actor_cls is None:
        _actor_cls = fabric.cls(_BatchActor, name="ml.batch_actor")
    return _actor_cls.options(cpus=cpus, gpus=gpus)


def _by_value(obj):
    """User code from the user's own modules (tests, scripts beside the driver) travels by value,
    as fabric does for the functions it runs: workers need not import those modules."""
    import cloudpickle
    import sysconfig
    name = getattr(obj, "__module__", None)
    if not name or name == "__main__" or name.split(".")[0] in ("fabric", "cloudpickle", "builtins"):
        return
    mod = sys.modules.get(name)
    path = getattr(mod, "__file__", None)
    if mod is None or path is None:
        return
    path = os.path.realpath(path)
    paths = sysconfig.get_paths()
    libs = {os.path.realpath(paths[k]) for k in ("purelib", "platlib", "stdlib")}
    if "site-packages" in path or any(path.startswith(d + os.sep) for d in libs):
        return
    try:
        cloudpickle.register_pickle_by_value(mod)
    except (ValueError, TypeError):
        pass


# ---------------------------------------------------------------------- block ownership
def _free_future(f):
    try:
        r = f.result()
    except BaseException:  # noqa: BLE001 - a failed call wrote nothing
        return
    if isinstance(r, tuple):
        r = r[0]
    if isinstance(r, BlockRef):
        _blocks.free(r)


def _free_all(futs):
    for f in futs:
        if isinstance(f, _FUTURES):
            f.add_done_callback(_free_future)
        elif isinstance(f, BlockRef):
            _blocks.free(f)


class _Owner:
    """Owns block files in the process that made them: unlinked when no Dataset refers to them."""

    def __init__(self, futs):
        self.futs = futs
        weakref.finalize(self, _free_all, futs)


# ---------------------------------------------------------------------- progress
class _Bar:
    def __init__(self, name, total):
        self.p = None
        if total >= DataContext.progress_min_blocks and sys.stderr.isatty():
            try:
                from rich.console import Console
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
            except ImportError:
                return
            self.p = Progress(TextColumn(f"[bold]{name}[/]"), BarColumn(), MofNCompleteColumn(),
                              TextColumn("blocks"), TimeElapsedColumn(), console=Console(stderr=True),
                              transient=True)
            self.p.start()
            self.task = self.p.add_task(name, total=total)

    def advance(self):
        if self.p:
            self.p.advance(self.task)

    def close(self):
        if self.p:
            self.p.stop()
            self.p = None


def _window():
    if DataContext.max_in_flight:
        return DataContext.max_in_flight
    return max(4, int(2 * _cluster_cpus()))


def _cluster_cpus():
    try:
        cpus = sum(e.get("cpus", 0) for e in fabric.cluster_status().get("executors", []))
    except Exception:  # noqa: BLE001
        cpus = 0
    return cpus or (os.cpu_count() or 1)


class _Pool:
    """The warm instances of one class stage; each block goes to the least busy one."""

    def __init__(self, stage):
        klass, args, kwargs = stage.actor
        rc = _actor_class(stage.cpus, stage.gpus)
        self.handles = [rc.remote(klass, args, kwargs) for _ in builtins.range(stage.concurrency)]
        self.load = [0] * len(self.handles)
        self.lock = threading.Lock()

    def submit(self, parts, ops, term, owner):
        with self.lock:
            k = min(builtins.range(len(self.load)), key=self.load.__getitem__)
            self.load[k] += 1
        fut = self.handles[k].run.remote(parts, ops, term, owner)

        def done(_f, k=k):
            with self.lock:
                self.load[k] -= 1
        fut.add_done_callback(done)
        return fut


# ---------------------------------------------------------------------- Dataset
class Dataset:
    """A lazy, distributed table: blocks on the cluster plus pending per-block operations."""

    def __init__(self, blocks, stages=(), keep=()):
        self._blocks = blocks      # list of blocks; a block is a list of (source, lo, hi)
        self._stages = tuple(stages)
        self._keep = tuple(keep)   # _Owner objects keeping the block files alive

    # --- pickling: done Futures travel as their (tiny) references; the copy owns nothing
    def __getstate__(self):
        # every block reference by value (waiting for pending ones), so a Dataset pickles anywhere:
        # into calls, into fabric.put, into a checkpoint or a tune experiment's state
        blocks = [[(s.result() if isinstance(s, _FUTURES) else s, lo, hi) for s, lo, hi in b] for b in self._blocks]
        return {"blocks": blocks, "stages": self._stages}

    def __setstate__(self, state):
        self._blocks, self._stages, self._keep = state["blocks"], state["stages"], ()

    def __repr__(self):
        plan = " -> ".join(type(op).__name__.strip("_") for s in self._stages for op in s.ops)
        return f"<fabric.ml.Dataset {len(self._blocks)} blocks{', pending: ' + plan if plan else ''}>"

    def _derive(self, stages=None, blocks=None, keep=None):
        return Dataset(self._blocks if blocks is None else blocks, self._stages if stages is None else stages,
                       self._keep if keep is None else keep)

    # --- plan building
    def _add(self, op, cpus=1.0, gpus=0.0, concurrency=None):
        stages = list(self._stages)
        if stages:
            last = stages[-1]
            stages[-1] = _Stage(last.ops + (op,), max(last.cpus, cpus) if last.actor is None else last.cpus,
                                max(last.gpus, gpus) if last.actor is None else last.gpus, last.actor,
                                _min_none(last.concurrency, concurrency) if last.actor is None else last.concurrency)
        else:
            stages.append(_Stage((op,), cpus, gpus, None, concurrency))
        return self._derive(stages=stages)

    def _add_class(self, op, actor, cpus, gpus, concurrency):
        stages = list(self._stages)
        if stages and stages[-1].actor is None:  # fuse the plain operations before it into the instance call
            pre = stages.pop()
            stages.append(_Stage(pre.ops + (op,), max(cpus, pre.cpus), max(gpus, pre.gpus), actor, concurrency))
        else:
            stages.append(_Stage((op,), cpus, gpus, actor, concurrency))
        return self._derive(stages=stages)

    def map_batches(self, fn, *, batch_size: int | None = None, batch_format: str = "pandas",
                    fn_args=None, fn_kwargs: dict | None = None, fn_constructor_args=None,
                    fn_constructor_kwargs: dict | None = None, concurrency=None, cpus: float = 1,
                    gpus: float = 0, num_cpus: float | None = None, num_gpus: float | None = None,
                    zero_copy_batch: bool = False) -> "Dataset":
        """Apply ``fn`` to batches (``batch_size`` rows; None: a whole block) in ``batch_format``.

        ``fn`` may be a class: it runs in ``concurrency`` warm instances (its ``__init__`` once in
        each, with ``fn_constructor_kwargs``) and its ``__call__(batch)`` per batch. ``fn`` returns
        a pandas DataFrame, a dict of numpy arrays, or a pyarrow Table. Batches are writable
        copies; ``zero_copy_batch=True`` gives read-only views of the block instead (no copy,
        and unchanged columns are then shared with the output block, not written again)."""
        import inspect
        _check_format(batch_format)
        if not callable(fn):
            raise TypeError(f"map_batches expects a function or a class, got {type(fn).__name__}")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):
            raise ValueError(f"batch_size must be a whole number >= 1 or None, got {batch_size!r}")
        cpus = num_cpus if num_cpus is not None else cpus
        gpus = num_gpus if num_gpus is not None else gpus
        fn_kwargs = dict(fn_kwargs or {})
        fn_args = tuple(fn_args or ())
        if isinstance(concurrency, tuple):
            concurrency = concurrency[-1]
        if concurrency is not None and (isinstance(concurrency, bool) or not isinstance(concurrency, int)
                                        or concurrency < 1):
            raise ValueError(f"concurrency must be a whole number >= 1, got {concurrency!r}")
        _by_value(fn)
        name = getattr(fn, "__name__", type(fn).__name__)
        if inspect.isclass(fn):
            if not any("__call__" in vars(k) for k in fn.__mro__[:-1]):
                raise TypeError(f"map_batches: the class {fn.__name__} must define __call__(self, batch)")
            conc = concurrency or max(1, min(len(self._blocks), int(_cluster_cpus() // max(cpus, 1e-9)) or 1))
            op = _MapBatches(None, batch_format, batch_size, fn_args, fn_kwargs, True, name, zero_copy_batch)
            actor = (fn, tuple(fn_constructor_args or ()), dict(fn_constructor_kwargs or {}))
            return self._add_class(op, actor, float(cpus), float(gpus), conc)
        if fn_constructor_kwargs or fn_constructor_args:
            raise TypeError("fn_constructor_args/fn_constructor_kwargs are for a class given to map_batches; "
                            f"{name} is a function (pass its arguments with fn_kwargs)")
        return self._add(_MapBatches(fn, batch_format, batch_size, fn_args, fn_kwargs, False, name, zero_copy_batch),
                         float(cpus), float(gpus), concurrency)

    def map(self, fn, *, cpus: float = 1, gpus: float = 0) -> "Dataset":
        """Apply ``fn(row: dict) -> dict`` to each row."""
        if not callable(fn):
            raise TypeError(f"map expects a function, got {type(fn).__name__}")
        _by_value(fn)
        return self._add(_Map(fn), float(cpus), float(gpus))

    def flat_map(self, fn, *, cpus: float = 1, gpus: float = 0) -> "Dataset":
        """Apply ``fn(row) -> list[dict]`` to each row; the output rows are all the lists' rows."""
        if not callable(fn):
            raise TypeError(f"flat_map expects a function, got {type(fn).__name__}")
        _by_value(fn)
        return self._add(_Map(fn, flat=True), float(cpus), float(gpus))

    def filter(self, fn, *, cpus: float = 1) -> "Dataset":
        """Keep the rows for which ``fn(row: dict)`` is true."""
        if not callable(fn):
            raise TypeError(f"filter expects a function, got {type(fn).__name__}")
        _by_value(fn)
        return self._add(_Filter(fn), float(cpus))

    def _cols_arg(self, cols, where):
        if isinstance(cols, str):
            cols = [cols]
        cols = list(cols)
        if not all(isinstance(c, str) for c in cols):
            raise TypeError(f"{where} expects column names (str)")
        if not self._stages and self._blocks and self._known():  # check now when it costs nothing
            _check_columns(where, cols, self.schema().names)
        return cols

    def select_columns(self, cols) -> "Dataset":
        return self._add(_Select(self._cols_arg(cols, "select_columns")), 1.0)

    def drop_columns(self, cols) -> "Dataset":
        return self._add(_Select(self._cols_arg(cols, "drop_columns"), drop=True), 1.0)

    # --- execution
    def _known(self) -> bool:
        """True when there is nothing to run: no pending operations and no pending reads."""
        return not self._stages and all(not isinstance(s, _Read) for b in self._blocks for s, _, _ in b)

    def _execute(self, term, progress: str | None = None):
        """Run the plan and ``term`` on every block, ``window`` calls in flight; yields
        ``(index, future)`` in block order as each finishes. Block files the calls write belong
        to the caller."""
        stages = self._stages or (_Stage((), 1.0, 0.0),)
        owner = _blocks.owner_tag()
        n = len(self._blocks)
        if _local():
            yield from _execute_here(self._blocks, stages, term, owner)
            return
        window = _window()
        for s in stages:
            if s.concurrency and s.actor is None:
                window = min(window, s.concurrency)
        pools = {}
        bar = _Bar(progress, n) if progress else None
        pending = deque()
        inter = []   # intermediate block futures between stages, freed at the end
        try:
            for i, parts in enumerate(self._blocks):
                for k, s in enumerate(stages):
                    t = (term(i) if callable(term) else term) if k == len(stages) - 1 else ("write",)
                    if k == 0 and t[0] == "write":
                        t = ("write", "share")   # the first stage's input blocks outlive its output
                    if s.actor is not None:
                        pool = pools.get(k) or pools.setdefault(k, _Pool(s))
                        fut = pool.submit(parts, s.ops, t, owner)
                    else:
                        fut = _task_fn(s.cpus, s.gpus).remote(parts, s.ops, t, owner)
                    if k < len(stages) - 1:
                        inter.append(fut)
                        parts = [(fut, 0, None)]
                pending.append((i, fut))
                while len(pending) >= window:
                    j, f = pending.popleft()
                    f.result()
                    if bar:
                        bar.advance()
                    yield j, f
            while pending:
                j, f = pending.popleft()
                f.result()
                if bar:
                    bar.advance()
                yield j, f
        finally:
            if bar:
                bar.close()
            # whatever the consumer did not take (it stopped early or a call failed) is freed
            _free_all([f for _, f in pending])
            _free_all(inter)
            pools.clear()

    def materialize(self) -> "Dataset":
        """Run the pending plan now; the result holds computed blocks on the cluster."""
        if self._known():
            return self
        futs = [f for _, f in self._execute(("write",), progress="materialize")]
        # the new blocks may share columns with the input blocks: keep those alive too
        return Dataset([[(f, 0, None)] for f in futs], (), (_Owner(futs),) + self._keep)

    def _aggregate(self, fn):
        """``fn(table)`` for every block, run on the cluster; returns the list of (small) results."""
        _by_value(fn)
        return [f.result() for _, f in self._execute(("agg", fn), progress="aggregate")]

    def _counts(self):
        """Row counts per block, with the dataset materialized first if needed."""
        ds = self.materialize()
        counts = []
        for b in ds._blocks:
            n = 0
            for s, lo, hi in b:
                rows = _src_rows(s)
                n += (rows if hi is None else min(hi, rows)) - lo
            counts.append(n)
        return ds, counts

    def count(self) -> int:
        """Number of rows (runs the pending plan, writing nothing)."""
        if self._known():
            return sum(self._counts()[1])
        return sum(f.result() for _, f in self._execute(("count",), progress="count"))

    def num_blocks(self) -> int:
        return len(self._blocks)

    def schema(self):
        """The ``pyarrow.Schema`` of the rows (runs the plan on the first block if pending)."""
        pa = _pa()
        if not self._blocks:
            return pa.schema([])
        if self._known():
            return _src_schema(self._blocks[0][0][0])
        first = self._derive(blocks=self._blocks[:1])
        for _, f in first._execute(("schema",)):
            return pa.ipc.read_schema(pa.py_buffer(f.result()))

    def columns(self) -> list:
        return list(self.schema().names)

    # --- row-count dependent operations (run the plan before them)
    def _rows(self, ds, counts, lo, hi):
        """Blocks covering rows [lo, hi) of ``ds``, block boundaries kept; no data moves."""
        out, start = [], 0
        for b, n in zip(ds._blocks, counts):
            end = start + n
            a, z = max(lo, start), min(hi, end)
            if a < z:
                out.append(_slice_block(b, a - start, z - start))
            start = end
        return out

    def limit(self, n: int) -> "Dataset":
        """The first ``n`` rows (runs the plan only as far as needed)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"limit needs a whole number >= 0, got {n!r}")
        if self._known():
            ds, counts = self._counts()
            return ds._derive(blocks=self._rows(ds, counts, 0, n))
        blocks, futs, got = [], [], 0
        gen = self._execute(("write",))
        try:
            for _, f in gen:
                if got >= n:
                    _free_future(f)   # computed ahead, not needed
                    break
                ref = f.result()
                futs.append(f)
                take = min(n - got, ref.num_rows)
                if take:
                    blocks.append([(f, 0, take)])
                got += take
        finally:
            gen.close()
        return Dataset(blocks, (), self._keep + (_Owner(futs),))

    def split(self, n: int, *, equal: bool = True) -> list:
        """``n`` Datasets of (with ``equal``) exactly ``count() // n`` rows each, else sizes
        within one row of each other; only block references are sliced."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"split needs a whole number of shards >= 1, got {n!r}")
        ds, counts = self._counts()
        total = sum(counts)
        if equal:
            bounds = [k * (total // n) for k in builtins.range(n + 1)]
        else:
            bounds = [round(k * total / n) for k in builtins.range(n + 1)]
        return [ds._derive(blocks=self._rows(ds, counts, bounds[k], bounds[k + 1])) for k in builtins.range(n)]

    def split_at_indices(self, indices) -> list:
        ds, counts = self._counts()
        total = sum(counts)
        bounds = [0] + [min(int(i), total) for i in indices] + [total]
        if any(a > b for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"split_at_indices needs increasing indices, got {list(indices)}")
        return [ds._derive(blocks=self._rows(ds, counts, a, b)) for a, b in zip(bounds, bounds[1:])]

    def train_test_split(self, test_size=0.25, *, shuffle: bool = True, seed: int | None = None):
        """``(train, test)``: ``test_size`` is a fraction in (0, 1) or a row count."""
        if isinstance(test_size, bool) or not isinstance(test_size, (int, float)):
            raise TypeError(f"test_size must be a fraction in (0, 1) or a number of rows, got {test_size!r}")
        ds = self.random_shuffle(seed=seed) if shuffle else self
        ds, counts = ds._counts()
        total = sum(counts)
        if isinstance(test_size, float):
            if not 0 < test_size < 1:
                raise ValueError(f"test_size as a fraction must be between 0 and 1 (exclusive), got {test_size}")
            n_test = int(total * test_size)
        else:
            if not 0 < test_size < total:
                raise ValueError(f"test_size as a row count must be between 1 and {total - 1} (the dataset "
                                 f"has {total} rows), got {test_size}")
            n_test = test_size
        return ds.split_at_indices([total - n_test])

    def repartition(self, n: int, *, shuffle: bool = False) -> "Dataset":
        """``n`` blocks of (nearly) equal row counts; without ``shuffle`` only references move."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"repartition needs a whole number of blocks >= 1, got {n!r}")
        if shuffle:
            return self.random_shuffle(num_blocks=n)
        ds, counts = self._counts()
        total = sum(counts)
        out = []
        for k in builtins.range(n):
            lo, hi = round(k * total / n), round((k + 1) * total / n)
            parts = [p for b in self._rows(ds, counts, lo, hi) for p in b]
            if parts:
                out.append(parts)
        return ds._derive(blocks=out)

    def random_shuffle(self, *, seed: int | None = None, num_blocks: int | None = None) -> "Dataset":
        """Rows in a random order, a two-phase shuffle on the cluster: each block splits its
        rows among the output blocks, each output block gathers and permutes its share."""
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        seed = secrets.randbits(63) if seed is None else seed
        n_out = num_blocks or len(self._blocks)
        if not self._blocks:
            return self
        owner = _blocks.owner_tag()
        maps = []
        for i, f in self._execute(lambda i: ("shuffle_map", n_out, [seed, i]), progress="random_shuffle"):
            maps.append(f)
        refs = [f.result() for f in maps]
        outs = []
        for j in builtins.range(n_out):
            parts = [(ref, offs[j], offs[j + 1]) for ref, offs in refs if offs[j + 1] > offs[j]]
            if not parts:
                continue
            term = ("shuffle_reduce", [seed, j, 1])
            outs.append(_Done(_block_task(parts, (), term, owner)) if _local()
                        else _task_fn(1.0, 0.0).remote(parts, (), term, owner))
        first = [r for r, _ in refs]
        left = [len(outs)]
        lock = threading.Lock()

        def one_done(_f):  # phase-1 files go once every phase-2 call has read them
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                _free_all(first)
        for f in outs:
            f.add_done_callback(one_done)
        if not outs:
            _free_all(first)
        return Dataset([[(f, 0, None)] for f in outs], (), (_Owner(outs),))

    # --- output
    def write_parquet(self, path: str, *, storage_options: dict | None = None, filesystem=None) -> int:
        """Write one Parquet file per block under the folder ``path`` (any fsspec URL); returns rows written."""
        fs, root = _filesystem(path, storage_options, filesystem)
        local = _is_local(fs)
        if local:
            os.makedirs(root, mode=0o700, exist_ok=True)
        else:
            try:
                fs.makedirs(root, exist_ok=True)
            except Exception:  # noqa: BLE001 - object stores have no folders
                pass
        rows = 0
        n = len(self._blocks)
        width = max(5, len(str(n)))
        terms = [("parquet", fs, f"{root.rstrip('/')}/part-{i:0{width}d}.parquet", local) for i in builtins.range(n)]
        for _, f in self._execute(lambda i: terms[i], progress="write_parquet"):
            rows += f.result()
        return rows

    def _tables(self, prefetch: int = 1):
        """The blocks as Arrow tables in this process, in order, mapped from shared memory."""
        if self._known():
            for b in self._blocks:
                yield _load(b)
            return
        if _local():
            stages = self._stages or (_Stage((), 1.0, 0.0),)
            for _, d in _execute_here(self._blocks, stages, ("table",), 0):
                yield d.result()
            return
        q: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        stop = threading.Event()
        END = object()

        def produce():
            gen = self._execute(("write",))
            try:
                for _, f in gen:
                    ref = f.result()
                    t = _blocks.read(ref)
                    _blocks.free(ref)    # mapped: the pages live as long as the table
                    while not stop.is_set():
                        try:
                            q.put(t, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                q.put(END)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                q.put(e)
            finally:
                gen.close()

        th = threading.Thread(target=produce, daemon=True, name="fabric-ml-prefetch")
        th.start()
        try:
            while True:
                item = q.get()
                if item is END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()

    def iter_batches(self, *, batch_size: int | None = 256, batch_format: str = "numpy", drop_last: bool = False,
                     local_shuffle_buffer_size: int | None = None, local_shuffle_seed: int | None = None,
                     prefetch_batches: int = 1):
        """Batches of ``batch_size`` rows in this process, blocks fetched ahead while you
        consume; ``local_shuffle_buffer_size`` mixes rows within a buffer of that many rows."""
        _check_format(batch_format)
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):
            raise ValueError(f"batch_size must be a whole number >= 1 or None, got {batch_size!r}")
        pa = _pa()
        rng = None
        if local_shuffle_buffer_size:
            import numpy as np
            rng = np.random.default_rng(local_shuffle_seed)
        buf, buffered = [], 0
        need_rows = (local_shuffle_buffer_size or 0) + (batch_size or 0)

        def emit(table, final):
            nonlocal buf, buffered
            if rng is not None and table.num_rows:
                table = table.take(rng.permutation(table.num_rows))
            if batch_size is None:
                yield to_batch(table, batch_format)
                return
            o = 0
            keep = (local_shuffle_buffer_size or 0) // 2 if (rng is not None and not final) else 0
            while table.num_rows - o >= batch_size and table.num_rows - o - batch_size >= keep:
                yield to_batch(table.slice(o, batch_size), batch_format)
                o += batch_size
            rest = table.slice(o)
            if final:
                if rest.num_rows and not drop_last:
                    yield to_batch(rest, batch_format)
                buf, buffered = [], 0
            else:
                buf, buffered = ([rest] if rest.num_rows else []), rest.num_rows

        for t in self._tables(prefetch_batches):
            if t.num_rows == 0:
                continue
            if batch_size is None and rng is None:
                yield to_batch(t, batch_format)
                continue
            buf.append(t)
            buffered += t.num_rows
            if buffered >= max(need_rows, 1):
                yield from emit(pa.concat_tables(buf, promote_options="default"), False)
        if buf:
            yield from emit(pa.concat_tables(buf, promote_options="default"), True)

    def iter_torch_batches(self, *, batch_size: int | None = 256, dtypes=None, device="cpu", drop_last: bool = False,
                           local_shuffle_buffer_size: int | None = None, local_shuffle_seed: int | None = None,
                           prefetch_batches: int = 1, collate_fn=None):
        """``iter_batches`` as dicts of torch tensors (``dtypes``: one dtype or a dict by column)."""
        torch = need("torch", "torch", "iter_torch_batches")
        for b in self.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=drop_last,
                                   local_shuffle_buffer_size=local_shuffle_buffer_size,
                                   local_shuffle_seed=local_shuffle_seed, prefetch_batches=prefetch_batches):
            if collate_fn is not None:
                yield collate_fn(b)
                continue
            out = {}
            for k, v in b.items():
                dt = dtypes.get(k) if isinstance(dtypes, dict) else dtypes
                if v.dtype.kind in "biufc":
                    if not v.flags.writeable:  # mapped from shared memory: torch wants its own
                        v = v.copy()
                    out[k] = torch.as_tensor(v, dtype=dt, device=device)
                else:
                    out[k] = v
            yield out

    def to_tf(self, feature_columns, label_columns=None, *, batch_size: int = 256, drop_last: bool = False,
              local_shuffle_buffer_size: int | None = None, local_shuffle_seed: int | None = None):
        """A ``tf.data.Dataset`` of ``(features, labels)`` batches (a column name gives a tensor,
        a list of names a dict of tensors). Its auto-shard policy is OFF: in a trainer it is this
        worker's shard already, and tf.distribute's default (DATA, for a generator) would keep only
        every n-th batch of it. Under MultiWorkerMirroredStrategy Keras takes ``batch_size`` as the
        global batch and gives each of the ``num_replicas_in_sync`` replicas its part of it."""
        tf = need("tensorflow", "tf", "to_tf")
        schema = self.schema()
        names = schema.names
        feats = [feature_columns] if isinstance(feature_columns, str) else list(feature_columns)
        labels = [] if label_columns is None else (
            [label_columns] if isinstance(label_columns, str) else list(label_columns))
        _check_columns("to_tf", feats + labels, names)
        sample = self.take_batch(1, batch_format="numpy")

        def spec(c):
            v = sample[c]
            return tf.TensorSpec(shape=(None,) + tuple(v.shape[1:]), dtype=tf.as_dtype(v.dtype))

        def own(v):
            # a block's columns are read-only views of shared memory; TF may take a numpy array's
            # buffer as a tensor's and then reuse it for an op's output (buffer forwarding): a
            # write into read-only memory, which killed Keras workers with SIGSEGV. TF gets a copy.
            return v if v.flags.writeable else v.copy()

        def pack(cols, b):
            if isinstance(cols, str):
                return own(b[cols])
            return {c: own(b[c]) for c in cols}

        fspec = spec(feature_columns) if isinstance(feature_columns, str) else {c: spec(c) for c in feats}
        if label_columns is None:
            sig = fspec
        else:
            lspec = spec(label_columns) if isinstance(label_columns, str) else {c: spec(c) for c in labels}
            sig = (fspec, lspec)

        def gen():
            for b in self.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=drop_last,
                                       local_shuffle_buffer_size=local_shuffle_buffer_size,
                                       local_shuffle_seed=local_shuffle_seed):
                f = pack(feature_columns, b)
                yield f if label_columns is None else (f, pack(label_columns, b))

        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        return tf.data.Dataset.from_generator(gen, output_signature=sig).with_options(options)

    def to_arrow(self):
        """All rows as one ``pyarrow.Table`` in this process."""
        pa = _pa()
        tables = [t for t in self._tables()]
        nonempty = [t for t in tables if t.num_rows]
        if not nonempty:
            return tables[0] if tables else pa.table({})
        return pa.concat_tables(nonempty, promote_options="default")

    def to_pandas(self, limit: int | None = None):
        """All rows (or the first ``limit``) as a pandas DataFrame in this process."""
        ds = self if limit is None else self.limit(limit)
        return ds.to_arrow().to_pandas()

    def take(self, n: int = 20) -> list:
        """The first ``n`` rows as dicts."""
        return self.limit(n).to_arrow().to_pylist()

    def take_all(self) -> list:
        return self.to_arrow().to_pylist()

    def take_batch(self, n: int = 20, *, batch_format: str = "numpy"):
        """The first ``n`` rows as one batch of ``batch_format``."""
        _check_format(batch_format)
        return to_batch(self.limit(n).to_arrow(), batch_format)

    def show(self, n: int = 20) -> None:
        for row in self.take(n):
            print(row)

    def stats(self) -> str:
        return repr(self)


def _execute_here(blocks, stages, term, owner):
    """``Dataset._execute`` in this process: the same steps, one block after another."""
    insts = {}
    for i, parts in enumerate(blocks):
        t = t0 = _load(parts)
        for k, s in enumerate(stages):
            inst = None
            if s.actor is not None:
                if k not in insts:
                    klass, args, kwargs = s.actor
                    insts[k] = klass(*args, **kwargs)
                inst = insts[k]
            t = _run_ops(t, s.ops, inst)
        tm = term(i) if callable(term) else term
        base = _base_of(parts, t0, ("write", "share")) if tm[0] == "write" else None
        yield i, _Done(_finish(t, tm, owner, base))


def _min_none(a, b):
    return b if a is None else (a if b is None else min(a, b))


def _slice_block(parts, lo, hi):
    """Rows [lo, hi) of a block made of parts of known lengths."""
    out, start = [], 0
    for src, a, z in parts:
        rows = _src_rows(src)
        z = rows if z is None else min(z, rows)
        n = z - a
        s, e = max(lo, start), min(hi, start + n)
        if s < e:
            out.append((src, a + s - start, a + e - start))
        start += n
    return out


# ---------------------------------------------------------------------- files and URLs
def _is_local(fs) -> bool:
    from fsspec.implementations.local import LocalFileSystem
    return isinstance(fs, LocalFileSystem)


def _filesystem(url, storage_options=None, filesystem=None):
    """The fsspec filesystem and path for ``url``: ``filesystem`` if given, else one made with
    ``storage_options``, else the cluster store's own (its credentials and endpoint) when the URL
    uses the same protocol, else fsspec's default for the URL."""
    from fsspec.core import url_to_fs
    if not isinstance(url, str) or not url:
        raise TypeError(f"expected a path or fsspec URL (str), got {type(url).__name__}")
    if filesystem is not None:
        return filesystem, filesystem._strip_protocol(url)
    if storage_options is None and "://" in url and not url.startswith("file://"):
        from fabric import storage
        try:
            store = storage.default()
        except Exception:  # noqa: BLE001
            store = None
        if store is not None and url.split("://", 1)[0] in _protocols(store.fs):
            return store.fs, store.fs._strip_protocol(url)
    if "://" not in url:
        url = os.path.abspath(os.path.expanduser(url))
    return url_to_fs(url, **(storage_options or {}))


def _protocols(fs):
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)


def _expand(paths, storage_options, filesystem, exts, where):
    if isinstance(paths, (str, os.PathLike)):
        paths = [os.fspath(paths)]
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise ValueError(f"{where}: no paths given")
    out = []
    fs = None
    for p in paths:
        fs, path = _filesystem(p, storage_options, filesystem)
        if _GLOB & set(path):
            found = sorted(x for x in fs.glob(path) if fs.isfile(x))
            if not found:
                raise FileNotFoundError(f"{where}: nothing matches {p!r}")
        elif fs.isdir(path):
            found = sorted(x for x in fs.find(path)
                           if not os.path.basename(x).startswith((".", "_")) and x.endswith(exts))
            if not found:
                raise FileNotFoundError(f"{where}: the folder {p!r} holds no {'/'.join(exts)} files")
        elif fs.isfile(path):
            found = [path]
        else:
            raise FileNotFoundError(f"{where}: {p!r} does not exist")
        out.extend((fs, x) for x in found)
    return out


def read_parquet(paths, *, columns: list | None = None, storage_options: dict | None = None,
                 filesystem=None, override_num_blocks: int | None = None, **_ignored) -> Dataset:
    """A Dataset of Parquet files (a file, a folder, a glob or a list; any fsspec URL). Each
    file is read on the cluster, in the first call of its block. With ``override_num_blocks``
    above the number of files, files are split into blocks of whole row groups (their footers
    are read here to count them)."""
    _check_blocks(override_num_blocks)
    files = _expand(paths, storage_options, filesystem, (".parquet", ".parq", ".pq"), "read_parquet")
    cols = list(columns) if columns is not None else None
    if not override_num_blocks or override_num_blocks <= len(files):
        opts = {"columns": cols}
        return Dataset([[(_Read("parquet", fs, p, opts), 0, None)] for fs, p in files])
    import pyarrow.parquet as pq
    groups = []
    for fs, p in files:
        with fs.open(p, "rb") as f:
            groups.append(pq.ParquetFile(f).metadata.num_row_groups)
    total = sum(groups)
    blocks = []
    for (fs, p), g in zip(files, groups):
        k = max(1, min(g, round(override_num_blocks * g / max(total, 1))))   # this file's share of blocks
        bounds = [round(j * g / k) for j in builtins.range(k + 1)]
        for a, b in zip(bounds, bounds[1:]):
            blocks.append([(_Read("parquet", fs, p, {"columns": cols, "row_groups": list(builtins.range(a, b))}),
                            0, None)])
    return Dataset(blocks)


def read_csv(paths, *, columns: list | None = None, storage_options: dict | None = None, filesystem=None,
             parse_options=None, convert_options=None, read_options=None, **_ignored) -> Dataset:
    """A Dataset of CSV files (a file, a folder, a glob or a list; any fsspec URL), read on the cluster."""
    files = _expand(paths, storage_options, filesystem, (".csv", ".csv.gz", ".tsv"), "read_csv")
    arrow = {k: v for k, v in (("parse_options", parse_options), ("convert_options", convert_options),
                               ("read_options", read_options)) if v is not None}
    opts = {"columns": list(columns) if columns is not None else None, "arrow_options": arrow}
    return Dataset([[(_Read("csv", fs, p, opts), 0, None)] for fs, p in files])


def _default_blocks(rows, nbytes):
    by_size = max(8, math.ceil(nbytes / DataContext.target_block_bytes))
    return max(1, min(by_size, rows // 1000 or 1))


def _check_blocks(n):
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"override_num_blocks must be a whole number >= 1, got {n!r}")


def from_arrow(tables, *, override_num_blocks: int | None = None) -> Dataset:
    """A Dataset of ``pyarrow.Table``(s), put on the cluster in blocks."""
    pa = _pa()
    _check_blocks(override_num_blocks)
    if isinstance(tables, pa.RecordBatch):
        tables = pa.Table.from_batches([tables])
    if isinstance(tables, pa.Table):
        t = tables
        n = override_num_blocks or _default_blocks(t.num_rows, t.nbytes)
        n = max(1, min(n, t.num_rows or 1))
        bounds = [round(k * t.num_rows / n) for k in builtins.range(n + 1)]
        pieces = [t.slice(a, b - a) for a, b in zip(bounds, bounds[1:])]
    else:
        pieces = list(tables)
        for x in pieces:
            if not isinstance(x, pa.Table):
                raise TypeError(f"from_arrow expects pyarrow Tables, got {type(x).__name__}")
    futs = _ingest([p.combine_chunks() if p.num_rows else p for p in pieces])
    return Dataset([[(f, 0, None)] for f in futs], (), (_Owner(futs),))


def _ingest(tables):
    """Blocks of tables in this process. Written here when this host holds the cluster's
    workers (or blocks go to the store, or this is a gang member), else by one call per block
    on the cluster (the table travels as its argument)."""
    owner = _blocks.owner_tag()
    if _local() or _blocks._store_mode() or _workers_here():
        return [_Done(_blocks.write(t, owner)) for t in tables]
    f = fabric.fn(_blocks.write, name="ml.ingest")
    return [f.remote(t, owner) for t in tables]


def _workers_here() -> bool:
    try:
        hosts = {e.get("host") for e in fabric.cluster_status().get("executors", [])}
    except Exception:  # noqa: BLE001
        return False
    return bool(hosts) and hosts <= {_blocks._HOST}


def from_pandas(dfs, *, override_num_blocks: int | None = None) -> Dataset:
    """A Dataset of pandas DataFrame(s) (the index is dropped)."""
    pa = _pa()
    pd = need("pandas", "ml", "from_pandas")
    if isinstance(dfs, pd.DataFrame):
        return from_arrow(pa.Table.from_pandas(dfs, preserve_index=False), override_num_blocks=override_num_blocks)
    dfs = list(dfs)
    for d in dfs:
        if not isinstance(d, pd.DataFrame):
            raise TypeError(f"from_pandas expects pandas DataFrames, got {type(d).__name__}")
    return from_arrow([pa.Table.from_pandas(d, preserve_index=False) for d in dfs])


def from_numpy(data, *, override_num_blocks: int | None = None) -> Dataset:
    """A Dataset of a numpy array (one column ``data``; rows of a 2-D array are fixed-size
    lists) or a dict of column name -> array."""
    import numpy as np
    if isinstance(data, np.ndarray):
        data = {"data": data}
    if not isinstance(data, dict):
        raise TypeError(f"from_numpy expects a numpy array or a dict of arrays, got {type(data).__name__}")
    return from_arrow(from_batch({k: np.asarray(v) for k, v in data.items()}, "from_numpy"),
                      override_num_blocks=override_num_blocks)


def from_items(items, *, override_num_blocks: int | None = None) -> Dataset:
    """A Dataset of a list of dicts (rows); other items become rows ``{"item": x}``."""
    pa = _pa()
    items = list(items)
    rows = [x if isinstance(x, dict) else {"item": x} for x in items]
    return from_arrow(pa.Table.from_pylist(rows), override_num_blocks=override_num_blocks)


def range(n: int, *, override_num_blocks: int | None = None) -> Dataset:  # noqa: A001 - Ray's name
    """A Dataset of one int64 column ``id`` from 0 to n-1, made on the cluster."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"range needs a whole number >= 0, got {n!r}")
    _check_blocks(override_num_blocks)
    k = override_num_blocks or _default_blocks(n, 8 * n)
    k = max(1, min(k, n or 1))
    bounds = [round(j * n / k) for j in builtins.range(k + 1)]
    return Dataset([[(_Read("range", None, (a, b), {}), 0, None)] for a, b in zip(bounds, bounds[1:])])
