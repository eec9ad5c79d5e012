resource "aws_security_group" "alb" {
  name        = "${var.name}-alb"
  description = "aishell load balancer: HTTPS from clients"
  vpc_id      = var.vpc_id
  tags        = local.tags
}

resource "aws_vpc_security_group_ingress_rule" "alb_https" {
  for_each          = toset(var.allowed_cidrs)
  security_group_id = aws_security_group.alb.id
  description       = "HTTPS from clients"
  cidr_ipv4         = each.value
  from_port         = 443
  to_port           = 443
  ip_protocol       = "tcp"
}

resource "aws_vpc_security_group_egress_rule" "alb_to_gateway" {
  security_group_id            = aws_security_group.alb.id
  description                  = "to the gateways"
  referenced_security_group_id = aws_security_group.gateway.id
  from_port                    = 5174
  to_port                      = 5174
  ip_protocol                  = "tcp"
}

resource "aws_security_group" "gateway" {
  name        = "${var.name}-gateway"
  description = "aishell gateways: clients via the ALB, runners from the sandboxes"
  vpc_id      = var.vpc_id
  tags        = local.tags
}

resource "aws_vpc_security_group_ingress_rule" "gateway_from_alb" {
  security_group_id            = aws_security_group.gateway.id
  description                  = "clients through the load balancer"
  referenced_security_group_id = aws_security_group.alb.id
  from_port                    = 5174
  to_port                      = 5174
  ip_protocol                  = "tcp"
}

resource "aws_vpc_security_group_ingress_rule" "gateway_from_sandboxes" {
  security_group_id            = aws_security_group.gateway.id
  description                  = "runners dialling back"
  referenced_security_group_id = aws_security_group.sandbox.id
  from_port                    = 5174
  to_port                      = 5174
  ip_protocol                  = "tcp"
}

resource "aws_vpc_security_group_egress_rule" "gateway_out" {
  security_group_id = aws_security_group.gateway.id
  description       = "AWS APIs, the model providers, RDS, EFS (HTTPS, 5432, 2049)"
  cidr_ipv4         = "0.0.0.0/0"
  ip_protocol       = "-1"
}

resource "aws_security_group" "sandbox" {
  name        = "${var.name}-sandbox"
  description = "aishell sandboxes: nothing comes in; out to the gateway, EFS and the image registry"
  vpc_id      = var.vpc_id
  tags        = local.tags
  # checkov:skip=CKV2_AWS_5: attached to every sandbox task by the gateway's RunTask (AISHELL_ECS_SECURITY_GROUPS), not by a Terraform resource.
}

resource "aws_vpc_security_group_egress_rule" "sandbox_out" {
  security_group_id = aws_security_group.sandbox.id
  description       = "the gateway, EFS, ECR and what agents fetch"
  cidr_ipv4         = "0.0.0.0/0"
  ip_protocol       = "-1"
}

resource "aws_security_group" "data" {
  name        = "${var.name}-data"
  description = "aishell EFS and RDS: from the gateways and sandboxes only"
  vpc_id      = var.vpc_id
  tags        = local.tags
}

resource "aws_vpc_security_group_ingress_rule" "efs" {
  for_each                     = { gateway = aws_security_group.gateway.id, sandbox = aws_security_group.sandbox.id }
  security_group_id            = aws_security_group.data.id
  description                  = "NFS from the ${each.key}"
  referenced_security_group_id = each.value
  from_port                    = 2049
  to_port                      = 2049
  ip_protocol                  = "tcp"
}

resource "aws_vpc_security_group_ingress_rule" "postgres" {
  security_group_id            = aws_security_group.data.id
  description                  = "PostgreSQL from the gateways"
  referenced_security_group_id = aws_security_group.gateway.id
  from_port                    = 5432
  to_port                      = 5432
  ip_protocol                  = "tcp"
}
