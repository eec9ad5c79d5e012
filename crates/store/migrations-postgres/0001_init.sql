-- aishell store schema for PostgreSQL: the tables of the SQLite store
-- (../migrations, all of its migrations in one), with the same encodings so
-- both stores behave the same (tests/conformance):
-- * timestamps are BIGINT unix milliseconds, set by the gateway;
-- * ids are compared and ordered byte-wise (COLLATE "C"), as SQLite does,
--   whatever the database's locale.

CREATE TABLE users (
    id         TEXT COLLATE "C" PRIMARY KEY,
    is_admin   BOOLEAN NOT NULL DEFAULT FALSE,
    created_at BIGINT  NOT NULL
);

CREATE TABLE tokens (
    id         TEXT COLLATE "C" PRIMARY KEY,
    user_id    TEXT COLLATE "C" NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name       TEXT    NOT NULL,
    -- SHA-256 hex of the plaintext; the plaintext is never stored.
    token_hash TEXT    NOT NULL UNIQUE,
    is_admin   BOOLEAN NOT NULL DEFAULT FALSE,
    created_at BIGINT  NOT NULL,
    expires_at BIGINT  NULL,
    revoked_at BIGINT  NULL
);

CREATE INDEX tokens_user_id ON tokens (user_id);

CREATE TABLE sessions (
    id         TEXT COLLATE "C" PRIMARY KEY,
    user_id    TEXT COLLATE "C" NOT NULL,
    state      TEXT   NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    last_seq   BIGINT NOT NULL DEFAULT 0,
    trace_id   TEXT   NOT NULL,
    agent      TEXT   NOT NULL,
    -- The task the session is bound to and the last agent frame (runner
    -- seq) whose event is stored, for re-adoption after a gateway restart.
    task_id    TEXT   NULL,
    runner_seq BIGINT NOT NULL DEFAULT 0
);

CREATE INDEX sessions_user_id ON sessions (user_id);

CREATE TABLE conversations (
    id            TEXT COLLATE "C" NOT NULL,
    session_id    TEXT COLLATE "C" NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    -- Insertion order: the tie-breaker SQLite's rowid gives conversations
    -- created in the same millisecond.
    position      BIGINT GENERATED ALWAYS AS IDENTITY,
    title         TEXT   NULL,
    resume_handle TEXT   NULL,
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL,
    PRIMARY KEY (session_id, id)
);

CREATE TABLE messages (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    session_id      TEXT COLLATE "C" NOT NULL,
    conversation_id TEXT COLLATE "C" NOT NULL,
    -- NULLs are distinct in a UNIQUE constraint, so messages without a
    -- client id never collide.
    client_msg_id   TEXT   NULL,
    role            TEXT   NOT NULL,
    content         TEXT   NOT NULL,
    created_at      BIGINT NOT NULL,
    UNIQUE (session_id, client_msg_id)
);

CREATE INDEX messages_conversation ON messages (session_id, conversation_id, id);

CREATE TABLE session_events (
    session_id TEXT COLLATE "C" NOT NULL,
    seq        BIGINT NOT NULL,
    json       TEXT   NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (session_id, seq)
);

-- Sandbox time per user, one row per task: the basis of weekly quotas and
-- `aishell usage`.
CREATE TABLE usage (
    task_id    TEXT COLLATE "C" PRIMARY KEY,
    session_id TEXT COLLATE "C" NOT NULL,
    user_id    TEXT COLLATE "C" NOT NULL,
    started_at BIGINT NOT NULL,
    ended_at   BIGINT NULL
);

CREATE INDEX usage_user_started ON usage (user_id, started_at);
