"""min_warm of a deployed app on a real `fabric start --serve` cluster (broker, executor, the
reconciler and its warm keepers as processes): after `fabric deploy` the broker lists the app's
function with min_warm workers holding its code and the class with min_warm instances whose
@enter ran, before any call; a killed worker is replaced and warmed again; a redeploy moves the
warm containers to the new version and drops the old version's; `fabric app stop` drops them."""
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import REPO, free_port, wait_for

FABRIC = [sys.executable, "-m", "fabric.cli"]

APP = '''
import os
import fabric

app = fabric.App("warmshop")

@app.fn(min_warm=2, cpus=1)
def score(x):
    return {{"tag": "{tag}", "y": x + 1, "pid": os.getpid()}}

@app.cls(min_warm=1, cpus=0.5)
class Model:
    @fabric.enter
    def load(self):
        with open(os.path.join({marks!r}, "{tag}-%d" % os.getpid()), "w") as f:
            f.write("loaded")

    def predict(self, x):
        return x * 2
'''


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    home = str(tmp_path_factory.mktemp("home"))
    marks = str(tmp_path_factory.mktemp("marks"))
    env = dict(os.environ, FABRIC_HOME=home, FABRIC_SERVE_PORT=str(free_port()))
    env.pop("FABRIC_ADDRESS", None)
    port = free_port()
    r = subprocess.run(FABRIC + ["start", "--port", str(port), "--cpus", "2", "--detach", "--serve",
                                 env["FABRIC_SERVE_PORT"]], env=env, capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr
    yield {"env": env, "home": home, "marks": marks, "address": f"tcp://127.0.0.1:{port}"}
    subprocess.run(FABRIC + ["stop"], env=env, capture_output=True, timeout=60)


def cli(cluster, *args, timeout=240):
    return subprocess.run(FABRIC + list(args), env=cluster["env"], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def write_app(cluster, d, tag):
    d.mkdir(exist_ok=True)
    (d / "warmshop.py").write_text(APP.format(tag=tag, marks=cluster["marks"]))
    return str(d / "warmshop.py")


def status(cluster):
    r = cli(cluster, "status", "--json", timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def warm(cluster, version):
    """name -> the broker's entry, for this app version's functions and classes."""
    prefix = f"fabric_app_warmshop_v{version}."
    return {f["name"][len(prefix):]: f for f in status(cluster)["functions"] if f["name"].startswith(prefix)}


def warm_is(cluster, version, fn, cls):
    w = warm(cluster, version)
    return (w.get("score", {}).get("warm"), w.get("Model", {}).get("warm")) == (fn, cls)


def loaded(cluster, tag):
    return sorted(f for f in os.listdir(cluster["marks"]) if f.startswith(tag + "-"))


def executor_workers(cluster):
    rec = json.load(open(os.path.join(cluster["home"], "cluster.json")))
    execs = [psutil.Process(p) for p in rec["pids"] if psutil.pid_exists(p)
             and "fabric.executor" in " ".join(psutil.Process(p).cmdline())]
    assert execs
    return [c for e in execs for c in e.children()]


LOOKUP = '''
import fabric, json
fabric.init(address="auto")
h = fabric.lookup("warmshop", "score")
out = h.remote(1).result()
out["hash"] = h._resolve()._blob()[1].hex()[:12]
print(json.dumps(out))
'''


def test_deploy_keeps_min_warm_containers_up_and_a_dead_one_comes_back(cluster, tmp_path):
    r = cli(cluster, "deploy", write_app(cluster, tmp_path / "a", "v1"))
    assert r.returncode == 0, r.stderr
    assert "deployed app warmshop version 1" in r.stdout
    assert "functions:   score" in r.stdout and "classes:     model" in r.stdout
    assert "warm:        score 2/2, model 1/1" in r.stdout, r.stdout  # deploy waited for them
    w = warm(cluster, 1)
    assert (w["score"]["kind"], w["score"]["min_warm"], w["score"]["warm"]) == ("fn", 2, 2)
    assert (w["Model"]["kind"], w["Model"]["min_warm"], w["Model"]["warm"]) == ("cls", 1, 1)
    assert w["score"]["running"] == 0  # nothing ran: the registering call never started
    assert len(loaded(cluster, "v1")) == 1  # the warm instance's @enter ran, once

    # a lookup from another client is served by the same code the workers hold warm
    r = subprocess.run([sys.executable, "-c", LOOKUP], env=cluster["env"], capture_output=True, text=True,
                       timeout=120, cwd="/")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert (got["tag"], got["y"]) == ("v1", 2)
    assert got["hash"] == w["score"]["hash"]

    # kill every worker of the executor: pool workers holding score's code and the instance
    victims = executor_workers(cluster)
    assert len(victims) >= 3
    for p in victims:
        p.send_signal(signal.SIGKILL)
    assert wait_for(lambda: not warm_is(cluster, 1, 2, 1), timeout=30, every=0.2)
    assert wait_for(lambda: warm_is(cluster, 1, 2, 1), timeout=120, every=0.5), warm(cluster, 1)
    assert not {p.pid for p in executor_workers(cluster)} & {p.pid for p in victims}
    assert len(loaded(cluster, "v1")) == 2  # a new instance, its @enter run again


def test_a_redeploy_moves_the_warm_containers_and_stop_drops_them(cluster, tmp_path):
    r = cli(cluster, "deploy", write_app(cluster, tmp_path / "b", "v2"))
    assert r.returncode == 0 and "version 2" in r.stdout, r.stderr
    assert "warm:        score 2/2, model 1/1" in r.stdout, r.stdout
    assert wait_for(lambda: warm_is(cluster, 2, 2, 1), timeout=60, every=0.5)
    assert wait_for(lambda: warm(cluster, 1) == {}, timeout=60, every=0.5), warm(cluster, 1)  # v1's dropped
    assert len(loaded(cluster, "v2")) == 1
    # an unchanged deploy keeps version 2 and its warm containers
    r = cli(cluster, "deploy", write_app(cluster, tmp_path / "b", "v2"))
    assert r.returncode == 0 and "version 2 (unchanged)" in r.stdout, r.stdout
    assert warm_is(cluster, 2, 2, 1) and len(loaded(cluster, "v2")) == 1

    r = cli(cluster, "app", "stop", "warmshop")
    assert r.returncode == 0, r.stderr
    assert wait_for(lambda: warm(cluster, 2) == {}, timeout=60, every=0.5), warm(cluster, 2)
    assert wait_for(lambda: status(cluster)["instances"] == 0, timeout=30, every=0.5)
    r = cli(cluster, "app", "rollback", "warmshop", "1")  # back: v3 == v1, warm again
    assert r.returncode == 0 and "version 3 is version 1 again" in r.stdout, r.stderr
    assert wait_for(lambda: warm_is(cluster, 3, 2, 1), timeout=90, every=0.5), warm(cluster, 3)
