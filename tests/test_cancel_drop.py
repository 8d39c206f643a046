"""The broker's side of cancelling a call its worker holds but may not have started (DROP and
its DROPPED answer, docs/protocol.md §5.1 CANCEL). A real broker and a real driver; the test
plays the executor and its worker on their real sockets, because the orders that matter (the
worker's answer before or after the DONE of the call ahead) cannot be forced with a real
worker. A real worker's side (it drops the call and never runs it) is proved end to end by
test_errors.py::test_a_cancelled_prefetched_call_gives_cancelled_and_never_runs and the
instance tests in test_instances.py."""
import json
import os

import pytest
import zmq

import fabric
from fabric import protocol as P
from fabric import serde
from fabric.client import request
from conftest import broker_alone, wait_for


@fabric.fn(retries=0)
def job(x):
    return x  # never run: the test's worker answers for it


@pytest.fixture
def played():
    """A broker with no executor of its own, a driver connected to it, and the test's executor
    and pool worker (credit 4) registered on it."""
    fabric.shutdown()
    with broker_alone(cpus=1) as c:
        ctx = zmq.Context()
        try:
            p = Played(ctx, c.address, os.urandom(8))
            fabric.init(address=c.address)
            p.warm()
            yield p
        finally:
            fabric.shutdown()
            ctx.destroy(linger=0)


class Played:
    def __init__(self, ctx, address, x):
        self.address = address

        def dealer(ident):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.ROUTING_ID, ident)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(address)
            return s

        self.dealer, self.x, self.n = dealer, x, 0
        self.ex = dealer(b"e" + x)
        self.ex.send_multipart([P.C[P.EXEC_HELLO], json.dumps({"cpus": 1, "memory": 1 << 30}).encode()])
        assert self.ex.poll(10000) and self.ex.recv_multipart()[0] == P.C[P.WELCOME]
        self.replace_worker()

    def replace_worker(self):
        """The executor's next pool worker (credit 4) says READY: its call and output sockets."""
        self.n += 1
        self.wid = b"w" + self.x + self.n.to_bytes(4, "big")
        self.w = self.dealer(self.wid)
        self.log = self.dealer(b"l" + self.x + self.n.to_bytes(4, "big"))
        self.w.send_multipart([P.C[P.READY], json.dumps({"kind": "pool", "pid": os.getpid(), "credit": 4}).encode()])

    def calls(self, n):
        """The ids of the next ``n`` CALLs sent to the worker (one by one or in BATCHes)."""
        ids = []
        while len(ids) < n:
            assert self.w.poll(20000), f"the worker got {len(ids)} of {n} calls"
            frames = self.w.recv_multipart()
            if frames[0][:4] == P.C[P.CALL]:
                ids.append(frames[0][4:4 + P.ID_LEN])
            elif frames[0] == P.C[P.BATCH]:
                ids += [bytes(head[:P.ID_LEN]) for _, head, _, _ in P.unbatch([zmq.Frame(f) for f in frames])]
        return ids

    def done(self, cid, value):
        # the run time it reports, 90 ms, makes ``job`` "medium" for the broker (under
        # FABRIC_PREFETCH_ONE_BELOW): it prefetches one call behind a job for up to 4 x 90 ms
        # after that job started, wide enough for two calls submitted back to back on a loaded host
        payload, bufs = serde.dumps_value(value)
        self.w.send_multipart([P.C[P.DONE] + P.pack_result(cid, P.OK, len(bufs), 0.09), payload, *bufs])

    def drop_asked(self, stop=False):
        """The id of the next DROP the worker's output socket gets; ``stop``: a DROP "k" (end
        yourself if you run it), else a plain one."""
        assert self.log.poll(20000), "no DROP reached the worker's output socket"
        frames = self.log.recv_multipart()
        assert frames[0] == P.C[P.DROP] and frames[2:] == ([b"k"] if stop else []), frames
        return frames[1]

    def answer(self, cid, what):
        self.log.send_multipart([P.C[P.DROPPED], cid, what])

    def warm(self):
        """Three runs of ``job``: its run time is known, so the broker prefetches it."""
        for k in range(3):
            f = job.remote(k)
            (cid,) = self.calls(1)
            assert cid == f.id
            self.done(cid, k)
            assert f.result(timeout=30) == k

    def head_and_prefetched(self):
        """Two calls in one burst: the first runs on the worker, the second is prefetched behind it."""
        head, behind = job.remote("head"), job.remote("behind")
        assert self.calls(2) == [head.id, behind.id]
        return head, behind

    def killed(self):
        while self.ex.poll(10000):
            m = self.ex.recv_multipart()
            if m[0] == P.C[P.KILL_WORKER]:
                return m[1]
        return None

    def died(self, running):
        """The executor says the worker ended (as after a DROP "k"), naming the call it ran."""
        self.ex.send_multipart([P.C[P.WORKER_DIED], self.wid,
                                json.dumps({"exitcode": P.EXIT_STOPPED, "running": running.hex()}).encode()])

    def pending(self):
        return request(self.address, P.STATUS, timeout=5.0)["calls_pending"]

    def stat(self, name):
        return request(self.address, P.STATUS, timeout=5.0)["stats"][name]

    def answer_read(self, cid, what):
        """Answer DROP, and wait until the broker has read the answer (its counters say so)."""
        before = self.stat("drop_too_late")
        self.answer(cid, what)
        assert wait_for(lambda: self.stat("drop_too_late") == before + 1, timeout=30)


def test_dropped_gives_cancelled_and_frees_the_worker(played):
    head, behind = played.head_and_prefetched()
    assert behind.cancel()
    assert played.drop_asked() == behind.id
    dropped = played.stat("dropped")
    played.answer(behind.id, b"d")
    with pytest.raises(fabric.Cancelled, match="before it ran"):
        behind.result(timeout=30)
    assert played.stat("dropped") == dropped + 1
    played.done(head.id, "head")
    assert head.result(timeout=30) == "head"
    nxt = job.remote("next")  # the worker is free again: the next call is sent to it
    assert played.calls(1) == [nxt.id]
    played.done(nxt.id, "next")
    assert nxt.result(timeout=30) == "next" and played.pending() == 0


def test_finished_means_its_done_is_its_outcome(played):
    head, behind = played.head_and_prefetched()
    assert behind.cancel()
    assert played.drop_asked() == behind.id
    played.answer_read(behind.id, b"f")  # it ran already: its DONE (sent after the head's) is on its way
    played.done(head.id, "head")
    played.done(behind.id, "it ran")
    assert head.result(timeout=30) == "head"
    assert behind.result(timeout=30) == "it ran"
    assert played.pending() == 0


def test_running_before_the_head_is_done_is_cancelled_once_it_is_first(played):
    """The worker says it runs the call while the DONE of the call ahead has not reached the
    broker yet: the broker must not kill the worker then (the head's result would be lost
    and the head rerun): it waits for that DONE, then cancels the call as a running one."""
    head, behind = played.head_and_prefetched()
    assert behind.cancel()
    assert played.drop_asked() == behind.id
    played.answer_read(behind.id, b"r")  # read before the head's DONE: the order this test is for
    assert played.pending() == 2
    assert not played.ex.poll(200)  # no KILL_WORKER: the head's DONE has not come yet
    played.done(head.id, "head")
    assert head.result(timeout=30) == "head"
    with pytest.raises(fabric.Cancelled, match="cancelled while running; its worker was replaced"):
        behind.result(timeout=30)
    assert played.drop_asked(stop=True) == behind.id  # it is first now: end yourself if you run it
    played.died(running=behind.id)
    assert played.pending() == 0


def test_a_worker_lost_before_answering_gives_cancelled_not_a_rerun(played):
    head, behind = played.head_and_prefetched()
    assert behind.cancel()
    assert played.drop_asked() == behind.id
    played.ex.send_multipart([P.C[P.WORKER_DIED], played.wid,
                              json.dumps({"exitcode": -9, "running": head.id.hex()}).encode()])
    with pytest.raises(fabric.WorkerCrashed):
        head.result(timeout=30)  # retries=0: the call it was running is not retried
    with pytest.raises(fabric.Cancelled, match="its worker ended before it said whether the call had started"):
        behind.result(timeout=30)
    assert played.pending() == 0


# A force cancel (or a timeout, or its driver leaving) of the call a worker is running ends that
# worker, but the broker's view lags the worker's: the call may have finished there and the one
# prefetched behind it started. So the worker is asked to end itself only if it still runs the
# call (DROP "k"); a real worker's side is proved in test_errors.py and test_fuzz.py.

def test_force_cancel_of_the_running_call_asks_its_worker_to_end_itself(played):
    head, behind = played.head_and_prefetched()
    assert head.cancel()
    with pytest.raises(fabric.Cancelled, match="cancelled while running; its worker was replaced"):
        head.result(timeout=30)
    assert played.drop_asked(stop=True) == head.id
    played.died(running=head.id)  # it ran it, so it ended itself: what it prefetched never started
    assert not any(m[0] == P.C[P.KILL_WORKER] for m in _drain(played.ex))  # no kill: it ended itself
    assert played.pending() == 1
    played.replace_worker()
    (again,) = played.calls(1)  # the prefetched call is requeued, uncharged, onto the new worker
    assert again == behind.id
    played.done(behind.id, "behind")
    assert behind.result(timeout=30) == "behind" and played.pending() == 0


def test_a_call_that_finished_before_its_stop_keeps_its_worker(played):
    head, behind = played.head_and_prefetched()
    assert head.cancel()
    assert played.drop_asked(stop=True) == head.id
    played.answer(head.id, b"f")  # it had finished: its DONE is on its way, and the next call began
    played.done(head.id, "head")
    played.done(behind.id, "behind")
    assert behind.result(timeout=30) == "behind"  # ran once, on the same worker
    with pytest.raises(fabric.Cancelled):
        head.result(timeout=30)
    nxt = job.remote("next")  # the worker is free: it gets the next call
    assert played.calls(1) == [nxt.id]
    played.done(nxt.id, "next")
    assert nxt.result(timeout=30) == "next"
    assert played.killed() is None  # past STOP_GRACE: nobody killed it


def test_a_call_not_begun_when_stopped_frees_its_slot(played):
    head = job.remote("head")
    assert played.calls(1) == [head.id]
    assert head.cancel()
    assert played.drop_asked(stop=True) == head.id
    played.answer(head.id, b"d")  # its CALL had not reached the worker: it is skipped, no DONE
    nxt = job.remote("next")
    assert played.calls(1) == [nxt.id]
    played.done(nxt.id, "next")
    assert nxt.result(timeout=30) == "next" and played.pending() == 0


def test_a_worker_that_does_not_end_itself_is_killed(played):
    head = job.remote("head")
    assert played.calls(1) == [head.id]
    assert head.cancel()
    assert played.drop_asked(stop=True) == head.id  # no answer: its output thread is starved
    assert played.killed() == played.wid


def _drain(sock):
    out = []
    while sock.poll(300):
        out.append(sock.recv_multipart())
    return out
