"""Named headers against the tuple indexing and byte slicing they replaced, per operation.

    python loadtests/bench_headers.py

The hot paths: the driver builds and packs one CallHeader per call and reads one ResultHeader
per result; a worker reads one CallHeader per call. "old" is the code before protocol
version 3 (a bare struct tuple, read by position; results read by slicing the frame). Each
figure is the minimum over rounds of the mean of many runs, in CPU time of this thread (the least
disturbed by other load on a shared machine).
"""
from __future__ import annotations

import struct
import time
import timeit

from fabric import protocol as P

OLD_CALL = struct.Struct("<16s16sB16sddQhdHHHBB")


def old_pack_call(call_id, code_hash, kind, actor_id, cpus, gpus, memory, retries, timeout, nbuf, flags=0,
                  opts=0, max_containers=0, min_warm=0):
    return OLD_CALL.pack(call_id, code_hash, kind, actor_id, cpus, gpus, memory, retries, timeout, nbuf,
                         max_containers, min_warm, flags, opts)


cid, ch = bytes(16), b"h" * 16
f0 = P.C[P.RESULT] + P.pack_result(cid, P.OK, 2, 0.1, P.SHM_FREE)
old_hdr = OLD_CALL.pack(cid, ch, P.TASK, P.NO_ID, 1.0, 0.0, 0, 0, 0.0, 3, 0, 0, 0, 5)
new_hdr = P.pack_call(cid, ch, P.TASK, P.NO_ID, 1.0, 0.0, 0, 0, 0.0, 3, opts=5)
CH, read_result = P.CallHeader, P.ResultHeader.read

CASES = {
    "driver: build + pack a call header": (
        "fields = (cid, ch, 0, P.NO_ID, 1.0, 0.0, 0, 0, 0.0, 3, 0); old_pack_call(*fields, 5, 0, 0)",
        "CH.of(cid, ch, 0, P.NO_ID, 1.0, 0.0, 0, 0, 0.0, 3, 0, 0, 0, 0, 5).pack()"),
    "driver: read a RESULT's id and status": (
        "f0[4:20]; f0[4:]; f0[20]",
        "h = read_result(f0, 4); h.call_id; h.status"),
    "worker: read a CALL's fields": (
        "cid_, code_hash, kind, _a, _c, _g, m, _r, _t, nbuf, _mc, _mw, flags, opts = OLD_CALL.unpack(old_hdr)",
        "h = CH.read(new_hdr); h.call_id; h.code_hash; h.kind; h.memory; h.nbuf; h.window; h.opts"),
}


def main(rounds: int = 15, number: int = 100_000) -> None:
    g = globals()
    for name, (old, new) in CASES.items():
        t_old = t_new = float("inf")
        for _ in range(rounds):  # interleaved: both see the same load
            t_old = min(t_old, timeit.Timer(old, timer=time.thread_time, globals=g).timeit(number) / number)
            t_new = min(t_new, timeit.Timer(new, timer=time.thread_time, globals=g).timeit(number) / number)
        print(f"{name:40s} old {t_old * 1e9:6.0f} ns   new {t_new * 1e9:6.0f} ns   "
              f"({(t_new - t_old) * 1e9:+.0f} ns)")


if __name__ == "__main__":
    main()
