"""The executor daemon: one per host. It tells the broker what the host offers, runs the
worker processes, and reports their deaths; it never sees a call.

On start it sends ``EXEC_HELLO`` (cpus, gpus, memory, host, labels) and starts one *pool*
worker per CPU. The broker may ask it to ``SPAWN`` a dedicated worker (an instance of a
``@fabric.cls``, or a GPU call's worker with ``CUDA_VISIBLE_DEVICES`` set) or to
``KILL_WORKER`` (timeout, cancel). A worker that exits is reported with ``WORKER_DIED``, so the
broker can retry what it was running; a pool worker is replaced at once. A heartbeat every
second lets the broker notice a silent host. Worker output and this daemon's log go to one
file per executor.
"""
from __future__ import annotations

import argparse
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import zmq

from .. import protocol as P
from .. import security
from .. import config
from .. import settings
from ..config import pid_alive
from ..resources import parse_memory
from .gpus import detect_gpus, parse_gpu_list

log = logging.getLogger("fabric.executor")

HEARTBEAT_EVERY = settings.get().heartbeat_every
# when the host has less than this fraction of its memory available, the largest worker is
# stopped (its call fails with MemoryLimitExceeded) before the kernel's OOM killer or swapping
# freezes the host
MEMORY_RESERVE = settings.get().memory_reserve
RUN_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def _read_int(path):
    try:
        with open(path) as f:
            v = f.read().strip()
        return int(v)
    except (OSError, ValueError):  # absent, or "max"
        return None


def _stat_field(path, key):
    try:
        with open(path) as f:
            for line in f:
                k, _, v = line.partition(" ")
                if k == key:
                    return int(v)
    except (OSError, ValueError):
        pass
    return 0


def memory_cgroup():
    """The files of the tightest memory limit on this process's cgroup or its ancestors (a
    container, a Kubernetes pod, a systemd slice): (limit, usage, stat, inactive-file key, OOM
    events), or None without one. Under such a limit the kernel's OOM killer acts at the limit whatever the
    host has free, so the limit is this executor's "host memory". cgroup v2 and v1."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    best, best_limit = None, 1 << 60  # v1 says "no limit" with a number near 2**63
    for line in lines:
        _, ctrls, path = line.split(":", 2)
        if ctrls == "":
            roots, names = ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"), \
                ("memory.max", "memory.current", "memory.stat", "inactive_file", "memory.events")
        elif "memory" in ctrls.split(","):
            roots, names = ("/sys/fs/cgroup/memory",), \
                ("memory.limit_in_bytes", "memory.usage_in_bytes", "memory.stat", "total_inactive_file",
                         "memory.oom_control")
        else:
            continue
        for root in roots:
            d = os.path.normpath(root + path)
            while d.startswith(root):
                limit = _read_int(os.path.join(d, names[0]))
                if limit is not None and limit < best_limit and os.path.exists(os.path.join(d, names[1])):
                    best_limit = limit
                    best = (os.path.join(d, names[0]), os.path.join(d, names[1]), os.path.join(d, names[2]), names[3],
                            os.path.join(d, names[4]))
                if d == root:
                    break
                d = os.path.dirname(d)
    return best


def memory_left(cg):
    """(limit, available) of a memory cgroup from :func:`memory_cgroup` (available: the limit
    less what its processes use, page cache that can be dropped not counted), or None."""
    limit, used = _read_int(cg[0]), _read_int(cg[1])
    if limit is None or used is None:
        return None
    return limit, limit - max(0, used - _stat_field(cg[2], cg[3]))


def oom_kills(cg=None):
    """The kernel's count of processes its out-of-memory killer has killed: in the memory cgroup
    ``cg`` (from :func:`memory_cgroup`), else on the whole host (/proc/vmstat); None where it is
    not kept."""
    path = cg[4] if cg else "/proc/vmstat"
    return _stat_field(path, "oom_kill") if os.path.exists(path) else None


class ExecutorDaemon:
    def __init__(self, broker: str, cpus=None, gpus=None, memory=None, labels=None, parent_pid=0,
                 log_file=None, prefetch=None, ident: bytes | None = None):
        self.broker = broker
        self.id = ident or P.new_id()
        self.cpus = float(cpus if cpus is not None else (os.cpu_count() or 1))
        self.gpus = list(gpus) if gpus is not None else detect_gpus()
        self.cgroup = memory_cgroup()       # a container's (or slice's) memory limit, if any
        if memory is None:
            import psutil

            memory = psutil.virtual_memory().total
            left = memory_left(self.cgroup) if self.cgroup else None
            if left is not None:
                memory = min(memory, left[0])  # what this executor may use: its limit, not the host's
        self.memory = int(memory)
        self.labels = dict(labels or {})
        self.parent_pid = parent_pid
        self.log_file = log_file
        self.prefetch = int(prefetch or settings.get().prefetch)
        self.procs: dict[int, tuple] = {}   # n -> (Popen, kind, token)
        self.oom_killed: dict[int, str] = {}  # workers stopped because the host ran low on memory: why
        self.killed: set[int] = set()       # workers killed on the broker's word (KILL_WORKER, a rejoin)
        # the kernel's OOM kill count 2-4 s ago and 0-2 s ago: (when, count), for kernel_oom_killed
        self.oom_seen = [(time.monotonic(), oom_kills(self.cgroup))] * 2
        self.rejoined = 0.0                 # when this executor last joined a restarted broker
        self.next_memory_check = 0.0
        self.counter = itertools.count(1)
        self.running = True
        self.on_waiting = None              # called with the seconds waited while no broker answers
        self.ctx = zmq.Context()
        self.sock = None

    def hello(self):
        info = {"cpus": self.cpus, "gpus": self.gpus, "memory": self.memory, "host": socket.gethostname(),
                "labels": self.labels, "pid": os.getpid()}
        security.send_first(self.sock, [P.C[P.EXEC_HELLO], P.dumps_json(info)])  # refused: poll says why

    def connect(self):
        s = self.sock = self.ctx.socket(zmq.DEALER)
        security.curve_client(s, "executor", watch=True, address=self.broker)  # CurveZMQ: tcp://, or FABRIC_KEYS
        s.setsockopt(zmq.ROUTING_ID, b"e" + self.id)
        s.setsockopt(zmq.LINGER, 500)
        s.connect(self.broker)
        self.hello()

    def serve(self):
        self.connect()
        # workers register under this executor: start them only once the broker knows it
        started = time.monotonic()
        while self.running:
            if security.poll(self.sock, 1.0):  # as sock.poll, and notes a refused key
                if P.command_of(self.sock.recv_multipart()[0]) == P.WELCOME:
                    break
            else:
                security.raise_if_refused(self.sock)  # ConnectionFailed: the broker refused our key
                self.hello()
                if self.on_waiting is not None:  # the CLI says it is still waiting (and retrying)
                    self.on_waiting(time.monotonic() - started)
            if self.parent_pid and not pid_alive(self.parent_pid):
                return self.stop()
        pool = max(1, int(self.cpus))
        for _ in range(pool):
            self.start_worker("pool")
        log.info("executor %s: %g cpus, gpus %s, %d MiB, %d pool workers, broker %s",
                 self.id.hex(), self.cpus, self.gpus, self.memory >> 20, pool, self.broker)
        next_beat = 0.0
        try:
            while self.running:
                if self.sock.poll(50):
                    while True:
                        try:
                            frames = self.sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self.handle(frames)
                self.reap()
                now = time.monotonic()
                if now >= self.next_memory_check:
                    self.next_memory_check = now + 0.25
                    self.guard_memory()
                if now >= next_beat:
                    next_beat = now + HEARTBEAT_EVERY
                    self.sock.send_multipart([P.C[P.HEARTBEAT], b"{}"])
                    if self.parent_pid and not pid_alive(self.parent_pid):
                        log.info("parent %d is gone; stopping", self.parent_pid)
                        self.running = False
        finally:
            self.stop()

    def handle(self, frames):
        try:
            c = P.command_of(frames[0])
        except Exception as e:  # noqa: BLE001
            log.warning("ignored a malformed message from the broker: %s", e)
            return
        if c == P.SPAWN:
            req = P.loads_json(frames[1])
            self.start_worker("spawned", token=str(req["token"]), gpus=req.get("gpus") or [])
        elif c == P.KILL_WORKER:
            wid = frames[1]
            for n, (p, _, _) in self.procs.items():
                if P.worker_id(self.id, n) == wid:
                    self.killed.add(n)
                    p.kill()
        elif c == P.EXEC_SHUTDOWN:
            self.running = False
        elif c == P.ERROR:
            msg = frames[1].decode(errors="replace")
            log.warning("broker: %s", msg)
            # the broker restarted or gave us up: join again, with new workers. Heartbeats queued
            # while it was down each bring this ERROR: join once, not once per heartbeat (a second
            # join would kill the workers the broker has started since)
            if "EXEC_HELLO" in msg and time.monotonic() - self.rejoined > 5 * HEARTBEAT_EVERY:
                self.rejoined = time.monotonic()
                self.hello()
                for n, (p, _, _) in list(self.procs.items()):
                    self.killed.add(n)
                    p.kill()  # reaped below; pool workers are replaced and say READY afresh

    def start_worker(self, kind, token=None, gpus=()):
        n = next(self.counter)
        env = dict(os.environ)
        env["FABRIC_ADDRESS"] = self.broker  # nested .remote() calls join this cluster
        env["FABRIC_EXECUTOR_PID"] = str(os.getpid())  # a worker started as we die notices
        env.pop("FABRIC_STORE_SECRET", None)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
        elif self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ""  # CPU calls and CPU instances must not grab a GPU
        env["FABRIC_RUN_FILE"] = self.new_run_file(n)
        cmd = [sys.executable, "-m", "fabric.executor.worker", "--broker", self.broker,
               "--executor-id", self.id.hex(), "--n", str(n), "--kind", kind,
               "--credit", str(self.prefetch if kind == "pool" else 1)]
        if token is not None:
            cmd += ["--token", token]
        out = open(self.log_file, "ab") if self.log_file else None
        try:
            p = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            if out:
                out.close()
        self.procs[n] = (p, kind, token)

    def run_file(self, n) -> str:
        """Where worker ``n`` writes the id of the call it is running: after its death that file
        says which call was cut off (the one to charge a retry or blame for memory), even when
        the DONEs of calls it finished before never left it. Named like a driver's shared memory
        (``fabric-<pid>-…``), so the files of a killed executor are swept with them."""
        return os.path.join(RUN_DIR, f"fabric-{os.getpid()}-run{n}")

    def new_run_file(self, n) -> str:
        path = self.run_file(n)
        try:
            with open(path, "wb") as f:
                f.write(bytes(P.ID_LEN))
        except OSError:
            return ""  # the worker then reports nothing, and the broker blames its oldest call
        return path

    def read_run_file(self, n):
        """The id of the call worker ``n`` was running when it died, "" if none, None if unknown."""
        path = self.run_file(n)
        try:
            with open(path, "rb") as f:
                cid = f.read(P.ID_LEN)
            os.unlink(path)
        except OSError:
            return None
        if len(cid) != P.ID_LEN:
            return None
        return "" if not any(cid) else cid.hex()

    def reap(self):
        now = time.monotonic()
        if now - self.oom_seen[1][0] >= 2.0:  # (one read of the count every 2 s)
            self.oom_seen = [self.oom_seen[1], (now, oom_kills(self.cgroup))]
        for n, (p, kind, token) in list(self.procs.items()):
            rc = p.poll()
            if rc is None:
                continue
            del self.procs[n]
            running = self.read_run_file(n)
            if not self.running:
                continue
            info = {"exitcode": rc}
            if running is not None:
                info["running"] = running
            if token is not None:
                info["token"] = token
            if rc == P.EXIT_MEMORY:
                info["memory"] = "it used more memory than its call's memory= limit"
            elif n in self.oom_killed:
                info["memory"] = self.oom_killed[n]
            elif rc == -signal.SIGKILL and n not in self.killed and self.kernel_oom_killed():
                info["memory"] = ("the kernel's out-of-memory killer stopped it: this host (or this executor's "
                                  "memory cgroup) ran out of memory")
            self.oom_killed.pop(n, None)
            self.killed.discard(n)
            log.info("worker %d (pid %d) exited with %s", n, p.pid, rc)
            self.sock.send_multipart([P.C[P.WORKER_DIED], P.worker_id(self.id, n), P.dumps_json(info)])
            if kind == "pool":
                self.start_worker("pool")

    def kernel_oom_killed(self) -> bool:
        """Whether the kernel's OOM killer killed a process in the last 2-4 s (in this executor's
        memory cgroup if it has one, else on the host; a process it kills may take a while to
        exit): a worker dead of a SIGKILL fabric did not send was then most likely that process."""
        before, now = self.oom_seen[0][1], oom_kills(self.cgroup)
        return before is not None and now is not None and now > before

    def guard_memory(self):
        """Host memory nearly gone: stop the worker using most, so the host stays responsive.
        Under a memory cgroup limit (a container), that limit is the host: the kernel kills there."""
        import psutil

        vm = psutil.virtual_memory()
        total, available, where = vm.total, vm.available, "this host ran low on memory"
        left = memory_left(self.cgroup) if self.cgroup else None
        if left is not None and left[1] < available:
            total, available = min(total, left[0]), left[1]
            where = f"this executor's memory cgroup (limit {left[0] >> 20} MiB) ran low"
        if available >= MEMORY_RESERVE * total:
            return
        biggest, size = None, 0
        for n, (p, _, _) in self.procs.items():
            try:  # its own memory: shared pages (a driver's arena it maps, libraries) free nothing
                mi = psutil.Process(p.pid).memory_info()
                rss = mi.rss - getattr(mi, "shared", 0)
            except psutil.Error:
                continue
            if rss > size and n not in self.oom_killed:
                biggest, size = n, rss
        if biggest is not None:
            log.warning("memory low (%d MiB of %d MiB available): stopping worker %d (%d MiB)",
                        available >> 20, total >> 20, biggest, size >> 20)
            self.oom_killed[biggest] = f"{where} and it was the largest worker ({size >> 20} MiB)"
            self.procs[biggest][0].kill()

    def stop(self):
        self.running = False
        procs = [p for p, _, _ in self.procs.values()]
        for p in procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + 2
        for p in procs:
            try:
                p.wait(max(0.01, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for n in list(self.procs):
            self.read_run_file(n)  # (removes it)
        try:
            self.sock.send_multipart([P.C[P.EXEC_BYE]], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        security.unwatch(self.sock)  # a watched socket's monitor would block ctx.term()
        self.sock.close(linger=200)
        self.ctx.term()
        log.info("executor %s stopped", self.id.hex())


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fabric.executor")
    ap.add_argument("--broker", required=True)
    ap.add_argument("--cpus", type=float)
    ap.add_argument("--gpus", help="comma-separated device numbers (default: detect)")
    ap.add_argument("--memory")
    ap.add_argument("--label", action="append", default=[])
    ap.add_argument("--parent-pid", type=int, default=0)
    ap.add_argument("--log-file")
    a = ap.parse_args(argv)
    config.private_umask()  # its log, run files and its workers' files: owner-only (docs/security.md)
    logging.basicConfig(filename=a.log_file, level=logging.INFO,
                        format="%(asctime)s %(levelname)s executor: %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(SystemExit(0)))
    labels = dict(kv.split("=", 1) for kv in a.label)
    d = ExecutorDaemon(a.broker, cpus=a.cpus, gpus=parse_gpu_list(a.gpus) if a.gpus is not None else None,
                       memory=parse_memory(a.memory) if a.memory else None, labels=labels,
                       parent_pid=a.parent_pid, log_file=a.log_file)
    d.serve()
    return 0
