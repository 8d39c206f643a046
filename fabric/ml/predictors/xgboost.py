"""``XGBoostPredictor``: an XGBoost checkpoint's booster (``model.ubj``) and preprocessor."""
from __future__ import annotations

import numpy as np

from .._deps import need
from .base import Predictor

__all__ = ["XGBoostPredictor"]


class XGBoostPredictor(Predictor):
    """``XGBoostPredictor.from_checkpoint(ckpt).predict(df)``: the DataFrame's feature columns (the
    checkpoint's ``feature_columns``, else all but the label) go to the booster by name."""

    def __init__(self, model, preprocessor=None, *, metadata: dict | None = None):
        xgb = need("xgboost", "ml", "XGBoostPredictor")
        if not isinstance(model, xgb.Booster):
            raise TypeError(f"XGBoostPredictor takes an xgboost.Booster, got {type(model).__name__}")
        super().__init__(preprocessor, metadata=metadata)
        self.model = model
        if not self.feature_columns and model.feature_names:
            self.feature_columns = list(model.feature_names)

    @classmethod
    def from_checkpoint(cls, checkpoint, **kwargs) -> "XGBoostPredictor":
        from ..checkpoint import load_preprocessor
        from ..trainers.xgboost import load_model

        ckpt, meta = cls._checkpoint(checkpoint, "xgboost")
        return cls(load_model(ckpt), load_preprocessor(ckpt), metadata=meta, **kwargs)

    def _predict_pandas(self, df, **kwargs):
        pd = need("pandas", "ml")
        xgb = need("xgboost", "ml")
        cols = self._feature_names(df)
        missing = [c for c in (self.feature_columns or []) if c not in df.columns]
        if missing:
            raise ValueError(f"the batch lacks the model's feature columns {missing}; it has {list(df.columns)}")
        for c in cols:
            if df[c].dtype.kind not in "fiub":
                raise TypeError(f"feature column {c!r} must be numeric, got {df[c].dtype}")
        y = self.model.predict(xgb.DMatrix(df[cols]), **kwargs)
        return pd.DataFrame({"predictions": list(y) if y.ndim > 1 else y}, index=df.index)

    def _predict_numpy(self, x, **kwargs):
        xgb = need("xgboost", "ml")
        x = np.asarray(x)
        if x.ndim != 2:
            raise ValueError(f"predict() takes a 2-D feature matrix, got shape {x.shape}")
        names = self.feature_columns if self.feature_columns and len(self.feature_columns) == x.shape[1] else None
        return self.model.predict(xgb.DMatrix(x, feature_names=names), **kwargs)
