"""fabric.serve against Ray Serve, side by side in one run (wrk -t1 -c16, as the issue's anchor).

  noop / mlp      requests/s, p50, p99 with `wrk -t1 -c16 -d10s` (targets: >= 5,000/s, p99 < 10 ms)
  added latency   p50 over HTTP at concurrency 1 (wrk -c1) minus p50 of handle.remote().result()
                  from Python (target < 1 ms)
  oip mlp         the same MLP exported to ONNX behind OIP infer, batching on (target >= 4,000/s)
  scale from zero time from the first request to its answer with no replica running
  CPU per request the gateway's, and the whole cluster's (this process and its descendants), per
                  request of each wrk run: steadier than requests/s on a shared machine

Ray Serve's side: `/work/main/.venv-peers/bin/python /work/shared/bench/ray_ml.py serve`.

usage: python loadtests/bench_serve.py [--seconds 10] [--repeat 3] [--no-peer] [--json out.json]
Needs wrk (apt-get install wrk).
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

PEERS_PY = "/work/main/.venv-peers/bin/python"
RAY_ML = "/work/shared/bench/ray_ml.py"
MLP_BODY = json.dumps({"inputs": [0.5] * 16})
OIP_BODY = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 16], "data": [0.5] * 16}]})


def lua(body):
    p = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
    p.write('wrk.method="POST"\nwrk.body=%s\nwrk.headers["Content-Type"]="application/json"\n' % json.dumps(body))
    p.close()
    return p.name


def _cpu_seconds(gateway_pid):
    """CPU seconds so far of the gateway, and of this process with all its descendants (the
    cluster: broker, executors, replicas, gateway): on a shared machine CPU per request says
    more than requests/s."""
    import psutil

    me = psutil.Process()
    total, gw = 0.0, 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
        if p.pid == gateway_pid:
            gw = t.user + t.system
    return gw, total


GATEWAY_PID = None


def wrk(url, script=None, seconds=10, conns=16):
    args = ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency"] + (["-s", script] if script else []) + [url]
    before = _cpu_seconds(GATEWAY_PID) if GATEWAY_PID else None
    out = subprocess.run(args, capture_output=True, text=True).stdout
    got = {"non2xx": 0}
    if before is not None:
        after = _cpu_seconds(GATEWAY_PID)
        n = next((int(line.split()[0]) for line in out.splitlines() if "requests in" in line), 0)
        if n:
            got["gateway_cpu_us_per_req"] = round((after[0] - before[0]) / n * 1e6, 1)
            got["cluster_cpu_us_per_req"] = round((after[1] - before[1]) / n * 1e6, 1)
    for line in out.splitlines():
        s = line.split()
        if line.startswith("Requests/sec"):
            got["rps"] = float(s[1])
        elif "Non-2xx" in line:
            got["non2xx"] = int(s[-1])
        elif s[:1] in (["50%"], ["99%"]):
            v = s[1]
            got["p" + s[0][:-1] + "_ms"] = float(v[:-2]) if v.endswith("ms") else (
                float(v[:-2]) / 1000 if v.endswith("us") else float(v[:-1]) * 1000)
    return got


def wrk_median(url, script, seconds, repeat, conns=16):
    """The run with the median req/s of ``repeat`` runs (the machine may be shared), with all runs' req/s."""
    runs = sorted((wrk(url, script, seconds, conns) for _ in range(repeat)), key=lambda r: r.get("rps", 0))
    return {**runs[len(runs) // 2], "runs_rps": [r.get("rps") for r in runs]}


def fabric_side(seconds, repeat=1):
    import httpx

    import fabric
    from fabric import serve
    from test_serve_http import make_mlp_checkpoint

    @serve.deployment(num_replicas=1, max_ongoing_requests=64, cpus=0.5)
    class Noop:
        def __call__(self):
            return "ok"

    @serve.deployment(num_replicas=1, max_ongoing_requests=64, cpus=0.5)
    class MLP:
        def __init__(self):
            rng = np.random.default_rng(0)
            self.w1, self.w2 = rng.standard_normal((16, 64)), rng.standard_normal((64, 2))

        def __call__(self, body):
            x = np.asarray(body["inputs"], dtype=np.float64)
            return {"outputs": (np.maximum(x @ self.w1, 0) @ self.w2).tolist()}

    @serve.deployment(cpus=0.5, autoscaling_config={"min_replicas": 0, "max_replicas": 1,
                                                     "target_ongoing_requests": 1, "downscale_delay_s": 1})
    class Cold:
        def __call__(self):
            return "ok"

    rows = []
    fabric.init(num_cpus=2)
    import socket

    with socket.socket() as s:   # a free port, not 8000: the machine may run other gateways
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    h = serve.run(Noop.bind(), name="noop", route_prefix="/noop", port=port)
    serve.run(MLP.bind(), name="mlp", route_prefix="/mlp")
    ckpt = tempfile.mkdtemp(prefix="bench-serve-")
    make_mlp_checkpoint(ckpt)
    serve.onnx(ckpt, name="mlp_onnx", max_batch_size=64, cpus=0.5)
    mlp_lua, oip_lua = lua(MLP_BODY), lua(OIP_BODY)
    global GATEWAY_PID
    from fabric.serve import state

    GATEWAY_PID = state.read(port)["pid"]
    with httpx.Client(base_url=base) as c:   # warm every path once
        assert c.get("/noop").status_code == 200
        assert c.post("/mlp", content=MLP_BODY).status_code == 200
        assert c.post("/v2/models/mlp_onnx/infer", content=OIP_BODY).status_code == 200, "oip"
    for name, dep, url, script in [("noop", "noop", f"{base}/noop", None), ("mlp", "mlp", f"{base}/mlp", mlp_lua),
                                   ("oip-mlp", "mlp_onnx", f"{base}/v2/models/mlp_onnx/infer", oip_lua)]:
        s0, n0 = batch_sizes(base, dep)
        rows.append({"peer": "fabric", "route": name, **wrk_median(url, script, seconds, repeat)})
        s1, n1 = batch_sizes(base, dep)
        rows[-1]["mean_batch"] = (s1 - s0) / (n1 - n0) if n1 > n0 else float("nan")

    # added latency at concurrency 1: HTTP (wrk -c1) against the handle from Python
    c1 = wrk_median(f"{base}/noop", None, max(2, seconds // 2), repeat, conns=1)
    lat = []
    for i in range(2000):
        t = time.perf_counter()
        h.remote().result()
        lat.append(time.perf_counter() - t)
    handle_p50 = statistics.median(lat[200:]) * 1e3
    rows.append({"peer": "fabric", "route": "noop c=1", **c1, "handle_p50_ms": handle_p50,
                 "added_p50_ms": c1.get("p50_ms", float("nan")) - handle_p50})

    serve.run(Cold.bind(), name="cold", route_prefix="/cold")
    with httpx.Client(base_url=base, timeout=120) as c:
        t = time.perf_counter()
        r = c.get("/cold")
        dt = time.perf_counter() - t
    rows.append({"peer": "fabric", "route": "scale from zero", "first_answer_s": dt, "status": r.status_code})
    serve.shutdown()
    fabric.shutdown()
    shutil.rmtree(ckpt, ignore_errors=True)
    for p in (mlp_lua, oip_lua):
        os.unlink(p)
    return rows


def batch_sizes(base, deployment) -> tuple[float, float]:
    """(sum, count) of ``deployment``'s batch-size histogram on the gateway's /metrics: requests
    per replica call, so the difference over a wrk run is that run's mean batch."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    got = {"fabric_serve_batch_size_sum": 0.0, "fabric_serve_batch_size_count": 0.0}
    for family in text_string_to_metric_families(httpx.get(f"{base}/metrics").text):
        for sample in family.samples:
            if sample.name in got and sample.labels.get("deployment") == deployment:
                got[sample.name] = sample.value
    return got["fabric_serve_batch_size_sum"], got["fabric_serve_batch_size_count"]


def peer_side():
    if not os.path.exists(PEERS_PY):
        return []
    out = subprocess.run([PEERS_PY, RAY_ML, "serve", "--cpus", "2"], capture_output=True, text=True, timeout=900)
    rows = []
    for line in out.stdout.splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    if not rows:
        print("ray side produced nothing:", out.stderr[-2000:], file=sys.stderr)
    return rows


def table(rows):
    f = {r["route"]: r for r in rows if r["peer"] == "fabric"}
    ray = {r["route"]: r for r in rows if r["peer"] == "ray-serve"}
    nan = float("nan")
    print(f"{'workload':<18}{'fabric req/s':>14}{'p50 ms':>9}{'p99 ms':>9}{'ray req/s':>12}{'ray p99':>9}{'ratio':>8}"
          f"{'gw CPU us/req':>15}{'cluster CPU us/req':>20}{'batch':>7}")
    for k in ("noop", "mlp", "oip-mlp"):
        a, b = f.get(k, {}), ray.get(k, {})
        ratio = a.get("rps", 0) / b["rps"] if b.get("rps") else nan
        print(f"{k:<18}{a.get('rps', nan):>14,.0f}{a.get('p50_ms', nan):>9.2f}"
              f"{a.get('p99_ms', nan):>9.2f}{b.get('rps', nan):>12,.0f}"
              f"{b.get('p99_ms', nan):>9.1f}{ratio:>7.1f}x{a.get('gateway_cpu_us_per_req', nan):>15,.0f}"
              f"{a.get('cluster_cpu_us_per_req', nan):>20,.0f}{a.get('mean_batch', nan):>7.1f}")
    c1 = f.get("noop c=1", {})
    print(f"added latency at c=1: HTTP p50 {c1.get('p50_ms', float('nan')):.3f} ms - handle p50 "
          f"{c1.get('handle_p50_ms', float('nan')):.3f} ms = {c1.get('added_p50_ms', float('nan')):.3f} ms (target < 1)")
    z = f.get("scale from zero", {})
    print(f"scale from zero: first answer after {z.get('first_answer_s', float('nan')):.2f} s (HTTP {z.get('status')})")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--repeat", type=int, default=1, help="wrk runs per workload; the median is reported")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed: apt-get update && apt-get install -y wrk")
    rows = fabric_side(a.seconds, a.repeat)
    if not a.no_peer:
        rows += peer_side()
    for r in rows:
        print(json.dumps(r))
    table(rows)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
