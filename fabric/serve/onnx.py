"""``serve.onnx``: an exported ONNX model behind the Open Inference Protocol.

The checkpoint is a directory (a local path, an fsspec URL, or a ``fabric.ml`` Checkpoint)
holding ``model.onnx`` and ``fabric_checkpoint.json``. The model is loaded with onnxruntime
directly; its metadata (names, datatypes, shapes with -1 for dynamic axes) is read from the
model itself. Requests that arrive together are run as one batch along the first axis when
every input's first axis is dynamic (those that agree past it), then split back; the replica
decodes the requests and encodes the answers, so the gateway only forwards bytes.
"""
from __future__ import annotations

import json
import os

_ORT_TYPES = {"tensor(bool)": "BOOL", "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16",
              "tensor(uint32)": "UINT32", "tensor(uint64)": "UINT64", "tensor(int8)": "INT8",
              "tensor(int16)": "INT16", "tensor(int32)": "INT32", "tensor(int64)": "INT64",
              "tensor(float16)": "FP16", "tensor(float)": "FP32", "tensor(double)": "FP64",
              "tensor(string)": "BYTES"}


def _checkpoint_url(ckpt) -> str:
    path = getattr(ckpt, "path", ckpt)
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if not isinstance(path, str):
        raise TypeError(f"serve.onnx takes a checkpoint directory (a path, URL or Checkpoint), got {type(ckpt).__name__}")
    return path


def _read(url: str, name: str) -> bytes:
    import fsspec

    full = url.rstrip("/") + "/" + name
    try:
        with fsspec.open(full, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{url} is not an ONNX checkpoint: it has no {name} "
                                f"(make one with fabric.ml.export_onnx)") from None


def _session(model_bytes: bytes, threads: int = 1):
    from ..ml._deps import need

    ort = need("onnxruntime", "onnx")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(model_bytes, sess_options=so, providers=["CPUExecutionProvider"])


def _tensor_meta(args) -> list:
    out = []
    for a in args:
        dt = _ORT_TYPES.get(a.type)
        if dt is None:
            raise ValueError(f"ONNX tensor {a.name!r} has type {a.type}, which the inference protocol cannot carry")
        out.append({"name": a.name, "datatype": dt, "shape": [d if isinstance(d, int) and d >= 0 else -1 for d in a.shape]})
    return out


def read_metadata(url: str) -> tuple[dict, bytes]:
    meta = json.loads(_read(url, "fabric_checkpoint.json") or b"{}")
    fw = meta.get("framework")
    if fw not in (None, "onnx"):
        raise ValueError(f"{url} is a {fw} checkpoint; serve.onnx needs an ONNX one (fabric.ml.export_onnx makes it)")
    model = _read(url, "model.onnx")
    try:
        sess = _session(model)
    except Exception as e:  # noqa: BLE001 - onnxruntime's own errors are not one class
        if type(e).__name__ == "MissingDependency":
            raise
        raise ValueError(f"{url}/model.onnx cannot be loaded by onnxruntime: {e}") from None
    return {"inputs": _tensor_meta(sess.get_inputs()), "outputs": _tensor_meta(sess.get_outputs()),
            "platform": "onnxruntime_onnx", "checkpoint": meta}, model


def _err(msg: str) -> bytes:
    return json.dumps({"error": msg}).encode()


class OnnxModel:
    """The replica's model. ``infer_http`` serves the gateway: the OIP codec runs here, in the
    replica's process, so the gateway only forwards bytes (as it does for JSON routes) and its
    one core is left to HTTP. ``__call__`` serves Python handles."""

    def __init__(self, url: str, threads: int = 1, name: str = "model", version: str | None = None):
        self.sess = _session(_read(url, "model.onnx"), threads)
        self.name, self.version = name, version
        self.meta_inputs = _tensor_meta(self.sess.get_inputs())
        self.inputs = [a.name for a in self.sess.get_inputs()]
        self.outputs = [a.name for a in self.sess.get_outputs()]
        self.batchable = all(len(a.shape) > 0 and not isinstance(a.shape[0], int) for a in self.sess.get_inputs()) \
            and all(len(a.shape) > 0 and not isinstance(a.shape[0], int) for a in self.sess.get_outputs())

    def __call__(self, inputs: dict) -> dict:
        """From a Python handle: ``{input: array}`` -> ``{output: array}``."""
        return self._run(inputs)

    def _run(self, feeds):
        return dict(zip(self.outputs, self.sess.run(None, feeds)))

    def infer_http(self, items: list) -> list:
        """``items``: ``(body, Inference-Header-Content-Length or None)`` per ``infer`` request.
        Returns ``(status, body, header length or None)`` per request, in order: 400 for a request
        the codec or the model's metadata rejects, 500 for a failed run, the rest 200."""
        from . import oip

        res: list = [None] * len(items)
        reqs = {}
        for i, (body, hl) in enumerate(items):
            try:
                r = oip.decode_request(body, hl)
                oip.check_inputs(r.inputs, self.meta_inputs)
                oip.check_outputs(r.outputs, self.outputs)
            except oip.OIPError as e:
                res[i] = (400, _err(str(e)), None)
                continue
            reqs[i] = r
        # requests whose inputs agree past the first axis run as one (concatenated) batch
        groups: dict = {}
        for i, r in reqs.items():
            key = tuple(r.inputs[n].shape[1:] for n in self.inputs) if self.batchable else i
            groups.setdefault(key, []).append(i)
        for idxs in groups.values():
            for i, out in zip(idxs, self._run_group([reqs[i].inputs for i in idxs])):
                if isinstance(out, str):
                    res[i] = (500, _err(out), None)
                    continue
                r = reqs[i]
                try:
                    body, headers = oip.encode_response(self.name, self.version, r.id, out, r.outputs,
                                                        r.binary_output)
                except oip.OIPError as e:
                    res[i] = (500, _err(str(e)), None)
                    continue
                res[i] = (200, body, headers.get(oip.HEADER_LENGTH))
        return res

    def _run_group(self, feeds: list) -> list:
        """One ``{output: array}`` (or an error message) per feed: one run for the whole group
        when it stacks, else (or if the stacked run fails) one run each, which names the bad one."""
        import numpy as np

        if len(feeds) > 1:
            try:
                sizes = [len(f[self.inputs[0]]) for f in feeds]
                out = self._run({n: np.concatenate([f[n] for f in feeds]) for n in self.inputs})
                total = sum(sizes)
                if all(len(v) == total for v in out.values()):
                    res, a = [], 0
                    for k in sizes:
                        res.append({name: v[a:a + k] for name, v in out.items()})
                        a += k
                    return res
            except Exception:  # noqa: BLE001 - fall back to one run per request
                pass
        res = []
        for f in feeds:
            try:
                res.append(self._run(f))
            except Exception as e:  # noqa: BLE001 - onnxruntime's errors are not one class
                res.append(f"{type(e).__name__}: {e}")
        return res


def onnx(checkpoint, *, name: str, max_batch_size: int = 64, version: str = "1", num_replicas: int = 1,
         autoscaling_config: dict | None = None, cpus: float = 1, gpus: float = 0, threads: int = 1,
         max_queued_requests: int = 1024, route_prefix: str | None = None, wait: bool = True):
    """Deploy an exported ONNX model as ``/v2/models/{name}`` and return its handle."""
    from . import api
    from .deployment import Application, Deployment, check_options

    url = _checkpoint_url(checkpoint)
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"name must be a non-empty string without '/', got {name!r}")
    meta, _ = read_metadata(url)
    opts = check_options({"num_replicas": num_replicas, "autoscaling_config": autoscaling_config, "cpus": cpus,
                          "gpus": gpus, "max_ongoing_requests": max_batch_size, "version": version,
                          "max_queued_requests": max_queued_requests, "idempotent": True, "name": name})
    app = Application(Deployment(OnnxModel, opts), (url, threads, name, version), {}, kind="oip", meta=meta)
    return api.run(app, name=name, route_prefix=route_prefix, wait=wait)
