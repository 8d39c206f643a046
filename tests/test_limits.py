"""memory= is enforced: a call that breaks its limit fails with MemoryLimitExceeded (not retried),
its worker is replaced, and the cluster keeps serving."""
import numpy as np
import pytest

import fabric


@fabric.fn(memory="200MiB", retries=3)
def hog(mb):
    blocks = []
    for _ in range(mb // 50):
        blocks.append(np.ones(50 << 17))  # 50 MiB of float64, touched
    return sum(b.nbytes for b in blocks) >> 20


@fabric.fn(memory="200MiB")
def modest():
    a = np.ones(10 << 17)  # 10 MiB
    return int(a.sum())


@fabric.cls(memory="150MiB")
class Cache:
    def __init__(self):
        self.blocks = []

    def grow(self, mb):
        self.blocks.append(np.ones(mb << 17))
        return len(self.blocks)


def test_a_call_over_its_memory_limit_fails_clearly_and_is_not_retried(cluster):
    with pytest.raises(fabric.MemoryLimitExceeded, match="memory"):
        hog.remote(1000).result(timeout=60)
    assert issubclass(fabric.MemoryLimitExceeded, fabric.WorkerCrashed)
    # the same function under its limit, and others, still run
    assert hog.remote(100).result(timeout=60) == 100
    assert modest.remote().result(timeout=60) == 10 << 17


def test_the_failed_call_ran_once(cluster, tmp_path):
    marks = tmp_path / "m"
    marks.mkdir()

    @fabric.fn(memory="100MiB", retries=5)
    def once(path):
        import os
        import time
        open(os.path.join(path, str(time.time_ns())), "w").close()
        x = np.ones(400 << 17)  # 400 MiB
        return x.size

    with pytest.raises(fabric.MemoryLimitExceeded):
        once.remote(str(marks)).result(timeout=60)
    assert len(list(marks.iterdir())) == 1  # no retry despite retries=5


def test_an_instance_over_its_limit_dies_with_the_reason(cluster):
    c = Cache.remote()
    assert c.grow.remote(20).result(timeout=30) == 1
    with pytest.raises(fabric.MemoryLimitExceeded):
        c.grow.remote(300).result(timeout=60)
    with pytest.raises(fabric.ActorDied, match="memory"):
        c.grow.remote(1).result(timeout=30)
    assert modest.remote().result(timeout=60) == 10 << 17


BACKPRESSURE = r"""
import os, threading, time, fabric
fabric.init(num_cpus=2)
client = fabric.api._client()

@fabric.fn
def nap(i):
    time.sleep(0.002)
    return i

most = 0
futs = []
for i in range(600):
    futs.append(nap.remote(i))
    most = max(most, len(client.pending))
print("MOST", most)
print("OK", [f.result(timeout=60) for f in futs] == list(range(600)))
"""


def test_a_driver_that_submits_too_fast_is_slowed_not_unbounded():
    from conftest import run_script

    r = run_script(BACKPRESSURE, env={"FABRIC_MAX_PENDING": "50"}, timeout=120)
    assert "OK True" in r.stdout, r.stderr
    most = int(r.stdout.split("MOST ")[1].split()[0])
    assert 40 <= most <= 50, most


BROKER_CAP = r"""
import os, time, fabric
fabric.init(num_cpus=1)

@fabric.fn
def nap():
    time.sleep(0.5)
    return 1

futs = [nap.remote() for _ in range(40)]
ok = refused = 0
for f in futs:
    try:
        ok += f.result(timeout=60)
    except fabric.ProtocolError as e:
        assert "FABRIC_MAX_CALLS" in str(e), e
        refused += 1
print("COUNTS", ok, refused)
print("AFTER", nap.remote().result(timeout=30))
"""


def test_the_broker_refuses_calls_beyond_its_cap_with_a_clear_error():
    from conftest import run_script

    r = run_script(BROKER_CAP, env={"FABRIC_MAX_CALLS": "10"}, timeout=120)
    assert "AFTER 1" in r.stdout, r.stderr
    ok, refused = map(int, r.stdout.split("COUNTS ")[1].split()[:2])
    assert ok + refused == 40 and refused >= 25 and ok >= 10, (ok, refused)



# Not tested here: the host guard (executor daemon guard_memory: a host under
# FABRIC_MEMORY_RESERVE of free memory has its largest worker stopped, its call failing with
# MemoryLimitExceeded, with no memory= limit set). Exhausting this shared machine's memory for
# real would endanger every process on it; triggering the guard by its threshold does not work
# either: a reserve that makes the host count as low at once stops every fresh pool worker
# within 0.25 s, before it can take a call (tried: the call waits for ever), and a reserve
# between "now" and "now minus the call's allocation" needs the host's free memory stable to
# tens of MiB, which a machine shared by other jobs is not. docs/guarantees.md says so.
