"""Core additions a Ray user expects (issue 18): cluster views, fractional CPUs, fabric.cancel
with force/recursive. On the embedded cluster and on a `fabric start` cluster."""
import logging
import os
import time

import pytest

import fabric
from conftest import run_script, wait_for
from test_cluster import started  # noqa: F401 - the `fabric start` cluster fixture


def _barrier(folder, me, n, limit=60.0):
    """Each caller marks itself, then waits until ``n`` callers are in (or ``limit`` passes)."""
    open(os.path.join(folder, f"in-{me}"), "w").close()
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        k = sum(1 for f in os.listdir(folder) if f.startswith("in-"))
        if k >= n:
            return k
        time.sleep(0.02)
    return sum(1 for f in os.listdir(folder) if f.startswith("in-"))


def test_cluster_views(cluster, tmp_path):
    assert wait_for(lambda: len(fabric.nodes()) == 1, timeout=30)  # the executor joins after init
    ns = fabric.nodes()
    assert len(ns) == 1 and ns[0]["alive"] and ns[0]["resources"]["CPU"] == 2
    assert fabric.cluster_resources()["CPU"] == 2
    assert wait_for(lambda: fabric.available_resources()["CPU"] == 2)

    @fabric.fn(cpus=1.5)
    def hold(folder):
        open(os.path.join(folder, "started"), "w").close()
        while not os.path.exists(os.path.join(folder, "go")):
            time.sleep(0.02)
        return 1

    fut = hold.remote(str(tmp_path))
    assert wait_for(lambda: (tmp_path / "started").exists(), timeout=30)
    assert fabric.available_resources()["CPU"] == pytest.approx(0.5)
    assert fabric.nodes()[0]["available"]["CPU"] == pytest.approx(0.5)
    (tmp_path / "go").touch()
    assert fut.result(timeout=30) == 1
    assert wait_for(lambda: fabric.available_resources()["CPU"] == 2)


def test_an_instance_waiting_for_a_place_is_queued_demand(cluster):
    """STATUS counts instances waiting for resources in its queues (what `fabric status` shows
    and the autoscaler scales for), and the waiting one starts once the holder is killed."""
    @fabric.cls(cpus=2)
    class Whole:
        def ping(self):
            return "pong"

    first = Whole.remote()
    assert first.ping.remote().result(timeout=60) == "pong"
    second = Whole.remote()  # no place: the first holds both CPUs for life

    def waiting():
        return [q for q in fabric.cluster_status()["queues"] if q.get("instances")]

    assert wait_for(lambda: waiting(), timeout=30)
    assert waiting() == [{"cpus": 2.0, "gpus": 0.0, "memory": 0, "depth": 1, "instances": 1}]
    fabric.kill(first)
    assert second.ping.remote().result(timeout=60) == "pong"
    assert waiting() == []
    fabric.kill(second)


def test_a_call_waiting_for_resources_is_warned_about_and_runs_once_they_free(cluster, caplog, monkeypatch):
    """A call queued behind instances that hold every CPU is not lost, nor silent: after
    FABRIC_WAIT_WARN the driver logs what it waits for and what holds the cluster."""
    from fabric import connection

    monkeypatch.setattr(connection, "WAIT_WARN", 0.3)

    @fabric.cls(cpus=2)
    class Hog:
        def ping(self):
            return "pong"

    @fabric.fn
    def starved_call():
        return "ran"

    hog = Hog.remote()
    assert hog.ping.remote().result(timeout=60) == "pong"
    with caplog.at_level(logging.WARNING, logger="fabric.client"):
        fut = starved_call.remote()
        assert wait_for(lambda: any("starved_call" in r.getMessage() for r in caplog.records), timeout=30)
    [msg] = [r.getMessage() for r in caplog.records if "starved_call" in r.getMessage()]
    assert "1 call (starved_call) waits for cpus=1, which no executor has free now (0 of 2 CPUs free; " \
           "1 instance holds its resources for life)" in msg and "fabric.kill" in msg, msg
    with pytest.raises(fabric.GetTimeout, match="it keeps running, or waits for a place, on the cluster"):
        fut.result(timeout=0.2)
    fabric.kill(hog)
    assert fut.result(timeout=60) == "ran"


def test_fractional_cpus_pack_two_calls_per_core(cluster, tmp_path):
    """Four calls of cpus=0.5 run at once on 2 CPUs (with cpus=1 only two could: the barrier
    would time out and they would see fewer than 4)."""
    @fabric.fn(cpus=0.5)
    def meet(folder, me):
        return _barrier(folder, me, 4)

    assert fabric.get([meet.remote(str(tmp_path), i) for i in range(4)], timeout=90) == [4, 4, 4, 4]
    assert wait_for(lambda: fabric.available_resources()["CPU"] == 2, timeout=30)  # all given back


def test_cancel_refuses_bad_input(cluster):
    @fabric.fn
    def one():
        return 1

    with pytest.raises(TypeError, match="expects a Future"):
        fabric.cancel(3)
    fut = one.remote()
    with pytest.raises(TypeError, match="force must be True or False"):
        fabric.cancel(fut, force="yes")
    with pytest.raises(TypeError, match="recursive must be True or False"):
        fabric.cancel(fut, recursive=None)
    assert fut.result(timeout=30) == 1
    assert fabric.cancel(fut) is False  # finished already
    assert fabric.cancel(fabric.put(5)) is False


def test_malformed_cancel_flags_are_refused_and_the_cluster_serves(cluster, caplog):
    from fabric import api
    from fabric import protocol as P

    @fabric.fn
    def one():
        return 1

    client = api._client()
    with caplog.at_level(logging.WARNING, logger="fabric.client"):
        client._send_d([P.C[P.CANCEL], bytes(16), b"\x09"])
        assert one.remote().result(timeout=30) == 1
        assert wait_for(lambda: "CANCEL flags must be one byte" in caplog.text, timeout=10)


def test_cancel_raises_cancelled_inside_the_running_call(cluster, tmp_path):
    @fabric.fn
    def loop(folder):
        open(os.path.join(folder, "started"), "w").close()
        try:
            while True:
                time.sleep(0.05)
        finally:
            open(os.path.join(folder, "finally-ran"), "w").close()

    fut = loop.remote(str(tmp_path))
    assert wait_for(lambda: (tmp_path / "started").exists(), timeout=30)
    assert fabric.cancel(fut) is True
    with pytest.raises(fabric.Cancelled):
        fut.result(timeout=30)
    assert wait_for(lambda: (tmp_path / "finally-ran").exists(), timeout=30)  # not killed: it unwound
    assert wait_for(lambda: fabric.available_resources()["CPU"] == 2, timeout=30)


def test_force_cancel_kills_the_worker(cluster, tmp_path):
    @fabric.fn
    def stuck(folder):
        open(os.path.join(folder, "pid"), "w").write(str(os.getpid()))
        while True:
            time.sleep(0.05)

    fut = stuck.remote(str(tmp_path))
    assert wait_for(lambda: (tmp_path / "pid").exists() and (tmp_path / "pid").read_text(), timeout=30)
    pid = int((tmp_path / "pid").read_text())
    fabric.cancel(fut, force=True)
    with pytest.raises(fabric.Cancelled):
        fut.result(timeout=30)
    import psutil

    assert wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie", timeout=30)


def _nested_code(folder):
    return f"""
import os, time, fabric
folder = {folder!r}

@fabric.fn
def child(i):
    open(os.path.join(folder, f"child-{{i}}"), "w").close()
    try:
        while True:
            time.sleep(0.05)
    finally:
        open(os.path.join(folder, f"child-{{i}}-cancelled"), "w").close()

@fabric.fn(cpus=0.5)
def parent():
    kids = [child.options(cpus=0.5).remote(i) for i in range(2)]
    return fabric.get(kids)
"""


def _run_nested(folder):
    ns = {}
    exec(_nested_code(folder), ns)
    fut = ns["parent"].remote()
    assert wait_for(lambda: all(os.path.exists(os.path.join(folder, f"child-{i}")) for i in range(2)), timeout=60)
    fabric.cancel(fut, recursive=True)
    with pytest.raises(fabric.Cancelled):
        fut.result(timeout=30)
    # the calls it spawned were cancelled too: Cancelled was raised inside them
    assert wait_for(lambda: all(os.path.exists(os.path.join(folder, f"child-{i}-cancelled")) for i in range(2)),
                    timeout=30)


def test_cancel_is_recursive(cluster, tmp_path):
    _run_nested(str(tmp_path))
    assert wait_for(lambda: fabric.available_resources()["CPU"] == 2, timeout=30)


def test_views_and_recursive_cancel_on_a_started_cluster(started, tmp_path):  # noqa: F811
    code = f"""
import sys
sys.path.insert(0, {os.path.dirname(__file__)!r})
import fabric, pytest
fabric.init(address={started["address"]!r})
assert fabric.cluster_resources()["CPU"] == 3, fabric.cluster_resources()
assert len(fabric.nodes()) == 2
from test_core2 import _run_nested
_run_nested({str(tmp_path)!r})
print("core2 ok")
"""
    r = run_script(code, env=started["env"], timeout=180)
    assert r.returncode == 0, r.stderr
    assert "core2 ok" in r.stdout
