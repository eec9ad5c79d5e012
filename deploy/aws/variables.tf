variable "name" {
  description = "Prefix of every resource name (one deployment per name and region)."
  type        = string
  default     = "aishell"
}

variable "vpc_id" {
  description = "The existing VPC to deploy into."
  type        = string
}

variable "private_subnet_ids" {
  description = "Private subnets (two or more AZs) for the gateway, the sandboxes, EFS and RDS. They need a route to ECR, CloudWatch Logs and Secrets Manager (NAT or VPC endpoints)."
  type        = list(string)
}

variable "public_subnet_ids" {
  description = "Public subnets (two or more AZs) for the load balancer."
  type        = list(string)
}

variable "certificate_arn" {
  description = "ACM certificate of the public host name (HTTPS listener)."
  type        = string
}

variable "image" {
  description = "The aishell image (`aishell image build`, pushed to ECR), e.g. 123456789012.dkr.ecr.eu-west-1.amazonaws.com/aishell:1.0. Gateway and sandboxes run the same image."
  type        = string
}

variable "allowed_cidrs" {
  description = "Client addresses allowed to reach the load balancer."
  type        = list(string)
  default     = ["0.0.0.0/0"]
}

variable "gateway_count" {
  description = "Gateway tasks (two or more for availability; they share the RDS store)."
  type        = number
  default     = 2
}

variable "gateway_cpu" {
  type    = number
  default = 1024
}

variable "gateway_memory" {
  type    = number
  default = 2048
}

variable "sandbox_cpu" {
  description = "CPU units of one sandbox task (1024 = 1 vCPU)."
  type        = number
  default     = 1024
}

variable "sandbox_memory" {
  description = "Memory of one sandbox task, MiB."
  type        = number
  default     = 2048
}

variable "warm_pool_size" {
  description = "Warm sandbox tasks each gateway keeps ready."
  type        = number
  default     = 2
}

variable "agent" {
  description = "Built-in agent of every session: shell, echo, llm, claude."
  type        = string
  default     = "claude"
}

variable "db_instance_class" {
  type    = string
  default = "db.t4g.medium"
}

variable "log_retention_days" {
  type    = number
  default = 365
}

variable "alb_idle_timeout" {
  description = "Seconds an idle WebSocket stays open through the ALB (the gateway pings well within it)."
  type        = number
  default     = 3600
}

variable "tags" {
  type    = map(string)
  default = {}
}
