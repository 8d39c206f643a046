"""One tabular task, three frameworks, one class changed: fabric.ml's unified trainer interface.

    python functions/tabular_swap.py            # embedded cluster, 2 workers per trainer
    FABRIC_ADDRESS=tcp://host:5555 python functions/tabular_swap.py

The datasets, the preprocessor, the scaling and run configs, ``fit()``, the ``Result``, the
checkpoint and the batch prediction are the same for every trainer; what changes is the trainer
class (and, for the deep-learning ones, the loop that each worker runs: XGBoost needs none).
TensorflowTrainer is tried too when tensorflow is installed (``pip install 'fabric-compute[tf]'``):
plain Keras ``compile(); fit()`` under MultiWorkerMirroredStrategy on the same 2 workers.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np

import fabric
from fabric import ml

FEATURES = ["tenure", "monthly", "calls", "usage"]
LABEL = "churn"


def make_table(n=4000, seed=0):
    import pandas as pd

    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"tenure": rng.gamma(2.0, 12.0, n), "monthly": rng.normal(70, 20, n),
                       "calls": rng.poisson(2, n).astype(float), "usage": rng.normal(300, 80, n)})
    logit = -0.08 * df.tenure + 0.03 * (df.monthly - 70) + 0.6 * df.calls - 0.01 * (df.usage - 300)
    df[LABEL] = (logit + rng.normal(0, 0.5, n) > 0).astype("float32")
    return df.astype("float32")


# ---------------------------------------------------------------------- per-worker loops
def torch_loop(config):
    import torch

    from fabric.ml import torch as mt

    model = mt.prepare_model(torch.nn.Sequential(torch.nn.Linear(len(FEATURES), 32), torch.nn.ReLU(),
                                                 torch.nn.Linear(32, 1)))
    opt = torch.optim.Adam(model.parameters(), lr=config["lr"])
    for epoch in range(config["epochs"]):
        for b in ml.get_dataset_shard("train").iter_torch_batches(batch_size=128):
            x = torch.stack([b[c] for c in FEATURES], 1)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x)[:, 0], b[LABEL])
            opt.zero_grad()
            loss.backward()
            opt.step()
        ckpt = mt.save_checkpoint(model) if ml.get_context().get_world_rank() == 0 else None
        ml.report({"loss": loss.item(), "epoch": epoch}, checkpoint=ckpt)


def tf_loop(config):
    import keras
    import tensorflow as tf

    from fabric.ml.tensorflow import ReportCheckpointCallback

    # as in TensorFlow's multi-worker tutorial: build and compile in the strategy's scope, then fit
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        inp = keras.Input((len(FEATURES),), name="x")
        model = keras.Model(inp, keras.layers.Dense(1)(keras.layers.Dense(32, activation="relu")(inp)))
        model.compile(optimizer=keras.optimizers.Adam(config["lr"]),
                      loss=keras.losses.BinaryCrossentropy(from_logits=True))
    # the features stacked into one tensor, as the torch loop does
    data = ml.get_dataset_shard("train").to_tf(FEATURES, LABEL, batch_size=128).map(
        lambda f, y: (tf.stack([f[c] for c in FEATURES], axis=1), y))
    model.fit(data, epochs=config["epochs"], verbose=0, callbacks=[ReportCheckpointCallback(metrics={"loss": "loss"})])


# ---------------------------------------------------------------------- the swap
def trainers(common: dict) -> dict:
    """name -> (the trainer, its predictor class). Everything in ``common`` is shared."""
    out = {
        "xgboost": (ml.XGBoostTrainer(params={"objective": "binary:logistic", "max_depth": 4, "eta": 0.3},
                                      label_column=LABEL, num_boost_round=20, **common), ml.XGBoostPredictor),
        "torch": (ml.TorchTrainer(torch_loop, train_loop_config={"lr": 0.01, "epochs": 3}, **common),
                  ml.TorchPredictor),
    }
    import importlib.util

    if importlib.util.find_spec("tensorflow") is not None:   # the [tf] extra
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        out["tensorflow"] = (ml.TensorflowTrainer(tf_loop, train_loop_config={"lr": 0.01, "epochs": 3}, **common),
                             ml.TensorflowPredictor)
    return out


def main():
    fabric.init()
    ds = ml.from_pandas(make_table())
    train, valid = ds.train_test_split(test_size=0.25, seed=0)
    storage = os.environ.get("TABULAR_SWAP_STORAGE") or tempfile.mkdtemp(prefix="tabular-swap-")
    common = dict(datasets={"train": train, "valid": valid},
                  preprocessor=ml.preprocessing.StandardScaler(FEATURES),
                  scaling_config=ml.ScalingConfig(num_workers=2),
                  metadata={"label_column": LABEL, "feature_columns": FEATURES})
    truth = valid.to_pandas()[LABEL].to_numpy()
    for name, (trainer, predictor_cls) in trainers(common).items():
        trainer.run_config = ml.RunConfig(name=f"swap-{name}", storage_path=storage, verbose=0)
        result = trainer.fit()
        scored = ml.BatchPredictor.from_checkpoint(result.checkpoint, predictor_cls).predict(
            valid, feature_columns=FEATURES, batch_size=1024).to_pandas()  # the checkpoint's preprocessor runs first
        threshold = 0.5 if name == "xgboost" else 0.0  # probabilities vs logits
        acc = float(((scored["predictions"].to_numpy() > threshold) == truth).mean())
        print(f"{name:>10}: accuracy {acc:.3f}  checkpoint {result.checkpoint.path}")
    print("swap ok")


if __name__ == "__main__":
    main()
