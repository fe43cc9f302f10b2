-- The fleet: the `run` processes sharing this database act as one.
--
-- prism_replicas: one row per running daemon, written by its heartbeat (one UPSERT every
--   fleet.heartbeat) and deleted when it stops cleanly. `status` and `top` list them; a row not
--   seen for three of its own heartbeat intervals is shown as silent, and one silent for
--   fleet.forget_after is deleted by the next heartbeat of any replica.
--   teams: what the replica sends for, as JSON: [{"team", "concurrency", "max_in_flight",
--   "max_requests_per_second"}].
-- prism_team_gates: one row per team, shared by every replica sending for it.
--   next_send_at: the next free send slot of the team's fleet-wide request ceiling (a token
--   bucket kept as its "theoretical arrival time"): a replica reserves a few slots at once by
--   moving it forward by that many intervals, and sends at the slots' times.
--   paused_until: a server-requested pause (429, retry-after) that one replica was told of and
--   every replica honours.
-- New tables only: applications that insert into the outbox are not affected.
CREATE TABLE IF NOT EXISTS prism_replicas (
    owner              text PRIMARY KEY,
    host               text NOT NULL,
    pid                bigint NOT NULL,
    version            text NOT NULL,
    started_at         timestamptz NOT NULL DEFAULT now(),
    last_seen_at       timestamptz NOT NULL DEFAULT now(),
    heartbeat_seconds  double precision NOT NULL,
    batches_held       bigint NOT NULL DEFAULT 0,
    teams              jsonb NOT NULL DEFAULT '[]'
);

CREATE TABLE IF NOT EXISTS prism_team_gates (
    team_id       text PRIMARY KEY,
    next_send_at  timestamptz NOT NULL DEFAULT now(),
    paused_until  timestamptz
);
