"""The core's small public helpers for the libraries built on it (fabric.ml, fabric.serve):
``fabric.api.flush``, ``instance_id``, ``ship_by_value``, and ``fabric.config.pid_alive``."""
import os
import subprocess
import sys
import time

import cloudpickle
import pytest

import fabric
from fabric import api, config


@fabric.cls
class Box:
    def __init__(self, v):
        self.v = v

    def get(self):
        return self.v


def test_instance_id_is_the_same_in_every_copy(cluster):
    h = Box.remote(3)
    assert fabric.get(h.get.remote()) == 3
    i = api.instance_id(h)
    assert len(i) == 32 and int(i, 16) >= 0
    assert api.instance_id(cloudpickle.loads(cloudpickle.dumps(h))) == i
    assert api.instance_id(Box.remote(4)) != i
    with pytest.raises(TypeError, match="instance handle"):
        api.instance_id("not a handle")


def test_flush_sends_what_is_buffered(cluster):
    futs = [Box.remote(n).get.remote() for n in range(3)]
    api.flush()  # nothing to wait for: the submits leave now; the results still come
    assert fabric.get(futs, timeout=60) == [0, 1, 2]
    api.flush()  # an empty buffer: nothing happens


def test_flush_without_a_connection_does_nothing():
    out = subprocess.run([sys.executable, "-c", "from fabric import api; api.flush(); print('ok')"],
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr


def test_pid_alive():
    assert config.pid_alive(os.getpid())
    assert not config.pid_alive(0)
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    assert not config.pid_alive(p.pid)  # reaped: gone
    z = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # exited, not yet reaped: a zombie counts as gone
            if not config.pid_alive(z.pid):
                break
            time.sleep(0.05)
        assert not config.pid_alive(z.pid)
    finally:
        z.wait()
