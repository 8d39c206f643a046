"""Streaming generators and num_returns (issue 18): a generator's `.remote()` is a Stream of
Futures, one per item as the worker makes it, with backpressure, cancellation when the consumer
stops, and errors at the item where they happened. On the embedded and a `fabric start` cluster."""
import asyncio
import logging
import os
import pickle
import time

import pytest

import fabric
from conftest import run_script, wait_for
from test_cluster import started  # noqa: F401 - the `fabric start` cluster fixture


def _count(folder, prefix):
    return sum(1 for f in os.listdir(folder) if f.startswith(prefix))


def test_items_arrive_as_they_are_made(cluster, tmp_path):
    """Item 0 reaches the driver while the generator still waits for the test to let it go on."""
    @fabric.fn
    def gated(folder):
        yield "first"
        while not os.path.exists(os.path.join(folder, "go")):
            time.sleep(0.02)
        yield "second"

    s = gated.remote(str(tmp_path))
    assert isinstance(s, fabric.Stream)
    first = s.next(timeout=60)
    assert first.done() and first.result() == "first"
    with pytest.raises(fabric.GetTimeout):
        s.next(timeout=0.3)  # the generator is still waiting: nothing more yet, and the stream goes on
    (tmp_path / "go").touch()
    assert [f.result() for f in s] == ["second"]
    assert s.future.result(timeout=30) == 2  # the call's own outcome: how many items


def test_sync_and_async_generators_and_async_for(cluster):
    @fabric.fn
    def words(text):
        yield from text.split()

    @fabric.fn
    async def counts(n):
        for i in range(n):
            await asyncio.sleep(0.001)
            yield i * i

    assert [f.result() for f in words.remote("a b c")] == ["a", "b", "c"]
    assert fabric.get(list(words.remote("x y"))) == ["x", "y"]
    assert [f.result() for f in counts.remote(4)] == [0, 1, 4, 9]

    async def consume():
        return [await f async for f in counts.remote(5)], [await f async for f in words.remote("p q")]

    assert asyncio.run(consume()) == ([0, 1, 4, 9, 16], ["p", "q"])
    assert [f.result() for f in words.remote("")] == []  # no items: the loop just ends


def test_an_error_is_raised_at_the_item_where_it_happened(cluster):
    @fabric.fn
    def two_then_fail():
        yield 1
        yield 2
        raise KeyError("third")

    s = two_then_fail.remote()
    futs = list(s)
    assert [f.result() for f in futs[:2]] == [1, 2]
    assert len(futs) == 3  # the last one raises the generator's own error, then the stream ends
    with pytest.raises(KeyError, match="third"):
        futs[2].result()
    with pytest.raises(KeyError):
        s.future.result()

    @fabric.fn
    def lock_item():
        import threading

        yield 1
        yield threading.Lock()
        yield 3

    futs = list(lock_item.remote())
    assert futs[0].result() == 1 and len(futs) == 2
    with pytest.raises(fabric.SerializationError, match="item 1 of lock_item cannot be pickled"):
        futs[1].result()


def test_backpressure_pauses_the_worker(cluster, tmp_path):
    """With backpressure=4 the worker makes 4 items and waits until the consumer takes some."""
    @fabric.fn(backpressure=4)
    def producer(folder):
        for i in range(100):
            open(os.path.join(folder, f"made-{i}"), "w").close()
            yield i

    s = producer.remote(str(tmp_path))
    assert wait_for(lambda: _count(tmp_path, "made-") >= 4, timeout=60)
    time.sleep(1.0)
    assert _count(tmp_path, "made-") == 4  # paused: nothing taken yet
    assert [s.next(timeout=30).result() for _ in range(2)] == [0, 1]
    assert wait_for(lambda: _count(tmp_path, "made-") >= 6, timeout=30)
    time.sleep(0.5)
    assert _count(tmp_path, "made-") == 6  # two taken, two more made, no further
    assert [f.result() for f in s] == list(range(2, 100))


def test_closing_or_dropping_a_stream_stops_the_generator(cluster, tmp_path):
    @fabric.fn(backpressure=2)
    def endless(folder, tag):
        i = 0
        try:
            while True:
                yield i
                i += 1
        finally:
            open(os.path.join(folder, f"stopped-{tag}"), "w").close()

    s = endless.remote(str(tmp_path), "close")
    assert [s.next(timeout=60).result() for _ in range(3)] == [0, 1, 2]
    s.close()
    assert wait_for(lambda: (tmp_path / "stopped-close").exists(), timeout=30)
    with pytest.raises(StopIteration):
        s.next()

    for f in endless.remote(str(tmp_path), "drop"):  # a loop that breaks drops the stream
        if f.result() == 2:
            break
    assert wait_for(lambda: (tmp_path / "stopped-drop").exists(), timeout=30)

    s = endless.remote(str(tmp_path), "cancel")
    s.next(timeout=60)
    assert fabric.cancel(s) is True
    assert wait_for(lambda: (tmp_path / "stopped-cancel").exists(), timeout=30)
    with pytest.raises(fabric.Cancelled):
        s.future.result(timeout=30)

    @fabric.fn
    def one():
        return 1

    assert one.remote().result(timeout=30) == 1  # the workers serve on
    assert wait_for(lambda: fabric.available_resources()["CPU"] == 2, timeout=30)


def test_a_generator_method_streams_and_keeps_the_instance(cluster, tmp_path):
    @fabric.cls
    class Tokens:
        def __init__(self):
            self.made = 0

        def gen(self, n):
            for _ in range(n):
                self.made += 1
                yield self.made

        async def agen(self, n):
            for _ in range(n):
                self.made += 1
                yield self.made

        def endless(self, folder):
            try:
                while True:
                    self.made += 1
                    yield self.made
            finally:
                open(os.path.join(folder, "method-stopped"), "w").close()

        def count(self):
            return self.made

    t = Tokens.remote()
    assert [f.result() for f in t.gen.remote(3)] == [1, 2, 3]
    assert [f.result() for f in t.agen.remote(2)] == [4, 5]
    s = t.endless.remote(str(tmp_path))
    assert s.next(timeout=60).result() == 6
    s.close()
    assert wait_for(lambda: (tmp_path / "method-stopped").exists(), timeout=30)
    assert t.count.remote().result(timeout=30) >= 6  # the instance lives on, its state kept
    fabric.kill(t)


def test_num_returns_gives_one_future_per_value(cluster):
    @fabric.fn(num_returns=3)
    def three(x):
        return x, x + 1, x + 2

    @fabric.fn
    def add(first, *rest):
        for x in rest:
            first = first + x
        return first

    @fabric.fn
    def slow_pair():
        time.sleep(0.5)
        return "a", "b"

    a, b, c = three.remote(10)
    assert fabric.get([a, b, c], timeout=60) == [10, 11, 12]
    assert add.remote(a, c).result(timeout=30) == 22  # done Futures: by value
    x, y = slow_pair.options(num_returns=2).remote()
    assert add.remote(y, x).result(timeout=30) == "ba"  # pending: by reference, indexed on the worker
    done, _ = fabric.wait(list(three.remote(1)), num_returns=3, timeout=30)
    assert len(done) == 3

    async def awaited():
        p, q = slow_pair.options(num_returns=2).remote()
        return await p, await q

    assert asyncio.run(awaited()) == ("a", "b")

    @fabric.fn(num_returns=2)
    def wrong():
        return 1, 2, 3

    @fabric.fn(num_returns=2)
    def fails():
        raise RuntimeError("no values")

    p, q = wrong.remote()
    for f in (p, q):
        with pytest.raises(ValueError, match="num_returns=2 but returned 3 values"):
            f.result(timeout=30)
    p, q = fails.remote()
    for f in (p, q):
        with pytest.raises(RuntimeError, match="no values"):
            f.result(timeout=30)
    with pytest.raises(RuntimeError, match="no values"):
        add.remote(p).result(timeout=30)  # a failed argument fails the call with its error
    p, q = wrong.options(retries=0).remote()
    with pytest.raises(ValueError, match="num_returns=2 that returned 3 values"):
        add.remote(p).result(timeout=30)  # pending when passed: the worker names the mismatch


@fabric.cls
class Pairs:
    @fabric.method(num_returns=2)
    def split(self, x):
        time.sleep(0.2)
        return x, -x

    def three(self):
        return 1, 2, 3

    def gen(self):
        yield 1


def test_num_returns_for_instance_methods(cluster):
    """``@fabric.method(num_returns=n)`` or ``h.m.options(num_returns=n)`` (Ray's ``@ray.method``):
    n Futures, as for functions; passed on pending, each is indexed on the worker."""
    @fabric.fn
    def add(a, b):
        return a + b

    h = Pairs.remote()
    a, b = h.split.remote(5)
    assert add.remote(a, b).result(timeout=60) == 0  # pending when passed
    assert fabric.get([a, b], timeout=60) == [5, -5]
    x, y, z = h.three.options(num_returns=3).remote()
    assert fabric.get([x, y, z], timeout=60) == [1, 2, 3]
    assert h.three.remote().result(timeout=60) == (1, 2, 3)  # the plain method is unchanged
    p, q = h.three.options(num_returns=2).remote()
    with pytest.raises(ValueError, match="num_returns=2 but returned 3 values"):
        p.result(timeout=60)
    with pytest.raises(ValueError, match="num_returns must be a whole number"):
        h.three.options(num_returns=0)
    with pytest.raises(ValueError, match="is a generator"):
        h.gen.options(num_returns=2)
    with pytest.raises(ValueError, match="is a generator"):
        fabric.method(num_returns=2)(lambda self: (yield 1))
    assert h.split.remote(1)[0].result(timeout=60) == 1  # the instance keeps serving


def test_bad_options_and_uses_are_refused_clearly(cluster):
    for bad in (0, 1001, "2", True, 1.5):
        with pytest.raises(ValueError, match="num_returns must be a whole number from 1 to 1000"):
            fabric.fn(num_returns=bad)(lambda: 1)
    for bad in (0, 256, None):
        with pytest.raises(ValueError, match="backpressure must be a whole number from 1 to 255"):
            fabric.fn(backpressure=bad)(lambda: 1)

    def gen():
        yield 1

    with pytest.raises(ValueError, match="gen is a generator: .remote.. streams its items, so num_returns"):
        fabric.fn(num_returns=2)(gen)
    with pytest.raises(ValueError, match="cache=True keeps one result"):
        fabric.fn(cache=True)(gen)
    with pytest.raises(TypeError, match="unknown option"):
        fabric.cls(num_returns=2)(type("K", (), {}))
    g = fabric.fn(gen)
    with pytest.raises(TypeError, match=r"map\(\) needs a function with one result"):
        g.map([1])
    s = g.remote()
    with pytest.raises(fabric.SerializationError, match="a fabric.Stream cannot be pickled"):
        pickle.dumps(s)

    @fabric.fn
    def takes(x):
        return x

    with pytest.raises(fabric.SerializationError):
        takes.remote(s)
    for use in (fabric.wait, fabric.get):
        with pytest.raises(TypeError, match="got the Stream of generator call gen: iterate it for its items, "
                                            "or pass stream.future"):
            use([s, takes.remote(1)])
    assert fabric.wait([s.future], timeout=30)[0] == [s.future]
    assert [f.result() for f in s] == [1]

    @fabric.fn
    def returns_a_generator():
        return (i for i in range(3))  # not a generator function: its result cannot travel

    with pytest.raises(fabric.SerializationError, match="decorate the generator function itself"):
        returns_a_generator.remote().result(timeout=30)


def test_hostile_stream_frames_are_refused_and_the_cluster_serves(cluster, caplog):
    from fabric import api
    from fabric import protocol as P

    @fabric.fn
    def one():
        return 1

    client = api._client()
    with caplog.at_level(logging.WARNING, logger="fabric.client"):
        client._send_d([P.C[P.CONSUMED] + bytes(5)])  # too short
        client._send_d([P.C[P.ITEM] + P.pack_result(bytes(16), P.OK) + bytes(8), b"x"])  # not a driver's
        client._send_d([P.C[P.CONSUMED] + bytes(24)])  # an unknown call: ignored
        assert one.remote().result(timeout=30) == 1
        assert wait_for(lambda: "CONSUMED: first frame must be 28 bytes" in caplog.text, timeout=10)
        assert wait_for(lambda: "ITEM is not accepted from this peer" in caplog.text, timeout=10)


def test_a_retried_stream_delivers_each_item_once(cluster, tmp_path):
    """The worker dies after 3 items; the retry makes them again, and the driver skips those."""
    @fabric.fn(retries=1, backpressure=4)
    def crashy(folder, n):
        first = not os.path.exists(os.path.join(folder, "ran"))
        open(os.path.join(folder, "ran"), "w").close()
        for i in range(n):
            if first and i == 3:
                time.sleep(0.3)  # the items made so far reach the driver
                os._exit(1)
            yield i

    s = crashy.remote(str(tmp_path), 10)
    got = [s.next(timeout=60).result() for _ in range(2)]  # taken before the crash
    got += [f.result() for f in s]
    assert got == list(range(10))
    assert s.future.result(timeout=30) == 10


STARTED_SCRIPT = """
import os, time, fabric
fabric.init(address={address!r})
folder = {folder!r}

@fabric.fn(backpressure=3)
def counted(n):
    for i in range(n):
        open(os.path.join(folder, f"made-{{i}}"), "w").close()
        yield i

@fabric.fn(num_returns=2)
def split(x):
    return x // 10, x % 10

@fabric.fn
def add(a, b):
    return a + b

s = counted.remote(50)
assert s.next(timeout=60).result() == 0
time.sleep(1.0)
made = sum(1 for f in os.listdir(folder) if f.startswith("made-"))
assert made <= 5, made  # 3 ahead of what was taken (1), plus the one being made
assert [f.result() for f in s] == list(range(1, 50))
t, u = split.remote(42)
assert add.remote(t, u).result(timeout=30) == 6
s = counted.remote(10 ** 6)
s.next(timeout=60)
s.close()
assert s.future.exception(timeout=30) is not None
print("streams ok")
"""


def test_streams_on_a_started_cluster(started, tmp_path):  # noqa: F811
    r = run_script(STARTED_SCRIPT.format(address=started["address"], folder=str(tmp_path)), env=started["env"],
                   timeout=180)
    assert r.returncode == 0, r.stderr
    assert "streams ok" in r.stdout
