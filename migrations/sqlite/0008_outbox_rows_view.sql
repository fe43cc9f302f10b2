-- prism_outbox_rows: every outbox row as operators and SQL users should read it, with the columns
-- prism-sync maintains (state, attempts, batch_id, last_error_*, completed_at) as they stand.
-- The same view as on Postgres (its migration 0014 says why it exists): read a row's state
-- here, so that a later change in how prism-sync keeps it does not move where it is read.
-- Applications keep inserting into prism_outbox as before.
CREATE VIEW prism_outbox_rows AS
SELECT id, record_id, patch, object_type, operation, team_id, enqueued_at,
       state, attempts, next_attempt_at, first_attempt_at, batch_id,
       last_error_code, last_error_message, completed_at
FROM prism_outbox;
