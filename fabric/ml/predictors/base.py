"""``Predictor``: a model loaded from a checkpoint, with the checkpoint's preprocessor, applied to
pandas or numpy batches (Ray AIR's ``Predictor``).

``predict(DataFrame)`` returns a DataFrame with a ``predictions`` column (a column of vectors for
multi-output models); ``predict(ndarray or dict of arrays)`` returns ``{"predictions": ndarray}``.
The preprocessor is applied to DataFrames (it works on named columns); a numpy matrix is taken as
already-prepared features unless the checkpoint names its ``feature_columns``, which then label
the matrix's columns so the preprocessor can run.

A framework subclass implements ``from_checkpoint`` and ``_predict_numpy(features: ndarray)``
(and may override ``_predict_pandas``).
"""
from __future__ import annotations

import numpy as np

from .._deps import need

__all__ = ["Predictor", "features_matrix"]


def features_matrix(df, columns) -> np.ndarray:
    """A float32 matrix of ``columns`` of ``df``; a column of vectors (``Concatenator``) is expanded.
    A non-numeric column is a ``TypeError`` that names it."""
    parts = []
    for c in columns:
        col = df[c]
        values = col.to_numpy()
        if values.dtype == object and len(values) and isinstance(values[0], (list, tuple, np.ndarray)):
            parts.append(np.stack([np.asarray(v, dtype=np.float32) for v in values]))
            continue
        if values.dtype.kind not in "fiub":
            raise TypeError(f"feature column {c!r} must be numeric, got {col.dtype} values such as "
                            f"{values[:1].tolist()}")
        parts.append(values.astype(np.float32, copy=False).reshape(len(values), -1))
    if not parts:
        return np.zeros((len(df), 0), dtype=np.float32)
    return np.ascontiguousarray(np.concatenate(parts, axis=1), dtype=np.float32)


class Predictor:
    """Base of the framework predictors: ``Cls.from_checkpoint(ckpt, **kw).predict(batch)``."""

    def __init__(self, preprocessor=None, *, metadata: dict | None = None):
        self.preprocessor = preprocessor
        self.metadata = dict(metadata or {})
        self.label_column = self.metadata.get("label_column")
        self.feature_columns = self.metadata.get("feature_columns")

    @classmethod
    def from_checkpoint(cls, checkpoint, **kwargs) -> "Predictor":
        raise NotImplementedError(f"{cls.__name__}.from_checkpoint")

    @staticmethod
    def _checkpoint(checkpoint, framework: str | tuple):
        """``checkpoint`` as a Checkpoint of ``framework`` (a clear error for the wrong kind)."""
        from ..checkpoint import Checkpoint

        if not isinstance(checkpoint, Checkpoint):
            if isinstance(checkpoint, str) or hasattr(checkpoint, "__fspath__"):
                checkpoint = Checkpoint.from_directory(checkpoint)
            else:
                raise TypeError(f"from_checkpoint takes an ml.Checkpoint (or its path), got {type(checkpoint).__name__}")
        meta = checkpoint.get_metadata()
        fw = meta.get("framework")
        allowed = (framework,) if isinstance(framework, str) else framework
        if fw is not None and fw not in allowed:
            raise ValueError(f"{checkpoint!r} is a {fw!r} checkpoint, not a {' or '.join(map(repr, allowed))} one")
        return checkpoint, meta

    def get_preprocessor(self):
        return self.preprocessor

    def set_preprocessor(self, preprocessor) -> None:
        self.preprocessor = preprocessor

    def __repr__(self):
        return f"{type(self).__name__}(preprocessor={self.preprocessor!r})"

    # ------------------------------------------------------------------ predict
    def predict(self, data, **kwargs):
        """Predictions for a pandas DataFrame (-> DataFrame) or a numpy matrix / dict of arrays
        (-> ``{"predictions": ndarray}``)."""
        pd = need("pandas", "ml")
        if isinstance(data, pd.DataFrame):
            return self._predict_pandas(self._prepare(data), **kwargs)
        if isinstance(data, dict):
            df = pd.DataFrame({k: (list(v) if np.ndim(v) > 1 else v) for k, v in data.items()})
            out = self._predict_pandas(self._prepare(df), **kwargs)
            return {c: _column_array(out[c]) for c in out.columns}
        if isinstance(data, np.ndarray):
            if self.preprocessor is not None and self.feature_columns and data.ndim == 2 \
                    and data.shape[1] == len(self.feature_columns):
                df = pd.DataFrame(data, columns=self.feature_columns)
                out = self._predict_pandas(self._prepare(df), **kwargs)
                return {c: _column_array(out[c]) for c in out.columns}
            return {"predictions": np.asarray(self._predict_numpy(data, **kwargs))}
        raise TypeError(f"{type(self).__name__}.predict() takes a pandas DataFrame, a numpy array or a dict of "
                        f"arrays, got {type(data).__name__}")

    def _prepare(self, df):
        if self.preprocessor is not None:
            df = self.preprocessor.transform_batch(df)
        return df

    def _feature_names(self, df) -> list:
        """The model's input columns in ``df``: the checkpoint's ``feature_columns`` when they are
        all there (after the preprocessor they may have been packed), else every column but the label."""
        cols = self.feature_columns
        if cols and all(c in df.columns for c in cols):
            return list(cols)
        return [c for c in df.columns if c != self.label_column]

    def _predict_pandas(self, df, **kwargs):
        pd = need("pandas", "ml")
        x = features_matrix(df, self._feature_names(df))
        y = np.asarray(self._predict_numpy(x, **kwargs))
        return pd.DataFrame({"predictions": list(y) if y.ndim > 1 else y}, index=df.index)

    def _predict_numpy(self, x: np.ndarray, **kwargs):
        raise NotImplementedError(f"{type(self).__name__}._predict_numpy")


def _column_array(col) -> np.ndarray:
    v = col.to_numpy()
    if v.dtype == object and len(v) and isinstance(v[0], (list, tuple, np.ndarray)):
        return np.stack([np.asarray(e) for e in v])
    return v
