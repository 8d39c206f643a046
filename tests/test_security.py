"""CurveZMQ keys (fabric/security.py, docs/security.md), on real processes.

One keyed cluster for the module: `fabric start --host 0.0.0.0 --keys DIR` (a broker listening
beyond loopback, and its own executor) plus a second `fabric executor` with a key pair made by
`fabric keys add-executor`. Drivers are user scripts with key pairs from `fabric keys add-client`.
A TCP relay between a driver and a broker records the bytes on the wire.
"""
import contextlib
import glob
import json
import os
import socket
import stat
import subprocess
import sys
import threading

import pytest
import zmq

import fabric
from fabric import protocol as P
from fabric import settings
from fabric.errors import ConnectionFailed, FabricError
from conftest import REPO, free_port, run_script, wait_for

FABRIC = [sys.executable, "-m", "fabric.cli"]
MARKER = "fabric-plaintext-marker-7Q3Z"
FUNC = "leaky_function_name_q9"


def _env(**extra):
    e = {k: v for k, v in os.environ.items() if k not in ("FABRIC_KEYS", "FABRIC_ALLOW_INSECURE_REMOTE",
                                                          "FABRIC_ADDRESS")}
    e["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    e["PYTHONUNBUFFERED"] = "1"
    e.update({k: v for k, v in extra.items() if v is not None})
    return e


def fab(*args, env=None, timeout=60):
    return subprocess.run(FABRIC + list(args), env=env or _env(), capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)


@contextlib.contextmanager
def keys_env(path):
    """FABRIC_KEYS=path in this process, for a control request made here."""
    old = os.environ.get("FABRIC_KEYS")
    if path is None:
        os.environ.pop("FABRIC_KEYS", None)
    else:
        os.environ["FABRIC_KEYS"] = path
    settings.reload()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("FABRIC_KEYS", None)
        else:
            os.environ["FABRIC_KEYS"] = old
        settings.reload()


def status(address, keys, timeout=3.0):
    from fabric.client import request

    with keys_env(keys):
        return request(address, P.STATUS, timeout=timeout)


def _executors(address, keys):
    try:
        return len(status(address, keys, timeout=1)["executors"])
    except FabricError:
        return -1


def secrets_in(folder):
    """The z85 secret keys of every pair under ``folder``."""
    import zmq.auth

    out = []
    for path in glob.glob(os.path.join(folder, "**", "*.key_secret"), recursive=True):
        out.append(zmq.auth.load_certificate(path)[1].decode())
    return out


DRIVER = """
import sys, time, fabric
t0 = time.monotonic()
try:
    fabric.init(address=%(address)r, connect_timeout=%(timeout)s)
except fabric.FabricError as e:
    print("REFUSED", type(e).__name__, round(time.monotonic() - t0, 2), e)
    sys.exit(3)

@fabric.fn
def %(func)s(s):
    return s + "-echo"

@fabric.fn
def outer(x):
    return %(func)s.remote(x).result() + "-nested"

@fabric.fn
def sq(i):
    return i * i

print("RESULT", %(func)s.remote(%(marker)r).result())
if %(nested)s:
    print("NESTED", outer.remote("n").result())
print("MAP", sum(fabric.get([sq.remote(i) for i in range(50)])))
fabric.shutdown()
"""


def driver(address, keys, timeout=20, connect_timeout=10, nested=True):
    code = DRIVER % {"address": address, "timeout": connect_timeout, "func": FUNC, "marker": MARKER,
                     "nested": nested}
    return run_script(code, env=_env(FABRIC_KEYS=keys), timeout=timeout)


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """A broker's keys directory (`fabric keys init`) and keys directories for other hosts:
    alice (allowed driver), exec2 (allowed executor), mallory and rogue (made, then revoked),
    and other (a driver of another cluster: a different broker key)."""
    base = tmp_path_factory.mktemp("keys")
    main = str(base / "cluster")
    r = fab("keys", "init", main)
    assert r.returncode == 0, r.stderr
    dirs = {"main": main}
    for role, name in (("client", "alice"), ("executor", "exec2"), ("client", "mallory"), ("executor", "rogue")):
        dirs[name] = str(base / name)
        r = fab("keys", f"add-{role}", name, "--keys", main, "--out", dirs[name])
        assert r.returncode == 0, r.stderr
    os.unlink(os.path.join(main, "clients", "mallory.key"))      # revoked: deleting the file is enough
    os.unlink(os.path.join(main, "executors", "rogue.key"))
    dirs["other"] = str(base / "other")
    assert fab("keys", "init", dirs["other"]).returncode == 0
    return dirs


@pytest.fixture(scope="module")
def keyed(keys, tmp_path_factory):
    """`fabric start --host 0.0.0.0 --keys DIR` (1 CPU) + `fabric executor --keys exec2` (1 CPU)."""
    home = str(tmp_path_factory.mktemp("home"))
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    out_path = os.path.join(home, "start.out")
    env = _env(FABRIC_HOME=home)
    with open(out_path, "w") as out:
        start = subprocess.Popen(FABRIC + ["start", "--host", "0.0.0.0", "--port", str(port), "--cpus", "1",
                                           "--keys", keys["main"]], env=env, stdout=out, stderr=subprocess.STDOUT,
                                 cwd=REPO)
    second = None
    try:
        assert wait_for(lambda: "running at" in open(out_path).read() or start.poll() is not None, 60), \
            open(out_path).read()
        assert start.poll() is None, open(out_path).read()
        second = subprocess.Popen(FABRIC + ["executor", "--broker", address, "--cpus", "1", "--keys", keys["exec2"]],
                                  env=_env(FABRIC_HOME=home), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  cwd=REPO)
        # (a bound on an event, generous: two processes start and hand-shake on a loaded host)
        assert wait_for(lambda: len(status(address, keys["main"])["executors"]) == 2, 120)
        rec = json.load(open(os.path.join(home, "cluster.json")))
        yield {"address": address, "port": port, "home": home, "log_dir": rec["log_dir"], "start_out": out_path}
    finally:
        for p in (second, start):
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


class Relay:
    """A TCP relay: accepts on a local port, forwards each connection to ``target`` and back,
    and records every byte in both directions."""

    def __init__(self, target_port):
        self.target = ("127.0.0.1", target_port)
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(16)
        self.port = self.lsock.getsockname()[1]
        self.data = bytearray()
        self.lock = threading.Lock()
        self.conns = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                a, _ = self.lsock.accept()
            except OSError:
                return
            try:
                b = socket.create_connection(self.target)
            except OSError:
                a.close()
                continue
            self.conns += [a, b]
            threading.Thread(target=self._pump, args=(a, b), daemon=True).start()
            threading.Thread(target=self._pump, args=(b, a), daemon=True).start()

    def _pump(self, src, dst):
        try:
            while True:
                chunk = src.recv(65536)
                if not chunk:
                    break
                with self.lock:
                    self.data += chunk
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self):
        self.lsock.close()
        for s in self.conns:
            with contextlib.suppress(OSError):
                s.close()

    def recorded(self) -> bytes:
        with self.lock:
            return bytes(self.data)


# ------------------------------------------------------------------------------------------ tests
def test_keys_init_makes_a_private_usable_directory(keys):
    import zmq.auth

    main = keys["main"]
    assert stat.S_IMODE(os.stat(main).st_mode) == 0o700
    for name in ("broker", "client", "executor"):
        public, secret = zmq.auth.load_certificate(os.path.join(main, f"{name}.key_secret"))
        assert len(public) == 40 and len(secret) == 40
        assert zmq.auth.load_certificate(os.path.join(main, f"{name}.key"))[0] == public
        assert stat.S_IMODE(os.stat(os.path.join(main, f"{name}.key_secret")).st_mode) == 0o600
    allowed = {os.path.relpath(p, main) for p in glob.glob(os.path.join(main, "*", "*.key"))}
    assert allowed == {"clients/client.key", "clients/alice.key", "executors/executor.key", "executors/exec2.key"}
    # a host's directory: the broker's public key and its own pair, no other secret
    assert sorted(os.listdir(keys["alice"])) == ["broker.key", "client.key", "client.key_secret"]
    assert sorted(os.listdir(keys["exec2"])) == ["broker.key", "executor.key", "executor.key_secret"]
    assert stat.S_IMODE(os.stat(keys["alice"]).st_mode) == 0o700
    # `fabric keys show` prints public keys only
    r = fab("keys", "show", main)
    assert r.returncode == 0, r.stderr
    assert "clients/alice.key" in r.stdout
    assert not any(s in r.stdout for s in secrets_in(main))
    # a second init into the same directory is refused; add-client refuses a secret as "public key"
    assert "already holds keys" in fab("keys", "init", main).stderr
    r = fab("keys", "add-client", "x", "--keys", main, "--public-key", os.path.join(keys["alice"], "client.key_secret"))
    assert r.returncode != 0 and "secret" in r.stderr


def test_keyed_cluster_on_all_interfaces_runs_calls(keyed, keys):
    st = status(keyed["address"], keys["main"])
    assert len(st["executors"]) == 2
    r = driver(keyed["address"], keys["alice"], timeout=90)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"RESULT {MARKER}-echo" in r.stdout
    assert "NESTED n-echo-nested" in r.stdout          # a worker's nested call connects with keys too
    assert f"MAP {sum(i * i for i in range(50))}" in r.stdout
    # the broker's key pair was used; no secret key reached a log
    logs = "".join(open(p, errors="replace").read() for p in glob.glob(os.path.join(keyed["log_dir"], "*")))
    assert "CurveZMQ on" in logs
    logs += open(keyed["start_out"]).read()
    assert not any(s in logs for s in secrets_in(os.path.dirname(keys["main"])))


def test_driver_with_unknown_key_is_refused_and_the_cluster_keeps_serving(keyed, keys):
    # refused by the handshake's failure event, not by a timer: its connect_timeout (600 s) is
    # far beyond the script's own limit (120 s), and only that event makes this message (a
    # timeout says "no fabric broker answered"). No wall-clock bound: they flake under load.
    r = driver(keyed["address"], keys["mallory"], timeout=120, connect_timeout=600)
    assert r.returncode == 3, r.stdout + r.stderr
    line = r.stdout.strip().splitlines()[-1]
    assert line.startswith("REFUSED ConnectionFailed"), line
    assert "did not accept this process's key" in line and "fabric keys add-client" in line
    # a driver without keys, and one with another cluster's broker key: refused, with the reason
    r = driver(keyed["address"], None)
    assert r.returncode == 3 and "FABRIC_KEYS" in r.stdout, r.stdout + r.stderr
    r = driver(keyed["address"], keys["other"])
    assert r.returncode == 3 and "broker.key" in r.stdout, r.stdout + r.stderr
    # a control request (fabric status) with an unknown key: the same clear error
    res = fab("status", "--address", keyed["address"], "--keys", keys["mallory"])
    assert res.returncode != 0 and "did not accept" in res.stderr, res.stderr
    assert wait_for(lambda: "refused a connection" in open(os.path.join(keyed["log_dir"], "broker.log")).read(), 5)
    # the good driver still works
    r = driver(keyed["address"], keys["alice"], timeout=90)
    assert r.returncode == 0 and f"RESULT {MARKER}-echo" in r.stdout, r.stdout + r.stderr


def test_executor_with_unknown_key_is_not_accepted(keyed, keys):
    # the executor exits on the handshake's failure event, the only source of this message
    # (fab raises TimeoutExpired if it kept trying): no wall-clock bound, it flakes under load
    r = fab("executor", "--broker", keyed["address"], "--cpus", "1", "--keys", keys["rogue"],
            env=_env(FABRIC_HOME=keyed["home"]), timeout=120)
    assert r.returncode != 0, r.stdout + r.stderr
    assert "did not accept this process's key" in r.stderr and "add-executor" in r.stderr, r.stderr
    assert len(status(keyed["address"], keys["main"])["executors"]) == 2


def test_remote_bind_without_keys_is_refused(tmp_path, monkeypatch):
    from fabric.broker.core import Broker

    monkeypatch.delenv("FABRIC_KEYS", raising=False)
    monkeypatch.delenv("FABRIC_ALLOW_INSECURE_REMOTE", raising=False)
    port = free_port()
    r = fab("start", "--host", "0.0.0.0", "--port", str(port), env=_env(FABRIC_HOME=str(tmp_path)))
    assert r.returncode != 0
    assert "refusing to listen" in r.stderr and "fabric keys init" in r.stderr and "loopback" in r.stderr, r.stderr
    ctx = zmq.Context()
    try:
        for host in ("0.0.0.0", socket.gethostname()):
            with pytest.raises(FabricError, match="fabric keys init"):
                Broker(f"tcp://{host}:{port}", ctx=ctx)
    finally:
        ctx.term()
    # keys that lack the broker's secret are refused up front
    r = fab("start", "--host", "0.0.0.0", "--port", str(port), "--keys", str(tmp_path / "missing"),
            env=_env(FABRIC_HOME=str(tmp_path)))
    assert r.returncode != 0 and "does not exist" in r.stderr, r.stderr


def _through_relay(port, keys):
    """A driver's calls to the broker on ``port`` through a recording relay: the bytes seen."""
    relay = Relay(port)
    try:
        r = driver(f"tcp://127.0.0.1:{relay.port}", keys, timeout=90, nested=False)
        assert r.returncode == 0 and f"RESULT {MARKER}-echo" in r.stdout, r.stdout + r.stderr
        return relay.recorded()
    finally:
        relay.close()


def _encrypted(wire):
    assert len(wire) > 1000
    assert MARKER.encode() not in wire and FUNC.encode() not in wire
    assert b"-echo" not in wire and P.C[P.SUBMIT] not in wire


def test_traffic_is_encrypted_by_default_and_plaintext_only_with_keys_off(keyed, keys):
    from fabric.cluster import LocalCluster

    # FABRIC_KEYS=none (keys off on purpose): the argument and the function's name are on the wire
    port = free_port()
    with keys_env("none"):
        plain = LocalCluster(address=f"tcp://127.0.0.1:{port}", cpus=1).start()
    try:
        assert wait_for(lambda: _executors(f"tcp://127.0.0.1:{port}", "none") == 1, 30)
        wire = _through_relay(port, "none")
        assert MARKER.encode() in wire and FUNC.encode() in wire
    finally:
        with keys_env("none"):
            plain.stop()
    # the default, nothing configured: a loopback cluster with this user's keys, encrypted
    port = free_port()
    with keys_env(None):
        default = LocalCluster(address=f"tcp://127.0.0.1:{port}", cpus=1).start()
    try:
        assert wait_for(lambda: _executors(f"tcp://127.0.0.1:{port}", None) == 1, 30)
        _encrypted(_through_relay(port, None))
    finally:
        with keys_env(None):
            default.stop()
    # a keys directory given on purpose: the same
    _encrypted(_through_relay(keyed["port"], keys["alice"]))


def test_embedded_cluster_with_keys_encrypts_its_ipc_socket(keys):
    code = """
import os, fabric
from fabric import protocol as P
from fabric import settings
from fabric.client import request
info = fabric.init(num_cpus=1)
@fabric.fn
def sq(x):
    return x * x
print("SUM", sum(fabric.get([sq.remote(i) for i in range(10)])))
os.environ.pop("FABRIC_KEYS")
fabric.settings.reload()
try:
    request(info["address"], P.STATUS, timeout=5)
    print("PLAIN ACCEPTED")
except fabric.FabricError as e:
    print("PLAIN REFUSED", e)
fabric.shutdown()
"""
    r = run_script(code, env=_env(FABRIC_KEYS=keys["main"]), timeout=90)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUM 285" in r.stdout
    assert "PLAIN REFUSED" in r.stdout and "FABRIC_KEYS" in r.stdout, r.stdout


def test_unkeyed_local_cluster_works_as_before(cluster):
    assert not os.environ.get("FABRIC_KEYS")

    @fabric.fn
    def add(a, b):
        return a + b

    assert add.remote(2, 3).result(timeout=30) == 5
    assert sum(fabric.get([add.remote(i, i) for i in range(100)], timeout=60)) == 9900
    assert status(cluster["address"], None)["executors"]


def test_keyed_client_to_unkeyed_broker_says_why(cluster, keys):
    # said on the handshake's failure event: a timer's end would say "no fabric broker
    # answered" instead, and the request's timeout (120 s) is longer than any handshake
    with pytest.raises(ConnectionFailed, match="broker.key"):
        status(cluster["address"], keys["alice"], timeout=120)
