"""TensorflowTrainer: 2 workers on the embedded cluster with MultiWorkerMirroredStrategy (TF_CONFIG
from the gang): a custom step on plain tf.Variables, and plain Keras ``compile(); fit()`` with the
callback's reports and checkpoints (fabric.ml.tensorflow.fix_keras_multi_worker mends Keras 3's
fit under MWMS), then the checkpoint exported to ONNX and predicted with TensorflowPredictor and
OnnxPredictor."""
import importlib.util
import json

import numpy as np
import pandas as pd
import pytest

import fabric
from fabric import ml
from fabric.ml import preprocessing as P
from fabric.ml.result import TrainingFailedError

if importlib.util.find_spec("tensorflow") is None:
    pytest.skip("the [tf] extra (tensorflow) is not installed", allow_module_level=True)

# frameworks import slowly (tens of seconds per process on a loaded 2-core machine)
pytestmark = [pytest.mark.usefixtures("cluster"), pytest.mark.timeout(600)]


def frame(n=256, seed=0):
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"a": rng.normal(size=n), "b": rng.normal(3, 2, n)})
    df["y"] = (2 * df["a"] - 0.5 * df["b"] + 1).astype(np.float32)
    return df


def mwms_loop(config):
    """MultiWorkerMirroredStrategy with a custom step on plain tf.Variables: the TF_CONFIG ring
    without Keras in the way."""
    import json
    import os
    import tempfile

    import keras
    import tensorflow as tf

    from fabric import ml

    workers = json.loads(os.environ["TF_CONFIG"])["cluster"]["worker"]
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    assert strategy.num_replicas_in_sync == len(workers) == 2
    with strategy.scope():   # plain tf.Variables: Keras 3's own variables do not mirror under MWMS
        w = tf.Variable(tf.zeros((2, 1)))
        b = tf.Variable(tf.zeros((1,)))
    data = ml.get_dataset_shard("train").to_tf("x", "y", batch_size=32)  # auto-shard OFF: a shard already
    dist = strategy.experimental_distribute_dataset(data)
    lr = config["lr"]

    @tf.function
    def step(x, y):
        def replica(x, y):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean((tf.matmul(x, w)[:, 0] + b[0] - y) ** 2)
            gw, gb = tape.gradient(loss, [w, b])
            ctx = tf.distribute.get_replica_context()
            gw, gb = ctx.all_reduce("MEAN", gw), ctx.all_reduce("MEAN", gb)
            w.assign_sub(lr * gw)
            b.assign_sub(lr * gb)
            return loss
        return strategy.reduce("MEAN", strategy.run(replica, (x, y)), axis=None)

    for epoch in range(config["epochs"]):
        losses = [float(step(x, y)) for x, y in dist]
        # the all-reduced weights are the same on every rank: report both ranks' sums
        ml.report({"loss": sum(losses) / len(losses), "epoch": epoch, "w_sum": float(tf.reduce_sum(w))})
    if ml.get_context().get_world_rank() == 0:
        assert os.environ["TF_CONFIG"] and tempfile.gettempdir()


def fit_loop(config):
    """Plain Keras, as in TensorFlow's multi-worker tutorial: the model built and compiled in the
    strategy's scope, then fit() on this worker's shard with fabric's callback."""
    import json
    import os

    import keras
    import numpy as np
    import tensorflow as tf

    from fabric import ml
    from fabric.ml.tensorflow import ReportCheckpointCallback

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        inp = keras.Input((2,), name="x")
        model = keras.Model(inp, keras.layers.Dense(1)(keras.layers.Dense(8, activation="relu")(inp)))
        model.compile(optimizer=keras.optimizers.Adam(config["lr"]), loss="mse", metrics=["mae"])
    data = ml.get_dataset_shard("train").to_tf("x", "y", batch_size=32)
    model.fit(data, epochs=config["epochs"], verbose=0, callbacks=[ReportCheckpointCallback(metrics=["loss", "mae"])])
    rank = ml.get_context().get_world_rank()
    with open(os.path.join(config["out"], f"rank{rank}.json"), "w") as f:
        json.dump({"replicas": strategy.num_replicas_in_sync,
                   "weights": [np.asarray(w).ravel().tolist() for w in model.get_weights()]}, f)


def pre():
    return P.Chain(P.StandardScaler(["a", "b"]), P.Concatenator(["a", "b"], output_column_name="x"))


def test_two_workers_with_multi_worker_mirrored_strategy(tmp_path):
    trainer = ml.TensorflowTrainer(mwms_loop, train_loop_config={"lr": 0.1, "epochs": 3},
                                   datasets={"train": ml.from_pandas(frame())}, preprocessor=pre(),
                                   scaling_config=ml.ScalingConfig(num_workers=2),
                                   run_config=ml.RunConfig(name="tf2", storage_path=str(tmp_path)))
    result = trainer.fit()
    losses = result.metrics_dataframe["loss"].tolist()
    assert len(losses) == 3 and losses[-1] < losses[0]


def test_keras_fit_on_two_workers_callback_checkpoint_predict_and_export(tmp_path):
    """Each rank's shard differs; MWMS all-reduces the gradients, so both ranks end with the same
    weights, and those fit the whole data."""
    df = frame()
    trainer = ml.TensorflowTrainer(fit_loop, train_loop_config={"lr": 0.05, "epochs": 4, "out": str(tmp_path)},
                                   datasets={"train": ml.from_pandas(df)}, preprocessor=pre(),
                                   scaling_config=ml.ScalingConfig(num_workers=2),
                                   run_config=ml.RunConfig(name="tfk", storage_path=str(tmp_path)))
    result = trainer.fit()
    hist = result.metrics_dataframe
    assert len(hist) == 4 and hist["loss"].iloc[-1] < hist["loss"].iloc[0] and "mae" in hist.columns
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["replicas"] == ranks[1]["replicas"] == 2
    for a, b in zip(ranks[0]["weights"], ranks[1]["weights"]):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    ck = result.checkpoint
    assert ck.get_metadata()["framework"] == "tensorflow" and ck.exists("model.keras")

    native = ml.TensorflowPredictor.from_checkpoint(ck).predict(df.drop(columns=["y"]))
    assert len(native) == len(df) and list(native.columns) == ["predictions"]
    mse = float(np.mean((native["predictions"].to_numpy() - df["y"].to_numpy()) ** 2))
    assert mse < 0.8 * float(np.var(df["y"])), mse   # learnt from both shards' gradients
    out = ml.export_onnx(ck, sample=df, feature_columns=["x"], label_column="y")
    meta = out.get_metadata()
    assert meta["preprocessor_folded"] and meta["input_names"] == ["a", "b"]
    got = ml.OnnxPredictor.from_checkpoint(out).predict(df.head(20))
    assert list(got.columns) == ["predictions"]
    np.testing.assert_allclose(np.asarray(got["predictions"], dtype=np.float64),
                               np.asarray(native["predictions"].head(20), dtype=np.float64), rtol=1e-5, atol=1e-5)


def test_a_loop_that_fails_names_the_error(tmp_path):
    def bad(config):
        raise ValueError("no such layer: Densee")

    trainer = ml.TensorflowTrainer(bad, scaling_config=ml.ScalingConfig(num_workers=2),
                                   run_config=ml.RunConfig(name="tfbad", storage_path=str(tmp_path)))
    with pytest.raises(TrainingFailedError, match=r"TensorflowTrainer: the training loop raised on rank [01] of 2: "
                       r"ValueError: no such layer: Densee") as e:
        trainer.fit()
    assert isinstance(e.value.__cause__, ValueError)
    assert fabric.fn(lambda: 1).remote().result(timeout=60) == 1
