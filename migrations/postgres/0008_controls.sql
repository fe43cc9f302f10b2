-- Operator controls and record history. Additive: new tables only.
--
-- prism_pauses: one row per paused team (object_type '') or lane (team, object type). team_id is
--               as stored in the outbox: '' is the configured default team. Every replica reads
--               this small table once per poll interval and leaves what it names out of claims,
--               leases and sends until `prism-sync resume` deletes the row.
CREATE TABLE prism_pauses (
    team_id     text        NOT NULL,
    object_type text        NOT NULL DEFAULT '',
    actor       text        NOT NULL,
    since       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (team_id, object_type)
);

-- prism_responses: what the API returned for a record after an `ok`, kept only while
-- history.keep_responses is on (contact data: off by default) and deleted past
-- history.response_retention. `record` is text, not jsonb: the API's JSON is kept as it came.
-- Keyed by batch first: batch ids are UUIDv7, so the key orders answers by the time their batch
-- was made, and serves both `history` (the record's batches are known) and retention (a range);
-- no other index (an index here would have to be built CONCURRENTLY in a migration of its own).
CREATE TABLE prism_responses (
    batch_id  uuid        NOT NULL,
    record_id uuid        NOT NULL,
    row_ids   bigint[]    NOT NULL,
    record    text,
    stored_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (batch_id, record_id)
);
