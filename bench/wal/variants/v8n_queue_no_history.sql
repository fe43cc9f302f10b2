-- v8n: v8 (v8_queue.sql, whose DDL this runs) without prism_outbox_claims rows: once a row has left
-- the queue, only its batch's item map records which batch sent it. Measures the claim rows' share.
\ir v8_queue.sql
UPDATE wal_config SET queue_history = false;
