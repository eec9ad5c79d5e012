# The one task definition every sandbox runs; the gateway's RunTask adds
# only per-task environment (task id, gateway URL, credential).
resource "aws_ecs_task_definition" "sandbox" {
  family                   = "${var.name}-sandbox"
  requires_compatibilities = ["FARGATE"]
  network_mode             = "awsvpc"
  cpu                      = var.sandbox_cpu
  memory                   = var.sandbox_memory
  execution_role_arn       = aws_iam_role.execution.arn
  task_role_arn            = aws_iam_role.sandbox.arn
  runtime_platform {
    operating_system_family = "LINUX"
    cpu_architecture        = "X86_64"
  }
  volume {
    name = "workspaces"
    efs_volume_configuration {
      file_system_id     = aws_efs_file_system.workspaces.id
      transit_encryption = "ENABLED"
      authorization_config {
        access_point_id = aws_efs_access_point.sandbox.id
        iam             = "ENABLED"
      }
    }
  }
  # Fargate has no tmpfs: a task-local volume for /tmp on a read-only root.
  volume {
    name = "tmp"
  }
  container_definitions = jsonencode([{
    name                   = "runner"
    image                  = var.image
    essential              = true
    readonlyRootFilesystem = true
    privileged             = false
    # The runner starts as root to give each user's workspace and agent a UID
    # of their own, then drops to it; Fargate cannot add capabilities, so the
    # default set is kept and everything the runner does not need dropped.
    linuxParameters = {
      initProcessEnabled = true
      capabilities = {
        drop = ["NET_RAW", "MKNOD", "AUDIT_WRITE", "NET_BIND_SERVICE", "SYS_CHROOT", "FSETID", "SETFCAP"]
      }
    }
    ulimits = [{ name = "nofile", softLimit = 4096, hardLimit = 8192 }]
    mountPoints = [
      { sourceVolume = "workspaces", containerPath = "/workspaces", readOnly = false },
      { sourceVolume = "tmp", containerPath = "/tmp", readOnly = false },
    ]
    logConfiguration = {
      logDriver = "awslogs"
      options = {
        awslogs-group         = aws_cloudwatch_log_group.main.name
        awslogs-region        = local.region
        awslogs-stream-prefix = "sandbox"
      }
    }
  }])
  tags = local.tags
}
