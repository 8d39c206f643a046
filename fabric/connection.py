"""A driver's connection to the broker: submit calls, receive results, complete Futures.

Two DEALER sockets per driver: the user's threads *send* on ``d`` (under a lock, so a call
costs no thread hand-off; bursts travel as BATCH messages), and ``r`` *receives* results,
worker output and refusals: received by whichever thread waits for a result (leader/follower),
else by the IO thread. Results are kept as raw frames and unpickled lazily by whoever asks for them, so
the IO thread does little per message.

Liveness: the broker answers each of the driver's once-a-second HEARTBEATs on ``r``; the IO
thread notes when anything last arrived there. A broker silent for ``FABRIC_BROKER_TIMEOUT``
seconds (or, for an embedded cluster, a broker process known to have exited with no
supervisor to restart it) is declared gone: every pending Future fails with
``ConnectionFailed`` and new calls fail fast, until a broker answers again (then the driver
rejoins as after a restart). Nothing of this runs on the call path.

Ownership: the broker keeps each result until this driver says ``RELEASE``; the IO thread
releases a result once it holds it, unless a call being submitted right now refers to it
(``_pin``), in which case the release waits until that submit is on the wire. A Future that
is already done when passed as an argument travels by value.
"""
from __future__ import annotations

import collections
import itertools
import logging
import os
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any

import zmq

from . import futures as _futures
from . import protocol as P
from . import security
from . import serde
from . import settings
from .errors import ConnectionFailed, SerializationError
from .futures import (_DONE, _NOTHING, Future, Part, ReadyFuture, _borrowed, _borrowed_part, _done_future,
                      _Raise, _StreamState, _tls)
from .spill import Spilled


log = logging.getLogger("fabric.client")

USER_IDLE = 0.05  # seconds without a waiting user thread before the IO thread receives
BURST_GAP = 50e-6  # a submit this soon after the previous one joins a batch
BATCH_MAX = 64     # submits per BATCH message
# backpressure: a driver with this many calls awaiting their outcome waits in .remote() until
# a tenth of them are done, so a loop that submits faster than the cluster runs cannot exhaust
# memory (about 1 KB per pending call here and in the broker)
MAX_PENDING = settings.get().max_pending
# a fabric.put object at least this big goes to the object store, not into the broker's memory
PUT_SPILL = settings.get().put_spill
# a broker silent this long is gone (read when a Client starts): long enough for a supervisor
# to restart a broker and replay its journal, short enough that nobody waits for ever
BROKER_TIMEOUT = 30.0
HEARTBEAT_EVERY = 1.0  # seconds between a driver's HEARTBEATs (the broker answers each)
WAIT_WARN = settings.get().wait_warn  # seconds a call waits for resources before the driver says why


@dataclass(frozen=True)
class CallOptions:
    """How a call runs: made once per function, class, method or gang by ``fabric.api`` (from
    its checked options) and passed to every ``Client.submit`` of it. The fields become the call
    header's (``protocol.CallHeader``); ``label`` names the call in errors and output."""

    label: str = "call"
    cpus: float = 1.0
    gpus: float = 0.0
    memory: int = 0              # bytes reserved
    retries: int = 0
    timeout: float = 0.0         # seconds, 0 = none
    max_containers: int = 0      # 0 = no cap
    min_warm: int = 0
    concurrency: int = 0         # ACTOR_NEW: the instance's threads (0 or 1: one call at a time)
    window: int = 0              # stream: items made ahead of the consumer
    stream: bool = False         # a generator: .remote() gives a Stream of its items
    gang: int = 0                # GANG: the number of members

    def __post_init__(self):  # the header's types, whatever numbers the caller gave
        for name, kind in _OPTION_TYPES:
            object.__setattr__(self, name, kind(getattr(self, name) or 0))


_OPTION_TYPES = (("cpus", float), ("gpus", float), ("memory", int), ("retries", int), ("timeout", float),
                 ("max_containers", int), ("min_warm", int), ("concurrency", int), ("window", int), ("gang", int))
DEFAULT_OPTIONS = CallOptions()


# What a Future's call sent (``Future._sub``), kept until its outcome: a restarted broker gets
# it again. A plain tuple ``(head, code_hash, code_blob, body, deps)``, not a NamedTuple: the cyclic
# GC stops tracking a tuple of immutable parts, so a pending call costs its walks one object (its
# Future), not three. ``head``: the packed CallHeader, never with HAS_CODE (the code goes with
# whichever SUBMIT of ``code_hash`` is first on this connection); ``body``: the frames after the
# command frame and the code ((deps), payload, *buffers, (gang)), a tuple; ``deps``: the Futures it
# refers to, pinned until it is sent, or None.
Submission = tuple


class Client:
    def __init__(self, address: str, *, shm: bool = False, connect_timeout: float = 10.0, name: str = "",
                 broker_proc=None, supervised: bool = False):
        """``broker_proc``: the broker's ``subprocess.Popen`` when this process started it (the
        embedded cluster): its exit is known at once, and with no ``supervised`` restart coming,
        fails the pending calls at once instead of after ``FABRIC_BROKER_TIMEOUT``."""
        self.address = address
        self.id = P.new_id()
        self.ctx = zmq.Context()
        did, rid = P.driver_ids(self.id)
        self.d = self._socket(did, watch=True)  # its handshake is watched until polled below
        self.r = self._socket(rid)
        self.rpoll = zmq.Poller()  # kept: Socket.poll() would build a Poller each time
        self.rpoll.register(self.r, zmq.POLLIN)
        self.lock = threading.Lock()                   # the d socket, _pin, code_sent
        self.cond = threading.Condition(threading.Lock())  # Future states
        self.pending: dict[bytes, Future] = {}
        self.code_sent: set[bytes] = set()
        self.to_release: list[Future] = []
        self.dropped: collections.deque[bytes] = collections.deque()  # ids of dropped put() objects
        self.dropped_actors: collections.deque[bytes] = collections.deque()  # instances with no handle left
        self.streams: dict[bytes, _StreamState] = {}   # generator calls whose items we take, by call id
        self.woken: list[_StreamState] = []            # streams that got items in this receive
        self.dropped_streams: collections.deque[bytes] = collections.deque()  # dropped unfinished: cancel
        # Futures inside argument values (docs/guarantees.md "Futures inside values"):
        self.borrowed: dict[bytes, int] = {}           # own result id -> pending calls that hold it: not released
        self.borrowing: dict[bytes, list] = {}         # call id -> the Futures inside its arguments
        # result id -> a Future that came inside an argument; unfetched: the same, not asked for yet
        # (FETCH on the first wait)
        self.lent_here: weakref.WeakValueDictionary[bytes, Future] = weakref.WeakValueDictionary()
        self.unfetched: weakref.WeakValueDictionary[bytes, Future] = weakref.WeakValueDictionary()
        self._counter = itertools.count(1)
        self.transfer = serde.Transfer(address)            # large payloads through the object store?
        self.closed = False
        self.log_to_driver = True
        self.rlock = threading.Lock()                  # whoever holds it receives on r
        self.last_user = 0.0                           # when a user thread last waited
        self.last_flush = 0.0
        self.outq: list[list] = []                     # submits of a burst, not sent yet
        self.last_submit = 0.0
        self.last_beat = 0.0
        self.epoch = b""                               # the broker's; a new one means it restarted
        self.puts: weakref.WeakValueDictionary[bytes, Future] = weakref.WeakValueDictionary()  # re-sent on restart
        self.rejoins = 0
        self.batches_sent = 0  # BATCH messages sent (tests check bursts are batched)
        self.extra_outcomes = 0  # outcomes for ids that had one already: must stay 0 (loadtests/soak.py)
        self.broker_timeout = _env_seconds("FABRIC_BROKER_TIMEOUT", BROKER_TIMEOUT)
        self.broker_proc, self.supervised = broker_proc, supervised
        self.heard = time.monotonic()                  # when anything last arrived from the broker
        self.polled = self.heard                       # when a thread last polled the result socket
        self.answers_beats = False                     # the broker answers HEARTBEATs (WELCOME says)
        self.gone: ConnectionFailed | None = None      # set while the broker is declared gone
        self.abandoned: set[bytes] = set()             # ids failed that way: a late outcome is dropped
        self.last_check = 0.0
        # the watchdog of calls that wait for resources no executor has free (_watch_waits)
        self.watch_prev: set[bytes] = set()
        self.watch_at = time.monotonic()
        self.warned: dict[tuple, float] = {}           # shape -> when it was last warned about
        self.watching = False
        self.spilled = Spilled()                       # store copies of large put() objects
        hello = P.dumps_json({"pid": os.getpid(), "host": os.uname().nodename, "name": name,
                              "worker": settings.get().worker_id})  # a nested driver's worker
        for s in (self.d, self.r):
            security.send_first(s, [P.C[P.HELLO], hello])  # (not sent: refused, poll() says so below)
        for s in (self.d, self.r):
            if not security.poll(s, connect_timeout):  # False at once if the broker refused our key
                self._close_sockets()
                raise security.refusal(s) or ConnectionFailed(
                    f"no fabric broker answered at {address} within {connect_timeout:g}s; "
                    f"is the cluster running (`fabric start`)?")
            msg = s.recv_multipart()
            if P.command_of(msg[0]) != P.WELCOME:
                self._close_sockets()
                raise ConnectionFailed(f"the broker at {address} refused this driver: {msg[-1][:200]!r}")
            info = P.loads_json(msg[1])
            self.epoch = str(info.get("epoch", "")).encode()
            self.answers_beats = bool(info.get("heartbeat"))
        self.heard = time.monotonic()
        # made once the broker took us (its arena file would outlive a refused driver)
        self.shm = serde.ShmPool("/dev/shm") if shm and os.path.isdir("/dev/shm") else None
        self.arena_told = False                        # ARENA sent to this broker (again after a rejoin)
        self.io = threading.Thread(target=self._io_loop, name="fabric-io", daemon=True)
        self.io.start()

    def _socket(self, ident, watch=False):
        s = self.ctx.socket(zmq.DEALER)
        security.curve_client(s, watch=watch, address=self.address)  # CurveZMQ: tcp://, or FABRIC_KEYS
        s.setsockopt(zmq.ROUTING_ID, ident)
        s.setsockopt(zmq.LINGER, 1000)
        s.setsockopt(zmq.SNDHWM, 0)
        s.setsockopt(zmq.RCVHWM, 0)
        s.connect(self.address)
        return s

    # ------------------------------------------------------------------ submitting
    def new_id(self) -> bytes:
        return self.id + next(self._counter).to_bytes(8, "big")

    def submit(self, kind, code_blob, code_hash, args, kwargs, options: "CallOptions | None" = None,
               actor_id=P.NO_ID) -> Any:
        """Send one call; returns its Future. ``options.gang=n`` (kind GANG): one SUBMIT for n
        members, returns their n Futures in rank order (rank 0's id is the call's id)."""
        o = options or DEFAULT_OPTIONS
        label = o.label
        if self.closed:
            raise ConnectionFailed("this fabric client is shut down; call fabric.init() again")
        if self.gone is not None:
            raise ConnectionFailed(f"{label}: {self.gone}")
        if len(self.pending) >= MAX_PENDING and threading.current_thread() is not self.io:
            self._throttle()
        cid = self.new_id()
        deps: list[Future] = []
        held: list[Future] = []
        shm_used: list = []
        tops = None

        def on_ref(f):
            # a Future given as an argument itself is resolved before the call runs; one inside an
            # argument's value arrives as a Future (as in Ray). (Which are which is worked out at
            # the first Future met: most calls have none.)
            nonlocal tops
            if tops is None:
                tops = {id(a) for a in (*args, *kwargs.values()) if isinstance(a, Future)}
            return self._ref(f, deps) if id(f) in tops else self._nested(f, held)

        try:
            payload, bufs = serde.dumps_args(args, kwargs, ref_type=Future, shm_pool=self.shm, shm_used=shm_used,
                                             transfer=self.transfer, on_ref=on_ref)
        except BaseException:
            self._unpin(deps)
            self._unborrow(held)
            if shm_used and self.shm is not None:
                self.shm.give_back(shm_used, reuse=False)
            raise
        fut = Future(cid, self, label)
        if held:
            self.borrowing[cid] = held
        if shm_used:
            fut._shm = shm_used
        opts = (P.HAS_DEPS if deps else 0) | self.transfer.result_opts() | (P.STREAM if o.stream else 0)
        body = [b"".join(f.id for f in deps), payload, *bufs] if deps else [payload, *bufs]  # after the header
        members = None
        if o.gang:  # the members' call ids follow the buffers, rank 0 (this call's id) first
            members = [fut] + [Future(self.new_id(), self, f"{label}[rank {r}]") for r in range(1, o.gang)]
            fut.label = f"{label}[rank 0]"
            body.append(b"".join(f.id for f in members))
            opts |= P.HAS_GANG
            for f in members[1:]:
                self.pending[f.id] = f
        head = P.CallHeader.of(cid, code_hash, kind, actor_id, o.cpus, o.gpus, o.memory, o.retries, o.timeout,
                               len(bufs), o.max_containers, o.min_warm, o.concurrency, o.window, opts).pack()
        self.pending[cid] = fut
        if o.stream:  # its items may come before .remote() returns
            self.streams[cid] = _StreamState(fut, self, o.window)
        fut._sub = (head, code_hash, code_blob, tuple(body), deps or None)  # a Submission
        if members:
            for f in members[1:]:  # any member still pending re-sends the gang's one SUBMIT
                f._sub = fut._sub
        with self.lock:
            parts = self._submit_message(fut._sub)
            now = time.perf_counter()
            if self.outq or now - self.last_submit < BURST_GAP:
                self.outq.append(parts)  # a burst: batch it (flushed by size, wait() or the IO thread)
                if len(self.outq) >= BATCH_MAX:
                    self._flush_out()
            else:
                P.send(self.d, parts)
            self.last_submit = now
            for f in deps:
                f._pin -= 1
        return members if o.gang else fut

    def _submit_message(self, sub: "Submission") -> list:
        """The SUBMIT message of ``Future._sub``, with the code if this connection has not sent
        it yet (caller holds self.lock)."""
        head, code_hash, code_blob, body, _ = sub
        if code_blob is not None and code_hash not in self.code_sent:
            self.code_sent.add(code_hash)
            return [P.C[P.SUBMIT] + P.CallHeader.read(head).pack(P.HAS_CODE), code_blob, *body]
        return [P.C[P.SUBMIT] + head, *body]

    def _throttle(self):
        """Backpressure: wait until the pending calls are down to 90% of MAX_PENDING."""
        low = MAX_PENDING * 9 // 10
        log.info("%d calls pending: .remote() waits for some to finish (FABRIC_MAX_PENDING)", len(self.pending))
        while len(self.pending) > low:
            if self.closed:
                raise ConnectionFailed("the fabric client was shut down while waiting to submit")
            if self.gone is not None:
                raise ConnectionFailed(str(self.gone))
            self._wait_round(0.05)

    def _rejoin(self, info: dict):
        """The broker restarted (a new epoch) or had dropped us: send again every call we still
        wait for, in submission order, and every put() object still alive. The broker runs
        only the ids it does not hold, and answers the others with their kept outcome."""
        with self.lock:
            epoch = str(info.get("epoch", "")).encode()
            why = "restarted" if epoch != self.epoch else "had dropped this driver and took it back"
            self.epoch = epoch
            self.rejoins += 1
            self.code_sent.clear()
            self.arena_told = False
            if self.outq:
                self._flush_out()
            if self.abandoned:  # failed here as lost: a journal may still hold them; nobody waits
                ids = b"".join(self.abandoned)
                P.send(self.d, [P.C[P.CANCEL], ids])
                P.send(self.d, [P.C[P.RELEASE], ids])
            puts = list(self.puts.items())
            for cid, fut in puts:
                P.send(self.d, self._put_message(cid, fut._value))
            subs = list({id(f._sub): f._sub for f in list(self.pending.values()) if f._sub is not None}.values())
            again = set()
            for sub in subs:  # Future arguments already done here: the new broker may not hold them
                for dep in sub[4] or ():
                    if (dep._state == _DONE and dep._status == P.OK and dep.id not in self.pending
                            and type(dep) is not ReadyFuture and dep.id not in again):
                        again.add(dep.id)
                        P.send(self.d, self._put_message(dep.id, dep._outcome()))
            fetch = [cid for cid, f in list(self.pending.items()) if f._sub is None]
            if fetch:  # borrowed Futures being read: asked again (their owners keep them held)
                P.send(self.d, [P.C[P.FETCH], b"".join(fetch)])
            for sub in subs:
                self.outq.append(self._submit_message(sub))
                if len(self.outq) >= BATCH_MAX:
                    self._flush_out()
            self._flush_out()
        log.warning("the fabric broker at %s %s: re-sent %d pending calls and %d stored objects",
                    self.address, why, len(subs), len(puts))

    def flush(self):
        """Send the buffered submits now, not at the IO thread's next turn (``api.flush``)."""
        if self.outq:
            with self.lock:
                if self.outq:
                    self._flush_out()

    def _flush_out(self):
        """Send buffered submits (caller holds self.lock): one BATCH message for all of them."""
        q, self.outq = self.outq, []
        if len(q) == 1:
            P.send(self.d, q[0])
        elif q:
            P.send(self.d, [P.C[P.BATCH], *[p for m in q for p in m]])
            self.batches_sent += 1

    def _send_d(self, parts):
        """Any other message on the submit socket: after the buffered submits, in order."""
        with self.lock:
            if self.outq:
                self._flush_out()
            P.send(self.d, parts)

    def _put_message(self, cid, value):
        """The PUT message for one object (serialised, maybe spilled to the store: no lock held).

        An object of ``FABRIC_PUT_SPILL`` bytes or more (or, across hosts, of the transfer
        threshold) goes to the object store instead of the broker's memory; the store's copy is
        deleted when the last put() Future holding that content is dropped."""
        _tls.putting = True
        try:
            payload, bufs = serde.dumps_value(value)
        finally:
            _tls.putting = False
        total = len(payload) + sum(memoryview(b).nbytes for b in bufs)
        t = self.transfer
        if t.allowed() and (total >= PUT_SPILL or (total >= t.threshold and t.wanted())):
            keys: list = []
            payload, bufs = serde.spill(payload, bufs, min(t.threshold, PUT_SPILL), keys_out=keys)
            self.spilled.add(cid, keys)
        return [P.C[P.PUT] + P.pack_result(cid, P.OK, len(bufs)), payload, *bufs]

    def _ref(self, f: Future, deps: list):
        """How a Future inside arguments is pickled: by value if done, else as a reference."""
        if f._client is not self:
            if f._client is None or f._state == _DONE:
                return _identity, (f.result(),)
            raise SerializationError("a Future from another fabric connection cannot be passed to this one")
        if type(f) is Part:
            return self._ref_part(f, deps)
        with self.lock:
            if f._state != _DONE or type(f) is ReadyFuture:  # put() objects always go by reference
                f._pin += 1
                deps.append(f)
                return serde._dep, (f.id,)
        if f._status == P.OK:
            return _identity, (f._outcome(),)
        try:
            f._outcome()  # a failed argument: the call fails at once, with the argument's error
        except BaseException as e:  # noqa: BLE001
            raise serde.PassThrough(e) from None

    def _nested(self, f: Future, held: list):
        """How a Future inside an argument's value is pickled: done here, with its outcome;
        else (and a fabric.put object always) as a reference the worker reads from the cluster
        (``_borrowed``, FETCH). This driver holds such a result there, unreleased, until the
        call has its outcome (``borrowed``), and keeps the Future alive as long."""
        src = f._parent if type(f) is Part else f
        if src._client is not self and src._client is not None and src._state != _DONE:
            raise SerializationError(f"{f.label}: a Future from another fabric connection (another driver, or "
                                     f"one shut down) cannot be passed to this one; pass its result instead")
        if src._client is self:
            with self.lock:
                if src._state != _DONE or type(src) is ReadyFuture:
                    held.append(src)
                    if src.id[:8] == self.id and type(src) is not ReadyFuture:
                        self.borrowed[src.id] = self.borrowed.get(src.id, 0) + 1
                    if type(f) is Part:
                        return _borrowed_part, (src.id, src.label, f._index, f._n)
                    return _borrowed, (src.id, src.label)
        v = f._decode() if type(f) is Part else _NOTHING
        if v is _NOTHING:
            try:
                v = f._outcome()
            except Exception as e:  # noqa: BLE001 - a failed Future travels failed
                v = _Raise(e)
        if isinstance(v, _Raise):
            return _done_future, (f.id, f.label, False, v.exc)
        return _done_future, (f.id, f.label, True, v)

    def _unborrow(self, held):
        """The call that held these Futures has its outcome (or was never sent)."""
        if not held:
            return
        with self.lock:
            for f in held:
                n = self.borrowed.get(f.id, 0) - 1
                if n > 0:
                    self.borrowed[f.id] = n
                else:
                    self.borrowed.pop(f.id, None)

    def borrow(self, cid: bytes, label: str) -> Future:
        """The Future here for a result id that came inside an argument (one per id while it lives)."""
        f = self.pending.get(cid) or self.lent_here.get(cid)
        if f is None:
            f = Future(cid, self, label)
            self.lent_here[cid] = self.unfetched[cid] = f
        return f

    def _fetch(self, futs):
        """Ask the broker for the results of borrowed Futures about to be waited for."""
        ids = []
        for f in futs:
            if self.unfetched.pop(f.id, None) is not None:
                self.pending[f.id] = f
                ids.append(f.id)
        if ids:
            self._send_d([P.C[P.FETCH], b"".join(ids)])

    def _ref_part(self, f: "Part", deps: list):
        """One of a num_returns call's values: a reference to that call's result, which the
        worker indexes (``serde._dep_part``), or its value once the call is done."""
        p = f._parent
        with self.lock:
            if p._state != _DONE:
                p._pin += 1
                deps.append(p)
                return serde._dep_part, (p.id, f._index, f._n)
        v = f._decode()
        if isinstance(v, _Raise):
            raise serde.PassThrough(v.exc)
        return _identity, (v,)

    def _item(self, head: P.ResultHeader, idx: int, frames):
        """ITEM ``idx`` of a stream: a done Future for it, kept in order until the consumer takes
        it. An index already received is a retried call's repeat: skipped, and at its first item
        the worker is told again how many items were taken (it starts from none)."""
        cid = head.call_id
        st = self.streams.get(cid)
        if st is None:
            return  # the stream was dropped or closed
        if idx != st.received:
            if idx == 0 and st.consumed:
                self._send_d([P.C[P.CONSUMED] + cid + st.consumed.to_bytes(8, "big")])
            return
        st.received += 1
        it = Future(cid, self, f"{st.fut.label}[{idx}]")
        it._state, it._status, it._frames = _DONE, P.OK, frames
        st.items.append(it)
        self.woken.append(st)

    def _wake_streams(self):
        woken, self.woken = self.woken, []
        with self.cond:
            self.cond.notify_all()
        for st in woken:
            st.wake()

    def _stream_dropped(self, st):
        """(a finalizer: any thread, maybe inside a send) A stream was dropped: the IO thread
        cancels its call if it has not ended."""
        self.streams.pop(st.fut.id, None)
        if st.fut._state != _DONE and not st.closed:
            self.dropped_streams.append(st.fut.id)

    def _unpin(self, deps):
        with self.lock:
            for f in deps:
                f._pin -= 1

    def put(self, value) -> Future:
        if self.gone is not None:
            raise ConnectionFailed(f"fabric.put: {self.gone}")
        cid = self.new_id()
        self._send_d(self._put_message(cid, value))
        fut = ReadyFuture(cid, self, "fabric.put", value)
        self.puts[cid] = fut
        # the IO thread sends the release: a finalizer may run inside any send, on any thread
        weakref.finalize(fut, self.dropped.append, cid)
        return fut

    def cancel(self, fut: Future):
        self._send_d([P.C[P.CANCEL], fut.id])

    def kill_actor(self, actor_id: bytes, now: bool):
        if self.closed:
            return
        self._send_d([P.C[P.KILL_ACTOR], actor_id, b"1" if now else b"0"])

    def status(self, timeout=5.0) -> dict:
        """The broker's view of the cluster (what ``fabric status`` prints)."""
        from .control import request  # lazily: the STATUS schema is not needed to make calls

        return request(self.address, P.STATUS, timeout=timeout, ctx=self.ctx)

    # ------------------------------------------------------------------ waiting and receiving
    # Leader/follower on the result socket: a thread that waits for results receives them itself
    # (no thread hand-off on the sync path); the IO thread receives only while no user thread
    # has waited for USER_IDLE seconds, for callbacks, ``await`` and worker output.
    def wait(self, futures, num_returns, timeout):
        todo = [f for f in futures if f._state != _DONE]
        need = num_returns - (len(futures) - len(todo))
        if self.unfetched and todo:
            self._fetch(todo)
        # inside a call, its CPUs are lent out while it waits (docs/guarantees.md)
        blocking = _futures.blocking
        blocked = need > 0 and blocking is not None and (timeout is None or timeout > 0) and blocking.block()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while need > 0:
                if self.closed:
                    raise ConnectionFailed("the fabric client was shut down while waiting for results")
                left = 0.05 if deadline is None else min(0.05, deadline - time.monotonic())
                if left <= 0:
                    return
                self._wait_round(left, todo)
                still = [f for f in todo if f._state != _DONE]
                need -= len(todo) - len(still)
                todo = still
        finally:
            if blocked:
                blocking.unblock(blocked)

    def _wait_round(self, left, todo=()):
        """One round of a user thread's waiting: send what is buffered, release what can be,
        then receive for up to ``left`` seconds, or, while another thread receives, wait for it
        (unless one of ``todo`` is done already)."""
        self.last_user = now = time.monotonic()
        if self.outq:
            with self.lock:
                self._flush_out()
        if self.dropped or self.dropped_actors or (self.to_release and now - self.last_flush > 0.05):
            self._flush_releases()  # dropped instances free resources this wait may need
        if self.rlock.acquire(blocking=False):
            try:
                self._pump(left)
            finally:
                self.rlock.release()
        else:
            with self.cond:
                if all(f._state != _DONE for f in todo):
                    self.cond.wait(min(left, 0.005))

    def _io_loop(self):
        while not self.closed:
            try:
                if self.outq and time.perf_counter() - self.last_submit > 0.001:
                    with self.lock:  # a burst nobody waits for yet: sent within ~1-10 ms
                        self._flush_out()
                if time.monotonic() - self.last_user < USER_IDLE:
                    time.sleep(0.001 if self.outq else 0.01)
                elif self.rlock.acquire(timeout=0.01):
                    try:
                        self._pump(0.01)
                    finally:
                        self.rlock.release()
                now = time.monotonic()
                if (self.to_release or self.dropped or self.dropped_actors or self.dropped_streams) \
                        and now - self.last_flush > 0.05:
                    self._flush_releases()
                if now - self.last_beat > HEARTBEAT_EVERY:  # the broker drops a driver it has not heard from
                    self.last_beat = now
                    self._send_d([P.C[P.HEARTBEAT], self.epoch])
                if WAIT_WARN > 0 and now - self.watch_at > WAIT_WARN and not self.watching:
                    self.watch_at = now
                    self._watch_waits(now)
                if now - self.last_check > 0.1:
                    self.last_check = now
                    self._check_broker(now)
                    if self.shm is not None and self.shm.arena_ready and not self.arena_told:
                        self.arena_told = True  # idle workers on this host map it ahead (broker/arenas.py)
                        self._send_d([P.C[P.ARENA], P.dumps_json({"path": self.shm.arena_path,
                                                                    "bytes": self.shm.arena_ready})])
            except zmq.ZMQError:
                if self.closed:
                    return
                raise

    def _pump(self, timeout):
        """Receive what has arrived (waiting up to ``timeout``) and complete its Futures."""
        r = self.r
        ready = self.rpoll.poll(timeout * 1000)
        self.polled = time.monotonic()  # someone receives: the silence measured is real
        if not ready:
            return
        batch = P.recv_batch(r, 1000)
        self.heard = self.polled  # (once per batch: the broker is alive)
        if self.gone is not None and batch:
            self._back()
        result_cmd, read_result = P.C[P.RESULT], P.ResultHeader.read
        done, rejoin = [], []
        pending = self.pending
        for frames in batch:  # output first: it was printed before the result it precedes
            f0 = frames[0].bytes
            c = f0[:4]
            if c == result_cmd:
                h = read_result(f0, 4)
                fut = pending.pop(h.call_id, None)
                if fut is not None:
                    fut._frames, fut._status, fut._flags, fut._sub = frames[1:], h.status, h.flags, None
                    done.append(fut)
                else:
                    self._unexpected(h.call_id)
            elif c == P.C[P.BATCH]:
                for c2, head, h, fr in P.unbatch(frames):
                    if c2 == P.ITEM:
                        self._item(h, P.item_index(head), fr)
                        continue
                    fut = pending.pop(h.call_id, None)
                    if fut is not None:
                        fut._frames, fut._status, fut._flags, fut._sub = fr, h.status, h.flags, None
                        done.append(fut)
                    else:
                        self._unexpected(h.call_id)
            elif c == P.C[P.ITEM]:
                self._item(read_result(f0, 4), P.item_index(f0[4:]), frames[1:])
            elif c == P.C[P.LOG]:
                if self.log_to_driver:
                    self._print_output(frames[1].bytes, frames[2].bytes)
            elif c == P.C[P.WELCOME]:
                rejoin.append(P.loads_json(frames[1].bytes))
            elif c == P.C[P.ERROR]:
                log.warning("the broker refused a message: %s", frames[1].bytes.decode("utf-8", "replace"))
        if self.woken:
            self._wake_streams()
        if rejoin:
            self._rejoin(rejoin[-1])
        if not done:
            return
        self._complete(done)
        self.to_release.extend(done)
        if len(self.to_release) >= 512:
            self._flush_releases()

    def _complete(self, done):
        """Mark Futures done, wake their waiters, run their callbacks."""
        with self.cond:
            for fut in done:
                fut._state = _DONE
            self.cond.notify_all()
        if self.borrowing:
            for fut in done:
                held = self.borrowing.pop(fut.id, None)
                if held:
                    self._unborrow(held)
        for fut in done:
            if fut._shm:
                reuse = fut._status == P.OK and bool(fut._flags & P.SHM_FREE)
                self.shm.give_back(fut._shm, reuse=reuse)
                fut._shm = None
            if fut._callbacks:
                for cb in fut._callbacks:
                    try:
                        cb(fut)
                    except Exception:  # noqa: BLE001
                        log.exception("a Future callback raised")
                fut._callbacks = None

    def _unexpected(self, cid):
        """An outcome for an id not pending: a call failed as lost with its broker (dropped and
        released), or a duplicate (counted: it must never happen)."""
        if cid in self.abandoned:
            self.abandoned.discard(cid)
            self.dropped.append(cid)
        else:
            self.extra_outcomes += 1

    # ------------------------------------------------------------------ broker liveness
    def _check_broker(self, now):
        """IO thread, every 0.1 s: is the broker gone? Then fail what waits on it."""
        if self.gone is not None:
            if self.pending:  # submitted while it was being declared gone
                self._fail_pending()
            return
        why = None
        p = self.broker_proc
        if p is not None and not self.supervised and p.poll() is not None:
            code = p.returncode
            how = f"signal {-code}" if code < 0 else f"exit code {code}"
            why = (f"the embedded fabric broker at {self.address} (pid {p.pid}) exited with {how}; "
                   f"nothing was heard from it for {now - self.heard:.1f}s; call fabric.shutdown() "
                   f"and fabric.init() to start a new cluster")
        elif self.answers_beats and now - self.heard > self.broker_timeout:
            # only while someone receives: a thread stuck in a callback, or this one stalled,
            # may not have read what arrived meanwhile
            if now - self.polled > 0.5:
                if not self.rlock.acquire(blocking=False):
                    return
                try:
                    self._pump(0)
                finally:
                    self.rlock.release()
                now = time.monotonic()
                if now - self.heard <= self.broker_timeout:
                    return
            why = (f"the fabric broker at {self.address} has not answered for {now - self.heard:.1f}s "
                   f"(FABRIC_BROKER_TIMEOUT={self.broker_timeout:g}s): it is gone, or unreachable; "
                   f"the call's outcome is unknown")
        if why is None:
            return
        log.error("%s: failing %d pending calls; new calls fail until a broker answers", why, len(self.pending))
        self.gone = ConnectionFailed(why)
        self._fail_pending()

    def _fail_pending(self):
        with self.rlock:  # no pump completes a Future meanwhile
            failed = []
            for cid in list(self.pending):
                fut = self.pending.pop(cid, None)
                if fut is None:
                    continue
                fut._status, fut._frames, fut._sub = P.CRASHED, None, None
                fut._value = _Raise(ConnectionFailed(f"{fut.label}: {self.gone}"))
                self.abandoned.add(cid)
                failed.append(fut)
            self._complete(failed)

    def _back(self):
        """A broker answers again after it was declared gone: new calls work again. The calls
        failed meanwhile are cancelled there (a journal may hold them; nobody waits for them)."""
        log.warning("the fabric broker at %s answers again; new calls go through", self.address)
        self.gone = None
        if self.abandoned:
            ids = b"".join(self.abandoned)
            self._send_d([P.C[P.CANCEL], ids])
            self._send_d([P.C[P.RELEASE], ids])

    def _watch_waits(self, now):
        """Every WAIT_WARN seconds (IO thread): the plain calls and new instances pending at the
        last look and still pending have waited that long. If some wait for resources that no
        executor has free, a STATUS (in a thread of its own, so no slow answer holds this loop)
        tells why, and the driver logs it, once per shape per 6 looks. Costs a set of the
        pending ids per look, and the headers of at most 1,000 of the old ones (a backlog of
        100,000 has few shapes); nothing on the call path."""
        prev, self.watch_prev = self.watch_prev, set(self.pending)
        waiting: dict[tuple, list] = {}
        for cid in itertools.islice(prev & self.watch_prev, 1000):
            f = self.pending.get(cid)
            sub = f._sub if f is not None else None
            if not sub:
                continue
            h = P.CallHeader.read(sub[0])
            shape = (h.cpus, h.gpus, h.memory)
            if h.kind in (P.TASK, P.ACTOR_NEW) and now - self.warned.get(shape, -1e18) >= 6 * WAIT_WARN:
                waiting.setdefault(shape, []).append(f.label)
        if waiting:
            self.watching = True
            threading.Thread(target=self._warn_starved, args=(waiting,), name="fabric-wait-watch", daemon=True).start()

    def _warn_starved(self, waiting):
        from .resources import starved

        try:
            found = starved(waiting, self.status(timeout=5))
        except Exception:  # noqa: BLE001 - a broker too slow to answer is reported by _check_broker
            found = []
        finally:
            self.watching = False
        for shape, msg in found:
            self.warned[shape] = time.monotonic()
            log.warning("fabric: %s (waited over %gs: FABRIC_WAIT_WARN)", msg, WAIT_WARN)

    def fate(self) -> str:
        """What a GetTimeout says about the call: it is still on the cluster only if the broker is there
        (queued or running: the driver is not told when a call starts)."""
        silent = time.monotonic() - self.heard
        if self.gone is None and (silent < min(2.5 * HEARTBEAT_EVERY, self.broker_timeout / 2)
                                  or not self.answers_beats):
            return "it keeps running, or waits for a place, on the cluster"
        return (f"the broker at {self.address} has not answered for {silent:.0f}s: if it is gone, "
                f"the call fails with ConnectionFailed after FABRIC_BROKER_TIMEOUT={self.broker_timeout:g}s")

    def _flush_releases(self):
        self.last_flush = time.monotonic()
        keep, ids = [], []
        while self.dropped:
            ids.append(self.dropped.popleft())
        if self.spilled and ids:
            self.spilled.forget(ids)
        with self.lock:
            if self.outq:
                self._flush_out()
            borrowed, me = self.borrowed, self.id
            for f in self.to_release:
                if f._pin or f.id in borrowed:  # a call being sent, or one running, may read it
                    keep.append(f)
                elif f.id[:8] == me:  # (one that came inside an argument is its owner's to release)
                    ids.append(f.id)
            self.to_release = keep
            if self.closed:
                return
            if ids:
                self.d.send_multipart([P.C[P.RELEASE], b"".join(ids)])
            while self.dropped_actors:
                self.d.send_multipart([P.C[P.KILL_ACTOR], self.dropped_actors.popleft(), b"0"])
            if self.dropped_streams:  # not force, recursive: the generator stops before its next item
                ids = []
                while self.dropped_streams:
                    ids.append(self.dropped_streams.popleft())
                self.d.send_multipart([P.C[P.CANCEL], b"".join(ids), b"\x02"])

    def _print_output(self, source: bytes, text: bytes):
        prefix = "(" + source.decode("utf-8", "replace") + ") "
        lines = text.decode("utf-8", "replace").splitlines()
        out = sys.stdout
        try:
            out.write("".join(prefix + line + "\n" for line in lines))
            out.flush()
        except (OSError, ValueError):
            pass

    # ------------------------------------------------------------------ closing
    def close(self):
        if self.closed:
            return
        try:
            with self.lock:
                self._flush_out()
                self.d.send_multipart([P.C[P.BYE]], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        self.closed = True
        with self.cond:
            self.cond.notify_all()
        self.io.join(2)
        if self.shm is not None:
            for f in list(self.pending.values()):
                if f._shm:
                    self.shm.give_back(f._shm, reuse=False)
            self.shm.close()
        self.spilled.close()  # this driver's put() objects end with it
        self._close_sockets()

    def _close_sockets(self):
        self.d.close(linger=500)
        self.r.close(linger=0)
        self.ctx.term()


def _env_seconds(name, default):
    v = settings.of(name)
    if v is None or v == "":
        return default
    try:
        t = float(v)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, got {v!r}") from None
    if not t > 0:
        raise ValueError(f"{name} must be a number of seconds above 0, got {v!r}")
    return t


def _identity(x):
    return x
