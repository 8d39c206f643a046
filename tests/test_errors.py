"""Errors as the contract states them, and the cluster keeps serving after each."""
import glob
import os
import signal
import threading
import time

import pytest

import fabric
from conftest import wait_for


@fabric.fn
def ok(x=1):
    return x


class Custom(Exception):
    pass


@fabric.fn
def boom(msg):
    raise Custom(msg)


@fabric.fn
def exit_hard(code):
    os._exit(code)


@fabric.fn(retries=0)
def kill_self():
    os.kill(os.getpid(), signal.SIGKILL)


@fabric.fn(retries=2)
def crash_until(path, crashes):
    """Crash the worker the first ``crashes`` times, then succeed: retries at work."""
    n = int(open(path).read()) if os.path.exists(path) else 0
    with open(path, "w") as f:
        f.write(str(n + 1))
    if n < crashes:
        os._exit(1)
    return n


@fabric.fn(timeout=0.5, retries=0)
def sleepy(t, mark=None):
    if mark:
        with open(mark, "w") as f:
            f.write(str(os.getpid()))
    time.sleep(t)
    return os.getpid()


@fabric.fn
def nap(t, mark=None):
    if mark:  # says it runs, and where
        with open(mark + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.rename(mark + ".tmp", mark)
    time.sleep(t)
    return t


def _pid_in(mark):
    assert wait_for(lambda: os.path.exists(mark), timeout=60), "the call never started"
    return int(open(mark).read())


def _gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as f:  # a zombie not reaped yet is gone too
        return f.read().rsplit(")", 1)[1].split()[0] == "Z"


def test_user_exception_keeps_its_type_and_remote_traceback(cluster):
    with pytest.raises(Custom, match="bad input") as ei:
        boom.remote("bad input").result()
    cause = ei.value.__cause__
    assert isinstance(cause, fabric.RemoteTraceback)
    assert "boom" in str(cause) and "raise Custom(msg)" in str(cause)
    assert ok.remote(2).result() == 2


def test_exception_that_cannot_be_rebuilt_becomes_remote_error(cluster):
    @fabric.fn
    def weird():
        class Odd(Exception):
            def __init__(self, a, b):
                super().__init__(a)

        raise Odd(1, 2)

    with pytest.raises(fabric.RemoteError) as ei:  # Odd(1) cannot be rebuilt: its __init__ needs b
        weird.remote().result(timeout=30)
    e = ei.value
    assert e.type_name.endswith("weird.<locals>.Odd"), e.type_name
    assert str(e) == f"{e.type_name}: 1"
    assert "raise Odd(1, 2)" in e.remote_traceback and "in weird" in e.remote_traceback
    assert isinstance(e.__cause__, fabric.RemoteTraceback) and e.__cause__.tb == e.remote_traceback
    assert ok.remote(3).result(timeout=30) == 3


def test_worker_crash_is_retried_then_succeeds(cluster, tmp_path):
    path = str(tmp_path / "count")
    assert crash_until.remote(path, 2).result(timeout=60) == 2
    assert open(path).read() == "3"


def test_worker_crash_after_retries_raises_worker_crashed(cluster, tmp_path):
    path = str(tmp_path / "count")
    with pytest.raises(fabric.WorkerCrashed, match="retries are spent"):
        crash_until.remote(path, 10).result(timeout=60)
    assert open(path).read() == "3"  # 1 try + 2 retries
    with pytest.raises(fabric.WorkerCrashed):
        kill_self.remote().result(timeout=60)
    with pytest.raises(fabric.WorkerCrashed):
        exit_hard.options(retries=1).remote(3).result(timeout=60)
    assert ok.remote(5).result(timeout=30) == 5  # workers were replaced


@fabric.fn(retries=0)
def step(i, crash, marks):
    if i in crash:
        open(os.path.join(marks, f"{i}-{time.time_ns()}"), "w").close()
        os._exit(1)
    return i


def test_a_crash_in_a_burst_is_blamed_on_the_call_that_crashed(cluster, tmp_path):
    """Short calls travel to a worker in BATCHes, several in flight at once. When one call kills
    its worker, that call is charged (no retries: it fails, having run once: its executor says
    which call the worker was running), and none of the others fails."""
    marks = str(tmp_path)
    fabric.get([step.remote(i, (), marks) for i in range(300)])  # known short: batched from now on
    crash = (150, 231, 317, 390)  # each where it falls in its BATCH: after some held DONEs, or not
    futs = [step.remote(i, crash, marks) for i in range(400)]
    failed = []
    for i, f in enumerate(futs):
        try:
            assert f.result(timeout=60) == i
        except fabric.WorkerCrashed:
            failed.append(i)
    assert failed == list(crash)
    assert len(os.listdir(marks)) == len(crash)  # each ran once: charged, not re-queued as innocent
    assert ok.remote(5).result(timeout=30) == 5


@fabric.fn
def own_run_file():
    path = os.environ["FABRIC_RUN_FILE"]
    with open(path, "rb") as f:
        return path, f.read()


def test_a_worker_names_the_call_it_runs_for_its_executor(cluster):
    """What the executor reads when a worker dies (WORKER_DIED "running"): the id of the call the
    worker was running, written before the call starts; the file goes with the worker."""
    fut = own_run_file.remote()
    path, running = fut.result(timeout=30)
    assert running == fut.id
    pattern = os.path.join(os.path.dirname(path), f"fabric-{path.split('-')[-2]}-run*")  # this executor's
    before = set(glob.glob(pattern))
    assert len(before) == 2  # one per pool worker
    with pytest.raises(fabric.WorkerCrashed):
        kill_self.remote().result(timeout=60)
    assert wait_for(lambda: len(set(glob.glob(pattern)) - before) == 1, timeout=20)  # its replacement's
    assert len(before - set(glob.glob(pattern))) == 1 and len(glob.glob(pattern)) == 2  # the dead one's is gone


def test_timeout_kills_and_replaces_the_worker(cluster, tmp_path):
    mark = str(tmp_path / "pid")
    f = sleepy.remote(60, mark)
    with pytest.raises(fabric.TaskTimeout, match="timeout of 0.5s"):
        f.result(timeout=50)  # (a GetTimeout, not TaskTimeout, if the timeout were not enforced)
    pid = _pid_in(mark)
    assert wait_for(lambda: _gone(pid), timeout=30)  # its worker was killed
    assert sleepy.remote(0).result(timeout=30) not in (pid, None)  # and replaced
    assert ok.remote(6).result() == 6


def test_cancel_queued_and_running(cluster, tmp_path):
    marks = [str(tmp_path / f"b{i}") for i in range(2)]
    blockers = [nap.remote(60, m) for m in marks]  # occupy both CPUs
    for m in marks:
        _pid_in(m)
    queued = nap.remote(0.1, str(tmp_path / "queued"))
    assert queued.cancel()
    with pytest.raises(fabric.Cancelled, match="before it ran"):
        queued.result(timeout=30)
    assert not os.path.exists(tmp_path / "queued")
    pids = [_pid_in(m) for m in marks]
    assert blockers[0].cancel()  # running (its mark says so, with its worker's pid)
    with pytest.raises(fabric.Cancelled, match="while running; its worker was replaced"):
        blockers[0].result(timeout=30)
    assert wait_for(lambda: _gone(pids[0]), timeout=30)  # that worker was killed
    assert blockers[1].cancel()
    with pytest.raises(fabric.Cancelled):
        blockers[1].result(timeout=30)
    assert wait_for(lambda: _gone(pids[1]), timeout=30)
    done = ok.remote(7)
    assert done.result() == 7 and done.cancel() is False


@fabric.fn(retries=0)
def hog(mark):
    import re

    with open(mark, "w") as f:
        f.write(str(os.getpid()))
    re.match(r"(a+)+$", "a" * 64 + "b")  # backtracks for ages in C without letting go of the GIL


def test_force_cancel_ends_a_worker_whose_call_holds_the_gil(cluster, tmp_path):
    """The worker's output thread ends its process when asked to stop the call it runs (DROP
    k); one starved of the GIL cannot, and the broker has its executor kill it instead."""
    fut = hog.remote(str(tmp_path / "hog"))
    pid = _pid_in(str(tmp_path / "hog"))
    assert fut.cancel()
    with pytest.raises(fabric.Cancelled, match="while running; its worker was replaced"):
        fut.result(timeout=30)
    assert wait_for(lambda: _gone(pid), timeout=30)
    assert ok.remote(8).result(timeout=30) == 8


def test_unpicklable_argument_is_refused_at_remote(cluster):
    with pytest.raises(fabric.SerializationError, match=r"argument 1 of type _thread.lock"):
        ok.remote.__func__  # noqa: B018 - the attribute exists
        fabric.fn(lambda a, b: a).remote(1, threading.Lock())
    with pytest.raises(fabric.SerializationError, match=r"argument 'x'.*lock"):
        ok.remote(x=threading.Lock())
    assert ok.remote(8).result() == 8


def test_unpicklable_result_raises_at_result(cluster):
    @fabric.fn
    def give_lock():
        return threading.Lock()

    with pytest.raises(fabric.SerializationError, match="cannot be pickled"):
        give_lock.remote().result(timeout=30)
    assert ok.remote(9).result() == 9


def test_unsatisfiable_resources_fail_fast(cluster):
    # "fast": each raises Unschedulable well before its result(timeout=30) would give up with a
    # GetTimeout; no wall-clock bound (a loaded machine is slow, not wrong)
    with pytest.raises(fabric.Unschedulable, match="cpus=64"):
        ok.options(cpus=64).remote().result(timeout=30)
    with pytest.raises(fabric.Unschedulable, match="gpus=1"):
        ok.options(gpus=1).remote().result(timeout=30)
    with pytest.raises(fabric.Unschedulable, match="memory"):
        ok.options(memory="100TiB").remote().result(timeout=30)
    assert ok.remote(10).result() == 10


def test_failed_dependency_fails_the_dependent(cluster):
    bad = boom.remote("upstream")
    with pytest.raises(Custom, match="upstream"):
        ok.remote(bad).result(timeout=30)
    with pytest.raises(Custom, match="upstream"):  # already failed here: .remote() raises it
        ok.remote(bad)


@pytest.mark.parametrize("make, exc, pattern", [
    (lambda: fabric.fn(cpus="two"), TypeError, "cpus must be a number"),
    (lambda: fabric.fn(cpus=-1), ValueError, "cpus must be >= 0"),
    (lambda: fabric.fn(gpus=1.5), ValueError, "whole number"),
    (lambda: fabric.fn(memory="lots"), ValueError, "memory must be a size"),
    (lambda: fabric.fn(retries=-1), ValueError, "retries"),
    (lambda: fabric.fn(timeout=0), ValueError, "timeout"),
    (lambda: fabric.fn(timeout=float("inf")), ValueError, "timeout"),
    (lambda: ok.options(cpus=2e6), ValueError, "cpus must be >= 0 and below"),
    (lambda: fabric.fn(max_containers=0), ValueError, "max_containers"),
    (lambda: fabric.fn(colour="red"), TypeError, "unknown option"),
    (lambda: fabric.cls(concurrency=0), ValueError, "concurrency"),
    (lambda: fabric.fn(int.__add__ if False else 3), TypeError, "decorates functions"),
    (lambda: fabric.fn(Custom), TypeError, "use @fabric.cls"),
    (lambda: fabric.cls(ok), TypeError, "decorates classes"),
    (lambda: ok.remote(1, 2, 3), TypeError, "ok\\(\\).*too many"),
    (lambda: ok.remote(y=1), TypeError, "unexpected keyword"),
    (lambda: ok.map(5), TypeError, "iterables"),
    (lambda: fabric.get(5), TypeError, "list of Futures"),
    (lambda: fabric.get([1]), TypeError, "expects Futures"),
    (lambda: fabric.wait(ok.remote()), TypeError, "list of Futures"),
    (lambda: fabric.wait([ok.remote()], num_returns=2), ValueError, "num_returns"),
    (lambda: fabric.get([ok.remote()], timeout=-1), ValueError, "timeout"),
    (lambda: fabric.kill("c"), TypeError, "instance handle"),
    (lambda: fabric.put(ok.remote()), TypeError, "pass the Future itself"),
    (lambda: fabric.init(address="http://x"), ValueError, "tcp://host:port"),
])
def test_bad_api_input_is_refused_clearly(cluster, make, exc, pattern):
    with pytest.raises(exc, match=pattern):
        make()
    assert ok.remote(11).result() == 11


def test_connecting_to_nothing_fails_clearly():
    from conftest import run_script, free_port

    r = run_script(f"import fabric; fabric.init(address='tcp://127.0.0.1:{free_port()}', connect_timeout=1)")
    assert r.returncode != 0
    assert "ConnectionFailed" in r.stderr and "no fabric broker answered" in r.stderr


@fabric.fn
def gate(block=None, mark=None, t=0.0):
    """``t`` seconds, unless ``block`` names a file: then it says it runs and waits for ``block`` + ".go"."""
    if mark:
        open(mark, "w").close()
    time.sleep(t)
    if block:
        open(block, "w").close()
        while not os.path.exists(block + ".go"):
            time.sleep(0.01)
    return 1


def _cancel_prefetched(tmp_path):
    """A call prefetched by a busy worker (behind a known-short call), cancelled: its outcome is
    Cancelled; the call ahead of it on that worker is not disturbed. Returns the file the
    cancelled call would have made had it run."""
    # known to take ~80 ms (under FABRIC_PREFETCH_ONE_BELOW): the broker prefetches one call
    # behind a gate for up to 4 x 80 ms after it started, wide enough for two calls submitted
    # back to back on a loaded host (a ~1 ms call leaves a 20 ms window, which load can miss)
    fabric.get([gate.remote(t=0.08) for _ in range(8)])
    other = str(tmp_path / "other")
    busy = nap.remote(60, other)  # the second worker: busy with an unknown-length call
    _pid_in(other)
    block, mark = str(tmp_path / "block"), str(tmp_path / "prefetched-ran")
    head = gate.remote(block)
    behind = gate.remote(None, mark)  # one burst: it reaches the worker behind `head`
    assert wait_for(lambda: os.path.exists(block), timeout=60)
    st = fabric.api._client().status()
    # the racy path: `behind` is on the worker (prefetched), not in the broker's queue
    assert sum(q["depth"] for q in st["queues"]) == 0 and st["calls_pending"] == 3, st
    assert behind.cancel()
    with pytest.raises(fabric.Cancelled, match="before it ran"):
        behind.result(timeout=30)
    open(block + ".go", "w").close()
    assert head.result(timeout=30) == 1
    assert busy.cancel()
    assert gate.remote().result(timeout=30) == 1  # (the same worker, after the cancelled call)
    return mark


def test_a_cancelled_prefetched_call_gives_cancelled_and_never_runs(cluster, tmp_path):
    """The worker is told to drop it (DROP) and says it had not started it: it never runs,
    even after the call ahead of it ends and the worker runs later calls."""
    assert not os.path.exists(_cancel_prefetched(tmp_path))


def test_a_result_that_cannot_be_unpickled_on_the_driver(cluster, tmp_path):
    """The worker pickles a value of a module only it can import: the driver gets a clear
    SerializationError at result(), not a crash of its IO thread; the cluster goes on."""
    mod = tmp_path / "only_on_worker"
    mod.mkdir()
    (mod / "workeronly_mod.py").write_text("class Thing:\n    pass\n")

    @fabric.fn
    def make(path):
        import sys

        sys.path.insert(0, path)
        import workeronly_mod

        return workeronly_mod.Thing()

    with pytest.raises(fabric.SerializationError, match=r"result of make cannot be unpickled here: "
                                                         r"ModuleNotFoundError.*workeronly_mod"):
        make.remote(str(mod)).result(timeout=30)
    assert ok.remote(12).result(timeout=30) == 12


def test_a_future_inside_pickled_data_or_from_another_connection_is_refused(cluster):
    from fabric import api
    from fabric import protocol as P
    from fabric.client import Client

    quick = nap.remote(0.2)
    # inside an argument's value, a Future arrives as a Future (test_nested_values.py)
    assert ok.remote({"nested": [quick]}).result(timeout=30)["nested"][0].result() == 0.2
    f = nap.remote(30)
    with pytest.raises(fabric.SerializationError, match="not stored inside other pickled data"):
        fabric.put([f])  # stored data is not a call: a Future cannot live inside it
    other = Client(api._state.client.address)  # a second, real connection of this process
    try:
        assert ok.remote(1).result(timeout=30) == 1  # ok's code is made now
        blob, h = ok._code
        with pytest.raises(fabric.SerializationError, match="from another fabric connection"):
            other.submit(P.TASK, blob, h, (f,), {})  # f is pending: the other broker link cannot resolve it
        done = ok.remote(4)
        assert done.result(timeout=30) == 4  # a done Future travels by value, whichever connection
        assert other.submit(P.TASK, blob, h, (done,), {}).result(timeout=30) == 4
    finally:
        other.close()
    assert f.cancel()
    assert ok.remote(13).result(timeout=30) == 13
