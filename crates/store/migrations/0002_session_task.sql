-- The task a session is bound to and the last agent frame (runner seq) whose
-- event is stored, so a restarted gateway can re-adopt the task's runner and
-- drop frames it resends that were already stored.
ALTER TABLE sessions ADD COLUMN task_id TEXT;
ALTER TABLE sessions ADD COLUMN runner_seq INTEGER NOT NULL DEFAULT 0;
