-- Several gateways on one database (docs/cluster.md): who is up, which
-- gateway owns which session (a lease with an epoch that fences its writes),
-- and secrets they all share; the tables of ../migrations/0004_cluster.sql.
-- Runtime state: `aishell store copy` leaves these tables out. Timestamps
-- are BIGINT unix milliseconds, but of the database's clock here (set in
-- SQL), so gateways whose clocks disagree still agree on lease expiry.

CREATE TABLE gateways (
    id           TEXT COLLATE "C" PRIMARY KEY,
    internal_url TEXT   NOT NULL,
    started_at   BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL
);

-- No foreign key to sessions: a gateway takes the lease before it creates
-- the session. `owner` NULL: released (free whatever `expires_at` says).
-- `epoch` only ever rises, so a row is never deleted.
CREATE TABLE session_leases (
    session_id TEXT COLLATE "C" PRIMARY KEY,
    owner      TEXT COLLATE "C" NULL,
    epoch      BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);

CREATE INDEX session_leases_owner ON session_leases (owner);

CREATE TABLE shared_secrets (
    name  TEXT COLLATE "C" PRIMARY KEY,
    value BYTEA NOT NULL
);
