"""``TorchTrainer``: a training loop on ``torch.distributed`` over a gang (gloo on CPU, nccl on GPU).

Each member joins one process group before the loop and leaves it after: rank 0 opens the TCPStore
on its gang host (a port the OS picks) and the hub's allgather hands the port to the others, so no
rank connects before the store listens (torch's client would retry after a back-off) and no port
of an earlier run in a warm worker is bound again; inside, ``ml.torch.prepare_model``/``prepare_data_loader`` do DDP and sharding.
Torch's intra-op threads are set to the worker's CPUs (as ``torchrun`` sets OMP_NUM_THREADS), so
two workers on two cores do not fight over them.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

from .._deps import need
from .base import DataParallelTrainer

__all__ = ["TorchTrainer", "TorchConfig"]


@dataclass
class TorchConfig:
    """``backend``: None picks nccl on GPU workers, gloo on CPU; ``timeout_s`` for collectives."""

    backend: str | None = None
    timeout_s: int = 1800

    def __post_init__(self):
        if self.backend not in (None, "gloo", "nccl", "mpi"):
            raise ValueError(f"TorchConfig.backend must be 'gloo', 'nccl' or None, got {self.backend!r}")


class TorchTrainer(DataParallelTrainer):
    """Ray Train's ``TorchTrainer``: ``TorchTrainer(train_loop_per_worker, train_loop_config=...,
    scaling_config=..., datasets=..., run_config=..., preprocessor=...)``."""

    _framework = "torch"
    _warm_workers = True

    def __init__(self, train_loop_per_worker, *, train_loop_config=None, torch_config: TorchConfig | None = None,
                 **kwargs):
        need("torch", "torch", "TorchTrainer")
        if train_loop_per_worker is None:
            raise TypeError("TorchTrainer needs a train_loop_per_worker")
        if torch_config is not None and not isinstance(torch_config, TorchConfig):
            raise TypeError(f"torch_config must be a TorchConfig, got {type(torch_config).__name__}")
        self.torch_config = torch_config or TorchConfig()
        super().__init__(train_loop_per_worker, train_loop_config=train_loop_config, **kwargs)

    def _backend(self) -> str:
        torch = need("torch", "torch", "TorchTrainer")
        b = self.torch_config.backend
        if b is None:
            b = "nccl" if self.scaling_config.use_gpu and torch.cuda.is_available() else "gloo"
        return b

    def _setup_worker(self, ctx) -> None:
        torch = need("torch", "torch", "TorchTrainer")
        import torch.distributed as dist

        cpus = max(1, int(self.scaling_config.num_cpus_per_worker))
        torch.set_num_threads(cpus)
        os.environ.setdefault("OMP_NUM_THREADS", str(cpus))
        backend = self._backend()
        if backend == "nccl":
            torch.cuda.set_device(0)
        from .. import session

        timeout = datetime.timedelta(seconds=self.torch_config.timeout_s)
        host, port, store = ctx.master_addr, None, None
        if ctx.rank == 0:
            store = dist.TCPStore(host, 0, ctx.world_size, is_master=True, timeout=timeout, wait_for_workers=False)
            port = store.port
        p = session.current().reporter.p
        port = p["sink"].allgather(p["key"], ctx.rank, ctx.world_size, "torch-store", port, 600)[0][0]
        if store is None:
            store = dist.TCPStore(host, port, ctx.world_size, is_master=False, timeout=timeout)
        os.environ["MASTER_PORT"] = str(port)  # what the loop sees agrees with the group
        dist.init_process_group(backend, store=store, rank=ctx.rank, world_size=ctx.world_size, timeout=timeout)

    def _teardown_worker(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()

