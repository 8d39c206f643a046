"""``XGBoostTrainer``: distributed XGBoost on a gang, over xgboost's own collective.

Rank 0 starts a ``RabitTracker`` on its gang host (a port the OS picks, handed to the others
through the hub); every member joins it through
``xgboost.collective.CommunicatorContext`` (its task id is its rank, so ranks match the
gang's), loads its shard into a ``QuantileDMatrix`` (``hist``) or ``DMatrix`` with ``nthread`` =
its CPUs, and trains; xgboost all-reduces the histograms, so every member ends with the same
booster. The evaluation metrics of every named dataset are reported each round
(``"train-logloss"``, ``"valid-logloss"``...), and rank 0 checkpoints the booster as
``model.ubj`` every ``CheckpointConfig.checkpoint_frequency`` rounds and at the end. A round
without a checkpoint reports without ``report``'s barrier (``session.report_in_step``: rank 0
pushes its metrics, which xgboost's all-reduce makes the same on every rank): the collective
already holds the ranks in step, and the hub round trip it saves each round cost ~6% of a warm
fit (loadtests/bench_ml_xgb_floor.py).

Two forms, as in Ray: the AIR form ``XGBoostTrainer(params=, label_column=, num_boost_round=,
datasets=)``, and ``XGBoostTrainer(train_loop_per_worker, train_loop_config=...)`` (Ray 2.60) whose
loop calls ``xgboost.train`` itself, inside the collective, with ``ReportCallback`` to report.
"""
from __future__ import annotations

import os

from .. import session
from .._deps import need
from ..checkpoint import Checkpoint
from .base import DataParallelTrainer

__all__ = ["XGBoostTrainer", "ReportCallback", "load_model"]

MODEL_FILE = "model.ubj"


def _xgb():
    return need("xgboost", "ml", "XGBoostTrainer")


def load_model(checkpoint: Checkpoint):
    """The ``xgboost.Booster`` saved in ``checkpoint``."""
    xgb = _xgb()
    booster = xgb.Booster()
    with checkpoint.as_directory() as d:
        path = os.path.join(d, MODEL_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{checkpoint!r} holds no {MODEL_FILE}: it is not an XGBoost checkpoint "
                                    f"(metadata: {checkpoint.get_metadata()})")
        booster.load_model(path)
    return booster


def _save(booster, label_column, feature_columns, extra=None) -> Checkpoint:
    d = session.checkpoint_dir("fabric-xgb-")
    booster.save_model(os.path.join(d, MODEL_FILE))
    ckpt = Checkpoint.from_directory(d)
    meta = {"framework": "xgboost", "num_boosted_rounds": booster.num_boosted_rounds()}
    if label_column:
        meta["label_column"] = label_column
    if feature_columns:
        meta["feature_columns"] = list(feature_columns)
    ckpt.set_metadata({**meta, **(extra or {})})
    return ckpt


def _make_callback_class():
    xgb = _xgb()

    class ReportCallbackImpl(xgb.callback.TrainingCallback):
        """Reports the evaluation metrics after every round (``"<dataset>-<metric>"``) and
        checkpoints the booster every ``frequency`` rounds (0: only at the end), from rank 0."""

        def __init__(self, frequency: int = 0, checkpoint_at_end: bool = True, label_column=None,
                     feature_columns=None, metrics=None, num_boost_round=None):
            super().__init__()
            self.frequency, self.at_end = int(frequency or 0), checkpoint_at_end
            self.final = num_boost_round
            self.last_metrics = {}
            self.label_column, self.feature_columns = label_column, feature_columns
            self.metrics = metrics
            self.last_saved = None

        def _metrics(self, evals_log):
            out = {}
            for data, ms in evals_log.items():
                for name, values in ms.items():
                    v = values[-1]
                    out[f"{data}-{name}"] = float(v[0] if isinstance(v, tuple) else v)
            if self.metrics is not None:  # a subset, maybe renamed: {"loss": "train-logloss"} or a list
                items = self.metrics.items() if isinstance(self.metrics, dict) else ((m, m) for m in self.metrics)
                out = {k: out[v] for k, v in items if v in out}
            return out

        def _checkpoint(self, model):
            if session.get_context().get_world_rank() != 0:
                return None
            return _save(model, self.label_column, self.feature_columns)

        def after_iteration(self, model, epoch, evals_log):
            rounds = model.num_boosted_rounds()
            self.last_metrics = self._metrics(evals_log)
            if (self.frequency and rounds % self.frequency == 0) or (self.at_end and rounds == self.final):
                # every rank decides alike (same round count): all meet in report's barrier
                self.last_saved = rounds
                session.report(self.last_metrics, checkpoint=self._checkpoint(model))
            else:
                self._report_round(self.last_metrics)
            return False

        def _report_round(self, metrics):
            # no barrier: xgboost's all-reduces already keep the ranks in the same round
            session.report_in_step(metrics, any_rank=_any_rank)

        def after_training(self, model):
            rounds = model.num_boosted_rounds()
            if self.at_end and self.last_saved != rounds:
                # the final model, with the last round's metrics again (the loop did not say
                # how many rounds it would run, so the last report could not carry it)
                self.last_saved = rounds
                session.report(self.last_metrics or {"num_boosted_rounds": rounds},
                               checkpoint=self._checkpoint(model))
            return model

    return ReportCallbackImpl


def _any_rank(flag: bool) -> bool:
    """``flag`` OR-ed over xgboost's collective (a one-int all-reduce), or as is outside one."""
    from xgboost import collective

    if not collective.is_distributed():
        return bool(flag)
    import numpy as np

    return bool(collective.allreduce(np.array([int(bool(flag))], dtype=np.int32), collective.Op.MAX)[0])


class _LazyCallback:
    """``ReportCallback(...)`` builds xgboost's callback class on first use (xgboost is imported
    only then)."""

    _cls = None

    def __call__(self, *args, **kwargs):
        if _LazyCallback._cls is None:
            _LazyCallback._cls = _make_callback_class()
        return _LazyCallback._cls(*args, **kwargs)


ReportCallback = _LazyCallback()


def _numeric(table, columns) -> bool:
    import pyarrow as pa

    t = pa.types
    return all(t.is_integer(f.type) or t.is_floating(f.type) or t.is_boolean(f.type)
               for f in (table.schema.field(c) for c in columns))


def _matrices(xgb, tables: dict, label: str, nthread: int, use_quantile: bool, dm_kwargs: dict):
    """``[(DMatrix, name)]`` of every shard, ``"train"`` first (the others reference its bins),
    and the feature names. Numeric columns go Arrow -> one float32 array -> DMatrix, with no
    pandas frame in between; anything else (strings, categoricals) goes through pandas, which
    xgboost reads with its own dtype handling."""
    import numpy as np
    import pyarrow as pa

    train = tables["train"]
    features = [c for c in train.column_names if c != label]
    out, ref = [], None
    for name in ["train"] + [n for n in tables if n != "train"]:
        t = tables[name]
        kw = dict(dm_kwargs) if name == "train" else {}
        if _numeric(t, features + [label]):
            x = np.empty((t.num_rows, len(features)), dtype=np.float32)
            for j, c in enumerate(features):  # nulls become NaN: xgboost's missing value
                x[:, j] = t.column(c).cast(pa.float32(), safe=False).to_numpy()
            data, y = x, t.column(label).to_numpy()
            kw.setdefault("feature_names", features)
        else:
            df = t.to_pandas()
            data, y = df[features], df[label]
        if use_quantile:
            d = xgb.QuantileDMatrix(data, label=y, nthread=nthread, ref=ref, **kw)
        else:
            d = xgb.DMatrix(data, label=y, nthread=nthread, **kw)
        if ref is None:
            ref = d
        out.append((d, name))
        del data, y
    return out, features


def _default_loop(config: dict):
    """The AIR form's loop: each rank trains on its shards of every named dataset."""
    xgb = _xgb()
    params = dict(config["params"])
    label = config["label_column"]
    nthread = config["nthread"]
    params.setdefault("nthread", nthread)
    ctx = session.get_context()
    shards = session.current().shards
    if "train" not in shards:
        raise ValueError("XGBoostTrainer needs datasets['train']")
    use_quantile = params.get("tree_method", "hist") in ("hist", "approx", "gpu_hist") and \
        hasattr(xgb, "QuantileDMatrix")
    dm_kwargs = dict(config.get("dmatrix_params", {}).get("train", {}))
    evals, features = _matrices(xgb, {name: ds.to_arrow() for name, ds in shards.items()}, label, nthread,
                                use_quantile, dm_kwargs)
    dtrain = evals[0][0]
    booster = None
    done_rounds = 0
    resume = session.get_checkpoint()
    if resume is not None and resume.get_metadata().get("framework") == "xgboost":
        booster = load_model(resume)
        done_rounds = booster.num_boosted_rounds()
    remaining = max(0, config["num_boost_round"] - done_rounds)
    cb = ReportCallback(frequency=config["checkpoint_frequency"], checkpoint_at_end=config["checkpoint_at_end"],
                        label_column=label, feature_columns=features, num_boost_round=config["num_boost_round"])
    booster = xgb.train(params, dtrain, num_boost_round=remaining, evals=evals, xgb_model=booster,
                        callbacks=[cb], verbose_eval=False)
    if remaining == 0 and ctx.get_world_rank() == 0:
        session.report({"num_boosted_rounds": booster.num_boosted_rounds()},
                       checkpoint=_save(booster, label, features))


class XGBoostTrainer(DataParallelTrainer):
    """``XGBoostTrainer(params=..., label_column=..., num_boost_round=..., datasets=...)``, or with
    ``train_loop_per_worker=``. Everything else as for every trainer (scaling, run config,
    preprocessor); ``result.checkpoint`` holds ``model.ubj`` (``XGBoostTrainer.get_model(ckpt)``)."""

    _framework = "xgboost"
    _warm_workers = True

    def __init__(self, train_loop_per_worker=None, *, train_loop_config=None, params: dict | None = None,
                 label_column: str | None = None, num_boost_round: int = 10, dmatrix_params: dict | None = None,
                 xgboost_config=None, **kwargs):
        _xgb()
        super().__init__(train_loop_per_worker, train_loop_config=train_loop_config, **kwargs)
        if train_loop_per_worker is None:
            if params is not None and not isinstance(params, dict):
                raise TypeError(f"XGBoostTrainer: params must be a dict of xgboost parameters, "
                                f"got {type(params).__name__}")
            if not isinstance(label_column, str) or not label_column:
                raise ValueError("XGBoostTrainer: label_column must name the label column of the datasets")
            if isinstance(num_boost_round, bool) or not isinstance(num_boost_round, int) or num_boost_round < 0:
                raise ValueError(f"XGBoostTrainer: num_boost_round must be a whole number >= 0, "
                                 f"got {num_boost_round!r}")
            if "train" not in self.datasets:
                raise ValueError(f"XGBoostTrainer: datasets must hold a 'train' Dataset "
                                 f"(got {', '.join(self.datasets) or 'none'})")
        self.params = dict(params or {})
        self.label_column = label_column
        self.num_boost_round = num_boost_round
        self.dmatrix_params = dict(dmatrix_params or {})
        if self.train_loop_per_worker is None:
            self._config_attr = "params"
        self._tracker = None
        self._comm = None

    @staticmethod
    def get_model(checkpoint: Checkpoint):
        """The booster of an XGBoost checkpoint (as Ray's ``XGBoostTrainer.get_model``)."""
        return load_model(checkpoint)

    def _validate(self):
        if self.train_loop_per_worker is not None:
            return
        for name, ds in self.datasets.items():
            cols = ds.columns()
            if self.label_column not in cols:
                raise ValueError(f"XGBoostTrainer: label_column {self.label_column!r} is not a column of "
                                 f"datasets[{name!r}] (its columns: {', '.join(map(str, cols))})")

    def _loop(self):
        return self.train_loop_per_worker or _default_loop

    def _config(self) -> dict:
        if self.train_loop_per_worker is not None:
            return self.train_loop_config
        cc = self.run_config.checkpoint_config
        return {"params": self.params, "label_column": self.label_column, "num_boost_round": self.num_boost_round,
                "nthread": max(1, int(self.scaling_config.num_cpus_per_worker)),
                "checkpoint_frequency": cc.checkpoint_frequency,
                "checkpoint_at_end": True if cc.checkpoint_at_end is None else cc.checkpoint_at_end,
                "dmatrix_params": self.dmatrix_params}

    def _checkpoint_metadata(self) -> dict:
        meta = super()._checkpoint_metadata()
        if self.label_column:
            meta.setdefault("label_column", self.label_column)
        return meta

    # ------------------------------------------------------------------ the collective
    def _setup_worker(self, ctx) -> None:
        xgb = _xgb()
        from xgboost import collective

        if ctx.world_size == 1:
            return
        host, port = ctx.master_addr, None
        if ctx.rank == 0:
            from xgboost.tracker import RabitTracker

            # a port of the OS's choosing, not the gang's: a warm worker's gang port may still be in
            # TIME_WAIT from its previous gang's tracker, and xgboost's tracker binds without SO_REUSEADDR
            self._tracker = RabitTracker(n_workers=ctx.world_size, host_ip=host, port=0, sortby="task",
                                         timeout=600)
            self._tracker.start()
            port = int(self._tracker.worker_args()["dmlc_tracker_port"])
        sess = session.current()
        # every rank learns the port once rank 0's tracker listens (the hub's allgather: no probe connections)
        p = sess.reporter.p
        port = p["sink"].allgather(p["key"], ctx.rank, ctx.world_size, "xgboost-tracker", port, 600)[0][0]
        self._comm = collective.CommunicatorContext(dmlc_communicator="rabit", dmlc_tracker_uri=host,
                                                    dmlc_tracker_port=port, dmlc_task_id=str(ctx.rank),
                                                    dmlc_timeout=600)
        import contextlib
        import io

        # xgboost prints "Task 1 got rank 1" through Python's print, whatever its verbosity: not to the driver
        with contextlib.redirect_stdout(io.StringIO()):
            self._comm.__enter__()
        del xgb

    def _teardown_worker(self) -> None:
        comm, self._comm = self._comm, None
        if comm is not None:
            comm.__exit__(None, None, None)
        tracker, self._tracker = self._tracker, None
        if tracker is not None:
            try:
                tracker.wait_for(60)
            except Exception:  # noqa: BLE001 - the training's own outcome says what happened
                pass
