-- aishell store schema (SPEC §2 store). Timestamps are INTEGER unix milliseconds.

CREATE TABLE users (
    id         TEXT    PRIMARY KEY NOT NULL,
    is_admin   INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL
);

CREATE TABLE tokens (
    id         TEXT    PRIMARY KEY NOT NULL,
    user_id    TEXT    NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name       TEXT    NOT NULL,
    -- SHA-256 hex of the plaintext; the plaintext is never stored.
    token_hash TEXT    NOT NULL UNIQUE,
    is_admin   INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NULL,
    revoked_at INTEGER NULL
);

CREATE INDEX tokens_user_id ON tokens (user_id);

CREATE TABLE sessions (
    id         TEXT    PRIMARY KEY NOT NULL,
    user_id    TEXT    NOT NULL,
    state      TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    last_seq   INTEGER NOT NULL DEFAULT 0,
    trace_id   TEXT    NOT NULL,
    agent      TEXT    NOT NULL
);

CREATE INDEX sessions_user_id ON sessions (user_id);

CREATE TABLE conversations (
    id            TEXT    NOT NULL,
    session_id    TEXT    NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    title         TEXT    NULL,
    resume_handle TEXT    NULL,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL,
    PRIMARY KEY (session_id, id)
);

CREATE TABLE messages (
    id              INTEGER PRIMARY KEY,
    session_id      TEXT    NOT NULL,
    conversation_id TEXT    NOT NULL,
    -- NULLs are distinct in a UNIQUE constraint, so messages without a
    -- client id never collide.
    client_msg_id   TEXT    NULL,
    role            TEXT    NOT NULL,
    content         TEXT    NOT NULL,
    created_at      INTEGER NOT NULL,
    UNIQUE (session_id, client_msg_id)
);

CREATE INDEX messages_conversation ON messages (session_id, conversation_id, id);

CREATE TABLE session_events (
    session_id TEXT    NOT NULL,
    seq        INTEGER NOT NULL,
    json       TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (session_id, seq)
) WITHOUT ROWID;
