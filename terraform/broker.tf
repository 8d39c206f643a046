# The broker: one instance in a private subnet behind a fixed network interface (its address
# survives a replacement), its journal on its own encrypted volume, the autoscaler beside it.

data "aws_subnet" "broker" {
  id = local.subnet_ids[0]
}

resource "aws_network_interface" "broker" {
  subnet_id       = local.subnet_ids[0]
  security_groups = [aws_security_group.broker.id]
  description     = "fabric ${var.name} broker (fixed address)"
  tags            = merge(local.common_tags, { Name = "${var.name}-broker", (local.contract.tag_role) = "broker" })
}

resource "aws_ebs_volume" "journal" {
  availability_zone = data.aws_subnet.broker.availability_zone
  size              = var.journal_volume_gb
  type              = "gp3"
  encrypted         = true
  kms_key_id        = aws_kms_key.this.arn
  tags              = merge(local.common_tags, { Name = "${var.name}-journal", (local.contract.tag_role) = "journal" })
}

locals {
  common_script = templatefile("${path.module}/templates/common.sh.tftpl", {
    fabric_package = var.fabric_package
    region         = data.aws_region.current.name
  })
}

resource "aws_instance" "broker" {
  ami                  = var.ami_id
  instance_type        = var.broker_instance_type
  iam_instance_profile = aws_iam_instance_profile.broker.name
  ebs_optimized        = true
  monitoring           = var.detailed_monitoring

  network_interface {
    network_interface_id = aws_network_interface.broker.id
    device_index         = 0
  }

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
    instance_metadata_tags      = "disabled"
  }

  root_block_device {
    encrypted   = true
    kms_key_id  = aws_kms_key.this.arn
    volume_type = "gp3"
    volume_size = 20
    # root volume tags here, not volume_tags: those would also claim the attached journal's
    tags = merge(local.common_tags, { Name = "${var.name}-broker-root" })
  }

  user_data = templatefile("${path.module}/templates/broker.sh.tftpl", {
    name              = var.name
    common            = local.common_script
    journal_volume_id = aws_ebs_volume.journal.id
    param_broker      = aws_ssm_parameter.keys["broker"].name
    param_executor    = aws_ssm_parameter.keys["executor"].name
    param_client      = aws_ssm_parameter.keys["client"].name
    kms_key_arn       = aws_kms_key.this.arn
    store_url         = local.store_url
    port              = var.broker_port
    autoscale_args    = local.autoscale_args
  })
  user_data_replace_on_change = true

  tags = merge(local.common_tags, { Name = "${var.name}-broker", (local.contract.tag_role) = "broker" })
}

resource "aws_volume_attachment" "journal" {
  device_name = "/dev/sdf"
  volume_id   = aws_ebs_volume.journal.id
  instance_id = aws_instance.broker.id
}
