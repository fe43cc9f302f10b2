-- v0: today's schema and statements (src/store/postgres.rs: claim, insert_batches, mark_in_flight,
-- finish_group, update_rows; common.sql has them), every row succeeding.
CREATE VIEW prism_outbox_state AS SELECT id, state FROM prism_outbox;

INSERT INTO wal_config VALUES (false, false);
