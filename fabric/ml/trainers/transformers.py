"""``TransformersTrainer``: a ``transformers.Trainer`` built by the user's function in each gang
member and run on torch DDP across the gang.

Each member joins one gloo/nccl process group (TorchTrainer's setup) before the function runs, so
the Trainer's Accelerate state finds a distributed run of ``world_size`` processes. The Trainer
is handed each dataset *whole* (as a torch map-style dataset of rows): Accelerate shards its
dataloaders by rank itself, and handing it a fabric shard would shard twice. Its logs are
reported as metrics and its saves as checkpoints (``model/`` holds the save_pretrained files)."""
from __future__ import annotations

import functools
import inspect
import os
import shutil
import tempfile

from .._deps import need
from .torch import TorchTrainer

__all__ = ["TransformersTrainer", "RowDataset"]


class RowDataset:
    """A map-style torch dataset over a pandas DataFrame: item ``i`` is row ``i`` as a dict
    (vector columns as numpy arrays), what transformers' default collator takes."""

    def __init__(self, df):
        import numpy as np

        self.df = df.reset_index(drop=True)
        self.columns = {c: self.df[c].to_numpy() for c in self.df.columns}
        self._np = np

    def __len__(self):
        return len(self.df)

    def __getitem__(self, i):
        return {c: (self._np.asarray(v[i]) if isinstance(v[i], (list, tuple)) else v[i])
                for c, v in self.columns.items()}

    def to_pandas(self):
        return self.df

    def map(self, fn):
        """``fn(DataFrame) -> DataFrame`` (e.g. tokenize a text column): a new RowDataset."""
        return RowDataset(fn(self.df))


def _callback_class():
    transformers = need("transformers", "hf", "TransformersTrainer")

    class FabricReportCallback(transformers.TrainerCallback):
        """Reports the Trainer's logs (every rank: a report is a barrier) and its saves."""

        def __init__(self):
            self.last = {}

        def on_log(self, args, state, control, logs=None, **kwargs):
            from .. import session

            metrics = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float))}
            metrics["step"] = state.global_step
            self.last.update(metrics)
            session.report(metrics)

        def on_save(self, args, state, control, **kwargs):
            from .. import session
            from ..checkpoint import Checkpoint

            src = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            tmp = None
            if state.is_world_process_zero and os.path.isdir(src):
                tmp = tempfile.mkdtemp(prefix="fabric-hf-")
                shutil.copytree(src, os.path.join(tmp, "model"))
            try:
                session.report({**self.last, "step": state.global_step},
                               checkpoint=Checkpoint.from_directory(tmp) if tmp else None)
            finally:
                if tmp:
                    shutil.rmtree(tmp, ignore_errors=True)

    return FabricReportCallback


def _run(trainer: "TransformersTrainer", config: dict):
    """In each member: build the datasets, call the user's function, train."""
    transformers = need("transformers", "hf", "TransformersTrainer")
    from .. import session

    datasets = {}
    pre = trainer._whole_preprocessor
    for name, ds in (trainer._whole_datasets or {}).items():
        if pre is not None:
            ds = pre.transform(ds)
        datasets[name] = RowDataset(ds.to_pandas())
    train, evaluate = datasets.get("train"), datasets.get("evaluation", datasets.get("valid", datasets.get("eval")))
    fn = trainer.trainer_init_per_worker
    params = [p for p in inspect.signature(fn).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(params) >= 2:
        hf = fn(train, evaluate, **config)   # Ray's signature: (train_dataset, eval_dataset, **config)
    else:
        hf = fn(config) if params else fn()
    if not isinstance(hf, transformers.Trainer):
        raise TypeError(f"trainer_init_per_worker must return a transformers.Trainer, got {type(hf).__name__}")
    hf.add_callback(_callback_class()())
    resume = session.get_checkpoint()
    if resume is not None:
        with resume.as_directory() as d:
            local = tempfile.mkdtemp(prefix="fabric-hf-resume-")
            shutil.copytree(os.path.join(d, "model"), os.path.join(local, "model"), dirs_exist_ok=True)
        hf.train(resume_from_checkpoint=os.path.join(local, "model"))
    else:
        hf.train()


class TransformersTrainer(TorchTrainer):
    """``TransformersTrainer(trainer_init_per_worker, trainer_init_config=..., datasets=...,
    scaling_config=..., run_config=...)``: ``trainer_init_per_worker(train_dataset, eval_dataset,
    **config)`` (or ``(config)``) returns a ``transformers.Trainer``; datasets are
    :class:`RowDataset` s (the eval one from ``datasets["evaluation"]``, "valid" or "eval")."""

    _framework = "transformers"
    _warm_workers = False  # accelerate keeps its distributed state in process-wide singletons

    def __init__(self, trainer_init_per_worker, *, trainer_init_config: dict | None = None, **kwargs):
        need("transformers", "hf", "TransformersTrainer")
        if not callable(trainer_init_per_worker):
            raise TypeError(f"TransformersTrainer needs a trainer_init_per_worker function, got "
                            f"{type(trainer_init_per_worker).__name__}")
        self.trainer_init_per_worker = trainer_init_per_worker
        super().__init__(trainer_init_per_worker, train_loop_config=trainer_init_config, **kwargs)
        # the base ships members their shards only; the Trainer needs each dataset whole (above).
        # Same objects as .datasets/.preprocessor: fit() fits the preprocessor in place first.
        self._whole_datasets, self._whole_preprocessor = dict(self.datasets), self.preprocessor

    def _loop(self):
        return functools.partial(_run, self)

    def _teardown_worker(self) -> None:
        super()._teardown_worker()
        try:  # a warm process may run another gang: forget this one's Accelerate state
            from accelerate.state import AcceleratorState, PartialState

            AcceleratorState._reset_state(reset_partial_state=True)
            PartialState._reset_state()
        except Exception:  # noqa: BLE001 - accelerate absent or its internals moved
            pass
