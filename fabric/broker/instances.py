"""Instances (``@fabric.cls`` objects): one dedicated worker each, and a FIFO of their calls.

An instance is placed on the first executor that fits it and gets a spawned worker; its calls
are streamed to that worker in submission order, up to ``ACTOR_PIPELINE`` ahead. It ends when
its driver releases it, kills it, or leaves (named detached instances outlive their driver),
and every later call gets the same failure. With ``max_restarts`` a dead worker's instance is
built again from its original arguments. Names (NAME) are kept here as well.
"""
from __future__ import annotations

import copy
import logging
import time

from .. import protocol as P
from ..errors import ProtocolError
from . import placement
from .state import DONE, QUEUED, Actor

log = logging.getLogger("fabric.broker")


class Instances:
    """Shares the broker's tables (``st``, state.Tables) and its outbox (``out``); calls
    admission, outcomes, sched, workers (admission.py, outcomes.py, scheduler.py, workers.py)."""

    def __init__(self, st, out, drivers):
        self.st = st
        self.out = out
        self.drivers = drivers

    def wire(self, admission, outcomes, sched, workers):
        """The other parts it calls (built after it: they call it too)."""
        self.admission, self.outcomes, self.sched, self.workers = admission, outcomes, sched, workers

    def new_actor(self, call):
        a = Actor(call.actor, call.driver, call.shape)
        self.st.actors[a.id] = a
        if call.retries:  # an ACTOR_NEW's retries are its class's max_restarts
            self.st.restarts[a.id] = [call.retries, call, call.retries]
        a.queue.append(call)
        why = self.admission.unschedulable(a.shape)
        if why:
            return self.kill_actor(a, why.encode(), status=P.UNSCHEDULABLE)
        if call.maxc or call.warm:  # a registered class counts its live (and warm) instances
            fn = a.fn = self.st.fns[call.code_hash]
            if call.maxc and fn.running >= call.maxc:  # max_containers: the next waits for one to end
                fn.capped.append(a)
                return
            fn.running += 1
        if not self.place_actor(a):
            self.st.pending_actors.append(a)

    def place_actor(self, a):
        ex = placement.first_fit(self.st.executors.values(), a.shape)
        if ex is None:
            return False
        a.ex = ex
        a.devices = self.sched.reserve(ex, a.shape)
        self.sched.spawn(ex, a.devices, None, a)
        return True

    def actor_call(self, call):
        a = self.st.actors.get(call.actor)
        if a is None:
            failure = self.st.dead_actors.get(call.actor)
            if failure is not None:
                return self.outcomes.finish_copy(call, failure)
            return self.outcomes.finish(call, P.ACTOR_DIED, b"no such instance (it was killed or never created)")
        if a.failure is not None:
            return self.outcomes.finish_copy(call, a.failure)
        a.queue.append(call)
        if call.missing == 0:
            call.state = QUEUED
        self.pump_actor(a)

    def pump_actor(self, a):
        w = a.worker
        if w is None:
            return
        q = a.queue
        while q and len(w.inflight) < w.credit:
            c = q[0]
            if c.state == DONE:
                q.popleft()
                continue
            if c.missing:
                break  # submission order: later calls wait for this one's arguments
            q.popleft()
            self.sched.run_on(w, c)
        if a.release_when_idle and not q and not w.inflight:
            self.kill_actor(a, b"released")

    def restart_actor(self, a, calls, why):
        """max_restarts: the instance's worker died; build it again on a new worker (its
        ``__init__`` and ``@enter`` run anew, from its original arguments). The calls it had been
        sent run again on the new instance while they have retries (max_task_retries), in their
        order, else fail with ``ActorDied``; calls not sent yet wait for it."""
        r = self.st.restarts[a.id]
        r[0] -= 1
        k = r[2] - r[0]
        log.warning("instance %s died (%s): restarting it (%d of %d)", a.id.hex(), why, k, r[2])
        msg = (f"the instance's process died ({why}); it is being restarted ({k} of {r[2]}), and this "
               f"call's retries (max_task_retries) are spent").encode()
        again = []
        for c in calls:
            if c.state == DONE or c.kind == P.ACTOR_NEW:
                continue  # (a constructor cut off is run again below)
            c.retries -= 1
            if c.retries < 0:
                self.outcomes.finish(c, P.ACTOR_DIED, msg)
            else:
                c.state, c.worker, c.started = QUEUED, None, 0.0
                again.append(c)
        ctor = r[1]  # the ACTOR_NEW once more: same id, header, code, arguments
        if ctor.state == DONE:  # (its outcome was given: this run's is not sent to anyone)
            ctor = copy.copy(ctor)
            ctor.driver = b""
        ctor.state, ctor.worker, ctor.started = QUEUED, None, 0.0
        a.queue.extendleft(reversed([ctor] + again))
        a.ex, a.devices = None, ()
        if not self.place_actor(a):
            self.st.pending_actors.append(a)

    def on_kill_actor(self, ident, head, f):
        a = self.st.actors.get(f[0].bytes)
        if a is None or (a.driver[1:] != ident[1:] and not (a.id in self.st.actor_names and f[1].bytes == b"1")):
            return  # the creator's, or fabric.kill() of a named instance by any driver
        if f[1].bytes == b"1":
            self.kill_actor(a, b"killed by fabric.kill()")
        else:
            a.release_when_idle = True
            if a.worker is not None:
                self.pump_actor(a)
            elif not a.queue:
                self.kill_actor(a, b"released")

    def kill_actor(self, a, msg, failure=None, status=P.ACTOR_DIED):
        """End an instance: its queued calls and every later call get ``failure`` or ``msg``."""
        if a is None:
            return
        if failure is None:
            failure = [status, P.pack_result(P.NO_ID, status), msg or b"instance is gone"]
        a.failure = failure
        for c in list(a.queue):
            if c.state != DONE:
                self.outcomes.finish_copy(c, failure)
        a.queue.clear()
        w = a.worker
        if w is not None:
            for c in list(w.inflight.values()):
                self.outcomes.finish_copy(c, failure)
            w.inflight.clear()
            self.workers.kill_worker(w)
            a.worker = None
        elif a.ex is not None:
            for tok, sp in list(self.st.spawns.items()):
                if sp[2] is a:
                    del self.st.spawns[tok]
                    sp[0].ledger.give(a.shape, sp[1])
        self.st.actors.pop(a.id, None)
        if self.st.actor_names:
            self.st.names.pop(self.st.actor_names.pop(a.id, None), None)  # its name is free again
        if self.st.restarts:
            self.st.restarts.pop(a.id, None)
        fn, a.fn = a.fn, None
        if fn is not None:  # its class has max_containers or min_warm
            if a in fn.capped:
                fn.capped.remove(a)  # it was still waiting for a place
            else:
                fn.running -= 1
                while fn.capped:  # its place goes to the next instance waiting for one
                    nxt = fn.capped.popleft()
                    if nxt.id in self.st.actors:
                        fn.running += 1
                        if not self.place_actor(nxt):
                            self.st.pending_actors.append(nxt)
                        break
        self.st.dead_actors[a.id] = failure  # later calls get the same answer
        if len(self.st.dead_actors) > 10000:
            self.st.dead_actors.popitem(last=False)

    def detached(self, aid):
        key = self.st.actor_names.get(aid)
        return key is not None and self.st.names[key]["detached"]

    def on_name(self, ident, head, f):
        """NAME [json] from a control client: ``{"op": "register", "name", "namespace", "actor",
        "driver", "class", "streams", "calls", "detached", "get_if_exists"}`` reserves a name for an
        instance its driver is about to create (or, with get_if_exists, answers the instance
        that has it); ``{"op": "lookup", "name", "namespace"}`` finds one. The answer is a
        NAME_REPLY: the instance (``actor``, ``class``, ``streams``, ``calls``, ``created``) or ``error``."""
        req = P.loads_json(f[0].bytes) if f else {}
        name, ns = req.get("name"), req.get("namespace") or "default"
        if not isinstance(name, str) or not 0 < len(name) <= 200 or not isinstance(ns, str) or len(ns) > 200:
            raise ProtocolError("NAME needs a name and a namespace of 1 to 200 characters")
        key = (ns, name)
        e = self.st.names.get(key)
        if e is not None and e["actor"] not in self.st.actors and (
                e["actor"] in self.st.dead_actors or time.monotonic() - e["since"] > 60):
            del self.st.names[key]  # its instance ended, or was never created
            self.st.actor_names.pop(e["actor"], None)
            e = None
        where = f"{name!r}" + ("" if ns == "default" else f" in namespace {ns!r}")
        if req.get("op") == "lookup":
            reply = ({"error": f"no instance named {where} is alive on this cluster"} if e is None else
                     {"actor": e["actor"].hex(), "class": e["class"], "streams": e["streams"], "calls": e["calls"],
                      "created": False})
        elif req.get("op") == "register":
            aid, driver = bytes.fromhex(str(req.get("actor"))), bytes.fromhex(str(req.get("driver")))
            streams = req.get("streams") or []
            if len(aid) != 16 or aid[:8] != driver or driver not in self.drivers:
                raise ProtocolError("NAME register needs the instance id of a connected driver")
            if not isinstance(streams, list) or not all(isinstance(s, str) for s in streams):
                raise ProtocolError("NAME streams must be a list of method names")
            calls = req.get("calls") or {}
            returns = (calls.get("returns") or {}) if isinstance(calls, dict) else None
            if not isinstance(calls, dict) or len(calls) > 10 or not isinstance(returns, dict) or len(returns) > 1000:
                raise ProtocolError("NAME calls must be an object of the class's per-call options")
            if e is None:
                self.st.names[key] = e = {"actor": aid, "class": str(req.get("class", "?"))[:200], "streams": streams[:1000],
                                          "calls": calls, "detached": bool(req.get("detached")),
                                          "since": time.monotonic()}
                self.st.actor_names[aid] = key
                reply = {"actor": aid.hex(), "class": e["class"], "streams": e["streams"], "calls": e["calls"],
                         "created": True}
            elif req.get("get_if_exists"):
                reply = {"actor": e["actor"].hex(), "class": e["class"], "streams": e["streams"], "calls": e["calls"],
                         "created": False}
            else:
                reply = {"error": f"an instance named {where} exists already (of class {e['class']}); names are "
                                  f"unique: pick another, or pass get_if_exists=True to get that one"}
        else:
            raise ProtocolError("NAME op must be register or lookup")
        self.out.send([ident, P.C[P.NAME_REPLY], P.dumps_json(reply)])
