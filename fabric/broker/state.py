"""The broker's records: a call, an executor, a worker, an instance, a gang, a function's
scaling options, and the GPU-share arithmetic. Plain data with small helpers; the broker
(core.py, gangs.py) decides what happens to them."""
from __future__ import annotations

import time
from collections import deque

WAITING, QUEUED, SPAWNING, RUNNING, DONE = range(5)
HELD = 5  # a gang member that finished OK: its outcome waits until its whole gang has finished
EPS = 1e-6  # slack when comparing shares of a GPU device (0.1 + 0.2 ...)


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


class Call:
    __slots__ = ("id", "driver", "frames", "code_hash", "kind", "actor", "shape", "retries",
                 "timeout", "deps", "depv", "missing", "worker", "started", "state", "gang", "maxc", "warm", "deaths")

    def __init__(self, cid, driver, frames, h):
        self.id = cid
        self.driver = driver            # the driver's result-socket identity
        self.frames = frames            # [hdr (no HAS_CODE), deps, payload, *buffers, (GANG: member ids)]
                                        # small ones as bytes
        (_, self.code_hash, self.kind, self.actor, cpus, gpus, mem, self.retries, self.timeout, _, self.maxc,
         self.warm, _, _) = h
        self.shape = (cpus, gpus, mem)
        self.deps = None
        self.depv = None                # dep id -> its outcome frames, filled as deps resolve
        self.missing = 0
        self.worker = None
        self.started = 0.0
        self.state = WAITING
        self.gang = None                # (Gang, rank) for the members of a gang
        self.deaths = 0                 # workers that died with it next, running nothing (see lose_worker)


class Executor:
    __slots__ = ("id", "ident", "host", "cpus", "gpus", "memory", "free_cpus", "free_mem",
                 "gpu_free", "workers", "last_seen", "info")

    def __init__(self, ident, info):
        self.ident = ident
        self.id = ident[1:9]
        self.info = info
        self.host = str(info.get("host", "?"))
        self.cpus = float(info["cpus"])
        self.gpus = list(dict.fromkeys(int(g) for g in info.get("gpus", [])))
        self.memory = int(info.get("memory", 0))
        self.free_cpus, self.free_mem = self.cpus, self.memory
        self.gpu_free = {g: 1.0 for g in self.gpus}  # device -> share not reserved (1.0: wholly free)
        self.workers = {}
        self.last_seen = time.monotonic()

    @property
    def free_gpus(self):
        """Devices nothing holds any share of."""
        return [d for d, c in self.gpu_free.items() if c >= 1 - EPS]

    def fits(self, shape):
        cpus, gpus, mem = shape
        return (cpus <= self.free_cpus + 1e-9 and mem <= self.free_mem
                and (gpus <= 0 or pick_gpus(self.gpu_free, gpus) is not None))

    def could_ever_fit(self, shape):
        cpus, gpus, mem = shape
        return cpus <= self.cpus + 1e-9 and mem <= self.memory and gpus <= len(self.gpus)

    def room(self, shape, total=False):
        """How many calls of ``shape`` fit side by side on this executor now (``total``: when idle)."""
        cpus, gpus, mem = shape
        fc, fm = (self.cpus, self.memory) if total else (self.free_cpus, self.free_mem)
        k = 1 << 30
        if cpus > 0:
            k = min(k, int((fc + 1e-9) / cpus))
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

    def take_gpus(self, gpus, devices=None):
        """Reserve ``gpus`` (on ``devices``, else as ``pick_gpus`` chooses); returns the devices."""
        if gpus <= 0:
            return []
        if devices is None:
            devices = pick_gpus(self.gpu_free, gpus) or []
        share = gpu_share(gpus)[1]
        for d in devices:
            if d in self.gpu_free:
                self.gpu_free[d] -= share
        return list(devices)

    def give_gpus(self, devices, gpus):
        if gpus <= 0:
            return
        share = gpu_share(gpus)[1]
        for d in devices:
            if d in self.gpu_free:
                c = self.gpu_free[d] + share
                self.gpu_free[d] = 1.0 if c > 1 - EPS else c


class Worker:
    __slots__ = ("ident", "ex", "inflight", "held", "gpus", "actor", "credit", "code_seen", "pid", "pool",
                 "doomed", "killed", "gang", "addr", "spare", "lent")

    def __init__(self, ident, ex, info):
        self.ident = ident
        self.ex = ex
        self.inflight = {}              # call id -> Call, in dispatch order
        self.held = None                # the shape whose resources this worker holds while busy
        self.gpus = ()
        self.actor = None
        self.credit = max(1, int(info.get("credit", 1)))
        self.code_seen = set()
        self.pid = info.get("pid")
        self.pool = info.get("kind") == "pool"
        self.doomed = False             # a kill was sent, or it is unreachable: never give it another call
        self.killed = False             # a kill was sent
        self.gang = None                # (Gang, rank) while it runs a member of a gang
        self.addr = None                # "host:port" a gang member may listen on (a spawned worker's READY)
        self.spare = None               # (key, since) while kept warm for its driver's next gang (min_warm)
        self.lent = None                # CPUs of its call lent out while that call waits on its own (BLOCKED)


class Actor:
    __slots__ = ("id", "driver", "shape", "queue", "worker", "failure", "release_when_idle",
                 "label", "ex", "devices", "since", "fn")

    def __init__(self, aid, driver, shape):
        self.id, self.driver, self.shape = aid, driver, shape
        self.queue = deque()            # calls not yet sent to the worker, in submission order
        self.worker = None
        self.failure = None             # (status, payload) once dead: every later call gets it
        self.release_when_idle = False
        self.ex = None
        self.devices = ()
        self.fn = None                  # its class's FnInfo, when the class has max_containers
        self.since = time.monotonic()


class Gang:
    """n calls of one function that start together or not at all (kind GANG), one worker each.

    ``members[r]`` is rank r's Call (rank 0's is the SUBMIT's); they share its frames. The
    broker reserves all n places in one go, spawns n workers, and sends the n CALLs once every
    worker is READY; outcomes are held until every member has one, so a crash can rerun the
    whole gang without a member having answered twice."""
    __slots__ = ("id", "members", "shape", "retries", "state", "workers", "addrs", "outcomes", "held",
                 "tokens", "warm")

    def __init__(self, lead, members):
        self.id = lead.id
        self.members = members
        self.shape = lead.shape
        self.retries = lead.retries
        self.state = WAITING            # WAITING (arguments) / QUEUED / SPAWNING / RUNNING / DONE
        n = len(members)
        self.workers = [None] * n       # this attempt's worker per rank
        self.addrs = [None] * n         # "host:port" per rank, from its worker's READY
        self.outcomes = [None] * n      # frames of members that finished OK, held until all have
        self.held = 0
        self.tokens = set()             # spawns of this attempt not READY yet
        self.warm = lead.warm           # min_warm: its workers are kept for the next gang of its shape


class FnInfo:
    """What the broker knows of a function or class with ``min_warm`` or ``max_containers``."""
    __slots__ = ("code_hash", "kind", "shape", "min_warm", "max_containers", "running", "capped", "drivers")

    def __init__(self, code_hash, kind):
        self.code_hash, self.kind = code_hash, kind
        self.shape = (1.0, 0.0, 0)
        self.min_warm = self.max_containers = 0
        self.running = 0          # calls running (functions) or live instances (classes) under the cap
        self.capped = deque()     # calls/instances waiting for a place under max_containers
        self.drivers = set()      # connected drivers that use it: min_warm holds while one is
