-- v6: v5 without row locks. A claim locks its lane instead (the lane's floor row, FOR UPDATE SKIP
-- LOCKED: another claimer skips a lane being claimed) and claims rows by inserting their narrow
-- rows into prism_outbox_claims, so prism_outbox pages are never written after the application's
-- INSERT (no lock records, no full-page images after a checkpoint). A batch whose rows all
-- succeeded is recorded once, by its state. The state SQL users read is prism_outbox_state.
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
    SELECT o.id,
           CASE WHEN c.id IS NULL THEN o.state          -- never claimed: 'pending' (or dead at claim)
                WHEN c.state IS NOT NULL THEN c.state
                WHEN b.state = 'open' THEN 'in_flight'
                WHEN b.state = 'done' THEN 'succeeded'
                ELSE 'in_flight' END AS state           -- split or released: its rows were re-homed
    FROM prism_outbox o
    LEFT JOIN prism_outbox_claims c ON c.id = o.id
    LEFT JOIN prism_batches b ON b.id = c.batch_id;
INSERT INTO wal_config VALUES (true, true, true, true);
