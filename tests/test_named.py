"""Named and detached instances (issue 18): `Cls.options(name=..., namespace=..., lifetime="detached",
get_if_exists=True)`, `fabric.get_instance(name)` from any driver, unique names, a detached
instance outliving its creator, names in `fabric status`. Embedded and `fabric start` clusters."""
import os
import subprocess
import sys
import time

import pytest

import fabric
from conftest import run_script, wait_for
from test_cluster import started  # noqa: F401 - the `fabric start` cluster fixture

FABRIC = [sys.executable, "-m", "fabric.cli"]


@fabric.cls(cpus=0)  # instances hold their CPUs for life: these leave the 2 CPUs to plain calls
class Counter:
    def __init__(self, start=0):
        self.n = start

    def inc(self, k=1):
        self.n += k
        return self.n

    def count_up(self, k):
        for _ in range(k):
            self.n += 1
            yield self.n


def test_a_name_is_unique_and_found_from_another_driver(cluster):
    c = Counter.options(name="shared").remote(5)
    assert c.inc.remote(2).result(timeout=60) == 7
    with pytest.raises(ValueError, match="an instance named 'shared' exists already .of class Counter."):
        Counter.options(name="shared").remote(0)
    same = Counter.options(name="shared", get_if_exists=True).remote(0)  # the existing one, not a new one
    assert same.inc.remote().result(timeout=30) == 8
    other_ns = Counter.options(name="shared", namespace="team-b").remote(100)  # namespaces are apart
    assert other_ns.inc.remote().result(timeout=60) == 101

    @fabric.fn
    def from_inside(name):  # runs on a worker: another driver of the cluster
        h = fabric.get_instance(name)
        return h.inc.remote(10).result(), [f.result() for f in h.count_up.remote(2)]

    assert from_inside.remote("shared").result(timeout=60) == (18, [19, 20])
    h = fabric.get_instance("shared")
    assert h.inc.remote().result(timeout=30) == 21
    assert fabric.get_instance("shared", namespace="team-b").inc.remote().result(timeout=30) == 102
    with pytest.raises(ValueError, match="no instance named 'nope' is alive"):
        fabric.get_instance("nope")
    with pytest.raises(ValueError, match="no instance named 'shared' in namespace 'other'"):
        fabric.get_instance("shared", namespace="other")
    names = {(n["namespace"], n["name"]) for n in fabric.cluster_status()["named"]}
    assert {("default", "shared"), ("team-b", "shared")} <= names

    fabric.kill(h)  # any driver may kill a named instance; its name is free again
    with pytest.raises(fabric.ActorDied):
        c.inc.remote().result(timeout=30)
    again = Counter.options(name="shared").remote(1)
    assert again.inc.remote().result(timeout=60) == 2
    fabric.kill(again)
    fabric.kill(other_ns)


def test_dropping_the_creators_handles_ends_a_named_instance_but_not_a_detached_one(cluster):
    Counter.options(name="owned").remote(0).inc.remote().result(timeout=60)  # the handle is dropped
    assert wait_for(lambda: "owned" not in {n["name"] for n in fabric.cluster_status()["named"]}, timeout=30)
    with pytest.raises(ValueError):
        fabric.get_instance("owned")
    Counter.options(name="kept", lifetime="detached").remote(3).inc.remote().result(timeout=60)
    h = fabric.get_instance("kept")
    assert h.inc.remote().result(timeout=30) == 5  # its state lived on
    fabric.kill(h)


def test_a_handle_found_by_name_keeps_the_classes_call_options(cluster, tmp_path):
    """fabric.get_instance knows the class by its name only: its calls still re-run after a
    restart (max_task_retries), split their values (num_returns) and time out as the creator's."""
    folder = str(tmp_path)

    @fabric.cls(cpus=0, max_restarts=1, max_task_retries=1)
    class Sturdy:
        def die_once(self):
            mark = os.path.join(folder, "died")
            if not os.path.exists(mark):
                open(mark, "w").close()
                os._exit(1)
            return "second run"

        @fabric.method(num_returns=2)
        def pair(self):
            return 1, 2

    owner = Sturdy.options(name="sturdy").remote()  # its creator holds it: a named instance ends with its handles
    h = fabric.get_instance("sturdy")
    a, b = h.pair.remote()
    assert (a.result(timeout=60), b.result(timeout=30)) == (1, 2)
    assert h.die_once.remote().result(timeout=90) == "second run"  # re-run on the new instance

    @fabric.fn
    def from_inside():  # another driver, which got the handle by name from the broker alone
        x, y = fabric.get_instance("sturdy").pair.remote()
        return x.result(timeout=30) + y.result(timeout=30)

    assert from_inside.remote().result(timeout=60) == 3
    fabric.kill(owner)

    @fabric.cls(cpus=0, timeout=1)
    class Slow:
        def nap(self, s):
            time.sleep(s)
            return s

    slow = Slow.options(name="slow").remote()
    with pytest.raises(fabric.TaskTimeout):
        fabric.get_instance("slow").nap.remote(30).result(timeout=60)
    fabric.kill(slow)


def test_bad_names_and_options_are_refused_clearly(cluster):
    for opts, msg in [({"name": 3}, "name must be a string of 1 to 200 characters"),
                      ({"name": ""}, "name must be a string"),
                      ({"name": "x" * 201}, "name must be a string"),
                      ({"name": "x", "namespace": 5}, "namespace must be None or a string"),
                      ({"name": "x", "lifetime": "forever"}, 'lifetime must be None .* or "detached"'),
                      ({"lifetime": "detached"}, "need name="),
                      ({"get_if_exists": True}, "need name=")]:
        with pytest.raises(ValueError, match=msg):
            Counter.options(**opts)
    with pytest.raises(TypeError, match="get_if_exists must be True or False"):
        Counter.options(name="x", get_if_exists="yes")
    with pytest.raises(ValueError, match="name must be a string"):
        fabric.get_instance(None)

    from fabric import api
    from fabric import protocol as P
    from fabric.client import request

    client = api._client()
    aid = (client.id + bytes(8)).hex()
    for body in ({"op": "lookup"}, {"op": "drop", "name": "x"}, {"op": "register", "name": "x", "actor": "00",
                                                                   "driver": "00"}):
        with pytest.raises(fabric.ProtocolError):
            request(client.address, P.NAME, ctx=client.ctx, body=body)
    for calls in ([1], {"returns": 5}, {"returns": {str(i): 2 for i in range(1001)}}):
        with pytest.raises(fabric.ProtocolError, match="NAME calls must be an object of the class's per-call options"):
            request(client.address, P.NAME, ctx=client.ctx, body={"op": "register", "name": "x", "actor": aid,
                                                                  "driver": client.id.hex(), "calls": calls})
    assert Counter.options(name="after").remote(1).inc.remote().result(timeout=60) == 2  # the cluster serves on


DETACHED = """
import fabric
fabric.init(address={address!r})
@fabric.cls
class Keeper:
    def __init__(self, n): self.n = n
    def add(self, k): self.n += k; return self.n
    @fabric.method(num_returns=2)
    def both(self): return self.n, -self.n
k = Keeper.options(name="keeper", lifetime="detached").remote(40)
assert k.add.remote(1).result(timeout=60) == 41
o = Keeper.options(name="owned-by-first").remote(0)
assert o.add.remote(1).result(timeout=60) == 1
Keeper.options(name="created-then-left", lifetime="detached").remote(7)  # not waited for
print("first ok")
"""

SECOND = """
import time, fabric
fabric.init(address={address!r})
k = fabric.get_instance("keeper")
assert k.add.remote(1).result(timeout=60) == 42, "its state outlived its creator"
x, y = k.both.remote()  # the class's per-call options came with the name
assert (x.result(timeout=60), y.result(timeout=60)) == (42, -42)
deadline = time.time() + 60
while True:  # the other driver's own instance ended with it
    try:
        fabric.get_instance("owned-by-first")
    except ValueError:
        break
    assert time.time() < deadline
    time.sleep(0.2)
assert fabric.get_instance("created-then-left").add.remote(1).result(timeout=60) == 8
print("second ok")
"""


def test_a_detached_instance_outlives_its_driver_on_a_started_cluster(started):  # noqa: F811
    addr = started["address"]
    r = run_script(DETACHED.format(address=addr), env=started["env"], timeout=180)
    assert r.returncode == 0, r.stderr
    st = subprocess.run(FABRIC + ["status", "--address", addr], env=started["env"], capture_output=True,
                        text=True, timeout=60)
    assert "named instances" in st.stdout and "keeper" in st.stdout, st.stdout + st.stderr
    r = run_script(SECOND.format(address=addr), env=started["env"], timeout=180)
    assert r.returncode == 0, r.stderr
    assert "second ok" in r.stdout
    code = f"""
import fabric
fabric.init(address={addr!r})
for n in ("keeper", "created-then-left"):
    fabric.kill(fabric.get_instance(n))
"""
    assert run_script(code, env=started["env"], timeout=120).returncode == 0
    assert wait_for(lambda: not started["status"]().get("named"), timeout=30)
