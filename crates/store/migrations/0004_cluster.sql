-- Several gateways on one database (docs/cluster.md): who is up, which
-- gateway owns which session (a lease with an epoch that fences its writes),
-- and secrets they all share. Runtime state: `aishell store copy` leaves
-- these tables out. Timestamps are INTEGER unix milliseconds.

CREATE TABLE gateways (
    id           TEXT    PRIMARY KEY NOT NULL,
    internal_url TEXT    NOT NULL,
    started_at   INTEGER NOT NULL,
    heartbeat_at INTEGER NOT NULL
);

-- No foreign key to sessions: a gateway takes the lease before it creates
-- the session. `owner` NULL: released (free whatever `expires_at` says).
-- `epoch` only ever rises, so a row is never deleted.
CREATE TABLE session_leases (
    session_id TEXT    PRIMARY KEY NOT NULL,
    owner      TEXT    NULL,
    epoch      INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);

CREATE INDEX session_leases_owner ON session_leases (owner);

CREATE TABLE shared_secrets (
    name  TEXT PRIMARY KEY NOT NULL,
    value BLOB NOT NULL
);
