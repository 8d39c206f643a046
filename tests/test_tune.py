"""fabric.ml.tune on real clusters: sweeps with each scheduler and searcher on the embedded
cluster and on a `fabric start` cluster, Trainer sweeps, bad input, and a restore after the
driver is SIGKILLed mid-sweep."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import fabric
from conftest import REPO, free_port, wait_for
from fabric.ml import RunConfig, tune
from fabric.ml.tune import schedulers as SC

FABRIC = [sys.executable, "-m", "fabric.cli"]


@pytest.fixture(scope="module", autouse=True)
def _cluster(cluster):
    # the sweeps read the cluster's size (max_concurrent_trials): let its executor register first
    assert wait_for(lambda: fabric.cluster_status()["executors"], timeout=60)
    yield cluster


def quad(config):
    for i in range(10):
        tune.report({"loss": (config["x"] - 3) ** 2 / (i + 1), "iter": i})


def _tc(**kw):
    kw.setdefault("progress", False)
    return tune.TuneConfig(**kw)


def _rc(tmp_path, name="sweep", **kw):
    return RunConfig(name=name, storage_path=str(tmp_path), **kw)


def test_fifo_grid_and_random_sweep(tmp_path):
    space = {"x": tune.uniform(0, 6), "g": tune.grid_search(["a", "b"]), "nested": {"k": tune.choice([1, 2])}}
    grid = tune.Tuner(quad, param_space=space, tune_config=_tc(metric="loss", mode="min", num_samples=4),
                      run_config=_rc(tmp_path)).fit()
    assert len(grid) == 8 and grid.num_errors == 0
    df = grid.get_dataframe()
    assert set(df["status"]) == {"TERMINATED"} and list(df["training_iteration"]) == [10] * 8
    assert sorted(df["config/g"]) == ["a"] * 4 + ["b"] * 4 and set(df["config/nested/k"]) <= {1, 2}
    best = grid.get_best_result()
    assert best.metrics["loss"] == pytest.approx(min(df["loss"]))
    assert best.config["x"] == pytest.approx((best.metrics["loss"] * 10) ** 0.5 + 3) or \
        best.config["x"] == pytest.approx(3 - (best.metrics["loss"] * 10) ** 0.5)
    assert len(best.metrics_dataframe) == 10
    # the experiment's state is in the store: one record per trial
    assert sorted(os.listdir(tmp_path / "sweep" / "trials")) == sorted(f"{t}.json" for t in df["trial_id"])


def test_asha_stops_bad_trials_early(tmp_path):
    sched = tune.ASHAScheduler(max_t=10, grace_period=1, reduction_factor=3)
    grid = tune.Tuner(quad, param_space={"x": tune.uniform(0, 6)},
                      tune_config=_tc(metric="loss", mode="min", num_samples=24, scheduler=sched, seed=1),
                      run_config=_rc(tmp_path)).fit()
    df = grid.get_dataframe()
    stopped, done = df[df.status == "STOPPED"], df[df.status == "TERMINATED"]
    assert len(stopped) > 0 and len(done) > 0 and len(stopped) + len(done) == 24
    assert (stopped.training_iteration < 10).all() and (done.training_iteration == 10).all()
    assert set(stopped.training_iteration) <= {1, 3, 9}          # stopped at a rung
    best = grid.get_best_result()
    assert best.metrics["training_iteration"] == 10


@pytest.mark.parametrize("sched", [
    lambda: tune.HyperBandScheduler(max_t=9, grace_period=1, reduction_factor=3),
    lambda: tune.MedianStoppingRule(time_attr="training_iteration", grace_period=2, min_samples_required=2),
])
def test_hyperband_and_median_stopping(tmp_path, sched):
    grid = tune.Tuner(quad, param_space={"x": tune.uniform(0, 6)},
                      tune_config=_tc(metric="loss", mode="min", num_samples=16, scheduler=sched(), seed=3,
                                      max_concurrent_trials=1),
                      run_config=_rc(tmp_path)).fit()
    df = grid.get_dataframe()
    assert grid.num_errors == 0 and len(df) == 16
    assert (df.status == "STOPPED").any() and (df.status == "TERMINATED").any()
    assert (df[df.status == "STOPPED"].training_iteration < 10).all()


def pbt_trainable(config):
    """Adds lr to w each step. The two trials step together (a file barrier), so the driver sees
    both scores at every perturbation point, whatever the machine's timing."""
    ckpt = tune.get_checkpoint()
    w = 0.0
    if ckpt is not None:
        with ckpt.as_directory() as d:
            w = json.load(open(os.path.join(d, "w.json")))["w"]
    me = tune.get_context().get_trial_id()
    for step in range(6):
        w += config["lr"]
        import tempfile
        d = tempfile.mkdtemp()
        json.dump({"w": w}, open(os.path.join(d, "w.json"), "w"))
        tune.report({"w": w, "lr": config["lr"]}, checkpoint=tune.Checkpoint.from_directory(d))
        open(os.path.join(config["dir"], f"{me}.{step}"), "w").close()
        while len([n for n in os.listdir(config["dir"]) if n.endswith(f".{step}")]) < 2:
            time.sleep(0.01)  # wait for the other trial's step (an event on disk)


def test_pbt_restarts_the_worst_from_the_best_checkpoint(tmp_path):
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    pbt = tune.PopulationBasedTraining(time_attr="training_iteration", perturbation_interval=2,
                                       hyperparam_mutations={"lr": [0.1, 1.0, 10.0]}, quantile_fraction=0.5,
                                       resample_probability=0.0, seed=0)
    grid = tune.Tuner(pbt_trainable, param_space={"lr": tune.grid_search([0.1, 10.0]), "dir": str(barrier)},
                      tune_config=_tc(metric="w", mode="max", scheduler=pbt, max_concurrent_trials=2),
                      run_config=_rc(tmp_path)).fit()
    assert grid.num_errors == 0, grid.errors
    assert pbt.num_perturbations >= 1
    t = next(t for t in grid.trials if t.history[0]["lr"] == 0.1)
    assert t.restarts >= 1
    its = [h["training_iteration"] for h in t.history]
    assert its == list(range(1, len(its) + 1))   # iterations continue across the restart
    # after exploiting, w continued from the donor's weights (lr 10 per step), not from its own
    first = next(i for i, h in enumerate(t.history) if h["lr"] != 0.1)
    assert t.history[first]["w"] > t.history[first - 1]["w"] + 10.0


def test_optuna_search_sweep(tmp_path):
    def objective(config):
        tune.report({"loss": (config["x"] - 2) ** 2 + config["n"]})

    grid = tune.Tuner(objective, param_space={"x": tune.uniform(-10, 10), "n": tune.randint(0, 3)},
                      tune_config=_tc(metric="loss", mode="min", num_samples=25,
                                      search_alg=tune.OptunaSearch(seed=0), max_concurrent_trials=1),
                      run_config=_rc(tmp_path)).fit()
    assert len(grid) == 25 and grid.num_errors == 0
    # one trial at a time, so TPE sees every result before it suggests the next and a seeded
    # study suggests the same points each run (with trials in flight, which results it has seen
    # depends on timing, and the best of 25 landed at 1.003 once)
    best = grid.get_best_result().metrics["loss"]
    assert best < 1.0


def test_optuna_pruning_fed_by_reports(tmp_path):
    import optuna

    def slow_bad(config):
        for i in range(1, 6):
            tune.report({"loss": config["x"] * 10 + 1.0 / i})

    search = tune.OptunaSearch(seed=1, pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0))
    grid = tune.Tuner(slow_bad, param_space={"x": tune.uniform(0, 1)},
                      tune_config=_tc(metric="loss", mode="min", num_samples=12, search_alg=search,
                                      max_concurrent_trials=1),
                      run_config=_rc(tmp_path)).fit()
    df = grid.get_dataframe()
    assert (df.status == "STOPPED").any()
    states = [t.state for t in search.study.trials]
    assert optuna.trial.TrialState.PRUNED in states


def test_with_parameters_passes_a_large_object_by_reference(tmp_path):
    data = np.arange(1_000_000, dtype=np.float64)

    def uses_data(config, data=None):
        tune.report({"s": float(data[config["i"]]) + float(data.sum())})

    wrapped = tune.with_parameters(uses_data, data=data)
    assert isinstance(wrapped.params["data"], fabric.Future)   # put once, here
    grid = tune.Tuner(wrapped, param_space={"i": tune.grid_search([0, 1, 2])}, tune_config=_tc(),
                      run_config=_rc(tmp_path)).fit()
    total = float(data.sum())
    assert sorted(r.metrics["s"] for r in grid) == [total, total + 1, total + 2]


def test_with_resources_limits_concurrency(tmp_path):
    lock = str(tmp_path / "busy")

    def exclusive(config, lock=lock):
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # fails if another trial holds it
        try:
            tune.report({"ok": 1})
        finally:
            os.close(fd)
            os.unlink(lock)

    grid = tune.Tuner(tune.with_resources(exclusive, {"cpus": 2}), param_space={"i": tune.grid_search(list(range(6)))},
                      tune_config=_tc(), run_config=_rc(tmp_path)).fit()
    assert grid.num_errors == 0, grid.errors


def test_max_concurrent_trials_above_the_cluster_warns_and_runs(tmp_path):
    with pytest.warns(UserWarning, match="max_concurrent_trials=64 is more than the cluster can ever run at once "
                                         "\\(2"):
        grid = tune.Tuner(quad, param_space={"x": tune.uniform(0, 1)},
                          tune_config=_tc(num_samples=4, max_concurrent_trials=64), run_config=_rc(tmp_path)).fit()
    assert len(grid) == 4 and grid.num_errors == 0


def test_a_raising_trial_is_recorded_and_the_sweep_goes_on(tmp_path):
    def sometimes(config):
        tune.report({"v": config["i"]})
        if config["i"] == 2:
            raise ValueError(f"bad trial {config['i']}")
        tune.report({"v": config["i"]})

    grid = tune.Tuner(sometimes, param_space={"i": tune.grid_search([0, 1, 2, 3])}, tune_config=_tc(),
                      run_config=_rc(tmp_path)).fit()
    assert grid.num_errors == 1
    err = grid.errors[0]
    assert isinstance(err, ValueError) and "bad trial 2" in str(err)
    t = next(t for t in grid.trials if t.status == "ERROR")
    assert "in sometimes" in t.error_text and "ValueError: bad trial 2" in t.error_text
    df = grid.get_dataframe()
    assert list(df.status) == ["TERMINATED", "TERMINATED", "ERROR", "TERMINATED"]
    assert df.error.iloc[2] == "ValueError: bad trial 2"


# ------------------------------------------------------------------ bad input
def test_scheduler_needing_a_metric_the_trials_never_report(tmp_path):
    with pytest.raises(tune.MetricNotReported, match="ASHAScheduler needs the metric 'val_loss', but trial .* "
                                                      "reported only \\['iter', 'loss'"):
        tune.Tuner(quad, param_space={"x": tune.uniform(0, 1)},
                   tune_config=_tc(metric="val_loss", mode="min", num_samples=4, scheduler=tune.ASHAScheduler()),
                   run_config=_rc(tmp_path)).fit()
    # the cluster keeps serving
    assert fabric.fn(lambda: 5).remote().result() == 5
    assert wait_for(lambda: sum(e["free_cpus"] for e in fabric.cluster_status()["executors"]) == 2, timeout=30)


def test_trainable_with_the_wrong_signature():
    def no_args():
        pass

    def two(config, other):
        pass

    for fn in (no_args, two):
        with pytest.raises(TypeError, match="must take one argument, the config dict"):
            tune.Tuner(fn, param_space={"x": 1})
    with pytest.raises(TypeError, match="needs a trainable"):
        tune.Tuner(42, param_space={"x": 1})

    class Trainable:
        pass

    with pytest.raises(TypeError, match="is a class"):
        tune.Tuner(Trainable, param_space={"x": 1})


def test_bad_tuner_input():
    with pytest.raises(tune.SearchSpaceError, match="empty"):
        tune.Tuner(quad, param_space={})
    with pytest.raises(tune.SearchSpaceError, match="must be a dict"):
        tune.Tuner(quad, param_space=[tune.uniform(0, 1)])
    with pytest.raises(ValueError, match="mode must be 'min' or 'max'"):
        tune.TuneConfig(metric="loss", mode="lowest")
    with pytest.raises(ValueError, match="num_samples"):
        tune.TuneConfig(num_samples=0)
    with pytest.raises(TypeError, match="scheduler must be a tune scheduler"):
        tune.TuneConfig(scheduler="asha")
    with pytest.raises(ValueError, match="unknown resource 'tpus'"):
        tune.with_resources(quad, {"tpus": 1})


def test_trials_the_cluster_can_never_run_and_restoring_nothing(tmp_path):
    with pytest.raises(tune.TuneError, match="no trial can ever run: each needs 1 x cpus=64"):
        tune.Tuner(tune.with_resources(quad, {"cpus": 64}), param_space={"x": 1}, tune_config=_tc(),
                   run_config=_rc(tmp_path)).fit()
    with pytest.raises(FileNotFoundError, match="holds no tune experiment"):
        tune.Tuner.restore(str(tmp_path / "nothing-here"), quad)
    assert fabric.fn(lambda: 6).remote().result() == 6


def test_get_best_result_unknown_metric_after_a_sweep(tmp_path):
    grid = tune.Tuner(quad, param_space={"x": tune.uniform(0, 1)}, tune_config=_tc(num_samples=2),
                      run_config=_rc(tmp_path)).fit()
    with pytest.raises(KeyError, match="no trial reported the metric 'accuracy'; reported metrics: iter, loss"):
        grid.get_best_result("accuracy", "max")
    with pytest.raises(ValueError, match="mode must be 'min' or 'max'"):
        grid.get_best_result("loss", "smallest")


def test_live_table_plain_lines_in_a_script(tmp_path):
    code = textwrap.dedent(f"""
        import fabric
        from fabric.ml import tune, RunConfig
        def f(config):
            tune.report({{"loss": config["x"]}})
        fabric.init(num_cpus=2)
        tune.Tuner(f, param_space={{"x": tune.grid_search([3, 1, 2])}},
                   tune_config=tune.TuneConfig(metric="loss", mode="min"),
                   run_config=RunConfig(name="s", storage_path={str(tmp_path)!r})).fit()
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("tune: 3/3 trials: 0 running, 3 done, 0 stopped, 0 errored, 0 pending")
    assert "best loss=1 " in last


# ------------------------------------------------------------------ restore after SIGKILL
DRIVER = """
import os, sys, time, tempfile, json
import fabric
from fabric.ml import tune, RunConfig

MARK, GO = sys.argv[1], sys.argv[2]

def trial(config):
    i = config["i"]
    ck = tune.get_checkpoint()
    start = 0
    if ck is not None:
        with ck.as_directory() as d:
            start = json.load(open(os.path.join(d, "s.json")))["step"]
    with open(os.path.join(MARK, f"{i}"), "a") as f:
        f.write(f"run from {start}\\n")
    for step in range(start, 3):
        d = tempfile.mkdtemp()
        json.dump({"step": step + 1}, open(os.path.join(d, "s.json"), "w"))
        tune.report({"step": step + 1, "i": i}, checkpoint=tune.Checkpoint.from_directory(d))
        while i >= 4 and step == 0 and not os.path.exists(GO):
            time.sleep(0.05)   # trials 4.. wait after their first checkpoint until the restore

if __name__ == "__main__":
    fabric.init(num_cpus=2)
    rc = RunConfig(name="exp", storage_path=sys.argv[3])
    if sys.argv[4] == "fit":
        tune.Tuner(trial, param_space={"i": tune.grid_search(list(range(8)))},
                   tune_config=tune.TuneConfig(max_concurrent_trials=2, progress=False), run_config=rc).fit()
    else:
        grid = tune.Tuner.restore(os.path.join(sys.argv[3], "exp"), trial).fit()
        print(json.dumps({str(r.config["i"]): r.metrics["step"] for r in grid}))
"""


def test_restore_after_the_driver_is_killed(tmp_path):
    mark, go, store = tmp_path / "marks", tmp_path / "go", tmp_path / "store"
    mark.mkdir()
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    env = dict(os.environ, PYTHONPATH=REPO)
    p = subprocess.Popen([sys.executable, str(script), str(mark), str(go), str(store), "fit"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    trials = store / "exp" / "trials"

    def records():
        out = {}
        for name in (os.listdir(trials) if trials.exists() else []):
            if not name.endswith(".json"):
                continue  # a record being written (its temporary file, renamed when complete)
            try:
                d = json.load(open(trials / name))
            except (ValueError, OSError):
                continue
            out[d["config"]["i"]] = d
        return out

    # trials 0-3 finished and recorded; 4 and 5 hold a checkpoint and wait
    # (two trials run at a time; which two of 4-7 wait is the sweep's order, not the test's to fix)
    ok = wait_for(lambda: (lambda r: sum(1 for d in r.values() if d["status"] == "TERMINATED") == 4 and
                           sum(1 for i in range(4, 8) if i in r and r[i]["status"] == "RUNNING" and
                               r[i].get("checkpoint")) == 2)(records()), timeout=90)
    if not ok:
        p.kill()
        pytest.fail(f"the sweep did not reach the kill point: {records()} {p.communicate()}")
    before = records()
    p.send_signal(signal.SIGKILL)
    p.wait(30)
    finished = {i for i, d in before.items() if d["status"] == "TERMINATED"}
    waiting = {i for i, d in before.items() if d["status"] == "RUNNING" and d.get("checkpoint")}
    assert finished == {0, 1, 2, 3} and len(waiting) == 2 and waiting <= {4, 5, 6, 7}
    go.write_text("go")
    r = subprocess.run([sys.executable, str(script), str(mark), str(go), str(store), "restore"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    steps = json.loads(r.stdout.strip().splitlines()[-1])
    assert steps == {str(i): 3 for i in range(8)}
    runs = {int(n): open(mark / n).read().splitlines() for n in os.listdir(mark)}
    for i in finished:
        assert runs[i] == ["run from 0"], f"finished trial {i} ran again: {runs[i]}"
    for i in waiting:
        assert runs[i] == ["run from 0", "run from 1"], runs[i]   # resumed from its checkpoint
    for i in {4, 5, 6, 7} - waiting:
        assert runs[i][-1] == "run from 0"


# ------------------------------------------------------------------ a `fabric start` cluster
def test_sweeps_on_a_started_cluster(tmp_path):
    home = str(tmp_path / "home")
    env = dict(os.environ, FABRIC_HOME=home)
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    r = subprocess.run(FABRIC + ["start", "--port", str(port), "--cpus", "2", "--detach"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    try:
        code = textwrap.dedent(f"""
            import fabric, optuna
            from fabric.ml import tune, RunConfig
            def f(config):
                for i in range(5):
                    tune.report({{"loss": (config["x"] - 1) ** 2 + 1.0 / (i + 1)}})
            fabric.init()
            rc = RunConfig(name="s", storage_path={str(tmp_path / 'store')!r})
            for sched, search in [(None, None), (tune.ASHAScheduler(max_t=5), None),
                                  (tune.HyperBandScheduler(max_t=5), None),
                                  (tune.MedianStoppingRule(time_attr="training_iteration", grace_period=1), None),
                                  (None, tune.OptunaSearch(seed=0))]:
                g = tune.Tuner(f, param_space={{"x": tune.uniform(0, 2)}},
                               tune_config=tune.TuneConfig(metric="loss", mode="min", num_samples=8, scheduler=sched,
                                                           search_alg=search, progress=False), run_config=rc).fit()
                assert len(g) == 8 and g.num_errors == 0, g.errors
                print("ok", type(sched).__name__, type(search).__name__, round(g.get_best_result().metrics["loss"], 3))
        """)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, cwd=REPO,
                           env={**env, "FABRIC_ADDRESS": address})
        assert r.returncode == 0, r.stderr
        assert r.stdout.count("ok ") == 5, r.stdout
    finally:
        subprocess.run(FABRIC + ["stop"], env=env, capture_output=True, timeout=60)


# ------------------------------------------------------------------ fabric.ml Trainers as trainables
def test_xgboost_trainer_sweep_with_asha(tmp_path):
    import pandas as pd

    from fabric import ml

    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 3))
    df = pd.DataFrame(X, columns=["a", "b", "c"])
    df["y"] = (X[:, 0] + 0.3 * X[:, 1] > 0).astype(float)
    trainer = ml.XGBoostTrainer(params={"objective": "binary:logistic", "eval_metric": "logloss"}, label_column="y",
                                num_boost_round=6, datasets={"train": ml.from_pandas(df)},
                                scaling_config=ml.ScalingConfig(num_workers=1))
    grid = tune.Tuner(trainer, param_space={"params": {"max_depth": tune.grid_search([1, 3]),
                                                       "eta": tune.grid_search([0.01, 0.5])}},
                      tune_config=_tc(metric="train-logloss", mode="min",
                                      scheduler=tune.ASHAScheduler(max_t=6, grace_period=2, reduction_factor=2)),
                      run_config=_rc(tmp_path, "xgb")).fit()
    assert len(grid) == 4 and grid.num_errors == 0, grid.errors
    df = grid.get_dataframe()
    best = grid.get_best_result()
    assert best.config["params"]["eta"] == 0.5 and best.metrics["training_iteration"] == 6
    assert best.checkpoint is not None and os.path.exists(os.path.join(best.checkpoint.path, "model.ubj"))
    assert (df[df.status == "STOPPED"].training_iteration < 6).all()


def _slow_xgb_loop(config):
    """The loop form, each round slowed down, every rank writing how many rounds it ran."""
    import xgboost as xgb

    from fabric import ml
    from fabric.ml.trainers.xgboost import ReportCallback

    df = ml.get_dataset_shard("train").to_pandas()
    d = xgb.DMatrix(df[["a", "b", "c"]], label=df["y"])
    out = os.path.join(config["out"], f"rank{ml.get_context().get_world_rank()}")

    class Slow(xgb.callback.TrainingCallback):
        def after_iteration(self, model, epoch, evals_log):
            time.sleep(0.05)
            with open(out, "w") as f:
                f.write(str(model.num_boosted_rounds()))
            return False

    xgb.train({"objective": "binary:logistic", "eval_metric": "logloss", "max_depth": 2}, d,
              num_boost_round=config["rounds"], evals=[(d, "train")],
              callbacks=[Slow(), ReportCallback(num_boost_round=config["rounds"])])


def test_stopping_a_two_worker_xgboost_trial_stops_both_ranks_at_one_round(tmp_path):
    """A round's report has no barrier (xgboost's collective keeps the ranks in step): the stop
    that rank 0 hears must still end every rank after the same round, not hang the other."""
    import pandas as pd

    from fabric import ml

    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 3))
    df = pd.DataFrame(X, columns=["a", "b", "c"])
    df["y"] = (X[:, 0] > 0).astype(float)
    out = tmp_path / "rounds"
    out.mkdir()
    trainer = ml.XGBoostTrainer(_slow_xgb_loop, train_loop_config={"rounds": 400, "out": str(out)},
                                datasets={"train": ml.from_pandas(df)}, scaling_config=ml.ScalingConfig(num_workers=2))
    grid = tune.Tuner(trainer, param_space={"train_loop_config": {"rounds": tune.grid_search([400])}},
                      tune_config=_tc(metric="train-logloss", mode="min"),
                      run_config=_rc(tmp_path, "xgbstop", stop={"training_iteration": 3})).fit()
    assert grid.num_errors == 0, grid.errors
    ran = [int((out / f"rank{r}").read_text()) for r in (0, 1)]
    assert ran[0] == ran[1] and 3 <= ran[0] < 400, ran
    assert grid.get_dataframe().training_iteration.max() == 3
    assert fabric.get(fabric.put(7)) == 7  # the cluster keeps serving


def test_torch_trainer_sweep(tmp_path):
    from fabric import ml

    def loop(config):
        import torch

        w = torch.zeros(1, requires_grad=True)
        opt = torch.optim.SGD([w], lr=config["lr"])
        for _ in range(config["steps"]):
            loss = (w - 3.0).pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            ml.report({"loss": float(loss.detach())})

    trainer = ml.TorchTrainer(loop, train_loop_config={"steps": 3, "lr": 0.1},
                              scaling_config=ml.ScalingConfig(num_workers=1))
    grid = tune.Tuner(trainer, param_space={"train_loop_config": {"lr": tune.grid_search([0.01, 0.3])}},
                      tune_config=_tc(metric="loss", mode="min"), run_config=_rc(tmp_path, "torch")).fit()
    assert grid.num_errors == 0, grid.errors
    df = grid.get_dataframe().set_index("config/train_loop_config/lr")
    assert list(df.training_iteration) == [3, 3]
    assert df.loc[0.3, "loss"] < df.loc[0.01, "loss"]
    assert grid.get_best_result().config == {"train_loop_config": {"lr": 0.3}}


def test_trainer_param_space_must_name_its_config():
    from fabric import ml

    trainer = ml.TorchTrainer(lambda config: None, scaling_config=ml.ScalingConfig(num_workers=1))
    with pytest.raises(tune.SearchSpaceError, match="TorchTrainer's param_space holds one key, 'train_loop_config'"):
        tune.Tuner(trainer, param_space={"lr": tune.uniform(0, 1)})
    with pytest.raises(tune.SearchSpaceError, match="must be a non-empty dict"):
        tune.Tuner(trainer, param_space={"train_loop_config": {}})


# ------------------------------------------------------------------ stopping by cancelling (last: the cancelled
# calls' workers are replaced, which takes a while on a loaded machine)
class _StopAllButX0(SC.TrialScheduler):
    """Stops every trial but x == 0 at its first report."""

    needs_metric = False

    def on_trial_result(self, trial_id, result):
        return SC.STOP if result["x"] != 0 else SC.CONTINUE


def hang_unless_zero(config):
    tune.report({"x": config["x"]})
    if config["x"] != 0:
        time.sleep(3600)  # never reports again: only cancelling its call ends it
    tune.report({"x": 0})


def test_a_stopped_trial_that_never_reports_again_is_cancelled(tmp_path):
    grid = tune.Tuner(hang_unless_zero, param_space={"x": tune.grid_search([1, 2, 0, 3])},
                      tune_config=_tc(scheduler=_StopAllButX0(), stop_grace_s=0.2),
                      run_config=_rc(tmp_path)).fit()
    df = grid.get_dataframe().set_index("config/x")
    assert df.loc[0, "status"] == "TERMINATED" and df.loc[0, "training_iteration"] == 2
    for x in (1, 2, 3):
        assert df.loc[x, "status"] == "STOPPED" and df.loc[x, "training_iteration"] == 1
    # the cancelled calls' CPUs are free again
    assert wait_for(lambda: sum(e["free_cpus"] for e in fabric.cluster_status()["executors"]) == 2, timeout=30)


def test_time_budget_stops_the_sweep(tmp_path):
    def forever(config):
        tune.report({"i": 0})
        time.sleep(3600)

    grid = tune.Tuner(forever, param_space={"x": tune.uniform(0, 1)},
                      tune_config=_tc(num_samples=50, time_budget_s=1.0, stop_grace_s=0.1),
                      run_config=_rc(tmp_path)).fit()
    df = grid.get_dataframe()
    assert len(df) < 50 and set(df.status) == {"STOPPED"}
