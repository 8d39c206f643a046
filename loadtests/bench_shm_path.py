"""Where a 100 MB argument's time goes on one host: the copy into shared memory and the worker's read.

    python loadtests/bench_shm_path.py [--mb 100] [--repeat 3]
    python loadtests/bench_shm_path.py --row [--repeat 3]     # the row's floor on this host

The pieces of bench_core.py's *bigarg* row apart, with no fabric in the way: the driver's copy
into a pre-faulted ``/dev/shm`` file (what ``fabric.serde.shm`` does with a big numpy argument),
then the worker's side, mapped as ``_shm_ndarray`` maps it (private, writable) and summed, beside
the ways one could populate the mapping up front, and the sum of an array already in memory.

``--row``: the whole row with no fabric in it, in GB/s as bench_core.py counts it: a fresh
100 MB array copied three times into a pre-faulted shared-memory file, each time summed by a
child process that has the file mapped and populated (an idle worker after MAP_ARENA) and
answers over a pipe. No design that copies the argument into shared memory does better on
the host; fabric's row, run just before or after, says how close it comes.
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


def row_floor(n: int) -> float:
    """GB/s of the bigarg row's three calls with no fabric: copy, hand over, sum, answer."""
    fd = os.open(f"/dev/shm/fabric-bench-row-{os.getpid()}", os.O_RDWR | os.O_CREAT, 0o600)
    os.unlink(f"/dev/shm/fabric-bench-row-{os.getpid()}")
    os.ftruncate(fd, n)
    arena = mmap.mmap(fd, n)
    arena.madvise(23)  # MADV_POPULATE_WRITE: the driver's arena is made ahead
    go, done = os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker: mapped as _shm_ndarray maps it, populated as map_arena does
        m = mmap.mmap(fd, 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        m.madvise(22)  # MADV_POPULATE_READ
        v = np.frombuffer(m, dtype=np.float64, count=n // 8)
        while os.read(go[0], 1) == b"x":
            v.sum()
            os.write(done[1], b"y")
        os._exit(0)
    arr = np.ones(n // 8)
    dst = np.frombuffer(arena, dtype=np.uint8, count=n)
    t = time.perf_counter()
    for _ in range(3):
        np.copyto(dst, arr.view(np.uint8))
        os.write(go[1], b"x")
        os.read(done[0], 1)
    gb_s = 3 * n / (time.perf_counter() - t) / 1e9
    os.write(go[1], b"q")
    os.waitpid(pid, 0)
    del dst
    arena.close()
    os.close(fd)
    return gb_s


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--row", action="store_true", help="the bigarg row's floor on this host, with no fabric")
    a = ap.parse_args()
    n = a.mb * 1024 * 1024
    if a.row:
        print("the row with no fabric (GB/s):", " ".join(f"{row_floor(n):.2f}" for _ in range(a.repeat)))
        return
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
