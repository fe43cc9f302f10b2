-- The fleet: the `run` processes sharing this database file act as one.
--
-- prism_replicas: one row per running daemon, written by its heartbeat (one UPSERT every
--   fleet.heartbeat) and deleted when it stops cleanly. `status` and `top` list them; a row not
--   seen for three of its own heartbeat intervals is shown as silent, and one silent for
--   fleet.forget_after is deleted by the next heartbeat of any replica.
--   teams: what the replica sends for, as JSON: [{"team", "concurrency", "max_in_flight",
--   "max_requests_per_second"}].
-- prism_team_gates: one row per team, shared by every process sending for it.
--   next_send_at: the next free send slot of the team's request ceiling (a token bucket kept as
--   its "theoretical arrival time"): a process reserves a few slots at once by moving it forward
--   by that many intervals, and sends at the slots' times.
--   paused_until: a server-requested pause (429, retry-after) that one process was told of and
--   every process honours.
-- Times are text in the outbox's format ('%Y-%m-%dT%H:%M:%fZ', UTC), from the database's clock.
CREATE TABLE IF NOT EXISTS prism_replicas (
    owner              TEXT PRIMARY KEY,
    host               TEXT NOT NULL,
    pid                INTEGER NOT NULL,
    version            TEXT NOT NULL,
    started_at         TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    last_seen_at       TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    heartbeat_seconds  REAL NOT NULL,
    batches_held       INTEGER NOT NULL DEFAULT 0,
    teams              TEXT NOT NULL DEFAULT '[]'
);

CREATE TABLE IF NOT EXISTS prism_team_gates (
    team_id       TEXT PRIMARY KEY,
    next_send_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    paused_until  TEXT
);
