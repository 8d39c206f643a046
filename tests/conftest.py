"""Shared fixtures: every test runs against real processes (broker, executors, workers)."""
import contextlib
import os
import subprocess
import sys
import tempfile
import time

import pytest

# keep logs and state of the tests out of the user's home, and remove them afterwards
_OWN_HOME = None
if "FABRIC_HOME" not in os.environ:
    _OWN_HOME = os.environ["FABRIC_HOME"] = tempfile.mkdtemp(prefix="fabric-home-")
os.environ.pop("FABRIC_ADDRESS", None)


def pytest_sessionfinish(session, exitstatus):
    """The suite leaves nothing in /tmp: the data folder it made goes once every cluster is down."""
    if _OWN_HOME and not os.environ.get("FABRIC_KEEP_TEST_HOME"):
        import shutil

        try:
            fabric.shutdown()
        finally:
            shutil.rmtree(_OWN_HOME, ignore_errors=True)

import fabric  # noqa: E402
from fabric import settings as _settings  # noqa: E402


def _then_reload(name):
    """fabric reads its FABRIC_* settings once (fabric/settings.py): a test's monkeypatch.setenv/
    delenv, and their undo, re-read them, so that in-process code sees what the test set."""
    orig = getattr(pytest.MonkeyPatch, name)

    def patched(self, *args, **kwargs):
        try:
            return orig(self, *args, **kwargs)
        finally:
            _settings.reload()

    patched.__wrapped__ = orig
    return patched


for _name in ("setenv", "delenv", "undo"):
    setattr(pytest.MonkeyPatch, _name, _then_reload(_name))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cluster():
    """An embedded cluster with 2 CPUs, shared by the tests of one module."""
    fabric.shutdown()
    info = fabric.init(num_cpus=2)
    yield info
    fabric.shutdown()


@contextlib.contextmanager
def broker_alone(cpus=2):
    """A local cluster with a broker and no executor, yielded once the broker answers STATUS:
    for tests that play the executor and workers themselves, or send it what used to kill it."""
    from fabric import protocol as P
    from fabric.client import request
    from fabric.cluster import LocalCluster

    c = LocalCluster(cpus=cpus).start(executor=False)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                request(c.address, P.STATUS, timeout=1.0)
                break
            except Exception:  # noqa: BLE001 - not listening yet
                assert time.monotonic() < deadline, "the broker did not start"
                time.sleep(0.05)
        yield c
    finally:
        c.stop()


def wait_for(pred, timeout=10.0, every=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(every)
    return pred()


def run_script(code, env=None, timeout=60):
    """Run ``code`` in a fresh interpreter, as a user's script would run."""
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=e,
                          cwd=REPO)


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- moto's standalone server over HTTP (S3, EC2, autoscaling): real HTTP clients talk to it --
AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    # never reach a developer's real credentials or the EC2 metadata service
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}


def start_moto(extra_env: dict | None = None):
    """A moto server of its own on a free loopback port: ``(proc, endpoint)``, once it answers.
    For a server with settings of its own (authentication, a request recording); most tests
    share the session's (``moto_server``)."""
    import urllib.request

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", str(port), "-H", "127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **AWS_TEST_ENV, **(extra_env or {})})
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint + "/moto-api/data.json", timeout=1).read()
            return proc, endpoint
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"moto server did not start on {endpoint}")
            time.sleep(0.1)


def stop_moto(proc) -> None:
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def reset_moto(endpoint: str) -> None:
    """Forget everything the server holds (buckets, instances, groups): a fresh account."""
    import urllib.request

    urllib.request.urlopen(urllib.request.Request(endpoint + "/moto-api/reset", method="POST"), timeout=30).read()


@pytest.fixture(scope="session")
def moto_server():
    """The session's moto server: its endpoint. Each module keeps to its own bucket (or resets
    the server first, where it counts EC2 instances); stopped when the session ends."""
    pytest.importorskip("moto.server", reason="needs moto[server] (pip install 'fabric-compute[test]')")
    proc, endpoint = start_moto()
    try:
        yield endpoint
    finally:
        stop_moto(proc)
