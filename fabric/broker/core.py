"""The broker: routing, queues, resource matching, heartbeats, retries.

Process architecture (one broker per cluster)::

    driver ─d/r DEALERs─┐                          ┌─ executor daemon (DEALER "e…")
    driver ─d/r DEALERs─┼─▶  ROUTER  (this loop)  ◀┼─ worker process  (DEALER "w…") ─┐ started and
    fabric status ──────┘     one thread, no       └─ worker process  (DEALER "w…") ─┘ restarted by
                              payload unpickling                                       its executor

Drivers submit calls on their ``d`` socket and receive results on their ``r`` socket (so a
driver's user thread sends while another thread may be receiving). Workers connect
to the broker directly: a call goes driver -> broker -> worker and its result worker ->
broker -> driver, two hops each way. The executor daemon never touches calls; it reports
resources, heartbeats and dead workers, and spawns workers on request (GPU sets, instances).

Scheduling: calls that are ready (their Future arguments resolved) wait in one FIFO queue per
resource shape ``(cpus, gpus, memory)``. A call goes to an idle worker on an executor with
enough free resources; a busy worker may also take up to ``credit`` calls ahead (prefetch)
when they have its shape and their function is known to be short, so short calls never
starve a worker between round trips while long ones never park behind each other.
Instances (``@fabric.cls``) get a dedicated worker and a FIFO of their own.

Modules: the broker is one object per part, composed here (``Broker``) and sharing one set of
tables (``state.Tables``) and one outbox; each part is given the others it calls (``wire``):

- ``core.py``: the loop, who may send what, the handler table, STATUS, drivers leaving, time;
- ``outbox.py``: sending, and batching what a loop turn sends per peer;
- ``drivers.py``: the ``Driver`` records, joining, rejoining, heartbeats; ``executors.py``: the same
  for executors, and their workers' deaths; ``arenas.py``: drivers' shared-memory arenas, mapped
  ahead by idle workers;
- ``admission.py``: SUBMIT and BATCH: checks, code, Future arguments, queues, min_warm/max_containers;
- ``scheduler.py``: dispatching ready calls and spawning workers; ``placement.py`` decides where
  (pure functions, no sockets, no clock), reserving through each executor's ``resources.Ledger``;
- ``workers.py``: what workers say, and what happens when one dies or cannot be reached;
- ``instances.py``: ``@fabric.cls`` instances and their names; ``gangs.py``: gang scheduling;
- ``outcomes.py``: each call's one outcome, kept until released; cancelling;
- ``journal.py``: the journal's file format, and replaying it (``restore``);
- ``state.py``: the records (Call, Executor, Worker, Actor, Gang, FnInfo) and the tables.

Outcomes: a call's result is sent to its driver and kept here until the driver releases it,
so a dependent call submitted meanwhile still finds it without a round trip through the
driver. Each call id gets at most one outcome; a worker's death retries its running call up
to ``retries`` and requeues the calls it had prefetched without charging them.
"""
from __future__ import annotations

import heapq
import logging
import os
import time
from collections import deque

import zmq

from .. import protocol as P
from .. import config
from .. import security
from .. import settings
from ..errors import FabricError, ProtocolError
from .journal import COMPACT_BYTES, Journal, live_records, restore as replay_journal
from .admission import Admission
from .arenas import Arenas
from .drivers import DRIVER_TIMEOUT, Drivers
from .executors import Executors
from .gangs import Gangs
from .instances import Instances
from .outbox import Outbox
from .outcomes import Outcomes
from .scheduler import Scheduler
from .state import QUEUED, RUNNING, Tables
from .workers import Workers

log = logging.getLogger("fabric.broker")

_S = settings.get()
NO_EXECUTOR_GRACE = _S.no_executor_grace


class Broker:
    def __init__(self, address: str, parent_pid: int = 0, ctx: zmq.Context | None = None,
                 journal: str | None = None):
        self.address = address
        self.parent_pid = parent_pid
        self.ctx = ctx or zmq.Context.instance()
        s = self.sock = self.ctx.socket(zmq.ROUTER)
        s.setsockopt(zmq.ROUTER_MANDATORY, 1)
        s.setsockopt(zmq.ROUTER_HANDOVER, 1)
        s.setsockopt(zmq.SNDHWM, 0)
        s.setsockopt(zmq.RCVHWM, 0)
        s.setsockopt(zmq.LINGER, 0)
        if not (security.configured() or config.is_local_address(address)
                or settings.get().allow_insecure_remote):
            s.close()
            raise FabricError(f"refusing to listen on {address}: a fabric broker runs any code it is sent, so "
                              f"without a keys directory given on purpose it listens on loopback or ipc:// only. "
                              f"Make keys with `fabric keys init DIR` and set FABRIC_KEYS=DIR (or `fabric start --keys DIR`)")
        security.curve_server(s, address)  # CURVE on tcp:// (default keys) or with FABRIC_KEYS; docs/security.md
        s.bind(address)
        self.started = self.no_executor_since = time.monotonic()
        # drivers that see a new epoch re-send what they wait for
        st = self.st = Tables(os.urandom(8).hex())
        out = self.out = Outbox(s)                  # what this loop turn sends, batched per peer
        self.drivers = Drivers(out, st.epoch)
        ad = self.admission = Admission(st, out, self.drivers, self.refuse)
        oc = self.outcomes = Outcomes(st, out, self.drivers)
        ins = self.instances = Instances(st, out, self.drivers)
        wk = self.workers = Workers(st, out)
        sc = self.sched = Scheduler(st, out)
        gg = self.gangs = Gangs(st, out)
        ex = self.executors = Executors(st, out, wk, sc)
        self.arenas = Arenas(st, out, self.drivers)
        ad.wire(outcomes=oc, instances=ins, gangs=gg)
        oc.wire(admission=ad, workers=wk, instances=ins, gangs=gg)
        wk.wire(admission=ad, outcomes=oc, sched=sc, instances=ins, gangs=gg)
        sc.wire(workers=wk, outcomes=oc, instances=ins, gangs=gg)
        ins.wire(admission=ad, outcomes=oc, sched=sc, workers=wk)
        gg.wire(outcomes=oc, sched=sc, workers=wk)
        self.running = True
        self.refused = 0
        self._handlers = {
            P.HELLO: self.on_hello, P.SUBMIT: ad.on_submit, P.BATCH: ad.on_batch, P.CANCEL: oc.on_cancel,
            P.RELEASE: oc.on_release, P.FETCH: oc.on_fetch, P.PUT: oc.on_put, P.KILL_ACTOR: ins.on_kill_actor,
            P.BYE: self.on_bye, P.STATUS: self.on_status, P.NAME: ins.on_name, P.SHUTDOWN: self.on_shutdown,
            P.EXEC_HELLO: ex.on_exec_hello, P.HEARTBEAT: self.on_heartbeat,
            P.WORKER_DIED: ex.on_worker_died, P.EXEC_BYE: ex.on_exec_bye,
            P.BLOCKED: wk.on_blocked, P.UNBLOCKED: wk.on_unblocked,
            P.READY: wk.on_ready, P.DONE: wk.on_done, P.ITEM: wk.on_item, P.CONSUMED: wk.on_consumed,
            P.WLOG: wk.on_wlog, P.DROPPED: oc.on_dropped, P.ARENA: self.arenas.on_arena,
        }
        # which identity prefixes may send which commands
        self._allowed = {
            ord("d"): {P.HELLO, P.SUBMIT, P.BATCH, P.CANCEL, P.CONSUMED, P.RELEASE, P.FETCH, P.PUT, P.KILL_ACTOR,
                       P.BYE, P.STATUS, P.SHUTDOWN, P.HEARTBEAT, P.ARENA},
            ord("r"): {P.HELLO},
            ord("c"): {P.HELLO, P.STATUS, P.SHUTDOWN, P.NAME},
            ord("e"): {P.EXEC_HELLO, P.HEARTBEAT, P.WORKER_DIED, P.EXEC_BYE},
            ord("w"): {P.READY, P.DONE, P.ITEM, P.WLOG, P.BLOCKED, P.UNBLOCKED},
            ord("l"): {P.WLOG, P.DROPPED},
        }
        if journal:
            self.restore(journal)
        log.info("listening on %s (pid %d)", address, os.getpid())

    @property
    def calls(self):
        """Calls without an outcome yet (for tools and tests; the parts use ``st``)."""
        return self.st.calls

    @property
    def results(self):
        """Outcomes kept until their driver releases them."""
        return self.st.results

    # ---------------------------------------------------------------- journal
    def restore(self, path):
        """Replay the journal at ``path`` (journal.restore), then keep writing it, compacted."""
        n = replay_journal(path, self.st, self.out, self.drivers, self.admission, self.outcomes, self.instances)
        self.st.journal = Journal(path)
        self.compact()
        if n:
            log.warning("journal %s: restored %d records: %d calls to run, %d outcomes kept, %d drivers "
                        "expected back within %gs", path, n, len(self.st.calls), len(self.st.results),
                        len(self.drivers), DRIVER_TIMEOUT)

    def compact(self):
        """Rewrite the journal as the live state only."""
        self.st.journal.rewrite(live_records(self.st))
        self.journal_limit = max(COMPACT_BYTES, 2 * self.st.journal.size)

    # ---------------------------------------------------------------- loop
    def serve(self):
        sock = self.sock
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        next_tick = 0.0
        try:
            while self.running:
                # wake for the next tick too: woken only by messages, the tick would run just
                # after each dispatch, when the workers have just been given calls, and never
                # find an idle worker to hand a driver's arena to (arenas.share)
                timeout = max(0, min(1000, int((next_tick - time.monotonic()) * 1000) + 1))
                if self.st.timeouts:
                    timeout = max(0, min(timeout, int((self.st.timeouts[0][0] - time.monotonic()) * 1000) + 1))
                if poller.poll(timeout):
                    # drain a batch, then schedule once for all of it
                    for frames in P.recv_batch(sock, 2000):
                        self.handle(frames)
                self.sched.dispatch()
                now = time.monotonic()
                if self.st.timeouts and self.st.timeouts[0][0] <= now:
                    self.expire(now)
                if now >= next_tick:
                    next_tick = now + 0.5
                    self.tick(now)
                self.flush()
        except Exception:
            log.exception("the broker loop failed")
            raise
        finally:
            self.close()

    def close(self):
        self.flush()
        if self.st.journal is not None:
            self.st.journal.close()
            if not self.running:  # a requested shutdown: nothing is owed to anyone any more
                try:
                    os.unlink(self.st.journal.path)
                except OSError:
                    pass
        if not self.running:  # a requested stop; a crashed broker is restarted and they rejoin it
            for ex in list(self.st.executors.values()):
                self.out.send([ex.ident, P.C[P.EXEC_SHUTDOWN]])
        self.sock.close(linger=200)
        if self.address.startswith("ipc://"):
            try:
                os.unlink(self.address[6:])
                if os.path.basename(os.path.dirname(self.address[6:])).startswith("fabric-"):
                    os.rmdir(os.path.dirname(self.address[6:]))  # the embedded cluster's own folder
            except OSError:
                pass
        if self.parent_pid:  # an embedded cluster outlives a killed driver: sweep its shared memory
            config.remove_shm(self.parent_pid)
        log.info("stopped")

    def handle(self, frames):
        ident = frames[0].bytes
        try:
            if len(frames) < 2:
                raise ProtocolError("empty message")
            f0 = frames[1].bytes
            c = P.command_of(f0)
            if c not in self._allowed.get(ident[0] if ident else -1, ()):
                raise ProtocolError(f"command {P.NAMES[c]} is not accepted from this peer")
            self._handlers[c](ident, f0[4:], frames[2:])
        except ProtocolError as e:
            self.refuse(ident, str(e))
        except Exception as e:  # noqa: BLE001 - nothing a peer sends may stop the broker
            # (json nested too deep, numbers that overflow, fields of the wrong type, ...)
            self.refuse(ident, f"malformed message: {type(e).__name__}: {str(e)[:200]}")

    def refuse(self, ident, why):
        self.st.stats["refused"] += 1
        self.refused += 1
        if self.refused <= 100 or self.refused % 1000 == 0:
            log.warning("refused a message from %s: %s (%d refused so far)", ident.hex() or "?", why, self.refused)
        if ident[:1] == b"d":
            self.out.send([b"r" + ident[1:], P.C[P.ERROR], why.encode()])
        elif ident[:1] in (b"c", b"r", b"e", b"w"):
            self.out.send([ident, P.C[P.ERROR], why.encode()])

    def flush(self):
        """Send what this loop turn produced: one message per peer, batched when several."""
        if self.st.journal is not None:  # first on disk, then on the wire
            self.st.journal.flush()
        self.out.flush(self.unreachable_worker, self.undelivered)

    def unreachable_worker(self, w, ids):
        if w.ident in self.st.workers:
            self.workers.unreachable(w, ids)

    def undelivered(self, driver, ids):
        """RESULTs for ``driver`` could not be sent: they stay kept until it asks again."""
        self.st.unsent.update(ids)
        self.drivers.undelivered(driver[1:])

    def on_hello(self, ident, head, f):
        info = P.loads_json(f[0].bytes) if f else {}
        if ident[:1] in b"dr":
            if len(ident) != 9:
                raise ProtocolError("driver ids are 8 bytes")
            self.drivers.hello(ident[1:], info)
        self.out.send([ident, P.C[P.WELCOME], self.drivers.welcome()])

    def on_heartbeat(self, ident, head, f):
        if ident[:1] == b"d":
            return self.drivers.heartbeat(ident[1:], f)
        self.executors.heartbeat(ident)

    def on_status(self, ident, head, f):
        now = time.monotonic()
        exs = []
        for ex in self.st.executors.values():
            r = ex.ledger
            exs.append({
                "id": ex.id.hex(), "host": ex.host, "cpus": r.cpus, "free_cpus": round(r.free_cpus, 3),
                "gpus": r.gpus, "free_gpus": r.free_gpus, "memory": r.memory, "free_memory": r.free_mem,
                "gpu_free": {str(d): round(c, 6) for d, c in r.gpu_free.items()},
                "workers": len(ex.workers), "busy": sum(1 for w in ex.workers.values() if w.inflight),
                "instances": sum(1 for w in ex.workers.values() if w.actor is not None),
                "last_seen_s": round(now - ex.last_seen, 2), "labels": ex.info.get("labels", {}),
            })

        def row(s, depth):  # one shape's demand
            return {"cpus": s[0], "gpus": s[1], "memory": s[2], "depth": depth}

        demand = {s: row(s, sum(1 for c in q if c.state == QUEUED)) for s, q in self.st.queues.items()}
        for a in self.st.pending_actors:  # an instance waiting for a place is demand for its shape too
            d = demand.setdefault(a.shape, row(a.shape, 0))
            d["depth"] += 1
            d["instances"] = d.get("instances", 0) + 1
        queues = list(demand.values())
        for g in self.st.gang_queue:  # a waiting gang is demand for all of its members
            if g.state == QUEUED:
                queues.append({**row(g.shape, len(g.members)), "gang": g.id.hex()})
        st = {"address": self.address, "pid": os.getpid(), "uptime_s": round(now - self.started, 1),
              "executors": exs, "queues": queues, "drivers": len(self.drivers),
              "calls_pending": len(self.st.calls), "results_held": len(self.st.results),
              "instances": len(self.st.actors), "stats": self.st.stats, "functions": self.admission.fn_status(),
              "named": [{"name": k[1], "namespace": k[0], "actor": e["actor"].hex(), "class": e["class"],
                         "detached": e["detached"], "alive": e["actor"] in self.st.actors}
                        for k, e in self.st.names.items()],
              "gangs": [{"id": g.id.hex(), "size": len(g.members), "cpus": g.shape[0], "gpus": g.shape[1],
                         "memory": g.shape[2], "retries_left": g.retries,
                         "state": ("waiting", "queued", "starting", "running", "done")[g.state]}
                        for g in self.st.gangs.values()]}
        self.out.send([ident if ident[:1] != b"d" else b"r" + ident[1:], P.C[P.STATUS_REPLY], P.dumps_json(st)])

    def on_shutdown(self, ident, head, f):
        log.info("shutdown requested by %s", ident.hex())
        self.running = False

    def on_bye(self, ident, head, f):
        self.driver_left(ident[1:])

    def driver_left(self, did):
        """A driver said BYE, or was silent too long: its calls and instances end (named
        detached instances excepted), its kept outcomes are dropped."""
        self.drivers.leave(did)
        self.arenas.forget(did)
        rid = b"r" + did
        for call in [c for c in self.st.calls.values() if c.driver == rid
                     and not (c.kind == P.ACTOR_NEW and self.st.actor_names and self.instances.detached(c.actor))]:
            w = call.worker
            if call.state == RUNNING and w.actor is None:
                if next(iter(w.inflight)) != call.id:  # only prefetched: its worker drops it unless
                    if call.id not in self.st.dropping:  # it started it (one DROP per copy sent)
                        self.out.send([b"l" + w.ident[1:], P.C[P.DROP], call.id])
                elif w.gang is None:  # it may run this call: if so it ends itself
                    self.workers.stop_call(w, call, P.CANCELLED, b"driver left", deliver=False)
                    continue
                else:
                    self.workers.kill_worker(w)
            self.outcomes.finish(call, P.CANCELLED, b"driver left", deliver=False)
        for a in [a for a in self.st.actors.values() if a.driver == rid and not self.instances.detached(a.id)]:
            self.instances.kill_actor(a, b"its driver left")
        if self.st.warm_gang:
            self.gangs.expire_warm(0.0, driver=rid)
        for h, fn in list(self.st.fns.items()):  # min_warm holds while a driver that uses it is here
            fn.drivers.discard(did)
            if not fn.drivers and not fn.running and not fn.capped:
                del self.st.fns[h]
        gone = [k for k in self.st.results if k[:8] == did]
        for cid in gone:
            del self.st.results[cid]
        self.st.unsent.difference_update(gone)
        if self.st.journal is not None:
            self.st.journal.forget(gone)

    def expire(self, now):
        while self.st.timeouts and self.st.timeouts[0][0] <= now:
            _, _, call = heapq.heappop(self.st.timeouts)
            if call.state != RUNNING or call.started + call.timeout > now + 1e-3:
                continue
            w = call.worker
            if w.actor is None:
                msg = f"the call ran longer than its timeout of {call.timeout:g}s; its worker was killed and replaced"
                if w.gang is None:
                    self.workers.stop_call(w, call, P.TIMEOUT, msg.encode())
                else:
                    self.outcomes.finish(call, P.TIMEOUT, msg.encode())
                    self.workers.kill_worker(w)
            else:
                # the caller gets its answer now; the call keeps its slot until the instance is
                # done with it, so the next call's clock starts when that one really starts
                self.outcomes.finish(call, P.TIMEOUT, f"the call ran longer than its timeout of {call.timeout:g}s; the "
                                                      f"instance keeps running it (its state is kept)".encode(),
                                     keep_slot=True)

    def tick(self, now):
        if self.st.fns:
            self.admission.keep_warm()
        if self.arenas:  # workers that became idle since: map the drivers' arenas ahead
            self.arenas.share()
        if self.st.journal is not None and self.st.journal.size > self.journal_limit:
            self.compact()
        self.executors.expire(now)
        if self.st.stopping:
            self.workers.expire_stops(now)
        if self.st.gang_queue:
            self.st.gang_queue = deque(g for g in self.st.gang_queue if g.state == QUEUED)
        if self.st.warm_gang:
            self.gangs.expire_warm(now)
        if self.st.executors or not (any(self.st.queues.values()) or self.st.pending_actors or self.st.gang_queue):
            self.no_executor_since = now  # the grace counts from when calls began to wait with no executor
        elif now - self.no_executor_since > NO_EXECUTOR_GRACE:
            msg = f"no executor joined this cluster within {NO_EXECUTOR_GRACE:g}s".encode()
            for q in self.st.queues.values():
                while q:
                    c = q.popleft()
                    if c.state == QUEUED:
                        self.outcomes.finish(c, P.UNSCHEDULABLE, msg)
            for a in list(self.st.pending_actors):
                self.instances.kill_actor(a, msg, status=P.UNSCHEDULABLE)
            self.st.pending_actors.clear()
            for g in list(self.st.gang_queue):
                self.outcomes.finish(g.members[0], P.UNSCHEDULABLE, msg)  # and its other members with it
            self.st.gang_queue.clear()
        for shape in [s for s, q in self.st.queues.items() if not q]:
            del self.st.queues[shape]  # shapes come from callers: keep only those with calls waiting
        if self.st.executors:
            for shape, q in list(self.st.queues.items()):
                why = q and self.admission.unschedulable(shape)
                if why:
                    while q:
                        c = q.popleft()
                        if c.state == QUEUED:
                            self.outcomes.finish(c, P.UNSCHEDULABLE, why.encode())
            for g in list(self.st.gang_queue):  # an executor left: some gangs may never fit now
                why = g.state == QUEUED and self.gangs.gang_unschedulable(g)
                if why:
                    self.outcomes.finish(g.members[0], P.UNSCHEDULABLE, why.encode())
        for did, d in self.drivers.silent(now):
            log.warning("driver %s (pid %s on %s) silent for %.0fs: cancelling its calls and instances",
                        did.hex(), d.pid, d.host, now - d.seen)
            self.driver_left(did)
            d.sweep_shm()
        if self.parent_pid and not config.pid_alive(self.parent_pid):
            log.info("parent process %d is gone; stopping", self.parent_pid)
            self.running = False
