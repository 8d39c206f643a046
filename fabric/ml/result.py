"""``Result``: what a finished (or failed) run leaves: rank 0's last metrics, the latest
checkpoint, the best ones kept, every report as a DataFrame, where it is stored, the error."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Result", "TrainingFailedError"]


class TrainingFailedError(RuntimeError):
    """``fit()`` failed: a training loop raised (its exception is ``__cause__``, with the rank
    and remote traceback in the message), or workers died more often than
    ``FailureConfig.max_failures`` allows. ``.result`` holds the ``Result`` so far (its
    checkpoints stay usable)."""

    def __init__(self, message: str, result: "Result | None" = None, rank: int | None = None):
        super().__init__(message)
        self.result = result
        self.rank = rank

    def __reduce__(self):
        return type(self), (self.args[0], self.result, self.rank)


@dataclass
class Result:
    metrics: dict | None = None
    checkpoint: Any = None
    error: BaseException | None = None
    path: str | None = None
    metrics_dataframe: Any = None
    best_checkpoints: list = field(default_factory=list)   # [(Checkpoint, metrics)]
    config: dict | None = None

    def __repr__(self):
        bits = [f"metrics={self.metrics!r}"]
        if self.checkpoint is not None:
            bits.append(f"checkpoint={self.checkpoint!r}")
        if self.error is not None:
            bits.append(f"error={type(self.error).__name__}")
        if self.path:
            from fabric.storage import redact

            bits.append(f"path={redact(self.path)!r}")
        return f"Result({', '.join(bits)})"

    def get_best_checkpoint(self, metric: str, mode: str = "max"):
        """The kept checkpoint whose reported ``metric`` is best (``mode`` "max" or "min")."""
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        scored = [(c, m[metric]) for c, m in self.best_checkpoints if metric in m]
        if not scored:
            return None
        return (max if mode == "max" else min)(scored, key=lambda cm: cm[1])[0]

    @classmethod
    def from_path(cls, path: str, storage_options: dict | None = None) -> "Result":
        """The Result of a run stored at ``path`` (``storage_path/name``), from its record."""
        from .trainers.base import load_result

        return load_result(path, storage_options)
