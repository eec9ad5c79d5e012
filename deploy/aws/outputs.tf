output "url" {
  description = "Where users open aishell (point your DNS name at it; the certificate must match)."
  value       = "https://${aws_lb.main.dns_name}/"
}

output "cluster" {
  value = aws_ecs_cluster.main.name
}

output "sandbox_task_definition" {
  value = aws_ecs_task_definition.sandbox.arn
}

output "log_group" {
  value = aws_cloudwatch_log_group.main.name
}

output "model_keys_secret" {
  description = "Put the model API keys here (aws secretsmanager put-secret-value)."
  value       = aws_secretsmanager_secret.model_keys.name
}

output "jwt_secret" {
  value = aws_secretsmanager_secret.jwt_secret.name
}
