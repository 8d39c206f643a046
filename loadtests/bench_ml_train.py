"""fabric.ml training against native code and Ray Train, in one run (issue 11's targets).

    python loadtests/bench_ml_train.py                  # full size: 200k rows, 50 rounds, 3 epochs
    python loadtests/bench_ml_train.py --small --skip-ray   # a quick proof that it runs

XGBoost (the task of ../shared/bench/ray_ml.py ``train``: 200,000 x 20, 50 rounds, ``hist``):
  - native: one process, ``xgb.train(nthread=2)`` on a DMatrix (DMatrix build + training), run here,
    once before and once after each fabric fit (in the driver, the cluster idle), so that both sides see
    the same load on a shared machine; the table takes the medians;
  - fabric: ``XGBoostTrainer`` with 2 workers x 1 CPU on a warm embedded cluster: ``fit()`` wall, and
    ``fabric.init`` + ``fit()`` (the cluster's start included) in a fresh process;
  - Ray Train: ``ray_ml.py train`` in the peers' venv (unless ``--skip-ray``).
  Targets: fit() <= 1.5x native; >= 50x faster than Ray Train; train logloss within 1% of native.

TorchTrainer (2 workers, gloo, a 20-64-64-1 MLP on 200,000 rows, 3 epochs, batch 512):
  - by hand: 2 processes started the way ``torchrun`` starts them (RANK, WORLD_SIZE, MASTER_ADDR/PORT),
    each on its half of the rows, the same loop; wall from launch to both done;
  - fabric: ``TorchTrainer`` on a warm cluster, the rows in a Dataset sharded by the trainer.
  Targets: fit() <= 1.10x by hand; fit() to the first training step < 2 s (warm).

Prints one JSON line per measurement, then a table with the ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAY_ML = os.path.join(os.path.dirname(REPO), "shared", "bench", "ray_ml.py")
PEERS_PY = os.path.join(REPO, ".venv-peers", "bin", "python")


def emit(**row):
    print(json.dumps(row), flush=True)
    return row


# ---------------------------------------------------------------------- the tasks
def xgb_task(rows):
    """ray_ml.py's task, same seed and formula."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((rows, 20)).astype(np.float32)
    y = (X[:, 0] + 0.5 * X[:, 1] * X[:, 2] + rng.standard_normal(rows) * 0.3 > 0).astype(np.float32)
    params = {"objective": "binary:logistic", "eval_metric": "logloss", "max_depth": 6, "eta": 0.1,
              "tree_method": "hist"}
    return X, y, params


def logloss(y, p):
    return float(-np.mean(y * np.log(p + 1e-12) + (1 - y) * np.log(1 - p + 1e-12)))


def torch_task(rows):
    rng = np.random.default_rng(1)
    X = rng.standard_normal((rows, 20)).astype(np.float32)
    y = ((X[:, 0] - X[:, 3] + 0.5 * X[:, 5] * X[:, 7]) > 0).astype(np.float32)
    return X, y


def mlp_loop(x, y, epochs, batch, on_step=None, on_epoch=None):
    """The loop both sides run: DDP over the process group that is already up."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                              torch.nn.Linear(64, 1))
    model = DistributedDataParallel(net) if dist.is_initialized() and dist.get_world_size() > 1 else net
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    n = len(xt)
    first = True
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
        total, steps = 0.0, 0
        for i in range(0, n - batch + 1, batch):
            idx = perm[i:i + batch]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(xt[idx])[:, 0], yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if first and on_step is not None:
                on_step()
                first = False
            total += loss.item()
            steps += 1
        if on_epoch is not None:
            on_epoch(epoch, total / max(steps, 1))


# ---------------------------------------------------------------------- XGBoost
def run_native_xgb(rows, rounds):
    import xgboost as xgb

    X, y, params = xgb_task(rows)
    t = time.perf_counter()
    bst = xgb.train({**params, "nthread": 2}, xgb.DMatrix(X, label=y), num_boost_round=rounds)
    wall = time.perf_counter() - t
    return emit(side="native", workload="xgboost", wall_s=wall, train_logloss=logloss(y, bst.predict(xgb.DMatrix(X))))


def fabric_xgb_trainer(rows, rounds, storage):
    import pandas as pd

    from fabric import ml

    X, y, params = xgb_task(rows)
    df = pd.DataFrame(X, columns=[f"f{i}" for i in range(20)])
    df["y"] = y
    ds = ml.from_pandas(df, override_num_blocks=4)
    trainer = ml.XGBoostTrainer(params=params, label_column="y", num_boost_round=rounds, datasets={"train": ds},
                                scaling_config=ml.ScalingConfig(num_workers=2, resources_per_worker={"cpus": 1}),
                                run_config=ml.RunConfig(storage_path=storage, verbose=0))
    return trainer, X, y


def run_fabric_xgb(rows, rounds, storage, repeat, natives):
    import xgboost as xgb

    import fabric
    from fabric import ml

    fabric.init(num_cpus=2)
    out = []
    for i in range(repeat + 1):  # the first one warms the cluster (workers, imports)
        if i > 0:
            natives.append(run_native_xgb(rows, rounds))
        trainer, X, y = fabric_xgb_trainer(rows, rounds, storage)
        t = time.perf_counter()
        result = trainer.fit()
        wall = time.perf_counter() - t
        bst = ml.XGBoostTrainer.get_model(result.checkpoint)
        row = {"side": "fabric", "workload": "xgboost", "wall_s": wall, "warm": i > 0,
               "train_logloss": logloss(y, bst.predict(xgb.DMatrix(X, feature_names=[f"f{j}" for j in range(20)]))),
               "reported_logloss": result.metrics.get("train-logloss")}
        out.append(emit(**row))
    return out


COLD_XGB = """
import sys, time
t0 = time.perf_counter()
sys.path.insert(0, {here!r})
from bench_ml_train import fabric_xgb_trainer
import fabric
fabric.init(num_cpus=2)
trainer, X, y = fabric_xgb_trainer({rows}, {rounds}, {storage!r})
t1 = time.perf_counter()
trainer.fit()
print("COLD", time.perf_counter() - t1, time.perf_counter() - t0)
"""


def run_fabric_xgb_cold(rows, rounds, storage):
    code = COLD_XGB.format(here=os.path.dirname(os.path.abspath(__file__)), rows=rows, rounds=rounds, storage=storage)
    env = {k: v for k, v in os.environ.items() if k != "FABRIC_ADDRESS"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("COLD")]
    if not line:
        return emit(side="fabric", workload="xgboost-cold", error=r.stderr[-2000:])
    fit, total = map(float, line[-1].split()[1:])
    return emit(side="fabric", workload="xgboost-cold", fit_s=fit, with_start_s=total)


def run_ray_xgb():
    if not os.path.exists(PEERS_PY) or not os.path.exists(RAY_ML):
        return [emit(side="ray-train", workload="xgboost", error=f"no peers venv ({PEERS_PY}) or {RAY_ML}")]
    r = subprocess.run([PEERS_PY, RAY_ML, "train", "--cpus", "2"], capture_output=True, text=True, timeout=1800)
    rows = []
    for ln in r.stdout.splitlines():
        if ln.startswith("{"):
            rows.append(emit(side="peer", **json.loads(ln)))
    if not rows:
        rows.append(emit(side="ray-train", workload="xgboost", error=r.stderr[-2000:]))
    return rows


# ---------------------------------------------------------------------- Torch
HAND = """
import os, sys, time, json
sys.path.insert(0, {here!r})
import numpy as np
import torch, torch.distributed as dist
torch.set_num_threads(1)
from bench_ml_train import torch_task, mlp_loop
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
dist.init_process_group("gloo", init_method=f"tcp://{{os.environ['MASTER_ADDR']}}:{{os.environ['MASTER_PORT']}}",
                        rank=rank, world_size=world)
X, y = torch_task({rows})
half = len(X) // world
x, y = X[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]
losses = []
mlp_loop(x, y, {epochs}, {batch}, on_epoch=lambda e, l: losses.append(l))
dist.destroy_process_group()
print(json.dumps({{"rank": rank, "losses": losses}}))
"""


def run_hand_torch(rows, epochs, batch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = HAND.format(here=os.path.dirname(os.path.abspath(__file__)), rows=rows, epochs=epochs, batch=batch)
    t = time.perf_counter()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=900) for p in procs]
    wall = time.perf_counter() - t
    losses = None
    for out, _err in outs:
        for ln in out.splitlines():
            if ln.startswith("{"):
                d = json.loads(ln)
                if d["rank"] == 0:
                    losses = d["losses"]
    return emit(side="by-hand", workload="torch", wall_s=wall, final_loss=losses[-1] if losses else None,
                error=None if losses else outs[0][1][-2000:])


def fabric_torch_loop(config):
    """fabric's side: the rows come from this rank's Dataset shard."""
    sys.path.insert(0, config["here"])
    from bench_ml_train import mlp_loop

    from fabric import ml

    shard = ml.get_dataset_shard("train").to_pandas()
    x = shard[[f"f{i}" for i in range(20)]].to_numpy(np.float32, copy=True)
    y = shard["y"].to_numpy(np.float32, copy=True)
    first = []

    def on_epoch(e, loss):
        ml.report({"epoch": e, "loss": loss, "first_step_at": first[0]})

    mlp_loop(x, y, config["epochs"], config["batch"], on_step=lambda: first.append(time.time()), on_epoch=on_epoch)


def run_fabric_torch(rows, epochs, batch, storage, repeat):
    import pandas as pd

    import fabric
    from fabric import ml

    fabric.init(num_cpus=2)
    X, y = torch_task(rows)
    df = pd.DataFrame(X, columns=[f"f{i}" for i in range(20)])
    df["y"] = y
    ds = ml.from_pandas(df, override_num_blocks=4).materialize()
    out = []
    for i in range(repeat + 1):
        trainer = ml.TorchTrainer(fabric_torch_loop, train_loop_config={
            "epochs": epochs, "batch": batch, "here": os.path.dirname(os.path.abspath(__file__))},
            datasets={"train": ds}, scaling_config=ml.ScalingConfig(num_workers=2),
            run_config=ml.RunConfig(storage_path=storage, verbose=0))
        t0 = time.time()
        t = time.perf_counter()
        result = trainer.fit()
        wall = time.perf_counter() - t
        out.append(emit(side="fabric", workload="torch", wall_s=wall, warm=i > 0,
                        first_step_s=result.metrics["first_step_at"] - t0, final_loss=result.metrics["loss"]))
    return out


# ---------------------------------------------------------------------- table
def median(xs):
    xs = sorted(x for x in xs if x is not None)
    return xs[len(xs) // 2] if xs else None


def table(native, fab, cold, ray, hand, ftorch):
    lines = ["| workload | fabric | peer | ratio | target |", "|---|---|---|---|---|"]
    warm = [r for r in fab if r.get("warm")] or fab
    f = median([r["wall_s"] for r in warm]) if warm else None
    if f is not None:
        lines.append(f"| XGBoost 2x1 CPU fit() warm vs native 1 process | {f:.2f} s | {native['wall_s']:.2f} s | "
                     f"{f / native['wall_s']:.2f}x | <= 1.5x |")
        ll = median([r["train_logloss"] for r in warm])
        lines.append(f"| XGBoost train logloss | {ll:.5f} | {native['train_logloss']:.5f} | "
                     f"{abs(ll / native['train_logloss'] - 1) * 100:.2f}% off | within 1% |")
    if cold.get("fit_s"):
        lines.append(f"| XGBoost fit() in a fresh process (cold workers) | {cold['fit_s']:.2f} s | "
                     f"{native['wall_s']:.2f} s | {cold['fit_s'] / native['wall_s']:.2f}x | |")
        lines.append(f"| XGBoost fabric.init + fit() | {cold['with_start_s']:.2f} s | {native['wall_s']:.2f} s | "
                     f"{cold['with_start_s'] / native['wall_s']:.2f}x | |")
    rt = [r for r in ray if r.get("peer") == "ray-train" and r.get("wall_s")]
    if rt and f is not None:
        lines.append(f"| XGBoost vs Ray Train XGBoostTrainer | {f:.2f} s | {rt[0]['wall_s']:.1f} s | "
                     f"{rt[0]['wall_s'] / f:.0f}x faster | >= 50x |")
    tw = [r for r in ftorch if r.get("warm")] or ftorch
    if hand.get("wall_s") and tw:
        ft = median([r["wall_s"] for r in tw])
        lines.append(f"| TorchTrainer 2 gloo workers vs 2 torchrun-style processes | {ft:.2f} s | "
                     f"{hand['wall_s']:.2f} s | {ft / hand['wall_s']:.2f}x | <= 1.10x |")
        fs = median([r["first_step_s"] for r in tw])
        lines.append(f"| TorchTrainer fit() to first step (warm) | {fs:.2f} s | | | < 2 s |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3, help="warm fabric runs (after one warm-up)")
    ap.add_argument("--small", action="store_true", help="20k rows, 10 rounds, 1 epoch, 1 repeat")
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--only", choices=["xgboost", "torch"])
    a = ap.parse_args()
    if a.small:
        a.rows, a.rounds, a.epochs, a.repeat = 20_000, 10, 1, 1
    storage = tempfile.mkdtemp(prefix="fabric-bench-ml-")
    cold, hand = {}, {}
    native, fab, ray = {"wall_s": float("nan"), "train_logloss": float("nan")}, [], []
    if a.only in (None, "xgboost"):
        natives = [run_native_xgb(a.rows, a.rounds)]
        cold = run_fabric_xgb_cold(a.rows, a.rounds, storage)
        fab = run_fabric_xgb(a.rows, a.rounds, storage, a.repeat, natives)
        natives.append(run_native_xgb(a.rows, a.rounds))
        native = {"wall_s": median([r["wall_s"] for r in natives]), "train_logloss": natives[0]["train_logloss"]}
        if not a.skip_ray and a.rows == 200_000 and a.rounds == 50:
            ray = run_ray_xgb()
    ftorch = []
    if a.only in (None, "torch"):
        hand = run_hand_torch(a.rows, a.epochs, a.batch)
        ftorch = run_fabric_torch(a.rows, a.epochs, a.batch, storage, a.repeat)
    print()
    print(table(native, fab, cold, ray, hand, ftorch))
    import fabric

    fabric.shutdown()


if __name__ == "__main__":
    main()
