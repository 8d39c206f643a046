"""The autoscaler: its policy, table-driven; the local provider on a real broker (scale from zero
to two executors and back to zero); the AWS provider against moto's standalone server."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

import fabric
from fabric import protocol as P
from fabric.autoscale import Autoscaler, AwsProvider, Instance, Policy, Pool, decision_log_path, \
    format_decisions, last_decisions
from fabric.client import request
from fabric.cluster import LocalCluster
from conftest import REPO, reset_moto, wait_for


# ----------------------------------------------------------------------------------- policy
def ex(eid, busy=0, inst=0, cpus=1, pid=None, kind=None, gpus=()):
    labels = {}
    if pid:
        labels["provider_id"] = pid
    if kind:
        labels["kind"] = kind
    return {"id": eid, "cpus": cpus, "free_cpus": cpus - busy, "gpus": list(gpus), "free_gpus": list(gpus),
            "busy": busy, "workers": max(1, int(cpus)), "instances": inst, "labels": labels, "last_seen_s": 0.1}


def q(depth, cpus=1, gpus=0, memory=0):
    return {"cpus": cpus, "gpus": gpus, "memory": memory, "depth": depth}


def st(executors=(), queues=(), pending=None):
    queued = sum(x["depth"] for x in queues)
    return {"executors": list(executors), "queues": list(queues),
            "calls_pending": queued if pending is None else pending, "instances": 0}


def inst(iid, t=0.0, kind="cpu", state="running"):
    return Instance(iid, kind, t, state)


def summary(decisions):
    return [(d.kind, d.action, d.code, d.count or len(d.ids)) for d in decisions]


CPU = lambda mn=0, mx=2, cpus=1: [Pool("cpu", mn, mx, cpus)]  # noqa: E731

# (name, pools, status, instances, expected [(kind, action, code, n)], reason must contain)
ONE_STEP = [
    ("from zero", CPU(0, 2), st(queues=[q(20)]), [], [("cpu", "launch", "from_zero", 2)], "scale from zero"),
    ("clamped at max", CPU(0, 4), st([ex("a", busy=1, pid="p1")], [q(100)]), [inst("p1")],
     [("cpu", "launch", "scale_up", 3)], "capped at max 4"),
    ("at max holds", CPU(0, 2), st([ex("a", 1, pid="p1"), ex("b", 1, pid="p2")], [q(10)]),
     [inst("p1"), inst("p2")], [("cpu", "hold", "at_max", 0)], "at max 2"),
    ("below min", CPU(2, 4), st(), [], [("cpu", "launch", "below_min", 2)], "below min 2"),
    ("idle capacity takes the queue", CPU(0, 4), st([ex("a", pid="p1"), ex("b", pid="p2")], [q(2)]),
     [inst("p1"), inst("p2")], [], None),
    ("starting instances count", CPU(0, 2), st(queues=[q(20)]), [inst("p1", 99.0), inst("p2", 99.0)],
     [("cpu", "hold", "at_max", 0)], "(+2 starting)"),
    ("starting instances count, below max", CPU(0, 4), st(queues=[q(3)]), [inst("p1", 99.0)],
     [("cpu", "launch", "scale_up", 2)], "(+1 starting)"),
    ("executors of 4 cpus", CPU(0, 8, cpus=4), st(queues=[q(10)]), [], [("cpu", "launch", "from_zero", 3)],
     "10 calls queued"),
    ("half-cpu calls still take a worker", CPU(0, 8), st(queues=[q(5, cpus=0.5)]), [],
     [("cpu", "launch", "from_zero", 5)], None),
    ("shape bigger than an executor", CPU(0, 2), st(queues=[q(3, cpus=4)]), [],
     [("cpu", "hold", "unfit_shape", 0)], "cpus-per-executor"),
    ("calls pending but not queued", CPU(0, 2), st(pending=1), [], [("cpu", "launch", "from_zero", 1)],
     "not queued"),
    ("gpu calls, gpu pool", CPU(0, 2) + [Pool("gpu", 0, 2, 4, 1)], st(queues=[q(1, gpus=1)]), [],
     [("gpu", "launch", "from_zero", 1)], None),
    ("fractional gpu calls share a device", CPU(0, 2) + [Pool("gpu", 0, 4, 4, 1)], st(queues=[q(4, gpus=0.5)]),
     [], [("gpu", "launch", "from_zero", 2)], "4 calls queued"),
    ("a third of a device, 2 devices each", CPU(0, 2) + [Pool("gpu", 0, 4, 8, 2)],
     st(queues=[q(7, gpus=0.3)]), [], [("gpu", "launch", "from_zero", 2)], None),
    ("gpu calls, no gpu pool", CPU(0, 2), st(queues=[q(3, gpus=1)]), [], [("gpu", "hold", "no_pool", 0)],
     "no gpu pool"),
    ("gpu executors are not cpu capacity", CPU(0, 2) + [Pool("gpu", 0, 1, 4, 1)],
     st([ex("g", pid="g1", kind="gpu", gpus=[0])], [q(1)]), [inst("g1", kind="gpu")],
     [("cpu", "launch", "from_zero", 1)], None),
]


@pytest.mark.parametrize("name,pools,status,instances,expected,reason", ONE_STEP, ids=[c[0] for c in ONE_STEP])
def test_policy_one_step(name, pools, status, instances, expected, reason):
    ds = Policy(pools, idle_s=10, join_timeout_s=60).decide(status, 100.0, instances)
    assert summary(ds) == expected, format_decisions(ds)
    if reason:
        assert any(reason in d.reason for d in ds), format_decisions(ds)
    for d in ds:
        assert d.reason and json.dumps(d.to_dict())


def test_policy_keeps_an_idle_executor_at_min_and_says_so():
    p = Policy(CPU(1, 2), idle_s=10)
    idle, insts = st([ex("a", pid="p1")]), [inst("p1")]
    assert p.decide(idle, 0.0, insts) == []
    assert p.decide(idle, 9.9, insts) == []  # not yet past the window: nothing to say
    ds = p.decide(idle, 10.1, insts)
    assert summary(ds) == [("cpu", "hold", "at_min", 0)] and "keeping p1" in ds[0].reason


def test_policy_idle_window_and_scale_to_zero():
    p = Policy(CPU(0, 2), idle_s=10)
    idle = st([ex("a", pid="p1"), ex("b", pid="p2")])
    insts = [inst("p1"), inst("p2")]
    assert p.decide(idle, 0.0, insts) == []
    assert p.decide(idle, 9.9, insts) == []
    ds = p.decide(idle, 10.1, insts)
    assert summary(ds) == [("cpu", "terminate", "to_zero", 2)]
    assert sorted(ds[0].ids) == ["p1", "p2"] and "idle 10.1s" in ds[0].reason
    # terminated executors still listed by the broker (until their BYE) are not counted again
    assert p.decide(idle, 10.6, []) == []


def test_policy_idle_window_restarts_when_busy_and_respects_min():
    p = Policy(CPU(1, 3), idle_s=10)
    insts = [inst("p1"), inst("p2"), inst("p3")]
    assert p.decide(st([ex("a", pid="p1"), ex("b", pid="p2"), ex("c", pid="p3")]), 0.0, insts) == []
    # b and c are busy at t=5; b is seen idle again at t=10.5: its window starts again there
    assert p.decide(st([ex("a", pid="p1"), ex("b", 1, pid="p2"), ex("c", 1, pid="p3")]), 5.0, insts) == []
    ds = p.decide(st([ex("a", pid="p1"), ex("b", pid="p2"), ex("c", 1, pid="p3")]), 10.5, insts)
    assert summary(ds) == [("cpu", "terminate", "idle", 1)] and ds[0].ids == ["p1"]
    insts = insts[1:]
    assert p.decide(st([ex("b", pid="p2"), ex("c", 1, pid="p3")]), 15.0, insts) == []
    assert p.decide(st([ex("b", pid="p2"), ex("c", pid="p3")]), 16.5, insts) == []
    ds = p.decide(st([ex("b", pid="p2"), ex("c", pid="p3")]), 20.6, insts)
    assert summary(ds) == [("cpu", "terminate", "idle", 1)] and ds[0].ids == ["p2"]
    # min 1: the last one stays however long it idles (a hold that says why)
    ds = p.decide(st([ex("c", pid="p3")]), 100.0, [inst("p3")])
    assert summary(ds) == [("cpu", "hold", "at_min", 0)] and "keeping p3" in ds[0].reason


def test_policy_never_terminates_busy_or_unmanaged_executors():
    p = Policy(CPU(0, 4), idle_s=1)
    s = st([ex("a", busy=1, pid="p1"), ex("b", inst=1, pid="p2"), ex("c"), ex("d", pid="p4")])
    insts = [inst("p1"), inst("p2"), inst("p4")]
    p.decide(s, 0.0, insts)
    ds = p.decide(s, 50.0, insts)
    assert summary(ds) == [("cpu", "terminate", "idle", 1)] and ds[0].ids == ["p4"]


def test_policy_replaces_instances_that_never_joined():
    p = Policy(CPU(0, 2), idle_s=100, join_timeout_s=30)
    s = st(queues=[q(5)])
    insts = [inst("p1", 0.0), inst("p2", 25.0)]
    assert summary(p.decide(s, 10.0, insts)) == [("cpu", "hold", "at_max", 0)]
    ds = p.decide(s, 31.0, insts)
    assert summary(ds) == [("cpu", "replace", "never_joined", 1), ("cpu", "hold", "at_max", 0)]
    assert ds[0].ids == ["p1"]
    assert "did not join the broker within 30s" in ds[0].reason
    # no longer needed (queue drained elsewhere): dropped, not replaced
    p = Policy(CPU(0, 2), idle_s=100, join_timeout_s=30)
    ds = p.decide(st(), 31.0, [inst("p1", 0.0)])
    assert summary(ds) == [("cpu", "terminate", "never_joined", 1)]


def test_policy_backs_off_after_launches_die_before_joining():
    p = Policy(CPU(0, 2), idle_s=10)
    s = st(queues=[q(1)])
    assert summary(p.decide(s, 0.0, [])) == [("cpu", "launch", "from_zero", 1)]
    p.decide(s, 0.5, [inst("p1", 0.0)])       # starting
    ds = p.decide(s, 1.0, [])                 # gone without joining
    assert summary(ds) == [("cpu", "hold", "backoff", 0)]
    assert summary(p.decide(s, 2.1, [])) == [("cpu", "launch", "from_zero", 1)]


# ------------------------------------------------------------------------- local provider
def _child_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(x for x in [REPO, env.get("PYTHONPATH", "")] if x)
    return env


def _status(address):
    return request(address, P.STATUS, timeout=3)


def test_local_provider_scales_from_zero_to_two_and_back(tmp_path):
    fabric.shutdown()
    cluster = LocalCluster(log_dir=str(tmp_path)).start(executor=False)
    scaler = subprocess.Popen(
        [sys.executable, "-m", "fabric.autoscale", "--broker", cluster.address, "--provider", "local",
         "--min", "0", "--max", "2", "--cpus-per-executor", "1", "--idle", "2", "--interval", "0.2",
         "--log-dir", str(tmp_path)], env=_child_env(), cwd=REPO, stdin=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: _status(cluster.address) is not None, timeout=10)
        assert _status(cluster.address)["executors"] == []
        fabric.init(address=cluster.address)

        @fabric.fn
        def work(i):
            time.sleep(0.5)
            return os.getppid()  # the executor daemon that started this worker

        parents = fabric.get([work.remote(i) for i in range(20)], timeout=45)
        assert len(set(parents)) == 2, parents  # it scaled out: two executors ran them (no timing asserted)
        # after the idle window (2 s), back to zero executors
        assert wait_for(lambda: _status(cluster.address)["executors"] == [], timeout=15, every=0.2)
        log_file = decision_log_path(str(tmp_path))
        decisions = last_decisions(log_file, 50)
        text = format_decisions(decisions)
        launches = [d for d in decisions if d["action"] == "launch"]
        assert launches[0]["code"] == "from_zero" and launches[0]["count"] == 2, text
        assert "scale from zero" in launches[0]["reason"] and "calls queued" in launches[0]["reason"], text
        assert sum(d["count"] for d in launches) == 2, text  # no relaunch while they started
        downs = [d for d in decisions if d["action"] == "terminate"]
        assert downs and downs[-1]["code"] == "to_zero", text
        assert all("idle" in d["reason"] for d in downs), text
        assert sum(len(d["ids"]) for d in downs) == 2, text
        assert last_decisions(str(tmp_path), 1) == decisions[-1:]  # a log folder works too
    finally:
        fabric.shutdown()
        scaler.terminate()
        try:
            scaler.wait(10)
        except subprocess.TimeoutExpired:
            scaler.kill()
        cluster.stop()
    assert scaler.returncode == 0


def test_local_gpu_pool_scales_from_zero_with_fake_devices(tmp_path):
    """GPU demand starts a gpu executor (devices from --gpu-devices, no real GPU needed), not a cpu one."""
    fabric.shutdown()
    cluster = LocalCluster(log_dir=str(tmp_path)).start(executor=False)
    cluster.start_autoscaler(0, 2, idle=1, extra_args=["--interval", "0.2", "--gpu-max", "1", "--gpu-devices", "0,1",
                                                       "--gpus-per-executor", "2", "--gpu-cpus-per-executor", "2"])
    try:
        assert wait_for(lambda: _status(cluster.address) is not None, timeout=10)
        fabric.init(address=cluster.address)

        @fabric.fn(gpus=1)
        def device():
            time.sleep(0.2)
            return os.environ.get("CUDA_VISIBLE_DEVICES")

        seen = fabric.get([device.remote() for _ in range(4)], timeout=30)
        assert set(seen) <= {"0", "1"}, seen
        exs = _status(cluster.address)["executors"]
        assert [(e["labels"]["kind"], e["gpus"]) for e in exs] == [("gpu", [0, 1])]
        assert wait_for(lambda: _status(cluster.address)["executors"] == [], timeout=10, every=0.2)
        decisions = last_decisions(str(tmp_path), 20)
        launches = [(d["kind"], d["code"], d["count"]) for d in decisions if d["action"] == "launch"]
        assert launches == [("gpu", "from_zero", 1)], format_decisions(decisions)
    finally:
        fabric.shutdown()
        cluster.stop()


def test_instances_waiting_for_a_place_scale_the_cluster_out(tmp_path):
    """An instance holds its CPUs for life: instances beyond the executors' CPUs are demand
    (STATUS counts them in its queues), so the autoscaler adds executors for them."""
    fabric.shutdown()
    cluster = LocalCluster(log_dir=str(tmp_path)).start(executor=False)
    cluster.start_autoscaler(1, 3, idle=30, extra_args=["--interval", "0.2"])
    try:
        assert wait_for(lambda: len((_status(cluster.address) or {}).get("executors", [])) == 1, timeout=20)
        fabric.init(address=cluster.address)

        @fabric.cls(cpus=1)
        class Holder:
            def where(self):
                return os.getppid()  # its executor daemon

        hs = [Holder.remote() for _ in range(3)]
        assert len({h.where.remote().result(timeout=60) for h in hs}) == 3  # one executor each
        launches = [d for d in last_decisions(str(tmp_path), 50) if d["action"] == "launch" and d["code"] != "below_min"]
        assert sum(d["count"] for d in launches) == 2, format_decisions(last_decisions(str(tmp_path), 50))
    finally:
        fabric.shutdown()
        cluster.stop()


def test_fabric_start_autoscale_starts_min_and_stops_clean(tmp_path, monkeypatch):
    from conftest import free_port

    env = dict(_child_env(), FABRIC_HOME=str(tmp_path))
    fab = [sys.executable, "-m", "fabric.cli"]
    bad = subprocess.run(fab + ["start", "--autoscale", "3:1"], env=env, capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0 and "MIN:MAX" in bad.stderr
    assert os.listdir(tmp_path) == []  # refused before it wrote anything (it used to make the default keys)
    bad = subprocess.run(fab + ["start", "--memory", "lots"], env=env, capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0 and "memory must be a size" in bad.stderr and os.listdir(tmp_path) == [], bad.stderr
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    monkeypatch.setenv("FABRIC_KEYS", str(tmp_path / "keys"))  # that data folder's keys, for _status here
    r = subprocess.run(fab + ["start", "--port", str(port), "--autoscale", "1:2", "--idle", "1", "--detach"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    try:
        assert wait_for(lambda: len(_status(address)["executors"]) == 1, timeout=20)
        ex = _status(address)["executors"][0]
        assert ex["labels"]["provider_id"].startswith("local-") and ex["cpus"] == 1
        rec = json.load(open(os.path.join(str(tmp_path), "cluster.json")))
        # idle longer than the window: min 1 keeps it. The autoscaler says so when it decides
        # it (an event, not a sleep), and the executor is still there after that decision
        assert wait_for(lambda: [d["code"] for d in last_decisions(rec["log_dir"])] == ["below_min", "at_min"],
                        timeout=60), last_decisions(rec["log_dir"])
        assert [e["id"] for e in _status(address)["executors"]] == [ex["id"]]
    finally:
        stop = subprocess.run(fab + ["stop"], env=env, capture_output=True, text=True, timeout=60)
    assert stop.returncode == 0, stop.stderr
    # the autoscaler noticed its broker was gone and stopped itself (its log says so), rather
    # than being killed at `fabric stop`'s deadline: an event, not a wall-clock bound
    log = os.path.join(rec["log_dir"], "autoscaler.log")
    assert wait_for(lambda: "has not answered" in open(log).read() and "stopping" in open(log).read(),
                    timeout=30), open(log).read()[-2000:]
    import psutil

    def ours():  # broker, autoscaler and the executors it started: all name the address
        out = []
        for p in psutil.process_iter(["cmdline", "status"]):
            if p.info["status"] != psutil.STATUS_ZOMBIE and address in " ".join(p.info["cmdline"] or []):
                out.append(p.pid)
        return out

    assert wait_for(lambda: not ours(), timeout=5), ours()


def test_scale_from_zero_after_a_long_time_at_zero(tmp_path, monkeypatch):
    monkeypatch.setenv("FABRIC_NO_EXECUTOR_GRACE", "3")
    fabric.shutdown()
    cluster = LocalCluster(log_dir=str(tmp_path)).start(executor=False)
    scaler = cluster.start_autoscaler(0, 1, idle=1, extra_args=["--interval", "0.2"])
    try:
        assert wait_for(lambda: _status(cluster.address) is not None, timeout=10)
        time.sleep(4)  # at zero for longer than the grace
        fabric.init(address=cluster.address)

        @fabric.fn
        def one():
            return 1

        assert one.remote().result(timeout=20) == 1
    finally:
        fabric.shutdown()
        cluster.stop()
    assert scaler.returncode is not None


# --------------------------------------------------------------------------- AWS via moto
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_CONFIG_FILE": os.devnull, "AWS_EC2_METADATA_DISABLED": "true",
}


@pytest.fixture(scope="module")
def moto_endpoint(moto_server):
    """The session's moto server, emptied first (the tests count instances and groups)."""
    pytest.importorskip("boto3")
    reset_moto(moto_server)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in AWS_ENV.items():
            mp.setenv(k, v)
        for k in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
            mp.delenv(k, raising=False)
        yield moto_server


def _group(endpoint, name, min_size=0, max_size=4):
    import boto3

    ec2 = boto3.client("ec2", endpoint_url=endpoint, region_name="us-east-1")
    asg = boto3.client("autoscaling", endpoint_url=endpoint, region_name="us-east-1")
    ami = ec2.describe_images()["Images"][0]["ImageId"]
    ec2.create_launch_template(LaunchTemplateName=name, LaunchTemplateData={"ImageId": ami, "InstanceType": "t3.small"})
    asg.create_auto_scaling_group(AutoScalingGroupName=name, LaunchTemplate={"LaunchTemplateName": name},
                                  MinSize=min_size, MaxSize=max_size, DesiredCapacity=0,
                                  AvailabilityZones=["us-east-1a"], NewInstancesProtectedFromScaleIn=True)
    return asg


def _desired(asg, name):
    return asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"][0]["DesiredCapacity"]


def test_aws_provider_interface(moto_endpoint):
    asg = _group(moto_endpoint, "fabric-iface", max_size=3)
    pr = AwsProvider({"cpu": "fabric-iface"}, region="us-east-1", endpoint_url=moto_endpoint)
    assert pr.list() == []
    ids = pr.launch(2, "cpu")
    assert len(ids) == 2 and sorted(pr.list()) == sorted(ids) and _desired(asg, "fabric-iface") == 2
    assert pr.launch(5, "cpu") and _desired(asg, "fabric-iface") == 3        # capped at the group's MaxSize
    assert pr.launch(1, "cpu") == []
    pr.replace([ids[0]])
    assert _desired(asg, "fabric-iface") == 3 and ids[0] not in pr.list() and len(pr.list()) == 3
    pr.terminate(pr.list())
    assert _desired(asg, "fabric-iface") == 0 and pr.list() == []
    with pytest.raises(ValueError):
        pr.launch(1, "gpu")


def test_aws_provider_scales_group_and_replaces_never_joined(moto_endpoint, tmp_path):
    name = "fabric-cpu"
    asg = _group(moto_endpoint, name)
    provider = AwsProvider({"cpu": name}, region="us-east-1", endpoint_url=moto_endpoint)
    fabric.shutdown()
    cluster = LocalCluster(log_dir=str(tmp_path)).start(executor=False)
    log_file = decision_log_path(str(tmp_path))
    scaler = Autoscaler(cluster.address, provider, Policy([Pool("cpu", 0, 3, 1)], idle_s=1.0, join_timeout_s=1.0),
                        log_file=log_file)
    try:
        assert wait_for(lambda: _status(cluster.address) is not None, timeout=10)
        fabric.init(address=cluster.address)

        @fabric.fn
        def nap(i):
            time.sleep(0.3)
            return i

        futs = [nap.remote(i) for i in range(2)]
        assert wait_for(lambda: sum(x["depth"] for x in _status(cluster.address)["queues"]) == 2, timeout=10)
        ds = scaler.step()
        assert summary(ds) == [("cpu", "launch", "from_zero", 2)], format_decisions(ds)
        assert _desired(asg, name) == 2
        first = set(provider.list())
        assert len(first) == 2 and first == set(ds[0].ids)
        assert summary(scaler.step()) == [] and _desired(asg, name) == 2   # starting instances count

        time.sleep(1.1)                                                    # the join timeout passes
        ds = scaler.step()
        assert summary(ds) == [("cpu", "replace", "never_joined", 2)], format_decisions(ds)
        assert _desired(asg, name) == 2
        second = set(provider.list())
        assert len(second) == 2 and not (first & second)

        # one instance "boots": an executor that says it is that instance joins the broker
        joined = sorted(second)[0]
        cluster.add_executor(cpus=1, labels={"provider_id": joined, "kind": "cpu"})
        assert fabric.get(futs, timeout=30) == [0, 1]

        def drained():
            scaler.step()
            return _desired(asg, name) == 0

        assert wait_for(drained, timeout=15, every=0.3)
        assert provider.list() == []
        decisions = last_decisions(log_file, 50)
        text = format_decisions(decisions)
        terminated = [d for d in decisions if d["action"] == "terminate"]
        assert any(joined in d["ids"] and "idle" in d["reason"] for d in terminated), text
        assert any(d["code"] == "never_joined" for d in decisions if d["action"] == "replace"), text
    finally:
        fabric.shutdown()
        scaler.close()
        cluster.stop()


def test_scale_from_zero_load_test_small_burst(tmp_path):
    """loadtests/scale_from_zero.py at CI size: a burst against zero executors reaches full
    parallelism on every executor allowed, then the cluster goes back to zero."""
    out = tmp_path / "fig.json"
    r = subprocess.run([sys.executable, os.path.join(REPO, "loadtests", "scale_from_zero.py"), "--n", "24",
                        "--duration", "0.5", "--max", "3", "--idle", "2", "--json", str(out)],
                       capture_output=True, text=True, timeout=240, cwd=REPO, env=_child_env())
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    fig = json.loads(out.read_text())
    assert fig["executors_used"] == 3 and fig["peak_running"] == 3
    assert fig["full_parallelism_s"] is not None
    assert fig["back_to_zero_after_last_result_s"] is not None
