# Least privilege: each role may touch its own parameters, the store's prefix, and (the broker,
# for the autoscaler) the desired capacity of this cluster's two groups. Nothing else.

locals {
  assume_ec2 = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Principal = { Service = "ec2.amazonaws.com" }
      Action    = "sts:AssumeRole"
    }]
  })

  store_statements = [
    {
      Sid       = "ListStorePrefix"
      Effect    = "Allow"
      Action    = "s3:ListBucket"
      Resource  = aws_s3_bucket.store.arn
      Condition = { StringLike = { "s3:prefix" = [local.store_prefix, "${local.store_prefix}/*"] } }
    },
    {
      Sid      = "ReadWriteStorePrefix"
      Effect   = "Allow"
      Action   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"]
      Resource = "${aws_s3_bucket.store.arn}/${local.store_prefix}/*"
    },
    {
      Sid      = "UseTheClusterKey"
      Effect   = "Allow"
      Action   = ["kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey"]
      Resource = aws_kms_key.this.arn
    },
  ]

  # Session Manager's channel: these actions take no resource ARNs.
  ssm_session_statements = var.enable_ssm_session ? [{
    Sid    = "SessionManagerChannel"
    Effect = "Allow"
    Action = ["ssm:UpdateInstanceInformation", "ssmmessages:CreateControlChannel", "ssmmessages:CreateDataChannel",
    "ssmmessages:OpenControlChannel", "ssmmessages:OpenDataChannel"]
    Resource = "*"
  }] : []
}

# --- broker -----------------------------------------------------------------------------------
resource "aws_iam_role" "broker" {
  name               = "${var.name}-broker"
  assume_role_policy = local.assume_ec2
  tags               = local.common_tags
}

resource "aws_iam_role_policy" "broker" {
  #checkov:skip=CKV_AWS_355:DescribeAutoScalingGroups and the Session Manager channel actions take no resource ARNs
  #checkov:skip=CKV_AWS_290:those resource-less actions are read-only or channel-only; every write is scoped to ARNs
  name = "fabric-broker"
  role = aws_iam_role.broker.id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = concat(local.store_statements, local.ssm_session_statements, [
      {
        Sid      = "OwnKeyParameters"
        Effect   = "Allow"
        Action   = ["ssm:GetParameter", "ssm:PutParameter"]
        Resource = [for p in aws_ssm_parameter.keys : p.arn]
      },
      {
        Sid      = "DescribeGroups"
        Effect   = "Allow"
        Action   = "autoscaling:DescribeAutoScalingGroups"
        Resource = "*"
      },
      {
        Sid      = "ScaleOwnGroups"
        Effect   = "Allow"
        Action   = ["autoscaling:SetDesiredCapacity", "autoscaling:TerminateInstanceInAutoScalingGroup"]
        Resource = [for g in aws_autoscaling_group.executor : g.arn]
      },
    ])
  })
}

resource "aws_iam_instance_profile" "broker" {
  name = "${var.name}-broker"
  role = aws_iam_role.broker.name
  tags = local.common_tags
}

# --- executors --------------------------------------------------------------------------------
resource "aws_iam_role" "executor" {
  name               = "${var.name}-executor"
  assume_role_policy = local.assume_ec2
  tags               = local.common_tags
}

resource "aws_iam_role_policy" "executor" {
  name = "fabric-executor"
  role = aws_iam_role.executor.id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = concat(local.store_statements, [
      {
        Sid      = "ExecutorKeyParameter"
        Effect   = "Allow"
        Action   = "ssm:GetParameter"
        Resource = aws_ssm_parameter.keys["executor"].arn
      },
    ])
  })
}

resource "aws_iam_instance_profile" "executor" {
  name = "${var.name}-executor"
  role = aws_iam_role.executor.name
  tags = local.common_tags
}
