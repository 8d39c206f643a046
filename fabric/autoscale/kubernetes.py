"""The Kubernetes provider: executors as the Pods of one Deployment per kind.

    KubernetesProvider({"cpu": "fabric-executor-cpu", "gpu": "fabric-executor-gpu"}, namespace="fabric")

The same interface as the local and AWS providers (see providers.py). The Deployments are
those of ``deploy/k8s``: each Pod starts ``fabric executor --label provider_id=$(POD_NAME)
--label kind=KIND`` (the Pod's name from the downward API), so an instance id is a Pod name.

- ``launch`` raises the Deployment's replicas through its ``scale`` subresource;
- ``terminate`` picks the Pods that go: it marks them with the lowest
  ``controller.kubernetes.io/pod-deletion-cost`` and lowers replicas by as many, so the
  ReplicaSet removes exactly those (never a busy Pod of its own choosing);
- ``replace`` deletes the Pods (a Pod that never joined): the Deployment starts fresh ones;
- replicas asked for with no Pod yet show as ``DEPLOYMENT#requested-N`` (as the AWS provider's).

It talks to the API server with the official ``kubernetes`` client (``pip install
'fabric-compute[k8s]'``): in a Pod with its service account (``deploy/k8s`` grants it only
get/patch on these Deployments' scale and list/patch/delete on Pods), else from a kubeconfig.
"""
from __future__ import annotations

import logging
import time

from .policy import Machine
from .providers import Provider

log = logging.getLogger("fabric.autoscale")

DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
KIND_POD_LABEL = "fabric.dev/kind"          # the Pods' kind label (deploy/k8s/base/executor-*.yaml)
COMPONENT_SELECTOR = "app.kubernetes.io/component=executor"


def _client(api_client=None, kubeconfig: str | None = None, context: str | None = None):
    try:
        from kubernetes import client, config
    except ImportError:
        raise ImportError("the kubernetes provider needs the kubernetes client: "
                          "pip install 'fabric-compute[k8s]'") from None
    if api_client is None:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config(config_file=kubeconfig, context=context)
        api_client = client.ApiClient()
    return client.AppsV1Api(api_client), client.CoreV1Api(api_client)


class KubernetesProvider(Provider):
    """Executors are the Pods of one Deployment per kind, in one namespace."""
    name = "kubernetes"

    def __init__(self, deployments: dict, namespace: str = "fabric", api_client=None,
                 kubeconfig: str | None = None, context: str | None = None, max_replicas: dict | None = None):
        if not deployments:
            raise ValueError("the kubernetes provider needs at least one Deployment (kind=name)")
        self.deployments = dict(deployments)
        self.kind_of = {d: k for k, d in self.deployments.items()}
        self.namespace = namespace
        self.max_replicas = dict(max_replicas or {})
        self.apps, self.core = _client(api_client, kubeconfig, context)
        self.first_seen: dict[str, float] = {}
        self.requested_at: dict[str, float] = {}

    # --- the API calls ------------------------------------------------------------------------
    def _replicas(self, name: str) -> int:
        from kubernetes.client.exceptions import ApiException

        try:
            scale = self.apps.read_namespaced_deployment_scale(name, self.namespace)
        except ApiException as e:
            if e.status == 404:
                raise RuntimeError(f"Deployment {self.namespace}/{name} not found") from None
            raise
        return int(scale.spec.replicas or 0)

    def _scale(self, name: str, replicas: int) -> None:
        self.apps.patch_namespaced_deployment_scale(name, self.namespace, {"spec": {"replicas": int(replicas)}})

    def _pods(self, kind: str) -> list:
        pods = self.core.list_namespaced_pod(
            self.namespace, label_selector=f"{COMPONENT_SELECTOR},{KIND_POD_LABEL}={kind}").items
        return [p for p in pods if p.metadata.deletion_timestamp is None
                and (p.status.phase or "Pending") in ("Pending", "Running")]

    @staticmethod
    def _ready(pod) -> bool:
        return pod.status.phase == "Running" and any(
            c.type == "Ready" and c.status == "True" for c in (pod.status.conditions or []))

    # --- the interface ------------------------------------------------------------------------
    def instances(self) -> list[Machine]:
        now = time.time()
        out = []
        for kind, name in self.deployments.items():
            replicas = self._replicas(name)
            pods = self._pods(kind)
            for p in pods:
                pid = p.metadata.name
                t = self.first_seen.setdefault(pid, now)
                out.append(Machine(pid, kind, t, "running" if self._ready(p) else "pending"))
            for k in range(max(0, replicas - len(pods))):
                out.append(Machine(f"{name}#requested-{k}", kind, self.requested_at.get(name, now), "requested"))
        live = {i.id for i in out}
        for pid in list(self.first_seen):
            if pid not in live:
                del self.first_seen[pid]
        return out

    def launch(self, n: int, kind: str = "cpu") -> list[str]:
        name = self.deployments.get(kind)
        if name is None:
            raise ValueError(f"no Deployment for executor kind {kind!r}")
        before = {p.metadata.name for p in self._pods(kind)}
        replicas = self._replicas(name)
        new = replicas + n
        cap = self.max_replicas.get(kind)
        if cap is not None and new > cap:
            log.warning("kubernetes provider: Deployment %s is at its max %s", name, cap)
            new = max(replicas, cap)
        if new == replicas:
            return []
        self._scale(name, new)
        self.requested_at[name] = time.time()
        ids = [p.metadata.name for p in self._pods(kind) if p.metadata.name not in before]
        now = time.time()
        for i in ids:
            self.first_seen.setdefault(i, now)
        return ids

    def terminate(self, ids) -> None:
        from kubernetes.client.exceptions import ApiException

        by_kind: dict[str, int] = {}
        pods_of = {k: {p.metadata.name for p in self._pods(k)} for k in self.deployments}
        for iid in ids:
            if "#requested-" in iid:
                kind = self.kind_of.get(iid.split("#", 1)[0])
                if kind:
                    by_kind[kind] = by_kind.get(kind, 0) + 1
                continue
            kind = next((k for k, names in pods_of.items() if iid in names), None)
            if kind is None:
                log.info("kubernetes provider: pod %s is gone already", iid)
                continue
            try:  # the ReplicaSet removes the lowest-cost Pods first when replicas drop
                self.core.patch_namespaced_pod(iid, self.namespace,
                                               {"metadata": {"annotations": {DELETION_COST: "-1000000"}}})
            except ApiException as e:
                log.warning("kubernetes provider: could not mark pod %s for removal: %s", iid, e.reason)
                continue
            by_kind[kind] = by_kind.get(kind, 0) + 1
            self.first_seen.pop(iid, None)
        for kind, k in by_kind.items():
            name = self.deployments[kind]
            self._scale(name, max(0, self._replicas(name) - k))

    def replace(self, ids) -> list[str]:
        from kubernetes.client.exceptions import ApiException

        for iid in ids:
            if "#requested-" in iid:
                continue
            try:
                self.core.delete_namespaced_pod(iid, self.namespace)
            except ApiException as e:
                if e.status != 404:
                    log.warning("kubernetes provider: could not delete pod %s: %s", iid, e.reason)
            self.first_seen.pop(iid, None)
        return []
