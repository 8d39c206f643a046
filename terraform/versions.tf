terraform {
  # 1.11: write-only arguments (the SSM key parameters' values never enter the state)
  required_version = ">= 1.11"

  required_providers {
    aws = {
      source = "hashicorp/aws"
      # 5.90: aws_ssm_parameter.value_wo
      version = ">= 5.90, < 6.0"
    }
  }
}
