"""The 2-level fan-out of bench_core2.py with equal shapes: plain ``@fabric.fn`` parents and
children (Ray's shapes), 100 parents each ``fabric.get`` of 10 children, on a 2-CPU embedded
cluster; calls/s of 3 runs after a warm-up. It finishes only because a call blocked in
``fabric.get`` lends its CPU out and has its prefetched calls taken back (docs/guarantees.md).

    python loadtests/fanout_equal_shapes.py
"""
import statistics
import time

import fabric


def main():
    fabric.init(num_cpus=2)

    @fabric.fn
    def child(i):
        return i

    @fabric.fn
    def parent(k):
        return sum(fabric.get([child.remote(k * 10 + j) for j in range(10)]))

    def once():
        t = time.perf_counter()
        got = sum(fabric.get([parent.remote(k) for k in range(100)], timeout=300))
        dt = time.perf_counter() - t
        assert got == 1000 * 999 // 2, got
        return 1100 / dt

    once()
    runs = [once() for _ in range(3)]
    print("equal-shape fanout2 calls/s", [round(r) for r in runs], "median", round(statistics.median(runs)))
    fabric.shutdown()


if __name__ == "__main__":
    main()
