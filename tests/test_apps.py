"""Apps on a `fabric start` cluster: fabric deploy, lookup by name, versions, rollback, stop,
a redeploy under load with no failed call, and the registry surviving a broker restart."""
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from conftest import REPO, free_port, wait_for

FABRIC = [sys.executable, "-m", "fabric.cli"]

SHOP = '''
import fabric
from helpers_{tag} import discount

app = fabric.App("shop")

@app.fn(cpus=1)
def score(order):
    return {{"version": "{tag}", "total": discount(order["total"])}}

@app.cls()
class Cart:
    def __init__(self, owner):
        self.owner, self.items = owner, []
    def add(self, item):
        self.items.append(item)
        return len(self.items)

if __name__ == "__main__":
    print(score.remote({{"total": 10}}).result())
'''
HELPERS = "def discount(x):\n    return x * {factor}\n"


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    home = str(tmp_path_factory.mktemp("home"))
    env = dict(os.environ, FABRIC_HOME=home)
    env.pop("FABRIC_ADDRESS", None)
    port = free_port()
    r = subprocess.run(FABRIC + ["start", "--port", str(port), "--cpus", "2", "--detach"], env=env,
                       capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr
    yield {"env": env, "address": f"tcp://127.0.0.1:{port}", "home": home}
    subprocess.run(FABRIC + ["stop"], env=env, capture_output=True, timeout=60)


def fabric_cli(started, *args, timeout=180):
    return subprocess.run(FABRIC + list(args), env=started["env"], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def write_app(d, tag, factor):
    d.mkdir(exist_ok=True)
    (d / "shop.py").write_text(SHOP.format(tag=tag))
    for old in d.glob("helpers_*.py"):
        old.unlink()
    (d / f"helpers_{tag}.py").write_text(HELPERS.format(factor=factor))
    return str(d / "shop.py")


def client(started, code, timeout=120):
    """A separate driver of the cluster, as another user program would be."""
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=started["env"], capture_output=True,
                       text=True, timeout=timeout, cwd="/")
    assert r.returncode == 0, r.stderr
    return r.stdout


LOOKUP = '''
import fabric, json
fabric.init(address="auto")
h = fabric.lookup("shop", "score")
print(json.dumps(h.remote({"total": 10}).result()))
'''


@pytest.mark.timeout(600)  # several CLI runs and clients on a shared machine
def test_deploy_lookup_redeploy_history_rollback_and_stop(started, tmp_path):
    app_dir = tmp_path / "app"
    path = write_app(app_dir, "v1", 2)
    r = fabric_cli(started, "deploy", path)
    assert r.returncode == 0, r.stderr
    # what was deployed, and how long it took
    assert re.search(r"^deployed app shop version 1 in \d+\.\ds$", r.stdout, re.M), r.stdout
    assert "functions:   score\n" in r.stdout and "classes:     cart\n" in r.stdout
    # a client that has none of the app's files (run from /) finds it by name, local module included
    assert json.loads(client(started, LOOKUP)) == {"version": "v1", "total": 20}
    cart = client(started, '''
        import fabric
        fabric.init(address="auto")
        c = fabric.lookup("shop", "Cart".lower()).remote("ann")
        print(c.add.remote("pen").result(), c.add.remote("ink").result())
    ''')
    assert cart.split() == ["1", "2"]

    r = fabric_cli(started, "deploy", path)  # nothing changed: the same version
    assert r.returncode == 0 and "version 1 (unchanged)" in r.stdout

    path = write_app(app_dir, "v2", 3)
    r = fabric_cli(started, "deploy", path)
    assert r.returncode == 0 and "version 2" in r.stdout, r.stderr
    assert json.loads(client(started, LOOKUP)) == {"version": "v2", "total": 30}
    pinned = client(started, '''
        import fabric, json
        fabric.init(address="auto")
        print(json.dumps(fabric.lookup("shop", "score", version=1).remote({"total": 1}).result()))
    ''')
    assert json.loads(pinned) == {"version": "v1", "total": 2}

    r = fabric_cli(started, "app", "rollback", "shop", "1")
    assert r.returncode == 0 and "version 3 is version 1 again" in r.stdout, r.stderr
    assert json.loads(client(started, LOOKUP))["version"] == "v1"
    hist = fabric_cli(started, "app", "history", "shop").stdout.splitlines()
    assert [h.split()[0] for h in hist] == ["1", "2", "3"] and "rollback to 1" in hist[2] and "current" in hist[2]

    listed = json.loads(fabric_cli(started, "apps", "--json").stdout)
    assert [(a["name"], a["version"], a["functions"], a["classes"]) for a in listed] == \
        [("shop", 3, ["score"], ["cart"])]
    plain = fabric_cli(started, "apps").stdout  # piped: whole values, no ellipsis
    assert "shop  version 3" in plain and "…" not in plain

    r = fabric_cli(started, "app", "stop", "shop")
    assert r.returncode == 0
    out = subprocess.run([sys.executable, "-c", LOOKUP], env=started["env"], capture_output=True, text=True,
                         timeout=120, cwd="/")
    assert out.returncode != 0 and "app 'shop' is stopped" in out.stderr
    assert fabric_cli(started, "app", "rollback", "shop", "3").returncode == 0  # back again
    assert json.loads(client(started, LOOKUP))["version"] == "v1"
    r = fabric_cli(started, "app", "rollback", "shop")  # no version: the one before the current
    assert r.returncode == 0 and "version 5 is version 3 again" in r.stdout, r.stderr


@pytest.mark.timeout(600)  # several CLI runs and clients on a shared machine
def test_bad_deploys_and_lookups_are_refused_clearly_and_the_app_keeps_serving(started, tmp_path):
    path = write_app(tmp_path / "good", "v1", 2)
    assert fabric_cli(started, "deploy", path).returncode == 0
    before = client(started, LOOKUP)

    cases = {
        "noapp.py": ("import fabric\n@fabric.fn\ndef f(): return 1\n", "defines no fabric.App"),
        "twice.py": ("import fabric\na = fabric.App('dup')\nb = fabric.App('dup')\n", "two apps named 'dup'"),
        "badname.py": ("import fabric\napp = fabric.App('Shop/1')\n", "cannot be used in a route"),
        "broken.py": ("import fabric\napp = fabric.App('shop')\nraise RuntimeError('boom at import')\n",
                      "broken.py failed, so nothing was deployed: RuntimeError: boom at import"),
        "missingdep.py": ("import fabric\napp = fabric.App('shop')\n"
                          "if not __import__('os').environ.get('FABRIC_APP_CHECK') is None:\n"
                          "    import a_module_the_cluster_lacks\n"
                          "@app.fn\ndef score(o): return 'never'\n",
                          "does not import on the cluster"),
    }
    for name, (code, msg) in cases.items():
        p = tmp_path / name
        p.write_text(code)
        r = fabric_cli(started, "deploy", str(p))
        assert r.returncode == 1 and msg in r.stderr, (name, r.stderr)
        assert "Traceback" not in r.stderr
    r = fabric_cli(started, "deploy", str(tmp_path / "nope.py"))
    assert r.returncode != 0 and "nope.py" in r.stderr
    assert client(started, LOOKUP) == before  # the old version kept serving through all of it

    r = fabric_cli(started, "app", "rollback", "shop", "999")
    assert r.returncode == 1 and "has no version 999" in r.stderr and "its versions:" in r.stderr
    r = fabric_cli(started, "app", "history", "nosuchapp")
    assert r.returncode == 1 and "no app named 'nosuchapp'" in r.stderr and "shop" in r.stderr
    out = subprocess.run([sys.executable, "-c", '''
import fabric
fabric.init(address="auto")
try:
    fabric.lookup("shop", "nosuch")
except fabric.FabricError as e:
    print("ERR", e)
try:
    fabric.lookup("nosuchapp", "x")
except fabric.FabricError as e:
    print("ERR", e)
try:
    fabric.lookup("shop", "score", version=999)
except fabric.FabricError as e:
    print("ERR", e)
try:
    fabric.lookup("shop", "score", version="1")
except ValueError as e:
    print("ERR", e)
'''], env=started["env"], capture_output=True, text=True, timeout=120, cwd="/")
    assert "has no function or class named 'nosuch'; it has: cart, score" in out.stdout, out.stderr
    assert "no app named 'nosuchapp' is deployed on this cluster (apps: shop)" in out.stdout
    assert re.search(r"app 'shop' has no version 999; its versions: 1, 2, 3(, \d+)*$", out.stdout, re.M), out.stdout
    assert "version must be a whole number >= 1, got '1'" in out.stdout


def test_the_app_file_runs_locally_on_the_embedded_cluster(tmp_path):
    path = write_app(tmp_path / "local", "v1", 2)
    r = subprocess.run([sys.executable, path], env=dict(os.environ, FABRIC_HOME=str(tmp_path / "h")),
                       capture_output=True, text=True, timeout=120, cwd=str(tmp_path / "local"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "{'version': 'v1', 'total': 20}"


def test_deploy_with_name_deploys_under_that_name(started, tmp_path):
    path = write_app(tmp_path / "named", "v1", 2)
    r = fabric_cli(started, "deploy", path, "--name", "shop-copy")
    assert r.returncode == 0 and "deployed app shop-copy version 1" in r.stdout, r.stderr
    out = client(started, '''
        import fabric, json
        fabric.init(address="auto")
        print(json.dumps(fabric.lookup("shop-copy", "score").remote({"total": 10}).result()))
    ''')
    assert json.loads(out) == {"version": "v1", "total": 20}
    r = fabric_cli(started, "deploy", path, "--name", "Shop Copy")
    assert r.returncode == 1 and "cannot be used in a route" in r.stderr and "Traceback" not in r.stderr
    assert fabric_cli(started, "app", "stop", "shop-copy").returncode == 0


def test_deploy_to_an_address_where_no_cluster_listens(tmp_path):
    path = write_app(tmp_path / "a", "v1", 2)
    r = subprocess.run(FABRIC + ["deploy", path, "--address", f"tcp://127.0.0.1:{free_port()}"],
                       env=dict(os.environ, FABRIC_HOME=str(tmp_path / "h"), FABRIC_CONNECT_TIMEOUT="3"),
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 1 and "no fabric cluster answers at tcp://127.0.0.1:" in r.stderr, r.stderr


@pytest.mark.timeout(600)  # several CLI runs and clients on a shared machine
def test_a_redeploy_under_steady_load_fails_no_call(started, tmp_path):
    path = write_app(tmp_path / "load", "v1", 2)
    assert fabric_cli(started, "deploy", path).returncode == 0
    load = subprocess.Popen([sys.executable, "-c", textwrap.dedent('''
        import fabric, json, sys, time
        fabric.init(address="auto")
        h = fabric.lookup("shop", "score")
        seen, failed, n = [], 0, 0
        print("READY", flush=True)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                v = h.remote({"total": 1}).result(timeout=60)["version"]
                seen.append(v)
            except Exception as e:
                failed += 1
                print("FAILED", repr(e), file=sys.stderr, flush=True)
            n += 1
            if seen and seen[-1] == "v2" and seen[-20:].count("v2") == 20:
                break
        print(json.dumps({"n": n, "failed": failed, "seen": seen}))
    ''')], env=started["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
    assert load.stdout.readline().strip() == "READY"
    path = write_app(tmp_path / "load", "v2", 3)
    assert fabric_cli(started, "deploy", path).returncode == 0
    out, err = load.communicate(timeout=600)
    res = json.loads(out.strip().splitlines()[-1])
    assert res["failed"] == 0, err
    first_v2 = res["seen"].index("v2")
    assert "v1" not in res["seen"][first_v2:]  # after the switch every call is served by the new version


def test_the_registry_survives_a_broker_restart(started):
    rec = json.load(open(os.path.join(started["home"], "cluster.json")))
    st = json.loads(fabric_cli(started, "status", "--json").stdout)
    os.kill(st["pid"], signal.SIGKILL)  # the supervisor restarts the broker from its journal
    assert wait_for(lambda: (lambda r: r.returncode == 0 and json.loads(r.stdout)["pid"] != st["pid"])(
        fabric_cli(started, "status", "--json", timeout=30)), timeout=60)
    assert rec["address"] == started["address"]
    listed = json.loads(fabric_cli(started, "apps", "--json").stdout)
    assert "shop" in [a["name"] for a in listed]
    assert json.loads(client(started, LOOKUP))["version"] in ("v1", "v2")


LOGSHOP = '''
import fabric
app = fabric.App("logshop")

@app.fn
def score(x):
    print("scoring", x, flush=True)
    return x

@app.fn(cache=True)
def prepare(x):
    print("preparing", x, flush=True)
    return x

@app.cls()
class Cart:
    def add(self, item):
        print("adding", item, flush=True)
        return 1
'''


@pytest.mark.timeout(600)  # several CLI runs and clients on a shared machine
def test_logs_show_the_apps_output_with_function_and_worker_and_follow(started, tmp_path):
    (tmp_path / "logshop.py").write_text(LOGSHOP)
    assert fabric_cli(started, "deploy", str(tmp_path / "logshop.py")).returncode == 0
    client(started, '''
        import fabric
        fabric.init(address="auto")
        fabric.lookup("logshop", "score").remote("first-token").result()
        fabric.lookup("logshop", "prepare").remote("cached-token").result()
        c = fabric.lookup("logshop", "cart").remote()
        c.add.remote("pen-token").result()
    ''')


    def got():
        return fabric_cli(started, "logs", "logshop").stdout.splitlines()

    assert wait_for(lambda: len(got()) >= 3, timeout=30)
    lines = got()
    assert any(re.fullmatch(r"\(score pid=\d+\) scoring first-token", ln) for ln in lines), lines
    assert any(re.fullmatch(r"\(prepare pid=\d+\) preparing cached-token", ln) for ln in lines), lines
    assert any(re.fullmatch(r"\(Cart\.add pid=\d+\) adding pen-token", ln) for ln in lines), lines
    r = fabric_cli(started, "logs", "nosuchapp")
    assert r.returncode == 1 and "no app named 'nosuchapp'" in r.stderr

    follow = subprocess.Popen(FABRIC + ["logs", "logshop", "-f"], env=started["env"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        client(started, '''
            import fabric
            fabric.init(address="auto")
            fabric.lookup("logshop", "score").remote("later-token").result()
        ''')
        deadline = time.monotonic() + 60
        seen = []
        while time.monotonic() < deadline:
            line = follow.stdout.readline()
            seen.append(line)
            if "later-token" in line:
                break
        assert re.fullmatch(r"\(score pid=\d+\) scoring later-token\n", seen[-1]), seen
        assert follow.poll() is None  # -f keeps following
    finally:
        follow.kill()
        follow.wait(10)


def test_min_warm_without_a_reconciler_says_so(started, tmp_path):
    (tmp_path / "warmless.py").write_text("import fabric\napp = fabric.App('warmless')\n\n"
                                         "@app.fn(min_warm=1)\ndef f(x):\n    return x\n")
    r = fabric_cli(started, "deploy", str(tmp_path / "warmless.py"))  # `fabric start` without --serve
    assert r.returncode == 0, r.stderr
    assert "warm:        no reconciler runs on this cluster" in r.stdout, r.stdout
    out = client(started, '''
        import fabric
        fabric.init(address="auto")
        print(fabric.lookup("warmless", "f").remote(41).result() + 1)
    ''')
    assert out.strip() == "42"  # it still runs: warm containers are an optimisation
