"""Dynamic batching: many concurrent requests become one call of the user's batch function.

The queue logic (:class:`BatchQueue`) is pure: it is told the time and never reads a clock,
so it is tested alone with a fake clock. :func:`batch` wraps an ``async`` method with it on the
replica's event loop: the wait timer starts at the first request of a batch, a full batch goes
at once, and the batch function's list of results is split back, one per request.
"""
from __future__ import annotations

import asyncio
import functools
import inspect
from collections import deque


class BatchQueue:
    """Items wait until ``max_batch_size`` are queued or ``timeout_s`` passed since the oldest."""

    def __init__(self, max_batch_size: int, timeout_s: float):
        check_batch_options(max_batch_size, timeout_s)
        self.max_batch_size, self.timeout_s = max_batch_size, timeout_s
        self._items: deque = deque()   # (arrival time, item)

    def __len__(self):
        return len(self._items)

    def put(self, item, now: float) -> None:
        self._items.append((now, item))

    def deadline(self) -> float | None:
        """When the oldest queued item's wait ends (None when empty)."""
        return self._items[0][0] + self.timeout_s if self._items else None

    def ready(self, now: float) -> bool:
        return len(self._items) >= self.max_batch_size or (bool(self._items) and now >= self.deadline())

    def take(self) -> list:
        """Up to ``max_batch_size`` items, oldest first; the rest keep their own arrival times."""
        n = min(len(self._items), self.max_batch_size)
        return [self._items.popleft()[1] for _ in range(n)]


def check_batch_options(max_batch_size, timeout_s):
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or not 1 <= max_batch_size <= 65536:
        raise ValueError(f"max_batch_size must be a whole number from 1 to 65536, got {max_batch_size!r}")
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 <= timeout_s <= 60:
        raise ValueError(f"batch_wait_timeout_s must be a number of seconds from 0 to 60, got {timeout_s!r}")


def split_results(results, n: int, name: str) -> list:
    """The batch function's results, checked: one per request, in order."""
    if isinstance(results, (str, bytes, dict)) or not hasattr(results, "__len__"):
        raise TypeError(f"@serve.batch function {name} must return a list with one result per request, "
                        f"got {type(results).__name__}")
    if len(results) != n:
        raise TypeError(f"@serve.batch function {name} got {n} requests but returned {len(results)} results")
    return list(results)


class _Batcher:
    """One per (instance, method): the queue and the timer on the running event loop."""

    def __init__(self, func, owner, max_batch_size, timeout_s):
        self.func, self.owner = func, owner
        self.queue = BatchQueue(max_batch_size, timeout_s)
        self.timer = None
        self.name = getattr(func, "__qualname__", "batch")

    async def submit(self, item):
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.queue.put((item, fut), loop.time())
        self._arm(loop)
        return await fut

    def _arm(self, loop):
        now = loop.time()
        while self.queue.ready(now):
            loop.create_task(self._run(self.queue.take()))
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        d = self.queue.deadline()
        if d is not None:
            self.timer = loop.call_at(d, self._arm, loop)

    async def _run(self, batch):
        items = [it for it, _ in batch]
        try:
            args = (self.owner, items) if self.owner is not None else (items,)
            out = self.func(*args)
            if inspect.isawaitable(out):
                out = await out
            out = split_results(out, len(items), self.name)
        except BaseException as e:  # noqa: BLE001 - every request of the batch gets the error
            for _, fut in batch:
                fut.done() or fut.set_exception(e)
            return
        for (_, fut), r in zip(batch, out):
            fut.done() or fut.set_result(r)


def batch(_func=None, *, max_batch_size: int = 16, batch_wait_timeout_s: float = 0.01):
    """``@serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)`` on a method taking a list.

    Callers pass one item and await one result; concurrent callers on the replica share a call.
    The method may be ``async`` or plain; it gets a list and must return a list of equal length.
    """
    check_batch_options(max_batch_size, batch_wait_timeout_s)

    def wrap(func):
        if not callable(func):
            raise TypeError("@serve.batch decorates a function or method")
        params = list(inspect.signature(func).parameters)
        is_method = bool(params) and params[0] == "self"
        attr = f"__fabric_batcher_{func.__name__}"

        @functools.wraps(func)
        async def method(self, item):
            b = self.__dict__.get(attr)
            if b is None:
                b = self.__dict__[attr] = _Batcher(func, self, max_batch_size, batch_wait_timeout_s)
            return await b.submit(item)

        holder = {}

        @functools.wraps(func)
        async def plain(item):
            b = holder.get("b")
            if b is None:
                b = holder["b"] = _Batcher(func, None, max_batch_size, batch_wait_timeout_s)
            return await b.submit(item)

        w = method if is_method else plain
        w.__fabric_batch__ = (max_batch_size, batch_wait_timeout_s)
        return w

    return wrap(_func) if _func is not None else wrap
