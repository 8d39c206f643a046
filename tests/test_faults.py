"""Faults the issue names, injected for real: an executor killed outright (SIGKILL, with its
workers) has its calls retried on another executor, every caller gets exactly one outcome;
and a short soak under random chaos loses and duplicates nothing."""
import os
import signal
import subprocess
import sys

import psutil

from fabric import protocol as P
from fabric.client import request

from conftest import REPO, free_port, wait_for

DRIVER = r"""
import os, time, fabric
fabric.init(address=os.environ["ADDR"])
client = fabric.api._client()
marks = os.environ["MARKS"]

@fabric.fn(retries=2)
def work(i):
    open(os.path.join(marks, f"{i}-{os.getpid()}"), "w").close()
    time.sleep(1.5)
    return i

futs = [work.remote(i) for i in range(4)]
print("RESULTS", [f.result(timeout=60) for f in futs], "EXTRA", client.extra_outcomes, flush=True)
"""


def test_sigkilled_executor_calls_run_elsewhere_with_one_outcome_each(tmp_path, monkeypatch):
    monkeypatch.setenv("FABRIC_HEARTBEAT_TIMEOUT", "2")
    from fabric.cluster import LocalCluster

    address = f"tcp://127.0.0.1:{free_port()}"
    cl = LocalCluster(address=address, cpus=2, parent_pid=0, log_dir=str(tmp_path)).start(executor=False)
    victim = cl.add_executor(cpus=2)
    try:
        assert wait_for(lambda: len(request(address, P.STATUS)["executors"]) == 1, timeout=20)
        marks = tmp_path / "marks"
        marks.mkdir()
        env = dict(os.environ, ADDR=address, MARKS=str(marks), PYTHONPATH=REPO)
        p = subprocess.Popen([sys.executable, "-c", DRIVER], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        assert wait_for(lambda: len(os.listdir(marks)) >= 2, timeout=30)  # two run on the victim now
        cl.add_executor(cpus=2)  # the survivor
        for c in psutil.Process(victim.pid).children(recursive=True):
            c.send_signal(signal.SIGKILL)
        victim.send_signal(signal.SIGKILL)
        out, err = p.communicate(timeout=90)
        assert "RESULTS [0, 1, 2, 3] EXTRA 0" in out, (out, err)
        runs = {}
        for name in os.listdir(marks):
            runs.setdefault(name.split("-")[0], set()).add(name)
        assert set(runs) == {"0", "1", "2", "3"}
        assert any(len(v) == 2 for v in runs.values())  # what the victim ran, ran again elsewhere
        assert "lost" in open(tmp_path / "broker.log").read()
    finally:
        cl.stop()


def test_short_soak_under_chaos_loses_and_duplicates_nothing(tmp_path):
    out = tmp_path / "soak.json"
    r = subprocess.run([sys.executable, os.path.join(REPO, "loadtests", "soak.py"), "--drivers", "2",
                        "--seconds", "15", "--chaos-every", "1:2", "--json", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0 and "PASS" in r.stdout, (r.stdout, r.stderr[-3000:])
    import json

    res = json.loads(out.read_text())
    t = res["totals"]
    assert t["lost"] == 0 and t["duplicated"] == 0 and t["wrong"] == 0
    assert t["submitted"] > 1000 and t["succeeded"] > 0 and t["failed_as_expected"] > 0
    assert sum(res["chaos"].values()) >= 3
