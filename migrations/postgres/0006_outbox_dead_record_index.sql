-- no-transaction
-- Dead rows by record: purge keeps a succeeded row while an older row of its record is dead
-- (a replay of that row is judged against the newer changes the API applied, so they must still
-- be there), and asks for each succeeded row it would delete whether such a dead row exists.
-- Dead rows are few; the partial index stays small.
--
-- CONCURRENTLY, one statement, outside a transaction: see 0004.
CREATE INDEX CONCURRENTLY IF NOT EXISTS prism_outbox_dead_record ON prism_outbox (record_id, id)
    WHERE state = 'dead';
