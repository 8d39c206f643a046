locals {
  # One source of truth for the names, labels and tags the autoscaler's AWS provider relies on.
  contract = jsondecode(file("${path.module}/contract.json"))

  kinds = {
    cpu = {
      instance_type = var.cpu_instance_type
      min_size      = var.cpu_min
      max_size      = var.cpu_max
      ami_id        = var.ami_id
      volume_gb     = var.cpu_root_volume_gb
    }
    gpu = {
      instance_type = var.gpu_instance_type
      min_size      = var.gpu_min
      max_size      = var.gpu_max
      ami_id        = coalesce(var.gpu_ami_id, var.ami_id)
      volume_gb     = var.gpu_root_volume_gb
    }
  }

  group_names = { for k in local.contract.kinds : k => format(local.contract.group_name, var.name, k) }

  common_tags = merge(var.tags, {
    (local.contract.tag_cluster) = var.name
  })

  store_prefix = trim(var.store_prefix, "/")
  store_url    = "s3://${aws_s3_bucket.store.bucket}/${local.store_prefix}"

  ssm_prefix = "/fabric/${var.name}"

  broker_address = "tcp://${aws_network_interface.broker.private_ip}:${var.broker_port}"

  # `python -m fabric.autoscale` on the broker: the groups by kind, exactly as named above
  autoscale_args = join(" ", concat(
    ["--provider aws", "--region ${data.aws_region.current.name}",
      "--min ${var.cpu_min}", "--max ${var.cpu_max}",
      "--cpus-per-executor ${var.cpu_executor_cpus}",
      "--idle ${var.idle_seconds}",
    "--asg cpu=${local.group_names["cpu"]}"],
    var.gpu_max > 0 ? ["--gpu-min ${var.gpu_min}", "--gpu-max ${var.gpu_max}",
      "--gpus-per-executor ${var.gpu_executor_gpus}", "--gpu-cpus-per-executor ${var.gpu_executor_cpus}",
    "--asg gpu=${local.group_names["gpu"]}"] : [],
  ))
}

data "aws_region" "current" {}
data "aws_partition" "current" {}
data "aws_caller_identity" "current" {}
