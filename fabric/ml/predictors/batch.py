"""``BatchPredictor``: a predictor over a whole Dataset, in warm ``@fabric.cls`` instances.

``BatchPredictor.from_checkpoint(ckpt, XGBoostPredictor).predict(ds, batch_size=4096)`` is a lazy
``ds.map_batches`` with a class: each instance loads the predictor once (``from_checkpoint`` in
its ``__init__``) and scores the batches it is given; blocks never pass through the driver. Any
``Predictor`` class works (``OnnxPredictor`` too): it needs ``from_checkpoint(ckpt, **kw)`` and
``predict(DataFrame) -> DataFrame``.
"""
from __future__ import annotations

__all__ = ["BatchPredictor"]


class _Scorer:
    """The class ``map_batches`` runs: one predictor per warm instance."""

    def __init__(self, checkpoint, predictor_cls, predictor_kwargs, feature_columns, keep_columns, predict_kwargs):
        self.predictor = predictor_cls.from_checkpoint(checkpoint, **predictor_kwargs)
        self.feature_columns, self.keep_columns = feature_columns, keep_columns
        self.predict_kwargs = predict_kwargs

    def __call__(self, df):
        x = df[self.feature_columns] if self.feature_columns else df
        out = self.predictor.predict(x, **self.predict_kwargs)
        if isinstance(out, dict):
            import pandas as pd

            out = pd.DataFrame({k: (list(v) if getattr(v, "ndim", 1) > 1 else v) for k, v in out.items()})
        out = out.reset_index(drop=True)
        for c in self.keep_columns or ():
            out[c] = df[c].to_numpy()
        return out


class BatchPredictor:
    """Ray AIR's ``BatchPredictor``: ``from_checkpoint(ckpt, PredictorCls, **kw)``, then
    ``predict(ds, ...)`` -> a Dataset of predictions (lazy, like every Dataset operation)."""

    def __init__(self, checkpoint, predictor_cls, **predictor_kwargs):
        from ..checkpoint import Checkpoint

        if not isinstance(checkpoint, Checkpoint):
            raise TypeError(f"BatchPredictor needs an ml.Checkpoint, got {type(checkpoint).__name__}")
        if not isinstance(predictor_cls, type) or not hasattr(predictor_cls, "from_checkpoint"):
            raise TypeError(f"BatchPredictor needs a Predictor class (e.g. ml.XGBoostPredictor), got {predictor_cls!r}")
        self.checkpoint, self.predictor_cls, self.predictor_kwargs = checkpoint, predictor_cls, predictor_kwargs

    @classmethod
    def from_checkpoint(cls, checkpoint, predictor_cls, **predictor_kwargs) -> "BatchPredictor":
        return cls(checkpoint, predictor_cls, **predictor_kwargs)

    def __repr__(self):
        return f"BatchPredictor({self.checkpoint!r}, {self.predictor_cls.__name__})"

    def predict(self, data, *, feature_columns: list | None = None, keep_columns: list | None = None,
                batch_size: int = 4096, min_scoring_workers: int = 1, max_scoring_workers: int | None = None,
                num_cpus_per_worker: float = 1, num_gpus_per_worker: float = 0, concurrency: int | None = None,
                **predict_kwargs):
        """Score every row of the Dataset ``data``; returns a Dataset with the predictor's output
        columns (``predictions``...) and ``keep_columns`` of the input. ``concurrency`` (or
        ``max_scoring_workers``) warm instances score the blocks, ``batch_size`` rows at a time."""
        from ..data import Dataset

        if not isinstance(data, Dataset):
            raise TypeError(f"BatchPredictor.predict() takes an ml.Dataset, got {type(data).__name__} "
                            f"(for a single batch use the predictor's predict())")
        have = data.columns()
        for name, cols in (("feature_columns", feature_columns), ("keep_columns", keep_columns)):
            missing = [c for c in cols or () if c not in have]
            if missing:
                raise ValueError(f"BatchPredictor.predict(): {name} {missing} are not columns of the Dataset "
                                 f"(its columns: {have})")
        n = concurrency or max_scoring_workers or min_scoring_workers
        return data.map_batches(
            _Scorer, batch_size=batch_size, batch_format="pandas", concurrency=n, cpus=num_cpus_per_worker,
            gpus=num_gpus_per_worker,
            fn_constructor_kwargs={"checkpoint": self.checkpoint, "predictor_cls": self.predictor_cls,
                                   "predictor_kwargs": self.predictor_kwargs, "feature_columns": feature_columns,
                                   "keep_columns": keep_columns, "predict_kwargs": predict_kwargs})
