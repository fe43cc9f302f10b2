-- v4 (directions a + c): v2's indexes and v3's per-batch success.
-- From v2: (direction a): no index of prism_outbox names a column the hot path writes (state, batch_id,
-- first_attempt_at, attempts, completed_at, ...), so the claim's and the outcome's updates can be
-- HOT. Waiting rows are found by walking the lane in id order from the lane's floor (the first
-- row that may still wait) instead of through a partial index on state.
--   lane:   (team_id, object_type, id), no predicate: replaces prism_outbox_lane
--   record: (record_id, id), no predicate: replaces prism_outbox_record and _dead_record
--   prism_outbox_batch and prism_outbox_completed go: a batch lists its rows (items), and purge
--   can walk ids (or the batches' completed_at).
-- What this leaves out (see docs/database-cost.md): rows that go retrying live in a small side
-- table (failures only), and the floor must not pass a row of a transaction still in progress.
-- IF EXISTS and _batched: 0012-0013 replaced prism_outbox_batch with prism_outbox_batched; either way
-- the outbox keeps no batch index here.
DROP INDEX IF EXISTS prism_outbox_lane, prism_outbox_record, prism_outbox_batch, prism_outbox_batched,
           prism_outbox_completed, prism_outbox_dead_record;
CREATE INDEX prism_outbox_lane_all ON prism_outbox (team_id, object_type, id);
CREATE INDEX IF NOT EXISTS prism_outbox_record_all ON prism_outbox (record_id, id);
CREATE TABLE prism_lane_floor (
    team_id text NOT NULL, object_type text NOT NULL, floor_id bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (team_id, object_type));
INSERT INTO prism_lane_floor VALUES ('', 'contact', 0);
CREATE VIEW prism_outbox_state AS
    SELECT o.id, CASE WHEN o.state = 'in_flight' AND b.state = 'done' THEN 'succeeded'
                      ELSE o.state END AS state
    FROM prism_outbox o LEFT JOIN prism_batches b ON b.id = o.batch_id;
INSERT INTO wal_config VALUES (true, true);
