"""The Open Inference Protocol codec alone: typed tensors, nested data, binary extension, errors."""
import json

import numpy as np
import pytest

from fabric.serve import oip


def body(*inputs, **extra):
    return json.dumps({"inputs": list(inputs), **extra}).encode()


@pytest.mark.parametrize("dt,data,np_dtype", [
    ("BOOL", [True, False], np.bool_), ("UINT8", [0, 255], np.uint8), ("UINT16", [1, 65535], np.uint16),
    ("UINT32", [1, 2], np.uint32), ("UINT64", [1, 2], np.uint64), ("INT8", [-128, 127], np.int8),
    ("INT16", [-3, 3], np.int16), ("INT32", [-1, 7], np.int32), ("INT64", [-(2 ** 40), 2 ** 40], np.int64),
    ("FP16", [0.5, 1.5], np.float16), ("FP32", [0.25, -1], np.float32), ("FP64", [1e-300, 2.5], np.float64)])
def test_typed_tensors_json_roundtrip(dt, data, np_dtype):
    r = oip.decode_request(body({"name": "x", "datatype": dt, "shape": [2], "data": data}))
    a = r.inputs["x"]
    assert a.dtype == np.dtype(np_dtype) and a.tolist() == pytest.approx(data)
    out, headers = oip.encode_response("m", "1", None, {"y": a})
    t = json.loads(out)["outputs"][0]
    assert t["datatype"] == dt and t["shape"] == [2] and t["data"] == pytest.approx(data)
    assert headers["content-type"] == "application/json"


def test_narrowing_float_casts_keep_what_fits():
    r = oip.decode_request(body({"name": "x", "datatype": "FP16", "shape": [4],
                                 "data": [65504.0, -65504, float("inf"), float("nan")]}))
    a = r.inputs["x"]
    assert a.dtype == np.float16 and a[:3].tolist() == [65504.0, -65504.0, float("inf")] and np.isnan(a[3])


def test_nested_and_flat_data_are_the_same_tensor():
    flat = oip.decode_request(body({"name": "x", "datatype": "FP32", "shape": [2, 3], "data": [1, 2, 3, 4, 5, 6]}))
    nested = oip.decode_request(body({"name": "x", "datatype": "FP32", "shape": [2, 3],
                                      "data": [[1, 2, 3], [4, 5, 6]]}))
    assert flat.inputs["x"].shape == (2, 3)
    np.testing.assert_array_equal(flat.inputs["x"], nested.inputs["x"])


def test_bytes_json_and_id_outputs_parameters():
    r = oip.decode_request(body({"name": "s", "datatype": "BYTES", "shape": [2], "data": ["ab", "ĉ"]},
                                id="req-7", outputs=[{"name": "b", "parameters": {"binary_data": True}}],
                                parameters={"binary_data_output": False}))
    assert r.id == "req-7" and r.inputs["s"].tolist() == [b"ab", "ĉ".encode()]
    assert r.outputs == [("b", True)] and r.binary_output is False


def test_binary_extension_request_and_response():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    s = np.array([b"hi", b"there"], dtype=object)
    sb = b"".join(len(v).to_bytes(4, "little") + v for v in s)
    head = json.dumps({"inputs": [
        {"name": "x", "datatype": "FP32", "shape": [2, 3], "parameters": {"binary_data_size": x.nbytes}},
        {"name": "s", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": len(sb)}}]}).encode()
    r = oip.decode_request(head + x.tobytes() + sb, str(len(head)))
    np.testing.assert_array_equal(r.inputs["x"], x)
    assert r.inputs["s"].tolist() == [b"hi", b"there"]

    out, headers = oip.encode_response("m", "1", "id1", {"y": x, "z": np.array([1, 2], np.int64)},
                                       selection=[("y", True), ("z", False)])
    hl = int(headers[oip.HEADER_LENGTH])
    meta = json.loads(out[:hl])
    assert meta["id"] == "id1" and meta["model_version"] == "1"
    y, z = meta["outputs"]
    assert y["parameters"]["binary_data_size"] == x.nbytes and "data" not in y
    np.testing.assert_array_equal(np.frombuffer(out[hl:], np.float32).reshape(y["shape"]), x)
    assert z["data"] == [1, 2]


def test_output_selection_names_only_known_outputs():
    with pytest.raises(oip.OIPError, match="unknown output 'q'"):
        oip.encode_response("m", "1", None, {"y": np.zeros(1)}, selection=[("q", None)])
    out, _ = oip.encode_response("m", "1", None, {"y": np.zeros(1), "z": np.ones(1)}, selection=[("z", None)])
    assert [t["name"] for t in json.loads(out)["outputs"]] == ["z"]


_H8 = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 8}}]}'


@pytest.mark.parametrize("raw,header,msg", [
    (b"{not json", None, "not valid JSON"),
    (b"[1]", None, "JSON object"),
    (b'{"inputs": []}', None, "non-empty list"),
    (body({"name": "x", "datatype": "FP99", "shape": [1], "data": [1]}), None, "unknown datatype"),
    (body({"name": "x", "datatype": "FP32", "shape": [3], "data": [1, 2]}), None, "needs 3 elements"),
    (body({"name": "x", "datatype": "FP32", "shape": [-1], "data": [1]}), None, "'shape'"),
    (body({"name": "x", "datatype": "FP32", "shape": [2], "data": ["a", "b"]}), None, "needs numbers"),
    (body({"name": "x", "datatype": "INT32", "shape": [1], "data": [1.5]}), None, "whole numbers"),
    (body({"name": "x", "datatype": "UINT8", "shape": [1], "data": [300]}), None, "do not fit UINT8"),
    (body({"name": "x", "datatype": "BOOL", "shape": [1], "data": [1]}), None, "true/false"),
    (body({"name": "x", "datatype": "FP32", "shape": [2], "data": [1.0, 1e300]}), None, "overflow FP32"),
    (body({"name": "x", "datatype": "FP16", "shape": [1], "data": [70000]}), None, "overflow FP16"),
    (body({"name": "x", "datatype": "BYTES", "shape": [1], "data": [1]}), None, "must be strings"),
    (body({"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [[1, 2], [3]]}), None, "needs 4 elements"),
    (body({"name": "x", "datatype": "FP32", "shape": [1]}), None, "needs 'data'"),
    (body({"datatype": "FP32", "shape": [1], "data": [1]}), None, "'name'"),
    (body({"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}, {"name": "x", "datatype": "FP32",
                                                                         "shape": [1], "data": [1]}), None, "twice"),
    (body({"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}, id=5), None, "'id' must be a string"),
    (_H8 + b"\0" * 4, str(len(_H8)), "runs past the end"),
    (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": 4}}]}'
     + b"\0" * 4, "abc", "whole number"),
    (body({"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}) + b"junk", None, "not valid JSON"),
])
def test_malformed_requests_are_clear_errors(raw, header, msg):
    with pytest.raises(oip.OIPError, match=msg):
        oip.decode_request(raw, header)


def test_binary_size_must_match_shape():
    head = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 4}}]}'
    with pytest.raises(oip.OIPError, match="needs 8 bytes"):
        oip.decode_request(head + b"\0" * 4, str(len(head)))


def test_check_inputs_against_model_metadata():
    meta = [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}]
    oip.check_inputs({"x": np.zeros((5, 3), np.float32)}, meta)
    with pytest.raises(oip.OIPError, match="must have shape"):
        oip.check_inputs({"x": np.zeros((5, 4), np.float32)}, meta)
    with pytest.raises(oip.OIPError, match="must be FP32, got FP64"):
        oip.check_inputs({"x": np.zeros((5, 3))}, meta)
    with pytest.raises(oip.OIPError, match="missing input 'x'"):
        oip.check_inputs({}, meta)
    with pytest.raises(oip.OIPError, match="unknown input 'w'"):
        oip.check_inputs({"x": np.zeros((1, 3), np.float32), "w": np.zeros(1)}, meta)
