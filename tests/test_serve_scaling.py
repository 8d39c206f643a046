"""Replicas that come and go, against a real gateway on a real cluster: autoscaling on ongoing
requests (up, down, to zero and back), replica death (replaced; idempotent requests retried,
others 503), and the bearer token beyond loopback."""
import asyncio
import os
import signal
import subprocess
import sys

import httpx
import pytest

import fabric
from fabric import serve
from conftest import REPO, free_port, wait_for


@serve.deployment(cpus=0.1, max_ongoing_requests=4,
                  autoscaling_config={"min_replicas": 0, "max_replicas": 2, "target_ongoing_requests": 1,
                                      "downscale_delay_s": 0.5})
class Elastic:
    def __call__(self, body):
        import time

        while body and not os.path.exists(body["file"]):
            time.sleep(0.01)
        return os.getpid()


class Mortal:
    def __call__(self, body):
        if body and body.get("die") and not os.path.exists(body["die"]):
            open(body["die"], "w").close()
            os._exit(1)
        return os.getpid()


@pytest.fixture(scope="module")
def gw():
    fabric.shutdown()
    fabric.init(num_cpus=2)
    port = free_port()
    serve.run(Elastic.bind(), name="elastic", route_prefix="/elastic", port=port)
    serve.run(serve.deployment(Mortal, cpus=0.1, num_replicas=2, idempotent=True).bind(), name="idem",
              route_prefix="/idem")
    serve.run(serve.deployment(Mortal, cpus=0.1, num_replicas=1).bind(), name="once", route_prefix="/once")
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
        yield {"c": c, "port": port, "url": f"http://127.0.0.1:{port}"}
    serve.shutdown()
    fabric.shutdown()


def dep(name):
    return serve.status()["deployments"][name]


def test_scale_from_zero_to_two_and_back_to_zero(gw, tmp_path):
    c = gw["c"]
    assert dep("elastic")["status"] == "SCALED_TO_ZERO" and dep("elastic")["replicas"] == []
    r = c.post("/elastic", json=None)      # waits for a replica instead of failing
    assert r.status_code == 200
    flag = str(tmp_path / "go")

    async def load():
        async with httpx.AsyncClient(base_url=gw["url"], timeout=120) as ac:
            reqs = [asyncio.ensure_future(ac.post("/elastic", json={"file": flag})) for _ in range(4)]
            ok = await asyncio.to_thread(wait_for, lambda: len(dep("elastic")["running_replicas"]) == 2, 60)
            open(flag, "w").close()
            return ok, await asyncio.gather(*reqs)

    ok, rs = asyncio.run(load())
    assert ok, dep("elastic")              # 4 ongoing / target 1 -> capped at max_replicas=2
    assert all(r.status_code == 200 for r in rs)
    assert wait_for(lambda: dep("elastic")["replicas"] == [], 60), dep("elastic")   # idle -> zero
    assert dep("elastic")["status"] == "SCALED_TO_ZERO"
    assert c.post("/elastic", json=None).status_code == 200       # and back


def test_python_handle_wakes_a_scaled_to_zero_deployment(gw):
    assert wait_for(lambda: dep("elastic")["replicas"] == [], 60)
    h = serve.DeploymentHandle("elastic")
    assert isinstance(h.remote(None).result(timeout=60), int)


def kill_replica(c, route):
    pid = c.post(route, json={}).json()
    os.kill(pid, signal.SIGKILL)
    return pid


def test_idempotent_request_retried_on_another_replica_when_its_replica_dies(gw, tmp_path):
    c = gw["c"]
    marker = str(tmp_path / "died")
    r = c.post("/idem", json={"die": marker})
    assert os.path.exists(marker)           # the first replica ran it and died
    assert r.status_code == 200 and isinstance(r.json(), int)
    assert dep("idem")["replica_deaths"] >= 1
    assert wait_for(lambda: len(dep("idem")["running_replicas"]) == 2, 60), dep("idem")   # replaced
    assert c.post("/idem", json={}).status_code == 200


def test_non_idempotent_request_answered_503_when_its_replica_dies(gw, tmp_path):
    c = gw["c"]
    marker = str(tmp_path / "died")
    r = c.post("/once", json={"die": marker})
    assert r.status_code == 503 and "not idempotent" in r.json()["error"]
    assert wait_for(lambda: len(dep("once")["running_replicas"]) == 1, 60), dep("once")
    assert c.post("/once", json={}).status_code == 200


def test_replica_killed_between_requests_is_replaced(gw):
    c = gw["c"]
    old = kill_replica(c, "/once")
    assert wait_for(lambda: dep("once")["replica_deaths"] >= 2 and len(dep("once")["running_replicas"]) == 1, 60)
    r = c.post("/once", json={})
    assert r.status_code == 200 and r.json() != old


# ---------------------------------------------------------------- token beyond loopback
def gateway_proc(port, env_extra, *args):
    env = {**os.environ, "FABRIC_ADDRESS": fabric.init()["address"], **env_extra}
    env.pop("FABRIC_SERVE_TOKEN", None) if "FABRIC_SERVE_TOKEN" not in env_extra else None
    return subprocess.Popen([sys.executable, "-m", "fabric.serve", "--host", "0.0.0.0", "--port", str(port), *args],
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_beyond_loopback_refuses_to_start_without_token(gw):
    p = gateway_proc(free_port(), {})
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 2
    assert b"refusing to listen on 0.0.0.0 without a token" in out and b"FABRIC_SERVE_TOKEN" in out


@pytest.mark.parametrize("how", ["token-file", "env"])
def test_beyond_loopback_needs_bearer_token_and_never_logs_it(gw, tmp_path, how):
    port = free_port()
    token = "s3cret-" + os.urandom(8).hex()
    tf = tmp_path / "token"
    tf.write_text(token + "\n")
    if how == "env":
        p = gateway_proc(port, {"FABRIC_SERVE_TOKEN": token})
    else:
        p = gateway_proc(port, {}, "--token-file", str(tf))
    try:
        url = f"http://127.0.0.1:{port}"

        def up():
            try:
                return httpx.get(url + "/v2/health/live", timeout=1).status_code == 401
            except httpx.HTTPError:
                return False

        assert wait_for(up, 60)
        for path in ("/v2/health/live", "/metrics", "/anything"):
            r = httpx.get(url + path)
            assert r.status_code == 401 and "bearer token" in r.json()["error"]
        assert httpx.get(url + "/v2", headers={"Authorization": "Bearer wrong"}).status_code == 401
        r = httpx.get(url + "/v2/health/live", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200 and r.json() == {"live": True}
        r = httpx.post(url + "/nothing", json={}, headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 404
    finally:
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=30)
    assert token.encode() not in out
    assert all(token not in open(os.path.join(d, f), errors="replace").read()
               for d, _, fs in os.walk(os.environ["FABRIC_HOME"]) for f in fs if f.endswith((".log", ".out")))


def test_fabric_status_shows_deployments_and_gateway(gw):
    import json as _json

    out = subprocess.run([sys.executable, "-m", "fabric.cli", "status", "--json", "--address", fabric.init()["address"]],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    gws = _json.loads(out.stdout)["serve"]
    mine = [g for g in gws if g["port"] == gw["port"]]
    assert mine and mine[0]["url"] == gw["url"] and "admin_token" not in mine[0]
    deps = {d["name"]: d for d in mine[0]["deployments"]}
    assert {"elastic", "idem", "once"} <= set(deps)
    assert deps["idem"]["target_replicas"] == 2 and "ongoing_requests" in deps["idem"]


def test_serve_run_beyond_loopback_without_token_says_why(tmp_path):
    code = f"""
import fabric
from fabric import serve

@serve.deployment(cpus=0.1)
def f():
    return 1

fabric.init(num_cpus=1)
try:
    serve.run(f.bind(), name="f", host="0.0.0.0", port={free_port()})
except RuntimeError as e:
    print("ERR", e)
fabric.shutdown()
"""
    env = {k: v for k, v in os.environ.items() if k != "FABRIC_SERVE_TOKEN"}
    env["FABRIC_HOME"] = str(tmp_path)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert "ERR the serve gateway exited (2): fabric serve: refusing to listen on 0.0.0.0 without a token" in r.stdout, \
        r.stdout + r.stderr


def test_gateway_record_appears_only_once_it_listens(gw):
    """serve.run connects as soon as the gateway's record names its port: a record written
    before the socket is bound (uvicorn runs the lifespan first) made it 'Connection refused'."""
    import socket
    import time

    from fabric.serve import state

    port = free_port()
    env = {**os.environ, "FABRIC_ADDRESS": fabric.init()["address"]}
    p = subprocess.Popen([sys.executable, "-m", "fabric.serve", "--port", str(port)], env=env, cwd=REPO,
                         stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while state.read(port) is None:
            assert p.poll() is None, "the gateway exited"
            assert time.monotonic() < deadline, "the gateway wrote no record within 60s"
            time.sleep(0.001)
        with socket.create_connection(("127.0.0.1", port), timeout=5):  # the moment it is there
            pass
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=30)
    assert state.read(port) is None  # and it goes with the gateway


def test_embedded_gateway_stops_with_its_cluster_and_a_new_cluster_gets_its_own(tmp_path):
    code = f"""
import os, time
import httpx
import fabric
from fabric import serve
from fabric.serve import state

@serve.deployment(cpus=0.1)
def pid():
    return os.getpid()

fabric.init(num_cpus=1)
serve.run(pid.bind(), name="p", route_prefix="/p", port={free_port()})
first = serve.status()
first["port"] = int(first["url"].rsplit(":", 1)[1])
fabric.shutdown()                      # no serve.shutdown(): the gateway has no cluster left to serve
t = time.monotonic()
while state.read(first["port"]) is not None and time.monotonic() - t < 30:
    time.sleep(0.1)
stopped = state.read(first["port"]) is None
fabric.init(num_cpus=1)
serve.run(pid.bind(), name="p", route_prefix="/p", port={free_port()})
now = serve.status()
r = httpx.post(now["url"] + "/p", json=None, timeout=60, trust_env=False)
print("OK", stopped, now["broker"] == fabric.init()["address"] != first["broker"], r.status_code)
serve.shutdown()
fabric.shutdown()
"""
    env = {**os.environ, "FABRIC_HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, env=env, cwd=REPO)
    assert "OK True True 200" in r.stdout, r.stdout + r.stderr
