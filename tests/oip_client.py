"""A small Open Inference Protocol v2 (REST) client written from the protocol's text, using only
the standard library, so the gateway is also checked by a client that shares no code with it.

    c = OIPClient("http://127.0.0.1:8000")
    c.server_live(); c.model_metadata("m")
    outputs = c.infer("m", {"x": ("FP32", [2, 3], [0.0] * 6)}, binary=True)
"""
import json
import struct
import urllib.error
import urllib.request

_FORMATS = {"BOOL": "?", "UINT8": "B", "UINT16": "H", "UINT32": "I", "UINT64": "Q", "INT8": "b", "INT16": "h",
            "INT32": "i", "INT64": "q", "FP16": "e", "FP32": "f", "FP64": "d"}


class OIPHTTPError(Exception):
    def __init__(self, status, body):
        super().__init__(f"HTTP {status}: {body}")
        self.status, self.body = status, body


class OIPClient:
    def __init__(self, url, token=None):
        self.url = url.rstrip("/")
        self.token = token

    def _do(self, method, path, data=None, headers=None):
        h = dict(headers or {})
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            raise OIPHTTPError(e.code, e.read().decode("utf-8", "replace")) from None

    def _get_json(self, path):
        return json.loads(self._do("GET", path)[2])

    def server_metadata(self):
        return self._get_json("/v2")

    def server_live(self):
        return self._do("GET", "/v2/health/live")[0] == 200

    def server_ready(self):
        return self._do("GET", "/v2/health/ready")[0] == 200

    def model_ready(self, name, version=None):
        v = f"/versions/{version}" if version else ""
        try:
            return self._do("GET", f"/v2/models/{name}{v}/ready")[0] == 200
        except OIPHTTPError:
            return False

    def model_metadata(self, name, version=None):
        v = f"/versions/{version}" if version else ""
        return self._get_json(f"/v2/models/{name}{v}")

    def infer(self, name, inputs, outputs=None, binary=False, request_id=None, version=None):
        """``inputs``: {name: (datatype, shape, flat list of values)}. Returns
        ``(response json, {output name: (datatype, shape, flat list)})``."""
        tensors, blobs = [], []
        for n, (dt, shape, values) in inputs.items():
            t = {"name": n, "datatype": dt, "shape": list(shape)}
            if binary:
                if dt == "BYTES":
                    raw = b"".join(struct.pack("<I", len(v)) + v for v in values)
                else:
                    raw = struct.pack("<%d%s" % (len(values), _FORMATS[dt]), *values)
                t["parameters"] = {"binary_data_size": len(raw)}
                blobs.append(raw)
            else:
                t["data"] = [v.decode() if isinstance(v, bytes) else v for v in values]
            tensors.append(t)
        req = {"inputs": tensors}
        if request_id is not None:
            req["id"] = request_id
        if outputs is not None:
            req["outputs"] = [{"name": o, "parameters": {"binary_data": binary}} for o in outputs]
        head = json.dumps(req).encode()
        headers = {"Content-Type": "application/octet-stream" if binary else "application/json"}
        if binary:
            headers["Inference-Header-Content-Length"] = str(len(head))
        v = f"/versions/{version}" if version else ""
        status, rh, body = self._do("POST", f"/v2/models/{name}{v}/infer", head + b"".join(blobs), headers)
        hl = {k.lower(): val for k, val in rh.items()}.get("inference-header-content-length")
        hl = int(hl) if hl is not None else len(body)
        resp = json.loads(body[:hl])
        off, out = hl, {}
        for t in resp["outputs"]:
            count = 1
            for d in t["shape"]:
                count *= d
            size = (t.get("parameters") or {}).get("binary_data_size")
            if size is None:
                data = t["data"]
                while data and isinstance(data[0], list):  # nested is allowed too
                    data = [x for row in data for x in row]
                out[t["name"]] = (t["datatype"], t["shape"], data)
                continue
            raw = body[off:off + size]
            off += size
            if t["datatype"] == "BYTES":
                vals, i = [], 0
                while i < len(raw):
                    (ln,) = struct.unpack_from("<I", raw, i)
                    vals.append(raw[i + 4:i + 4 + ln])
                    i += 4 + ln
            else:
                vals = list(struct.unpack("<%d%s" % (count, _FORMATS[t["datatype"]]), raw))
            out[t["name"]] = (t["datatype"], t["shape"], vals)
        return resp, out
