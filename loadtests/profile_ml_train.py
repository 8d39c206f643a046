"""Where an XGBoostTrainer.fit() spends its time: timestamps per phase, in the driver and in each member.

    python loadtests/profile_ml_train.py [FITS]     # 200k x 20, 50 rounds, hist, 2 workers x 1 CPU

FITS fits (default 3) run one after the other on one embedded cluster: the first one cold, the
others warm. Printed relative to the fit() call: the driver's steps (_open_run, _prepare_data,
_train, gang.run), and per rank when its process was created, when its setup began (the trainer
unpickled), how long the setup took (importing xgboost if not yet imported, tracker, hub
allgather, connecting), and in the loop the shard fetch (Arrow -> pandas here), the
QuantileDMatrix, the training (with its per-round reports and the final checkpoint) and the
loop's end. The loop is the AIR form's, instrumented; the setup is the trainer's own.
"""
import glob
import json
import os
import shutil
import sys
import tempfile
import time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cloudpickle  # noqa: E402

import fabric  # noqa: E402
from fabric import ml  # noqa: E402
from fabric.ml import session  # noqa: E402
from fabric.ml.trainers import base  # noqa: E402
from fabric.ml.trainers import xgboost as fx  # noqa: E402

TMP = tempfile.mkdtemp(prefix="fabric-prof-")
OUT = os.path.join(TMP, "members")  # each member writes its stamps here (same host)
os.makedirs(OUT)


def _process_start() -> float:
    """This process's start, to the tick (psutil's create_time is off by up to 1 s)."""
    start = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
    return time.time() - (float(open("/proc/uptime").read().split()[0]) - start)


def member_loop(config):
    s = {"proc_created": _process_start(), "loop_enter": time.time()}
    import xgboost as xgb

    t = time.time()
    df = session.current().shards["train"].to_pandas()
    s["fetch_s"] = time.time() - t
    label = config["label_column"]
    features = [c for c in df.columns if c != label]
    t = time.time()
    d = xgb.QuantileDMatrix(df[features], label=df[label], nthread=1)
    s["dmatrix_s"] = time.time() - t
    cb = fx.ReportCallback(frequency=0, checkpoint_at_end=True, label_column=label, feature_columns=features,
                           num_boost_round=config["num_boost_round"])
    t = time.time()
    xgb.train({**config["params"], "nthread": 1}, d, num_boost_round=config["num_boost_round"],
              evals=[(d, "train")], callbacks=[cb], verbose_eval=False)
    s["train_s"] = time.time() - t
    s["loop_exit"] = time.time()
    with open(f"{OUT}/{session.get_context().get_world_rank()}.json", "w") as f:
        json.dump(s, f)


class ProfTrainer(ml.XGBoostTrainer):
    def _setup_worker(self, ctx):
        t0 = time.time()
        had = "xgboost" in sys.modules
        import xgboost  # noqa: F401

        imported = time.time() - t0
        super()._setup_worker(ctx)
        with open(f"{OUT}/setup{ctx.rank}.json", "w") as f:
            json.dump({"setup_enter": t0, "setup_s": time.time() - t0, "had_xgb": had, "import_s": imported}, f)

    def _loop(self):
        return member_loop


cloudpickle.register_pickle_by_value(sys.modules[__name__])


def main():
    import pandas as pd

    from bench_ml_train import xgb_task

    fabric.init(num_cpus=2)
    X, y, params = xgb_task(200_000)
    df = pd.DataFrame(X, columns=[f"f{i}" for i in range(20)])
    df["y"] = y
    ds = ml.from_pandas(df, override_num_blocks=4)
    stamps = {}
    R = base._Run
    orig = {k: getattr(R, k) for k in ("_open_run", "_prepare_data", "_train", "_save")}
    orig_run = fabric.Gang.run

    def wrap(k, fn):
        def f(*a, **kw):
            stamps[k + ">"] = time.time()
            try:
                return fn(*a, **kw)
            finally:
                stamps[k + "<"] = time.time()
        return f

    for k, fn in orig.items():
        setattr(R, k, wrap(k, fn))
    fabric.Gang.run = wrap("gang.run", orig_run)
    try:
        for i in range(int(sys.argv[1]) if len(sys.argv) > 1 else 3):
            for p in glob.glob(OUT + "/*.json"):
                os.remove(p)
            tr = ProfTrainer(params=params, label_column="y", num_boost_round=50, datasets={"train": ds},
                             scaling_config=ml.ScalingConfig(num_workers=2, resources_per_worker={"cpus": 1}),
                             run_config=ml.RunConfig(storage_path=os.path.join(TMP, "store"), verbose=0))
            stamps.clear()
            t0 = time.time()
            tr.fit()
            t1 = time.time()
            m = {os.path.basename(p)[:-5]: json.load(open(p)) for p in glob.glob(OUT + "/*.json")}
            print(f"--- fit {i}: {t1 - t0:.3f} s")
            for k, v in sorted(stamps.items(), key=lambda kv: kv[1]):
                print(f"  driver {k:16s} {v - t0:8.3f}")
            for r in ("0", "1"):
                s, su = m.get(r), m.get("setup" + r, {})
                if not s:
                    continue
                print(f"  rank {r}: process created {s['proc_created'] - t0:.3f}, setup from "
                      f"{su.get('setup_enter', t0) - t0:.3f} for {su.get('setup_s', 0):.3f} (xgboost imported "
                      f"before: {su.get('had_xgb')}, import {su.get('import_s', 0):.3f}), loop from "
                      f"{s['loop_enter'] - t0:.3f}: fetch {s['fetch_s']:.3f}, QuantileDMatrix {s['dmatrix_s']:.3f}, "
                      f"train {s['train_s']:.3f}, loop end {s['loop_exit'] - t0:.3f}")
    finally:
        for k, fn in orig.items():
            setattr(R, k, fn)
        fabric.Gang.run = orig_run
        fabric.shutdown()
        shutil.rmtree(TMP, ignore_errors=True)


if __name__ == "__main__":
    main()
