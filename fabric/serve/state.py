"""What the gateway publishes and reads in fabric's data folder (owner-only, like the keys).

``serve/gateway-PORT.json``: its address, pid, broker, admin token and deployments (read by
``serve.run``/``serve.status`` in other processes and by ``fabric status``). ``serve/spec-*.pkl``:
a deployment ``serve.run`` hands over, read once and removed; only a file this user owns and
nobody else can read or write is accepted.
"""
from __future__ import annotations

import json
import os
import secrets

from .. import config


def folder() -> str:
    return config.private_dir(os.path.join(config.data_dir(), "serve"))


def path(port: int) -> str:
    return os.path.join(folder(), f"gateway-{port}.json")


def write(port: int, record: dict) -> None:
    p = path(port)
    tmp = f"{p}.{os.getpid()}.tmp"
    with config.private_open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, p)


def remove(port: int) -> None:
    try:
        os.unlink(path(port))
    except OSError:
        pass


def read(port: int) -> dict | None:
    try:
        with open(path(port)) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return None
    return rec if config.pid_alive(rec.get("pid", 0)) else None


def gateways() -> list[dict]:
    """Every live gateway this user runs (stale records are skipped)."""
    out: list[dict] = []
    try:
        names = os.listdir(folder())
    except OSError:
        return out
    for n in sorted(names):
        if n.startswith("gateway-") and n.endswith(".json"):
            try:
                rec = read(int(n[8:-5]))
            except ValueError:
                continue
            if rec:
                out.append(rec)
    return out


def _by_value(obj) -> None:
    """The user's own module (a script, a test file) travels by value, as fabric's calls do:
    the gateway and the replicas need not import it."""
    import sys
    import sysconfig

    import cloudpickle

    name = getattr(obj, "__module__", None) or ""
    mod = sys.modules.get(name)
    path = getattr(mod, "__file__", None)
    if not name or name == "__main__" or name.split(".")[0] == "fabric" or path is None:
        return
    path = os.path.realpath(path)
    libs = {os.path.realpath(sysconfig.get_paths()[k]) for k in ("purelib", "platlib", "stdlib")}
    if "site-packages" in path or any(path.startswith(d + os.sep) for d in libs):
        return
    try:
        cloudpickle.register_pickle_by_value(mod)
    except (ValueError, TypeError):
        pass


def save_spec(spec: dict) -> str:
    import cloudpickle

    _by_value(spec["target"])
    p = os.path.join(folder(), f"spec-{secrets.token_hex(8)}.pkl")
    with config.private_open(p, "wb") as f:
        f.write(cloudpickle.dumps(spec))
    return p


def load_spec(p: str) -> dict:
    import pickle

    p = os.path.realpath(p)
    if os.path.dirname(p) != os.path.realpath(folder()) or not os.path.basename(p).startswith("spec-"):
        raise ValueError("a deployment file must be in fabric's serve folder")
    st = os.stat(p)
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise PermissionError(f"{p} must be owned by this user and not readable or writable by others")
    try:
        with open(p, "rb") as f:
            return pickle.loads(f.read())
    finally:
        os.unlink(p)
