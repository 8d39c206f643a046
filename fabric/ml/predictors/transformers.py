"""``TransformersPredictor``: a transformers checkpoint (``model/``, save_pretrained) as a pipeline
task, or the model's logits when no task is given. Everything is loaded from local files."""
from __future__ import annotations

import os

import numpy as np

from .._deps import need
from .base import Predictor

__all__ = ["TransformersPredictor"]


class TransformersPredictor(Predictor):
    """``TransformersPredictor.from_checkpoint(ckpt, task="text-classification").predict(df)``.

    The batch's text column (``text``, or its only string column) goes through the pipeline
    (``task``) or the tokenizer and the model (no task: a ``logits`` column of vectors)."""

    def __init__(self, model, tokenizer=None, *, task: str | None = None, preprocessor=None,
                 metadata: dict | None = None, device=None, **pipeline_kwargs):
        super().__init__(preprocessor, metadata=metadata)
        self.model, self.tokenizer, self.task = model.eval(), tokenizer, task
        self.pipeline = None
        if task is not None:
            transformers = need("transformers", "hf", "TransformersPredictor")
            self.pipeline = transformers.pipeline(task, model=model, tokenizer=tokenizer, device=device,
                                                  **pipeline_kwargs)

    @classmethod
    def from_checkpoint(cls, checkpoint, task: str | None = None, **kwargs) -> "TransformersPredictor":
        from ..checkpoint import load_preprocessor
        from ..export.transformers import load

        ckpt, meta = cls._checkpoint(checkpoint, "transformers")
        with ckpt.as_directory() as d:
            if not os.path.exists(os.path.join(d, "model", "config.json")) and \
                    not os.path.exists(os.path.join(d, "config.json")):
                raise FileNotFoundError(f"{ckpt!r} holds no model/ (save_pretrained) to load")
            model, tokenizer = load(d)
        return cls(model, tokenizer, task=task, preprocessor=load_preprocessor(ckpt), metadata=meta, **kwargs)

    def _texts(self, df) -> list:
        text = [c for c in df.columns if df[c].dtype.kind == "O" or str(df[c].dtype).startswith("str")]
        col = "text" if "text" in df.columns else (text[0] if len(text) == 1 else None)
        if col is None:
            raise ValueError(f"TransformersPredictor needs a 'text' column (or one string column); the batch has "
                             f"{list(df.columns)}")
        return df[col].astype(str).tolist()

    def _predict_pandas(self, df, **kwargs):
        pd = need("pandas", "ml")
        texts = self._texts(df)
        if self.pipeline is not None:
            out = self.pipeline(texts, **kwargs)
            return pd.DataFrame(out if out and isinstance(out[0], dict) else {"predictions": out}, index=df.index)
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer: save one beside the model (tokenizer.save_pretrained)")
        torch = need("torch", "torch")
        enc = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        with torch.no_grad():
            out = self.model(**enc, **kwargs)
        y = (out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state[:, 0]).numpy()
        return pd.DataFrame({"logits": list(y)}, index=df.index)

    def predict(self, data, **kwargs):
        pd = need("pandas", "ml")
        if isinstance(data, (list, tuple)):
            out = self._predict_pandas(pd.DataFrame({"text": list(data)}), **kwargs)
            return {c: np.stack(out[c].to_numpy()) if c == "logits" else out[c].to_numpy() for c in out.columns}
        return super().predict(data, **kwargs)
