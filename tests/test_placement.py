"""Placement (fabric/broker/placement.py): where calls, instances and gangs go, as pure
functions over the broker's records. No cluster, no sockets, no clock: executors and workers
are the broker's own records, built as the broker builds them from EXEC_HELLO and READY."""
import pytest

from fabric import protocol as P
from fabric.broker import placement as pl
from fabric.broker.state import Call, Executor, Worker

CODE = b"c" * 16


def executor(n, cpus=4, gpus=(), memory=8 << 30):
    return Executor(b"e" + bytes([n]) * 8, {"cpus": cpus, "gpus": list(gpus), "memory": memory, "host": f"h{n}"})


def worker(ex, n, pool=True, gpus=()):
    w = Worker(b"w" + ex.ident[1:] + bytes([n]) * 8, ex, {"kind": "pool" if pool else "spawned", "credit": 4})
    w.gpus = tuple(gpus)
    ex.workers[w.ident] = w
    return w


def call(n, cpus=1.0, gpus=0.0, memory=0, code=CODE):
    cid = b"d" * 8 + n.to_bytes(8, "big")
    h = P.unpack_call(P.pack_call(cid, code, P.TASK, P.NO_ID, cpus, gpus, memory, 0, 0.0, 0))
    return Call(cid, b"r" + b"d" * 8, [b"", b"", b""], h)


def busy(w, c, started=0.0):
    """``w`` runs ``c`` (as run_on leaves it)."""
    w.held = c.shape
    w.inflight[c.id] = c
    c.worker, c.started = w, started


# ------------------------------------------------------------------------------ pick_worker
def test_an_idle_worker_with_the_code_goes_first_else_the_latest_idle_that_fits():
    ex = executor(1)
    a, b, c = worker(ex, 1), worker(ex, 2), worker(ex, 3)
    idle = {a: None, b: None, c: None}
    assert pl.pick_worker(idle, {}, call(1), {}, 0.0) is c          # the most recently idle
    a.code_seen.add(CODE)
    assert pl.pick_worker(idle, {}, call(1), {}, 0.0) is a          # warm code wins
    assert pl.pick_worker(idle, {}, call(2, cpus=5), {}, 0.0) is None


def test_an_idle_worker_on_a_full_executor_is_not_picked():
    full, free = executor(1, cpus=1), executor(2, cpus=1)
    a, b = worker(full, 1), worker(free, 1)
    full.ledger.take((1, 0, 0))
    assert pl.pick_worker({b: None, a: None}, {}, call(1), {}, 0.0) is b


def test_prefetch_only_short_calls_behind_short_ones():
    ex = executor(1, cpus=1)
    w = worker(ex, 1)
    head = call(1)
    busy(w, head, started=10.0)
    partial = {w: None}
    assert pl.pick_worker({}, partial, call(2), {}, 10.0) is None                  # duration unknown
    assert pl.pick_worker({}, partial, call(2), {CODE: 0.001}, 10.0) is w          # short: prefetched
    assert pl.pick_worker({}, partial, call(2), {CODE: 1e3}, 10.0) is None         # long: waits
    assert pl.pick_worker({}, partial, call(2), {CODE: 0.001}, 1e4) is None        # the head is overdue
    assert pl.pick_worker({}, partial, call(2, cpus=0.5), {CODE: 0.001}, 10.0) is None  # another shape


def test_nothing_is_prefetched_behind_a_call_that_waited_on_nested_calls():
    """It said BLOCKED once (its CPUs were lent, what was behind it taken back): it may wait
    again, on the very calls that would be queued behind it."""
    ex = executor(1, cpus=1)
    w = worker(ex, 1)
    head = call(1)
    busy(w, head, started=10.0)
    assert pl.pick_worker({}, {w: None}, call(2), {CODE: 0.001}, 10.0) is w
    head.waited = True
    assert pl.pick_worker({}, {w: None}, call(2), {CODE: 0.001}, 10.0) is None


def test_prefetch_goes_to_the_least_loaded_busy_worker():
    ex = executor(1, cpus=2)
    a, b = worker(ex, 1), worker(ex, 2)
    busy(a, call(1), 5.0)
    busy(b, call(2), 5.0)
    c3 = call(3)
    a.inflight[c3.id] = c3
    assert pl.pick_worker({}, {a: None, b: None}, call(4), {CODE: 0.001}, 5.0) is b


# ------------------------------------------------------------------------------ extra workers
def test_fractional_cpus_start_one_more_worker_up_to_the_cpus_over_the_share():
    ex = executor(1, cpus=1)
    w = worker(ex, 1)
    half = (0.5, 0.0, 0)
    busy(w, call(1, cpus=0.5))
    ex.ledger.take(half)
    assert pl.extra_worker_on([ex], [], half, 0) is ex
    worker(ex, 2)
    assert pl.extra_worker_on([ex], [], half, 0) is None        # two workers of half a CPU: full
    assert pl.extra_worker_on([ex], [(ex, [], call(9))], half, 0) is None


def test_a_blocked_worker_lends_its_place():
    ex = executor(1, cpus=1)
    w = worker(ex, 1)
    busy(w, call(1))
    w.lent = 1.0                                               # its call waits on its own calls
    assert pl.extra_worker_on([ex], [], (1.0, 0.0, 0), 1) is ex
    assert pl.extra_worker_on([ex], [], (1.0, 0.0, 0), 0) is None


# ------------------------------------------------------------------------------ GPUs
def test_whole_gpus_reuse_an_idle_worker_on_free_devices_else_spawn():
    ex = executor(1, gpus=[0, 1])
    w = worker(ex, 1, pool=False, gpus=[1])
    assert pl.place_gpu([ex], [w], (1, 1, 0)) == (w, None, None)
    ex.ledger.take((0, 0.5, 0), [1])                           # its device is partly taken
    assert pl.place_gpu([ex], [w], (1, 1, 0)) == (None, ex, None)
    ex.ledger.take((0, 1, 0), [0])
    assert pl.place_gpu([ex], [w], (1, 1, 0)) is None


def test_a_fraction_goes_to_the_fullest_device_that_holds_it():
    ex = executor(1, gpus=[0, 1, 2])
    ex.ledger.take((0, 0.5, 0), [1])
    ex.ledger.take((0, 0.25, 0), [2])
    assert pl.place_gpu([ex], [], (1, 0.5, 0)) == (None, ex, [1])
    assert pl.place_gpu([ex], [], (1, 0.75, 0)) == (None, ex, [2])
    assert pl.place_gpu([ex], [], (1, 0.8, 0)) == (None, ex, [0])


def test_a_fraction_prefers_a_device_with_an_idle_worker_among_equally_full_ones():
    ex = executor(1, gpus=[0, 1])
    w = worker(ex, 1, pool=False, gpus=[1])
    assert pl.place_gpu([ex], [w], (1, 0.5, 0)) == (w, None, None)
    assert pl.place_gpu([ex], [w], (5, 0.5, 0)) is None        # not enough CPUs anywhere


# ------------------------------------------------------------------------------ instances, gangs
def test_first_fit():
    a, b = executor(1, cpus=1), executor(2, cpus=4)
    assert pl.first_fit([a, b], (2, 0, 0)) is b and pl.first_fit([a, b], (1, 0, 0)) is a
    assert pl.first_fit([a, b], (8, 0, 0)) is None


def test_a_gang_is_packed_executor_by_executor_or_not_placed():
    a, b = executor(1, cpus=2), executor(2, cpus=4)
    plan = pl.plan_gang([a, b], (1, 0, 0), 5)
    assert [ex for ex, _ in plan] == [a, a, b, b, b]
    assert pl.plan_gang([a, b], (1, 0, 0), 7) is None
    a.ledger.take((2, 0, 0))
    assert [ex for ex, _ in pl.plan_gang([a, b], (1, 0, 0), 4)] == [b] * 4


def test_a_gang_of_gpu_fractions_shares_devices():
    ex = executor(1, cpus=8, gpus=[0, 1])
    plan = pl.plan_gang([ex], (1, 0.5, 0), 4)
    assert [d for _, d in plan] == [[0], [0], [1], [1]]
    assert pl.plan_gang([ex], (1, 0.5, 0), 5) is None
    assert [d for _, d in pl.plan_gang([ex], (1, 1, 0), 2)] == [[0], [1]]


@pytest.mark.parametrize("shape", [(5, 0, 0), (1, 1, 0), (1, 0, 16 << 30)])
def test_a_shape_no_executor_can_ever_hold_is_said_so(shape):
    exs = [executor(1), executor(2)]
    why = pl.unschedulable(exs, shape)
    assert why.startswith("no executor can ever run a call that needs") and "h1: cpus=4" in why
    assert pl.unschedulable([], shape) is None                 # no executor yet: wait
    assert pl.unschedulable(exs, (4, 0, 8 << 30)) is None


def test_a_gang_bigger_than_the_cluster_is_said_so():
    exs = [executor(1, cpus=2), executor(2, cpus=2)]
    assert pl.gang_unschedulable(exs, (1, 0, 0), 4) is None
    exs[0].ledger.take((2, 0, 0))                              # busy now, but not forever
    assert pl.gang_unschedulable(exs, (1, 0, 0), 4) is None
    why = pl.gang_unschedulable(exs, (1, 0, 0), 5)
    assert "a gang of 5 members" in why and "at most 4 such members" in why
