"""A driver never waits for ever on a broker that is gone (docs/guarantees.md, "The broker").

Each case on real processes: an embedded broker SIGKILLed; a `fabric start`-shaped broker (TCP)
killed and not restarted, restarted without a journal within FABRIC_BROKER_TIMEOUT and after
it, restarted from its journal after it, and frozen (SIGSTOP) then resumed. Restarted with its
journal within the window is test_restart.py's. No timing is asserted: each test waits on an
event (an outcome, a status) with a generous bound, and the outcome's type is the verdict
(ConnectionFailed, not a GetTimeout after the bound)."""
import asyncio
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import fabric
from fabric import api
from fabric import protocol as P
from fabric.client import request

from conftest import REPO, free_port, wait_for

GENEROUS = 60  # a bound on waits that normally end in a second or two: only a hang reaches it


def _status(address):
    try:
        return request(address, P.STATUS, timeout=1.0)
    except Exception:  # noqa: BLE001 - not answering now
        return None


@fabric.fn
def nap(t, path=None):
    if path:
        with open(path, "w"):
            pass
    time.sleep(t)
    return t


def _started(path):
    assert wait_for(lambda: os.path.exists(path), timeout=GENEROUS), "the call never started"


def test_embedded_broker_killed_fails_every_waiter_and_new_calls_at_once(tmp_path):
    fabric.shutdown()
    fabric.init(num_cpus=1)
    try:
        assert nap.remote(0).result(timeout=GENEROUS) == 0
        mark = str(tmp_path / "running")
        f = nap.remote(600, mark)
        g = nap.remote(600)  # queued behind it
        seen = threading.Event()
        f.add_done_callback(lambda _: seen.set())

        async def awaiter():
            try:
                await g
            except fabric.ConnectionFailed as e:
                return e

        _started(mark)
        broker = api._state.cluster.procs[0]
        os.kill(broker.pid, signal.SIGKILL)
        with pytest.raises(fabric.ConnectionFailed) as e:
            f.result(timeout=GENEROUS)  # a GetTimeout here would mean it waited out the bound
        msg = str(e.value)
        assert api._state.cluster.address in msg and f"pid {broker.pid}" in msg and "signal 9" in msg, msg
        assert seen.is_set()  # the callback ran, with the failed Future
        err = asyncio.run(asyncio.wait_for(awaiter(), GENEROUS))
        assert isinstance(err, fabric.ConnectionFailed) and "exited" in str(err)
        with pytest.raises(fabric.ConnectionFailed, match="exited"):
            nap.remote(0)  # fails at submit: nothing would ever answer
        with pytest.raises(fabric.ConnectionFailed, match="exited"):
            fabric.put(1)
    finally:
        fabric.shutdown()
    fabric.init(num_cpus=1)  # a new cluster works
    try:
        assert nap.remote(0).result(timeout=GENEROUS) == 0
    finally:
        fabric.shutdown()


@pytest.fixture
def tcp_cluster(tmp_path, monkeypatch):
    """A `fabric start`-shaped cluster without a journal or supervisor (so a killed broker stays
    dead until the test starts another), and a driver whose FABRIC_BROKER_TIMEOUT is 3 s."""
    from fabric.cluster import LocalCluster

    monkeypatch.setenv("FABRIC_BROKER_TIMEOUT", "3")
    address = f"tcp://127.0.0.1:{free_port()}"
    cl = LocalCluster(address=address, cpus=1, log_dir=str(tmp_path / "logs"))
    os.makedirs(cl.log_dir, exist_ok=True)
    cl.start()
    extra = []
    try:
        assert wait_for(lambda: (_status(address) or {}).get("executors"), timeout=GENEROUS)
        fabric.shutdown()
        fabric.init(address=address)
        cl.extra = extra
        yield cl
    finally:
        fabric.shutdown()
        for p in extra:
            if p.poll() is None:
                p.kill()
                p.wait()
        cl.stop()


def _kill(cl):
    pid = _status(cl.address)["pid"]
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: cl.procs[0].poll() is not None, timeout=GENEROUS)


def _new_broker(cl, tmp_path, journal=None):
    args = [sys.executable, "-m", "fabric.broker", "--address", cl.address, "--parent-pid", str(os.getpid()),
            "--log-file", str(tmp_path / f"broker-{len(cl.extra)}.log")]
    if journal:
        args += ["--journal", journal]
    p = subprocess.Popen(args, env=dict(os.environ, PYTHONPATH=REPO), stdin=subprocess.DEVNULL)
    cl.extra.append(p)
    assert wait_for(lambda: (_status(cl.address) or {}).get("executors"), timeout=GENEROUS)  # its executor is back
    return p


def test_remote_broker_killed_and_not_restarted_fails_pending_and_new_calls(tcp_cluster, tmp_path):
    mark = str(tmp_path / "running")
    f = nap.remote(600, mark)
    _started(mark)
    client = api._state.client
    _kill(tcp_cluster)
    with pytest.raises(fabric.ConnectionFailed) as e:
        f.result(timeout=GENEROUS)
    msg = str(e.value)
    assert tcp_cluster.address in msg and "has not answered for" in msg and "FABRIC_BROKER_TIMEOUT=3s" in msg, msg
    silent = float(msg.split("has not answered for ")[1].split("s")[0])
    assert silent >= 3  # it names how long it was silent, and that was at least the window
    with pytest.raises(fabric.ConnectionFailed, match="has not answered"):
        nap.remote(0)
    # a broker answers again (a new one, no journal): new calls go through; the failed call
    # stays failed (its outcome was given), and nothing arrives for it twice
    _new_broker(tcp_cluster, tmp_path)
    assert wait_for(lambda: client.gone is None, timeout=GENEROUS)
    assert nap.remote(0).result(timeout=GENEROUS) == 0
    with pytest.raises(fabric.ConnectionFailed):
        f.result()
    assert client.extra_outcomes == 0


def test_remote_broker_restarted_without_journal_within_the_window_loses_no_call(tcp_cluster, tmp_path,
                                                                                 monkeypatch):
    """Within FABRIC_BROKER_TIMEOUT the driver re-sends what it waits for to the new broker: the
    call runs again there (at-least-once) and its Future completes."""
    fabric.shutdown()
    monkeypatch.setenv("FABRIC_BROKER_TIMEOUT", str(GENEROUS))
    fabric.init(address=tcp_cluster.address)
    client = api._state.client
    mark = str(tmp_path / "running")
    f = nap.remote(1, mark)
    _started(mark)
    _kill(tcp_cluster)
    _new_broker(tcp_cluster, tmp_path)
    assert f.result(timeout=GENEROUS) == 1
    assert client.rejoins >= 1 and client.gone is None
    assert nap.remote(0).result(timeout=GENEROUS) == 0


def test_a_frozen_broker_is_silent_then_answers_again(tcp_cluster, tmp_path, monkeypatch):
    """SIGSTOP the broker: a GetTimeout meanwhile does not claim the call keeps running; after
    the window the call fails with ConnectionFailed; once the broker resumes, new calls work
    and the abandoned call is cancelled there (the same broker: no restart, no rejoin)."""
    fabric.shutdown()
    monkeypatch.setenv("FABRIC_BROKER_TIMEOUT", "6")  # room for a GetTimeout before it
    fabric.init(address=tcp_cluster.address)
    client = api._state.client
    mark = str(tmp_path / "running")
    f = nap.remote(600, mark)
    _started(mark)
    with pytest.raises(fabric.GetTimeout, match="it keeps running"):
        f.result(timeout=0.1)  # the broker is there: it does keep running
    pid = _status(tcp_cluster.address)["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        assert wait_for(lambda: time.monotonic() - client.heard > 3, timeout=GENEROUS)
        with pytest.raises(fabric.GetTimeout) as e:
            f.result(timeout=0.01)
        assert "keeps running" not in str(e.value) and "has not answered" in str(e.value), str(e.value)
        with pytest.raises(fabric.ConnectionFailed, match="has not answered"):
            f.result(timeout=GENEROUS)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert wait_for(lambda: client.gone is None, timeout=GENEROUS)
    assert nap.remote(0).result(timeout=GENEROUS) == 0
    # the abandoned 600 s calls were cancelled on the broker: nothing left running there
    assert wait_for(lambda: _status(tcp_cluster.address)["calls_pending"] == 0, timeout=GENEROUS)
    assert client.extra_outcomes == 0


def test_a_journaled_broker_back_after_the_window_cancels_the_failed_calls(tmp_path, monkeypatch):
    """A `fabric start` broker with its journal, killed with its supervisor and started again
    only after the driver's window: the driver already failed the call with ConnectionFailed,
    so the journal's copy is cancelled, not run for nobody; new calls work."""
    from fabric.cluster import LocalCluster

    monkeypatch.setenv("FABRIC_BROKER_TIMEOUT", "3")
    address = f"tcp://127.0.0.1:{free_port()}"
    journal = str(tmp_path / "journal.bin")
    cl = LocalCluster(address=address, cpus=1, log_dir=str(tmp_path / "logs"), journal=journal)
    os.makedirs(cl.log_dir, exist_ok=True)
    cl.start()
    cl.extra = []
    try:
        assert wait_for(lambda: (_status(address) or {}).get("executors"), timeout=GENEROUS)
        fabric.shutdown()
        fabric.init(address=address)
        client = api._state.client
        mark = str(tmp_path / "running")
        f = nap.remote(600, mark)
        queued = nap.remote(0, str(tmp_path / "queued-ran"))  # waits behind f (one cpu), journaled
        _started(mark)
        broker = _status(address)["pid"]
        os.kill(cl.procs[0].pid, signal.SIGKILL)  # the supervisor first, so nothing restarts it
        os.kill(broker, signal.SIGKILL)
        with pytest.raises(fabric.ConnectionFailed, match="has not answered"):
            f.result(timeout=GENEROUS)
        with pytest.raises(fabric.ConnectionFailed, match="has not answered"):
            queued.result(timeout=GENEROUS)
        _new_broker(cl, tmp_path, journal=journal)
        assert wait_for(lambda: client.gone is None, timeout=GENEROUS)
        assert nap.remote(0).result(timeout=GENEROUS) == 0
        assert wait_for(lambda: _status(address)["calls_pending"] == 0, timeout=GENEROUS)
        assert not os.path.exists(tmp_path / "queued-ran")  # cancelled, never run for nobody
        assert client.extra_outcomes == 0
    finally:
        fabric.shutdown()
        for p in cl.extra:
            if p.poll() is None:
                p.kill()
                p.wait()
        cl.stop()


def test_broker_timeout_must_be_a_positive_number(monkeypatch):
    from fabric.client import _env_seconds

    monkeypatch.setenv("FABRIC_BROKER_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="FABRIC_BROKER_TIMEOUT must be a number of seconds"):
        _env_seconds("FABRIC_BROKER_TIMEOUT", 30.0)
    monkeypatch.setenv("FABRIC_BROKER_TIMEOUT", "0")
    with pytest.raises(ValueError, match="above 0"):
        _env_seconds("FABRIC_BROKER_TIMEOUT", 30.0)
    monkeypatch.setenv("FABRIC_BROKER_TIMEOUT", "")
    assert _env_seconds("FABRIC_BROKER_TIMEOUT", 30.0) == 30.0
