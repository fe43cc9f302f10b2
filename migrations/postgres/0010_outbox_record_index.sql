-- no-transaction
-- Every row of a record, in id order, whatever its state: `prism-sync rows --record-id` ("what
-- happened to contact X?") reads it as one index range. The claim's prism_outbox_record index
-- holds only waiting and in-flight rows, and prism_outbox_dead_record only dead ones, so
-- without this a record's succeeded rows were found by reading the whole outbox.
--
-- CONCURRENTLY, one statement, outside a transaction: see 0004.
CREATE INDEX CONCURRENTLY IF NOT EXISTS prism_outbox_record_all ON prism_outbox (record_id, id);
