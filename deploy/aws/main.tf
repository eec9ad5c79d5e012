resource "aws_kms_key" "main" {
  description             = "${var.name}: logs, secrets, EFS and RDS"
  enable_key_rotation     = true
  deletion_window_in_days = 30
  policy                  = data.aws_iam_policy_document.kms.json
  tags                    = local.tags
}

data "aws_iam_policy_document" "kms" {
  # checkov:skip=CKV_AWS_111: a key policy's "*" is this key itself (key policies name no other resource).
  # checkov:skip=CKV_AWS_356: a key policy's "*" is this key itself.
  # checkov:skip=CKV_AWS_109: the account root statement is what lets IAM policies grant use of the key at all.
  statement {
    sid       = "Account"
    actions   = ["kms:*"]
    resources = ["*"]
    principals {
      type        = "AWS"
      identifiers = ["arn:${local.partition}:iam::${local.account}:root"]
    }
  }
  statement {
    sid       = "CloudWatchLogs"
    actions   = ["kms:Encrypt*", "kms:Decrypt*", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:Describe*"]
    resources = ["*"]
    principals {
      type        = "Service"
      identifiers = ["logs.${local.region}.amazonaws.com"]
    }
  }
}

resource "aws_ecs_cluster" "main" {
  name = var.name
  setting {
    name  = "containerInsights"
    value = "enabled"
  }
  tags = local.tags
}

resource "aws_ecs_cluster_capacity_providers" "main" {
  cluster_name       = aws_ecs_cluster.main.name
  capacity_providers = ["FARGATE", "FARGATE_SPOT"]
  default_capacity_provider_strategy {
    capacity_provider = "FARGATE"
    weight            = 1
  }
}

# One group for the gateway and the sandboxes; `aishell report --source
# cloudwatch` and the saved queries read it.
resource "aws_cloudwatch_log_group" "main" {
  name              = "/aishell/${var.name}"
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.main.arn
  tags              = local.tags
}

resource "aws_cloudwatch_query_definition" "saved" {
  for_each        = fileset("${path.module}/../../queries/cloudwatch", "*.query")
  name            = "${var.name}/${trimsuffix(each.value, ".query")}"
  log_group_names = [aws_cloudwatch_log_group.main.name]
  query_string    = file("${path.module}/../../queries/cloudwatch/${each.value}")
}
