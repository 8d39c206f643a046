"""``Tuner``: runs a sweep's trials on the cluster and feeds their reports to the scheduler and
searcher in the driver.

A function trainable's trial is one fabric call (cpus=1 unless ``with_resources`` says
otherwise); a fabric.ml Trainer's trial is its gang, run by ``trainer._fit_for_tune`` in a driver
thread. Reports stream back through the hub (``fabric.ml._hub``): a push is an async instance
call the worker never waits for, and the driver long-polls the hub, so a report costs the
trial tens of microseconds and the driver a share of one poll.

Stopping a trial (a scheduler's STOP, a pruned Optuna trial, the time budget) sets its stop flag,
which the trial sees at its next report and ends cleanly; a trial that does not report again
within ``TuneConfig.stop_grace_s`` has its call cancelled, so its worker is replaced and its
resources are free at once.

Experiment state lives in ``RunConfig.storage_path/name/``: ``tuner.pkl`` (space, configs,
scheduler, searcher as they were at the start) and one ``trials/<id>.json`` per trial, written
when it reports a checkpoint and when it ends. ``Tuner.restore`` reads them back.
"""
from __future__ import annotations

import inspect
import json
import math
import os
import queue
import threading
import time
import traceback
import uuid
import warnings
from dataclasses import dataclass
from typing import Any

import fabric

from . import search as S
from .progress import ProgressView
from .result_grid import ResultGrid
from .schedulers import FINISH, STOP, Exploit, FIFOScheduler, MetricNotReported, TrialScheduler
from .searchers import FINISHED, BasicVariantGenerator, Searcher
from .trial import ERROR, FINAL, PENDING, RUNNING, STOPPED, TERMINATED, Trial, TrialError

STATE_FILE = "tuner.pkl"
EXECUTOR_WAIT_S = 10.0    # how long a sweep waits for a new cluster's first executor to register
LOST_REPORT_WAIT_S = 30.0  # a finished trial whose last reports have not come by then is closed without them


class TuneError(fabric.FabricError):
    """The sweep itself cannot go on (not one trial's failure: those are in the ResultGrid)."""


@dataclass
class TuneConfig:
    """How to search (Ray Tune's ``TuneConfig``).

    ``metric``/``mode``: what the scheduler, searcher and ``get_best_result`` optimise.
    ``num_samples``: trials per grid point (or in all, without grids). ``max_concurrent_trials``:
    at most this many at once (default: as many as the cluster's CPUs/GPUs fit).
    ``time_budget_s``: no trial starts after this long and running ones are stopped.
    ``stop_grace_s``: how long a stopped trial has to reach its next report before its call is
    cancelled. ``progress``: the live table (None: on, plain lines when stdout is not a terminal)."""

    metric: str | None = None
    mode: str | None = None
    search_alg: Searcher | None = None
    scheduler: TrialScheduler | None = None
    num_samples: int = 1
    max_concurrent_trials: int | None = None
    time_budget_s: float | None = None
    stop_grace_s: float = 0.5
    progress: bool | None = None
    seed: int | None = None
    reuse_actors: bool | None = None  # accepted for Ray compatibility: fabric's workers are always reused

    def __post_init__(self):
        if self.mode not in (None, "min", "max"):
            raise ValueError(f"TuneConfig.mode must be 'min' or 'max', got {self.mode!r}")
        if self.metric is not None and (not isinstance(self.metric, str) or not self.metric):
            raise TypeError(f"TuneConfig.metric must be the name of a reported metric, got {self.metric!r}")
        if isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise ValueError(f"TuneConfig.num_samples must be a whole number >= 1, got {self.num_samples!r}")
        m = self.max_concurrent_trials
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(f"TuneConfig.max_concurrent_trials must be a whole number >= 1 or None, got {m!r}")
        b = self.time_budget_s
        if b is not None and (isinstance(b, bool) or not isinstance(b, (int, float)) or not b > 0):
            raise ValueError(f"TuneConfig.time_budget_s must be a number of seconds above 0 or None, got {b!r}")
        if self.scheduler is not None and not isinstance(self.scheduler, TrialScheduler):
            raise TypeError(f"TuneConfig.scheduler must be a tune scheduler (tune.ASHAScheduler(...), ...), "
                            f"got {type(self.scheduler).__name__}")
        if self.search_alg is not None and not isinstance(self.search_alg, Searcher):
            raise TypeError(f"TuneConfig.search_alg must be a tune searcher (tune.OptunaSearch(), ...), "
                            f"got {type(self.search_alg).__name__}")


# ------------------------------------------------------------------ wrappers of a trainable
class _Wrapped:
    """A function trainable with resources and by-reference parameters attached."""

    def __init__(self, fn, resources=None, params=None):
        base = fn._fn if isinstance(fn, _Wrapped) else fn
        self._fn = base
        self.resources = dict(getattr(fn, "resources", None) or {}) | dict(resources or {})
        self.params = dict(getattr(fn, "params", None) or {}) | dict(params or {})
        self.__name__ = getattr(base, "__name__", "trainable")

    def __call__(self, config):  # for plain local use; trials resolve params on the cluster
        return self._fn(config, **{k: fabric.get(v) if isinstance(v, fabric.Future) else v
                                   for k, v in self.params.items()})


def with_resources(trainable, resources: dict):
    """``trainable`` whose trials each get ``resources`` ({"cpus": 2, "gpus": 0, "memory": "1GiB"};
    Ray's "CPU"/"GPU" spellings too)."""
    return _Wrapped(trainable, resources=_check_resources(resources))


def with_parameters(trainable, **kwargs):
    """``trainable`` called as ``trainable(config, **kwargs)``; each value is ``fabric.put`` once
    here and reaches every trial by reference (resolved on the cluster, not re-sent per trial)."""
    if not kwargs:
        raise TypeError("tune.with_parameters() needs at least one keyword argument, e.g. data=my_array")
    refs = {k: v if isinstance(v, fabric.Future) else fabric.put(v) for k, v in kwargs.items()}
    return _Wrapped(trainable, params=refs)


def _check_resources(r) -> dict:
    if not isinstance(r, dict):
        raise TypeError(f"resources must be a dict like {{'cpus': 2, 'gpus': 0}}, got {type(r).__name__}")
    alias = {"cpus": "cpus", "cpu": "cpus", "CPU": "cpus", "num_cpus": "cpus", "gpus": "gpus", "gpu": "gpus",
             "GPU": "gpus", "num_gpus": "gpus", "memory": "memory"}
    out = {}
    for k, v in r.items():
        if k not in alias:
            raise ValueError(f"unknown resource {k!r}; use cpus, gpus and memory")
        if alias[k] != "memory" and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0):
            raise ValueError(f"resource {k!r} must be a number >= 0, got {v!r}")
        out[alias[k]] = v
    return out


def _is_trainer(obj) -> bool:
    return hasattr(obj, "_fit_for_tune") and hasattr(obj, "scaling_config")


def _check_function(fn, params):
    if inspect.isclass(fn):
        raise TypeError(f"tune.Tuner takes a function trainable (def train(config): ... tune.report(...)) or a "
                        f"fabric.ml Trainer; {fn.__name__} is a class (class-based Trainables are not supported)")
    if not callable(fn):
        raise TypeError(f"tune.Tuner needs a trainable: a function of config or a fabric.ml Trainer, "
                        f"got {type(fn).__name__}")
    if isinstance(fn, fabric.RemoteFunction):
        fn = fn._func
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return fn
    try:
        sig.bind({}, **{k: None for k in params})
    except TypeError as e:
        extra = f" plus keyword arguments {', '.join(params)} (from with_parameters)" if params else ""
        raise TypeError(f"the trainable {getattr(fn, '__name__', fn)!r}{sig} must take one argument, the config "
                        f"dict{extra}: def {getattr(fn, '__name__', 'train')}(config): ... ({e})") from None
    return fn


# ------------------------------------------------------------------ the worker side
class _TrialReporter:
    """The session reporter inside a function trial: stamps iteration and time, stores a
    checkpoint under the trial's folder, pushes the report to the driver, honours stop flags."""

    def __init__(self, sink, key, trial_dir, it0, t0, storage_options):
        self.sink, self.key, self.trial_dir = sink, key, trial_dir
        self.it0, self.t0, self.storage_options = it0, t0, storage_options
        self.n = 0
        self.start = time.monotonic()

    def report(self, metrics, checkpoint=None):
        if self.sink.should_stop(self.key):
            from fabric.ml.session import StopTraining

            raise StopTraining()
        self.n += 1
        it = self.it0 + self.n
        item = dict(metrics)
        item["training_iteration"] = it
        item["time_total_s"] = self.t0 + time.monotonic() - self.start
        if checkpoint is not None:
            from fabric.ml import checkpoint as C

            dest = C.join(self.trial_dir, f"checkpoint_{it:06d}")
            if checkpoint.path.rstrip("/") != dest.rstrip("/"):
                with checkpoint.as_directory() as d:
                    C.upload_dir(d, dest, self.storage_options)
            item["_ckpt"] = dest
        self.sink.push(self.key, item)


class _TrialEntry:
    """What a function trial's call runs: binds a session around the user's function and
    returns ``(reports made, error)``, so the driver knows when it has every report."""

    def __init__(self, fn):
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", "trainable")

    def __call__(self, config, meta, **params):
        from fabric.ml import session as SS
        from fabric.ml.checkpoint import Checkpoint

        ckpt = Checkpoint.from_directory(meta["ckpt"], meta["so"]) if meta.get("ckpt") else None
        rep = _TrialReporter(meta["sink"], meta["key"], meta["dir"], meta["it0"], meta["t0"], meta["so"])
        ctx = SS.TrainContext(experiment_name=meta["exp"], trial_name=meta["tid"], trial_id=meta["tid"],
                              storage_path=meta["root"], trial_dir=meta["dir"])
        sess = SS.Session(context=ctx, reporter=rep, checkpoint=ckpt)
        err = None
        with SS.bind(sess):
            try:
                out = self.fn(config, **params)
                if isinstance(out, dict) and out:  # Ray: a returned dict is a last report
                    SS.report(out)
            except SS.StopTraining:
                pass
            except BaseException as e:  # noqa: BLE001 - recorded, the sweep goes on
                err = _pack_error(e)
        return rep.n, err


def _pack_error(e: BaseException):
    import pickle

    import cloudpickle

    tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    try:
        blob = cloudpickle.dumps(e)
        pickle.loads(blob)
    except Exception:  # noqa: BLE001
        blob = None
    return blob, f"{type(e).__module__}.{type(e).__qualname__}", str(e), tb


def _unpack_error(packed):
    import pickle

    blob, name, msg, tb = packed
    exc = None
    if blob is not None:
        try:
            exc = pickle.loads(blob)
        except Exception:  # noqa: BLE001 - its module may not import here
            exc = None
    if not isinstance(exc, BaseException):
        exc = TrialError(f"{name}: {msg}")
    exc.__cause__ = fabric.RemoteTraceback(tb)
    return exc, tb


# ------------------------------------------------------------------ the driver side
@dataclass
class _Run:
    """One attempt of a trial on the cluster (a trial restarted by PBT gets a new run)."""

    trial: Trial
    key: str
    future: Any = None
    thread: Any = None
    seen: int = 0
    expected: int | None = None
    outcome: Any = None
    stopping: str = ""
    cancel_at: float | None = None
    ignore_after_stop: bool = True
    replacement: Any = None   # PBT: (config, checkpoint) to start once this run has ended
    done: bool = False
    waiting_since: float | None = None


class Tuner:
    """``tune.Tuner(trainable, param_space=..., tune_config=tune.TuneConfig(...), run_config=ml.RunConfig(...))``;
    ``.fit()`` runs the sweep and returns a ``ResultGrid``."""

    def __init__(self, trainable=None, *, param_space: dict | None = None, tune_config: TuneConfig | None = None,
                 run_config=None, _restored: dict | None = None):
        from fabric.ml.config import RunConfig

        if trainable is None:
            raise TypeError("tune.Tuner needs a trainable: a function of config or a fabric.ml Trainer")
        self.tune_config = tune_config if tune_config is not None else TuneConfig()
        if not isinstance(self.tune_config, TuneConfig):
            raise TypeError(f"tune_config must be a tune.TuneConfig, got {type(self.tune_config).__name__}")
        self.run_config = run_config if run_config is not None else RunConfig()
        if not isinstance(self.run_config, RunConfig):
            raise TypeError(f"run_config must be an ml.RunConfig, got {type(self.run_config).__name__}")
        self.trainable = trainable
        self.is_trainer = _is_trainer(trainable)
        self.param_space = S.validate(param_space)
        if self.is_trainer:
            key = getattr(trainable, "_config_attr", None)
            allowed = {key} if key else {"params", "train_loop_config"}
            if set(self.param_space) != allowed:
                want = " or ".join(repr(k) for k in sorted(allowed))
                raise S.SearchSpaceError(
                    f"{type(trainable).__name__}'s param_space holds one key, {want}, whose dict is merged into the "
                    f"trainer's (XGBoostTrainer: 'params', the others: 'train_loop_config'); got keys "
                    f"{sorted(self.param_space)}")
            inner = next(iter(self.param_space.values()))
            if not isinstance(inner, dict) or not inner:
                raise S.SearchSpaceError(f"param_space[{next(iter(self.param_space))!r}] must be a non-empty dict of "
                                         f"parameters to tune, got {inner!r}")
            self._fn = None
        else:
            params = getattr(trainable, "params", {}) if isinstance(trainable, _Wrapped) else {}
            base = trainable._fn if isinstance(trainable, _Wrapped) else trainable
            self._fn = _check_function(base, params)
        self._restored = _restored

    # -------------------------------------------------------------- restore
    @classmethod
    def restore(cls, path: str, trainable, *, resume_unfinished: bool = True, resume_errored: bool = False,
                restart_errored: bool = False, param_space: dict | None = None, storage_options: dict | None = None
                ) -> "Tuner":
        """The sweep stored at ``path`` (``storage_path/name``), to be continued with ``.fit()``:
        finished trials are kept; unfinished ones run again from their latest checkpoint (from the
        start without one); errored ones are kept unless ``resume_errored`` (from their checkpoint)
        or ``restart_errored`` (from scratch)."""
        state, trials = _load_state(path, storage_options)
        tc, rc = state["tune_config"], state["run_config"]
        # where it is now (it may have been moved or copied since), not where it was written
        root, _, name = path.rstrip("/").rpartition("/")
        rc.storage_path, rc.name = root or ".", name
        if storage_options is not None:
            rc.storage_options = storage_options
        t = cls(trainable, param_space=param_space or state["param_space"], tune_config=tc, run_config=rc,
                _restored={"state": state, "trials": trials, "resume_unfinished": resume_unfinished,
                           "resume_errored": resume_errored, "restart_errored": restart_errored})
        return t

    @classmethod
    def can_restore(cls, path: str, storage_options: dict | None = None) -> bool:
        from fabric.ml import checkpoint as C

        fs, root = C.filesystem(path, storage_options)
        return fs.exists(root.rstrip("/") + "/" + STATE_FILE)

    def fit(self) -> ResultGrid:
        return _Sweep(self).run()

    def get_results(self) -> ResultGrid:
        return _Sweep(self, dry=True).results()


def _load_state(path, storage_options):
    import cloudpickle

    from fabric.ml import checkpoint as C

    fs, root = C.filesystem(path, storage_options)
    root = root.rstrip("/")
    state_path = root + "/" + STATE_FILE
    if not fs.exists(state_path):
        raise FileNotFoundError(f"{path} holds no tune experiment (no {STATE_FILE}); give the folder "
                                f"RunConfig.storage_path/name of the sweep")
    with fs.open(state_path, "rb") as f:
        state = cloudpickle.loads(f.read())
    trials = {}
    try:
        fs.invalidate_cache(root + "/trials")
    except Exception:  # noqa: BLE001
        pass
    for p in fs.glob(root + "/trials/*.json"):
        with fs.open(p, "rb") as f:
            try:
                d = json.loads(f.read())
            except ValueError:
                continue
        trials[d["trial_id"]] = Trial.from_state(d)
    return state, trials


class _Writer:
    """Writes trial records to the store from a thread of its own, so the loop never waits on
    storage. The newest record of a trial wins; ``close`` writes what is left."""

    def __init__(self, exp_path, storage_options):
        from fabric.ml import checkpoint as C

        self.fs, root = C.filesystem(exp_path, storage_options)
        self.root = root.rstrip("/")
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.errors: list = []
        if self.local:  # owner-only, every folder made here (makedirs gives its mode to the last one only)
            for d in (self.root, self.root + "/trials"):
                os.makedirs(d, mode=0o700, exist_ok=True)
        self.thread = threading.Thread(target=self._loop, name="fabric-tune-writer", daemon=True)
        self.thread.start()

    def write_now(self, name: str, data: bytes):
        path = f"{self.root}/{name}"
        if self.local:
            tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        else:
            with self.fs.open(path, "wb") as f:
                f.write(data)

    def put(self, trial: Trial):
        self.q.put((trial.trial_id, json.dumps(trial.to_state(), default=_json_default).encode()))

    def _loop(self):
        while True:
            item = self.q.get()
            if item is None:
                return
            batch = {item[0]: item[1]}
            stop = False
            while True:  # coalesce: only a trial's newest record matters
                try:
                    nxt = self.q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch[nxt[0]] = nxt[1]
            for tid, data in batch.items():
                try:
                    self.write_now(f"trials/{tid}.json", data)
                except Exception as e:  # noqa: BLE001 - keep the sweep going, say so at the end
                    self.errors.append(e)
            if stop:
                return

    def close(self):
        self.q.put(None)
        self.thread.join(60)


def _json_default(o):
    try:
        return float(o)
    except (TypeError, ValueError):
        return repr(o)


def _possible_concurrency(res: dict, gang: int = 1) -> tuple[int | None, str]:
    """How many trials needing ``res`` (per member, ``gang`` members) the cluster can ever run at once."""
    deadline = time.monotonic() + EXECUTOR_WAIT_S
    while True:  # a cluster just started may not have its executors registered yet
        try:
            exs = fabric.cluster_status().get("executors", [])
        except Exception:  # noqa: BLE001 - no status: let the broker queue
            return None, ""
        if exs or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    if not exs:  # e.g. an autoscaled cluster at zero: the broker queues, the autoscaler adds executors
        return None, "no executors yet"
    cpus, gpus = float(res.get("cpus", 1)), float(res.get("gpus", 0))
    slots = 0
    for ex in exs:
        n = math.inf
        if cpus > 0:
            n = min(n, math.floor(ex["cpus"] / cpus + 1e-9))
        if gpus > 0:
            n = min(n, math.floor(len(ex.get("gpus", [])) / gpus + 1e-9))
        if n == math.inf:
            n = 64
        slots += n
    total_cpus = sum(ex["cpus"] for ex in exs)
    return slots // gang, f"{len(exs)} executor(s), {total_cpus:g} CPUs"


class _HubMux:
    """One hub per driver process, shared by its sweeps: starting the hub's instance costs a
    worker process (~0.5 s), more than a whole sweep of small trials. One poller thread routes
    what arrives to the sweep whose trial-id prefix the key carries."""

    _lock = threading.Lock()
    _inst: "_HubMux | None" = None

    def __init__(self):
        from fabric.ml._hub import Hub

        self.hub = Hub()
        self.sinks = self.hub.sink()
        self.routes: dict[str, queue.SimpleQueue] = {}
        self.pending_stops: list = []
        self.pid = os.getpid()
        self.closed = False
        self.thread = threading.Thread(target=self._loop, name="fabric-tune-poll", daemon=True)
        self.thread.start()

    @classmethod
    def get(cls) -> "_HubMux":
        with cls._lock:
            m = cls._inst
            if m is None or m.closed or m.pid != os.getpid() or not fabric.is_initialized() \
                    or getattr(m.hub._handle, "_client", None) is not _client_now():
                if m is not None:
                    m.close()
                m = cls._inst = cls()
            return m

    def register(self, prefix: str, events: queue.SimpleQueue):
        self.routes[prefix] = events

    def unregister(self, prefix: str):
        self.routes.pop(prefix, None)

    def stop(self, key: str):
        """Set the stop flag without waiting for the hub's answer (one submit)."""
        handle = getattr(self.hub, "_handle", None)
        if handle is None:
            self.hub.stop(key)
            return
        self.pending_stops = [f for f in self.pending_stops if not f.done()]
        self.pending_stops.append(handle.stop.remote(key))

    def _loop(self):
        while not self.closed:
            try:
                items = self.hub.poll(1.0)
            except Exception:  # noqa: BLE001 - the hub or the cluster went away
                self.closed = True
                return
            if not items:
                continue
            by_route: dict = {}
            for key, item in items:
                by_route.setdefault(key.split("_", 1)[0], []).append((key, item))
            for prefix, its in by_route.items():
                q = self.routes.get(prefix)
                if q is not None:
                    q.put(("r", its))

    def close(self):
        self.closed = True
        try:
            self.hub.close()
        except Exception:  # noqa: BLE001
            pass


def _client_now():
    from fabric import api

    return api._state.client


class _Sweep:
    def __init__(self, tuner: Tuner, dry: bool = False):
        self.t = tuner
        tc, rc = tuner.tune_config, tuner.run_config
        self.tc, self.rc = tc, rc
        self.metric, self.mode = tc.metric, tc.mode
        self.scheduler = tc.scheduler or FIFOScheduler()
        self.searcher = tc.search_alg or BasicVariantGenerator(seed=tc.seed)
        self.trials: list[Trial] = []
        self.by_id: dict[str, Trial] = {}
        self.runs: dict[str, _Run] = {}
        self.active: list[_Run] = []
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.clock = time.monotonic
        self.stats = {"reports": 0, "trials_started": 0, "driver_s": 0.0}
        self.aborting = False
        restored = tuner._restored
        if restored:
            self.name, self.root = rc.name, rc.storage_path
        else:
            self.name = rc.name or f"tune-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
            if rc.storage_path:
                self.root = rc.storage_path
            else:
                from fabric import storage

                self.root = storage.default().url()
        from fabric.ml import checkpoint as C

        self.C = C
        self.so = C.storage_options_for(self.root, rc.storage_options)
        self.path = C.join(self.root, self.name)

    # -------------------------------------------------------------- set-up
    def _setup(self):
        tc = self.tc
        self.scheduler.set_search_properties(self.metric, self.mode)
        if self.metric is None and getattr(self.scheduler, "metric", None):
            self.metric, self.mode = self.scheduler.metric, self.scheduler.mode
        self.searcher.setup(self.t.param_space, self.metric, self.mode, tc.num_samples)
        if self.metric is None and self.searcher.metric:
            self.metric, self.mode = self.searcher.metric, self.searcher.mode
        # resources and concurrency
        if self.t.is_trainer:
            sc = self.t.trainable.scaling_config
            self.res = dict(sc.gang_options()) if hasattr(sc, "gang_options") else {"cpus": 1}
            gang = getattr(sc, "num_workers", 1)
        else:
            self.res = {"cpus": 1, "gpus": 0}
            if isinstance(self.t.trainable, _Wrapped):
                self.res.update(self.t.trainable.resources)
            gang = 1
        possible, what = _possible_concurrency(self.res, gang)
        if possible == 0:
            raise TuneError(f"no trial can ever run: each needs {gang} x cpus={self.res.get('cpus', 1):g} "
                            f"gpus={self.res.get('gpus', 0):g}, and the cluster has {what}")
        want = tc.max_concurrent_trials
        if want is not None and possible is not None and want > possible:
            warnings.warn(f"max_concurrent_trials={want} is more than the cluster can ever run at once ({possible}: "
                          f"{what}, each trial needing {gang} x cpus={self.res.get('cpus', 1):g} "
                          f"gpus={self.res.get('gpus', 0):g}); running {possible} at a time", UserWarning,
                          stacklevel=4)
        self.concurrency = want if want is not None and (possible is None or want <= possible) else (possible or 1)
        # one more trial queued per slot hides the round trip between a trial's end and the next's start,
        # unless the user capped concurrency below what the cluster could do
        self.inflight_cap = self.concurrency if (want is not None and possible is not None and want < possible) \
            else self.concurrency * 2
        if self.t.is_trainer:
            self.inflight_cap = self.concurrency
        total = self.searcher.total()
        self.view = ProgressView(self.metric, self.mode, total,
                                 enabled=tc.progress if tc.progress is not None else bool(self.rc.verbose))
        self.writer = _Writer(self.path, self.so)
        self.hub = None
        if not self.t.is_trainer:
            self.hub = _HubMux.get()
            self.sink = self.hub.sinks
            from fabric.api import ship_by_value  # the user's module travels by value, as for @fabric.fn

            ship_by_value(self.t._fn)
            entry = _TrialEntry(self.t._fn)
            opts = {k: v for k, v in self.res.items() if k in ("cpus", "gpus", "memory") and v is not None}
            mf = self.rc.failure_config.max_failures
            self.remote = fabric.fn(name=f"tune:{entry.__name__}", retries=mf if mf >= 0 else 1000, **opts)(entry)
            self.params = dict(self.t.trainable.params) if isinstance(self.t.trainable, _Wrapped) else {}
        self.prefix = uuid.uuid4().hex[:5]

    def _save_state(self):
        import cloudpickle

        state = {"param_space": self.t.param_space, "tune_config": self.tc, "run_config": self.rc,
                 "name": self.name, "root": self.root, "prefix": self.prefix, "metric": self.metric,
                 "mode": self.mode, "searcher": self.searcher, "is_trainer": self.t.is_trainer}
        self.writer.write_now(STATE_FILE, cloudpickle.dumps(state))

    # -------------------------------------------------------------- trials
    def _new_trial(self, index: int, config: dict) -> Trial:
        tid = f"{self.prefix}_{index:05d}"
        t = Trial(tid, config, path=self.C.join(self.path, tid))
        t.index = index
        self.trials.append(t)
        self.by_id[tid] = t
        self.scheduler.on_trial_add(tid, config)
        return t

    def _launch(self, trial: Trial, config=None, checkpoint=None):
        run_no = trial.restarts
        key = f"{trial.trial_id}#{run_no}"
        run = _Run(trial, key)
        if config is not None:
            trial.config = config
        trial.status = PENDING
        trial.started = trial.started or self.clock()
        it0 = trial.iterations
        t0 = float(trial.last_result.get("time_total_s", 0.0))
        ckpt = checkpoint if checkpoint is not None else trial.checkpoint
        self.runs[key] = run
        self.active.append(run)
        self.stats["trials_started"] += 1
        if self.t.is_trainer:
            run.thread = threading.Thread(target=self._trainer_thread, args=(run, ckpt), daemon=True,
                                          name=f"tune-{trial.trial_id}")
            run.thread.start()
            return run
        meta = {"sink": self.sink, "key": key, "dir": trial.path, "it0": it0, "t0": t0, "so": self.so or None,
                "ckpt": ckpt, "exp": self.name, "tid": trial.trial_id, "root": self.root}
        fut = self.remote.remote(trial.config, meta, **self.params)
        run.future = fut
        fut.add_done_callback(lambda f, k=key: self.events.put(("d", k)))
        return run

    def _trainer_thread(self, run: _Run, ckpt):
        trainer, trial = self.t.trainable, run.trial
        if ckpt and hasattr(trainer, "resume_from_checkpoint"):  # a restore, or PBT's exploit
            import copy

            from fabric.ml.checkpoint import Checkpoint

            trainer = copy.copy(trainer)
            trainer.resume_from_checkpoint = Checkpoint.from_directory(ckpt, self.so or None)
        key = run.key
        overrides = next(iter(trial.config.values()))

        def on_report(metrics, checkpoint=None):
            reply = queue.SimpleQueue()
            item = dict(metrics)
            if checkpoint is not None:
                item["_ckpt"] = getattr(checkpoint, "path", str(checkpoint))
            self.events.put(("t", key, item, reply))
            try:
                return bool(reply.get(timeout=600))
            except queue.Empty:
                return False

        try:
            res = trainer._fit_for_tune(overrides, on_report, trial.trial_id, self.path)
            err = getattr(res, "error", None)
            out = ("ok", None if err is None else err)
        except BaseException as e:  # noqa: BLE001
            out = ("ok", e)
        self.events.put(("e", key, out))

    # -------------------------------------------------------------- the loop
    def run(self) -> ResultGrid:
        fabric.init() if not fabric.is_initialized() else None
        self._setup()
        t_start = self.clock()
        self.deadline = t_start + self.tc.time_budget_s if self.tc.time_budget_s else None
        plan = self._plan()
        if not self.t._restored:
            self._save_state()
        poller = None
        if self.hub is not None:
            self.hub.register(self.prefix, self.events)
        abort = None
        try:
            abort = self._loop(plan)
        except KeyboardInterrupt:
            abort = "interrupted"
            self._stop_all("interrupted")
            raise
        finally:
            self._finish(poller)
        if isinstance(abort, BaseException):
            raise abort
        return self.results()

    def _plan(self):
        """The trials to run: restored ones first, then the searcher's new suggestions."""
        r = self.t._restored
        self.resume: list[Trial] = []
        self.skip_index: set = set()
        self.next_index = 0
        if not r:
            return
        self.prefix = r["state"]["prefix"]
        self.searcher = r["state"]["searcher"]
        self.searcher.setup(self.t.param_space, self.metric, self.mode, self.tc.num_samples)
        for tid, t in sorted(r["trials"].items()):
            idx = int(tid.rsplit("_", 1)[1])
            t.index = idx
            keep = t.status in (TERMINATED, STOPPED) or (t.status == ERROR and not (r["resume_errored"] or
                                                                                  r["restart_errored"]))
            if not keep and not r["resume_unfinished"] and t.status not in FINAL:
                keep = True
            self.trials.append(t)
            self.by_id[tid] = t
            self.scheduler.on_trial_add(tid, t.config)
            if keep:
                for res in t.history:  # rebuild the scheduler's view (rungs, medians)
                    try:
                        self.scheduler.on_trial_result(tid, res)
                    except MetricNotReported:
                        break
                self.scheduler.on_trial_complete(tid, t.last_result or None)
                add = getattr(self.searcher, "add_evaluated", None)
                if add is not None and t.status != ERROR:
                    add(t.config, t.last_result)
            else:
                if t.status == ERROR and r["restart_errored"]:
                    t.history, t.checkpoint = [], None
                t.status, t.error, t.error_text = PENDING, None, ""
                if not t.checkpoint:  # no checkpoint: starts over
                    t.history = []
                self.resume.append(t)
            self.skip_index.add(idx)
        self.trials.sort(key=lambda t: t.index)

    def _suggest(self):
        """The next new trial from the searcher, or FINISHED / None."""
        while True:
            if isinstance(self.searcher, BasicVariantGenerator):
                idx = self.searcher.i
                cfg = self.searcher.suggest("")
                if cfg is FINISHED or cfg is None:
                    return cfg
                if idx in self.skip_index:
                    continue
                self.next_index = max(self.next_index, idx + 1)
                return self._new_trial(idx, cfg)
            if self.t._restored and len(self.trials) >= self.tc.num_samples:
                return FINISHED
            idx = max([t.index for t in self.trials], default=-1) + 1
            tid = f"{self.prefix}_{idx:05d}"
            cfg = self.searcher.suggest(tid)
            if cfg is FINISHED or cfg is None:
                return cfg
            return self._new_trial(idx, cfg)

    def _loop(self, plan):
        exhausted = False
        while True:
            now = self.clock()
            budget_over = self.deadline is not None and now >= self.deadline
            if budget_over and not getattr(self, "_budget_stopped", False):
                self._budget_stopped = True
                self._stop_all("time budget")
            # start what may start
            while not budget_over and len(self.active) < self.inflight_cap:
                if self.resume:
                    self._launch(self.resume.pop(0))
                    continue
                if exhausted:
                    break
                nxt = self._suggest()
                if nxt is FINISHED:
                    exhausted = True
                    break
                if nxt is None:
                    break
                self._launch(nxt)
            if not self.active:
                if exhausted or budget_over or not self.resume:
                    break
            timeout = 0.5
            nearest = [r.cancel_at for r in self.active if r.cancel_at is not None]
            if self.deadline is not None:
                nearest.append(self.deadline)
            if nearest:
                timeout = max(0.0, min(min(nearest) - now, 0.5))
            try:
                ev = self.events.get(timeout=timeout)
            except queue.Empty:
                ev = None
            t0 = time.perf_counter()
            while ev is not None:
                err = self._handle(ev)
                if err is not None:
                    self.aborting = True
                    self._stop_all("aborted")
                    self._drain_active()
                    return err
                try:
                    ev = self.events.get_nowait()
                except queue.Empty:
                    ev = None
            now = self.clock()
            for r in list(self.active):
                if r.cancel_at is not None and now >= r.cancel_at and not r.done and r.future is not None:
                    r.cancel_at = None
                    r.future.cancel()  # its worker is replaced; resources free at once
                if r.expected is not None and not r.done:
                    r.waiting_since = r.waiting_since or now
                    if now - r.waiting_since > LOST_REPORT_WAIT_S:  # a push was lost: do not wait forever
                        r.seen = r.expected
                        self._maybe_finish(r)
            self.stats["driver_s"] += time.perf_counter() - t0
            self.view.update(self.trials, now)

    def _drain_active(self, timeout=30.0):
        end = self.clock() + timeout
        while self.active and self.clock() < end:
            for r in list(self.active):
                if r.future is not None and not r.done:
                    r.future.cancel()
            try:
                ev = self.events.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self._handle(ev)
            except Exception:  # noqa: BLE001
                pass

    def _handle(self, ev):
        kind = ev[0]
        if kind == "r":
            first = None
            for key, item in ev[1]:  # all of them, even after an error: each counts towards its run's end
                run = self.runs.get(key)
                if run is not None:
                    err = self._on_report(run, item)
                    if err is not None and first is None:
                        first = err
                        self.aborting = True
                    self._maybe_finish(run)
            return first
        elif kind == "d":
            run = self.runs.get(ev[1])
            if run is not None and not run.done:
                f = run.future
                try:
                    n, packed = f.result()
                    run.expected, run.outcome = n, packed
                except fabric.Cancelled:
                    run.expected, run.outcome = run.seen, None
                    run.stopping = run.stopping or "cancelled"
                except BaseException as e:  # noqa: BLE001 - the worker died, or cannot be reached
                    run.expected, run.outcome = run.seen, e
                self._maybe_finish(run)
        elif kind == "t":
            _, key, item, reply = ev
            run = self.runs.get(key)
            if run is None or run.done:
                reply.put(True)
                return None
            err = self._on_report(run, item)
            reply.put(bool(run.stopping))
            if err is not None:
                return err
        elif kind == "e":
            run = self.runs.get(ev[1])
            if run is not None and not run.done:
                run.expected, run.outcome = run.seen, ev[2][1]
                self._maybe_finish(run)
        return None

    def _on_report(self, run: _Run, item: dict):
        run.seen += 1
        self.stats["reports"] += 1
        trial = run.trial
        if (run.stopping and run.ignore_after_stop) or self.aborting:
            return None
        if "training_iteration" not in item:  # trainers: stamp here
            item["training_iteration"] = trial.iterations + 1
            started = trial.started or self.clock()
            item["time_total_s"] = self.clock() - started
        it = item["training_iteration"]
        if trial.history and it <= trial.iterations:  # a retried run starts over: forget its old reports
            trial.history = [h for h in trial.history if h["training_iteration"] < it]
        trial.history.append(item)
        trial.status = RUNNING
        ck = item.get("_ckpt")
        if ck:
            trial.checkpoint = ck
            self.writer.put(trial)
        tid = trial.trial_id
        try:
            decision = self.scheduler.on_trial_result(tid, item)
        except MetricNotReported as e:
            return e
        prune = self.searcher.on_trial_result(tid, item)
        if self._user_stop(tid, item):
            decision = STOP
        if isinstance(decision, Exploit):
            donor = self.by_id.get(decision.donor)
            ckpt = donor.checkpoint if donor is not None else None
            self._stop_run(run, "exploit")
            run.replacement = (decision.config, ckpt, donor.last_result if donor else {})
        elif decision == FINISH:
            self._stop_run(run, "")
            run.stopping = "finished"
        elif decision == STOP or prune:
            self._stop_run(run, "pruned" if prune and decision != STOP else "scheduler")
        return None

    def _user_stop(self, tid, result) -> bool:
        stop = self.rc.stop
        if stop is None:
            return False
        if callable(stop):
            return bool(stop(tid, result))
        if isinstance(stop, dict):
            return any(k in result and result[k] >= v for k, v in stop.items())
        return False

    def _stop_run(self, run: _Run, why: str):
        if run.stopping or run.done:
            return
        run.stopping = why
        if self.hub is not None:
            self.hub.stop(run.key)
            run.cancel_at = self.clock() + self.tc.stop_grace_s

    def _stop_all(self, why):
        for r in list(self.active):
            self._stop_run(r, why)

    def _maybe_finish(self, run: _Run):
        if run.done or run.expected is None or run.seen < run.expected:
            return
        run.done = True
        self.active.remove(run)
        self.runs.pop(run.key, None)
        trial = run.trial
        if run.replacement is not None and run.outcome is None:
            cfg, ckpt, donor_last = run.replacement
            trial.restarts += 1
            if ckpt:
                trial.checkpoint = ckpt
            self.scheduler.on_trial_add(trial.trial_id, cfg)
            self._launch(trial, config=cfg, checkpoint=ckpt)
            return
        trial.ended = self.clock()
        out = run.outcome
        if out is not None:
            if isinstance(out, tuple):
                trial.error, trial.error_text = _unpack_error(out)
            else:
                trial.error = out
                trial.error_text = "".join(traceback.format_exception(type(out), out, out.__traceback__))
                cause = getattr(out, "__cause__", None)
                if cause is not None and hasattr(cause, "tb"):
                    trial.error_text += "\n" + cause.tb
            trial.status = ERROR
            self.scheduler.on_trial_remove(trial.trial_id)
            self.searcher.on_trial_complete(trial.trial_id, trial.last_result or None, error=True)
        else:
            trial.status = STOPPED if run.stopping and run.stopping != "finished" else TERMINATED
            trial.stop_reason = run.stopping
            self.scheduler.on_trial_complete(trial.trial_id, trial.last_result or None)
            self.searcher.on_trial_complete(trial.trial_id, trial.last_result or None,
                                            pruned=run.stopping == "pruned")
        self.writer.put(trial)

    def _finish(self, poller):
        for r in list(self.active):
            if r.future is not None and not r.done:
                r.future.cancel()
        if self.hub is not None:
            self.hub.unregister(self.prefix)
        self.writer.close()
        self.view.close(self.trials, self.clock())
        if self.writer.errors:
            warnings.warn(f"tune could not write {len(self.writer.errors)} trial record(s) to {self.path}: "
                          f"{self.writer.errors[0]}", RuntimeWarning, stacklevel=3)

    def results(self) -> ResultGrid:
        return ResultGrid(sorted(self.trials, key=lambda t: getattr(t, "index", 0)), self.metric, self.mode, self.path)
