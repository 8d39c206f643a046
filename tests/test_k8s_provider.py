"""The Kubernetes autoscaler provider against a local HTTP server that speaks the Kubernetes
API for the calls the provider makes (a Deployment's scale subresource; list, patch and delete
of Pods), with the official ``kubernetes`` client over real HTTP. No API server can run here,
so the server below plays the Deployment controller's part too: replicas make Pods, fewer
replicas remove the Pods with the lowest ``pod-deletion-cost`` first (as the ReplicaSet
controller does), and a deleted Pod of a Deployment is replaced by a new one.

The last test runs the whole loop: a real broker, the autoscaler with this provider, and the
"kubelet" of the test server starting each Pod as a real ``fabric.executor`` process named by
its Pod name, so the policy sees the Pods join, scales up for queued calls and back to zero."""
from __future__ import annotations

import itertools
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest
from conftest import wait_for

kubernetes = pytest.importorskip("kubernetes", reason="the kubernetes provider needs the kubernetes client "
                                                      "(pip install 'fabric-compute[k8s]')")

from fabric.autoscale.kubernetes import DELETION_COST, KubernetesProvider  # noqa: E402

NS = "fabric"


class FakeCluster:
    """The API objects: Deployments (name -> kind, replicas) and their Pods."""

    def __init__(self, deployments: dict, on_start=None, on_stop=None):
        self.lock = threading.Lock()
        self.deployments = {name: {"kind": kind, "replicas": 0} for name, kind in deployments.items()}
        self.pods: dict[str, dict] = {}
        self.counter = itertools.count(1)
        self.requests: list[tuple[str, str]] = []
        self.on_start, self.on_stop = on_start, on_stop
        self.running = True  # pods become Running/Ready at once unless False

    def reconcile(self, name):
        d = self.deployments[name]
        mine = [p for p in self.pods.values() if p["deployment"] == name]
        while len(mine) < d["replicas"]:
            pod = {"name": f"{name}-{secrets.token_hex(3)}-{next(self.counter)}", "deployment": name,
                   "kind": d["kind"], "annotations": {}, "phase": "Running" if self.running else "Pending"}
            self.pods[pod["name"]] = pod
            mine.append(pod)
            if self.on_start:
                self.on_start(pod)
        if len(mine) > d["replicas"]:
            mine.sort(key=lambda p: int(p["annotations"].get(DELETION_COST, "0")))
            for pod in mine[:len(mine) - d["replicas"]]:
                self.remove(pod["name"])

    def remove(self, pod_name):
        pod = self.pods.pop(pod_name)
        if self.on_stop:
            self.on_stop(pod)

    def pod_json(self, p):
        ready = p["phase"] == "Running"
        return {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": p["name"], "namespace": NS, "annotations": p["annotations"],
                             "labels": {"app.kubernetes.io/component": "executor", "fabric.dev/kind": p["kind"]}},
                "status": {"phase": p["phase"],
                           "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}

    def scale_json(self, name):
        return {"apiVersion": "autoscaling/v1", "kind": "Scale", "metadata": {"name": name, "namespace": NS},
                "spec": {"replicas": self.deployments[name]["replicas"]},
                "status": {"replicas": sum(1 for p in self.pods.values() if p["deployment"] == name)}}


def _handler(cluster: FakeCluster):
    scale_re = re.compile(rf"^/apis/apps/v1/namespaces/{NS}/deployments/([^/]+)/scale$")
    pods_re = re.compile(rf"^/api/v1/namespaces/{NS}/pods$")
    pod_re = re.compile(rf"^/api/v1/namespaces/{NS}/pods/([^/]+)$")

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def reply(self, code, body):
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def not_found(self, what):
            self.reply(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                             "message": f"{what} not found", "code": 404})

        def body(self):
            n = int(self.headers.get("Content-Length") or 0)
            return json.loads(self.rfile.read(n) or b"{}")

        def handle_one(self, method):
            url = urlparse(self.path)
            cluster.requests.append((method, url.path))
            with cluster.lock:
                if m := scale_re.match(url.path):
                    name = m.group(1)
                    if name not in cluster.deployments:
                        return self.not_found(f'deployments.apps "{name}"')
                    if method == "PATCH":
                        ctype = self.headers.get("Content-Type", "")
                        if "merge-patch" not in ctype and "strategic-merge-patch" not in ctype:
                            return self.reply(415, {"kind": "Status", "code": 415, "message": ctype})
                        cluster.deployments[name]["replicas"] = int(self.body()["spec"]["replicas"])
                        cluster.reconcile(name)
                    return self.reply(200, cluster.scale_json(name))
                if pods_re.match(url.path) and method == "GET":
                    sel = parse_qs(url.query).get("labelSelector", [""])[0]
                    want = dict(kv.split("=", 1) for kv in sel.split(",") if kv)
                    items = [cluster.pod_json(p) for p in cluster.pods.values()]
                    items = [i for i in items if all(i["metadata"]["labels"].get(k) == v for k, v in want.items())]
                    return self.reply(200, {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items})
                if m := pod_re.match(url.path):
                    pod = cluster.pods.get(m.group(1))
                    if pod is None:
                        return self.not_found(f'pods "{m.group(1)}"')
                    if method == "PATCH":
                        pod["annotations"].update(self.body().get("metadata", {}).get("annotations", {}))
                        return self.reply(200, cluster.pod_json(pod))
                    if method == "DELETE":
                        body = cluster.pod_json(pod)
                        cluster.remove(pod["name"])
                        cluster.reconcile(pod["deployment"])  # the ReplicaSet makes a new one
                        return self.reply(200, body)
            self.reply(405, {"kind": "Status", "code": 405, "message": f"{method} {url.path}"})

        def do_GET(self):
            self.handle_one("GET")

        def do_PATCH(self):
            self.handle_one("PATCH")

        def do_DELETE(self):
            self.handle_one("DELETE")

    return H


@pytest.fixture
def api():
    servers = []

    def start(deployments=None, **kw):
        cluster = FakeCluster(deployments or {"fabric-executor-cpu": "cpu", "fabric-executor-gpu": "gpu"}, **kw)
        srv = ThreadingHTTPServer(("127.0.0.1", 0), _handler(cluster))
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        conf = kubernetes.client.Configuration()
        conf.host = f"http://127.0.0.1:{srv.server_address[1]}"
        return cluster, kubernetes.client.ApiClient(conf)

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


GROUPS = {"cpu": "fabric-executor-cpu", "gpu": "fabric-executor-gpu"}


def test_launch_raises_replicas_and_names_the_new_pods(api):
    cluster, client = api()
    p = KubernetesProvider(GROUPS, namespace=NS, api_client=client)
    ids = p.launch(2, "cpu")
    assert len(ids) == 2 and all(i.startswith("fabric-executor-cpu-") for i in ids)
    assert cluster.deployments["fabric-executor-cpu"]["replicas"] == 2
    assert cluster.deployments["fabric-executor-gpu"]["replicas"] == 0
    inst = p.instances()
    assert sorted(i.id for i in inst) == sorted(ids)
    assert {i.kind for i in inst} == {"cpu"} and {i.state for i in inst} == {"running"}
    assert sorted(p.list()) == sorted(ids)
    assert ("PATCH", "/apis/apps/v1/namespaces/fabric/deployments/fabric-executor-cpu/scale") in cluster.requests


def test_terminate_removes_exactly_the_given_pods(api):
    cluster, client = api()
    p = KubernetesProvider(GROUPS, namespace=NS, api_client=client)
    ids = p.launch(3, "cpu")
    gone = ids[1]  # not the newest nor the oldest: the ReplicaSet alone would not pick it
    p.terminate([gone])
    assert cluster.deployments["fabric-executor-cpu"]["replicas"] == 2
    assert sorted(p.list()) == sorted(i for i in ids if i != gone)


def test_pending_pods_and_requested_placeholders(api):
    cluster, client = api()
    cluster.running = False
    p = KubernetesProvider(GROUPS, namespace=NS, api_client=client)
    ids = p.launch(1, "gpu")
    assert [i.state for i in p.instances()] == ["pending"]
    # replicas asked for, no Pod yet (e.g. no node with a free GPU): a placeholder, not a second ask
    with cluster.lock:
        cluster.pods.clear()
    inst = p.instances()
    assert [(i.id, i.kind, i.state) for i in inst] == [("fabric-executor-gpu#requested-0", "gpu", "requested")]
    p.terminate([inst[0].id])  # a placeholder goes by lowering replicas
    assert cluster.deployments["fabric-executor-gpu"]["replicas"] == 0
    assert ids  # the Pod existed when launched


def test_replace_deletes_the_pod_and_the_deployment_makes_a_new_one(api):
    cluster, client = api()
    p = KubernetesProvider(GROUPS, namespace=NS, api_client=client)
    [old] = p.launch(1, "cpu")
    assert p.replace([old]) == []
    now = p.list()
    assert len(now) == 1 and now != [old]
    assert cluster.deployments["fabric-executor-cpu"]["replicas"] == 1


def test_max_replicas_caps_a_launch(api):
    cluster, client = api()
    p = KubernetesProvider(GROUPS, namespace=NS, api_client=client, max_replicas={"cpu": 2})
    assert len(p.launch(5, "cpu")) == 2
    assert p.launch(1, "cpu") == []
    assert cluster.deployments["fabric-executor-cpu"]["replicas"] == 2


def test_bad_input_says_what_is_wrong(api):
    cluster, client = api({"fabric-executor-cpu": "cpu"})
    with pytest.raises(ValueError, match="at least one Deployment"):
        KubernetesProvider({}, api_client=client)
    p = KubernetesProvider({"cpu": "fabric-executor-cpu", "gpu": "no-such-deployment"}, namespace=NS,
                           api_client=client)
    with pytest.raises(ValueError, match="no Deployment for executor kind 'tpu'"):
        p.launch(1, "tpu")
    with pytest.raises(RuntimeError, match="Deployment fabric/no-such-deployment not found"):
        p.launch(1, "gpu")
    # the provider still works for the kind that exists
    assert len(p.launch(1, "cpu")) == 1
    p.terminate(["pod-that-does-not-exist"])  # gone already: logged, nothing else changes
    assert cluster.deployments["fabric-executor-cpu"]["replicas"] == 1


def test_autoscaler_cli_accepts_the_kubernetes_provider():
    from fabric.autoscale.__main__ import _groups

    assert _groups(["cpu=fabric-executor-cpu"]) == {"cpu": "fabric-executor-cpu"}
    out = subprocess.run([sys.executable, "-m", "fabric.autoscale", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert "kubernetes" in out.stdout and "--deployment" in out.stdout


# --- the whole loop: broker + autoscaler + this provider; Pods are real executor processes ------
def test_autoscaler_scales_deployment_pods_from_zero_and_back(api, tmp_path):
    import fabric
    from fabric.autoscale import Autoscaler, Policy, Pool
    from fabric.cluster import LocalCluster

    cluster = LocalCluster(log_dir=str(tmp_path)).start(executor=False)
    procs: dict[str, subprocess.Popen] = {}

    def kubelet_start(pod):  # the Pod's container: `fabric executor ... --label provider_id=$(POD_NAME)`
        procs[pod["name"]] = subprocess.Popen(
            [sys.executable, "-m", "fabric.executor", "--broker", cluster.address, "--cpus", "1",
             "--label", f"provider_id={pod['name']}", "--label", f"kind={pod['kind']}",
             "--parent-pid", str(os.getpid())],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def kubelet_stop(pod):
        p = procs.pop(pod["name"], None)
        if p and p.poll() is None:
            p.send_signal(signal.SIGTERM)

    fake, client = api({"fabric-executor-cpu": "cpu"}, on_start=kubelet_start, on_stop=kubelet_stop)
    provider = KubernetesProvider({"cpu": "fabric-executor-cpu"}, namespace=NS, api_client=client)
    scaler = Autoscaler(cluster.address, provider, Policy([Pool("cpu", 0, 2, 1)], idle_s=1.0, join_timeout_s=60),
                        interval=0.2)
    t = threading.Thread(target=scaler.run, kwargs={"broker_gone_s": 5}, daemon=True)
    try:
        fabric.init(address=cluster.address)

        @fabric.fn
        def pid(x):
            import os as _os
            import time as _t
            _t.sleep(0.5)
            return _os.getpid()

        t.start()
        pids = fabric.get([pid.remote(i) for i in range(6)], timeout=120)
        assert len(set(pids)) >= 1
        launched = [d for d in scaler.decisions if d.action == "launch"]
        assert launched and sum(d.count for d in launched) <= 2
        assert fake.deployments["fabric-executor-cpu"]["replicas"] >= 1
        assert wait_for(lambda: fake.deployments["fabric-executor-cpu"]["replicas"] == 0, timeout=60), \
            list(scaler.decisions)[-5:]
        # the scaler records a decision once the provider call returns, a moment after the
        # Deployment's replicas changed: wait for the record, do not race it
        assert wait_for(lambda: any(d.action == "terminate" for d in scaler.decisions), timeout=10), \
            list(scaler.decisions)[-5:]
    finally:
        scaler.stop()
        fabric.shutdown()
        t.join(10)
        for p in procs.values():
            p.kill()
        cluster.stop()
