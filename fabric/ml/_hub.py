"""The channel from training workers to the driver: metrics pushed as they happen, stop flags
and barriers.

A :class:`Hub` is one ``@fabric.cls`` instance (no CPU of its own, ``concurrency`` threads) that
the driver starts. Workers hold a picklable :class:`Sink` and *push* into it with an async
instance call they never wait for (a submit on the worker's own connection: tens of
microseconds); the driver *long-polls* it. Because the instance runs calls on a thread pool, a
poll waiting for items, barriers waiting for ranks and incoming pushes all overlap.

Ordering: calls on a concurrent instance may start in any order, so each push carries its
sender's sequence number and the hub releases a sender's items strictly in that order.
Stop flags travel back for free: each push's result says whether its key is stopped, and
``Sink.should_stop`` reads the latest finished one without blocking.
"""
from __future__ import annotations

import itertools
import os
import threading
import time
import uuid

import fabric

CONCURRENCY = 255  # threads of the hub's instance: polls and barriers block one each


class _HubActor:
    """Lives on the cluster. Everything is guarded by one condition variable."""

    def __init__(self):
        self.cond = threading.Condition()
        self.items: list[tuple[str, dict]] = []
        self.stopped: set[str] = set()
        self.next_seq: dict[str, int] = {}            # sender -> next sequence number to release
        self.held: dict[str, dict[int, tuple]] = {}    # sender -> seq -> (key, item) arrived early
        self.barriers: dict[tuple, dict] = {}          # (key, step) -> values, departures, outcome
        self.kicks = 0                                 # bumped by kick(): waiting polls return now

    def push(self, sender: str, seq: int, key: str, item: dict) -> bool:
        with self.cond:
            held = self.held.setdefault(sender, {})
            held[seq] = (key, item)
            nxt = self.next_seq.get(sender, 0)
            released = False
            while nxt in held:
                self.items.append(held.pop(nxt))
                nxt += 1
                released = True
            self.next_seq[sender] = nxt
            if not held:
                del self.held[sender]
            if released:
                self.cond.notify_all()
            return key in self.stopped

    def poll(self, timeout: float, prefix: str = "") -> list:
        """Items whose key starts with ``prefix`` (all: ""), in order; others stay for their pollers."""
        deadline = time.monotonic() + max(0.0, float(timeout))
        with self.cond:
            kicks = self.kicks
            while True:
                if prefix:
                    out = [it for it in self.items if it[0].startswith(prefix)]
                    if out:
                        self.items = [it for it in self.items if not it[0].startswith(prefix)]
                        return out
                elif self.items:
                    out, self.items = self.items, []
                    return out
                left = deadline - time.monotonic()
                if left <= 0 or self.kicks != kicks:
                    return []
                self.cond.wait(left)

    def forget(self, prefix: str) -> None:
        """Drop what is kept for keys under ``prefix`` (a run that ended): stop flags, items."""
        with self.cond:
            self.stopped = {k for k in self.stopped if not k.startswith(prefix)}
            self.items = [it for it in self.items if not it[0].startswith(prefix)]

    def kick(self) -> None:
        """Make the polls waiting now return at once (with what there is)."""
        with self.cond:
            self.kicks += 1
            self.cond.notify_all()

    def stop(self, key: str) -> None:
        with self.cond:
            self.stopped.add(key)
            self.cond.notify_all()

    def ping(self) -> bool:
        return True

    def is_stopped(self, key: str) -> bool:
        with self.cond:
            return key in self.stopped

    def barrier(self, key: str, rank: int, world_size: int, step, timeout: float) -> bool:
        """Block until ``world_size`` ranks reached ``(key, step)``; returns the key's stop flag
        as it was when the last rank arrived (the same for every rank). Raises
        ``TimeoutError`` if the others do not come within ``timeout`` seconds."""
        return self.allgather(key, rank, world_size, step, None, timeout)[1]

    def allgather(self, key: str, rank: int, world_size: int, step, value, timeout: float):
        """A barrier that also hands every rank the list of all ranks' ``value`` (rank order)."""
        b = (key, step)
        deadline = time.monotonic() + timeout
        with self.cond:
            entry = self.barriers.setdefault(b, {"values": {}, "left": 0, "done": None})
            entry["values"][rank] = value
            if len(entry["values"]) >= world_size and entry["done"] is None:
                entry["done"] = ([entry["values"].get(r) for r in range(world_size)], key in self.stopped)
                self.cond.notify_all()
            while entry["done"] is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    entry["values"].pop(rank, None)
                    raise TimeoutError(f"barrier {step!r} of {key!r}: only ranks {sorted(entry['values'])} of "
                                       f"{world_size} arrived within {timeout:g}s")
                self.cond.wait(left)
            entry["left"] += 1
            if entry["left"] >= world_size:
                self.barriers.pop(b, None)
            return entry["done"]


_Remote = fabric.cls(cpus=0, concurrency=CONCURRENCY, name="fabric.ml.Hub")(_HubActor)


class Sink:
    """The workers' end of a hub: picklable (it is the instance's handle). Push from any thread."""

    def __init__(self, handle):
        self._handle = handle
        self._local = None

    def __getstate__(self):
        return {"_handle": self._handle}

    def __setstate__(self, state):
        self._handle, self._local = state["_handle"], None

    def _state(self):
        st = self._local
        if st is None or st["pid"] != os.getpid():  # per process: a forked child starts afresh
            st = self._local = {"pid": os.getpid(), "sender": uuid.uuid4().hex, "seq": itertools.count(),
                                "last": {}, "stopped": set(), "lock": threading.Lock()}
        return st

    def push(self, key: str, item: dict) -> None:
        """Send ``item`` to the driver under ``key``; returns at once. Items of one sender
        reach ``Hub.poll`` in the order they were pushed."""
        st = self._state()
        with st["lock"]:  # seq order == submission order
            fut = self._handle.push.remote(st["sender"], next(st["seq"]), key, item)
        st["last"][key] = fut

    def should_stop(self, key: str) -> bool:
        """Whether the driver stopped ``key``, as far as this sender has heard (no round trip:
        read from the latest finished push; a pending one is not waited for)."""
        st = self._state()
        if key in st["stopped"]:
            return True
        fut = st["last"].get(key)
        if fut is not None and fut.done():
            try:
                if fut.result():
                    st["stopped"].add(key)
                    return True
            except Exception:  # noqa: BLE001 - a lost push says nothing about stopping
                pass
        return False

    def check_stop(self, key: str) -> bool:
        """Like ``should_stop`` but asks the hub (one round trip)."""
        st = self._state()
        if self.should_stop(key):
            return True
        if self._handle.is_stopped.remote(key).result():
            st["stopped"].add(key)
            return True
        return False

    def flush(self, key: str, timeout: float = 30.0) -> None:
        """Wait until this sender's last push of ``key`` reached the hub."""
        fut = self._state()["last"].get(key)
        if fut is not None:
            fut.result(timeout)

    def barrier(self, key: str, rank: int, world_size: int, step, timeout: float = 600.0) -> bool:
        """Block until all ``world_size`` ranks called ``barrier`` with this ``(key, step)``.
        Returns the stop flag of ``key`` (the same on every rank). A world of one returns at once."""
        return self.allgather(key, rank, world_size, step, None, timeout)[1]

    def allgather(self, key: str, rank: int, world_size: int, step, value, timeout: float = 600.0):
        """A barrier that returns ``(values of all ranks in rank order, stop flag)``."""
        if world_size <= 1:
            return [value], self.should_stop(key)
        values, stopped = self._handle.allgather.remote(key, rank, world_size, step, value, timeout).result()
        if stopped:
            self._state()["stopped"].add(key)
        return values, bool(stopped)


class Hub:
    """The driver's end: starts the instance; ``poll`` what workers pushed, ``stop`` a key.
    ``Hub.shared()`` is one hub per driver process and cluster connection, for runs that poll by
    key prefix (the trainers): a fit() then starts no instance of its own."""

    _shared: "Hub | None" = None
    _shared_lock = threading.Lock()

    @classmethod
    def shared(cls) -> "Hub":
        with cls._shared_lock:
            hub = cls._shared
            if hub is not None and hub._pid == os.getpid():
                try:  # still there? (a fabric.shutdown()/init() or a killed instance makes a new one)
                    hub._handle.ping.remote().result(10)
                    return hub
                except Exception:  # noqa: BLE001
                    pass
            hub = cls._shared = cls()
            return hub

    def __init__(self):
        self._handle = _Remote.remote()
        self._closed = False
        self._pid = os.getpid()

    def sink(self) -> Sink:
        return Sink(self._handle)

    def ready(self, timeout: float | None = None) -> None:
        self._handle.ready().result(timeout)

    def poll(self, timeout: float = 1.0, prefix: str = "") -> list[tuple[str, dict]]:
        """What arrived since the last poll, in order; waits up to ``timeout`` s for something.
        ``prefix``: only keys that start with it (several runs may share one hub)."""
        return self._handle.poll.remote(timeout, prefix).result()

    def poll_async(self, timeout: float = 30.0, prefix: str = ""):
        """``poll`` as a Future, to wait on together with other Futures (``fabric.wait``)."""
        return self._handle.poll.remote(timeout, prefix)

    def forget(self, prefix: str) -> None:
        """Drop the hub's state for keys under ``prefix`` (a finished run)."""
        self._handle.forget.remote(prefix)

    def kick(self) -> None:
        """End the polls waiting now (e.g. a ``poll_async`` no longer needed)."""
        self._handle.kick.remote().result()

    def stop(self, key: str) -> None:
        """Ask the workers of ``key`` to stop (they see it at their next push or barrier)."""
        self._handle.stop.remote(key).result()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                fabric.kill(self._handle)
            except Exception:  # noqa: BLE001 - the cluster may be gone already
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
