# The network: an existing VPC's private subnets, or a new VPC with private subnets whose only
# way out is a NAT gateway (pip, S3, SSM). Nothing gets a public IP but the NAT gateway.

locals {
  create_vpc = var.vpc_id == null
  azs        = local.create_vpc ? coalesce(var.availability_zones, slice(data.aws_availability_zones.available[0].names, 0, 2)) : []
  vpc_id     = local.create_vpc ? aws_vpc.this[0].id : var.vpc_id
  subnet_ids = local.create_vpc ? aws_subnet.private[*].id : var.private_subnet_ids
}

data "aws_availability_zones" "available" {
  count = local.create_vpc && var.availability_zones == null ? 1 : 0
  state = "available"
}

resource "aws_vpc" "this" {
  count                = local.create_vpc ? 1 : 0
  cidr_block           = var.vpc_cidr
  enable_dns_support   = true
  enable_dns_hostnames = true
  tags                 = merge(local.common_tags, { Name = var.name })
}

# No rules: nothing may use the default security group.
resource "aws_default_security_group" "this" {
  count  = local.create_vpc ? 1 : 0
  vpc_id = aws_vpc.this[0].id
  tags   = merge(local.common_tags, { Name = "${var.name}-default-unused" })
}

resource "aws_subnet" "private" {
  count             = local.create_vpc ? length(local.azs) : 0
  vpc_id            = aws_vpc.this[0].id
  cidr_block        = cidrsubnet(var.vpc_cidr, 4, count.index + 1)
  availability_zone = local.azs[count.index]
  tags              = merge(local.common_tags, { Name = "${var.name}-private-${local.azs[count.index]}" })
}

# The NAT gateway's subnet; instances never go here.
resource "aws_subnet" "public" {
  count             = local.create_vpc ? 1 : 0
  vpc_id            = aws_vpc.this[0].id
  cidr_block        = cidrsubnet(var.vpc_cidr, 8, 0)
  availability_zone = local.azs[0]
  tags              = merge(local.common_tags, { Name = "${var.name}-nat" })
}

resource "aws_internet_gateway" "this" {
  count  = local.create_vpc ? 1 : 0
  vpc_id = aws_vpc.this[0].id
  tags   = merge(local.common_tags, { Name = var.name })
}

resource "aws_eip" "nat" {
  count  = local.create_vpc ? 1 : 0
  domain = "vpc"
  tags   = merge(local.common_tags, { Name = "${var.name}-nat" })
}

resource "aws_nat_gateway" "this" {
  count         = local.create_vpc ? 1 : 0
  allocation_id = aws_eip.nat[0].id
  subnet_id     = aws_subnet.public[0].id
  tags          = merge(local.common_tags, { Name = var.name })
  depends_on    = [aws_internet_gateway.this]
}

resource "aws_route_table" "public" {
  count  = local.create_vpc ? 1 : 0
  vpc_id = aws_vpc.this[0].id
  tags   = merge(local.common_tags, { Name = "${var.name}-public" })
}

resource "aws_route" "public_internet" {
  count                  = local.create_vpc ? 1 : 0
  route_table_id         = aws_route_table.public[0].id
  destination_cidr_block = "0.0.0.0/0"
  gateway_id             = aws_internet_gateway.this[0].id
}

resource "aws_route_table_association" "public" {
  count          = local.create_vpc ? 1 : 0
  subnet_id      = aws_subnet.public[0].id
  route_table_id = aws_route_table.public[0].id
}

resource "aws_route_table" "private" {
  count  = local.create_vpc ? 1 : 0
  vpc_id = aws_vpc.this[0].id
  tags   = merge(local.common_tags, { Name = "${var.name}-private" })
}

resource "aws_route" "private_nat" {
  count                  = local.create_vpc ? 1 : 0
  route_table_id         = aws_route_table.private[0].id
  destination_cidr_block = "0.0.0.0/0"
  nat_gateway_id         = aws_nat_gateway.this[0].id
}

resource "aws_route_table_association" "private" {
  count          = local.create_vpc ? length(local.azs) : 0
  subnet_id      = aws_subnet.private[count.index].id
  route_table_id = aws_route_table.private[0].id
}

# Flow logs of the created VPC, encrypted, kept log_retention_days.
resource "aws_cloudwatch_log_group" "flow" {
  count             = local.create_vpc ? 1 : 0
  name              = "/fabric/${var.name}/vpc-flow"
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.this.arn
  tags              = local.common_tags
}

resource "aws_iam_role" "flow" {
  count = local.create_vpc ? 1 : 0
  name  = "${var.name}-vpc-flow"
  assume_role_policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Principal = { Service = "vpc-flow-logs.amazonaws.com" }
      Action    = "sts:AssumeRole"
    }]
  })
  tags = local.common_tags
}

resource "aws_iam_role_policy" "flow" {
  count = local.create_vpc ? 1 : 0
  name  = "write-flow-logs"
  role  = aws_iam_role.flow[0].id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect   = "Allow"
      Action   = ["logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"]
      Resource = "${aws_cloudwatch_log_group.flow[0].arn}:*"
    }]
  })
}

resource "aws_flow_log" "this" {
  count           = local.create_vpc ? 1 : 0
  vpc_id          = aws_vpc.this[0].id
  traffic_type    = "ALL"
  log_destination = aws_cloudwatch_log_group.flow[0].arn
  iam_role_arn    = aws_iam_role.flow[0].arn
  tags            = local.common_tags
}

# --- security groups: every rule separate and described -----------------------------------------
resource "aws_security_group" "broker" {
  name        = "${var.name}-broker"
  description = "fabric broker: its port from executors and allowed clients only"
  vpc_id      = local.vpc_id
  tags        = merge(local.common_tags, { Name = "${var.name}-broker" })
}

resource "aws_security_group" "executors" {
  name        = "${var.name}-executors"
  description = "fabric executors: no inbound but from each other (gangs)"
  vpc_id      = local.vpc_id
  tags        = merge(local.common_tags, { Name = "${var.name}-executors" })
}

resource "aws_security_group_rule" "broker_from_executors" {
  type                     = "ingress"
  description              = "fabric executors join the broker"
  security_group_id        = aws_security_group.broker.id
  source_security_group_id = aws_security_group.executors.id
  protocol                 = "tcp"
  from_port                = var.broker_port
  to_port                  = var.broker_port
}

resource "aws_security_group_rule" "broker_from_clients" {
  count             = length(var.allowed_client_cidrs) > 0 ? 1 : 0
  type              = "ingress"
  description       = "fabric drivers (allowed client CIDRs) reach the broker"
  security_group_id = aws_security_group.broker.id
  cidr_blocks       = var.allowed_client_cidrs
  protocol          = "tcp"
  from_port         = var.broker_port
  to_port           = var.broker_port
}

resource "aws_security_group_rule" "broker_https_out" {
  type              = "egress"
  description       = "HTTPS to AWS APIs (SSM, Auto Scaling, S3) and the package index"
  security_group_id = aws_security_group.broker.id
  cidr_blocks       = ["0.0.0.0/0"]
  protocol          = "tcp"
  from_port         = 443
  to_port           = 443
}

resource "aws_security_group_rule" "executors_to_broker" {
  type                     = "egress"
  description              = "executors dial the broker"
  security_group_id        = aws_security_group.executors.id
  source_security_group_id = aws_security_group.broker.id
  protocol                 = "tcp"
  from_port                = var.broker_port
  to_port                  = var.broker_port
}

resource "aws_security_group_rule" "executors_https_out" {
  type              = "egress"
  description       = "HTTPS to AWS APIs (SSM, S3) and the package index"
  security_group_id = aws_security_group.executors.id
  cidr_blocks       = ["0.0.0.0/0"]
  protocol          = "tcp"
  from_port         = 443
  to_port           = 443
}

resource "aws_security_group_rule" "executors_gang_in" {
  type                     = "ingress"
  description              = "members of one gang talk to each other (torch.distributed, NCCL)"
  security_group_id        = aws_security_group.executors.id
  source_security_group_id = aws_security_group.executors.id
  protocol                 = "tcp"
  from_port                = 1024
  to_port                  = 65535
}

resource "aws_security_group_rule" "executors_gang_out" {
  type                     = "egress"
  description              = "members of one gang talk to each other (torch.distributed, NCCL)"
  security_group_id        = aws_security_group.executors.id
  source_security_group_id = aws_security_group.executors.id
  protocol                 = "tcp"
  from_port                = 1024
  to_port                  = 65535
}
