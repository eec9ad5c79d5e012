data "aws_iam_policy_document" "ecs_tasks_assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ecs-tasks.amazonaws.com"]
    }
    condition {
      test     = "ArnLike"
      variable = "aws:SourceArn"
      values   = ["arn:${local.partition}:ecs:${local.region}:${local.account}:*"]
    }
  }
}

# Pulls the image and writes logs, for the gateway's and the sandboxes' tasks;
# reads only this deployment's secrets (for the gateway's environment).
resource "aws_iam_role" "execution" {
  name               = "${var.name}-execution"
  assume_role_policy = data.aws_iam_policy_document.ecs_tasks_assume.json
  tags               = local.tags
}

resource "aws_iam_role_policy_attachment" "execution" {
  role       = aws_iam_role.execution.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/service-role/AmazonECSTaskExecutionRolePolicy"
}

data "aws_iam_policy_document" "execution_secrets" {
  statement {
    actions = ["secretsmanager:GetSecretValue"]
    resources = [
      aws_secretsmanager_secret.model_keys.arn,
      aws_secretsmanager_secret.jwt_secret.arn,
      aws_db_instance.store.master_user_secret[0].secret_arn,
    ]
  }
  statement {
    actions   = ["kms:Decrypt"]
    resources = [aws_kms_key.main.arn]
  }
}

resource "aws_iam_role_policy" "execution_secrets" {
  name   = "secrets"
  role   = aws_iam_role.execution.id
  policy = data.aws_iam_policy_document.execution_secrets.json
}

# The sandboxes' task role: no AWS permissions at all (an agent's code runs
# there). Attach policies here only for what agents must reach.
resource "aws_iam_role" "sandbox" {
  name               = "${var.name}-sandbox"
  assume_role_policy = data.aws_iam_policy_document.ecs_tasks_assume.json
  tags               = local.tags
}

resource "aws_iam_role" "gateway" {
  name               = "${var.name}-gateway"
  assume_role_policy = data.aws_iam_policy_document.ecs_tasks_assume.json
  tags               = local.tags
}

locals {
  cluster_arn         = aws_ecs_cluster.main.arn
  cluster_tasks_arn   = "arn:${local.partition}:ecs:${local.region}:${local.account}:task/${aws_ecs_cluster.main.name}/*"
  sandbox_family_arns = "arn:${local.partition}:ecs:${local.region}:${local.account}:task-definition/${aws_ecs_task_definition.sandbox.family}:*"
}

# Exactly the ECS actions the ecs backend calls (crates/backend-ecs; a test
# checks the two agree), each on this cluster's tasks of the sandbox task
# definition only; iam:PassRole for the sandbox's two roles only.
data "aws_iam_policy_document" "gateway_ecs" {
  statement {
    sid       = "RunSandboxes"
    actions   = ["ecs:RunTask"]
    resources = [local.sandbox_family_arns]
    condition {
      test     = "ArnEquals"
      variable = "ecs:cluster"
      values   = [local.cluster_arn]
    }
  }
  statement {
    sid       = "TagAtLaunch"
    actions   = ["ecs:TagResource"]
    resources = [local.cluster_tasks_arn]
    condition {
      test     = "StringEquals"
      variable = "ecs:CreateAction"
      values   = ["RunTask"]
    }
  }
  statement {
    sid       = "WatchAndStopSandboxes"
    actions   = ["ecs:DescribeTasks", "ecs:StopTask"]
    resources = [local.cluster_tasks_arn]
    condition {
      test     = "ArnEquals"
      variable = "ecs:cluster"
      values   = [local.cluster_arn]
    }
  }
  statement {
    sid       = "ListSandboxes"
    actions   = ["ecs:ListTasks"]
    resources = ["arn:${local.partition}:ecs:${local.region}:${local.account}:container-instance/${aws_ecs_cluster.main.name}/*"]
    condition {
      test     = "ArnEquals"
      variable = "ecs:cluster"
      values   = [local.cluster_arn]
    }
  }
  statement {
    sid       = "PassSandboxRoles"
    actions   = ["iam:PassRole"]
    resources = [aws_iam_role.sandbox.arn, aws_iam_role.execution.arn]
    condition {
      test     = "StringEquals"
      variable = "iam:PassedToService"
      values   = ["ecs-tasks.amazonaws.com"]
    }
  }
  statement {
    sid       = "Workspaces"
    actions   = ["elasticfilesystem:ClientMount", "elasticfilesystem:ClientWrite", "elasticfilesystem:ClientRootAccess"]
    resources = [aws_efs_file_system.workspaces.arn]
    condition {
      test     = "StringEquals"
      variable = "elasticfilesystem:AccessPointArn"
      values   = [aws_efs_access_point.gateway.arn]
    }
  }
}

resource "aws_iam_role_policy" "gateway_ecs" {
  name   = "run-sandboxes"
  role   = aws_iam_role.gateway.id
  policy = data.aws_iam_policy_document.gateway_ecs.json
}

# The sandboxes mount the workspaces through their access point only.
data "aws_iam_policy_document" "sandbox_efs" {
  statement {
    actions   = ["elasticfilesystem:ClientMount", "elasticfilesystem:ClientWrite", "elasticfilesystem:ClientRootAccess"]
    resources = [aws_efs_file_system.workspaces.arn]
    condition {
      test     = "StringEquals"
      variable = "elasticfilesystem:AccessPointArn"
      values   = [aws_efs_access_point.sandbox.arn]
    }
  }
}

resource "aws_iam_role_policy" "sandbox_efs" {
  name   = "workspaces"
  role   = aws_iam_role.sandbox.id
  policy = data.aws_iam_policy_document.sandbox_efs.json
}

resource "aws_iam_role" "rds_monitoring" {
  name = "${var.name}-rds-monitoring"
  assume_role_policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Action    = "sts:AssumeRole"
      Principal = { Service = "monitoring.rds.amazonaws.com" }
    }]
  })
  tags = local.tags
}

resource "aws_iam_role_policy_attachment" "rds_monitoring" {
  role       = aws_iam_role.rds_monitoring.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/service-role/AmazonRDSEnhancedMonitoringRole"
}
