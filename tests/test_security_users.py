"""Secure by default on a shared host (issue 10, docs/security.md), with two real users.

The owner (this test, root in CI) runs `fabric start` with nothing configured: a broker on
`tcp://127.0.0.1` and its executor, which make and use the owner's default CurveZMQ keys. A
second local user (`nobody`, through `setpriv`) runs driver scripts against it: refused in the
handshake, with the public key to have allow-listed, and nothing it sent runs; allow-listed on
purpose (`fabric keys add-client`), it gets in. The owner's own drivers and CLI need no
configuration. No key material reaches a log, `ps`, `fabric status`, the journal or a message.

Needs root (to become another user), `setpriv` and a user `nobody` that can run this
interpreter (its venv readable to it); skipped with the reason elsewhere.
"""
import glob
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile

import psutil
import pytest

from conftest import REPO, free_port, wait_for

FABRIC = [sys.executable, "-m", "fabric.cli"]
OTHER = "nobody"
TOKEN = "store-token-Zq81xYv3"   # a store credential in the cluster's environment: never in argv or logs

PROBE = r"""
import json, os, sys, time, fabric
out = {"uid": os.getuid()}
t0 = time.monotonic()
try:
    fabric.init(address=os.environ["ADDR"], connect_timeout=float(os.environ.get("CONNECT_TIMEOUT", 15)))
except fabric.FabricError as e:
    out.update(refused=type(e).__name__, message=str(e), seconds=time.monotonic() - t0)
    print("PROBE " + json.dumps(out), flush=True)
    sys.exit(3)

@fabric.fn
def touch(path):
    with open(path, "w") as f:
        f.write(str(os.getuid()))
    return os.getuid()

out["remote_uid"] = touch.remote(os.environ["MARK"]).result(timeout=60)
print("PROBE " + json.dumps(out), flush=True)
fabric.shutdown()
"""

OUTPUTS = []   # every probe's stdout and stderr: scanned for key material at the end


def _other_user():
    """(uid, gid) of the second user, or a pytest.skip saying why there is none usable."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run a driver as another local user (CI runs as root)")
    if not shutil.which("setpriv"):
        pytest.skip("needs setpriv (util-linux) to run a driver as another local user")
    try:
        pw = pwd.getpwnam(OTHER)
    except KeyError:
        pytest.skip(f"this machine has no second user {OTHER!r}")
    return pw.pw_uid, pw.pw_gid


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """The second user: a home folder of its own (outside root's 0700 tmp folders), and proof
    that it can run this interpreter with fabric (the venv must be readable to it)."""
    uid, gid = _other_user()
    home = tempfile.mkdtemp(prefix="fabric-other-user-")
    os.chown(home, uid, gid)
    user = {"uid": uid, "gid": gid, "home": home}
    r = as_other(user, "import fabric, zmq; print('ok')")
    if r.returncode != 0 or "ok" not in r.stdout:
        shutil.rmtree(home, ignore_errors=True)
        pytest.skip(f"user {OTHER} cannot run {sys.executable} with fabric from {REPO} (is the venv "
                    f"{sys.prefix} readable to it?): {r.stderr.strip()[-300:]}")
    yield user
    shutil.rmtree(home, ignore_errors=True)


def as_other(user, code, timeout=90, **env):
    """Run ``code`` as the second user, in an environment of its own (no FABRIC_* of ours)."""
    e = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": user["home"], "LANG": "C.UTF-8",
         "FABRIC_HOME": os.path.join(user["home"], "fabric"), "PYTHONUNBUFFERED": "1",
         "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)}
    e.update({k: v for k, v in env.items() if v is not None})
    cmd = ["setpriv", f"--reuid={user['uid']}", f"--regid={user['gid']}", "--clear-groups",
           sys.executable, "-c", code]
    r = subprocess.run(cmd, env=e, cwd=user["home"], capture_output=True, text=True, timeout=timeout)
    OUTPUTS.append(r.stdout + r.stderr)
    return r


def probe(user, address, mark, **env):
    r = as_other(user, PROBE, ADDR=address, MARK=mark, **env)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("PROBE ")), None)
    assert line, r.stdout + r.stderr
    return r.returncode, json.loads(line[6:])


def owner_env(home, **extra):
    e = {k: v for k, v in os.environ.items() if not k.startswith("FABRIC_")}
    e.update(FABRIC_HOME=home, PYTHONUNBUFFERED="1", FABRIC_STORE_OPTIONS=json.dumps({"token": TOKEN}),
             PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
    e.update(extra)
    return e


def owner_script(home, code, timeout=90, **extra):
    r = subprocess.run([sys.executable, "-c", code], env=owner_env(home, **extra), cwd=REPO, capture_output=True,
                       text=True, timeout=timeout)
    OUTPUTS.append(r.stdout + r.stderr)
    return r


def status(home):
    r = subprocess.run(FABRIC + ["status", "--json"], env=owner_env(home), capture_output=True, text=True,
                       timeout=60, cwd=REPO)
    OUTPUTS.append(r.stdout + r.stderr)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def owned(tmp_path_factory, other):
    """`fabric start` by the owner with nothing configured (no FABRIC_KEYS, no --keys)."""
    home = str(tmp_path_factory.mktemp("owner"))
    port = free_port()
    out_path = os.path.join(home, "start.out")
    with open(out_path, "w") as out:
        start = subprocess.Popen(FABRIC + ["start", "--port", str(port), "--cpus", "1"], env=owner_env(home),
                                 stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        assert wait_for(lambda: "running at" in open(out_path).read() or start.poll() is not None, 60), \
            open(out_path).read()
        assert start.poll() is None, open(out_path).read()
        rec = json.load(open(os.path.join(home, "cluster.json")))
        # its executor has joined (the tests count it; "running at" says only the broker answers)
        assert wait_for(lambda: len(status(home)["executors"]) == 1, 120), open(out_path).read()
        marks = tempfile.mkdtemp(prefix="fabric-marks-")  # root's: the cluster (as root) writes here
        yield {"address": f"tcp://127.0.0.1:{port}", "port": port, "home": home, "log_dir": rec["log_dir"],
               "start_out": out_path, "marks": marks, "pids": rec["pids"]}
    finally:
        if start.poll() is None:
            start.terminate()
            try:
                start.wait(30)
            except subprocess.TimeoutExpired:
                start.kill()
                start.wait()
        shutil.rmtree(marks, ignore_errors=True)


# ------------------------------------------------------------------------------------------ tests
def test_the_owners_driver_and_cli_need_no_configuration(owned):
    keys = os.path.join(owned["home"], "keys")
    assert os.path.exists(os.path.join(keys, "broker.key_secret"))   # made on first use, in the data folder
    assert stat.S_IMODE(os.stat(keys).st_mode) == 0o700
    assert "CurveZMQ" in open(owned["start_out"]).read()
    mark = os.path.join(owned["marks"], "owner")
    r = owner_script(owned["home"], PROBE, ADDR=owned["address"], MARK=mark)
    assert r.returncode == 0, r.stdout + r.stderr
    assert '"remote_uid": 0' in r.stdout and open(mark).read() == "0"
    st = status(owned["home"])                                     # `fabric status`, no --address, no --keys
    assert len(st["executors"]) == 1
    assert "CurveZMQ on" in open(os.path.join(owned["log_dir"], "broker.log")).read()


def test_another_users_driver_is_refused_and_nothing_it_sent_ran(owned, other):
    before = status(owned["home"])["stats"]["submitted"]
    mark = os.path.join(owned["marks"], "intruder")
    # refused by the handshake's failure event, not a timer: its connect timeout (600 s) is far
    # beyond the probe's own limit (90 s), and a timeout would say "no fabric broker answered".
    # No wall-clock bound: it flakes on a loaded machine
    rc, out = probe(other, owned["address"], mark, CONNECT_TIMEOUT="600")
    assert rc == 3 and out["uid"] == other["uid"] and out["refused"] == "ConnectionFailed", out
    own_key = os.path.join(other["home"], "fabric", "keys", "client.key")
    public = open(own_key).read().split('public-key = "')[1].split('"')[0]
    # the message names what to do and which key to have allow-listed
    assert "requires CurveZMQ keys" in out["message"] and "fabric keys add-client" in out["message"], out
    assert own_key in out["message"] and public in out["message"], out
    # the other user's keys are its own, private to it; the owner's are unreadable to it
    assert stat.S_IMODE(os.stat(os.path.dirname(own_key)).st_mode) == 0o700
    assert os.stat(own_key).st_uid == other["uid"]
    r = as_other(other, f"open({os.path.join(owned['home'], 'keys', 'broker.key_secret')!r}).read()")
    assert r.returncode != 0 and "PermissionError" in r.stderr, r.stderr
    # without keys at all (plaintext): refused too
    rc, out = probe(other, owned["address"], mark, FABRIC_KEYS="none")
    assert rc == 3 and "requires CurveZMQ keys" in out["message"], out
    # nothing ran, the broker logged the refusal and keeps serving its owner
    assert not os.path.exists(mark)
    assert wait_for(lambda: "refused a connection" in open(os.path.join(owned["log_dir"], "broker.log")).read(), 10)
    st = status(owned["home"])
    assert st["stats"]["submitted"] == before and len(st["executors"]) == 1
    r = owner_script(owned["home"], PROBE, ADDR=owned["address"], MARK=os.path.join(owned["marks"], "after"))
    assert r.returncode == 0 and '"remote_uid": 0' in r.stdout, r.stdout + r.stderr


def test_an_allow_listed_user_gets_in_and_a_revoked_one_does_not(owned, other):
    env = owner_env(owned["home"])
    # 1. the owner makes a keys directory for the other user and hands it over
    given = os.path.join(other["home"], "given-keys")
    r = subprocess.run(FABRIC + ["keys", "add-client", "guest", "--out", given], env=env, capture_output=True,
                       text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr
    for path in [given] + glob.glob(os.path.join(given, "*")):
        os.chown(path, other["uid"], other["gid"])
    mark = os.path.join(owned["marks"], "guest")
    rc, out = probe(other, owned["address"], mark, FABRIC_KEYS=given)
    assert rc == 0 and out["remote_uid"] == 0 and os.path.exists(mark), out   # it runs as the owner: on purpose
    # 2. the other user's own key (named in its refusal) allow-listed; it gets the broker's public key
    mine = os.path.join(other["home"], "fabric", "keys")
    if not os.path.exists(os.path.join(mine, "client.key")):
        probe(other, owned["address"], mark)                       # first use makes its keys
    copy = os.path.join(owned["home"], "nobody-client.key")
    shutil.copyfile(os.path.join(mine, "client.key"), copy)
    r = subprocess.run(FABRIC + ["keys", "add-client", "nobody-own", "--public-key", copy], env=env,
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr
    joined = os.path.join(other["home"], "joined-keys")
    os.mkdir(joined, 0o700)
    shutil.copyfile(os.path.join(owned["home"], "keys", "broker.key"), os.path.join(joined, "broker.key"))
    for name in ("client.key", "client.key_secret"):
        shutil.copyfile(os.path.join(mine, name), os.path.join(joined, name))
    for path in [joined] + glob.glob(os.path.join(joined, "*")):
        os.chown(path, other["uid"], other["gid"])
    rc, out = probe(other, owned["address"], os.path.join(owned["marks"], "own"), FABRIC_KEYS=joined)
    assert rc == 0 and out["remote_uid"] == 0, out
    # revoked: its allow-list file deleted, the next connection is refused
    os.unlink(os.path.join(owned["home"], "keys", "clients", "guest.key"))
    rc, out = probe(other, owned["address"], os.path.join(owned["marks"], "revoked"), FABRIC_KEYS=given)
    assert rc == 3 and "allow-list" in out["message"], out
    assert not os.path.exists(os.path.join(owned["marks"], "revoked"))


def test_no_key_material_or_token_in_logs_ps_status_journal_or_messages(owned, other):
    secrets = []
    import zmq.auth

    for folder in (owned["home"], other["home"]):
        for path in glob.glob(os.path.join(folder, "**", "*.key_secret"), recursive=True):
            secrets.append(zmq.auth.load_certificate(path)[1].decode())
    assert len(secrets) >= 4
    texts = {"outputs": "\n".join(OUTPUTS), "start": open(owned["start_out"]).read()}
    for path in glob.glob(os.path.join(owned["log_dir"], "*")):
        texts[path] = open(path, errors="replace").read()
    journals = glob.glob(os.path.join(owned["home"], "journal-*"))
    assert journals, os.listdir(owned["home"])
    for path in journals + [os.path.join(owned["home"], "cluster.json")]:
        texts[path] = open(path, "rb").read().decode("latin-1")
    texts["status"] = json.dumps(status(owned["home"]))
    argv = []
    for p in psutil.process_iter(["cmdline"]):
        argv.append(" ".join(p.info["cmdline"] or []))
    texts["ps"] = "\n".join(argv)
    assert any("fabric.broker" in a for a in argv)
    for where, text in texts.items():
        for s in secrets:
            assert s not in text, f"a secret key is in {where}"
        assert TOKEN not in text, f"the store token is in {where}"


EMBEDDED_OWNER = r"""
import os, sys, fabric
info = fabric.init(num_cpus=1)
print("ADDRESS " + info["address"], flush=True)
sys.stdin.readline()                       # until the test says so
@fabric.fn
def one():
    return 1
print("STILL", one.remote().result(timeout=60), flush=True)
fabric.shutdown()
"""


def test_an_embedded_clusters_socket_is_out_of_other_users_reach(other, tmp_path):
    """No TCP, no keys: the embedded cluster's ipc:// socket is in a 0700 folder of the owner's."""
    p = subprocess.Popen([sys.executable, "-c", EMBEDDED_OWNER], env=owner_env(str(tmp_path)), cwd=REPO,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        assert line.startswith("ADDRESS ipc://"), line + p.stderr.read()
        address = line.split()[1]
        assert stat.S_IMODE(os.stat(os.path.dirname(address[len("ipc://"):])).st_mode) == 0o700
        mark = os.path.join(str(tmp_path), "intruder")
        rc, out = probe(other, address, mark, CONNECT_TIMEOUT="3")
        assert rc == 3 and out["refused"] == "ConnectionFailed" and "no fabric broker answered" in out["message"], out
        assert not os.path.exists(mark)
        p.stdin.write("go\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == "STILL 1", p.stderr.read()
    finally:
        p.stdin.close()
        p.wait(60)
