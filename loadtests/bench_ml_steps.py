"""Per-step time of TensorflowTrainer and TransformersTrainer (2 workers) against the same loop
started by hand as 2 processes, side by side in one run (issue 12's target: within 1.15x).

    python loadtests/bench_ml_steps.py                  # both, 3 repeats
    python loadtests/bench_ml_steps.py --only tf --repeats 1 --small

TensorFlow: plain Keras ``compile(); fit()`` under ``tf.distribute.MultiWorkerMirroredStrategy``, a
20-256-256-1 MLP, global batch 256 (128 rows per replica), 3 epochs of 8,192 rows per worker.
  - by hand: 2 processes with ``TF_CONFIG`` set as TensorFlow's multi-worker tutorial does, each
    fitting its half of the rows from a ``tf.data`` of numpy arrays (with
    ``fabric.ml.tensorflow.fix_keras_multi_worker()``, without which Keras 3's fit does not run);
  - fabric: ``TensorflowTrainer`` on a warm embedded cluster, the rows in a Dataset sharded by the
    trainer and fed by ``get_dataset_shard("train").to_tf(...)``, ``ReportCheckpointCallback``
    reporting every epoch (a barrier at the hub, included in the time).
  Per step: the wall time of epochs 2..3 (epoch 1 traces the graph) over their steps, rank 0.

transformers: ``transformers.Trainer`` on torch DDP (gloo), a BERT built from a config (2 layers,
hidden 128, sequence 64, no hub), 16 rows per device, 40 steps, logs every 10 steps.
  - by hand: 2 processes with the env ``torchrun`` sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT,
    OMP_NUM_THREADS=1), each building the same Trainer over the whole dataset (Accelerate shards it);
  - fabric: ``TransformersTrainer``, whose callback reports each log (a barrier at the hub).
  Per step: the mean interval between step ends after the first 10 steps, rank 0.

Both sides use 1 CPU thread per worker. Prints one JSON line per measurement, then a table with
medians over the repeats and the ratio fabric / by hand, and the best run of each side.

Note the step counts: a by-hand ``from_tensor_slices(...).batch(256)`` has a known cardinality (32
batches of 8,192 rows), and Keras stops each epoch there although MWMS's rebatching gives each
worker 64 per-replica batches of 128: by hand trains on half its rows per epoch; fabric's
``to_tf`` (unknown cardinality) runs all 64. The rows per step are the same (128 per replica).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def emit(**row):
    print(json.dumps(row), flush=True)
    return row


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------- TensorFlow
def tf_rows(rows: int, rank: int | None = None, world: int = 2):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows * world, 20)).astype(np.float32)
    y = (x[:, 0] - 0.5 * x[:, 1] + 0.1 * rng.standard_normal(len(x))).astype(np.float32)
    if rank is None:
        return x, y
    part = slice(rank * rows, (rank + 1) * rows)   # the trainer's split: contiguous halves
    return x[part], y[part]


def tf_loop(config):
    """The per-worker loop, the same on both sides; ``config["data"]`` says where rows come from."""
    import keras
    import tensorflow as tf

    class Timer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.epochs = []

        def on_epoch_begin(self, epoch, logs=None):
            self.t0, self.n = time.perf_counter(), 0

        def on_train_batch_end(self, batch, logs=None):
            self.n += 1

        def on_epoch_end(self, epoch, logs=None):
            self.epochs.append((time.perf_counter() - self.t0, self.n))

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        inp = keras.Input((20,))
        h = keras.layers.Dense(256, activation="relu")(keras.layers.Dense(256, activation="relu")(inp))
        model = keras.Model(inp, keras.layers.Dense(1)(h))
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    timer = Timer()
    callbacks = []
    if config["data"] == "fabric":
        from fabric import ml
        from fabric.ml.tensorflow import ReportCheckpointCallback

        data = ml.get_dataset_shard("train").to_tf("x", "y", batch_size=config["batch"])
        callbacks.append(ReportCheckpointCallback(metrics=["loss"], checkpoint_on=None))
    else:
        x, y = tf_rows(config["rows"], config["rank"])
        opts = tf.data.Options()
        opts.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        data = tf.data.Dataset.from_tensor_slices((x, y)).batch(config["batch"]).with_options(opts)
    model.fit(data, epochs=config["epochs"], verbose=0, callbacks=callbacks + [timer])  # report inside the time
    later = timer.epochs[1:]
    step_s = sum(t for t, _ in later) / max(1, sum(n for _, n in later))
    out = {"step_s": step_s, "steps_per_epoch": timer.epochs[-1][1]}
    if config["data"] == "fabric":
        from fabric import ml

        ml.report(out)
    return out


# ---------------------------------------------------------------------- transformers
def hf_frame(rows: int, seq: int = 64, vocab: int = 1000):
    import pandas as pd

    rng = np.random.default_rng(0)
    ids = rng.integers(5, vocab, size=(rows, seq))
    labels = (ids[:, :8].mean(1) > vocab / 2).astype(np.int64)
    return pd.DataFrame({"input_ids": list(ids), "attention_mask": list(np.ones_like(ids)), "labels": labels})


class _HFTimer:
    """Built lazily (transformers imports late): step-end timestamps, reported at train end."""

    @staticmethod
    def make(report: bool):
        import transformers

        class Timer(transformers.TrainerCallback):
            def __init__(self):
                self.t = []

            def on_step_end(self, args, state, control, **kw):
                self.t.append(time.perf_counter())

            def on_train_end(self, args, state, control, **kw):
                skip = 10
                t = self.t[skip:]
                self.result = {"step_s": (t[-1] - t[0]) / max(1, len(t) - 1), "steps": len(self.t)}
                if report:
                    from fabric import ml

                    ml.report(self.result)

        return Timer()


def hf_trainer(train_dataset, eval_dataset=None, **config):
    """The same ``transformers.Trainer`` on both sides."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=256, max_position_embeddings=128, num_labels=2)
    model = transformers.BertForSequenceClassification(cfg)
    args = transformers.TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="bench-hf-"), per_device_train_batch_size=16, max_steps=config["steps"],
        learning_rate=1e-4, logging_steps=10, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=train_dataset)
    trainer.add_callback(_HFTimer.make(report=config["data"] == "fabric"))
    return trainer


class _Rows:
    """A map-style dataset of the frame's rows (what fabric's RowDataset hands the Trainer)."""

    def __init__(self, df):
        self.cols = {c: df[c].to_numpy() for c in df.columns}
        self.n = len(df)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {c: np.asarray(v[i]) for c, v in self.cols.items()}


# ---------------------------------------------------------------------- by hand: 2 processes
def child(kind: str, rank: int, config: dict) -> None:
    """One process of the by-hand run (started by ``by_hand``); prints rank 0's result."""
    if kind == "tf":
        from fabric.ml.tensorflow import fix_keras_multi_worker

        fix_keras_multi_worker()
        out = tf_loop(dict(config, rank=rank, data="local"))
    else:
        import torch

        torch.set_num_threads(1)
        trainer = hf_trainer(_Rows(hf_frame(config["rows"])), data="local", steps=config["steps"])
        timer = next(c for c in trainer.callback_handler.callbacks if type(c).__name__ == "Timer")
        trainer.train()
        out = timer.result
    if rank == 0:
        print("RESULT " + json.dumps(out), flush=True)


def by_hand(kind: str, config: dict) -> dict:
    port0, port1 = free_port(), free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, OMP_NUM_THREADS="1", TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1",
                   TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO)
        if kind == "tf":
            env["TF_CONFIG"] = json.dumps({"cluster": {"worker": [f"127.0.0.1:{port0}", f"127.0.0.1:{port1}"]},
                                           "task": {"type": "worker", "index": rank}})
        else:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port0))
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", kind, "--rank", str(rank),
                                       "--config", json.dumps(config)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=1800)[0] for p in procs]
    for p, o in zip(procs, outs):
        if p.returncode != 0:
            raise SystemExit(f"a by-hand {kind} process failed ({p.returncode}):\n{o[-3000:]}")
    line = next(ln for ln in outs[0].splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


# ---------------------------------------------------------------------- fabric
def with_fabric(kind: str, config: dict, storage: str, i: int) -> dict:
    from fabric import ml

    run = ml.RunConfig(name=f"bench-steps-{kind}-{i}", storage_path=storage, verbose=0)
    if kind == "tf":
        x, y = tf_rows(config["rows"])
        trainer = ml.TensorflowTrainer(tf_loop, train_loop_config=dict(config, data="fabric"),
                                       datasets={"train": ml.from_numpy({"x": x, "y": y})},
                                       scaling_config=ml.ScalingConfig(num_workers=2), run_config=run)
    else:
        trainer = ml.TransformersTrainer(hf_trainer, trainer_init_config=dict(config, data="fabric"),
                                         datasets={"train": ml.from_pandas(hf_frame(config["rows"]))},
                                         scaling_config=ml.ScalingConfig(num_workers=2), run_config=run)
    hist = trainer.fit().metrics_dataframe   # the timer's report is rank 0's last with step_s
    last = hist.dropna(subset=["step_s"]).iloc[-1]
    return {k: float(last[k]) for k in ("step_s", "steps_per_epoch", "steps") if k in last and last[k] == last[k]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["tf", "hf"], default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--small", action="store_true", help="a quick proof that it runs")
    ap.add_argument("--child", choices=["tf", "hf"], help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.child, a.rank, json.loads(a.config))

    import fabric

    configs = {"tf": {"rows": 4096 if a.small else 8192, "batch": 256, "epochs": 2 if a.small else 3},
               "hf": {"rows": 512 if a.small else 1024, "steps": 20 if a.small else 40}}
    kinds = [a.only] if a.only else ["tf", "hf"]
    fabric.init(num_cpus=2)
    storage = tempfile.mkdtemp(prefix="bench-steps-")
    rows = {k: {"fabric": [], "by hand": []} for k in kinds}
    for kind in kinds:
        with_fabric(kind, dict(configs[kind], epochs=2, steps=12) if kind == "tf" else dict(configs[kind], steps=12),
                    storage, -1)   # warm the cluster's workers (framework imports), not measured
        for i in range(a.repeats):
            order = ["fabric", "by hand"] if i % 2 == 0 else ["by hand", "fabric"]
            for side in order:
                r = with_fabric(kind, configs[kind], storage, i) if side == "fabric" else by_hand(kind, configs[kind])
                rows[kind][side].append(r["step_s"])
                emit(workload=kind, side=side, repeat=i, step_ms=round(r["step_s"] * 1000, 3),
                     steps=r.get("steps_per_epoch", r.get("steps")))
    fabric.shutdown()
    # medians, and the best run of each side: on a loaded machine the best is the least disturbed
    print("\n| workload (2 workers) | by hand: ms/step | fabric: ms/step | fabric / by hand | best by hand | best fabric "
          "| best / best |")
    print("|---|---|---|---|---|---|---|")
    names = {"tf": "TensorflowTrainer, Keras fit under MWMS", "hf": "TransformersTrainer, BERT-2x128 DDP"}
    for kind in kinds:
        hand, fab = statistics.median(rows[kind]["by hand"]), statistics.median(rows[kind]["fabric"])
        bh, bf = min(rows[kind]["by hand"]), min(rows[kind]["fabric"])
        print(f"| {names[kind]} | {hand * 1000:.2f} | {fab * 1000:.2f} | {fab / hand:.2f}x | {bh * 1000:.2f} "
              f"| {bf * 1000:.2f} | {bf / bh:.2f}x |")


if __name__ == "__main__":
    main()
