"""Admission: what the broker does with a SUBMIT (or a BATCH of them) before a call can run.

It checks the header and the frames (a clear refusal for anything malformed, answered on the
call's id so its Future gets it too), keeps code by hash, asks a driver to rejoin when a call
names code or a Future argument that this broker does not hold (a broker restart), journals
what it accepts, and then tracks the call: it waits for its Future arguments, or goes to its
shape's queue (``enqueue``), its instance, or its gang. Per-function options (``min_warm``,
``max_containers``: ``FnInfo``) are registered here too.
"""
from __future__ import annotations

import hashlib
import logging
import time
from collections import deque

from .. import protocol as P
from .. import settings
from ..errors import ProtocolError
from . import placement
from .state import QUEUED, Actor, Call, FnInfo

log = logging.getLogger("fabric.broker")
_S = settings.get()
MAX_CALLS = _S.max_calls  # the most calls held for all drivers together; beyond it, submits are refused
DEP_ASKS = 4  # rejoins asked for one missing Future argument before a call needing it is refused


class _NeedCode(Exception):
    """A SUBMIT names code, or a Future argument of its own driver, that this broker does not
    hold: they went to a broker before a restart (or were lost with it). Its driver re-sends
    both, in order, when asked to rejoin."""

    def __init__(self, deps=()):
        self.deps = deps


class Admission:
    """Shares the broker's tables (``st``, state.Tables) and its outbox (``out``); calls
    outcomes, instances, gangs (outcomes.py, instances.py, gangs.py)."""

    def __init__(self, st, out, drivers, refuse):
        self.st = st
        self.out = out
        self.drivers = drivers
        self.refuse = refuse

    def wire(self, outcomes, instances, gangs):
        """The other parts it calls (built after it: they call it too)."""
        self.outcomes, self.instances, self.gangs = outcomes, instances, gangs

    def on_submit(self, ident, head, f, h=None):
        did = ident[1:]
        if h is None:  # (inside a BATCH, unbatch has read it)
            h = P.CallHeader.read(head)
        cid = h.call_id
        if cid[:8] != did:
            raise ProtocolError("call ids must start with the driver's id")
        d = self.drivers.seen(did)
        if cid in self.st.calls:
            return  # a replay of a call we already have: at most one outcome per id
        if len(self.st.calls) >= MAX_CALLS:
            why = (f"the cluster holds {len(self.st.calls)} calls not yet done (FABRIC_MAX_CALLS); "
                   f"submit fewer at once").encode()
            for rid in [cid, *self.gangs.gang_ids(cid, did, h, f)]:  # (and a gang's other members)
                self.out.to_driver(b"r" + did, [P.C[P.RESULT] + P.pack_result(rid, P.REFUSED), why])
            return
        kept = self.st.results.get(cid)
        if kept is not None:  # re-sent after a broker restart: its outcome is known already
            ids = P.split_ids(f[-1].bytes) if h.opts & P.HAS_GANG and f else [cid]  # a gang: all members
            for rid in ids:
                r = self.st.results.get(rid)
                if r is not None and rid in self.st.unsent:  # (one this broker sent is on its way: never twice)
                    self.st.unsent.discard(rid)
                    self.out.to_driver(b"r" + did, [P.C[P.RESULT] + r[1], *r[2:]])
            return
        try:
            try:
                self.submit(cid, did, head, h, f)
            except _NeedCode as e:
                # the driver sent this code or argument to a broker before a restart: ask it to
                # re-send what it waits for (with code, in order). That includes this call, so
                # nothing is refused or lost. An argument still missing after several rejoins is
                # not coming back: the call is refused then
                self.st.calls.pop(cid, None)
                now = time.monotonic()
                asked = d.dep_asks
                if e.deps and max(asked.get(x, 0) for x in e.deps) >= DEP_ASKS:
                    return self.submit(cid, did, head, h, f, ask=False)
                if now - d.asked > 0.5:
                    d.asked = now
                    log.info("driver %s sent a call needing %s this broker does not hold: asking it to rejoin",
                             did.hex(), f"{len(e.deps)} unknown argument(s)" if e.deps else "code")
                    if len(asked) > 10_000:
                        asked.clear()
                    for x in e.deps:
                        asked[x] = asked.get(x, 0) + 1
                    self.drivers.rejoin(did, d)
                return
        except ProtocolError as e:  # the caller waits on this id: answer it, not only the socket
            self.st.calls.pop(cid, None)
            for rid in [cid, *self.gangs.gang_ids(cid, did, h, f)]:  # a gang's members all wait too
                self.out.send([b"r" + did, P.C[P.RESULT] + P.pack_result(rid, P.REFUSED), str(e).encode()])
            raise

    def on_batch(self, ident, head, f):
        """Several SUBMITs in one message (a driver's burst)."""
        for c, inner_head, h, frames in P.unbatch(f, 0):
            if c != P.SUBMIT:
                raise ProtocolError("a driver's BATCH may hold SUBMITs only")
            try:
                self.on_submit(ident, inner_head, frames, h)
            except (ProtocolError, ValueError, KeyError, TypeError, IndexError) as e:
                self.refuse(ident, f"refused a SUBMIT inside a BATCH: {e}")

    def submit(self, cid, did, head, h, f, ask=True):
        code_hash, kind, aid, opts, nbuf = h.code_hash, h.kind, h.actor_id, h.opts, h.nbuf
        cpus, gpus, retries, timeout = h.cpus, h.gpus, h.retries, h.timeout
        i = (opts & P.HAS_CODE) + ((opts & P.HAS_DEPS) >> 1)
        if len(f) != i + 1 + nbuf + ((opts & P.HAS_GANG) >> 3):  # the gang frame follows the buffers
            raise ProtocolError(f"SUBMIT announces {i} optional frames, {nbuf} buffers and "
                                f"{(opts & P.HAS_GANG) >> 3} gang frames but carries {len(f) - 1} frames "
                                f"besides the payload")
        if opts & P.HAS_CODE:  # kept even if the call is refused: the driver sends code only once
            if hashlib.blake2b(f[0].buffer, digest_size=16).digest() != code_hash:
                raise ProtocolError("code frame does not match its hash")
            if self.st.journal is not None and code_hash not in self.st.code:
                self.st.journal.code(code_hash, f[0])
            self.st.code[code_hash] = f[0]
        if not (0 <= cpus < 1e6 and 0 <= gpus < 1e4 and retries >= 0 and 0 <= timeout < 1e9) or kind > P.GANG:
            raise ProtocolError("call header out of range (cpus < 1e6, gpus < 1e4, retries >= 0, "
                                "0 <= timeout < 1e9 seconds)")
        elif kind != P.ACTOR_CALL and code_hash not in self.st.code:
            raise _NeedCode()
        if gpus > 1 and gpus != int(gpus):
            raise ProtocolError(f"gpus={gpus:g}: above 1, gpus must be a whole number of devices (a fraction "
                                f"below 1 shares one device)")
        if ask and opts & P.HAS_DEPS:
            # one of this driver's own calls that we do not know: sent to the broker before a
            # restart, and not journaled when it died. Its driver holds it and re-sends it
            lost = [x for x in P.split_ids(f[i - 1].bytes) if x[:8] == did and x not in self.st.results
                    and x not in self.st.calls]
            if lost:
                raise _NeedCode(lost)
        if kind == P.GANG or opts & P.HAS_GANG:
            self.gangs.check_gang(cid, did, kind, opts, f[-1].bytes)
        # keep small frames as bytes: a zmq Frame costs ~10x its size in memory, and 100,000
        # queued calls must stay cheap; large payloads and buffers stay zero-copy Frames
        payload = f[i]
        if len(payload) < 4096:
            payload = payload.bytes
        hdr = head if not opts & P.HAS_CODE else h._replace(opts=opts & ~P.HAS_CODE).pack()
        deps = f[i - 1].bytes if opts & P.HAS_DEPS else b""
        if opts & P.HAS_DEPS and not deps:
            raise ProtocolError("HAS_DEPS is set but the deps frame is empty")
        dep_ids = P.split_ids(deps) if deps else None
        if kind == P.ACTOR_NEW and (aid in self.st.actors or aid in self.st.dead_actors):
            raise ProtocolError("instance id already in use")
        call = Call(cid, b"r" + did, [hdr, deps, payload, *f[i + 1:]], h)
        if self.st.journal is not None:
            if kind != P.GANG:  # a gang restarts whole: its driver re-sends it on rejoin
                self.st.journal.call(call.frames)
        self.admit(call, dep_ids)

    def admit(self, call, dep_ids):
        """Track an accepted call: wait for its Future arguments, or queue it."""
        kind = call.kind
        if (call.maxc or call.warm) and kind != P.GANG:  # a gang's min_warm keeps its workers (gangs.py)
            self.register_fn(call)
        self.st.calls[call.id] = call
        self.st.stats["submitted"] += 1
        if kind == P.GANG:  # its members exist before anything can fail it
            self.gangs.new_gang(call)
        if dep_ids:
            call.deps = dep_ids
            call.depv = {}
            for d in call.deps:
                r = self.st.results.get(d)
                if r is not None:
                    if r[0] != P.OK:
                        return self.outcomes.finish_copy(call, r)
                    call.depv[d] = r
                elif d in self.st.calls:
                    self.st.waiters.setdefault(d, []).append(call)
                    call.missing += 1
                else:
                    return self.outcomes.finish(call, P.REFUSED, b"a Future argument refers to a result this cluster "
                                                                 b"does not hold (released, or from another cluster)")
        if kind == P.TASK:
            if call.missing == 0:
                self.enqueue(call)
        elif kind == P.ACTOR_NEW:
            self.instances.new_actor(call)
        elif kind == P.GANG:
            if call.missing == 0:
                self.enqueue(call)
        else:
            self.instances.actor_call(call)

    def enqueue(self, call):
        if call.gang is not None:
            return self.gangs.enqueue_gang(call.gang[0])
        call.state = QUEUED
        q = self.st.queues.get(call.shape)
        if q is None:
            q = self.st.queues[call.shape] = deque()
            why = self.unschedulable(call.shape)
            if why:
                del self.st.queues[call.shape]
                return self.outcomes.finish(call, P.UNSCHEDULABLE, why.encode())
        q.append(call)

    def unschedulable(self, shape):
        """Why no executor can ever run this shape, or None. With no executor yet, wait (grace)."""
        return placement.unschedulable(list(self.st.executors.values()), shape)

    def register_fn(self, call):
        """Note a function's or class's min_warm / max_containers (the latest call's win)."""
        fn = self.st.fns.get(call.code_hash)
        if fn is None:
            fn = self.st.fns[call.code_hash] = FnInfo(call.code_hash, "cls" if call.kind == P.ACTOR_NEW else "fn")
        fn.shape, fn.min_warm, fn.max_containers = call.shape, call.warm, call.maxc
        fn.drivers.add(call.driver[1:])

    def uncap(self, call):
        """A capped function's call stopped running: the next one waiting for a place goes first."""
        fn = self.st.fns[call.code_hash]
        fn.running -= 1
        while fn.capped:
            c = fn.capped.popleft()
            if c.state == QUEUED:
                self.st.queues.setdefault(c.shape, deque()).appendleft(c)
                break

    def keep_warm(self):
        """Functions with min_warm: hand their code to idle pool workers that lack it (WARM), so
        that many workers can run them without loading code first."""
        for h, fn in self.st.fns.items():
            if fn.kind != "fn" or not fn.min_warm or h not in self.st.code:
                continue
            need = fn.min_warm - sum(1 for w in self.st.workers.values() if w.pool and h in w.code_seen)
            for w in list(self.st.idle):
                if need <= 0:
                    break
                if h not in w.code_seen and not w.doomed:
                    w.code_seen.add(h)
                    self.out.send([w.ident, P.C[P.WARM], h, self.st.code[h]])
                    need -= 1

    def fn_status(self):
        out = []
        for h, fn in self.st.fns.items():
            code = self.st.code.get(h)
            out.append({"name": P.code_name(code) if code is not None else "?", "hash": h.hex()[:12],
                        "kind": fn.kind, "min_warm": fn.min_warm, "max_containers": fn.max_containers or None,
                        "running": fn.running, "waiting": sum(1 for c in fn.capped if isinstance(c, Actor) or c.state == QUEUED),
                        "warm": sum(1 for w in self.st.workers.values() if h in w.code_seen and
                                    (w.pool or (w.actor is not None and w.actor.fn is fn))),
                        "cpus": fn.shape[0], "gpus": fn.shape[1], "memory": fn.shape[2]})
        return out
