"""Training on a `fabric start` cluster joined by a second `fabric executor` (issue 11): each
executor has one CPU, so a 2-member gang has one member on each, and xgboost's collective and
torch.distributed run between the two executors' workers."""
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import fabric
from conftest import free_port, wait_for
from fabric import ml, settings

FABRIC = [sys.executable, "-m", "fabric.cli"]


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    home = str(tmp_path_factory.mktemp("home"))
    env = dict(os.environ, FABRIC_HOME=home)
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    r = subprocess.run(FABRIC + ["start", "--port", str(port), "--cpus", "1", "--detach"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    second = subprocess.Popen(FABRIC + ["executor", "--broker", address, "--cpus", "1"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    status = lambda: json.loads(subprocess.run(FABRIC + ["status", "--json"], env=env, capture_output=True,  # noqa: E731
                                               text=True, timeout=30).stdout or "{}")
    try:
        assert wait_for(lambda: len(status().get("executors", [])) == 2, timeout=60)
        fabric.shutdown()
        old = os.environ.get("FABRIC_HOME")
        os.environ["FABRIC_HOME"] = home  # this driver finds the cluster's keys there
        settings.reload()
        fabric.init(address=address)
        yield {"address": address, "status": status}
    finally:
        fabric.shutdown()
        if old is None:
            os.environ.pop("FABRIC_HOME", None)
        else:
            os.environ["FABRIC_HOME"] = old
        settings.reload()
        second.terminate()
        second.wait(10)
        subprocess.run(FABRIC + ["stop"], env=env, capture_output=True, timeout=60)


def frame(n=400):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, 4)).astype("float32")
    df = pd.DataFrame(x, columns=["a", "b", "c", "d"])
    df["y"] = (x[:, 0] - x[:, 2] > 0).astype("float32")
    return df


def test_xgboost_across_two_executors(started, tmp_path):
    df = frame()
    result = ml.XGBoostTrainer(params={"objective": "binary:logistic", "max_depth": 3}, label_column="y",
                               num_boost_round=5, datasets={"train": ml.from_pandas(df)},
                               scaling_config=ml.ScalingConfig(num_workers=2),
                               run_config=ml.RunConfig(name="x", storage_path=str(tmp_path), verbose=0)).fit()
    assert len(result.metrics_dataframe) == 5
    pred = ml.XGBoostPredictor.from_checkpoint(result.checkpoint).predict(df)
    assert ((pred["predictions"] > 0.5) == df["y"]).mean() > 0.9


def where_loop(config):
    import torch
    import torch.distributed as dist

    from fabric.ml import torch as mt

    ctx = ml.get_context()
    model = mt.prepare_model(torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for epoch in range(2):
        for b in ml.get_dataset_shard("train").iter_torch_batches(batch_size=100):
            x = torch.stack([b[c] for c in "abcd"], 1)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x)[:, 0], b["y"])
            opt.zero_grad()
            loss.backward()
            opt.step()
        # every rank's executor pid, gathered over gloo: the members run under two executors
        ppids = [None] * ctx.get_world_size()
        dist.all_gather_object(ppids, os.getppid())
        ml.report({"loss": loss.item(), "local_world": ctx.get_local_world_size(),
                   "executors": len(set(ppids))})


def test_torch_across_two_executors(started, tmp_path):
    result = ml.TorchTrainer(where_loop, datasets={"train": ml.from_pandas(frame())},
                             scaling_config=ml.ScalingConfig(num_workers=2),
                             run_config=ml.RunConfig(name="t", storage_path=str(tmp_path), verbose=0)).fit()
    hist = result.metrics_dataframe
    assert list(hist["executors"]) == [2, 2] and list(hist["local_world"]) == [1, 1]
