"""Executors: joining (EXEC_HELLO), heartbeats, the deaths of their workers, leaving.

An executor daemon reports its resources (each ``Executor`` keeps them in its ledger), beats
once a second, and says WORKER_DIED when a worker's process ends; the broker never hears from
workers' processes about their own deaths. An executor silent for ``HEARTBEAT_TIMEOUT`` is lost
with all its workers, and so are the spawns it was asked for.
"""
from __future__ import annotations

import logging
import time

from .. import protocol as P
from .. import settings
from ..errors import ProtocolError
from .state import Executor

log = logging.getLogger("fabric.broker")
HEARTBEAT_TIMEOUT = settings.get().heartbeat_timeout


class Executors:
    """Shares the broker's tables (``st``) and outbox (``out``); calls workers (workers.py:
    lose_worker) and sched (scheduler.py: spawn_failed)."""

    def __init__(self, st, out, workers, sched):
        self.st, self.out, self.workers, self.sched = st, out, workers, sched

    def heartbeat(self, ident):
        ex = self.st.executors.get(ident)
        if ex is None:
            self.out.send([ident, P.C[P.ERROR], b"unknown executor: say EXEC_HELLO again"])
            return
        ex.last_seen = time.monotonic()

    def expire(self, now):
        """Lose the executors silent for longer than HEARTBEAT_TIMEOUT."""
        for ex in list(self.st.executors.values()):
            if now - ex.last_seen > HEARTBEAT_TIMEOUT:
                self.lose_executor(ex, f"no heartbeat for {now - ex.last_seen:.1f}s")

    def on_exec_hello(self, ident, head, f):
        info = P.loads_json(f[0].bytes)
        if len(ident) != 9:
            raise ProtocolError("executor ids are 8 bytes")
        cpus, mem, gpus = info.get("cpus"), info.get("memory", 0), info.get("gpus", [])
        if isinstance(cpus, bool) or not isinstance(cpus, (int, float)) or not 0 <= cpus < 1e6:
            raise ProtocolError("EXEC_HELLO needs a number of cpus from 0 to 1e6")
        if isinstance(mem, bool) or not isinstance(mem, int) or not 0 <= mem < 1 << 60:
            raise ProtocolError("EXEC_HELLO memory must be a whole number of bytes")
        if not isinstance(gpus, list) or len(gpus) > 4096 or not all(type(g) is int and 0 <= g < 1 << 16 for g in gpus):
            raise ProtocolError("EXEC_HELLO gpus must be a list of device numbers")
        old = self.st.executors.get(ident)
        if old is not None:
            self.lose_executor(old, "re-registered")
        ex = self.st.executors[ident] = Executor(ident, info)
        log.info("executor %s joined from %s: cpus=%g gpus=%s memory=%dMiB", ex.id.hex(), ex.host,
                 ex.ledger.cpus, ex.ledger.gpus, ex.ledger.memory >> 20)
        self.out.send([ident, P.C[P.WELCOME], P.dumps_json({"version": P.VERSION})])

    def on_worker_died(self, ident, head, f):
        info = P.loads_json(f[1].bytes)
        w = self.st.workers.get(f[0].bytes)
        if w is not None and w.ex.ident == ident:
            running = info.get("running")  # the call it was running: "" none, absent unknown
            if isinstance(running, str) and len(running) in (0, 2 * P.ID_LEN):
                try:
                    running = bytes.fromhex(running)
                except ValueError:
                    running = None
            else:
                running = None
            if isinstance(info.get("memory"), str):  # stopped for memory: a retry would do it again
                self.workers.lose_worker(w, info["memory"][:200], memory=True, running=running)
            else:
                self.workers.lose_worker(w, f"exit code {info.get('exitcode')}", running=running)
        elif "token" in info:  # a spawned worker that died before saying READY
            sp = self.st.spawns.get(str(info["token"]))
            if sp is not None and sp[0].ident == ident:  # only the executor asked to spawn it may say so
                del self.st.spawns[str(info["token"])]
                self.sched.spawn_failed(sp, f"worker failed to start (exit code {info.get('exitcode')})")

    def on_exec_bye(self, ident, head, f):
        ex = self.st.executors.get(ident)
        if ex is not None:
            self.lose_executor(ex, "left")

    def lose_executor(self, ex, why):
        log.warning("executor %s (%s) lost: %s", ex.id.hex(), ex.host, why)
        self.st.executors.pop(ex.ident, None)
        for w in list(ex.workers.values()):
            self.workers.lose_worker(w, f"its executor {why}")
        for tok, sp in list(self.st.spawns.items()):
            if sp[0] is ex and self.st.spawns.pop(tok, None) is not None:  # (a gang may drop its others)
                self.sched.spawn_failed(sp, f"executor {why}")
