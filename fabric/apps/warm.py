"""Warm containers of one deployed app version: ``python -m fabric.apps.warm --app A --version V``.

The reconciler starts one of these per running app version whose functions or classes have
``min_warm``, and stops it when that version stops being current (stop, rollback, redeploy).
It is a driver of its own because the core keeps a function's ``min_warm`` while a driver that
used it is connected, and forgets it (and the autoscaler floor) when that driver leaves: ending
this process is how an old version's warm containers go.

- Functions: one call that never runs registers the function with the broker (its arguments are
  a gate call that is cancelled at once, so it fails with ``Cancelled`` before it starts). The
  broker then keeps ``min_warm`` pool workers holding the code, and loads it into a new worker
  when one of them dies (docs/autoscaling.md).
- Classes: ``min_warm`` instances made with no arguments (``__init__`` and ``@fabric.enter``
  run), made again when one dies.

Each round it reads the public ``fabric.cluster_status()``: a function the broker no longer
lists (a broker restart) is registered again. What is warm goes to ``apps/<app>/warm/<V>.json``
in the store, for ``fabric deploy`` and ``fabric apps``.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import signal
import sys
import time

import fabric
from fabric import config, settings, storage

from .registry import Registry


def warm_key(app: str, version: int) -> str:
    return f"apps/{app}/warm/{version:06d}.json"


def wants_warm(man: dict) -> bool:
    """Whether a manifest has a function or class with ``min_warm`` (so needs a holder)."""
    return any((o or {}).get("min_warm") for t in ("functions", "classes") for o in man.get(t, {}).values())


def read_status(store, app: str, version: int) -> dict | None:
    try:
        return json.loads(store.get_bytes(warm_key(app, version)))
    except (KeyError, FileNotFoundError):
        return None


@fabric.fn(retries=0, cpus=0)
def _gate():
    """The argument a registering call waits on; cancelled at once (cooperatively, if it started)."""
    for _ in range(600):
        time.sleep(0.05)


def _gate_args(rf):
    """Arguments that fill every required parameter of ``rf`` with the gate's Future."""
    gate = _gate.remote()
    args, kwargs = [], {}
    try:
        sig = inspect.signature(rf._func)
    except (TypeError, ValueError):
        return gate, [], {}
    for p in sig.parameters.values():
        if p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            args.append(gate)
        else:
            kwargs[p.name] = gate
    return gate, args, kwargs


def register(rf) -> None:
    """Make the broker keep ``rf``'s min_warm, without running it: the call waits on a gate,
    both are cancelled, so the call ends ``Cancelled`` and the function never runs."""
    gate, args, kwargs = _gate_args(rf)
    call = rf.remote(*args, **kwargs)
    fabric.cancel(call)
    fabric.cancel(gate)
    for f in (call, gate):
        try:
            f.result(timeout=30)
        except Exception:  # noqa: BLE001 - Cancelled is what we expect
            pass


class Holder:
    def __init__(self, reg: Registry, app_name: str, version: int, log=print):
        from .lookup import load_version

        self.reg, self.name, self.version, self.log = reg, app_name, version, log
        self.man = reg.manifest(app_name, version)
        self.app = load_version(reg, self.man)
        self.fns = {n: f for n, f in self.app.functions.items() if f._options.get("min_warm")}
        self.classes = {n: c for n, c in self.app.classes.items() if c._options.get("min_warm")}
        self.instances: dict[str, list] = {n: [] for n in self.classes}
        self.starting: dict[str, list] = {n: [] for n in self.classes}
        self.errors: dict[str, str] = {}
        self.made: dict[str, list] = {}  # when instances were made, per class (a guard against a loop)

    def _entries(self) -> dict[str, dict]:
        """The broker's functions list by hash prefix (what ``fabric status`` shows)."""
        return {f["hash"]: f for f in fabric.cluster_status().get("functions", [])}

    @staticmethod
    def _hash(obj) -> str | None:
        code = getattr(obj, "_code", None) or [None, None]
        return code[1].hex()[:12] if code[1] is not None else None

    def round(self) -> dict:
        entries = self._entries()
        out = {"functions": {}, "classes": {}}
        for n, rf in self.fns.items():
            want = rf._options["min_warm"]
            h = self._hash(rf)
            if h is None or h not in entries:
                try:
                    rf._blob()
                    register(rf)
                    h = self._hash(rf)
                except Exception as e:  # noqa: BLE001 - say it, keep the others warm
                    self.errors[n] = f"{type(e).__name__}: {e}"
            e = entries.get(h) or {}
            out["functions"][n] = {"min_warm": want, "warm": min(want, e.get("warm", 0)), "hash": h}
        for n, rc in self.classes.items():
            want = rc._options["min_warm"]
            starting = self.starting[n]
            settled = False  # an instance came up after the broker's numbers were read: next round
            for inst in list(starting):
                ready = inst.ready()
                if ready.done():
                    starting.remove(inst)
                    settled = True
                    try:
                        ready.result()
                        self.instances[n].append(inst)
                    except Exception as e:  # noqa: BLE001 - __init__/@enter raised: report, retry later
                        self.errors[n] = f"{type(e).__name__}: {e}"
            h = self._hash(rc)
            live = (entries.get(h) or {}).get("warm", 0) if h else 0
            made = self.made.setdefault(n, [])
            now = time.monotonic()
            made[:] = [t for t in made if now - t < 60]
            if not starting and not settled and live < want and n not in self.errors:
                if len(made) >= 3 * want:  # instances keep dying at once: stop, say so, try later
                    self.errors[n] = (f"{len(made)} instances made in the last minute and still only {live} "
                                      f"of {want} alive")
                else:
                    for _ in range(want - live):
                        try:
                            starting.append(rc.remote())
                            made.append(now)
                        except Exception as e:  # noqa: BLE001 - e.g. __init__ needs arguments
                            self.errors[n] = (f"min_warm of a class makes instances with no arguments: "
                                              f"{type(e).__name__}: {e}")
                            break
            out["classes"][n] = {"min_warm": want, "warm": min(want, live), "hash": h}
        everything = [*out["functions"].values(), *out["classes"].values()]
        out.update(app=self.name, version=self.version, pid=os.getpid(), errors=dict(self.errors),
                   ready=all(x["warm"] >= x["min_warm"] for x in everything), updated_at=time.time())
        return out

    def retry_failed(self):
        """Errors are retried now and then (a class whose @enter failed may work after a fix
        elsewhere, e.g. a model file put in the store)."""
        self.errors.clear()


def shutdown_quietly(*first) -> None:
    """The end of an apps process (this one, the reconciler): each of ``first``, then
    ``fabric.shutdown()`` (its BYE is what drops this driver's ``min_warm``). Each step's error
    is ignored (the store or the broker may be gone already at exit), so none skips the BYE."""
    for step in (*first, fabric.shutdown):
        try:
            step()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fabric.apps.warm",
                                 description="keep one app version's min_warm containers up")
    ap.add_argument("--address", default=None)
    ap.add_argument("--app", required=True)
    ap.add_argument("--version", type=int, required=True)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--parent-pid", type=int, default=0, help="exit when this process (the reconciler) ends")
    a = ap.parse_args(argv)
    os.umask(0o077)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # shutdown() below sends the broker a BYE

    def log(msg):
        print(time.strftime("%Y-%m-%d %H:%M:%S ") + f"warm {a.app} v{a.version}: " + msg, flush=True)

    fabric.init(address=a.address or settings.get().address or "auto")
    store = storage.default()
    key = warm_key(a.app, a.version)
    try:
        holder = Holder(Registry(store), a.app, a.version, log)
        what = {**holder.fns, **holder.classes}
        log("keeping warm: " + ", ".join(f"{n} x{o._options['min_warm']}" for n, o in what.items()))
        last, said, rounds = None, {}, 0
        while True:
            try:
                st = holder.round()
                for n, e in st["errors"].items():
                    if said.get(n) != e:
                        log(f"{n}: {e}")
                        said[n] = e
                brief = {k: st[k] for k in ("functions", "classes", "errors", "ready")}
                if brief != last or rounds % 10 == 0:
                    store.put_bytes(key, json.dumps(st).encode())
                    last = brief
            except Exception as e:  # noqa: BLE001 - the broker restarting: next round
                log(f"round failed: {type(e).__name__}: {e}")
            rounds += 1
            if rounds % 30 == 0:
                holder.retry_failed()
            deadline = time.monotonic() + a.interval
            while time.monotonic() < deadline:
                if a.parent_pid and not config.pid_alive(a.parent_pid):
                    return
                time.sleep(0.1)
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        shutdown_quietly(lambda: store.delete(key, missing_ok=True))


if __name__ == "__main__":
    sys.exit(main())
