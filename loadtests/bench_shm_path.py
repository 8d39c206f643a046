"""Where a 100 MB argument's time goes on one host: the copy into shared memory and the worker's read.

    python loadtests/bench_shm_path.py [--mb 100] [--repeat 3]

The pieces of bench_core.py's *bigarg* row apart, with no fabric in the way: the driver's copy
into a pre-faulted ``/dev/shm`` file (what ``fabric.serde.shm`` does with a big numpy argument),
then the worker's side, mapped as ``_shm_ndarray`` maps it (private, writable) and summed, beside
the ways one could populate the mapping up front, and the sum of an array already in memory.
"""
import argparse
import mmap
import os
import time

import numpy as np


def timed(fn):
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    n = a.mb * 1024 * 1024
    path = f"/dev/shm/fabric-bench-{os.getpid()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, n)
        arena = mmap.mmap(fd, n, flags=mmap.MAP_SHARED)
    finally:
        os.close(fd)
    arr = np.ones(n // 8)
    rw = mmap.PROT_READ | mmap.PROT_WRITE

    def read(flags, prot, advice=None):
        t = time.perf_counter()
        with open(path, "rb") as f:
            m = mmap.mmap(f.fileno(), n, flags=flags, prot=prot)
        if advice is not None:
            m.madvise(advice)
        t1 = time.perf_counter()
        np.frombuffer(m, dtype=np.float64).sum()
        t2 = time.perf_counter()
        m.close()
        return f"{(t1 - t) * 1e3:.1f} + {(t2 - t1) * 1e3:.1f}"

    try:
        for _ in range(a.repeat):
            copy = timed(lambda: np.copyto(np.frombuffer(arena, dtype=np.uint8), arr.view(np.uint8)))
            print(f"copy in {copy:.1f} ms | map + sum (ms): private {read(mmap.MAP_PRIVATE, rw)}, "
                  f"private+MADV_POPULATE_READ {read(mmap.MAP_PRIVATE, rw, 22)}, "
                  f"private+MAP_POPULATE {read(mmap.MAP_PRIVATE | mmap.MAP_POPULATE, rw)}, "
                  f"shared read-only+MAP_POPULATE {read(mmap.MAP_SHARED | mmap.MAP_POPULATE, mmap.PROT_READ)} "
                  f"| sum in memory {timed(arr.sum):.1f} ms")
    finally:
        arena.close()
        os.unlink(path)


if __name__ == "__main__":
    main()
