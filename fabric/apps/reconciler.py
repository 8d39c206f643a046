"""The apps reconciler: ``python -m fabric.apps.reconciler --address A``.

A supervised process of the cluster, like the autoscaler (``fabric start --serve`` runs one). On
start and every few seconds it reads the registry (in the store, so it holds no state of its own
and a restarted reconciler picks up where the last one was) and brings the serve gateway in
line with it: each running app's current version's deployments that the gateway lacks (a
gateway or broker restart lost them) are deployed again, starting the gateway if none runs.
Deployments the gateway already serves are left alone: redeploys are ``fabric deploy``'s.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from fabric import storage

from .registry import Registry


def wanted(reg: Registry) -> dict[str, dict]:
    """app name -> the current manifest, for running apps that have deployments."""
    out = {}
    for n in reg.names():
        cur = reg.current(n)
        if not cur or cur.get("stopped"):
            continue
        try:
            man = reg.manifest(n, cur["version"])
        except Exception:  # noqa: BLE001 - a version being written right now; next round
            continue
        if man.get("deployments"):
            out[n] = man
    return out


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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
    import fabric

    def log(msg):
        print(time.strftime("%Y-%m-%d %H:%M:%S ") + msg, flush=True)

    fabric.init(address=a.address or os.environ.get("FABRIC_ADDRESS") or "auto")
    reg = Registry(storage.default())
    watched = [p for p in (a.parent_pid, a.broker_pid) if p]
    log(f"reconciler: watching the apps in {storage.default().url('apps')} every {a.interval:g}s")
    try:
        while True:
            try:
                reconcile_once(reg, log)
            except Exception as e:  # noqa: BLE001 - the store or gateway hiccuped: next round
                log(f"reconciler: round failed: {type(e).__name__}: {e}")
            if a.once:
                return
            deadline = time.monotonic() + a.interval
            while time.monotonic() < deadline:
                if any(not _alive(p) for p in watched):  # the cluster is gone: so are we
                    return
                time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        try:
            fabric.shutdown()
        except Exception:  # noqa: BLE001
            pass


if __name__ == "__main__":
    sys.exit(main())
