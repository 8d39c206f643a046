"""Futures inside values (issue 18): a Future nested in an argument (a list, a dict, a
dataclass) arrives as a Future the call reads with ``.result()``/``fabric.get`` (as in Ray: not
resolved before the call runs, unlike a Future given as an argument itself); one returned
inside a result resolves on the driver. The driver holds such a result on the cluster until
the call that got it has run; reading one the cluster no longer holds is an error, not a hang.
Real processes: the embedded 2-CPU cluster, and a `fabric start` cluster."""
import dataclasses
import os
import time

import pytest

import fabric
from conftest import run_script, wait_for
from test_cluster import started  # noqa: F401 - the `fabric start` cluster fixture


@fabric.fn
def square(x):
    return x * x


@fabric.fn
def slow(x, t):
    time.sleep(t)
    return x


@fabric.fn(num_returns=2)
def pair(a, b):
    return a, b


@fabric.fn
def total(futs):
    """Sum a list of Futures read inside the call; says what arrived."""
    kinds = {type(f).__name__ for f in futs}
    return kinds, sum(fabric.get(futs))


@fabric.fn
def read_dict(d):
    return {k: (isinstance(v, fabric.Future), v.result()) for k, v in d.items()}


@dataclasses.dataclass
class Box:
    name: str
    fut: object


@fabric.fn
def read_box(box):
    return box.name, isinstance(box.fut, fabric.Future), box.fut.result()


@fabric.fn
def wait_first(futs):
    done, pending = fabric.wait(futs, num_returns=1, timeout=60)
    return len(done), len(pending), done[0].result()


@fabric.fn
def make_many(n):
    return {"squares": [square.remote(i) for i in range(n)], "ref": fabric.put("stored")}


@fabric.fn
def echo(x):
    return x


@fabric.fn
def read_after(go, futs):
    while not os.path.exists(go):
        time.sleep(0.02)
    return fabric.get(futs)


@fabric.cls
class Keeper:
    def __init__(self):
        self.kept = None

    def keep(self, futs):
        self.kept = futs  # not read now
        return len(futs)

    def give(self):
        return self.kept

    def read(self):
        try:
            return "value", self.kept[0].result(timeout=60)
        except fabric.FabricError as e:
            return type(e).__name__, str(e)


def _held(other, cid):
    """Whether the cluster still holds result ``cid``: read it from another real connection."""
    f = other.borrow(cid, "probe")
    try:
        f.result(timeout=60)
        return True
    except fabric.FabricError:
        return False


def test_a_list_of_futures_arrives_as_futures_read_inside_the_call(cluster):
    done = square.remote(3)
    assert done.result(timeout=60) == 9
    futs = [done, slow.remote(5, 0.5), square.remote(4)]  # done here, pending, pending
    kinds, s = total.remote(futs).result(timeout=120)
    assert kinds == {"Future"} and s == 9 + 5 + 16
    assert total.remote([]).result(timeout=60) == (set(), 0)
    assert total.remote(futs).result(timeout=60)[1] == 30  # the same Futures, passed again


def test_a_dict_and_a_dataclass_of_futures(cluster):
    ref = fabric.put([1, 2, 3])  # a fabric.put ref inside a value: by reference, read there
    out = read_dict.remote({"call": slow.remote("x", 0.3), "put": ref}).result(timeout=120)
    assert out == {"call": (True, "x"), "put": (True, [1, 2, 3])}
    assert read_box.remote(Box("b", square.remote(7))).result(timeout=60) == ("b", True, 49)
    a, b = pair.remote(1, slow.remote(2, 0.3))  # one value of a num_returns call, nested
    assert read_dict.remote({"b": b, "a": a}).result(timeout=60) == {"b": (True, 2), "a": (True, 1)}


def test_fabric_wait_inside_a_call_on_nested_futures(cluster):
    n, left, v = wait_first.remote([slow.remote("late", 30), square.remote(2)]).result(timeout=120)
    assert (n, left, v) == (1, 1, 4)


def test_a_top_level_future_is_still_resolved_before_the_call(cluster):
    assert echo.remote(square.remote(5)).result(timeout=60) == 25


def test_futures_returned_inside_a_result_resolve_on_the_driver(cluster):
    out = make_many.remote(4).result(timeout=120)
    assert all(isinstance(f, fabric.Future) for f in out["squares"])
    assert fabric.get(out["squares"]) == [0, 1, 4, 9]
    assert out["ref"].result() == "stored"
    # passed on to another call, such a Future travels by value (it is done)
    assert total.remote(out["squares"]).result(timeout=60)[1] == 14
    # a nested Future the call got, returned as it is
    back = echo.remote([slow.remote(11, 0.3)]).result(timeout=60)
    assert back[0].result() == 11


def test_a_nested_result_is_held_until_the_call_has_run_then_freed(cluster, tmp_path):
    from fabric import api
    from fabric.client import Client

    go = tmp_path / "go"
    a = square.remote(6)
    r = read_after.remote(str(go), [a])
    assert a.result(timeout=60) == 36  # the driver holds it; it would release it now ...
    other = Client(api._state.client.address)  # a second, real connection of this process
    try:
        time.sleep(0.3)  # (the driver's releases go out every 50 ms)
        assert _held(other, a.id)  # ... but the call that got it has not read it yet
        go.touch()
        assert r.result(timeout=60) == [36]
        cid = a.id
        del a
        assert wait_for(lambda: not _held(other, cid), timeout=30)  # freed once the call has run
    finally:
        other.close()


def test_a_future_from_another_connection_inside_a_value_is_refused(cluster):
    from fabric import api
    from fabric import protocol as P
    from fabric.client import Client

    other = Client(api._state.client.address)
    try:
        assert slow.remote(1, 0).result(timeout=30) == 1
        blob, h = slow._code
        theirs = other.submit(P.TASK, blob, h, (2, 30), {})  # pending on the other connection
        with pytest.raises(fabric.SerializationError, match="from another fabric connection"):
            total.remote([theirs])
        theirs.cancel()
    finally:
        other.close()
    assert total.remote([square.remote(2)]).result(timeout=60)[1] == 4  # the cluster keeps serving


def test_reading_a_released_nested_future_is_an_error_not_a_hang(cluster):
    """An instance keeps a Future it got inside an argument past that call: once the call has
    run and the driver released the result, reading it says so."""
    from fabric import api
    from fabric.client import Client

    k = Keeper.remote()
    a = square.remote(8)
    assert k.keep.remote([a]).result(timeout=60) == 1
    assert a.result(timeout=60) == 64
    other = Client(api._state.client.address)
    try:
        assert wait_for(lambda: not _held(other, a.id), timeout=30)
    finally:
        other.close()
    kind, msg = k.read.remote().result(timeout=60)
    assert kind == "ProtocolError" and "not held by the cluster" in msg, (kind, msg)
    # returned inside a result, it fails where it is read, with the same error
    back = k.give.remote().result(timeout=60)
    with pytest.raises(fabric.FabricError, match="not held by the cluster"):
        back[0].result()
    assert read_dict.remote({"a": square.remote(3)}).result(timeout=60) == {"a": (True, 9)}


def test_a_future_inside_a_put_object_is_refused(cluster):
    f = slow.remote(1, 0.2)
    with pytest.raises(fabric.SerializationError, match="fabric.put"):
        fabric.put({"f": f})
    assert f.result(timeout=60) == 1


def test_futures_inside_values_on_a_started_cluster(started):  # noqa: F811
    code = f"""
import fabric
fabric.init(address={started["address"]!r})

@fabric.fn
def square(x):
    return x * x

@fabric.fn
def total(futs):
    return sum(fabric.get(futs))

@fabric.fn
def make(n):
    return [square.remote(i) for i in range(n)]

ref = fabric.put(100)
assert total.remote([square.remote(2), square.remote(3), ref]).result(timeout=120) == 113
assert fabric.get(make.remote(3).result(timeout=120)) == [0, 1, 4]
print("nested values ok")
"""
    r = run_script(code, env=started["env"], timeout=300)
    assert r.returncode == 0, r.stderr
    assert "nested values ok" in r.stdout


def test_a_malformed_fetch_is_refused_and_the_cluster_serves(cluster, caplog):
    import logging

    from fabric import api
    from fabric import protocol as P

    c = api._state.client
    with caplog.at_level(logging.WARNING, logger="fabric.client"):
        c._send_d([P.C[P.FETCH], b"not 16 bytes"])
        c._send_d([P.C[P.FETCH]])
        assert wait_for(lambda: sum("FETCH takes one frame of 16-byte result ids" in r.getMessage()
                                    for r in caplog.records) >= 2, timeout=30)
    assert total.remote([square.remote(3)]).result(timeout=60)[1] == 9
