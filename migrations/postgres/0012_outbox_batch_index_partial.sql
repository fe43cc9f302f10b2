-- no-transaction
-- Rows by batch, for the rows of a batch only. prism_outbox_batch (0001) indexed every row,
-- so each application INSERT also wrote an entry for its NULL batch_id, which nothing reads
-- (every query names a batch: `batch_id = ...`, which implies IS NOT NULL). This index holds
-- the same entries less those: the application's insert writes one index entry fewer (about
-- 65 bytes of WAL a row). 0013 drops the old index once this one is built.
--
-- CONCURRENTLY, one statement, outside a transaction: see 0004.
CREATE INDEX CONCURRENTLY IF NOT EXISTS prism_outbox_batched ON prism_outbox (batch_id)
    WHERE batch_id IS NOT NULL;
