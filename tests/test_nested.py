"""Nested calls free their CPU (issue 18): a call blocked in fabric.get / .result() on calls it
submitted lends its CPUs out (BLOCKED/UNBLOCKED, docs/protocol.md), so nesting deeper than the
cluster's CPUs finishes. On the embedded 2-CPU cluster, real processes."""
import os
import time

import fabric
from conftest import run_script, wait_for
from test_cluster import started  # noqa: F401 - the `fabric start` cluster fixture


def test_a_chain_deeper_than_the_cpus_finishes(cluster):
    """Each call waits on the next: 7 calls in one chain on 2 CPUs. Without lending, the first
    two would hold both CPUs and the third would never start."""
    @fabric.fn
    def down(n):
        return 0 if n == 0 else 1 + down.remote(n - 1).result()

    assert down.remote(6).result(timeout=240) == 6
    assert wait_for(lambda: fabric.available_resources()["CPU"] == 2, timeout=30)  # all taken back


def test_a_recursive_tree_deeper_than_the_cpus_finishes(cluster):
    @fabric.fn
    def fib(n):
        if n < 2:
            return n
        return sum(fabric.get([fib.remote(n - 1), fib.remote(n - 2)]))

    assert fib.remote(6).result(timeout=300) == 8
    assert wait_for(lambda: fabric.available_resources()["CPU"] == 2, timeout=30)


def test_a_fan_out_of_equal_shapes_finishes(cluster):
    """Parents and children are one function (so one shape and one known-short average): the
    broker would prefetch children behind their blocked parent. They are taken back instead."""
    @fabric.fn
    def node(level, width):
        if level == 0:
            return 1
        return sum(fabric.get([node.remote(level - 1, width) for _ in range(width)]))

    assert sum(fabric.get([node.remote(0, 0) for _ in range(200)], timeout=120)) == 200  # known short
    assert sum(fabric.get([node.remote(1, 10) for _ in range(20)], timeout=300)) == 200
    assert wait_for(lambda: fabric.available_resources()["CPU"] == 2, timeout=30)


def test_a_blocked_call_lends_its_cpu_and_takes_it_back(cluster, tmp_path):
    """While the parent waits, its CPU is free (only the child's is held); once the child ends
    the parent has its CPU again until it returns; then both are back."""
    go, entered = tmp_path / "go", tmp_path / "entered"

    @fabric.fn
    def child(go, entered):
        open(entered, "w").close()
        while not os.path.exists(go):
            time.sleep(0.02)
        return 5

    @fabric.fn
    def parent(go, entered):
        v = child.remote(go, entered).result()
        time.sleep(1.0)  # running again: its CPU is taken back
        return v + 1

    fut = parent.remote(str(go), str(entered))
    assert wait_for(entered.exists, timeout=60)
    assert wait_for(lambda: fabric.available_resources()["CPU"] == 1, timeout=30)
    go.touch()
    assert fut.result(timeout=60) == 6
    assert wait_for(lambda: fabric.available_resources()["CPU"] == 2, timeout=30)


def test_waits_in_a_plain_driver_and_on_ready_results_send_nothing(cluster):
    """The driver has no worker hook: its waits cost nothing more."""
    from fabric import client

    assert client.blocking is None

    @fabric.fn
    def ready_then_get():
        from fabric import client as c

        f = fabric.put(3)
        return c.blocking is not None, fabric.get(f)

    assert ready_then_get.remote().result(timeout=60) == (True, 3)


def test_a_chain_deeper_than_the_cpus_on_a_started_cluster(started):  # noqa: F811
    """`fabric start` with 2 CPUs plus an executor of 1: a chain of 7 calls on 3 CPUs."""
    code = f"""
import fabric
fabric.init(address={started["address"]!r})
assert fabric.cluster_resources()["CPU"] == 3, fabric.cluster_resources()

@fabric.fn
def down(n):
    return 0 if n == 0 else 1 + down.remote(n - 1).result()

assert down.remote(6).result(timeout=240) == 6
print("nested ok")
"""
    r = run_script(code, env=started["env"], timeout=300)
    assert r.returncode == 0, r.stderr
    assert "nested ok" in r.stdout


# Other waits of a call (issue 18): `await`, the user's own threads, a Stream, fabric.wait.
# Each chain is 5 calls deep on 2 CPUs: without lending, the first two hold both CPUs and wait
# for ever.
def test_await_in_an_async_function_lends_its_cpu(cluster):
    @fabric.fn
    async def down(n):
        return 0 if n == 0 else 1 + await down.remote(n - 1)

    assert down.remote(4).result(timeout=240) == 4
    assert wait_for(lambda: fabric.available_resources()["CPU"] == 2, timeout=30)


def test_a_wait_in_a_thread_of_the_call_lends_its_cpu(cluster):
    @fabric.fn
    def down(n):
        from concurrent.futures import ThreadPoolExecutor

        if n == 0:
            return 0
        with ThreadPoolExecutor(1) as pool:
            return 1 + pool.submit(lambda: down.remote(n - 1).result()).result()

    assert down.remote(4).result(timeout=240) == 4
    assert wait_for(lambda: fabric.available_resources()["CPU"] == 2, timeout=30)


def test_waiting_on_a_stream_lends_its_cpu(cluster):
    @fabric.fn
    def chain(n):
        if n == 0:
            yield 0
            return
        for fut in chain.remote(n - 1):
            yield fut.result() + 1

    assert [f.result() for f in chain.remote(4)] == [4]
    assert wait_for(lambda: fabric.available_resources()["CPU"] == 2, timeout=30)


def test_async_for_over_a_stream_lends_its_cpu(cluster):
    @fabric.fn
    async def chain(n):
        if n == 0:
            yield 0
            return
        async for fut in chain.remote(n - 1):
            yield (await fut) + 1

    assert [f.result() for f in chain.remote(4)] == [4]


def test_fabric_wait_lends_its_cpu(cluster):
    @fabric.fn
    def down(n):
        if n == 0:
            return 0
        done, _ = fabric.wait([down.remote(n - 1)], num_returns=1)
        return 1 + done[0].result()

    assert down.remote(4).result(timeout=240) == 4
    assert wait_for(lambda: fabric.available_resources()["CPU"] == 2, timeout=30)


@fabric.cls
class Node:
    """Each instance holds 1 CPU for life: a chain of 4 on 2 CPUs needs the waiting ones to lend."""

    def down(self, n):
        return 0 if n == 0 else 1 + Node.remote().down.remote(n - 1).result()

    async def adown(self, n):
        return 0 if n == 0 else 1 + await Node.remote().adown.remote(n - 1)


def test_a_wait_in_an_instance_method_lends_its_cpus(cluster):
    assert Node.remote().down.remote(3).result(timeout=300) == 3
    assert Node.remote().adown.remote(3).result(timeout=300) == 3  # `await` in an async method
    assert wait_for(lambda: fabric.available_resources()["CPU"] == 2, timeout=60)  # instances gone
