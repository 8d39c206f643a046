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
        if {fail}:
            raise RuntimeError("cannot load the {tag} model")
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


def write_app(cluster, d, tag, fail=False):
    d.mkdir(exist_ok=True)
    (d / "warmshop.py").write_text(APP.format(tag=tag, marks=cluster["marks"], fail=fail))
    return str(d / "warmshop.py")


def status(cluster, must=True):
    r = cli(cluster, "status", "--json", timeout=60)
    if not must and r.returncode != 0:  # the broker restarting
        return None
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def warm(cluster, version):
    """name -> the broker's entry, for this app version's functions and classes (None: no broker)."""
    prefix = f"fabric_app_warmshop_v{version}."
    st = status(cluster, must=False)
    if st is None:
        return None
    return {f["name"][len(prefix):]: f for f in st["functions"] if f["name"].startswith(prefix)}


def warm_is(cluster, version, fn, cls):
    w = warm(cluster, version) or {}
    return (w.get("score", {}).get("warm"), w.get("Model", {}).get("warm")) == (fn, cls)


def loaded(cluster, tag):
    return sorted(f for f in os.listdir(cluster["marks"]) if f.startswith(tag + "-"))


def executor_workers(cluster):
    rec = json.load(open(os.path.join(cluster["home"], "cluster.json")))
    execs = [psutil.Process(p) for p in rec["pids"] if psutil.pid_exists(p)
             and "fabric.executor" in " ".join(psutil.Process(p).cmdline())]
    assert execs
    return [c for e in execs for c in e.children()]


def in_a_terminal(cluster, args, columns):
    """What the command prints to a terminal ``columns`` wide (a pty)."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    env = {k: v for k, v in cluster["env"].items() if k not in ("COLUMNS", "LINES")}
    p = subprocess.Popen(FABRIC + args, env=env, stdin=slave, stdout=slave, stderr=slave, cwd=REPO)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    p.wait(60)
    os.close(master)
    return out.decode("utf-8", "replace")


LOOKUP = '''
import fabric, json
fabric.init(address="auto")
h = fabric.lookup("warmshop", "score")
out = h.remote(1).result()
out["hash"] = h._resolve()._blob()[1].hex()[:12]
print(json.dumps(out))
'''


@pytest.mark.timeout(600)  # a real cluster, several deploys, on a shared 2-CPU machine
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
    # fabric status, piped (80 columns), shows them whole: names, hashes and ids, no "…"
    plain = cli(cluster, "status", timeout=60)
    assert plain.returncode == 0 and "…" not in plain.stdout, plain.stdout
    assert "fabric_app_warmshop_v1.score" in plain.stdout and "fabric_app_warmshop_v1.Model" in plain.stdout
    ex = status(cluster)["executors"][0]
    assert ex["id"][:8] in plain.stdout and f"{ex['memory'] >> 20}MiB" in plain.stdout
    listed = cli(cluster, "apps")
    assert "  warm:      score 2/2, model 1/1" in listed.stdout, listed.stdout
    assert json.loads(cli(cluster, "apps", "--json").stdout)[0]["warm"] == {
        "score": {"min_warm": 2, "warm": 2}, "model": {"min_warm": 1, "warm": 1}}
    narrow = in_a_terminal(cluster, ["status"], columns=50)
    assert "…" not in narrow and "fabric cluster" in narrow, narrow
    # @enter ran twice: the deploy's check (an instance started and stopped before the switch)
    # and the warm instance, which stays
    assert len(loaded(cluster, "v1")) == 2
    assert wait_for(lambda: status(cluster)["instances"] == 1, timeout=30, every=0.5)

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
    assert len(loaded(cluster, "v1")) == 3  # a new instance, its @enter run again


@pytest.mark.timeout(900)
def test_a_redeploy_moves_the_warm_containers_and_stop_drops_them(cluster, tmp_path):
    r = cli(cluster, "deploy", write_app(cluster, tmp_path / "b", "v2"))
    assert r.returncode == 0 and "version 2" in r.stdout, r.stderr
    assert "warm:        score 2/2, model 1/1" in r.stdout, r.stdout
    assert wait_for(lambda: warm_is(cluster, 2, 2, 1), timeout=60, every=0.5)
    assert wait_for(lambda: warm(cluster, 1) == {}, timeout=60, every=0.5), warm(cluster, 1)  # v1's dropped
    assert len(loaded(cluster, "v2")) == 2  # the check's and the warm one's
    # an unchanged deploy keeps version 2 and its warm containers
    r = cli(cluster, "deploy", write_app(cluster, tmp_path / "b", "v2"))
    assert r.returncode == 0 and "version 2 (unchanged)" in r.stdout, r.stdout
    assert warm_is(cluster, 2, 2, 1) and len(loaded(cluster, "v2")) == 2

    # a new version whose warm class cannot start: refused before the switch, v2 stays warm
    r = cli(cluster, "deploy", write_app(cluster, tmp_path / "c", "v3", fail=True))
    assert r.returncode == 1, r.stdout
    assert "class 'model' of app 'warmshop' did not start" in r.stderr, r.stderr
    assert "the old version keeps serving" in r.stderr and "cannot load the v3 model" in r.stderr
    assert "Traceback" not in r.stderr
    assert [a["version"] for a in json.loads(cli(cluster, "apps", "--json").stdout)] == [2]
    assert warm_is(cluster, 2, 2, 1) and warm(cluster, 3) == {}

    # a warm class whose __init__ needs arguments cannot be kept warm: refused, clearly
    d = tmp_path / "d"
    d.mkdir()
    (d / "warmshop.py").write_text(APP.format(tag="v4", marks=cluster["marks"], fail=False).replace(
        "    def predict(self, x):", "    def __init__(self, path):\n        self.path = path\n\n    def predict(self, x):"))
    r = cli(cluster, "deploy", str(d / "warmshop.py"))
    assert r.returncode == 1 and "class 'model' of app 'warmshop' has min_warm=1, so its warm instances are made " \
        "with no arguments" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert [a["version"] for a in json.loads(cli(cluster, "apps", "--json").stdout)] == [2]

    # the broker dies and its supervisor restarts it: the keeper registers score again, and makes
    # a new instance (instances do not outlive a broker)
    before = status(cluster)["pid"]
    os.kill(before, signal.SIGKILL)
    assert wait_for(lambda: (status(cluster, must=False) or {}).get("pid", before) != before, timeout=60, every=1)
    assert wait_for(lambda: warm_is(cluster, 2, 2, 1), timeout=120, every=1), warm(cluster, 2)
    # the journal's replay registers v1's old calls again, for their driver (v1's keeper, gone):
    # the broker drops them when that driver's silence ends it
    assert wait_for(lambda: warm(cluster, 1) == {}, timeout=120, every=1), warm(cluster, 1)

    r = cli(cluster, "app", "stop", "warmshop")
    assert r.returncode == 0, r.stderr
    assert wait_for(lambda: warm(cluster, 2) == {}, timeout=60, every=0.5), warm(cluster, 2)
    assert wait_for(lambda: status(cluster)["instances"] == 0, timeout=30, every=0.5)
    r = cli(cluster, "app", "rollback", "warmshop", "1")  # back: v3 == v1, warm again
    assert r.returncode == 0 and "version 3 is version 1 again" in r.stdout, r.stderr
    assert wait_for(lambda: warm_is(cluster, 3, 2, 1), timeout=90, every=0.5), warm(cluster, 3)

    # the reconciler dies: its keeper goes with it (the broker drops v3's warm state); a new
    # reconciler, with nothing but the registry in the store, brings them back
    rec = json.load(open(os.path.join(cluster["home"], "cluster.json")))
    recon = [p for p in rec["pids"] if psutil.pid_exists(p)
             and "fabric.apps.reconciler" in " ".join(psutil.Process(p).cmdline())]
    assert len(recon) == 1
    os.kill(recon[0], signal.SIGKILL)
    assert wait_for(lambda: warm(cluster, 3) == {}, timeout=60, every=0.5), warm(cluster, 3)
    again = subprocess.Popen([sys.executable, "-m", "fabric.apps.reconciler", "--address", cluster["address"],
                              "--interval", "1", "--broker-pid", str(rec["broker_pid"])],
                             env=cluster["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_for(lambda: warm_is(cluster, 3, 2, 1), timeout=120, every=0.5), warm(cluster, 3)
    finally:
        again.terminate()
        out = again.communicate(timeout=60)[0]
    assert "keeping its min_warm containers" in out, out
    assert wait_for(lambda: warm(cluster, 3) == {}, timeout=60, every=0.5)  # a stopped reconciler ends its keepers
