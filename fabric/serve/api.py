"""``serve.run``, ``serve.status``, ``serve.delete``, ``serve.shutdown`` and the Python handle,
in the user's process. They start (or find) the gateway and talk to its control routes over
loopback HTTP with the admin token from its owner-only record."""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time

import fabric
from fabric import settings

from . import state
from .deployment import Application, Deployment

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000


class _Gateway:
    """A gateway this process uses: its record, and its process when this process started it."""

    def __init__(self, rec: dict, proc=None):
        self.rec, self.proc = rec, proc
        self.port = rec["port"]
        import httpx

        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}" if rec["host"] in ("0.0.0.0", "::")
                                 else rec["url"], headers={"x-fabric-admin": rec["admin_token"], **_auth()},
                                 timeout=120, trust_env=False)

    def call(self, method, path, **kw):
        r = self.http.request(method, path, **kw)
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
        if r.status_code >= 400:
            raise RuntimeError(body.get("error") or f"gateway answered {r.status_code}")
        return body


_gw: _Gateway | None = None


def _auth():
    t = settings.get().serve_token
    return {"authorization": f"Bearer {t}"} if t else {}


def _start_gateway(address: str, host: str, port: int, embedded: bool, log_dir: str | None) -> _Gateway:
    from .. import config

    rec = state.read(port)
    if rec is not None:
        if rec["broker"] != address:
            raise RuntimeError(f"port {port} is taken by the gateway of another cluster ({rec['broker']}); "
                               f"pass serve.run(..., port=...)")
        return _Gateway(rec)
    env = dict(os.environ)
    pkg_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in [pkg_parent, env.get("PYTHONPATH", "")] if p)
    env["FABRIC_ADDRESS"] = address
    args = [sys.executable, "-m", "fabric.serve", "--host", host, "--port", str(port)]
    if embedded:
        args += ["--parent-pid", str(os.getpid())]
    else:  # started on demand for a `fabric start` cluster: it stops with that cluster's broker
        args += _broker_watch(address)
    log_dir = log_dir or config.new_log_dir("serve")
    out = config.private_open(os.path.join(log_dir, f"gateway-{port}.log"), "ab")
    proc = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=not embedded)
    out.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        rec = state.read(port)
        if rec is not None and rec["pid"] == proc.pid:
            return _Gateway(rec, proc)
        if proc.poll() is not None:   # say why (e.g. no token beyond loopback): its last line
            log = os.path.join(log_dir, f"gateway-{port}.log")
            try:
                with open(log, errors="replace") as f:
                    why = ([ln.strip() for ln in f if ln.strip()] or [""])[-1]
            except OSError:
                why = ""
            raise RuntimeError(f"the serve gateway exited ({proc.returncode})" + (f": {why}" if why else "")
                               + f"; see {log}")
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"the serve gateway did not start within 60s; see {log_dir}/gateway-{port}.log")


def _broker_watch(address: str) -> list[str]:
    import json

    from .. import config

    try:
        with open(config.state_file()) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return []
    return ["--broker-pid", str(rec["broker_pid"])] if rec.get("address") == address and rec.get("broker_pid") else []


def _gateway(required=True) -> _Gateway | None:
    global _gw
    if (_gw is not None and (_gw.proc is None or _gw.proc.poll() is None) and state.read(_gw.port)
            and (not fabric.is_initialized() or _gw.rec["broker"] == fabric.init()["address"])):
        return _gw  # (a gateway of a cluster shut down since is not this cluster's)
    _gw = None
    if fabric.is_initialized():
        addr = fabric.init()["address"]
        for rec in state.gateways():
            if rec["broker"] == addr:
                _gw = _Gateway(rec)
                return _gw
    if required:
        raise RuntimeError("no serve gateway is running for this cluster; serve.run(...) starts one")
    return None


def run(app, *, name: str = "default", route_prefix: str | None = "/", host: str | None = None,
        port: int | None = None, wait: bool = True, timeout: float = 120.0) -> "DeploymentHandle":
    """Deploy ``app`` (a bound deployment) on the gateway, starting it (and the embedded
    cluster) if needed; with ``wait`` return once its first replicas answer. Returns its handle."""
    global _gw
    if isinstance(app, Deployment):
        app = app.bind()
    if not isinstance(app, Application):
        raise TypeError(f"serve.run takes a bound deployment (MyDeployment.bind(...)), got {type(app).__name__}")
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"name must be a non-empty string without '/', got {name!r}")
    spec = app.spec(name, route_prefix if app.kind == "json" else route_prefix if route_prefix != "/" else None)
    info = fabric.init()
    gw = _gateway(required=False)
    if gw is None:
        gw = _gw = _start_gateway(info["address"], host or settings.get().serve_host or DEFAULT_HOST,
                                  port or settings.get().serve_port or DEFAULT_PORT,
                                  info["embedded"], info.get("log_dir"))
    path = state.save_spec(spec)
    try:  # a redeploy of ``name`` rolls: the gateway answers once the new version serves (or could not)
        st = gw.call("POST", "/-/deploy", json={"spec_file": path, "wait": wait, "timeout": timeout},
                     timeout=timeout + 30)
    finally:
        if os.path.exists(path):
            os.unlink(path)
    if wait:
        deadline = time.monotonic() + timeout
        while st["status"] not in ("RUNNING", "SCALED_TO_ZERO"):
            if st["status"] == "UNHEALTHY":
                raise RuntimeError(f"deployment {name!r} did not start: {st['last_error']}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"deployment {name!r} did not start within {timeout:g}s: {st['status']}")
            time.sleep(0.05)
            st = gw.call("GET", "/-/status")["deployments"][name]
    return DeploymentHandle(name)


def status() -> dict:
    """The gateway's address and each deployment's state, replicas and ongoing requests."""
    gw = _gateway(required=False)
    if gw is None:
        return {"url": None, "deployments": {}}
    return gw.call("GET", "/-/status")


def delete(name: str) -> None:
    """Stop a deployment and its replicas; its route answers 404 afterwards."""
    _gateway().call("POST", "/-/delete", json={"name": name})


def shutdown() -> None:
    """Stop every deployment and the gateway."""
    global _gw
    gw = _gateway(required=False)
    if gw is None:
        return
    try:
        gw.call("POST", "/-/shutdown")
    except Exception:  # noqa: BLE001 - already going
        pass
    deadline = time.monotonic() + 15
    while state.read(gw.port) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    if gw.proc is not None:
        try:
            gw.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            gw.proc.kill()
            gw.proc.wait()
    _gw = None


class DeploymentHandle:
    """Calls a deployment from Python, no HTTP: ``handle.remote(x)`` -> a fabric Future of its
    return value; ``handle.method.remote(...)`` calls another method. Calls go straight to a
    replica (round robin); with none running (scaled to zero) the first call asks for one."""

    def __init__(self, name: str, method: str = "__call__"):
        self.name, self.method = name, method
        self._reps: list = []
        self._seen = 0.0
        self._rr = itertools.count()

    def __repr__(self):
        return f"<serve handle {self.name}.{self.method}>"

    def __getattr__(self, method):
        if method.startswith("_"):
            raise AttributeError(method)
        return DeploymentHandle(self.name, method)

    def options(self, method_name: str = "__call__") -> "DeploymentHandle":
        return DeploymentHandle(self.name, method_name)

    def _replicas(self, refresh=False):
        if refresh or not self._reps or time.monotonic() - self._seen > 2.0:
            from .replica import Replica

            gw = _gateway()
            st = gw.call("GET", "/-/status")["deployments"].get(self.name)
            if st is None:
                raise RuntimeError(f"no deployment named {self.name!r}")
            if not st["running_replicas"]:
                st = gw.call("POST", "/-/wake", json={"name": self.name})
            rclass = fabric.cls(Replica)
            self._reps = [fabric.InstanceHandle(rclass, bytes.fromhex(r), None, None, owner=False)
                          for r in st["running_replicas"]]
            self._seen = time.monotonic()
        return self._reps

    def remote(self, *args, **kwargs):
        reps = self._replicas()
        return reps[next(self._rr) % len(reps)].call.remote(self.method, args, kwargs)
