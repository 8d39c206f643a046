"""The gateway's side of a deployment: its replicas (``@fabric.cls`` instances), its queue, and
the calls that carry requests to them. Runs on the gateway's event loop; fabric Futures come
back on fabric's IO thread and are handed to the loop once per call, not per request."""
from __future__ import annotations

import json
import time

import fabric

from .replica import Replica
from .routing import AutoscalePolicy, Dispatcher

RUNNING, STARTING = "RUNNING", "STARTING"
# calls shorter than this on average go one at a time per replica, the requests that arrive
# meanwhile leaving together as the next call (routing.Dispatcher): measured on 2 CPUs, batches
# of 7.2-7.9 instead of 4.5 and a quarter less gateway CPU per request (docs/benchmarks.md);
# slower calls are pipelined two deep
COALESCE_BELOW_S = 0.005


def err(msg: str) -> bytes:
    return json.dumps({"error": msg}).encode()


def _flush():
    """Send now what fabric's client buffered: it holds a submit that follows another within
    50 us for a batch, which would make a request wait for the client's IO thread (~1-10 ms)."""
    from fabric import api

    api.flush()


class Req:
    __slots__ = ("payload", "fut", "t0", "tq", "retried")

    def __init__(self, payload, fut, t0):
        self.payload, self.fut, self.t0, self.tq, self.retried = payload, fut, t0, 0.0, False


class Rep:
    __slots__ = ("handle", "state", "since", "checking")

    def __init__(self, handle):
        self.handle, self.state, self.since, self.checking = handle, STARTING, time.monotonic(), False


class Runtime:
    """One deployment in the gateway."""

    def __init__(self, spec: dict, loop, metrics, debug: bool = False):
        self.spec, self.loop, self.metrics, self.debug = spec, loop, metrics, debug
        o = self.options = spec["options"]
        self.name = spec["name"]
        self.kind = spec["kind"]
        self.route_prefix = spec["route_prefix"]
        self.wants_request = spec["wants_request"]
        conc = 2 if spec["is_async"] else 1
        self.rclass = fabric.cls(cpus=o["cpus"], gpus=o["gpus"], memory=o["memory"], concurrency=conc,
                                 name=f"serve:{self.name}")(Replica)
        cfg = o["autoscaling_config"]
        self.policy = AutoscalePolicy.from_config(cfg) if cfg else None
        self.target = (cfg.get("initial_replicas", self.policy.min) if cfg else o["num_replicas"])
        # a model behind OIP gets the requests' raw bodies and answers encoded bodies (the codec
        # runs in the replica); a JSON route's replica gets the decoded values
        self.method = "batch_call" if self.kind == "oip" else "run_many"
        self.call_name = "infer_http" if self.kind == "oip" else "__call__"
        self.dispatcher = Dispatcher(o["max_ongoing_requests"], o["max_queued_requests"],
                                     max_batch=o["max_ongoing_requests"], pipeline=2,
                                     coalesce_below_s=COALESCE_BELOW_S)
        self.replicas: dict = {}
        self.failures = 0
        self.backoff_until = 0.0
        self.last_error = None
        self.deaths = 0
        self.hold_until = 0.0
        self.closed = False
        self.successor = None
        self.m_latency, self.m_queue, self.m_compute, self.m_in_flight, self.m_batch = metrics.for_deployment(self.name)

    # ------------------------------------------------------------------ requests
    def submit(self, payload):
        """An asyncio Future of ``(status, body)``, or None when the queue is full (503)."""
        if self.closed:  # a request routed here just before a redeploy switched: the new version takes it
            if self.successor is not None:
                return self.successor.submit(payload)
            fut = self.loop.create_future()
            fut.set_result((503, err(f"deployment {self.name} was deleted")))
            return fut
        fut = self.loop.create_future()
        if self.failures and not self.dispatcher.slots:  # its replicas fail to start: say why now
            fut.set_result((503, err(f"{self.name} has no running replica: {self.last_error}")))
            return fut
        r = Req(payload, fut, time.perf_counter())
        if not self.dispatcher.submit(r, time.monotonic()):
            return None
        self.m_in_flight.inc()
        if self.dispatcher.slots:
            self.pump()
        else:
            self.reconcile()  # scaled to zero: ask for a replica now, not at the next tick
        return fut

    def pump(self):
        sent = False
        for rid, reqs in self.dispatcher.schedule():
            rep = self.replicas[rid]
            t = time.perf_counter()
            for r in reqs:
                r.tq = t
            self.m_batch.observe(len(reqs))
            try:
                f = getattr(rep.handle, self.method).remote(self.call_name, [r.payload for r in reqs])
            except Exception as e:  # noqa: BLE001 - e.g. an argument that cannot be pickled
                self.dispatcher.done(rid, len(reqs))
                for r in reqs:
                    self._answer(r, (500, err(f"{type(e).__name__}: {e}")))
                continue
            f.add_done_callback(lambda f, rid=rid, reqs=reqs: self.loop.call_soon_threadsafe(self._done, rid, reqs, f))
            sent = True
        if sent:
            _flush()

    def _answer(self, r: Req, outcome):
        if not r.fut.done():
            r.fut.set_result(outcome)
        self.m_in_flight.dec()

    def _done(self, rid, reqs, f):
        t = time.perf_counter()
        self.dispatcher.done(rid, len(reqs), t - reqs[0].tq)
        try:
            outs = f.result()
        except fabric.WorkerCrashed as e:
            self._died(rid, reqs, e)
            self.pump()
            return
        except Exception as e:  # noqa: BLE001
            outs = [(500, err(f"{type(e).__name__}: {e}"))] * len(reqs)
        mq, mc = self.m_queue, self.m_compute
        for r, o in zip(reqs, outs):
            mq.observe(r.tq - r.t0)
            mc.observe(t - r.tq)
            self._answer(r, o)
        if self.dispatcher.queue:
            self.pump()

    def _died(self, rid, reqs, e):
        """A replica died: forget it (reconcile starts another); retry its requests once if the
        deployment is idempotent, else answer 503."""
        self.deaths += 1
        self.last_error = f"replica died: {type(e).__name__}: {e}"
        self._forget(rid)
        retry = []
        for r in reqs:
            if self.options["idempotent"] and not r.retried and not (self.closed and self.successor is None):
                r.retried = True
                retry.append(r)
            else:
                self._answer(r, (503, err(f"the replica serving {self.name} died during the request "
                                          f"(not retried: the deployment is not idempotent)")))
        if retry:
            target = self.successor if self.closed and self.successor is not None else self
            if target is not self:
                for _ in retry:
                    self.m_in_flight.dec()
                    target.m_in_flight.inc()
            target.dispatcher.requeue_front(retry, time.monotonic())
            target.pump()
        self.reconcile()

    def _forget(self, rid):
        self.dispatcher.remove_replica(rid)
        self.replicas.pop(rid, None)
        self._gauge()

    # ------------------------------------------------------------------ replicas
    def _start_replica(self):
        s = self.spec
        h = self.rclass.remote(s["target"], s["args"], s["kwargs"], s["is_class"], self.debug)
        rid = fabric.api.instance_id(h)
        self.replicas[rid] = Rep(h)
        h.ready().add_done_callback(lambda f: self.loop.call_soon_threadsafe(self._ready, rid, f))
        self._gauge()

    def _ready(self, rid, f):
        rep = self.replicas.get(rid)
        if rep is None or self.closed:
            return
        try:
            f.result()
        except Exception as e:  # noqa: BLE001 - __init__ raised, or the instance could not start
            self.failures += 1
            self.last_error = f"replica failed to start: {type(e).__name__}: {e}"
            self.backoff_until = time.monotonic() + min(10.0, 0.25 * 2 ** self.failures)
            self.replicas.pop(rid, None)
            if not any(r.state == RUNNING for r in self.replicas.values()):
                while self.dispatcher.queue:  # nothing can serve them: say why now
                    self._answer(self.dispatcher.queue.popleft()[1], (503, err(self.last_error)))
            self._gauge()
            return
        self.failures = 0
        rep.state, rep.since = RUNNING, time.monotonic()
        self.dispatcher.add_replica(rid)
        self._gauge()
        self.pump()

    def _stop_replica(self, rid, graceful=False):
        """Stop a replica now (it is idle), or, ``graceful``, once its calls are done: dropping
        the gateway's handle, its only owner, lets fabric stop it after them."""
        rep = self.replicas.pop(rid, None)
        self.dispatcher.remove_replica(rid)
        if rep is not None and not graceful:
            try:
                fabric.kill(rep.handle)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self._gauge()

    def _gauge(self):
        n_run = sum(1 for r in self.replicas.values() if r.state == RUNNING)
        self.metrics.replicas.labels(self.name, RUNNING).set(n_run)
        self.metrics.replicas.labels(self.name, STARTING).set(len(self.replicas) - n_run)

    def reconcile(self):
        """Replicas toward the target (autoscaling decides it), expired waits answered 503."""
        if self.closed:
            return
        now = time.monotonic()
        if self.policy is not None:
            # a Python handle's wake counts as one ongoing request for a while: its calls go
            # straight to replicas, unseen here
            held = 1 if now < self.hold_until else 0
            self.target = self.policy.decide(now, len(self.replicas), self.dispatcher.ongoing + held)
        while len(self.replicas) < self.target and now >= self.backoff_until:
            self._start_replica()
        extra = len(self.replicas) - self.target
        if extra > 0:
            starting = [k for k, r in self.replicas.items() if r.state == STARTING]
            for rid in (starting + self.dispatcher.idle_replicas())[:extra]:
                self._stop_replica(rid)
        for r in self.dispatcher.expired(now, self.options["queue_timeout_s"]):
            why = f"; {self.last_error}" if self.last_error else ""
            self._answer(r, (503, err(f"no replica of {self.name} could take the request within "
                                      f"{self.options['queue_timeout_s']:g}s{why}")))

    def health_check(self):
        """Probe idle replicas, so one that died between requests is replaced before the next."""
        for rid, rep in list(self.replicas.items()):
            s = self.dispatcher.slots.get(rid)
            if rep.state != RUNNING or rep.checking or s is None or s.ongoing:
                continue
            rep.checking = True
            f = rep.handle.pid.remote()
            f.add_done_callback(lambda f, rid=rid: self.loop.call_soon_threadsafe(self._checked, rid, f))

    def _checked(self, rid, f):
        rep = self.replicas.get(rid)
        if rep is None:
            return
        rep.checking = False
        try:
            f.result()
        except fabric.WorkerCrashed as e:
            self._died(rid, [], e)

    def close(self, successor: "Runtime | None" = None, forget: bool = True):
        """Stop taking requests. The replicas finish the calls they hold and then stop; queued
        requests go to ``successor`` (the new version of a rolling redeploy), else answer 503.
        ``forget=False``: a new version that never served; the serving one keeps the metrics."""
        self.closed = True
        self.successor = successor
        for rid in list(self.replicas):  # requests in flight finish; the replicas stop after them
            self._stop_replica(rid, graceful=True)
        now = time.monotonic()
        while self.dispatcher.queue:
            r = self.dispatcher.queue.popleft()[1]
            if successor is not None and not successor.closed:
                self.m_in_flight.dec()
                successor.m_in_flight.inc()
                successor.dispatcher.queue.append((now, r))
            else:
                self._answer(r, (503, err(f"deployment {self.name} was deleted")))
        if successor is not None:
            successor._gauge()  # the same deployment name: its gauges are the successor's now
            successor.pump()
        elif forget:
            self.metrics.forget(self.name)

    def started(self) -> bool:
        """All the replicas it wants are running (or it wants none: scaled to zero)."""
        running = sum(1 for r in self.replicas.values() if r.state == RUNNING)
        return running >= self.target

    # ------------------------------------------------------------------ state
    def ready(self) -> bool:
        return any(r.state == RUNNING for r in self.replicas.values()) or (
            self.policy is not None and self.policy.min == 0 and self.last_error is None)

    def status(self) -> dict:
        running = [k for k, r in self.replicas.items() if r.state == RUNNING]
        if running and len(running) >= self.target:
            state = "RUNNING"
        elif not self.replicas and self.target == 0:
            state = "SCALED_TO_ZERO" if self.policy is not None else "RUNNING"
        elif self.last_error and not running:
            state = "UNHEALTHY"
        else:
            state = "UPDATING"
        return {"name": self.name, "kind": self.kind, "route_prefix": self.route_prefix, "status": state,
                "version": self.options["version"], "target_replicas": self.target,
                "replicas": [{"id": k, "state": r.state} for k, r in self.replicas.items()],
                "running_replicas": running, "ongoing_requests": self.dispatcher.ongoing,
                "queued_requests": self.dispatcher.queued, "replica_deaths": self.deaths,
                "last_error": self.last_error}
