"""fabric.ml training (issue 11): XGBoost and PyTorch on 2-member gangs of the embedded cluster,
reports, checkpoints, retention, a member SIGKILLed mid-fit, a driver that died, and bad input.

Real processes throughout: the gang's members are worker processes, xgboost's collective and
torch.distributed (gloo) run between them over TCP, checkpoints go to a real directory.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pandas as pd
import pytest

import fabric
from conftest import REPO, wait_for
from fabric import ml
from fabric.storage import StorageError
from fabric.ml.config import CheckpointConfig
from fabric.ml.result import TrainingFailedError
from fabric.ml.trainers.base import CheckpointKeeper

FEATURES = [f"f{i}" for i in range(4)]


def frame(n=400, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, len(FEATURES))).astype("float32")
    df = pd.DataFrame(x, columns=FEATURES)
    df["y"] = (x[:, 0] + 0.5 * x[:, 1] > 0).astype("float32")
    return df


def run_cfg(tmp_path, name, **kw):
    return ml.RunConfig(name=name, storage_path=str(tmp_path / "runs"), verbose=0, **kw)


# ---------------------------------------------------------------------- pure parts, no cluster
def test_configs_refuse_bad_values_with_clear_messages():
    with pytest.raises(ValueError, match="num_workers must be a whole number"):
        ml.ScalingConfig(num_workers=0)
    with pytest.raises(ValueError, match="unknown resource 'TPU'"):
        ml.ScalingConfig(resources_per_worker={"TPU": 1})
    s = ml.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 2})
    assert s.gang_options() == {"cpus": 2, "gpus": 0}
    assert ml.ScalingConfig(use_gpu=True).gang_options() == {"cpus": 1, "gpus": 1}
    with pytest.raises(ValueError, match="checkpoint_score_order must be 'max' or 'min'"):
        ml.CheckpointConfig(checkpoint_score_order="best")
    with pytest.raises(ValueError, match="max_failures"):
        ml.FailureConfig(max_failures=-2)
    with pytest.raises(ValueError, match="RunConfig.name"):
        ml.RunConfig(name="a/b")
    with pytest.raises(TypeError, match="checkpoint_config must be an ml.CheckpointConfig"):
        ml.RunConfig(checkpoint_config={"num_to_keep": 1})


def test_keeper_keeps_best_k_by_score_and_always_the_latest():
    k = CheckpointKeeper(CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="acc",
                                          checkpoint_score_order="max"))
    removed = []
    for i, acc in enumerate([0.5, 0.9, 0.7, 0.8, 0.1]):
        removed += [e["index"] for e in k.add({"path": f"c{i}", "index": i, "metrics": {"acc": acc}})]
    assert sorted(e["index"] for e in k.kept) == [1, 3, 4]  # best two (0.9, 0.8) + the latest
    assert sorted(removed) == [0, 2]
    k = CheckpointKeeper(CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="loss",
                                          checkpoint_score_order="min"))
    for i, loss in enumerate([3.0, 1.0, 2.0]):
        k.add({"path": f"c{i}", "index": i, "metrics": {"loss": loss}})
    assert sorted(e["index"] for e in k.kept) == [1, 2]
    k = CheckpointKeeper(CheckpointConfig(num_to_keep=2))
    for i in range(5):
        k.add({"path": f"c{i}", "index": i, "metrics": {}})
    assert [e["index"] for e in k.kept] == [3, 4]


def test_report_validates_metrics_and_needs_a_session():
    from fabric.ml import session

    assert session.check_metrics({"a": np.float32(0.5), "b": {"c": np.int64(3)}}) == {"a": 0.5, "b/c": 3}
    with pytest.raises(TypeError, match="metric 'acc' must be a number"):
        session.check_metrics({"acc": "high"})
    with pytest.raises(TypeError, match="metric 'v' must be a number"):
        session.check_metrics({"v": np.zeros(3)})
    with pytest.raises(RuntimeError, match="inside a training loop"):
        ml.report({"a": 1})
    assert ml.get_context().get_world_size() == 1 and ml.get_checkpoint() is None


def test_checkpoint_directory_round_trip(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    (d / "w.txt").write_text("weights")
    c = ml.Checkpoint.from_directory(str(d))
    c.set_metadata({"framework": "torch"})
    c.update_metadata({"label_column": "y"})
    assert c.get_metadata() == {"framework": "torch", "label_column": "y"}
    out = c.to_directory(str(tmp_path / "copy"))
    assert open(os.path.join(out, "w.txt")).read() == "weights"
    with c.as_directory() as local:
        assert local == str(d)
    import pickle

    assert pickle.loads(pickle.dumps(c)) == c


def test_missing_framework_names_the_pip_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "xgboost", None)  # what an uninstalled package looks like to import
    with pytest.raises(ml.MissingDependency, match=r"pip install 'fabric-compute\[ml\]'"):
        ml.XGBoostTrainer(params={}, label_column="y", datasets={})
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ml.MissingDependency, match=r"pip install 'fabric-compute\[torch\]'"):
        ml.TorchTrainer(lambda: None)


# ---------------------------------------------------------------------- loops run by the gangs
def torch_loop(config):
    import torch

    from fabric.ml import torch as mt

    torch.manual_seed(0)
    model = mt.prepare_model(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1)))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    start = 0
    ckpt = ml.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            mt.unwrap(model).load_state_dict(torch.load(os.path.join(d, "model.pt")))
            start = json.load(open(os.path.join(d, "epoch.json")))["epoch"] + 1
    shard = ml.get_dataset_shard("train")
    ctx = ml.get_context()
    for epoch in range(start, config["epochs"]):
        total = n = 0
        for b in shard.iter_torch_batches(batch_size=64):
            x = torch.stack([b[c] for c in FEATURES], 1)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x)[:, 0], b["y"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, n = total + loss.item(), n + 1
        ck = None
        if ctx.get_world_rank() == 0:
            ck = mt.save_checkpoint(model, metadata={"feature_columns": FEATURES, "label_column": "y"})
            json.dump({"epoch": epoch}, open(os.path.join(ck.path, "epoch.json"), "w"))
        ml.report({"loss": total / n, "epoch": epoch, "start": start, "rows": n,
                   "world": ctx.get_world_size()}, checkpoint=ck)
        kill = config.get("pid_file")
        if kill and epoch == 1 and ctx.get_world_rank() == 1 and not os.path.exists(kill):
            with open(kill + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.rename(kill + ".tmp", kill)
            time.sleep(120)  # killed here by the test


def killer(pid_file, killed):
    """SIGKILL the member whose pid appears in ``pid_file``."""
    def run():
        assert wait_for(lambda: os.path.exists(pid_file), timeout=120)
        pid = int(open(pid_file).read())
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _scratch_dirs():
    """The checkpoint folders fabric's helpers make in the temporary folder (workers share it)."""
    import glob
    import tempfile

    return {p for pre in ("fabric-xgb-", "fabric-torch-", "fabric-run-")
            for p in glob.glob(os.path.join(tempfile.gettempdir(), pre + "*"))}


def test_xgboost_two_workers_reports_every_dataset_and_checkpoints(cluster, tmp_path):
    df = frame(600)
    ds = ml.from_pandas(df)
    train, valid = ds.train_test_split(test_size=0.25, seed=1)
    trainer = ml.XGBoostTrainer(
        params={"objective": "binary:logistic", "tree_method": "hist", "eval_metric": ["logloss", "error"],
                "max_depth": 3},
        label_column="y", num_boost_round=8, datasets={"train": train, "valid": valid},
        scaling_config=ml.ScalingConfig(num_workers=2),
        preprocessor=ml.preprocessing.StandardScaler(["f0", "f1"]), run_config=run_cfg(tmp_path, "xgb"))
    before = _scratch_dirs()
    result = trainer.fit()
    assert result.error is None
    # the members' local checkpoint folders went with their run (report uploaded them)
    assert _scratch_dirs() - before == set()
    hist = result.metrics_dataframe
    assert list(hist["training_iteration"]) == list(range(1, 9))
    for col in ("train-logloss", "valid-logloss", "train-error", "valid-error"):
        assert col in hist.columns
    assert hist["train-logloss"].iloc[-1] < hist["train-logloss"].iloc[0]
    assert result.metrics["training_iteration"] == 8
    meta = result.checkpoint.get_metadata()
    assert meta["framework"] == "xgboost" and meta["label_column"] == "y" and meta["feature_columns"] == FEATURES
    assert meta["num_boosted_rounds"] == 8
    assert os.path.exists(os.path.join(result.checkpoint.path, "model.ubj"))
    assert os.path.exists(os.path.join(result.checkpoint.path, "preprocessor.pkl"))
    assert result.path == str(tmp_path / "runs" / "xgb")
    # distributed: the same model as ... a booster both members agreed on; it predicts well
    pred = ml.XGBoostPredictor.from_checkpoint(result.checkpoint).predict(df)
    assert ((pred["predictions"] > 0.5) == df["y"]).mean() > 0.9


def test_torch_two_workers_ddp_shards_and_checkpoints(cluster, tmp_path):
    df = frame(512)
    before = _scratch_dirs()
    result = ml.TorchTrainer(torch_loop, train_loop_config={"epochs": 3}, datasets={"train": ml.from_pandas(df)},
                             scaling_config=ml.ScalingConfig(num_workers=2),
                             run_config=run_cfg(tmp_path, "torch")).fit()
    assert _scratch_dirs() - before == set()  # save_checkpoint's folders were removed after upload
    hist = result.metrics_dataframe
    assert list(hist["epoch"]) == [0, 1, 2] and set(hist["world"]) == {2}
    assert set(hist["rows"]) == {4}  # each rank saw its half: 256 rows in batches of 64
    assert hist["loss"].iloc[-1] < hist["loss"].iloc[0]
    assert [os.path.basename(c.path) for c, _ in result.best_checkpoints] == [
        "checkpoint_000000", "checkpoint_000001", "checkpoint_000002"]
    assert result.checkpoint.get_metadata()["framework"] == "torch"
    for d in (tmp_path / "runs", tmp_path / "runs" / "torch", result.checkpoint.path):
        assert os.stat(d).st_mode & 0o077 == 0, d  # owner-only
    assert os.stat(tmp_path / "runs" / "torch" / "fabric_run.json").st_mode & 0o077 == 0
    pred = ml.TorchPredictor.from_checkpoint(result.checkpoint).predict(df)
    assert ((pred["predictions"] > 0) == df["y"]).mean() > 0.85


def test_num_to_keep_deletes_the_others_from_storage(cluster, tmp_path):
    def loop(config):
        import tempfile

        for i in range(4):
            d = tempfile.mkdtemp()
            ml.report({"score": [1, 5, 3, 2][i]}, checkpoint=ml.Checkpoint.from_directory(d))

    result = ml.TorchTrainer(loop, scaling_config=ml.ScalingConfig(num_workers=2), run_config=run_cfg(
        tmp_path, "keep", checkpoint_config=ml.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="score"))
    ).fit()
    on_disk = sorted(n for n in os.listdir(tmp_path / "runs" / "keep") if n.startswith("checkpoint_"))
    assert on_disk == ["checkpoint_000001", "checkpoint_000003"]  # best (5) and the latest
    assert sorted(m["score"] for _, m in result.best_checkpoints) == [2, 5]
    assert os.path.basename(result.checkpoint.path) == "checkpoint_000003"
    assert result.get_best_checkpoint("score", "max").path.endswith("checkpoint_000001")


def test_member_killed_mid_fit_restarts_gang_from_latest_checkpoint(cluster, tmp_path):
    pid_file = str(tmp_path / "victim.pid")
    killed = []
    t = killer(pid_file, killed)
    result = ml.TorchTrainer(
        torch_loop, train_loop_config={"epochs": 4, "pid_file": pid_file},
        datasets={"train": ml.from_pandas(frame(256))}, scaling_config=ml.ScalingConfig(num_workers=2),
        run_config=run_cfg(tmp_path, "ft", failure_config=ml.FailureConfig(max_failures=1))).fit()
    t.join(5)
    assert killed
    hist = result.metrics_dataframe
    # epochs 0 and 1 before the kill; the restarted gang resumed at epoch 2 from checkpoint_000001
    assert list(hist["epoch"]) == [0, 1, 2, 3]
    assert list(hist["start"]) == [0, 0, 2, 2]
    assert os.path.basename(result.checkpoint.path) == "checkpoint_000003"
    assert not psutil_alive(killed[0])


def psutil_alive(pid):
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_member_killed_beyond_max_failures_names_rank_and_cause(cluster, tmp_path):
    pid_file = str(tmp_path / "victim.pid")
    killed = []
    killer(pid_file, killed)
    trainer = ml.TorchTrainer(torch_loop, train_loop_config={"epochs": 4, "pid_file": pid_file},
                              datasets={"train": ml.from_pandas(frame(128))},
                              scaling_config=ml.ScalingConfig(num_workers=2), run_config=run_cfg(tmp_path, "ft0"))
    with pytest.raises(TrainingFailedError, match=r"worker rank 1 died .*max_failures=0") as e:
        trainer.fit()
    assert isinstance(e.value.__cause__, fabric.GangFailed)
    assert e.value.rank == 1
    assert e.value.result.checkpoint.path.endswith("checkpoint_000001")  # what was saved stays usable
    assert fabric.get(square.remote(3)) == 9  # the cluster keeps serving


@fabric.fn
def square(x):
    return x * x


def xgb_loop(config):
    """The Ray 2.60 form: the loop calls xgboost.train inside the collective fabric set up."""
    import xgboost as xgb

    from fabric.ml.trainers.xgboost import ReportCallback, load_model

    df = ml.get_dataset_shard("train").to_pandas()
    dtrain = xgb.DMatrix(df[FEATURES], label=df["y"])
    booster, done = None, 0
    ckpt = ml.get_checkpoint()
    if ckpt is not None:
        booster = load_model(ckpt)
        done = booster.num_boosted_rounds()
    ctx = ml.get_context()

    class Victim(xgb.callback.TrainingCallback):
        def after_iteration(self, model, epoch, evals_log):
            pid_file = config.get("pid_file")
            if pid_file and model.num_boosted_rounds() == 5 and ctx.get_world_rank() == 1 \
                    and not os.path.exists(pid_file):
                with open(pid_file + ".tmp", "w") as f:
                    f.write(str(os.getpid()))
                os.rename(pid_file + ".tmp", pid_file)
                time.sleep(120)
            return False

    xgb.train({"objective": "binary:logistic", "eval_metric": "logloss", "max_depth": 2}, dtrain,
              num_boost_round=config["rounds"] - done, evals=[(dtrain, "train")], xgb_model=booster,
              callbacks=[ReportCallback(frequency=2, label_column="y", feature_columns=FEATURES,
                                        num_boost_round=config["rounds"]), Victim()])


def test_xgboost_loop_form_resumes_its_booster_after_a_kill(cluster, tmp_path):
    pid_file = str(tmp_path / "victim.pid")
    killed = []
    killer(pid_file, killed)
    result = ml.XGBoostTrainer(
        train_loop_per_worker=xgb_loop, train_loop_config={"rounds": 8, "pid_file": pid_file},
        datasets={"train": ml.from_pandas(frame(300))}, scaling_config=ml.ScalingConfig(num_workers=2),
        run_config=run_cfg(tmp_path, "xgbft", failure_config=ml.FailureConfig(max_failures=2),
                           checkpoint_config=ml.CheckpointConfig(num_to_keep=2))).fit()
    assert killed
    booster = ml.XGBoostTrainer.get_model(result.checkpoint)
    assert booster.num_boosted_rounds() == 8
    loss = list(result.metrics_dataframe["train-logloss"])
    # rounds 1-5 reported before the kill (during round 6), then rounds 5-8 again from the
    # checkpoint of round 4: the resumed booster's round 5 is the first one's, exactly
    assert len(loss) == 9, result.metrics_dataframe
    assert loss[5] == pytest.approx(loss[4], rel=1e-6) and loss[8] < loss[4]
    on_disk = sorted(x for x in os.listdir(tmp_path / "runs" / "xgbft") if x.startswith("checkpoint_"))
    assert len(on_disk) == 2


DRIVER = """
import os, sys, json, time
sys.path.insert(0, {tests!r})
import fabric
from fabric import ml
from fabric.storage import StorageError
from test_ml_train import frame, dying_driver_loop
result = ml.TorchTrainer(dying_driver_loop, train_loop_config={{"driver": os.getpid(), "run_dir": {run_dir!r}}},
                         scaling_config=ml.ScalingConfig(num_workers=2),
                         run_config=ml.RunConfig(name="phoenix", storage_path={storage!r}, verbose=0)).fit()
print("finished", result.metrics)
"""


def dying_driver_loop(config):
    import tempfile

    ckpt = ml.get_checkpoint()
    start = 0
    if ckpt is not None:
        start = json.load(open(os.path.join(ckpt.path, "i.json")))["i"] + 1
    for i in range(start, 5):
        d = tempfile.mkdtemp()
        json.dump({"i": i}, open(os.path.join(d, "i.json"), "w"))
        ml.report({"i": i, "start": start}, checkpoint=ml.Checkpoint.from_directory(d))
        if i == 2 and ml.get_context().get_world_rank() == 0 and config.get("driver"):
            record = os.path.join(config["run_dir"], "fabric_run.json")
            # once the driver has recorded checkpoint 2, kill it (and with it its embedded cluster)
            wait_for_record = time.time() + 60
            while time.time() < wait_for_record:
                try:
                    # the record exists before the first checkpoint, with "latest": null
                    if (json.load(open(record)).get("latest") or "").endswith("checkpoint_000002"):
                        break
                except (OSError, ValueError):
                    pass
                time.sleep(0.05)
            os.kill(config["driver"], signal.SIGKILL)
            time.sleep(120)


def test_rerun_after_the_driver_died_resumes_from_the_latest_checkpoint(cluster, tmp_path):
    storage = str(tmp_path / "runs")
    run_dir = os.path.join(storage, "phoenix")
    script = DRIVER.format(tests=os.path.join(REPO, "tests"), run_dir=run_dir, storage=storage)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, cwd=REPO)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stdout, r.stderr[-3000:])
    assert "finished" not in r.stdout
    assert json.load(open(os.path.join(run_dir, "fabric_run.json")))["status"] == "running"
    result = ml.TorchTrainer(dying_driver_loop, train_loop_config={},
                             scaling_config=ml.ScalingConfig(num_workers=2),
                             run_config=ml.RunConfig(name="phoenix", storage_path=storage, verbose=0)).fit()
    hist = result.metrics_dataframe
    assert list(hist["i"]) == [0, 1, 2, 3, 4]  # the first driver's reports are kept in the record
    assert list(hist["start"]) == [0, 0, 0, 3, 3]
    assert os.path.basename(result.checkpoint.path) == "checkpoint_000004"
    assert json.load(open(os.path.join(run_dir, "fabric_run.json")))["status"] == "finished"


def test_fit_for_tune_stops_cleanly_when_on_report_says_so(cluster, tmp_path):
    def loop(config):
        for i in range(50):
            ml.report({"i": i, "lr": config["lr"]})

    seen = []

    def on_report(metrics, checkpoint):
        seen.append(metrics["i"])
        return metrics["i"] >= 2

    trainer = ml.TorchTrainer(loop, train_loop_config={"lr": 0.1}, scaling_config=ml.ScalingConfig(num_workers=2))
    result = trainer._fit_for_tune({"lr": 0.5}, on_report, "trial_0", str(tmp_path / "tune"))
    assert result.error is None
    assert result.metrics["lr"] == 0.5
    # reports after the one that said stop are not the run's (the members see the stop at their next
    # barrier, and a few reports may be on their way by then)
    assert seen == [0, 1, 2] and result.metrics["i"] == 2
    assert list(result.metrics_dataframe["i"]) == [0, 1, 2]
    assert result.path == str(tmp_path / "tune" / "trial_0")


# ---------------------------------------------------------------------- bad input
def test_unknown_label_column(cluster, tmp_path):
    trainer = ml.XGBoostTrainer(params={}, label_column="target", datasets={"train": ml.from_pandas(frame(50))},
                                run_config=run_cfg(tmp_path, "bad"))
    with pytest.raises(ValueError, match=r"label_column 'target' is not a column of datasets\['train'\]"):
        trainer.fit()


def test_dataset_that_is_not_a_dataset():
    with pytest.raises(TypeError, match=r"datasets\['train'\] must be an ml.Dataset.*ml.from_pandas"):
        ml.XGBoostTrainer(params={}, label_column="y", datasets={"train": frame(10)})
    with pytest.raises(TypeError, match="datasets must be a dict"):
        ml.TorchTrainer(torch_loop, datasets=[frame(10)])


def test_more_workers_than_the_cluster_can_ever_hold_fails_fast(cluster, tmp_path):
    def loop():
        ml.report({"x": 1})

    t0 = time.monotonic()
    with pytest.raises(fabric.Unschedulable, match=r"num_workers=5"):
        ml.TorchTrainer(loop, scaling_config=ml.ScalingConfig(num_workers=5),
                        run_config=run_cfg(tmp_path, "big")).fit()
    assert time.monotonic() - t0 < 60  # not a wait: refused at once (generous bound on a loaded CI box)
    assert fabric.get(square.remote(4)) == 16


def test_non_numeric_metric_fails_the_run_naming_the_metric(cluster, tmp_path):
    def loop():
        ml.report({"acc": "great"})

    with pytest.raises(TrainingFailedError, match=r"rank [01] of 2: TypeError: report\(\): metric 'acc'") as e:
        ml.TorchTrainer(loop, scaling_config=ml.ScalingConfig(num_workers=2), run_config=run_cfg(tmp_path, "nn")).fit()
    assert isinstance(e.value.__cause__, TypeError)


def test_unwritable_storage_path(cluster, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    trainer = ml.TorchTrainer(torch_loop, run_config=ml.RunConfig(name="x", storage_path=str(blocker / "sub")))
    with pytest.raises(StorageError, match="cannot write the run's folder"):
        trainer.fit()


def test_train_loop_that_raises_gives_the_users_exception_with_rank_and_traceback(cluster, tmp_path):
    def loop(config):
        if ml.get_context().get_world_rank() == 1:
            raise ZeroDivisionError("rank one divided by zero")
        ml.report({"ok": 1})

    with pytest.raises(TrainingFailedError, match="raised on rank 1 of 2: ZeroDivisionError") as e:
        ml.TorchTrainer(loop, scaling_config=ml.ScalingConfig(num_workers=2), run_config=run_cfg(tmp_path, "r")).fit()
    cause = e.value.__cause__
    assert isinstance(cause, ZeroDivisionError) and "rank one divided by zero" in str(cause)
    remote = str(cause) + str(getattr(cause, "__cause__", "") or "")
    assert "test_ml_train.py" in remote  # the remote traceback names the loop's file
    # tune's form: the error is in the Result, not raised
    r = ml.TorchTrainer(loop, scaling_config=ml.ScalingConfig(num_workers=2))._fit_for_tune(
        {}, lambda m, c: False, "t", str(tmp_path / "tune"))
    assert isinstance(r.error, TrainingFailedError)
    assert fabric.get(square.remote(5)) == 25
