"""fabric.serve's pure parts alone: batching, routing, admission, autoscaling (fake clock)."""
import asyncio

import pytest

from fabric import serve
from fabric.serve.batching import BatchQueue, split_results
from fabric.serve.routing import AutoscalePolicy, Dispatcher, match_route, normalize_prefix


# ---------------------------------------------------------------- batching
def test_batch_queue_timer_starts_at_first_request():
    q = BatchQueue(max_batch_size=3, timeout_s=0.01)
    assert q.deadline() is None and not q.ready(0.0)
    q.put("a", now=1.000)
    q.put("b", now=1.008)
    assert q.deadline() == pytest.approx(1.010)     # the first request's arrival, not the last's
    assert not q.ready(1.009)
    assert q.ready(1.010)
    assert q.take() == ["a", "b"] and len(q) == 0


def test_batch_queue_full_batch_goes_at_once_rest_keeps_its_time():
    q = BatchQueue(max_batch_size=2, timeout_s=5)
    for i, t in enumerate((0.0, 0.1, 0.2)):
        q.put(i, now=t)
    assert q.ready(0.2)
    assert q.take() == [0, 1]
    assert not q.ready(0.3) and q.deadline() == pytest.approx(5.2)


@pytest.mark.parametrize("size,wait", [(0, 0.1), (True, 0.1), (4, -1), (4, "1"), (1.5, 0.1)])
def test_batch_options_checked(size, wait):
    with pytest.raises(ValueError):
        serve.batch(max_batch_size=size, batch_wait_timeout_s=wait)


def test_split_results_checks_count_and_kind():
    assert split_results([1, 2], 2, "f") == [1, 2]
    with pytest.raises(TypeError, match="got 3 requests but returned 2"):
        split_results([1, 2], 3, "f")
    with pytest.raises(TypeError, match="must return a list"):
        split_results({"a": 1}, 1, "f")


def test_batch_decorator_gathers_concurrent_calls_and_splits_results():
    calls = []

    class M:
        @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
        async def f(self, items):
            calls.append(list(items))
            return [x * 10 for x in items]

    async def main():
        m = M()
        return await asyncio.gather(*(m.f(i) for i in range(6)))

    assert asyncio.run(main()) == [0, 10, 20, 30, 40, 50]
    assert calls == [[0, 1, 2, 3], [4, 5]]        # a full batch at once, the rest after the wait


def test_batch_decorator_error_reaches_every_request_of_the_batch():
    @serve.batch(max_batch_size=2, batch_wait_timeout_s=0.01)
    async def f(items):
        raise ValueError("bad batch")

    async def main():
        return await asyncio.gather(f(1), f(2), return_exceptions=True)

    out = asyncio.run(main())
    assert [type(e) for e in out] == [ValueError, ValueError]


def test_batch_decorator_wrong_result_count_is_an_error():
    @serve.batch(max_batch_size=2, batch_wait_timeout_s=0.01)
    def f(items):
        return [1]

    async def main():
        return await asyncio.gather(f(1), f(2), return_exceptions=True)

    assert all(isinstance(e, TypeError) for e in asyncio.run(main()))


# ---------------------------------------------------------------- routing
def test_match_route_longest_whole_segment_prefix():
    routes = {"/": "root", "/a": "a", "/a/b": "ab"}
    assert match_route(routes, "/a") == "a"
    assert match_route(routes, "/a/") == "a"
    assert match_route(routes, "/a/b/c") == "ab"
    assert match_route(routes, "/ab") == "root"
    assert match_route({"/a": 1}, "/ab") is None
    assert match_route({"/a": 1}, "/x/a") is None


@pytest.mark.parametrize("bad", ["a", "/v2", "/v2/x", "/metrics", "/-/x", 3])
def test_route_prefix_checked(bad):
    with pytest.raises(ValueError):
        normalize_prefix(bad)


def test_dispatcher_sends_lone_request_at_once_and_coalesces_under_load():
    d = Dispatcher(max_ongoing=8, pipeline=1)
    d.add_replica("r1")
    assert d.submit("a", 0) and d.schedule() == [("r1", ["a"])]
    for x in "bcd":
        d.submit(x, 0)
    assert d.schedule() == []                  # r1 has its one call in flight
    d.done("r1", 1)
    assert d.schedule() == [("r1", ["b", "c", "d"])]   # the waiting ones leave together
    assert d.ongoing == 3


def test_dispatcher_least_loaded_and_max_ongoing():
    d = Dispatcher(max_ongoing=2, pipeline=4)
    d.add_replica("r1")
    d.add_replica("r2")
    for x in "abcde":
        d.submit(x, 0)
    sent = d.schedule()
    assert sorted(sum((r for _, r in sent), [])) == ["a", "b", "c", "d"]
    assert {rid for rid, _ in sent} == {"r1", "r2"}
    assert d.queued == 1                       # both replicas are at max_ongoing


def test_dispatcher_bounded_queue_and_retry_first():
    d = Dispatcher(max_ongoing=1, max_queued=2)
    assert d.submit(1, 0) and d.submit(2, 0)
    assert not d.submit(3, 0)                  # full: the gateway answers 503
    d.requeue_front(["retry"], 0)              # retries go first, past the bound
    d.add_replica("r")
    assert d.schedule() == [("r", ["retry"])]


def test_dispatcher_expires_requests_that_waited_too_long():
    d = Dispatcher(max_ongoing=1)
    d.submit("old", 0.0)
    d.submit("new", 5.0)
    assert d.expired(now=10.5, max_wait=10) == ["old"]
    assert d.queued == 1


def test_autoscale_up_at_once_down_after_delay_and_to_zero():
    p = AutoscalePolicy(min_replicas=0, max_replicas=4, target_ongoing_requests=2, downscale_delay_s=10)
    assert p.decide(0, current=0, ongoing=0) == 0
    assert p.decide(1, current=0, ongoing=1) == 1          # from zero: the first request wants one
    assert p.decide(2, current=1, ongoing=7) == 4          # ceil(7/2)=4, up at once
    assert p.decide(3, current=4, ongoing=100) == 4        # capped at max_replicas
    assert p.decide(4, current=4, ongoing=2) == 4          # less need: wait
    assert p.decide(13, current=4, ongoing=2) == 4
    assert p.decide(14.5, current=4, ongoing=2) == 1       # held for 10 s
    assert p.decide(15, current=1, ongoing=0) == 1
    assert p.decide(25.5, current=1, ongoing=0) == 0       # idle for 10 s: to zero


def test_autoscale_downscale_timer_resets_when_load_returns():
    p = AutoscalePolicy(min_replicas=1, max_replicas=3, target_ongoing_requests=1, downscale_delay_s=5)
    assert p.decide(0, 3, 0) == 3
    assert p.decide(4, 3, 3) == 3          # load back: timer reset
    assert p.decide(6, 3, 0) == 3
    assert p.decide(11, 3, 0) == 1


@pytest.mark.parametrize("cfg,msg", [
    ({"min_replicas": -1}, "min_replicas"), ({"min_replicas": 3, "max_replicas": 2}, "max_replicas"),
    ({"target_ongoing_requests": 0}, "target_ongoing_requests"), ({"bogus": 1}, "unknown key"),
    ({"max_replicas": 0}, "max_replicas")])
def test_autoscaling_config_checked(cfg, msg):
    with pytest.raises(ValueError, match=msg):
        AutoscalePolicy.from_config(cfg)
    with pytest.raises(ValueError, match=msg):
        serve.deployment(autoscaling_config=cfg)


def test_deployment_options_and_bind_checked():
    with pytest.raises(TypeError, match="unknown option"):
        serve.deployment(replicas=2)
    with pytest.raises(ValueError, match="max_ongoing_requests"):
        serve.deployment(max_ongoing_requests=0)

    @serve.deployment
    class A:
        def __init__(self, x):
            self.x = x

        def __call__(self, body):
            return body

    with pytest.raises(TypeError, match="A.bind"):
        A.bind()
    assert A.bind(1).args == (1,)
    with pytest.raises(TypeError, match="needs a __call__"):
        serve.deployment(type("NoCall", (), {}))
    with pytest.raises(TypeError, match="serve.run"):
        A(1)


# ---------------------------------------------------------------- the replica's answers
class _Fails:
    def __call__(self, body):
        raise ValueError(f"bad {body['x']}")


@pytest.mark.parametrize("debug", [False, True])
def test_user_exception_is_500_type_and_message_traceback_only_in_debug(debug):
    import json

    from fabric.serve.replica import Replica

    (status, body), = Replica(_Fails, (), {}, True, debug).run_many("__call__", [{"x": 7}])
    got = json.loads(body)
    assert status == 500 and got["error"] == "ValueError: bad 7"
    if debug:
        assert "Traceback (most recent call last)" in got["traceback"] and "raise ValueError" in got["traceback"]
    else:
        assert set(got) == {"error"}


def test_dispatcher_pipelines_slow_calls_and_coalesces_fast_ones():
    d = Dispatcher(max_ongoing=8, pipeline=2, coalesce_below_s=0.005)
    d.add_replica("r")
    d.submit("a", 0)
    assert d.schedule() == [("r", ["a"])]
    d.submit("b", 0)
    assert d.schedule() == [("r", ["b"])]                  # nothing measured yet: two deep
    d.done("r", 1, elapsed=0.001)
    d.done("r", 1, elapsed=0.001)                          # fast calls: one at a time
    for x in "cde":
        d.submit(x, 0)
    assert d.schedule() == [("r", ["c", "d", "e"])]
    d.submit("f", 0)
    assert d.schedule() == []                              # f waits for the short call in flight
    d.done("r", 3, elapsed=0.5)                            # that call was slow: pipelined again
    assert d.schedule() == [("r", ["f"])]
    d.submit("g", 0)
    assert d.schedule() == [("r", ["g"])]                  # a second call beside f's
    assert d.ongoing == 2


def test_dispatcher_without_coalescing_keeps_its_pipeline():
    d = Dispatcher(max_ongoing=8, pipeline=2)
    d.add_replica("r")
    d.done("gone", 1, elapsed=0.0001)                      # fast, but coalescing is off
    d.submit("a", 0)
    assert d.schedule() == [("r", ["a"])]
    d.submit("b", 0)
    assert d.schedule() == [("r", ["b"])]
