"""What a training loop sees: ``report``, ``get_context``, ``get_checkpoint``,
``get_dataset_shard`` (Ray Train's ``ray.train`` functions, same names).

Whoever runs a loop (a trainer's gang member, a tune trial) binds a :class:`Session` around it
with :func:`bind`; these functions read it. The session's *reporter* decides what a report
does (the trainers' barrier + upload + push to the driver, tune's push and stop check), so this
module stays free of sockets and storage.
"""
from __future__ import annotations

import contextlib
import numbers
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

__all__ = ["report", "get_context", "get_checkpoint", "get_dataset_shard", "TrainContext", "Session",
           "StopTraining", "bind", "current", "check_metrics"]


class StopTraining(Exception):
    """Raised by ``report()`` when the driver decided this run must stop (tune's early
    stopping). The runner catches it and ends the run cleanly; user code need not."""


@dataclass
class TrainContext:
    """Where this worker stands in its run (``ml.get_context()``), as in Ray Train."""

    world_rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    experiment_name: str = ""
    trial_name: str = ""
    trial_id: str = ""
    storage_path: str = ""
    trial_dir: str = ""
    metadata: dict = field(default_factory=dict)

    def get_world_rank(self) -> int:
        return self.world_rank

    def get_world_size(self) -> int:
        return self.world_size

    def get_local_rank(self) -> int:
        return self.local_rank

    def get_local_world_size(self) -> int:
        return self.local_world_size

    def get_node_rank(self) -> int:
        return self.node_rank

    def get_experiment_name(self) -> str:
        return self.experiment_name

    def get_trial_name(self) -> str:
        return self.trial_name

    def get_trial_id(self) -> str:
        return self.trial_id

    def get_storage_path(self) -> str:
        return self.storage_path

    def get_trial_dir(self) -> str:
        return self.trial_dir


class _PrintReporter:
    """The reporter of a loop run by hand, outside any trainer: keeps what it was told."""

    def __init__(self):
        self.reports: list[tuple[dict, Any]] = []

    def report(self, metrics, checkpoint=None):
        self.reports.append((metrics, checkpoint))


@dataclass
class Session:
    """One worker's view of its run. ``reporter.report(metrics, checkpoint)`` does the work of
    ``ml.report`` and may raise ``StopTraining``; ``shards`` maps dataset names to this rank's
    shard; ``checkpoint`` is the one to resume from (``ml.get_checkpoint()``)."""

    context: TrainContext = field(default_factory=TrainContext)
    reporter: Any = field(default_factory=_PrintReporter)
    checkpoint: Any = None
    shards: dict = field(default_factory=dict)
    iteration: int = 0
    scratch: str | None = None  # folder of the checkpoints fabric's helpers write; removed at the end


_session: Session | None = None


@contextlib.contextmanager
def bind(sess: Session):
    """Make ``sess`` the current session while the block runs (restores the previous one)."""
    global _session
    prev, _session = _session, sess
    try:
        yield sess
    finally:
        _session = prev
        if sess.scratch is not None:  # report() uploaded what the run needed from it
            shutil.rmtree(sess.scratch, ignore_errors=True)
            sess.scratch = None


def checkpoint_dir(prefix: str = "fabric-ckpt-") -> str:
    """A new folder for a checkpoint that fabric's helpers write (``ml.torch.save_checkpoint``
    without a directory, the XGBoost callback). Inside a run it lies in the session's scratch
    folder, which goes when the loop ends: ``report`` has uploaded its files to the run's storage
    by then, so long runs leave no folder per checkpoint behind in /tmp. Outside a run: a plain
    temporary folder, the caller's to keep."""
    sess = _session
    if sess is None:
        return tempfile.mkdtemp(prefix=prefix)
    if sess.scratch is None:
        sess.scratch = tempfile.mkdtemp(prefix="fabric-run-")
    return tempfile.mkdtemp(prefix=prefix, dir=sess.scratch)


def current() -> Session | None:
    return _session


def _require(what: str) -> Session:
    if _session is None:
        raise RuntimeError(f"ml.{what}() is for code running inside a training loop: pass the loop to a trainer "
                           f"(ml.TorchTrainer(loop, ...).fit()) or to tune.Tuner, which call it with a session")
    return _session


def check_metrics(metrics) -> dict:
    """``metrics`` as a dict of str -> Python number; a ``TypeError`` names what is wrong.

    Numbers are ints, floats, bools and numpy/torch scalars (anything ``numbers.Number`` or
    with ``.item()`` giving one); nested dicts are flattened as ``"outer/inner"``."""
    if not isinstance(metrics, dict):
        raise TypeError(f"report() takes a dict of metric name -> number, got {type(metrics).__name__}")
    out: dict = {}
    _flatten(metrics, "", out)
    return out


def _flatten(d, prefix, out):
    for k, v in d.items():
        if not isinstance(k, str):
            raise TypeError(f"report(): metric names must be strings, got {type(k).__name__} {k!r}")
        name = prefix + k
        if isinstance(v, dict):
            _flatten(v, name + "/", out)
            continue
        out[name] = _number(name, v)


def _number(name, v):
    if isinstance(v, bool):
        return v
    if isinstance(v, numbers.Number) and not isinstance(v, complex):
        return v.item() if hasattr(v, "item") else v  # numpy scalars -> Python numbers
    item = getattr(v, "item", None)
    numel = getattr(v, "numel", None)  # torch: numel(); numpy: size
    size = numel() if callable(numel) else getattr(v, "size", None)
    if item is not None and size in (1, None):
        try:
            x = item()
        except (TypeError, ValueError, RuntimeError):
            x = None
        if isinstance(x, (int, float)) and not isinstance(x, complex):
            return x
    raise TypeError(f"report(): metric {name!r} must be a number (int, float or a numpy/torch scalar), "
                    f"got {type(v).__name__} {_short(v)}")


def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def report(metrics: dict, *, checkpoint=None) -> None:
    """Report this iteration's metrics (and optionally a checkpoint) to the driver.

    In a trainer every rank must call it the same number of times: it is a barrier. Rank 0's
    metrics are the run's; any rank's checkpoint files are saved in the iteration's checkpoint.
    Raises ``StopTraining`` when the driver stopped the run (tune), which ends the loop."""
    sess = _require("report")
    m = check_metrics(metrics)
    if checkpoint is not None:
        from .checkpoint import Checkpoint

        if not isinstance(checkpoint, Checkpoint):
            raise TypeError(f"report(checkpoint=...) takes an ml.Checkpoint (Checkpoint.from_directory(path)), "
                            f"got {type(checkpoint).__name__}")
    sess.iteration += 1
    sess.reporter.report(m, checkpoint)


def report_in_step(metrics: dict, any_rank=None) -> None:
    """``report`` without the barrier, for a loop whose ranks a collective of its own already keeps
    in step (XGBoost's callback: every round all-reduces). Rank 0's metrics go to the driver;
    the other ranks send nothing. ``any_rank(flag)`` ORs a flag over that collective, so that all
    ranks stop at the same round when the driver stopped the run (rank 0 hears of it first); it is
    called only when the run can be stopped (tune). A reporter without this mode (a loop run by
    hand, tune's function trainable) gets a plain ``report``."""
    sess = _require("report")
    m = check_metrics(metrics)
    in_step = getattr(sess.reporter, "report_in_step", None)
    if in_step is None:
        report(m)
        return
    sess.iteration += 1
    stop = in_step(m)
    if stop is not None and any_rank is not None:
        stop = any_rank(stop)
    if stop:
        raise StopTraining()


def get_context() -> TrainContext:
    """This worker's rank, world size, experiment name, ... (a one-worker context outside a run)."""
    return _session.context if _session is not None else TrainContext()


def get_checkpoint():
    """The checkpoint to resume from (after a restart, or ``resume_from_checkpoint=``), else None."""
    return _session.checkpoint if _session is not None else None


def get_dataset_shard(name: str = "train"):
    """This rank's shard of the trainer's ``datasets[name]`` (a Dataset)."""
    sess = _require("get_dataset_shard")
    if name not in sess.shards:
        have = ", ".join(repr(k) for k in sess.shards) or "none"
        raise KeyError(f"no dataset named {name!r} was given to the trainer (datasets: {have})")
    return sess.shards[name]
