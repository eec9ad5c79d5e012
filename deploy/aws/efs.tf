# Every user's workspace, shared by the gateways (files API) and the
# sandboxes. The runner makes each user's directory theirs (the same per-user
# UID isolation as the docker backend), so both access points enter as root
# at /workspaces; EFS IAM authorisation lets only these two roles mount it.
resource "aws_efs_file_system" "workspaces" {
  creation_token   = "${var.name}-workspaces"
  encrypted        = true
  kms_key_id       = aws_kms_key.main.arn
  performance_mode = "generalPurpose"
  throughput_mode  = "elastic"
  tags             = merge(local.tags, { Name = "${var.name}-workspaces" })
}

resource "aws_efs_backup_policy" "workspaces" {
  file_system_id = aws_efs_file_system.workspaces.id
  backup_policy {
    status = "ENABLED"
  }
}

resource "aws_efs_mount_target" "workspaces" {
  for_each        = toset(var.private_subnet_ids)
  file_system_id  = aws_efs_file_system.workspaces.id
  subnet_id       = each.value
  security_groups = [aws_security_group.data.id]
}

resource "aws_efs_access_point" "gateway" {
  file_system_id = aws_efs_file_system.workspaces.id
  posix_user {
    uid = 0
    gid = 0
  }
  root_directory {
    path = "/workspaces"
    creation_info {
      owner_uid   = 0
      owner_gid   = 0
      permissions = "0711"
    }
  }
  tags = merge(local.tags, { Name = "${var.name}-gateway" })
}

resource "aws_efs_access_point" "sandbox" {
  file_system_id = aws_efs_file_system.workspaces.id
  posix_user {
    uid = 0
    gid = 0
  }
  root_directory {
    path = "/workspaces"
    creation_info {
      owner_uid   = 0
      owner_gid   = 0
      permissions = "0711"
    }
  }
  tags = merge(local.tags, { Name = "${var.name}-sandbox" })
}

data "aws_iam_policy_document" "efs" {
  statement {
    sid       = "OnlyOverTls"
    effect    = "Deny"
    actions   = ["*"]
    resources = [aws_efs_file_system.workspaces.arn]
    principals {
      type        = "AWS"
      identifiers = ["*"]
    }
    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
  statement {
    sid       = "OnlyTheseRoles"
    actions   = ["elasticfilesystem:ClientMount", "elasticfilesystem:ClientWrite", "elasticfilesystem:ClientRootAccess"]
    resources = [aws_efs_file_system.workspaces.arn]
    principals {
      type        = "AWS"
      identifiers = [aws_iam_role.gateway.arn, aws_iam_role.sandbox.arn]
    }
    condition {
      test     = "Bool"
      variable = "elasticfilesystem:AccessedViaMountTarget"
      values   = ["true"]
    }
  }
}

resource "aws_efs_file_system_policy" "workspaces" {
  file_system_id = aws_efs_file_system.workspaces.id
  policy         = data.aws_iam_policy_document.efs.json
}
