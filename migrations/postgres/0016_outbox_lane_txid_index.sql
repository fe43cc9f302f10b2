-- no-transaction
-- The rows of a lane by inserting transaction: a claim's second source, the rows that committed
-- late below their lane's floor (txid at or past the floor's late_txid; see 0015). A range as
-- short as the oldest open outbox writer is young. One entry per insert, never updated.
--
-- CONCURRENTLY, one statement, outside a transaction: see 0004.
CREATE INDEX CONCURRENTLY IF NOT EXISTS prism_outbox_lane_txid ON prism_outbox (team_id, object_type, txid);
