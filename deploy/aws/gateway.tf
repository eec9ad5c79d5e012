locals {
  model_keys_env = var.agent == "llm" ? "AISHELL_LLM_API_KEYS" : "AISHELL_ANTHROPIC_API_KEYS"
  # Runners dial their gateway task directly (not through the ALB): its
  # address comes from the ECS task metadata endpoint at start.
  gateway_start = join(" ", [
    "IP=$(wget -qO- \"$ECS_CONTAINER_METADATA_URI_V4\" | sed -n 's/.*\"IPv4Addresses\":\\[\"\\([0-9.]*\\)\".*/\\1/p');",
    "exec /usr/local/bin/aishell serve --bind 0.0.0.0 --port 5174 --runner-url ws://$IP:5174",
  ])
}

resource "aws_ecs_task_definition" "gateway" {
  family                   = "${var.name}-gateway"
  requires_compatibilities = ["FARGATE"]
  network_mode             = "awsvpc"
  cpu                      = var.gateway_cpu
  memory                   = var.gateway_memory
  execution_role_arn       = aws_iam_role.execution.arn
  task_role_arn            = aws_iam_role.gateway.arn
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
        access_point_id = aws_efs_access_point.gateway.id
        iam             = "ENABLED"
      }
    }
  }
  volume {
    name = "data"
  }
  container_definitions = jsonencode([{
    name                   = "gateway"
    image                  = var.image
    essential              = true
    readonlyRootFilesystem = true
    privileged             = false
    entryPoint             = ["/bin/sh", "-c"]
    command                = [local.gateway_start]
    portMappings           = [{ containerPort = 5174, protocol = "tcp" }]
    linuxParameters        = { initProcessEnabled = true, capabilities = { drop = ["ALL"] } }
    mountPoints = [
      { sourceVolume = "workspaces", containerPath = "/workspaces", readOnly = false },
      { sourceVolume = "data", containerPath = "/data", readOnly = false },
    ]
    environment = [
      { name = "AISHELL_DATA_DIR", value = "/data" },
      { name = "AISHELL_WORKSPACES_ROOT", value = "/workspaces" },
      { name = "AISHELL_LOG_FORMAT", value = "json" },
      { name = "AISHELL_AGENT", value = var.agent },
      { name = "EXECUTION_MODE", value = "ecs" },
      { name = "AISHELL_ECS_CLUSTER", value = aws_ecs_cluster.main.name },
      { name = "AISHELL_ECS_TASK_DEFINITION", value = aws_ecs_task_definition.sandbox.arn },
      { name = "AISHELL_ECS_CONTAINER_NAME", value = "runner" },
      { name = "AISHELL_ECS_CAPACITY_PROVIDERS", value = "FARGATE" },
      { name = "AISHELL_ECS_SUBNETS", value = join(",", var.private_subnet_ids) },
      { name = "AISHELL_ECS_SECURITY_GROUPS", value = aws_security_group.sandbox.id },
      { name = "WARM_POOL_TARGET_SIZE", value = tostring(var.warm_pool_size) },
      { name = "DATABASE_URL", value = "postgres://aishell@${aws_db_instance.store.address}:5432/aishell?sslmode=require" },
      { name = "AWS_REGION", value = local.region },
    ]
    secrets = [
      { name = "PGPASSWORD", valueFrom = "${aws_db_instance.store.master_user_secret[0].secret_arn}:password::" },
      { name = "AISHELL_JWT_SECRET", valueFrom = aws_secretsmanager_secret.jwt_secret.arn },
      { name = local.model_keys_env, valueFrom = aws_secretsmanager_secret.model_keys.arn },
    ]
    logConfiguration = {
      logDriver = "awslogs"
      options = {
        awslogs-group         = aws_cloudwatch_log_group.main.name
        awslogs-region        = local.region
        awslogs-stream-prefix = "gateway"
      }
    }
  }])
  tags = local.tags
}

resource "aws_ecs_service" "gateway" {
  name                               = "${var.name}-gateway"
  cluster                            = aws_ecs_cluster.main.id
  task_definition                    = aws_ecs_task_definition.gateway.arn
  desired_count                      = var.gateway_count
  launch_type                        = "FARGATE"
  platform_version                   = "LATEST"
  deployment_minimum_healthy_percent = 100
  deployment_maximum_percent         = 200
  health_check_grace_period_seconds  = 60
  propagate_tags                     = "SERVICE"
  enable_ecs_managed_tags            = true
  network_configuration {
    subnets          = var.private_subnet_ids
    security_groups  = [aws_security_group.gateway.id]
    assign_public_ip = false
  }
  load_balancer {
    target_group_arn = aws_lb_target_group.gateway.arn
    container_name   = "gateway"
    container_port   = 5174
  }
  deployment_circuit_breaker {
    enable   = true
    rollback = true
  }
  depends_on = [aws_lb_listener.https, aws_efs_mount_target.workspaces]
  tags       = local.tags
}
