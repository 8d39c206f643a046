# The smallest useful cluster: a new VPC, cpu executors 0..4 (scale to zero), no gpu pool.
#   terraform init && terraform apply -var ami_id=ami-... -var region=eu-west-1
terraform {
  required_version = ">= 1.11"
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.90, < 6.0"
    }
  }
}

variable "region" {
  description = "AWS region."
  type        = string
  default     = "us-east-1"
}

variable "ami_id" {
  description = "Amazon Linux 2023 x86_64 AMI of the region (aws ssm get-parameter --name /aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64)."
  type        = string
}

variable "allowed_client_cidrs" {
  description = "Your office or VPN CIDRs that may reach the broker (empty: Session Manager port forwarding only)."
  type        = list(string)
  default     = []
}

provider "aws" {
  region = var.region
}

module "fabric" {
  source               = "../.."
  name                 = "fabric-basic"
  ami_id               = var.ami_id
  cpu_instance_type    = "c6i.xlarge"
  cpu_executor_cpus    = 4
  cpu_min              = 0
  cpu_max              = 4
  allowed_client_cidrs = var.allowed_client_cidrs
  tags                 = { project = "fabric-basic" }
}

output "broker_address" {
  description = "FABRIC_ADDRESS for drivers."
  value       = module.fabric.broker_address
}

output "next_steps" {
  description = "Commands to run on your laptop."
  value       = module.fabric.next_steps
}

output "broker_instance_id" {
  description = "The broker's instance, for Session Manager port forwarding."
  value       = module.fabric.broker_instance_id
}

output "store_url" {
  description = "FABRIC_STORE for drivers."
  value       = module.fabric.store_url
}
