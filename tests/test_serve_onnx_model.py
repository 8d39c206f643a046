"""The ONNX replica's side of OIP ``infer`` alone (a real onnxruntime session, no cluster): the
raw bodies the gateway forwards are decoded, checked, run as few batches as stack, and encoded
back one answer per request, a bad request answered 400 without failing the others."""
import json
import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from fabric.serve.onnx import OnnxModel  # noqa: E402
from test_serve_http import make_mlp_checkpoint  # noqa: E402


def rowsum_checkpoint(path):
    """x: FP32 [batch, n] (both axes dynamic) -> s: FP32 [batch], the sum of each row."""
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0, axes=[1])], "rowsum",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])],
                          [helper.make_tensor_value_info("s", TensorProto.FLOAT, ["batch"])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 11)])
    m.ir_version = 8
    os.makedirs(path, exist_ok=True)
    onnx.save(m, os.path.join(path, "model.onnx"))
    with open(os.path.join(path, "fabric_checkpoint.json"), "w") as f:
        json.dump({"framework": "onnx"}, f)


class Counting:
    """The model's real session, counting its runs."""

    def __init__(self, sess):
        self.sess, self.runs = sess, []

    def run(self, names, feeds):
        self.runs.append({k: v.shape for k, v in feeds.items()})
        return self.sess.run(names, feeds)


def req(x, name="x", **extra):
    return json.dumps({"inputs": [{"name": name, "datatype": "FP32", "shape": list(x.shape),
                                   "data": x.ravel().tolist()}], **extra}).encode(), None


@pytest.fixture()
def mlp(tmp_path):
    w1, w2 = make_mlp_checkpoint(str(tmp_path))
    m = OnnxModel(str(tmp_path), 1, "mlp", "3")
    m.sess = Counting(m.sess)
    return m, (lambda x: np.maximum(x @ w1, 0) @ w2)


def test_one_run_for_the_batch_and_each_request_gets_its_own_rows(mlp):
    m, ref = mlp
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((k, 16)).astype(np.float32) for k in (1, 3, 2)]
    out = m.infer_http([req(x, id=f"r{i}") for i, x in enumerate(xs)])
    assert len(m.sess.runs) == 1 and m.sess.runs[0]["x"] == (6, 16)
    for i, (x, (status, body, hl)) in enumerate(zip(xs, out)):
        assert status == 200 and hl is None
        r = json.loads(body)
        assert r["id"] == f"r{i}" and r["model_name"] == "mlp" and r["model_version"] == "3"
        y = next(t for t in r["outputs"] if t["name"] == "y")
        assert y["shape"] == [len(x), 2]
        np.testing.assert_allclose(np.array(y["data"]).reshape(y["shape"]), ref(x), rtol=1e-4, atol=1e-4)


def test_a_bad_request_in_a_batch_is_400_and_the_others_are_answered(mlp):
    m, ref = mlp
    x = np.ones((1, 16), np.float32)
    out = m.infer_http([req(x), (b"{oops", None), req(np.ones((1, 8), np.float32)), req(x, name="q"),
                        req(x, outputs=[{"name": "zz"}]), req(2 * x)])
    codes = [o[0] for o in out]
    assert codes == [200, 400, 400, 400, 400, 200]
    msgs = [json.loads(o[1])["error"] for o in out[1:5]]
    assert "not valid JSON" in msgs[0] and "must have shape" in msgs[1]
    assert "unknown input 'q'" in msgs[2] and "unknown output 'zz'" in msgs[3]
    assert len(m.sess.runs) == 1 and m.sess.runs[0]["x"] == (2, 16)   # the good two, together
    y = json.loads(out[5][1])["outputs"][0]
    np.testing.assert_allclose(np.array(y["data"]).reshape(1, 2), ref(2 * x), rtol=1e-4, atol=1e-4)


def test_binary_request_and_response_through_the_replica(mlp):
    m, ref = mlp
    x = np.linspace(-1, 1, 32, dtype=np.float32).reshape(2, 16)
    head = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 16],
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "outputs": [{"name": "y", "parameters": {"binary_data": True}}, {"name": "label"}]}).encode()
    (status, body, hl), = m.infer_http([(head + x.tobytes(), str(len(head)))])
    assert status == 200 and hl is not None
    meta = json.loads(body[:int(hl)])
    y, label = meta["outputs"]
    assert y["parameters"]["binary_data_size"] == 16 and label["data"] == ref(x).argmax(1).tolist()
    np.testing.assert_allclose(np.frombuffer(body[int(hl):], np.float32).reshape(2, 2), ref(x), rtol=1e-4, atol=1e-4)


def test_requests_that_differ_past_the_first_axis_run_as_separate_stacks(tmp_path):
    rowsum_checkpoint(str(tmp_path))
    m = OnnxModel(str(tmp_path), 1, "rowsum", "1")
    m.sess = Counting(m.sess)
    a, b, c = (np.arange(k * n, dtype=np.float32).reshape(k, n) for k, n in ((1, 3), (2, 5), (2, 3)))
    out = m.infer_http([req(a), req(b), req(c)])
    assert [o[0] for o in out] == [200, 200, 200]
    assert sorted(r["x"] for r in m.sess.runs) == [(2, 5), (3, 3)]     # a and c together, b alone
    for x, (_, body, _) in zip((a, b, c), out):
        assert json.loads(body)["outputs"][0]["data"] == x.sum(1).tolist()


def test_a_failing_run_is_500_for_its_requests_only(mlp):
    m, _ = mlp

    class Flaky(Counting):
        def run(self, names, feeds):
            if (feeds["x"] > 100).any():
                raise RuntimeError("model blew up")
            return super().run(names, feeds)

    m.sess = Flaky(m.sess.sess)
    x = np.ones((1, 16), np.float32)
    out = m.infer_http([req(x), req(1000 * x), req(x)])
    assert [o[0] for o in out] == [200, 500, 200]     # the stacked run failed; one run each names the bad one
    assert json.loads(out[1][1]) == {"error": "RuntimeError: model blew up"}
