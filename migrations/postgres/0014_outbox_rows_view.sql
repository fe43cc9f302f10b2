-- prism_outbox_rows: every outbox row as operators and SQL users should read it, with the columns
-- prism-sync maintains (state, attempts, batch_id, last_error_*, completed_at) as they stand.
--
-- Today it reads them straight from prism_outbox, where they are stored on every change. It
-- exists so that where a row's state is read can stay put while how it is kept changes: issue 16
-- (half the database cost per synced change) moves the claim and the batch's success out of
-- prism_outbox, and from then on these columns are derived (a row's claim, its batch's outcome)
-- and only this view shows them right. Read a row's state here; applications keep inserting
-- into prism_outbox as before. txid is left out: it is prism-sync's bookkeeping, not a change's.
--
-- A view is a catalogue entry: creating it takes no lock that holds back the application's
-- inserts, and reading it costs what reading prism_outbox costs (the planner inlines it).
CREATE VIEW prism_outbox_rows AS
SELECT id, record_id, patch, object_type, operation, team_id, enqueued_at,
       state, attempts, next_attempt_at, first_attempt_at, batch_id,
       last_error_code, last_error_message, completed_at
FROM prism_outbox;
