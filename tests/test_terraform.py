"""The terraform module (terraform/), with no AWS account: fmt, init, validate, `terraform test`
with a mocked provider, then apply / plan (no changes) / destroy against moto's standalone
server over HTTP, and the autoscaler's AWS provider scaling the groups terraform made there.
checkov runs over terraform/ and deploy/ in test_deploy.py.

Needs a terraform binary (>= 1.11) and the hashicorp/aws provider plugin on disk (no registry
access): FABRIC_TF_PLUGIN_DIR, else /opt/tf-plugins or ~/.terraform.d/plugins. Without them
the terraform tests skip saying what is missing; the contract test still runs."""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from fabric.autoscale.policy import KIND_LABEL, PROVIDER_LABEL
from conftest import start_moto, stop_moto

REPO = Path(__file__).resolve().parents[1]
MODULE = REPO / "terraform"
CONTRACT = json.loads((MODULE / "contract.json").read_text())


def _plugin_dir() -> str | None:
    for d in (os.environ.get("FABRIC_TF_PLUGIN_DIR"), "/opt/tf-plugins",
              os.path.expanduser("~/.terraform.d/plugins")):
        if d and list(Path(d).glob("registry.terraform.io/hashicorp/aws/*/*/terraform-provider-aws*")):
            return d
    return None


TERRAFORM = shutil.which("terraform")
PLUGINS = _plugin_dir()
SKIP = (None if TERRAFORM and PLUGINS else
        "terraform tests need " + " and ".join(
            w for w, ok in [("a terraform binary on PATH (>= 1.11)", TERRAFORM),
                            ("the hashicorp/aws provider plugin on disk (set FABRIC_TF_PLUGIN_DIR to a "
                             "plugin mirror: registry.terraform.io/hashicorp/aws/VERSION/OS_ARCH/)", PLUGINS)]
            if not ok))
needs_tf = pytest.mark.skipif(SKIP is not None, reason=SKIP or "")


def _env(tmp: Path) -> dict:
    cli = tmp / "terraformrc"
    cli.write_text("")  # no user CLI config, no registry, no checkpoint calls
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "TF_"))}
    env.update(TF_CLI_CONFIG_FILE=str(cli), CHECKPOINT_DISABLE="1", TF_IN_AUTOMATION="1",
               TF_DATA_DIR=str(tmp / ".terraform"), AWS_ACCESS_KEY_ID="testing",
               AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
               AWS_SHARED_CREDENTIALS_FILE=os.devnull, AWS_CONFIG_FILE=os.devnull, AWS_EC2_METADATA_DISABLED="true")
    return env


def tf(args, cwd, env, timeout=600, check=True):
    p = subprocess.run([TERRAFORM, *args, "-no-color"] if args[0] not in ("fmt",) else [TERRAFORM, *args],
                       cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"terraform {' '.join(args)} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}")
    return p


@pytest.fixture(scope="module")
def module_copy(tmp_path_factory):
    """The module copied away from the work tree (init writes there), initialised offline."""
    tmp = tmp_path_factory.mktemp("tf")
    dst = tmp / "terraform"
    shutil.copytree(MODULE, dst, ignore=shutil.ignore_patterns(".terraform", ".terraform.lock.hcl", "*.tfstate*"))
    env = _env(tmp)
    tf(["init", "-backend=false", "-input=false", f"-plugin-dir={PLUGINS}"], dst, env, timeout=300)
    return dst, env


# --- the contract with fabric/autoscale, with or without terraform -------------------------------
def test_contract_is_what_the_aws_provider_expects():
    assert CONTRACT["provider_id_label"] == PROVIDER_LABEL
    assert CONTRACT["kind_label"] == KIND_LABEL
    assert CONTRACT["kinds"] == ["cpu", "gpu"]  # the policy's pool kinds
    tpl = (MODULE / "templates" / "executor.sh.tftpl").read_text()
    assert "--label ${provider_id_label}=$id --label ${kind_label}=${kind}" in tpl
    assert "$(imds meta-data/instance-id)" in tpl  # the provider's ids are EC2 instance ids
    broker = (MODULE / "templates" / "broker.sh.tftpl").read_text()
    assert "python -m fabric.autoscale --broker tcp://127.0.0.1:${port} ${autoscale_args}" in broker
    # the autoscaler command line the module renders parses with the real CLI's --asg reader
    from fabric.autoscale.__main__ import _groups

    assert _groups(["cpu=fabric-cpu", "gpu=fabric-gpu"]) == {"cpu": "fabric-cpu", "gpu": "fabric-gpu"}


# --- static checks ------------------------------------------------------------------------------
@needs_tf
def test_fmt_check(tmp_path):
    p = tf(["fmt", "-check", "-recursive", "-diff", str(MODULE)], REPO, _env(tmp_path), check=False)
    assert p.returncode == 0, f"terraform fmt would change:\n{p.stdout}"


@needs_tf
@pytest.mark.timeout(600)
def test_validate(module_copy):
    dst, env = module_copy
    out = json.loads(tf(["validate", "-json"], dst, env).stdout)
    assert out["valid"], out
    basic = dst / "examples" / "basic"
    tf(["init", "-backend=false", "-input=false", f"-plugin-dir={PLUGINS}"], basic, env, timeout=300)
    assert json.loads(tf(["validate", "-json"], basic, env).stdout)["valid"]


@needs_tf
@pytest.mark.timeout(600)
def test_terraform_test_with_mock_provider(module_copy):
    dst, env = module_copy
    p = tf(["test"], dst, env, timeout=600, check=False)
    assert p.returncode == 0 and re.search(r"Success! \d+ passed, 0 failed", p.stdout), p.stdout[-6000:] + p.stderr


# --- against moto -------------------------------------------------------------------------------
@pytest.fixture
def moto_endpoint():
    """A moto server of its own: the apply makes a whole account's worth (VPC, groups, roles)
    and the test counts what it made."""
    pytest.importorskip("moto.server", reason="the apply test needs moto[server] (pip install 'fabric-compute[test]')")
    proc, endpoint = start_moto()
    try:
        yield endpoint
    finally:
        stop_moto(proc)


ROOT = """
provider "aws" {{
  region                      = "us-east-1"
  access_key                  = "testing"
  secret_key                  = "testing"
  skip_credentials_validation = true
  skip_metadata_api_check     = true
  skip_requesting_account_id  = true
  skip_region_validation      = true
  s3_use_path_style           = true
  endpoints {{
{endpoints}
  }}
}}

module "fabric" {{
  source               = "{module}"
  name                 = "fabtest"
  ami_id               = "{ami}"
  cpu_max              = 3
  gpu_max              = 2
  force_destroy_bucket = true
  detailed_monitoring  = false # moto has no MonitorInstances
}}

output "groups" {{ value = module.fabric.autoscaling_groups }}
output "params" {{ value = module.fabric.key_parameters }}
output "broker" {{ value = module.fabric.broker_instance_id }}
output "address" {{ value = module.fabric.broker_address }}
"""


@needs_tf
@pytest.mark.timeout(1500)  # moto answers the provider's waiters slowly: ~5 min on 2 cores
def test_apply_plan_destroy_on_moto_then_autoscale_the_groups(module_copy, moto_endpoint, tmp_path):
    import boto3

    from fabric.autoscale import AwsProvider

    dst, env = module_copy
    kw = dict(region_name="us-east-1", endpoint_url=moto_endpoint, aws_access_key_id="testing",
              aws_secret_access_key="testing")
    ami = boto3.client("ec2", **kw).describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    services = ["autoscaling", "ec2", "iam", "kms", "logs", "s3", "ssm", "sts"]
    root = tmp_path / "root"
    root.mkdir()
    (root / "main.tf").write_text(ROOT.format(
        endpoints="\n".join(f'    {s} = "{moto_endpoint}"' for s in services), module=dst.as_posix(), ami=ami))
    tf(["init", "-backend=false", "-input=false", f"-plugin-dir={PLUGINS}"], root, env, timeout=300)
    tf(["apply", "-auto-approve", "-input=false", "-parallelism=20"], root, env, timeout=900)
    try:
        out = {k: v["value"] for k, v in json.loads(tf(["output", "-json"], root, env).stdout).items()}
        assert out["groups"] == {"cpu": "fabtest-cpu", "gpu": "fabtest-gpu"}
        assert re.fullmatch(r"tcp://10\.40\.\d+\.\d+:5555", out["address"])
        # a second plan finds nothing to change
        assert tf(["plan", "-detailed-exitcode", "-input=false"], root, env, check=False).returncode == 0

        ec2 = boto3.client("ec2", **kw)
        user_data = base64.b64decode(ec2.describe_instance_attribute(
            InstanceId=out["broker"], Attribute="userData")["UserData"]["Value"]).decode()
        asg_args = dict(kv.split("=", 1) for kv in re.findall(r"--asg (\S+)", user_data))
        assert asg_args == out["groups"]  # the autoscaler on the broker scales exactly these groups

        asg = boto3.client("autoscaling", **kw)
        groups = {g["AutoScalingGroupName"]: g for g in asg.describe_auto_scaling_groups(
            AutoScalingGroupNames=list(out["groups"].values()))["AutoScalingGroups"]}
        for kind, name in out["groups"].items():
            g = groups[name]
            tags = {t["Key"]: (t["Value"], t["PropagateAtLaunch"]) for t in g["Tags"]}
            assert tags[CONTRACT["tag_kind"]] == (kind, True) and tags[CONTRACT["tag_cluster"]] == ("fabtest", True)
            assert g["NewInstancesProtectedFromScaleIn"] and g["MinSize"] == 0 and g["DesiredCapacity"] == 0
        lts = ec2.describe_launch_template_versions(
            LaunchTemplateId=groups["fabtest-cpu"]["LaunchTemplate"]["LaunchTemplateId"])["LaunchTemplateVersions"]
        data = lts[0]["LaunchTemplateData"]
        assert data["MetadataOptions"]["HttpTokens"] == "required"
        assert data["NetworkInterfaces"][0]["AssociatePublicIpAddress"] is False
        assert data["BlockDeviceMappings"][0]["Ebs"]["Encrypted"] is True
        exec_data = base64.b64decode(data["UserData"]).decode()
        assert f"--label {PROVIDER_LABEL}=$id --label {KIND_LABEL}=cpu" in exec_data
        assert f"--broker {out['address']}" in exec_data

        # the broker's first boot writes the keys into SSM; they never reach terraform's state
        ssm = boto3.client("ssm", **kw)
        secret = "SECRET-" + os.urandom(12).hex()
        for p in out["params"].values():
            ssm.put_parameter(Name=p, Value=f"{secret}-{p}", Type="SecureString", Overwrite=True)

        # the autoscaler's AWS provider against the groups terraform made
        provider = AwsProvider(asg_args, region="us-east-1", endpoint_url=moto_endpoint,
                               session=boto3.session.Session(aws_access_key_id="testing",
                                                             aws_secret_access_key="testing"))
        provider.launch(2, "cpu")
        provider.launch(9, "gpu")  # capped at the group's MaxSize (gpu_max = 2)
        assert provider.desired_capacity("cpu") == 2 and provider.desired_capacity("gpu") == 2
        cpu = [i for i in provider.instances() if i.kind == "cpu"]
        assert len(cpu) == 2
        provider.terminate([cpu[0].id])
        assert provider.desired_capacity("cpu") == 1

        # terraform leaves the autoscaler's capacity alone and does not fight the keys
        assert tf(["plan", "-detailed-exitcode", "-input=false"], root, env, check=False).returncode == 0
        tf(["apply", "-auto-approve", "-input=false", "-refresh-only"], root, env, timeout=600)
        state = tf(["show", "-json"], root, env).stdout + (root / "terraform.tfstate").read_text()
        assert secret not in state
        assert provider.desired_capacity("cpu") == 1
    finally:  # the groups hold instances the provider started: destroy must not wait for them
        # moto keeps a terminated instance's primary interface attached (EC2 detaches it), so
        # terraform could not delete the broker's fixed ENI there: leave it to the server
        tf(["state", "rm", "module.fabric.aws_network_interface.broker"], root, env, check=False)
        destroyed = tf(["destroy", "-auto-approve", "-input=false", "-parallelism=20"], root, env, timeout=900,
                       check=False)
    errors = [e for e in re.findall(r"Error: (.*)", destroyed.stdout + destroyed.stderr)
              if not re.search(r"DependencyViolation|network interface", e)]  # that same moto limit
    assert not errors, destroyed.stdout[-4000:] + destroyed.stderr[-4000:]
    left = boto3.client("autoscaling", **kw).describe_auto_scaling_groups()["AutoScalingGroups"]
    assert left == []
    assert boto3.client("s3", **kw).list_buckets()["Buckets"] == []
