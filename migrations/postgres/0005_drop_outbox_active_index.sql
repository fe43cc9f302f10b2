-- no-transaction
-- The id-only index of waiting rows, replaced by prism_outbox_lane (0004). Dropped CONCURRENTLY:
-- a plain DROP INDEX queues for an exclusive lock behind every open transaction on the outbox,
-- and every INSERT queues behind it meanwhile.
DROP INDEX CONCURRENTLY IF EXISTS prism_outbox_active;
