"""Start and stop a cluster on this machine: one broker process and one executor process.

The embedded cluster (``fabric.init()`` with no address) and ``fabric start`` both use this; it
runs the same broker and executor code as any cluster. The embedded one listens on an ipc://
socket in a private temporary folder, and its processes watch the driver's pid, so they
exit even if the driver is killed. Nothing is left behind: socket files, the folder and
shared-memory files are removed on stop.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time

from . import config
from . import protocol as P
from .control import request
from .serde import shm


def _child_env():
    env = dict(os.environ)
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in [pkg_parent, env.get("PYTHONPATH", "")] if p)
    env.setdefault(config.USER_UMASK, f"{config.current_umask():o}")  # workers run user code under it
    return env


class LocalCluster:
    def __init__(self, address: str | None = None, cpus=None, gpus=None, memory=None, parent_pid: int | None = None,
                 log_dir: str | None = None, detach: bool = False, journal: str | None = None):
        self.tmpdir = None
        if address is None:
            self.tmpdir = tempfile.mkdtemp(prefix="fabric-")
            address = f"ipc://{self.tmpdir}/broker.sock"
        self.address = address
        self.cpus, self.gpus, self.memory = cpus, gpus, memory
        self.parent_pid = os.getpid() if parent_pid is None else parent_pid
        self.log_dir = log_dir or config.new_log_dir()
        self.detach = detach
        self.journal = journal  # with a journal, the broker also runs under a restarting supervisor
        self.procs: list[subprocess.Popen] = []
        self.autoscaler: subprocess.Popen | None = None

    def start(self, executor: bool = True) -> "LocalCluster":
        from . import security

        security.keys_dir(self.address)  # this user's default keys for tcp://, made once, before its processes
        args = ["--address", self.address, "--log-file", os.path.join(self.log_dir, "broker.log")]
        if self.journal:
            args += ["--journal", self.journal, "--restart"]
        self.procs.append(self._spawn("fabric.broker", args))
        if executor:
            self.add_executor()
        return self

    def add_executor(self, cpus=None, gpus=None, memory=None, labels=None) -> subprocess.Popen:
        n = sum(1 for _ in glob.glob(os.path.join(self.log_dir, "executor-*.log"))) + 1
        args = ["--broker", self.address, "--log-file", os.path.join(self.log_dir, f"executor-{n}.log")]
        cpus = cpus if cpus is not None else self.cpus
        gpus = gpus if gpus is not None else self.gpus
        memory = memory if memory is not None else self.memory
        if cpus is not None:
            args += ["--cpus", str(cpus)]
        if gpus is not None:
            args += ["--gpus", ",".join(str(g) for g in gpus) if not isinstance(gpus, str) else gpus]
        if memory is not None:
            args += ["--memory", str(memory)]
        for k, v in (labels or {}).items():
            args += ["--label", f"{k}={v}"]
        p = self._spawn("fabric.executor", args)
        self.procs.append(p)
        return p

    def start_autoscaler(self, min_executors: int = 0, max_executors: int = 4, idle: float = 60.0,
                         cpus_per_executor: float = 1.0, extra_args=()) -> subprocess.Popen:
        """Run ``python -m fabric.autoscale`` (local provider) beside the broker; its decision
        log is ``autoscaler.jsonl`` in this cluster's log folder."""
        args = ["--broker", self.address, "--provider", "local", "--min", str(min_executors),
                "--max", str(max_executors), "--idle", f"{idle:g}", "--cpus-per-executor", f"{cpus_per_executor:g}",
                "--log-dir", self.log_dir, *extra_args]
        if self.memory is not None:
            args += ["--memory-per-executor", str(self.memory)]
        p = self.autoscaler = self._spawn("fabric.autoscale", args)
        self.procs.append(p)
        return p

    def _spawn(self, module, args):
        if self.parent_pid:
            args = args + ["--parent-pid", str(self.parent_pid)]
        # what the process prints outside its log (a crash's traceback) lands next to that log;
        # fabric's processes run under umask 077: their logs, journal and sockets are owner-only
        with config.private_open(os.path.join(self.log_dir, module.split(".")[-1] + ".out"), "ab") as out:
            return subprocess.Popen([sys.executable, "-m", module, *args], env=_child_env(), stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                    umask=config.UMASK)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stop(self, timeout: float = 5.0):
        auto = self.autoscaler
        if auto is not None and auto.poll() is None:  # first, or it would start executors again
            auto.terminate()
            try:
                auto.wait(timeout)
            except subprocess.TimeoutExpired:
                auto.kill()
        try:
            request(self.address, P.SHUTDOWN, timeout=1.0)
        except Exception:  # noqa: BLE001 - the broker may already be gone
            pass
        deadline = time.monotonic() + timeout
        for p in reversed(self.procs):  # executors first: they stop their workers
            try:
                p.wait(max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
        shm.remove_shm(os.getpid())
