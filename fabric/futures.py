"""A driver's Futures and Streams: the outcome of one call, or the items of a generator call.

A Future is completed by its connection (``fabric.connection.Client``), which receives its
result as raw frames; the value is unpickled lazily, by the first thread that asks for it.
``Part`` is one value of a ``num_returns=n`` call, ``ReadyFuture`` a ``fabric.put`` object,
``Stream`` the items of a generator call. Futures that travel inside an argument's value are
rebuilt on the other side by ``_done_future`` and ``_borrowed`` (pickled by reference: their
module path is part of the payload between a driver and its workers, so it stays here).
"""
from __future__ import annotations

import collections
import logging
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

from . import protocol as P
from . import serde
from .errors import (ActorDied, Cancelled, ConnectionFailed, FabricError, GetTimeout, ProtocolError,
                     SerializationError, TaskTimeout, Unschedulable, WorkerCrashed, GangFailed,
                     MemoryLimitExceeded)

if TYPE_CHECKING:
    from .connection import Client

log = logging.getLogger("fabric.client")

_ERRORS = {P.CRASHED: WorkerCrashed, P.TIMEOUT: TaskTimeout, P.CANCELLED: Cancelled,
           P.UNSCHEDULABLE: Unschedulable, P.SERIALIZATION: SerializationError, P.ACTOR_DIED: ActorDied,
           P.REFUSED: ProtocolError, P.GANG_FAILED: GangFailed,
           P.OUT_OF_MEMORY: MemoryLimitExceeded}
_PENDING, _DONE = 0, 1
# In a worker process, the worker (fabric.executor.worker): its block()/unblock() frame a wait of
# a nested driver, so the broker lends the waiting call's CPUs out. None in a plain driver.
blocking: Any = None
_NOTHING = object()


class Future:
    """The eventual outcome of one call. ``result()``, ``done()``, ``cancel()``, ``await fut``."""

    __slots__ = ("id", "_client", "_state", "_status", "_flags", "_frames", "_value", "_callbacks", "label",
                 "_shm", "_pin", "_sub", "__weakref__")

    def __init__(self, cid: bytes, client: "Client | None", label: str):
        self.id = cid
        self._client = client
        self._state = _PENDING
        self._status: int | None = None
        self._flags = 0  # the result header's flags (SHM_FREE)
        self._frames: list | None = None
        self._value: Any = _NOTHING
        self._callbacks: list | None = None
        self.label = label
        self._shm: list | None = None
        self._pin = 0
        self._sub: Any = None  # what was submitted (a connection.Submission), kept until the outcome:
        # re-sent to a restarted broker. (A done Future keeps no header object: each one is a
        # container the cyclic GC scans for as long as the user holds the Future.)

    def __repr__(self):
        state = "pending" if self._state == _PENDING else ("ok" if self._status == P.OK else "failed")
        return f"<fabric.Future {self.label} {state}>"

    def __reduce__(self):
        """Reached when a Future is pickled outside a call's arguments (which reference it):
        inside a call's result or item it travels as its outcome, waited for here first, so a
        Future returned inside a value resolves where it lands (the call ends when the Futures
        it returns do). A fabric.put object cannot hold one (nothing would wait for it)."""
        if getattr(_tls, "putting", False):
            raise SerializationError("a fabric.Future is not stored inside other pickled data (fabric.put); "
                                     "pass the Future to calls, or put its result")
        try:
            ok, v = True, self.result()
        except Exception as e:  # noqa: BLE001 - the outcome travels as it is: the reader gets this error
            ok, v = False, e
        return _done_future, (self.id, self.label, ok, v)

    def done(self) -> bool:
        return self._state == _DONE

    def result(self, timeout: float | None = None):
        """The call's return value; raises what the call raised, or a FabricError."""
        if self._state != _DONE:
            c = self._client  # (only a done Future has none)
            assert c is not None
            c.wait([self], 1, timeout)
            if self._state != _DONE:
                raise GetTimeout(f"{self.label} did not finish within {timeout}s ({c.fate()})")
        return self._outcome()

    def exception(self, timeout: float | None = None):
        try:
            self.result(timeout)
        except GetTimeout:
            raise
        except BaseException as e:  # noqa: BLE001
            return e
        return None

    def cancel(self) -> bool:
        """Ask the cluster to cancel the call. False if it already finished. A queued call is
        dropped; a running plain call has its worker killed; a running instance call finishes."""
        if self._state == _DONE or self._client is None:
            return False
        self._client.cancel(self)
        return True

    def add_done_callback(self, fn):
        """Call ``fn(future)`` when done: on whichever fabric thread received the result (the IO
        thread, or a user thread waiting for results), or at once if already done."""
        c = self._client
        if c is not None:
            if c.unfetched and self._state != _DONE:
                c._fetch((self,))
            with c.cond:
                if self._state != _DONE:
                    if self._callbacks is None:
                        self._callbacks = []
                    self._callbacks.append(fn)
                    return
        fn(self)

    def __await__(self):
        if self._state != _DONE:
            import asyncio

            loop = asyncio.get_running_loop()
            waiter = loop.create_future()

            def wake(_):
                loop.call_soon_threadsafe(lambda: waiter.done() or waiter.set_result(None))

            self.add_done_callback(wake)
            token = _block() if self._state != _DONE else None  # inside a call: lend its CPUs meanwhile
            try:
                yield from waiter.__await__()
            finally:
                if token is not None:
                    blocking.unblock(token)
        return self._outcome()

    def _outcome(self):
        v = self._value
        if v is _NOTHING:
            v = self._value = self._decode()
        if isinstance(v, _Raise):
            try:
                raise v.exc
            finally:  # as concurrent.futures does: no cycle future -> traceback -> frame -> future
                self = v = None  # noqa: F841
        return v

    def _decode(self):
        frames, status = self._frames, self._status
        try:
            if status == P.OK:  # frames: [payload, *buffers]
                return serde.loads_value(frames[0].buffer, [f.buffer for f in frames[1:]])
            if status == P.USER_ERROR:
                return _Raise(serde.loads_error(frames[0].buffer))
            msg = frames[0].bytes.decode("utf-8", "replace")
            return _Raise(_ERRORS.get(status, FabricError)(f"{self.label}: {msg}"))
        except Exception as e:  # noqa: BLE001 - a result that cannot be rebuilt here
            if status == P.OK:
                return _Raise(SerializationError(f"the result of {self.label} cannot be unpickled here: "
                                                 f"{type(e).__name__}: {e}"))
            raise
        finally:
            self._frames = None


class _Raise:
    __slots__ = ("exc",)

    def __init__(self, exc):
        self.exc = exc


_tls = threading.local()  # .putting: a fabric.put object is being pickled (no Future may go inside)


def _block():
    """Inside a call (a worker's nested driver): tell the worker a wait begins, so the broker
    lends the call's CPUs out meanwhile; a token for ``blocking.unblock``, or None."""
    b = blocking
    return b.block() if b is not None else None


def _done_future(cid, label, ok, value) -> "Future":
    """A Future that travelled inside a value, done: it holds its outcome."""
    f = Future(cid, None, label)
    f._state, f._status = _DONE, P.OK if ok else P.USER_ERROR
    f._value = value if ok else _Raise(value)
    return f


def _reader() -> "Client":
    from . import api  # (lazily: the api drives this module) the process's connection, made if none

    return api._client()


def _borrowed(cid, label) -> "Future":
    """A Future that travelled inside an argument, not done when it was sent: read from the
    cluster (FETCH) when this process first waits for it."""
    return _reader().borrow(cid, label)


def _borrowed_part(cid, label, index, n) -> "Future":
    return Part(_borrowed(cid, label), index, n)


class ReadyFuture(Future):
    """A Future that is done from birth (fabric.put): holds the object itself."""

    __slots__ = ()

    def __init__(self, cid, client, label, value):
        super().__init__(cid, client, label)
        self._state, self._status, self._value = _DONE, P.OK, value


class Part(Future):
    """One of the values of a call made with ``num_returns=n``: completes with its call, and
    passed to another call it travels as a reference to the call's result, indexed there."""

    __slots__ = ("_parent", "_index", "_n")

    def __init__(self, parent: Future, index: int, n: int):
        super().__init__(parent.id, parent._client, f"{parent.label}[{index}]")
        self._parent, self._index, self._n = parent, index, n
        parent.add_done_callback(self._parent_done)

    def _parent_done(self, parent):
        c = self._client
        with c.cond:
            self._status, self._state = parent._status, _DONE
            callbacks, self._callbacks = self._callbacks, None
            c.cond.notify_all()
        for cb in callbacks or ():
            try:
                cb(self)
            except Exception:  # noqa: BLE001
                log.exception("a Future callback raised")

    def cancel(self) -> bool:
        return self._parent.cancel()

    def _decode(self):
        try:
            v = self._parent._outcome()
        except BaseException as e:  # noqa: BLE001 - every value of a failed call raises its error
            return _Raise(e)
        if not isinstance(v, (tuple, list)) or len(v) != self._n:
            what = f"{len(v)} values" if isinstance(v, (tuple, list)) else f"a {type(v).__name__}"
            return _Raise(ValueError(f"{self._parent.label} has num_returns={self._n} but returned {what}; "
                                     f"return a tuple of {self._n} values"))
        return v[self._index]


class _StreamState:
    """What the driver holds of one generator call (kept by the Client while the stream lives)."""

    __slots__ = ("fut", "client", "items", "received", "consumed", "acked", "half", "wakers", "ended", "closed",
                 "watching")

    def __init__(self, fut, client, window):
        self.fut, self.client, self.items = fut, client, collections.deque()
        self.received = self.consumed = self.acked = 0
        self.half = max(1, window // 2)  # acks go every half window: the worker never waits on a round trip
        self.wakers: list = []           # (loop, asyncio future) of `async for` waiters
        self.ended = self.closed = self.watching = False

    def wake(self, _=None):
        while self.wakers:
            loop, w = self.wakers.pop()
            loop.call_soon_threadsafe(_set_none, w)

    def ack(self):
        if self.consumed > self.acked and self.fut._state != _DONE and not self.client.closed:
            self.acked = self.consumed
            self.client._send_d([P.C[P.CONSUMED] + self.fut.id + self.consumed.to_bytes(8, "big")])


def _set_none(w):
    if not w.done():
        w.set_result(None)


_END = object()


class Stream:
    """The items of a generator call, each as the worker makes it: ``for fut in stream`` (or
    ``async for``) gives one done Future per item, in order (Ray's ``ObjectRefGenerator``).
    If the generator raised, the last Future raises that error, after the items made before
    it. The worker runs at most ``backpressure`` items ahead of the consumer and waits there.
    ``close()``, or dropping the stream, cancels the call: the generator stops before its next
    item (its ``finally`` blocks run). ``stream.future`` is the call's own Future: the number of
    items, or the call's error."""

    __slots__ = ("_st", "future", "__weakref__")

    def __init__(self, fut: Future, client: "Client", window: int):
        st = client.streams.get(fut.id)  # registered by submit(), before its items can arrive
        if st is None:
            st = client.streams[fut.id] = _StreamState(fut, client, window)
        self._st, self.future = st, fut
        weakref.finalize(self, client._stream_dropped, st)

    def __repr__(self):
        st = self._st
        return f"<fabric.Stream {st.fut.label} taken={st.consumed} {'done' if st.fut.done() else 'running'}>"

    def __reduce__(self):
        raise SerializationError("a fabric.Stream cannot be pickled: iterate it where .remote() returned it")

    def _take(self):
        st = self._st
        if st.items:
            item = st.items.popleft()
            st.consumed += 1
            if st.consumed - st.acked >= st.half:
                st.ack()
            return item
        if st.fut._state == _DONE:  # its RESULT comes after its last ITEM: nothing more will come
            if st.ended:
                return _END
            st.ended = True
            st.client.streams.pop(st.fut.id, None)
            return st.fut if st.fut._status != P.OK and not st.closed else _END
        return None

    def __iter__(self):
        return self

    def __next__(self) -> Future:
        return self.next()

    def next(self, timeout: float | None = None) -> Future:
        """The next item's Future; ``GetTimeout`` if none came within ``timeout`` seconds (the
        stream goes on), ``StopIteration`` at the end."""
        item = self._next(timeout)
        if item is _END:
            raise StopIteration
        return item

    def _next(self, timeout):
        st, deadline = self._st, None if timeout is None else time.monotonic() + timeout
        token = tried = None
        try:
            while True:
                item = self._take()
                if item is not None:
                    return item
                if st.closed:
                    return _END
                st.ack()  # about to wait: the worker may be waiting for this
                left = 0.05 if deadline is None else min(0.05, deadline - time.monotonic())
                if left <= 0:
                    raise GetTimeout(f"{st.fut.label}: no item within {timeout}s ({st.client.fate()})")
                if st.client.closed:
                    raise ConnectionFailed("the fabric client was shut down while waiting for a stream")
                if not tried:  # inside a call: its CPUs are lent out while it waits for an item
                    tried, token = True, _block()
                st.client._wait_round(left, (st.fut,))
        finally:
            if token is not None:
                blocking.unblock(token)

    def __aiter__(self):
        return self

    async def __anext__(self) -> Future:
        import asyncio

        st = self._st
        while True:
            item = self._take()
            if item is _END or st.closed:
                raise StopAsyncIteration
            if item is not None:
                return item
            st.ack()
            loop = asyncio.get_running_loop()
            w = loop.create_future()
            st.wakers.append((loop, w))
            if not st.watching:
                st.watching = True
                st.fut.add_done_callback(st.wake)
            if st.items or st.fut._state == _DONE:
                continue  # came meanwhile
            token = _block()
            try:
                await w
            finally:
                if token is not None and blocking is not None:
                    blocking.unblock(token)

    def close(self):
        """Stop the stream: cancel the call if it has not ended (the generator stops before its
        next item), drop the items not taken."""
        st = self._st
        if st.closed:
            return
        st.closed = True
        st.items.clear()
        st.client.streams.pop(st.fut.id, None)
        if st.fut._state != _DONE:
            st.client._send_d([P.C[P.CANCEL], st.fut.id, b"\x02"])

    def cancel(self) -> bool:
        """Like close(); False if the call had ended."""
        done = self._st.fut.done()
        self.close()
        return not done
