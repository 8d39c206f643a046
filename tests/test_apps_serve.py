"""Apps with serve deployments on a `fabric start --serve` cluster, over real HTTP (httpx):
fabric deploy prints the endpoint, a redeploy rolls under a steady stream of HTTP requests and
fabric.lookup calls with zero failures, a deploy whose @enter fails leaves the old version
serving, stop deletes the deployments and rollback brings the old version's back, and the
reconciler restores them after the gateway dies, also when the reconciler itself restarted."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import httpx
import psutil
import pytest

from conftest import REPO, free_port, wait_for

FABRIC = [sys.executable, "-m", "fabric.cli"]

SHOP = '''
import os
import fabric
from fabric import serve

app = fabric.App("shop")

@app.fn(cpus=1)
def score(order):
    return {{"version": "{tag}", "total": order["total"] * {factor}}}

@serve.deployment(cpus=0.1)
class Scorer:
    def __init__(self, tag):
        self.tag = tag

    @fabric.enter
    def load(self):
        if {fail}:
            raise RuntimeError("cannot load the {tag} model")

    def __call__(self, body):
        return {{"version": self.tag, "pid": os.getpid(), "total": body["total"] * {factor}}}

app.deployment(Scorer.bind("{tag}"), route_prefix="/shop/score")
'''


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    home = str(tmp_path_factory.mktemp("home"))
    sport = free_port()
    env = dict(os.environ, FABRIC_HOME=home, FABRIC_SERVE_PORT=str(sport))
    env.pop("FABRIC_ADDRESS", None)
    port = free_port()
    r = subprocess.run(FABRIC + ["start", "--port", str(port), "--cpus", "2", "--detach", "--serve", str(sport)],
                       env=env, capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr
    url = f"http://127.0.0.1:{sport}"
    with httpx.Client(base_url=url, timeout=60, trust_env=False) as http:
        assert wait_for(lambda: _get(http, "/v2/health/live") == 200, timeout=60)
        yield {"env": env, "address": f"tcp://127.0.0.1:{port}", "home": home, "url": url, "http": http,
               "sport": sport}
    subprocess.run(FABRIC + ["stop"], env=env, capture_output=True, timeout=60)


def _get(http, path):
    try:
        return http.get(path).status_code
    except httpx.HTTPError:
        return None


def cli(cluster, *args, timeout=240):
    return subprocess.run(FABRIC + list(args), env=cluster["env"], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def write_app(d, tag, factor, fail=False):
    d.mkdir(exist_ok=True)
    (d / "shop.py").write_text(SHOP.format(tag=tag, factor=factor, fail=fail))
    return str(d / "shop.py")


def _cmdline(pid):
    """A process's command line; "" for one that is gone or a zombie (an earlier gateway the
    cluster has not reaped yet: the listing of the cluster's pids holds it too)."""
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return ""


def answer(cluster):
    try:
        r = cluster["http"].post("/shop/score", json={"total": 10})
    except httpx.HTTPError:
        return None
    return r.json() if r.status_code == 200 else None


LOOKUP = '''
import fabric, json
fabric.init(address="auto")
print(json.dumps(fabric.lookup("shop", "score").remote({"total": 10}).result()))
'''


def lookup(cluster):
    r = subprocess.run([sys.executable, "-c", LOOKUP], env=cluster["env"], capture_output=True, text=True,
                       timeout=120, cwd="/")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


LOAD = '''
import json, sys, threading, time
import httpx
import fabric

fabric.init(address="auto")
h = fabric.lookup("shop", "score")
res = {"http": [], "lookup": [], "failed": []}

def done(seen):
    return len(seen) >= 20 and seen[-20:].count("v2") == 20

def http_loop():
    with httpx.Client(base_url=sys.argv[1], timeout=60, trust_env=False) as c:
        while not done(res["http"]) and time.monotonic() < deadline:
            try:
                r = c.post("/shop/score", json={"total": 1})
                if r.status_code == 200:
                    res["http"].append(r.json()["version"])
                else:
                    res["failed"].append(f"http {r.status_code} {r.text}")
            except Exception as e:
                res["failed"].append(f"http {e!r}")

def lookup_loop():
    while not done(res["lookup"]) and time.monotonic() < deadline:
        try:
            res["lookup"].append(h.remote({"total": 1}).result(timeout=60)["version"])
        except Exception as e:
            res["failed"].append(f"lookup {e!r}")

deadline = time.monotonic() + 400
ts = [threading.Thread(target=http_loop), threading.Thread(target=lookup_loop)]
for t in ts:
    t.start()
while not (res["http"] and res["lookup"]):
    time.sleep(0.01)
print("READY", flush=True)
for t in ts:
    t.join()
print(json.dumps(res))
'''


def test_deploy_answers_over_http_and_a_redeploy_under_load_fails_nothing(cluster, tmp_path):
    path = write_app(tmp_path / "app", "v1", 2)
    r = cli(cluster, "deploy", path)
    assert r.returncode == 0, r.stderr
    assert "deployed app shop version 1" in r.stdout
    assert f"scorer: {cluster['url']}/shop/score" in r.stdout  # where the endpoint answers
    assert answer(cluster)["version"] == "v1" and answer(cluster)["total"] == 20
    assert lookup(cluster) == {"version": "v1", "total": 20}
    old_pids = {answer(cluster)["pid"] for _ in range(5)}

    load = subprocess.Popen([sys.executable, "-c", LOAD, cluster["url"]], env=cluster["env"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
    try:
        assert load.stdout.readline().strip() == "READY"
        r = cli(cluster, "deploy", write_app(tmp_path / "app", "v2", 3))
        assert r.returncode == 0 and "version 2" in r.stdout, r.stderr
        out, err = load.communicate(timeout=420)
    finally:
        if load.poll() is None:
            load.kill()
    res = json.loads(out.strip().splitlines()[-1])
    assert res["failed"] == [], err
    for stream in ("http", "lookup"):
        seen = res[stream]
        assert seen[0] == "v1" and seen[-1] == "v2", stream
        assert "v1" not in seen[seen.index("v2"):], stream  # after the switch, only the new version
    assert answer(cluster)["total"] == 30
    st = json.loads(cli(cluster, "status", "--json").stdout)
    gw = [g for g in st["serve"] if g["url"] == cluster["url"]][0]
    dep = [d for d in gw["deployments"] if d["name"] == "shop.scorer"][0]
    assert dep["status"] == "RUNNING" and dep["replicas"] and len(dep["replicas"]) == 1

    def stopped(pid):
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    assert wait_for(lambda: all(stopped(p) for p in old_pids), timeout=60)  # v1's replicas drained, stopped


def test_a_deploy_whose_enter_fails_leaves_the_old_version_serving(cluster, tmp_path):
    assert answer(cluster)["version"] == "v2"
    r = cli(cluster, "deploy", write_app(tmp_path / "bad", "v3", 4, fail=True))
    assert r.returncode == 1, r.stdout
    assert "deployment 'scorer' of app 'shop' did not start" in r.stderr
    assert "the old version keeps serving" in r.stderr and "cannot load the v3 model" in r.stderr
    assert "Traceback" not in r.stderr
    assert answer(cluster)["version"] == "v2"
    assert lookup(cluster)["version"] == "v2"
    assert [a["version"] for a in json.loads(cli(cluster, "apps", "--json").stdout)] == [2]


def test_stop_deletes_the_deployments_and_rollback_brings_the_old_ones_back(cluster):
    r = cli(cluster, "app", "stop", "shop")
    assert r.returncode == 0, r.stderr
    resp = cluster["http"].post("/shop/score", json={"total": 1})
    assert resp.status_code == 404
    r = cli(cluster, "app", "rollback", "shop", "1")
    assert r.returncode == 0 and "version 3 is version 1 again" in r.stdout, r.stderr
    got = answer(cluster)
    assert (got["version"], got["total"]) == ("v1", 20)
    assert lookup(cluster)["version"] == "v1"
    listed = json.loads(cli(cluster, "apps", "--json").stdout)
    assert listed[0]["endpoints"] == {"scorer": "/shop/score"}


def _gateway_pid(cluster):
    with open(os.path.join(cluster["home"], "serve", f"gateway-{cluster['sport']}.json")) as f:
        return json.load(f)["pid"]


def _kill_gateway(cluster):
    pid = _gateway_pid(cluster)
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: answer(cluster) is None, timeout=30)
    return pid


def test_the_reconciler_brings_deployments_back_after_the_gateway_and_itself_restart(cluster):
    assert answer(cluster)["version"] == "v1"
    first = _kill_gateway(cluster)
    # the reconciler `fabric start --serve` runs starts a gateway and deploys the app's scorer again
    assert wait_for(lambda: (answer(cluster) or {}).get("version") == "v1", timeout=120)
    assert _gateway_pid(cluster) != first

    rec = json.load(open(os.path.join(cluster["home"], "cluster.json")))
    recon = [p for p in rec["pids"] if "fabric.apps.reconciler" in _cmdline(p)]
    assert len(recon) == 1
    os.kill(recon[0], signal.SIGKILL)  # no reconciler now: a dead gateway stays dead
    _kill_gateway(cluster)
    # a new reconciler has no memory of its own: it reads what to serve from the registry in the store
    again = subprocess.Popen([sys.executable, "-m", "fabric.apps.reconciler", "--address", cluster["address"],
                              "--interval", "1", "--broker-pid", str(rec["broker_pid"])],
                             env=cluster["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_for(lambda: (answer(cluster) or {}).get("version") == "v1", timeout=120)
        assert lookup(cluster)["version"] == "v1"
        # a stopped app is not brought back
        assert cli(cluster, "app", "stop", "shop").returncode == 0
        os.kill(_gateway_pid(cluster), signal.SIGKILL)
        r = cli(cluster, "app", "reconcile")
        assert r.returncode == 0 and "every running app's deployments are served" in r.stdout, r.stderr
    finally:
        again.terminate()
        out = again.communicate(timeout=30)[0]
    assert "deployed scorer again" in out, out
