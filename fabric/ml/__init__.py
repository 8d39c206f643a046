"""fabric.ml: datasets, preprocessors, trainers, predictors, ONNX export and tuning.

The names are Ray AIR's (docs/ml.md says what is the same and what is better). Everything
here is built on fabric's public core API (``fn``, ``cls``, ``gang``, ``put/get/wait``) and
``fabric.storage``; the core never imports this package.

Importing ``fabric.ml`` is cheap: each name is loaded from its module on first use, and each
framework (pandas, pyarrow, xgboost, torch, tensorflow, transformers, onnxruntime) only when
the code that needs it runs. A framework that is missing raises ``MissingDependency`` naming the
pip extra that installs it.
"""
from __future__ import annotations

import importlib

from ._deps import MissingDependency

# public name -> the module (relative to this package) that defines it
_NAMES = {
    # data
    "Dataset": "data", "read_parquet": "data", "read_csv": "data", "from_pandas": "data",
    "from_numpy": "data", "from_arrow": "data", "from_items": "data", "range": "data", "DataContext": "data",
    # configs and results
    "ScalingConfig": "config", "RunConfig": "config", "CheckpointConfig": "config",
    "FailureConfig": "config", "Result": "result", "Checkpoint": "checkpoint",
    # inside a training loop
    "report": "session", "get_context": "session", "get_checkpoint": "session",
    "get_dataset_shard": "session", "TrainContext": "session",
    # trainers
    "DataParallelTrainer": "trainers.base",
    "XGBoostTrainer": "trainers.xgboost", "TorchTrainer": "trainers.torch",
    "TensorflowTrainer": "trainers.tensorflow", "TransformersTrainer": "trainers.transformers",
    # predictors
    "Predictor": "predictors.base", "XGBoostPredictor": "predictors.xgboost",
    "TorchPredictor": "predictors.torch", "TensorflowPredictor": "predictors.tensorflow",
    "TransformersPredictor": "predictors.transformers", "OnnxPredictor": "predictors.onnx",
    "BatchPredictor": "predictors.batch",
    # export
    "export_onnx": "export",
}

# submodules reached as attributes: ml.preprocessing.StandardScaler, ml.torch.prepare_model, ml.tune
_SUBMODULES = {"preprocessing", "torch", "tensorflow", "tune", "data", "config", "checkpoint", "session",
               "trainers", "predictors", "export", "result"}

__all__ = sorted(_NAMES) + sorted(_SUBMODULES) + ["MissingDependency"]


def __getattr__(name: str):
    if name in _NAMES:
        value = getattr(importlib.import_module("." + _NAMES[name], __name__), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module("." + name, __name__)
    raise AttributeError(f"module 'fabric.ml' has no attribute {name!r}")


def __dir__():
    return __all__
