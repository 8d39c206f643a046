"""Keras (TensorFlow) -> ONNX with ``keras.Model.export(path, format="onnx")`` (tf2onnx inside).

Traps verified with Keras 3.15 / tf2onnx 1.17: a model loaded from ``model.keras`` must be
called once before ``export`` ("The model provided has never called"); an op tf2onnx cannot
convert is only logged and the file is written anyway, so the result is checked op by op."""
from __future__ import annotations

import os
import tempfile

import numpy as np

from .._deps import need
from ._common import UnsupportedModel


def load(src: str):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    keras = need("keras", "tf", "exporting a Keras checkpoint")
    need("tensorflow", "tf", "exporting a Keras checkpoint")
    # safe_mode=False: Lambda layers hold Python code. The checkpoint is the owner's own, in
    # their owner-only store, and already trusted as much as preprocessor.pkl (a pickle).
    return keras.models.load_model(os.path.join(src, "model.keras"), safe_mode=False)


def _input_shapes(model) -> list:
    try:
        return [tuple(t.shape) for t in model.inputs]
    except (AttributeError, ValueError):  # a loaded Sequential knows only its build shape
        shape = (model.get_build_config() or {}).get("input_shape")
        if shape is None:
            raise UnsupportedModel("cannot tell the Keras model's input shape: pass sample=") from None
        return [tuple(shape)]


def num_features(src: str, meta: dict) -> int:
    return int(_input_shapes(load(src))[0][-1])


def rename(model, old: str, new: str) -> None:
    """Rename a graph value everywhere it appears (inputs, outputs, node edges)."""
    if old == new:
        return
    for v in list(model.graph.input) + list(model.graph.output):
        if v.name == old:
            v.name = new
    for node in model.graph.node:
        for i, n in enumerate(node.input):
            if n == old:
                node.input[i] = new
        for i, n in enumerate(node.output):
            if n == old:
                node.output[i] = new


def convert(src: str, meta: dict, n_features: int, opset: int | None):
    onnx = need("onnx", "onnx")
    model = load(src)
    shapes = _input_shapes(model)
    if len(shapes) != 1:
        raise UnsupportedModel(f"the Keras model has {len(shapes)} inputs; export_onnx handles one (a feature matrix)")
    x0 = np.zeros((2, n_features), dtype=np.float32)
    model(x0)  # a loaded model must have been called before export
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        kwargs = {"opset_version": opset} if opset else {}
        try:
            model.export(path, format="onnx", verbose=False, **kwargs)
        except Exception as e:
            raise UnsupportedModel(f"keras export to ONNX failed: {type(e).__name__}: {str(e)[:1500]}") from e
        proto = onnx.load(path)
    rename(proto, proto.graph.input[0].name, "input")
    for i, out in enumerate(list(proto.graph.output)):
        rename(proto, out.name, "output" if len(proto.graph.output) == 1 else f"output_{i}")
    outputs = [o.name for o in proto.graph.output]

    def native(x: np.ndarray) -> dict:
        out = model(np.asarray(x, dtype=np.float32), training=False)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return {name: np.asarray(o) for name, o in zip(outputs, outs)}

    return proto, native
