"""Gang scheduling (one part of the broker, see core.py): n members that start together or not at all.

A gang (kind GANG) waits in one FIFO (``gang_queue``) until all n places are free at once, then
takes them in one go: never part of a gang while waiting for the rest, so two gangs cannot hold
halves of each other's places. Members get their rank, the world size and every member's
address in their CALL; a member's crash reruns the whole gang (its retries), its error stops
the others (docs/gangs.md, protocol.md §6.11).

Warm gang workers (``min_warm``): the workers of a CPU gang with ``min_warm`` that ended OK are
not killed but kept, idle and holding no resources, for the next gang of the same shape from the
same driver on the same executor, which then starts at once in processes that have its imports
(no spawn, no interpreter start). They are stopped when their driver leaves or after
``WARM_IDLE`` seconds unused.
"""
from __future__ import annotations

import heapq
import logging
import time

from .. import protocol as P
from ..errors import ProtocolError
from . import placement
from .state import DONE, HELD, QUEUED, RUNNING, SPAWNING, WAITING, Call, Gang

log = logging.getLogger("fabric.broker")
WARM_IDLE = 300.0  # seconds a kept gang worker waits for its driver's next gang of its shape


class Gangs:
    """Shares the broker's tables (``st``, state.Tables) and its outbox (``out``); calls
    outcomes, sched, workers (outcomes.py, scheduler.py, workers.py)."""

    def __init__(self, st, out):
        self.st = st
        self.out = out

    def wire(self, outcomes, sched, workers):
        """The other parts it calls (built after it: they call it too)."""
        self.outcomes, self.sched, self.workers = outcomes, sched, workers

    def check_gang(self, cid, did, kind, opts, frame):
        """SUBMIT of a gang: its last frame lists the members' call ids, rank 0 (``cid``) first."""
        if kind != P.GANG or not opts & P.HAS_GANG:
            raise ProtocolError("HAS_GANG goes with kind GANG, and kind GANG with HAS_GANG")
        ids = P.split_ids(frame)
        if not 1 <= len(ids) <= P.MAX_GANG:
            raise ProtocolError(f"a gang has 1 to {P.MAX_GANG} members, this one {len(ids)}")
        if ids[0] != cid:
            raise ProtocolError("a gang's first member id must be the SUBMIT's call id")
        if len(set(ids)) != len(ids) or any(m[:8] != did for m in ids):
            raise ProtocolError("a gang's member ids must be distinct and start with the driver's id")
        if any(m in self.st.calls or m in self.st.results for m in ids[1:]):
            raise ProtocolError("a gang member id is already in use")

    def gang_ids(self, cid, did, h, f):
        """The other members of a gang SUBMIT being refused: their Futures wait for an answer too."""
        try:
            if not h.opts & P.HAS_GANG or not f:
                return []
            ids = P.split_ids(f[-1].bytes)[:P.MAX_GANG]
        except Exception:  # noqa: BLE001 - a malformed frame: nothing more to answer
            return []
        return [m for m in dict.fromkeys(ids)
                if m != cid and m[:8] == did and m not in self.st.calls and m not in self.st.results]

    def new_gang(self, lead):
        """The members of an admitted GANG call; they share the lead's (rank 0's) frames."""
        frames = lead.frames                   # [hdr, deps, payload, *buffers, member ids]
        h = P.CallHeader.read(bytes(frames[0]))
        members = [lead]
        ids = frames[-1].bytes if hasattr(frames[-1], "bytes") else bytes(frames[-1])
        for m in P.split_ids(ids)[1:]:
            c = Call(m, lead.driver, frames, h)
            self.st.calls[m] = c
            members.append(c)
        self.st.stats["submitted"] += len(members) - 1
        g = Gang(lead, members)
        for r, c in enumerate(members):
            c.gang = (g, r)
        self.st.gangs[g.id] = g

    def enqueue_gang(self, g):
        if g.state == DONE:
            return
        why = self.gang_unschedulable(g)
        if why:
            return self.outcomes.finish(g.members[0], P.UNSCHEDULABLE, why.encode())  # and the others with it
        g.state = QUEUED
        for c in g.members:
            c.state = QUEUED
        self.st.gang_queue.append(g)

    def gang_unschedulable(self, g):
        """Why this cluster can never start ``g`` (not even idle), or None. No executor yet: wait."""
        return placement.gang_unschedulable(list(self.st.executors.values()), g.shape, len(g.members))

    def dispatch_gangs(self):
        q = self.st.gang_queue
        while q:
            g = q[0]
            if g.state != QUEUED:
                q.popleft()
                continue
            plan = self.plan_gang(g)
            if plan is None:
                return  # FIFO: the gangs behind it wait too, so a big gang is not overtaken forever
            q.popleft()
            self.start_gang(g, plan)

    def plan_gang(self, g):
        return placement.plan_gang(self.st.executors.values(), g.shape, len(g.members))

    def start_gang(self, g, plan):
        """Reserve every member's place and spawn its worker (or take a kept warm one); the CALLs
        go when all are READY."""
        g.state = SPAWNING
        warm = 0
        for rank, (ex, devices) in enumerate(plan):
            c = g.members[rank]
            c.state = SPAWNING
            w = self.take_warm(g, ex) if g.warm and not devices else None
            if w is None:
                g.tokens.add(self.sched.spawn(ex, self.sched.reserve(ex, g.shape, devices), c, None))
                continue
            self.sched.reserve(ex, g.shape, devices)
            w.held = c.shape
            self.gang_member(g, rank, w)
            warm += 1
        log.info("gang %s: %d members placed on %d executors (%d in warm workers)", g.id.hex(), len(plan),
                 len({ex for ex, _ in plan}), warm)
        if not g.tokens:
            self.launch_gang(g)

    def gang_ready(self, w, c, token, info):
        g, rank = c.gang
        g.tokens.discard(token)
        w.held = c.shape
        if g.state != SPAWNING or c.state != SPAWNING:  # not this attempt's (its spawns are dropped)
            self.workers.release_worker(w)
            return self.workers.kill_worker(w)
        addr = info.get("addr")
        w.addr = addr if isinstance(addr, str) and 0 < len(addr) <= 256 else f"{w.ex.host}:0"
        self.gang_member(g, rank, w)
        if not g.tokens and all(x is not None for x in g.workers):
            self.launch_gang(g)

    def gang_member(self, g, rank, w):
        w.gang = (g, rank)
        g.members[rank].worker = w
        g.workers[rank] = w
        g.addrs[rank] = w.addr

    def take_warm(self, g, ex):
        """A worker kept from this driver's earlier gang of ``g``'s shape on ``ex``, or None."""
        key = (g.members[0].driver, ex.ident, g.shape)
        kept = self.st.warm_gang.get(key)
        while kept:
            w = kept.pop()
            w.spare = None
            if not kept:
                del self.st.warm_gang[key]
            if w.ident in self.st.workers and not w.doomed:
                return w
            kept = self.st.warm_gang.get(key)
        return None

    def keep_warm_worker(self, g, w) -> bool:
        """Keep ``w`` (idle, holding nothing) for its driver's next gang of this shape, up to
        ``min_warm`` per executor. CPU gangs only: a GPU worker's devices are fixed at its start."""
        if not g.warm or g.shape[1] or w.doomed or w.ident not in self.st.workers or w.addr is None:
            return False
        key = (g.members[0].driver, w.ex.ident, g.shape)
        kept = self.st.warm_gang.setdefault(key, [])
        if len(kept) >= g.warm:
            return False
        w.spare = (key, time.monotonic())
        kept.append(w)
        return True

    def drop_warm(self, w):
        """``w`` is no longer kept warm (it died, or is being stopped)."""
        key = w.spare[0]
        w.spare = None
        kept = self.st.warm_gang.get(key)
        if kept and w in kept:
            kept.remove(w)
        if not kept:
            self.st.warm_gang.pop(key, None)

    def expire_warm(self, now, driver=None):
        """Stop kept gang workers unused for ``WARM_IDLE`` s, or all of ``driver``'s (it left)."""
        for key, kept in list(self.st.warm_gang.items()):
            for w in list(kept):
                if (driver is not None and key[0] == driver) or (driver is None and now - w.spare[1] > WARM_IDLE):
                    self.drop_warm(w)
                    if w.ident in self.st.workers:
                        self.workers.kill_worker(w)

    def launch_gang(self, g):
        """Every member's worker is READY: send the n CALLs in this loop turn, each with its context."""
        g.state = RUNNING
        n = len(g.members)
        local, by_ex = [0] * n, {}
        for r, w in enumerate(g.workers):
            on = by_ex.setdefault(w.ex, [])
            local[r] = len(on)
            on.append(r)
        common = P.dumps_json({"gang": g.id.hex(), "world_size": n, "addresses": g.addrs})
        lead = g.members[0]
        frames = lead.frames                   # [hdr, deps, payload, *buffers, member ids]
        h = P.CallHeader.read(bytes(frames[0]))
        now = time.monotonic()
        for r, c in enumerate(g.members):
            w = g.workers[r]
            opts = h.opts | P.HAS_GANG
            out = [P.C[P.CALL]]
            if c.code_hash not in w.code_seen:
                w.code_seen.add(c.code_hash)
                opts |= P.HAS_CODE
                out.append(self.st.code[c.code_hash])
            out[0] += h._replace(call_id=c.id, opts=opts).pack()
            if frames[1]:
                out.append(frames[1])
            out.extend(frames[2:-1])
            out.append(b'{"rank":%d,"local_rank":%d,"local_world_size":%d,' % (r, local[r], len(by_ex[w.ex]))
                       + common[1:])
            if lead.deps:
                for d in lead.deps:
                    out.extend(lead.depv[d][1:])
            w.inflight[c.id] = c
            c.worker, c.state, c.started = w, RUNNING, now
            if c.timeout:
                heapq.heappush(self.st.timeouts, (now + c.timeout, next(self.st.seq), c))
            self.out.to_worker(w, out)  # one CALL per worker: never a BATCH
        log.info("gang %s: %d members started", g.id.hex(), n)

    def gang_done(self, c, status, frames):
        """A member's DONE: held until every member has one, so that a crash can still rerun all."""
        g, rank = c.gang
        if c.state != RUNNING or g.state != RUNNING:
            return
        if status != P.OK:
            return self.outcomes.finish(c, status, None, frames)  # gang_outcome stops the others
        c.state = HELD
        g.outcomes[rank] = frames
        g.held += 1
        if g.held == len(g.members):
            g.state = DONE
            self.st.gangs.pop(g.id, None)
            for r, m in enumerate(g.members):
                self.outcomes.finish(m, P.OK, None, g.outcomes[r])
            self.gang_release(g, keep=True)

    def gang_outcome(self, c, status, frames):
        """``finish`` gave member ``c`` an outcome (a failure, a cancel, a timeout, an argument that
        failed, ...). Before the gang starts, every member gets the same; once it has started, the
        others are stopped."""
        g, rank = c.gang
        if g.state == DONE:
            return
        if g.state in (WAITING, QUEUED):
            g.state = DONE
            self.st.gangs.pop(g.id, None)
            if status != P.OK:
                kept = [status, *frames]
                for m in g.members:
                    if m.state != DONE:
                        self.outcomes.finish_copy(m, kept)
            return
        if status == P.OK:
            return
        g.state = DONE
        what = {P.TIMEOUT: "ran longer than its timeout", P.CANCELLED: "was cancelled",
                P.USER_ERROR: "raised an exception", P.SERIALIZATION: "returned a result that cannot be pickled",
                }.get(status, "failed")
        self.gang_end(g, P.CANCELLED if status == P.CANCELLED else P.GANG_FAILED,
                      f"gang member rank {rank} of {len(g.members)} {what} (its own Future says what happened), "
                      f"so the other members were stopped")

    def gang_crashed(self, g, rank, why, charge=True, retry=True):
        """A member's process died, or its worker could not start: rerun the whole gang while its
        retries last (``charge=False``: rerun without counting it), else fail every member."""
        if g.state not in (SPAWNING, RUNNING):
            return
        n = len(g.members)
        if retry and (not charge or g.retries > 0):
            if charge:
                g.retries -= 1
                self.st.stats["retried"] += 1
            log.info("gang %s: rank %d of %d died (%s): starting the whole gang again (%d retries left)",
                     g.id.hex(), rank, n, why, g.retries)
            self.gang_release(g)
            for c in g.members:
                c.state, c.worker, c.started = QUEUED, None, 0.0
            g.state = QUEUED
            self.st.gang_queue.appendleft(g)
            return
        g.state = DONE
        self.gang_end(g, P.GANG_FAILED, f"gang member rank {rank} of {n} died ({why})"
                                        f"{' and the gang has no retries left' if retry else ''}, "
                                        f"so the whole gang was stopped")

    def gang_end(self, g, status, msg):
        """Give every member without an outcome ``status``/``msg`` (a held OK result is delivered),
        then kill the gang's workers and return its places."""
        self.st.gangs.pop(g.id, None)
        text = msg.encode()
        for r, c in enumerate(g.members):
            if c.state == HELD:
                self.outcomes.finish(c, P.OK, None, g.outcomes[r])
            elif c.state != DONE:
                self.outcomes.finish(c, status, text)
        self.gang_release(g)

    def gang_release(self, g, keep=False):
        """Drop this attempt: its pending spawns, and its workers (killed, or with ``keep`` after
        an OK end kept warm if the gang asked: min_warm), returning their places."""
        for tok in g.tokens:
            sp = self.st.spawns.pop(tok, None)
            if sp is not None and sp[0].ident in self.st.executors:
                sp[0].ledger.give(g.shape, sp[1])
        g.tokens = set()
        for w in g.workers:
            if w is None:
                continue
            w.gang = None
            w.inflight.clear()
            self.workers.return_resources(w)
            if keep and self.keep_warm_worker(g, w):
                continue
            if w.ident in self.st.workers:
                self.workers.kill_worker(w)
        n = len(g.members)
        g.workers, g.addrs, g.outcomes, g.held = [None] * n, [None] * n, [None] * n, 0
