"""``TorchPredictor``: a torch module from a checkpoint (``model.pt`` into ``model=``, or the whole
``model_full.pt``), run in eval mode without gradients, on the GPU when there is one."""
from __future__ import annotations

import os

import numpy as np

from .._deps import need
from .base import Predictor

__all__ = ["TorchPredictor"]


class TorchPredictor(Predictor):
    """``TorchPredictor.from_checkpoint(ckpt, model=MyNet())`` loads ``model.pt`` (a state_dict)
    into ``model``; without ``model=`` it loads the pickled module ``model_full.pt``."""

    def __init__(self, model, preprocessor=None, *, use_gpu: bool | None = None, metadata: dict | None = None,
                 dtype=None):
        torch = need("torch", "torch", "TorchPredictor")
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"TorchPredictor takes a torch.nn.Module, got {type(model).__name__}")
        super().__init__(preprocessor, metadata=metadata)
        if use_gpu is None:
            use_gpu = torch.cuda.is_available()
        self.device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
        self.model = model.to(self.device).eval()
        self.dtype = dtype or torch.float32

    @classmethod
    def from_checkpoint(cls, checkpoint, model=None, **kwargs) -> "TorchPredictor":
        torch = need("torch", "torch", "TorchPredictor")
        from ..checkpoint import load_preprocessor

        ckpt, meta = cls._checkpoint(checkpoint, "torch")
        with ckpt.as_directory() as d:
            state, full = os.path.join(d, "model.pt"), os.path.join(d, "model_full.pt")
            if model is not None:
                if not os.path.exists(state):
                    raise FileNotFoundError(f"{ckpt!r} holds no model.pt (the model's state_dict) to load into model=")
                obj = torch.load(state, map_location="cpu", weights_only=True)
                if isinstance(obj, torch.nn.Module):
                    obj = obj.state_dict()
                model.load_state_dict(_strip_ddp(obj))
            elif os.path.exists(full):
                model = torch.load(full, map_location="cpu", weights_only=False)
            else:
                raise ValueError(f"{ckpt!r} holds no model_full.pt, so TorchPredictor needs the module: "
                                 f"TorchPredictor.from_checkpoint(ckpt, model=MyModel())")
        return cls(model, load_preprocessor(ckpt), metadata=meta, **kwargs)

    def _predict_numpy(self, x, **kwargs):
        torch = need("torch", "torch")
        x = np.asarray(x)
        if x.dtype.kind not in "fiub":
            raise TypeError(f"predict() takes numeric features, got dtype {x.dtype}")
        with torch.inference_mode():
            out = self.model(torch.as_tensor(x, dtype=self.dtype, device=self.device), **kwargs)
        if isinstance(out, (tuple, list)):
            out = out[0]
        y = out.detach().cpu().numpy()
        return y[:, 0] if y.ndim == 2 and y.shape[1] == 1 else y


def _strip_ddp(state: dict) -> dict:
    """A state_dict saved from a DDP wrapper has keys ``module.*``: load it into a bare module."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state
