"""One xgboost rank's work with no collective: what bench_ml_xgb_floor.py's ranks cost alone.

    python loadtests/bench_xgb_rank_alone.py [--rows 200000] [--rounds 50] [--repeat 3]

Half of bench_ml_train.py's rows in one process, 1 thread, as a trainer's rank does it
(QuantileDMatrix, ``evals=[train]``), with and without the per-round evaluation. Set beside the
hand-started ranks of bench_ml_xgb_floor.py, the difference is what xgboost's collective costs.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import xgboost as xgb  # noqa: E402

from bench_ml_train import xgb_task  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    X, y, params = xgb_task(a.rows)
    h = a.rows // 2
    X, y = np.ascontiguousarray(X[:h]), y[:h]
    for _ in range(a.repeat):
        for evaluate in (True, False):
            t = time.perf_counter()
            d = xgb.QuantileDMatrix(X, label=y, nthread=1)
            t1 = time.perf_counter()
            xgb.train({**params, "nthread": 1}, d, a.rounds, evals=[(d, "train")] if evaluate else [],
                      verbose_eval=False)
            t2 = time.perf_counter()
            print(f"evals={'train' if evaluate else 'none ':5s} QuantileDMatrix {t1 - t:.3f} s, "
                  f"{a.rounds} rounds {t2 - t1:.3f} s")


if __name__ == "__main__":
    main()
