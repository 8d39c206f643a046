"""``OnnxPredictor``: predictions with onnxruntime from a ``framework="onnx"`` checkpoint.

The session is made once per predictor (so once per warm instance under ``BatchPredictor`` or a
``@fabric.cls``), on the CUDA provider when onnxruntime-gpu is installed and this process sees a
GPU, else on the CPU, with as many intra-op threads as the process may use CPUs. Inputs are
checked against the graph before the run, so a missing column or a string where a number goes
is an error that names the column, not an onnxruntime stack trace."""
from __future__ import annotations

import os

import numpy as np

from .._deps import need

try:  # ml-train's base class, when present: same from_checkpoint/predict shape
    from .base import Predictor as _Base
except ImportError:  # pragma: no cover
    _Base = object

_NP = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(int64)": np.int64,
       "tensor(int32)": np.int32, "tensor(int16)": np.int16, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
       "tensor(bool)": np.bool_, "tensor(string)": object, "tensor(float16)": np.float16}


class InvalidInput(ValueError):
    """A predict batch does not match the model's inputs (the message says which column and why)."""


def cpu_count() -> int:
    """CPUs this process may use: its affinity, bounded by OMP_NUM_THREADS when set."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    omp = os.environ.get("OMP_NUM_THREADS", "")
    return max(1, min(n, int(omp))) if omp.isdigit() and int(omp) > 0 else max(1, n)


def has_gpu() -> bool:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    return os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl")


def providers_for(use_gpu: bool | None = None) -> list[str]:
    ort = need("onnxruntime", "onnx", "OnnxPredictor")
    available = ort.get_available_providers()
    gpu = has_gpu() if use_gpu is None else use_gpu
    if gpu and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def prediction_spec(meta: dict, outputs: list, tokens: bool):
    """(graph output, column index or None, column name) of the native predictor's column, or None
    when the graph's outputs have no such counterpart (a foreign model with several outputs: then
    every output is a column). ``export_onnx`` records it in the metadata (``predictions``); for an
    older export it is inferred from the output names the exporters give."""
    rec = meta.get("predictions")
    if isinstance(rec, dict) and rec.get("output") in outputs:
        return rec["output"], rec.get("index"), rec.get("column", "predictions")
    if tokens or meta.get("source_framework") == "transformers":
        name = "logits" if "logits" in outputs else outputs[0]
        return name, None, "logits"
    if "probabilities" in outputs and "label" in outputs:  # onnxmltools' classifiers: P(class 1) if binary
        return "probabilities", "binary", "predictions"
    if len(outputs) == 1:
        return outputs[0], None, "predictions"
    return None


class OnnxPredictor(_Base):
    """``OnnxPredictor.from_checkpoint(ckpt).predict(batch)``; batch: a pandas DataFrame, a dict
    of columns, a numpy feature matrix, or (transformers exports) a list of texts.

    Returns what the source framework's predictor returns: a DataFrame with a ``predictions``
    column for a DataFrame (``logits`` for a transformers export, as TransformersPredictor), else
    ``{"predictions": array}``; e.g. an XGBoost binary classifier's ``predictions`` are P(class 1),
    as ``XGBoostPredictor``'s. ``outputs="graph"`` gives one column (key) per graph output under its
    ONNX name instead (``label``, ``probabilities``, ``output``...: the columns ``predict`` gave
    before it matched the other predictors). A 2-D output becomes a column of vectors.
    ``extra_columns="error"`` (default) refuses columns the model does not take, except the label
    column; "ignore" drops them."""

    def __init__(self, model, *, metadata: dict | None = None, preprocessor=None, tokenizer=None,
                 providers: list[str] | None = None, intra_op_num_threads: int | None = None,
                 use_gpu: bool | None = None, extra_columns: str = "error", outputs: str = "predictions"):
        ort = need("onnxruntime", "onnx", "OnnxPredictor")
        if extra_columns not in ("error", "ignore"):
            raise ValueError(f"extra_columns must be 'error' or 'ignore', got {extra_columns!r}")
        if outputs not in ("predictions", "graph"):
            raise ValueError(f"outputs must be 'predictions' (the native predictor's columns) or 'graph' (one "
                             f"column per ONNX output), got {outputs!r}")
        self.outputs = outputs
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_num_threads or cpu_count()
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.providers = providers or providers_for(use_gpu)
        self.session = ort.InferenceSession(model, opts, providers=self.providers)
        self.metadata = dict(metadata or {})
        self.preprocessor = None if self.metadata.get("preprocessor_folded") else preprocessor
        self.tokenizer = tokenizer
        self.extra_columns = extra_columns
        self.inputs = [(i.name, i.type, i.shape) for i in self.session.get_inputs()]
        self.input_names = [i[0] for i in self.inputs]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.label_column = self.metadata.get("label_column")
        self.feature_columns = self.metadata.get("feature_columns")
        self._matrix = self.input_names == ["input"]
        self._tokens = "input_ids" in self.input_names
        self._prediction = prediction_spec(self.metadata, self.output_names, self._tokens)

    @classmethod
    def from_checkpoint(cls, checkpoint, **kwargs) -> "OnnxPredictor":
        """The predictor of an ONNX checkpoint (a Checkpoint, directory or URL)."""
        from ..checkpoint import Checkpoint, load_preprocessor

        ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint.from_directory(checkpoint)
        meta = ckpt.get_metadata()
        if meta.get("framework") != "onnx":
            raise ValueError(f"{ckpt!r} is a {meta.get('framework')!r} checkpoint, not an ONNX one: "
                             f"make one with fabric.ml.export_onnx(ckpt)")
        tokenizer = None
        with ckpt.as_directory() as d:
            with open(os.path.join(d, "model.onnx"), "rb") as f:
                model = f.read()
            if meta.get("tokenizer"):
                transformers = need("transformers", "hf", "an ONNX transformers model's tokenizer")
                tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.join(d, meta["tokenizer"]),
                                                                       local_files_only=True)
        pre = None if meta.get("preprocessor_folded") else load_preprocessor(ckpt)
        return cls(model, metadata=meta, preprocessor=pre, tokenizer=tokenizer, **kwargs)

    def __repr__(self):
        return f"OnnxPredictor(inputs={self.input_names}, outputs={self.output_names}, providers={self.providers})"

    # ------------------------------------------------------------------ inputs
    def _feeds(self, data) -> dict:
        pd = need("pandas", "ml")
        if self._tokens:
            return self._token_feeds(data)
        if isinstance(data, np.ndarray) and self._matrix:
            return {"input": self._check_matrix(data)}
        if isinstance(data, dict):
            data = pd.DataFrame({k: (list(v) if np.ndim(v) > 1 else v) for k, v in data.items()})
        if not isinstance(data, pd.DataFrame):
            raise InvalidInput(f"predict() takes a pandas DataFrame, a dict of columns or a numpy matrix, "
                               f"got {type(data).__name__}")
        if self.preprocessor is not None:
            data = self.preprocessor.transform_batch(data)
        if self._matrix:
            from ..export._fold import frame_to_matrix

            cols = self.feature_columns or [c for c in data.columns if c != self.label_column]
            self._check_columns(data, cols)
            try:
                return {"input": self._check_matrix(frame_to_matrix(data, cols))}
            except (TypeError, ValueError) as e:
                raise InvalidInput(f"the feature columns {cols} must be numeric: {e}") from None
        self._check_columns(data, self.input_names)
        return {name: self._column(data[name], t, name) for name, t, _ in self.inputs}

    def _check_columns(self, df, wanted) -> None:
        have = list(df.columns)
        missing = [c for c in wanted if c not in have]
        if missing:
            raise InvalidInput(f"the batch lacks the model's input columns {missing}; it has {have} "
                               f"and the model takes {list(wanted)}")
        extra = [c for c in have if c not in wanted and c != self.label_column]
        if extra and self.extra_columns == "error":
            raise InvalidInput(f"the batch has columns the model does not take: {extra} (the model takes "
                               f"{list(wanted)}); drop them or pass extra_columns='ignore'")

    def _column(self, series, onnx_type: str, name: str):
        want = _NP.get(onnx_type)
        values = series.to_numpy()
        if want is None:
            raise InvalidInput(f"input {name!r} has the unsupported type {onnx_type}")
        if want is object:
            if values.dtype.kind not in "OUS" or not all(isinstance(v, str) for v in values):
                raise InvalidInput(f"column {name!r} must hold strings (the model takes {onnx_type}), "
                                   f"got {series.dtype}")
            return values.astype(object)
        if values.dtype.kind in "OUS" or str(series.dtype).startswith(("string", "str")):
            raise InvalidInput(f"column {name!r} must be numeric (the model takes {onnx_type}), got "
                               f"{series.dtype} values such as {values[:1].tolist()}")
        if np.dtype(want).kind in "iub" and values.dtype.kind == "f":
            if not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
                raise InvalidInput(f"column {name!r} must hold whole numbers (the model takes {onnx_type}), "
                                   f"got {series.dtype} values with fractions or NaN")
        return values.astype(want)

    def _check_matrix(self, x):
        x = np.asarray(x)
        if x.dtype.kind not in "fiub":
            raise InvalidInput(f"the feature matrix must be numeric, got dtype {x.dtype}")
        if x.ndim != 2:
            raise InvalidInput(f"the feature matrix must be 2-D (rows x features), got shape {x.shape}")
        width = self.inputs[0][2][1] if len(self.inputs[0][2]) > 1 else None
        if isinstance(width, int) and x.shape[1] != width:
            raise InvalidInput(f"the model takes {width} features per row, the batch has {x.shape[1]}")
        return np.ascontiguousarray(x, dtype=np.float32)

    def _token_feeds(self, data) -> dict:
        pd = need("pandas", "ml")
        if isinstance(data, pd.DataFrame):
            text = [c for c in data.columns if data[c].dtype.kind == "O" or str(data[c].dtype).startswith("str")]
            if "input_ids" in data.columns:
                data = {c: np.stack(data[c].to_numpy()) for c in data.columns if c in self.input_names}
            elif len(text) == 1 or "text" in text:
                data = data["text" if "text" in text else text[0]].tolist()
            else:
                raise InvalidInput(f"a text model's batch needs one text column (or 'text'); it has {list(data.columns)}")
        if isinstance(data, (list, tuple)):
            if self.tokenizer is None:
                raise InvalidInput("this ONNX model was exported without a tokenizer: pass input_ids/attention_mask")
            if not all(isinstance(t, str) for t in data):
                raise InvalidInput("a text model's batch must be strings")
            enc = self.tokenizer(list(data), padding=True, truncation=True, return_tensors="np")
            data = {k: enc[k] for k in enc.keys()}
        if not isinstance(data, dict):
            raise InvalidInput(f"a text model takes texts or token ids, got {type(data).__name__}")
        feeds = {}
        for name in self.input_names:
            if name in data:
                feeds[name] = np.asarray(data[name], dtype=np.int64)
            elif name == "attention_mask":
                feeds[name] = np.ones_like(feeds["input_ids"])
            elif name == "token_type_ids":
                feeds[name] = np.zeros_like(feeds["input_ids"])
            else:
                raise InvalidInput(f"the batch lacks the model input {name!r}")
        return feeds

    # ------------------------------------------------------------------ predict
    def run(self, feeds: dict) -> dict:
        """Run the graph on ready feeds: {input name: array} -> {output name: array}."""
        return dict(zip(self.output_names, self.session.run(None, feeds)))

    def predict(self, data, **kwargs):
        pd = need("pandas", "ml")
        out = self.run(self._feeds(data))
        if self.outputs == "predictions" and self._prediction is not None:
            name, index, column = self._prediction
            v = out[name]
            if index == "binary":
                index = 1 if v.ndim == 2 and v.shape[1] == 2 else None
            out = {column: v[:, index] if index is not None and v.ndim == 2 else v}
        if isinstance(data, pd.DataFrame):
            cols = {}
            for name, v in out.items():
                if v.ndim == 2 and v.shape[1] == 1:
                    v = v[:, 0]
                cols[name] = list(v) if v.ndim > 1 else v
            return pd.DataFrame(cols, index=data.index)
        return out

    def __call__(self, batch):
        """A map_batches callable: DataFrame or dict of columns in, same kind out."""
        return self.predict(batch)
