"""Resource requests and the resource ledger: parsing what a user asks for (cpus, gpus, memory),
and one definition of what a shape takes from an executor and how many fit (``Ledger``)."""
from __future__ import annotations

from typing import Iterable


def parse_memory(value) -> int:
    """'2GiB', '512MB', '1.5G', 1024 -> bytes. ValueError with the accepted forms otherwise."""
    if value is None:
        return 0
    if isinstance(value, bool):
        raise ValueError("memory must be a size like '2GiB' or a number of bytes, not a bool")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"memory must not be negative, got {value}")
        return int(value)
    text = str(value).strip().replace(" ", "")
    units = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
             "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}
    i = len(text)
    while i and not text[i - 1].isdigit() and text[i - 1] != ".":
        i -= 1
    num, unit = text[:i], text[i:].lower()
    try:
        n = float(num)
    except ValueError:
        n = None
    if n is None or unit not in units or n < 0:
        raise ValueError(f"memory must be a size like '512MiB', '2GiB' or '1.5GB', got {value!r}")
    return int(n * units[unit])


# ---------------------------------------------------------------------------- the resource ledger
# One definition of what a call of a shape ``(cpus, gpus, memory)`` takes from an executor and
# how many fit: the broker reserves and returns through it, and the autoscaler's policy asks it
# how many calls one executor of a pool holds (it once recomputed this by itself and drifted on
# fractional GPUs). A leaf: it imports nothing, so the policy can use it without the broker.
EPS = 1e-6  # slack when comparing shares of a GPU device (0.1 + 0.2 ...)
CPU_EPS = 1e-9  # slack when comparing CPUs (fractions add up to a whole one)


def gpu_share(gpus):
    """(devices, share of each) a request takes: a fraction below 1 shares one device, else whole ones."""
    return (1, gpus) if gpus < 1 else (int(gpus), 1.0)


def pick_gpus(free, gpus):
    """Devices for ``gpus`` out of ``free`` (device -> free share, in device order), or None.

    A fraction goes to the device with the least room that still holds it (best fit: partly
    used devices fill up first, whole ones stay whole); whole devices are the first fully free."""
    if gpus <= 0:
        return []
    n, share = gpu_share(gpus)
    if share < 1:
        best = None
        for d, c in free.items():
            if c + EPS >= share and (best is None or c < free[best]):
                best = d
        return None if best is None else [best]
    whole = [d for d, c in free.items() if c >= 1 - EPS]
    return whole[:n] if len(whole) >= n else None


class Ledger:
    """What one executor has (``cpus``, GPU ``gpus`` devices, ``memory`` bytes) and what of it is
    not reserved. ``take(shape)`` and ``give(shape, devices)`` are the only ways resources move."""
    __slots__ = ("cpus", "gpus", "memory", "free_cpus", "free_mem", "gpu_free")

    def __init__(self, cpus: float, gpus: Iterable[int] = (), memory: int = 0) -> None:
        self.cpus = float(cpus)
        self.gpus = list(dict.fromkeys(int(g) for g in gpus))
        self.memory = int(memory)
        self.free_cpus, self.free_mem = self.cpus, self.memory
        self.gpu_free = {g: 1.0 for g in self.gpus}  # device -> share not reserved (1.0: wholly free)

    @property
    def free_gpus(self):
        """Devices nothing holds any share of."""
        return [d for d, c in self.gpu_free.items() if c >= 1 - EPS]

    def fits(self, shape):
        """Whether one call of ``shape`` fits in what is free now."""
        cpus, gpus, mem = shape
        return (cpus <= self.free_cpus + CPU_EPS and mem <= self.free_mem
                and (gpus <= 0 or pick_gpus(self.gpu_free, gpus) is not None))

    def could_ever_fit(self, shape):
        """Whether one call of ``shape`` fits when nothing is reserved."""
        cpus, gpus, mem = shape
        return cpus <= self.cpus + CPU_EPS and mem <= self.memory and gpus <= len(self.gpus)

    def room(self, shape: tuple[float, float, int], total: bool = False) -> int:
        """How many calls of ``shape`` fit side by side now (``total``: with nothing reserved)."""
        cpus, gpus, mem = shape
        fc, fm = (self.cpus, self.memory) if total else (self.free_cpus, self.free_mem)
        k = 1 << 30
        if cpus > 0:
            k = min(k, int((fc + CPU_EPS) / cpus))
        if mem > 0:
            k = min(k, fm // mem)
        if gpus > 0:
            caps = [1.0] * len(self.gpus) if total else list(self.gpu_free.values())
            n, share = gpu_share(gpus)
            if share < 1:
                k = min(k, sum(int((c + EPS) / share) for c in caps))
            else:
                k = min(k, sum(1 for c in caps if c >= 1 - EPS) // n)
        return max(0, k)

    def take(self, shape, devices=None):
        """Reserve ``shape`` (its GPUs on ``devices``, else where ``pick_gpus`` chooses); returns
        the devices taken. It does not check that it fits: callers ask ``fits`` first, and a call
        that takes its lent CPUs back (UNBLOCKED) may oversubscribe on purpose."""
        cpus, gpus, mem = shape
        self.free_cpus -= cpus
        self.free_mem -= mem
        if gpus <= 0:
            return []
        if devices is None:
            devices = pick_gpus(self.gpu_free, gpus) or []
        share = gpu_share(gpus)[1]
        for d in devices:
            if d in self.gpu_free:
                self.gpu_free[d] -= share
        return list(devices)

    def give(self, shape, devices=()):
        """Return what ``take(shape)`` reserved on ``devices``."""
        cpus, gpus, mem = shape
        self.free_cpus += cpus
        self.free_mem += mem
        if gpus <= 0:
            return
        share = gpu_share(gpus)[1]
        for d in devices:
            if d in self.gpu_free:
                c = self.gpu_free[d] + share
                self.gpu_free[d] = 1.0 if c > 1 - EPS else c


def starved(waiting: dict, status: dict) -> list[tuple[tuple, str]]:
    """Which long-waiting calls wait for resources that no executor has free, and why: the
    driver's warning that such a call is neither lost nor running (Ray's "cannot be scheduled
    right now"). ``waiting`` maps a shape ``(cpus, gpus, memory)`` to the labels of this
    driver's calls of that shape that have waited long; ``status`` is the broker's STATUS.
    A shape is starved while the broker still queues it (not a cap, not its arguments) and no
    executor's free resources, as the broker's own ``Ledger`` counts them, fit one call. Pure:
    the watchdog in ``fabric.connection`` brings both and says the result."""
    queued = {(q.get("cpus"), q.get("gpus"), q.get("memory")) for q in status.get("queues") or () if q.get("depth")}
    exs = status.get("executors") or []
    ledgers = []
    for e in exs:
        lg = Ledger(e.get("cpus", 0), e.get("gpus") or (), e.get("memory", 0))
        lg.free_cpus, lg.free_mem = float(e.get("free_cpus", 0)), int(e.get("free_memory", 0))
        lg.gpu_free = {int(d): float(c) for d, c in (e.get("gpu_free") or {}).items()}
        ledgers.append(lg)
    if not ledgers:  # no executor yet: the broker's grace at zero, or an autoscaler, answers that
        return []
    total = sum(lg.cpus for lg in ledgers)
    free = sum(lg.free_cpus for lg in ledgers)
    held = sum(int(e.get("instances", 0)) for e in exs)
    out = []
    for shape, labels in sorted(waiting.items()):
        if shape not in queued or any(lg.fits(shape) for lg in ledgers):
            continue
        cpus, gpus, mem = shape
        need = f"cpus={cpus:g}" + (f" gpus={gpus:g}" if gpus else "") + (f" memory={mem / 2**20:.0f}MiB" if mem else "")
        names = sorted(set(labels))
        named = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        calls = f"1 call ({named}) waits" if len(labels) == 1 else f"{len(labels)} calls ({named}) wait"
        holders = ("" if not held else "; 1 instance holds its resources for life" if held == 1
                   else f"; {held} instances hold theirs for life")
        out.append((shape, f"{calls} for {need}, which no executor has free now ({free:g} of {total:g} CPUs "
                           f"free{holders}). They start when resources free up: fabric.kill the instances you "
                           f"no longer need, give a class fewer cpus (@fabric.cls(cpus=0)), or add an executor"))
    return out
