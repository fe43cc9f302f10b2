-- v7 (stored state, one non-HOT update per row): no index of prism_outbox names a column that a
-- row's *success* writes (state, attempts, completed_at, last_error_*), so the outcome update of a
-- succeeded row can be HOT, while the claim's update (it sets batch_id) is the row's one non-HOT
-- update: waiting rows are those with no batch (the lane index's predicate is batch_id IS NULL;
-- a row that goes retrying would drop its batch_id), and the per-record order guard walks the
-- unconditional (record_id, id) index from a bound below which every row is finished.
--   lane:   (team_id, object_type, id) WHERE batch_id IS NULL: replaces prism_outbox_lane
--   record: prism_outbox_record_all (0010) replaces prism_outbox_record and _dead_record
--   prism_outbox_completed goes (purge walks ids or the batches' completed_at); prism_outbox_batch
--   stays (batch_id is written by the claim, never by a success).
DROP INDEX prism_outbox_lane, prism_outbox_record, prism_outbox_completed, prism_outbox_dead_record;
CREATE INDEX prism_outbox_lane_waiting ON prism_outbox (team_id, object_type, id) WHERE batch_id IS NULL;
CREATE VIEW prism_outbox_state AS SELECT id, state FROM prism_outbox;
INSERT INTO wal_config VALUES (false, false);
