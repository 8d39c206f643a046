"""Shared fixtures: every test runs against real processes (broker, executors, workers)."""
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
