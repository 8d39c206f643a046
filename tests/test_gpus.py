"""Fractional GPUs (issue 4), on fake devices: ``FABRIC_GPUS`` gives the executor its device list.

``gpus=N`` (a whole number) takes N devices no other call shares; ``0 < gpus < 1`` takes that
share of one device, so calls can share it. Device numbers here are 3 and 5, not 0 and 1, so
that ``CUDA_VISIBLE_DEVICES`` is seen to name the device itself.
"""
import os
import time

import pytest

import fabric
from fabric import protocol as P
from fabric.client import CallOptions
from conftest import wait_for


@pytest.fixture
def gpu_cluster(request, monkeypatch):
    """A fresh embedded cluster with 4 CPUs (never the limit here) and the devices asked for."""
    monkeypatch.setenv("FABRIC_GPUS", request.param)
    fabric.shutdown()
    info = fabric.init(num_cpus=4)
    yield info
    assert wait_for(lambda: all(c == 1.0 for c in executor().get("gpu_free", {"?": 0}).values()),
                    timeout=15), fabric.cluster_status()["executors"]  # every share was given back
    fabric.shutdown()


def executor() -> dict:
    """The embedded cluster's executor as STATUS shows it ({} until it has joined: init() does
    not wait for it)."""
    exs = fabric.cluster_status()["executors"]
    return exs[0] if exs else {}


def on_gpu(t):
    start = time.time()
    time.sleep(t)
    return os.environ.get("CUDA_VISIBLE_DEVICES"), start, time.time()


half = fabric.fn(gpus=0.5)(on_gpu)
whole = fabric.fn(gpus=1)(on_gpu)


def overlap(*runs):
    return max(r[1] for r in runs) < min(r[2] for r in runs)


@pytest.mark.parametrize("gpu_cluster", ["3"], indirect=True)
def test_two_halves_share_one_device_while_a_whole_gpu_call_waits(gpu_cluster):
    a, b = half.remote(2.5), half.remote(2.5)
    c = whole.remote(0.1)  # the device is taken by halves: it waits for both
    ra, rb, rc = fabric.get([a, b, c], timeout=60)
    assert ra[0] == rb[0] == rc[0] == "3"
    assert overlap(ra, rb), (ra, rb)
    assert rc[1] >= max(ra[2], rb[2]) - 0.05, (ra, rb, rc)
    ex = fabric.cluster_status()["executors"][0]
    assert ex["gpus"] == [3]


@pytest.mark.parametrize("gpu_cluster", ["3,5"], indirect=True)
def test_fractions_pack_onto_one_device_and_leave_whole_devices_whole(gpu_cluster):
    a, b = half.remote(3.0), half.remote(3.0)
    assert wait_for(lambda: executor().get("gpu_free") == {"3": 0.0, "5": 1.0}, timeout=30)
    c = whole.remote(1.0)  # packing left device 5 whole: it runs at once, beside the halves
    ra, rb, rc = fabric.get([a, b, c], timeout=60)
    assert ra[0] == rb[0] == "3" and rc[0] == "5", (ra, rb, rc)
    assert overlap(ra, rb, rc), (ra, rb, rc)

    quarter = fabric.fn(gpus=0.25)(on_gpu)
    runs = fabric.get([half.remote(3.0) for _ in range(4)] + [quarter.remote(0.1)], timeout=60)
    halves, q = runs[:4], runs[4]
    assert sorted(r[0] for r in halves) == ["3", "3", "5", "5"]     # two per device, all at once
    assert overlap(*halves), halves
    assert q[1] >= min(r[2] for r in halves) - 0.05                 # no room for a quarter meanwhile


@fabric.cls(gpus=0.5)
class Holder:
    def device(self):
        return os.environ.get("CUDA_VISIBLE_DEVICES"), os.getpid()


@pytest.mark.parametrize("gpu_cluster", ["3"], indirect=True)
def test_fractional_instances_share_a_device(gpu_cluster):
    h1, h2 = Holder.remote(), Holder.remote()
    (d1, p1), (d2, p2) = h1.device.remote().result(timeout=60), h2.device.remote().result(timeout=60)
    assert d1 == d2 == "3" and p1 != p2                             # two processes on one device
    h3 = Holder.remote()                                            # no share left: it waits
    time.sleep(1.0)
    assert not h3.ready().done()
    fabric.kill(h1)
    assert h3.device.remote().result(timeout=60)[0] == "3"           # and gets the share h1 gave back
    fabric.kill(h2)
    fabric.kill(h3)


@pytest.mark.parametrize("gpu_cluster", ["3"], indirect=True)
def test_gpus_above_one_must_be_whole_and_the_cluster_goes_on(gpu_cluster):
    for make in (lambda: fabric.fn(gpus=1.5), lambda: half.options(gpus=2.5), lambda: fabric.cls(gpus=1.5),
                 lambda: fabric.gang(2, gpus=1.5)):
        with pytest.raises(ValueError, match=r"gpus above 1 must be a whole number of devices, got \d\.5"):
            make()
    # a driver that skips the API's check: the broker refuses the call itself, and answers it
    blob, h = half._blob()
    client = fabric.api._client()
    fut = client.submit(P.TASK, blob, h, (0.1,), {}, CallOptions(cpus=1, gpus=1.5, retries=0, label="raw"))
    with pytest.raises(fabric.ProtocolError, match=r"gpus=1\.5: above 1, gpus must be a whole number"):
        fut.result(timeout=30)
    futs = client.submit(P.GANG, blob, h, (0.1,), {}, CallOptions(cpus=1, gpus=1.5, retries=0, label="raw", gang=2))
    for f in futs:  # every member of a refused gang gets the answer
        with pytest.raises(fabric.ProtocolError, match="whole number"):
            f.result(timeout=30)
    assert fabric.get([half.remote(0.1), whole.remote(0.1)], timeout=60)[1][0] == "3"
    with pytest.raises(fabric.Unschedulable, match="gpus=2"):
        whole.options(gpus=2).remote(0).result(timeout=30)


@pytest.mark.parametrize("gpu_cluster", ["3,5"], indirect=True)
def test_a_gang_of_fractional_members(gpu_cluster):
    def where():
        ctx = fabric.gang_context()
        return ctx.rank, os.environ.get("CUDA_VISIBLE_DEVICES")

    got = fabric.get(fabric.gang(4, cpus=1, gpus=0.5).run(where), timeout=60)
    assert [r for r, _ in got] == [0, 1, 2, 3]
    assert sorted(d for _, d in got) == ["3", "3", "5", "5"]
    with pytest.raises(fabric.Unschedulable, match="at most 4"):
        fabric.gang(5, cpus=0, gpus=0.5).run(where)[0].result(timeout=30)
