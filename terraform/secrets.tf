# One KMS key for the bucket, the volumes, the flow logs and the key parameters. The CurveZMQ
# keys themselves are made on the broker at its first boot (`fabric keys init`) and written
# into these SecureString parameters: they never pass through user_data, the plan or the
# state (the parameters' values are write-only here, and only a placeholder is written).

resource "aws_kms_key" "this" {
  description             = "fabric ${var.name}: store bucket, volumes, logs, key parameters"
  enable_key_rotation     = true
  deletion_window_in_days = 7
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      {
        Sid       = "AccountAdmin"
        Effect    = "Allow"
        Principal = { AWS = "arn:${data.aws_partition.current.partition}:iam::${data.aws_caller_identity.current.account_id}:root" }
        Action    = "kms:*"
        Resource  = "*"
      },
      {
        Sid       = "FlowLogs"
        Effect    = "Allow"
        Principal = { Service = "logs.${data.aws_region.current.name}.amazonaws.com" }
        Action    = ["kms:Encrypt", "kms:Decrypt", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:Describe*"]
        Resource  = "*"
        Condition = { ArnLike = { "kms:EncryptionContext:aws:logs:arn" = "arn:${data.aws_partition.current.partition}:logs:${data.aws_region.current.name}:${data.aws_caller_identity.current.account_id}:log-group:/fabric/${var.name}/*" } }
      },
      {
        Sid       = "AutoScalingVolumes"
        Effect    = "Allow"
        Principal = { AWS = "arn:${data.aws_partition.current.partition}:iam::${data.aws_caller_identity.current.account_id}:role/aws-service-role/autoscaling.amazonaws.com/AWSServiceRoleForAutoScaling" }
        Action    = ["kms:Encrypt", "kms:Decrypt", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:DescribeKey", "kms:CreateGrant"]
        Resource  = "*"
      },
    ]
  })
  tags = local.common_tags
}

resource "aws_kms_alias" "this" {
  name          = "alias/fabric-${var.name}"
  target_key_id = aws_kms_key.this.key_id
}

# broker: its own pair and the allow-list (a tar.gz, base64); executor and client: the
# bundles other hosts need (broker.key + their pair).
resource "aws_ssm_parameter" "keys" {
  for_each         = toset(["broker", "executor", "client"])
  name             = "${local.ssm_prefix}/keys/${each.key}"
  description      = "fabric ${var.name}: CurveZMQ keys bundle for the ${each.key} (written by the broker at first boot)"
  type             = "SecureString"
  key_id           = aws_kms_key.this.arn
  value_wo         = "pending"
  value_wo_version = 1
  tags             = local.common_tags
}
