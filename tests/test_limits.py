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



# ------------------------------------------------------------------ the host running low, no memory= set
# The host's memory cannot be exhausted for real on a shared machine, so the executor runs in a
# memory cgroup of its own (a container's memory limit, as in a Kubernetes pod): under one, the
# limit is the executor's host memory (executor daemon memory_cgroup), and the kernel's OOM
# killer acts at it, whatever the machine has free. Real processes, a real limit, real exhaustion.

def _memory_cgroup(name, limit):
    """A new memory cgroup below this process's, of ``limit`` bytes: (directory, procs file), or
    a skip where this machine does not let us make one (not root, cgroups read-only)."""
    import os

    for line in open("/proc/self/cgroup").read().splitlines():
        _, ctrls, path = line.split(":", 2)
        if "memory" in ctrls.split(","):
            parent, limit_file = os.path.normpath("/sys/fs/cgroup/memory" + path), "memory.limit_in_bytes"
        elif ctrls == "" and os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
            parent, limit_file = os.path.normpath("/sys/fs/cgroup" + path), "memory.max"
        else:
            continue
        d = os.path.join(parent, name)
        try:
            os.mkdir(d)
            with open(os.path.join(d, limit_file), "w") as f:
                f.write(str(limit))
            if limit_file == "memory.limit_in_bytes" and os.path.exists(os.path.join(d, "memory.swappiness")):
                with open(os.path.join(d, "memory.swappiness"), "w") as f:
                    f.write("0")  # (a host with swap would page out instead of running low)
            return d, os.path.join(d, "cgroup.procs")
        except OSError as e:
            if os.path.isdir(d):
                os.rmdir(d)
            pytest.skip(f"cannot make a memory cgroup here ({e}): the host-memory guard needs one to be "
                        f"tested without exhausting the machine")
    pytest.skip("no memory cgroup controller on this machine")


@fabric.fn
def grow(mark, step_mb, pause):
    """No memory= limit: grows by ``step_mb`` MiB (touched) every ``pause`` s, up to 4 GiB."""
    import time

    with open(mark, "a") as f:
        f.write("ran\n")
    blocks = []
    for _ in range(4096 // step_mb):
        blocks.append(bytearray(b"x") * (step_mb << 20))
        time.sleep(pause)
    return "never stopped"


@fabric.fn
def small(x):
    return x


def _in_cgroup(tmp_path, reserve):
    """A broker, and an executor (1 CPU, no --memory) started inside a 400 MiB memory cgroup,
    with FABRIC_MEMORY_RESERVE=``reserve``; a driver connected to them."""
    import os
    import subprocess
    import sys

    from conftest import wait_for
    from fabric.cluster import LocalCluster

    fabric.shutdown()
    cg, procs = _memory_cgroup(f"fabric-test-{os.getpid()}-{tmp_path.name[-12:]}", 400 << 20)
    c = LocalCluster(cpus=1, log_dir=str(tmp_path)).start(executor=False)
    log = str(tmp_path / "executor.log")
    env = dict(os.environ, FABRIC_MEMORY_RESERVE=str(reserve))

    def join():  # in the child, before exec: the executor and the workers it starts live in the cgroup
        with open(procs, "w") as f:
            f.write(str(os.getpid()))

    ex = subprocess.Popen([sys.executable, "-m", "fabric.executor", "--broker", c.address, "--cpus", "1",
                           "--log-file", log], env=env, preexec_fn=join, stdin=subprocess.DEVNULL)

    def stop():
        fabric.shutdown()
        ex.terminate()
        try:
            ex.wait(20)
        except subprocess.TimeoutExpired:
            ex.kill()
            ex.wait()
        c.stop()
        wait_for(lambda: not open(procs).read().strip(), timeout=30)
        os.rmdir(cg)

    try:
        fabric.init(address=c.address)
        st = fabric.cluster_status()
        assert wait_for(lambda: fabric.cluster_status()["executors"], timeout=60), st
        (info,) = fabric.cluster_status()["executors"]
        assert info["memory"] == 400 << 20  # its memory is its cgroup's limit, not the machine's
        assert small.remote(1).result(timeout=60) == 1
    except BaseException:
        stop()
        raise
    return ex, log, stop


def _the_cluster_serves_on(ex):
    assert small.remote(2).result(timeout=60) == 2  # a fresh pool worker took the next call
    assert ex.poll() is None  # the executor lives


def test_the_guard_stops_the_largest_worker_of_a_host_low_on_memory(tmp_path):
    """No memory= limit; the host (the executor's 400 MiB cgroup) falls under its reserve
    (30 %: 120 MiB): the guard stops the largest worker before the kernel has to, and the call
    fails with MemoryLimitExceeded saying so, once (not retried)."""
    ex, log, stop = _in_cgroup(tmp_path, 0.3)
    try:
        mark = str(tmp_path / "runs")
        # 4 MiB per 50 ms: 20 MiB per guard check (every 0.25 s), far less than the reserve
        with pytest.raises(fabric.MemoryLimitExceeded, match=r"memory cgroup \(limit 400 MiB\) ran low and it was "
                                                             r"the largest worker.*no memory= limit set"):
            grow.remote(mark, 4, 0.05).result(timeout=120)
        assert open(mark).read().split() == ["ran"]  # stopped for memory: not retried
        assert "memory low" in open(log).read()
        _the_cluster_serves_on(ex)
    finally:
        stop()


def test_a_worker_the_kernel_oom_killer_stops_fails_its_call_naming_memory(tmp_path):
    """The same with the guard off (reserve 0) and a fast allocation: the kernel's OOM killer
    kills the worker at the cgroup's limit. The executor tells that SIGKILL from others by the
    kernel's OOM kill count, so the call fails with MemoryLimitExceeded naming the OOM killer,
    once, instead of a WorkerCrashed after its retries."""
    ex, log, stop = _in_cgroup(tmp_path, 0)
    try:
        mark = str(tmp_path / "runs")
        with pytest.raises(fabric.MemoryLimitExceeded, match=r"kernel's out-of-memory killer stopped it.*"
                                                             r"no memory= limit set"):
            grow.remote(mark, 64, 0.0).result(timeout=120)
        assert open(mark).read().split() == ["ran"]
        _the_cluster_serves_on(ex)
    finally:
        stop()
