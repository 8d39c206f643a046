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

Modules: this one is the loop and the handlers; ``state.py`` holds the records (Call,
Executor, Worker, Actor, Gang, FnInfo), ``gangs.py`` gang scheduling (mixed into Broker), and
``journal.py`` the journal's file format (replayed by ``Broker.restore``).

Outcomes: a call's result is sent to its driver and kept here until the driver releases it,
so a dependent call submitted meanwhile still finds it without a round trip through the
driver. Each call id gets at most one outcome; a worker's death retries its running call up
to ``retries`` and requeues the calls it had prefetched without charging them.
"""
from __future__ import annotations

import copy
import hashlib
import heapq
import itertools
import logging
import os
import time
from collections import OrderedDict, deque

import zmq

from .. import protocol as P
from .. import config
from .. import security
from .. import settings
from .gangs import GangScheduling
from .drivers import DRIVER_TIMEOUT, Drivers
from .journal import COMPACT_BYTES
from .outbox import Outbox
from . import placement
from .state import (DONE, QUEUED, RUNNING, SPAWNING, Actor, Call, Executor, FnInfo,
                    Gang, Worker)

from ..errors import FabricError, ProtocolError
from ..serde import shm  # only to remove a dead driver's shared memory: it holds no pickler

log = logging.getLogger("fabric.broker")

_S = settings.get()
HEARTBEAT_TIMEOUT = _S.heartbeat_timeout
NO_EXECUTOR_GRACE = _S.no_executor_grace
ACTOR_PIPELINE = _S.actor_pipeline
# the most calls the broker holds for all drivers together; beyond it, submits are refused (each
# driver also slows itself at FABRIC_MAX_PENDING, so only many drivers at once reach this)
MAX_CALLS = _S.max_calls
# self.dropping's mark for a call prefetched behind one that BLOCKED: DROP sent to take it back
TAKE_BACK = tuple([None, None, False])
DEP_ASKS = 4  # rejoins asked for one missing Future argument before a call needing it is refused

class _NeedCode(Exception):
    """A SUBMIT names code, or a Future argument of its own driver, that this broker does not
    hold: they went to a broker before a restart (or were lost with it). Its driver re-sends
    both, in order, when asked to rejoin."""

    def __init__(self, deps=()):
        self.deps = deps


class Broker(GangScheduling):
    def __init__(self, address: str, parent_pid: int = 0, ctx: zmq.Context | None = None,
                 journal: str | None = None):
        self.address = address
        self.parent_pid = parent_pid
        self.epoch = os.urandom(8).hex()  # drivers that see a new epoch re-send what they wait for
        self.journal = None
        self.restoring = False
        self.unsent: set[bytes] = set()  # kept outcomes this broker has not delivered (restored, or unreachable)
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
        self.out = Outbox(s)                        # what this loop turn sends, batched per peer
        self.drivers = Drivers(self.out, self.epoch)
        self.executors: dict[bytes, Executor] = {}  # executor identity -> Executor
        self.workers: dict[bytes, Worker] = {}
        self.idle: dict[Worker, None] = {}          # pool workers with nothing in flight
        self.partial: dict[Worker, None] = {}       # pool workers that may take a prefetch
        self.queues: dict[tuple, deque] = {}        # shape -> ready calls
        self.calls: dict[bytes, Call] = {}          # every call without an outcome yet
        self.results: dict[bytes, list] = {}        # outcome frames kept until RELEASE
        self.waiters: dict[bytes, list] = {}        # dep id -> calls waiting for it
        self.fetchers: dict[bytes, list] = {}       # call id -> r sockets that FETCHed its outcome
        self.actors: dict[bytes, Actor] = {}
        self.pending_actors: deque[Actor] = deque()
        self.gangs: dict[bytes, Gang] = {}          # gangs without an outcome yet, by rank 0's call id
        self.names: dict[tuple, dict] = {}          # (namespace, name) -> a named instance (NAME)
        self.actor_names: dict[bytes, tuple] = {}   # instance id -> its (namespace, name)
        self.restarts: dict[bytes, list] = {}       # instance id -> [restarts left, its ACTOR_NEW, max_restarts]
        self.gang_queue: deque[Gang] = deque()      # gangs ready to start, FIFO
        self.warm_gang: dict[tuple, list] = {}      # (driver, executor, shape) -> workers kept (min_warm)
        self.dead_actors: OrderedDict[bytes, list] = OrderedDict()  # id -> the failure its calls get
        self.spawns: dict[str, tuple] = {}          # spawn token -> (executor, devices, call|actor)
        self.code: dict[bytes, object] = {}         # code hash -> code frame
        self.avg_duration: dict[bytes, float] = {}  # code hash -> moving average of run time
        # per function/class options (min_warm, max_containers): code hash -> FnInfo; only for
        # code whose calls set one of them, so plain calls pay nothing
        self.fns: dict[bytes, FnInfo] = {}
        self.timeouts: list = []                    # heap of (deadline, seq, call)
        # cancelled calls whose worker was sent DROP: id -> (force, recursive, it answered "running")
        self.dropping: dict[bytes, tuple] = {}
        self.blocked = 0                            # workers whose call waits on its own calls (BLOCKED)
        self._seq = itertools.count()
        self.running = True
        self.refused = 0
        self.stats = {"submitted": 0, "completed": 0, "retried": 0, "refused": 0, "dropped": 0,
                      "drop_too_late": 0}
        self._tokens = itertools.count(1)
        self._handlers = {
            P.HELLO: self.on_hello, P.SUBMIT: self.on_submit, P.BATCH: self.on_batch, P.CANCEL: self.on_cancel,
            P.RELEASE: self.on_release, P.FETCH: self.on_fetch, P.PUT: self.on_put, P.KILL_ACTOR: self.on_kill_actor,
            P.BYE: self.on_bye, P.STATUS: self.on_status, P.NAME: self.on_name, P.SHUTDOWN: self.on_shutdown,
            P.EXEC_HELLO: self.on_exec_hello, P.HEARTBEAT: self.on_heartbeat,
            P.WORKER_DIED: self.on_worker_died, P.EXEC_BYE: self.on_exec_bye,
            P.BLOCKED: self.on_blocked, P.UNBLOCKED: self.on_unblocked,
            P.READY: self.on_ready, P.DONE: self.on_done, P.ITEM: self.on_item, P.CONSUMED: self.on_consumed, P.WLOG: self.on_wlog, P.DROPPED: self.on_dropped,
        }
        # which identity prefixes may send which commands
        self._allowed = {
            ord("d"): {P.HELLO, P.SUBMIT, P.BATCH, P.CANCEL, P.CONSUMED, P.RELEASE, P.FETCH, P.PUT, P.KILL_ACTOR,
                       P.BYE, P.STATUS, P.SHUTDOWN, P.HEARTBEAT},
            ord("r"): {P.HELLO},
            ord("c"): {P.HELLO, P.STATUS, P.SHUTDOWN, P.NAME},
            ord("e"): {P.EXEC_HELLO, P.HEARTBEAT, P.WORKER_DIED, P.EXEC_BYE},
            ord("w"): {P.READY, P.DONE, P.ITEM, P.WLOG, P.BLOCKED, P.UNBLOCKED},
            ord("l"): {P.WLOG, P.DROPPED},
        }
        if journal:
            self.restore(journal)
        log.info("listening on %s (pid %d)", address, os.getpid())

    # ---------------------------------------------------------------- journal
    def restore(self, path):
        """Replay the journal at ``path`` through this broker's own handlers, then keep writing it.

        Calls without an outcome are queued again (one that was running when the old broker
        died runs again: execution is at-least-once, delivery of its outcome at-most-once per
        driver). Outcomes not yet released are kept and re-sent when their driver rejoins and
        asks. Instances cannot be replayed (their state lived in a worker): they end with
        ACTOR_DIED saying so.
        """
        from .journal import Journal, read

        n, self.restoring = 0, True
        try:
            for kind, fr in read(path):
                n += 1
                try:
                    self.replay(kind, fr)
                except Exception as e:  # noqa: BLE001 - one bad record must not lose the rest
                    log.warning("journal %s: skipped record %d (kind %d): %s: %s", path, n, kind,
                                type(e).__name__, e)
            msg = (b"the broker restarted and an instance's state lives only in its worker: this instance "
                   b"is gone; create a new one")
            for a in list(self.actors.values()):
                self.kill_actor(a, msg)
            self.pending_actors.clear()
        finally:
            self.restoring = False
            self.out.clear()
        self.unsent = set(self.results)  # none of these reached its driver from this broker
        self.journal = Journal(path)
        self.compact()
        if n:
            log.warning("journal %s: restored %d records: %d calls to run, %d outcomes kept, %d drivers "
                        "expected back within %gs", path, n, len(self.calls), len(self.results),
                        len(self.drivers), DRIVER_TIMEOUT)

    def replay(self, kind, fr):
        """Apply one journal record."""
        from .journal import CALL, CODE, FORGET, OUTCOME

        if kind == CODE:
            self.code[fr[0]] = fr[1]
        elif kind == CALL:
            h = P.unpack_call(fr[0])
            cid = h[0]
            if cid in self.calls or cid in self.results:
                return
            if h[2] != P.ACTOR_CALL and h[1] not in self.code:
                return  # its code was lost: its driver re-sends the call, with code, when it rejoins
            self.drivers.restored(cid[:8])
            self.admit(Call(cid, b"r" + cid[:8], fr, h), P.split_ids(fr[1]) if fr[1] else None)
        elif kind == OUTCOME:
            cid, status, frames = fr[0], fr[1][0], fr[2:]
            call = self.calls.get(cid)
            if call is not None:
                self.finish(call, status, None, frames)
            else:
                self.results[cid] = [status, *frames]
        elif kind == FORGET:
            for cid in P.split_ids(fr[0]):
                self.results.pop(cid, None)
                call = self.calls.get(cid)
                if call is not None:
                    self.finish(call, P.CANCELLED, b"", deliver=False)

    def compact(self):
        """Rewrite the journal as the live state only."""
        from .journal import CALL, CODE, FORGET, OUTCOME

        def records():
            for h, code in self.code.items():  # all of it: drivers send each function's code once
                yield CODE, [h, code]
            extra = []
            for cid, r in self.results.items():
                yield OUTCOME, [cid, bytes([r[0]]), *r[1:]]
            for c in self.calls.values():
                for dep, r in (c.depv or {}).items():  # resolved deps whose results were released
                    if dep not in self.results:
                        extra.append(dep)
                        yield OUTCOME, [dep, bytes([r[0]]), *r[1:]]
            for c in self.calls.values():
                if c.kind not in (P.ACTOR_CALL, P.GANG):  # gangs are not journaled: drivers re-send them
                    yield CALL, c.frames
            if extra:
                yield FORGET, [b"".join(extra)]

        self.journal.rewrite(records())
        self.journal_limit = max(COMPACT_BYTES, 2 * self.journal.size)

    # ---------------------------------------------------------------- loop
    def serve(self):
        sock = self.sock
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        next_tick = 0.0
        try:
            while self.running:
                timeout = 1000
                if self.timeouts:
                    timeout = max(0, min(timeout, int((self.timeouts[0][0] - time.monotonic()) * 1000) + 1))
                if poller.poll(timeout):
                    # drain a batch, then schedule once for all of it
                    for frames in P.recv_batch(sock, 2000):
                        self.handle(frames)
                self.dispatch()
                now = time.monotonic()
                if self.timeouts and self.timeouts[0][0] <= now:
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
        if self.journal is not None:
            self.journal.close()
            if not self.running:  # a requested shutdown: nothing is owed to anyone any more
                try:
                    os.unlink(self.journal.path)
                except OSError:
                    pass
        if not self.running:  # a requested stop; a crashed broker is restarted and they rejoin it
            for ex in list(self.executors.values()):
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
            shm.remove_shm(self.parent_pid)
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
        self.stats["refused"] += 1
        self.refused += 1
        if self.refused <= 100 or self.refused % 1000 == 0:
            log.warning("refused a message from %s: %s (%d refused so far)", ident.hex() or "?", why, self.refused)
        if ident[:1] == b"d":
            self.out.send([b"r" + ident[1:], P.C[P.ERROR], why.encode()])
        elif ident[:1] in (b"c", b"r", b"e", b"w"):
            self.out.send([ident, P.C[P.ERROR], why.encode()])

    # ---------------------------------------------------------------- drivers
    def on_hello(self, ident, head, f):
        info = P.loads_json(f[0].bytes) if f else {}
        if ident[:1] in b"dr":
            if len(ident) != 9:
                raise ProtocolError("driver ids are 8 bytes")
            self.drivers.hello(ident[1:], info)
        self.out.send([ident, P.C[P.WELCOME], self.drivers.welcome()])

    def on_submit(self, ident, head, f):
        did = ident[1:]
        h = P.unpack_call(head)
        cid = h[0]
        if cid[:8] != did:
            raise ProtocolError("call ids must start with the driver's id")
        d = self.drivers.seen(did)
        if cid in self.calls:
            return  # a replay of a call we already have: at most one outcome per id
        if len(self.calls) >= MAX_CALLS:
            why = (f"the cluster holds {len(self.calls)} calls not yet done (FABRIC_MAX_CALLS); "
                   f"submit fewer at once").encode()
            for rid in [cid, *self.gang_ids(cid, did, h, f)]:  # (and a gang's other members)
                self.out.to_driver(b"r" + did, [P.C[P.RESULT] + P.pack_result(rid, P.REFUSED),
                                                                   why])
            return
        kept = self.results.get(cid)
        if kept is not None:  # re-sent after a broker restart: its outcome is known already
            ids = P.split_ids(f[-1].bytes) if h[-1] & P.HAS_GANG and f else [cid]  # a gang: all members
            for rid in ids:
                r = self.results.get(rid)
                if r is not None and rid in self.unsent:  # (one this broker sent is on its way: never twice)
                    self.unsent.discard(rid)
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
                self.calls.pop(cid, None)
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
            self.calls.pop(cid, None)
            for rid in [cid, *self.gang_ids(cid, did, h, f)]:  # a gang's members all wait too
                self.out.send([b"r" + did, P.C[P.RESULT] + P.pack_result(rid, P.REFUSED), str(e).encode()])
            raise

    def on_batch(self, ident, head, f):
        """Several SUBMITs in one message (a driver's burst)."""
        for c, inner_head, frames in P.unbatch(f, 0):
            if c != P.SUBMIT:
                raise ProtocolError("a driver's BATCH may hold SUBMITs only")
            try:
                self.on_submit(ident, inner_head, frames)
            except (ProtocolError, ValueError, KeyError, TypeError, IndexError) as e:
                self.refuse(ident, f"refused a SUBMIT inside a BATCH: {e}")

    def flush(self):
        """Send what this loop turn produced: one message per peer, batched when several."""
        if self.journal is not None:  # first on disk, then on the wire
            self.journal.flush()
        self.out.flush(self.unreachable_worker, self.undelivered)

    def unreachable_worker(self, w, ids):
        if w.ident in self.workers:
            self.unreachable(w, ids)

    def undelivered(self, driver, ids):
        """RESULTs for ``driver`` could not be sent: they stay kept until it asks again."""
        self.unsent.update(ids)
        self.drivers.undelivered(driver[1:])

    def submit(self, cid, did, head, h, f, ask=True):
        _, code_hash, kind, aid, cpus, gpus, mem, retries, timeout, nbuf, _, warm, _, _, opts = h
        i = (opts & P.HAS_CODE) + ((opts & P.HAS_DEPS) >> 1)
        if len(f) != i + 1 + nbuf + ((opts & P.HAS_GANG) >> 3):  # the gang frame follows the buffers
            raise ProtocolError(f"SUBMIT announces {i} optional frames, {nbuf} buffers and "
                                f"{(opts & P.HAS_GANG) >> 3} gang frames but carries {len(f) - 1} frames "
                                f"besides the payload")
        if opts & P.HAS_CODE:  # kept even if the call is refused: the driver sends code only once
            if hashlib.blake2b(f[0].buffer, digest_size=16).digest() != code_hash:
                raise ProtocolError("code frame does not match its hash")
            if self.journal is not None and code_hash not in self.code:
                self.journal.code(code_hash, f[0])
            self.code[code_hash] = f[0]
        if not (0 <= cpus < 1e6 and 0 <= gpus < 1e4 and retries >= 0 and 0 <= timeout < 1e9) or kind > P.GANG:
            raise ProtocolError("call header out of range (cpus < 1e6, gpus < 1e4, retries >= 0, "
                                "0 <= timeout < 1e9 seconds)")
        elif kind != P.ACTOR_CALL and code_hash not in self.code:
            raise _NeedCode()
        if gpus > 1 and gpus != int(gpus):
            raise ProtocolError(f"gpus={gpus:g}: above 1, gpus must be a whole number of devices (a fraction "
                                f"below 1 shares one device)")
        if ask and opts & P.HAS_DEPS:
            # one of this driver's own calls that we do not know: sent to the broker before a
            # restart, and not journaled when it died. Its driver holds it and re-sends it
            lost = [x for x in P.split_ids(f[i - 1].bytes) if x[:8] == did and x not in self.results
                    and x not in self.calls]
            if lost:
                raise _NeedCode(lost)
        if kind == P.GANG or opts & P.HAS_GANG:
            self.check_gang(cid, did, kind, opts, f[-1].bytes)
        # keep small frames as bytes: a zmq Frame costs ~10x its size in memory, and 100,000
        # queued calls must stay cheap; large payloads and buffers stay zero-copy Frames
        payload = f[i]
        if len(payload) < 4096:
            payload = payload.bytes
        hdr = head if not opts & P.HAS_CODE else head[:-1] + bytes([opts & ~P.HAS_CODE])
        deps = f[i - 1].bytes if opts & P.HAS_DEPS else b""
        if opts & P.HAS_DEPS and not deps:
            raise ProtocolError("HAS_DEPS is set but the deps frame is empty")
        dep_ids = P.split_ids(deps) if deps else None
        if kind == P.ACTOR_NEW and (aid in self.actors or aid in self.dead_actors):
            raise ProtocolError("instance id already in use")
        call = Call(cid, b"r" + did, [hdr, deps, payload, *f[i + 1:]], h)
        if self.journal is not None:
            if kind != P.GANG:  # a gang restarts whole: its driver re-sends it on rejoin
                self.journal.call(call.frames)
        self.admit(call, dep_ids)

    def admit(self, call, dep_ids):
        """Track an accepted call: wait for its Future arguments, or queue it."""
        kind = call.kind
        if (call.maxc or call.warm) and kind != P.GANG:  # a gang's min_warm keeps its workers (gangs.py)
            self.register_fn(call)
        self.calls[call.id] = call
        self.stats["submitted"] += 1
        if kind == P.GANG:  # its members exist before anything can fail it
            self.new_gang(call)
        if dep_ids:
            call.deps = dep_ids
            call.depv = {}
            for d in call.deps:
                r = self.results.get(d)
                if r is not None:
                    if r[0] != P.OK:
                        return self.finish_copy(call, r)
                    call.depv[d] = r
                elif d in self.calls:
                    self.waiters.setdefault(d, []).append(call)
                    call.missing += 1
                else:
                    return self.finish(call, P.REFUSED, b"a Future argument refers to a result this cluster "
                                                        b"does not hold (released, or from another cluster)")
        if kind == P.TASK:
            if call.missing == 0:
                self.enqueue(call)
        elif kind == P.ACTOR_NEW:
            self.new_actor(call)
        elif kind == P.GANG:
            if call.missing == 0:
                self.enqueue(call)
        else:
            self.actor_call(call)

    # ---------------------------------------------------------------- min_warm, max_containers
    def register_fn(self, call):
        """Note a function's or class's min_warm / max_containers (the latest call's win)."""
        fn = self.fns.get(call.code_hash)
        if fn is None:
            fn = self.fns[call.code_hash] = FnInfo(call.code_hash, "cls" if call.kind == P.ACTOR_NEW else "fn")
        fn.shape, fn.min_warm, fn.max_containers = call.shape, call.warm, call.maxc
        fn.drivers.add(call.driver[1:])

    def uncap(self, call):
        """A capped function's call stopped running: the next one waiting for a place goes first."""
        fn = self.fns[call.code_hash]
        fn.running -= 1
        while fn.capped:
            c = fn.capped.popleft()
            if c.state == QUEUED:
                self.queues.setdefault(c.shape, deque()).appendleft(c)
                break

    def keep_warm(self):
        """Functions with min_warm: hand their code to idle pool workers that lack it (WARM), so
        that many workers can run them without loading code first."""
        for h, fn in self.fns.items():
            if fn.kind != "fn" or not fn.min_warm or h not in self.code:
                continue
            need = fn.min_warm - sum(1 for w in self.workers.values() if w.pool and h in w.code_seen)
            for w in list(self.idle):
                if need <= 0:
                    break
                if h not in w.code_seen and not w.doomed:
                    w.code_seen.add(h)
                    self.out.send([w.ident, P.C[P.WARM], h, self.code[h]])
                    need -= 1

    def fn_status(self):
        out = []
        for h, fn in self.fns.items():
            code = self.code.get(h)
            out.append({"name": P.code_name(code) if code is not None else "?", "hash": h.hex()[:12],
                        "kind": fn.kind, "min_warm": fn.min_warm, "max_containers": fn.max_containers or None,
                        "running": fn.running, "waiting": sum(1 for c in fn.capped if isinstance(c, Actor) or c.state == QUEUED),
                        "warm": sum(1 for w in self.workers.values() if h in w.code_seen and
                                    (w.pool or (w.actor is not None and w.actor.fn is fn))),
                        "cpus": fn.shape[0], "gpus": fn.shape[1], "memory": fn.shape[2]})
        return out

    def enqueue(self, call):
        if call.gang is not None:
            return self.enqueue_gang(call.gang[0])
        call.state = QUEUED
        q = self.queues.get(call.shape)
        if q is None:
            q = self.queues[call.shape] = deque()
            why = self.unschedulable(call.shape)
            if why:
                del self.queues[call.shape]
                return self.finish(call, P.UNSCHEDULABLE, why.encode())
        q.append(call)

    def unschedulable(self, shape):
        """Why no executor can ever run this shape, or None. With no executor yet, wait (grace)."""
        return placement.unschedulable(list(self.executors.values()), shape)

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
            call = self.calls.get(cid)
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
            if self.dropping.get(call.id) is TAKE_BACK:  # its DROP is sent: the answer cancels it
                self.dropping[call.id] = (force, recursive, False)
            elif call.id not in self.dropping:
                self.dropping[call.id] = (force, recursive, False)
                if not self.out.send([b"l" + w.ident[1:], P.C[P.DROP], call.id]):
                    del self.dropping[call.id]  # no output socket: it runs, and its result is its outcome
            return
        if w.actor is not None:
            return self.cancel_started_instance_call(call, w)
        self.cancel_running(call, w, force, recursive, seen)

    def cancel_started_instance_call(self, call, w):
        """An instance call that started runs to its end, but a generator method stops before
        its next item; the instance lives on."""
        if not call.frames[0][-1] & P.STREAM:
            return
        self.finish(call, P.CANCELLED, b"cancelled while running: the stream was closed", keep_slot=True)
        self.out.send([b"l" + w.ident[1:], P.C[P.INTERRUPT], call.id])

    def cancel_running(self, call, w, force, recursive, seen):
        if recursive:
            self.cancel_children(w, force, seen)
        if force or call.gang is not None:
            self.finish(call, P.CANCELLED, b"cancelled while running; its worker was replaced")
            self.kill_worker(w)
        else:  # fabric.Cancelled is raised inside it; it keeps its worker's slot until it returns
            self.finish(call, P.CANCELLED, b"cancelled while running (fabric.Cancelled was raised inside it)",
                        keep_slot=True)
            self.out.send([b"l" + w.ident[1:], P.C[P.INTERRUPT], call.id])

    def on_dropped(self, ident, head, f):
        """DROPPED [call id, d|r|f] from a worker's output socket, the answer to DROP: d, it
        will never start the call: its outcome is Cancelled; r, it runs it: a plain call is
        cancelled as a running one (now, or once the call ahead of it is DONE here), an instance
        call runs to its end; f, it finished it: its DONE is on its way and is its outcome."""
        w = self.workers.get(b"w" + ident[1:])
        if w is None or len(f) != 2:
            return
        cid, answer = f[0].bytes, f[1].bytes
        how = self.dropping.pop(cid, None)
        call = self.calls.get(cid)
        if how is None or call is None or call.worker is not w or call.state != RUNNING:
            return
        if how is TAKE_BACK:  # prefetched behind a call that blocked (on_blocked)
            if answer == b"d" and w.inflight.pop(cid, None) is not None:
                self.requeue([call])
                if not w.inflight:  # the blocked call ended meanwhile: the worker is free
                    self.release_worker(w)
                elif len(w.inflight) < w.credit and not w.doomed and w.lent is None:
                    self.partial[w] = None
            return
        if answer == b"d":
            self.stats["dropped"] += 1  # (cancelled calls a worker held and never started)
            self.finish(call, P.CANCELLED, b"cancelled before it ran")
            if w.actor is not None:
                self.pump_actor(w.actor)
            elif w.inflight and len(w.inflight) < w.credit and not w.doomed and w.lent is None:
                self.partial[w] = None
            return
        self.stats["drop_too_late"] += 1  # (it had started: running, or finished)
        if answer != b"r":
            return
        if w.actor is not None:  # (a concurrent instance runs several calls at once)
            self.cancel_started_instance_call(call, w)
        elif next(iter(w.inflight)) == cid:
            self.cancel_running(call, w, how[0], how[1], {cid})
        else:  # the DONE of the call ahead of it is still on its way: on_done cancels it
            self.dropping[cid] = (how[0], how[1], True)

    def cancel_children(self, w, force, seen):
        """The calls that worker ``w`` submitted (its nested driver says which worker it is in
        its HELLO) and that have no outcome yet: the children of the call it runs now."""
        wid = w.ident.hex()
        for did in self.drivers.in_worker(wid):
            rid = b"r" + did
            for c in [c for c in self.calls.values() if c.driver == rid and c.id not in seen]:
                seen.add(c.id)
                self.cancel_call(c, force, True, seen)

    def on_release(self, ident, head, f):
        results, did = self.results, ident[1:]
        ids = [cid for cid in P.split_ids(f[0].bytes) if cid[:8] == did]  # a driver releases only its own
        for cid in ids:
            results.pop(cid, None)
        if self.unsent:
            self.unsent.difference_update(ids)
        if self.journal is not None:
            self.journal.forget(ids)

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
            r = self.results.get(cid)
            if r is not None:
                self.out.to_driver(rid, [P.C[P.RESULT] + r[1], *r[2:]])
            elif cid in self.calls:
                self.fetchers.setdefault(cid, []).append(rid)
            else:
                self.out.to_driver(rid, [P.C[P.RESULT] + P.pack_result(cid, P.REFUSED),
                                         b"this Future's result is not held by the cluster: it was released (its "
                                         b"driver received it and no running call that it was passed to holds it), "
                                         b"or its driver is gone, or it belongs to another cluster"])

    def on_put(self, ident, head, f):
        cid, status, nbuf, _, _ = P.unpack_result(head)
        if cid[:8] != ident[1:] or status != P.OK or len(f) != 1 + nbuf:
            raise ProtocolError("malformed PUT")
        self.results[cid] = [P.OK, head, *f]
        if self.journal is not None:
            self.journal.outcome(cid, P.OK, [head, *f])

    def on_bye(self, ident, head, f):
        self.driver_left(ident[1:])

    def driver_left(self, did):
        """A driver said BYE, or was silent too long: its calls and instances end (named
        detached instances excepted), its kept outcomes are dropped."""
        self.drivers.leave(did)
        rid = b"r" + did
        for call in [c for c in self.calls.values() if c.driver == rid
                     and not (c.kind == P.ACTOR_NEW and self.actor_names and self.detached(c.actor))]:
            w = call.worker
            if call.state == RUNNING and w.actor is None:
                if next(iter(w.inflight)) == call.id:
                    self.kill_worker(w)  # it is running this call
                else:  # only prefetched: its worker drops it unless it started it (its DONE is ignored)
                    self.out.send([b"l" + w.ident[1:], P.C[P.DROP], call.id])
            self.finish(call, P.CANCELLED, b"driver left", deliver=False)
        for a in [a for a in self.actors.values() if a.driver == rid and not self.detached(a.id)]:
            self.kill_actor(a, b"its driver left")
        if self.warm_gang:
            self.expire_warm(0.0, driver=rid)
        for h, fn in list(self.fns.items()):  # min_warm holds while a driver that uses it is here
            fn.drivers.discard(did)
            if not fn.drivers and not fn.running and not fn.capped:
                del self.fns[h]
        gone = [k for k in self.results if k[:8] == did]
        for cid in gone:
            del self.results[cid]
        self.unsent.difference_update(gone)
        if self.journal is not None:
            self.journal.forget(gone)

    def on_status(self, ident, head, f):
        now = time.monotonic()
        exs = []
        for ex in self.executors.values():
            r = ex.ledger
            exs.append({
                "id": ex.id.hex(), "host": ex.host, "cpus": r.cpus, "free_cpus": round(r.free_cpus, 3),
                "gpus": r.gpus, "free_gpus": r.free_gpus, "memory": r.memory, "free_memory": r.free_mem,
                "gpu_free": {str(d): round(c, 6) for d, c in r.gpu_free.items()},
                "workers": len(ex.workers), "busy": sum(1 for w in ex.workers.values() if w.inflight),
                "instances": sum(1 for w in ex.workers.values() if w.actor is not None),
                "last_seen_s": round(now - ex.last_seen, 2), "labels": ex.info.get("labels", {}),
            })
        queues = [{"cpus": s[0], "gpus": s[1], "memory": s[2], "depth": sum(1 for c in q if c.state == QUEUED)}
                  for s, q in self.queues.items()]
        for g in self.gang_queue:  # a waiting gang is demand for all of its members
            if g.state == QUEUED:
                queues.append({"cpus": g.shape[0], "gpus": g.shape[1], "memory": g.shape[2],
                               "depth": len(g.members), "gang": g.id.hex()})
        st = {"address": self.address, "pid": os.getpid(), "uptime_s": round(now - self.started, 1),
              "executors": exs, "queues": queues, "drivers": len(self.drivers),
              "calls_pending": len(self.calls), "results_held": len(self.results),
              "instances": len(self.actors), "stats": self.stats, "functions": self.fn_status(),
              "named": [{"name": k[1], "namespace": k[0], "actor": e["actor"].hex(), "class": e["class"],
                         "detached": e["detached"], "alive": e["actor"] in self.actors}
                        for k, e in self.names.items()],
              "gangs": [{"id": g.id.hex(), "size": len(g.members), "cpus": g.shape[0], "gpus": g.shape[1],
                         "memory": g.shape[2], "retries_left": g.retries,
                         "state": ("waiting", "queued", "starting", "running", "done")[g.state]}
                        for g in self.gangs.values()]}
        self.out.send([ident if ident[:1] != b"d" else b"r" + ident[1:], P.C[P.STATUS_REPLY], P.dumps_json(st)])

    def detached(self, aid):
        key = self.actor_names.get(aid)
        return key is not None and self.names[key]["detached"]

    def on_name(self, ident, head, f):
        """NAME [json] from a control client: ``{"op": "register", "name", "namespace", "actor",
        "driver", "class", "streams", "detached", "get_if_exists"}`` reserves a name for an
        instance its driver is about to create (or, with get_if_exists, answers the instance
        that has it); ``{"op": "lookup", "name", "namespace"}`` finds one. The answer is a
        NAME_REPLY: the instance (``actor``, ``class``, ``streams``, ``created``) or ``error``."""
        req = P.loads_json(f[0].bytes) if f else {}
        name, ns = req.get("name"), req.get("namespace") or "default"
        if not isinstance(name, str) or not 0 < len(name) <= 200 or not isinstance(ns, str) or len(ns) > 200:
            raise ProtocolError("NAME needs a name and a namespace of 1 to 200 characters")
        key = (ns, name)
        e = self.names.get(key)
        if e is not None and e["actor"] not in self.actors and (
                e["actor"] in self.dead_actors or time.monotonic() - e["since"] > 60):
            del self.names[key]  # its instance ended, or was never created
            self.actor_names.pop(e["actor"], None)
            e = None
        where = f"{name!r}" + ("" if ns == "default" else f" in namespace {ns!r}")
        if req.get("op") == "lookup":
            reply = ({"error": f"no instance named {where} is alive on this cluster"} if e is None else
                     {"actor": e["actor"].hex(), "class": e["class"], "streams": e["streams"], "created": False})
        elif req.get("op") == "register":
            aid, driver = bytes.fromhex(str(req.get("actor"))), bytes.fromhex(str(req.get("driver")))
            streams = req.get("streams") or []
            if len(aid) != 16 or aid[:8] != driver or driver not in self.drivers:
                raise ProtocolError("NAME register needs the instance id of a connected driver")
            if not isinstance(streams, list) or not all(isinstance(s, str) for s in streams):
                raise ProtocolError("NAME streams must be a list of method names")
            if e is None:
                self.names[key] = e = {"actor": aid, "class": str(req.get("class", "?"))[:200], "streams": streams[:1000],
                                       "detached": bool(req.get("detached")), "since": time.monotonic()}
                self.actor_names[aid] = key
                reply = {"actor": aid.hex(), "class": e["class"], "streams": e["streams"], "created": True}
            elif req.get("get_if_exists"):
                reply = {"actor": e["actor"].hex(), "class": e["class"], "streams": e["streams"], "created": False}
            else:
                reply = {"error": f"an instance named {where} exists already (of class {e['class']}); names are "
                                  f"unique: pick another, or pass get_if_exists=True to get that one"}
        else:
            raise ProtocolError("NAME op must be register or lookup")
        self.out.send([ident, P.C[P.NAME_REPLY], P.dumps_json(reply)])

    def on_shutdown(self, ident, head, f):
        log.info("shutdown requested by %s", ident.hex())
        self.running = False

    # ---------------------------------------------------------------- executors
    def on_exec_hello(self, ident, head, f):
        info = P.loads_json(f[0].bytes)
        if len(ident) != 9:
            raise ProtocolError("executor ids are 8 bytes")
        cpus, mem, gpus = info.get("cpus"), info.get("memory", 0), info.get("gpus", [])
        if isinstance(cpus, bool) or not isinstance(cpus, (int, float)) or not 0 <= cpus < 1e6:
            raise ProtocolError("EXEC_HELLO needs a number of cpus from 0 to 1e6")
        if isinstance(mem, bool) or not isinstance(mem, int) or not 0 <= mem < 1 << 60:
            raise ProtocolError("EXEC_HELLO memory must be a whole number of bytes")
        if not isinstance(gpus, list) or len(gpus) > 4096 or not all(type(g) is int and 0 <= g < 1 << 16 for g in gpus):
            raise ProtocolError("EXEC_HELLO gpus must be a list of device numbers")
        old = self.executors.get(ident)
        if old is not None:
            self.lose_executor(old, "re-registered")
        ex = self.executors[ident] = Executor(ident, info)
        log.info("executor %s joined from %s: cpus=%g gpus=%s memory=%dMiB", ex.id.hex(), ex.host,
                 ex.ledger.cpus, ex.ledger.gpus, ex.ledger.memory >> 20)
        self.out.send([ident, P.C[P.WELCOME], P.dumps_json({"version": P.VERSION})])

    def on_heartbeat(self, ident, head, f):
        if ident[:1] == b"d":
            return self.drivers.heartbeat(ident[1:], f)
        ex = self.executors.get(ident)
        if ex is None:
            self.out.send([ident, P.C[P.ERROR], b"unknown executor: say EXEC_HELLO again"])
            return
        ex.last_seen = time.monotonic()

    def on_worker_died(self, ident, head, f):
        info = P.loads_json(f[1].bytes)
        w = self.workers.get(f[0].bytes)
        if w is not None and w.ex.ident == ident:
            running = info.get("running")  # the call it was running: "" none, absent unknown
            if isinstance(running, str) and len(running) in (0, 2 * P.ID_LEN):
                try:
                    running = bytes.fromhex(running)
                except ValueError:
                    running = None
            else:
                running = None
            if isinstance(info.get("memory"), str):  # stopped for memory: a retry would do it again
                self.lose_worker(w, info["memory"][:200], memory=True, running=running)
            else:
                self.lose_worker(w, f"exit code {info.get('exitcode')}", running=running)
        elif "token" in info:  # a spawned worker that died before saying READY
            sp = self.spawns.get(str(info["token"]))
            if sp is not None and sp[0].ident == ident:  # only the executor asked to spawn it may say so
                del self.spawns[str(info["token"])]
                self.spawn_failed(sp, f"worker failed to start (exit code {info.get('exitcode')})")

    def on_exec_bye(self, ident, head, f):
        ex = self.executors.get(ident)
        if ex is not None:
            self.lose_executor(ex, "left")

    def lose_executor(self, ex, why):
        log.warning("executor %s (%s) lost: %s", ex.id.hex(), ex.host, why)
        self.executors.pop(ex.ident, None)
        for w in list(ex.workers.values()):
            self.lose_worker(w, f"its executor {why}")
        for tok, sp in list(self.spawns.items()):
            if sp[0] is ex and self.spawns.pop(tok, None) is not None:  # (a gang may drop its others)
                self.spawn_failed(sp, f"executor {why}")

    # ---------------------------------------------------------------- workers
    def on_ready(self, ident, head, f):
        info = P.loads_json(f[0].bytes)
        ex = self.executors.get(b"e" + ident[1:9])
        if ex is None:
            raise ProtocolError("worker of an unknown executor")
        w = Worker(ident, ex, info)
        old = self.workers.get(ident)
        if old is not None:
            self.lose_worker(old, "replaced")
        self.workers[ident] = ex.workers[ident] = w
        token = info.get("token")
        if token is None:
            if w.pool:
                self.idle[w] = None
            return
        sp = self.spawns.get(str(token))
        if sp is None or sp[0] is not ex:  # nobody waits for it (any more), or not from that executor
            self.kill_worker(w)
            return
        del self.spawns[str(token)]
        _, devices, what = sp
        w.gpus = tuple(devices)
        if isinstance(what, Actor):
            what.worker, w.actor, w.credit = w, what, ACTOR_PIPELINE
            w.held = what.shape
            self.pump_actor(what)
        elif what.gang is not None:
            self.gang_ready(w, what, str(token), info)
        else:
            w.held = what.shape
            w.pool = not devices  # an extra CPU worker (fractional CPUs) joins the pool
            if what.state == SPAWNING:
                self.run_on(w, what)
            else:
                self.release_worker(w)

    def on_done(self, ident, head, f):
        w = self.workers.get(ident)
        if w is None:
            raise ProtocolError("result from an unknown worker")
        cid, status, nbuf, duration, _ = P.unpack_result(head)
        if len(f) != 1 + nbuf:
            raise ProtocolError("DONE announces a different number of buffers")
        call = w.inflight.pop(cid, None)
        if call is None:
            return  # cancelled or timed out meanwhile: it already has its outcome
        if call.gang is not None:
            return self.gang_done(call, status, [head, *f])
        if call.kind == P.TASK:
            avg = self.avg_duration.get(call.code_hash)
            self.avg_duration[call.code_hash] = duration if avg is None else 0.8 * avg + 0.2 * duration
        if call.state == DONE:
            pass
        elif call.kind == P.ACTOR_NEW and status != P.OK:
            self.finish(call, status, None, [head, *f])
            self.kill_actor(w.actor, None, failure=[status, head, *f])
            return
        else:
            self.finish(call, status, None, [head, *f])
        if w.inflight:  # the next call in this worker's FIFO starts now: its clock starts too
            nxt = next(iter(w.inflight.values()))
            if nxt.started == 0.0:
                nxt.started = time.monotonic()
                if nxt.timeout:
                    heapq.heappush(self.timeouts, (nxt.started + nxt.timeout, next(self._seq), nxt))
        if w.actor is not None:
            self.pump_actor(w.actor)
        elif not w.inflight:
            self.release_worker(w)
        elif len(w.inflight) < w.credit:
            self.partial[w] = None
        if self.dropping and w.inflight and w.actor is None:  # the call now first was cancelled while it ran
            nxt = next(iter(w.inflight.values()))
            how = self.dropping.get(nxt.id)
            if how is not None and how[2]:
                del self.dropping[nxt.id]
                self.cancel_running(nxt, w, how[0], how[1], {nxt.id})

    def on_blocked(self, ident, head, f):
        """BLOCKED [call id]: the call ``ident`` runs waits for calls it submitted. Its CPUs are
        lent out (another worker may run on them, a new one started if none is idle), and the
        calls prefetched behind it are taken back (DROP; requeued on a ``d``): they may be the
        very calls it waits for. An instance (its worker runs one call at a time) lends the
        CPUs it holds for life the same way; the calls queued behind on it stay, being its own.
        A stale one (that call is not the one running) is ignored."""
        w = self.workers.get(ident)
        if (w is None or len(f) != 1 or w.lent is not None or w.held is None
                or w.gang is not None or next(iter(w.inflight), None) != f[0].bytes):
            return
        w.lent = w.held[0]
        w.ex.ledger.give((w.lent, 0, 0))
        self.blocked += 1
        if w.actor is not None:
            return
        self.partial.pop(w, None)
        for c in list(w.inflight.values())[1:]:
            if c.id not in self.dropping:
                self.dropping[c.id] = TAKE_BACK
                if not self.out.send([b"l" + w.ident[1:], P.C[P.DROP], c.id]):
                    del self.dropping[c.id]

    def on_unblocked(self, ident, head, f):
        """UNBLOCKED [call id]: the call runs again and takes its CPUs back, even if they are
        in use meanwhile (its executor is oversubscribed until calls end, as in Ray)."""
        w = self.workers.get(ident)
        if w is None or w.lent is None or len(f) != 1 or next(iter(w.inflight), None) != f[0].bytes:
            return
        w.ex.ledger.take((w.lent, 0, 0))  # (it may oversubscribe: on purpose, see above)
        w.lent = None
        self.blocked -= 1
        if len(w.inflight) < w.credit and not w.doomed and w.actor is None:
            self.partial[w] = None

    def on_item(self, ident, head, f):
        """ITEM: one item of a generator call, forwarded as it came to the call's driver, in
        this loop turn's messages for it (so before the call's RESULT). Not kept: a stream's
        items are its consumer's, and a retried call sends them again (the driver skips those
        it has, by index)."""
        w = self.workers.get(ident)
        if w is None:
            raise ProtocolError("item from an unknown worker")
        if len(f) != 1 + P.RESULT_HDR.unpack_from(head)[2]:
            raise ProtocolError("ITEM announces a different number of buffers")
        call = w.inflight.get(head[:16])
        if call is None or call.state != RUNNING:
            return  # cancelled (its consumer stopped) or timed out meanwhile
        self.out.to_driver(call.driver, [P.C[P.ITEM] + head, *f])

    def on_consumed(self, ident, head, f):
        """CONSUMED [call id + count]: the consumer of a stream took ``count`` items; its worker
        may run ahead of that by its window. Forwarded to the worker's output socket."""
        call = self.calls.get(head[:16])
        if call is None or call.state != RUNNING or call.driver[1:] != ident[1:]:
            return
        self.out.send([b"l" + call.worker.ident[1:], P.C[P.CONSUMED] + head])

    def on_wlog(self, ident, head, f):
        if b"w" + ident[1:] not in self.workers:
            return
        did, source, text = f[0].bytes, f[1], f[2]
        self.out.send([b"r" + did, P.C[P.LOG], source, text])

    def release_worker(self, w):
        """A worker finished everything it had: give its resources back to its executor."""
        self.return_resources(w)
        self.partial.pop(w, None)
        if w.pool and not w.doomed:
            self.idle[w] = None
        elif w.doomed and not w.killed and w.actor is None and w.gang is None and w.ident in self.workers:
            self.kill_worker(w)  # it became unreachable with calls in flight: those are done now

    def return_resources(self, w):
        if w.held is not None:
            cpus, gpus, mem = w.held
            if w.lent is not None:  # lent out already (BLOCKED)
                cpus -= w.lent
                w.lent = None
                self.blocked -= 1
            w.ex.ledger.give((cpus, gpus, mem), w.gpus)
            w.held = None

    def lose_worker(self, w, why, charge=True, memory=False, running=None):
        """``w`` is gone. The call it was running is charged a retry (``charge``: it may have run);
        calls it had only prefetched, or that never reached it, go back to the queue as they were.
        ``running``: the id of the call it was running, as its executor read it (b"": none);
        None when unknown, and then it is the oldest call sent to it."""
        self.out.drop_worker(w)
        self.workers.pop(w.ident, None)
        w.ex.workers.pop(w.ident, None)
        self.idle.pop(w, None)
        self.partial.pop(w, None)
        if w.spare is not None:
            self.drop_warm(w)
        if w.gang is not None:  # a gang member's process: the whole gang reruns or fails
            (g, rank), w.gang = w.gang, None
            w.inflight.clear()
            self.return_resources(w)
            return self.gang_crashed(g, rank, why, charge, retry=not memory)
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
            self.finish(c, P.OUT_OF_MEMORY, f"the worker running this call was stopped: {why} ({limit})".encode())
            charge = False  # what it had prefetched never ran
            if w.actor is not None:
                why = f"stopped for memory: {why}"
        if w.actor is not None:
            a = w.actor
            a.worker = None
            if a.id in self.actors:  # not already ended on purpose (kill, failed __init__)
                r = self.restarts.get(a.id) if self.restarts else None
                if r is not None and r[0] > 0 and a.failure is None:
                    self.return_resources(w)
                    return self.restart_actor(a, calls, why)
                msg = f"the instance's process died ({why})"
                if r is not None:
                    msg += f" and its max_restarts={r[2]} restarts are spent"
                msg = msg.encode()
                for c in calls:
                    self.finish(c, P.ACTOR_DIED, msg)
                self.kill_actor(a, msg)
        else:
            requeue = []
            for c in calls:
                if c.state != RUNNING:
                    continue
                if c is cut and charge:  # the call that was running: charge it a retry
                    c.retries -= 1
                    if c.retries < 0:
                        self.finish(c, P.CRASHED, (f"the worker running this call died ({why}) and its "
                                                   f"retries are spent").encode())
                        continue
                    self.stats["retried"] += 1
                    log.info("retrying call %s after worker death (%s)", c.id.hex(), why)
                requeue.append(c)
            self.requeue(requeue)
        self.return_resources(w)  # the executor replaces pool workers by itself

    def requeue(self, calls):
        """Put calls taken back from a worker at the front of their queues, in their order, and
        free their places under their function's max_containers. A call cancelled while its
        worker was asked to drop it is not requeued: its outcome is Cancelled."""
        if self.dropping:
            for c in [c for c in calls if c.id in self.dropping]:
                if self.dropping[c.id] is TAKE_BACK:  # it was being taken back anyway
                    del self.dropping[c.id]
                    continue
                calls.remove(c)
                self.finish(c, P.CANCELLED, b"cancelled; its worker ended before it said whether the call had started")
        for c in reversed(calls):
            if c.maxc and c.kind == P.TASK:
                self.uncap(c)
            c.state, c.worker, c.started = QUEUED, None, 0.0
            self.queues.setdefault(c.shape, deque()).appendleft(c)

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
        self.idle.pop(w, None)
        self.partial.pop(w, None)
        self.requeue([c for c in (w.inflight.pop(cid, None) for cid in unsent) if c is not None and c.state == RUNNING])
        if not w.inflight:
            self.kill_worker(w)

    def kill_worker(self, w):
        """Have the executor kill ``w``; calls it had prefetched go back to the queue uncharged."""
        w.doomed = w.killed = True
        self.out.drop_worker(w)  # not sent yet: they are requeued below, never run twice
        self.idle.pop(w, None)
        self.partial.pop(w, None)
        if w.actor is None and w.inflight and w.gang is None:  # (a gang member is never requeued alone)
            calls = [c for c in w.inflight.values() if c.state == RUNNING]
            w.inflight.clear()
            self.requeue(calls)
            self.return_resources(w)
        self.out.send([w.ex.ident, P.C[P.KILL_WORKER], w.ident])

    # ---------------------------------------------------------------- scheduling
    def dispatch(self):
        if self.gang_queue:  # first: what this turn freed goes to a waiting gang if all of it fits
            self.dispatch_gangs()
        for shape, q in list(self.queues.items()):
            while q:
                call = q[0]
                if call.state != QUEUED:
                    q.popleft()
                    continue
                if call.maxc and self.fns[call.code_hash].running >= call.maxc:
                    q.popleft()  # at its max_containers: it waits aside, the calls behind it go on
                    self.fns[call.code_hash].capped.append(call)
                    continue
                if shape[1]:
                    if not self.place_gpu_call(call):
                        break
                    q.popleft()
                    continue
                w = placement.pick_worker(self.idle, self.partial, call, self.avg_duration, time.monotonic())
                if w is None:
                    if (0 < shape[0] < 1 or self.blocked) and self.spawn_extra(call):
                        q.popleft()  # a fraction of a CPU, or lent ones: one more worker
                        continue
                    break
                q.popleft()
                self.run_on(w, call)
        if self.pending_actors:
            for _ in range(len(self.pending_actors)):
                a = self.pending_actors.popleft()
                if a.failure is None and a.id in self.actors and not self.place_actor(a):
                    self.pending_actors.append(a)

    def spawn_extra(self, call):
        """One more pool worker for ``call`` (fractional or lent CPUs: placement.extra_worker_on)."""
        ex = placement.extra_worker_on(self.executors.values(), self.spawns.values(), call.shape, self.blocked)
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
            out = [w.ident, P.C[P.CALL] + hdr[:-1] + bytes([hdr[-1] | P.HAS_CODE]), self.code[call.code_hash]]
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
            self.idle.pop(w, None)
        w.inflight[call.id] = call
        call.worker = w
        call.state = RUNNING
        if call.maxc and call.kind == P.TASK:
            self.fns[call.code_hash].running += 1
        if idle:
            call.started = time.monotonic()
            if call.timeout:
                heapq.heappush(self.timeouts, (call.started + call.timeout, next(self._seq), call))
        if w.actor is None:
            if len(w.inflight) < w.credit:
                self.partial[w] = None
            else:
                self.partial.pop(w, None)
        if call.deps:
            if not self.out.send(out):
                self.unreachable(w, [call.id])
        else:
            self.out.to_worker(w, out[1:])

    def place_gpu_call(self, call):
        """GPU calls run in a worker started with CUDA_VISIBLE_DEVICES set to their devices: an
        idle GPU worker bound to the devices chosen, else a new one (placement.place_gpu)."""
        where = placement.place_gpu(self.executors.values(), self.workers.values(), call.shape)
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
                self.lose_worker(w, "devices reassigned")
                self.kill_worker(w)
        return devices

    def spawn(self, ex, devices, call, actor):
        token = f"{self.epoch[:8]}-{next(self._tokens)}"  # unique across restarts: an old worker's death
        # reported to a new broker must not fail a spawn of the same number
        self.spawns[token] = (ex, devices, actor if actor is not None else call)
        body = {"token": token, "gpus": devices, "actor": actor.id.hex() if actor is not None else None}
        self.out.send([ex.ident, P.C[P.SPAWN], P.dumps_json(body)])
        return token

    def spawn_failed(self, sp, why):
        ex, devices, what = sp
        shape = what.shape
        if ex.ident in self.executors:
            ex.ledger.give(shape, devices)
        if isinstance(what, Actor):
            self.kill_actor(what, why.encode())
        elif what.gang is not None:
            self.gang_crashed(what.gang[0], what.gang[1], why)
        elif what.state == SPAWNING:
            what.retries -= 1
            if what.retries < 0:
                self.finish(what, P.CRASHED, why.encode())
            else:
                what.state = QUEUED
                self.queues.setdefault(what.shape, deque()).appendleft(what)

    # ---------------------------------------------------------------- instances
    def new_actor(self, call):
        a = Actor(call.actor, call.driver, call.shape)
        self.actors[a.id] = a
        if call.retries:  # an ACTOR_NEW's retries are its class's max_restarts
            self.restarts[a.id] = [call.retries, call, call.retries]
        a.queue.append(call)
        why = self.unschedulable(a.shape)
        if why:
            return self.kill_actor(a, why.encode(), status=P.UNSCHEDULABLE)
        if call.maxc or call.warm:  # a registered class counts its live (and warm) instances
            fn = a.fn = self.fns[call.code_hash]
            if call.maxc and fn.running >= call.maxc:  # max_containers: the next waits for one to end
                fn.capped.append(a)
                return
            fn.running += 1
        if not self.place_actor(a):
            self.pending_actors.append(a)

    def place_actor(self, a):
        ex = placement.first_fit(self.executors.values(), a.shape)
        if ex is None:
            return False
        a.ex = ex
        a.devices = self.reserve(ex, a.shape)
        self.spawn(ex, a.devices, None, a)
        return True

    def actor_call(self, call):
        a = self.actors.get(call.actor)
        if a is None:
            failure = self.dead_actors.get(call.actor)
            if failure is not None:
                return self.finish_copy(call, failure)
            return self.finish(call, P.ACTOR_DIED, b"no such instance (it was killed or never created)")
        if a.failure is not None:
            return self.finish_copy(call, a.failure)
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
            self.run_on(w, c)
        if a.release_when_idle and not q and not w.inflight:
            self.kill_actor(a, b"released")

    def restart_actor(self, a, calls, why):
        """max_restarts: the instance's worker died; build it again on a new worker (its
        ``__init__`` and ``@enter`` run anew, from its original arguments). The calls it had been
        sent run again on the new instance while they have retries (max_task_retries), in their
        order, else fail with ``ActorDied``; calls not sent yet wait for it."""
        r = self.restarts[a.id]
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
                self.finish(c, P.ACTOR_DIED, msg)
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
            self.pending_actors.append(a)

    def on_kill_actor(self, ident, head, f):
        a = self.actors.get(f[0].bytes)
        if a is None or (a.driver[1:] != ident[1:] and not (a.id in self.actor_names and f[1].bytes == b"1")):
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
                self.finish_copy(c, failure)
        a.queue.clear()
        w = a.worker
        if w is not None:
            for c in list(w.inflight.values()):
                self.finish_copy(c, failure)
            w.inflight.clear()
            self.kill_worker(w)
            a.worker = None
        elif a.ex is not None:
            for tok, sp in list(self.spawns.items()):
                if sp[2] is a:
                    del self.spawns[tok]
                    sp[0].ledger.give(a.shape, sp[1])
        self.actors.pop(a.id, None)
        if self.actor_names:
            self.names.pop(self.actor_names.pop(a.id, None), None)  # its name is free again
        if self.restarts:
            self.restarts.pop(a.id, None)
        fn, a.fn = a.fn, None
        if fn is not None:  # its class has max_containers or min_warm
            if a in fn.capped:
                fn.capped.remove(a)  # it was still waiting for a place
            else:
                fn.running -= 1
                while fn.capped:  # its place goes to the next instance waiting for one
                    nxt = fn.capped.popleft()
                    if nxt.id in self.actors:
                        fn.running += 1
                        if not self.place_actor(nxt):
                            self.pending_actors.append(nxt)
                        break
        self.dead_actors[a.id] = failure  # later calls get the same answer
        if len(self.dead_actors) > 10000:
            self.dead_actors.popitem(last=False)

    # ---------------------------------------------------------------- outcomes
    def finish(self, call, status, message, frames=None, deliver=True, keep_slot=False):
        """Give a call its one outcome: send it to the driver, keep it for dependants."""
        if call.state == DONE:
            return
        if frames is None:
            frames = [P.pack_result(call.id, status), message or b""]
        if call.maxc and call.state == RUNNING and call.kind == P.TASK:
            self.uncap(call)
        call.state = DONE
        if self.dropping:
            self.dropping.pop(call.id, None)
        w = call.worker
        if w is not None and not keep_slot and w.inflight.pop(call.id, None) is not None:
            if w.actor is None and not w.inflight:
                self.release_worker(w)
        self.calls.pop(call.id, None)
        self.stats["completed"] += 1
        if deliver and call.driver[1:] in self.drivers:
            if not self.restoring:
                self.out.to_driver(call.driver, [P.C[P.RESULT] + frames[0], *frames[1:]])
            self.results[call.id] = [status, *frames]
            if self.journal is not None:
                self.journal.outcome(call.id, status, frames)
        elif self.journal is not None:
            self.journal.forget([call.id])  # an outcome nobody will ask for: the call is over
        if call.kind == P.ACTOR_NEW and status != P.OK:
            a = self.actors.get(call.actor)
            if a is not None and a.failure is None:
                self.kill_actor(a, None, failure=[status, *frames])
            elif a is None:  # failed before the instance existed (a failed argument)
                self.dead_actors[call.actor] = [status, *frames]
        if call.gang is not None:
            self.gang_outcome(call, status, frames)
        if self.fetchers:
            for rid in self.fetchers.pop(call.id, ()):
                self.out.to_driver(rid, [P.C[P.RESULT] + frames[0], *frames[1:]])
        waiting = self.waiters.pop(call.id, None)
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
                        self.enqueue(c)
                    else:
                        c.state = QUEUED
                        a = self.actors.get(c.actor)
                        if a is not None:
                            self.pump_actor(a)

    def finish_copy(self, call, outcome):
        """Fail ``call`` with another call's failure (a failed dependency, a dead instance)."""
        status, hdr = outcome[0], outcome[1]
        _, _, nbuf, dur, _ = P.unpack_result(hdr)  # kept outcomes hold their header as bytes
        self.finish(call, status, None, [P.pack_result(call.id, status, nbuf, dur), *outcome[2:]])

    # ---------------------------------------------------------------- time
    def expire(self, now):
        while self.timeouts and self.timeouts[0][0] <= now:
            _, _, call = heapq.heappop(self.timeouts)
            if call.state != RUNNING or call.started + call.timeout > now + 1e-3:
                continue
            w = call.worker
            if w.actor is None:
                self.finish(call, P.TIMEOUT, f"the call ran longer than its timeout of {call.timeout:g}s; "
                                             f"its worker was killed and replaced".encode())
                self.kill_worker(w)
            else:
                # the caller gets its answer now; the call keeps its slot until the instance is
                # done with it, so the next call's clock starts when that one really starts
                self.finish(call, P.TIMEOUT, f"the call ran longer than its timeout of {call.timeout:g}s; the "
                                             f"instance keeps running it (its state is kept)".encode(),
                            keep_slot=True)

    def tick(self, now):
        if self.fns:
            self.keep_warm()
        if self.journal is not None and self.journal.size > self.journal_limit:
            self.compact()
        for ex in list(self.executors.values()):
            if now - ex.last_seen > HEARTBEAT_TIMEOUT:
                self.lose_executor(ex, f"no heartbeat for {now - ex.last_seen:.1f}s")
        if self.gang_queue:
            self.gang_queue = deque(g for g in self.gang_queue if g.state == QUEUED)
        if self.warm_gang:
            self.expire_warm(now)
        if self.executors or not (any(self.queues.values()) or self.pending_actors or self.gang_queue):
            self.no_executor_since = now  # the grace counts from when calls began to wait with no executor
        elif now - self.no_executor_since > NO_EXECUTOR_GRACE:
            msg = f"no executor joined this cluster within {NO_EXECUTOR_GRACE:g}s".encode()
            for q in self.queues.values():
                while q:
                    c = q.popleft()
                    if c.state == QUEUED:
                        self.finish(c, P.UNSCHEDULABLE, msg)
            for a in list(self.pending_actors):
                self.kill_actor(a, msg, status=P.UNSCHEDULABLE)
            self.pending_actors.clear()
            for g in list(self.gang_queue):
                self.finish(g.members[0], P.UNSCHEDULABLE, msg)  # and its other members with it
            self.gang_queue.clear()
        for shape in [s for s, q in self.queues.items() if not q]:
            del self.queues[shape]  # shapes come from callers: keep only those with calls waiting
        if self.executors:
            for shape, q in list(self.queues.items()):
                why = q and self.unschedulable(shape)
                if why:
                    while q:
                        c = q.popleft()
                        if c.state == QUEUED:
                            self.finish(c, P.UNSCHEDULABLE, why.encode())
            for g in list(self.gang_queue):  # an executor left: some gangs may never fit now
                why = g.state == QUEUED and self.gang_unschedulable(g)
                if why:
                    self.finish(g.members[0], P.UNSCHEDULABLE, why.encode())
        for did, d in self.drivers.silent(now):
            log.warning("driver %s (pid %s on %s) silent for %.0fs: cancelling its calls and instances",
                        did.hex(), d.pid, d.host, now - d.seen)
            self.driver_left(did)
            d.sweep_shm()
        if self.parent_pid and not config.pid_alive(self.parent_pid):
            log.info("parent process %d is gone; stopping", self.parent_pid)
            self.running = False


