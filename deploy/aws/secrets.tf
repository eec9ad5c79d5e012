# Values are set outside Terraform (so they never enter its state):
#   aws secretsmanager put-secret-value --secret-id <name>/model-keys --secret-string 'sk-...'
resource "aws_secretsmanager_secret" "model_keys" {
  name        = "${var.name}/model-keys"
  description = "Model API keys, comma-separated; held by the gateway only (never in a sandbox)."
  kms_key_id  = aws_kms_key.main.arn
  tags        = local.tags
  # checkov:skip=CKV2_AWS_57: provider API keys are rotated at the provider; there is no rotation Lambda to run.
}

resource "aws_secretsmanager_secret" "jwt_secret" {
  name        = "${var.name}/jwt-secret"
  description = "HS256 secret verifying users' tokens."
  kms_key_id  = aws_kms_key.main.arn
  tags        = local.tags
  # checkov:skip=CKV2_AWS_57: shared with the identity provider that signs the tokens, which rotates it.
}

resource "random_password" "jwt" {
  length  = 48
  special = false
}

resource "aws_secretsmanager_secret_version" "jwt_secret" {
  secret_id     = aws_secretsmanager_secret.jwt_secret.id
  secret_string = random_password.jwt.result
  lifecycle {
    ignore_changes = [secret_string]
  }
}
