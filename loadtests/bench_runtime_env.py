"""What a runtime_env costs per call, and what its first use costs.

    python loadtests/bench_runtime_env.py [--calls 300] [--dir PATH]

On an embedded 1-CPU cluster: the median latency of a sequential no-op call plain, with
``env_vars``, and with a ``working_dir`` (cwd, sys.path and its modules set and restored around
each call); the first call of a new working_dir (package, store, unpack); the time to package
``--dir`` (default: this repository) in the driver. Shared machine: read the figures beside each
other, not as absolutes.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import fabric  # noqa: E402
from fabric import runtime_env as R  # noqa: E402


def noop():
    return None


def median_ms(f, n):
    f.remote().result()  # warm: code shipped, env made ready
    times = []
    for _ in range(n):
        t = time.perf_counter()
        f.remote().result()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--dir", default=REPO)
    a = ap.parse_args()
    t = time.perf_counter()
    data, h = R.package(a.dir, limit=1 << 40)
    print(f"package {a.dir}: {len(R.walk(a.dir))} files, {len(data) / 2**20:.1f} MiB zipped in "
          f"{time.perf_counter() - t:.2f} s")
    with tempfile.TemporaryDirectory(prefix="bench-runenv-") as tmp:
        os.environ["FABRIC_RUNTIME_ENV_DIR"] = os.path.join(tmp, "cache")
        wd = os.path.join(tmp, "wd")
        os.makedirs(os.path.join(wd, "benchmod"))
        open(os.path.join(wd, "benchmod", "__init__.py"), "w").write("X = 1\n")
        fabric.init(num_cpus=1)
        plain = fabric.fn(noop)
        env = fabric.fn(runtime_env={"env_vars": {"BENCH": "1"}})(noop)
        wdf = fabric.fn(runtime_env={"working_dir": wd})(noop)
        plain.remote().result()  # the cluster's worker is up: what follows is the env's own cost
        t = time.perf_counter()
        wdf.remote().result()
        first = time.perf_counter() - t
        rounds: dict = {"plain": [], "env_vars": [], "working_dir": []}
        for _ in range(3):  # interleaved rounds: the machine's load shifts under one alone
            for name, f in (("plain", plain), ("env_vars", env), ("working_dir", wdf)):
                rounds[name].append(median_ms(f, a.calls))
        for name, ms in rounds.items():
            print(f"{name:12s} {statistics.median(ms):.3f} ms per sequential call (rounds: "
                  f"{', '.join(f'{m:.2f}' for m in ms)})")
        print(f"first call of a new working_dir: {first:.2f} s")
        fabric.shutdown()


if __name__ == "__main__":
    main()
