"""A `fabric start` cluster joined by a second `fabric executor`, driven by user scripts; and
hostile frames thrown at the broker's socket by a raw ZeroMQ client."""
import json
import glob
import os
import subprocess
import sys
import time

import psutil
import pytest
import zmq

import fabric
from fabric import protocol as P
from conftest import REPO, free_port, run_script, wait_for

FABRIC = [sys.executable, "-m", "fabric.cli"]


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    """`fabric start --detach` on a free port plus a second `fabric executor` process."""
    home = str(tmp_path_factory.mktemp("home"))
    env = dict(os.environ, FABRIC_HOME=home)
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    r = subprocess.run(FABRIC + ["start", "--port", str(port), "--cpus", "2", "--detach"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert address in r.stdout
    second = subprocess.Popen(FABRIC + ["executor", "--broker", address, "--cpus", "1", "--label", "zone=b"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    status = lambda: json.loads(subprocess.run(FABRIC + ["status", "--json"], env=env, capture_output=True,  # noqa: E731
                                               text=True, timeout=30).stdout or "{}")
    # (slow on a loaded machine: each executor starts its own interpreter and workers)
    assert wait_for(lambda: len(status().get("executors", [])) == 2, timeout=120)
    rec = json.load(open(os.path.join(home, "cluster.json")))
    yield {"address": address, "env": env, "status": status, "second": second, "pids": rec["pids"]}
    second.terminate()
    second.wait(10)
    subprocess.run(FABRIC + ["stop"], env=env, capture_output=True, timeout=60)


def test_idle_workers_of_a_started_cluster_map_a_local_drivers_arena(started):
    """ARENA / MAP_ARENA over tcp:// to a `fabric start` cluster on this host: each of its 3
    pool workers (2 executors) maps the driver's arena while idle (test_api.py has the rest)."""
    from test_api import check_arena_mapped_ahead

    check_arena_mapped_ahead({**started["env"], "FABRIC_ADDRESS": started["address"]}, workers=3)


def test_contract_script_on_embedded_and_started_clusters(started):
    demo = open(os.path.join(REPO, "functions", "contract_demo.py")).read()
    embedded = run_script(demo, timeout=120)
    assert embedded.returncode == 0, embedded.stderr
    assert "contract ok" in embedded.stdout
    remote = run_script(demo, env={**started["env"], "FABRIC_ADDRESS": started["address"]}, timeout=120)
    assert remote.returncode == 0, remote.stderr
    assert "contract ok" in remote.stdout


def test_calls_spread_over_both_executors(started):
    code = """
import os, time, fabric
fabric.init(address=%r)
@fabric.fn
def where(t):
    time.sleep(t)
    return os.getppid()
print(len(set(fabric.get([where.remote(0.5) for _ in range(6)]))))
""" % started["address"]
    r = run_script(code, env=started["env"], timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "2"  # two executor daemons' workers ran them


def test_status_table_and_json(started):
    st = started["status"]()
    assert sorted(e["cpus"] for e in st["executors"]) == [1, 2]
    assert any(e["labels"] == {"zone": "b"} for e in st["executors"])
    r = subprocess.run(FABRIC + ["status"], env={**started["env"], "COLUMNS": "250"}, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0 and "executors" in r.stdout and "queues" in r.stdout
    host = st["executors"][0]["host"]
    assert f"executors: {host} 2 cpu" in r.stdout  # per host and kind
    assert "zone=b" in r.stdout


def test_many_calls_on_two_executors(started):
    code = """
import fabric
fabric.init(address=%r)
@fabric.fn
def one():
    return 1
print(sum(fabric.get([one.remote() for _ in range(50)])))
""" % started["address"]
    r = run_script(code, env=started["env"], timeout=60)
    assert r.stdout.strip() == "50", r.stderr


GARBAGE = [
    [b"hello"],
    [b"FB"],
    [b"FB\x09\x02"],                         # another protocol version
    [P.SIG + b"\xff"],                       # unknown command
    [P.C[P.SUBMIT] + b"short header", b"p"],
    [P.C[P.SUBMIT] + b"x" * P.CALL_HDR.size, b"p"],           # before HELLO
    [P.C[P.DONE] + b"x" * P.RESULT_HDR.size, b"p"],           # a driver pretending to be a worker
    [P.C[P.STATUS] + b"trailing bytes"],
    [P.C[P.BATCH], P.C[P.HELLO], b"{}"],                      # not batchable
    [P.C[P.BATCH], P.C[P.SUBMIT] + P.pack_call(bytes(16), bytes(16), 0, bytes(16), 1, 0, 0, 0, 0, 3)],  # cut short
    [P.C[P.HELLO], b"{not json"],
    [P.C[P.RELEASE], b"abc"],                # not a multiple of 16
    [P.C[P.EXEC_HELLO], b'{"cpus": "many"}'],
    [],
]


def test_garbage_frames_are_refused_logged_and_the_broker_keeps_serving(started, monkeypatch):
    from fabric import security

    # the cluster's owner's keys (its data folder's): the garbage has to get past the handshake
    monkeypatch.setenv("FABRIC_KEYS", os.path.join(started["env"]["FABRIC_HOME"], "keys"))
    refused_before = started["status"]()["stats"]["refused"]  # (the cluster is shared by the module)
    ctx = zmq.Context()
    try:
        socks = []
        for prefix in (b"d", b"e", b"w", b"x", b"c"):
            s = ctx.socket(zmq.DEALER)
            security.curve_client(s, address=started["address"])
            s.setsockopt(zmq.ROUTING_ID, prefix + os.urandom(8))
            s.setsockopt(zmq.LINGER, 0)
            s.connect(started["address"])
            socks.append(s)
        for s in socks:
            for msg in GARBAGE:
                if msg:
                    s.send_multipart(msg)
        # a driver that said HELLO, then sends a SUBMIT whose frames do not match its header
        d, r = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
        did = os.urandom(8)
        for s, ident in ((d, b"d" + did), (r, b"r" + did)):
            security.curve_client(s, address=started["address"])
            s.setsockopt(zmq.ROUTING_ID, ident)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(started["address"])
            s.send_multipart([P.C[P.HELLO], b"{}"])
            assert s.poll(10000)
            s.recv_multipart()
        hdr = P.pack_call(did + bytes(8), bytes(16), P.TASK, P.NO_ID, 1.0, 0.0, 0, 0, 0.0, 5)
        d.send_multipart([P.C[P.SUBMIT] + hdr, b"payload"])
        replies = []  # until both the RESULT and the ERROR came, in whichever order
        while not ({m[0][:4] for m in replies} >= {P.C[P.RESULT], P.C[P.ERROR]}) and r.poll(10000):
            replies.append(r.recv_multipart())
        # the call gets its one outcome (so no Future waits forever), the socket the reason
        result = next(m for m in replies if m[0][:4] == P.C[P.RESULT])
        assert result[0][4:20] == did + bytes(8) and result[0][20] == P.REFUSED and b"buffers" in result[1]
        assert any(m[0] == P.C[P.ERROR] and b"buffers" in m[1] for m in replies)
        # a garbage sender got told why, too (the control client's socket: its replies come back on it)
        c = socks[-1]
        assert c.poll(10000)
    finally:
        ctx.destroy(linger=0)
    st = started["status"]()
    assert st["stats"]["refused"] - refused_before >= 10  # this test's garbage, not earlier tests'
    assert len(st["executors"]) == 2
    code = "import fabric; fabric.init(address=%r)\n@fabric.fn\ndef f(x): return x + 1\nprint(f.remote(1).result())"
    r2 = run_script(code % started["address"], env=started["env"], timeout=60)
    assert r2.stdout.strip() == "2", r2.stderr
    log_dir = json.load(open(os.path.join(started["env"]["FABRIC_HOME"], "cluster.json")))["log_dir"]
    assert "refused a message" in open(os.path.join(log_dir, "broker.log")).read()


def test_cli_refuses_bad_input(started):
    env = started["env"]
    bad = [
        (["start", "--host", "0.0.0.0"], "loopback"),
        (["start", "--port", "0"], "0"),
        (["start", "--memory", "lots", "--port", str(free_port())], "memory must be a size"),
        (["executor", "--broker", "localhost:1"], "tcp://host:port"),
        (["status", "--address", f"tcp://127.0.0.1:{free_port()}"], "no fabric broker answered"),
    ]
    for args, msg in bad:
        r = subprocess.run(FABRIC + args, env=env, capture_output=True, text=True, timeout=30)
        assert r.returncode != 0, args
        assert msg in r.stderr + r.stdout, (args, r.stderr)
    assert started["status"]()["executors"]


def test_stop_leaves_no_process(tmp_path):
    env = dict(os.environ, FABRIC_HOME=str(tmp_path))
    port = free_port()
    r = subprocess.run(FABRIC + ["start", "--port", str(port), "--cpus", "1", "--detach"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    pids = json.load(open(tmp_path / "cluster.json"))["pids"]
    workers = [c.pid for p in pids for c in psutil.Process(p).children(recursive=True)]
    # another spelling of its address (this host's name) still finds the recorded cluster
    r = subprocess.run(FABRIC + ["stop", "--address", f"tcp://localhost:{port}"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    alive = lambda p: psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"  # noqa: E731
    assert wait_for(lambda: not any(alive(p) for p in pids + workers), timeout=15)
    assert not (tmp_path / "cluster.json").exists()


def test_a_vanished_driver_has_its_calls_cancelled_and_instances_killed(tmp_path, monkeypatch):
    """SIGKILL a driver mid-call: after FABRIC_DRIVER_TIMEOUT its worker and instance are freed."""
    monkeypatch.setenv("FABRIC_DRIVER_TIMEOUT", "2")
    from fabric.cluster import LocalCluster

    cl = LocalCluster(cpus=2, parent_pid=0, log_dir=str(tmp_path)).start()
    try:
        code = """
import os, sys, time, fabric
fabric.init(address=%r)
@fabric.fn
def forever():
    time.sleep(3600)
@fabric.cls
class Holder:
    def ping(self):
        return 1
@fabric.fn
def size(a):
    return a.nbytes
import numpy as np
h = Holder.remote()
h.ping.remote().result(timeout=60)
assert size.remote(np.ones(1 << 18)).result(timeout=60) == 2 << 20   # through shared memory
forever.remote()
time.sleep(1.0)
print("READY", os.getpid(), flush=True)
os.kill(os.getpid(), 9)
""" % cl.address
        r = run_script(code, timeout=60)
        assert "READY" in r.stdout, r.stderr
        status = lambda: fabric.client.request(cl.address, P.STATUS)  # noqa: E731
        assert wait_for(lambda: status()["calls_pending"] == 0 and status()["instances"] == 0
                        and status()["drivers"] == 0, timeout=20)
        assert wait_for(lambda: status()["executors"][0]["free_cpus"] == 2, timeout=10), status()
        assert "silent for" in open(os.path.join(str(tmp_path), "broker.log")).read()
        pid = int(r.stdout.split("READY")[1].split()[0])
        assert not glob.glob(f"/dev/shm/fabric-{pid}-*")  # its shared memory was swept too
        # a driver dropped for silence that speaks again is taken back and told so (WELCOME with
        # "rejoin", so a real client re-sends what it waits for); its call is then judged as usual
        ctx = zmq.Context()
        try:
            did = os.urandom(8)
            d = ctx.socket(zmq.DEALER)
            r = ctx.socket(zmq.DEALER)
            for sock, ident in ((d, b"d" + did), (r, b"r" + did)):
                sock.setsockopt(zmq.ROUTING_ID, ident)
                sock.setsockopt(zmq.LINGER, 0)
                sock.connect(cl.address)
                sock.send_multipart([P.C[P.HELLO], b"{}"])
                assert sock.poll(10000)
                sock.recv_multipart()
            assert wait_for(lambda: status()["drivers"] == 0, timeout=20)  # no heartbeats: dropped
            cid = did + bytes(7) + b"\x01"
            d.send_multipart([P.C[P.SUBMIT] + P.pack_call(cid, bytes(16), P.TASK, P.NO_ID, 1.0, 0.0, 0, 0, 0.0, 0),
                              b"x"])
            assert r.poll(10000)
            welcome = r.recv_multipart()
            assert welcome[0] == P.C[P.WELCOME] and P.loads_json(welcome[1])["rejoin"] is True
            # its call names code this broker never got (it went to a broker before a restart, as
            # far as the broker can tell): it asks for a re-send, with code, instead of refusing
            assert r.poll(10000)
            again = r.recv_multipart()
            assert again[0] == P.C[P.WELCOME] and P.loads_json(again[1])["rejoin"] is True
            assert status()["drivers"] == 1 and status()["calls_pending"] == 0
            # a Future argument of its own that the broker does not hold: also a re-send request
            # (that call went to a broker before a restart). Still missing after several rejoins,
            # it is not coming back: the call is refused, with a message that says why
            import hashlib
            code = b"f\0x"
            lost = did + bytes(7) + b"\x09"
            hdr = P.pack_call(did + bytes(7) + b"\x02", hashlib.blake2b(code, digest_size=16).digest(), P.TASK,
                              P.NO_ID, 1.0, 0.0, 0, 0, 0.0, 0, opts=P.HAS_CODE | P.HAS_DEPS)
            answers = []
            for _ in range(8):
                time.sleep(0.55)  # the broker asks at most every 0.5 s
                d.send_multipart([P.C[P.SUBMIT] + hdr, code, lost, b"x"])
                assert r.poll(10000)
                answers.append(r.recv_multipart())
                if answers[-1][0] != P.C[P.WELCOME]:
                    break
            assert [a[0] for a in answers] == [P.C[P.WELCOME]] * 4 + [P.C[P.RESULT] + P.pack_result(hdr[:16], P.REFUSED)]
            assert b"does not hold" in answers[-1][1]
            assert status()["calls_pending"] == 0
        finally:
            ctx.destroy(linger=0)
    finally:
        cl.stop()
