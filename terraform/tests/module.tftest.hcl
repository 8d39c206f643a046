# `terraform test` with a mocked AWS provider: no account, no network. Asserts the security
# defaults and the names/tags the autoscaler's AWS provider relies on (contract.json).

mock_provider "aws" {
  mock_data "aws_availability_zones" {
    defaults = { names = ["us-east-1a", "us-east-1b", "us-east-1c"] }
  }
  mock_data "aws_caller_identity" {
    defaults = { account_id = "123456789012" }
  }
  mock_data "aws_region" {
    defaults = { name = "us-east-1" }
  }
  mock_data "aws_partition" {
    defaults = { partition = "aws" }
  }
  mock_data "aws_subnet" {
    defaults = { availability_zone = "us-east-1a" }
  }
  mock_resource "aws_kms_key" {
    defaults = { arn = "arn:aws:kms:us-east-1:123456789012:key/00000000-0000-0000-0000-000000000000" }
  }
  mock_resource "aws_s3_bucket" {
    defaults = { arn = "arn:aws:s3:::fabric-store-123456789012" }
  }
  mock_resource "aws_network_interface" {
    defaults = { private_ip = "10.40.16.10" }
  }
  mock_resource "aws_iam_instance_profile" {
    defaults = { arn = "arn:aws:iam::123456789012:instance-profile/fabric-executor" }
  }
  mock_resource "aws_ssm_parameter" {
    defaults = { arn = "arn:aws:ssm:us-east-1:123456789012:parameter/fabric/fabric/keys/x" }
  }
  mock_resource "aws_autoscaling_group" {
    defaults = { arn = "arn:aws:autoscaling:us-east-1:123456789012:autoScalingGroup:0:autoScalingGroupName/fabric-cpu" }
  }
  mock_resource "aws_cloudwatch_log_group" {
    defaults = { arn = "arn:aws:logs:us-east-1:123456789012:log-group:/fabric/fabric/vpc-flow" }
  }
  mock_resource "aws_launch_template" {
    defaults = { id = "lt-0123456789abcdef0", latest_version = 1 }
  }
  mock_resource "aws_iam_role" {
    defaults = { arn = "arn:aws:iam::123456789012:role/fabric" }
  }
}

variables {
  ami_id  = "ami-0123456789abcdef0"
  cpu_max = 3
  gpu_max = 2
  tags    = { team = "ml" }
}

run "secure_defaults" {
  command = apply

  assert {
    condition     = alltrue([for lt in aws_launch_template.executor : lt.metadata_options[0].http_tokens == "required"])
    error_message = "executors must require IMDSv2"
  }
  assert {
    condition     = aws_instance.broker.metadata_options[0].http_tokens == "required"
    error_message = "the broker must require IMDSv2"
  }
  assert {
    condition     = alltrue([for lt in aws_launch_template.executor : lt.network_interfaces[0].associate_public_ip_address == "false"])
    error_message = "executors must get no public IP"
  }
  assert {
    condition     = alltrue([for lt in aws_launch_template.executor : lt.block_device_mappings[0].ebs[0].encrypted == "true"])
    error_message = "executor root volumes must be encrypted"
  }
  assert {
    condition     = aws_instance.broker.root_block_device[0].encrypted && aws_ebs_volume.journal.encrypted
    error_message = "the broker's volumes must be encrypted"
  }
  assert {
    condition     = aws_s3_bucket_versioning.store.versioning_configuration[0].status == "Enabled"
    error_message = "the store bucket must be versioned"
  }
  assert {
    condition     = one(one(aws_s3_bucket_server_side_encryption_configuration.store.rule).apply_server_side_encryption_by_default).sse_algorithm == "aws:kms"
    error_message = "the store bucket must be KMS-encrypted"
  }
  assert {
    condition = (aws_s3_bucket_public_access_block.store.block_public_acls && aws_s3_bucket_public_access_block.store.block_public_policy
    && aws_s3_bucket_public_access_block.store.ignore_public_acls && aws_s3_bucket_public_access_block.store.restrict_public_buckets)
    error_message = "all four public access blocks must be on"
  }
  assert {
    condition     = jsondecode(aws_s3_bucket_policy.store.policy).Statement[0].Condition.Bool["aws:SecureTransport"] == "false" && jsondecode(aws_s3_bucket_policy.store.policy).Statement[0].Effect == "Deny"
    error_message = "the bucket policy must deny requests without TLS"
  }
  assert {
    condition     = alltrue([for p in aws_ssm_parameter.keys : p.type == "SecureString"])
    error_message = "key parameters must be SecureStrings"
  }
  assert {
    condition     = length(aws_security_group_rule.broker_from_clients) == 0
    error_message = "no client CIDR may reach the broker unless asked for"
  }
  assert {
    condition = alltrue([for r in [aws_security_group_rule.broker_from_executors, aws_security_group_rule.executors_gang_in] :
    r.source_security_group_id != null && length(coalesce(r.cidr_blocks, [])) == 0])
    error_message = "ingress rules must come from security groups, not CIDRs"
  }
  assert {
    condition     = !strcontains(aws_instance.broker.user_data, "secret-key") && !can(regex("[A-Za-z0-9+/=]{200,}", aws_instance.broker.user_data))
    error_message = "the broker's user_data must carry no key material"
  }
  # the contract with fabric/autoscale's AWS provider
  assert {
    condition     = aws_autoscaling_group.executor["cpu"].name == "fabric-cpu" && aws_autoscaling_group.executor["gpu"].name == "fabric-gpu"
    error_message = "groups must be named NAME-KIND"
  }
  assert {
    condition     = alltrue([for g in aws_autoscaling_group.executor : g.protect_from_scale_in])
    error_message = "groups must protect new instances from scale-in (the autoscaler picks which go)"
  }
  assert {
    condition = alltrue([for k, g in aws_autoscaling_group.executor :
      contains([for t in g.tag : "${t.key}=${t.value}/${t.propagate_at_launch}"], "fabric:kind=${k}/true") &&
    contains([for t in g.tag : "${t.key}=${t.value}/${t.propagate_at_launch}"], "fabric:cluster=fabric/true")])
    error_message = "groups must carry fabric:cluster and fabric:kind tags, propagated to instances"
  }
  assert {
    condition = alltrue([for k, lt in aws_launch_template.executor :
    strcontains(base64decode(lt.user_data), "--label provider_id=$id --label kind=${k}")])
    error_message = "executors must name themselves with provider_id=INSTANCE_ID and kind=KIND"
  }
  assert {
    condition     = strcontains(aws_instance.broker.user_data, "--asg cpu=fabric-cpu") && strcontains(aws_instance.broker.user_data, "--asg gpu=fabric-gpu")
    error_message = "the broker's autoscaler must scale the module's groups"
  }
  assert {
    condition     = output.autoscaling_groups == { cpu = "fabric-cpu", gpu = "fabric-gpu" }
    error_message = "autoscaling_groups output must map kind to group"
  }
  assert {
    condition     = alltrue([for k in ["ScaleOwnGroups"] : contains([for s in jsondecode(aws_iam_role_policy.broker.policy).Statement : s.Sid], k)]) && one([for s in jsondecode(aws_iam_role_policy.broker.policy).Statement : s.Resource if s.Sid == "ScaleOwnGroups"]) == [for g in aws_autoscaling_group.executor : g.arn]
    error_message = "the broker may scale only its own groups"
  }
  assert {
    condition     = one([for s in jsondecode(aws_iam_role_policy.executor.policy).Statement : s.Resource if s.Sid == "ExecutorKeyParameter"]) == aws_ssm_parameter.keys["executor"].arn
    error_message = "executors may read only the executor key parameter"
  }
}

run "no_gpu_pool" {
  command = plan
  variables {
    gpu_max = 0
  }
  assert {
    condition     = !strcontains(aws_instance.broker.user_data, "--asg gpu=")
    error_message = "without a gpu pool the autoscaler must not manage the gpu group"
  }
}

run "existing_vpc" {
  command = plan
  variables {
    vpc_id             = "vpc-0123456789abcdef0"
    private_subnet_ids = ["subnet-0123456789abcdef0", "subnet-0123456789abcdef1"]
  }
  assert {
    condition     = length(aws_vpc.this) == 0 && length(aws_nat_gateway.this) == 0
    error_message = "an existing VPC must not be duplicated"
  }
  assert {
    condition     = aws_autoscaling_group.executor["cpu"].vpc_zone_identifier == toset(["subnet-0123456789abcdef0", "subnet-0123456789abcdef1"])
    error_message = "executors must go in the given private subnets"
  }
}

run "rejects_open_broker" {
  command = plan
  variables {
    allowed_client_cidrs = ["0.0.0.0/0"]
  }
  expect_failures = [var.allowed_client_cidrs]
}

run "rejects_min_above_max" {
  command = plan
  variables {
    cpu_min = 5
    cpu_max = 2
  }
  expect_failures = [var.cpu_max]
}
