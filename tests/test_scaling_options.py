"""Per function/class ``max_containers`` (a cap on concurrency) and ``min_warm`` (containers
kept warm while a driver uses them, and a floor for the autoscaler), and what ``fabric status``
shows of them."""
import os
import subprocess
import sys
import time

import pytest

import fabric
from fabric.autoscale.policy import Policy, Pool

from conftest import wait_for


@fabric.fn(max_containers=1)
def one_at_a_time(i, gate=None):
    while gate and not os.path.exists(gate):  # held until the test opens the gate
        time.sleep(0.01)
    t0 = time.time()
    time.sleep(0.3)
    return t0, time.time()


@fabric.fn
def quick(i):
    return i


@fabric.fn(min_warm=2)
def kept_warm(x):
    return x + 1


@fabric.cls(max_containers=1)
class Single:
    def ping(self):
        return "pong"


def _fn(name):
    for f in fabric.cluster_status()["functions"]:
        if f["name"].endswith(name):
            return f
    return None


def test_max_containers_caps_concurrency_without_blocking_other_calls(cluster, tmp_path):
    gate = str(tmp_path / "gate")
    capped = [one_at_a_time.remote(i, gate) for i in range(4)]
    other = quick.remote(7)
    assert other.result(timeout=30) == 7
    # it did not wait behind the capped calls queued before it: they cannot finish before the
    # gate opens (an event, not a timing)
    assert not any(f.done() for f in capped)
    st = _fn("one_at_a_time")
    assert st["max_containers"] == 1 and st["kind"] == "fn"
    assert st["running"] == 1 and st["waiting"] == 3
    open(gate, "w").close()
    spans = sorted(f.result(timeout=30) for f in capped)
    for (_, end), (start, _) in zip(spans, spans[1:]):
        # never two at once, on a cluster with room for two. Causal, so slowness cannot break
        # it: each starts after the previous ended (0.02 s: clock reads in two processes)
        assert start >= end - 0.02
    assert _fn("one_at_a_time")["running"] == 0


def test_max_containers_of_a_class_caps_live_instances(cluster):
    a = Single.remote()
    assert a.ping.remote().result(timeout=30) == "pong"
    b = Single.remote()
    waiting = b.ping.remote()
    # the broker holds the second instance back (an event, not a sleep), so its call waits
    assert wait_for(lambda: (_fn("Single") or {}).get("waiting") == 1, timeout=30), _fn("Single")
    assert not waiting.done()  # a second instance waits for the first to end
    fabric.kill(a)
    assert waiting.result(timeout=30) == "pong"
    fabric.kill(b)
    assert wait_for(lambda: _fn("Single")["running"] == 0, timeout=10)


def test_min_warm_loads_the_code_into_that_many_workers(cluster):
    assert kept_warm.remote(1).result(timeout=30) == 2
    assert wait_for(lambda: (_fn("kept_warm") or {}).get("warm", 0) >= 2, timeout=10), _fn("kept_warm")
    f = _fn("kept_warm")
    assert f["min_warm"] == 2 and f["max_containers"] is None
    r = subprocess.run([sys.executable, "-m", "fabric.cli", "status", "--address", cluster["address"]],
                       capture_output=True, text=True, timeout=30, env={**os.environ, "COLUMNS": "250"})
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if "kept_warm" in x)
    assert "fn" in line and "2" in line


def test_bad_scaling_options_are_refused(cluster):
    for bad in ({"min_warm": -1}, {"min_warm": 70000}, {"min_warm": True}, {"max_containers": 0},
                {"max_containers": 1.5}, {"max_containers": 70000}):
        with pytest.raises((ValueError, TypeError), match="min_warm|max_containers"):
            quick.options(**bad)
    assert quick.remote(1).result(timeout=30) == 1


def test_min_warm_is_forgotten_when_its_driver_leaves(tmp_path):
    from fabric.cluster import LocalCluster

    fabric.shutdown()
    lc = LocalCluster(cpus=2, parent_pid=0, log_dir=str(tmp_path)).start()
    try:
        fabric.init(address=lc.address)
        assert kept_warm.remote(1).result(timeout=30) == 2
        assert _fn("kept_warm")["min_warm"] == 2
        fabric.shutdown()
        fabric.init(address=lc.address)
        assert wait_for(lambda: _fn("kept_warm") is None, timeout=10)
    finally:
        fabric.shutdown()
        lc.stop()


def _ex(eid, busy=0):
    return {"id": eid, "cpus": 1, "free_cpus": 1 - busy, "gpus": [], "free_gpus": [], "busy": busy,
            "workers": 1, "instances": 0, "labels": {}, "last_seen_s": 0.1}


def test_the_autoscaler_keeps_capacity_for_min_warm():
    pol = Policy([Pool("cpu", min=0, max=8, cpus=1)], idle_s=0)
    status = {"executors": [], "queues": [], "calls_pending": 0, "instances": 0,
              "functions": [{"name": "app.embed", "kind": "fn", "min_warm": 3, "cpus": 1, "gpus": 0, "memory": 0}]}
    (d,) = [d for d in pol.decide(status, now=100.0) if d.action == "launch"]
    assert d.code == "min_warm" and d.count == 3 and "app.embed x3" in d.reason
    # with the floor met and nothing to do, nothing is stopped below it
    status["executors"] = [_ex("a"), _ex("b"), _ex("c")]
    assert not [d for d in pol.decide(status, now=200.0) if d.action == "terminate"]
    status["functions"] = []
    assert not [d for d in pol.decide(status, now=300.0) if d.action == "launch"]
