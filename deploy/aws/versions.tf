# aishell on AWS: the gateway as an ECS service behind an ALB, sandboxes as
# ECS tasks of one task definition, workspaces on EFS, the store on RDS
# PostgreSQL. Deploys into an existing VPC. See README "Run on AWS ECS".
terraform {
  required_version = ">= 1.5"
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.40, < 7.0"
    }
    random = {
      source  = "hashicorp/random"
      version = ">= 3.5, < 4.0"
    }
  }
}

data "aws_region" "current" {}
data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}

locals {
  region    = data.aws_region.current.name
  account   = data.aws_caller_identity.current.account_id
  partition = data.aws_partition.current.partition
  tags      = merge({ "app" = "aishell", "aishell.deployment" = var.name }, var.tags)
}
