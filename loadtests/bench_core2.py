"""Core II rows against Ray: a generator's items per second, and a 2-level fan-out.

    python loadtests/bench_core2.py --repeat 3            # fabric (this venv) and Ray (.venv-peers)

- ``gen_items_per_s``: one call yields 10,000 small items (ints); the driver takes each item's
  value as it comes. fabric: a generator ``@fabric.fn`` and its ``Stream``; Ray: a generator task
  (``num_returns="streaming"``, Ray's streaming generator) and ``ray.get`` of each ref.
- ``fanout2_calls_per_s``: 100 calls, each submitting 10 calls and waiting for them (1,100 calls);
  the figure is all calls over the wall time. On fabric the parents are ``cpus=0.5,
  max_containers=cpus//2`` and the children ``cpus=0.25``: shapes chosen when a call waiting for
  its children kept its CPU (with ``cpus=1`` parents on 2 CPUs the children could not start),
  kept so the row compares with earlier runs. A waiting call now lends its CPU out, and equal
  shapes finish too (tests/test_nested.py; docs/guarantees.md).

Each side runs in its own interpreter (Ray only in the peers' venv: this file imports ray only
when run as ``--side ray``), on a cluster of ``--cpus`` CPUs started for it; medians over
``--repeat`` runs of each workload after one warm-up.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_ITEMS, N_PARENTS, N_CHILDREN = 10_000, 100, 10


def fabric_side(cpus: int, repeat: int) -> dict:
    import fabric

    fabric.init(num_cpus=cpus)

    @fabric.fn
    def items(n):
        for i in range(n):
            yield i

    @fabric.fn(cpus=0.25)  # the shapes of earlier runs (see the docstring)
    def child(i):
        return i

    @fabric.fn(cpus=0.5, max_containers=max(1, cpus // 2))
    def parent(k):
        return sum(fabric.get([child.remote(k * N_CHILDREN + j) for j in range(N_CHILDREN)]))

    def gen_once():
        t = time.perf_counter()
        s = items.remote(N_ITEMS)
        total = sum(f.result() for f in s)
        dt = time.perf_counter() - t
        assert total == N_ITEMS * (N_ITEMS - 1) // 2
        return N_ITEMS / dt

    def fan_once():
        t = time.perf_counter()
        got = sum(fabric.get([parent.remote(k) for k in range(N_PARENTS)], timeout=600))
        dt = time.perf_counter() - t
        m = N_PARENTS * N_CHILDREN
        assert got == m * (m - 1) // 2
        return N_PARENTS * (1 + N_CHILDREN) / dt

    out = _measure(gen_once, fan_once, repeat)
    fabric.shutdown()
    return out


def ray_side(cpus: int, repeat: int) -> dict:
    import ray

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)

    @ray.remote(num_returns="streaming")
    def items(n):
        for i in range(n):
            yield i

    @ray.remote
    def child(i):
        return i

    @ray.remote
    def parent(k):
        return sum(ray.get([child.remote(k * N_CHILDREN + j) for j in range(N_CHILDREN)]))

    def gen_once():
        t = time.perf_counter()
        total = sum(ray.get(ref) for ref in items.remote(N_ITEMS))
        dt = time.perf_counter() - t
        assert total == N_ITEMS * (N_ITEMS - 1) // 2
        return N_ITEMS / dt

    def fan_once():
        t = time.perf_counter()
        got = sum(ray.get([parent.remote(k) for k in range(N_PARENTS)], timeout=600))
        dt = time.perf_counter() - t
        m = N_PARENTS * N_CHILDREN
        assert got == m * (m - 1) // 2
        return N_PARENTS * (1 + N_CHILDREN) / dt

    out = _measure(gen_once, fan_once, repeat)
    ray.shutdown()
    return out


def _measure(gen_once, fan_once, repeat):
    gen_once(), fan_once()  # warm-up: workers started, code shipped
    gens = [gen_once() for _ in range(repeat)]
    fans = [fan_once() for _ in range(repeat)]
    return {"gen_items_per_s": statistics.median(gens), "fanout2_calls_per_s": statistics.median(fans),
            "runs": {"gen_items_per_s": gens, "fanout2_calls_per_s": fans}}


def run_side(python, side, cpus, repeat):
    r = subprocess.run([python, os.path.abspath(__file__), "--side", side, "--cpus", str(cpus),
                        "--repeat", str(repeat)], capture_output=True, text=True, timeout=1800, cwd=REPO)
    if r.returncode != 0:
        print(f"{side} failed:\n{r.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", choices=["fabric", "ray"], help="run one side here and print its JSON")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--peers-python", default=os.path.join(REPO, ".venv-peers", "bin", "python"))
    a = ap.parse_args()
    if a.side:
        out = (fabric_side if a.side == "fabric" else ray_side)(a.cpus, a.repeat)
        print(json.dumps(out))
        return
    fab = run_side(sys.executable, "fabric", a.cpus, a.repeat)
    ray = run_side(a.peers_python, "ray", a.cpus, a.repeat) if os.path.exists(a.peers_python) else None
    print(f"| workload | fabric | ray | fabric vs ray |\n|---|---|---|---|")
    for k in ("gen_items_per_s", "fanout2_calls_per_s"):
        f, r = (fab or {}).get(k), (ray or {}).get(k)
        ratio = f"{f / r:.1f}x" if f and r else "-"
        print(f"| {k} | {f:,.0f} | {r:,.0f} | {ratio} |" if f and r else f"| {k} | {f} | {r} | {ratio} |")
    print(json.dumps({"fabric": fab, "ray": ray}))


if __name__ == "__main__":
    main()
