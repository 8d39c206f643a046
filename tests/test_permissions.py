"""Everything fabric writes is owner-only (0700 folders, 0600 files) whatever the umask
(issue 10, docs/security.md): the data folder, logs, keys, the run record, the journal, the
store under file://, shared-memory segments, executors' run files, and the embedded cluster's
socket folder. Each command and script here runs under umask 000, the worst case; user code in
a worker keeps the user's umask (fabric does not change how the user's own files are made).
"""
import json
import os
import stat
import subprocess
import sys

from conftest import REPO, free_port

FABRIC = [sys.executable, "-m", "fabric.cli"]

DRIVER = r"""
import glob, json, os, stat, numpy as np, fabric, fabric.storage as storage
mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)
fabric.init(address=os.environ["ADDR"])
executor_pid = int(os.environ["EXECUTOR_PID"])

@fabric.fn
def work(a, folder):
    storage.default().put("from-worker/x", {"n": len(a)})       # the store, written by a worker
    runs = glob.glob(f"/dev/shm/fabric-{executor_pid}-run*")     # the executor's run files
    own = os.path.join(folder, "user-file")                      # a user's own file: the user's umask
    open(own, "w").close()
    return float(a.sum()), {p: mode(p) for p in runs}, mode(own)

total, runs, user_mode = work.remote(np.ones(1 << 20), os.environ["USER_DIR"]).result(timeout=60)
shm = {p: mode(p) for p in glob.glob(f"/dev/shm/fabric-{os.getpid()}-*")}
store = storage.default()
store.put("from-driver/y", [1, 2, 3])
ck = os.path.join(os.environ["USER_DIR"], "ckpt")
os.makedirs(os.path.join(ck, "sub"))
open(os.path.join(ck, "sub", "w.bin"), "wb").write(b"w")
store.put_dir("ckpt/1", ck)
print("OUT " + json.dumps({"total": total, "runs": runs, "shm": shm, "user_mode": user_mode}))
fabric.shutdown()
"""

EMBEDDED = r"""
import glob, json, os, stat, numpy as np, fabric
mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)
info = fabric.init(num_cpus=1)
@fabric.fn
def total(a):
    return float(a.sum())
assert total.remote(np.ones(1 << 20)).result(timeout=60) == 1 << 20
sock = info["address"][len("ipc://"):]
out = {"address": info["address"], "folder": mode(os.path.dirname(sock)), "socket": mode(sock),
       "shm": {p: mode(p) for p in glob.glob(f"/dev/shm/fabric-{os.getpid()}-*")}, "log_dir": info["log_dir"]}
print("OUT " + json.dumps(out))
fabric.shutdown()
"""


def _env(home, **extra):
    e = {k: v for k, v in os.environ.items() if not k.startswith("FABRIC_")}
    e.update(FABRIC_HOME=str(home), XDG_DATA_HOME=str(home / "xdg-data"), XDG_CACHE_HOME=str(home / "xdg-cache"),
             PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p), PYTHONUNBUFFERED="1")
    e.update(extra)
    return e


def run(args, env, timeout=90):
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO, umask=0)


def _out(r):
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("OUT ")), None)
    assert line, r.stdout + r.stderr
    return json.loads(line[4:])


def not_private(top):
    """Every folder under ``top`` not 0700 and every file not 0600, with its mode."""
    bad = []
    for here, dirs, files in os.walk(top):
        if stat.S_IMODE(os.stat(here).st_mode) != 0o700:
            bad.append((here, oct(stat.S_IMODE(os.stat(here).st_mode))))
        for name in files:
            p = os.path.join(here, name)
            m = stat.S_IMODE(os.lstat(p).st_mode)
            if m != 0o600:
                bad.append((p, oct(m)))
    return bad


def test_a_started_cluster_writes_only_owner_only_files(tmp_path):
    home = tmp_path / "home"
    user_dir = tmp_path / "user"
    user_dir.mkdir()
    env = _env(home)
    port = free_port()
    r = run(FABRIC + ["start", "--port", str(port), "--cpus", "1", "--detach"], env)
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        rec = json.load(open(home / "cluster.json"))
        executor_pid = rec["pids"][1]
        journal = home / f"journal-{port}.bin"
        assert journal.exists()
        r = run([sys.executable, "-c", DRIVER],
                dict(env, ADDR=f"tcp://127.0.0.1:{port}", EXECUTOR_PID=str(executor_pid), USER_DIR=str(user_dir)))
        out = _out(r)
        assert out["total"] == 1 << 20
        assert out["runs"] and set(out["runs"].values()) == {0o600}, out["runs"]   # run files
        assert out["shm"] and set(out["shm"].values()) == {0o600}, out["shm"]      # the driver's shared memory
        assert out["user_mode"] == 0o666                # the user's code, the user's umask (000)
        assert stat.S_IMODE(journal.stat().st_mode) == 0o600
        # the default store: in the data folder (FABRIC_HOME), or under XDG_DATA_HOME
        store = next((p for p in (home / "store", home / "xdg-data" / "fabric" / "store") if p.exists()), None)
        assert store is not None, os.listdir(home)
        assert (store / "from-worker" / "x").exists() and (store / "ckpt" / "1").is_dir()
        # data folder, keys, logs (broker, executor, worker output), cluster.json, journal, store
        assert {"keys", "logs", "cluster.json", f"journal-{port}.bin"} <= set(os.listdir(home))
        assert not_private(home) == []
    finally:
        r = run(FABRIC + ["stop"], env)
        assert r.returncode == 0, r.stderr
    assert not_private(home) == []


def test_the_embedded_cluster_keeps_its_socket_in_a_private_folder(tmp_path):
    home = tmp_path / "home"
    out = _out(run([sys.executable, "-c", EMBEDDED], _env(home)))
    assert out["address"].startswith("ipc://")
    assert out["folder"] == 0o700 and out["socket"] & 0o077 == 0, out
    assert out["shm"] and set(out["shm"].values()) == {0o600}, out
    assert out["log_dir"].startswith(str(home))
    assert not_private(home) == []
    assert not os.path.exists(os.path.dirname(out["address"][len("ipc://"):]))  # removed on stop


def test_an_older_open_data_folder_is_tightened(tmp_path, monkeypatch):
    """The default data folder an older fabric left 0755 becomes 0700 at the next use."""
    from fabric import config

    data = tmp_path / "xdg" / "fabric"
    data.mkdir(parents=True, mode=0o755)
    os.chmod(data, 0o755)
    monkeypatch.delenv("FABRIC_HOME", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert config.data_dir() == str(data)
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    log_dir = config.new_log_dir("x")
    assert stat.S_IMODE(os.stat(log_dir).st_mode) == 0o700
