variable "name" {
  description = "Name of the cluster: prefixes every resource and names the Auto Scaling groups NAME-cpu and NAME-gpu."
  type        = string
  default     = "fabric"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,30}[a-z0-9]$", var.name))
    error_message = "name must be 3-32 characters of lower-case letters, digits and '-', starting with a letter."
  }
}

variable "vpc_id" {
  description = "An existing VPC to use (with private_subnet_ids). null: the module creates a VPC with private subnets and a NAT gateway."
  type        = string
  default     = null
}

variable "private_subnet_ids" {
  description = "Private subnets of vpc_id for the broker and executors (the broker goes in the first). Required with vpc_id; their route to the internet (NAT) is yours."
  type        = list(string)
  default     = []
}

variable "vpc_cidr" {
  description = "CIDR of the VPC the module creates (when vpc_id is null)."
  type        = string
  default     = "10.40.0.0/16"

  validation {
    condition     = can(cidrhost(var.vpc_cidr, 0))
    error_message = "vpc_cidr must be an IPv4 CIDR block, e.g. 10.40.0.0/16."
  }
}

variable "availability_zones" {
  description = "Availability zones for the created VPC's private subnets (null: the region's first two)."
  type        = list(string)
  default     = null
}

variable "allowed_client_cidrs" {
  description = "CIDRs (your office, VPN) that may reach the broker's port. Empty: only executors and SSM port forwarding reach it."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for c in var.allowed_client_cidrs : can(cidrhost(c, 0)) && c != "0.0.0.0/0"])
    error_message = "allowed_client_cidrs must be IPv4 CIDR blocks, and not 0.0.0.0/0: the broker runs any code it is sent."
  }
}

variable "broker_port" {
  description = "TCP port the broker listens on."
  type        = number
  default     = 5555

  validation {
    condition     = var.broker_port >= 1024 && var.broker_port <= 65535
    error_message = "broker_port must be between 1024 and 65535."
  }
}

variable "ami_id" {
  description = "AMI for the broker and cpu executors: Amazon Linux 2023 (x86_64) or any image with python3.11, curl, tar and the AWS CLI."
  type        = string

  validation {
    condition     = can(regex("^ami-[0-9a-f]{8,17}$", var.ami_id))
    error_message = "ami_id looks like ami-0123456789abcdef0."
  }
}

variable "gpu_ami_id" {
  description = "AMI for gpu executors, with NVIDIA drivers (e.g. an AWS Deep Learning Base AMI). null: ami_id."
  type        = string
  default     = null

  validation {
    condition     = var.gpu_ami_id == null || can(regex("^ami-[0-9a-f]{8,17}$", var.gpu_ami_id))
    error_message = "gpu_ami_id looks like ami-0123456789abcdef0."
  }
}

variable "broker_instance_type" {
  description = "Instance type of the broker."
  type        = string
  default     = "t3.medium"
}

variable "journal_volume_gb" {
  description = "Size of the broker's encrypted journal volume (GiB)."
  type        = number
  default     = 20

  validation {
    condition     = var.journal_volume_gb >= 1 && var.journal_volume_gb <= 16384
    error_message = "journal_volume_gb must be between 1 and 16384."
  }
}

variable "cpu_instance_type" {
  description = "Instance type of cpu executors."
  type        = string
  default     = "c6i.xlarge"
}

variable "cpu_min" {
  description = "Fewest cpu executors (0: scale to zero)."
  type        = number
  default     = 0

  validation {
    condition     = var.cpu_min >= 0 && floor(var.cpu_min) == var.cpu_min
    error_message = "cpu_min must be a whole number >= 0."
  }
}

variable "cpu_max" {
  description = "Most cpu executors."
  type        = number
  default     = 4

  validation {
    condition     = var.cpu_max >= 0 && floor(var.cpu_max) == var.cpu_max && var.cpu_max >= var.cpu_min
    error_message = "cpu_max must be a whole number >= 0 and >= cpu_min."
  }
}

variable "cpu_executor_cpus" {
  description = "CPUs one cpu executor advertises (the instance type's vCPUs; the autoscaler sizes demand with it)."
  type        = number
  default     = 4

  validation {
    condition     = var.cpu_executor_cpus >= 1
    error_message = "cpu_executor_cpus must be at least 1."
  }
}

variable "cpu_root_volume_gb" {
  description = "Root volume of a cpu executor (GiB, encrypted)."
  type        = number
  default     = 40
}

variable "gpu_instance_type" {
  description = "Instance type of gpu executors."
  type        = string
  default     = "g5.xlarge"
}

variable "gpu_min" {
  description = "Fewest gpu executors."
  type        = number
  default     = 0

  validation {
    condition     = var.gpu_min >= 0 && floor(var.gpu_min) == var.gpu_min
    error_message = "gpu_min must be a whole number >= 0."
  }
}

variable "gpu_max" {
  description = "Most gpu executors (0: no gpu pool; the group exists at size 0)."
  type        = number
  default     = 0

  validation {
    condition     = var.gpu_max >= 0 && floor(var.gpu_max) == var.gpu_max && var.gpu_max >= var.gpu_min
    error_message = "gpu_max must be a whole number >= 0 and >= gpu_min."
  }
}

variable "gpu_executor_gpus" {
  description = "GPUs of one gpu executor (the instance type's)."
  type        = number
  default     = 1
}

variable "gpu_executor_cpus" {
  description = "CPUs one gpu executor advertises."
  type        = number
  default     = 4
}

variable "gpu_root_volume_gb" {
  description = "Root volume of a gpu executor (GiB, encrypted; CUDA wheels are large)."
  type        = number
  default     = 100
}

variable "idle_seconds" {
  description = "Idle seconds before the autoscaler stops an executor."
  type        = number
  default     = 300
}

variable "fabric_package" {
  description = "What the instances pip-install: a requirement (fabric-compute[aws,s3]==X.Y) or a wheel URL reachable from the VPC."
  type        = string
  default     = "fabric-compute[aws,s3]"
}

variable "bucket_name" {
  description = "Name of the S3 bucket for the store (null: NAME-store-ACCOUNT_ID)."
  type        = string
  default     = null

  validation {
    condition     = var.bucket_name == null || can(regex("^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", var.bucket_name))
    error_message = "bucket_name must be a valid S3 bucket name (3-63 lower-case letters, digits, '.', '-')."
  }
}

variable "store_prefix" {
  description = "Key prefix in the bucket for fabric's objects (the IAM policies allow only it)."
  type        = string
  default     = "fabric"

  validation {
    condition     = can(regex("^[A-Za-z0-9][A-Za-z0-9._/-]*$", var.store_prefix))
    error_message = "store_prefix must be a plain key prefix such as fabric or team/fabric."
  }
}

variable "force_destroy_bucket" {
  description = "Let `terraform destroy` delete the bucket with its objects (all versions)."
  type        = bool
  default     = false
}

variable "enable_ssm_session" {
  description = "Let Session Manager reach the broker (port forwarding to the broker from a laptop without a VPN or public IP)."
  type        = bool
  default     = true
}

variable "detailed_monitoring" {
  description = "One-minute CloudWatch metrics for the broker and executors (a small extra cost per instance)."
  type        = bool
  default     = true
}

variable "log_retention_days" {
  description = "Days the VPC flow logs are kept."
  type        = number
  default     = 365
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
  default     = {}
}
