"""The apps reconciler: ``python -m fabric.apps.reconciler --address A``.

A supervised process of the cluster, like the autoscaler (``fabric start --serve`` runs one). On
start and every few seconds it reads the registry (in the store, so it holds no state of its own
and a restarted reconciler picks up where the last one was) and brings the serve gateway in
line with it: each running app's current version's deployments that the gateway lacks (a
gateway or broker restart lost them) are deployed again, starting the gateway if none runs.
Deployments the gateway already serves are left alone: redeploys are ``fabric deploy``'s.

It also keeps warm containers (``min_warm``): one ``fabric.apps.warm`` process per running app
version that has some, started when the version becomes current; an older version's is stopped
once the new one's containers are warm (or after ``WARM_HANDOVER_S``), and a stopped app's at once.
Each round it notes itself in ``apps/_reconciler.json`` (``fabric deploy`` waits for warm
containers only when a reconciler runs).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

from fabric import config, settings, storage

from .registry import Registry
from .warm import read_status, shutdown_quietly, wants_warm

HEARTBEAT = "apps/_reconciler.json"
WARM_HANDOVER_S = 60.0  # an old version's warm containers stay at most this long after a switch


def heartbeat(store) -> dict | None:
    """The running reconciler's note (pid, host, time), or None."""
    try:
        return json.loads(store.get_bytes(HEARTBEAT))
    except (KeyError, FileNotFoundError, ValueError):
        return None


def reconciler_running(store, within: float = 15.0) -> bool:
    hb = heartbeat(store)
    return bool(hb) and time.time() - hb.get("at", 0) < within


def running(reg: Registry) -> Iterator[tuple[str, int, dict]]:
    """(name, current version, its manifest) of each app that is not stopped: what both the
    warm keepers and the deployments follow. A manifest that will not read (a version being
    written right now) is skipped: the next round sees it."""
    for n in reg.names():
        cur = reg.current(n)
        if not cur or cur.get("stopped"):
            continue
        try:
            man = reg.manifest(n, cur["version"])
        except Exception:  # noqa: BLE001 - being written; next round
            continue
        yield n, cur["version"], man


class WarmKeeper:
    """The ``fabric.apps.warm`` processes: one per running app version with ``min_warm``."""

    def __init__(self, address, log=print):
        self.address, self.log = address, log
        self.procs: dict[tuple[str, int], subprocess.Popen] = {}
        self.started: dict[tuple[str, int], float] = {}

    @staticmethod
    def wanted(reg: Registry) -> dict[str, int]:
        """app name -> the current version, for running apps with ``min_warm`` somewhere."""
        return {n: v for n, v, man in running(reg) if wants_warm(man)}

    def _spawn(self, name, version):
        cmd = [sys.executable, "-m", "fabric.apps.warm", "--app", name, "--version", str(version),
               "--parent-pid", str(os.getpid())]
        if self.address:
            cmd += ["--address", self.address]
        self.procs[(name, version)] = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)  # output: our log
        self.started[(name, version)] = time.monotonic()

    def sync(self, reg: Registry) -> None:
        want = self.wanted(reg)
        for n, v in want.items():
            p = self.procs.get((n, v))
            if p is None or p.poll() is not None:
                if p is not None:
                    self.log(f"reconciler: warm containers of app {n} version {v}: their keeper exited "
                             f"({p.returncode}); starting it again")
                else:
                    self.log(f"reconciler: app {n} version {v}: keeping its min_warm containers")
                self._spawn(n, v)
        for (n, v), p in list(self.procs.items()):
            if want.get(n) == v:
                continue
            newer = want.get(n)
            if newer is not None and p.poll() is None:  # a redeploy: hand over once the new ones are warm
                st = read_status(reg.store, n, newer)
                if not (st and st.get("ready")) and time.monotonic() - self.started[(n, newer)] < WARM_HANDOVER_S:
                    continue
            self._end(n, v, p)

    def _end(self, n, v, p):
        if p.poll() is None:
            p.terminate()  # it says BYE: the broker drops its min_warm
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
            self.log(f"reconciler: app {n} version {v}: its warm containers were dropped")
        self.procs.pop((n, v), None)
        self.started.pop((n, v), None)

    def close(self):
        for (n, v), p in list(self.procs.items()):
            self._end(n, v, p)


def wanted(reg: Registry) -> dict[str, dict]:
    """app name -> the current manifest, for running apps that have deployments."""
    return {n: man for n, _, man in running(reg) if man.get("deployments")}


def reconcile_once(reg: Registry, log=print) -> list[str]:
    """Deploy what the gateway lacks; returns the ``app.deployment`` names deployed. A deployment
    that fails to start is logged and tried again next round (the others still go)."""
    from .deploy import _apply_deployments, missing_deployments
    from .lookup import load_version
    from .registry import AppError

    done = []
    for name, man in wanted(reg).items():
        missing = missing_deployments(name, man["deployments"])
        if not missing:
            continue
        try:
            app = load_version(reg, man)
            _apply_deployments(app, log, only=missing)
        except (AppError, Exception) as e:  # noqa: BLE001 - keep reconciling the other apps
            log(f"reconciler: app {name} version {man['version']}: {e}")
            continue
        cur = reg.current(name)  # stopped or redeployed meanwhile: the newer intent wins next round
        if not cur or cur.get("stopped") or cur["version"] != man["version"]:
            continue
        for n in missing:
            done.append(f"{name}.{n}")
        log(f"reconciler: app {name} version {man['version']}: deployed {', '.join(missing)} again")
    return done


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fabric.apps.reconciler",
                                 description="keep the serve gateway in line with the deployed apps")
    ap.add_argument("--address", default=None, help="broker address (default: FABRIC_ADDRESS or the recorded cluster)")
    ap.add_argument("--interval", type=float, default=3.0, help="seconds between rounds")
    ap.add_argument("--once", action="store_true", help="one round, then exit")
    ap.add_argument("--parent-pid", type=int, default=0)
    ap.add_argument("--broker-pid", type=int, default=0)
    a = ap.parse_args(argv)
    os.umask(0o077)
    import signal

    import fabric

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `fabric stop`: end the warm keepers too

    def log(msg):
        print(time.strftime("%Y-%m-%d %H:%M:%S ") + msg, flush=True)

    fabric.init(address=a.address or settings.get().address or "auto")
    store = storage.default()
    reg = Registry(store)
    keeper = WarmKeeper(a.address or settings.get().address, log)
    watched = [p for p in (a.parent_pid, a.broker_pid) if p]
    log(f"reconciler: watching the apps in {store.url('apps')} every {a.interval:g}s")
    try:
        while True:
            try:
                if not a.once:  # warm containers need a process that stays
                    store.put_bytes(HEARTBEAT, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                           "at": time.time()}).encode())
                    keeper.sync(reg)
            except Exception as e:  # noqa: BLE001 - the store or broker hiccuped: next round
                log(f"reconciler: warm containers: round failed: {type(e).__name__}: {e}")
            try:
                reconcile_once(reg, log)
            except Exception as e:  # noqa: BLE001 - the store or gateway hiccuped: next round
                log(f"reconciler: round failed: {type(e).__name__}: {e}")
            if a.once:
                return
            deadline = time.monotonic() + a.interval
            while time.monotonic() < deadline:
                if any(not config.pid_alive(p) for p in watched):  # the cluster is gone: so are we
                    return
                time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        shutdown_quietly(keeper.close)


if __name__ == "__main__":
    sys.exit(main())
