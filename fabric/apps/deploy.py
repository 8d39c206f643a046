"""``fabric deploy FILE``: load the app file, bundle its code, check it imports on the cluster,
then register a new version (or keep the current one when nothing changed) and bring its serve
deployments in line. A deploy that fails at any step before the switch leaves the old version
serving and says why."""
from __future__ import annotations

import hashlib
import os
import sys
import time

import fabric
from fabric import storage

from . import bundle
from .app import App
from .registry import AppError, Registry


def load_apps(path: str) -> tuple[object, list[App]]:
    """Import the app file (not as __main__) and return its module and the Apps it defines."""
    if not os.path.isfile(path):
        raise AppError(f"{path}: no such file")
    real = os.path.realpath(path)
    modname = "fabric_app_" + hashlib.blake2b(real.encode(), digest_size=6).hexdigest() + "_" + \
        "".join(c if c.isalnum() else "_" for c in os.path.splitext(os.path.basename(path))[0])
    try:
        mod = bundle.load_module(real, modname)
    except Exception as e:  # noqa: BLE001 - whatever the user's module raised: nothing was deployed
        raise AppError(f"importing {path} failed, so nothing was deployed: {type(e).__name__}: {e}") from e
    apps = [v for v in vars(mod).values() if isinstance(v, App)]
    if not apps:
        raise AppError(f"{path} defines no fabric.App: add `app = fabric.App(\"myapp\")` at module level and "
                       f"decorate its functions with @app.fn (classes with @app.cls)")
    seen: dict[str, App] = {}
    for a in apps:
        if a.name in seen and seen[a.name] is not a:
            raise AppError(f"{path} defines two apps named {a.name!r}: give each App its own name")
        seen[a.name] = a
    return mod, list(seen.values())


def _options(obj) -> dict:
    return {k: v for k, v in sorted(obj._options.items()) if k != "memory_bytes"}


def manifest_of(app: App, entry: str, bundle_hash: str, source: str) -> dict:
    return {"app": app.name, "entry": entry, "bundle": bundle_hash, "source": source,
            "functions": {n: _options(f) for n, f in sorted(app.functions.items())},
            "classes": {n: _options(c) for n, c in sorted(app.classes.items())},
            "deployments": {n: d["route_prefix"] for n, d in sorted(app.deployments.items())},
            # the names its calls' output lines start with in the executors' logs (fabric logs)
            "log_names": sorted({getattr(f._func, "__name__", n) for n, f in app.functions.items()} |
                                {getattr(c._cls, "__name__", n) for n, c in app.classes.items()})}


@fabric.fn(retries=0, timeout=300)
def _check_on_cluster(data: bytes, entry: str) -> str:
    """Unpack the bundle on an executor and import it in a fresh interpreter there: the app's
    dependencies must be installed where it runs. Returns '' or the error's last lines."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="fabric-app-check-") as d:
        bundle.unpack(data, d)
        code = ("import sys; from fabric.apps import bundle; "
                f"bundle.load_module({os.path.join(d, entry)!r}, 'fabric_app_check')")
        env = dict(os.environ, FABRIC_APP_CHECK="1")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, env=env)
        return "" if r.returncode == 0 else "\n".join(r.stderr.strip().splitlines()[-6:])


def deploy(path: str, *, name: str | None = None, check: bool = True, log=print) -> dict:
    """Deploy the App in ``path``; returns ``{"app", "version", "changed", "endpoints", "seconds"}``."""
    t0 = time.monotonic()
    mod, apps = load_apps(path)
    if name is not None:
        from .app import check_name

        try:
            check_name(name)
        except ValueError as e:
            raise AppError(f"--name: {e}") from None
        if len(apps) > 1:
            match = [a for a in apps if a.name == name]
            if not match:
                raise AppError(f"{path} defines apps {', '.join(a.name for a in apps)}; --name {name} is none of them")
            apps = match
        else:
            apps[0].name = name
    if len(apps) > 1:
        raise AppError(f"{path} defines {len(apps)} apps ({', '.join(a.name for a in apps)}): "
                       f"choose one with --name")
    app = apps[0]
    entry = os.path.basename(path)
    data, h = bundle.make(os.path.realpath(path))
    reg = Registry(storage.default())
    man = manifest_of(app, entry, h, os.path.realpath(path))
    from .registry import digest

    cur = reg.current(app.name)
    if cur is not None and not cur.get("stopped"):
        old = reg.manifest(app.name, cur["version"])
        if old.get("digest") == digest(man):
            # routes back in line (a restarted gateway), same version; running ones are left alone
            _apply_deployments(app, log, only=missing_deployments(app.name, app.deployments))
            return {"app": app.name, "version": cur["version"], "changed": False, **app.names(),
                    "endpoints": _endpoints(app), "warm": wait_warm(reg.store, man | {"version": cur["version"]}),
                    "seconds": time.monotonic() - t0}
    if check:
        why = _check_on_cluster.remote(data, entry).result()
        if why:
            raise AppError(f"{entry} does not import on the cluster, so nothing was deployed "
                           f"(the old version keeps serving):\n{why}")
        _check_warm_classes(app, os.path.dirname(os.path.realpath(path)))
    # deployments first: a deployment whose replicas cannot start (a failing @enter) leaves
    # the registry, and so the version lookups resolve, as it was
    _apply_deployments(app, log)
    reg.put_bundle(h, data)
    v = reg.add_version(man)
    if cur is not None:
        _drop_removed(app.name, reg.manifest(app.name, cur["version"]), app.deployments)
    return {"app": app.name, "version": v, "changed": True, **app.names(), "endpoints": _endpoints(app),
            "warm": wait_warm(reg.store, man | {"version": v}), "seconds": time.monotonic() - t0}


def wait_warm(store, man: dict, timeout: float = 120.0) -> dict:
    """Wait (while a reconciler runs) until the version's ``min_warm`` containers are up.
    ``{}`` without min_warm; else ``{"ready", "containers": {name: "warm/min_warm"}, "note"}``."""
    from .reconciler import reconciler_running
    from .warm import read_status, wants_warm

    if not wants_warm(man):
        return {}
    if not reconciler_running(store):
        return {"ready": False, "containers": {}, "note": "no reconciler runs on this cluster (`fabric start "
                "--serve` starts one, or `python -m fabric.apps.reconciler`), so min_warm containers start with "
                "the first calls only"}
    deadline = time.monotonic() + timeout
    st = None
    while time.monotonic() < deadline:
        st = read_status(store, man["app"], man["version"])
        if st and (st.get("ready") or st.get("errors")):
            break
        time.sleep(0.3)
    st = st or {}
    out = {"ready": bool(st.get("ready")),
           "containers": {n: f"{x['warm']}/{x['min_warm']}" for t in ("functions", "classes")
                          for n, x in (st.get(t) or {}).items()}}
    if st.get("errors"):
        out["note"] = "; ".join(f"{n}: {e}" for n, e in st["errors"].items())
    elif not out["ready"]:
        out["note"] = f"not all warm after {timeout:g}s; the reconciler keeps starting them"
    return out


def _check_warm_classes(app: App, folder: str) -> None:
    """Start one instance of each class with ``min_warm`` (what the reconciler will keep) and
    stop it: an ``__init__`` or ``@fabric.enter`` that fails fails the deploy before the switch."""
    warm = {n: c for n, c in app.classes.items() if c._options.get("min_warm")}
    if not warm:
        return
    bundle.ship_by_value(folder)  # this process imported the file under a name workers lack
    for n, rc in warm.items():
        why = "the old version keeps serving" if Registry(storage.default()).current(app.name) else "nothing was deployed"
        try:
            inst = rc.options(min_warm=0).remote()
        except TypeError as e:
            raise AppError(f"class {n!r} of app {app.name!r} has min_warm={rc._options['min_warm']}, so its warm "
                           f"instances are made with no arguments, but: {e} ({why})") from None
        try:
            inst.ready().result(timeout=300)
        except Exception as e:  # noqa: BLE001 - whatever __init__/@enter raised, named
            raise AppError(f"class {n!r} of app {app.name!r} did not start (its __init__ or @fabric.enter raised), "
                           f"so the app was not switched to the new version ({why}): "
                           f"{type(e).__name__}: {_first_line(e)}") from None
        finally:
            try:
                fabric.kill(inst)
            except Exception:  # noqa: BLE001 - already gone
                pass


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else repr(e)


def _endpoints(app: App) -> dict:
    if not app.deployments:
        return {}
    from fabric import serve

    url = (serve.status().get("url") or "").rstrip("/")
    return {n: url + d["route_prefix"] for n, d in app.deployments.items()}


def _apply_deployments(app: App, log, only=None) -> None:
    """serve.run each deployment as ``{app}.{name}``: a running one rolls to the new version (its
    replicas start first; a failure leaves the old one serving). If one fails, the ones this call
    created are deleted again, so a failed deploy leaves the gateway as it was."""
    if not app.deployments:
        return
    from fabric import serve

    have = set(serve.status().get("deployments", {}))
    created = []
    for n, d in app.deployments.items():
        if only is not None and n not in only:
            continue
        full = f"{app.name}.{n}"
        try:
            serve.run(d["application"], name=full, route_prefix=d["route_prefix"])
            if full not in have:
                created.append(full)
        except Exception as e:  # noqa: BLE001 - a replica that cannot start: say which, keep the old
            for c in created + ([full] if full not in have else []):
                _delete_quietly(c)
            raise AppError(f"deployment {n!r} of app {app.name!r} did not start, so the app was not switched to "
                           f"the new version: {e}") from e


def missing_deployments(name: str, deps) -> list[str]:
    """Those of ``deps`` that the cluster's gateway does not serve (all of them if none runs)."""
    if not deps:
        return []
    from fabric import serve

    have = serve.status().get("deployments", {})
    return [n for n in deps if f"{name}.{n}" not in have]


def _delete_quietly(full: str) -> None:
    from fabric import serve

    try:
        serve.delete(full)
    except Exception:  # noqa: BLE001 - the gateway already forgot it
        pass


def _drop_removed(name: str, old_man: dict | None, new_deps) -> None:
    """Deployments of the previous version that the new one no longer has."""
    for n in (old_man or {}).get("deployments", {}):
        if n not in new_deps:
            _delete_quietly(f"{name}.{n}")


def stop(name: str) -> int:
    reg = Registry(storage.default())
    cur = reg.current(name)
    if cur is None:
        raise AppError(f"no app named {name!r} is deployed (apps: {', '.join(reg.names()) or 'none'})")
    man = reg.manifest(name, cur["version"])
    reg.set_current(name, cur["version"], stopped=True)  # first: the reconciler must not bring them back
    for n in man.get("deployments") or {}:
        _delete_quietly(f"{name}.{n}")
    return cur["version"]


def rollback(name: str, version: int | None = None, log=print) -> int:
    """A new version equal to ``version`` (default: the one before the current). Returns its number."""
    reg = Registry(storage.default())
    cur = reg.current(name)
    if cur is None:
        raise AppError(f"no app named {name!r} was ever deployed (apps: {', '.join(reg.names()) or 'none'})")
    versions = reg.versions(name)
    if version is None:
        older = [v for v in versions if v < cur["version"]]
        if not older:
            raise AppError(f"app {name!r} has only version {cur['version']}: nothing to roll back to")
        version = older[-1]
    target = reg.manifest(name, int(version))  # AppError naming the versions if it never existed
    if target.get("deployments"):
        app = _app_from_manifest(reg, target)
        _apply_deployments(app, log)
    man = {k: target[k] for k in ("app", "entry", "bundle", "source", "functions", "classes", "deployments",
                                  "log_names") if k in target}
    man["rollback_of"] = int(version)
    v = reg.add_version(man)
    _drop_removed(name, reg.manifest(name, cur["version"]), target.get("deployments") or {})
    return v


def _app_from_manifest(reg: Registry, man: dict) -> App:
    from .lookup import load_version

    return load_version(reg, man)
