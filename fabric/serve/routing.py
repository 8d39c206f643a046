"""Routing, admission and autoscaling decisions, pure: no sockets, no clocks (the time is passed in).

- :func:`match_route`: the deployment whose ``route_prefix`` is the longest whole-segment prefix.
- :class:`Dispatcher`: a deployment's bounded queue and its replicas' ongoing requests. Requests
  go to the least-loaded ready replica; while a replica already has its limit of calls in
  flight, newcomers wait and then leave together as one call (coalescing: no timer, so a lone
  request never waits, and under load one broker round trip carries many requests). The limit
  adapts, as Nagle's algorithm does: while calls come back fast (under ``coalesce_below_s`` on
  average) it is one call, so a request waits at most one short call and batches grow with the
  load; when calls are slow, waiting behind one would cost more than a call's overhead saves,
  and up to ``pipeline`` go at once.
- :class:`AutoscalePolicy`: replicas wanted from ongoing requests per replica (Ray Serve's
  ``target_ongoing_requests``), up at once, down only after ``downscale_delay_s`` of less need.
"""
from __future__ import annotations

import math
from collections import deque


def normalize_prefix(prefix: str) -> str:
    if not isinstance(prefix, str) or not prefix.startswith("/"):
        raise ValueError(f"route_prefix must be a string starting with '/', got {prefix!r}")
    if prefix.startswith("/v2") and (len(prefix) == 3 or prefix[3] == "/") or prefix.startswith(("/-/", "/metrics")):
        raise ValueError(f"route_prefix {prefix!r} is reserved (/v2 is the inference protocol, /metrics and "
                         f"/-/ the gateway's own)")
    return prefix.rstrip("/") or "/"


def match_route(routes: dict, path: str):
    """``routes`` maps a normalised prefix to a value; the value of the longest prefix that is
    ``path`` or a whole-segment start of it (``/a`` matches ``/a`` and ``/a/b``, not ``/ab``)."""
    p = path.rstrip("/") or "/"
    while True:
        v = routes.get(p)
        if v is not None:
            return v
        if p == "/":
            return None
        p = p.rsplit("/", 1)[0] or "/"


class Slot:
    __slots__ = ("ongoing", "calls")

    def __init__(self):
        self.ongoing = 0   # requests sent, not answered
        self.calls = 0     # calls in flight (each carries one or more requests)


class Dispatcher:
    """A deployment's queue and its replicas' load. ``submit`` queues (False: the queue is full,
    answer 503); ``schedule`` says what to send where; ``done`` when a call came back."""

    def __init__(self, max_ongoing: int, max_queued: int = -1, max_batch: int | None = None, pipeline: int = 2,
                 coalesce_below_s: float = 0.0):
        self.max_ongoing, self.max_queued = max_ongoing, max_queued
        self.max_batch = max_batch or max_ongoing
        self.pipeline = pipeline
        self.coalesce_below = coalesce_below_s   # 0: always ``pipeline`` calls per replica
        self.call_time = None                    # moving average of a call's round trip (s), once known
        self.limit = pipeline                    # calls in flight per replica now
        self.queue: deque = deque()    # (enqueued_at, request)
        self.slots: dict = {}

    def add_replica(self, rid) -> None:
        self.slots.setdefault(rid, Slot())

    def remove_replica(self, rid) -> None:
        self.slots.pop(rid, None)

    def submit(self, request, now: float) -> bool:
        if 0 <= self.max_queued <= len(self.queue):
            return False
        self.queue.append((now, request))
        return True

    def requeue_front(self, requests, now: float) -> None:
        """Requests to retry (their replica died) go first, past the queue bound."""
        for r in reversed(requests):
            self.queue.appendleft((now, r))

    def schedule(self) -> list:
        """``[(replica, [requests])]`` to send now, each list one call."""
        out = []
        q, slots = self.queue, self.slots
        while q and slots:
            rid, best = None, None
            for k, s in slots.items():
                if s.calls < self.limit and s.ongoing < self.max_ongoing and (best is None or s.ongoing < best.ongoing):
                    rid, best = k, s
            if best is None:
                break
            n = min(len(q), self.max_ongoing - best.ongoing, self.max_batch)
            reqs = [q.popleft()[1] for _ in range(n)]
            best.ongoing += n
            best.calls += 1
            out.append((rid, reqs))
        return out

    def done(self, rid, n: int, elapsed: float | None = None) -> None:
        """A call of ``n`` requests to ``rid`` came back, ``elapsed`` seconds after it was sent."""
        s = self.slots.get(rid)
        if s is not None:
            s.ongoing -= n
            s.calls -= 1
        if elapsed is not None and self.coalesce_below > 0:
            t = self.call_time
            self.call_time = t = elapsed if t is None else t + 0.2 * (elapsed - t)
            self.limit = 1 if t < self.coalesce_below else self.pipeline

    def expired(self, now: float, max_wait: float) -> list:
        """Queued requests that waited longer than ``max_wait`` (no replica came): removed."""
        out = []
        q = self.queue
        while q and now - q[0][0] > max_wait:
            out.append(q.popleft()[1])
        return out

    @property
    def queued(self) -> int:
        return len(self.queue)

    @property
    def ongoing(self) -> int:
        """Queued plus in flight: what autoscaling looks at."""
        return len(self.queue) + sum(s.ongoing for s in self.slots.values())

    def idle_replicas(self) -> list:
        return [k for k, s in self.slots.items() if s.ongoing == 0]


class AutoscalePolicy:
    """``decide(now, current, ongoing) -> replicas wanted``.

    Wanted = ceil(ongoing / target_ongoing_requests), within [min_replicas, max_replicas]; any
    ongoing request wants at least one replica (scale from zero). More replicas are asked for
    at once; fewer only once the lower figure held for ``downscale_delay_s``.
    """

    def __init__(self, min_replicas: int = 1, max_replicas: int = 1, target_ongoing_requests: float = 2,
                 downscale_delay_s: float = 30.0, upscale_delay_s: float = 0.0):
        self.min, self.max, self.target = min_replicas, max_replicas, target_ongoing_requests
        self.down_delay, self.up_delay = downscale_delay_s, upscale_delay_s
        self._below_since = None
        self._above_since = None

    @classmethod
    def from_config(cls, cfg: dict) -> "AutoscalePolicy":
        allowed = {"min_replicas", "max_replicas", "target_ongoing_requests", "downscale_delay_s", "upscale_delay_s",
                   "initial_replicas"}
        if not isinstance(cfg, dict):
            raise TypeError(f"autoscaling_config must be a dict, got {type(cfg).__name__}")
        unknown = sorted(set(cfg) - allowed)
        if unknown:
            raise ValueError(f"autoscaling_config: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(allowed))}")
        lo, hi = cfg.get("min_replicas", 1), cfg.get("max_replicas", max(1, cfg.get("min_replicas", 1)))
        for k, v in (("min_replicas", lo), ("max_replicas", hi)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"autoscaling_config {k} must be a whole number >= 0, got {v!r}")
        if hi < 1 or hi < lo:
            raise ValueError(f"autoscaling_config needs 1 <= max_replicas and min_replicas <= max_replicas, "
                             f"got min_replicas={lo}, max_replicas={hi}")
        t = cfg.get("target_ongoing_requests", 2)
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            raise ValueError(f"autoscaling_config target_ongoing_requests must be a number > 0, got {t!r}")
        d = cfg.get("downscale_delay_s", 30.0)
        u = cfg.get("upscale_delay_s", 0.0)
        for k, v in (("downscale_delay_s", d), ("upscale_delay_s", u)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"autoscaling_config {k} must be a number of seconds >= 0, got {v!r}")
        return cls(lo, hi, t, d, u)

    def wanted(self, ongoing: int) -> int:
        w = math.ceil(ongoing / self.target) if ongoing > 0 else 0
        return max(self.min, min(self.max, max(w, 1 if ongoing > 0 else 0)))

    def decide(self, now: float, current: int, ongoing: int) -> int:
        w = self.wanted(ongoing)
        if w > current:
            self._below_since = None
            if current == 0 or self.up_delay <= 0:
                return w
            if self._above_since is None:
                self._above_since = now
            return w if now - self._above_since >= self.up_delay else current
        self._above_since = None
        if w < current:
            if self._below_since is None:
                self._below_since = now
            if now - self._below_since >= self.down_delay:
                self._below_since = None
                return w
            return current
        self._below_since = None
        return current
