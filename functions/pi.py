"""fabric pi: the core in one screen, on an embedded local cluster, no set-up.

    python functions/pi.py

Estimates pi with 64 parallel Monte-Carlo samples (fan-out, progress bar), chains calls whose
arguments are other calls' Futures (resolved on the cluster), and keeps a stateful counter
in a warm container.
"""
import time

import numpy as np

import fabric


@fabric.fn
def sample(seed: int, n: int = 200_000) -> int:
    """How many of n random points in the unit square fall inside the quarter circle."""
    rng = np.random.default_rng(seed)
    xy = rng.random((n, 2))
    return int(((xy ** 2).sum(axis=1) <= 1.0).sum())


@fabric.fn
def combine(*counts, n: int = 200_000) -> float:
    return 4.0 * sum(counts) / (len(counts) * n)


@fabric.cls
class Tally:
    def __init__(self):
        self.seen = 0

    def add(self, k: int) -> int:
        self.seen += k
        return self.seen


def main():
    t0 = time.perf_counter()
    info = fabric.init()
    print(f"cluster: {info['address']} (embedded={info['embedded']}), logs in {info['log_dir']}")

    hits = list(sample.map(range(64), progress=True))           # 64 calls over every CPU
    pi = 4.0 * sum(hits) / (64 * 200_000)
    print(f"pi ~ {pi:.5f} from {64 * 200_000:,} points")

    futures = [sample.remote(s) for s in range(64, 72)]        # Futures passed straight on:
    print(f"pi ~ {combine.remote(*futures).result():.5f} (combined on the cluster)")

    tally = Tally.remote()
    for h in hits[:5]:
        tally.add.remote(h)
    print(f"tally of the first 5 samples: {tally.add.remote(0).result():,}")
    fabric.shutdown()
    print(f"done in {time.perf_counter() - t0:.2f}s")


if __name__ == "__main__":
    main()
