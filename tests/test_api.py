"""Every name of the public API contract, used as a new user would, on an embedded cluster."""
import asyncio
import os
import time

import numpy as np
import pytest

import fabric
from conftest import wait_for


@fabric.fn
def square(x):
    return x * x


@fabric.fn
def add(a, b):
    return a + b


@fabric.fn(cpus=1, retries=0)
def whoami():
    return os.getpid()


@fabric.fn
def total(a):
    return float(a.sum()), a.shape, a.dtype.str


@fabric.fn
def echo(x):
    return x


def test_remote_result(cluster):
    fut = square.remote(3)
    assert isinstance(fut, fabric.Future)
    assert fut.result(timeout=30) == 9
    assert fut.done()


def test_local_runs_in_this_process(cluster):
    assert square.local(4) == 16
    assert whoami.local() == os.getpid()
    assert whoami.remote().result() != os.getpid()


def test_direct_call_is_refused_with_a_hint(cluster):
    with pytest.raises(TypeError, match=r"square.remote\(...\)"):
        square(3)


def test_map_is_ordered_and_streams(cluster):
    assert list(square.map(range(100))) == [x * x for x in range(100)]
    assert list(add.map([1, 2, 3], [10, 20, 30])) == [11, 22, 33]
    taken = []

    def inputs():  # records how far map() has read its input
        for i in range(50):
            taken.append(i)
            yield i

    it = square.map(inputs(), window=2)  # a plain iterator, a small window
    assert next(it) == 0
    # streams: the first result comes while most of the input is not even read yet
    assert len(taken) <= 4, taken
    assert list(it) == [x * x for x in range(1, 50)]


def test_map_progress_bar(cluster, capsys):
    assert list(square.map(range(20), progress=True)) == [x * x for x in range(20)]
    err = capsys.readouterr().err
    assert "square" in err and "20/20" in err


def test_options_override_per_call(cluster):
    fut = square.options(cpus=2).remote(5)
    assert fut.result() == 25
    with pytest.raises(TypeError, match="unknown option"):
        square.options(cpu=2)


def test_bursts_travel_in_batches_and_keep_their_order(cluster):
    client = fabric.api._client()
    before = client.batches_sent
    futs = [add.remote(i, 1) for i in range(3000)]  # submitted back to back: BATCH messages
    assert fabric.get(futs) == [i + 1 for i in range(3000)]
    assert client.batches_sent > before  # at least one BATCH left this driver (its count is
    # timing-dependent: how many submits fall within 50 us of each other; not asserted)
    lone = square.remote(12)  # a single call after the burst is not held back
    assert lone.result(timeout=10) == 144


def test_get_and_wait(cluster):
    futs = [square.remote(i) for i in range(10)]
    assert fabric.get(futs) == [i * i for i in range(10)]
    assert fabric.get(futs[3]) == 9
    slow = echo.remote(1)
    done, pending = fabric.wait([slow, square.remote(2)], num_returns=2, timeout=30)
    assert len(done) == 2 and pending == []
    done, pending = fabric.wait(futs, num_returns=3)
    assert len(done) == 3 and len(pending) == 7


def test_wait_timeout_returns_pending(cluster):
    @fabric.fn
    def nap(t):
        time.sleep(t)
        return t

    f = nap.remote(1.5)
    done, pending = fabric.wait([f], num_returns=1, timeout=0.1)
    assert done == [] and pending == [f]
    with pytest.raises(fabric.GetTimeout):
        f.result(timeout=0.05)
    with pytest.raises(fabric.GetTimeout):
        fabric.get([f], timeout=0.05)
    assert f.result(timeout=30) == 1.5  # the call went on


def test_put_passes_by_reference(cluster):
    arr = np.arange(1000, dtype=np.float64)
    ref = fabric.put(arr)
    assert ref.done() and ref.result() is arr
    assert total.remote(ref).result()[0] == arr.sum()
    assert add.remote(square.remote(2), fabric.put(10)).result() == 14


def test_futures_as_arguments_resolve_on_the_cluster(cluster):
    assert add.remote(square.remote(2), square.remote(3)).result() == 13
    chain = square.remote(2)
    for _ in range(3):
        chain = add.remote(chain, 1)
    assert chain.result() == 7
    nested = echo.remote({"a": [square.remote(4)]})  # a Future inside a container arrives as a Future
    inner = nested.result()["a"][0]  # (returned inside the result, it resolves here: test_nested_values.py)
    assert isinstance(inner, fabric.Future) and inner.result() == 16


def test_dependent_calls_do_not_round_trip_through_the_driver(cluster, tmp_path):
    """Hold the driver's result socket so it receives nothing: a chain still completes."""
    marker = tmp_path / "done"

    @fabric.fn
    def touch(x, path):
        with open(path, "w") as f:
            f.write(str(x))
        return x

    client = fabric.api._state.client
    with client.rlock:  # nobody in this process can receive results while we hold this
        first = square.remote(6)
        touch.remote(add.remote(first, 1), str(marker))
        assert wait_for(marker.exists, timeout=30)
        assert marker.read_text() == "37"
        assert not first.done()  # the driver never saw the first result
    assert first.result() == 36


def test_await_future(cluster):
    async def main():
        a, b = await asyncio.gather(square.remote(7), square.remote(8))
        return a + b + await add.remote(1, 2)

    assert asyncio.run(main()) == 49 + 64 + 3


def test_done_callback(cluster):
    seen = []
    f = square.remote(9)
    f.add_done_callback(lambda fut: seen.append(fut.result()))
    f.result()
    assert wait_for(lambda: seen == [81])


def test_large_numpy_arguments_and_results(cluster):
    big = np.random.default_rng(0).random((1000, 1500))  # 12 MB: goes through shared memory
    s, shape, dtype = total.remote(big).result()
    assert s == pytest.approx(big.sum()) and shape == big.shape and dtype == big.dtype.str
    fortran = np.asfortranarray(big)
    assert total.remote(fortran).result()[0] == pytest.approx(big.sum())
    back = echo.remote(big[:, :10].copy()).result()
    assert np.array_equal(back, big[:, :10])


def _shm_files():
    return sorted(p for p in os.listdir("/dev/shm") if p.startswith(f"fabric-{os.getpid()}-"))


def test_shared_memory_files_are_reused_only_when_the_worker_let_go(cluster):
    a = np.full(300_000, 1.0)  # 2.4 MB: above the shared-memory threshold
    for _ in range(3):
        assert total.remote(a).result()[0] == a.sum()
    before = _shm_files()
    assert total.remote(a * 2).result()[0] == 2 * a.sum()
    assert _shm_files() == before  # the same file carried the next array

    @fabric.cls
    class Keeper:
        def keep(self, arr):
            self.arr = arr  # holds a view of the shared memory after the call
            return float(arr.sum())

        def kept(self):
            return float(self.arr.sum())

    k = Keeper.remote()
    assert k.keep.remote(a).result() == a.sum()
    for i in range(3):  # same-size arrays: they must not overwrite what the instance keeps
        assert total.remote(a * (i + 5)).result()[0] == a.sum() * (i + 5)
    assert k.kept.remote().result() == a.sum()
    fabric.kill(k)


def test_a_call_that_writes_to_its_array_argument_leaves_the_next_call_its_own(cluster):
    """Workers keep their mapping of a reused shared-memory file between calls, unless a call
    wrote to it: each call sees the array its driver sent, whatever the call before did."""
    @fabric.fn
    def sum_then_bump(arr):
        s = float(arr.sum())
        arr[::1000] += 1.0  # in place, on pages all through the file
        return s

    n = 300_000  # 2.4 MB: above the shared-memory threshold
    for i in range(4):
        assert sum_then_bump.remote(np.full(n, float(i))).result() == n * i
        assert total.remote(np.full(n, float(i))).result()[0] == n * i  # a reader after the writer


def test_a_worker_settles_a_calls_mappings_once_idle_not_at_the_next_call(cluster):
    """The check whether a call's shared-memory mappings can be kept (a page-table walk) runs
    once the worker idles after the DONE, off the reply's path: by the time a later call comes,
    the mapping is kept already, though no call with an array made the worker look."""
    @fabric.cls
    class Holder:
        def take(self, arr):
            return float(arr.sum())

        def state(self):
            from fabric.serde import shm
            return sorted(shm._kept), len(shm._settling)

    h = Holder.remote()
    a = np.full(300_000, 2.0)  # 2.4 MB: above the shared-memory threshold
    assert h.take.remote(a).result() == a.sum()
    time.sleep(0.3)  # idle: well past SETTLE_IDLE_MS
    kept, settling = h.state.remote().result()
    assert settling == 0
    assert any(os.path.basename(p).startswith(f"fabric-{os.getpid()}-") for p in kept), kept
    fabric.kill(h)


ARENA_SCRIPT = """
import os, resource, time
import numpy as np
import fabric
from fabric import api

WORKERS = int(os.environ.get("WORKERS", "2"))  # pool workers of the cluster: 2 embedded
fabric.init() if os.environ.get("FABRIC_ADDRESS") else fabric.init(num_cpus=2)
client = api._state.client
path = client.shm.arena_path
t0 = time.monotonic()
client.shm.arena_thread.join(120)  # the arena is made in the background: on a cold VM, its
print("ARENA", client.shm.arena_ready, round(time.monotonic() - t0, 1))  # fresh pages can be slow

@fabric.fn
def mapped(p):
    import os
    with open("/proc/self/maps") as f:
        return os.getpid(), p in f.read()

@fabric.fn
def faults_summing(a):
    import resource
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    s = float(a.sum())
    return s, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

seen = {}
deadline = time.monotonic() + 15  # ~1.5 s: the broker hands arenas out at its next tick
while time.monotonic() < deadline and not (len(seen) == WORKERS and all(seen.values())):
    for pid, ok in fabric.get([mapped.remote(path) for _ in range(2 * WORKERS)]):
        seen[pid] = seen.get(pid) or ok
    time.sleep(0.1)
print("MAPPED", sorted(seen.values()))
print("MAPPED_IN", round(time.monotonic() - deadline + 15, 1))
if not all(seen.values()):  # what the driver did, for the failure's message
    print("TOLD", client.arena_told, "EXISTS", os.path.exists(path), "PATH", path)
    logs = getattr(api._state.cluster, "log_dir", None)
    for name in sorted(os.listdir(logs)) if logs else ():
        print("LOG", name, open(os.path.join(logs, name), errors="replace").read()[-1500:])
for value in (1.5, 3.0):
    a = np.full(4 << 20, value)  # 32 MiB: into the 128 MiB arena
    s, faults = faults_summing.remote(a).result()
    print("SUM", s == float(a.sum()), "FAULTS", faults)
fabric.shutdown()
"""


def check_arena_mapped_ahead(env=None, workers=2):
    """Run ARENA_SCRIPT (on the embedded cluster, or the one ``env`` names) and check it."""
    from conftest import run_script

    out = run_script(ARENA_SCRIPT, env={**(env or {}), "WORKERS": str(workers)}, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert any(ln.startswith("ARENA 134217728 ") for ln in lines), out.stdout  # made (FABRIC_SHM_ARENA)
    assert f"MAPPED {[True] * workers}" in lines, out.stdout  # every idle worker mapped it, uncalled
    sums = [ln.split() for ln in lines if ln.startswith("SUM")]
    assert len(sums) == 2 and all(s[1] == "True" for s in sums), out.stdout
    assert all(int(s[3]) < 100 for s in sums), out.stdout


def test_idle_workers_map_a_new_drivers_arena_before_its_first_big_argument():
    """ARENA / MAP_ARENA: a fresh driver's first big argument reads through pages its worker
    mapped while idle; read afresh, its 32 MiB would take hundreds of page faults at least
    (thousands with no fault-around). On a `fabric start` cluster: test_cluster.py."""
    check_arena_mapped_ahead()


def test_a_bad_arena_message_is_refused_and_a_bogus_one_mapped_by_no_worker(cluster):
    """ARENA is a driver's hint: one the broker cannot read is refused with the reason; one that
    names a file no worker should map is passed on, ignored, and the cluster keeps serving."""
    import json
    import zmq

    from fabric import api, protocol as P

    @fabric.fn
    def maps():
        with open("/proc/self/maps") as f:
            return f.read()

    ctx = zmq.Context()
    try:
        did = os.urandom(8)
        d, r = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
        for s, ident in ((d, b"d" + did), (r, b"r" + did)):
            s.setsockopt(zmq.ROUTING_ID, ident)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(api._state.client.address)
            s.send_multipart([P.C[P.HELLO], json.dumps({"pid": os.getpid(), "host": os.uname().nodename}).encode()])
            assert s.poll(5000) and P.command_of(s.recv_multipart()[0]) == P.WELCOME
        for body in (b"{", b'{"path": "/dev/shm/fabric-1-ab"}', b'{"path": 5, "bytes": 10}',
                     b'{"path": "/dev/shm/fabric-1-ab", "bytes": -1}', b'{"path": "/dev/shm/x", "bytes": 1.5}'):
            d.send_multipart([P.C[P.ARENA], body])
            assert r.poll(5000), body
            cmd, why = r.recv_multipart()
            assert P.command_of(cmd) == P.ERROR and (b"ARENA" in why or b"json" in why), (body, why)
        d.send_multipart([P.C[P.ARENA], json.dumps({"path": "/etc/passwd",
                                                     "bytes": os.stat("/etc/passwd").st_size}).encode()])
        time.sleep(1.2)  # the broker hands arenas out at once and every 0.5 s to workers that became idle
        assert not any("/etc/passwd" in m for m in fabric.get([maps.remote() for _ in range(4)]))
        assert square.remote(12).result(timeout=30) == 144
        a = np.arange(400_000, dtype=np.float64)  # and the real arena still serves big arguments
        assert total.remote(a).result()[0] == a.sum()
    finally:
        ctx.destroy(linger=0)


def test_lambdas_and_main_classes_travel_by_value(cluster):
    class Point:
        def __init__(self, x):
            self.x = x

    got = echo.remote(Point(3)).result()
    assert got.x == 3
    assert echo.remote(lambda: 5).result()() == 5


def test_a_done_future_holds_its_result_not_its_arguments(cluster):
    """A Future keeps what it sent only until its outcome (for a restarted broker to get
    again): holding many done Futures must not hold their arguments' bytes."""
    import tracemalloc

    @fabric.fn
    def size(b):
        return len(b)

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        futs = [size.remote(os.urandom(1 << 20)) for _ in range(40)]  # 40 MiB of arguments
        assert fabric.get(futs) == [1 << 20] * 40
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 8 << 20, f"40 done Futures hold {held >> 20} MiB"


def test_workers_collect_garbage_as_fabric_tunes_them(cluster):
    """Workers run config.quiet_gc before their first call: the loaded modules frozen out of
    the collector's walks, the youngest generation collected every 20,000 allocations."""
    @fabric.fn
    def gc_state():
        import gc
        return gc.get_threshold()[0], gc.get_freeze_count()

    threshold, frozen = gc_state.remote().result()
    assert threshold == 20_000 and frozen > 1000


def test_nested_calls_from_a_worker(cluster):
    @fabric.fn
    def outer(n):
        return sum(square.map(range(n)))

    assert outer.remote(4).result() == 0 + 1 + 4 + 9


def test_init_twice_and_status(cluster):
    assert fabric.init() == fabric.init()
    assert fabric.is_initialized()
    st = fabric.cluster_status()
    assert len(st["executors"]) == 1 and st["executors"][0]["cpus"] == 2
    with pytest.raises(fabric.FabricError, match="already connected"):
        fabric.init(address="tcp://127.0.0.1:1")


def test_the_shared_memory_arena_is_ready_ahead_and_cleaned_up(tmp_path):
    """The driver's pool starts with one pre-faulted arena (FABRIC_SHM_ARENA), made in the
    background; the first large argument takes it, others get files of their own; close()
    removes them all."""
    import subprocess

    from fabric import serde

    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / f"fabric-{dead.pid}-0123456789ab").write_bytes(b"x" * 4096)  # a SIGKILLed driver's
    (tmp_path / f"fabric-{os.getpid()}-ba9876543210").write_bytes(b"x")     # a live one's (ours)
    pool = serde.ShmPool(str(tmp_path), arena=8 << 20)
    assert not (tmp_path / f"fabric-{dead.pid}-0123456789ab").exists()  # swept on start
    (tmp_path / f"fabric-{os.getpid()}-ba9876543210").unlink()
    pool.arena_thread.join(10)
    assert [(s, p) for s, p, _ in pool.free] == [(8 << 20, pool.arena_path)]
    first = pool.take(5 << 20)
    assert first[1] == pool.arena_path  # a smaller array may use the whole arena
    second = pool.take(5 << 20)          # the arena is busy: a file of its own
    assert second[1] != pool.arena_path and second[0] == 5 << 20
    pool.give_back([first, second], reuse=True)
    assert len(os.listdir(tmp_path)) == 2
    pool.close()
    assert os.listdir(tmp_path) == []
    assert serde.ShmPool(str(tmp_path), arena=0).arena_thread is None
