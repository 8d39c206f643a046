"""One-shot control requests to a broker (STATUS, SHUTDOWN, NAME) and the STATUS schema.

Kept apart from the driver's connection (``fabric.connection``) so that what only asks the
broker something (``fabric status``, ``fabric stop``, the autoscaler, a cluster stopping its
broker) does not import the driver. ``request`` returns the reply's JSON object as sent;
``ClusterStatus.parse`` reads a STATUS reply into typed records, tolerating keys a newer or
older broker adds or lacks (docs/protocol.md, STATUS_REPLY).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import zmq

from . import protocol as P
from . import security
from .errors import ConnectionFailed, ProtocolError


def request(address: str, command: int, timeout: float = 5.0, ctx=None, body: dict | None = None) -> dict:
    """One control request (STATUS, SHUTDOWN, NAME with its JSON ``body``) from a throwaway
    socket; a dict reply or {}."""
    own = ctx is None
    ctx = ctx or zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.ROUTING_ID, b"c" + P.new_id())
    s.setsockopt(zmq.LINGER, 1000)
    security.curve_client(s, watch=True, address=address)
    s.connect(address)
    try:
        sent = security.send_first(s, [P.C[command]] + ([P.dumps_json(body)] if body is not None else []))
        if command == P.SHUTDOWN and sent:
            return {}
        if not security.poll(s, timeout):
            raise security.refusal(s) or ConnectionFailed(
                f"no fabric broker answered at {address} within {timeout:g}s")
        msg = s.recv_multipart()
        if P.command_of(msg[0]) == P.ERROR:
            raise ProtocolError(msg[1].decode("utf-8", "replace"))
        return P.loads_json(msg[1])
    finally:
        security.unwatch(s)
        s.close()
        if own:
            ctx.term()


def status(address: str, timeout: float = 5.0, ctx=None) -> "ClusterStatus":
    """The broker's STATUS, typed."""
    return ClusterStatus.parse(request(address, P.STATUS, timeout=timeout, ctx=ctx))


# --- the STATUS schema ----------------------------------------------------------------------
@dataclass(frozen=True)
class ExecutorStatus:
    id: str                     # hex
    host: str
    cpus: float
    free_cpus: float
    gpus: list[int]             # device numbers
    free_gpus: list[int]        # devices no call holds any share of
    memory: int                 # bytes
    free_memory: int
    gpu_free: dict[str, float]  # device -> share not reserved (1.0: wholly free)
    workers: int
    busy: int                   # workers running a call
    instances: int
    last_seen_s: float
    labels: dict[str, str]

    @property
    def kind(self) -> str:
        return "gpu" if self.gpus else "cpu"


@dataclass(frozen=True)
class QueueStatus:
    """Calls queued for one shape (or one waiting gang: ``gang`` is its id, depth its members)."""
    cpus: float
    gpus: float
    memory: int
    depth: int
    gang: str | None = None


@dataclass(frozen=True)
class FunctionStatus:
    """A function or class with min_warm or max_containers."""
    name: str
    hash: str
    kind: str                   # "fn" | "cls"
    cpus: float
    gpus: float
    memory: int
    running: int
    waiting: int
    warm: int
    min_warm: int
    max_containers: int | None


@dataclass(frozen=True)
class NamedStatus:
    name: str
    namespace: str
    actor: str                  # hex
    cls: str                    # the class's name ("class" on the wire)
    detached: bool
    alive: bool


@dataclass(frozen=True)
class GangStatus:
    id: str
    size: int
    cpus: float
    gpus: float
    memory: int
    retries_left: int
    state: str                  # waiting | queued | starting | running | done


@dataclass(frozen=True)
class Stats:
    submitted: int = 0
    completed: int = 0
    retried: int = 0
    refused: int = 0


@dataclass(frozen=True)
class ClusterStatus:
    """What a broker answers to STATUS. ``raw`` is the reply as sent (``fabric status --json``,
    ``fabric.cluster_status()``, and the autoscaler's policy, which reads plain dicts)."""
    address: str
    pid: int
    uptime_s: float
    drivers: int
    calls_pending: int
    results_held: int
    instances: int
    executors: list[ExecutorStatus] = field(default_factory=list)
    queues: list[QueueStatus] = field(default_factory=list)
    functions: list[FunctionStatus] = field(default_factory=list)
    named: list[NamedStatus] = field(default_factory=list)
    gangs: list[GangStatus] = field(default_factory=list)
    stats: Stats = field(default_factory=Stats)
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def parse(cls, st: dict) -> "ClusterStatus":
        """Read a STATUS reply; a key it lacks reads as empty or zero, one it adds is kept in ``raw`` only."""
        try:
            return cls(
                address=str(st.get("address", "")), pid=int(st.get("pid", 0)),
                uptime_s=float(st.get("uptime_s", 0.0)), drivers=int(st.get("drivers", 0)),
                calls_pending=int(st.get("calls_pending", 0)), results_held=int(st.get("results_held", 0)),
                instances=int(st.get("instances", 0)),
                executors=[_executor(e) for e in st.get("executors", [])],
                queues=[QueueStatus(cpus=float(q.get("cpus", 0)), gpus=float(q.get("gpus", 0)),
                                    memory=int(q.get("memory", 0)), depth=int(q.get("depth", 0)), gang=q.get("gang"))
                        for q in st.get("queues", [])],
                functions=[_function(f) for f in st.get("functions", [])],
                named=[NamedStatus(name=str(n.get("name", "")), namespace=str(n.get("namespace", "")),
                                   actor=str(n.get("actor", "")), cls=str(n.get("class", "")),
                                   detached=bool(n.get("detached")), alive=bool(n.get("alive")))
                       for n in st.get("named", [])],
                gangs=[GangStatus(id=str(g.get("id", "")), size=int(g.get("size", 0)), cpus=float(g.get("cpus", 0)),
                                  gpus=float(g.get("gpus", 0)), memory=int(g.get("memory", 0)),
                                  retries_left=int(g.get("retries_left", 0)), state=str(g.get("state", "")))
                       for g in st.get("gangs", [])],
                stats=Stats(**{k: int(v) for k, v in (st.get("stats") or {}).items() if k in _STATS}),
                raw=st)
        except (TypeError, ValueError, AttributeError) as e:
            raise ProtocolError(f"malformed STATUS reply: {type(e).__name__}: {e}") from None


_STATS = {"submitted", "completed", "retried", "refused"}


def _executor(e: dict) -> ExecutorStatus:
    cpus = float(e.get("cpus", 0))
    memory = int(e.get("memory", 0))
    return ExecutorStatus(
        id=str(e.get("id", "")), host=str(e.get("host", "?")), cpus=cpus, free_cpus=float(e.get("free_cpus", cpus)),
        gpus=[int(g) for g in e.get("gpus") or []], free_gpus=[int(g) for g in e.get("free_gpus") or []],
        memory=memory, free_memory=int(e.get("free_memory", memory)),
        gpu_free={str(k): float(v) for k, v in (e.get("gpu_free") or {}).items()},
        workers=int(e.get("workers", 0)), busy=int(e.get("busy", 0)), instances=int(e.get("instances", 0)),
        last_seen_s=float(e.get("last_seen_s", 0.0)),
        labels={str(k): str(v) for k, v in (e.get("labels") or {}).items()})


def _function(f: dict) -> FunctionStatus:
    mc = f.get("max_containers")
    return FunctionStatus(
        name=str(f.get("name", "?")), hash=str(f.get("hash", "")), kind=str(f.get("kind", "fn")),
        cpus=float(f.get("cpus", 1)), gpus=float(f.get("gpus", 0)), memory=int(f.get("memory", 0)),
        running=int(f.get("running", 0)), waiting=int(f.get("waiting", 0)), warm=int(f.get("warm", 0)),
        min_warm=int(f.get("min_warm", 0)), max_containers=int(mc) if mc else None)
