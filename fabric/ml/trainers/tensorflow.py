"""``TensorflowTrainer``: a Keras/TensorFlow loop on a gang, with ``TF_CONFIG`` set from the gang's
hosts before the loop, so ``tf.distribute.MultiWorkerMirroredStrategy()`` inside it finds its
peers (each member's port is picked just before the loop: see ``fresh_addresses``).

Inside the loop: ``ml.get_dataset_shard("train").to_tf(...)`` feeds ``model.fit``, and
``ml.tensorflow.ReportCheckpointCallback()`` reports Keras' logs and saves ``model.keras``
checkpoints. With two or more workers each member first applies
``ml.tensorflow.fix_keras_multi_worker()``: plain Keras 3 ``model.compile(); model.fit(ds)`` under
MWMS raises without it."""
from __future__ import annotations

import json
import os
import socket

from .._deps import need
from .base import DataParallelTrainer

__all__ = ["TensorflowTrainer", "tf_config"]


def tf_config(addresses, rank: int) -> dict:
    """The TF_CONFIG of member ``rank`` of a gang whose members listen at ``addresses``."""
    return {"cluster": {"worker": [str(a) for a in addresses]}, "task": {"type": "worker", "index": int(rank)}}


def fresh_addresses(ctx) -> list[str]:
    """The gang's addresses with ports picked now, exchanged through the run's hub.

    A gang address's port was free when its worker process started, which for a warm worker may be
    minutes and many gangs ago; by now another process may hold it (seen here: "Could not start
    gRPC server", TF binding 0.0.0.0:port, and TF's gRPC server does not share ports). Each member
    binds a new port on its gang host and keeps it until all have theirs (so two members of one
    host cannot draw the same one), then TF binds it a moment later. Outside a trainer's session
    (or a gang of one) the gang's own addresses are used."""
    from .. import session
    from .base import REPORT_TIMEOUT

    reporter = getattr(session.current(), "reporter", None)
    sink, key = getattr(reporter, "sink", None), getattr(reporter, "key", None)
    if ctx.world_size <= 1 or sink is None or not hasattr(sink, "allgather"):
        return list(ctx.addresses)
    host = ctx.address.rpartition(":")[0].strip("[]")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        mine = f"[{host}]:{s.getsockname()[1]}" if ":" in host else f"{host}:{s.getsockname()[1]}"
        addresses, _ = sink.allgather(key, ctx.rank, ctx.world_size, "tf_config", mine, REPORT_TIMEOUT)
    return [str(a) for a in addresses]


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
        os.environ["TF_CONFIG"] = json.dumps(tf_config(fresh_addresses(ctx), ctx.rank))
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
