output "broker_address" {
  description = "The address drivers and executors dial (FABRIC_ADDRESS): the broker's fixed private IP."
  value       = local.broker_address
}

output "broker_instance_id" {
  description = "The broker's instance (for Session Manager port forwarding)."
  value       = aws_instance.broker.id
}

output "bucket" {
  description = "The store's S3 bucket."
  value       = aws_s3_bucket.store.bucket
}

output "store_url" {
  description = "FABRIC_STORE for drivers: the bucket and prefix the cluster uses."
  value       = local.store_url
}

output "autoscaling_groups" {
  description = "Auto Scaling group name by executor kind (the autoscaler's --asg KIND=NAME)."
  value       = { for k, g in aws_autoscaling_group.executor : k => g.name }
}

output "autoscale_command" {
  description = "The autoscaler command the broker runs (systemd unit fabric-autoscaler)."
  value       = "python -m fabric.autoscale --broker tcp://127.0.0.1:${var.broker_port} ${local.autoscale_args}"
}

output "key_parameters" {
  description = "SSM SecureString parameter names of the CurveZMQ key bundles (broker, executor, client). Names only: the values never leave SSM."
  value       = { for k, p in aws_ssm_parameter.keys : k => p.name }
}

output "kms_key_arn" {
  description = "The cluster's KMS key (bucket, volumes, logs, key parameters)."
  value       = aws_kms_key.this.arn
}

output "vpc_id" {
  description = "The VPC the cluster runs in."
  value       = local.vpc_id
}

output "next_steps" {
  description = "What to run on your laptop to use the cluster."
  value       = <<-EOT
    # 1. the client keys (a tar.gz in SSM, never in terraform's state):
    mkdir -p ~/fabric-keys-${var.name} && chmod 700 ~/fabric-keys-${var.name}
    aws ssm get-parameter --region ${data.aws_region.current.name} --name ${aws_ssm_parameter.keys["client"].name} \
      --with-decryption --query Parameter.Value --output text | base64 -d | tar xzf - -C ~/fabric-keys-${var.name}
    # 2. reach the broker: from an allowed CIDR, or through Session Manager port forwarding:
    aws ssm start-session --region ${data.aws_region.current.name} --target ${aws_instance.broker.id} \
      --document-name AWS-StartPortForwardingSession --parameters portNumber=${var.broker_port},localPortNumber=${var.broker_port}
    # 3. point fabric at it (tcp://127.0.0.1:${var.broker_port} when forwarding):
    export FABRIC_ADDRESS=${local.broker_address} FABRIC_KEYS=~/fabric-keys-${var.name} FABRIC_STORE=${local.store_url}
    fabric status
  EOT
}
