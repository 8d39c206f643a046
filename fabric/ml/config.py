"""The shape of a training run: ``ScalingConfig``, ``RunConfig``, ``CheckpointConfig``,
``FailureConfig`` (Ray Train's names and fields). Each checks its values when made, so a typo
fails in the driver with a message that says what is accepted, not on the cluster later."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ScalingConfig", "RunConfig", "CheckpointConfig", "FailureConfig"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,127}$")


def _whole(name, v, lo, hi=None, none_ok=False):
    if v is None and none_ok:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"from {lo} to {hi}"
        raise ValueError(f"{name} must be a whole number {rng}{' or None' if none_ok else ''}, got {v!r}")


def _number(name, v, lo=0.0):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= lo or v != v or v == float("inf"):
        raise ValueError(f"{name} must be a number >= {lo:g}, got {v!r}")


@dataclass
class ScalingConfig:
    """How many workers and what each gets. ``use_gpu=True`` gives each worker one GPU unless
    ``resources_per_worker`` says otherwise; ``resources_per_worker`` takes ``cpus``, ``gpus``
    and ``memory`` (Ray's ``"CPU"``/``"GPU"`` spellings are accepted too)."""

    num_workers: int = 1
    use_gpu: bool = False
    resources_per_worker: dict | None = None
    trainer_resources: dict | None = None  # accepted for Ray compatibility; the driver needs none

    def __post_init__(self):
        _whole("ScalingConfig.num_workers", self.num_workers, 1, 1024)
        if not isinstance(self.use_gpu, bool):
            raise TypeError(f"ScalingConfig.use_gpu must be True or False, got {self.use_gpu!r}")
        r = self.resources_per_worker
        if r is not None and not isinstance(r, dict):
            raise TypeError(f"ScalingConfig.resources_per_worker must be a dict like {{'cpus': 2, 'gpus': 1}}, "
                            f"got {type(r).__name__}")
        self._res = self._resources()

    def _resources(self) -> dict:
        alias = {"cpus": "cpus", "cpu": "cpus", "CPU": "cpus", "num_cpus": "cpus",
                 "gpus": "gpus", "gpu": "gpus", "GPU": "gpus", "num_gpus": "gpus", "memory": "memory"}
        out = {"cpus": 1, "gpus": 1 if self.use_gpu else 0, "memory": None}
        for k, v in (self.resources_per_worker or {}).items():
            if k not in alias:
                raise ValueError(f"ScalingConfig.resources_per_worker: unknown resource {k!r}; "
                                 f"use cpus, gpus and memory")
            if alias[k] != "memory":
                _number(f"ScalingConfig.resources_per_worker[{k!r}]", v)
            out[alias[k]] = v
        if self.use_gpu and not out["gpus"]:
            raise ValueError("ScalingConfig(use_gpu=True) with resources_per_worker gpus=0: give each worker "
                             "a GPU share (gpus=1 or 0.5) or set use_gpu=False")
        if out["gpus"] and not self.use_gpu:
            self.use_gpu = True
        return out

    @property
    def num_cpus_per_worker(self) -> float:
        return self._res["cpus"]

    @property
    def num_gpus_per_worker(self) -> float:
        return self._res["gpus"]

    def gang_options(self) -> dict:
        """The options of the ``fabric.gang`` that runs the workers."""
        o = {"cpus": self._res["cpus"], "gpus": self._res["gpus"]}
        if self._res["memory"] is not None:
            o["memory"] = self._res["memory"]
        return o


@dataclass
class CheckpointConfig:
    """Which checkpoints to keep: the best ``num_to_keep`` by ``checkpoint_score_attribute``
    (a reported metric; ``checkpoint_score_order`` "max" or "min"), else the latest ones.
    The latest checkpoint is always kept too, so a restart can resume from it."""

    num_to_keep: int | None = None
    checkpoint_score_attribute: str | None = None
    checkpoint_score_order: str = "max"
    checkpoint_frequency: int = 0       # trainers that checkpoint by themselves (XGBoost): every N rounds
    checkpoint_at_end: bool | None = None

    def __post_init__(self):
        _whole("CheckpointConfig.num_to_keep", self.num_to_keep, 1, none_ok=True)
        if self.checkpoint_score_order not in ("max", "min"):
            raise ValueError(f"CheckpointConfig.checkpoint_score_order must be 'max' or 'min', "
                             f"got {self.checkpoint_score_order!r}")
        a = self.checkpoint_score_attribute
        if a is not None and (not isinstance(a, str) or not a):
            raise TypeError(f"CheckpointConfig.checkpoint_score_attribute must be a metric name, got {a!r}")
        _whole("CheckpointConfig.checkpoint_frequency", self.checkpoint_frequency, 0)


@dataclass
class FailureConfig:
    """How many times a run restarts after a worker dies (from its latest checkpoint).
    ``-1`` retries forever. An exception raised by the training loop is not retried."""

    max_failures: int = 0

    def __post_init__(self):
        if self.max_failures != -1:
            _whole("FailureConfig.max_failures", self.max_failures, 0)


@dataclass
class RunConfig:
    """Name and storage of a run: checkpoints go to ``storage_path/name/checkpoint_00000N/``.

    ``storage_path`` is any fsspec URL or local path; default: the cluster's store
    (``fabric.storage.default()``). ``storage_options`` are fsspec options for it (an S3
    ``endpoint_url``, ...); by default those of the cluster's store when the path is inside it.
    ``verbose``: 0 silent, 1 a live line of rank 0's latest metrics while ``fit()`` runs."""

    name: str | None = None
    storage_path: str | None = None
    checkpoint_config: CheckpointConfig | None = None
    failure_config: FailureConfig | None = None
    storage_options: dict | None = None
    verbose: int = 1
    stop: Any = None     # accepted for Ray compatibility (tune reads it)
    callbacks: list = field(default_factory=list)

    def __post_init__(self):
        if self.name is not None and (not isinstance(self.name, str) or not _NAME.match(self.name)):
            raise ValueError(f"RunConfig.name must be 1-128 letters, digits, '.', '_' or '-' (it names a folder), "
                             f"got {self.name!r}")
        if self.storage_path is not None and not isinstance(self.storage_path, str):
            import os

            if isinstance(self.storage_path, os.PathLike):
                self.storage_path = os.fspath(self.storage_path)
            else:
                raise TypeError(f"RunConfig.storage_path must be a path or an fsspec URL, "
                                f"got {type(self.storage_path).__name__}")
        if self.checkpoint_config is None:
            self.checkpoint_config = CheckpointConfig()
        elif not isinstance(self.checkpoint_config, CheckpointConfig):
            raise TypeError(f"RunConfig.checkpoint_config must be an ml.CheckpointConfig, "
                            f"got {type(self.checkpoint_config).__name__}")
        if self.failure_config is None:
            self.failure_config = FailureConfig()
        elif not isinstance(self.failure_config, FailureConfig):
            raise TypeError(f"RunConfig.failure_config must be an ml.FailureConfig, "
                            f"got {type(self.failure_config).__name__}")
        if self.storage_options is not None and not isinstance(self.storage_options, dict):
            raise TypeError("RunConfig.storage_options must be a dict of fsspec options")
        _whole("RunConfig.verbose", self.verbose, 0, 3)
