"""Batch prediction with exported ONNX models: fabric vs native vs Ray Data, one run, ratios printed.

  predict  1,000,000 rows x 16 float32 features, an XGBoost model (100 trees, depth 6) and an MLP
           (16->64->64->1), each exported with ml.export_onnx. Rows/s of
           BatchPredictor(OnnxPredictor) (2 warm instances), of native xgboost/torch in this
           process, and of Ray Data map_batches with the same native model (a script the peers'
           venv runs; 2 CPUs, concurrency 2). Target: fabric >= 2x Ray.

usage: python loadtests/bench_ml_predict.py [--rows 1000000] [--skip-ray]
(The TF/HF trainer per-step overhead is printed by tests' loops' own step times: see docs/onnx.md.)
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS_PY = os.path.join(REPO, ".venv-peers", "bin", "python")

RAY_SIDE = r'''
import json, sys, time, numpy as np, ray
kind, model_path, data_path = sys.argv[1:4]
ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
X = np.load(data_path)
ds = ray.data.from_numpy(X).repartition(8).materialize()
class Score:
    def __init__(self):
        if kind == "xgboost":
            import xgboost as xgb
            self.b = xgb.Booster(); self.b.load_model(model_path); self.b.set_param({"nthread": 1})
        else:
            import torch
            torch.set_num_threads(1)
            self.m = torch.load(model_path, weights_only=False).eval()
    def __call__(self, batch):
        x = batch["data"]
        if kind == "xgboost":
            import xgboost as xgb
            return {"p": self.b.predict(xgb.DMatrix(x))}
        import torch
        with torch.no_grad():
            return {"p": self.m(torch.from_numpy(x)).numpy()[:, 0]}
t = time.perf_counter()
n = ds.map_batches(Score, batch_size=65536, concurrency=2, batch_format="numpy").count()
dt = time.perf_counter() - t
print(json.dumps({"side": "ray-data", "model": kind, "rows": n, "rows_per_s": n / dt}))
'''


def emit(**row):
    print(json.dumps(row), flush=True)
    return row


def models(tmp, x):
    import torch
    import xgboost as xgb

    from fabric.ml.checkpoint import Checkpoint

    y = (x[:, 0] + 0.5 * x[:, 1] * x[:, 2] > 0).astype(np.float32)
    n = min(len(x), 100_000)
    b = xgb.train({"objective": "binary:logistic", "max_depth": 6, "tree_method": "hist"}, xgb.DMatrix(x[:n], y[:n]), 100)
    os.makedirs(f"{tmp}/xgb")
    b.save_model(f"{tmp}/xgb/model.ubj")
    Checkpoint(f"{tmp}/xgb").set_metadata({"framework": "xgboost"})
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                            torch.nn.Linear(64, 1)).eval()
    os.makedirs(f"{tmp}/mlp")
    torch.save(m, f"{tmp}/mlp/model_full.pt")
    Checkpoint(f"{tmp}/mlp").set_metadata({"framework": "torch"})
    return b, m


def native(kind, model, x):
    t = time.perf_counter()
    if kind == "xgboost":
        import xgboost as xgb
        model.set_param({"nthread": 2})
        model.predict(xgb.DMatrix(x))
    else:
        import torch
        torch.set_num_threads(2)
        with torch.no_grad():
            for i in range(0, len(x), 65536):
                model(torch.from_numpy(x[i:i + 65536]))
    return emit(side="native-1-process", model=kind, rows=len(x), rows_per_s=len(x) / (time.perf_counter() - t))


def fabric_side(kind, ckpt_dir, x):
    from fabric import ml

    onnx_ck = ml.export_onnx(ckpt_dir, sample=x[:256])
    ds = ml.from_numpy(x).repartition(8).materialize()
    bp = ml.BatchPredictor.from_checkpoint(onnx_ck, ml.OnnxPredictor, intra_op_num_threads=1)
    bp.predict(ds.limit(1000), batch_size=65536, concurrency=2).materialize()   # warm the instances
    t = time.perf_counter()
    n = bp.predict(ds, batch_size=65536, concurrency=2).materialize().count()
    return emit(side="fabric-onnx", model=kind, rows=n, rows_per_s=n / (time.perf_counter() - t),
                parity_max_abs_diff=onnx_ck.get_metadata()["parity_max_abs_diff"])


def ray_side(kind, path, data_path):
    if not os.path.exists(PEERS_PY):
        return emit(side="ray-data", model=kind, error=f"no peers venv at {PEERS_PY}")
    out = subprocess.run([PEERS_PY, "-c", RAY_SIDE, kind, path, data_path], capture_output=True, text=True,
                         timeout=1800)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return emit(side="ray-data", model=kind, error=out.stderr[-500:])
    row = json.loads(lines[-1])
    print(json.dumps(row), flush=True)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--skip-ray", action="store_true")
    a = ap.parse_args()
    import fabric

    fabric.init(num_cpus=2)
    x = np.random.default_rng(0).standard_normal((a.rows, 16)).astype(np.float32)
    tmp = tempfile.mkdtemp(prefix="bench-predict-")
    np.save(f"{tmp}/x.npy", x)
    booster, mlp = models(tmp, x)
    rows = []
    for kind, model, d, f in (("xgboost", booster, "xgb", "model.ubj"), ("mlp", mlp, "mlp", "model_full.pt")):
        nat = native(kind, model, x)
        fab = fabric_side(kind, f"{tmp}/{d}", x)
        ray = None if a.skip_ray else ray_side("xgboost" if kind == "xgboost" else "torch", f"{tmp}/{d}/{f}",
                                               f"{tmp}/x.npy")
        rows.append((kind, nat, fab, ray))
    print(f"\n{'model':8} {'fabric onnx rows/s':>20} {'native rows/s':>15} {'ray rows/s':>12} {'vs ray':>8} {'vs native':>10}")
    for kind, nat, fab, ray in rows:
        r = ray.get("rows_per_s") if ray else None
        print(f"{kind:8} {fab['rows_per_s']:>20,.0f} {nat['rows_per_s']:>15,.0f} "
              f"{(f'{r:,.0f}' if r else '-'):>12} {(format(fab['rows_per_s'] / r, '.2f') + 'x' if r else '-'):>8} "
              f"{fab['rows_per_s'] / nat['rows_per_s']:>9.2f}x")
    fabric.shutdown()


if __name__ == "__main__":
    sys.exit(main())
