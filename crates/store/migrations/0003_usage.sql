-- Sandbox time per user, one row per task: the basis of weekly quotas and
-- `aishell usage`.
CREATE TABLE usage (
    task_id TEXT PRIMARY KEY,
    session_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    started_at INTEGER NOT NULL,
    ended_at INTEGER
);
CREATE INDEX usage_user_started ON usage (user_id, started_at);
