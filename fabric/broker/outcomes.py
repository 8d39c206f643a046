"""Outcomes: each call id gets exactly one, and cancelling is one way to get it.

``finish`` gives a call its outcome: sent to its driver with this loop turn's batch, kept
until the driver releases it (RELEASE) so a dependent call submitted meanwhile finds it,
journaled, and passed on to the calls waiting for it as a Future argument. PUT adds a kept
outcome the driver made itself. CANCEL ends a queued call at once; a running one is
interrupted or has its worker replaced (force), and one that was sent to a worker behind
another call is asked back (DROP) and ends as its worker answers (DROPPED).
"""
from __future__ import annotations

import logging

from .. import protocol as P
from ..errors import ProtocolError
from .state import DONE, QUEUED, RUNNING, TAKE_BACK

log = logging.getLogger("fabric.broker")


class Outcomes:
    """Shares the broker's tables (``st``, state.Tables) and its outbox (``out``); calls
    admission, workers, instances, gangs (admission.py, workers.py, instances.py, gangs.py)."""

    def __init__(self, st, out, drivers):
        self.st = st
        self.out = out
        self.drivers = drivers

    def wire(self, admission, workers, instances, gangs):
        """The other parts it calls (built after it: they call it too)."""
        self.admission, self.workers, self.instances, self.gangs = admission, workers, instances, gangs

    def finish(self, call, status, message, frames=None, deliver=True, keep_slot=False):
        """Give a call its one outcome: send it to the driver, keep it for dependants."""
        if call.state == DONE:
            return
        if frames is None:
            frames = [P.pack_result(call.id, status), message or b""]
        if call.maxc and call.state == RUNNING and call.kind == P.TASK:
            self.admission.uncap(call)
        call.state = DONE
        if self.st.dropping:
            self.st.dropping.pop(call.id, None)
        w = call.worker
        if w is not None and not keep_slot and w.inflight.pop(call.id, None) is not None:
            if w.actor is None and not w.inflight:
                self.workers.release_worker(w)
        self.st.calls.pop(call.id, None)
        self.st.stats["completed"] += 1
        if deliver and call.driver[1:] in self.drivers:
            if not self.st.restoring:
                self.out.to_driver(call.driver, [P.C[P.RESULT] + frames[0], *frames[1:]])
            self.st.results[call.id] = [status, *frames]
            if self.st.journal is not None:
                self.st.journal.outcome(call.id, status, frames)
        elif self.st.journal is not None:
            self.st.journal.forget([call.id])  # an outcome nobody will ask for: the call is over
        if call.kind == P.ACTOR_NEW and status != P.OK:
            a = self.st.actors.get(call.actor)
            if a is not None and a.failure is None:
                self.instances.kill_actor(a, None, failure=[status, *frames])
            elif a is None:  # failed before the instance existed (a failed argument)
                self.st.dead_actors[call.actor] = [status, *frames]
        if call.gang is not None:
            self.gangs.gang_outcome(call, status, frames)
        if self.st.fetchers:
            for rid in self.st.fetchers.pop(call.id, ()):
                self.out.to_driver(rid, [P.C[P.RESULT] + frames[0], *frames[1:]])
        waiting = self.st.waiters.pop(call.id, None)
        if waiting:
            kept = [status, *frames]
            for c in waiting:
                if c.state == DONE:
                    continue
                if status != P.OK:
                    self.finish_copy(c, kept)
                    continue
                c.depv[call.id] = kept
                c.missing -= 1
                if c.missing == 0:
                    if c.kind == P.TASK or c.kind == P.GANG:
                        self.admission.enqueue(c)
                    else:
                        c.state = QUEUED
                        a = self.st.actors.get(c.actor)
                        if a is not None:
                            self.instances.pump_actor(a)

    def finish_copy(self, call, outcome):
        """Fail ``call`` with another call's failure (a failed dependency, a dead instance)."""
        status, hdr = outcome[0], outcome[1]
        r = P.unpack_result(hdr)  # kept outcomes hold their header as bytes
        self.finish(call, status, None, [P.pack_result(call.id, status, r.nbuf, r.duration), *outcome[2:]])

    def on_release(self, ident, head, f):
        results, did = self.st.results, ident[1:]
        ids = [cid for cid in P.split_ids(f[0].bytes) if cid[:8] == did]  # a driver releases only its own
        for cid in ids:
            results.pop(cid, None)
        if self.st.unsent:
            self.st.unsent.difference_update(ids)
        if self.st.journal is not None:
            self.st.journal.forget(ids)

    def on_fetch(self, ident, head, f):
        """FETCH [ids]: a driver reads results it does not own (Futures that travelled inside
        an argument, docs/protocol.md). Each held outcome is sent to its ``r`` socket as a
        RESULT now, a pending one when it comes; an id neither held nor running is answered
        REFUSED at once, so the reader gets an error, never a hang. The owner's RELEASE still
        decides how long an outcome is held (its driver keeps it while such calls run)."""
        if len(f) != 1 or not f[0].bytes or len(f[0].bytes) % P.ID_LEN:
            raise ProtocolError("FETCH takes one frame of 16-byte result ids")
        rid = b"r" + ident[1:]
        for cid in P.split_ids(f[0].bytes):
            r = self.st.results.get(cid)
            if r is not None:
                self.out.to_driver(rid, [P.C[P.RESULT] + r[1], *r[2:]])
            elif cid in self.st.calls:
                self.st.fetchers.setdefault(cid, []).append(rid)
            else:
                self.out.to_driver(rid, [P.C[P.RESULT] + P.pack_result(cid, P.REFUSED),
                                         b"this Future's result is not held by the cluster: it was released (its "
                                         b"driver received it and no running call that it was passed to holds it), "
                                         b"or its driver is gone, or it belongs to another cluster"])

    def on_put(self, ident, head, f):
        r = P.unpack_result(head)
        cid = r.call_id
        if cid[:8] != ident[1:] or r.status != P.OK or len(f) != 1 + r.nbuf:
            raise ProtocolError("malformed PUT")
        self.st.results[cid] = [P.OK, head, *f]
        if self.st.journal is not None:
            self.st.journal.outcome(cid, P.OK, [head, *f])

    def on_cancel(self, ident, head, f):
        """CANCEL [ids, (flags)]: flags bit 1 force (kill a running call's worker), bit 2
        recursive (also cancel the calls its worker submitted, depth first). Without the flags
        frame: force, not recursive (``Future.cancel()``)."""
        force, recursive = True, False
        if len(f) > 1:
            fl = f[1].bytes
            if len(fl) != 1 or fl[0] > 3:
                raise ProtocolError("CANCEL flags must be one byte: 1 = force, 2 = recursive")
            force, recursive = bool(fl[0] & 1), bool(fl[0] & 2)
        for cid in P.split_ids(f[0].bytes):
            call = self.st.calls.get(cid)
            if call is None or call.driver[1:] != ident[1:]:
                continue
            self.cancel_call(call, force, recursive, {cid})

    def cancel_call(self, call, force, recursive, seen):
        if call.state != RUNNING:
            return self.finish(call, P.CANCELLED, b"cancelled before it ran")
        w = call.worker
        if next(iter(w.inflight)) != call.id:
            # sent to its worker behind another call (prefetched, or queued in an instance's
            # worker): only the worker knows whether it started it, so it is asked to drop it
            # and says which; the outcome waits for that answer (on_dropped)
            if self.st.dropping.get(call.id) is TAKE_BACK:  # its DROP is sent: the answer cancels it
                self.st.dropping[call.id] = (force, recursive, False)
            elif call.id not in self.st.dropping:
                self.st.dropping[call.id] = (force, recursive, False)
                if not self.out.send([b"l" + w.ident[1:], P.C[P.DROP], call.id]):
                    del self.st.dropping[call.id]  # no output socket: it runs, and its result is its outcome
            return
        if w.actor is not None:
            return self.cancel_started_instance_call(call, w)
        self.cancel_running(call, w, force, recursive, seen)

    def cancel_started_instance_call(self, call, w):
        """An instance call that started runs to its end, but a generator method stops before
        its next item; the instance lives on."""
        if not P.CallHeader.read(call.frames[0]).opts & P.STREAM:
            return
        self.finish(call, P.CANCELLED, b"cancelled while running: the stream was closed", keep_slot=True)
        self.out.send([b"l" + w.ident[1:], P.C[P.INTERRUPT], call.id])

    def cancel_running(self, call, w, force, recursive, seen):
        if recursive:
            self.cancel_children(w, force, seen)
        if force or call.gang is not None:
            msg = b"cancelled while running; its worker was replaced"
            if call.gang is None:
                return self.workers.stop_call(w, call, P.CANCELLED, msg)
            self.finish(call, P.CANCELLED, msg)
            self.workers.kill_worker(w)
        else:  # fabric.Cancelled is raised inside it; it keeps its worker's slot until it returns
            self.finish(call, P.CANCELLED, b"cancelled while running (fabric.Cancelled was raised inside it)",
                        keep_slot=True)
            self.out.send([b"l" + w.ident[1:], P.C[P.INTERRUPT], call.id])

    def on_dropped(self, ident, head, f):
        """DROPPED [call id, d|r|f] from a worker's output socket, the answer to DROP: d, it
        will never start the call: its outcome is Cancelled; r, it runs it: a plain call is
        cancelled as a running one (now, or once the call ahead of it is DONE here), an instance
        call runs to its end; f, it finished it: its DONE is on its way and is its outcome."""
        w = self.st.workers.get(b"w" + ident[1:])
        if w is None or len(f) != 2:
            return
        cid, answer = f[0].bytes, f[1].bytes
        if self.st.stopping and cid in self.st.stopping:
            return self.workers.stopped(w, cid, answer)
        how = self.st.dropping.pop(cid, None)
        call = self.st.calls.get(cid)
        if how is None or call is None or call.worker is not w or call.state != RUNNING:
            return
        if how is TAKE_BACK:  # prefetched behind a call that blocked (on_blocked)
            if answer == b"d" and w.inflight.pop(cid, None) is not None:
                self.workers.requeue([call])
                self.workers.slot_freed(w)  # (the blocked call may have ended meanwhile)
            return
        if answer == b"d":
            self.st.stats["dropped"] += 1  # (cancelled calls a worker held and never started)
            self.finish(call, P.CANCELLED, b"cancelled before it ran")
            if w.actor is not None:
                self.instances.pump_actor(w.actor)
            elif w.inflight and len(w.inflight) < w.credit and not w.doomed and w.lent is None:
                self.st.partial[w] = None
            return
        self.st.stats["drop_too_late"] += 1  # (it had started: running, or finished)
        if answer != b"r":
            return
        if w.actor is not None:  # (a concurrent instance runs several calls at once)
            self.cancel_started_instance_call(call, w)
        elif next(iter(w.inflight)) == cid:
            self.cancel_running(call, w, how[0], how[1], {cid})
        else:  # the DONE of the call ahead of it is still on its way: on_done cancels it
            self.st.dropping[cid] = (how[0], how[1], True)

    def cancel_children(self, w, force, seen):
        """The calls that worker ``w`` submitted (its nested driver says which worker it is in
        its HELLO) and that have no outcome yet: the children of the call it runs now."""
        wid = w.ident.hex()
        for did in self.drivers.in_worker(wid):
            rid = b"r" + did
            for c in [c for c in self.st.calls.values() if c.driver == rid and c.id not in seen]:
                seen.add(c.id)
                self.cancel_call(c, force, True, seen)
