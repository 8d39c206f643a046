"""fabric.ml.tune against Ray Tune on the same workloads, in one run, with ratios.

    python loadtests/bench_tune.py                 # everything (Ray's side with .venv-peers)
    python loadtests/bench_tune.py --quick         # small sizes, to check the script works
    python loadtests/bench_tune.py --skip-xgb      # without the XGBoostTrainer rows (minutes on 2 CPUs)

Rows:
- tune 32 trials x 10 reports of a trivial trainable, FIFO and ASHA (trials/s; Ray's side is
  ../shared/bench/ray_ml.py tune);
- 1,000 trivial trials (wall), and the tuner's own overhead: per trial (a sweep minus the same
  number of plain fabric calls of the same function, and the driver loop's CPU per trial) and per
  report (32 trials x 100 reports minus 32 x 1, per extra report);
- 100 Optuna (TPE) trials of a trivial objective against plain ``optuna.study.optimize`` in one
  process (Ray's OptunaSearch too);
- 16 XGBoostTrainer trials (1 worker each) of the training benchmark's XGBoost workload
  (200,000 x 20, 50 rounds) under ASHA, against Ray Tune + Ray Train.
The embedded cluster (``fabric.init``) and ``ray.init`` are started, and their workers warmed by
one call, before any timing, as a user's session would be.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAY_ML = os.path.join(os.path.dirname(REPO), "shared", "bench", "ray_ml.py")
PEERS_PY = os.path.join(REPO, ".venv-peers", "bin", "python")


def emit(**row):
    print(json.dumps(row), flush=True)


def xgb_frame(rows):
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    X = rng.standard_normal((rows, 20)).astype(np.float32)
    y = (X[:, 0] + 0.5 * X[:, 1] * X[:, 2] + rng.standard_normal(rows) * 0.3 > 0).astype(np.float32)
    df = pd.DataFrame(X, columns=[f"f{i}" for i in range(20)])
    df["y"] = y
    return df


XGB_PARAMS = {"objective": "binary:logistic", "eval_metric": "logloss", "max_depth": 6, "eta": 0.1,
              "tree_method": "hist"}


# ------------------------------------------------------------------ fabric's side
def fabric_side(a):
    import fabric
    from fabric.ml import RunConfig, tune
    from fabric.ml.tune import tuner as T

    fabric.init(num_cpus=a.cpus)
    fabric.get([fabric.fn(lambda: None).remote() for _ in range(4)])   # workers up
    store = os.path.join(a.tmp, "fabric-tune")
    stats = {}
    orig = T._Sweep.results

    def keep_stats(self):
        stats.clear()
        stats.update(self.stats)
        return orig(self)

    T._Sweep.results = keep_stats

    def trivial10(config):
        for i in range(10):
            tune.report({"loss": (config["x"] - 3) ** 2 / (i + 1), "iter": i})

    def sweep(fn, n, sched=None, search=None, name="b", space=None):
        t = time.perf_counter()
        grid = tune.Tuner(fn, param_space=space or {"x": tune.uniform(0, 6)},
                          tune_config=tune.TuneConfig(metric="loss", mode="min", num_samples=n, scheduler=sched,
                                                      search_alg=search, progress=False),
                          run_config=RunConfig(name=name, storage_path=store)).fit()
        dt = time.perf_counter() - t
        assert grid.num_errors == 0, grid.errors[:1]
        return grid, dt

    for sname, sched in [("fifo", None), ("asha", tune.ASHAScheduler(max_t=10, grace_period=1))]:
        grid, dt = sweep(trivial10, 32, sched, name=f"t32-{sname}")
        emit(peer="fabric", workload="tune", sched=sname, trials=32, wall_s=dt, trials_per_s=32 / dt,
             best_x=grid.get_best_result().config["x"])

    n = 100 if a.quick else 1000

    def trivial1(config):
        tune.report({"loss": config["x"]})

    grid, dt = sweep(trivial1, n, name="t1000")
    loop_ms = stats["driver_s"] / n * 1e3

    @fabric.fn
    def plain(config):
        return config["x"]

    t = time.perf_counter()
    fabric.get([plain.remote({"x": float(i)}) for i in range(n)])
    base = time.perf_counter() - t
    emit(peer="fabric", workload="tune_many", trials=n, wall_s=dt, trials_per_s=n / dt,
         plain_calls_s=base, overhead_per_trial_ms=(dt - base) / n * 1e3, driver_loop_ms_per_trial=loop_ms)

    reps = 30 if a.quick else 100

    def many_reports(config):
        for i in range(config["r"]):
            tune.report({"loss": float(i)})

    _, d1 = sweep(many_reports, 1, name="r1", space={"r": 1, "i": tune.grid_search(list(range(32)))})
    _, dn = sweep(many_reports, 1, name="rn", space={"r": reps, "i": tune.grid_search(list(range(32)))})
    emit(peer="fabric", workload="tune_reports", trials=32, reports_per_trial=reps, wall_s=dn,
         per_report_ms=(dn - d1) / (32 * (reps - 1)) * 1e3 * a.cpus, note="x cpus: trials report in parallel")

    # Optuna: 100 trials in the tuner against plain optuna in this process
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    n_opt = 30 if a.quick else 100
    t = time.perf_counter()
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    study.optimize(lambda tr: (tr.suggest_float("x", -10, 10) - 2) ** 2, n_trials=n_opt)
    plain_opt = time.perf_counter() - t

    def objective(config):
        tune.report({"loss": (config["x"] - 2) ** 2})

    grid, dt = sweep(objective, n_opt, search=tune.OptunaSearch(seed=0), name="optuna",
                     space={"x": tune.uniform(-10, 10)})
    emit(peer="fabric", workload="tune_optuna", trials=n_opt, wall_s=dt, plain_optuna_s=plain_opt,
         ratio_to_plain=dt / plain_opt, best=grid.get_best_result().metrics["loss"])

    if not a.skip_xgb:
        from fabric import ml

        ds = ml.from_pandas(xgb_frame(a.xgb_rows))
        trainer = ml.XGBoostTrainer(params=dict(XGB_PARAMS), label_column="y", num_boost_round=a.xgb_rounds,
                                    datasets={"train": ds}, scaling_config=ml.ScalingConfig(num_workers=1))
        t = time.perf_counter()
        grid = tune.Tuner(trainer, param_space={"params": {"max_depth": tune.randint(3, 9),
                                                           "eta": tune.loguniform(0.01, 0.3)}},
                          tune_config=tune.TuneConfig(metric="train-logloss", mode="min", num_samples=a.xgb_trials,
                                                      scheduler=tune.ASHAScheduler(max_t=a.xgb_rounds,
                                                                                   grace_period=max(1, a.xgb_rounds // 5)),
                                                      progress=False),
                          run_config=RunConfig(name="xgb", storage_path=store)).fit()
        dt = time.perf_counter() - t
        emit(peer="fabric", workload="tune_xgb", trials=a.xgb_trials, rows=a.xgb_rows, wall_s=dt,
             errors=grid.num_errors, best=grid.get_best_result().metrics.get("train-logloss"))
    fabric.shutdown()


# ------------------------------------------------------------------ Ray's side (run with the peers' python)
def ray_side(a):
    import ray
    from ray import tune

    ray.init(num_cpus=a.cpus, include_dashboard=False, logging_level="ERROR")
    ray.get([ray.remote(lambda: None).remote() for _ in range(4)])
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    from ray.tune.search.optuna import OptunaSearch

    n_opt = 30 if a.quick else 100

    def objective(config):
        tune.report({"loss": (config["x"] - 2) ** 2})

    if not a.skip_optuna:
        t = time.perf_counter()
        tune.Tuner(objective, param_space={"x": tune.uniform(-10, 10)},
                   tune_config=tune.TuneConfig(metric="loss", mode="min", num_samples=n_opt,
                                               search_alg=OptunaSearch(seed=0)),
                   run_config=tune.RunConfig(storage_path=os.path.join(a.tmp, "ray"), verbose=0)).fit()
        emit(peer="ray-tune", workload="tune_optuna", trials=n_opt, wall_s=time.perf_counter() - t)

    if not a.skip_xgb:
        import ray.train
        import xgboost as xgb
        from ray.train import ScalingConfig
        from ray.train.xgboost import RayTrainReportCallback, XGBoostTrainer
        from ray.tune.schedulers import ASHAScheduler

        ds = ray.data.from_pandas(xgb_frame(a.xgb_rows))
        rounds = a.xgb_rounds

        def train_fn(config):
            import ray.train
            df = ray.train.get_dataset_shard("train").materialize().to_pandas()
            dtrain = xgb.DMatrix(df.drop(columns=["y"]), label=df["y"])
            xgb.train({**XGB_PARAMS, **config, "nthread": 1}, dtrain, num_boost_round=rounds,
                      evals=[(dtrain, "train")], callbacks=[RayTrainReportCallback()])

        from ray.tune.integration.ray_train import TuneReportCallback

        def driver(config):  # Ray Train V2 (Ray's default): each trial's driver function runs one Train run
            XGBoostTrainer(train_fn, train_loop_config=config, datasets={"train": ds},
                           scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                           run_config=ray.train.RunConfig(storage_path=os.path.join(a.tmp, "ray-train"),
                                                          callbacks=[TuneReportCallback()])).fit()

        t = time.perf_counter()
        tune.Tuner(tune.with_resources(driver, {"cpu": 0.01}),  # the driver function itself needs ~no CPU
                   param_space={"max_depth": tune.randint(3, 9), "eta": tune.loguniform(0.01, 0.3)},
                   # one CPU left for Ray Data's ingest and Train's controller: with a trial per CPU the
                   # worker groups wait for resources and time out (seen on 2 CPUs)
                   tune_config=tune.TuneConfig(num_samples=a.xgb_trials, max_concurrent_trials=max(1, a.cpus - 1),
                                               scheduler=ASHAScheduler(metric="train-logloss", mode="min",
                                                                       max_t=rounds, grace_period=max(1, rounds // 5))),
                   run_config=tune.RunConfig(storage_path=os.path.join(a.tmp, "ray"), verbose=0)).fit()
        emit(peer="ray-tune+train", workload="tune_xgb", trials=a.xgb_trials, rows=a.xgb_rows,
             wall_s=time.perf_counter() - t)
    ray.shutdown()


def run_json(cmd, timeout):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    rows = []
    for line in r.stdout.splitlines():
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass
    if r.returncode != 0:
        print(f"# {' '.join(cmd[:3])} failed ({r.returncode}): {r.stderr[-2000:]}", file=sys.stderr)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="small sizes: checks the script, not the figures")
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--skip-xgb", action="store_true")
    ap.add_argument("--skip-optuna", action="store_true", help="Ray's side: without the Optuna row")
    ap.add_argument("--xgb-rows", type=int, default=200_000)
    ap.add_argument("--xgb-rounds", type=int, default=50)
    ap.add_argument("--xgb-trials", type=int, default=16)
    ap.add_argument("--side", choices=["both", "fabric", "ray"], default="both")
    ap.add_argument("--tmp", default=None)
    a = ap.parse_args()
    if a.quick:
        a.xgb_rows, a.xgb_rounds, a.xgb_trials = min(a.xgb_rows, 5000), min(a.xgb_rounds, 10), min(a.xgb_trials, 4)
    if a.tmp is None:
        import tempfile

        a.tmp = tempfile.mkdtemp(prefix="bench-tune-")
    if a.side == "fabric":
        return fabric_side(a)
    if a.side == "ray":
        return ray_side(a)
    passthru = ["--cpus", str(a.cpus), "--tmp", a.tmp, "--xgb-rows", str(a.xgb_rows), "--xgb-rounds",
                str(a.xgb_rounds), "--xgb-trials", str(a.xgb_trials)] + (["--quick"] if a.quick else []) + \
        (["--skip-xgb"] if a.skip_xgb else [])
    rows = run_json([sys.executable, __file__, "--side", "fabric", *passthru], 1800)
    if not a.skip_ray and os.path.exists(PEERS_PY):
        rows += run_json([PEERS_PY, RAY_ML, "tune", "--cpus", str(a.cpus)], 1800)
        rows += run_json([PEERS_PY, __file__, "--side", "ray", *passthru], 3600)
    for r in rows:
        print(json.dumps(r))
    table(rows)


def table(rows):
    def get(peer, workload, **kw):
        for r in rows:
            if r.get("peer") == peer and r.get("workload") == workload and all(r.get(k) == v for k, v in kw.items()):
                return r
        return None

    print("\n| workload | fabric | Ray | fabric vs Ray | target |")
    print("|---|---|---|---|---|")
    for s in ("fifo", "asha"):
        f, r = get("fabric", "tune", sched=s), get("ray-tune", "tune", sched=s)
        if f:
            ratio = f"{f['trials_per_s'] / r['trials_per_s']:.0f}x trials/s" if r else "-"
            ray = f"{r['wall_s']:.1f} s ({r['trials_per_s']:.2f}/s)" if r else "-"
            print(f"| 32 trials x 10 reports, {s.upper()} | {f['wall_s']:.2f} s ({f['trials_per_s']:.0f}/s) | {ray} | "
                  f"{ratio} | >= 20x, < 2 s |")
    f = get("fabric", "tune_many")
    if f:
        print(f"| {f['trials']} trivial trials | {f['wall_s']:.2f} s | - | - | < 20 s |")
        print(f"| tuner overhead per trial | {f['overhead_per_trial_ms']:.2f} ms (driver loop "
              f"{f['driver_loop_ms_per_trial']:.3f} ms) | - | - | < 20 ms |")
    f = get("fabric", "tune_reports")
    if f:
        print(f"| cost per report | {f['per_report_ms']:.3f} ms | - | - | < 1 ms |")
    f, r = get("fabric", "tune_optuna"), get("ray-tune", "tune_optuna")
    if f:
        mine = f"{f['wall_s']:.2f} s ({f['ratio_to_plain']:.1f}x plain optuna's {f['plain_optuna_s']:.2f} s)"
        ray = f"{r['wall_s']:.1f} s ({r['wall_s'] / f['plain_optuna_s']:.0f}x plain)" if r else "-"
        ratio = f"{r['wall_s'] / f['wall_s']:.0f}x faster" if r else "-"
        print(f"| {f['trials']} Optuna trials | {mine} | {ray} | {ratio} | within 3x of plain |")
    f, r = get("fabric", "tune_xgb"), get("ray-tune+train", "tune_xgb")
    if f:
        ray = f"{r['wall_s']:.1f} s" if r else "-"
        ratio = f"{r['wall_s'] / f['wall_s']:.1f}x faster" if r else "-"
        print(f"| {f['trials']} XGBoostTrainer trials, ASHA ({f['rows']} rows) | {f['wall_s']:.1f} s | {ray} | "
              f"{ratio} | wall time |")


if __name__ == "__main__":
    main()
