"""``TensorflowTrainer``: a Keras/TensorFlow loop on a gang, with ``TF_CONFIG`` set from the gang's
addresses before the loop, so ``tf.distribute.MultiWorkerMirroredStrategy()`` inside it finds its
peers (each member's ``fabric.gang_context().addresses[rank]`` is a port free on its host).

Inside the loop: ``ml.get_dataset_shard("train").to_tf(...)`` feeds ``model.fit``, and
``ml.tensorflow.ReportCheckpointCallback()`` reports Keras' logs and saves ``model.keras``
checkpoints. With two or more workers each member first applies
``ml.tensorflow.fix_keras_multi_worker()``: plain Keras 3 ``model.compile(); model.fit(ds)`` under
MWMS raises without it."""
from __future__ import annotations

import json
import os

from .._deps import need
from .base import DataParallelTrainer

__all__ = ["TensorflowTrainer", "tf_config"]


def tf_config(addresses, rank: int) -> dict:
    """The TF_CONFIG of member ``rank`` of a gang whose members listen at ``addresses``."""
    return {"cluster": {"worker": [str(a) for a in addresses]}, "task": {"type": "worker", "index": int(rank)}}


class TensorflowTrainer(DataParallelTrainer):
    """Ray Train's ``TensorflowTrainer``: ``TensorflowTrainer(train_loop_per_worker, train_loop_config=...,
    scaling_config=..., datasets=..., run_config=..., preprocessor=...)``."""

    _framework = "tensorflow"

    def __init__(self, train_loop_per_worker, *, train_loop_config=None, **kwargs):
        need("tensorflow", "tf", "TensorflowTrainer")
        if train_loop_per_worker is None:
            raise TypeError("TensorflowTrainer needs a train_loop_per_worker")
        super().__init__(train_loop_per_worker, train_loop_config=train_loop_config, **kwargs)

    def _setup_worker(self, ctx) -> None:
        cpus = max(1, int(self.scaling_config.num_cpus_per_worker))
        os.environ["TF_CONFIG"] = json.dumps(tf_config(ctx.addresses, ctx.rank))
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        # two workers on two cores must not each start a pool of every core's threads
        os.environ.setdefault("TF_NUM_INTRAOP_THREADS", str(cpus))
        os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
        os.environ.setdefault("OMP_NUM_THREADS", str(cpus))
        if ctx.world_size > 1:
            # Keras 3's model.fit raises under MultiWorkerMirroredStrategy without it (see there)
            from ..tensorflow import fix_keras_multi_worker

            fix_keras_multi_worker()

    def _teardown_worker(self) -> None:
        os.environ.pop("TF_CONFIG", None)
