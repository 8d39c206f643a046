"""Predictors (issue 11): XGBoostPredictor and TorchPredictor from trainers' checkpoints, applying
the checkpoint's preprocessor, and BatchPredictor over a Dataset in warm instances."""
import os

import numpy as np
import pandas as pd
import pytest

import fabric
from fabric import ml

FEATURES = ["a", "b", "c"]


def frame(n=300, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype("float32") * [1.0, 10.0, 0.1] + [0.0, 5.0, 0.0]
    df = pd.DataFrame(x.astype("float32"), columns=FEATURES)
    df["y"] = ((df["a"] + (df["b"] - 5) / 10) > 0).astype("float32")
    return df


@pytest.fixture(scope="module")
def xgb_result(cluster, tmp_path_factory):
    df = frame()
    trainer = ml.XGBoostTrainer(params={"objective": "binary:logistic", "max_depth": 3}, label_column="y",
                                num_boost_round=6, datasets={"train": ml.from_pandas(df)},
                                preprocessor=ml.preprocessing.StandardScaler(["a", "b"]),
                                run_config=ml.RunConfig(name="p", storage_path=str(tmp_path_factory.mktemp("x")),
                                                        verbose=0))
    return trainer.fit()


def make_net():
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def torch_loop(config):
    import torch

    from fabric.ml import torch as mt

    model = mt.prepare_model(make_net())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for epoch in range(2):
        for b in ml.get_dataset_shard("train").iter_torch_batches(batch_size=50):
            x = torch.stack([b[c] for c in FEATURES], 1)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x)[:, 0], b["y"])
            opt.zero_grad()
            loss.backward()
            opt.step()
        ml.report({"loss": loss.item()}, checkpoint=mt.save_checkpoint(
            model, metadata={"feature_columns": FEATURES, "label_column": "y"}))


@pytest.fixture(scope="module")
def torch_result(cluster, tmp_path_factory):
    return ml.TorchTrainer(torch_loop, datasets={"train": ml.from_pandas(frame())},
                           preprocessor=ml.preprocessing.StandardScaler(["b"]),
                           run_config=ml.RunConfig(name="t", storage_path=str(tmp_path_factory.mktemp("t")),
                                                   verbose=0)).fit()


def test_xgboost_predictor_applies_the_checkpoints_preprocessor(xgb_result):
    df = frame(50, seed=3)
    pred = ml.XGBoostPredictor.from_checkpoint(xgb_result.checkpoint)
    assert pred.get_preprocessor().stats_["b"]["mean"] == pytest.approx(frame()["b"].mean(), rel=1e-4)
    out = pred.predict(df)
    assert list(out.columns) == ["predictions"] and len(out) == 50
    # the same as the booster on the scaled features, by hand
    import xgboost as xgb

    booster = ml.XGBoostTrainer.get_model(xgb_result.checkpoint)
    scaled = df.copy()
    for c in ("a", "b"):
        st = pred.get_preprocessor().stats_[c]
        scaled[c] = (scaled[c] - st["mean"]) / st["std"]
    want = booster.predict(xgb.DMatrix(scaled[FEATURES]))
    np.testing.assert_allclose(out["predictions"].to_numpy(), want, rtol=1e-5)
    # unscaled features would give other predictions: the preprocessor did run
    assert not np.allclose(booster.predict(xgb.DMatrix(df[FEATURES])), want)
    # numpy in (the checkpoint's feature order), dict of predictions out
    arr = pred.predict(df[FEATURES].to_numpy())
    np.testing.assert_allclose(arr["predictions"], want, rtol=1e-5)
    assert ((out["predictions"] > 0.5) == df["y"]).mean() > 0.8


def test_torch_predictor_from_model_full_and_from_state_dict(torch_result):
    df = frame(40, seed=5)
    full = ml.TorchPredictor.from_checkpoint(torch_result.checkpoint)
    given = ml.TorchPredictor.from_checkpoint(torch_result.checkpoint, model=make_net())
    a, b = full.predict(df), given.predict(df)
    np.testing.assert_allclose(a["predictions"], b["predictions"], rtol=1e-6)
    # by hand: the scaler, then the module
    import torch

    st = full.get_preprocessor().stats_["b"]
    x = df[FEATURES].copy()
    x["b"] = (x["b"] - st["mean"]) / st["std"]
    with torch.no_grad():
        want = full.model(torch.tensor(x.to_numpy(), dtype=torch.float32))[:, 0].numpy()
    np.testing.assert_allclose(a["predictions"].to_numpy(), want, rtol=1e-5)


def test_batch_predictor_scores_a_dataset_in_warm_instances(xgb_result):
    df = frame(400, seed=7)
    df["id"] = np.arange(len(df))
    ds = ml.from_pandas(df, override_num_blocks=4)
    out = ml.BatchPredictor.from_checkpoint(xgb_result.checkpoint, ml.XGBoostPredictor).predict(
        ds, feature_columns=FEATURES, keep_columns=["id", "y"], batch_size=64, concurrency=2)
    assert isinstance(out, ml.Dataset)
    got = out.to_pandas().sort_values("id")
    assert list(got["id"]) == list(range(400)) and set(got.columns) == {"predictions", "id", "y"}
    want = ml.XGBoostPredictor.from_checkpoint(xgb_result.checkpoint).predict(df[FEATURES])
    np.testing.assert_allclose(got["predictions"].to_numpy(), want["predictions"].to_numpy(), rtol=1e-5)


def test_predictor_bad_input(xgb_result, torch_result):
    with pytest.raises(ValueError, match="is a 'xgboost' checkpoint, not a 'torch' one"):
        ml.TorchPredictor.from_checkpoint(xgb_result.checkpoint)
    pred = ml.XGBoostPredictor.from_checkpoint(xgb_result.checkpoint)
    with pytest.raises(ValueError, match=r"lacks the model's feature columns \['c'\]"):
        pred.predict(frame(5).drop(columns=["c"]))
    bad = frame(5)
    bad["c"] = ["x"] * 5
    with pytest.raises(TypeError, match="feature column 'c' must be numeric"):
        pred.predict(bad)
    with pytest.raises(TypeError, match="takes a pandas DataFrame, a numpy array or a dict"):
        pred.predict([[1, 2, 3]])
    bp = ml.BatchPredictor.from_checkpoint(xgb_result.checkpoint, ml.XGBoostPredictor)
    with pytest.raises(TypeError, match="takes an ml.Dataset"):
        bp.predict(frame(5))
    with pytest.raises(ValueError, match=r"keep_columns \['nope'\] are not columns"):
        bp.predict(ml.from_pandas(frame(5)), keep_columns=["nope"])
    os.remove(os.path.join(torch_result.checkpoint.path, "model_full.pt"))
    with pytest.raises(ValueError, match="needs the module"):
        ml.TorchPredictor.from_checkpoint(torch_result.checkpoint)
    assert fabric.get(fabric.fn(lambda: 1).remote()) == 1
