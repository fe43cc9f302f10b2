-- no-transaction
-- The unconditional batch_id index, replaced by prism_outbox_batched (0012). Dropped
-- CONCURRENTLY, as 0005: a plain DROP INDEX queues for an exclusive lock behind every open
-- transaction on the outbox, and every INSERT queues behind it meanwhile.
DROP INDEX CONCURRENTLY IF EXISTS prism_outbox_batch;
