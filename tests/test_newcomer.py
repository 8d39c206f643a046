"""A newcomer's first hour: the mistakes people make first get a message that says what to do."""
import os
import subprocess
import sys
import threading
import warnings

import pytest

import fabric

from conftest import REPO, free_port

LOCK = threading.Lock()  # a module-level global that cannot be pickled


@fabric.fn
def uses_a_lock(x):
    with LOCK:
        return x


@fabric.fn
def add(a, b):
    return a + b


def _fabric(*args, env=None, timeout=60):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "fabric.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=e, cwd=REPO)


def test_an_unpicklable_global_is_a_serialization_error_naming_the_function_and_the_global(cluster):
    with pytest.raises(fabric.SerializationError) as ei:
        uses_a_lock.remote(1)
    msg = str(ei.value)
    assert "uses_a_lock" in msg and "'LOCK'" in msg and "_thread.lock" in msg
    assert add.remote(1, 2).result(timeout=60) == 3  # the cluster keeps serving


def test_an_unexpected_keyword_is_named_before_a_missing_argument(cluster):
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'c'"):
        add.remote(1, c=2)
    with pytest.raises(TypeError, match=r"missing a required argument: 'b'"):
        add.remote(1)
    assert add.remote(1, b=2).result(timeout=60) == 3


def test_a_second_init_with_other_arguments_warns_that_they_have_no_effect(cluster):
    with pytest.warns(RuntimeWarning, match=r"already initialized.*num_cpus=4.*fabric.shutdown\(\)"):
        fabric.init(num_cpus=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fabric.init()  # a plain second init() is harmless and says nothing
    assert add.remote(2, 2).result(timeout=60) == 4


@pytest.mark.parametrize("command", ["status", "stop"])
@pytest.mark.parametrize("address", ["banana", "tcp://nohostport", "tcp://:5555"])
def test_a_malformed_address_is_a_usage_error_not_a_traceback(command, address):
    r = _fabric(command, "--address", address)
    assert r.returncode == 2, r.stderr
    assert "is not a broker address" in r.stderr and "tcp://host:port" in r.stderr
    assert "Traceback" not in r.stderr and "ZMQError" not in r.stderr


def test_stop_with_nothing_running_says_no_cluster_runs(tmp_path):
    r = _fabric("stop", env={"FABRIC_HOME": str(tmp_path), "FABRIC_ADDRESS": ""})
    assert r.returncode == 1
    assert "no fabric cluster is running here" in r.stderr and "Traceback" not in r.stderr


def test_an_executor_with_no_broker_says_it_is_waiting_and_retrying(tmp_path):
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "fabric.cli", "executor", "--broker", f"tcp://127.0.0.1:{port}",
                          "--cpus", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, FABRIC_HOME=str(tmp_path)), cwd=REPO)
    try:
        line = p.stderr.readline()  # blocks until the executor says something on stderr
        assert "no broker answers at" in line and "retrying" in line, line
        assert p.poll() is None  # still waiting, not given up
    finally:
        p.kill()
        p.wait()


def test_import_fabric_is_light():
    code = ("import sys, fabric, fabric.ml; heavy = [m for m in ('pandas', 'pyarrow', 'torch', 'xgboost', "
            "'tensorflow', 'transformers', 'onnxruntime', 'starlette') if m in sys.modules]; print(heavy)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_a_missing_framework_names_the_pip_extra():
    from fabric.ml._deps import MissingDependency, need

    with pytest.raises(MissingDependency, match=r"pip install 'fabric-compute\[tf\]'") as ei:
        need("tensorflow_that_is_not_installed", "tf", why="TensorflowTrainer")
    assert isinstance(ei.value, ImportError) and isinstance(ei.value, fabric.FabricError)
