"""The HTTP gateway: a Starlette app under uvicorn, in a process of its own, an ordinary fabric
driver. Routes: deployments' JSON routes, the Open Inference Protocol under ``/v2``, ``/metrics``,
and the control routes under ``/-/`` that ``serve.run`` uses (they need the admin token kept in
the owner-only state file). HTTP carries JSON or tensors only: the deployments ``serve.run``
sends arrive as an owner-only file in fabric's data folder, never in a request.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import os
import secrets
import sys
import threading
import time

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

import fabric
from fabric import settings

from . import oip, state
from .controller import Runtime, err
from .metrics import Metrics
from .routing import match_route

JSON = "application/json"


def _json(obj, status=200, headers=None):
    return Response(json.dumps(obj, separators=(",", ":")), status, headers=headers, media_type=JSON)


def _error(status, msg, headers=None):
    return Response(err(msg), status, headers=headers, media_type=JSON)


def is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "::1", "localhost") or host.startswith("127.")


class Gateway:
    """The deployments and the routes over them."""

    def __init__(self, address: str, host: str, port: int, token: str | None, debug: bool = False):
        self.address, self.host, self.port, self.debug = address, host, port, debug
        self.token = token.encode() if token else None
        self.admin = secrets.token_urlsafe(32)
        self.metrics = Metrics()
        self.deployments: dict[str, Runtime] = {}
        self.routes: dict[str, Runtime] = {}
        self.models: dict[str, Runtime] = {}
        self.pending: dict[str, Runtime] = {}   # new versions starting beside the serving ones
        self.loop = None
        self.server = None
        self.started = time.time()
        self.app = Starlette(routes=[
            Route("/metrics", self.metrics_route),
            Route("/v2", self.v2_meta),
            Route("/v2/health/live", self.live),
            Route("/v2/health/ready", self.ready),
            Route("/v2/models/{model}", self.model_meta),
            Route("/v2/models/{model}/versions/{version}", self.model_meta),
            Route("/v2/models/{model}/ready", self.model_ready),
            Route("/v2/models/{model}/versions/{version}/ready", self.model_ready),
            Route("/v2/models/{model}/infer", self._infer_not_post, methods=["POST"]),   # 405 for GET
            Route("/v2/models/{model}/versions/{version}/infer", self._infer_not_post, methods=["POST"]),
            Route("/-/deploy", self.admin_deploy, methods=["POST"]),
            Route("/-/delete", self.admin_delete, methods=["POST"]),
            Route("/-/status", self.admin_status),
            Route("/-/wake", self.admin_wake, methods=["POST"]),
            Route("/-/shutdown", self.admin_shutdown, methods=["POST"]),
        ], lifespan=self.lifespan,
            exception_handlers={404: self._not_found, 405: self._not_allowed})

    async def _not_found(self, request, exc):
        return _error(404, f"no route {request.url.path}")

    async def _not_allowed(self, request, exc):
        return _error(405, f"{request.method} is not allowed on {request.url.path}")

    # ------------------------------------------------------------------ ASGI entry
    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            if self.token is not None and not self._authorized(scope):
                await _error(401, "missing or wrong bearer token: send 'Authorization: Bearer <token>'",
                             {"www-authenticate": "Bearer"})(scope, receive, send)
                return
            path = scope["path"]
            if not path.startswith(("/v2", "/-/", "/metrics")):
                await self.deployment_route(scope, receive, send)
                return
            if path.startswith("/v2/models/") and path.endswith("/infer") and scope["method"] == "POST":
                # the hot OIP route skips Starlette's routing and request/response objects
                parts = path[11:-6].split("/")
                if len(parts) == 1 or len(parts) == 3 and parts[1] == "versions":
                    await self.infer(scope, receive, send, parts[0], parts[2] if len(parts) == 3 else None)
                    return
        await self.app(scope, receive, send)

    def _authorized(self, scope) -> bool:
        for k, v in scope["headers"]:
            if k == b"authorization":
                return v[:7].lower() == b"bearer " and hmac.compare_digest(v[7:].strip(), self.token)
        return False

    # ------------------------------------------------------------------ lifecycle
    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        await self.startup()
        try:
            yield
        finally:
            await self.on_shutdown()

    async def startup(self):
        self.loop = asyncio.get_running_loop()
        fabric.init(address=self.address)
        self.loop.create_task(self._ticker())

    async def _ticker(self):
        # uvicorn runs the lifespan before it binds its socket: the record that tells clients
        # where to connect is written once it listens, or they would find the port closed
        while self.server is not None and not self.server.started:
            if self.server.should_exit:
                return
            await asyncio.sleep(0.005)
        self.publish()
        await self._reconcile_forever()

    async def on_shutdown(self):
        for rt in [*self.deployments.values(), *self.pending.values()]:
            rt.close()
        state.remove(self.port)

    async def _reconcile_forever(self):
        n = 0
        while True:
            await asyncio.sleep(0.05)
            n += 1
            for rt in list(self.deployments.values()):
                try:
                    rt.reconcile()
                    if n % 40 == 0:
                        rt.health_check()
                except Exception as e:  # noqa: BLE001 - keep serving; say why in status
                    rt.last_error = f"{type(e).__name__}: {e}"
            if n % 10 == 0:
                self.publish()

    def publish(self):
        state.write(self.port, {"url": f"http://{self.host}:{self.port}", "host": self.host, "port": self.port,
                                "pid": os.getpid(), "broker": self.address, "admin_token": self.admin,
                                "started": self.started, "updated": time.time(),
                                "deployments": [rt.status() for rt in self.deployments.values()]})

    # ------------------------------------------------------------------ JSON routes
    async def deployment_route(self, scope, receive, send):
        rt = match_route(self.routes, scope["path"])
        if rt is None:
            await _error(404, f"no deployment serves {scope['path']}")(scope, receive, send)
            return
        body = await _body(receive)
        t0 = time.perf_counter()
        if body:
            try:
                value = json.loads(body)
            except (ValueError, UnicodeDecodeError) as e:
                await self._finish(rt, t0, 400, err(f"the request body is not valid JSON: {e}"), scope, receive, send)
                return
        else:
            value = None
        if rt.wants_request:
            qs = scope.get("query_string", b"").decode("latin-1")
            from urllib.parse import parse_qsl

            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]
                       if k != b"authorization"}
            value = (value, (scope["method"], scope["path"], dict(parse_qsl(qs)), headers, body))
        status, out = await self._call(rt, value)
        await self._finish(rt, t0, status, out, scope, receive, send)

    async def _call(self, rt, payload):
        """``(status, body)``, or ``(status, body, inference header length)`` from a model."""
        fut = rt.submit(payload)
        if fut is None:
            return 503, err(f"{rt.name} is overloaded: {rt.dispatcher.queued} requests queued "
                            f"(max_queued_requests={rt.options['max_queued_requests']}); retry later")
        return await fut

    async def _finish(self, rt, t0, status, body, scope, receive, send, header_length=None):
        if not isinstance(body, bytes):
            body = err(str(body))
        headers = [(b"content-type", b"application/octet-stream" if header_length else b"application/json"),
                   (b"content-length", str(len(body)).encode())]
        if header_length:
            headers.append((oip.HEADER_LENGTH.encode(), header_length.encode()))
        if status == 503:
            headers.append((b"retry-after", b"1"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        if rt is not None:
            rt.m_latency.observe(time.perf_counter() - t0)
            self.metrics.count(rt.name, status)

    # ------------------------------------------------------------------ Open Inference Protocol
    async def v2_meta(self, request: Request):
        return _json({"name": "fabric", "version": fabric.__version__, "extensions": ["binary_tensor_data"]})

    async def live(self, request: Request):
        return _json({"live": True})

    async def ready(self, request: Request):
        ok = all(rt.ready() for rt in self.deployments.values())
        return _json({"ready": ok}, 200 if ok else 503)

    def _model(self, request: Request):
        name = request.path_params["model"]
        rt = self.models.get(name)
        if rt is None:
            return None, _error(404, f"unknown model {name!r}; served models: {', '.join(self.models) or 'none'}")
        v = request.path_params.get("version")
        if v is not None and v != rt.options["version"]:
            return None, _error(404, f"model {name!r} has no version {v!r}; it serves version {rt.options['version']}")
        return rt, None

    async def model_meta(self, request: Request):
        rt, bad = self._model(request)
        if bad:
            return bad
        m = rt.spec["meta"]
        return _json({"name": rt.name, "versions": [rt.options["version"]], "platform": m.get("platform", ""),
                      "inputs": m["inputs"], "outputs": m["outputs"]})

    async def model_ready(self, request: Request):
        rt, bad = self._model(request)
        if bad:
            return bad
        ok = rt.ready()
        return _json({"name": rt.name, "ready": ok}, 200 if ok else 503)

    async def infer(self, scope, receive, send, name, version):
        """``POST /v2/models/{name}[/versions/{version}]/infer``: the raw body (and its
        Inference-Header-Content-Length) goes to a replica, which decodes it, runs the model
        and encodes the answer (a 400 there for a bad tensor); unknown models are 404 here."""
        rt = self.models.get(name)
        if rt is None:
            msg = f"unknown model {name!r}; served models: {', '.join(self.models) or 'none'}"
        elif version is not None and version != rt.options["version"]:
            msg = f"model {name!r} has no version {version!r}; it serves version {rt.options['version']}"
        else:
            msg = None
        if msg is not None:
            await self._finish(None, 0.0, 404, err(msg), scope, receive, send)
            return
        body = await _body(receive)
        t0 = time.perf_counter()
        hl = None
        for k, v in scope["headers"]:
            if k == b"inference-header-content-length":
                hl = v.decode("latin-1")
        out = await self._call(rt, (body, hl))
        await self._finish(rt, t0, out[0], out[1], scope, receive, send, out[2] if len(out) > 2 else None)

    async def _infer_not_post(self, request: Request):  # only reached if __call__ did not take it
        return _error(405, f"{request.method} is not allowed on {request.url.path}; infer takes POST")

    async def metrics_route(self, request: Request):
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # ------------------------------------------------------------------ control (serve.run and friends)
    def _admin_ok(self, request: Request) -> bool:
        got = request.headers.get("x-fabric-admin", "")
        return hmac.compare_digest(got.encode(), self.admin.encode())

    async def admin_deploy(self, request: Request):
        if not self._admin_ok(request):
            return _error(403, "control routes need the gateway's admin token")
        try:
            req = await request.json()
            spec = state.load_spec(req["spec_file"])
        except Exception as e:  # noqa: BLE001
            return _error(400, f"cannot read the deployment: {type(e).__name__}: {e}")
        name, prefix = spec["name"], spec["route_prefix"]
        other = self.routes.get(prefix) if prefix is not None else None
        if other is not None and other.name != name:
            return _error(400, f"route_prefix {prefix} is already served by deployment {other.name!r}")
        if spec["kind"] == "oip" and name in self.models and self.models[name].name != name:
            return _error(400, f"model {name!r} is already served")
        try:
            rt = Runtime(spec, self.loop, self.metrics, self.debug)
        except Exception as e:  # noqa: BLE001
            return _error(400, f"{type(e).__name__}: {e}")
        old = self.deployments.get(name)
        if old is None:  # a new deployment: its routes answer at once (503 with the reason until it runs)
            self._switch(None, rt)
            self.publish()
            return _json(rt.status())
        # a redeploy rolls: the new version's replicas start beside the old ones, and only once
        # they all run do new requests go to them; the old version finishes what it holds and stops
        prev = self.pending.pop(name, None)
        if prev is not None:  # a newer redeploy supersedes one still starting
            prev.close(forget=False)
        self.pending[name] = rt
        timeout = float(req.get("timeout", 120.0))
        task = self.loop.create_task(self._roll(old, rt, timeout))
        if not req.get("wait", True):
            return _json({**rt.status(), "status": "UPDATING"})
        ok, why = await asyncio.shield(task)  # the roll goes on even if the caller hangs up
        if not ok:
            return _error(409, why)
        return _json(rt.status())

    def _switch(self, old, rt):
        name, prefix = rt.name, rt.route_prefix
        self.deployments[name] = rt
        self.routes = {k: v for k, v in self.routes.items() if v.name != name}
        self.models = {k: v for k, v in self.models.items() if v.name != name}
        if prefix is not None:
            self.routes[prefix] = rt
        if rt.kind == "oip":
            self.models[name] = rt
        rt.reconcile()
        if old is not None:
            old.close(successor=rt)

    def _abandon(self, old, rt):
        rt.close(forget=False)
        old._gauge()

    async def _roll(self, old, rt, timeout: float):
        """Start ``rt``'s replicas, then switch ``old``'s routes to it. (ok, why not)."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self.pending.get(rt.name) is not rt or rt.closed:
                    return False, f"deployment {rt.name!r}: a newer deploy replaced this one while it started"
                rt.reconcile()
                if rt.started():
                    break
                if rt.failures:
                    self._abandon(old, rt)
                    return False, (f"the new version of {rt.name!r} did not start, so the old version keeps "
                                   f"serving: {rt.last_error}")
                if time.monotonic() > deadline:
                    self._abandon(old, rt)
                    return False, (f"the new version of {rt.name!r} did not start within {timeout:g}s, so the "
                                   f"old version keeps serving; {rt.last_error or 'its replicas are still starting'}")
                await asyncio.sleep(0.02)
            cur = self.deployments.get(rt.name)
            if cur is None:  # deleted while the new version started
                rt.close()
                return False, f"deployment {rt.name!r} was deleted while its new version started"
            self._switch(cur, rt)
            self.publish()
            return True, ""
        finally:
            if self.pending.get(rt.name) is rt:
                del self.pending[rt.name]

    async def admin_delete(self, request: Request):
        if not self._admin_ok(request):
            return _error(403, "control routes need the gateway's admin token")
        name = (await request.json()).get("name")
        rt = self.deployments.pop(name, None)
        starting = self.pending.pop(name, None)
        if starting is not None:
            starting.close()
        if rt is None:
            return _error(404, f"no deployment named {name!r}")
        self.routes = {k: v for k, v in self.routes.items() if v is not rt}
        self.models = {k: v for k, v in self.models.items() if v is not rt}
        rt.close()
        self.publish()
        return _json({"deleted": name})

    async def admin_status(self, request: Request):
        if not self._admin_ok(request):
            return _error(403, "control routes need the gateway's admin token")
        return _json({"url": f"http://{self.host}:{self.port}", "broker": self.address,
                      "deployments": {rt.name: rt.status() for rt in self.deployments.values()}})

    async def admin_wake(self, request: Request):
        """A Python handle found no replica: start one (scale from zero) and wait, bounded."""
        if not self._admin_ok(request):
            return _error(403, "control routes need the gateway's admin token")
        body = await request.json()
        rt = self.deployments.get(body.get("name"))
        if rt is None:
            return _error(404, f"no deployment named {body.get('name')!r}")
        deadline = time.monotonic() + float(body.get("timeout", rt.options["queue_timeout_s"]))
        rt.hold_until = time.monotonic() + max(10.0, rt.policy.down_delay if rt.policy else 0.0)
        while time.monotonic() < deadline:
            rt.reconcile()
            if rt.status()["running_replicas"]:
                return _json(rt.status())
            await asyncio.sleep(0.02)
        return _error(503, f"no replica of {rt.name} became ready in time; {rt.last_error or ''}")

    async def admin_shutdown(self, request: Request):
        if not self._admin_ok(request):
            return _error(403, "control routes need the gateway's admin token")
        if self.server is not None:
            self.server.should_exit = True
        return _json({"stopping": True})


async def _body(receive) -> bytes:
    body = b""
    more = True
    while more:
        msg = await receive()
        body += msg.get("body", b"")
        more = msg.get("more_body", False)
    return body


def read_token(token_file: str | None) -> str | None:
    if token_file:
        with open(token_file) as f:
            t = f.read().strip()
        if not t:
            raise SystemExit(f"fabric serve: token file {token_file} is empty")
        return t
    return settings.get().serve_token or None


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fabric.serve")
    ap.add_argument("--address", default=None, help="broker address (default: FABRIC_ADDRESS or the recorded cluster)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--token-file", default=None)
    ap.add_argument("--parent-pid", type=int, default=0)
    ap.add_argument("--broker-pid", type=int, default=0)
    ap.add_argument("--debug", action="store_true")
    a = ap.parse_args(argv)
    os.umask(0o077)
    token = read_token(a.token_file)
    if not is_loopback(a.host) and not token:
        print(f"fabric serve: refusing to listen on {a.host} without a token: set FABRIC_SERVE_TOKEN or pass "
              f"--token-file (requests must then send 'Authorization: Bearer <token>')", file=sys.stderr)
        raise SystemExit(2)
    address = a.address or settings.get().address or "auto"
    debug = a.debug or settings.get().serve_debug == "1"
    gw = Gateway(address, a.host, a.port, token, debug=debug)
    import uvicorn

    kw = {}
    try:
        import uvloop  # noqa: F401

        kw["loop"] = "uvloop"
    except ImportError:
        pass
    try:
        import httptools  # noqa: F401

        kw["http"] = "httptools"
    except ImportError:
        pass
    config = uvicorn.Config(gw, host=a.host, port=a.port, log_level="warning", access_log=False,
                            lifespan="on", server_header=False, proxy_headers=False, date_header=False, **kw)
    server = gw.server = uvicorn.Server(config)
    watched = [p for p in (a.parent_pid, a.broker_pid) if p]
    # an embedded cluster's broker listens on a socket file that goes with it (fabric.shutdown())
    sock_file = address[len("ipc://"):] if a.parent_pid and address.startswith("ipc://") else None
    if watched:
        def watch():  # the driver that started it, or the cluster's broker, is gone: stop too
            while not server.should_exit:
                for pid in watched:
                    try:
                        os.kill(pid, 0)
                    except ProcessLookupError:
                        server.should_exit = True
                        return
                if sock_file is not None and not os.path.exists(sock_file):
                    server.should_exit = True
                    return
                time.sleep(0.5)

        threading.Thread(target=watch, daemon=True).start()
    print(f"fabric serve: gateway on http://{a.host}:{a.port} (cluster {address})", flush=True)
    server.run()
    if not server.started:
        raise SystemExit(1)
    try:
        fabric.shutdown()
    except Exception:  # noqa: BLE001
        pass


if __name__ == "__main__":
    main()
