"""``export_onnx(checkpoint)``: any trained checkpoint -> a ``framework="onnx"`` Checkpoint.

One module per framework (xgboost, torch, tensorflow, transformers) turns the native model into
an ONNX graph whose input is ``"input"`` (a float32 feature matrix) or, for transformers, the
token tensors. Then, for tabular models, the fitted preprocessor is folded in front of it
(``_fold``), so the file alone maps raw columns to predictions. The export runs on the cluster
(a fabric call: the frameworks load there, not in the driver), checks parity between the native
model and onnxruntime on sample rows, records both maxima in the metadata, and writes the new
checkpoint into the store.
"""
from __future__ import annotations

import importlib
import os
import shutil
import tempfile
import uuid

import numpy as np

import fabric

from .._deps import need
from ._common import (META_FILE, ExportError, ParityError, UnknownCheckpoint, UnsupportedModel, check_ops,
                      compare, read_meta, session, write_meta)

__all__ = ["export_onnx", "ExportError", "ParityError", "UnknownCheckpoint", "UnsupportedModel"]

FRAMEWORKS = ("xgboost", "torch", "tensorflow", "transformers")
SAMPLE_ROWS = 1024


def export_onnx(checkpoint, *, sample=None, fold_preprocessor: bool = True, opset: int | None = None,
                rtol: float = 1e-5, atol: float = 1e-6, path: str | None = None, cpus: float = 1,
                feature_columns: list[str] | None = None, label_column: str | None = None):
    """Export ``checkpoint`` (a Checkpoint, directory or URL) to ONNX; returns the new Checkpoint.

    ``sample``: rows to check parity on, and to type the raw inputs when a preprocessor is
    folded: a pandas DataFrame or fabric Dataset of raw rows, a float feature matrix, or for
    transformers a list of texts or ``{"input_ids": ..., "attention_mask": ...}``. Without it,
    random rows of the model's input width are used (and a preprocessor is not folded).
    ``path``: where the new checkpoint goes (default: ``exports/`` in the cluster's store).
    Fails with ``ParityError`` when onnxruntime and the native model differ beyond
    ``|a - b| <= atol + rtol * |b|``; ``UnsupportedModel`` names a layer or op with no ONNX form;
    ``UnknownCheckpoint`` when the checkpoint's framework is not one of FRAMEWORKS.
    ``feature_columns``/``label_column`` override (or supply) the checkpoint's metadata: a
    hand-written loop's checkpoint may not say which columns its model takes."""
    from ..checkpoint import Checkpoint

    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint.from_directory(checkpoint)
    if path is None:
        from fabric import storage

        base = os.path.basename(ckpt.path.rstrip("/")) or "model"
        path = storage.default().url(f"exports/{base}-onnx-{uuid.uuid4().hex[:8]}")
    task = fabric.fn(cpus=cpus, retries=0)(_export)
    overrides = {k: v for k, v in (("feature_columns", feature_columns), ("label_column", label_column)) if v}
    return task.remote(ckpt, sample, fold_preprocessor, opset, rtol, atol, path, overrides).result()


def _export(ckpt, sample, fold_preprocessor, opset, rtol, atol, dest, overrides=None):
    """On the cluster: convert, fold, check parity, write the new checkpoint to ``dest``."""
    from ..checkpoint import Checkpoint, upload_dir

    with ckpt.as_directory() as src:
        meta = {**read_meta(src), **(overrides or {})}
        framework = meta.get("framework")
        if framework not in FRAMEWORKS:
            files = sorted(os.listdir(src))[:10]
            if framework == "onnx":
                raise UnknownCheckpoint(f"{ckpt!r} is already an ONNX checkpoint")
            raise UnknownCheckpoint(
                f"cannot export {ckpt!r}: its metadata names framework {framework!r}, and export_onnx knows "
                f"{list(FRAMEWORKS)} (files there: {files}); set it with ckpt.update_metadata({{'framework': ...}})")
        out = tempfile.mkdtemp(prefix="fabric-onnx-")
        try:
            if framework == "transformers":
                new_meta = _export_transformers(src, meta, sample, opset, rtol, atol, out)
            else:
                new_meta = _export_tabular(src, framework, meta, sample, fold_preprocessor, opset, rtol, atol, out)
            new_meta["source_checkpoint"] = ckpt.path
            write_meta(out, new_meta)
            upload_dir(out, dest)
        finally:
            shutil.rmtree(out, ignore_errors=True)
    return Checkpoint.from_directory(dest)


def _base_meta(meta: dict, framework: str) -> dict:
    keep = {k: v for k, v in meta.items() if k not in ("framework",)}
    keep.update(framework="onnx", source_framework=framework)
    return keep


def _sample_frame(sample):
    """A pandas DataFrame, a matrix, or None, from what the user gave."""
    if sample is None:
        return None
    try:
        from ..data import Dataset
    except ImportError:  # pragma: no cover - the data module ships with fabric.ml
        Dataset = ()
    if isinstance(sample, Dataset):
        return sample.limit(SAMPLE_ROWS).to_pandas()
    pd = need("pandas", "ml")
    if isinstance(sample, pd.DataFrame):
        return sample.head(SAMPLE_ROWS).reset_index(drop=True)
    if isinstance(sample, dict):
        return pd.DataFrame(sample).head(SAMPLE_ROWS)
    arr = np.asarray(sample)
    if arr.ndim != 2:
        raise ExportError(f"sample= must be a DataFrame, a Dataset or a 2-D feature matrix; got shape {arr.shape}")
    return arr[:SAMPLE_ROWS].astype(np.float32)


def _export_tabular(src, framework, meta, sample, fold_preprocessor, opset, rtol, atol, out):
    onnx = need("onnx", "onnx", "ONNX export")
    from ..checkpoint import PREPROCESSOR_FILE
    from ._fold import NotFoldable, fold, frame_to_matrix

    mod = importlib.import_module(f".{framework}", __name__)
    pre = None
    pre_path = os.path.join(src, PREPROCESSOR_FILE)
    if os.path.exists(pre_path):
        import pickle

        with open(pre_path, "rb") as f:
            pre = pickle.load(f)
    label = meta.get("label_column")
    features = meta.get("feature_columns")
    pd = need("pandas", "ml")
    raw = _sample_frame(sample)
    if isinstance(raw, pd.DataFrame):
        frame = pre.transform_batch(raw) if pre is not None else raw
        cols = features or [c for c in frame.columns if c != label]
        missing = [c for c in cols if c not in frame.columns]
        if missing:
            raise ExportError(f"sample= lacks the model's feature columns {missing} (it has {list(raw.columns)})")
        x = frame_to_matrix(frame, cols)
    elif raw is None:
        n = len(features) if features and pre is None else mod.num_features(src, meta)
        x = np.random.default_rng(0).normal(size=(64, n)).astype(np.float32)
    else:
        x = raw
    model, native = mod.convert(src, meta, x.shape[1], opset)
    check_ops(model, f"the {framework} model")

    folded, by_column, reason = False, False, None
    inputs = ["input"]
    if isinstance(raw, pd.DataFrame):
        try:
            p = pre if fold_preprocessor else None
            if p is None and pre is not None:
                raise NotFoldable("fold_preprocessor=False")
            model, cols, inputs = fold(model, p, raw, features, label)
            folded, by_column = pre is not None, True
        except NotFoldable as e:
            reason = str(e)
    new_meta = _base_meta(meta, framework)
    if pre is not None and not folded:
        shutil.copy(pre_path, os.path.join(out, PREPROCESSOR_FILE))
    path = os.path.join(out, "model.onnx")
    onnx.save(model, path)
    sess = session(path)
    if by_column:
        feeds = {name: _column(raw[name], sess, name) for name in inputs}
    else:
        feeds = {"input": x}
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    want = native(x)
    figures = {"parity_max_abs_diff": 0.0, "parity_max_rel_diff": 0.0}
    for name, value in want.items():
        f = compare(value, got[name], rtol=rtol, atol=atol, what=f"the {framework} export's output {name!r}")
        figures = {k: max(figures[k], f[k]) for k in figures}
    new_meta.update(figures, parity_rows=int(len(x)), preprocessor_folded=folded,
                    input_names=[i.name for i in sess.get_inputs()],
                    input_types={i.name: i.type for i in sess.get_inputs()},
                    output_names=[o.name for o in sess.get_outputs()], onnx_opset=_opset(model),
                    feature_columns=features or (cols if by_column else None), label_column=label)
    outs = new_meta["output_names"]
    if hasattr(mod, "predictions"):   # which output OnnxPredictor gives as the native predictor's column
        new_meta["predictions"] = dict(mod.predictions(src, outs), column="predictions")
    elif len(outs) == 1:
        new_meta["predictions"] = {"output": outs[0], "index": None, "column": "predictions"}
    if reason and pre is not None:
        new_meta["preprocessor_not_folded"] = reason
    return new_meta


_NP = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(int64)": np.int64,
       "tensor(int32)": np.int32, "tensor(bool)": np.bool_, "tensor(string)": object}


def _column(series, sess, name):
    t = next(i.type for i in sess.get_inputs() if i.name == name)
    return series.to_numpy().astype(_NP.get(t, object))


def _opset(model) -> int:
    return int(next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0))


def _export_transformers(src, meta, sample, opset, rtol, atol, out):
    onnx = need("onnx", "onnx", "ONNX export")
    from . import transformers as hf

    model, native, feeds, tokenizer = hf.convert(src, sample, opset)
    check_ops(model, "the transformers model")
    path = os.path.join(out, "model.onnx")
    onnx.save(model, path)
    sess = session(path)
    names = [i.name for i in sess.get_inputs()]
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {n: feeds[n] for n in names})))
    figures = {}
    for name, value in native(feeds).items():
        figures = compare(value, got[name], rtol=rtol, atol=atol, what=f"the transformers export's output {name!r}")
    new_meta = _base_meta(meta, "transformers")
    if tokenizer is not None:
        tokenizer.save_pretrained(os.path.join(out, "tokenizer"))
        new_meta["tokenizer"] = "tokenizer"
    new_meta.update(figures, parity_rows=int(len(feeds["input_ids"])), preprocessor_folded=False,
                    input_names=names, input_types={i.name: i.type for i in sess.get_inputs()},
                    output_names=[o.name for o in sess.get_outputs()], onnx_opset=_opset(model))
    # TransformersPredictor (no task) names its column "logits"
    new_meta["predictions"] = {"output": new_meta["output_names"][0], "index": None, "column": "logits"}
    return new_meta
