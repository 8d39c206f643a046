"""The public face of fabric: ``@fn``, ``@cls``, ``@enter``, Futures, ``get/wait/put/kill``,
``init/shutdown``. Everything here validates what the user gave it and hands calls to the
:class:`~fabric.client.Client`; nothing here knows about frames or sockets.
"""
from __future__ import annotations

import atexit
import copy
import functools
import inspect
import json
import os
import sys
import sysconfig
import threading
import warnings
from collections import deque

import cloudpickle

from . import config
from . import futures as futures_mod
from . import protocol as P
from . import settings
from .client import CallOptions, Client, Future, Part, Stream  # (client: also the wire names of Futures in values)
from .errors import ConnectionFailed, FabricError, GetTimeout
from .gangs import GangContext, gang_context
from .resources import parse_memory
from .serde import transfer
from .serde.code import code_blob

__all__ = ["init", "shutdown", "fn", "cls", "enter", "method", "get", "wait", "put", "kill", "is_initialized",
           "RemoteFunction", "RemoteClass", "InstanceHandle", "Future", "cluster_status", "gang", "Gang",
           "nodes", "cluster_resources", "available_resources", "cancel", "Stream", "get_instance",
           "gang_context", "GangContext"]

_lock = threading.RLock()


class _State:
    client: Client | None = None
    cluster = None
    runtime_env: dict | None = None  # the job's, from fabric.init(runtime_env=...)
    pid = 0
    atexit_registered = False


_state = _State()


# ---------------------------------------------------------------------- init / shutdown
def init(address: str | None = None, *, store: str | None = None, num_cpus: float | None = None,
         num_gpus=None, memory=None, log_to_driver: bool = True, connect_timeout: float = 10.0,
         runtime_env: dict | None = None) -> dict:
    """Connect this process to a cluster, starting an embedded one if no address is given.

    ``address``: ``tcp://host:port`` or ``ipc:///path`` of a running broker; ``"auto"`` reads
    the cluster that ``fabric start --detach`` recorded; ``None`` uses ``FABRIC_ADDRESS`` or,
    without it, starts an embedded local cluster (broker + one executor) owned by this process
    and stopped when it exits. ``num_cpus``/``num_gpus``/``memory`` size the embedded cluster.
    A ``tcp://`` connection uses CurveZMQ with this user's default keys (made on first use in
    fabric's data folder) or those of ``FABRIC_KEYS`` (docs/security.md); a broker that does not
    accept this process's key (another user's cluster) raises ``ConnectionFailed`` at once.
    ``runtime_env``: the job's (docs/runtime_env.md), under every function's and class's own.
    """
    if runtime_env is not None:
        from . import runtime_env as _re

        runtime_env = _re.validate("fabric.init()", runtime_env)
    if address is not None and address != "auto" and (
            not isinstance(address, str) or not address.startswith(("tcp://", "ipc://"))):
        raise ValueError(f"address must look like 'tcp://host:port' or 'ipc:///path', got {address!r}")
    with _lock:
        if _state.client is not None and _state.pid == os.getpid():
            if address is None or address == _state.client.address:
                ignored = {k: v for k, v in (("store", store), ("num_cpus", num_cpus), ("num_gpus", num_gpus),
                                             ("memory", memory), ("runtime_env", runtime_env)) if v is not None}
                if ignored:
                    warnings.warn(f"fabric is already initialized (connected to {_state.client.address}); "
                                  f"fabric.init({', '.join(f'{k}={v!r}' for k, v in ignored.items())}) has no "
                                  f"effect: call fabric.shutdown() first to start again with them",
                                  RuntimeWarning, stacklevel=2)
                return _info()
            raise FabricError(f"fabric is already connected to {_state.client.address}; "
                              f"call fabric.shutdown() before connecting to {address}")
        _state.client = None  # a forked child does not inherit its parent's connection
        settings.reload()  # a driver connects with the environment it has now (FABRIC_ADDRESS, ...)
        if num_cpus is not None:
            _check_number("num_cpus", num_cpus, minimum=1)
        if address is None:
            address = settings.get().address or None
        if address == "auto":
            address = _recorded_address()
        cluster = None
        if address is None:
            from .cluster import LocalCluster

            gpus = None
            if num_gpus is not None:
                _check_number("num_gpus", num_gpus)
                gpus = list(range(int(num_gpus)))
            cluster = LocalCluster(cpus=num_cpus, gpus=gpus,
                                   memory=parse_memory(memory) if memory is not None else None).start()
            address = cluster.address
        elif not isinstance(address, str) or not address.startswith(("tcp://", "ipc://")):
            raise ValueError(f"address must look like 'tcp://host:port' or 'ipc:///path', got {address!r}")
        try:
            # FABRIC_TRANSFER=store sends large objects through the object store even on one host
            shm = config.is_local_address(address) and transfer.transfer_mode() != "store"
            # an embedded broker's exit is known at once (its Popen), so its calls fail at once
            client = Client(address, shm=shm, connect_timeout=connect_timeout,
                            broker_proc=cluster.procs[0] if cluster is not None else None,
                            supervised=bool(cluster is not None and cluster.journal))
        except BaseException:
            if cluster is not None:
                cluster.stop()
            raise
        client.log_to_driver = log_to_driver
        _state.client, _state.cluster, _state.pid = client, cluster, os.getpid()
        _state.runtime_env = runtime_env or None
        if store is not None:
            from . import storage

            storage.set_default(store)
            transfer.use_store(storage.given)  # large payloads may now go through it (FABRIC_TRANSFER=auto)
        if not _state.atexit_registered:
            atexit.register(shutdown)
            _state.atexit_registered = True
        return _info()


def _info():
    c = _state.client
    return {"address": c.address, "embedded": _state.cluster is not None,
            "log_dir": getattr(_state.cluster, "log_dir", None)}


def _recorded_address():
    try:
        with open(config.state_file()) as f:
            return json.load(f)["address"]
    except (OSError, ValueError, KeyError):
        raise ConnectionFailed("address='auto' but no cluster is recorded; start one with `fabric start`") from None


def is_initialized() -> bool:
    return _state.client is not None and _state.pid == os.getpid()


def shutdown():
    """Disconnect; stop the embedded cluster if this process started one."""
    with _lock:
        if _state.pid != os.getpid():
            _state.client = _state.cluster = None
            return
        client, cluster = _state.client, _state.cluster
        _state.client = _state.cluster = _state.runtime_env = None
        gone = client is not None and client.gone is not None
        if client is not None:
            client.close()
        if cluster is not None:
            # its broker is gone: no SHUTDOWN reaches the executor, so do not wait long for it
            # (its workers die with it: PR_SET_PDEATHSIG)
            cluster.stop(timeout=0.5 if gone else 5.0)


def _client() -> Client:
    c = _state.client
    if c is None or _state.pid != os.getpid():
        init()
        c = _state.client
    return c


def cluster_status() -> dict:
    """The broker's view: executors, workers, queues (what ``fabric status`` shows)."""
    return _client().status()


def nodes() -> list[dict]:
    """The cluster's executors (Ray's ``ray.nodes()``): one dict per executor with its
    ``node_id``, ``host``, ``alive``, ``labels``, ``resources`` (its total ``CPU``, ``GPU``,
    ``memory`` in bytes) and ``available`` (what no call holds right now), from the broker's STATUS."""
    out = []
    for e in _client().status().get("executors", []):
        out.append({"node_id": e["id"], "host": e["host"], "alive": True, "labels": e.get("labels", {}),
                    "resources": {"CPU": e["cpus"], "GPU": len(e["gpus"]), "memory": e["memory"]},
                    "available": {"CPU": e["free_cpus"], "GPU": round(sum(e.get("gpu_free", {}).values()), 6),
                                  "memory": e["free_memory"]},
                    "workers": e["workers"], "busy": e["busy"], "instances": e["instances"]})
    return out


def _sum_resources(key):
    tot = {"CPU": 0.0, "GPU": 0.0, "memory": 0}
    for n in nodes():
        for k, v in n[key].items():
            tot[k] += v
    return tot


def cluster_resources() -> dict:
    """Total resources of the executors now in the cluster: ``{"CPU": .., "GPU": .., "memory": bytes}``."""
    return _sum_resources("resources")


def available_resources() -> dict:
    """Resources no call or instance holds right now (a fraction of a GPU counts as such)."""
    return _sum_resources("available")


# ---------------------------------------------------------------------- options
_FN_OPTIONS = {"cpus": 1, "gpus": 0, "memory": None, "retries": 3, "timeout": None, "min_warm": 0,
               "max_containers": None, "name": None}
_FN_OPTIONS["cache"] = False  # keep the result in the store under the code's and arguments' hashes
# num_returns: a call's n values as n Futures; backpressure: items a generator may run ahead of its consumer
_FN_OPTIONS.update(num_returns=1, backpressure=64)
_FN_OPTIONS["runtime_env"] = None  # env_vars, working_dir, pip: fabric/runtime_env.py
_CLS_OPTIONS = {**{k: v for k, v in _FN_OPTIONS.items() if k not in ("retries", "cache", "num_returns", "backpressure")},
                "concurrency": 1, "max_restarts": 0, "max_task_retries": 0}


def _check_number(name, v, minimum=0.0, maximum=1e6):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(v).__name__} {v!r}")
    if not minimum <= v < maximum:  # also refuses nan and inf
        raise ValueError(f"{name} must be >= {minimum:g} and below {maximum:g}, got {v!r}")


def _check_options(where: str, given: dict, allowed: dict) -> dict:
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise TypeError(f"{where} got unknown option(s) {', '.join(unknown)}; valid options: "
                        f"{', '.join(sorted(allowed))}")
    o = {**allowed, **given}
    _check_number("cpus", o["cpus"])
    _check_number("gpus", o["gpus"], maximum=1e4)
    if o["gpus"] > 1 and o["gpus"] != int(o["gpus"]):
        raise ValueError(f"gpus above 1 must be a whole number of devices, got {o['gpus']}: a fraction "
                         f"below 1 (gpus=0.5) shares one device with other calls, gpus=2 takes two devices")
    o["memory_bytes"] = parse_memory(o["memory"])
    if "retries" in o:
        if isinstance(o["retries"], bool) or not isinstance(o["retries"], int) or o["retries"] < 0:
            raise ValueError(f"retries must be a whole number >= 0, got {o['retries']!r}")
    if o["timeout"] is not None:
        _check_number("timeout", o["timeout"])
        if o["timeout"] <= 0:
            raise ValueError(f"timeout must be a positive number of seconds or None, got {o['timeout']!r}")
    if isinstance(o["min_warm"], bool) or not isinstance(o["min_warm"], int) or not 0 <= o["min_warm"] <= 65535:
        raise ValueError(f"min_warm must be a whole number from 0 to 65535, got {o['min_warm']!r}")
    mc = o["max_containers"]
    if mc is not None and (isinstance(mc, bool) or not isinstance(mc, int) or not 1 <= mc <= 65535):
        raise ValueError(f"max_containers must be a whole number from 1 to 65535, or None, got {mc!r}")
    for k in ("max_restarts", "max_task_retries"):  # -1: no limit, as in Ray
        if k in o and (isinstance(o[k], bool) or not isinstance(o[k], int) or not -1 <= o[k] <= 10000):
            raise ValueError(f"{k} must be a whole number from 0 to 10000, or -1 for no limit, got {o[k]!r}")
    if "concurrency" in o:
        c = o["concurrency"]
        if isinstance(c, bool) or not isinstance(c, int) or not 1 <= c <= 255:
            raise ValueError(f"concurrency must be a whole number from 1 to 255, got {c!r}")
    if not isinstance(o.get("cache", False), bool):
        raise TypeError(f"cache must be True or False, got {o['cache']!r}")
    for k, top in (("num_returns", 1000), ("backpressure", 255)):
        v = o.get(k, 1)
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= top:
            raise ValueError(f"{k} must be a whole number from 1 to {top}, got {v!r}")
    if o["name"] is not None and not isinstance(o["name"], str):
        raise TypeError(f"name must be a string, got {type(o['name']).__name__}")
    if o.get("runtime_env") is not None:
        from . import runtime_env

        o["runtime_env"] = runtime_env.validate(where, o["runtime_env"]) or None
    return o


def _with_env(cache: dict, obj, code, options: dict):
    """``code`` (frame, hash) of ``obj``, or, if it has a runtime_env (its own over the job's,
    over that of the call it is submitted from), the frame of an EnvCall that carries it: made
    once per env (``cache``)."""
    mine, job = options.get("runtime_env"), _state.runtime_env
    loaded = sys.modules.get("fabric.runtime_env")  # loaded where a call with an env runs
    parent = loaded.current if loaded is not None else None
    if not mine and not job and not parent:
        return code
    from . import runtime_env as R

    env = R.merge(R.merge(parent, job), mine)
    if not env:
        return code
    key = R.digest(env)
    hit = cache.get(key)
    if hit is None:
        kind = ("class" if inspect.isclass(obj) else "asyncgen" if inspect.isasyncgenfunction(obj) else
                "generator" if inspect.isgeneratorfunction(obj) else
                "async" if inspect.iscoroutinefunction(obj) else "function")
        name = getattr(obj, "__name__", "fn")
        ec = R.EnvCall(R.resolve(env), code[0], name, getattr(obj, "__qualname__", name),
                       getattr(obj, "__module__", None) or "?", kind)
        hit = cache[key] = code_blob(ec)
    return hit


def ship_by_value(obj):
    """Functions from the user's own modules travel by value: workers need not import them.
    ``@fabric.fn``/``@fabric.cls`` do this for what they wrap; a library that pickles a user's
    function itself (fabric.ml.tune's trainables) calls it too."""
    name = getattr(obj, "__module__", None)
    if not name or name == "__main__" or name.split(".")[0] in ("fabric", "cloudpickle"):
        return
    mod = sys.modules.get(name)
    path = getattr(mod, "__file__", None)
    if mod is None or path is None:
        return
    path = os.path.realpath(path)
    lib_dirs = {os.path.realpath(p) for p in (sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
                                              sysconfig.get_paths()["stdlib"])}
    if any(path.startswith(d + os.sep) for d in lib_dirs) or "site-packages" in path:
        return
    try:
        cloudpickle.register_pickle_by_value(mod)
    except (ValueError, TypeError):
        pass


class _Sig:
    """A callable's signature, checked at ``.remote()`` so a wrong call fails in the caller, not
    on the cluster. Positional arguments alone, for a plain signature, are checked by counting
    (``Signature.bind`` costs ~7 us, a tenth of a sync call's Python)."""

    __slots__ = ("sig", "lo", "hi")

    def __init__(self, sig):
        self.sig = sig
        ps = sig.parameters.values()
        plain = all(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in ps)
        self.hi = len(ps) if plain else -1
        self.lo = sum(1 for p in ps if p.default is p.empty) if plain else 0

    def bind(self, args, kwargs):
        if kwargs or not self.lo <= len(args) <= self.hi:
            params = self.sig.parameters
            if kwargs and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
                # Signature.bind names a missing argument before an unknown one; a misspelt
                # keyword is the likelier mistake, so say that first
                unknown = [k for k in kwargs if k not in params or params[k].kind is params[k].POSITIONAL_ONLY]
                if unknown:
                    known = ", ".join(n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL,)) or "none"
                    raise TypeError(f"got an unexpected keyword argument {unknown[0]!r} (its parameters: {known})")
            self.sig.bind(*args, **kwargs)


def _signature(obj, skip_self=False):
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    if skip_self:
        params = list(sig.parameters.values())[1:]
        sig = sig.replace(parameters=params)
    return _Sig(sig)


def _bind(sig, name, args, kwargs):
    if sig is not None:
        try:
            sig.bind(args, kwargs)
        except TypeError as e:
            raise TypeError(f"{name}(): {e}") from None


# ---------------------------------------------------------------------- @fabric.fn
class RemoteFunction:
    """A function that runs on the cluster: ``.remote()``, ``.map()``, ``.local()``, ``.options()``."""

    def __init__(self, func, options: dict, _code=None):
        self._func = func
        self._options = options
        self._name = options.get("name") or getattr(func, "__name__", "fn")
        self._code = _code or [None, None]   # shared with .options() copies: pickled once
        self._envs: dict = {}                # runtime_env digest -> code frame with the env
        self._sig = _signature(func)
        functools.update_wrapper(self, func)
        self._stream = inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func)
        if self._stream or options.get("num_returns", 1) != 1:  # ordinary calls keep the plain remote()
            if self._stream and options.get("num_returns", 1) != 1:
                raise ValueError(f"{self._name} is a generator: .remote() streams its items, so num_returns "
                                 f"does not apply (it is for a function that returns a tuple)")
            if self._stream and options.get("cache"):
                raise ValueError(f"{self._name} is a generator: cache=True keeps one result, a stream has many")
            self.remote = self._remote_special
        o = options
        self._call = CallOptions(label=self._name, cpus=o["cpus"], gpus=o["gpus"], memory=o["memory_bytes"],
                                 retries=o["retries"], timeout=o["timeout"], max_containers=o["max_containers"],
                                 min_warm=o["min_warm"], window=o["backpressure"] if self._stream else 0,
                                 stream=self._stream)

    def __repr__(self):
        return f"<fabric.fn {self._name}>"

    def __call__(self, *args, **kwargs):
        raise TypeError(f"{self._name} is a fabric function: call {self._name}.remote(...) to run it on the "
                        f"cluster, or {self._name}.local(...) to run it in this process")

    def __reduce__(self):  # inside another call's arguments, a RemoteFunction travels as itself
        return RemoteFunction, (self._func, self._options)

    def _blob(self):
        if self._code[0] is None:
            ship_by_value(self._func)
            blob, h = code_blob(self._func)
            if self._options.get("cache"):  # the worker runs a shim that looks in the store first
                from . import cache

                blob, h = code_blob(cache.shim(cache.stage_prefix(self._name, h), self._func))
            self._code[:] = blob, h
        return _with_env(self._envs, self._func, self._code, self._options)

    def remote(self, *args, **kwargs) -> Future:
        """Run on the cluster; returns at once with a Future."""
        _bind(self._sig, self._name, args, kwargs)
        blob, h = self._blob()
        return _client().submit(P.TASK, blob, h, args, kwargs, self._call)

    def _remote_special(self, *args, **kwargs):
        """``.remote()`` of a generator (a Stream of its items) or of ``num_returns=n`` (n Futures)."""
        _bind(self._sig, self._name, args, kwargs)
        blob, h = self._blob()
        o = self._options
        client = _client()
        fut = client.submit(P.TASK, blob, h, args, kwargs, self._call)
        if self._stream:
            return Stream(fut, client, o["backpressure"])
        return [Part(fut, i, o["num_returns"]) for i in range(o["num_returns"])]

    def local(self, *args, **kwargs):
        """Run in this process, as a plain call."""
        return self._func(*args, **kwargs)

    def options(self, **overrides) -> "RemoteFunction":
        """A copy with some options changed for the calls made through it."""
        given = {k: v for k, v in self._options.items() if k in _FN_OPTIONS}
        return RemoteFunction(self._func, _check_options(f"{self._name}.options()", {**given, **overrides},
                                                         _FN_OPTIONS), self._code)

    def map(self, *iterables, progress: bool = False, window: int = 2000):
        """Results of ``fn(*args)`` for each tuple of items, in input order, as they arrive.

        Up to ``window`` calls are in flight at once; ``progress=True`` draws a progress bar.
        """
        if not iterables:
            raise TypeError(f"{self._name}.map() needs at least one iterable")
        if self._stream or self._options.get("num_returns", 1) != 1:
            raise TypeError(f"{self._name}.map() needs a function with one result; iterate {self._name}.remote() "
                            f"for a generator's items, or index the Futures of num_returns")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a whole number >= 1, got {window!r}")
        for it in iterables:
            try:
                iter(it)
            except TypeError:
                raise TypeError(f"{self._name}.map() arguments must be iterables, got "
                                f"{type(it).__name__}") from None
        total = None
        if all(hasattr(it, "__len__") for it in iterables):
            total = min(len(it) for it in iterables)
        return self._map(zip(*iterables), total, progress, window)

    def _map(self, items, total, progress, window):
        bar = _Progress(self._name, total) if progress else None
        pending = deque()
        try:
            for args in items:
                pending.append(self.remote(*args))
                if len(pending) >= window:
                    yield pending.popleft().result()
                    bar and bar.advance()
            while pending:
                yield pending.popleft().result()
                bar and bar.advance()
        finally:
            if bar:
                bar.close()


class _Progress:
    """A rich progress bar on stderr (imported only when asked for)."""

    def __init__(self, name, total):
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.p = Progress(TextColumn(f"[bold]{name}[/]"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True))
        self.p.start()
        self.task = self.p.add_task(name, total=total)

    def advance(self):
        self.p.advance(self.task)

    def close(self):
        self.p.stop()


def fn(_func=None, **options):
    """Make a function remote: ``@fabric.fn`` or ``@fabric.fn(cpus=1, gpus=0, memory="2GiB",
    retries=3, timeout=None, min_warm=0, max_containers=None, cache=False)``.

    ``cache=True`` makes a flow stage: its result is kept in the store under the hash of its code
    and arguments, and a later call with the same code and arguments returns it without running."""
    opts = _check_options("@fabric.fn", options, _FN_OPTIONS)

    def wrap(func):
        if inspect.isclass(func):
            raise TypeError(f"@fabric.fn decorates functions; use @fabric.cls for the class {func.__name__}")
        if not callable(func):
            raise TypeError(f"@fabric.fn decorates functions, got {type(func).__name__}")
        if isinstance(func, RemoteFunction):
            return func
        return RemoteFunction(func, opts)

    return wrap(_func) if _func is not None else wrap


# ---------------------------------------------------------------------- @fabric.cls
def enter(_method=None):
    """Mark a method of a ``@fabric.cls`` class to run once when its container starts."""
    def mark(m):
        if not callable(m):
            raise TypeError("@fabric.enter decorates methods")
        m.__fabric_enter__ = True
        return m

    return mark(_method) if _method is not None else mark


def _check_num_returns(where, n):
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 1000:
        raise ValueError(f"{where}: num_returns must be a whole number from 1 to 1000, got {n!r}")
    return n


def method(_method=None, *, num_returns: int = 1):
    """Options of one method of a ``@fabric.cls`` class (Ray's ``@ray.method``):
    ``@fabric.method(num_returns=2)`` makes ``h.m.remote()`` return 2 Futures, one per value of
    the tuple it returns (as ``@fabric.fn(num_returns=2)`` does for a function)."""
    _check_num_returns("@fabric.method", num_returns)

    def mark(m):
        if not callable(m):
            raise TypeError("@fabric.method decorates methods")
        if num_returns != 1 and (inspect.isgeneratorfunction(m) or inspect.isasyncgenfunction(m)):
            raise ValueError(f"{getattr(m, '__name__', m)} is a generator: .remote() streams its items, so "
                             f"num_returns does not apply")
        m.__fabric_method__ = {"num_returns": num_returns}
        return m

    return mark(_method) if _method is not None else mark


class RemoteClass:
    """A class whose instances live in warm containers on the cluster: ``Cls.remote(*args)``."""

    def __init__(self, klass, options: dict, _code=None):
        self._cls = klass
        self._options = options
        self._name = options.get("name") or klass.__name__
        self._code = _code or [None, None]
        self._envs: dict = {}
        self._sig = _signature(klass.__init__, skip_self=True) if "__init__" in _own_attrs(klass) else None
        functools.update_wrapper(self, klass, updated=())

    def __repr__(self):
        return f"<fabric.cls {self._name}>"

    def __call__(self, *args, **kwargs):
        raise TypeError(f"{self._name} is a fabric class: create an instance on the cluster with "
                        f"{self._name}.remote(...)")

    def __reduce__(self):
        return RemoteClass, (self._cls, self._options)

    def remote(self, *args, **kwargs) -> "InstanceHandle":
        """Start one dedicated instance; returns its handle at once."""
        _bind(self._sig, self._name, args, kwargs)
        if self._code[0] is None:
            ship_by_value(self._cls)
            self._code[:] = code_blob(self._cls)
        blob, h = _with_env(self._envs, self._cls, self._code, self._options)
        o = self._options
        client = _client()
        aid = client.new_id()
        named = getattr(self, "_instance", None)
        if named is not None:  # the name is reserved (or found, with get_if_exists) before it is created
            found = self._register(client, aid, named)
            if found is not None:
                return found
        new = CallOptions(label=f"{self._name}.__init__", cpus=o["cpus"], gpus=o["gpus"], memory=o["memory_bytes"],
                          retries=_no_limit(o["max_restarts"]), max_containers=o["max_containers"],
                          min_warm=o["min_warm"], concurrency=o["concurrency"])
        ready = client.submit(P.ACTOR_NEW, blob, h, args, kwargs, new, actor_id=aid)
        return InstanceHandle(self, aid, ready, client, owner=named is None or not named["detached"])

    def _register(self, client, aid, named):
        streams, returns = [], {}
        for n in sorted(dir(self._cls)):
            m = getattr(self._cls, n, None)
            if inspect.isgeneratorfunction(m) or inspect.isasyncgenfunction(m):
                streams.append(n)
            elif (k := (getattr(m, "__fabric_method__", None) or {}).get("num_returns", 1)) != 1:
                returns[n] = k
        # what a handle found by name needs to call as this one does (it knows the class by name only)
        calls = {"max_task_retries": self._options["max_task_retries"], "timeout": self._options["timeout"],
                 "returns": returns}
        rep = _name_request(client, {"op": "register", "name": named["name"], "namespace": named["namespace"],
                                     "actor": aid.hex(), "driver": client.id.hex(), "class": self._name,
                                     "streams": streams, "calls": calls, "detached": named["detached"],
                                     "get_if_exists": named["get_if_exists"]})
        if rep["created"]:
            return None
        return InstanceHandle(self, bytes.fromhex(rep["actor"]), None, client, owner=False)

    def options(self, **overrides) -> "RemoteClass":
        """A copy with some options changed. ``name=`` (with ``namespace=``, ``lifetime="detached"``,
        ``get_if_exists=True``) names the instances it creates: unique on the cluster, found from
        any driver with ``fabric.get_instance(name)``."""
        given = {k: v for k, v in self._options.items() if k in _CLS_OPTIONS}
        named = {k: overrides.pop(k) for k in _INSTANCE_OPTIONS if k in overrides}
        rc = RemoteClass(self._cls, _check_options(f"{self._name}.options()", {**given, **overrides},
                                                   _CLS_OPTIONS), self._code)
        rc._instance = _check_instance(f"{self._name}.options()", named) if named else getattr(self, "_instance", None)
        return rc


_INSTANCE_OPTIONS = ("name", "namespace", "lifetime", "get_if_exists")


def _no_limit(n):
    return 32767 if n < 0 else n  # the header's retries field is an int16


def _check_instance(where, o):
    name, ns, life, gie = o.get("name"), o.get("namespace"), o.get("lifetime"), o.get("get_if_exists", False)
    if name is None:
        if ns is not None or life is not None or gie:
            raise ValueError(f"{where}: namespace, lifetime and get_if_exists need name= (the instance's name)")
        return None
    if not isinstance(name, str) or not 0 < len(name) <= 200:
        raise ValueError(f"{where}: name must be a string of 1 to 200 characters, got {name!r}")
    if ns is not None and (not isinstance(ns, str) or not 0 < len(ns) <= 200):
        raise ValueError(f"{where}: namespace must be None or a string of 1 to 200 characters, got {ns!r}")
    if life not in (None, "detached"):
        raise ValueError(f'{where}: lifetime must be None (the instance ends with its driver) or "detached" '
                         f'(it outlives its driver, until fabric.kill), got {life!r}')
    if not isinstance(gie, bool):
        raise TypeError(f"{where}: get_if_exists must be True or False, got {gie!r}")
    return {"name": name, "namespace": ns, "detached": life == "detached", "get_if_exists": gie}


def _name_request(client, body):
    from .control import request

    rep = request(client.address, P.NAME, ctx=client.ctx, body=body)
    if "error" in rep:
        raise ValueError(rep["error"])
    return rep


def get_instance(name: str, namespace: str | None = None) -> "InstanceHandle":
    """The handle of the live instance named ``name`` (``Cls.options(name=...).remote()``), from any
    driver of the cluster (Ray's ``ray.get_actor``); ``ValueError`` if there is none. Its methods
    are called as on the creator's handle; dropping it does not end the instance."""
    if not isinstance(name, str):
        raise ValueError(f"fabric.get_instance(): name must be a string of 1 to 200 characters, got {name!r}")
    _check_instance("fabric.get_instance()", {"name": name, "namespace": namespace})
    client = _client()
    rep = _name_request(client, {"op": "lookup", "name": name, "namespace": namespace})
    return InstanceHandle(_NamedClass(rep["class"], rep["streams"], rep.get("calls")), bytes.fromhex(rep["actor"]),
                          None, client, owner=False)


def _gen_method(self, *args, **kwargs):
    yield  # stands in for a generator method of a class known by name only


def _any_method(self, *args, **kwargs):
    """Stands in for a method of a class known by name only: the instance checks it."""


def _returning(n):
    def method(self, *args, **kwargs):
        """Stands in for a ``@fabric.method(num_returns=n)`` of a class known by name only."""

    method.__fabric_method__ = {"num_returns": n}
    return method


class _NamedClass:
    """The class of an instance found by name: its methods are checked where it runs; the
    generator methods its creator named stream, and its calls keep the creator's per-call options
    (``max_task_retries``, ``timeout``, each method's ``num_returns``). Those come from another
    driver through the broker, so what is not well formed is left at its default."""

    def __init__(self, name, streams, calls=None):
        self._name, self._streams = name, tuple(streams)
        c = calls if isinstance(calls, dict) else {}
        retries, timeout, returns = c.get("max_task_retries"), c.get("timeout"), c.get("returns")
        ok_int = isinstance(retries, int) and not isinstance(retries, bool) and -1 <= retries <= 10000
        ok_timeout = isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0
        self._options = {"timeout": timeout if ok_timeout else None, "max_task_retries": retries if ok_int else 0}
        self._returns = {m: n for m, n in (returns.items() if isinstance(returns, dict) else ())
                         if isinstance(m, str) and type(n) is int and 1 < n <= 1000}
        self._cls = type(name, (), {**{m: _returning(n) for m, n in self._returns.items()},
                                    **{s: _gen_method for s in self._streams}})

    def __reduce__(self):
        return _NamedClass, (self._name, self._streams, {**self._options, "returns": self._returns})


def _own_attrs(klass):
    names = set()
    for k in klass.__mro__:
        if k is object:
            break
        names.update(vars(k))
    return names


def cls(_cls=None, **options):
    """Make a class a stateful warm container: ``@fabric.cls(cpus=1, gpus=0, concurrency=1)``."""
    opts = _check_options("@fabric.cls", options, _CLS_OPTIONS)

    def wrap(klass):
        if not inspect.isclass(klass):
            raise TypeError(f"@fabric.cls decorates classes; use @fabric.fn for {getattr(klass, '__name__', klass)}")
        return RemoteClass(klass, opts)

    return wrap(_cls) if _cls is not None else wrap


class InstanceHandle:
    """A handle to one instance on the cluster. ``h.method.remote(...)`` calls run in submission
    order. Dropping the last handle stops the instance once its calls are done."""

    def __init__(self, rclass: RemoteClass, aid: bytes, ready: Future | None, client: Client | None, owner=True):
        self._rclass, self._id, self._ready, self._client = rclass, aid, ready, client
        self._methods = {}
        if owner and client is not None:
            import weakref

            weakref.finalize(self, client.dropped_actors.append, aid)

    def __repr__(self):
        return f"<fabric instance of {self._rclass._name} {self._id.hex()[-8:]}>"

    def __reduce__(self):
        return _rebuild_handle, (self._rclass, self._id)

    def ready(self) -> Future:
        """A Future that completes when the instance is constructed (raises what ``__init__`` raised)."""
        return self._ready

    def __getattr__(self, name):
        if name.startswith("__") or name in ("_rclass", "_id", "_ready", "_client", "_methods"):
            raise AttributeError(name)
        m = self._methods.get(name)
        if m is None:
            attr = getattr(self._rclass._cls, name, None)
            if attr is None and type(self._rclass) is _NamedClass:
                attr = _any_method
            if attr is None or not callable(attr):
                raise AttributeError(f"{self._rclass._name} has no method {name!r}")
            m = self._methods[name] = InstanceMethod(self, name, _signature(attr, skip_self=True))
        return m


def _rebuild_handle(rclass, aid):
    return InstanceHandle(rclass, aid, None, None, owner=False)


class InstanceMethod:
    """``handle.method``: holds what a call needs, not the handle (no cycle delays its release)."""

    def __init__(self, handle, name, sig):
        self._rclass, self._id, self._client = handle._rclass, handle._id, handle._client
        self._name, self._sig = name, sig
        self._label = f"{handle._rclass._name}.{name}"
        self._retries = _no_limit(handle._rclass._options.get("max_task_retries", 0))
        attr = getattr(handle._rclass._cls, name, None)
        self._stream = inspect.isgeneratorfunction(attr) or inspect.isasyncgenfunction(attr)
        if self._stream:
            self.remote = self._remote_stream  # a generator method: .remote() streams its items
        self._num_returns = (getattr(attr, "__fabric_method__", None) or {}).get("num_returns", 1)
        timeout = handle._rclass._options["timeout"]  # a method call holds no resources of its own
        self._call = CallOptions(label=self._label, cpus=0.0, timeout=timeout, stream=self._stream,
                                 retries=0 if self._stream else self._retries,
                                 window=P.STREAM_WINDOW if self._stream else 0)

    def options(self, *, num_returns: int | None = None) -> "InstanceMethod":
        """A copy for calls with other options: ``h.m.options(num_returns=2).remote()`` -> 2 Futures."""
        m = copy.copy(self)
        if num_returns is not None:
            _check_num_returns(f"{self._label}.options()", num_returns)
            if self._stream and num_returns != 1:
                raise ValueError(f"{self._label} is a generator: .remote() streams its items, so num_returns "
                                 f"does not apply")
            m._num_returns = num_returns
        return m

    def _remote_stream(self, *args, **kwargs) -> Stream:
        _bind(self._sig, self._label, args, kwargs)
        client = self._client or _client()
        fut = client.submit(P.ACTOR_CALL, None, P.NO_ID, (self._name,) + args, kwargs, self._call, actor_id=self._id)
        return Stream(fut, client, P.STREAM_WINDOW)

    def __call__(self, *args, **kwargs):
        raise TypeError(f"call {self._label}.remote(...) to run it on the instance")

    def remote(self, *args, **kwargs) -> Future:
        _bind(self._sig, self._label, args, kwargs)
        client = self._client or _client()
        fut = client.submit(P.ACTOR_CALL, None, P.NO_ID, (self._name,) + args, kwargs, self._call, actor_id=self._id)
        n = self._num_returns
        return fut if n == 1 else [Part(fut, i, n) for i in range(n)]


# ---------------------------------------------------------------------- fabric.gang
_GANG_OPTIONS = {"cpus": 1, "gpus": 0, "memory": None, "retries": 0, "timeout": None, "name": None, "min_warm": 0,
                 "runtime_env": None}


class Gang:
    """``n`` members that start together or not at all: ``fabric.gang(n, cpus=1, gpus=0,
    memory=None, retries=0, timeout=None)``. ``g.run(fn, *args, **kwargs)`` runs ``fn`` once per
    member and returns the members' n Futures in rank order; inside, ``fabric.gang_context()``
    gives each its rank, the world size and every member's address (docs/gangs.md).

    The resources are per member, as in a Ray placement group's bundles; each ``run`` reserves
    them anew, all n at once, and gives them back when the last member ends. ``min_warm=k``
    (CPU gangs): after a run that ended OK, up to k of its workers per executor stay warm (their
    imports loaded, holding no resources) and the next run of this shape from this driver
    starts in them at once; without it every run starts fresh processes."""

    def __init__(self, size: int, options: dict):
        self.size = size
        self._options = options
        self._fns: dict = {}  # plain function -> its RemoteFunction: code pickled once per function

    def __repr__(self):
        o = self._options
        return f"<fabric.gang size={self.size} cpus={o['cpus']:g} gpus={o['gpus']:g}>"

    def run(self, func, *args, **kwargs) -> list[Future]:
        """Start ``func(*args, **kwargs)`` on every member; returns n Futures, rank 0 first.

        ``func`` is a plain function or a ``@fabric.fn`` (whose own resources are not used: the
        gang's are; so is the gang's ``runtime_env``, if it has one). If one member fails, the
        others are stopped and get ``GangFailed``; a member's crash reruns the whole gang while
        ``retries`` last."""
        env = self._options.get("runtime_env")
        if isinstance(func, RemoteFunction):
            rf = func if env is None else self._fns.get(func) or self._fns.setdefault(
                func, func.options(runtime_env=env))
        elif callable(func) and not inspect.isclass(func):
            rf = self._fns.get(func)
            if rf is None:
                rf = self._fns[func] = RemoteFunction(func, _check_options("fabric.gang", {"runtime_env": env},
                                                                           _FN_OPTIONS))
        else:
            raise TypeError(f"Gang.run() runs a function, got {type(func).__name__}")
        _bind(rf._sig, rf._name, args, kwargs)
        blob, h = rf._blob()
        o = self._options
        call = CallOptions(label=o["name"] or rf._name, cpus=o["cpus"], gpus=o["gpus"], memory=o["memory_bytes"],
                           retries=o["retries"], timeout=o["timeout"], min_warm=o["min_warm"], gang=self.size)
        return _client().submit(P.GANG, blob, h, args, kwargs, call)


def gang(size: int, **options) -> Gang:
    """A gang of ``size`` members, each with ``cpus``/``gpus``/``memory``: they start together
    or not at all. ``fabric.gang(4, cpus=1).run(train, cfg)`` -> 4 Futures (docs/gangs.md)."""
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= P.MAX_GANG:
        raise ValueError(f"a gang has 1 to {P.MAX_GANG} members, got {size!r}")
    unknown = sorted(set(options) - set(_GANG_OPTIONS))
    if unknown:
        raise TypeError(f"fabric.gang() got unknown option(s) {', '.join(unknown)}; valid options: "
                        f"{', '.join(sorted(_GANG_OPTIONS))}")
    return Gang(size, _check_options("fabric.gang()", {**_GANG_OPTIONS, **options}, _FN_OPTIONS))


# ---------------------------------------------------------------------- get / wait / put / kill
def _check_futures(where, futures):
    if isinstance(futures, Future):
        raise TypeError(f"{where} expects a list of Futures; for one Future use fut.result() or fabric.get(fut)")
    try:
        futures = list(futures)
    except TypeError:
        raise TypeError(f"{where} expects a list of Futures, got {type(futures).__name__}") from None
    for f in futures:
        if not isinstance(f, Future):
            if isinstance(f, Stream):
                raise TypeError(f"{where} expects Futures, got the Stream of generator call {f.future.label}: "
                                f"iterate it for its items, or pass stream.future (done when the generator ends)")
            raise TypeError(f"{where} expects Futures (from .remote() or fabric.put()), got {type(f).__name__}")
    return futures


def get(futures, timeout: float | None = None):
    """The result of a Future, or the list of results of a list of Futures (in order)."""
    if timeout is not None:
        _check_number("timeout", timeout)
    if isinstance(futures, Future):
        return futures.result(timeout)
    futures = _check_futures("fabric.get", futures)
    for c in {f._client for f in futures if f._client is not None and f._client.unfetched}:
        c._fetch([f for f in futures if f._client is c])  # Futures that came inside a value: one FETCH
    if timeout is not None and futures:
        done, _ = wait(futures, num_returns=len(futures), timeout=timeout)
        if len(done) < len(futures):
            raise GetTimeout(f"{len(futures) - len(done)} of {len(futures)} calls did not finish within {timeout}s "
                             f"({futures[0]._client.fate()})")
        return [f.result() for f in futures]
    # In order, so the first failure raises as soon as it is known. Inside a call the whole
    # list is one wait (one BLOCKED/UNBLOCKED): the waits of each result() nest in it, and the
    # call's worker is not offered work between two of them, only to have it taken back
    token = (futures_mod._block() if futures_mod.blocking is not None and any(not f.done() for f in futures)
             else None)  # (a plain driver has no worker hook: nothing to check)
    try:
        return [f.result() for f in futures]
    finally:
        if token is not None:
            futures_mod.blocking.unblock(token)


def wait(futures, num_returns: int = 1, timeout: float | None = None):
    """Block until ``num_returns`` of ``futures`` are done or ``timeout`` passes.

    Returns ``(done, pending)``: two lists in input order; ``done`` holds at most ``num_returns``.
    """
    futures = _check_futures("fabric.wait", futures)
    if isinstance(num_returns, bool) or not isinstance(num_returns, int) or not 0 <= num_returns <= len(futures):
        raise ValueError(f"num_returns must be a whole number from 0 to len(futures)={len(futures)}, "
                         f"got {num_returns!r}")
    if timeout is not None:
        _check_number("timeout", timeout)
    clients = {f._client for f in futures if f._client is not None and not f.done()}
    for c in clients:
        c.wait(futures, num_returns, timeout)
    done, pending = [], []
    for f in futures:
        (done if f.done() and len(done) < num_returns else pending).append(f)
    return done, pending


def put(value) -> Future:
    """Store ``value`` on the cluster once; pass the returned Future to many calls by reference.

    Held by the broker, unless large transfers go through the object store (a cluster on
    other hosts with ``FABRIC_STORE`` set, or ``FABRIC_TRANSFER=store``) and its pickled size
    reaches ``FABRIC_STORE_THRESHOLD``: then it is written to the store once, under its content
    hash, the broker holds only a reference, and each host fetches it once (docs/storage.md)."""
    if isinstance(value, Future):
        raise TypeError("fabric.put() of a Future: pass the Future itself to calls instead")
    return _client().put(value)


def cancel(fut, force: bool = False, recursive: bool = True) -> bool:
    """Cancel a call (Ray's ``ray.cancel``); its Future raises ``fabric.Cancelled``. False if it
    had finished already.

    A call not started yet is dropped. A running call of a function gets ``fabric.Cancelled``
    raised inside it (its ``finally`` blocks run; it keeps its worker until it returns), or with
    ``force=True`` its worker is killed and replaced. ``recursive=True`` also cancels the calls
    its worker submitted that have not finished (the calls it spawned, and theirs). An instance
    method call that started runs to its end; use ``fabric.kill`` for the instance."""
    if isinstance(fut, Stream):
        fut = fut.future
    if not isinstance(fut, Future):
        raise TypeError(f"fabric.cancel expects a Future from .remote(), got {type(fut).__name__}")
    for name, v in (("force", force), ("recursive", recursive)):
        if not isinstance(v, bool):
            raise TypeError(f"{name} must be True or False, got {v!r}")
    if fut.done() or fut._client is None or fut.id in fut._client.puts:
        return False
    fut._client._send_d([P.C[P.CANCEL], fut.id, bytes([force | recursive << 1])])
    return True


def kill(handle) -> None:
    """Stop an instance now; its queued and running calls fail with ActorDied."""
    if not isinstance(handle, InstanceHandle):
        raise TypeError(f"fabric.kill expects an instance handle from Cls.remote(), got {type(handle).__name__}")
    (handle._client or _client()).kill_actor(handle._id, now=True)


# --- for libraries on the core (fabric.ml, fabric.serve): public, documented, not in fabric.* --
def flush() -> None:
    """Send now the calls this driver holds back for a batch (a submit that follows another
    within 50 us waits for the client's IO thread, 1-10 ms): for a caller that answers a
    request, like the HTTP gateway, whose latency is that of one call."""
    c = _state.client
    if c is not None and _state.pid == os.getpid():
        c.flush()


def instance_id(handle: "InstanceHandle") -> str:
    """The id (hex) of the instance ``handle`` names: the same in every copy of the handle, for
    the instance's life. (A handle's attributes are its methods, so this is a function.)"""
    if not isinstance(handle, InstanceHandle):
        raise TypeError(f"instance_id expects an instance handle from Cls.remote(), got {type(handle).__name__}")
    return handle._id.hex()
