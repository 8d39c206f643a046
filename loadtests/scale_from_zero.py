"""Scale from zero and back: a burst of N one-second calls against a cluster at zero executors.

    python loadtests/scale_from_zero.py                    # 200 calls, max 8 executors of 1 CPU
    python loadtests/scale_from_zero.py --n 2000 --max 16  # the issue's burst

Starts a broker with no executor and the autoscaler beside it (local provider, min 0), waits
until the cluster is at zero executors, submits the burst, and measures:

- time to the first executor joining, and to the first result, from the burst's start;
- queue-to-start latency of every call (the function reads ``time.time()`` when it starts and
  compares it with the submit time it was given): p50 / p90 / p99 / max;
- time until full parallelism (as many calls running at once as ``max x cpus`` allows), from the
  calls' own start and end times; and until all ``max`` executors had joined;
- makespan against the ideal ``N x duration / (max x cpus)``;
- time from the last result back to zero executors (the idle window plus reaction time).

Sleeping calls use no CPU, so the burst measures the fabric, not this machine's cores.
"""
from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fabric  # noqa: E402
from fabric import protocol as P  # noqa: E402
from fabric.autoscale import decision_log_path, format_decisions, last_decisions  # noqa: E402
from fabric.client import request  # noqa: E402
from fabric.cluster import LocalCluster  # noqa: E402


def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200, help="calls in the burst (the issue: 2000)")
    ap.add_argument("--duration", type=float, default=1.0, help="seconds each call sleeps")
    ap.add_argument("--max", type=int, default=8, help="max executors")
    ap.add_argument("--cpus-per-executor", type=float, default=1.0)
    ap.add_argument("--idle", type=float, default=5.0, help="idle window before scale-down (s)")
    ap.add_argument("--interval", type=float, default=0.25, help="autoscaler poll interval (s)")
    ap.add_argument("--json", help="also write the figures to this file")
    a = ap.parse_args()

    if "FABRIC_HOME" not in os.environ:  # a data folder of its own, removed at exit
        home = os.environ["FABRIC_HOME"] = tempfile.mkdtemp(prefix="fabric-scale-")
        atexit.register(shutil.rmtree, home, True)
    os.environ.pop("FABRIC_ADDRESS", None)
    cluster = LocalCluster().start(executor=False)
    cluster.start_autoscaler(0, a.max, idle=a.idle, cpus_per_executor=a.cpus_per_executor,
                             extra_args=["--interval", str(a.interval)])
    samples = []   # (time, executors joined, busy workers, queued)
    stop = threading.Event()

    def monitor():
        while not stop.is_set():
            try:
                st = request(cluster.address, P.STATUS, timeout=2)
                samples.append((time.time(), len(st["executors"]), sum(e["busy"] for e in st["executors"]),
                                sum(q["depth"] for q in st["queues"])))
            except Exception:  # noqa: BLE001 - the broker starting or stopping
                pass
            time.sleep(0.1)

    threading.Thread(target=monitor, daemon=True).start()
    try:
        deadline = time.time() + 30
        while not (samples and samples[-1][1] == 0):
            if time.time() > deadline:
                raise SystemExit("the cluster did not come up at zero executors")
            time.sleep(0.1)
        fabric.init(address=cluster.address)

        @fabric.fn(retries=0)
        def one(submitted, d):
            start = time.time()
            time.sleep(d)
            return submitted, start, time.time(), os.getppid()

        arrivals = []
        t0 = time.time()
        futs = []
        for _ in range(a.n):
            f = one.remote(time.time(), a.duration)
            f.add_done_callback(lambda _f: arrivals.append(time.time()))
            futs.append(f)
        submitted_in = time.time() - t0
        results = fabric.get(futs, timeout=a.n * a.duration + 300)
        t_last = max(arrivals)
        # back to zero
        deadline = time.time() + a.idle + 60
        while time.time() < deadline and not (samples[-1][0] > t_last and samples[-1][1] == 0):
            time.sleep(0.1)
        t_zero = next((t for t, n, _, _ in samples if t > t_last and n == 0), None)
    finally:
        stop.set()
        fabric.shutdown()
        log_dir = cluster.log_dir
        cluster.stop()

    capacity = a.max * max(1, int(a.cpus_per_executor))
    lat = [s - sub for sub, s, _, _ in results]
    events = sorted([(s, 1) for _, s, _, _ in results] + [(e, -1) for _, _, e, _ in results],
                    key=lambda x: (x[0], x[1]))
    running, t_full, peak = 0, None, 0
    for t, d in events:
        running += d
        peak = max(peak, running)
        if running >= capacity and t_full is None:
            t_full = t
    first_wave = sorted(lat)[:capacity]  # the calls that started first: they waited for executors only
    t_first_ex = next((t for t, n, _, _ in samples if t >= t0 and n > 0), None)
    t_all_ex = next((t for t, n, _, _ in samples if t >= t0 and n >= a.max), None)
    executors_used = len({r[3] for r in results})

    def rel(t):
        return None if t is None else round(t - t0, 3)

    fig = {
        "calls": a.n, "duration_s": a.duration, "max_executors": a.max, "cpus_per_executor": a.cpus_per_executor,
        "idle_window_s": a.idle, "submit_s": round(submitted_in, 3),
        "first_executor_joined_s": rel(t_first_ex), "first_result_s": round(min(arrivals) - t0, 3),
        "all_executors_joined_s": rel(t_all_ex), "full_parallelism_s": rel(t_full), "peak_running": peak,
        "executors_used": executors_used,
        "queue_to_start_p50_s": round(pct(lat, 50), 3), "queue_to_start_p90_s": round(pct(lat, 90), 3),
        "queue_to_start_p99_s": round(pct(lat, 99), 3), "queue_to_start_max_s": round(max(lat), 3),
        "first_wave_queue_to_start_max_s": round(max(first_wave), 3),
        "makespan_s": round(t_last - t0, 3), "ideal_makespan_s": round(a.n * a.duration / capacity, 3),
        "back_to_zero_after_last_result_s": None if t_zero is None else round(t_zero - t_last, 3),
    }
    rows = [
        ("burst", f"{a.n} calls x {a.duration:g}s, max {a.max} executors x {a.cpus_per_executor:g} cpu, "
                  f"idle window {a.idle:g}s"),
        ("submitting the burst took", f"{fig['submit_s']:.3f} s"),
        ("first executor joined", f"{fig['first_executor_joined_s']} s after the burst began"),
        ("first result (from zero)", f"{fig['first_result_s']:.3f} s"),
        ("all executors joined", f"{fig['all_executors_joined_s']} s"),
        ("full parallelism", f"{fig['full_parallelism_s']} s ({capacity} running at once; peak {peak})"),
        ("queue-to-start p50 / p90 / p99 / max", f"{fig['queue_to_start_p50_s']:.3f} / {fig['queue_to_start_p90_s']:.3f}"
                                                 f" / {fig['queue_to_start_p99_s']:.3f} / {fig['queue_to_start_max_s']:.3f} s"),
        ("queue-to-start, first wave (max)", f"{fig['first_wave_queue_to_start_max_s']:.3f} s "
                                              f"(the first {len(first_wave)} calls to start)"),
        ("makespan (ideal)", f"{fig['makespan_s']:.2f} s ({fig['ideal_makespan_s']:.2f} s)"),
        ("executors that ran calls", str(executors_used)),
        ("back to zero after the last result", f"{fig['back_to_zero_after_last_result_s']} s (idle window {a.idle:g} s)"),
    ]
    w = max(len(r[0]) for r in rows)
    print("\nscale from zero")
    print("-" * (w + 60))
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    print("-" * (w + 60))
    print("\nautoscaler decisions:")
    print(format_decisions(last_decisions(decision_log_path(log_dir), 20)))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(fig, f, indent=2)


if __name__ == "__main__":
    main()
