"""Workers: what they say (READY, DONE, ITEM, BLOCKED, ...) and what happens when they go.

A worker that ends its last call gives its resources back (``release_worker``); one that
dies is charged: the call it was running retries while it has retries, the calls it had only
prefetched go back to the front of their queue uncharged (``lose_worker``, ``requeue``). A
worker the broker cannot reach gets nothing more and ends with what it holds (``unreachable``).
"""
from __future__ import annotations

import heapq
import logging
import time
from collections import deque

from .. import protocol as P
from .. import settings
from ..errors import ProtocolError
from .state import DONE, QUEUED, RUNNING, SPAWNING, TAKE_BACK, Actor, Worker

log = logging.getLogger("fabric.broker")
_S = settings.get()
ACTOR_PIPELINE = _S.actor_pipeline  # calls sent ahead to an instance's worker
STOP_GRACE = 2.0  # s a worker asked to end itself (DROP "k") has before its executor kills it


class Workers:
    """Shares the broker's tables (``st``, state.Tables) and its outbox (``out``); calls
    admission, outcomes, sched, instances, gangs (admission.py, outcomes.py, scheduler.py, instances.py, gangs.py)."""

    def __init__(self, st, out):
        self.st = st
        self.out = out

    def wire(self, admission, outcomes, sched, instances, gangs):
        """The other parts it calls (built after it: they call it too)."""
        self.admission, self.outcomes, self.sched, self.instances, self.gangs = admission, outcomes, sched, instances, gangs

    def on_ready(self, ident, head, f):
        info = P.loads_json(f[0].bytes)
        ex = self.st.executors.get(b"e" + ident[1:9])
        if ex is None:
            raise ProtocolError("worker of an unknown executor")
        w = Worker(ident, ex, info)
        old = self.st.workers.get(ident)
        if old is not None:
            self.lose_worker(old, "replaced")
        self.st.workers[ident] = ex.workers[ident] = w
        token = info.get("token")
        if token is None:
            if w.pool:
                self.st.idle[w] = None
            return
        sp = self.st.spawns.get(str(token))
        if sp is None or sp[0] is not ex:  # nobody waits for it (any more), or not from that executor
            self.kill_worker(w)
            return
        del self.st.spawns[str(token)]
        _, devices, what = sp
        w.gpus = tuple(devices)
        if isinstance(what, Actor):
            what.worker, w.actor, w.credit = w, what, ACTOR_PIPELINE
            w.held = what.shape
            self.instances.pump_actor(what)
        elif what.gang is not None:
            self.gangs.gang_ready(w, what, str(token), info)
        else:
            w.held = what.shape
            w.pool = not devices  # an extra CPU worker (fractional CPUs) joins the pool
            if what.state == SPAWNING:
                self.sched.run_on(w, what)
            else:
                self.release_worker(w)

    def on_done(self, ident, head, f):
        w = self.st.workers.get(ident)
        if w is None:
            raise ProtocolError("result from an unknown worker")
        cid, status, nbuf, duration, _ = P.unpack_result(head)  # (a ResultHeader: exactly its bytes)
        if len(f) != 1 + nbuf:
            raise ProtocolError("DONE announces a different number of buffers")
        call = w.inflight.pop(cid, None)
        if call is None:
            return  # cancelled or timed out meanwhile: it already has its outcome
        if self.st.stopping:
            self.st.stopping.pop(cid, None)  # it finished before it could be stopped
        if call.gang is not None:
            return self.gangs.gang_done(call, status, [head, *f])
        if call.kind == P.TASK:
            avg = self.st.avg_duration.get(call.code_hash)
            self.st.avg_duration[call.code_hash] = duration if avg is None else 0.8 * avg + 0.2 * duration
        if call.state == DONE:
            pass
        elif call.kind == P.ACTOR_NEW and status != P.OK:
            self.outcomes.finish(call, status, None, [head, *f])
            self.instances.kill_actor(w.actor, None, failure=[status, head, *f])
            return
        else:
            self.outcomes.finish(call, status, None, [head, *f])
        if w.inflight:  # the next call in this worker's FIFO starts now: its clock starts too
            nxt = next(iter(w.inflight.values()))
            if nxt.started == 0.0:
                nxt.started = time.monotonic()
                if nxt.timeout:
                    heapq.heappush(self.st.timeouts, (nxt.started + nxt.timeout, next(self.st.seq), nxt))
        if w.actor is not None:
            self.instances.pump_actor(w.actor)
        elif not w.inflight:
            self.release_worker(w)
        elif len(w.inflight) < w.credit:
            self.st.partial[w] = None
        if self.st.dropping and w.inflight and w.actor is None:  # the call now first was cancelled while it ran
            nxt = next(iter(w.inflight.values()))
            how = self.st.dropping.get(nxt.id)
            if how is not None and how[2]:
                del self.st.dropping[nxt.id]
                self.outcomes.cancel_running(nxt, w, how[0], how[1], {nxt.id})

    def on_blocked(self, ident, head, f):
        """BLOCKED [call id]: the call ``ident`` runs waits for calls it submitted. Its CPUs are
        lent out (another worker may run on them, a new one started if none is idle), and the
        calls prefetched behind it are taken back (DROP; requeued on a ``d``): they may be the
        very calls it waits for. An instance (its worker runs one call at a time) lends the
        CPUs it holds for life the same way; the calls queued behind on it stay, being its own.
        A stale one (that call is not the one running) is ignored."""
        w = self.st.workers.get(ident)
        if (w is None or len(f) != 1 or w.lent is not None or w.held is None
                or w.gang is not None or next(iter(w.inflight), None) != f[0].bytes):
            return
        w.lent = w.held[0]
        w.ex.ledger.give((w.lent, 0, 0))
        self.st.blocked += 1
        w.inflight[f[0].bytes].waited = True  # nothing is prefetched behind it again (placement)
        if w.actor is not None:
            return
        self.st.partial.pop(w, None)
        for c in list(w.inflight.values())[1:]:
            if c.id not in self.st.dropping:
                self.st.dropping[c.id] = TAKE_BACK
                if not self.out.send([b"l" + w.ident[1:], P.C[P.DROP], c.id]):
                    del self.st.dropping[c.id]

    def on_unblocked(self, ident, head, f):
        """UNBLOCKED [call id]: the call runs again and takes its CPUs back, even if they are
        in use meanwhile (its executor is oversubscribed until calls end, as in Ray)."""
        w = self.st.workers.get(ident)
        if w is None or w.lent is None or len(f) != 1 or next(iter(w.inflight), None) != f[0].bytes:
            return
        w.ex.ledger.take((w.lent, 0, 0))  # (it may oversubscribe: on purpose, see above)
        w.lent = None
        self.st.blocked -= 1
        if len(w.inflight) < w.credit and not w.doomed and w.actor is None:
            self.st.partial[w] = None

    def on_item(self, ident, head, f):
        """ITEM: one item of a generator call, forwarded as it came to the call's driver, in
        this loop turn's messages for it (so before the call's RESULT). Not kept: a stream's
        items are its consumer's, and a retried call sends them again (the driver skips those
        it has, by index)."""
        w = self.st.workers.get(ident)
        if w is None:
            raise ProtocolError("item from an unknown worker")
        r = P.ResultHeader.read(head)
        if len(f) != 1 + r.nbuf:
            raise ProtocolError("ITEM announces a different number of buffers")
        call = w.inflight.get(r.call_id)
        if call is None or call.state != RUNNING:
            return  # cancelled (its consumer stopped) or timed out meanwhile
        self.out.to_driver(call.driver, [P.C[P.ITEM] + head, *f])

    def on_consumed(self, ident, head, f):
        """CONSUMED [call id + count]: the consumer of a stream took ``count`` items; its worker
        may run ahead of that by its window. Forwarded to the worker's output socket."""
        call = self.st.calls.get(head[:P.ID_LEN])  # (CONSUMED: call id + count, no result header)
        if call is None or call.state != RUNNING or call.driver[1:] != ident[1:]:
            return
        self.out.send([b"l" + call.worker.ident[1:], P.C[P.CONSUMED] + head])

    def on_wlog(self, ident, head, f):
        if b"w" + ident[1:] not in self.st.workers:
            return
        did, source, text = f[0].bytes, f[1], f[2]
        self.out.send([b"r" + did, P.C[P.LOG], source, text])

    def release_worker(self, w):
        """A worker finished everything it had: give its resources back to its executor."""
        self.return_resources(w)
        self.st.partial.pop(w, None)
        if w.pool and not w.doomed:
            self.st.idle[w] = None
        elif w.doomed and not w.killed and w.actor is None and w.gang is None and w.ident in self.st.workers:
            self.kill_worker(w)  # it became unreachable with calls in flight: those are done now

    def return_resources(self, w):
        if w.held is not None:
            cpus, gpus, mem = w.held
            if w.lent is not None:  # lent out already (BLOCKED)
                cpus -= w.lent
                w.lent = None
                self.st.blocked -= 1
            w.ex.ledger.give((cpus, gpus, mem), w.gpus)
            w.held = None

    def lose_worker(self, w, why, charge=True, memory=False, running=None):
        """``w`` is gone. The call it was running is charged a retry (``charge``: it may have run);
        calls it had only prefetched, or that never reached it, go back to the queue as they were.
        ``running``: the id of the call it was running, as its executor read it (b"": none);
        None when unknown, and then it is the oldest call sent to it."""
        self.out.drop_worker(w)
        self.st.workers.pop(w.ident, None)
        w.ex.workers.pop(w.ident, None)
        self.st.idle.pop(w, None)
        self.st.partial.pop(w, None)
        if w.spare is not None:
            self.gangs.drop_warm(w)
        if w.gang is not None:  # a gang member's process: the whole gang reruns or fails
            (g, rank), w.gang = w.gang, None
            w.inflight.clear()
            self.return_resources(w)
            return self.gangs.gang_crashed(g, rank, why, charge, retry=not memory)
        calls = list(w.inflight.values())
        w.inflight.clear()
        first = calls[0] if calls and calls[0].state == RUNNING else None
        if running is None:
            cut = first
        elif running:
            cut = next((c for c in calls if c.id == running and c.state == RUNNING), None)
        else:  # it died between calls: none is to blame, unless the next one keeps killing
            cut = None  # workers before it even starts (then after 3 deaths it is charged)
            if first is not None:
                first.deaths += 1
                if first.deaths >= 3:
                    cut = first
        if memory and cut is not None:
            c = cut
            calls.remove(c)
            cut = None
            limit = f"memory={c.shape[2] >> 20} MiB" if c.shape[2] else "no memory= limit set"
            self.outcomes.finish(c, P.OUT_OF_MEMORY, f"the worker running this call was stopped: {why} ({limit})".encode())
            charge = False  # what it had prefetched never ran
            if w.actor is not None:
                why = f"stopped for memory: {why}"
        if w.actor is not None:
            a = w.actor
            a.worker = None
            if a.id in self.st.actors:  # not already ended on purpose (kill, failed __init__)
                r = self.st.restarts.get(a.id) if self.st.restarts else None
                if r is not None and r[0] > 0 and a.failure is None:
                    self.return_resources(w)
                    return self.instances.restart_actor(a, calls, why)
                msg = f"the instance's process died ({why})"
                if r is not None:
                    msg += f" and its max_restarts={r[2]} restarts are spent"
                msg = msg.encode()
                for c in calls:
                    self.outcomes.finish(c, P.ACTOR_DIED, msg)
                self.instances.kill_actor(a, msg)
        else:
            requeue = []
            for c in calls:
                if c.state != RUNNING:
                    continue
                if c is cut and charge:  # the call that was running: charge it a retry
                    c.retries -= 1
                    if c.retries < 0:
                        self.outcomes.finish(c, P.CRASHED, (f"the worker running this call died ({why}) and its "
                                                            f"retries are spent").encode())
                        continue
                    self.st.stats["retried"] += 1
                    log.info("retrying call %s after worker death (%s)", c.id.hex(), why)
                requeue.append(c)
            self.requeue(requeue)
        self.return_resources(w)  # the executor replaces pool workers by itself

    def requeue(self, calls):
        """Put calls taken back from a worker at the front of their queues, in their order, and
        free their places under their function's max_containers. A call cancelled while its
        worker was asked to drop it is not requeued: its outcome is Cancelled."""
        if self.st.dropping:
            for c in [c for c in calls if c.id in self.st.dropping]:
                if self.st.dropping[c.id] is TAKE_BACK:  # it was being taken back anyway
                    del self.st.dropping[c.id]
                    continue
                calls.remove(c)
                self.outcomes.finish(c, P.CANCELLED, b"cancelled; its worker ended before it said whether the call had started")
        for c in reversed(calls):
            if c.maxc and c.kind == P.TASK:
                self.admission.uncap(c)
            c.state, c.worker, c.started = QUEUED, None, 0.0
            self.st.queues.setdefault(c.shape, deque()).appendleft(c)

    def unreachable(self, w, unsent):
        """CALLs for ``w`` could not be sent: its connection is gone, most likely because its
        process died, and then its executor's WORKER_DIED follows within ~50 ms, naming the call
        it was running (the one to charge). So only the calls not sent go back to the queue now;
        ``w`` gets no more, and what it still holds ends with its DONEs, its WORKER_DIED or its
        executor's loss. One left with nothing in flight is killed (a connection that dropped
        while its process lives: the executor starts a fresh one)."""
        if w.actor is not None or w.gang is not None:
            return self.lose_worker(w, "unreachable", charge=False)
        w.doomed = True
        self.st.idle.pop(w, None)
        self.st.partial.pop(w, None)
        self.requeue([c for c in (w.inflight.pop(cid, None) for cid in unsent) if c is not None and c.state == RUNNING])
        if not w.inflight:
            self.kill_worker(w)

    def stop_call(self, w, call, status, message, deliver=True):
        """Give the plain call ``call`` that ``w`` runs its outcome now, and end it by ending
        ``w``; the call keeps its slot on ``w`` meanwhile. The broker's view lags the worker's:
        the call may have ended there and the one prefetched behind it begun, which killing ``w``
        now would run twice. So ``w`` is asked to end itself if it still runs ``call`` (DROP
        "k"), which it decides under the lock it starts calls under: what it holds besides then
        never started, and is requeued when its executor says it died. Its DONE or a DROPPED
        says it had finished, or never began, the call. A worker that says nothing within
        STOP_GRACE (its output thread starved of the GIL) is killed as before."""
        self.outcomes.finish(call, status, message, deliver=deliver, keep_slot=True)
        if not self.out.send([b"l" + w.ident[1:], P.C[P.DROP], call.id, b"k"]):
            return self.kill_worker(w)
        self.st.stopping[call.id] = (time.monotonic() + STOP_GRACE, w)

    def stopped(self, w, cid, answer):
        """``w``'s DROPPED for a DROP "k": f, its DONE is on its way; d, it never started the call
        and never will, so its slot is free now."""
        del self.st.stopping[cid]
        if answer == b"d" and w.inflight.pop(cid, None) is not None:
            self.slot_freed(w)

    def slot_freed(self, w):
        """A plain worker holds one call fewer without a DONE (a DROP answered d): it is free, or
        can take another."""
        if not w.inflight:
            self.release_worker(w)
        elif len(w.inflight) < w.credit and not w.doomed and w.lent is None:
            self.st.partial[w] = None

    def expire_stops(self, now):
        for cid, (deadline, w) in list(self.st.stopping.items()):
            if deadline <= now:
                del self.st.stopping[cid]
                if self.st.workers.get(w.ident) is w and cid in w.inflight:
                    log.warning("worker %s did not end itself within %gs of being asked to: killing it",
                                w.ident.hex(), STOP_GRACE)
                    self.kill_worker(w)

    def kill_worker(self, w):
        """Have the executor kill ``w``; calls it had prefetched go back to the queue uncharged."""
        w.doomed = w.killed = True
        self.out.drop_worker(w)  # not sent yet: they are requeued below, never run twice
        self.st.idle.pop(w, None)
        self.st.partial.pop(w, None)
        if w.actor is None and w.inflight and w.gang is None:  # (a gang member is never requeued alone)
            calls = [c for c in w.inflight.values() if c.state == RUNNING]
            w.inflight.clear()
            self.requeue(calls)
            self.return_resources(w)
        self.out.send([w.ex.ident, P.C[P.KILL_WORKER], w.ident])
