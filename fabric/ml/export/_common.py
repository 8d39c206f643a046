"""What every framework's export shares: errors, the ONNX op check, parity, checkpoint metadata."""
from __future__ import annotations

import json
import os

import numpy as np

from fabric import FabricError

from .._deps import need

META_FILE = "fabric_checkpoint.json"


class ExportError(FabricError, ValueError):
    """An ONNX export could not be made or did not match its native model."""


class UnknownCheckpoint(ExportError):
    """The checkpoint's framework is not one export_onnx knows (or it names none)."""


class UnsupportedModel(ExportError):
    """The model uses a layer or op that has no ONNX form; the message names it."""


class ParityError(ExportError):
    """onnxruntime's predictions differ from the native model's beyond the tolerance."""


def read_meta(local_dir: str) -> dict:
    path = os.path.join(local_dir, META_FILE)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def write_meta(local_dir: str, meta: dict) -> None:
    path = os.path.join(local_dir, META_FILE)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True, default=str)


def check_ops(model, what: str) -> None:
    """Raise UnsupportedModel naming every node whose op ONNX does not define.

    Converters (tf2onnx behind ``keras.Model.export`` above all) log an unsupported op and still
    write a model, which then fails to load far from the cause; this names the op and its node."""
    onnx = need("onnx", "onnx")
    known_domains = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft"}
    local = {f.name for f in model.functions}
    bad = []

    def walk(graph):
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)
            if node.op_type in local:
                continue
            domain = node.domain or ""
            if domain == "com.microsoft":
                continue  # onnxruntime's contrib ops (e.g. from the torch exporter's fusions)
            if domain not in known_domains or not onnx.defs.has(node.op_type, domain):
                bad.append(f"{node.op_type} (node {node.name!r})" if node.name else node.op_type)

    walk(model.graph)
    if bad:
        shown = ", ".join(sorted(set(bad))[:8])
        raise UnsupportedModel(f"{what} uses ops with no ONNX form: {shown}; "
                               f"replace those layers/ops or export without them")


def session(model_bytes_or_path, threads: int | None = None):
    ort = need("onnxruntime", "onnx")
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(model_bytes_or_path, opts, providers=["CPUExecutionProvider"])


def compare(native, onnx_out, *, rtol: float, atol: float, what: str) -> dict:
    """Max abs/rel difference of two arrays; ParityError naming both when beyond the tolerance.

    The criterion is numpy.allclose's (|a - b| <= atol + rtol * |b|), so outputs near zero are
    judged by ``atol`` and the rest by ``rtol``; both maxima are recorded either way."""
    a = np.asarray(onnx_out, dtype=np.float64)
    b = np.asarray(native, dtype=np.float64)
    if a.size == b.size and a.shape != b.shape:
        a = a.reshape(b.shape)
    if a.shape != b.shape:
        raise ParityError(f"{what}: onnxruntime gave shape {a.shape}, the native model {b.shape}")
    diff = np.abs(a - b)
    max_abs = float(diff.max()) if diff.size else 0.0
    rel = diff / np.maximum(np.abs(b), np.finfo(np.float32).tiny)
    max_rel = float(rel.max()) if rel.size else 0.0
    if not np.all(diff <= atol + rtol * np.abs(b)):
        raise ParityError(
            f"{what}: onnxruntime and the native model differ beyond the tolerance (rtol={rtol:g}, "
            f"atol={atol:g}): max abs diff {max_abs:.3g}, max rel diff {max_rel:.3g}")
    return {"parity_max_abs_diff": max_abs, "parity_max_rel_diff": max_rel}
