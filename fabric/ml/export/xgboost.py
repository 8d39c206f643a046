"""XGBoost -> ONNX with onnxmltools (TreeEnsemble ops of the ai.onnx.ml domain)."""
from __future__ import annotations

import json
import os

import numpy as np

from .._deps import need
from ._common import UnsupportedModel

# objectives onnxmltools 1.16 converts, and how the native prediction maps onto its outputs
_CLASSIFY = {"binary:logistic", "multi:softprob", "multi:softmax"}
_REGRESS = {"reg:squarederror", "reg:squaredlogerror", "reg:logistic", "reg:pseudohubererror",
            "reg:absoluteerror", "reg:linear", "count:poisson", "reg:gamma", "reg:tweedie", "binary:logitraw"}


def load(src: str):
    xgb = need("xgboost", "ml", "exporting an XGBoost checkpoint")
    booster = xgb.Booster()
    booster.load_model(os.path.join(src, "model.ubj"))
    return booster


def num_features(src: str, meta: dict) -> int:
    return int(load(src).num_features())


def predictions(src: str, outputs: list) -> dict:
    """Which output (and column of it) equals XGBoostPredictor's ``predictions``: the booster's own
    predict, P(class 1) for binary:logistic, the class for multi:softmax, the value for regression."""
    objective = json.loads(load(src).save_config())["learner"]["objective"]["name"]
    if objective == "binary:logistic":
        return {"output": outputs[1], "index": 1}
    if objective == "multi:softprob":
        return {"output": outputs[1], "index": None}
    return {"output": outputs[0], "index": None}


def convert(src: str, meta: dict, n_features: int, opset: int | None):
    """(onnx model with input "input" [N, n_features] float32, native(x) -> {output: array})."""
    xgb = need("xgboost", "ml")
    onnxmltools = need("onnxmltools", "onnx", "exporting XGBoost to ONNX")
    from onnxmltools.convert.common.data_types import FloatTensorType

    booster = load(src)
    objective = json.loads(booster.save_config())["learner"]["objective"]["name"]
    if objective not in _CLASSIFY | _REGRESS:
        raise UnsupportedModel(f"XGBoost objective {objective!r} has no ONNX converter in onnxmltools; "
                               f"supported: {sorted(_CLASSIFY | _REGRESS)}")
    # onnxmltools refuses boosters whose features are named: it parses split features as f%d
    export_booster = booster.copy()
    export_booster.feature_names = None
    export_booster.feature_types = None
    kwargs = {"target_opset": opset} if opset else {}
    try:
        model = onnxmltools.convert_xgboost(export_booster, initial_types=[("input", FloatTensorType([None, n_features]))],
                                            **kwargs)
    except Exception as e:  # the converter's own words name what it could not handle
        raise UnsupportedModel(f"onnxmltools could not convert this XGBoost model ({type(e).__name__}: {e})") from e
    outputs = [o.name for o in model.graph.output]

    def native(x: np.ndarray) -> dict:
        dm = xgb.DMatrix(np.asarray(x, dtype=np.float32))
        if objective in ("binary:logistic",):
            p = export_booster.predict(dm)
            return {outputs[1]: np.stack([1 - p, p], axis=1)}
        if objective == "multi:softprob":
            return {outputs[1]: export_booster.predict(dm)}
        if objective == "multi:softmax":
            return {outputs[0]: export_booster.predict(dm)}
        return {outputs[0]: export_booster.predict(dm)}

    return model, native
