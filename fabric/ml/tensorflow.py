"""Keras helpers for a TensorflowTrainer loop: ``ReportCheckpointCallback`` reports Keras' logs as
metrics (every rank, since a report is a barrier) and, on rank 0, a ``model.keras`` checkpoint;
``fix_keras_multi_worker()`` makes Keras 3's ``model.fit`` run under MultiWorkerMirroredStrategy."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile

from ._deps import need

keras = need("keras", "tf", "fabric.ml.tensorflow")

__all__ = ["ReportCheckpointCallback", "fix_keras_multi_worker"]

log = logging.getLogger("fabric.ml")


def fix_keras_multi_worker() -> bool:
    """Mend the two places where Keras 3's TensorFlow trainer breaks under
    ``tf.distribute.MultiWorkerMirroredStrategy`` with more than one worker (Keras 3.0 to at least
    3.15 with TF 2.16 to 2.21; keras-team/keras#20585, tensorflow/tensorflow#72388):

    1. ``fit()`` first builds the model on one batch, reduced across replicas with
       ``strategy.reduce("MEAN", (x, y), axis=None)``. ``MirroredStrategy`` maps a reduce over a
       nested value; ``CollectiveAllReduceExtended._reduce_to`` (MWMS) takes one value only and tries
       to turn the ``(x, y)`` tuple of ``PerReplica`` into a tensor: "Attempt to convert a value
       (PerReplica...) to a Tensor". Fixed: a nested value is reduced leaf by leaf.
    2. Each step's logs (scalars) are reduced with ``strategy.reduce("MEAN", v, axis=0)`` under
       MWMS: "Invalid reduction dimension 0 for input with 0 dimensions". Fixed: scalars are
       reduced with ``axis=None`` (the mean across replicas); other values as before.

    Both changes only act where Keras would otherwise raise. Idempotent; TensorflowTrainer calls it
    in each worker before the loop (a loop started by hand can call it too). Returns whether the
    fix is in place (False when this Keras/TF lacks the internals it mends: nothing is changed)."""
    try:
        import keras.src.backend.tensorflow.trainer as kt
        from keras.src import tree
        from tensorflow.python.distribute import collective_all_reduce_strategy as cars
        from tensorflow.python.util import nest
    except ImportError:  # another Keras layout (or Keras 2): nothing to mend
        return False
    ext = cars.CollectiveAllReduceExtended
    if not hasattr(ext, "_reduce_to") or not hasattr(kt, "reduce_per_replica") or \
            not hasattr(kt, "_collective_all_reduce_multi_worker"):
        log.debug("fix_keras_multi_worker: this Keras/TensorFlow has other internals; left alone")
        return False
    if not getattr(ext._reduce_to, "_fabric_fix", False):
        reduce_to = ext._reduce_to

        def _reduce_to(self, reduce_op, value, destinations, options):
            if nest.is_nested(value):
                return nest.map_structure(lambda v: reduce_to(self, reduce_op, v, destinations, options), value)
            return reduce_to(self, reduce_op, value, destinations, options)

        _reduce_to._fabric_fix = True
        ext._reduce_to = _reduce_to
    if not getattr(kt.reduce_per_replica, "_fabric_fix", False):
        reduce_per_replica = kt.reduce_per_replica

        def _rank(v):
            first = v.values[0] if isinstance(v, kt.tf.distribute.DistributedValues) else v
            return getattr(getattr(first, "shape", None), "rank", None)

        def fixed(values, strategy, reduction="auto"):
            mean = reduction == "mean" or (reduction == "auto" and not isinstance(strategy, kt.tf.distribute.TPUStrategy))
            if not (mean and kt._collective_all_reduce_multi_worker(strategy)):
                return reduce_per_replica(values, strategy, reduction)
            return tree.map_structure(
                lambda v: strategy.reduce("MEAN", v, axis=None if _rank(v) == 0 else 0), values)

        fixed._fabric_fix = True
        kt.reduce_per_replica = fixed
    return True


def _numbers(logs: dict | None, keys) -> dict:
    """The numeric logs; ``keys``: None (all), or {reported name: Keras log key}."""
    logs = logs or {}
    pairs = logs.items() if keys is None else ((name, logs[k]) for name, k in keys.items() if k in logs)
    out = {}
    for k, v in pairs:
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            continue
    return out


class ReportCheckpointCallback(keras.callbacks.Callback):
    """``model.fit(..., callbacks=[ml.tensorflow.ReportCheckpointCallback()])``.

    ``metrics``: the log keys to report (all numeric ones when None; a dict reports Keras' log
    ``value`` under the name ``key``, e.g. ``{"train-logloss": "loss"}``); ``checkpoint_on``:
    "epoch_end" (default), "train_end" or None; ``report_metrics_on``: "epoch_end" or "batch_end";
    ``frequency``: every n-th epoch/batch. Ray's ``ReportCheckpointCallback``, same arguments."""

    def __init__(self, metrics=None, checkpoint_on: str | None = "epoch_end", report_metrics_on: str = "epoch_end",
                 frequency: int = 1):
        super().__init__()
        if checkpoint_on not in (None, "epoch_end", "train_end"):
            raise ValueError(f"checkpoint_on must be 'epoch_end', 'train_end' or None, got {checkpoint_on!r}")
        if report_metrics_on not in ("epoch_end", "batch_end"):
            raise ValueError(f"report_metrics_on must be 'epoch_end' or 'batch_end', got {report_metrics_on!r}")
        if metrics is None or isinstance(metrics, dict):
            self.keys = None if metrics is None else dict(metrics)
        else:
            self.keys = {k: k for k in ([metrics] if isinstance(metrics, str) else list(metrics))}
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
