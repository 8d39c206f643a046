"""Optional frameworks, imported only when used, with an error that names the pip extra."""
from __future__ import annotations

import importlib

from fabric import FabricError

# import name -> (pip extra, what it is for)
EXTRAS = {
    "pandas": "ml", "pyarrow": "ml", "xgboost": "ml",
    "torch": "torch", "tensorflow": "tf", "keras": "tf", "tf2onnx": "onnx",
    "transformers": "hf", "accelerate": "hf",
    "onnx": "onnx", "onnxruntime": "onnx", "onnxmltools": "onnx", "onnxscript": "onnx",
    "optuna": "tune",
}


class MissingDependency(FabricError, ImportError):
    """A framework fabric.ml needs is not installed; the message names the extra that installs it."""


def need(module: str, extra: str | None = None, why: str = ""):
    """Import ``module`` or raise ``MissingDependency`` naming ``pip install 'fabric-compute[extra]'``."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        extra = extra or EXTRAS.get(top, "all")
        raise MissingDependency(
            f"{why or 'this'} needs {top!r}, which is not installed ({e}): "
            f"pip install 'fabric-compute[{extra}]'") from e
