-- Operator controls and record history. Additive: new tables only.
--
-- prism_pauses: one row per paused team (object_type '') or lane (team, object type). team_id is
--               as stored in the outbox: '' is the configured default team. Every replica reads
--               this small table once per poll interval and leaves what it names out of claims,
--               leases and sends until `prism-sync resume` deletes the row.
CREATE TABLE prism_pauses (
    team_id     TEXT NOT NULL,
    object_type TEXT NOT NULL DEFAULT '',
    actor       TEXT NOT NULL,
    since       TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (team_id, object_type)
);

-- prism_responses: what the API returned for a record after an `ok`, kept only while
-- history.keep_responses is on (contact data: off by default) and deleted past
-- history.response_retention. row_ids is a JSON array of the outbox rows the item carried.
-- Keyed by batch first: batch ids are UUIDv7, so the key orders answers by the time their batch
-- was made, and serves both `history` (the record's batches are known) and retention (a range).
CREATE TABLE prism_responses (
    batch_id  TEXT NOT NULL,
    record_id TEXT NOT NULL,
    row_ids   TEXT NOT NULL,
    record    TEXT,
    stored_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (batch_id, record_id)
);
