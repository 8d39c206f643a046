"""``TensorflowPredictor``: a Keras model from a checkpoint's ``model.keras``, with its preprocessor."""
from __future__ import annotations

import os

import numpy as np

from .._deps import need
from .base import Predictor

__all__ = ["TensorflowPredictor"]


class TensorflowPredictor(Predictor):
    """``TensorflowPredictor.from_checkpoint(ckpt).predict(df)`` -> a ``predictions`` column
    (a column of vectors for multi-output models), like the other framework predictors."""

    def __init__(self, model, preprocessor=None, *, metadata: dict | None = None):
        keras = need("keras", "tf", "TensorflowPredictor")
        if not isinstance(model, keras.Model):
            raise TypeError(f"TensorflowPredictor takes a keras.Model, got {type(model).__name__}")
        super().__init__(preprocessor, metadata=metadata)
        self.model = model

    @classmethod
    def from_checkpoint(cls, checkpoint, model=None, **kwargs) -> "TensorflowPredictor":
        from ..checkpoint import load_preprocessor

        ckpt, meta = cls._checkpoint(checkpoint, "tensorflow")
        if model is None:
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
            keras = need("keras", "tf", "TensorflowPredictor")
            with ckpt.as_directory() as d:
                path = os.path.join(d, "model.keras")
                if not os.path.exists(path):
                    raise FileNotFoundError(f"{ckpt!r} holds no model.keras (save the model with model.save)")
                # safe_mode=False: the owner's own checkpoint, trusted like its preprocessor.pkl
                model = keras.models.load_model(path, safe_mode=False)
        return cls(model, load_preprocessor(ckpt), metadata=meta, **kwargs)

    def _predict_numpy(self, x, **kwargs):
        x = np.asarray(x)
        if x.dtype.kind not in "fiub":
            raise TypeError(f"predict() takes numeric features, got dtype {x.dtype}")
        out = np.asarray(self.model(x.astype(np.float32), training=False))
        return out[:, 0] if out.ndim == 2 and out.shape[1] == 1 else out
