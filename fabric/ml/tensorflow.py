"""Keras helpers for a TensorflowTrainer loop: ``ReportCheckpointCallback`` reports Keras' logs as
metrics (every rank, since a report is a barrier) and, on rank 0, a ``model.keras`` checkpoint."""
from __future__ import annotations

import os
import shutil
import tempfile

from ._deps import need

keras = need("keras", "tf", "fabric.ml.tensorflow")

__all__ = ["ReportCheckpointCallback"]


def _numbers(logs: dict | None, keys) -> dict:
    out = {}
    for k, v in (logs or {}).items():
        if keys is not None and k not in keys:
            continue
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            continue
    return out


class ReportCheckpointCallback(keras.callbacks.Callback):
    """``model.fit(..., callbacks=[ml.tensorflow.ReportCheckpointCallback()])``.

    ``metrics``: the log keys to report (all numeric ones when None); ``checkpoint_on``:
    "epoch_end" (default), "train_end" or None; ``report_metrics_on``: "epoch_end" or "batch_end";
    ``frequency``: every n-th epoch/batch. Ray's ``ReportCheckpointCallback``, same arguments."""

    def __init__(self, metrics=None, checkpoint_on: str | None = "epoch_end", report_metrics_on: str = "epoch_end",
                 frequency: int = 1):
        super().__init__()
        if checkpoint_on not in (None, "epoch_end", "train_end"):
            raise ValueError(f"checkpoint_on must be 'epoch_end', 'train_end' or None, got {checkpoint_on!r}")
        if report_metrics_on not in ("epoch_end", "batch_end"):
            raise ValueError(f"report_metrics_on must be 'epoch_end' or 'batch_end', got {report_metrics_on!r}")
        self.keys = None if metrics is None else ([metrics] if isinstance(metrics, str) else list(metrics))
        self.checkpoint_on, self.report_on, self.frequency = checkpoint_on, report_metrics_on, max(1, int(frequency))
        self._n = 0

    def _report(self, logs, with_checkpoint: bool):
        from . import session
        from .checkpoint import Checkpoint

        metrics = _numbers(logs, self.keys)
        if not with_checkpoint:
            session.report(metrics)
            return
        tmp = tempfile.mkdtemp(prefix="fabric-keras-")
        try:
            # every rank saves (MultiWorkerMirroredStrategy expects all to take part); rank 0's is kept
            self.model.save(os.path.join(tmp, "model.keras"))
            rank0 = session.get_context().get_world_rank() == 0
            session.report(metrics, checkpoint=Checkpoint.from_directory(tmp) if rank0 else None)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def on_epoch_end(self, epoch, logs=None):
        self._n += 1
        if self.report_on == "epoch_end" and self._n % self.frequency == 0:
            self._report(logs, self.checkpoint_on == "epoch_end")

    def on_train_batch_end(self, batch, logs=None):
        if self.report_on == "batch_end" and (batch + 1) % self.frequency == 0:
            self._report(logs, False)

    def on_train_end(self, logs=None):
        if self.checkpoint_on == "train_end":
            self._report(logs, True)
