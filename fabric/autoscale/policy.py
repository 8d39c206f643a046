"""The autoscaling policy: from the broker's STATUS and the provider's instances to decisions.

Pure in the sense that matters for testing: no sockets, no clock, no processes (of fabric it
imports only ``fabric.resources``, the one definition of what fits on an executor). ``decide``
takes the status dict (what ``fabric.client.request(address, STATUS)`` returns), the time and
the provider's instances, and returns :class:`Decision` records, each with a reason. The
only state kept between calls is what a window needs: since when each executor has been idle,
which instances were just terminated, and a back-off after launches that died before joining.

Per executor *kind* (``cpu``, ``gpu``) there is one :class:`Pool` with ``min``/``max``
executors and the size of one executor. An executor's kind is its ``kind`` label, else ``gpu``
when it advertises GPUs, else ``cpu``; a queued call's kind is ``gpu`` when it asks for GPUs.

Demand, in executors: every queued call needs ``1 / slots`` of an executor, where ``slots`` is
how many calls of its shape one executor of the pool runs at once (one per pool worker, i.e.
per whole CPU, for CPU calls; whole devices for GPU calls); every busy executor counts with the
fraction of it in use. ``desired = clamp(ceil(queued + running), min, max)``. The autoscaler
launches ``desired - current`` at once (``current`` counts executors that joined the broker plus
instances still starting), and terminates an executor it launched only when it has been idle
(no call in flight, no instance) for the idle window and the pool is above ``desired``.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

from ..resources import Ledger

PROVIDER_LABEL = "provider_id"   # executor label that names the provider's instance
KIND_LABEL = "kind"              # executor label: cpu | gpu


@dataclass
class Pool:
    """Limits and executor size for one kind of executor."""
    kind: str = "cpu"
    min: int = 0
    max: int = 4
    cpus: float = 1.0      # CPUs of one executor (its pool workers: one per whole CPU)
    gpus: int = 0          # GPU devices of one executor (gpu pools)

    def __post_init__(self) -> None:
        if self.min < 0 or self.max < self.min:
            raise ValueError(f"{self.kind} pool: need 0 <= min <= max, got min={self.min} max={self.max}")
        if self.cpus <= 0:
            raise ValueError(f"{self.kind} pool: cpus per executor must be > 0")
        if self.kind == "gpu" and self.gpus < 1 and self.max > 0:
            raise ValueError("gpu pool: gpus per executor must be >= 1")

    def slots(self, cpus: float, gpus: float, memory: int = 0) -> int:
        """How many calls of this shape one executor of this pool runs at once (0: never fits).

        What fits is the broker's own arithmetic (``fabric.resources.Ledger.room``: fractional
        GPUs share a device, whole ones do not); memory is not counted, as a pool does not say
        its executors' memory. CPU calls also take one pool worker each (one per whole CPU)."""
        fit = Ledger(self.cpus, range(self.gpus)).room((cpus, gpus, 0), total=True)
        if gpus > 0 or fit == 0:  # GPU calls run in workers spawned for them
            return fit
        return max(1, min(max(1, int(self.cpus)), fit))  # one call at a time per pool worker


@dataclass
class Machine:
    """One machine a provider started (a process, a VM, a pod): what the policy needs to know
    about it. (The cloud calls it an instance; in fabric an instance is a ``@fabric.cls`` object.)"""
    id: str
    kind: str = "cpu"
    launched_at: float = 0.0     # time.time() when launched (or first seen)
    state: str = "pending"       # pending | running | requested (capacity asked for, no id yet)


Instance = Machine  # the name fabric.autoscale exported first


@dataclass
class Decision:
    time: float
    kind: str
    action: str                  # launch | terminate | replace | hold | error
    code: str                    # a short key: from_zero, scale_up, below_min, at_max, idle, to_zero, ...
    reason: str
    count: int = 0
    ids: list[str] = field(default_factory=list)
    desired: int = 0
    current: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def executor_kind(ex: dict[str, Any]) -> str:
    labels = ex.get("labels") or {}
    if labels.get(KIND_LABEL):
        return str(labels[KIND_LABEL])
    return "gpu" if ex.get("gpus") else "cpu"


def shape_kind(q: dict[str, Any]) -> str:
    return "gpu" if q.get("gpus", 0) > 0 else "cpu"


def is_idle(ex: dict[str, Any]) -> bool:
    return bool(ex.get("busy", 0) == 0 and ex.get("instances", 0) == 0)


def utilisation(ex: dict[str, Any]) -> float:
    """The fraction of an executor in use: busy workers over pool workers, or reserved resources."""
    if is_idle(ex):
        return 0.0
    cpus = float(ex.get("cpus") or 0)
    by_workers = (ex.get("busy", 0) + ex.get("instances", 0)) / max(1, int(cpus))
    by_cpus = (cpus - float(ex.get("free_cpus", cpus))) / cpus if cpus > 0 else 0.0
    gpus = len(ex.get("gpus") or [])
    by_gpus = (gpus - len(ex.get("free_gpus") or [])) / gpus if gpus else 0.0
    return min(1.0, max(float(by_workers), by_cpus, by_gpus, 1e-6))


class Policy:
    def __init__(self, pools: dict[str, Pool] | Iterable[Pool], idle_s: float = 60.0, join_timeout_s: float = 120.0,
                 max_backoff_s: float = 60.0, forget_terminated_s: float = 300.0) -> None:
        pools = list(pools.values()) if isinstance(pools, dict) else list(pools)
        self.pools = {p.kind: p for p in pools}
        self.idle_s = float(idle_s)
        self.join_timeout_s = float(join_timeout_s)
        self.max_backoff_s = max_backoff_s
        self.forget_terminated_s = forget_terminated_s
        self.idle_since: dict[str, float] = {}        # broker executor id -> since when idle
        self.terminated: dict[str, float] = {}        # provider id -> when we terminated it
        self.pending_prev: dict[str, str] = {}        # provider id -> kind, pending at the last decide
        self.failures: dict[str, int] = {}            # kind -> launches that died before joining, in a row
        self.backoff_until: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------
    def decide(self, status: dict[str, Any], now: float | None = None,
               instances: Iterable[Machine] = ()) -> list[Decision]:
        now = time.time() if now is None else now
        for pid, t in list(self.terminated.items()):
            if now - t > self.forget_terminated_s:
                del self.terminated[pid]
        instances = [i for i in instances if i.id not in self.terminated]
        live = {i.id for i in instances}
        executors = [ex for ex in status.get("executors", [])
                     if (ex.get("labels") or {}).get(PROVIDER_LABEL) not in self.terminated]
        joined = {(ex.get("labels") or {}).get(PROVIDER_LABEL) for ex in executors} - {None}

        # launches that vanished before joining the broker: back off, or we relaunch in a loop
        for pid, kind in self.pending_prev.items():
            if pid not in live and pid not in joined:
                n = self.failures[kind] = self.failures.get(kind, 0) + 1
                self.backoff_until[kind] = now + min(self.max_backoff_s, 2.0 ** (n - 1))
        self.pending_prev = {}

        # idle windows
        seen = set()
        for ex in executors:
            seen.add(ex["id"])
            if is_idle(ex):
                self.idle_since.setdefault(ex["id"], now)
            else:
                self.idle_since.pop(ex["id"], None)
        for eid in list(self.idle_since):
            if eid not in seen:
                del self.idle_since[eid]

        out: list[Decision] = []
        kinds_queued = {shape_kind(q) for q in status.get("queues", []) if q.get("depth", 0) > 0}
        for kind in sorted(kinds_queued - set(self.pools)):
            depth = sum(q["depth"] for q in status.get("queues", []) if shape_kind(q) == kind)
            out.append(Decision(now, kind, "hold", "no_pool",
                                f"{depth} {kind} calls queued but no {kind} pool is configured "
                                f"(max executors of kind {kind} is 0)"))
        for kind, pool in self.pools.items():
            out += self._decide_pool(pool, status, executors, instances, joined, now)
        return out

    # ------------------------------------------------------------------------------------------
    def _decide_pool(self, pool: Pool, status: dict[str, Any], executors: list[dict[str, Any]],
                     instances: list[Machine], joined: set[str | None], now: float) -> list[Decision]:
        kind = pool.kind
        exs = [ex for ex in executors if executor_kind(ex) == kind]
        mine = {i.id: i for i in instances if i.kind == kind}
        managed: dict[Any, dict[str, Any]] = {(ex.get("labels") or {}).get(PROVIDER_LABEL): ex for ex in exs
                   if (ex.get("labels") or {}).get(PROVIDER_LABEL) in mine}
        pending = [i for pid, i in mine.items() if pid not in joined]
        if managed:
            self.failures[kind] = 0
            self.backoff_until.pop(kind, None)

        # demand, in executors of this pool
        queued_calls, queued_units, unfit = 0, 0.0, []
        for q in status.get("queues", []):
            if shape_kind(q) != kind or q.get("depth", 0) <= 0:
                continue
            s = pool.slots(q.get("cpus", 0), q.get("gpus", 0), q.get("memory", 0))
            if s == 0:
                unfit.append(q)
                continue
            queued_calls += q["depth"]
            queued_units += q["depth"] / s
        running_units = sum(utilisation(ex) for ex in exs)
        no_executor = not executors and not instances
        queued_anywhere = any(x.get("depth", 0) > 0 for x in status.get("queues", []))
        hidden = (kind == "cpu" and no_executor and not queued_anywhere and status.get("calls_pending", 0) > 0)
        if hidden:  # calls pending but none queued (from a status without instance demand): they need an executor
            queued_units = 1.0
        need = math.ceil(queued_units + running_units - 1e-9)
        # min_warm of functions and classes (while a driver that uses them is connected): a floor
        warm_units, warm_names = 0.0, []
        for f in status.get("functions", []):
            if f.get("min_warm") and shape_kind(f) == kind:
                s = pool.slots(f.get("cpus", 1), f.get("gpus", 0), f.get("memory", 0))
                if s:
                    warm_units += f["min_warm"] / s
                    warm_names.append(f"{f.get('name', '?')} x{f['min_warm']}")
        warm_need = math.ceil(warm_units - 1e-9)
        for_warm = warm_need > need
        need = max(need, warm_need)
        desired = max(pool.min, min(pool.max, need))
        current = len(exs) + len(pending)
        out: list[Decision] = []

        def dec(action: str, code: str, reason: str, count: int = 0, ids: Iterable[str] = ()) -> Decision:
            d = Decision(now, kind, action, code, reason, count, list(ids), desired, current)
            out.append(d)
            return d

        demand = (f"{queued_calls} calls queued ({queued_units:.1f} executors of work), "
                  f"{running_units:.1f} executors busy")
        if hidden:
            demand = f"{status.get('calls_pending')} calls pending (not queued: instances or dependencies)"
        have = f"have {len(exs)} (+{len(pending)} starting)"
        for q in unfit:
            dec("hold", "unfit_shape",
                f"{q['depth']} calls need cpus={q['cpus']:g} gpus={q['gpus']:g}, more than one {kind} executor "
                f"has (cpus={pool.cpus:g} gpus={pool.gpus}); the broker fails them Unschedulable once an "
                f"executor has joined: raise --cpus-per-executor")

        # instances that never joined the broker: replace (or drop, when no longer needed)
        stale = [i for i in pending if i.state != "requested" and now - i.launched_at > self.join_timeout_s]
        surplus = max(0, current - desired)
        drop = stale[:surplus]
        replace = stale[surplus:]
        if drop:
            self._terminated(drop, now)
            dec("terminate", "never_joined",
                f"{len(drop)} instance(s) did not join the broker within {self.join_timeout_s:g}s and are "
                f"no longer needed; {demand}", len(drop), [i.id for i in drop])
            current -= len(drop)
            pending = [i for i in pending if i not in drop]
        if replace:
            self._terminated(replace, now)
            dec("replace", "never_joined",
                f"{len(replace)} instance(s) did not join the broker within {self.join_timeout_s:g}s: "
                f"replaced; {demand}", len(replace), [i.id for i in replace])

        if desired > current:
            n = desired - current
            if now < self.backoff_until.get(kind, 0):
                dec("hold", "backoff",
                    f"want {n} more but {self.failures.get(kind, 0)} launch(es) in a row died before joining; "
                    f"retrying in {self.backoff_until[kind] - now:.0f}s")
            else:
                if for_warm:
                    code, why = "min_warm", f"min_warm of {', '.join(warm_names)} needs {warm_need} executor(s)"
                elif current == 0 and need > 0:
                    code, why = "from_zero", f"scale from zero: {demand}"
                elif need < pool.min:
                    code, why = "below_min", f"below min {pool.min}: {have}"
                else:
                    code, why = "scale_up", f"{demand}; {have}"
                if need > pool.max:
                    why += f"; capped at max {pool.max}"
                dec("launch", code, f"{why}; launching {n}", n)
        elif need > pool.max and current >= pool.max and queued_calls:
            dec("hold", "at_max", f"at max {pool.max}: {demand}; {have}")
        elif pool.min and current == desired == pool.min:
            kept = [pid for pid, ex in managed.items()
                    if now - self.idle_since.get(ex["id"], now) >= self.idle_s]
            if kept:  # idle past the window, kept because the pool is at its min
                dec("hold", "at_min", f"at min {pool.min}: keeping {', '.join(sorted(map(str, kept)))}, idle longer than "
                                      f"the idle window {self.idle_s:g}s; {demand}")
        elif current > desired:
            surplus = current - desired
            over_max = current > pool.max
            candidates = []
            for i in pending:  # starting instances count as idle since their launch
                if over_max or now - i.launched_at >= self.idle_s:
                    candidates.append((0, i.launched_at, i.id, f"started {now - i.launched_at:.1f}s ago, not joined"))
            for pid, ex in managed.items():
                since = self.idle_since.get(ex["id"])
                if since is not None and (over_max or now - since >= self.idle_s):
                    candidates.append((1, since, pid, f"idle {now - since:.1f}s"))
            candidates.sort()
            chosen = candidates[:surplus]
            if chosen:
                requested = {i.id for i in pending if i.state == "requested"}  # their ids are not stable
                self._terminated([Machine(c[2]) for c in chosen if c[2] not in requested], now)
                left = current - len(chosen)
                if over_max:
                    code, head = "above_max", f"above max {pool.max}"
                elif left == 0:
                    code, head = "to_zero", "scale to zero"
                else:
                    code, head = "idle", "scale down"
                details = ", ".join(f"{c[2]} ({c[3]})" for c in chosen)
                dec("terminate", code,
                    f"{head}: {details}; idle window {self.idle_s:g}s; {demand}; desired {desired} (min {pool.min})",
                    len(chosen), [c[2] for c in chosen])

        self.pending_prev.update({i.id: kind for i in pending if i.id not in self.terminated
                                  and i.state != "requested"})
        return out

    def _terminated(self, insts: Iterable[Machine], now: float) -> None:
        for i in insts:
            self.terminated[i.id] = now
            self.pending_prev.pop(i.id, None)
