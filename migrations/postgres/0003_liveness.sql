-- Liveness: every row ends. Additive (a nullable column without a default is a catalogue change;
-- applications keep inserting (record_id, patch) as before).
--
-- first_attempt_at: when the row was first put in flight. retry.give_up_after counts from it: a row
--                   still failing past it goes dead with its last code, so no row (and no later
--                   change of its record) waits forever.
-- (record_id is a uuid here, so every spelling of one UUID is already one value.)
-- ADD COLUMN is instant, but it needs the table's lock for that instant, and while it waits for
-- an application transaction that holds the outbox, the application's next inserts queue behind
-- it. So it waits at most 2 s; prism-sync's migrator tries again a moment later (lock_not_available).
SET LOCAL lock_timeout = '2s';
ALTER TABLE prism_outbox ADD COLUMN first_attempt_at timestamptz;
