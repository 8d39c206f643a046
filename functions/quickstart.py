"""fabric quickstart: the whole ML flow on an embedded local cluster, no set-up, no download.

    pip install -e '.[quickstart]' && python functions/quickstart.py

    prepare data -> preprocess -> train with XGBoost, then PyTorch (then TensorFlow/Keras where the
    [tf] extra is installed) through one trainer interface -> tune -> export the best model to ONNX
    -> serve it behind the Open Inference Protocol -> one real HTTP request

Every stage is cached in the cluster's store: a second run skips the work whose code and inputs
did not change and takes seconds. The same file runs unchanged against a running cluster
(``FABRIC_ADDRESS=tcp://host:5555 python functions/quickstart.py``) and deploys as an app
(``fabric deploy functions/quickstart.py``: the ``app`` below).
"""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import os
import sys
import time

import numpy as np

import fabric
from fabric import storage

FEATURES = ["tenure", "monthly", "support_calls", "usage"]
LABEL = "churn"

app = fabric.App("churn")


@app.fn(cache=True)
def prepare(n: int, seed: int):
    """A synthetic churn table (made here: nothing is downloaded)."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    tenure = rng.gamma(2.0, 12.0, n)
    monthly = rng.normal(60, 20, n).clip(5, None)
    calls = rng.poisson(1.5, n).astype(np.float64)
    usage = rng.normal(0, 1, n)
    logit = -1.0 - 0.05 * tenure + 0.03 * monthly + 0.6 * calls - 0.8 * usage
    churn = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float64)
    return pd.DataFrame({"tenure": tenure, "monthly": monthly, "support_calls": calls, "usage": usage,
                         LABEL: churn})


def torch_loop(config):
    """A small MLP, written as for torchrun: ml.torch wraps the model in DDP across the gang."""
    import torch
    from fabric import ml

    shard = ml.get_dataset_shard("train")
    model = ml.torch.prepare_model(torch.nn.Sequential(
        torch.nn.Linear(len(FEATURES), 32), torch.nn.ReLU(), torch.nn.Linear(32, 1)))
    opt = torch.optim.Adam(model.parameters(), lr=config["lr"])
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for epoch in range(config["epochs"]):
        total, n = 0.0, 0
        for batch in shard.iter_torch_batches(batch_size=512):
            x = torch.stack([batch[c].float() for c in FEATURES], dim=1)
            y = batch[LABEL].float().unsqueeze(1)
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            total, n = total + float(loss.detach()) * len(y), n + len(y)
        ml.report({"train-logloss": total / max(n, 1), "epoch": epoch})


def tf_loop(config):
    """The same MLP in Keras, as in TensorFlow's multi-worker tutorial: TensorflowTrainer sets
    TF_CONFIG from the gang, so MultiWorkerMirroredStrategy all-reduces the gradients."""
    import keras
    import tensorflow as tf

    from fabric import ml
    from fabric.ml.tensorflow import ReportCheckpointCallback

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        inp = keras.Input((len(FEATURES),))
        model = keras.Model(inp, keras.layers.Dense(1)(keras.layers.Dense(32, activation="relu")(inp)))
        model.compile(optimizer=keras.optimizers.Adam(config["lr"]),
                      loss=keras.losses.BinaryCrossentropy(from_logits=True))
    data = ml.get_dataset_shard("train").to_tf(FEATURES, LABEL, batch_size=512).map(
        lambda f, y: (tf.stack([f[c] for c in FEATURES], axis=1), y))
    model.fit(data, epochs=config["epochs"], verbose=0,
              callbacks=[ReportCheckpointCallback(metrics={"train-logloss": "loss"}, checkpoint_on="train_end")])


def staged(name: str, build, *key):
    """A driver-side stage kept in the store, keyed by this file's code and ``key``: trainers run
    gangs from the driver, so they are cached here rather than as a @fabric.fn(cache=True) call."""
    src = hashlib.blake2b(inspect.getsource(sys.modules[__name__]).encode(), digest_size=8).hexdigest()
    k = f"quickstart/{name}-{src}-{hashlib.blake2b(repr(key).encode(), digest_size=8).hexdigest()}"
    store = storage.default()
    if store.exists(k):
        return store.get(k), True
    value = build()
    store.put(k, value)
    return value, False


def say(t0, what, cached=False):
    print(f"[{time.perf_counter() - t0:6.1f}s] {what}{'  (cached)' if cached else ''}", flush=True)


def main():
    from fabric import ml, serve
    from fabric.ml import tune

    t0 = time.perf_counter()
    info = fabric.init()
    say(t0, f"cluster at {info['address']} ({'embedded' if info['embedded'] else 'running'})")
    df = prepare.remote(20_000, 0).result()
    ds = ml.from_pandas(df, override_num_blocks=4)
    train, valid = ds.train_test_split(test_size=0.2, seed=0)
    say(t0, f"data: {len(df):,} rows, features {FEATURES}, label {LABEL!r}")
    scaling = ml.ScalingConfig(num_workers=2)
    common = dict(datasets={"train": train, "valid": valid}, scaling_config=scaling,
                  preprocessor=ml.preprocessing.StandardScaler(FEATURES))

    # one interface: the same datasets, scaling, preprocessor, fit() and Result for every framework
    trainers = {
        "xgboost": lambda **rc: ml.XGBoostTrainer(
            params={"objective": "binary:logistic", "eval_metric": "logloss", "max_depth": 4, "eta": 0.2,
                    "tree_method": "hist"}, label_column=LABEL, num_boost_round=30,
            run_config=ml.RunConfig(name="quickstart-xgboost", **rc), **common),
        "torch": lambda: ml.TorchTrainer(torch_loop, train_loop_config={"lr": 0.01, "epochs": 2},
                                         run_config=ml.RunConfig(name="quickstart-torch"), **common),
    }
    if importlib.util.find_spec("tensorflow") is not None:   # where the [tf] extra is installed
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        trainers["tensorflow"] = lambda: ml.TensorflowTrainer(
            tf_loop, train_loop_config={"lr": 0.01, "epochs": 2},
            run_config=ml.RunConfig(name="quickstart-tensorflow"), **common)
    for name, make in trainers.items():
        metrics, hit = staged(f"train-{name}", lambda: make().fit().metrics)
        say(t0, f"trained {name}: train-logloss {metrics.get('train-logloss', float('nan')):.4f}", hit)

    def sweep():
        tuner = tune.Tuner(
            # ASHA stops trials at its rungs (rounds 5 and 20), and a stopped trial can still be the
            # best one: a checkpoint every 5 rounds gives every trial one where it stopped
            trainers["xgboost"](checkpoint_config=ml.CheckpointConfig(checkpoint_frequency=5)),
            param_space={"params": {"max_depth": tune.randint(2, 7), "eta": tune.loguniform(0.05, 0.5)}},
            tune_config=tune.TuneConfig(metric="valid-logloss", mode="min", num_samples=4,
                                        scheduler=tune.ASHAScheduler(max_t=30, grace_period=5)),
            run_config=ml.RunConfig(name="quickstart-tune"))
        best = tuner.fit().get_best_result()
        return best.config, best.metrics["valid-logloss"], best.checkpoint

    (config, loss, best_ckpt), hit = staged("tune", sweep)
    say(t0, f"tuned: best params {config.get('params', config)} valid-logloss {loss:.4f}", hit)

    onnx_ckpt, hit = staged("export", lambda: ml.export_onnx(best_ckpt, sample=df.head(256)), best_ckpt.path)
    meta = onnx_ckpt.get_metadata()
    say(t0, f"exported to ONNX: {onnx_ckpt.path} (parity max abs diff {meta['parity_max_abs_diff']:.2e}, "
            f"preprocessor folded: {meta.get('preprocessor_folded')})", hit)

    serve.onnx(onnx_ckpt, name="churn", max_batch_size=64)
    url = serve.status()["url"].rstrip("/")
    say(t0, f"serving {url}/v2/models/churn")

    import httpx

    headers = {"authorization": f"Bearer {os.environ['FABRIC_SERVE_TOKEN']}"} if os.environ.get(
        "FABRIC_SERVE_TOKEN") else {}
    with httpx.Client(timeout=60, trust_env=False, headers=headers) as http:
        model = http.get(f"{url}/v2/models/churn").json()
        rows = df.head(3)
        inputs = []
        dtypes = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32}
        for spec in model["inputs"]:  # the model's own metadata says each input's name, type and shape
            dt = dtypes[spec["datatype"]]
            col = rows[spec["name"]].to_numpy(dt) if spec["name"] in rows else rows[FEATURES].to_numpy(dt)
            shape = [len(rows)] + [d if d > 0 else 1 for d in spec["shape"][1:]] if spec["name"] in rows else \
                list(col.shape)
            inputs.append({"name": spec["name"], "datatype": spec["datatype"], "shape": shape,
                           "data": col.reshape(shape).tolist()})
        r = http.post(f"{url}/v2/models/churn/infer", json={"id": "quickstart", "inputs": inputs})
    if r.status_code != 200:
        raise SystemExit(f"the gateway answered {r.status_code}: {r.text}")
    answer = r.json()
    print(json.dumps(answer, indent=1))
    say(t0, f"answered over HTTP: {[o['name'] for o in answer['outputs']]} for {len(rows)} customers")
    serve.shutdown()
    return answer


if __name__ == "__main__":
    main()
