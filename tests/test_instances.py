"""@fabric.cls: warm stateful containers, @fabric.enter, ordering, concurrency, kill, death."""
import os
import threading
import time

import pytest

import fabric
from conftest import wait_for


@fabric.cls
class Counter:
    def __init__(self, start=0):
        self.n = start
        self.log = []

    @fabric.enter
    def setup(self):
        self.entered = os.getpid()

    def inc(self, k=1):
        self.n += k
        self.log.append(k)
        return self.n

    def history(self):
        return self.log

    def pid(self):
        return os.getpid(), self.entered

    def fail(self):
        raise ValueError("instance method failed")

    def die(self):
        os._exit(3)


@fabric.cls(concurrency=2)
class Pair:
    def span(self, t):
        start = time.time()
        time.sleep(t)
        return start, time.time(), threading.get_ident()


@fabric.cls
class BadInit:
    def __init__(self):
        raise RuntimeError("cannot start")

    def ping(self):
        return 1


def test_counter_contract(cluster):
    c = Counter.remote(5)
    assert c.inc.remote(2).result(timeout=30) == 7
    assert c.inc.remote().result() == 8
    pid, entered = c.pid.remote().result()
    assert pid == entered  # @enter ran in the container that serves the calls
    fabric.kill(c)


def test_calls_run_in_submission_order(cluster):
    c = Counter.remote(0)
    futs = [c.inc.remote(k) for k in range(1, 301)]
    assert [f.result(timeout=60) for f in futs] == [k * (k + 1) // 2 for k in range(1, 301)]
    assert c.history.remote().result() == list(range(1, 301))


def test_instance_is_warm_between_calls(cluster):
    c = Counter.remote(0)
    pids = {c.pid.remote().result()[0] for _ in range(5)}
    assert len(pids) == 1
    fabric.kill(c)


def test_method_exception_keeps_instance_alive(cluster):
    c = Counter.remote(1)
    with pytest.raises(ValueError, match="instance method failed"):
        c.fail.remote().result(timeout=30)
    assert c.inc.remote().result() == 2
    fabric.kill(c)


def test_concurrency_runs_calls_at_once(cluster):
    p = Pair.remote()
    a, b = p.span.remote(1.0), p.span.remote(1.0)
    (s1, e1, t1), (s2, e2, t2) = a.result(timeout=30), b.result(timeout=30)
    assert max(s1, s2) < min(e1, e2)  # their running intervals overlap
    assert t1 != t2
    fabric.kill(p)


@fabric.cls
class BadEnter:
    @fabric.enter
    def load(self):
        raise OSError("model file missing")

    def ping(self):
        return 1


def test_enter_failure_reaches_every_call_and_the_cluster_goes_on(cluster):
    b = BadEnter.remote()
    with pytest.raises(OSError, match="model file missing") as ei:
        b.ping.remote().result(timeout=30)
    assert "in load" in str(ei.value.__cause__)  # the remote traceback names the enter method
    with pytest.raises(OSError, match="model file missing"):
        b.ping.remote().result(timeout=30)
    c = Counter.remote()
    assert c.inc.remote().result(timeout=30) == 1


class _Gate:
    def __init__(self):
        self.touched = []

    def hold(self, block):
        open(block, "w").close()
        while not os.path.exists(block + ".go"):
            time.sleep(0.01)
        return "finished"

    def touch(self, path):
        """A side effect a test can look for, and its record in the instance's state."""
        open(path, "w").close()
        self.touched.append(os.path.basename(path))
        return "touched"

    def history(self):
        return self.touched

    def ping(self):
        return "pong"


@fabric.cls
class Gate(_Gate):
    pass


@fabric.cls(concurrency=2)
class Gate2(_Gate):
    pass


def test_cancelling_a_running_instance_call_lets_it_finish(cluster, tmp_path):
    """Documented (Future.cancel): a running instance call is not interrupted (that would kill
    the instance's state); cancel() returns True, and the call's result arrives. (A call
    behind it is already pipelined to the instance's worker, so the broker treats it as
    running too: not asserted here.)"""
    g = Gate.remote()
    block = str(tmp_path / "block")
    running = g.hold.remote(block)
    assert wait_for(lambda: os.path.exists(block), timeout=60)  # it runs now
    assert running.cancel()
    open(block + ".go", "w").close()
    assert running.result(timeout=30) == "finished"
    assert g.ping.remote().result(timeout=30) == "pong"  # the instance is alive


def _dropped():
    return fabric.cluster_status()["stats"]["dropped"]


def test_a_cancelled_instance_call_queued_behind_a_running_one_never_runs(cluster, tmp_path):
    """An instance's calls are pipelined to its worker: one queued there behind a running call
    is dropped by the worker when cancelled (Cancelled, before it ran), and never runs: not
    when the running call ends, nor before the calls after it."""
    g = Gate.remote()
    block = str(tmp_path / "block")
    running = g.hold.remote(block)
    assert wait_for(lambda: os.path.exists(block), timeout=60)  # it runs now: the rest queue on its worker
    dropped = _dropped()
    queued = g.touch.remote(str(tmp_path / "cancelled"))
    after = g.touch.remote(str(tmp_path / "after"))
    assert queued.cancel()
    with pytest.raises(fabric.Cancelled, match="before it ran"):
        queued.result(timeout=30)
    assert _dropped() == dropped + 1  # the worker held it and dropped it (not the broker's queue)
    assert not after.done()  # still behind the running call
    open(block + ".go", "w").close()
    assert running.result(timeout=30) == "finished"
    assert after.result(timeout=30) == "touched"
    assert g.history.remote().result(timeout=30) == ["after"]
    assert not os.path.exists(tmp_path / "cancelled")
    fabric.kill(g)  # (pytest.raises keeps this frame, and so the handle, alive until a gc)


def test_cancel_in_a_concurrent_instance_drops_a_waiting_call_and_lets_a_running_one_finish(cluster, tmp_path):
    """concurrency=2: two calls run, a third waits in the instance's worker for a thread.
    Cancelled, the waiting one is dropped (Cancelled, never runs); the second running one (the
    worker answers that it runs it) finishes and its result arrives."""
    g = Gate2.remote()
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    first, second = g.hold.remote(a), g.hold.remote(b)
    assert wait_for(lambda: os.path.exists(a) and os.path.exists(b), timeout=60)  # both threads busy
    dropped = _dropped()
    waiting = g.touch.remote(str(tmp_path / "cancelled"))
    assert waiting.cancel() and second.cancel()
    with pytest.raises(fabric.Cancelled, match="before it ran"):
        waiting.result(timeout=30)
    assert _dropped() == dropped + 1
    open(a + ".go", "w").close()
    open(b + ".go", "w").close()
    assert first.result(timeout=30) == "finished" and second.result(timeout=30) == "finished"
    assert g.touch.remote(str(tmp_path / "later")).result(timeout=30) == "touched"
    assert g.history.remote().result(timeout=30) == ["later"]
    assert not os.path.exists(tmp_path / "cancelled")
    fabric.kill(g)


def test_cancelling_a_generator_method_running_beside_another_call_stops_it(cluster, tmp_path):
    """concurrency=2: a generator method runs beside a call that started before it, so it is not
    the first call its worker holds: the broker asks (DROP), the worker answers that it runs it,
    and, as for a generator method alone, it is stopped before its next item."""

    @fabric.cls(concurrency=2)
    class Both:
        def hold(self, block):
            open(block, "w").close()
            while not os.path.exists(block + ".go"):
                time.sleep(0.01)
            return "finished"

        def endless(self, folder):
            i = 0
            try:
                while True:
                    yield i
                    i += 1
            finally:
                open(os.path.join(folder, "stopped"), "w").close()

    b = Both.remote()
    block = str(tmp_path / "block")
    first = b.hold.remote(block)
    assert wait_for(lambda: os.path.exists(block), timeout=60)
    s = b.endless.remote(str(tmp_path))
    assert s.next(timeout=60).result() == 0  # it runs, second in its worker
    late = _late()
    assert fabric.cancel(s) is True
    assert wait_for(lambda: (tmp_path / "stopped").exists(), timeout=30)
    assert _late() == late + 1  # the worker answered "running" (the path this test is for)
    with pytest.raises(fabric.Cancelled):
        s.future.result(timeout=30)
    open(block + ".go", "w").close()
    assert first.result(timeout=30) == "finished"  # the instance lives on
    fabric.kill(b)


def _late():
    return fabric.cluster_status()["stats"]["drop_too_late"]


def test_init_failure_reaches_every_call(cluster):
    b = BadInit.remote()
    with pytest.raises(RuntimeError, match="cannot start"):
        b.ready().result(timeout=30)
    with pytest.raises(RuntimeError, match="cannot start"):
        b.ping.remote().result(timeout=30)


def test_instance_calls_time_out_in_turn(cluster):
    @fabric.cls(timeout=1)
    class Slow:
        def nap(self, t):
            time.sleep(t)
            return t

    s = Slow.remote()
    a, b, c = s.nap.remote(1.5), s.nap.remote(1.5), s.nap.remote(0.1)
    for f in (a, b):  # the second is timed from when it starts, behind the first
        with pytest.raises(fabric.TaskTimeout, match="instance keeps running"):
            f.result(timeout=30)
    assert c.result(timeout=30) == 0.1  # the instance and its state survive
    fabric.kill(s)


def test_instance_with_a_failed_argument_never_starts(cluster):
    @fabric.fn
    def bad():
        raise KeyError("no config")

    before = fabric.cluster_status()["instances"]  # (earlier tests' instances may still be ending)
    c = Counter.remote(bad.remote())
    with pytest.raises(KeyError, match="no config"):
        c.ready().result(timeout=30)
    with pytest.raises(KeyError, match="no config"):
        c.inc.remote().result(timeout=30)
    # it never started: no instance more than before (a count local to this test, not "0",
    # which held only when run alone or last; the bound is generous, only a leak reaches it)
    assert fabric.cluster_status()["instances"] <= before
    assert wait_for(lambda: fabric.cluster_status()["instances"] <= before, timeout=60)


def test_kill_fails_pending_calls_and_frees_resources(cluster):
    c = Counter.remote(0)
    assert c.inc.remote().result(timeout=30) == 1
    fabric.kill(c)
    with pytest.raises(fabric.ActorDied):
        c.inc.remote().result(timeout=30)
    # its CPU came back: two more instances fit on the 2-CPU cluster
    a, b = Counter.remote(1), Counter.remote(2)
    assert a.inc.remote().result(timeout=30) == 2 and b.inc.remote().result(timeout=30) == 3
    fabric.kill(a)
    fabric.kill(b)


def test_instance_process_death_is_actor_died(cluster):
    c = Counter.remote(0)
    c.inc.remote().result(timeout=30)
    with pytest.raises(fabric.ActorDied, match="died"):
        c.die.remote().result(timeout=30)
    with pytest.raises(fabric.ActorDied):
        c.inc.remote().result(timeout=30)
    assert fabric.cluster_status()["instances"] == 0


def test_dropping_the_handle_stops_the_instance(cluster):
    def instances():
        return fabric.cluster_status()["instances"]

    assert wait_for(lambda: instances() == 0, timeout=15)
    c = Counter.remote(0)
    last = c.inc.remote(5)
    del c
    assert last.result(timeout=30) == 5  # calls already made still run
    assert wait_for(lambda: instances() == 0, timeout=15)


def test_bad_instance_use(cluster):
    c = Counter.remote(0)
    with pytest.raises(AttributeError, match="no method 'nope'"):
        c.nope
    with pytest.raises(TypeError, match=r"Counter.inc.remote"):
        c.inc(1)
    with pytest.raises(TypeError, match="too many"):
        c.inc.remote(1, 2, 3)
    with pytest.raises(TypeError, match=r"Counter.remote\(...\)"):
        Counter(1)
    assert c.inc.remote(4).result(timeout=30) == 4
    fabric.kill(c)


def test_instance_handle_passed_to_a_function(cluster):
    c = Counter.remote(10)

    @fabric.fn
    def bump(h):
        return h.inc.remote(5).result()

    assert bump.remote(c).result(timeout=30) == 15
    assert c.inc.remote().result() == 16
    fabric.kill(c)
