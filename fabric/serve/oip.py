"""The Open Inference Protocol v2 (REST) codec, with the binary tensor data extension.

Pure: bytes and JSON in, numpy arrays out, and back. A tensor is ``{"name", "datatype",
"shape", "data"}`` with ``data`` flat or nested in row-major order, or, with the binary
extension, ``"parameters": {"binary_data_size": n}`` and its bytes after the JSON header
(whose length is the ``Inference-Header-Content-Length`` header). BYTES elements in binary
form are each a 4-byte little-endian length and the bytes. Every malformed input raises
:class:`OIPError` with a message for the client (answered 400).
"""
from __future__ import annotations

import json
import math

import numpy as np

HEADER_LENGTH = "inference-header-content-length"

DTYPES = {"BOOL": np.dtype(np.bool_), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
          "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "INT8": np.dtype(np.int8),
          "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
          "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
          "BYTES": np.dtype(object)}
_BY_NUMPY = {v: k for k, v in DTYPES.items() if k != "BYTES"}
_FMAX = {d: float(np.finfo(d).max) for d in (DTYPES["FP16"], DTYPES["FP32"], DTYPES["FP64"])}


class OIPError(ValueError):
    """A request that does not follow the protocol (or the model's metadata): HTTP 400."""


def datatype_of(arr: np.ndarray) -> str:
    if arr.dtype.kind in "OSU":
        return "BYTES"
    dt = _BY_NUMPY.get(arr.dtype)
    if dt is None:
        raise OIPError(f"numpy dtype {arr.dtype} has no Open Inference Protocol datatype")
    return dt


class InferRequest:
    __slots__ = ("id", "inputs", "outputs", "parameters", "binary_output")

    def __init__(self, id, inputs, outputs, parameters, binary_output):
        self.id = id                        # echoed in the response (None: not given)
        self.inputs = inputs                # {name: ndarray}, in request order
        self.outputs = outputs              # None (all) or [(name, binary: bool | None)]
        self.parameters = parameters
        self.binary_output = binary_output  # request-level "binary_data_output"


def _shape(v, where):
    if not isinstance(v, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in v):
        raise OIPError(f"{where}: 'shape' must be a list of whole numbers >= 0, got {v!r}")
    return v


def _flatten(data):
    """Nested lists to one flat list (row-major), without numpy guessing a ragged shape."""
    if not isinstance(data, list):
        return [data]
    if not data or not isinstance(data[0], list):
        return data
    out = []
    stack = [iter(data)]
    while stack:
        for x in stack[-1]:
            if isinstance(x, list):
                stack.append(iter(x))
                break
            out.append(x)
        else:
            stack.pop()
    return out


def _from_json(name, datatype, shape, data):
    n = math.prod(shape)
    flat = _flatten(data)
    if len(flat) != n:
        raise OIPError(f"input {name!r}: shape {shape} needs {n} elements, 'data' has {len(flat)}")
    if datatype == "BYTES":
        out = np.empty(n, dtype=object)
        for i, x in enumerate(flat):
            if isinstance(x, str):
                out[i] = x.encode()
            else:
                raise OIPError(f"input {name!r}: BYTES elements in JSON must be strings, got {type(x).__name__}")
        return out.reshape(shape)
    dt = DTYPES[datatype]
    try:
        raw = np.asarray(flat) if n else np.zeros(0, dt)
    except (ValueError, TypeError) as e:
        raise OIPError(f"input {name!r}: 'data' is not a list of numbers: {e}") from None
    kind = raw.dtype.kind
    ok = {"b": "b", "u": "iu", "i": "iu", "f": "iuf"}[dt.kind]
    if n and kind not in ok:
        what = {"b": "true/false", "u": "whole numbers", "i": "whole numbers", "f": "numbers"}[dt.kind]
        raise OIPError(f"input {name!r}: datatype {datatype} needs {what} in 'data', got "
                       f"{'strings' if kind in 'US' else 'booleans' if kind == 'b' else 'floats' if kind == 'f' else 'mixed values'}")
    if n and dt.kind in "iu":
        info = np.iinfo(dt)
        lo, hi = int(raw.min()), int(raw.max())
        if lo < info.min or hi > info.max:
            raise OIPError(f"input {name!r}: values {lo}..{hi} do not fit {datatype}")
    # a narrowing cast to a float type may overflow; only values beyond its max can (the exact
    # check, with numpy's warning silenced, runs only then)
    if n and dt.kind == "f" and dt.itemsize < raw.dtype.itemsize and not float(np.abs(raw).max()) <= _FMAX[dt]:
        with np.errstate(over="ignore"):
            arr = raw.astype(dt)
        if not np.isfinite(arr).all() and np.isfinite(raw.astype(np.float64)).all():
            raise OIPError(f"input {name!r}: values overflow {datatype}")
        return arr.reshape(shape)
    return raw.astype(dt, copy=False).reshape(shape)


def _from_binary(name, datatype, shape, buf: memoryview):
    n = math.prod(shape)
    if datatype == "BYTES":
        out, i, b = np.empty(n, dtype=object), 0, bytes(buf)
        for k in range(n):
            if i + 4 > len(b):
                raise OIPError(f"input {name!r}: binary BYTES data ends after {k} of {n} elements")
            ln = int.from_bytes(b[i:i + 4], "little")
            if i + 4 + ln > len(b):
                raise OIPError(f"input {name!r}: binary BYTES element {k} is cut short")
            out[k] = b[i + 4:i + 4 + ln]
            i += 4 + ln
        if i != len(b):
            raise OIPError(f"input {name!r}: {len(b) - i} bytes left over after {n} BYTES elements")
        return out.reshape(shape)
    dt = DTYPES[datatype]
    if len(buf) != n * dt.itemsize:
        raise OIPError(f"input {name!r}: shape {shape} of {datatype} needs {n * dt.itemsize} bytes, "
                       f"binary_data_size is {len(buf)}")
    return np.frombuffer(buf, dtype=dt.newbyteorder("<")).astype(dt, copy=False).reshape(shape)


def decode_request(body: bytes, header_length: str | None = None) -> InferRequest:
    """An ``infer`` request body (JSON, or JSON header plus binary tensors) to arrays."""
    mv = memoryview(body)
    if header_length is not None:
        try:
            hl = int(header_length)
        except ValueError:
            raise OIPError(f"Inference-Header-Content-Length must be a whole number, got {header_length!r}") from None
        if not 0 < hl <= len(body):
            raise OIPError(f"Inference-Header-Content-Length {hl} does not fit a body of {len(body)} bytes")
    else:
        hl = len(body)
    try:
        req = json.loads(mv[:hl].tobytes() if hl != len(body) else body)
    except (ValueError, UnicodeDecodeError) as e:
        raise OIPError(f"the request is not valid JSON: {e}") from None
    if not isinstance(req, dict):
        raise OIPError("the request must be a JSON object with an 'inputs' list")
    inputs = req.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise OIPError("the request needs 'inputs': a non-empty list of tensors")
    rid = req.get("id")
    if rid is not None and not isinstance(rid, str):
        raise OIPError(f"'id' must be a string, got {type(rid).__name__}")
    params = req.get("parameters") or {}
    if not isinstance(params, dict):
        raise OIPError("'parameters' must be a JSON object")
    off = hl
    arrays = {}
    for i, t in enumerate(inputs):
        if not isinstance(t, dict):
            raise OIPError(f"inputs[{i}] must be a JSON object with name, datatype, shape and data")
        name = t.get("name")
        if not isinstance(name, str) or not name:
            raise OIPError(f"inputs[{i}] needs a 'name' string")
        if name in arrays:
            raise OIPError(f"input {name!r} given twice")
        dt = t.get("datatype")
        if dt not in DTYPES:
            raise OIPError(f"input {name!r}: unknown datatype {dt!r}; one of {', '.join(DTYPES)}")
        shape = _shape(t.get("shape"), f"input {name!r}")
        tp = t.get("parameters") or {}
        if not isinstance(tp, dict):
            raise OIPError(f"input {name!r}: 'parameters' must be a JSON object")
        size = tp.get("binary_data_size")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise OIPError(f"input {name!r}: binary_data_size must be a whole number >= 0")
            if "data" in t:
                raise OIPError(f"input {name!r} has both 'data' and binary_data_size")
            if off + size > len(body):
                raise OIPError(f"input {name!r}: binary_data_size {size} runs past the end of the body")
            arrays[name] = _from_binary(name, dt, shape, mv[off:off + size])
            off += size
        else:
            if "data" not in t:
                raise OIPError(f"input {name!r} needs 'data' (or binary_data_size with the binary extension)")
            arrays[name] = _from_json(name, dt, shape, t["data"])
    if off != len(body):
        raise OIPError(f"{len(body) - off} bytes after the tensors: Inference-Header-Content-Length or "
                       f"binary_data_size is wrong")
    outs = req.get("outputs")
    sel = None
    if outs is not None:
        if not isinstance(outs, list):
            raise OIPError("'outputs' must be a list of {\"name\": ...}")
        sel = []
        for o in outs:
            if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                raise OIPError("each of 'outputs' must be an object with a 'name'")
            op = o.get("parameters") or {}
            b = op.get("binary_data") if isinstance(op, dict) else None
            sel.append((o["name"], None if b is None else bool(b)))
    bo = params.get("binary_data_output")
    return InferRequest(rid, arrays, sel, params, bool(bo) if bo is not None else False)


def _tensor_bytes(arr: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        parts = []
        for x in arr.reshape(-1):
            b = x if isinstance(x, bytes) else str(x).encode()
            parts.append(len(b).to_bytes(4, "little"))
            parts.append(b)
        return b"".join(parts)
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()


def _json_data(arr: np.ndarray, datatype: str):
    flat = arr.reshape(-1)
    if datatype == "BYTES":
        return [x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x) for x in flat]
    if datatype == "FP16":
        flat = flat.astype(np.float32)
    return flat.tolist()


def encode_response(model_name: str, model_version: str | None, request_id, outputs: dict,
                    selection=None, binary_default: bool = False) -> tuple[bytes, dict]:
    """``(body, headers)`` of an ``infer`` response. ``selection`` is the request's ``outputs``."""
    if selection is None:
        chosen = [(n, None) for n in outputs]
    else:
        chosen = selection
        for n, _ in chosen:
            if n not in outputs:
                raise OIPError(f"unknown output {n!r}; the model's outputs are {', '.join(outputs)}")
    tensors, blobs = [], []
    for name, binary in chosen:
        arr = np.asarray(outputs[name])
        dt = datatype_of(arr)
        t = {"name": name, "datatype": dt, "shape": list(arr.shape)}
        if binary if binary is not None else binary_default:
            b = _tensor_bytes(arr, dt)
            t["parameters"] = {"binary_data_size": len(b)}
            blobs.append(b)
        else:
            t["data"] = _json_data(arr, dt)
        tensors.append(t)
    resp = {"model_name": model_name, "outputs": tensors}
    if model_version is not None:
        resp["model_version"] = model_version
    if request_id is not None:
        resp["id"] = request_id
    head = json.dumps(resp, separators=(",", ":")).encode()
    if not blobs:
        return head, {"content-type": "application/json"}
    return head + b"".join(blobs), {"content-type": "application/octet-stream",
                                    HEADER_LENGTH: str(len(head))}


def check_outputs(selection, names) -> None:
    """The request's ``outputs`` selection names only outputs the model has."""
    if selection is not None:
        for n, _ in selection:
            if n not in names:
                raise OIPError(f"unknown output {n!r}; the model's outputs are {', '.join(sorted(names))}")


def check_inputs(inputs: dict, meta_inputs: list) -> None:
    """The request's tensors against the model's metadata: names, datatypes, shapes (-1: any)."""
    want = {m["name"]: m for m in meta_inputs}
    for name in inputs:
        if name not in want:
            raise OIPError(f"unknown input {name!r}; the model's inputs are {', '.join(want)}")
    for name, m in want.items():
        a = inputs.get(name)
        if a is None:
            raise OIPError(f"missing input {name!r} ({m['datatype']} {m['shape']})")
        got = datatype_of(a) if a.dtype.kind != "O" else "BYTES"
        if got != m["datatype"]:
            raise OIPError(f"input {name!r} must be {m['datatype']}, got {got}")
        shape = m["shape"]
        if len(a.shape) != len(shape) or any(w != -1 and w != g for w, g in zip(shape, a.shape)):
            raise OIPError(f"input {name!r} must have shape {shape} (-1: any size), got {list(a.shape)}")
