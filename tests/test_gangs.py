"""Gangs (issue 4): n members that start together or not at all, on real processes.

The cluster is the shared 2-CPU embedded one (``cluster`` fixture), so a gang of two
``cpus=1`` members takes all of it. Members prove that they run at the same time, and that
their addresses are right, by a rendezvous over TCP: rank 0 listens on its address and every
other member connects to it, says its rank and waits for the list of ranks rank 0 heard.
"""
import os
import socket
import time

import psutil
import pytest

import fabric
from conftest import wait_for


def _read_all(sock):
    out = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return out
        out += chunk


def rendezvous(tag, hold=0.0):
    """Meet every other member through rank 0's address; returns what this member saw."""
    ctx = fabric.gang_context()
    start = time.time()
    if ctx.rank == 0:
        srv = socket.create_server((ctx.master_addr, ctx.master_port))
        srv.settimeout(30)
        heard, conns = [0], []
        while len(heard) < ctx.world_size:
            c, _ = srv.accept()
            c.settimeout(30)
            heard.append(int(_read_all(c)))
            conns.append(c)
        reply = ",".join(str(r) for r in sorted(heard)).encode()
        for c in conns:
            c.sendall(reply)
            c.close()
        srv.close()
        seen = sorted(heard)
    else:
        with socket.create_server((ctx.host, ctx.port)):  # its own address is one it can listen on
            pass
        deadline = time.time() + 30
        while True:
            try:
                s = socket.create_connection((ctx.master_addr, ctx.master_port), timeout=5)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.02)
        s.settimeout(30)
        s.sendall(str(ctx.rank).encode())
        s.shutdown(socket.SHUT_WR)
        seen = [int(x) for x in _read_all(s).decode().split(",")]
        s.close()
    time.sleep(hold)
    return {"tag": tag, "rank": ctx.rank, "world_size": ctx.world_size, "local_rank": ctx.local_rank,
            "addresses": list(ctx.addresses), "seen": seen, "pid": os.getpid(), "start": start, "end": time.time(),
            "env": [os.environ[k] for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")]}


@fabric.fn
def span(t):
    start = time.time()
    time.sleep(t)
    return start, time.time()


@fabric.fn
def square(x):
    return x * x


def _check_gang(results, n, tag=None):
    assert [r["rank"] for r in results] == list(range(n))          # rank order, each rank once
    assert all(r["world_size"] == n for r in results)
    assert all(r["seen"] == list(range(n)) for r in results)       # all met rank 0: they ran together
    assert len({r["pid"] for r in results}) == n                   # each in a process of its own
    addresses = results[0]["addresses"]
    assert len(addresses) == n and len(set(addresses)) == n
    assert all(r["addresses"] == addresses for r in results)
    host, port = addresses[0].rsplit(":", 1)
    assert all(r["env"] == [str(r["rank"]), str(n), host, port] for r in results)  # torchrun's variables
    if tag is not None:
        assert all(r["tag"] == tag for r in results)


def test_members_start_together_with_ranks_and_addresses(cluster):
    futs = fabric.gang(2, cpus=1).run(rendezvous, "hello")
    assert len(futs) == 2 and all(isinstance(f, fabric.Future) for f in futs)
    results = fabric.get(futs, timeout=60)
    _check_gang(results, 2, "hello")
    assert sorted(r["local_rank"] for r in results) == [0, 1]     # one executor: local ranks 0..n-1
    assert square.remote(5).result(timeout=30) == 25                # ordinary calls go on


def test_a_future_argument_is_resolved_for_every_member(cluster):
    # the gang waits for its argument, a call still running, then starts
    futs = fabric.gang(2, cpus=1).run(rendezvous, square.remote(7))
    _check_gang(fabric.get(futs, timeout=60), 2, 49)


def test_a_gang_larger_than_the_cluster_is_refused_at_once(cluster):
    # "at once": Unschedulable, not a GetTimeout after the bound (no wall-clock check: a loaded
    # machine is slow, not wrong)
    futs = fabric.gang(3, cpus=1).run(rendezvous, "too big")
    for f in futs:
        with pytest.raises(fabric.Unschedulable, match=r"gang of 3 members .* can never start: .* at most 2"):
            f.result(timeout=30)
    with pytest.raises(fabric.Unschedulable, match="never start"):
        fabric.gang(1, cpus=1, memory="100TiB").run(rendezvous, "x")[0].result(timeout=30)
    with pytest.raises(ValueError, match="whole number"):
        fabric.gang(2, gpus=1.5)
    with pytest.raises(ValueError, match="1 to 1024 members"):
        fabric.gang(0)
    assert square.remote(3).result(timeout=30) == 9


def test_a_gang_waits_until_all_of_it_fits_then_starts(cluster):
    blockers = [span.remote(2.0) for _ in range(2)]                 # both CPUs busy for 2 s
    time.sleep(0.3)
    futs = fabric.gang(2, cpus=1).run(rendezvous, "later")
    assert wait_for(lambda: any(g["state"] == "queued" for g in fabric.cluster_status()["gangs"]), timeout=5)
    assert not any(f.done() for f in futs)
    ends = [e for _, e in fabric.get(blockers, timeout=60)]
    results = fabric.get(futs, timeout=60)
    _check_gang(results, 2, "later")
    assert min(r["start"] for r in results) >= max(ends) - 0.05    # no member started early


def test_two_gangs_that_each_need_the_whole_cluster_both_complete(cluster):
    a = fabric.gang(2, cpus=1).run(rendezvous, "a", 0.5)
    b = fabric.gang(2, cpus=1).run(rendezvous, "b", 0.5)
    ra, rb = fabric.get(a, timeout=90), fabric.get(b, timeout=90)
    _check_gang(ra, 2, "a")
    _check_gang(rb, 2, "b")
    (first, second) = sorted([ra, rb], key=lambda rs: min(r["start"] for r in rs))
    assert max(r["end"] for r in first) <= min(r["start"] for r in second) + 0.05  # one after the other


def crash_or_sleep(marker, crash_rank, once):
    """``crash_rank`` exits hard (on every attempt, or only the first when ``once``); the others
    note their pid and sleep. Each member appends to a file per rank, so attempts can be counted."""
    ctx = fabric.gang_context()
    with open(f"{marker}.{ctx.rank}", "a") as f:
        f.write(f"{os.getpid()}\n")
    if ctx.rank == crash_rank and not (once and os.path.exists(marker)):
        open(marker, "w").close()
        deadline = time.time() + 20
        while not all(os.path.exists(f"{marker}.{r}") for r in range(ctx.world_size)) and time.time() < deadline:
            time.sleep(0.02)  # the others are running by now
        os._exit(3)
    if once:
        return ctx.rank, sum(1 for _ in open(f"{marker}.{ctx.rank}"))
    time.sleep(60)
    return ctx.rank


def test_a_member_crash_fails_the_whole_gang_and_stops_the_others(cluster, tmp_path):
    marker = str(tmp_path / "crash")
    futs = fabric.gang(2, cpus=1).run(crash_or_sleep, marker, 1, False)
    for f in futs:  # (rank 0 sleeps 60 s: GangFailed within the 30 s bound means it was stopped)
        with pytest.raises(fabric.GangFailed, match=r"rank 1 of 2 died \(exit code 3\)"):
            f.result(timeout=30)
    pid0 = int(open(f"{marker}.0").read().split()[0])
    assert wait_for(lambda: not psutil.pid_exists(pid0), timeout=10)   # and its process was killed
    assert issubclass(fabric.GangFailed, fabric.WorkerCrashed)
    assert square.remote(4).result(timeout=30) == 16
    _check_gang(fabric.get(fabric.gang(2, cpus=1).run(rendezvous, "after"), timeout=60), 2, "after")


def test_a_member_crash_reruns_the_whole_gang_within_its_retries(cluster, tmp_path):
    marker = str(tmp_path / "once")
    futs = fabric.gang(2, cpus=1, retries=1).run(crash_or_sleep, marker, 1, True)
    assert fabric.get(futs, timeout=60) == [(0, 2), (1, 2)]         # both ranks ran twice: a whole rerun
    assert fabric.cluster_status()["stats"]["retried"] >= 1


def raise_on_rank_one():
    ctx = fabric.gang_context()
    if ctx.rank == 1:
        time.sleep(0.3)
        raise KeyError("rank one gave up")
    time.sleep(60)


def test_a_member_that_raises_fails_the_gang_without_a_rerun(cluster):
    f0, f1 = fabric.gang(2, cpus=1, retries=3).run(raise_on_rank_one)
    with pytest.raises(KeyError, match="rank one gave up"):
        f1.result(timeout=30)
    with pytest.raises(fabric.GangFailed, match="rank 1 of 2 raised an exception"):
        f0.result(timeout=30)  # rank 0 sleeps 60 s: within the bound means it was stopped
    assert square.remote(6).result(timeout=30) == 36


def test_cancelling_a_member_cancels_the_gang(cluster):
    futs = fabric.gang(2, cpus=1).run(span, 60)  # a @fabric.fn runs with the gang's resources
    assert wait_for(lambda: any(g["state"] == "running" for g in fabric.cluster_status()["gangs"]), timeout=30)
    futs[1].cancel()
    for f in futs:
        with pytest.raises(fabric.Cancelled):
            f.result(timeout=30)
    assert wait_for(lambda: not fabric.cluster_status()["gangs"], timeout=10)
    assert fabric.get([square.remote(i) for i in range(4)], timeout=30) == [0, 1, 4, 9]


def test_gang_context_outside_a_gang_says_so(cluster):
    with pytest.raises(fabric.FabricError, match="only available inside a member of a gang"):
        fabric.gang_context()

    @fabric.fn
    def plain():
        try:
            fabric.gang_context()
        except fabric.FabricError as e:
            return str(e)

    assert "inside a member of a gang" in plain.remote().result(timeout=30)


def sleep_long():
    time.sleep(60)


def test_a_member_that_times_out_gets_task_timeout_and_the_others_gang_failed(cluster):
    futs = fabric.gang(2, cpus=1, timeout=1.0, retries=0).run(sleep_long)
    outcomes = {}
    for rank, f in enumerate(futs):
        with pytest.raises((fabric.TaskTimeout, fabric.GangFailed)) as ei:
            f.result(timeout=50)  # (a GetTimeout would mean the timeout was not enforced)
        outcomes[rank] = ei.value
    timed_out = [r for r, e in outcomes.items() if isinstance(e, fabric.TaskTimeout)]
    assert len(timed_out) == 1, outcomes  # the one the broker found first; the other was stopped
    other = 1 - timed_out[0]
    assert isinstance(outcomes[other], fabric.GangFailed), outcomes
    assert f"rank {timed_out[0]} of 2 ran longer than its timeout" in str(outcomes[other])
    assert square.remote(5).result(timeout=30) == 25


def test_resources_are_whole_after_gangs(cluster, tmp_path):
    # gangs of each ending first, so that this holds when the test runs alone too
    assert fabric.get(fabric.gang(2, cpus=1).run(rendezvous, "ok"), timeout=60)
    for f in fabric.gang(2, cpus=1).run(crash_or_sleep, str(tmp_path / "c"), 1, False):
        with pytest.raises(fabric.GangFailed):
            f.result(timeout=30)

    def whole():
        ex = fabric.cluster_status()["executors"][0]
        return ex["free_cpus"] == ex["cpus"] and not fabric.cluster_status()["gangs"]

    assert wait_for(whole, timeout=15)


def where_and_wait(marker):
    """Note this attempt (and the executor's pid); the first attempt waits to be stopped."""
    ctx = fabric.gang_context()
    with open(f"{marker}.{ctx.rank}", "a") as f:
        f.write(f"{os.getppid()}\n")
    if sum(1 for _ in open(f"{marker}.{ctx.rank}")) < 2:
        time.sleep(60)
        raise TimeoutError("nobody stopped the executor")
    return ctx.rank, ctx.local_rank, ctx.local_world_size, os.getppid()


def test_a_gang_across_executors_reruns_when_one_leaves(tmp_path):
    """Three 1-CPU executors: a gang of two spans two of them; stopping one reruns the gang."""
    from fabric.cluster import LocalCluster

    fabric.shutdown()
    lc = LocalCluster(cpus=1).start()
    try:
        second = lc.add_executor()
        lc.add_executor()
        fabric.init(address=lc.address)
        assert wait_for(lambda: len(fabric.cluster_status()["executors"]) == 3, timeout=30)
        marker = str(tmp_path / "m")
        futs = fabric.gang(2, cpus=1, retries=1).run(where_and_wait, marker)
        assert wait_for(lambda: all(os.path.exists(f"{marker}.{r}") for r in range(2)), timeout=30)
        first_parents = {int(open(f"{marker}.{r}").read().split()[0]) for r in range(2)}
        assert len(first_parents) == 2                              # one member per executor
        victim = second if second.pid in first_parents else lc.procs[1]
        victim.terminate()                                          # it stops its workers, says EXEC_BYE
        victim.wait(10)
        results = fabric.get(futs, timeout=60)
        assert [r[0] for r in results] == [0, 1]
        assert all(r[1:3] == (0, 1) for r in results)                 # alone on their executors
        assert victim.pid not in {r[3] for r in results} and len({r[3] for r in results}) == 2
        assert all(len(open(f"{marker}.{r}").read().split()) == 2 for r in range(2))  # both ran twice
        assert wait_for(lambda: all(e["free_cpus"] == e["cpus"] for e in fabric.cluster_status()["executors"]),
                        timeout=15)
    finally:
        fabric.shutdown()
        lc.stop()


def test_min_warm_starts_the_next_gang_in_the_same_warm_workers(cluster):
    g = fabric.gang(2, cpus=1, min_warm=2)
    first = fabric.get(g.run(rendezvous, "a"), timeout=60)
    _check_gang(first, 2, "a")
    second = fabric.get(g.run(rendezvous, "b"), timeout=60)
    _check_gang(second, 2, "b")  # ranks, addresses and torchrun's variables are this gang's
    assert {r["pid"] for r in second} == {r["pid"] for r in first}
    ex = fabric.cluster_status()["executors"][0]
    assert ex["free_cpus"] == ex["cpus"]  # kept workers hold nothing
    assert fabric.get([square.remote(i) for i in range(4)], timeout=30) == [0, 1, 4, 9]
    # a gang without min_warm starts fresh processes, as does a warm gang of another shape
    third = fabric.get(fabric.gang(2, cpus=1).run(rendezvous, "c"), timeout=60)
    assert not {r["pid"] for r in third} & {r["pid"] for r in first}
    fourth = fabric.get(fabric.gang(2, cpus=0.5, min_warm=2).run(rendezvous, "d"), timeout=60)
    assert not {r["pid"] for r in fourth} & {r["pid"] for r in first}


def test_min_warm_keeps_no_worker_of_a_gang_that_failed(cluster):
    g = fabric.gang(2, cpus=1, min_warm=2)
    before = {r["pid"] for r in fabric.get(g.run(rendezvous, "a"), timeout=60)}
    futs = g.run(raise_on_rank_one)  # runs in the kept workers, and fails
    with pytest.raises(KeyError):
        futs[1].result(timeout=30)
    with pytest.raises(fabric.GangFailed):
        futs[0].result(timeout=30)
    assert wait_for(lambda: not any(psutil.pid_exists(p) for p in before), timeout=15)
    after = {r["pid"] for r in fabric.get(g.run(rendezvous, "b"), timeout=60)}
    assert not after & before


WARM_DRIVER = """
import json, os, sys
sys.path.insert(0, {tests!r})
import fabric
from test_gangs import rendezvous
fabric.init(address={address!r})
g = fabric.gang(2, cpus=1, min_warm=2)
pids = [r["pid"] for r in fabric.get(g.run(rendezvous, 1), timeout=60)]
again = [r["pid"] for r in fabric.get(g.run(rendezvous, 2), timeout=60)]
print(json.dumps({{"pids": pids, "again": again}}))
fabric.shutdown()
"""


def test_min_warm_workers_stop_when_their_driver_leaves():
    import json

    from conftest import run_script

    fabric.shutdown()  # a cluster of this test's own: a test above may have stopped the module's
    info = fabric.init(num_cpus=2)
    code = WARM_DRIVER.format(tests=os.path.dirname(os.path.abspath(__file__)), address=info["address"])
    r = run_script(code, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert sorted(out["pids"]) == sorted(out["again"])
    assert wait_for(lambda: not any(psutil.pid_exists(p) for p in out["pids"]), timeout=15)
    _check_gang(fabric.get(fabric.gang(2, cpus=1, min_warm=2).run(rendezvous, "x"), timeout=60), 2, "x")
