"""The resource ledger (fabric/resources.py): what a shape takes from an executor, what it gives
back, and how many fit. Pure: no cluster. The broker reserves through it and the autoscaler's
policy sizes pools with its ``room``, so the two cannot drift apart (they once did on fractional
GPUs). Also ``starved``, which the driver's wait warning reads a STATUS with."""
import itertools

import pytest

from fabric.autoscale.policy import Pool
from fabric.resources import EPS, Ledger, gpu_share, pick_gpus, starved


def test_take_and_give_cpus_and_memory():
    r = Ledger(4, memory=8 << 30)
    assert r.fits((4, 0, 8 << 30)) and not r.fits((4.5, 0, 0)) and not r.fits((1, 0, (8 << 30) + 1))
    assert r.take((1.5, 0, 2 << 30)) == []
    assert (r.free_cpus, r.free_mem) == (2.5, 6 << 30)
    assert r.room((1, 0, 0)) == 2 and r.room((1, 0, 0), total=True) == 4
    assert r.room((0, 0, 3 << 30)) == 2 and r.room((0, 0, 0)) == 1 << 30
    r.give((1.5, 0, 2 << 30))
    assert (r.free_cpus, r.free_mem) == (4.0, 8 << 30)


def test_tenths_of_a_cpu_add_up_to_whole_ones():
    r = Ledger(1)
    for _ in range(10):
        assert r.fits((0.1, 0, 0))
        r.take((0.1, 0, 0))
    assert not r.fits((0.1, 0, 0)) and r.room((0.1, 0, 0)) == 0
    for _ in range(10):
        r.give((0.1, 0, 0))
    assert r.room((0.1, 0, 0)) == 10


def test_whole_gpus_take_whole_free_devices_in_order():
    r = Ledger(8, gpus=[0, 1, 2, 3])
    assert r.take((1, 2, 0)) == [0, 1]
    assert r.free_gpus == [2, 3] and r.room((0, 1, 0)) == 2 and r.room((0, 2, 0)) == 1
    assert not r.fits((0, 3, 0))
    assert r.take((1, 1, 0), devices=[3]) == [3]
    assert r.free_gpus == [2]
    r.give((1, 2, 0), [0, 1])
    r.give((1, 1, 0), [3])
    assert r.free_gpus == [0, 1, 2, 3] and r.gpu_free == {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0}


def test_fractional_gpus_share_a_device_best_fit():
    r = Ledger(8, gpus=[0, 1])
    assert r.take((0, 0.5, 0)) == [0]
    assert r.take((0, 0.25, 0)) == [0]        # the fullest device that still holds it
    assert r.take((0, 0.5, 0)) == [1]         # device 0 has 0.25 left
    assert r.take((0, 0.25, 0)) == [0]
    assert r.free_gpus == [] and r.room((0, 0.5, 0)) == 1 and r.room((0, 0.5, 0), total=True) == 4
    assert not r.fits((0, 1, 0)) and r.fits((0, 0.5, 0))


def test_thirds_and_tenths_of_a_device_fill_it_exactly():
    for share, n in [(1 / 3, 3), (0.1, 10), (0.3, 3), (0.25, 4)]:
        r = Ledger(100, gpus=[0])
        assert r.room((0, share, 0)) == n
        taken = [r.take((0, share, 0)) for _ in range(n)]
        assert taken == [[0]] * n
        assert not r.fits((0, share, 0)), share
        for t in taken:
            r.give((0, share, 0), t)
        assert r.gpu_free == {0: 1.0}, share  # back to whole, not 0.9999999


def test_give_clamps_a_device_at_wholly_free():
    r = Ledger(1, gpus=[0])
    r.take((0, 0.1, 0))
    r.give((0, 0.1, 0), [0])
    r.give((0, 0.1, 0), [0])                  # (a double give must not make a device more than whole)
    assert r.gpu_free[0] == 1.0


def test_devices_of_another_executor_are_ignored():
    r = Ledger(1, gpus=[0])
    assert r.take((0, 1, 0), devices=[7]) == [7]
    assert r.gpu_free == {0: 1.0}
    r.give((0, 1, 0), [7])
    assert r.gpu_free == {0: 1.0}


def test_could_ever_fit_counts_the_whole_executor():
    r = Ledger(2, gpus=[0], memory=1 << 30)
    r.take((2, 1, 1 << 30))
    assert r.could_ever_fit((2, 1, 1 << 30)) and not r.fits((2, 1, 1 << 30))
    assert not r.could_ever_fit((2, 2, 0)) and not r.could_ever_fit((2.5, 0, 0))
    assert not r.could_ever_fit((1, 0, (1 << 30) + 1))


def test_gpu_share_and_pick_gpus():
    assert gpu_share(0.25) == (1, 0.25) and gpu_share(2) == (2, 1.0)
    assert pick_gpus({0: 1.0, 1: 0.5}, 0.5) == [1]
    assert pick_gpus({0: 1.0, 1: 0.4}, 0.5) == [0]
    assert pick_gpus({0: 1.0, 1: 1.0 - EPS / 2}, 2) == [0, 1]
    assert pick_gpus({0: 0.5}, 1) is None and pick_gpus({}, 0) == []


def test_lent_cpus_may_oversubscribe_and_come_back():
    """A call that blocks on its own calls lends its CPUs (give) and takes them back when it
    runs again (take), even if they were used meanwhile: free CPUs go below zero for a while."""
    r = Ledger(1)
    r.take((1, 0, 0))
    r.give((1, 0, 0))                         # BLOCKED
    r.take((1, 0, 0))                         # another call runs on them
    r.take((1, 0, 0))                         # UNBLOCKED
    assert r.free_cpus == -1.0 and not r.fits((0.5, 0, 0))
    r.give((1, 0, 0))
    r.give((1, 0, 0))
    assert r.free_cpus == 1.0


@pytest.mark.parametrize("cpus,gpus", list(itertools.product([0, 0.5, 1, 2, 4], [0.1, 0.25, 0.3, 1 / 3, 0.5, 1, 2])))
def test_the_autoscaler_sizes_gpu_pools_with_the_brokers_room(cpus, gpus):
    """A GPU pool's slots for a shape are what the broker's ledger fits on one such executor."""
    pool = Pool("gpu", 0, 4, cpus=8, gpus=2)
    assert pool.slots(cpus, gpus) == Ledger(8, gpus=[0, 1]).room((cpus, gpus, 0))


def test_the_autoscaler_counts_a_pool_worker_per_cpu_call():
    pool = Pool("cpu", 0, 4, cpus=4)
    assert pool.slots(1, 0) == 4 and pool.slots(0.5, 0) == 4 and pool.slots(0, 0) == 4
    assert pool.slots(2, 0) == 2 and pool.slots(3, 0) == 1 and pool.slots(5, 0) == 0
    assert Pool("cpu", 0, 4, cpus=0.5).slots(0.25, 0) == 1


# ------------------------------------------------- starved: the driver's wait warning, pure
def _ex(cpus=2.0, free=0.0, gpus=(), gpu_free=None, memory=8 << 30, free_memory=8 << 30, instances=0):
    return {"cpus": cpus, "free_cpus": free, "gpus": list(gpus), "memory": memory, "free_memory": free_memory,
            "gpu_free": {str(d): c for d, c in (gpu_free or {}).items()}, "instances": instances}


def test_starved_names_the_calls_what_they_need_and_what_holds_the_cluster():
    shape = (1.0, 0.0, 0)
    st = {"executors": [_ex(free=0.0, instances=2)], "queues": [{"cpus": 1.0, "gpus": 0.0, "memory": 0, "depth": 3}]}
    [(got, msg)] = starved({shape: ["f", "f", "g"]}, st)
    assert got == shape
    assert msg.startswith("3 calls (f, g) wait for cpus=1, which no executor has free now (0 of 2 CPUs free; "
                          "2 instances hold theirs for life)")
    assert "fabric.kill" in msg and "@fabric.cls(cpus=0)" in msg and "add an executor" in msg
    one = starved({shape: ["h"]}, {**st, "executors": [_ex(free=0.5, instances=1)]})
    assert "1 call (h) waits" in one[0][1] and "1 instance holds its resources for life" in one[0][1]
    many = starved({shape: [f"fn{i}" for i in range(5)]}, st)
    assert "(fn0, fn1, fn2 and 2 more)" in many[0][1]


def test_starved_is_quiet_when_a_call_can_start_or_is_not_queued_for_resources():
    shape = (1.0, 0.0, 0)
    queued = [{"cpus": 1.0, "gpus": 0.0, "memory": 0, "depth": 1}]
    assert starved({shape: ["f"]}, {"executors": [_ex(free=1.0)], "queues": queued}) == []  # it fits: placed soon
    assert starved({shape: ["f"]}, {"executors": [_ex(free=0.0)], "queues": []}) == []  # not queued: a cap, args
    assert starved({shape: ["f"]}, {"executors": [], "queues": queued}) == []  # no executor: the broker says so
    assert starved({shape: ["f"]}, {"executors": [_ex(free=0.0), _ex(free=1.0)], "queues": queued}) == []
    gpu = (1.0, 0.5, 0)  # half a GPU: a device with half of it free fits, as the broker's Ledger counts it
    gq = [{"cpus": 1.0, "gpus": 0.5, "memory": 0, "depth": 1}]
    assert starved({gpu: ["g"]}, {"executors": [_ex(free=1.0, gpus=[0], gpu_free={0: 0.5})], "queues": gq}) == []
    [(_, msg)] = starved({gpu: ["g"]}, {"executors": [_ex(free=1.0, gpus=[0], gpu_free={0: 0.25})], "queues": gq})
    assert "for cpus=1 gpus=0.5," in msg
    mem = (1.0, 0.0, 4 << 30)
    mq = [{"cpus": 1.0, "gpus": 0.0, "memory": 4 << 30, "depth": 1}]
    [(_, msg)] = starved({mem: ["m"]}, {"executors": [_ex(free=2.0, free_memory=1 << 30)], "queues": mq})
    assert "for cpus=1 memory=4096MiB," in msg
