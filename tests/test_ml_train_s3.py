"""Training checkpoints through S3 (issue 11): a moto server over HTTP (the session's) is
the store. Checkpoints are written there by the gang's members, kept/deleted there by the driver,
read back by predictors and by a run that resumes from one. Also the default storage: the
cluster's store (``FABRIC_STORE=s3://...``) when ``RunConfig.storage_path`` is not given."""
import json
import os
import uuid

import numpy as np
import pandas as pd
import pytest

import fabric
from conftest import AWS_TEST_ENV as AWS_ENV
from fabric import ml

try:
    import boto3
    import moto.server  # noqa: F401
    import s3fs  # noqa: F401
    SKIP = None
except ImportError as e:  # pragma: no cover
    SKIP = f"needs s3fs, boto3 and moto[server] (pip install 'fabric-compute[test]'): {e}"

BUCKET = "fabric-ml"


@pytest.fixture(scope="module")
def s3(moto_server):
    """A moto S3 server and, started after the AWS and store variables are set (so its workers
    inherit them), an embedded cluster whose default store is a bucket prefix there."""
    if SKIP:
        pytest.skip(SKIP)
    endpoint = moto_server
    with pytest.MonkeyPatch.context() as mp:
        for k, v in AWS_ENV.items():
            mp.setenv(k, v)
        for k in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(k, raising=False)
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket=BUCKET)
        prefix = uuid.uuid4().hex
        mp.setenv("FABRIC_STORE", f"s3://{BUCKET}/{prefix}")
        mp.setenv("FABRIC_STORE_OPTIONS", json.dumps({"endpoint_url": endpoint}))
        fabric.shutdown()
        fabric.init(num_cpus=2)
        try:
            yield {"endpoint": endpoint, "client": client, "prefix": prefix,
                   "options": {"endpoint_url": endpoint}}
        finally:
            fabric.shutdown()


def keys(s3, prefix):
    out = []
    for page in s3["client"].get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        out += [o["Key"] for o in page.get("Contents", [])]
    return out


def frame(n=300):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 3)).astype("float32")
    df = pd.DataFrame(x, columns=["a", "b", "c"])
    df["y"] = (x[:, 0] > 0).astype("float32")
    return df


def test_xgboost_checkpoints_round_trip_through_s3(s3, tmp_path):
    url = f"s3://{BUCKET}/explicit"
    df = frame()
    result = ml.XGBoostTrainer(
        params={"objective": "binary:logistic", "max_depth": 2}, label_column="y", num_boost_round=6,
        datasets={"train": ml.from_pandas(df)}, scaling_config=ml.ScalingConfig(num_workers=2),
        preprocessor=ml.preprocessing.MinMaxScaler(["b"]),
        run_config=ml.RunConfig(name="xgb", storage_path=url, storage_options=s3["options"], verbose=0,
                                checkpoint_config=ml.CheckpointConfig(num_to_keep=1, checkpoint_frequency=2))).fit()
    assert result.checkpoint.path == f"{url}/xgb/checkpoint_000002"
    stored = keys(s3, "explicit/xgb/")
    # rounds 2, 4, 6 were checkpointed; only the latest is kept, the others were deleted from S3
    assert sorted({k.split("/")[2] for k in stored}) == ["checkpoint_000002", "fabric_run.json"]
    assert {"explicit/xgb/checkpoint_000002/model.ubj", "explicit/xgb/checkpoint_000002/preprocessor.pkl",
            "explicit/xgb/checkpoint_000002/fabric_checkpoint.json"} <= set(stored)
    assert result.checkpoint.get_metadata()["framework"] == "xgboost"
    # predictors read it straight from S3 (its preprocessor too)
    pred = ml.XGBoostPredictor.from_checkpoint(result.checkpoint)
    assert pred.get_preprocessor().stats_["b"]["max"] == pytest.approx(float(df["b"].max()))
    assert ((pred.predict(df)["predictions"] > 0.5) == df["y"]).mean() > 0.9
    local = result.checkpoint.to_directory(str(tmp_path / "copy"))
    assert sorted(os.listdir(local)) == ["fabric_checkpoint.json", "model.ubj", "preprocessor.pkl"]
    again = ml.Result.from_path(f"{url}/xgb", s3["options"])
    assert again.checkpoint == result.checkpoint and again.metrics["training_iteration"] == 6


def counting_loop(config):
    import tempfile

    ckpt = ml.get_checkpoint()
    start = 0
    if ckpt is not None:
        with ckpt.as_directory() as d:  # downloaded from S3 in the member
            start = json.load(open(os.path.join(d, "n.json")))["n"] + 1
    for n in range(start, start + 2):
        d = tempfile.mkdtemp()
        json.dump({"n": n}, open(os.path.join(d, "n.json"), "w"))
        ml.report({"n": n, "start": start}, checkpoint=ml.Checkpoint.from_directory(d)
                  if ml.get_context().get_world_rank() == 0 else None)


def test_default_storage_is_the_clusters_s3_store_and_runs_resume_from_it(s3):
    first = ml.TorchTrainer(counting_loop, scaling_config=ml.ScalingConfig(num_workers=2),
                            run_config=ml.RunConfig(name="count", verbose=0)).fit()
    base = f"s3://{BUCKET}/{s3['prefix']}/ml/count"
    assert first.checkpoint.path == f"{base}/checkpoint_000001"
    assert f"{s3['prefix']}/ml/count/checkpoint_000001/n.json" in keys(s3, s3["prefix"])
    second = ml.TorchTrainer(counting_loop, scaling_config=ml.ScalingConfig(num_workers=2),
                             resume_from_checkpoint=first.checkpoint,
                             run_config=ml.RunConfig(name="count2", verbose=0)).fit()
    assert list(second.metrics_dataframe["n"]) == [2, 3]
    assert second.checkpoint.path == f"{base}2/checkpoint_000001"
