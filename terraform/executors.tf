# Executors: one launch template and Auto Scaling group per kind (cpu, gpu). The autoscaler on
# the broker sets their desired capacity; terraform sets only the bounds.

resource "aws_launch_template" "executor" {
  for_each      = local.kinds
  name          = "${local.group_names[each.key]}-"
  image_id      = each.value.ami_id
  instance_type = each.value.instance_type
  ebs_optimized = true

  iam_instance_profile {
    arn = aws_iam_instance_profile.executor.arn
  }

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
    instance_metadata_tags      = "disabled"
  }

  monitoring {
    enabled = var.detailed_monitoring
  }

  network_interfaces {
    associate_public_ip_address = false
    delete_on_termination       = true
    security_groups             = [aws_security_group.executors.id]
  }

  block_device_mappings {
    device_name = "/dev/xvda"
    ebs {
      encrypted             = true
      kms_key_id            = aws_kms_key.this.arn
      volume_size           = each.value.volume_gb
      volume_type           = "gp3"
      delete_on_termination = true
    }
  }

  user_data = base64encode(templatefile("${path.module}/templates/executor.sh.tftpl", {
    name              = var.name
    kind              = each.key
    common            = local.common_script
    param_executor    = aws_ssm_parameter.keys["executor"].name
    store_url         = local.store_url
    broker_address    = local.broker_address
    cpus              = each.key == "gpu" ? var.gpu_executor_cpus : var.cpu_executor_cpus
    provider_id_label = local.contract.provider_id_label
    kind_label        = local.contract.kind_label
  }))

  tag_specifications {
    resource_type = "instance"
    tags = merge(local.common_tags, {
      Name                      = local.group_names[each.key]
      (local.contract.tag_kind) = each.key
      (local.contract.tag_role) = "executor"
    })
  }

  tag_specifications {
    resource_type = "volume"
    tags          = merge(local.common_tags, { Name = local.group_names[each.key] })
  }
}

resource "aws_autoscaling_group" "executor" {
  for_each            = local.kinds
  name                = local.group_names[each.key]
  min_size            = each.value.min_size
  max_size            = each.value.max_size
  desired_capacity    = each.value.min_size
  vpc_zone_identifier = local.subnet_ids

  # the autoscaler chooses which instance goes: the group never scales a busy one in
  protect_from_scale_in = true
  # teardown must not wait for protected instances to scale in: destroy terminates them
  force_delete              = true
  health_check_type         = "EC2"
  wait_for_capacity_timeout = "0"

  launch_template {
    id      = aws_launch_template.executor[each.key].id
    version = aws_launch_template.executor[each.key].latest_version
  }

  tag {
    key                 = local.contract.tag_cluster
    value               = var.name
    propagate_at_launch = true
  }

  tag {
    key                 = local.contract.tag_kind
    value               = each.key
    propagate_at_launch = true
  }

  dynamic "tag" {
    for_each = var.tags
    content {
      key                 = tag.key
      value               = tag.value
      propagate_at_launch = true
    }
  }

  lifecycle {
    # the autoscaler owns the desired capacity; a plan after it scaled shows no change
    ignore_changes = [desired_capacity]
  }
}
