"""fabric.serve over real HTTP (httpx) against a real gateway process on a real cluster:
JSON routes, request details, errors, batching, overload, metrics, the Open Inference Protocol
(also through tests/oip_client.py, a second client written from the spec) and Python handles."""
import asyncio
import json
import os
import re
import time

import httpx
import numpy as np
import pytest

import fabric
from fabric import serve
from conftest import free_port, wait_for
from oip_client import OIPClient, OIPHTTPError

onnx = pytest.importorskip("onnx")


def make_mlp_checkpoint(path, seed=0):
    """A 16->64->2 MLP with a dynamic batch axis, plus an argmax output: model.onnx and metadata."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1, w2 = rng.standard_normal((16, 64)).astype(np.float32), rng.standard_normal((64, 2)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"]),
         helper.make_node("ArgMax", ["y"], ["label"], axis=1, keepdims=0)],
        "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2]),
         helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    os.makedirs(path, exist_ok=True)
    onnx.save(m, os.path.join(path, "model.onnx"))
    with open(os.path.join(path, "fabric_checkpoint.json"), "w") as f:
        json.dump({"framework": "onnx", "input_names": ["x"], "output_names": ["y", "label"]}, f)
    return w1, w2


@serve.deployment(cpus=0.1)
class Echo:
    def __init__(self, tag):
        self.tag = tag

    def __call__(self, body=None, request=None):
        if isinstance(body, dict) and body.get("raise"):
            raise ValueError(f"asked to fail: {body['raise']}")
        if request is None:   # called from a Python handle
            return {"body": body, "tag": self.tag}
        return {"body": body, "tag": self.tag, "method": request.method, "query": request.query_params,
                "header": request.headers.get("x-test"), "path": request.path}

    def shout(self, word):
        return word.upper()


@serve.deployment(cpus=0.1)
def unjsonable(body=None):
    return object()


@serve.deployment(cpus=0.1)
class Batched:
    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.5)
    async def __call__(self, items):
        return [{"x": it["x"], "n": len(items)} for it in items]


@serve.deployment(cpus=0.1, max_ongoing_requests=1, max_queued_requests=2)
class Gate:
    def __call__(self, body):
        import time

        while not os.path.exists(body["file"]):   # blocks until the test lets it go
            time.sleep(0.01)
        return "done"


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    fabric.shutdown()
    fabric.init(num_cpus=2)
    port = free_port()
    handle = serve.run(Echo.bind("t1"), name="echo", route_prefix="/echo", port=port)
    serve.run(unjsonable.bind(), name="unjsonable", route_prefix="/unjsonable")
    serve.run(Batched.bind(), name="batched", route_prefix="/batched")
    serve.run(Gate.bind(), name="gate", route_prefix="/gate")
    ckpt = str(tmp_path_factory.mktemp("ckpt"))
    w1, w2 = make_mlp_checkpoint(ckpt)
    model = serve.onnx(ckpt, name="mlp", max_batch_size=32)
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=url, timeout=60) as c:
        yield {"url": url, "c": c, "handle": handle, "model": model, "w": (w1, w2), "ckpt": ckpt}
    serve.shutdown()
    fabric.shutdown()


def serving_afterwards(c):
    r = c.post("/echo", json={"still": True})
    assert r.status_code == 200 and r.json()["body"] == {"still": True}


def test_json_route_with_request_details(gw):
    c = gw["c"]
    r = c.post("/echo/sub?a=1&b=x", json={"x": [1, 2]}, headers={"x-test": "hi"})
    assert r.status_code == 200
    assert r.json() == {"body": {"x": [1, 2]}, "tag": "t1", "method": "POST", "query": {"a": "1", "b": "x"},
                        "header": "hi", "path": "/echo/sub"}
    r = c.get("/echo")
    assert r.status_code == 200 and r.json()["body"] is None and r.json()["method"] == "GET"


def test_python_handle_returns_a_fabric_future(gw):
    h = gw["handle"]
    fut = h.remote({"k": 1})
    assert isinstance(fut, fabric.Future) and fut.result(timeout=30) == {"body": {"k": 1}, "tag": "t1"}
    assert h.shout.remote("abc").result(timeout=30) == "ABC"
    with pytest.raises(ValueError, match="asked to fail"):
        h.remote({"raise": "py"}).result(timeout=30)


@pytest.mark.parametrize("kind", ["malformed", "unknown-route", "user-exception", "unjsonable"])
def test_bad_input_gets_clear_error_and_gateway_keeps_serving(gw, kind):
    c = gw["c"]
    if kind == "malformed":
        r = c.post("/echo", content=b'{"x": ', headers={"content-type": "application/json"})
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    elif kind == "unknown-route":
        r = c.post("/nowhere", json={})
        assert r.status_code == 404 and "/nowhere" in r.json()["error"]
        r = c.get("/v2/nothing/here")
        assert r.status_code == 404 and "error" in r.json()
    elif kind == "user-exception":
        r = c.post("/echo", json={"raise": "boom"})
        assert r.status_code == 500
        assert r.json() == {"error": "ValueError: asked to fail: boom"}   # type and message, no traceback
    else:
        r = c.post("/unjsonable", json={})
        assert r.status_code == 500 and "not JSON serializable" in r.json()["error"]
    serving_afterwards(c)


def test_dynamic_batching_groups_concurrent_requests_and_splits_results(gw):
    async def go():
        async with httpx.AsyncClient(base_url=gw["url"], timeout=60) as ac:
            return await asyncio.gather(*(ac.post("/batched", json={"x": i}) for i in range(8)))

    rs = asyncio.run(go())
    assert all(r.status_code == 200 for r in rs)
    got = [r.json() for r in rs]
    assert [g["x"] for g in got] == list(range(8))          # each request gets its own result
    assert max(g["n"] for g in got) >= 2                     # concurrent requests shared a call
    assert all(g["n"] <= 4 for g in got)                     # never above max_batch_size


def test_overload_answers_503_with_retry_after_then_recovers(gw, tmp_path):
    c, flag = gw["c"], str(tmp_path / "go")

    async def go():
        async with httpx.AsyncClient(base_url=gw["url"], timeout=60) as ac:
            first = asyncio.ensure_future(ac.post("/gate", json={"file": flag}))
            assert await asyncio.to_thread(wait_for, lambda: serve.status()["deployments"]["gate"]
                                           ["ongoing_requests"] == 1, 30)
            queued = [asyncio.ensure_future(ac.post("/gate", json={"file": flag})) for _ in range(2)]
            assert await asyncio.to_thread(wait_for, lambda: serve.status()["deployments"]["gate"]
                                           ["queued_requests"] == 2, 30)
            over = await ac.post("/gate", json={"file": flag})
            open(flag, "w").close()
            return over, await first, await asyncio.gather(*queued)

    over, first, queued = asyncio.run(go())
    assert over.status_code == 503 and over.headers["retry-after"] == "1"
    assert "overloaded" in over.json()["error"] and "max_queued_requests=2" in over.json()["error"]
    assert first.status_code == 200 and [q.status_code for q in queued] == [200, 200]
    assert c.post("/gate", json={"file": flag}).json() == "done"


def test_metrics_in_prometheus_format(gw):
    c = gw["c"]
    c.post("/echo", json={})
    c.post("/echo", json={"raise": "x"})
    text = c.get("/metrics").text

    def value(pattern):
        m = re.search(pattern + r" ([0-9.e+]+)", text)
        assert m, pattern
        return float(m.group(1))

    assert value(r'fabric_serve_requests_total\{code="200",deployment="echo"\}') >= 1
    assert value(r'fabric_serve_requests_total\{code="500",deployment="echo"\}') >= 1
    for h in ("request", "queue", "compute"):
        assert value(rf'fabric_serve_{h}_seconds_count\{{deployment="echo"\}}') >= 1
    assert value(r'fabric_serve_batch_size_count\{deployment="echo"\}') >= 1
    assert value(r'fabric_serve_in_flight\{deployment="echo"\}') == 0
    assert value(r'fabric_serve_replicas\{deployment="echo",state="RUNNING"\}') == 1


# ---------------------------------------------------------------- Open Inference Protocol
def mlp(gw, x):
    w1, w2 = gw["w"]
    return np.maximum(x @ w1, 0) @ w2


def test_oip_server_and_model_metadata(gw):
    c = gw["c"]
    assert c.get("/v2").json()["extensions"] == ["binary_tensor_data"]
    assert c.get("/v2/health/live").json() == {"live": True}
    assert c.get("/v2/health/ready").status_code == 200
    meta = c.get("/v2/models/mlp").json()
    assert meta["name"] == "mlp" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}]
    assert meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 2]},
                               {"name": "label", "datatype": "INT64", "shape": [-1]}]
    assert c.get("/v2/models/mlp/versions/1").json() == meta
    assert c.get("/v2/models/mlp/ready").json() == {"name": "mlp", "ready": True}
    assert c.get("/v2/models/mlp/versions/1/ready").status_code == 200


def test_oip_infer_json_nested_id_and_outputs(gw):
    c = gw["c"]
    x = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    r = c.post("/v2/models/mlp/infer", json={"id": "abc", "inputs": [
        {"name": "x", "datatype": "FP32", "shape": [3, 16], "data": x.tolist()}]})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["id"] == "abc" and out["model_name"] == "mlp" and out["model_version"] == "1"
    y = {t["name"]: t for t in out["outputs"]}
    assert y["y"]["shape"] == [3, 2] and y["label"]["datatype"] == "INT64"
    np.testing.assert_allclose(np.array(y["y"]["data"]).reshape(3, 2), mlp(gw, x), rtol=1e-4, atol=1e-4)
    assert y["label"]["data"] == mlp(gw, x).argmax(1).tolist()
    r = c.post("/v2/models/mlp/versions/1/infer", json={"inputs": [
        {"name": "x", "datatype": "FP32", "shape": [1, 16], "data": x[0].tolist()}], "outputs": [{"name": "label"}]})
    assert [t["name"] for t in r.json()["outputs"]] == ["label"] and "id" not in r.json()


def test_onnx_model_from_a_python_handle(gw):
    x = np.random.default_rng(3).standard_normal((4, 16)).astype(np.float32)
    fut = gw["model"].remote({"x": x})
    assert isinstance(fut, fabric.Future)
    out = fut.result(timeout=30)
    np.testing.assert_allclose(out["y"], mlp(gw, x), rtol=1e-4, atol=1e-4)
    assert out["label"].tolist() == mlp(gw, x).argmax(1).tolist()


def test_oip_binary_extension_with_second_client(gw):
    cl = OIPClient(gw["url"])
    assert cl.server_live() and cl.server_ready() and cl.model_ready("mlp")
    assert cl.server_metadata()["name"] == "fabric"
    assert cl.model_metadata("mlp")["inputs"][0]["shape"] == [-1, 16]
    x = np.linspace(-1, 1, 32, dtype=np.float32).reshape(2, 16)
    for binary in (True, False):
        resp, out = cl.infer("mlp", {"x": ("FP32", [2, 16], x.ravel().tolist())}, outputs=["y", "label"],
                             binary=binary, request_id="r1")
        assert resp["id"] == "r1"
        dt, shape, vals = out["y"]
        assert dt == "FP32" and shape == [2, 2]
        np.testing.assert_allclose(np.array(vals).reshape(2, 2), mlp(gw, x), rtol=1e-4, atol=1e-4)
        assert out["label"][2] == mlp(gw, x).argmax(1).tolist()
        if binary:
            assert "binary_data_size" in resp["outputs"][0]["parameters"]
    assert not cl.model_ready("nope")


def test_oip_concurrent_requests_are_batched_and_split(gw):
    rng = np.random.default_rng(2)
    xs = [rng.standard_normal((1 + i % 3, 16 if i % 5 else 15)).astype(np.float32) for i in range(24)]

    async def go():
        async with httpx.AsyncClient(base_url=gw["url"], timeout=60) as ac:
            return await asyncio.gather(*(ac.post("/v2/models/mlp/infer", json={"id": str(i), "inputs": [
                {"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]})
                for i, x in enumerate(xs)))

    for i, (x, r) in enumerate(zip(xs, asyncio.run(go()))):
        if x.shape[1] != 16:   # a bad request among good ones: its own 400, the others answered
            assert r.status_code == 400 and "must have shape" in r.json()["error"]
            continue
        assert r.status_code == 200 and r.json()["id"] == str(i)
        y = next(t for t in r.json()["outputs"] if t["name"] == "y")
        np.testing.assert_allclose(np.array(y["data"]).reshape(y["shape"]), mlp(gw, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case,code,msg", [
    ("wrong-shape", 400, "must have shape"), ("wrong-datatype", 400, "must be FP32"),
    ("bad-tensor", 400, "needs 16 elements"), ("malformed", 400, "not valid JSON"),
    ("unknown-model", 404, "unknown model 'nope'"), ("unknown-version", 404, "no version '9'"),
    ("unknown-output", 400, "unknown output 'z'"), ("unknown-input", 400, "unknown input 'q'")])
def test_oip_bad_input(gw, case, code, msg):
    c = gw["c"]
    good = {"name": "x", "datatype": "FP32", "shape": [1, 16], "data": [0.0] * 16}
    path, body = "/v2/models/mlp/infer", {"inputs": [good]}
    if case == "wrong-shape":
        body = {"inputs": [{**good, "shape": [2, 8]}]}
    elif case == "wrong-datatype":
        body = {"inputs": [{**good, "datatype": "FP64"}]}
    elif case == "bad-tensor":
        body = {"inputs": [{**good, "data": [0.0] * 15}]}
    elif case == "unknown-model":
        path = "/v2/models/nope/infer"
    elif case == "unknown-version":
        path = "/v2/models/mlp/versions/9/infer"
    elif case == "unknown-output":
        body["outputs"] = [{"name": "z"}]
    elif case == "unknown-input":
        body = {"inputs": [good, {**good, "name": "q"}]}
    r = c.post(path, content=b"{oops" if case == "malformed" else json.dumps(body).encode())
    assert r.status_code == code and msg in r.json()["error"], r.text
    with pytest.raises(OIPHTTPError) as e:
        OIPClient(gw["url"]).model_metadata("nope")
    assert e.value.status == 404
    r = c.get("/v2/models/mlp/infer")
    assert r.status_code == 405 and "error" in r.json()
    r = c.post("/v2/models/mlp/infer", json={"inputs": [good]})
    assert r.status_code == 200
    if code == 400:   # answered by the replica, counted by the gateway
        assert re.search(r'fabric_serve_requests_total\{code="400",deployment="mlp"\} [1-9]', c.get("/metrics").text)


def test_onnx_checkpoint_checked(tmp_path):
    with pytest.raises(FileNotFoundError, match="no fabric_checkpoint.json"):
        serve.onnx(str(tmp_path), name="x")
    (tmp_path / "fabric_checkpoint.json").write_text('{"framework": "xgboost"}')
    with pytest.raises(ValueError, match="xgboost checkpoint"):
        serve.onnx(str(tmp_path), name="x")


@serve.deployment(cpus=0.1)
class BrokenInit:
    def __init__(self):
        raise RuntimeError("cannot load the model")

    def __call__(self, body):
        return body


def test_replica_init_failure_is_reported_and_gateway_keeps_serving(gw):
    with pytest.raises(RuntimeError, match="did not start: replica failed to start: RuntimeError: cannot load the model"):
        serve.run(BrokenInit.bind(), name="broken", route_prefix="/broken", timeout=60)
    st = serve.status()["deployments"]["broken"]
    assert st["status"] == "UNHEALTHY" and "cannot load the model" in st["last_error"]
    r = gw["c"].post("/broken", json={})
    assert r.status_code == 503 and "cannot load the model" in r.json()["error"]
    serve.delete("broken")
    serving_afterwards(gw["c"])


def test_status_and_delete(gw):
    c = gw["c"]
    st = serve.status()
    assert st["url"] == gw["url"]
    assert st["deployments"]["echo"]["status"] == "RUNNING" and len(st["deployments"]["echo"]["replicas"]) == 1
    serve.run(Echo.bind("t2"), name="temp", route_prefix="/temp")
    assert c.post("/temp", json=1).json()["tag"] == "t2"
    serve.delete("temp")
    assert "temp" not in serve.status()["deployments"]
    r = c.post("/temp", json=1)
    assert r.status_code == 404
    with pytest.raises(RuntimeError, match="no deployment named"):
        serve.delete("temp")
    with pytest.raises(RuntimeError, match="already served"):
        serve.run(Echo.bind("t3"), name="other", route_prefix="/echo")
    serving_afterwards(c)


@serve.deployment(cpus=0.1, num_replicas=2)
class Versioned:
    def __init__(self, tag, fail_enter=False):
        self.tag, self.fail_enter = tag, fail_enter

    @fabric.enter
    def load(self):
        if self.fail_enter:
            raise RuntimeError(f"the model of {self.tag} is corrupt")

    def __call__(self, body=None):
        return {"tag": self.tag, "pid": os.getpid()}


def _pid_gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as f:  # a zombie not yet reaped counts as stopped
        return f.read().split(") ", 1)[1][0] == "Z"


def test_rolling_redeploy_under_load_drops_nothing_and_a_failing_enter_keeps_the_old_version(gw):
    import threading

    serve.run(Versioned.bind("v1"), name="roll", route_prefix="/roll")
    url = gw["url"]
    old_pids = set()
    with httpx.Client(base_url=url, timeout=60) as c:
        for _ in range(20):
            old_pids.add(c.post("/roll", json={}).json()["pid"])
    seen, failed, stop = [], [], threading.Event()

    def load():
        with httpx.Client(base_url=url, timeout=60) as c:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    r = c.post("/roll", json={})
                except httpx.HTTPError as e:
                    failed.append(repr(e))
                    continue
                if r.status_code != 200:
                    failed.append((r.status_code, r.text))
                else:
                    seen.append((sent, r.json()["tag"]))

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    wait_for(lambda: len(seen) > 20, timeout=60)
    serve.run(Versioned.bind("v2"), name="roll", route_prefix="/roll")  # returns once v2 serves
    returned, switched = time.monotonic(), len(seen)
    wait_for(lambda: len(seen) > switched + 30, timeout=60)
    stop.set()
    for t in threads:
        t.join(60)
    assert failed == []
    # every request sent after serve.run returned is v2's; v1 answered at most the one request
    # each thread had in flight then (which may land after other threads' v2 answers)
    assert [tag for sent, tag in seen if sent > returned and tag != "v2"] == []
    assert sum(tag == "v1" for _, tag in seen[switched:]) <= len(threads) and seen[-1][1] == "v2"
    assert wait_for(lambda: all(_pid_gone(p) for p in old_pids), timeout=60)  # v1's replicas stopped

    with pytest.raises(RuntimeError, match="did not start, so the old version keeps serving: replica failed to "
                                           "start: RuntimeError: the model of v3 is corrupt"):
        serve.run(Versioned.bind("v3", fail_enter=True), name="roll", route_prefix="/roll", timeout=60)
    r = gw["c"].post("/roll", json={})
    assert r.status_code == 200 and r.json()["tag"] == "v2"
    st = serve.status()["deployments"]["roll"]
    assert st["status"] == "RUNNING" and len(st["running_replicas"]) == 2
    serve.delete("roll")
    serving_afterwards(gw["c"])


@serve.deployment(cpus=0.1, max_ongoing_requests=1, max_queued_requests=4)
class HeldGate:
    def __init__(self, tag):
        self.tag = tag

    def __call__(self, body):
        import time

        while body.get("file") and not os.path.exists(body["file"]):   # blocks until the test lets it go
            time.sleep(0.01)
        return self.tag


def test_a_redeploy_hands_queued_requests_to_the_new_version_and_lets_the_old_finish_its_own(gw, tmp_path):
    serve.run(HeldGate.bind("v1"), name="held", route_prefix="/held")
    release = str(tmp_path / "go")

    async def scenario():
        async with httpx.AsyncClient(base_url=gw["url"], timeout=60) as c:
            running = asyncio.ensure_future(c.post("/held", json={"file": release}))
            await asyncio.sleep(0.3)   # v1's only replica holds it
            queued = asyncio.ensure_future(c.post("/held", json={}))
            assert await asyncio.to_thread(wait_for, lambda: serve.status()["deployments"]["held"]
                                           ["queued_requests"] == 1, 30)
            await asyncio.to_thread(serve.run, HeldGate.bind("v2"), name="held", route_prefix="/held")
            q = await queued   # it was waiting for v1: v2 answers it, while v1 still holds the other
            assert (q.status_code, q.json()) == (200, "v2") and not running.done()
            open(release, "w").close()
            r = await running
            assert (r.status_code, r.json()) == (200, "v1")   # the old version finished what it held
    asyncio.run(scenario())
    serve.delete("held")
