"""PyTorch -> ONNX with the dynamo exporter (``torch.onnx.export(..., dynamo=True)``).

A dynamic batch dimension is declared with ``dynamic_shapes``: without it the exported graph
accepts only the sample's batch size (the old ``dynamic_axes`` is deprecated)."""
from __future__ import annotations

import contextlib
import io
import os
import re

import numpy as np

from .._deps import need
from ._common import UnsupportedModel


def load(src: str):
    torch = need("torch", "torch", "exporting a PyTorch checkpoint")
    path = os.path.join(src, "model_full.pt")
    if not os.path.exists(path):
        raise UnsupportedModel("this torch checkpoint has no model_full.pt (the whole module, torch.save(model)); "
                               "only a state_dict (model.pt) cannot be exported without the model's class")
    model = torch.load(path, weights_only=False, map_location="cpu")
    if isinstance(model, dict):
        raise UnsupportedModel("model_full.pt holds a state_dict, not a module: save the module itself")
    return model.eval()


def num_features(src: str, meta: dict) -> int:
    for m in load(src).modules():
        if hasattr(m, "in_features"):
            return int(m.in_features)
    raise UnsupportedModel("cannot tell this torch model's input width: pass sample= (a few input rows)")


def quiet():
    """The exporter prints a progress line per stage to stdout; keep a worker's log readable."""
    return contextlib.redirect_stdout(io.StringIO())


def export_module(module, args: tuple, dynamic_shapes, input_names, output_names, opset, what: str):
    torch = need("torch", "torch")
    kwargs = {"opset_version": opset} if opset else {}
    try:
        with quiet(), torch.no_grad():
            program = torch.onnx.export(module, args, dynamo=True, dynamic_shapes=dynamic_shapes,
                                        input_names=input_names, output_names=output_names,
                                        verbose=False, **kwargs)
    except Exception as e:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
        ops = sorted(set(re.findall(r"No ONNX function found for <OpOverload\(op='([^']+)'", text)))
        if ops:
            raise UnsupportedModel(f"{what} uses ops with no ONNX form in torch.onnx: {', '.join(ops)}; "
                                   f"replace them (or register an ONNX function for them)") from None
        i = text.find("Exception summary")
        raise UnsupportedModel(f"torch.onnx.export could not export {what}: {type(e).__name__}: "
                               f"{text[i if i >= 0 else 0:][:1500]}") from None
    return program.model_proto


def convert(src: str, meta: dict, n_features: int, opset: int | None):
    torch = need("torch", "torch")
    model = load(src)
    batch = torch.export.Dim("batch", min=1)
    sample = torch.zeros(2, n_features)
    with torch.no_grad():
        probe = model(sample)
    n_out = len(probe) if isinstance(probe, (tuple, list)) else 1
    names = ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]
    proto = export_module(model, (sample,), ({0: batch},), ["input"], names, opset,
                          f"the torch model {type(model).__name__}")
    outputs = [o.name for o in proto.graph.output]

    def native(x: np.ndarray) -> dict:
        with torch.no_grad():
            out = model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return {name: o.detach().cpu().numpy() for name, o in zip(outputs, outs)}

    return proto, native
