-- Finding rows (`prism-sync rows`, and the selections of `replay` and `discard`) on a large
-- outbox. Both indexes are partial: they hold only rows that failed, so the claim and outcome
-- writes of rows that go through at the first try never touch them.
--
-- By error code, in id order: `rows --error-code CODE` reads one page as one index range. A row
-- keeps its last code after it succeeds on a retry, so the index holds every row that ever
-- failed (a query's `last_error_code = ?` implies the predicate).
CREATE INDEX prism_outbox_error_code ON prism_outbox (last_error_code, id)
    WHERE last_error_code IS NOT NULL;
-- Dead rows in id order: `rows --state dead` and replay's selection. Postgres has
-- prism_outbox_dead_record (migration 0006 there) for the same rows.
CREATE INDEX prism_outbox_dead ON prism_outbox (id) WHERE state = 'dead';
