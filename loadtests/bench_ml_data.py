"""fabric.ml Dataset map_batches against Ray Data's, in one run on one machine.

The workload of ``bench_data`` in ../shared/bench/ray_ml.py: 10M rows x 20 float32 columns in
100 blocks, materialized first; then the timed pass ``map_batches(work, batch_format="pandas",
batch_size=rows_per_block).count()`` where ``work`` adds the row sum as a column. fabric's side
runs here, then ``ray_ml.py data`` runs in the peers' venv; the rows/s ratio is printed (target:
at least 3x Ray; Ray's call, like fabric's first row, gives the function writable copies, and
a second row shows ``zero_copy_batch=True``), with the driver's RSS before, at its peak during, and after the pass (it must
stay flat: blocks never pass through the driver).

    .venv/bin/python loadtests/bench_ml_data.py                # full size, with Ray
    .venv/bin/python loadtests/bench_ml_data.py --rows 1000000 --no-peer   # quick check
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAY_ML = os.path.join(os.path.dirname(REPO), "shared", "bench", "ray_ml.py")
COLS = 20


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class PeakRSS:
    def __init__(self):
        self.peak = rss_mib()
        self.stop = threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.wait(0.02):
            self.peak = max(self.peak, rss_mib())

    def __enter__(self):
        self.t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.t.join()


def make(batch):
    n = len(batch["id"])
    rng = np.random.default_rng(int(batch["id"][0]))
    return {f"c{i}": rng.standard_normal(n).astype(np.float32) for i in range(COLS)}


def work(df):
    df["s"] = df.sum(axis=1)
    return df


def run_fabric(rows, blocks, cpus, repeat):
    import fabric
    from fabric import ml

    fabric.init(num_cpus=cpus)
    per = rows // blocks
    ds = ml.range(rows, override_num_blocks=blocks).map_batches(make, batch_size=per, batch_format="numpy")
    ds = ds.materialize()
    ds.map_batches(work, batch_format="pandas", batch_size=per).limit(1).count()  # warm the workers' code
    out = []
    for kind in ("count", "count.zero_copy_batch", "materialize"):
        times = []
        rss0 = rss_mib()
        with PeakRSS() as peak:
            for _ in range(repeat):
                t = time.perf_counter()
                pipe = ds.map_batches(work, batch_format="pandas", batch_size=per,
                                      zero_copy_batch=kind.endswith("zero_copy_batch"))
                if kind.startswith("count"):
                    n = pipe.count()
                else:
                    m = pipe.materialize()
                    n = m.count()
                    del m
                times.append(time.perf_counter() - t)
        dt = statistics.median(times)
        out.append({"peer": "fabric", "workload": f"map_batches.{kind}", "rows": n, "wall_s": round(dt, 3),
                    "rows_per_s": n / dt, "rss_before_mib": round(rss0, 1), "rss_peak_mib": round(peak.peak, 1),
                    "rss_after_mib": round(rss_mib(), 1), "data_mib": round(rows * COLS * 4 / 2**20)})
    fabric.shutdown()
    return out


def run_ray(python, cpus):
    r = subprocess.run([python, RAY_ML, "data", "--cpus", str(cpus)], capture_output=True, text=True, timeout=1800)
    rows = []
    for line in r.stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass
    if not rows:
        print("ray side failed:\n" + r.stderr[-3000:], file=sys.stderr)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--blocks", type=int, default=100)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="timed passes (median)")
    ap.add_argument("--no-peer", action="store_true", help="fabric alone")
    ap.add_argument("--peers-python", default=os.path.join(REPO, ".venv-peers", "bin", "python"))
    a = ap.parse_args()

    results = run_fabric(a.rows, a.blocks, a.cpus, a.repeat)
    for r in results:
        print(json.dumps(r), flush=True)
    ray = None
    if not a.no_peer:
        if a.rows != 10_000_000:
            print("note: ray_ml.py always runs 10M rows; the ratio compares rows/s at different sizes", file=sys.stderr)
        if not os.path.exists(a.peers_python):
            print(f"no peers venv at {a.peers_python} (bash loadtests/setup_peers.sh)", file=sys.stderr)
        else:
            for r in run_ray(a.peers_python, a.cpus):
                print(json.dumps(r), flush=True)
                if r.get("workload") == "map_batches":
                    ray = r
    print()
    print("| workload | fabric rows/s | ray-data rows/s | fabric / ray | driver RSS before / peak / after (MiB) |")
    print("|---|---|---|---|---|")
    for r in results:
        ratio = f"{r['rows_per_s'] / ray['rows_per_s']:.1f}x" if ray else "-"
        rr = f"{ray['rows_per_s']:,.0f}" if ray else "-"
        print(f"| {r['workload']} ({r['rows']:,} rows x {COLS}, {a.blocks} blocks) | {r['rows_per_s']:,.0f} | {rr} | "
              f"{ratio} | {r['rss_before_mib']} / {r['rss_peak_mib']} / {r['rss_after_mib']} "
              f"(data: {r['data_mib']}) |")


if __name__ == "__main__":
    main()
