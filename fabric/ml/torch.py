"""PyTorch helpers for code inside a ``TorchTrainer`` loop (Ray Train's ``ray.train.torch``).

``prepare_model`` moves a model to this worker's device and wraps it in DDP when there are
several workers; ``prepare_data_loader`` gives a DataLoader a ``DistributedSampler`` (each rank
its share, reshuffled every epoch) and moves its batches to the device; ``get_device`` is
``cuda:0`` on a GPU worker (each member sees its own device as ``cuda:0``) and ``cpu`` otherwise.
``save_checkpoint`` writes the files ``TorchPredictor`` reads (``model.pt``, ``model_full.pt``).
"""
from __future__ import annotations

import os

from ._deps import need

__all__ = ["prepare_model", "prepare_data_loader", "get_device", "get_devices", "save_checkpoint",
           "enable_reproducibility", "unwrap"]


def _torch():
    return need("torch", "torch", "fabric.ml.torch")


def get_device():
    """This worker's ``torch.device``: ``cuda:0`` when it was given a GPU, else ``cpu``."""
    torch = _torch()
    if torch.cuda.is_available() and os.environ.get("CUDA_VISIBLE_DEVICES", "") not in ("", "-1"):
        return torch.device("cuda", 0)
    return torch.device("cpu")


def get_devices():
    return [get_device()]


def _distributed() -> bool:
    torch = _torch()
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


def prepare_model(model, move_to_device: bool = True, parallel_strategy: str | None = "ddp",
                  parallel_strategy_kwargs: dict | None = None):
    """``model`` on this worker's device, wrapped in ``DistributedDataParallel`` when the run
    has more than one worker (``parallel_strategy=None`` leaves it unwrapped)."""
    torch = _torch()
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"prepare_model takes a torch.nn.Module, got {type(model).__name__}")
    device = get_device()
    if move_to_device:
        model = model.to(device)
    if parallel_strategy not in ("ddp", None):
        raise ValueError(f"parallel_strategy must be 'ddp' or None, got {parallel_strategy!r}")
    if parallel_strategy == "ddp" and _distributed():
        from torch.nn.parallel import DistributedDataParallel

        kw = dict(parallel_strategy_kwargs or {})
        if device.type == "cuda":
            kw.setdefault("device_ids", [device.index or 0])
        model = DistributedDataParallel(model, **kw)
    return model


def unwrap(model):
    """The module inside a DDP wrapper (what to save), or ``model`` itself."""
    return getattr(model, "module", model)


class _DeviceLoader:
    """Iterates a DataLoader, moving each batch to the device, and sets the sampler's epoch so a
    ``DistributedSampler`` shuffles differently every epoch (as Ray's wrapper does)."""

    def __init__(self, loader, device, move):
        self._loader, self._device, self._move = loader, device, move
        self._epoch = 0

    def __len__(self):
        return len(self._loader)

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def _to(self, x):
        torch = _torch()
        if isinstance(x, torch.Tensor):
            return x.to(self._device, non_blocking=True)
        if isinstance(x, (list, tuple)):
            return type(x)(self._to(v) for v in x)
        if isinstance(x, dict):
            return {k: self._to(v) for k, v in x.items()}
        return x

    def __iter__(self):
        sampler = getattr(self._loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self._epoch)
        self._epoch += 1
        if not self._move:
            yield from self._loader
            return
        for batch in self._loader:
            yield self._to(batch)


def prepare_data_loader(data_loader, add_dist_sampler: bool = True, move_to_device: bool = True):
    """A DataLoader for this rank: a ``DistributedSampler`` (shuffling if the original did) when
    there are several workers, and batches moved to this worker's device."""
    torch = _torch()
    from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

    if not isinstance(data_loader, DataLoader):
        raise TypeError(f"prepare_data_loader takes a torch DataLoader, got {type(data_loader).__name__}")
    loader = data_loader
    if add_dist_sampler and _distributed() and not isinstance(loader.sampler, DistributedSampler) \
            and not isinstance(loader.dataset, torch.utils.data.IterableDataset):
        shuffle = isinstance(loader.sampler, RandomSampler)
        sampler = DistributedSampler(loader.dataset, shuffle=shuffle)
        loader = DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler,
                            num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                            pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                            timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                            persistent_workers=getattr(loader, "persistent_workers", False))
    return _DeviceLoader(loader, get_device(), move_to_device)


def enable_reproducibility(seed: int = 0) -> None:
    """Seed torch, numpy and random, and ask torch for deterministic algorithms."""
    import random

    import numpy as np

    torch = _torch()
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def save_checkpoint(model, directory: str | None = None, *, metadata: dict | None = None, extra: dict | None = None):
    """Write ``model`` as a checkpoint directory (``model.pt``: its state_dict; ``model_full.pt``:
    the whole module, so ``TorchPredictor.from_checkpoint`` needs no ``model=``) and return the
    ``ml.Checkpoint``. ``extra``: more objects saved as ``<name>.pt`` (an optimizer's state...)."""
    torch = _torch()
    from .checkpoint import Checkpoint

    if directory is None:
        from . import session

        directory = session.checkpoint_dir("fabric-torch-")
    os.makedirs(directory, exist_ok=True)
    m = unwrap(model)
    torch.save(m.state_dict(), os.path.join(directory, "model.pt"))
    torch.save(m, os.path.join(directory, "model_full.pt"))
    for name, obj in (extra or {}).items():
        torch.save(obj, os.path.join(directory, f"{name}.pt"))
    ckpt = Checkpoint.from_directory(directory)
    ckpt.set_metadata({"framework": "torch", **(metadata or {})})
    return ckpt
