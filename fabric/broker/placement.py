"""Placement: where a call, an instance or a gang goes, as pure functions over the broker's
records (state.py). No sockets, no clock (``now`` is passed in), nothing changed: each returns
a choice and the broker carries it out (reserving through the executor's ledger, spawning,
sending). Tested on their own in tests/test_placement.py.

- a CPU call goes to an idle pool worker (warm code first), else is prefetched behind a short
  call on a busy one (``pick_worker``), else, for fractional or lent CPUs, to one more pool
  worker (``extra_worker_on``);
- a GPU call goes to an idle GPU worker bound to the right devices, else to a new worker
  (``place_gpu``): whole devices first free, a fraction best fit;
- an instance goes to the first executor that fits it (``first_fit``);
- a gang gets all its places at once or none (``plan_gang``), packed executor by executor.
"""
from __future__ import annotations

from .. import settings
from ..resources import CPU_EPS, EPS, gpu_share, pick_gpus

_S = settings.get()
PREFETCH_BELOW = _S.prefetch_below  # seconds
PREFETCH_ONE_BELOW = _S.prefetch_one_below  # seconds


def pick_worker(idle, partial, call, durations, now):
    """An idle worker for ``call``: the most recently idle one that holds its code (warm
    imports and caches; the least recently used ones are those the autoscaler retires),
    else the most recently idle one that fits; else a busy one to prefetch it on, or None.

    ``idle``/``partial``: pool workers with nothing in flight / that may take a prefetch, in
    the order they became so; ``durations``: code hash -> average run time."""
    shape = call.shape
    fit = None
    h = call.code_hash
    for n, w in enumerate(reversed(idle)):
        if w.ex.ledger.fits(shape):
            if h in w.code_seen:
                return w
            if fit is None:
                fit = w
        if n >= 16 and fit is not None:
            break
    if fit is not None:
        return fit
    if not partial:
        return None
    # Prefetch: only calls of known, short duration, and only behind a call that is
    # known-short too and not overdue; a call queued behind a long one (or behind one that
    # waits on nested calls) would wait needlessly, or forever. Short calls fill the worker's
    # credit up to ~PREFETCH_BELOW of expected work (at least 2, at most its credit), so a
    # worker never sits on much more than that while others are idle; medium ones (under
    # PREFETCH_ONE_BELOW) go one call ahead, which keeps every worker busy between round
    # trips while all of them are.
    avg = durations.get(h)
    if avg is None or avg >= PREFETCH_ONE_BELOW:
        return None
    depth = max(2, int(PREFETCH_BELOW / max(avg, 1e-9))) if avg < PREFETCH_BELOW else 2
    best = None
    for w in partial:
        n = len(w.inflight)
        if w.held != shape or (best is not None and n >= len(best.inflight)) or (depth and n >= depth):
            continue
        head = next(iter(w.inflight.values()))
        if head.waited:  # it waited on calls it submitted (BLOCKED) and may again: they may be
            continue     # the very calls prefetched, taken back at its next wait
        expected = durations.get(head.code_hash, 1e9)
        if expected < PREFETCH_ONE_BELOW and now - head.started < max(4 * expected, 4 * PREFETCH_BELOW):
            best = w
    return best


def extra_worker_on(executors, spawns, shape, blocked):
    """Fractional CPUs: an executor starts one pool worker per whole CPU, so when a call of
    ``cpus < 1`` fits an executor's free CPUs but no idle worker is there, one more is started
    (it stays, as a pool worker), up to ``cpus / call's cpus`` CPU workers on it. A worker whose
    call is BLOCKED (``blocked``: some are) does not count: its CPUs are lent. The executor, or None."""
    from .state import Call

    for ex in executors:
        r = ex.ledger
        if not r.fits(shape):
            continue
        n = sum(1 for w in ex.workers.values() if w.actor is None and not w.gpus and w.gang is None
                and w.spare is None)
        n += sum(1 for sp in spawns if sp[0] is ex and isinstance(sp[2], Call))
        most = max(1, r.room((shape[0], 0, 0), total=True)) if shape[0] else max(1, int(r.cpus))
        if blocked:
            n -= sum(1 for w in ex.workers.values() if w.lent is not None and not w.gpus and w.actor is None)
        if n < most:
            return ex
    return None


def idle_gpu_workers(workers, n_devices):
    """Spawned GPU workers bound to ``n_devices`` devices with nothing to do."""
    return [w for w in workers if w.gpus and not w.pool and w.actor is None and w.gang is None
            and not w.inflight and not w.doomed and len(w.gpus) == n_devices]


def place_gpu(executors, workers, shape):
    """Where a GPU call goes: ``(worker, None, None)`` to run on an idle GPU worker (the shape is
    taken on its devices), ``(None, executor, devices)`` to spawn one (``devices`` None: the
    first whole free ones), or None when nothing fits now.

    ``gpus >= 1`` takes whole devices that no other call shares; a fraction below 1 takes that
    share of one device, the fullest one that still has room (best fit), so fractional calls
    pack together and leave whole devices whole; among equally full devices, one with an idle
    worker on it."""
    gpus = shape[1]
    if gpus >= 1:
        for w in idle_gpu_workers(workers, int(gpus)):
            r = w.ex.ledger
            if r.fits(shape) and all(r.gpu_free.get(g, 0.0) >= 1 - EPS for g in w.gpus):
                return w, None, None
        ex = first_fit(executors, shape)
        return None if ex is None else (None, ex, None)
    idle = {}
    for w in idle_gpu_workers(workers, 1):
        idle.setdefault((w.ex, w.gpus[0]), w)
    best = None
    for ex in executors:
        if not ex.ledger.fits((shape[0], 0, shape[2])):
            continue
        for d, c in ex.ledger.gpu_free.items():
            if c + EPS >= gpus:
                key = (c, (ex, d) not in idle)
                if best is None or key < best[0]:
                    best = (key, ex, d)
    if best is None:
        return None
    _, ex, d = best
    w = idle.get((ex, d))
    return (w, None, None) if w is not None else (None, ex, [d])


def first_fit(executors, shape):
    """The first executor with room for ``shape`` now, or None."""
    for ex in executors:
        if ex.ledger.fits(shape):
            return ex
    return None


def plan_gang(executors, shape, n):
    """A place ``(executor, devices)`` for each of ``n`` members of ``shape``, all free now, or
    None. Members are packed: an executor is filled before the next is used."""
    gpus = shape[1]
    share = gpu_share(gpus)[1] if gpus > 0 else 0.0
    plan = []
    for ex in executors:
        k = min(ex.ledger.room(shape), n - len(plan))
        if k <= 0:
            continue
        free = dict(ex.ledger.gpu_free)
        for _ in range(k):
            devices = pick_gpus(free, gpus)
            if devices is None:
                break
            for d in devices:
                free[d] -= share
            plan.append((ex, devices))
        if len(plan) == n:
            return plan
    return None


def unschedulable(executors, shape):
    """Why no executor can ever run ``shape``, or None. With no executor yet: None (wait)."""
    if not executors or any(ex.ledger.could_ever_fit(shape) for ex in executors):
        return None
    cpus, gpus, mem = shape
    have = ", ".join(ex.describe() for ex in executors)
    return (f"no executor can ever run a call that needs cpus={cpus:g} gpus={gpus:g} "
            f"memory={mem >> 20}MiB; executors: {have}")


def gang_unschedulable(executors, shape, n):
    """Why this cluster can never start a gang of ``n`` members of ``shape`` (not even idle),
    or None. No executor yet: None (wait)."""
    if not executors:
        return None
    fit = sum(ex.ledger.room(shape, total=True) for ex in executors)
    if fit >= n:
        return None
    cpus, gpus, mem = shape
    have = ", ".join(ex.describe() for ex in executors[:8]) + (
        f" and {len(executors) - 8} more" if len(executors) > 8 else "")
    return (f"a gang of {n} members with cpus={cpus:g} gpus={gpus:g} memory={mem >> 20}MiB each can never "
            f"start: this cluster holds at most {fit} such members at once (executors: {have})")


__all__ = ["CPU_EPS", "pick_worker", "extra_worker_on", "idle_gpu_workers", "place_gpu", "first_fit",
           "plan_gang", "unschedulable", "gang_unschedulable"]
