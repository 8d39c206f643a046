"""A rolling redeploy under steady load: fabric (an app: a function called through
``fabric.lookup`` and a serve deployment over HTTP, redeployed with ``fabric deploy``) against
Ray Serve (the same deployment redeployed with ``serve.run``; Ray has no versioned lookup, so
its side is HTTP only), side by side in one run.

Reported per side and stream: requests, failed requests (must be 0), the switch time (deploy
command start -> first answer of the new version, and -> the deploy's return), whether any old
answer came after the first new one, and latency p50/p99 before and during the switch (from the
deploy's start to a second after the last old-version answer).

usage: python loadtests/bench_redeploy.py [--http-clients 4] [--lookup-clients 2] [--steady 3]
                                          [--no-peer] [--json out.json]
The peer side runs as ``/work/main/.venv-peers/bin/python loadtests/bench_redeploy.py --side ray``.
Load clients use the standard library only (http.client, keep-alive), the same on both sides.
"""
import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

PEERS_PY = "/work/main/.venv-peers/bin/python"
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

APP = '''
import os
import fabric
from fabric import serve

app = fabric.App("bench")

@app.fn(cpus=0.5)
def score(order):
    return {{"version": "{tag}", "total": order["total"] * 2}}

@serve.deployment(cpus=0.1, num_replicas=2)
class Scorer:
    def __init__(self, tag):
        self.tag = tag

    def __call__(self, body):
        return {{"version": self.tag, "total": body["total"] * 2}}

app.deployment(Scorer.bind("{tag}"), route_prefix="/bench/score")
'''


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


class Recorder:
    def __init__(self):
        self.rows = []   # (start monotonic, latency s, version or None, error or None)
        self.lock = threading.Lock()

    def add(self, t0, dt, version, error=None):
        with self.lock:
            self.rows.append((t0, dt, version, error))


def http_client(host, port, path, rec, stop):
    conn = http.client.HTTPConnection(host, port, timeout=60)
    body = json.dumps({"total": 1})
    while not stop.is_set():
        t0 = time.monotonic()
        try:
            conn.request("POST", path, body, {"content-type": "application/json"})
            r = conn.getresponse()
            data = r.read()
            if r.status == 200:
                rec.add(t0, time.monotonic() - t0, json.loads(data)["version"])
            else:
                rec.add(t0, time.monotonic() - t0, None, f"{r.status} {data[:200]!r}")
        except Exception as e:  # noqa: BLE001 - a failed request is what we count
            rec.add(t0, time.monotonic() - t0, None, repr(e))
            conn.close()
            conn = http.client.HTTPConnection(host, port, timeout=60)
    conn.close()


def summarize(rec, t_deploy, t_returned):
    rows = sorted(rec.rows)
    failed = [r for r in rows if r[3] is not None]
    new = [r for r in rows if r[2] == "v2"]
    old = [r for r in rows if r[2] == "v1"]
    first_new = min((r[0] + r[1] for r in new), default=None)
    last_old = max((r[0] + r[1] for r in old), default=t_deploy)
    window_end = max(last_old, t_returned) + 1.0
    before = [r[1] for r in rows if r[0] + r[1] < t_deploy]
    during = [r[1] for r in rows if t_deploy <= r[0] <= window_end]
    return {"requests": len(rows), "failed": len(failed), "failures": [r[3] for r in failed[:5]],
            "first_new_after_s": None if first_new is None else round(first_new - t_deploy, 3),
            "deploy_returned_after_s": round(t_returned - t_deploy, 3),
            "old_after_first_new": sum(1 for r in old if first_new is not None and r[0] > first_new),
            "p50_before_ms": round(pct(before, 50) * 1e3, 2), "p99_before_ms": round(pct(before, 99) * 1e3, 2),
            "p50_switch_ms": round(pct(during, 50) * 1e3, 2), "p99_switch_ms": round(pct(during, 99) * 1e3, 2),
            "max_switch_ms": round(max(during, default=float("nan")) * 1e3, 2)}


def _run_load(start_clients, deploy, steady):
    """Start the clients, let them run ``steady`` s, redeploy, run until the old version has
    been gone ``steady`` s; returns (recorders, t_deploy, t_returned)."""
    stop = threading.Event()
    recs, threads = start_clients(stop)
    time.sleep(steady)
    t_deploy = time.monotonic()
    deploy()
    t_returned = time.monotonic()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # until every stream answers v2 for `steady` seconds
        recent = [r for rec in recs.values() for r in rec.rows if r[0] > time.monotonic() - steady]
        if recent and all(r[2] == "v2" for r in recent) and time.monotonic() - t_returned > steady:
            break
        time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join(90)
    return recs, t_deploy, t_returned


def fabric_side(a):
    import socket

    def free():
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        p = s.getsockname()[1]
        s.close()
        return p

    home = tempfile.mkdtemp(prefix="fabric-bench-redeploy-")
    port, sport = free(), free()
    env = dict(os.environ, FABRIC_HOME=home, FABRIC_SERVE_PORT=str(sport))
    env.pop("FABRIC_ADDRESS", None)
    fab = [sys.executable, "-m", "fabric.cli"]
    subprocess.run(fab + ["start", "--port", str(port), "--cpus", "2", "--detach", "--serve", str(sport)],
                   env=env, check=True, capture_output=True, timeout=120)
    os.environ.update(FABRIC_HOME=home, FABRIC_SERVE_PORT=str(sport))
    appdir = tempfile.mkdtemp(prefix="fabric-bench-app-")
    path = os.path.join(appdir, "bench_app.py")
    try:
        with open(path, "w") as f:
            f.write(APP.format(tag="v1"))
        subprocess.run(fab + ["deploy", path], env=env, check=True, capture_output=True, text=True, timeout=300)
        import fabric

        fabric.init(address=f"tcp://127.0.0.1:{port}")
        h = fabric.lookup("bench", "score")

        def lookup_client(rec, stop):
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    v = h.remote({"total": 1}).result(timeout=60)["version"]
                    rec.add(t0, time.monotonic() - t0, v)
                except Exception as e:  # noqa: BLE001
                    rec.add(t0, time.monotonic() - t0, None, repr(e))

        def start(stop):
            recs = {"http": Recorder(), "lookup": Recorder()}
            ts = [threading.Thread(target=http_client, args=("127.0.0.1", sport, "/bench/score", recs["http"], stop))
                  for _ in range(a.http_clients)]
            ts += [threading.Thread(target=lookup_client, args=(recs["lookup"], stop)) for _ in range(a.lookup_clients)]
            for t in ts:
                t.start()
            return recs, ts

        def deploy():
            with open(path, "w") as f:
                f.write(APP.format(tag="v2"))
            r = subprocess.run(fab + ["deploy", path], env=env, capture_output=True, text=True, timeout=300)
            if r.returncode:
                raise SystemExit(f"fabric deploy failed: {r.stderr}")

        recs, t_deploy, t_returned = _run_load(start, deploy, a.steady)
        fabric.shutdown()
        return {k: summarize(v, t_deploy, t_returned) for k, v in recs.items()}
    finally:
        subprocess.run(fab + ["stop"], env=env, capture_output=True, timeout=60)


def ray_side(a):
    import ray
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)

    @serve.deployment(ray_actor_options={"num_cpus": 0.1}, num_replicas=2)
    class Scorer:
        def __init__(self, tag):
            self.tag = tag

        async def __call__(self, request):
            body = await request.json()
            return {"version": self.tag, "total": body["total"] * 2}

    serve.start(http_options={"host": "127.0.0.1", "port": 8123})
    serve.run(Scorer.bind("v1"), name="bench", route_prefix="/bench/score")

    def start(stop):
        recs = {"http": Recorder()}
        ts = [threading.Thread(target=http_client, args=("127.0.0.1", 8123, "/bench/score", recs["http"], stop))
              for _ in range(a.http_clients)]
        for t in ts:
            t.start()
        return recs, ts

    recs, t_deploy, t_returned = _run_load(start, lambda: serve.run(Scorer.bind("v2"), name="bench",
                                                                   route_prefix="/bench/score"), a.steady)
    serve.shutdown()
    ray.shutdown()
    return {k: summarize(v, t_deploy, t_returned) for k, v in recs.items()}


def table(results):
    cols = ["requests", "failed", "first_new_after_s", "deploy_returned_after_s", "old_after_first_new",
            "p50_before_ms", "p99_before_ms", "p50_switch_ms", "p99_switch_ms", "max_switch_ms"]
    print(f"{'side/stream':<16}" + "".join(f"{c:>24}" for c in cols))
    for side, streams in results.items():
        for stream, s in streams.items():
            print(f"{side + '/' + stream:<16}" + "".join(f"{str(s[c]):>24}" for c in cols))
            for f in s["failures"]:
                print(f"   failure: {f}")
    if "ray" in results and "fabric" in results:
        f, r = results["fabric"]["http"], results["ray"]["http"]
        for c in ("first_new_after_s", "p99_switch_ms"):
            if f[c] and r[c]:
                print(f"ratio fabric/ray http {c}: {f[c] / r[c]:.2f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--side", choices=["fabric", "ray", "both"], default="both")
    ap.add_argument("--http-clients", type=int, default=4)
    ap.add_argument("--lookup-clients", type=int, default=2)
    ap.add_argument("--steady", type=float, default=3.0, help="seconds of load before and after the switch")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.side == "ray":
        print(json.dumps(ray_side(a)))
        return
    results = {"fabric": fabric_side(a)}
    if a.side == "both" and not a.no_peer:
        if os.path.exists(PEERS_PY):
            r = subprocess.run([PEERS_PY, os.path.abspath(__file__), "--side", "ray", "--http-clients",
                                str(a.http_clients), "--steady", str(a.steady)],
                               capture_output=True, text=True, timeout=600)
            try:
                results["ray"] = json.loads(r.stdout.strip().splitlines()[-1])
            except (ValueError, IndexError):
                print(f"ray side failed:\n{r.stderr[-2000:]}", file=sys.stderr)
        else:
            print(f"no peers venv at {PEERS_PY}: ray side skipped", file=sys.stderr)
    table(results)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)
    failed = sum(s["failed"] for s in results["fabric"].values())
    if failed:
        raise SystemExit(f"fabric: {failed} failed requests during the redeploy")


if __name__ == "__main__":
    main()
