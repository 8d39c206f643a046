"""Parallelism, worker output, resources and GPUs, clean shutdown."""
import os
import re
import time

import psutil
import pytest

import fabric
from conftest import run_script, wait_for


@fabric.fn
def span(t):
    start = time.time()
    time.sleep(t)
    return start, time.time(), os.getpid()


@fabric.fn
def chatty(n):
    for i in range(n):
        print(f"line {i}")
    return n


def test_n_calls_on_n_cpus_run_at_the_same_time(cluster):
    spans = fabric.get([span.remote(1.0) for _ in range(2)])
    (s1, e1, p1), (s2, e2, p2) = spans
    assert p1 != p2
    assert max(s1, s2) < min(e1, e2)


@fabric.fn
def whose(tag):
    return tag, os.getpid()


@fabric.fn
def other(tag):
    return tag, os.getpid()


def test_sequential_calls_stay_on_the_worker_that_holds_their_code(cluster):
    """Sequential calls go to the idle worker that ran the function last (its imports and caches
    are warm), not round-robin; a second function sticks to a worker in the same way."""
    fabric.get([span.remote(0.3) for _ in range(2)])  # both workers idle, in some order
    pids = {whose.remote(i).result()[1] for i in range(20)}
    assert len(pids) == 1, pids
    others = {other.remote(i).result()[1] for i in range(20)}
    assert len(others) == 1, others


def test_worker_output_reaches_the_driver_prefixed(cluster, capsys):
    assert chatty.remote(3).result(timeout=30) == 3
    out = capsys.readouterr().out
    lines = [l for l in out.splitlines() if "line " in l]
    assert len(lines) == 3
    assert all(re.match(r"\(chatty pid=\d+\) line \d", l) for l in lines), lines


def test_a_line_printed_across_flushes_arrives_whole(cluster, capsys):
    @fabric.fn
    def slow_line():
        print("first half,", end="", flush=True)
        time.sleep(0.35)  # the output channel flushes every 0.1 s meanwhile
        print(" second half")
        time.sleep(0.35)
        return 1

    assert slow_line.remote().result(timeout=30) == 1
    lines = [l for l in capsys.readouterr().out.splitlines() if "half" in l]
    assert len(lines) == 1 and re.match(r"\(slow_line pid=\d+\) first half, second half$", lines[0]), lines


def test_chatty_function_is_rate_limited_not_stalled(cluster, capsys):
    # "not stalled": it returns within the result() bound (a GetTimeout otherwise); no
    # wall-clock assertion (a loaded machine is slow, not wrong)
    assert chatty.remote(200_000).result(timeout=60) == 200_000
    out = capsys.readouterr().out
    assert "bytes of output dropped" in out


@fabric.fn
def say(token):
    print(token)
    return token


def test_worker_output_goes_to_the_executor_log(cluster):
    token = f"only-this-test-{os.urandom(6).hex()}"  # no earlier test's line can match it
    assert say.remote(token).result(timeout=30) == token
    log_dir = cluster["log_dir"]

    def logged():
        return token in "".join(open(os.path.join(log_dir, f)).read() for f in os.listdir(log_dir)
                                if f.startswith("executor"))

    assert wait_for(logged, timeout=30)


GPU_SCRIPT = r"""
import os, time, fabric
fabric.init(num_cpus=2, num_gpus=2)

@fabric.fn(gpus=1)
def dev(t):
    time.sleep(t)
    return os.environ.get("CUDA_VISIBLE_DEVICES")

@fabric.fn
def cpu():
    return os.environ.get("CUDA_VISIBLE_DEVICES")

a, b = dev.remote(1.0), dev.remote(1.0)
got = sorted([a.result(timeout=60), b.result(timeout=60)])
print("GPUS", got)
print("CPU", repr(cpu.remote().result()))
try:
    dev.options(gpus=3).remote(0).result(timeout=30)
except fabric.Unschedulable as e:
    print("UNSCHED", e)
"""


def test_gpu_calls_get_their_own_device():
    """A fake two-GPU executor (device list from configuration): each gpus=1 call sees one device."""
    r = run_script(GPU_SCRIPT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "GPUS ['0', '1']" in r.stdout
    assert "CPU ''" in r.stdout
    assert "UNSCHED" in r.stdout and "gpus=3" in r.stdout


SHUTDOWN_SCRIPT = r"""
import os, fabric, numpy as np
info = fabric.init(num_cpus=2)

@fabric.fn
def total(a):
    return float(a.sum())

@fabric.cls
class C:
    def ping(self):
        return os.getpid()

print("ADDR", info["address"])
print("PID", os.getpid())
assert total.remote(np.ones(1 << 20)).result() == 1 << 20
c = C.remote()
print("WORKER", c.ping.remote().result())
print("CHILDREN", " ".join(str(p.pid) for p in __import__("psutil").Process().children(recursive=True)))
{end}
"""


@pytest.mark.parametrize("end", ["fabric.shutdown()", "pass  # atexit", "os._exit(0)  # killed driver"])
def test_nothing_is_left_behind(end):
    r = run_script(SHUTDOWN_SCRIPT.replace("{end}", end), timeout=120)
    assert r.returncode == 0, r.stderr
    out = dict(line.split(" ", 1) for line in r.stdout.splitlines() if " " in line)
    children = [int(p) for p in out["CHILDREN"].split()]
    assert len(children) >= 4  # broker, executor, 2 pool workers (+ the instance)
    deadline = time.monotonic() + 60  # (waits for an event; generous: a loaded host is slow, not wrong)
    while time.monotonic() < deadline and any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                                              for p in children):
        time.sleep(0.1)
    assert not [p for p in children if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    sock = out["ADDR"].replace("ipc://", "")
    if not end.startswith("os._exit"):
        assert not os.path.exists(os.path.dirname(sock))
    else:  # killed: its processes are gone; the socket folder is swept by the broker on exit
        deadline = time.monotonic() + 60
        while os.path.exists(sock) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not os.path.exists(sock)
    deadline = time.monotonic() + 60
    leftovers = lambda: [f for f in os.listdir("/dev/shm") if f.startswith(f"fabric-{out['PID']}-")]  # noqa: E731
    while leftovers() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not leftovers()
