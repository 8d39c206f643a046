"""The broker's records: a call, an executor, a worker, an instance, a gang, a function's
scaling options, and the GPU-share arithmetic. Plain data with small helpers; the broker
(its parts, see core.py) decides what happens to them; ``Tables`` holds them all."""
from __future__ import annotations

import itertools
import time
from collections import OrderedDict, deque

from ..resources import EPS, Ledger, gpu_share, pick_gpus  # noqa: F401 - EPS, gpu_share, pick_gpus: re-exported

WAITING, QUEUED, SPAWNING, RUNNING, DONE = range(5)
HELD = 5  # a gang member that finished OK: its outcome waits until its whole gang has finished
# Tables.dropping's mark for a call prefetched behind one that BLOCKED: DROP sent to take it back
TAKE_BACK = tuple([None, None, False])


class Call:
    __slots__ = ("id", "driver", "frames", "code_hash", "kind", "actor", "shape", "retries",
                 "timeout", "deps", "depv", "missing", "worker", "started", "state", "gang", "maxc", "warm", "deaths",
                 "waited")

    def __init__(self, cid, driver, frames, h):
        self.id = cid
        self.driver = driver            # the driver's result-socket identity
        self.frames = frames            # [hdr (no HAS_CODE), deps, payload, *buffers, (GANG: member ids)]
                                        # small ones as bytes
        self.code_hash, self.kind, self.actor, self.retries, self.timeout = (h.code_hash, h.kind, h.actor_id,
                                                                            h.retries, h.timeout)
        self.maxc, self.warm = h.max_containers, h.min_warm
        self.shape = (h.cpus, h.gpus, h.memory)
        self.deps = None
        self.depv = None                # dep id -> its outcome frames, filled as deps resolve
        self.missing = 0
        self.worker = None
        self.started = 0.0
        self.state = WAITING
        self.gang = None                # (Gang, rank) for the members of a gang
        self.deaths = 0                 # workers that died with it next, running nothing (see lose_worker)
        self.waited = False             # it said BLOCKED once: it waits on calls it submits, may again


class Executor:
    """One executor daemon: its identity, its workers, and its resources (``ledger``: the one
    place CPUs, memory and GPU shares are reserved and returned)."""
    __slots__ = ("id", "ident", "host", "ledger", "workers", "last_seen", "info")

    def __init__(self, ident, info):
        self.ident = ident
        self.id = ident[1:9]
        self.info = info
        self.host = str(info.get("host", "?"))
        self.ledger = Ledger(info["cpus"], info.get("gpus", []), info.get("memory", 0))
        self.workers = {}
        self.last_seen = time.monotonic()

    def describe(self):
        """``host: cpus=.. gpus=.. memory=..MiB``, for messages saying why a call cannot run."""
        r = self.ledger
        return f"{self.host}: cpus={r.cpus:g} gpus={len(r.gpus)} memory={r.memory >> 20}MiB"


class Worker:
    __slots__ = ("ident", "ex", "inflight", "held", "gpus", "actor", "credit", "code_seen", "pid", "pool",
                 "doomed", "killed", "gang", "addr", "spare", "lent", "arenas")

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
        self.arenas = set()             # drivers' arenas it was told to map ahead (MAP_ARENA, arenas.py)


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


class Tables:
    """The broker's state: every table its parts share (admission, scheduler, workers,
    instances, gangs, outcomes; see core.py). Plain data: the parts decide what changes."""

    def __init__(self, epoch: str):
        self.epoch = epoch                          # this broker's run: new after a restart
        self.journal = None                         # the Journal, when the broker keeps one
        self.restoring = False                      # replaying the journal: outcomes are not sent
        self.unsent: set[bytes] = set()             # kept outcomes not delivered by this broker (restored, unreachable)
        self.executors: dict[bytes, Executor] = {}  # executor identity -> Executor
        self.workers: dict[bytes, Worker] = {}
        self.idle: dict[Worker, None] = {}          # pool workers with nothing in flight
        self.partial: dict[Worker, None] = {}       # pool workers that may take a prefetch
        self.queues: dict[tuple, deque] = {}        # shape -> ready calls
        self.calls: dict[bytes, Call] = {}          # every call without an outcome yet
        self.results: dict[bytes, list] = {}        # outcome frames kept until RELEASE
        self.waiters: dict[bytes, list] = {}        # dep id -> calls waiting for it
        self.fetchers: dict[bytes, list] = {}       # call id -> r sockets that FETCHed its outcome
        self.actors: dict[bytes, Actor] = {}
        self.pending_actors: deque[Actor] = deque()
        self.gangs: dict[bytes, Gang] = {}          # gangs without an outcome yet, by rank 0's call id
        self.names: dict[tuple, dict] = {}          # (namespace, name) -> a named instance (NAME)
        self.actor_names: dict[bytes, tuple] = {}   # instance id -> its (namespace, name)
        self.restarts: dict[bytes, list] = {}       # instance id -> [restarts left, its ACTOR_NEW, max_restarts]
        self.gang_queue: deque[Gang] = deque()      # gangs ready to start, FIFO
        self.warm_gang: dict[tuple, list] = {}      # (driver, executor, shape) -> workers kept (min_warm)
        self.dead_actors: OrderedDict[bytes, list] = OrderedDict()  # id -> the failure its calls get
        self.spawns: dict[str, tuple] = {}          # spawn token -> (executor, devices, call|actor)
        self.code: dict[bytes, object] = {}         # code hash -> code frame
        self.avg_duration: dict[bytes, float] = {}  # code hash -> moving average of run time
        # per function/class options (min_warm, max_containers): code hash -> FnInfo; only for
        # code whose calls set one of them, so plain calls pay nothing
        self.fns: dict[bytes, FnInfo] = {}
        self.timeouts: list = []                    # heap of (deadline, seq, call)
        # cancelled calls whose worker was sent DROP: id -> (force, recursive, it answered "running")
        self.dropping: dict[bytes, tuple] = {}
        # plain calls ended while their worker may still run them (DROP "k"): id -> (deadline, worker)
        self.stopping: dict[bytes, tuple] = {}
        self.blocked = 0                            # workers whose call waits on its own calls (BLOCKED)
        self.seq = itertools.count()                # tie-breaker in the timeouts heap
        self.tokens = itertools.count(1)            # spawn tokens
        self.stats = {"submitted": 0, "completed": 0, "retried": 0, "refused": 0, "dropped": 0,
                      "drop_too_late": 0}
