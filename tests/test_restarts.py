"""Instance restarts (issue 18): `@fabric.cls(max_restarts=N, max_task_retries=M)` re-creates an
instance whose worker died (its __init__ and @enter run again), re-runs the calls it had been
sent while they have retries, and beyond N restarts fails with ActorDied naming the cause."""
import os
import signal

import pytest

import fabric
from conftest import run_script, wait_for
from test_cluster import started  # noqa: F401 - the `fabric start` cluster fixture


def _marks(folder, prefix):
    return sum(1 for f in os.listdir(folder) if f.startswith(prefix))


def make_class(folder, **opts):
    @fabric.cls(cpus=0, **opts)
    class Fragile:
        def __init__(self):
            self.n = 0
            open(os.path.join(folder, f"init-{os.getpid()}"), "w").close()

        @fabric.enter
        def setup(self):
            open(os.path.join(folder, f"enter-{os.getpid()}"), "w").close()

        def inc(self):
            self.n += 1
            return self.n

        def pid(self):
            return os.getpid()

        def die(self):
            os._exit(1)

        def die_once(self, tag):
            mark = os.path.join(folder, f"died-{tag}")
            if not os.path.exists(mark):
                open(mark, "w").close()
                os._exit(1)
            return "second run"

    return Fragile


def test_an_instance_is_restarted_up_to_max_restarts(cluster, tmp_path):
    Fragile = make_class(str(tmp_path), max_restarts=2)
    c = Fragile.remote()
    assert [c.inc.remote().result(timeout=60) for _ in range(2)] == [1, 2]
    with pytest.raises(fabric.ActorDied, match=r"exit code 1.*being restarted \(1 of 2\)"):
        c.die.remote().result(timeout=60)  # no max_task_retries: the call that was running fails
    assert c.inc.remote().result(timeout=60) == 1  # a new instance: its state started again
    assert _marks(tmp_path, "init-") == 2 and _marks(tmp_path, "enter-") == 2
    pid = c.pid.remote().result(timeout=30)
    os.kill(pid, signal.SIGKILL)  # killed from outside, between calls
    assert wait_for(lambda: _marks(tmp_path, "init-") == 3, timeout=60)
    assert c.inc.remote().result(timeout=60) == 1
    with pytest.raises(fabric.ActorDied, match="max_restarts=2 restarts are spent"):
        c.die.remote().result(timeout=60)
    with pytest.raises(fabric.ActorDied, match="max_restarts=2 restarts are spent"):
        c.inc.remote().result(timeout=30)  # and every later call
    assert _marks(tmp_path, "init-") == 3


def test_max_task_retries_reruns_the_calls_cut_off_in_order(cluster, tmp_path):
    Fragile = make_class(str(tmp_path), max_restarts=1, max_task_retries=1)
    c = Fragile.remote()
    assert c.inc.remote().result(timeout=60) == 1
    futs = [c.die_once.remote("a"), c.inc.remote(), c.inc.remote()]  # sent to the worker together
    assert fabric.get(futs, timeout=90) == ["second run", 1, 2]  # re-run, in order, on the new instance
    assert _marks(tmp_path, "init-") == 2


def test_a_constructor_that_fails_on_restart_ends_the_instance_with_its_error(cluster, tmp_path):
    folder = str(tmp_path)

    @fabric.cls(cpus=0, max_restarts=3)
    class OnceOnly:
        def __init__(self):
            mark = os.path.join(folder, "built")
            if os.path.exists(mark):
                raise RuntimeError("cannot be built twice")
            open(mark, "w").close()

        def die(self):
            os._exit(1)

        def ping(self):
            return "pong"

    o = OnceOnly.remote()
    assert o.ping.remote().result(timeout=60) == "pong"
    with pytest.raises(fabric.ActorDied):
        o.die.remote().result(timeout=60)
    with pytest.raises(RuntimeError, match="cannot be built twice"):
        o.ping.remote().result(timeout=60)


def test_bad_restart_options_are_refused(cluster):
    for bad in (-2, 10001, "3", True, 1.5):
        with pytest.raises(ValueError, match="max_restarts must be a whole number from 0 to 10000, or -1"):
            fabric.cls(max_restarts=bad)(type("K", (), {}))
        with pytest.raises(ValueError, match="max_task_retries must be a whole number"):
            fabric.cls(max_task_retries=bad)(type("K", (), {}))
    with pytest.raises(TypeError, match="unknown option"):
        fabric.fn(max_restarts=1)(lambda: 1)


RESTART_SCRIPT = """
import os, fabric
fabric.init(address={address!r})

@fabric.cls(cpus=0, max_restarts=-1, max_task_retries=-1)
class Keeper:
    def __init__(self):
        self.n = 0
    def inc(self):
        self.n += 1
        return self.n
    def die_once(self, mark):
        if not os.path.exists(mark):
            open(mark, "w").close()
            os._exit(3)
        return "again"

k = Keeper.remote()
assert k.inc.remote().result(timeout=60) == 1
assert k.die_once.remote({mark!r}).result(timeout=120) == "again"
assert k.inc.remote().result(timeout=60) == 1
print("restarts ok")
"""


def test_restarts_on_a_started_cluster(started, tmp_path):  # noqa: F811
    r = run_script(RESTART_SCRIPT.format(address=started["address"], mark=str(tmp_path / "m")),
                   env=started["env"], timeout=240)
    assert r.returncode == 0, r.stderr
    assert "restarts ok" in r.stdout
