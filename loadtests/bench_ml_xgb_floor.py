"""XGBoostTrainer against the floor of distributed xgboost itself, in one run, interleaved.

    python loadtests/bench_ml_xgb_floor.py [--rows 200000] [--rounds 50] [--repeat 5]

bench_ml_train.py's task (200,000 x 20, 50 rounds, ``hist``), four ways per repetition, one after
the other so that all see the same load on a shared machine; medians and ratios at the end:
  - native: one process, ``xgb.train(nthread=2)`` on a DMatrix (bench_ml_train.py's "native");
  - by hand: two processes started beforehand (xgboost imported, their half of the rows made),
    joined through xgboost's own RabitTracker/CommunicatorContext, each ``nthread=1``, doing what
    the trainer's ranks do (QuantileDMatrix, ``evals=[train]``); wall from the go to both done, and
    each rank's CPU seconds (a load-proof floor: on an idle 2-core host a rank cannot take less wall
    than its CPU time, and native's wall is about its CPU time over 2);
  - fabric: ``XGBoostTrainer.fit()`` on a warm embedded cluster, 2 workers x 1 CPU;
  - fabric-barrier: the same with every round's report through ``ml.report``'s hub barrier (the
    behaviour before report_in_step), to size what that barrier costs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import cloudpickle  # noqa: E402

from bench_ml_train import run_native_xgb, xgb_task  # noqa: E402

WORKER = r'''
import contextlib, io, json, resource, sys, time
sys.path.insert(0, {here!r})
import numpy as np, xgboost as xgb
from xgboost import collective
from bench_ml_train import xgb_task
rank, rows = int(sys.argv[1]), int(sys.argv[2])
X, y, params = xgb_task(rows)
h = rows // 2
X, y = np.ascontiguousarray(X[rank * h:(rank + 1) * h]), y[rank * h:(rank + 1) * h]
print("READY", flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    with contextlib.redirect_stdout(io.StringIO()):
        comm = collective.CommunicatorContext(dmlc_communicator="rabit", dmlc_tracker_uri="127.0.0.1",
                                              dmlc_tracker_port=cmd["port"], dmlc_task_id=str(rank))
        comm.__enter__()
    t, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    d = xgb.QuantileDMatrix(X, label=y, nthread=1)
    t1 = time.perf_counter()
    xgb.train({{**params, "nthread": 1}}, d, num_boost_round=cmd["rounds"], evals=[(d, "train")], verbose_eval=False)
    t2 = time.perf_counter()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    comm.__exit__(None, None, None)
    cpu = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
    print(json.dumps({{"dmatrix_s": t1 - t, "train_s": t2 - t1, "cpu_s": cpu}}), flush=True)
'''


def hand_workers(rows):
    ws = [subprocess.Popen([sys.executable, "-c", WORKER.format(here=HERE), str(r), str(rows)],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for r in range(2)]
    for w in ws:
        if not w.stdout.readline().startswith("READY"):
            raise RuntimeError("a by-hand xgboost worker did not start")
    return ws


def run_hand(ws, rounds):
    from xgboost.tracker import RabitTracker

    tracker = RabitTracker(n_workers=2, host_ip="127.0.0.1", port=0, sortby="task")
    tracker.start()
    port = int(tracker.worker_args()["dmlc_tracker_port"])
    t = time.perf_counter()
    for w in ws:
        w.stdin.write(json.dumps({"port": port, "rounds": rounds}) + "\n")
        w.stdin.flush()
    outs = [json.loads(w.stdout.readline()) for w in ws]
    wall = time.perf_counter() - t
    tracker.wait_for(60)
    return {"wall_s": wall, "dmatrix_s": max(o["dmatrix_s"] for o in outs),
            "train_s": max(o["train_s"] for o in outs), "rank_cpu_s": max(o["cpu_s"] for o in outs)}


def barrier_loop(config):
    """The AIR loop with every round's report through ml.report (the hub's barrier)."""
    from fabric.ml import session
    from fabric.ml.trainers import xgboost as fx

    fx.ReportCallback()  # builds the class
    cls = fx._LazyCallback._cls
    own = cls._report_round
    cls._report_round = lambda self, m: session.report(m)
    try:
        fx._default_loop(config)
    finally:
        cls._report_round = own  # warm workers serve the next fit: back to the class's own


def trainer(rows, rounds, storage, barrier):
    import pandas as pd

    from fabric import ml

    X, y, params = xgb_task(rows)
    df = pd.DataFrame(X, columns=[f"f{i}" for i in range(20)])
    df["y"] = y

    class T(ml.XGBoostTrainer):
        def _loop(self):
            return barrier_loop if barrier else super()._loop()

    return T(params=params, label_column="y", num_boost_round=rounds,
             datasets={"train": ml.from_pandas(df, override_num_blocks=4)},
             scaling_config=ml.ScalingConfig(num_workers=2, resources_per_worker={"cpus": 1}),
             run_config=ml.RunConfig(storage_path=storage, verbose=0))


def run_fabric(rows, rounds, storage, barrier):
    tr = trainer(rows, rounds, storage, barrier)
    t = time.perf_counter()
    r = tr.fit()
    return {"wall_s": time.perf_counter() - t, "logloss": r.metrics.get("train-logloss"),
            "reports": len(r.metrics_dataframe)}


cloudpickle.register_pickle_by_value(sys.modules[__name__])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    import fabric

    storage = tempfile.mkdtemp(prefix="fabric-bench-xgb-")
    fabric.init(num_cpus=2)
    ws = hand_workers(a.rows)
    try:
        run_fabric(a.rows, a.rounds, storage, False)  # warms the workers (imports)
        run_fabric(a.rows, a.rounds, storage, True)
        sides = {"native": lambda: run_native_xgb(a.rows, a.rounds),
                 "hand": lambda: run_hand(ws, a.rounds),
                 "fabric": lambda: run_fabric(a.rows, a.rounds, storage, False),
                 "fabric-barrier": lambda: run_fabric(a.rows, a.rounds, storage, True)}
        walls: dict[str, list] = {k: [] for k in sides}
        for i in range(a.repeat):
            for k, f in sides.items():
                row = f()
                walls[k].append(row["wall_s"])
                print(json.dumps({"rep": i, "side": k, **row}), flush=True)
    finally:
        for w in ws:
            w.stdin.close()
            w.wait()
        fabric.shutdown()
    med = {k: statistics.median(v) for k, v in walls.items()}
    print("\n| side | median wall | / native | / by hand | all |\n|---|---|---|---|---|")
    for k, v in walls.items():
        print(f"| {k} | {med[k]:.2f} s | {med[k] / med['native']:.2f}x | {med[k] / med['hand']:.2f}x | "
              f"{' '.join(f'{x:.2f}' for x in v)} |")
    # per repetition ratios (the same load in each), then their median: steadier than a ratio of medians
    for k in ("hand", "fabric", "fabric-barrier"):
        r = [f / n for f, n in zip(walls[k], walls["native"])]
        print(f"{k} / native per repetition: {' '.join(f'{x:.2f}' for x in r)} (median {statistics.median(r):.2f}x)")
    r = [f / h for f, h in zip(walls["fabric"], walls["hand"])]
    print(f"fabric / hand per repetition: {' '.join(f'{x:.2f}' for x in r)} (median {statistics.median(r):.2f}x)")
    r = [f / h for f, h in zip(walls["fabric-barrier"], walls["fabric"])]
    print(f"fabric-barrier / fabric per repetition: {' '.join(f'{x:.2f}' for x in r)} "
          f"(median {statistics.median(r):.2f}x)")


if __name__ == "__main__":
    main()
