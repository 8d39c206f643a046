"""Scheduling: once per loop turn, ready calls go to workers, and workers are spawned.

Where each call goes is decided by the pure functions of ``placement.py``; this part carries
the choice out: it reserves the shape on the executor's ledger, sends the CALL (batched per
worker, see outbox.py) or asks an executor to SPAWN a worker (GPU calls, instances, gang
members, fractional or lent CPUs), and takes the reservation back if that spawn fails.
"""
from __future__ import annotations

import heapq
import logging
import time
from collections import deque

from .. import protocol as P
from . import placement
from .state import QUEUED, RUNNING, SPAWNING, Actor

log = logging.getLogger("fabric.broker")


class Scheduler:
    """Shares the broker's tables (``st``, state.Tables) and its outbox (``out``); calls
    workers, outcomes, instances, gangs (workers.py, outcomes.py, instances.py, gangs.py)."""

    def __init__(self, st, out):
        self.st = st
        self.out = out

    def wire(self, workers, outcomes, instances, gangs):
        """The other parts it calls (built after it: they call it too)."""
        self.workers, self.outcomes, self.instances, self.gangs = workers, outcomes, instances, gangs

    def dispatch(self):
        if self.st.gang_queue:  # first: what this turn freed goes to a waiting gang if all of it fits
            self.gangs.dispatch_gangs()
        for shape, q in list(self.st.queues.items()):
            while q:
                call = q[0]
                if call.state != QUEUED:
                    q.popleft()
                    continue
                if call.maxc and self.st.fns[call.code_hash].running >= call.maxc:
                    q.popleft()  # at its max_containers: it waits aside, the calls behind it go on
                    self.st.fns[call.code_hash].capped.append(call)
                    continue
                if shape[1]:
                    if not self.place_gpu_call(call):
                        break
                    q.popleft()
                    continue
                w = placement.pick_worker(self.st.idle, self.st.partial, call, self.st.avg_duration, time.monotonic())
                if w is None:
                    if (0 < shape[0] < 1 or self.st.blocked) and self.spawn_extra(call):
                        q.popleft()  # a fraction of a CPU, or lent ones: one more worker
                        continue
                    break
                q.popleft()
                self.run_on(w, call)
        if self.st.pending_actors:
            for _ in range(len(self.st.pending_actors)):
                a = self.st.pending_actors.popleft()
                if a.failure is None and a.id in self.st.actors and not self.instances.place_actor(a):
                    self.st.pending_actors.append(a)

    def spawn_extra(self, call):
        """One more pool worker for ``call`` (fractional or lent CPUs: placement.extra_worker_on)."""
        ex = placement.extra_worker_on(self.st.executors.values(), self.st.spawns.values(), call.shape, self.st.blocked)
        if ex is None:
            return False
        self.reserve(ex, call.shape)
        call.state = SPAWNING
        self.spawn(ex, [], call, None)
        return True

    def run_on(self, w, call):
        frames = call.frames
        hdr = frames[0]
        if call.kind != P.ACTOR_CALL and call.code_hash not in w.code_seen:
            w.code_seen.add(call.code_hash)
            out = [w.ident, P.C[P.CALL] + P.CallHeader.read(hdr).pack(P.HAS_CODE), self.st.code[call.code_hash]]
        else:
            out = [w.ident, P.C[P.CALL] + hdr]
        if frames[1]:
            out.append(frames[1])
        out.extend(frames[2:])
        if call.deps:
            depv = call.depv
            for d in call.deps:
                out.extend(depv[d][1:])
            self.out.flush_worker(w)  # keep this worker's FIFO order; calls with deps travel alone
        idle = not w.inflight
        if idle and w.actor is None and w.held is None:  # (a GPU worker: on the devices it is bound to)
            w.held = call.shape
            w.ex.ledger.take(call.shape, w.gpus)
            self.st.idle.pop(w, None)
        w.inflight[call.id] = call
        call.worker = w
        call.state = RUNNING
        if call.maxc and call.kind == P.TASK:
            self.st.fns[call.code_hash].running += 1
        if idle:
            call.started = time.monotonic()
            if call.timeout:
                heapq.heappush(self.st.timeouts, (call.started + call.timeout, next(self.st.seq), call))
        if w.actor is None:
            if len(w.inflight) < w.credit:
                self.st.partial[w] = None
            else:
                self.st.partial.pop(w, None)
        if call.deps:
            if not self.out.send(out):
                self.workers.unreachable(w, [call.id])
        else:
            self.out.to_worker(w, out[1:])

    def place_gpu_call(self, call):
        """GPU calls run in a worker started with CUDA_VISIBLE_DEVICES set to their devices: an
        idle GPU worker bound to the devices chosen, else a new one (placement.place_gpu)."""
        where = placement.place_gpu(self.st.executors.values(), self.st.workers.values(), call.shape)
        if where is None:
            return False
        w, ex, devices = where
        if w is not None:
            self.run_on(w, call)  # (it takes the shape on the worker's devices)
        else:
            devices = self.reserve(ex, call.shape, devices)
            call.state = SPAWNING
            self.spawn(ex, devices, call, None)
        return True

    def reserve(self, ex, shape, devices=None):
        """Take ``shape`` from ``ex`` (on ``devices``, if given); returns the devices taken."""
        devices = ex.ledger.take(shape, devices)
        # idle GPU workers bound to these devices are replaced by the new one
        for w in list(ex.workers.values()):
            if w.gpus and not w.inflight and w.actor is None and w.gang is None and set(w.gpus) & set(devices):
                self.workers.lose_worker(w, "devices reassigned")
                self.workers.kill_worker(w)
        return devices

    def spawn(self, ex, devices, call, actor):
        token = f"{self.st.epoch[:8]}-{next(self.st.tokens)}"  # unique across restarts: an old worker's death
        # reported to a new broker must not fail a spawn of the same number
        self.st.spawns[token] = (ex, devices, actor if actor is not None else call)
        body = {"token": token, "gpus": devices, "actor": actor.id.hex() if actor is not None else None}
        self.out.send([ex.ident, P.C[P.SPAWN], P.dumps_json(body)])
        return token

    def spawn_failed(self, sp, why):
        ex, devices, what = sp
        shape = what.shape
        if ex.ident in self.st.executors:
            ex.ledger.give(shape, devices)
        if isinstance(what, Actor):
            self.instances.kill_actor(what, why.encode())
        elif what.gang is not None:
            self.gangs.gang_crashed(what.gang[0], what.gang[1], why)
        elif what.state == SPAWNING:
            what.retries -= 1
            if what.retries < 0:
                self.outcomes.finish(what, P.CRASHED, why.encode())
            else:
                what.state = QUEUED
                self.st.queues.setdefault(what.shape, deque()).appendleft(what)
