"""``DataParallelTrainer``: runs a training loop on ``num_workers`` members of one ``fabric.gang``.

The driver (``fit()``):
1. checks the inputs, picks the run's folder ``storage_path/name`` and writes its record
   ``fabric_run.json`` there (an unwritable path fails here, before any work);
2. fits the preprocessor on ``datasets["train"]`` (on the cluster) and applies it to every dataset,
   materialises them (so no lazy step needs a CPU the gang holds) and splits each in ``num_workers``;
3. starts a :class:`~fabric.ml._hub.Hub` and the gang; each member binds a session and runs the loop;
4. long-polls the hub for rank 0's reports while waiting on the members: each report updates the live
   line, the history and the kept checkpoints (``CheckpointConfig``), and the record;
5. if a member dies, restarts the whole gang from the latest checkpoint while
   ``FailureConfig.max_failures`` allows; a loop that raises fails the run at once.

A report is a barrier: every rank uploads its checkpoint files (if any) into
``checkpoint_00000N/``, then all ranks meet at the hub (an allgather that says who uploaded), then rank 0
pushes its metrics. Rerunning ``fit()`` with the same ``name`` and ``storage_path`` after the driver died
resumes from the record's latest checkpoint.

Subclasses (one file per framework) override ``_setup_worker(ctx)`` / ``_teardown_worker()`` to wire the
framework's own collective from the gang's addresses, and ``_loop()`` to supply the per-worker loop.
"""
from __future__ import annotations

import copy
import inspect
import json
import logging
import os
import re
import sys
import threading
import time
import uuid
from typing import Any, Callable

import fabric
from fabric import settings
from fabric.config import private_dir

from .. import checkpoint as ck
from ..checkpoint import Checkpoint
from ..config import RunConfig, ScalingConfig
from ..result import Result, TrainingFailedError
from ..session import Session, StopTraining, TrainContext, bind

log = logging.getLogger("fabric.ml")

RECORD = "fabric_run.json"
REPORT_TIMEOUT = settings.get().ml_report_timeout  # s a rank waits for the others
STOP_CHECK_EVERY = 0.1  # s between report_in_step's stop checks that ask the hub

__all__ = ["DataParallelTrainer", "TrainingFailedError", "load_result"]


# ---------------------------------------------------------------------- kept checkpoints (pure)
class CheckpointKeeper:
    """Which checkpoints to keep: the best ``num_to_keep`` by score (or the latest ones), plus
    always the latest. ``add`` returns the entries to delete. Entries are dicts with ``path``,
    ``index`` and ``metrics``."""

    def __init__(self, config, kept: list | None = None):
        self.config = config
        self.kept: list[dict] = list(kept or [])

    @property
    def latest(self) -> dict | None:
        return max(self.kept, key=lambda e: e["index"]) if self.kept else None

    def _score(self, e):
        attr = self.config.checkpoint_score_attribute
        v = e["metrics"].get(attr)
        worst = float("-inf") if self.config.checkpoint_score_order == "max" else float("inf")
        return worst if not isinstance(v, (int, float)) or v != v else v

    def add(self, entry: dict) -> list[dict]:
        self.kept = [e for e in self.kept if e["path"] != entry["path"]] + [entry]
        k = self.config.num_to_keep
        if k is None or len(self.kept) <= k:
            return []
        if self.config.checkpoint_score_attribute:
            ranked = sorted(self.kept, key=self._score, reverse=self.config.checkpoint_score_order == "max")
        else:
            ranked = sorted(self.kept, key=lambda e: -e["index"])
        keep = {id(e) for e in ranked[:k]} | {id(self.latest)}
        removed = [e for e in self.kept if id(e) not in keep]
        self.kept = [e for e in self.kept if id(e) in keep]
        return removed


# ---------------------------------------------------------------------- the run's record
def _read_record(run_dir: str, opts) -> dict | None:
    fs, root = ck.filesystem(run_dir, opts)
    path = f"{root.rstrip('/')}/{RECORD}"
    try:
        fs.invalidate_cache(root)
    except Exception:  # noqa: BLE001
        pass
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read().decode())
    except FileNotFoundError:
        return None
    except ValueError:
        log.warning("the run record %s is not valid JSON; starting the run afresh", path)
        return None


def _write_record(run_dir: str, opts, record: dict) -> None:
    fs, root = ck.filesystem(run_dir, opts)
    root = root.rstrip("/")
    data = json.dumps(record, default=str).encode()
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        private_dir(root)
        tmp = os.path.join(root, f".{RECORD}.{uuid.uuid4().hex[:8]}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, os.path.join(root, RECORD))
        return
    fs.makedirs(root, exist_ok=True)
    with fs.open(f"{root}/{RECORD}", "wb") as f:
        f.write(data)


def load_result(run_dir: str, storage_options: dict | None = None) -> Result:
    """The Result of the run stored in ``run_dir``, read from its record."""
    rec = _read_record(run_dir, storage_options)
    if rec is None:
        raise FileNotFoundError(f"no fabric run is recorded at {run_dir} (no {RECORD})")
    return _result_from(rec, run_dir, storage_options)


def _result_from(rec: dict, run_dir: str, opts, error=None) -> Result:
    kept = [(Checkpoint(e["path"], opts), e["metrics"]) for e in sorted(rec.get("checkpoints", []),
                                                                         key=lambda e: e["index"])]
    latest = rec.get("latest")
    history = rec.get("history", [])
    df = None
    try:
        import pandas as pd

        df = pd.DataFrame(history)
    except ImportError:
        pass
    return Result(metrics=history[-1] if history else None,
                  checkpoint=Checkpoint(latest, opts) if latest else None, error=error, path=run_dir,
                  metrics_dataframe=df, best_checkpoints=kept, config=rec.get("config"))


# ---------------------------------------------------------------------- live line
class _Live:
    """Rank 0's latest metrics as one live line (rich, on a terminal) or plain lines at most
    every 5 s (when stderr is not a terminal)."""

    def __init__(self, title: str, verbose: int):
        self.title, self.verbose = title, verbose
        self.live = None
        self.last_line = 0.0
        self.pending = None
        if verbose and sys.stderr.isatty():
            try:
                from rich.console import Console
                from rich.live import Live

                self.live = Live("", console=Console(stderr=True), refresh_per_second=8, transient=False)
                self.live.start()
            except ImportError:
                self.live = None

    def _text(self, m: dict) -> str:
        shown = []
        for k, v in m.items():
            if k in ("timestamp",):
                continue
            shown.append(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}")
            if len(shown) >= 8:
                break
        return f"{self.title}: " + " ".join(shown)

    def update(self, m: dict):
        if not self.verbose:
            return
        if self.live is not None:
            self.live.update(self._text(m))
            return
        now = time.monotonic()
        if now - self.last_line >= 5.0:
            print(self._text(m), file=sys.stderr, flush=True)
            self.last_line, self.pending = now, None
        else:
            self.pending = m

    def note(self, text: str):
        if self.verbose:
            (self.live.console.print if self.live is not None else
             (lambda t: print(t, file=sys.stderr, flush=True)))(f"{self.title}: {text}")

    def close(self):
        if self.live is not None:
            self.live.stop()
            self.live = None
        elif self.pending is not None and self.verbose:
            print(self._text(self.pending), file=sys.stderr, flush=True)
            self.pending = None


# ---------------------------------------------------------------------- in a member
class _GangReporter:
    """What ``ml.report`` does in a gang member: upload, allgather at the hub, rank 0 pushes."""

    def __init__(self, p: dict, ctx: TrainContext, trainer):
        self.p, self.ctx, self.trainer = p, ctx, trainer
        self.sink, self.key = p["sink"], p["key"]
        self.index = p["start_index"]
        self.step = 0
        self.asked = time.monotonic()  # when report_in_step last asked the hub whether the run was stopped

    def report(self, metrics: dict, checkpoint: Checkpoint | None):
        self.step += 1
        rank, ws = self.ctx.world_rank, self.ctx.world_size
        dest = ck.join(self.p["run_dir"], f"checkpoint_{self.index:06d}")
        uploaded = False
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                if rank == 0:
                    self._annotate(d)
                ck.upload_dir(d, dest, self.p["storage_options"])
            uploaded = True
        values, stopped = self.sink.allgather(self.key, rank, ws, self.step, uploaded, REPORT_TIMEOUT)
        path = None
        if any(values):
            path = dest
            self.index += 1
        if rank == 0:
            self.sink.push(self.key, {"metrics": metrics, "checkpoint": path, "iteration": self.step,
                                      "timestamp": time.time()})
        if ws == 1:
            stopped = self.sink.should_stop(self.key)
        if stopped:
            raise StopTraining()

    def report_in_step(self, metrics: dict) -> bool | None:
        """``session.report_in_step``: rank 0 pushes, no barrier. Returns whether rank 0 heard
        that the run was stopped (False on the others), or None when nothing can stop this run
        (no tune): then the ranks need not agree on a stop flag at all. The step still counts on
        every rank, so later barriers (checkpoints) meet at the same step."""
        self.step += 1
        stoppable = self.p.get("stoppable", True)
        stopped = False
        if self.ctx.world_rank == 0:
            if stoppable:
                # free: the result of an earlier push; and at most every 0.1 s a round trip, since
                # with rounds faster than a push's round trip no push may be done when looked at
                stopped = self.sink.should_stop(self.key)
                now = time.monotonic()
                if not stopped and now - self.asked >= STOP_CHECK_EVERY:
                    self.asked = now
                    stopped = self.sink.check_stop(self.key)
            self.sink.push(self.key, {"metrics": metrics, "checkpoint": None, "iteration": self.step,
                                      "timestamp": time.time()})
        return stopped if stoppable else None

    def _annotate(self, d: str):
        """Rank 0 adds the preprocessor and the framework's name to the checkpoint it saves."""
        pre = self.p.get("preprocessor")
        if pre is not None and not os.path.exists(os.path.join(d, ck.PREPROCESSOR_FILE)):
            ck.save_preprocessor(d, pre)
        meta_path = os.path.join(d, ck.METADATA_FILE)
        meta = {}
        if os.path.exists(meta_path):
            with open(meta_path) as f:
                meta = json.load(f)
        extra = {k: v for k, v in self.trainer._checkpoint_metadata().items() if k not in meta}
        if extra:
            meta.update(extra)
            with open(meta_path, "w") as f:
                json.dump(meta, f, indent=1, sort_keys=True)

    def finish(self):
        if self.ctx.world_rank == 0:
            self.sink.flush(self.key, REPORT_TIMEOUT)


def _run_member(trainer: "DataParallelTrainer", p: dict):
    """The function each gang member runs."""
    g = fabric.gang_context()
    ctx = TrainContext(world_rank=g.rank, world_size=g.world_size, local_rank=g.local_rank,
                       local_world_size=g.local_world_size, node_rank=0, experiment_name=p["name"],
                       trial_name=p.get("trial_name") or p["name"], trial_id=p.get("trial_id") or p["name"],
                       storage_path=p["storage_path"], trial_dir=p["run_dir"])
    shards = {name: parts[g.rank] for name, parts in p["shards"].items()}
    reporter = _GangReporter(p, ctx, trainer)
    sess = Session(context=ctx, reporter=reporter, checkpoint=p["checkpoint"], shards=shards)
    stopped = False
    with bind(sess):
        trainer._setup_worker(g)
        try:
            loop, config = trainer._loop(), p["config"]
            if _takes_config(loop):
                loop(config)
            else:
                loop()
        except StopTraining:
            stopped = True
        except BaseException as e:
            if g.world_size > 1 and _maybe_peer_failure(e):
                # a collective failing (gloo "connection closed", xgboost's socket error) is most often a peer
                # that died: give the cluster time to see that death, which then stops this gang as a whole
                # (a restartable failure) before this exception could pass for the loop's own error
                time.sleep(PEER_GRACE)
            raise
        finally:
            trainer._teardown_worker()
    reporter.finish()
    return {"rank": g.rank, "stopped": stopped, "iterations": sess.iteration}


PEER_GRACE = settings.get().ml_peer_grace


def _maybe_peer_failure(e: BaseException) -> bool:
    """Whether ``e`` may come from a collective whose peer died (then a member waits before raising)."""
    mod = type(e).__module__.split(".")[0]
    return isinstance(e, (RuntimeError, OSError, TimeoutError)) or mod in ("torch", "xgboost", "tensorflow")


def _takes_config(fn) -> bool:
    try:
        params = [q for q in inspect.signature(fn).parameters.values()
                  if q.kind in (q.POSITIONAL_ONLY, q.POSITIONAL_OR_KEYWORD, q.VAR_POSITIONAL)]
    except (TypeError, ValueError):
        return True
    return bool(params)


def _by_value(fn) -> None:
    """The user's loop travels by value when its module is the user's own (not installed), as
    ``@fabric.fn`` code does: workers need not import the test or script that defines it."""
    import sysconfig

    import cloudpickle

    name = getattr(fn, "__module__", None)
    if not name or name == "__main__" or name.split(".")[0] in ("fabric", "cloudpickle"):
        return
    mod = sys.modules.get(name)
    path = getattr(mod, "__file__", None)
    if path is None:
        return
    path = os.path.realpath(path)
    libs = [os.path.realpath(sysconfig.get_paths()[k]) for k in ("purelib", "platlib", "stdlib")]
    if "site-packages" in path or any(path.startswith(d + os.sep) for d in libs):
        return
    try:
        cloudpickle.register_pickle_by_value(mod)
    except (ValueError, TypeError):
        pass


# ---------------------------------------------------------------------- the trainer
class DataParallelTrainer:
    """Runs ``train_loop_per_worker(config)`` on ``scaling_config.num_workers`` gang members.

    Same arguments as Ray Train's ``DataParallelTrainer``. ``fit()`` returns a :class:`Result`
    or raises :class:`TrainingFailedError` (the loop raised: its exception is the cause; or
    workers died more often than ``FailureConfig.max_failures``); ``Unschedulable`` when the
    cluster can never hold the workers."""

    _framework: str | None = None        # names the files of its checkpoints ("torch", "xgboost", ...)
    _config_attr = "train_loop_config"   # what tune's overrides merge into
    # whether the gang's processes may serve the next fit() (fabric.gang's min_warm): only where
    # _teardown_worker leaves them clean (xgboost's collective, torch's process group); not for a
    # framework that cannot set its collective up twice in one process (TensorFlow)
    _warm_workers = False

    def __init__(self, train_loop_per_worker: Callable | None = None, *, train_loop_config: dict | None = None,
                 datasets: dict | None = None, scaling_config: ScalingConfig | None = None,
                 run_config: RunConfig | None = None, preprocessor=None,
                 resume_from_checkpoint: Checkpoint | None = None, metadata: dict | None = None,
                 dataset_config=None):
        name = type(self).__name__
        if train_loop_per_worker is not None and not callable(train_loop_per_worker):
            raise TypeError(f"{name}: train_loop_per_worker must be a function, "
                            f"got {type(train_loop_per_worker).__name__}")
        if train_loop_config is not None and not isinstance(train_loop_config, dict):
            raise TypeError(f"{name}: train_loop_config must be a dict, got {type(train_loop_config).__name__}")
        if scaling_config is None:
            scaling_config = ScalingConfig()
        if not isinstance(scaling_config, ScalingConfig):
            raise TypeError(f"{name}: scaling_config must be an ml.ScalingConfig, got {type(scaling_config).__name__}")
        if run_config is None:
            run_config = RunConfig()
        if not isinstance(run_config, RunConfig):
            raise TypeError(f"{name}: run_config must be an ml.RunConfig, got {type(run_config).__name__}")
        if resume_from_checkpoint is not None and not isinstance(resume_from_checkpoint, Checkpoint):
            raise TypeError(f"{name}: resume_from_checkpoint must be an ml.Checkpoint, "
                            f"got {type(resume_from_checkpoint).__name__}")
        if preprocessor is not None and not (hasattr(preprocessor, "fit") and hasattr(preprocessor, "transform")):
            raise TypeError(f"{name}: preprocessor must be an ml.preprocessing.Preprocessor, "
                            f"got {type(preprocessor).__name__}")
        self.train_loop_per_worker = train_loop_per_worker
        self.train_loop_config = dict(train_loop_config or {})
        self.datasets = self._check_datasets(datasets)
        self.scaling_config = scaling_config
        self.run_config = run_config
        self.preprocessor = preprocessor
        self.resume_from_checkpoint = resume_from_checkpoint
        self.metadata = dict(metadata or {})
        self.dataset_config = dataset_config

    def __repr__(self):
        return f"<{type(self).__name__} num_workers={self.scaling_config.num_workers}>"

    def _check_datasets(self, datasets) -> dict:
        name = type(self).__name__
        if datasets is None:
            return {}
        if not isinstance(datasets, dict):
            raise TypeError(f"{name}: datasets must be a dict of name -> ml.Dataset, e.g. "
                            f"{{'train': ml.from_pandas(df)}}; got {type(datasets).__name__}")
        from ..data import Dataset

        for k, ds in datasets.items():
            if not isinstance(k, str):
                raise TypeError(f"{name}: dataset names must be strings, got {k!r}")
            if not isinstance(ds, Dataset):
                hint = ""
                mod = type(ds).__module__.split(".")[0]
                if mod in ("pandas", "numpy", "pyarrow"):
                    hint = f" (wrap it: ml.from_{'arrow' if mod == 'pyarrow' else mod}(...))"
                raise TypeError(f"{name}: datasets[{k!r}] must be an ml.Dataset, got "
                                f"{type(ds).__module__}.{type(ds).__name__}{hint}")
        return dict(datasets)

    # ------------------------------------------------------------------ hooks for subclasses
    def _loop(self) -> Callable:
        """The function each worker runs (with the config as its argument, if it takes one)."""
        if self.train_loop_per_worker is None:
            raise TypeError(f"{type(self).__name__} needs a train_loop_per_worker")
        return self.train_loop_per_worker

    def _setup_worker(self, ctx) -> None:
        """In each member before the loop (ctx: ``fabric.GangContext``): set up the collective."""

    def _teardown_worker(self) -> None:
        """In each member after the loop, also when it raised."""

    def _validate(self) -> None:
        """In the driver before anything runs: check what only the framework knows (columns...)."""

    def _checkpoint_metadata(self) -> dict:
        """Added to every checkpoint's metadata unless the loop set those keys itself."""
        meta = dict(self.metadata)
        if self._framework:
            meta.setdefault("framework", self._framework)
        return meta

    def _config(self) -> dict:
        return self.train_loop_config

    # ------------------------------------------------------------------ running
    def fit(self) -> Result:
        """Train; returns the :class:`Result`, or raises ``TrainingFailedError`` (see the class)."""
        return self._fit(None, None, None, None, raise_errors=True)

    def _fit_for_tune(self, config_overrides: dict, on_report: Callable[[dict, Any], bool], trial_name: str,
                      storage_path: str) -> Result:
        """One tune trial: ``config_overrides`` merged into the config; ``on_report(metrics,
        checkpoint)`` returning True stops the run (cleanly). Errors land in ``Result.error``."""
        return self._fit(config_overrides, on_report, trial_name, storage_path, raise_errors=False)

    def _with_overrides(self, overrides: dict) -> "DataParallelTrainer":
        t = copy.copy(self)
        setattr(t, self._config_attr, {**getattr(self, self._config_attr), **(overrides or {})})
        return t

    def _fit(self, overrides, on_report, trial_name, storage_path, raise_errors: bool) -> Result:
        trainer = self._with_overrides(overrides) if overrides else self
        return _Run(trainer, on_report, trial_name, storage_path).go(raise_errors)


class _Run:
    """One ``fit()`` in the driver."""

    def __init__(self, trainer: DataParallelTrainer, on_report, trial_name, storage_path):
        self.t = trainer
        rc = trainer.run_config
        self.on_report = on_report
        self.name = trial_name or rc.name or (
            f"{type(trainer).__name__}_{time.strftime('%Y-%m-%d_%H-%M-%S')}_{uuid.uuid4().hex[:6]}")
        base = storage_path or rc.storage_path
        if base is None:
            from fabric import storage

            base = storage.default().url("ml")
        self.storage_path = base
        self.opts = rc.storage_options
        self.run_dir = ck.join(base, self.name)
        self.verbose = 0 if on_report is not None else rc.verbose
        self.history: list[dict] = []
        self.keeper = CheckpointKeeper(rc.checkpoint_config)
        self.next_index = 0
        self.latest: str | None = None
        self.record: dict = {}
        self.stopped = False   # on_report asked to stop: later reports are dropped

    # -------------------------------------------------------------- storage
    def _save(self, status: str):
        self.record.update({"name": self.name, "status": status, "trainer": type(self.t).__name__,
                            "next_index": self.next_index, "latest": self.latest,
                            "checkpoints": self.keeper.kept, "history": self.history,
                            "config": _jsonable(self.t._config())})
        _write_record(self.run_dir, self.opts, self.record)

    def _open_run(self) -> Checkpoint | None:
        """Read an earlier record of this run (resume), or start one; the first write proves the
        storage path is writable."""
        try:
            rec = _read_record(self.run_dir, self.opts)
        except Exception as e:  # noqa: BLE001
            rec = None
            first = e
        else:
            first = None
        resume = None
        if rec and rec.get("status") != "finished":
            self.history = list(rec.get("history", []))
            self.keeper.kept = list(rec.get("checkpoints", []))
            self.next_index = int(rec.get("next_index", 0))
            self.latest = rec.get("latest")
            if self.latest:
                resume = Checkpoint(self.latest, self.opts)
        elif rec:  # a finished run of the same name: a new run, numbering its checkpoints after the old
            self.next_index = int(rec.get("next_index", 0))
        try:
            self._save("running")
        except Exception as e:  # noqa: BLE001
            from fabric.storage import StorageError, redact

            cause = first or e
            raise StorageError(f"{type(self.t).__name__}: cannot write the run's folder {redact(self.run_dir)} "
                               f"(RunConfig.storage_path={redact(self.storage_path)!r}): "
                               f"{type(cause).__name__}: {cause}") from e
        return resume

    # -------------------------------------------------------------- data
    def _prepare_data(self, resume: Checkpoint | None):
        t = self.t
        pre = t.preprocessor
        if resume is not None and pre is not None:
            saved = ck.load_preprocessor(resume)
            if saved is not None:
                pre = saved
        datasets = dict(t.datasets)
        if pre is not None:
            if "train" not in datasets:
                raise ValueError(f"{type(t).__name__}: a preprocessor is fitted on datasets['train'], and there is "
                                 f"no 'train' dataset (datasets: {', '.join(datasets) or 'none'})")
            if not getattr(pre, "fitted", False):
                pre = pre.fit(datasets["train"]) or pre
            datasets = {k: pre.transform(ds) for k, ds in datasets.items()}
        n = t.scaling_config.num_workers
        shards = {}
        for k, ds in datasets.items():
            ds = ds.materialize()
            shards[k] = ds.split(n, equal=True) if n > 1 else [ds]
        return pre, datasets, shards

    # -------------------------------------------------------------- the run
    def go(self, raise_errors: bool) -> Result:
        t = self.t
        error = None
        live = None
        try:
            t._validate()
            resume = self._open_run() or t.resume_from_checkpoint
            pre, datasets, shards = self._prepare_data(resume)
            live = _Live(self.name, self.verbose)
            if resume is not None and self.latest:
                live.note(f"resuming from {resume.path}")
            self._train(pre, shards, resume, live)
            status = "finished"
        except BaseException as e:  # noqa: BLE001
            error, status = e, "failed"
        finally:
            if live is not None:
                live.close()
        if self.record:
            try:
                self._save(status)
            except Exception:  # noqa: BLE001 - the error below says more
                if error is None:
                    raise
        result = _result_from(self.record or {}, self.run_dir, self.opts, error) if self.record else Result(
            error=error, path=self.run_dir)
        if error is not None:
            if isinstance(error, TrainingFailedError) and error.result is None:
                error.result = result
            if raise_errors or isinstance(error, (KeyboardInterrupt, SystemExit)):
                raise error
        return result

    def _train(self, pre, shards, resume, live):
        t = self.t
        sc, fc = t.scaling_config, t.run_config.failure_config
        shipped = copy.copy(t)
        shipped.datasets, shipped.preprocessor, shipped.resume_from_checkpoint = {}, None, None
        loop = getattr(t, "train_loop_per_worker", None)
        if loop is not None:
            _by_value(loop)
        from .._hub import Hub

        hub = Hub.shared()
        sink = hub.sink()
        run_id = uuid.uuid4().hex[:12]
        # min_warm: the next fit() of this shape starts at once in these workers, the framework imported
        warm = {"min_warm": sc.num_workers} if t._warm_workers else {}
        gang = fabric.gang(sc.num_workers, name=f"{type(t).__name__}:{self.name}", **warm, **sc.gang_options())
        failures, attempt = 0, 0
        checkpoint = resume
        try:
            while True:
                key = f"{run_id}/{attempt}"
                payload = {"key": key, "sink": sink, "shards": shards, "checkpoint": checkpoint,
                           "start_index": self.next_index, "run_dir": self.run_dir, "storage_options": self.opts,
                           "storage_path": self.storage_path, "name": self.name, "config": t._config(),
                           "preprocessor": pre, "trial_name": self.name, "trial_id": run_id,
                           "stoppable": self.on_report is not None}
                futs = gang.run(_run_member, shipped, payload)
                try:
                    self._watch(futs, hub, key, live)
                except BaseException:  # Ctrl-C, a failing on_report...: the members must not run on
                    if not all(f.done() for f in futs):
                        futs[0].cancel()  # cancelling one member cancels the gang
                    raise
                died = self._outcome(futs)
                if died is None:
                    return
                rank, cause = died
                failures += 1
                if fc.max_failures != -1 and failures > fc.max_failures:
                    raise TrainingFailedError(
                        f"{type(t).__name__}: worker rank {rank} died ({cause}); FailureConfig(max_failures="
                        f"{fc.max_failures}) allows {fc.max_failures} restart(s), and all were used",
                        rank=rank) from cause
                checkpoint = Checkpoint(self.latest, self.opts) if self.latest else resume
                where = f"from {checkpoint.path}" if checkpoint is not None else "from the start (no checkpoint yet)"
                live.note(f"worker rank {rank} died ({cause}); restarting all {sc.num_workers} workers {where} "
                          f"(failure {failures} of {'unlimited' if fc.max_failures == -1 else fc.max_failures})")
                log.warning("%s: worker rank %s died; restarting %s", self.name, rank, where)
                attempt += 1
        finally:
            hub.forget(run_id + "/")

    def _watch(self, futs, hub, key, live):
        """Handle rank 0's reports until every member is done."""
        pending = list(futs)
        prefix = key.rpartition("/")[0] + "/"  # this run's keys only: the hub is shared
        poll = hub.poll_async(30.0, prefix)
        while pending:
            fabric.wait([poll] + pending, num_returns=1)
            if poll.done():
                items = poll.result()
                poll = hub.poll_async(30.0, prefix)
                self._handle(items, hub, key, live)
            pending = [f for f in pending if not f.done()]
        if not poll.done():
            hub.kick()
        self._handle(poll.result(), hub, key, live)  # what came with the end (members flushed first)
        self._handle(hub.poll(0, prefix), hub, key, live)

    def _handle(self, items, hub, key, live):
        for k, item in items:
            if k != key:
                continue  # a late push of an earlier attempt
            if self.stopped:  # reports made before the members saw the stop: not part of the run
                if item.get("checkpoint"):
                    ck.remove(item["checkpoint"], self.opts)
                continue
            m = dict(item["metrics"])
            m.setdefault("training_iteration", len(self.history) + 1)
            m.setdefault("timestamp", item["timestamp"])
            self.history.append(m)
            ckpt = None
            if item.get("checkpoint"):
                path = item["checkpoint"]
                idx = int(re.search(r"checkpoint_(\d+)$", path).group(1))
                self.next_index = max(self.next_index, idx + 1)
                self.latest = path
                for gone in self.keeper.add({"path": path, "index": idx, "metrics": m}):
                    try:
                        ck.remove(gone["path"], self.opts)
                    except Exception as e:  # noqa: BLE001 - a stale checkpoint left behind is no failure
                        log.warning("could not delete checkpoint %s: %s", gone["path"], e)
                self._save("running")
                ckpt = Checkpoint(path, self.opts)
            live.update(m)
            if self.on_report is not None and self.on_report(m, ckpt):
                self.stopped = True
                hub.stop(key)

    def _outcome(self, futs):
        """None if the gang succeeded; (rank, cause) if a member died; raises for other failures."""
        t = self.t
        errors = []
        for rank, f in enumerate(futs):
            e = f.exception()
            if e is not None:
                errors.append((rank, e))
        if not errors:
            return None
        for rank, e in errors:
            if isinstance(e, fabric.Unschedulable):
                sc = t.scaling_config
                raise fabric.Unschedulable(
                    f"{type(t).__name__}: ScalingConfig(num_workers={sc.num_workers}) with "
                    f"{sc.gang_options()} per worker cannot run on this cluster: {e}") from None
            if isinstance(e, fabric.Cancelled):
                raise e
        died = [(r, e) for r, e in errors if isinstance(e, fabric.FabricError) and " died" in str(e)]
        user = [(r, e) for r, e in errors if not isinstance(e, fabric.FabricError)]
        if user and not died:
            rank, e = user[0]
            raise TrainingFailedError(
                f"{type(t).__name__}: the training loop raised on rank {rank} of {len(futs)}: "
                f"{type(e).__name__}: {e}", rank=rank) from e
        rank, e = (died or errors)[0]
        m = re.search(r"rank (\d+) of \d+ died", str(e))
        if m:
            rank = int(m.group(1))
        return rank, e


def _jsonable(d):
    try:
        json.dumps(d)
        return d
    except (TypeError, ValueError):
        return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)) for k, v in d.items()}
