-- no-transaction
-- Batch fill (`batch.linger`): a claim reads each busy lane's newest batches (how many rows they
-- carried, how long ago they were made) to tell a flowing lane from a quiet one. One index range
-- a lane, whatever the number of finished batches kept; one index entry per batch (a hundredth
-- of an entry per row).
--
-- CONCURRENTLY, one statement, outside a transaction: see 0004.
CREATE INDEX CONCURRENTLY IF NOT EXISTS prism_batches_lane ON prism_batches (team_id, object_type, created_at);
